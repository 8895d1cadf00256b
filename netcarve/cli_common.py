"""Helpers shared by every CLI command module (kept apart from ``cli.py`` so that command
modules can import them without importing the command group that registers them)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
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


def _stack(fn: Callable[..., Any], options: list[Callable[..., Any]]) -> Callable[..., Any]:
    for option in reversed(options):
        fn = option(fn)
    return fn


def source_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--weights --preset --images-dir`` (where the model and images come from)."""
    return _stack(fn, [
        click.option("--weights", type=click.Path(path_type=Path), default=None,
                     help="Weight file (safetensors or a torch.save'd state dict)."),
        click.option("--preset", default=None,
                     help="Input preset (a zoo name) for a package.module:factory model."),
        click.option("--images-dir", type=click.Path(path_type=Path), default=None,
                     help="Your own images (one sub-folder per class) instead of built-in data."),
    ])


def run_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--device --seed --out --json`` (how to run and where the results go)."""
    return _stack(fn, [
        click.option("--device", default="cpu", show_default=True),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
                     help="Output folder."),
        click.option("--json", "as_json", is_flag=True, help="Print summary.json to stdout."),
    ])
