"""Baseline filter-importance criteria, and accuracy-vs-pruned curves on the same footing as CAR.

Criteria (higher score = more important; filters are pruned lowest first, ties by index):

* ``random``: a seeded random permutation.
* ``l1``: the L1 norm of the filter's weights (all its kernels; Li et al., "Pruning Filters
  for Efficient ConvNets").
* ``mean_activation``: the mean of the filter's rectified output ``max(z, 0)`` over images and
  positions, where ``z`` is the filter's output after its BatchNorm -- the value a removal
  zeroes.
* ``apoz``: ``1 - APoZ``, the average percentage of zeros of ``max(z, 0)`` (Hu et al., "Network
  Trimming").
* ``taylor``: the first-order Taylor estimate of the loss change when the filter is removed
  (Molchanov et al., "Pruning Convolutional Neural Networks for Resource Efficient
  Inference"): per image ``|mean over positions of z · ∂L/∂z|``, averaged over images, with
  ``L`` the cross-entropy summed over the batch. For a ReLU after the BatchNorm, the product is
  the same whether taken before or after the ReLU (in-place ReLUs are fine).

Data-driven criteria use the same scoring images as CAR; every method's pruned networks are
evaluated with the same removal semantics (:func:`netcarve.core.hooks.apply_filter_masks`: output 0
after the BatchNorm), on the same evaluation images, at the same filter counts, and -- with
fine-tuning -- with the same fine-tuning recipe and seed (:func:`compare_methods`).

Example:
    >>> from netcarve.zoo import load_model
    >>> lm = load_model("fmnist_vgg")
    >>> s = baseline_scores(lm.model, "features.0", "l1")
    >>> s.shape
    torch.Size([32])
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from netcarve.car.engine import AblationEngine
from netcarve.car.stats import AblationError
from netcarve.core.graph import ModelGraph
from netcarve.core.hooks import capture, preserved_state, resolve_module, stop_at
from netcarve.core.plotting import save_figure
from netcarve.data.preset import Preset

__all__ = [
    "BASELINES",
    "CurveReport",
    "baseline_order",
    "baseline_scores",
    "compare_methods",
]

BASELINES: tuple[str, ...] = ("random", "l1", "mean_activation", "apoz", "taylor")
"""The baseline criteria, in the order reports list them."""


def _normalised_batches(
    images: torch.Tensor, labels: torch.Tensor | None, preset: Preset | None, batch_size: int,
    device: torch.device, dtype: torch.dtype,
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    for start in range(0, len(images), batch_size):
        xb = images[start:start + batch_size]
        if xb.dtype == torch.uint8:
            if preset is None:
                raise AblationError("uint8 images need a preset to be normalised")
            xb = preset.normalize(xb)
        yb = None if labels is None else labels[start:start + batch_size].to(device)
        yield xb.to(device=device, dtype=dtype), yb


def _removal_point(graph: ModelGraph, layer: str) -> str:
    """The module whose output a removal zeroes last: the layer's last BatchNorm, or itself."""
    bns = graph.bn_after.get(layer, [])
    return bns[-1] if bns else layer


