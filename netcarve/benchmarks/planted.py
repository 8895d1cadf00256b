"""Planted-circuit benchmark: networks whose circuit for a target is known by construction,
with graded difficulty.

Every saliency criterion is asked to recover a circuit that was *planted* in a hand-built
network, and the recovered kernel set (the circuit's effective mask) is compared with the
ground truth: precision, recall and held-out preservation per criterion, distractor strength
``eps`` and keep fraction.

Architectures (input 6 channels × 16×16, hidden width 12, 3×3 convs with replicate padding,
target ``head:0``):

* ``sequential``: ``conv1 → ReLU → conv2 → ReLU → conv3 → ReLU → head``, a plain chain whose
  ``conv2`` is a two-piece *maxout* conv (``torch.maximum(conv2.a(x), conv2.b(x))``).
* ``residual``: ``stem → ReLU → h0``; a basic block ``conv1`` (two-piece maxout) ``→ ReLU →
  conv2 → BatchNorm``, added to ``h0`` (residual ``add``) ``→ ReLU → head``. Stream channels
  carry signal through the skip only, through the block only, through both, feed the block
  without reaching the head, die at the add (BatchNorm shift far below zero), or stay silent.
* ``concat``: ``stem → ReLU``, two branches (conv → ReLU each) joined by ``torch.cat``, then
  ``head``.

The data generator fills 3 of the 6 input channels (chosen per seed) with smooth random fields
in [0, 1], each image scaled by its own contrast in [0.2, 1]; the other 3 are exactly zero.
Hidden channels have roles:

* **live** channels read live channels through *small* ground-truth kernels (taps ``|w|`` in
  [0.02, 0.2]; a quarter negative outside maxout pieces) and reach the target; their bias lies
  above an interval bound of their negative inputs, so their ReLU never clips on the data;
* **silent** channels read only silent channels (exactly 0 on the data); **dead** channels
  have a bias below minus a bound of their input (their ReLU never opens, whatever subset of
  kernels is kept); **orphan** channels are live but nothing from them reaches the target;
* one **gated** channel per network reads live channels through large positive taps
  ([0.5, 1.5]) with a bias set so that it opens on only :data:`GATE_OPEN` (15%) of the images
  (calibrated on 512 separate images of the network as built); its kernels in and out are
  ground truth: a path that matters a lot, rarely;
* one **cancelling pair** per network: two channels with identical large inputs whose
  kernels into one live channel (or the head) are ``+V`` and ``-V``, so they cancel exactly.

Kernel kinds (:data:`KIND_NAMES`): ``ground_truth``; ``weak`` (the distractors of graded
strength: where a live channel could read a live channel but the ground truth does not, a
kernel of taps ``eps`` × [0.02, 0.2], random sign, a small real contribution); ``cancelling``
(the pair's kernels, large: removing one of a mirror pair changes the target a lot, removing
both changes nothing); ``silent_input``, ``dead_output``, ``unreaching`` (large distractors
with exactly no effect: taps ``|w|`` in [0.5, 1.5]); ``zero``.

**Duplicate paths.** The two pieces of a maxout conv have identical weights; ground-truth
kernels in them have positive taps and read non-negative channels, so removing one kernel of
one piece only lowers that piece and the maximum is unchanged; removing both copies (the
*duplicate pair*) changes the target. Both copies count as ground truth.

**Ground truth (definition).** The planted circuit: the ``ground_truth`` kernels. At
``eps = 0`` it alone reproduces the target exactly, each of its kernels outside duplicate
pairs (and each duplicate pair) is needed, every single non-ground-truth kernel other than a
cancelling one is inert, and each cancelling kernel matters alone but not with its mirror.
At ``eps > 0`` the network is the same except for the weak kernels (and the gate's calibrated
bias); the ground truth is unchanged and its held-out preservation (``gt_pearson`` of each
case) is the ceiling a perfect criterion reaches at keep ``1×GT``. ``tests/test_planted.py``
checks all of this by brute force.

**What makes it hard.** Weak kernels get real, growing data-aware scores as ``eps`` grows;
cancelling kernels have large activations and gradients but no net effect (keeping one half of
a pair breaks the target); the gated path is silent on 85% of the images. ``kept_weak``,
``kept_cancelling``, ``cancel_halves`` (mirror pairs with exactly one kernel kept) and
``gated_recall`` in every row say which of these fooled a criterion.

**Keep fractions.** With ``keeps=None`` each case is evaluated at ``m × |GT| / |relevant|``
for ``m`` in :data:`GT_MULTIPLES` (0.5, 1, 2), labelled ``0.5×GT``, ``1×GT``, ``2×GT``: at
``1×GT`` a perfect criterion keeps exactly the ground truth.

Example:
    >>> report = planted_benchmark(seeds=(0,), n_images=32, criteria=("actgrad",), eps=(0.0,))
    >>> len(report.rows)
    9
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
    CANCELLING,
    COLUMNS,
    EPSILONS,
    GATE_OPEN,
    GT_MULTIPLES,
    WEAK,
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
_METRICS = ("precision", "recall", "pearson", "keep", "kept", "gated_recall", "kept_weak",
            "kept_cancelling", "cancel_halves")


def _nan_to_zero(v: float | None) -> float:
    return 0.0 if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def _span(values: list[int]) -> str:
    """``"38"`` or ``"28–43"``."""
    lo, hi = min(values), max(values)
    return f"{lo}" if lo == hi else f"{lo}–{hi}"


@dataclass
class PlantedReport:
    """Results of :func:`planted_benchmark`: one row per architecture × eps × seed ×
    criterion × keep.

    Attributes:
        rows: dicts with the keys of :data:`COLUMNS`: ``architecture, seed, eps, criterion,
            keep_label`` (``"1×GT"`` or the keep as text), ``keep`` (fraction of relevant
            kernels), ``k`` (kernels selected by top-k), ``relevant``, ``ground_truth``,
            ``kept`` (kernels in the effective mask), ``true_positives``, ``precision``
            (``true_positives / kept``, 0 when nothing is kept), ``recall``
            (``true_positives / ground_truth``), ``gated_recall`` (the same for the gated
            path's kernels), ``kept_weak``, ``kept_cancelling``, ``cancel_halves`` (mirror
            pairs of cancelling kernels with exactly one kept), ``pearson`` (held-out
            preservation, ``nan`` for a constant response), ``collapsed``, ``seconds``.
        cases: one dict per architecture × eps × seed: ``architecture, seed, eps, relevant,
            ground_truth, duplicate_pairs, cancelling_pairs, gate_open`` (fraction of held-out
            images on which the gated channel opens), ``gt_pearson`` (held-out preservation
            of the ground truth itself), ``composition``.
        n_images: scoring images per case.

    Example:
        >>> rep = planted_benchmark(seeds=(0,), n_images=8, criteria=("magnitude",), eps=(0,))
        >>> rep.table("recall")["residual"][0.0]["1×GT"]
        {'magnitude': 0.0}
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    cases: list[dict[str, Any]] = field(default_factory=list)
    n_images: int = 0

    def table(self, metric: str = "recall") -> dict[str, dict[float, dict[str, dict[str, float]]]]:
        """Median of a metric over seeds: ``{architecture: {eps: {keep_label: {criterion:
        value}}}}``.

        Args:
            metric: ``"precision"``, ``"recall"``, ``"pearson"`` (``nan`` counts as 0: a
                constant response preserves nothing), ``"keep"``, ``"kept"``,
                ``"gated_recall"``, ``"kept_weak"``, ``"kept_cancelling"`` or
                ``"cancel_halves"``.

        Returns:
            nested dicts in row order (architectures, eps, keep labels, criteria as first
            seen).

        Raises:
            PlantedError: unknown metric.

        Example:
            >>> report.table("recall")["sequential"][0.0]["1×GT"]["actgrad"]  # doctest: +SKIP
            1.0
        """
        if metric not in _METRICS:
            raise PlantedError(f"unknown metric {metric!r}; use one of {', '.join(_METRICS)}")
        groups: dict[str, dict[float, dict[str, dict[str, list[float]]]]] = {}
        for r in self.rows:
            cell = (groups.setdefault(r["architecture"], {}).setdefault(float(r["eps"]), {})
                    .setdefault(r["keep_label"], {}))
            cell.setdefault(r["criterion"], []).append(_nan_to_zero(r[metric]))
        return {
            arch: {eps: {label: {c: statistics.median(v) for c, v in crits.items()}
                         for label, crits in labels.items()}
                   for eps, labels in by_eps.items()}
            for arch, by_eps in groups.items()
        }

    def case_median(self, arch: str, eps: float, key: str) -> float:
        """Median over seeds of a case statistic (``gt_pearson``, ``gate_open``, ...).

        Example:
            >>> report.case_median("concat", 0.0, "gt_pearson")  # doctest: +SKIP
            1.0
        """
        values = [float(c[key]) for c in self.cases
                  if c["architecture"] == arch and float(c["eps"]) == float(eps)]
        return statistics.median(values) if values else math.nan

    def to_markdown(self) -> str:
        """Markdown: per architecture, precision / recall / held-out r at keep ``1×GT`` by
        eps, what fooled each criterion there, and recall at every keep.

        Returns:
            the document (criteria as columns).

        Example:
            >>> print(report.to_markdown())  # doctest: +SKIP
        """
        seeds = sorted({r["seed"] for r in self.rows})
        lines = [
            "# Planted-circuit benchmark (graded)",
            "",
            f"Seeds {', '.join(map(str, seeds))}; {self.n_images} scoring images per case "
            "(held-out preservation on separate images). Cells are medians over seeds.",
            "Ground truth = the planted circuit (see `netcarve.benchmarks.planted`); eps = "
            "strength of the weak distractor kernels; `GT r` = held-out preservation of the "
            "ground truth itself (the ceiling at 1×GT). Keep `m×GT` is m × |ground truth| / "
            "|relevant|.",
        ]
        tables = {m: self.table(m) for m in _METRICS}
        for arch, by_eps in tables["recall"].items():
            first_eps = next(iter(by_eps.values()))
            crits = list(next(iter(first_eps.values())))
            cases = [c for c in self.cases if c["architecture"] == arch]
            lines += ["", f"## {arch}", ""]
            if cases:
                c0 = max(cases, key=lambda c: c["eps"])
                lines += [
                    f"Ground truth {_span([c['ground_truth'] for c in cases])} of "
                    f"{_span([c['relevant'] for c in cases])} relevant kernels, "
                    f"{_span([c['duplicate_pairs'] for c in cases])} duplicate pairs, "
                    f"{_span([c['cancelling_pairs'] for c in cases])} cancelling mirror pairs; "
                    f"the gated channel opens on "
                    f"{statistics.median(c['gate_open'] for c in cases):.0%} of held-out images "
                    f"(median). Relevant kernels by kind (seed {c0['seed']}, eps {c0['eps']:g}): "
                    + ", ".join(f"{k} {v}" for k, v in c0["composition"].items()) + ".", ""]
            head = "| eps | GT r | " + " | ".join(crits) + " |"
            rule = "|---|---|" + "---|" * len(crits)
            lines += ["At keep 1×GT, precision / recall / held-out r:", "", head, rule]
            for eps in by_eps:
                cells = [
                    f"{tables['precision'][arch][eps]['1×GT'][c]:.2f} / "
                    f"{tables['recall'][arch][eps]['1×GT'][c]:.2f} / "
                    f"{tables['pearson'][arch][eps]['1×GT'][c]:.3f}" for c in crits]
                lines.append(f"| {eps:g} | {self.case_median(arch, eps, 'gt_pearson'):.3f} | "
                             + " | ".join(cells) + " |")
            lines += ["", "At keep 1×GT, what was kept that should not be: weak kernels / "
                      "cancelling kernels / broken cancelling pairs, and the recall of the "
                      "gated path:", "", "| eps | " + " | ".join(crits) + " |",
                      "|---|" + "---|" * len(crits)]
            for eps in by_eps:
                cells = [
                    f"{tables['kept_weak'][arch][eps]['1×GT'][c]:g} / "
                    f"{tables['kept_cancelling'][arch][eps]['1×GT'][c]:g} / "
                    f"{tables['cancel_halves'][arch][eps]['1×GT'][c]:g}, gated "
                    f"{tables['gated_recall'][arch][eps]['1×GT'][c]:.2f}" for c in crits]
                lines.append(f"| {eps:g} | " + " | ".join(cells) + " |")
            lines += ["", "Recall at every keep:", "", "| eps | keep | " + " | ".join(crits)
                      + " |", "|---|---|" + "---|" * len(crits)]
            for eps, labels in by_eps.items():
                for label in labels:
                    frac = next(iter(tables["keep"][arch][eps][label].values()))
                    cells = [f"{tables['recall'][arch][eps][label][c]:.2f}" for c in crits]
                    lines.append(f"| {eps:g} | {label} ({frac:.3f}) | " + " | ".join(cells)
                                 + " |")
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
        """PNG: at keep ``1×GT``, median recall (top) and held-out r (bottom) against eps,
        one column per architecture, one line per criterion; the bottom row also shows the
        ground truth's own r (the ceiling).

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
        rec, pres = self.table("recall"), self.table("pearson")
        label = "1×GT" if any(r["keep_label"] == "1×GT" for r in self.rows) else (
            self.rows[0]["keep_label"])
        archs = list(rec)
        fig, axes = plt.subplots(2, len(archs), figsize=(4.8 * len(archs), 7.0),
                                 squeeze=False)
        for col, arch in enumerate(archs):
            eps_values = list(rec[arch])
            crits = list(rec[arch][eps_values[0]][label])
            for row, (table, name) in enumerate(((rec, "recall"), (pres, "held-out r"))):
                ax = axes[row][col]
                for j, crit in enumerate(crits):
                    # distinct dashes and shrinking markers keep coinciding curves visible
                    ax.plot(eps_values, [table[arch][e][label][crit] for e in eps_values],
                            marker="o", markersize=max(3.0, 9.0 - 1.5 * j), alpha=0.85,
                            linestyle=_LINESTYLES[j % len(_LINESTYLES)], label=crit)
                if row == 1:
                    ax.plot(eps_values, [self.case_median(arch, e, "gt_pearson")
                                         for e in eps_values], color="black", linewidth=2.5,
                            alpha=0.4, label="ground truth itself")
                ax.set_ylim(-0.05, 1.05)
                ax.grid(alpha=0.3)
                ax.set_xlabel("eps (weak-distractor strength)")
                ax.set_ylabel(f"median {name} at keep {label}")
                ax.set_title(f"{arch}: {name}")
            axes[1][col].legend(fontsize=7)
        fig.tight_layout()
        return save_figure(fig, path, dpi=110)


# ---------------------------------------------------------------------------- benchmark


def _keep_plan(case: PlantedCase, keeps: Sequence[float] | None) -> list[tuple[str, float]]:
    if keeps is None:
        return [(f"{m:g}×GT", min(1.0, m * case.gt_keep)) for m in GT_MULTIPLES]
    return [(f"{k:g}", float(k)) for k in sorted(keeps)]


def _check(architectures: Sequence[str], criteria: Sequence[str],
           keeps: Sequence[float] | None, seeds: Sequence[int], n_images: int,
           eps: Sequence[float]) -> None:
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
    if not eps or any(not (isinstance(e, (int, float)) and 0 <= e <= 1) for e in eps):
        raise PlantedError(f"eps must be a non-empty list of values in [0, 1], got {eps!r}")


def planted_benchmark(
    *,
    architectures: Sequence[str] = ARCHITECTURES,
    criteria: Sequence[str] = ("actgrad", "snip", "force", "magnitude", "random"),
    keeps: Sequence[float] | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    n_images: int = 256,
    eps: Sequence[float] = EPSILONS,
) -> PlantedReport:
    """Measure how well each criterion recovers the planted circuits, by distractor strength.

    For every architecture × eps × seed a :class:`PlantedCase` is built; every criterion
    scores the relevant kernels once on the scoring images (FORCE once per keep, its schedule
    depends on it), keeps exactly ``round(keep × relevant)`` by global top-k
    (:func:`~netcarve.circuits.circuit.select_top_k`), applies the effective mask, and the
    result is compared with the ground truth; preservation is measured on held-out images.
    This is what :func:`~netcarve.circuits.extract.extract` does, with the scores shared
    across keeps.

    Args:
        architectures: any of :data:`ARCHITECTURES`.
        criteria: saliency criterion names.
        keeps: keep fractions in (0, 1]; None: ``m × |GT| / |relevant|`` for ``m`` in
            :data:`GT_MULTIPLES` (0.5, 1, 2) per case, labelled ``"0.5×GT"`` etc.
        seeds: construction seeds (also the random criterion's seed).
        n_images: scoring images per case (held-out: half as many).
        eps: weak-distractor strengths in [0, 1] (default :data:`EPSILONS`).

    Returns:
        A :class:`PlantedReport`.

    Raises:
        PlantedError: unknown architecture, keep outside (0, 1], eps outside [0, 1], no
            seeds, fewer than 2 images.
        CriterionError: unknown criterion.

    Example:
        >>> rep = planted_benchmark(architectures=("sequential",), seeds=(0,), n_images=32,
        ...                         criteria=("actgrad", "magnitude"), eps=(0,))
        >>> [(r["criterion"], r["recall"] > 0.5) for r in rep.rows if r["keep_label"] == "1×GT"]
        [('actgrad', True), ('magnitude', False)]
    """
    _check(architectures, criteria, keeps, seeds, n_images, eps)
    report = PlantedReport(n_images=n_images)
    for arch in architectures:
        for e in eps:
            for seed in seeds:
                case = build_planted(arch, seed, eps=float(e), n_images=n_images)
                rows, info = _run_case(case, criteria, _keep_plan(case, keeps))
                report.cases.append(info)
                report.rows += rows
    return report


def _run_case(
    case: PlantedCase, criteria: Sequence[str], plan: list[tuple[str, float]]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    graph, model = case.graph, case.model
    target = Target.parse(case.target).resolve(graph)
    relevant = case.relevant
    n_gt = case.n_ground_truth
    original = list(target_responses(model, graph, target, case.heldout, batch_size=256))
    weak, cancelling = case.kind_mask(WEAK), case.kind_mask(CANCELLING)
    n_gated = count(case.gated)
    gt_pres = measure_preservation(model, graph, target, case.ground_truth, case.heldout,
                                   batch_size=256, original=original)
    info = {
        "architecture": case.architecture, "seed": case.seed, "eps": case.eps,
        "relevant": case.n_relevant, "ground_truth": n_gt,
        "duplicate_pairs": len(case.duplicates), "cancelling_pairs": len(case.cancelling),
        "gate_open": float(case.gate_opens(case.heldout).float().mean()),
        "gt_pearson": _nan_to_zero(gt_pres.pearson),
        "composition": case.composition(),
    }
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

            def overlap(other: dict, masks: dict = masks) -> int:
                return sum(int((masks[n] & other[n]).sum()) for n in masks)

            tp = overlap(case.ground_truth)
            halves = sum(int(masks[a[0]][a[1], a[2]]) != int(masks[b[0]][b[1], b[2]])
                         for a, b in case.cancelling)
            rows.append({
                "architecture": case.architecture, "seed": case.seed, "eps": case.eps,
                "criterion": crit, "keep_label": label, "keep": keep, "k": k,
                "relevant": case.n_relevant, "ground_truth": n_gt, "kept": kept,
                "true_positives": tp, "precision": tp / kept if kept else 0.0,
                "recall": tp / n_gt,
                "gated_recall": overlap(case.gated) / n_gated if n_gated else math.nan,
                "kept_weak": overlap(weak), "kept_cancelling": overlap(cancelling),
                "cancel_halves": halves, "pearson": pres.pearson, "collapsed": collapsed,
                "seconds": time.perf_counter() - start,
            })
    return rows, info


def run_planted(out_dir: Path, *, quick: bool = False, seed: int = 0) -> dict[str, Any]:
    """Run the graded planted-circuit benchmark and write ``planted.md``, ``planted.csv``
    and ``planted.png`` into ``out_dir``.

    Args:
        out_dir: output folder (created).
        quick: one seed, eps 0 and 0.1, 32 scoring images (a few seconds); otherwise seeds
            ``seed``, ``seed + 1``, ``seed + 2``, every eps of :data:`EPSILONS` and 256
            images (about two minutes on 2 CPU cores).
        seed: first construction seed.

    Returns:
        ``{"quick", "seeds", "eps", "n_images", "gate_open_target", "seconds", "files":
        {"markdown", "csv", "plot"}, "recall_at_gt", "precision_at_gt",
        "preservation_at_gt", "gt_preservation"}``; the ``*_at_gt`` entries map
        ``architecture → eps (as text) → criterion → median`` at keep ``1×GT``, and
        ``gt_preservation`` ``architecture → eps → median`` held-out r of the ground truth.

    Raises:
        PlantedError: matplotlib is missing (the markdown and CSV are written first).

    Example:
        >>> summary = run_planted(Path("out/planted"), quick=True)  # doctest: +SKIP
        >>> summary["recall_at_gt"]["residual"]["0"]["actgrad"]  # doctest: +SKIP
        1.0
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seeds = (seed,) if quick else tuple(range(seed, seed + 3))
    eps = (0.0, 0.1) if quick else EPSILONS
    n_images = 32 if quick else 256
    report = planted_benchmark(seeds=seeds, n_images=n_images, eps=eps)
    files = {
        "markdown": str(out_dir / "planted.md"),
        "csv": str(out_dir / "planted.csv"),
        "plot": str(out_dir / "planted.png"),
    }
    Path(files["markdown"]).write_text(report.to_markdown())
    report.write_csv(files["csv"])
    report.plot(files["plot"])

    def at_gt(metric: str) -> dict[str, dict[str, dict[str, float]]]:
        """``{architecture: {eps: {criterion: median}}}`` at keep ``1×GT``."""
        return {arch: {f"{e:g}": labels.get("1×GT", {}) for e, labels in by_eps.items()}
                for arch, by_eps in report.table(metric).items()}

    return {
        "quick": quick,
        "seeds": list(seeds),
        "eps": list(eps),
        "n_images": n_images,
        "gate_open_target": GATE_OPEN,
        "seconds": round(time.perf_counter() - start, 2),
        "files": files,
        "recall_at_gt": at_gt("recall"),
        "precision_at_gt": at_gt("precision"),
        "preservation_at_gt": at_gt("pearson"),
        "gt_preservation": {arch: {f"{e:g}": report.case_median(arch, e, "gt_pearson")
                                   for e in eps} for arch in report.table("recall")},
    }
