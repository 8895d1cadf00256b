"""Defection: how fine-tuning changes what the surviving filters do (descriptor drift), and
whether filters leave their cluster."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from netcarve.core.graph import ModelGraph
from netcarve.core.plotting import pyplot, save_figure
from netcarve.data.preset import Preset
from netcarve.function.descriptors import (
    FilterDescriptors,
    FunctionalError,
    _as_inputs,
    _check_descriptors,
    _device_dtype,
    _relative,
    describe_filters,
)
from netcarve.function.pruning import _fold_of, _fold_probe

__all__ = ["DefectionReport", "defection"]


# --------------------------------------------------------------------------- defection


@dataclass
class DefectionReport:
    """Descriptor drift of surviving filters when pruned networks are fine-tuned.

    Attributes:
        rows: one dict per (method, learning rate, epochs, layer, surviving filter,
            descriptor): ``cosine`` = cosine similarity of the filter's descriptor in the
            pruned network before vs after fine-tuning; ``cosine_relative`` the same for
            descriptors z-scored over the layer's surviving filters (as the clustering sees
            them: the filter's function relative to its layer); ``cosine_vs_original`` = after
            fine-tuning vs the same filter in the unpruned network.
        runs: one dict per (method, lr, epochs): accuracy before/after fine-tuning, seconds.
        settings: descriptors, probe size, fine-tuning data, seed.

    Example:
        >>> report.summary()[0]["mean_cosine"]  # doctest: +SKIP
    """

    rows: list[dict[str, Any]]
    runs: list[dict[str, Any]]
    settings: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> list[dict[str, Any]]:
        """Mean / median / min cosine per (method, lr, epochs, layer, descriptor).

        Undefined cosines (a descriptor that is all zero, e.g. the class preference of a filter
        that is never active) are left out of the statistics and counted in ``undefined``.
        """
        groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
        for r in self.rows:
            key = (r["method"], r["lr"], r["epochs"], r["layer"], r["descriptor"])
            groups.setdefault(key, []).append(r)

        def stats(rows: list[dict[str, Any]], name: str) -> torch.Tensor:
            vals = torch.tensor([r[name] for r in rows], dtype=torch.float64)
            return vals[torch.isfinite(vals)]

        def agg(t: torch.Tensor, how: str) -> float | None:
            return float(getattr(t, how)()) if len(t) else None

        out = []
        for (method, lr, epochs, layer, kind), rows in groups.items():
            vals = stats(rows, "cosine")
            rel = stats(rows, "cosine_relative")
            orig = stats(rows, "cosine_vs_original")
            out.append({"method": method, "lr": lr, "epochs": epochs, "layer": layer,
                        "descriptor": kind, "filters": len(rows),
                        "undefined": len(rows) - len(vals),
                        "mean_cosine": agg(vals, "mean"), "median_cosine": agg(vals, "median"),
                        "min_cosine": agg(vals, "min"),
                        "mean_cosine_relative": agg(rel, "mean"),
                        "mean_cosine_vs_original": agg(orig, "mean")})
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly: settings, runs and the summary (rows go to the CSV)."""
        return {"settings": self.settings, "runs": self.runs, "summary": self.summary()}

    def save_csv(self, path: str | Path) -> Path:
        """Every row (one per surviving filter, setting and descriptor)."""
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        keys = ["method", "lr", "epochs", "layer", "filter", "descriptor", "cosine",
                "cosine_relative", "cosine_vs_original"]
        with out.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=keys)
            w.writeheader()
            for r in self.rows:
                w.writerow({k: (f"{r[k]:.6f}" if isinstance(r[k], float) and k.startswith(
                    "cosine") else r[k]) for k in keys})
        return out

    def plot(self, path: str | Path) -> Path:
        """Box plots of the before-vs-after cosine of surviving filters: one row per
        descriptor, the raw and the layer-relative cosine side by side, one box per
        (learning rate, epochs) and method. Undefined cosines are left out.

        Returns:
            the path written.
        """
        plt = pyplot()

        kinds = sorted({r["descriptor"] for r in self.rows})
        methods = list(dict.fromkeys(r["method"] for r in self.rows))
        settings = list(dict.fromkeys((r["lr"], r["epochs"]) for r in self.rows))
        fields = (("cosine", "raw descriptor"), ("cosine_relative", "layer-relative"))
        width_in = max(4.5, 0.75 * len(settings) * len(methods) + 1.5)
        fig, axes = plt.subplots(max(len(kinds), 1), 2, squeeze=False,
                                 figsize=(2 * width_in, 3.1 * max(len(kinds), 1) + 0.5))
        colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
        width = 0.8 / max(len(methods), 1)
        for row, kind in enumerate(kinds):
            for col, (name, label) in enumerate(fields):
                ax = axes[row, col]
                for mi, method in enumerate(methods):
                    data = [[r[name] for r in self.rows if r["descriptor"] == kind
                             and r["method"] == method and (r["lr"], r["epochs"]) == s
                             and math.isfinite(r[name])] for s in settings]
                    pos = [i + (mi - (len(methods) - 1) / 2) * width
                           for i in range(len(settings))]
                    bp = ax.boxplot(data, positions=pos, widths=width * 0.9, patch_artist=True,
                                    flierprops={"markersize": 2})
                    for patch in bp["boxes"]:
                        patch.set_facecolor(colours[mi % len(colours)])
                        patch.set_alpha(0.6)
                    ax.plot([], [], color=colours[mi % len(colours)], linewidth=6, alpha=0.6,
                            label=method)
                ax.set_xticks(range(len(settings)))
                ax.set_xticklabels([f"lr {lr:g}, {ep} ep" for lr, ep in settings], fontsize=7)
                ax.set_ylabel("cosine before vs after", fontsize=8)
                ax.set_title(f"{kind}: {label}", fontsize=9)
                ax.set_ylim(-1.05, 1.05)
                ax.grid(axis="y", alpha=0.3)
                ax.legend(fontsize=7, loc="lower left")
        fig.suptitle("Functionality defection: surviving filters' descriptors before vs after "
                     "fine-tuning", fontsize=10)
        fig.tight_layout()
        return save_figure(fig, path, dpi=110)


