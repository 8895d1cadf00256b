"""Helpers shared by every CLI command module (kept apart from ``cli.py`` so that command
modules can import them without importing the command group that registers them)."""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import click

from netcarve.cli.errors import EXIT_USAGE, fail_cleanly
from netcarve.cli.run_folder import run_folder

__all__ = ["device_option", "emit", "fail_cleanly", "in_run_folder", "load_cli_model",
           "run_options", "source_options", "workers_option"]

_CLASS_NAMES = "netcarve.class_names"


def emit(data: Any, as_json: bool, text: str) -> None:
    """Print ``data`` as JSON when ``as_json``, else the human-readable ``text``."""
    click.echo(json.dumps(data, indent=2, default=str) if as_json else text)


def _stack(fn: Callable[..., Any], options: list[Callable[..., Any]]) -> Callable[..., Any]:
    for option in reversed(options):
        fn = option(fn)
    return fn


def _remember_class_names(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    ctx.meta[_CLASS_NAMES] = value


def load_cli_model(model: str, weights: Path | None, preset: str | None, device: str) -> Any:
    """:func:`netcarve.zoo.load_model` with the command's ``--class-names`` applied."""
    from netcarve.zoo import load_model

    ctx = click.get_current_context(silent=True)
    names = None if ctx is None else ctx.meta.get(_CLASS_NAMES)
    return load_model(model, weights, preset=preset, device=device, class_names=names)


def source_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--weights --preset --class-names --images-dir`` (where the model and images come
    from); commands load the model with :func:`load_cli_model`."""
    return _stack(fn, [
        click.option("--weights", type=click.Path(path_type=Path), default=None,
                     help="Weight file (safetensors or a torch.save'd state dict)."),
        click.option("--preset", default=None,
                     help="Input preset: 'imagenet' (224 crop of a 256 resize; the default "
                          "for torchvision.models:NAME and timm:NAME) or a zoo name, for a "
                          "package.module:factory model."),
        click.option("--class-names", type=click.Path(exists=True, path_type=Path),
                     default=None, expose_value=False, callback=_remember_class_names,
                     is_eager=True,
                     help="The outputs' names: a text file (one per line) or a folder (its "
                          "sorted sub-folders, e.g. an ImageNet train folder)."),
        click.option("--images-dir", type=click.Path(path_type=Path), default=None,
                     help="Your own images (one sub-folder per class) instead of built-in data."),
    ])


def _check_device(ctx: click.Context, param: click.Parameter, value: str) -> str:
    from netcarve.core.devices import DeviceError, resolve_device

    try:
        return str(resolve_device(value))
    except DeviceError as exc:
        # One line and exit 2, like every other bad name (click's BadParameter adds usage text).
        click.echo(f"error: {exc}", err=True)
        ctx.exit(EXIT_USAGE)


def device_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--device`` (auto: the GPU when there is one, else the CPU), resolved and checked."""
    return click.option("--device", default="auto", show_default=True, callback=_check_device,
                        help="auto, cpu, cuda, cuda:N or mps.")(fn)


def command_line() -> str:
    """The command as typed (for manifests and lock messages)."""
    return shlex.join(["netcarve", *sys.argv[1:]])


def in_run_folder(fn: Callable[..., Any] | None = None, *, resumable: bool = False) -> Any:
    """Decorator: run a command whose ``out`` argument is a folder inside
    :func:`netcarve.cli.run_folder.run_folder` (one writer, never a mix of two runs) and inside
    the error boundary. ``out=None`` (a command's default folder) is passed through.

    Example:
        >>> @in_run_folder
        ... def cmd(out): ...
    """
    def decorate(body: Callable[..., Any]) -> Callable[..., Any]:
        @wraps(body)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            out = kwargs.get("out")
            if out is None:
                return body(*args, **kwargs)
            ctx = click.get_current_context(silent=True)
            name = "-".join(ctx.command_path.split()[1:]) if ctx is not None else body.__name__
            inputs = [v for k, v in kwargs.items() if k != "out" and isinstance(v, Path)]
            with run_folder(out, command_line(), name=name or body.__name__,
                            resumable=resumable, inputs=inputs):
                return body(*args, **kwargs)

        return fail_cleanly(wrapper)

    return decorate if fn is None else decorate(fn)


def run_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--device --seed --out --json`` (how to run and where the results go); the command
    runs inside :func:`in_run_folder`."""
    return _stack(in_run_folder(fn), [
        device_option,
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
                     help="Output folder."),
        click.option("--json", "as_json", is_flag=True, help="Print summary.json to stdout."),
    ])


def workers_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--workers`` (processes decoding an ``--images-dir`` folder while the model runs)."""
    return click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True,
                        help="Processes decoding --images-dir images (the folder is streamed, "
                             "never held in memory).")(fn)
