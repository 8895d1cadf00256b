"""Report writing shared by the ``netcarve reproduce`` experiments.

Every experiment writes ``report.md`` (Markdown laid out like the papers' tables), its PNG
figures and CSV tables, and ``summary.json`` (the headline numbers, machine-readable). The
report opens with what is needed to rerun it: the exact command, the seed, the mode, and the
versions of netcarve, torch and Python, the platform and the date.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from netcarve.core.errors import NetcarveError
from netcarve.core.plotting import pyplot as _pyplot
from netcarve.core.plotting import save_figure as _save_figure

__all__ = [
    "Logger",
    "Report",
    "ReproduceError",
    "canonical_command",
    "draw",
    "environment",
    "fmt",
    "prepare_out",
    "pyplot",
    "quiet",
    "run_context",
    "save_figure",
    "start_report",
    "stderr_logger",
]

Logger = Callable[[str], None]
"""Where experiments report their progress (one line per step)."""


class ReproduceError(NetcarveError):
    """A reproduce experiment was asked for something it cannot do (bad settings or paths)."""


def _quiet(_: str) -> None:
    """The default logger: say nothing."""


def environment(threads: int | None = None) -> dict[str, Any]:
    """Versions and machine facts recorded at the top of every report.

    Args:
        threads: torch intra-op threads used by the run (default: the current setting).

    Returns:
        ``{"netcarve", "torch", "numpy", "python", "platform", "machine", "cpus", "threads",
        "date"}`` (date in UTC, ISO 8601).

    Example:
        >>> sorted(environment())[:3]
        ['cpus', 'date', 'machine']
    """
    import numpy

    from netcarve._version import __version__

    return {
        "netcarve": __version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads() if threads is None else int(threads),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
    }


def canonical_command(experiment: str, *, quick: bool, seed: int, out: str | Path,
                      threads: int | None = None) -> str:
    """The ``netcarve reproduce`` command line that reruns an experiment with these settings.

    Example:
        >>> canonical_command("circuits", quick=True, seed=3, out="out/c")
        'netcarve reproduce circuits --quick --seed 3 --out out/c'
    """
    parts = ["netcarve", "reproduce", experiment]
    if quick:
        parts.append("--quick")
    parts += ["--seed", str(int(seed)), "--out", str(out)]
    if threads is not None:
        parts += ["--threads", str(int(threads))]
    return " ".join(parts)


@contextlib.contextmanager
def run_context(seed: int, threads: int | None) -> Iterator[None]:
    """Seed torch's global generator and set the thread count for one experiment; both are
    restored afterwards, so a run leaves the caller's process as it found it.

    Every randomised step of the experiments takes its own seed explicitly; the global seed
    only covers anything that might still draw from the global generator.

    Raises:
        ReproduceError: ``threads`` below 1.
    """
    if threads is not None and int(threads) < 1:
        raise ReproduceError(f"threads must be at least 1, got {threads}")
    before = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        if threads is not None:
            torch.set_num_threads(int(threads))
        try:
            yield
        finally:
            torch.set_num_threads(before)


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: floats rounded, ``None``/NaN as an em dash, the rest as text.

    Example:
        >>> fmt(0.12345), fmt(None), fmt(float("nan")), fmt(7)
        ('0.123', '—', '—', '7')
    """
    if value is None:
        return "—"
    if isinstance(value, float):
        if math.isnan(value):
            return "—"
        return f"{value:.{digits}f}"
    return str(value)


