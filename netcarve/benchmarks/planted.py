"""Planted-circuit benchmark: networks whose circuit for a target is known by construction.

Every saliency criterion is asked to recover a circuit that was *planted* in a hand-built
network, and the recovered kernel set (the circuit's effective mask) is compared with the
ground truth: precision, recall and held-out preservation per criterion and keep fraction.

Architectures (input 6 channels × 16×16, hidden width 12, target ``head:0``):

* ``sequential``: ``conv1 → ReLU → conv2 → ReLU → conv3 → ReLU → head``, a plain chain
  without skip connections whose ``conv2`` is a two-piece *maxout* conv
  (``torch.maximum(conv2.a(x), conv2.b(x))``).
* ``residual``: ``stem → ReLU → h0``; a basic block ``conv1`` (two-piece maxout) ``→ ReLU →
  conv2 → BatchNorm``, added to ``h0`` (residual ``add``) ``→ ReLU → head``. Residual-stream
  channels carry signal through the skip only, through the block only, through both, feed the
  block without reaching the head, die at the add (BatchNorm shift far below zero), or stay
  silent.

The data generator fills 3 of the 6 input channels (chosen per seed) with smooth random fields
in [0, 1]; the other 3 are exactly zero on every image. Hidden channels are built with roles:

* **live** channels read live channels through *small* kernels (taps ``|w|`` in
  [0.02, 0.2]; a quarter negative outside maxout pieces) and reach the target; their bias
  lies above the bound of their negative inputs, so their ReLU never clips on the data;
* **silent** channels read only silent channels (so they are exactly 0 on the data);
* **dead** channels have a bias (or BatchNorm shift) below minus an interval-arithmetic bound
  of their input, so their ReLU never opens, whatever subset of kernels is kept;
* **orphan** channels are live but every kernel from them toward the target is zero.

Each relevant kernel (upstream of ``head:0``, plus the kernels into it) then has a kind
(:data:`KIND_NAMES`): ``ground_truth``; ``silent_input`` (a *distractor*: taps ``|w|`` in
[0.5, 1.5] reading a channel that is 0 on the data); ``dead_output`` (large, writes a dead
channel); ``unreaching`` (large, writes an orphan); ``zero`` (weight exactly 0). Every
non-ground-truth kernel with a non-zero weight is larger than every ground-truth kernel, so
magnitude pruning ranks all of them first.

**Duplicate paths.** The two pieces of a maxout conv have identical weights; ground-truth
kernels in them have positive taps and read non-negative channels, so removing one kernel of
one piece only lowers that piece and the maximum is unchanged *exactly*. Removing both copies
(the *duplicate pair*) changes the target. ``torch.maximum`` splits the gradient of a tie
evenly, so both copies get equal, non-zero data-aware scores.

**Ground truth (definition).** A relevant kernel is in the ground truth iff removing it alone,
or removing it together with its duplicate copy, changes the target response on the data.
Both copies of a duplicate pair therefore count (keeping one copy of each pair would already
reproduce the target exactly; preservation shows that). By construction the ground truth
alone reproduces the target exactly (biases and BatchNorm stay, as everywhere in
netcarve), removing any single non-ground-truth kernel leaves it unchanged, and removing any
single ground-truth kernel outside duplicate pairs changes it. ``tests/test_planted.py``
checks all of this by brute force.

**What to expect.** Every non-ground-truth kernel has a zero activation map or a zero gradient
on the data, so ``actgrad``, ``snip`` and ``force`` score it exactly 0 and every
ground-truth kernel above 0: at keep ``1×GT`` they should recover the circuit exactly, while
``magnitude`` keeps only distractors. Below ``1×GT`` the one-shot criteria tend to keep
high-scoring kernels near the target whose upstream path is gone (the effective mask then
drops them), so recall falls below the keep multiple; FORCE's iterative masking does better.
These are the measured numbers (``run_planted`` writes them), not assumptions.

**Keep fractions.** With ``keeps=None`` each case is evaluated at ``m × |GT| / |relevant|``
for ``m`` in :data:`GT_MULTIPLES` (0.5, 1, 2), labelled ``0.5×GT``, ``1×GT``, ``2×GT``: at
``1×GT`` a perfect criterion keeps exactly the ground truth.

Example:
    >>> report = planted_benchmark(seeds=(0,), n_images=32, criteria=("actgrad",))
    >>> [r["recall"] for r in report.rows if r["keep_label"] == "1×GT"]
    [1.0, 1.0]
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netcarve.benchmarks.planted_models import (
    ARCHITECTURES,
    COLUMNS,
    GT_MULTIPLES,
    PlantedCase,
    PlantedError,
    build_planted,
)
from netcarve.circuits.circuit import count, keep_count, select_top_k
from netcarve.circuits.extract import measure_preservation, score_kernels, target_responses
from netcarve.core._csv import write_rows
from netcarve.core.plotting import pyplot, save_figure
from netcarve.core.targets import Target
from netcarve.criteria import get_criterion

__all__ = ["PlantedReport", "planted_benchmark", "run_planted"]
_LINESTYLES = ("-", "--", "-.", ":", (0, (5, 1, 1, 1)))


# ---------------------------------------------------------------------------- benchmark


def _nan_to_zero(v: float | None) -> float:
    return 0.0 if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def _span(values: list[int]) -> str:
    """``"38"`` or ``"28–43"``."""
    lo, hi = min(values), max(values)
    return f"{lo}" if lo == hi else f"{lo}–{hi}"


@dataclass
class PlantedReport:
    """Results of :func:`planted_benchmark`: one row per architecture × seed × criterion × keep.

    Attributes:
        rows: dicts with the keys of :data:`COLUMNS`: ``architecture, seed, criterion,
            keep_label`` (``"1×GT"`` or the keep as text), ``keep`` (fraction of relevant
            kernels), ``k`` (kernels selected by top-k), ``relevant``, ``ground_truth``,
            ``kept`` (kernels in the effective mask), ``true_positives``, ``precision``
            (``true_positives / kept``, 0 when nothing is kept), ``recall``
            (``true_positives / ground_truth``), ``pearson`` (held-out preservation, ``nan``
            for a constant response), ``collapsed``, ``seconds``.
        cases: one dict per architecture × seed: ``architecture, seed, relevant,
            ground_truth, duplicate_pairs, composition``.
        n_images: scoring images per case.

    Example:
        >>> rep = planted_benchmark(seeds=(0,), n_images=8, criteria=("magnitude",))
        >>> rep.table("recall")["residual"]["1×GT"]
        {'magnitude': 0.0}
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    cases: list[dict[str, Any]] = field(default_factory=list)
    n_images: int = 0

    def table(self, metric: str = "recall") -> dict[str, dict[str, dict[str, float]]]:
        """Median of a metric over seeds: ``{architecture: {keep_label: {criterion: value}}}``.

        Args:
            metric: ``"precision"``, ``"recall"``, ``"pearson"`` (``nan`` counts as 0: a
                constant response preserves nothing), ``"keep"`` or ``"kept"``.

        Returns:
            nested dicts in row order (architectures, keep labels, criteria as first seen).

        Raises:
            PlantedError: unknown metric.

        Example:
            >>> report.table("recall")["sequential"]["1×GT"]["actgrad"]  # doctest: +SKIP
            1.0
        """
        if metric not in ("precision", "recall", "pearson", "keep", "kept"):
            raise PlantedError(f"unknown metric {metric!r}")
        groups: dict[str, dict[str, dict[str, list[float]]]] = {}
        for r in self.rows:
            cell = groups.setdefault(r["architecture"], {}).setdefault(r["keep_label"], {})
            cell.setdefault(r["criterion"], []).append(_nan_to_zero(r[metric]))
        return {
            arch: {label: {c: statistics.median(v) for c, v in crits.items()}
                   for label, crits in labels.items()}
            for arch, labels in groups.items()
        }

    def to_markdown(self) -> str:
        """Markdown: per architecture, median precision / recall and preservation tables.

        Returns:
            the document (criteria as columns, keep labels as rows).

        Example:
            >>> print(report.to_markdown())  # doctest: +SKIP
        """
        seeds = sorted({r["seed"] for r in self.rows})
        lines = [
            "# Planted-circuit benchmark",
            "",
            f"Seeds {', '.join(map(str, seeds))}; {self.n_images} scoring images per case "
            "(held-out preservation on separate images). Cells are medians over seeds.",
            "Ground truth = the planted circuit: kernels whose removal alone, or together "
            "with their duplicate copy, changes the target `head:0` "
            "(see `netcarve.benchmarks.planted_models`).",
            "Precision and recall compare the circuit's effective mask with it; keep `m×GT` "
            "is m × |ground truth| / |relevant|.",
        ]
        prec, rec, pres, keep, kept = (
            self.table(m) for m in ("precision", "recall", "pearson", "keep", "kept"))
        for arch, labels in rec.items():
            cases = [c for c in self.cases if c["architecture"] == arch]
            crits = list(next(iter(labels.values())))
            lines += ["", f"## {arch}", ""]
            if cases:
                first = cases[0]
                lines.append(
                    f"Ground truth {_span([c['ground_truth'] for c in cases])} of "
                    f"{_span([c['relevant'] for c in cases])} relevant kernels, "
                    f"{_span([c['duplicate_pairs'] for c in cases])} duplicate pairs. "
                    f"Relevant kernels by kind (seed {first['seed']}): "
                    + ", ".join(f"{k} {v}" for k, v in first["composition"].items()) + ".")
                lines.append("")
            lines += ["Precision / recall:", "",
                      "| keep | " + " | ".join(crits) + " |", "|---|" + "---|" * len(crits)]
            for label in labels:
                cells = [f"{prec[arch][label][c]:.2f} / {rec[arch][label][c]:.2f}"
                         for c in crits]
                frac = next(iter(keep[arch][label].values()))
                lines.append(f"| {label} ({frac:.3f}) | " + " | ".join(cells) + " |")
            lines += ["", "Held-out preservation (Pearson r; a constant response counts as 0):",
                      "", "| keep | " + " | ".join(crits) + " |", "|---|" + "---|" * len(crits)]
            for label in labels:
                cells = [f"{pres[arch][label][c]:.3f}" for c in crits]
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
            lines += ["", "Kernels kept after the effective mask (0 = no path left):", "",
                      "| keep | " + " | ".join(crits) + " |", "|---|" + "---|" * len(crits)]
            for label in labels:
                cells = [f"{kept[arch][label][c]:g}" for c in crits]
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def write_csv(self, path: str | Path) -> Path:
        """Write every row as CSV (columns :data:`COLUMNS`).

        Args:
            path: the file to write (parent folders are created).

        Returns:
            the path written.

        Example:
            >>> report.write_csv("out/planted.csv")  # doctest: +SKIP
        """
        return write_rows(path, self.rows, COLUMNS)

    def plot(self, path: str | Path) -> Path:
        """PNG: median recall (top) and precision (bottom) vs keep, one column per
        architecture, one line per criterion; a dotted line marks the ground-truth keep.

        Args:
            path: the PNG to write (parent folders are created).

        Returns:
            the path written.

        Raises:
            PlantedError: matplotlib is not installed, or the report has no rows.

        Example:
            >>> report.plot("out/planted.png")  # doctest: +SKIP
        """
        plt = pyplot(PlantedError)
        if not self.rows:
            raise PlantedError("nothing to plot: the report has no rows")

        rec, prec, keep = self.table("recall"), self.table("precision"), self.table("keep")
        archs = list(rec)
        fig, axes = plt.subplots(2, len(archs), figsize=(5.2 * len(archs), 7.0),
                                 squeeze=False, sharey=True)
        for col, arch in enumerate(archs):
            labels = list(rec[arch])
            crits = list(rec[arch][labels[0]])
            xs = [statistics.median(keep[arch][lab].values()) for lab in labels]
            gt = [c["ground_truth"] / c["relevant"] for c in self.cases
                  if c["architecture"] == arch]
            for row, (table, name) in enumerate(((rec, "recall"), (prec, "precision"))):
                ax = axes[row][col]
                for j, crit in enumerate(crits):
                    # distinct dashes and shrinking markers keep coinciding curves visible
                    ax.plot(xs, [table[arch][lab][crit] for lab in labels], marker="o",
                            markersize=max(3.0, 9.0 - 1.5 * j), alpha=0.85,
                            linestyle=_LINESTYLES[j % len(_LINESTYLES)], label=crit)
                if gt:
                    ax.axvline(statistics.median(gt), color="grey", linestyle=":",
                               label="|GT| / |relevant|")
                ax.set_xscale("log")
                ax.set_ylim(-0.05, 1.05)
                ax.grid(alpha=0.3)
                ax.set_xlabel("keep (fraction of relevant kernels)")
                ax.set_ylabel(f"median {name}")
                ax.set_title(f"{arch}: {name} of the planted circuit")
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        return save_figure(fig, path, dpi=110)


