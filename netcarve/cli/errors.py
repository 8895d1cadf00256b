"""The command line's error boundary: the one place where exceptions become exit codes.

Every command runs inside :func:`error_boundary`. What bad input or a bad environment can
cause becomes one ``error:`` line and its exit code; anything else is a bug in netcarve and
keeps its traceback, followed by a line asking the user to report it.

======  =====================================================================================
code    meaning
======  =====================================================================================
0       success
1       a bug in netcarve (traceback shown), or the machine ran out of memory
2       bad arguments or names (unknown model, layer, channel, device, criterion, ...)
3       a data problem: a missing, unreadable, truncated or malformed file or folder
4       a weight file that does not fit the architecture or cannot be read safely
130     interrupted (Ctrl-C)
======  =====================================================================================

``netcarve --debug COMMAND`` or ``NETCARVE_DEBUG=1`` prints the full traceback for every
error, with the same exit code.
"""

from __future__ import annotations

import errno
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import click

from netcarve.core.errors import NetcarveError

EXIT_BUG = 1
EXIT_USAGE = 2
EXIT_DATA = 3
EXIT_WEIGHTS = 4
EXIT_INTERRUPTED = 130

DEBUG_ENV = "NETCARVE_DEBUG"
DEBUG_META = "netcarve.debug"


def debug_enabled() -> bool:
    """Whether ``--debug`` was given to the ``netcarve`` group or ``NETCARVE_DEBUG`` is set."""
    if os.environ.get(DEBUG_ENV, "").strip().lower() in {"1", "true", "yes", "on"}:
        return True
    ctx = click.get_current_context(silent=True)
    return bool(ctx is not None and ctx.find_root().meta.get(DEBUG_META))


def _os_message(exc: OSError) -> str:
    where = exc.filename if exc.filename is not None else "a file"
    if isinstance(exc, FileNotFoundError):
        return f"no such file or folder: {where}"
    if isinstance(exc, NotADirectoryError):
        return f"{where}: a part of this path is a file, not a folder"
    if isinstance(exc, IsADirectoryError):
        return f"{where} is a folder; a file was expected"
    if isinstance(exc, PermissionError):
        return f"permission denied: {where}"
    if exc.errno == errno.ENOSPC:
        return f"no space left on the device while writing {where}"
    return f"{where}: {exc.strerror or exc}"


def classify(exc: BaseException) -> tuple[int, str] | None:
    """The exit code and message for an exception bad input can cause; None for a bug.

    Args:
        exc: the exception that ended a command.

    Returns:
        ``(exit_code, message)``, or ``None`` when the exception is a bug in netcarve.

    Example:
        >>> classify(FileNotFoundError(2, "No such file", "x.pt"))
        (3, 'no such file or folder: x.pt')
    """
    if isinstance(exc, NetcarveError):
        return exc.exit_code, str(exc)
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "interrupted"
    if isinstance(exc, OSError):
        return EXIT_DATA, _os_message(exc)
    if isinstance(exc, UnicodeError):
        return EXIT_DATA, f"a file is not valid text ({exc})"
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return EXIT_BUG, ("out of memory: use fewer images (--images) or a smaller batch, or "
                          "a machine with more memory")
    return None


def one_line(message: str) -> str:
    """``message`` on one line: lines joined by spaces, "- " list items by "; ".

    Every error netcarve prints is one line, so that it is the last line of the output and a
    script can read it with ``tail -1``; messages built from lists stay readable.

    Example:
        >>> one_line("not found. Looked in:\n  - /a\n  - /b\nSet X.")
        'not found. Looked in: /a; /b. Set X.'
    """
    out = ""
    depth: int | None = None  # indentation of the previous line when it was a list item
    for raw in message.splitlines():
        line = raw.strip()
        if not line:
            continue
        indent = len(raw) - len(raw.lstrip())
        item = line.startswith(("- ", "* "))
        if item:
            line = line[2:].strip()
        if not out:
            out = line
        elif out.endswith(":"):
            out += " " + line
        elif item and depth is not None and indent >= depth:
            out += "; " + line
        elif depth is not None:  # a list just ended (or went back up a level)
            out += ("" if out.endswith(".") else ".") + " " + line
        else:
            out += " " + line
        depth = indent if item else None
    return out


def _close_progress_bars() -> None:
    """Finish any progress bar the failed command left open, so that the error is the last
    line on its own (an open bar would otherwise be redrawn after it when it is collected)."""
    tqdm_module = sys.modules.get("tqdm")
    bars = getattr(getattr(tqdm_module, "tqdm", None), "_instances", None)
    for bar in list(bars or ()):
        with suppress(Exception):  # a broken bar must not hide the real error
            bar.close()


def report(exc: BaseException, *, debug: bool | None = None) -> int:
    """Print what the user should see for ``exc`` and return the exit code.

    Args:
        exc: the exception that ended a command.
        debug: show the full traceback (default: :func:`debug_enabled`).

    Returns:
        The process exit code.
    """
    debug = debug_enabled() if debug is None else debug
    _close_progress_bars()
    verdict = classify(exc)
    if verdict is None or debug:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    if verdict is not None:
        code, message = verdict
        click.echo(f"error: {one_line(message)}", err=True)
        return code
    from netcarve._version import __version__

    click.echo(f"error: internal error ({type(exc).__name__}: {exc}). This is a bug in "
               f"netcarve {__version__}: please report it with the command you ran and the "
               "traceback above.", err=True)
    return EXIT_BUG


@contextmanager
def error_boundary() -> Iterator[None]:
    """Run a command body; turn any exception into a message and ``sys.exit(code)``.

    Click's own exceptions (usage errors, ``--help``, ``ctx.exit``) and ``SystemExit`` pass
    through untouched so that click reports them.
    """
    try:
        yield
    except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort,
            SystemExit):
        raise
    except BaseException as exc:  # the boundary: report() tells input problems from bugs
        sys.exit(report(exc))


def fail_cleanly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: run a click command inside :func:`error_boundary`.

    Example:
        >>> @fail_cleanly
        ... def cmd():
        ...     raise NetcarveError("bad")
    """
    from functools import wraps

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with error_boundary():
            return fn(*args, **kwargs)

    wrapper.netcarve_error_boundary = True  # type: ignore[attr-defined]  # checked by the tests
    return wrapper