def draw(preset: Any, split: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` raw images and their labels drawn from a split at random (seeded).

    Raises:
        ReproduceError: the split has fewer than ``n`` images.
    """
    from netcarve.training.evaluation import reference_data

    x, y = reference_data(preset, split)
    if n > len(x):
        raise ReproduceError(f"the {split} split has {len(x)} images; {n} requested")
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(x), generator=gen)[:n]
    return x[idx], y[idx]


@dataclass
class Report:
    """A Markdown report under construction.

    The header (command, seed, mode, versions, date, wall time) is written when the report is
    saved, so it can state how long the run took.

    Attributes:
        experiment: the experiment's name (``circuits``, ``car``, ...).
        title: the report's title.
        command: the exact command that reruns it.
        seed: the run's seed.
        quick: quick mode (smaller settings; numbers are for smoke-testing, not for reading).
        threads: torch threads used.
        body: Markdown lines after the header.

    Example:
        >>> rep = Report("demo", "A demo", command="netcarve reproduce demo", seed=0)
        >>> rep.table(["a", "b"], [[1, 0.5]])
        >>> "| 1 | 0.500 |" in rep.render(seconds=1.0)
        True
    """

    experiment: str
    title: str
    command: str
    seed: int
    quick: bool = False
    threads: int | None = None
    body: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    started_cpu: float = field(default_factory=lambda: _cpu_seconds())
    started_load: float = field(default_factory=lambda: _load())

    def _blank(self) -> None:
        if self.body and self.body[-1] != "":
            self.body.append("")

    def h2(self, text: str) -> None:
        """A section heading."""
        self._blank()
        self.body += [f"## {text}", ""]

    def h3(self, text: str) -> None:
        """A sub-section heading."""
        self._blank()
        self.body += [f"### {text}", ""]

    def p(self, text: str) -> None:
        """A paragraph."""
        self.body += [text, ""]

    def bullets(self, items: Sequence[str]) -> None:
        """A bullet list."""
        self.body += [f"- {item}" for item in items] + [""]

    def code(self, text: str) -> None:
        """A fenced code block."""
        self.body += ["```", text.rstrip("\n"), "```", ""]

    def table(self, header: Sequence[str], rows: Sequence[Sequence[Any]],
              digits: int = 3) -> None:
        """A Markdown table; float cells are rounded to ``digits``."""
        self.body.append("| " + " | ".join(str(h) for h in header) + " |")
        self.body.append("|" + "---|" * len(header))
        for row in rows:
            self.body.append("| " + " | ".join(fmt(c, digits) for c in row) + " |")
        self.body.append("")

    def image(self, path: str, alt: str) -> None:
        """An image, by path relative to the report."""
        self.body += [f"![{alt}]({path})", ""]

    def header(self, seconds: float | None = None) -> list[str]:
        """The header lines: title, command, seed, mode, versions, date, wall time."""
        env = environment(self.threads)
        mode = ("quick (reduced settings for smoke tests; do not read the numbers as results)"
                if self.quick else "full")
        lines = [
            f"# {self.title}",
            "",
            f"- Command: `{self.command}`",
            f"- Seed: {self.seed}",
            f"- Mode: {mode}",
            f"- Versions: netcarve {env['netcarve']}, torch {env['torch']}, "
            f"numpy {env['numpy']}, Python {env['python']}",
            f"- Platform: {env['platform']} ({env['machine']}, {env['cpus']} CPUs, "
            f"{env['threads']} torch thread{'s' if env['threads'] != 1 else ''})",
            f"- Date: {env['date']}",
        ]
        if seconds is not None:
            cpu = _cpu_seconds() - self.started_cpu
            lines.append(f"- Wall time: {seconds:.0f} s (CPU time {cpu:.0f} s, worker processes "
                         f"included; load average {self.started_load:.1f} at the start, "
                         f"{_load():.1f} at the end, on {env['cpus']} CPUs)")
        return [*lines, ""]

    def render(self, seconds: float | None = None) -> str:
        """The whole report as Markdown text."""
        return "\n".join(self.header(seconds) + self.body).rstrip("\n") + "\n"

    def write(self, out_dir: str | Path, summary: dict[str, Any] | None = None) -> Path:
        """Write ``report.md`` (and ``summary.json`` with the run's facts and ``summary``).

        Returns:
            the path of ``report.md``.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        seconds = time.perf_counter() - self.started
        path = out / "report.md"
        path.write_text(self.render(seconds))
        record = {"experiment": self.experiment, "command": self.command, "seed": self.seed,
                  "quick": self.quick, "seconds": seconds,
                  "cpu_seconds": _cpu_seconds() - self.started_cpu,
                  "load_average": [self.started_load, _load()],
                  "environment": environment(self.threads), **(summary or {})}
        (out / "summary.json").write_text(json.dumps(record, indent=2, default=_json_default))
        return path


def _cpu_seconds() -> float:
    """CPU seconds used by this process and its finished children (worker processes)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _load() -> float:
    """The one-minute load average (NaN where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # pragma: no cover - Windows
        return math.nan


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return str(value)


def prepare_out(out_dir: str | Path) -> Path:
    """Create the output folder.

    Raises:
        ReproduceError: the path exists and is not a folder.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ReproduceError(f"--out {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    return out


def pyplot() -> Any:
    """matplotlib's pyplot on the non-interactive Agg backend.

    Raises:
        ReproduceError: matplotlib is not installed.
    """
    return _pyplot(ReproduceError)


def save_figure(fig: Any, path: str | Path, dpi: int = 110) -> Path:
    """Save and close a matplotlib figure."""
    pyplot()  # the same error type as the other report helpers when matplotlib is missing
    return _save_figure(fig, path, dpi=dpi, bbox_inches="tight")


def stderr_logger(prefix: str) -> Logger:
    """A logger that prints ``[prefix] message`` to stderr."""
    def log(message: str) -> None:
        print(f"[{prefix}] {message}", file=sys.stderr, flush=True)

    return log


def quiet() -> Logger:
    """A logger that prints nothing."""
    return _quiet


def start_report(experiment: str, title: str, out_dir: str | Path, *, quick: bool, seed: int,
                 threads: int | None, command: str | None) -> tuple[Path, Report]:
    """Create the output folder and the report of one experiment run.

    Args:
        experiment: the ``netcarve reproduce`` sub-command name.
        title: the report's title.
        out_dir, quick, seed, threads: the run's settings.
        command: the command line to record (default: the canonical one for these settings).

    Returns:
        ``(output folder, report)``.
    """
    out = prepare_out(out_dir)
    command = command or canonical_command(experiment, quick=quick, seed=seed, out=out)
    return out, Report(experiment, title, command=command, seed=seed, quick=quick,
                       threads=threads)