def _keep_plan(case: PlantedCase, keeps: Sequence[float] | None) -> list[tuple[str, float]]:
    if keeps is None:
        return [(f"{m:g}×GT", min(1.0, m * case.gt_keep)) for m in GT_MULTIPLES]
    return [(f"{k:g}", float(k)) for k in sorted(keeps)]


def planted_benchmark(
    *,
    architectures: Sequence[str] = ARCHITECTURES,
    criteria: Sequence[str] = ("actgrad", "snip", "force", "magnitude", "random"),
    keeps: Sequence[float] | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    n_images: int = 256,
) -> PlantedReport:
    """Measure how well each criterion recovers the planted circuits.

    For every architecture × seed a :class:`PlantedCase` is built; every criterion scores the
    relevant kernels once on the scoring images (FORCE once per keep, its schedule depends on
    it), keeps exactly ``round(keep × relevant)`` by global top-k
    (:func:`~netcarve.circuits.circuit.select_top_k`), applies the effective mask, and the result is
    compared with the ground truth; preservation is measured on held-out images. This is what
    :func:`~netcarve.circuits.extract.extract` does, with the scores shared across keeps.

    Args:
        architectures: any of :data:`ARCHITECTURES`.
        criteria: saliency criterion names.
        keeps: keep fractions in (0, 1]; None: ``m × |GT| / |relevant|`` for ``m`` in
            :data:`GT_MULTIPLES` (0.5, 1, 2) per case, labelled ``"0.5×GT"`` etc.
        seeds: construction seeds (also the random criterion's seed).
        n_images: scoring images per case (held-out: half as many).

    Returns:
        A :class:`PlantedReport`.

    Raises:
        PlantedError: unknown architecture, keep outside (0, 1], no seeds, fewer than 2 images.
        CriterionError: unknown criterion.

    Example:
        >>> rep = planted_benchmark(architectures=("sequential",), seeds=(0,), n_images=32,
        ...                         criteria=("actgrad", "magnitude"))
        >>> [(r["criterion"], r["recall"]) for r in rep.rows if r["keep_label"] == "1×GT"]
        [('actgrad', 1.0), ('magnitude', 0.0)]
    """
    for arch in architectures:
        if arch not in ARCHITECTURES:
            raise PlantedError(
                f"unknown architecture {arch!r}; use one of {', '.join(ARCHITECTURES)}")
    for crit in criteria:
        get_criterion(crit)
    if keeps is not None:
        if not keeps:
            raise PlantedError("keeps is empty (pass None for multiples of the ground truth)")
        for k in keeps:
            if not (isinstance(k, (int, float)) and 0 < k <= 1):
                raise PlantedError(f"keep must be in (0, 1], got {k!r}")
    if not seeds:
        raise PlantedError("no seeds given")
    if n_images < 2:
        raise PlantedError(f"need at least 2 scoring images, got {n_images}")
    report = PlantedReport(n_images=n_images)
    for arch in architectures:
        for seed in seeds:
            case = build_planted(arch, seed, n_images=n_images)
            report.cases.append({
                "architecture": arch, "seed": int(seed), "relevant": case.n_relevant,
                "ground_truth": case.n_ground_truth, "duplicate_pairs": len(case.duplicates),
                "composition": case.composition(),
            })
            report.rows += _run_case(case, criteria, _keep_plan(case, keeps))
    return report


