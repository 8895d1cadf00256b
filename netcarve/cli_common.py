"""Helpers shared by every CLI command module (kept apart from ``cli.py`` so that command
modules can import them without importing the command group that registers them)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

import click

from .errors import NetcarveError


def fail_cleanly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn user mistakes (NetcarveError) into a one-line message and a meaningful exit code.

    Example:
        >>> @fail_cleanly
        ... def cmd():
        ...     raise NetcarveError("bad")
    """

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except NetcarveError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)

    return wrapper


def emit(data: Any, as_json: bool, text: str) -> None:
    """Print ``data`` as JSON when ``as_json``, else the human-readable ``text``."""
    click.echo(json.dumps(data, indent=2, default=str) if as_json else text)