def baseline_scores(
    model: nn.Module,
    layer: str,
    method: str,
    *,
    images: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    preset: Preset | None = None,
    graph: ModelGraph | None = None,
    batch_size: int = 100,
    seed: int = 0,
) -> torch.Tensor:
    """Importance of every filter of ``layer`` by a baseline criterion (higher = keep).

    Args:
        model: the classifier (comes back unchanged: weights, flags, no hooks left).
        layer: a conv or linear layer.
        method: one of :data:`BASELINES`.
        images / labels: scoring data (needed by ``mean_activation``, ``apoz``, ``taylor``;
            labels only by ``taylor``); uint8 with ``preset`` or normalised floats.
        preset: the model's preset.
        graph: the model's graph (built from the first image when omitted).
        batch_size: images per pass.
        seed: seeds ``random``.

    Returns:
        float64 ``[out_channels]``.

    Raises:
        AblationError: unknown method, or a data-driven method without data.
        GraphError: unknown layer.

    Example:
        >>> baseline_scores(model, "features.0", "apoz", images=x, preset=p)  # doctest: +SKIP
    """
    if method not in BASELINES:
        raise AblationError(f"unknown baseline {method!r}; use one of {', '.join(BASELINES)}")
    weight = getattr(resolve_module(model, layer), "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise AblationError(f"layer {layer} has no weight")
    n = weight.shape[0]
    if method == "random":
        gen = torch.Generator().manual_seed(seed)
        return torch.randperm(n, generator=gen).to(torch.float64)
    if method == "l1":
        return weight.detach().abs().reshape(n, -1).sum(1).double().cpu()
    if images is None or len(images) == 0:
        raise AblationError(f"the {method} criterion needs scoring images")
    device = weight.device
    dtype = weight.dtype
    if graph is None:
        first = next(_normalised_batches(images[:1], None, preset, 1, device, dtype))[0]
        graph = ModelGraph.build(model, first)
    graph.layer(layer)
    point = _removal_point(graph, layer)
    if method == "taylor":
        if labels is None:
            raise AblationError("the taylor criterion needs labels")
        return _taylor(model, point, images, labels, preset, batch_size, device, dtype)
    total = torch.zeros(n, dtype=torch.float64)
    zeros = torch.zeros(n, dtype=torch.float64)
    count = 0
    with preserved_state(model), torch.no_grad(), stop_at(model, point) as run:
        model.eval()
        for xb, _ in _normalised_batches(images, None, preset, batch_size, device, dtype):
            z = run(xb).double()
            flat = z.transpose(0, 1).reshape(n, -1)
            total += flat.clamp(min=0).sum(1).cpu()
            zeros += (flat <= 0).sum(1).double().cpu()
            count += flat.shape[1]
    if method == "mean_activation":
        return total / count
    return 1.0 - zeros / count


def _taylor(model: nn.Module, point: str, images: torch.Tensor, labels: torch.Tensor,
            preset: Preset | None, batch_size: int, device: torch.device,
            dtype: torch.dtype) -> torch.Tensor:
    score: torch.Tensor | None = None
    count = 0
    with preserved_state(model), capture(model, [point], clone=False) as store:
        model.eval()
        for xb, yb in _normalised_batches(images, labels, preset, batch_size, device, dtype):
            x = xb.clone().requires_grad_(True)
            logits = model(x)
            loss = F.cross_entropy(logits, yb.long(), reduction="sum")
            z = store[point]
            (g,) = torch.autograd.grad(loss, [z])
            prod = (z.detach() * g).double()
            per_image = prod.reshape(prod.shape[0], prod.shape[1], -1).mean(-1).abs()
            part = per_image.sum(0).cpu()
            score = part if score is None else score + part
            count += prod.shape[0]
    assert score is not None
    return score / count


def baseline_order(scores: torch.Tensor) -> list[int]:
    """Filters from least to most important (ascending score, ties by index).

    Example:
        >>> baseline_order(torch.tensor([0.5, 0.1, 0.5, 0.0]))
        [3, 1, 0, 2]
    """
    values = scores.tolist()
    return sorted(range(len(values)), key=lambda i: (values[i], i))


# --------------------------------------------------------------------------- curves


@dataclass
class CurveReport:
    """Accuracy vs filters pruned, for several methods, before and after fine-tuning.

    Attributes:
        rows: one dict per point: ``layer, method, pruned, accuracy, loss, finetuned``.
        orders: ``{layer: {method: pruning order}}``.
        n_eval: evaluation images.
        settings: how the curves were made (counts, fine-tuning recipe, ...).
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    orders: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    n_eval: int = 0
    settings: dict[str, Any] = field(default_factory=dict)

    def table(self, layer: str, pruned: int, finetuned: bool = False) -> dict[str, float]:
        """``{method: accuracy}`` at one count."""
        return {r["method"]: r["accuracy"] for r in self.rows
                if r["layer"] == layer and r["pruned"] == pruned and r["finetuned"] == finetuned}

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly: all points, orders and settings."""
        return {"n_eval": self.n_eval, "settings": self.settings, "points": self.rows,
                "orders": self.orders}

    def save(self, directory: str | Path, png: bool = True) -> Path:
        """Write ``curves.csv`` (and ``curves.png``) into ``directory``; returns the CSV."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        target = out / "curves.csv"
        with target.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["layer", "method", "pruned", "accuracy",
                                                    "loss", "finetuned"])
            writer.writeheader()
            writer.writerows(self.rows)
        (out / "curves.json").write_text(json.dumps(self.to_dict(), indent=2))
        if png:
            self.plot(out / "curves.png")
        return target

    def plot(self, path: str | Path) -> Path:
        """One panel per layer: accuracy vs filters pruned; lines before fine-tuning, hollow
        markers after."""
        from netcarve.core.plotting import pyplot

        plt = pyplot()
        layers = list(dict.fromkeys(r["layer"] for r in self.rows))
        fig, axes = plt.subplots(1, max(1, len(layers)), figsize=(5.2 * max(1, len(layers)), 4),
                                 squeeze=False)
        colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for ax, layer in zip(axes[0], layers, strict=False):
            methods = list(dict.fromkeys(r["method"] for r in self.rows if r["layer"] == layer))
            for i, method in enumerate(methods):
                colour = colours[i % len(colours)]
                for tuned in (False, True):
                    pts = sorted((r["pruned"], r["accuracy"]) for r in self.rows
                                 if r["layer"] == layer and r["method"] == method
                                 and r["finetuned"] == tuned)
                    if not pts:
                        continue
                    xs, ys = zip(*pts, strict=True)
                    if tuned:
                        ax.plot(xs, ys, linestyle="--", marker="o", markerfacecolor="none",
                                color=colour, label=f"{method} (fine-tuned)")
                    else:
                        ax.plot(xs, ys, marker=".", color=colour, label=method,
                                linewidth=2.2 if method.startswith("car") else 1.2)
            ax.set_title(layer, fontsize=10)
            ax.set_xlabel("filters pruned")
            ax.set_ylabel("top-1 accuracy (evaluation images)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        return save_figure(fig, path, dpi=110)


def compare_methods(
    model: nn.Module,
    layer: str,
    *,
    score_images: torch.Tensor,
    score_labels: torch.Tensor,
    eval_images: torch.Tensor | Any,
    eval_labels: torch.Tensor | None,
    counts: Sequence[int],
    methods: Sequence[str] = ("car", *BASELINES),
    car_order: Sequence[int] | None = None,
    preset: Preset | None = None,
    graph: ModelGraph | None = None,
    batch_size: int = 100,
    seed: int = 0,
    finetune_epochs: int = 0,
    finetune_at: Sequence[int] = (),
    lr: float = 0.01,
    finetune_images: torch.Tensor | None = None,
    finetune_labels: torch.Tensor | None = None,
    finetune_max_images: int | None = None,
    report: CurveReport | None = None,
) -> CurveReport:
    """Prune the first ``k`` filters of ``layer`` in each method's order, for every ``k``.

    ``car`` uses ``car_order`` when given (e.g. a greedy order), else the exact greedy CAR
    order computed here on the scoring images. Baselines are scored on the same scoring images.
    All pruned networks are evaluated on the same evaluation images in one engine pass per
    layer; with ``finetune_epochs``, the physically pruned model of each method at each count in
    ``finetune_at`` is fine-tuned with the same recipe and seed, then evaluated.

    Args:
        model: the classifier (unchanged).
        layer: the layer.
        score_images / score_labels: scoring data for data-driven criteria and CAR.
        eval_images / eval_labels: evaluation data for the curves: tensors, or a stream
            (DataLoader over an image folder; ``eval_labels`` None) evaluated one bounded
            chunk at a time by :func:`netcarve.car.streamed.evaluate_stream`.
        counts: numbers of filters pruned (0 allowed).
        methods: ``"car"`` and / or names from :data:`BASELINES`.
        car_order: the CAR pruning order of this layer (optional).
        preset: the model's preset.
        graph: the model's graph.
        batch_size: images per pass.
        seed: seeds ``random`` and fine-tuning.
        finetune_epochs: 0 = no fine-tuning.
        finetune_at: the counts at which to fine-tune.
        lr: fine-tuning learning rate.
        finetune_images / finetune_labels / finetune_max_images: fine-tuning data.
        report: add the points to this report instead of a new one.

    Returns:
        the :class:`CurveReport`.

    Raises:
        AblationError: unknown method, a count outside ``0 .. out_channels - 1``.
        CompressError: fine-tuning a layer whose filters cannot be removed physically.

    Example:
        >>> rep = compare_methods(model, "features.0", score_images=xs, score_labels=ys,
        ...                       eval_images=xt, eval_labels=yt, counts=[0, 8, 16],
        ...                       preset=preset)  # doctest: +SKIP
    """
    from netcarve.car.greedy import greedy_prune

    start = time.perf_counter()
    report = report if report is not None else CurveReport()
    in_memory = isinstance(eval_images, torch.Tensor)
    if in_memory:
        eng = AblationEngine(model, eval_images, eval_labels, graph=graph, preset=preset,
                             batch_size=batch_size)
        graph = eng.graph
    elif graph is None:
        example = score_images[:1]
        if example.dtype == torch.uint8 and preset is not None:
            example = preset.normalize(example)
        weight = next(model.parameters())
        graph = ModelGraph.build(model, example.to(device=weight.device, dtype=weight.dtype))
    n = graph.layer(layer).out_channels
    ks = sorted({int(k) for k in counts})
    if not ks or ks[0] < 0 or ks[-1] > n - 1:
        raise AblationError(f"counts must lie in 0..{n - 1} for {layer}, got {list(counts)}")
    orders: dict[str, list[int]] = {}
    for method in methods:
        if method == "car":
            if car_order is None:
                res = greedy_prune(model, score_images, score_labels, [layer], amount=ks[-1],
                                   preset=preset, graph=graph, batch_size=batch_size) \
                    if ks[-1] > 0 else None
                orders[method] = [] if res is None else res.removed(layer)
            else:
                orders[method] = [int(f) for f in car_order]
            if len(orders[method]) < ks[-1]:
                raise AblationError(f"the CAR order of {layer} has {len(orders[method])} "
                                    f"filters; {ks[-1]} are needed")
        elif method in BASELINES:
            scores = baseline_scores(model, layer, method, images=score_images,
                                     labels=score_labels, preset=preset, graph=graph,
                                     batch_size=batch_size, seed=seed)
            orders[method] = baseline_order(scores)
        else:
            raise AblationError(f"unknown method {method!r}; use 'car' or one of "
                                f"{', '.join(BASELINES)}")
    cands, where = [], []
    for method, order in orders.items():
        for k in ks:
            keep = torch.ones(n, dtype=torch.bool)
            keep[torch.tensor(order[:k], dtype=torch.int64)] = False
            cands.append(keep)
            where.append((method, k))
    if in_memory:
        stats = eng.evaluate(layer, torch.stack(cands))
    else:  # a stream (e.g. an image folder): one bounded chunk of images at a time
        from netcarve.car.streamed import evaluate_stream

        stats = evaluate_stream(model, layer, torch.stack(cands), eval_images, graph=graph,
                                preset=preset, batch_size=batch_size)
    acc, loss = stats.accuracy(), stats.loss()
    for i, (method, k) in enumerate(where):
        report.rows.append({"layer": layer, "method": method, "pruned": k,
                            "accuracy": float(acc[i]), "loss": float(loss[i]),
                            "finetuned": False})
    if finetune_epochs > 0 and finetune_at:
        from netcarve.surgery.prune import prune_filters
        from netcarve.training.evaluation import evaluate
        from netcarve.training.finetune import finetune

        check = (eval_images if in_memory else score_images)[:8]
        if check.dtype == torch.uint8 and preset is not None:
            check = preset.normalize(check)
        weight = resolve_module(model, layer).weight
        check = check.to(device=weight.device, dtype=weight.dtype)
        for method, order in orders.items():
            for k in sorted({int(k) for k in finetune_at}):
                keep = torch.ones(n, dtype=torch.bool)
                keep[torch.tensor(order[:k], dtype=torch.int64)] = False
                if k == 0:
                    small = model
                else:
                    small = prune_filters(model, {layer: keep}, graph=graph,
                                          check_input=check).module
                res = finetune(small, preset=preset, epochs=finetune_epochs, lr=lr, seed=seed,
                               images=finetune_images, labels=finetune_labels,
                               max_images=finetune_max_images, batch_size=128)
                ev = evaluate(res.model, eval_images, eval_labels,
                              preset or Preset(1, 1, (0.0,), (1.0,)), batch_size=batch_size,
                              device=weight.device)
                report.rows.append({"layer": layer, "method": method, "pruned": k,
                                    "accuracy": ev.accuracy, "loss": ev.loss,
                                    "finetuned": True})
    report.orders[layer] = orders
    report.n_eval = stats.n
    report.settings.setdefault("layers", {})[layer] = {
        "counts": ks, "methods": list(methods), "finetune_epochs": finetune_epochs,
        "finetune_at": list(finetune_at), "lr": lr, "seed": seed,
        "n_score": len(score_labels), "seconds": time.perf_counter() - start}
    return report