def _run_case(
    case: PlantedCase, criteria: Sequence[str], plan: list[tuple[str, float]]
) -> list[dict[str, Any]]:
    graph, model = case.graph, case.model
    target = Target.parse(case.target).resolve(graph)
    relevant = case.relevant
    n_gt = case.n_ground_truth
    original = list(target_responses(model, graph, target, case.heldout, batch_size=256))
    rows = []
    for crit in criteria:
        scores = None
        for label, keep in plan:
            start = time.perf_counter()
            if scores is None or crit == "force":
                scores = score_kernels(model, graph, target, case.images, criterion=crit,
                                       keep=keep, relevant=relevant, seed=case.seed)
            k = keep_count(keep, relevant)
            raw = select_top_k(scores, relevant, k)
            masks, collapsed = graph.effective_mask(raw, target.layer, target.channels)
            pres = measure_preservation(model, graph, target, masks, case.heldout,
                                        batch_size=256, original=original)
            kept = count(masks)
            tp = sum(int((masks[n] & case.ground_truth[n]).sum()) for n in masks)
            rows.append({
                "architecture": case.architecture, "seed": case.seed, "criterion": crit,
                "keep_label": label, "keep": keep, "k": k, "relevant": case.n_relevant,
                "ground_truth": n_gt, "kept": kept, "true_positives": tp,
                "precision": tp / kept if kept else 0.0, "recall": tp / n_gt,
                "pearson": pres.pearson, "collapsed": collapsed,
                "seconds": time.perf_counter() - start,
            })
    return rows


