"""Sweeps: preservation vs keep for several criteria and many units, as a table and a plot."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from netcarve.circuits.circuit import CircuitError, count, keep_count, select_top_k
from netcarve.circuits.extract import measure_preservation, score_kernels, target_responses
from netcarve.core._csv import write_rows
from netcarve.core.graph import ModelGraph
from netcarve.core.plotting import pyplot, save_figure
from netcarve.core.targets import Target
from netcarve.data.stream import Images, as_stream

COLUMNS = [
    "unit", "layer", "channel", "criterion", "keep", "relevant_kernels", "kept_kernels",
    "effective_keep", "collapsed", "pearson", "nmad", "per_image_median", "seconds",
]


@dataclass
class SweepResult:
    """Rows of a sweep (one per unit × criterion × keep) with helpers to summarise them."""

    rows: list[dict[str, Any]] = field(default_factory=list)

    def table(self, statistic: str = "median") -> dict[str, dict[float, float]]:
        """``{criterion: {keep: statistic of preservation}}``.

        A collapsed circuit or a constant response counts as preservation 0 (no path left
        means nothing is preserved), as in the reference table of the circuits paper.
        """
        out: dict[str, dict[float, float]] = {}
        groups: dict[tuple[str, float], list[float]] = {}
        for r in self.rows:
            groups.setdefault((r["criterion"], r["keep"]), []).append(_r_or_zero(r["pearson"]))
        for (crit, keep), vals in groups.items():
            t = torch.tensor(vals, dtype=torch.float64)
            q = {"median": 0.5, "q1": 0.25, "q3": 0.75}[statistic]
            out.setdefault(crit, {})[keep] = float(torch.quantile(t, q))
        return out

    def collapse_fraction(self) -> dict[str, dict[float, float]]:
        """``{criterion: {keep: fraction of units whose circuit collapsed}}``."""
        groups: dict[tuple[str, float], list[bool]] = {}
        for r in self.rows:
            groups.setdefault((r["criterion"], r["keep"]), []).append(bool(r["collapsed"]))
        out: dict[str, dict[float, float]] = {}
        for (crit, keep), vals in groups.items():
            out.setdefault(crit, {})[keep] = sum(vals) / len(vals)
        return out

    def write_csv(self, path: str | Path) -> Path:
        """Write all rows as CSV."""
        return write_rows(path, self.rows, COLUMNS)

    def markdown_table(self) -> str:
        """Median held-out preservation, criteria as columns and keep as rows (like SPEC)."""
        med = self.table("median")
        crits = list(med)
        keeps = sorted({k for v in med.values() for k in v}, reverse=True)
        lines = ["| keep | " + " | ".join(crits) + " |", "|---|" + "---|" * len(crits)]
        for k in keeps:
            cells = [f"{med[c][k]:.3f}" if k in med[c] else "—" for c in crits]
            lines.append(f"| {k:g} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def plot(self, path: str | Path, title: str = "") -> Path:
        """Median preservation vs keep per criterion, with quartile bands (PNG)."""
        plt = pyplot()

        med, q1, q3 = self.table("median"), self.table("q1"), self.table("q3")
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for crit in med:
            keeps = sorted(med[crit])
            ax.plot(keeps, [med[crit][k] for k in keeps], marker="o", label=crit)
            ax.fill_between(keeps, [q1[crit][k] for k in keeps], [q3[crit][k] for k in keeps],
                            alpha=0.18)
        ax.set_xscale("log")
        ax.set_xlabel("keep (fraction of relevant kernels)")
        ax.set_ylabel("held-out preservation (Pearson r)")
        units = len({r["unit"] for r in self.rows})
        ax.set_title(title or f"Preservation vs keep, {units} units (median, quartile bands)")
        ax.set_ylim(-0.05, 1.02)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        return save_figure(fig, path, dpi=120)


def _r_or_zero(value: float | None) -> float:
    return 0.0 if value is None or (isinstance(value, float) and math.isnan(value)) else value


def pick_units(
    graph: ModelGraph, layers: Sequence[str], per_layer: int, seed: int = 0
) -> list[Target]:
    """Pick ``per_layer`` random channels from each layer (seeded), as targets.

    Raises:
        GraphError: unknown layer.
    """
    gen = torch.Generator().manual_seed(seed)
    units = []
    for layer in layers:
        info = graph.layer(layer)
        chans = torch.randperm(info.out_channels, generator=gen)[:per_layer].sort().values
        units += [Target(layer, channel=int(c)) for c in chans]
    return units


def sweep(
    model: nn.Module,
    units: Sequence[Target | str],
    images: Images,
    heldout: Images,
    *,
    criteria: Sequence[str] = ("actgrad", "snip", "force", "magnitude", "random"),
    keeps: Sequence[float] = (0.5, 0.2, 0.1, 0.05, 0.01),
    per_layer_norm: bool = False,
    batch_size: int = 64,
    seed: int = 0,
    graph: ModelGraph | None = None,
    progress: bool = False,
) -> SweepResult:
    """Preservation on held-out images for every unit × criterion × keep.

    One-shot criteria score each unit once and reuse the scores for every keep; FORCE is
    re-run per keep because its schedule depends on it. Original responses are computed
    once per unit.

    Args:
        model: the model (restored afterwards).
        units: targets (``Target`` or ``"layer:channel"`` strings).
        images: normalised scoring images: a tensor, or a stream (DataLoader / re-iterable
            of ``(images, labels)`` batches) read once per unit and criterion.
        heldout: normalised held-out images for preservation (tensor or stream).
        criteria: criterion names.
        keeps: keep fractions.
        per_layer_norm: per-layer score normalisation before the global top-k.
        batch_size: images per batch while scoring.
        seed: seed for the random criterion.
        graph: a prebuilt graph.
        progress: show a progress bar.

    Returns:
        A :class:`SweepResult`.

    Example:
        >>> res = sweep(model, ["features.3:1"], x, x_test, keeps=[0.1])  # doctest: +SKIP
        >>> res.write_csv("sweep.csv")  # doctest: +SKIP
    """
    for k in keeps:
        if not 0 < k <= 1:
            raise CircuitError(f"keep must be in (0, 1], got {k}")
    p = next(model.parameters())
    if isinstance(images, torch.Tensor):
        images = images.to(dtype=p.dtype)
    if isinstance(heldout, torch.Tensor):
        heldout = heldout.to(dtype=p.dtype)
    # streams (DataLoaders over a folder) are read once per unit × criterion for scoring and
    # once per keep for preservation; the original responses are kept, not the images
    images, heldout = as_stream(images), as_stream(heldout)
    graph = graph or ModelGraph.build(model, images.first(device=p.device, dtype=p.dtype))
    result = SweepResult()
    eval_bs = max(batch_size, 256)
    bar = tqdm(total=len(units) * len(criteria), desc="sweep", disable=not progress)
    for unit in units:
        target = (Target.parse(unit) if isinstance(unit, str) else unit).resolve(graph)
        relevant = graph.relevant_kernels(target.layer, target.channels)
        original = list(target_responses(model, graph, target, heldout, batch_size=eval_bs))
        for crit in criteria:
            start = time.perf_counter()
            scores = None
            for keep in keeps:
                if scores is None or crit == "force":
                    scores = score_kernels(model, graph, target, images, criterion=crit,
                                           keep=keep, relevant=relevant,
                                           batch_size=batch_size, seed=seed)
                raw = select_top_k(scores, relevant, keep_count(keep, relevant),
                                   per_layer_norm=per_layer_norm)
                masks, collapsed = graph.effective_mask(raw, target.layer, target.channels)
                pres = measure_preservation(model, graph, target, masks, heldout,
                                            batch_size=eval_bs, original=original)
                kept = count(masks)
                result.rows.append({
                    "unit": str(target), "layer": target.layer, "channel": target.channel,
                    "criterion": crit, "keep": keep, "relevant_kernels": count(relevant),
                    "kept_kernels": kept, "effective_keep": kept / max(count(relevant), 1),
                    "collapsed": collapsed, "pearson": None if math.isnan(pres.pearson)
                    else pres.pearson, "nmad": pres.nmad,
                    "per_image_median": pres.per_image_median,
                    "seconds": time.perf_counter() - start,
                })
                start = time.perf_counter()
            bar.update(1)
    bar.close()
    return result
