"""``netcarve reproduce planted``: can the criteria recover a circuit planted by construction?

The benchmark itself lives in :mod:`netcarve.benchmarks`
(:func:`netcarve.benchmarks.planted.run_planted` writes ``planted.md``, ``planted.csv`` and
``planted.png``). This module runs it and wraps its Markdown in a ``report.md`` with the same
header as the other experiments (command, seed, versions, date), so every ``netcarve
reproduce`` folder reads the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from netcarve.reproduce.report import (
    Logger,
    quiet,
    run_context,
    start_report,
)

__all__ = ["run_planted_report"]


def _demote(markdown: str) -> list[str]:
    """The benchmark's Markdown with every heading one level lower (it sits under ours)."""
    return [f"#{line}" if line.startswith("#") else line for line in markdown.splitlines()]


def run_planted_report(
    out_dir: str | Path,
    *,
    quick: bool = False,
    seed: int = 0,
    threads: int | None = 1,
    command: str | None = None,
    log: Logger | None = None,
) -> dict[str, Any]:
    """Run :func:`netcarve.benchmarks.planted.run_planted` into ``out_dir`` and write ``report.md``.

    Args:
        out_dir: output folder (created).
        quick: the benchmark's quick mode (one construction seed, few images).
        seed: the first construction seed.
        threads: torch threads.
        command: the command line recorded in the report.
        log: progress messages.

    Returns:
        the benchmark's summary plus ``report`` (the path of ``report.md``).

    Raises:
        ReproduceError: bad output folder. PlantedError: from the benchmark.

    Example:
        >>> run_planted_report("out/reproduce/planted", quick=True)  # doctest: +SKIP
    """
    from netcarve.benchmarks.planted import run_planted

    log = log or quiet()
    out, rep = start_report(
        "planted", "Reproduce: recovering planted circuits",
        out_dir, quick=quick, seed=seed, threads=threads, command=command)
    log("running the planted-circuit benchmark")
    with run_context(seed, threads):
        result = run_planted(out, quick=quick, seed=seed)
    files = result.get("files", {})
    md = Path(files.get("markdown", out / "planted.md"))
    rep.p("Hand-built networks whose circuit for a target is known by construction: each "
          "criterion is asked to recover it, and the recovered kernels are compared with the "
          "ground truth (precision, recall, held-out preservation). The benchmark is "
          "`netcarve.benchmarks.planted.run_planted`; its own report follows.")
    if md.exists():
        rep.body += [*_demote(md.read_text()), ""]
    plot = Path(files.get("plot", out / "planted.png"))
    if plot.exists() and plot.name not in (md.read_text() if md.exists() else ""):
        rep.image(plot.name, "planted-circuit benchmark")
    rep.h2("Files")
    rep.bullets([f"`{Path(p).name}`" for p in files.values()] or ["`planted.md`"])
    summary = {key: value for key, value in result.items() if key != "files"}
    summary["files"] = {k: Path(v).name for k, v in files.items()}
    path = rep.write(out, summary)
    return {"report": str(path), **summary}