def run_planted(out_dir: Path, *, quick: bool = False, seed: int = 0) -> dict[str, Any]:
    """Run the planted-circuit benchmark and write ``planted.md``, ``planted.csv`` and
    ``planted.png`` into ``out_dir``.

    Args:
        out_dir: output folder (created).
        quick: one seed and 32 scoring images (about 10 s on 2 busy CPU cores); otherwise
            seeds ``seed``, ``seed + 1``, ``seed + 2`` and 256 images (about 2 minutes).
        seed: first construction seed.

    Returns:
        ``{"quick", "seeds", "n_images", "seconds", "files": {"markdown", "csv", "plot"},
        "recall_at_gt", "precision_at_gt", "preservation_at_gt"}``; the last three map
        ``architecture → criterion → median`` at keep ``1×GT``.

    Raises:
        PlantedError: matplotlib is missing (the markdown and CSV are written first).

    Example:
        >>> summary = run_planted(Path("out/planted"), quick=True)  # doctest: +SKIP
        >>> summary["recall_at_gt"]["residual"]["actgrad"]  # doctest: +SKIP
        1.0
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seeds = (seed,) if quick else tuple(range(seed, seed + 3))
    n_images = 32 if quick else 256
    report = planted_benchmark(seeds=seeds, n_images=n_images)
    files = {
        "markdown": str(out_dir / "planted.md"),
        "csv": str(out_dir / "planted.csv"),
        "plot": str(out_dir / "planted.png"),
    }
    Path(files["markdown"]).write_text(report.to_markdown())
    report.write_csv(files["csv"])
    report.plot(files["plot"])

    def at_gt(metric: str) -> dict[str, dict[str, float]]:
        """``{architecture: {criterion: median}}`` at keep ``1×GT``."""
        return {arch: labels.get("1×GT", {}) for arch, labels in report.table(metric).items()}

    return {
        "quick": quick,
        "seeds": list(seeds),
        "n_images": n_images,
        "seconds": round(time.perf_counter() - start, 2),
        "files": files,
        "recall_at_gt": at_gt("recall"),
        "precision_at_gt": at_gt("precision"),
        "preservation_at_gt": at_gt("pearson"),
    }
