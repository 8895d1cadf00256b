"""``netcarve reproduce``: scripted experiments that reproduce the papers' tables.

Thin: each sub-command parses its options and calls one function of
:mod:`netcarve.reproduce`; the experiment writes ``report.md``, figures, CSV tables and
``summary.json`` into ``--out``. Registered on the main group by :mod:`netcarve.cli` through
:data:`COMMANDS`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from netcarve.cli.common import fail_cleanly
from netcarve.reproduce import EXPERIMENTS

__all__ = ["COMMANDS", "reproduce"]

DEFAULT_OUT = Path("out/reproduce")


def _runner(name: str) -> Callable[..., dict[str, Any]]:
    """The function that runs experiment ``name`` (imported only when it is run)."""
    if name == "circuits":
        from netcarve.reproduce.circuits import run_circuits

        return run_circuits
    if name == "subfeatures":
        from netcarve.reproduce.subfeatures import run_subfeatures

        return run_subfeatures
    if name == "car":
        from netcarve.reproduce.car import run_car

        return run_car
    if name == "fop":
        from netcarve.reproduce.fop import run_fop

        return run_fop
    if name == "planted":
        from netcarve.reproduce.planted import run_planted_report

        return run_planted_report
    raise click.BadParameter(f"unknown experiment {name!r}; use one of {', '.join(EXPERIMENTS)}")


def _command_line(name: str, quick: bool, seed: int, out: Path, threads: int) -> str:
    from netcarve.reproduce.report import canonical_command

    return canonical_command(name, quick=quick, seed=seed, out=out,
                             threads=None if threads == 1 else threads)


def run_experiment(name: str, quick: bool, seed: int, out: Path | None,
                   threads: int) -> dict[str, Any]:
    """Run one experiment as the CLI does (progress on stderr) and return its summary."""
    from netcarve.cli.common import command_line
    from netcarve.cli.run_folder import run_folder
    from netcarve.reproduce.report import stderr_logger

    target = out if out is not None else DEFAULT_OUT / name
    with run_folder(target, command_line(), name=f"reproduce-{name}"):
        return _runner(name)(target, quick=quick, seed=seed, threads=threads,
                             command=_command_line(name, quick, seed, target, threads),
                             log=stderr_logger(name))


def _echo(results: dict[str, dict[str, Any]], as_json: bool) -> None:
    """The reports' paths, one per line, or every summary as one JSON object."""
    if as_json:
        data = next(iter(results.values())) if len(results) == 1 else results
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        for result in results.values():
            click.echo(result["report"])


def _options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by every experiment."""
    options = [
        click.option("--quick", is_flag=True,
                     help="Reduced settings (about a minute): a smoke test, not results."),
        click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
                     help=f"Output folder [default: {DEFAULT_OUT}/<experiment>]."),
        click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
                     help="Seeds every random draw of the experiment."),
        click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
                     help="torch threads (small models run best on one per process)."),
        click.option("--json", "as_json", is_flag=True,
                     help="Print the summary as JSON instead of the report's path."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@click.group()
def reproduce() -> None:
    """Scripted experiments on the bundled models that reproduce the papers' tables.

    Each writes report.md (command, seed and versions at the top), PNG figures, CSV tables
    and summary.json into --out, and prints the report's path. Full runs take up to about
    15 minutes each on two CPU cores; --quick runs about a minute.
    """


def _make(name: str) -> click.Command:
    @reproduce.command(name=name, help=f"{EXPERIMENTS[name][0].upper()}{EXPERIMENTS[name][1:]}.")
    @_options
    @fail_cleanly
    def command(quick: bool, out: Path | None, seed: int, threads: int, as_json: bool) -> None:
        _echo({name: run_experiment(name, quick, seed, out, threads)}, as_json)

    return command


for _name in EXPERIMENTS:
    _make(_name)


@reproduce.command(name="all")
@_options
@fail_cleanly
def all_experiments(quick: bool, out: Path | None, seed: int, threads: int,
                    as_json: bool) -> None:
    """Run every experiment in turn, each into <out>/<experiment>."""
    base = out if out is not None else DEFAULT_OUT
    results = {}
    for name in EXPERIMENTS:
        results[name] = run_experiment(name, quick, seed, base / name, threads)
        if not as_json:
            _echo({name: results[name]}, False)
    if as_json:
        _echo(results, True)


COMMANDS: list[click.Command] = [reproduce]
"""Commands to register on the main ``netcarve`` group."""