def _rowwise_cosine(a: torch.Tensor, b: torch.Tensor, center: bool) -> torch.Tensor:
    x, y = a.double(), b.double()
    if center:
        x = x - x.mean(dim=1, keepdim=True)
        y = y - y.mean(dim=1, keepdim=True)
    num = (x * y).sum(dim=1)
    den = x.norm(dim=1) * y.norm(dim=1)
    return torch.where(den > 0, num / den.clamp(min=1e-300), torch.full_like(num, math.nan))


def defection(
    model: nn.Module,
    masks: dict[str, dict[str, torch.Tensor]],
    probe_images: torch.Tensor,
    *,
    preset: Preset,
    settings: Sequence[tuple[float, int]] = ((0.01, 1), (0.001, 1)),
    layers: Sequence[str] | None = None,
    descriptors: str | Sequence[str] = ("class_preference", "profile"),
    train_images: torch.Tensor | None = None,
    train_labels: torch.Tensor | None = None,
    max_train_images: int | None = None,
    eval_images: torch.Tensor | None = None,
    eval_labels: torch.Tensor | None = None,
    am_steps: int = 128,
    batch_size: int = 128,
    seed: int = 0,
    graph: ModelGraph | None = None,
    fold: str | dict[str, str] = "lstsq",
    fold_images: torch.Tensor | None = None,
    ridge: float = 1e-2,
) -> DefectionReport:
    """Functionality defection: how fine-tuning a pruned network changes its surviving
    filters' functions.

    For every method's masks the physically smaller network is built once; its surviving
    filters' descriptors are measured (on ``probe_images``) before fine-tuning, and again
    after fine-tuning with every ``(learning rate, epochs)`` setting (same seed and data for
    every method). Each surviving filter's drift is the cosine similarity of its descriptor
    before vs after; it is also compared with the same filter in the unpruned network.

    Args:
        model: the original classifier (comes back unchanged).
        masks: ``{method: {layer: bool keep}}``.
        probe_images: images the descriptors are measured on (uint8 or normalised).
        preset: the model's preset.
        settings: ``(lr, epochs)`` pairs.
        layers: layers whose survivors are tracked (default: the layers in the masks).
        descriptors: descriptor kinds (``"am"`` is slow: one optimisation per network).
        train_images / train_labels / max_train_images: fine-tuning data.
        eval_images / eval_labels: accuracy before/after fine-tuning (optional).
        am_steps: activation-maximisation steps for ``"am"``.
        batch_size: images per forward pass.
        seed: seeds fine-tuning and activation maximisation.
        graph: the original model's graph.
        fold / fold_images / ridge: how the pruned networks are made (as in
            :func:`compare_pruning`).

    Returns:
        a :class:`DefectionReport` (``save_csv``, ``plot``).

    Raises:
        FunctionalError: no settings, bad settings, unknown descriptors.
        CompressError / FinetuneError: from pruning or fine-tuning.

    Example:
        >>> rep = defection(lm.model, {"functional": m1, "magnitude": m2}, x, preset=lm.preset,
        ...                 settings=[(0.01, 1), (0.001, 2)])  # doctest: +SKIP
    """
    from netcarve.surgery.prune import prune_filters
    from netcarve.training.evaluation import evaluate
    from netcarve.training.finetune import finetune

    kinds = _check_descriptors(descriptors)
    runs_settings = [(float(lr), int(ep)) for lr, ep in settings]
    if not runs_settings:
        raise FunctionalError("give at least one (learning rate, epochs) setting")
    for lr, ep in runs_settings:
        if not (lr > 0 and math.isfinite(lr)) or ep < 1:
            raise FunctionalError(f"bad fine-tuning setting lr={lr}, epochs={ep}: need lr > 0 "
                                  "and epochs >= 1")
    probe = _as_inputs(probe_images, preset)
    device, dtype = _device_dtype(model)
    graph = graph or ModelGraph.build(model, probe[:1].to(device=device, dtype=dtype))
    rows: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    fold_probe = _fold_probe(fold, list(masks), fold_images, train_images, preset, device,
                             dtype)

    def describe(net: nn.Module, layer: str) -> FilterDescriptors:
        return describe_filters(net, layer, probe, descriptors=kinds, preset=preset,
                                am_steps=am_steps, seed=seed, batch_size=batch_size)

    for method, mask in masks.items():
        track = list(layers) if layers is not None else list(mask)
        pruned = prune_filters(model, mask, graph=graph,
                               example_input=probe[:2].to(device=device, dtype=dtype),
                               fold=_fold_of(fold, method), fold_images=fold_probe,
                               ridge=ridge)
        survivors = {name: pruned.kept.get(name, list(range(graph.layer(name).out_channels)))
                     for name in track}
        original = {name: describe(model, name).select(survivors[name]) for name in track}
        before = {name: describe(pruned.module, name) for name in track}
        acc_before = None
        if eval_images is not None and eval_labels is not None:
            acc_before = evaluate(pruned.module, eval_images, eval_labels, preset,
                                  device=device).accuracy
        for lr, epochs in runs_settings:
            ft = finetune(pruned.module, preset=preset, epochs=epochs, lr=lr, seed=seed,
                          images=train_images, labels=train_labels,
                          max_images=max_train_images, batch_size=batch_size,
                          eval_images=eval_images, eval_labels=eval_labels)
            runs.append({"method": method, "lr": lr, "epochs": epochs,
                         "accuracy_before": acc_before, "accuracy_after": ft.accuracy_after,
                         "seconds": ft.seconds})
            for name in track:
                after = describe(ft.model, name)
                for kind in kinds:
                    b, a = before[name].vectors(kind), after.vectors(kind)
                    o = original[name].vectors(kind)
                    cos = _rowwise_cosine(b, a, center=False)
                    rel = _rowwise_cosine(_relative(b), _relative(a), center=False)
                    vs_orig = _rowwise_cosine(o, a, center=False)
                    for i, f in enumerate(survivors[name]):
                        rows.append({"method": method, "lr": lr, "epochs": epochs,
                                     "layer": name, "filter": int(f), "descriptor": kind,
                                     "cosine": float(cos[i]), "cosine_relative": float(rel[i]),
                                     "cosine_vs_original": float(vs_orig[i])})
    meta = {"descriptors": kinds, "probe_images": len(probe), "settings": runs_settings,
            "max_train_images": max_train_images, "seed": seed,
            "folds": {m: _fold_of(fold, m) for m in masks},
            "fold_images": None if fold_probe is None else len(fold_probe)}
    return DefectionReport(rows, runs, meta)
