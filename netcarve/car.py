"""CAR -- classification accuracy reduction: filter importance, class-wise CAR, greedy pruning.

``CAR_i = metric(net) - metric(net without filter i)`` (for a loss, the increase of the loss),
measured on a set of scoring images with :class:`~netcarve.ablation.AblationEngine`. The metric
is top-1 accuracy by default (``"top5"``, ``"loss"`` or any callable, see
:class:`~netcarve.ablation.Metric`). Accuracy moves in steps of ``1/N``, so ties are common:
they are broken by the loss (the filter whose removal raises the loss less is less important),
then by filter index.

**Removal** = the filter outputs exactly 0 after its BatchNorm: its kernels, bias and
BatchNorm shift are all gone (:func:`netcarve.hooks.apply_filter_masks`).

**Class-wise CAR** is the ``[filters × classes]`` matrix of per-class top-1 accuracy drops;
a filter's most (least) important class is the one whose accuracy falls most (least) without
it (ties broken by the per-class loss).

**Greedy compression** (:func:`greedy_prune`) removes the filter with the lowest CAR,
re-scores the others with it removed, and repeats -- per layer (layers one after another, each
given the removals already made) or across layers (one pool of candidates) -- until a count, a
ratio or an accuracy floor is reached. ``mode="lazy"`` re-scores only the ``window`` most
promising candidates (lowest previous CAR) at each step; :func:`order_agreement` says how far
its order departs from the exact one (Kendall tau). :func:`car_compress` chains greedy pruning,
the physically smaller model (:func:`netcarve.compress.prune_filters`) and optional
fine-tuning.

Data (the CLI's choice, documented in ``netcarve car --help``): scores and greedy decisions use
*scoring* images (the first N of the train split, "held in"); accuracies reported for the
pruned networks use the *evaluation* images (the test split), so no decision sees them.

Example:
    >>> from netcarve.zoo import load_model
    >>> from netcarve.evaluation import reference_data
    >>> lm = load_model("fmnist_vgg")
    >>> x, y = reference_data(lm.preset, "train", limit=200)
    >>> report = car_scores(lm.model, x, y, ["features.0"], preset=lm.preset)
    >>> len(report.layers["features.0"].car)
    32
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from netcarve.ablation import (
    AblationEngine,
    AblationError,
    AblationStats,
    ForwardCounts,
    Metric,
    resolve_metric,
    single_removals,
)
from netcarve.graph import ModelGraph
from netcarve.racing import RACING_METRICS, race_step
from netcarve.zoo.preset import Preset

__all__ = [
    "CARReport",
    "ClasswiseCAR",
    "CompressionReport",
    "GreedyResult",
    "LayerCAR",
    "PruneStep",
    "car_compress",
    "car_scores",
    "classwise_car",
    "greedy_prune",
    "kendall_tau",
    "order_agreement",
    "planned_removals",
    "resolve_layers",
]

MetricLike = str | Metric | Callable[..., Any] | None
GREEDY_MODES = ("exact", "lazy", "racing")


# --------------------------------------------------------------------------- helpers


def resolve_layers(graph: ModelGraph, layers: str | Sequence[str] | None) -> list[str]:
    """Layer names from ``"a,b"``, a list, or None (= every conv layer), in model order.

    Raises:
        GraphError: an unknown layer (with close names).
        AblationError: no layer selected.

    Example:
        >>> resolve_layers(graph, "features.4,features.0")  # doctest: +SKIP
        ['features.0', 'features.4']
    """
    if layers is None:
        names = [n for n, info in graph.layers.items() if info.kind == "conv"]
    else:
        if isinstance(layers, str):
            layers = [s.strip() for s in layers.split(",") if s.strip()]
        names = []
        for name in layers:
            graph.layer(name)
            if name not in names:
                names.append(name)
        order = list(graph.layers)
        names.sort(key=order.index)
    if not names:
        raise AblationError("no layer selected")
    return names


def _engine(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
            preset: Preset | None, graph: ModelGraph | None, batch_size: int,
            metric: Metric, engine: AblationEngine | None) -> AblationEngine:
    if engine is not None:
        return engine
    return AblationEngine(model, images, labels, graph=graph, preset=preset,
                          batch_size=batch_size, metric=metric if metric.fn else None)


def _class_names(preset: Preset | None, k: int) -> list[str]:
    if preset is not None and len(preset.class_names) == k:
        return list(preset.class_names)
    return [f"class {i}" for i in range(k)]


# --------------------------------------------------------------------------- CAR scores


@dataclass
class LayerCAR:
    """CAR of the filters of one layer.

    Attributes:
        layer: the layer.
        filters: the filters scored (original indices).
        car: float64 ``[F]``: metric drop when the filter is removed (positive = important).
        loss_car: float64 ``[F]``: increase of the mean cross-entropy (the tie-breaker).
        accuracy_after: float64 ``[F]``: top-1 accuracy without the filter.
        base_metric / base_loss / base_accuracy: the network before removal.
        class_car: float64 ``[F, K]`` per-class top-1 accuracy drop.
        class_loss_car: float64 ``[F, K]`` per-class mean loss increase.
    """

    layer: str
    filters: list[int]
    car: torch.Tensor
    loss_car: torch.Tensor
    accuracy_after: torch.Tensor
    base_metric: float
    base_loss: float
    base_accuracy: float
    class_car: torch.Tensor
    class_loss_car: torch.Tensor

    def ranking(self) -> list[int]:
        """Filters from least to most important (CAR, then loss CAR, then index).

        Example:
            >>> report.layers["features.0"].ranking()[:3]  # doctest: +SKIP
            [17, 3, 25]
        """
        keys = sorted(range(len(self.filters)), key=lambda i: (
            float(self.car[i]), float(self.loss_car[i]), self.filters[i]))
        return [self.filters[i] for i in keys]

    def rank_of(self) -> dict[int, int]:
        """``{filter: rank}``, rank 1 = least important (pruned first)."""
        return {f: r + 1 for r, f in enumerate(self.ranking())}


def _layer_car(layer: str, filters: list[int], stats: AblationStats, metric: Metric) -> LayerCAR:
    counts = stats.class_count.clamp(min=1).double()
    class_acc = stats.class_correct.double() / counts
    base_class_acc = stats.base_class_correct.double() / counts
    class_loss = stats.class_loss / counts
    base_class_loss = stats.base_class_loss / counts
    return LayerCAR(
        layer=layer, filters=filters, car=stats.drop(metric), loss_car=stats.drop("loss"),
        accuracy_after=stats.accuracy(), base_metric=stats.base_metric(metric),
        base_loss=stats.base_metric("loss"), base_accuracy=stats.base_metric("top1"),
        class_car=base_class_acc[None] - class_acc,
        class_loss_car=class_loss - base_class_loss[None],
    )


@dataclass
class CARReport:
    """CAR scores of one or more layers, and how they were measured.

    Attributes:
        layers: ``{layer: LayerCAR}`` in model order.
        metric: the metric's name.
        n_images: scoring images.
        class_names: names of the classes (columns of the class-wise matrices).
        counts: forward passes of the evaluation.
        seconds: wall time.
        model: a label for the model.
    """

    layers: dict[str, LayerCAR]
    metric: str
    n_images: int
    class_names: list[str]
    counts: ForwardCounts
    seconds: float
    model: str = ""

    def rows(self) -> list[dict[str, Any]]:
        """One dict per filter: layer, filter, car, loss_car, accuracy_after, rank."""
        out = []
        for name, lc in self.layers.items():
            rank = lc.rank_of()
            for i, f in enumerate(lc.filters):
                out.append({"layer": name, "filter": f, "car": float(lc.car[i]),
                            "loss_car": float(lc.loss_car[i]),
                            "accuracy_after": float(lc.accuracy_after[i]), "rank": rank[f]})
        return out

    def lowest(self, layer: str, k: int) -> list[int]:
        """The ``k`` least important filters of ``layer`` (one-shot CAR ranking)."""
        return self.layers[layer].ranking()[:k]

    def classwise(self, layer: str) -> ClasswiseCAR:
        """The class-wise CAR of ``layer`` as a :class:`ClasswiseCAR`."""
        lc = self.layers[layer]
        return ClasswiseCAR(layer, lc.filters, lc.class_car, lc.class_loss_car,
                            list(self.class_names))

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary (per-layer base metric and the five least/most important)."""
        layers = {}
        for name, lc in self.layers.items():
            ranking = lc.ranking()
            layers[name] = {
                "filters": len(lc.filters), "base_metric": lc.base_metric,
                "base_accuracy": lc.base_accuracy, "base_loss": lc.base_loss,
                "least_important": ranking[:5], "most_important": ranking[::-1][:5],
                "car_mean": float(lc.car.mean()) if len(lc.filters) else math.nan,
                "car_max": float(lc.car.max()) if len(lc.filters) else math.nan,
                "zero_car_filters": int((lc.car == 0).sum()),
            }
        return {"model": self.model, "metric": self.metric, "n_images": self.n_images,
                "seconds": self.seconds, "forward_passes": self.counts.to_dict(),
                "layers": layers}

    def save(self, path: str | Path) -> Path:
        """Write the scores as CSV (``layer,filter,car,loss_car,accuracy_after,rank``).

        Args:
            path: a ``.csv`` file, or a folder (then ``scores.csv`` inside it).

        Returns:
            the file written.
        """
        target = Path(path)
        if target.suffix.lower() != ".csv":
            target.mkdir(parents=True, exist_ok=True)
            target = target / "scores.csv"
        target.parent.mkdir(parents=True, exist_ok=True)
        rows = self.rows()
        with target.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["layer", "filter", "car", "loss_car",
                                                    "accuracy_after", "rank"])
            writer.writeheader()
            writer.writerows(rows)
        return target


def car_scores(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    layers: str | Sequence[str] | None = None,
    *,
    metric: MetricLike = "top1",
    preset: Preset | None = None,
    graph: ModelGraph | None = None,
    batch_size: int = 100,
    fixed: dict[str, torch.Tensor] | None = None,
    engine: AblationEngine | None = None,
    model_name: str = "",
) -> CARReport:
    """CAR of every filter of the given layers (one removal at a time).

    Args:
        model: the classifier (comes back unchanged).
        images: scoring images, float normalised or uint8 (with ``preset``).
        labels: int64 ``[N]``.
        layers: a layer, ``"a,b"``, a list, or None for every conv layer.
        metric: ``"top1"`` (default), ``"top5"``, ``"loss"`` or a callable / Metric.
        preset: the model's preset (for uint8 images and class names).
        graph: the model's graph (built when omitted).
        batch_size: images per forward pass.
        fixed: removals already made (``{layer: bool keep}``); their filters are not scored.
        engine: reuse an :class:`AblationEngine` built on these images.
        model_name: a label stored in the report.

    Returns:
        a :class:`CARReport` (class-wise matrices included).

    Raises:
        DataError: empty data. GraphError: unknown layer. AblationError: bad masks/metric.

    Example:
        >>> rep = car_scores(model, x, y, "features.0", preset=preset)  # doctest: +SKIP
        >>> rep.lowest("features.0", 5)  # doctest: +SKIP
    """
    m = resolve_metric(metric)
    start = time.perf_counter()
    eng = _engine(model, images, labels, preset, graph, batch_size, m, engine)
    counts = ForwardCounts()
    out: dict[str, LayerCAR] = {}
    for name in resolve_layers(eng.graph, layers):
        info = eng.graph.layer(name)
        own = (fixed or {}).get(name)
        keep = torch.ones(info.out_channels, dtype=torch.bool) if own is None else \
            torch.as_tensor(own).cpu().bool()
        filters = keep.nonzero().reshape(-1).tolist()
        stats = eng.evaluate(name, single_removals(info.out_channels, filters, keep), fixed)
        counts.add(stats.counts)
        out[name] = _layer_car(name, filters, stats, m)
    return CARReport(out, m.name, len(eng.labels), _class_names(preset, eng.num_classes),
                     counts, time.perf_counter() - start, model_name)


# --------------------------------------------------------------------------- class-wise


@dataclass
class ClasswiseCAR:
    """The class-wise CAR matrix of one layer.

    Attributes:
        layer: the layer.
        filters: row labels (original filter indices).
        matrix: float64 ``[F, K]``: per-class top-1 accuracy drop without the filter.
        loss_matrix: float64 ``[F, K]``: per-class mean loss increase (tie-breaker).
        class_names: column labels.
    """

    layer: str
    filters: list[int]
    matrix: torch.Tensor
    loss_matrix: torch.Tensor
    class_names: list[str]

    def _order(self, row: int) -> list[int]:
        return sorted(range(len(self.class_names)), key=lambda c: (
            -float(self.matrix[row, c]), -float(self.loss_matrix[row, c]), c))

    def most_important(self, k: int = 1) -> dict[int, list[str]]:
        """``{filter: the k classes that lose most accuracy without it}``."""
        return {f: [self.class_names[c] for c in self._order(i)[:k]]
                for i, f in enumerate(self.filters)}

    def least_important(self, k: int = 1) -> dict[int, list[str]]:
        """``{filter: the k classes that lose least (or gain most) without it}``."""
        return {f: [self.class_names[c] for c in self._order(i)[::-1][:k]]
                for i, f in enumerate(self.filters)}

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly: matrix rows and each filter's most/least important class."""
        most, least = self.most_important(), self.least_important()
        return {"layer": self.layer, "classes": self.class_names,
                "filters": [{"filter": f, "class_car": [float(v) for v in self.matrix[i]],
                             "most_important": most[f][0], "least_important": least[f][0]}
                            for i, f in enumerate(self.filters)]}

    def save(self, path: str | Path, png: bool = True) -> Path:
        """Write the matrix as CSV (one row per filter) and, by default, a heat map PNG.

        Args:
            path: a ``.csv`` file or a folder (then ``classwise_<layer>.csv`` inside it).
            png: also draw the heat map next to it (``.png``, needs matplotlib).

        Returns:
            the CSV file.
        """
        target = Path(path)
        if target.suffix.lower() != ".csv":
            target.mkdir(parents=True, exist_ok=True)
            target = target / f"classwise_{self.layer}.csv"
        target.parent.mkdir(parents=True, exist_ok=True)
        most, least = self.most_important(), self.least_important()
        with target.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["layer", "filter", *self.class_names, "most_important",
                             "least_important"])
            for i, f in enumerate(self.filters):
                writer.writerow([self.layer, f, *[f"{float(v):.6g}" for v in self.matrix[i]],
                                 most[f][0], least[f][0]])
        if png:
            self.plot(target.with_suffix(".png"))
        return target

    def plot(self, path: str | Path) -> Path:
        """Heat map: filters (rows, ``layer:filter``) × classes (columns), 0 = white.

        Raises:
            ImportError: matplotlib is missing (``pip install netcarve[report]``).
        """
        plt = _pyplot()
        n_f, n_c = self.matrix.shape
        height = min(40.0, max(3.0, 0.16 * n_f + 1.8))
        fig, ax = plt.subplots(figsize=(max(5.0, 0.55 * n_c + 2.5), height))
        data = self.matrix.numpy()
        lim = float(abs(data).max()) or 1e-3
        im = ax.imshow(data, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim,
                       interpolation="nearest")
        ax.set_xticks(range(n_c))
        ax.set_xticklabels(self.class_names, rotation=45, ha="right", fontsize=8)
        step = max(1, math.ceil(n_f / 80))
        ax.set_yticks(range(0, n_f, step))
        ax.set_yticklabels([f"{self.layer}:{f}" for f in self.filters[::step]], fontsize=6)
        ax.set_xlabel("class")
        ax.set_ylabel("filter")
        ax.set_title(f"class-wise CAR of {self.layer} (top-1 accuracy drop per class)",
                     fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02, label="accuracy drop")
        fig.tight_layout()
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=110)
        plt.close(fig)
        return out


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:  # pragma: no cover - matplotlib is in the report extra
        raise ImportError("drawing figures needs matplotlib: pip install 'netcarve[report]'"
                          ) from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def classwise_car(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    layer: str,
    *,
    preset: Preset | None = None,
    graph: ModelGraph | None = None,
    batch_size: int = 100,
    engine: AblationEngine | None = None,
) -> ClasswiseCAR:
    """The ``[filters × classes]`` class-wise CAR matrix of one layer.

    Args:
        model: the classifier (unchanged).
        images: scoring images (float normalised or uint8 with ``preset``).
        labels: int64 ``[N]``; every class should have images (a class without any gets 0).
        layer: the layer.
        preset: the model's preset (class names, uint8 images).
        graph: the model's graph.
        batch_size: images per forward pass.
        engine: reuse an :class:`AblationEngine`.

    Returns:
        a :class:`ClasswiseCAR`.

    Example:
        >>> cw = classwise_car(model, x, y, "features.4", preset=preset)  # doctest: +SKIP
        >>> cw.most_important()[0]  # doctest: +SKIP
        ['Sandal']
    """
    report = car_scores(model, images, labels, [layer], preset=preset, graph=graph,
                        batch_size=batch_size, engine=engine)
    return report.classwise(layer)


# --------------------------------------------------------------------------- greedy


@dataclass
class PruneStep:
    """One greedy removal.

    Attributes:
        layer / filter: what was removed.
        car: its CAR at the time of removal (given all earlier removals).
        loss_car: its loss CAR then.
        accuracy: top-1 accuracy on the scoring images after the removal.
        loss: mean loss after the removal.
        rescored: candidates evaluated at this step.
    """

    layer: str
    filter: int
    car: float
    loss_car: float
    accuracy: float
    loss: float
    rescored: int


@dataclass
class GreedyResult:
    """Outcome of :func:`greedy_prune`.

    Attributes:
        mode: ``"exact"``, ``"lazy"`` or ``"racing"``.
        scope: ``"layer"`` or ``"global"``.
        metric: the CAR metric.
        layers: the layers in scope.
        steps: the removals, in order.
        masks: ``{layer: bool keep}`` after pruning.
        base_accuracy / base_loss: before pruning (scoring images).
        n_images: scoring images.
        evaluations: candidate evaluations (removal × step).
        image_evaluations: (removal, image) pairs scored; exact greedy scores
            ``exact_image_evaluations`` = every remaining candidate on every image each step.
        eliminated: racing only: candidates dropped early by the sign test, over all steps.
        seconds: wall time.
        counts: forward passes.
        stopped: why pruning stopped (``"count"``, ``"floor"``, ``"exhausted"``).
    """

    mode: str
    scope: str
    metric: str
    layers: list[str]
    steps: list[PruneStep]
    masks: dict[str, torch.Tensor]
    base_accuracy: float
    base_loss: float
    n_images: int
    evaluations: int
    seconds: float
    counts: ForwardCounts
    stopped: str = "count"
    window: int | None = None
    refresh: int | None = None
    image_evaluations: int = 0
    exact_image_evaluations: int = 0
    eliminated: int = 0
    delta: float | None = None

    @property
    def saved_fraction(self) -> float:
        """Share of exact greedy's (removal, image) evaluations this run did not need."""
        if not self.exact_image_evaluations:
            return 0.0
        return 1.0 - self.image_evaluations / self.exact_image_evaluations

    @property
    def order(self) -> list[tuple[str, int]]:
        """``[(layer, filter), ...]`` in pruning order."""
        return [(s.layer, s.filter) for s in self.steps]

    def removed(self, layer: str) -> list[int]:
        """Filters of ``layer`` removed, in order."""
        return [s.filter for s in self.steps if s.layer == layer]

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary with the full order."""
        return {
            "mode": self.mode, "scope": self.scope, "metric": self.metric,
            "layers": self.layers, "n_images": self.n_images, "window": self.window,
            "refresh": self.refresh,
            "filters_removed": len(self.steps), "stopped": self.stopped,
            "base_accuracy": self.base_accuracy, "base_loss": self.base_loss,
            "final_accuracy": self.steps[-1].accuracy if self.steps else self.base_accuracy,
            "evaluations": self.evaluations, "image_evaluations": self.image_evaluations,
            "exact_image_evaluations": self.exact_image_evaluations,
            "saved_fraction": self.saved_fraction, "eliminated": self.eliminated,
            "delta": self.delta, "seconds": self.seconds,
            "forward_passes": self.counts.to_dict(),
            "order": [{"layer": s.layer, "filter": s.filter, "car": s.car,
                       "loss_car": s.loss_car, "accuracy": s.accuracy, "loss": s.loss,
                       "rescored": s.rescored} for s in self.steps],
        }

    def save(self, path: str | Path) -> Path:
        """Write the order as CSV (``step,layer,filter,car,loss_car,accuracy,loss``)."""
        target = Path(path)
        if target.suffix.lower() != ".csv":
            target.mkdir(parents=True, exist_ok=True)
            target = target / "order.csv"
        with target.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["step", "layer", "filter", "car", "loss_car", "accuracy", "loss",
                             "rescored"])
            for i, s in enumerate(self.steps, 1):
                writer.writerow([i, s.layer, s.filter, f"{s.car:.6g}", f"{s.loss_car:.6g}",
                                 f"{s.accuracy:.6g}", f"{s.loss:.6g}", s.rescored])
        return target


def planned_removals(graph: ModelGraph, layers: str | Sequence[str],
                     amount: float | int | None, scope: str = "layer") -> int:
    """How many filters :func:`greedy_prune` will remove at most (all of them, with no floor).

    Args:
        graph: the model's channel graph.
        layers: the layers in scope (names or a comma-separated string).
        amount: a count or a ratio as for :func:`greedy_prune` (``None``: all but one per layer).
        scope: ``"layer"`` or ``"global"``.

    Returns:
        the planned number of removals.

    Raises:
        AblationError: a bad amount, or a layer with fewer than two filters.

    Example:
        >>> planned_removals(graph, ["features.0", "features.4"], 0.5)  # doctest: +SKIP
        48
    """
    targets = _targets(graph, resolve_layers(graph, layers), amount, scope)
    return sum(targets.values()) if isinstance(targets, dict) else int(targets)


def _targets(graph: ModelGraph, layers: list[str], amount: float | int | None,
             scope: str) -> dict[str, int] | int:
    """Filters to remove: per layer (scope "layer") or in total (scope "global")."""
    sizes = {n: graph.layer(n).out_channels for n in layers}
    for name, size in sizes.items():
        if size < 2:
            raise AblationError(f"layer {name} has {size} filter; there is nothing to prune")
    if amount is None:
        return {n: s - 1 for n, s in sizes.items()} if scope == "layer" else \
            sum(s - 1 for s in sizes.values())
    if isinstance(amount, bool) or not isinstance(amount, (int, float)):
        raise AblationError(f"amount must be a count (int) or a ratio (float), got {amount!r}")
    if isinstance(amount, float):
        if not 0 < amount < 1:
            raise AblationError(f"a pruning ratio must lie in (0, 1), got {amount}")
        if scope == "layer":
            return {n: max(1, min(s - 1, round(amount * s))) for n, s in sizes.items()}
        total = sum(sizes.values())
        return max(1, min(total - len(sizes), round(amount * total)))
    count = int(amount)
    if count < 1:
        raise AblationError(f"the number of filters to prune must be at least 1, got {count}")
    if scope == "layer":
        for name, size in sizes.items():
            if count > size - 1:
                raise AblationError(f"cannot prune {count} of the {size} filters of {name}: "
                                    "at least one must stay")
        return dict.fromkeys(sizes, count)
    most = sum(s - 1 for s in sizes.values())
    if count > most:
        raise AblationError(f"cannot prune {count} filters from {', '.join(layers)}: at most "
                            f"{most} (one per layer must stay)")
    return count


def greedy_prune(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    layers: str | Sequence[str],
    *,
    amount: int | float | None = None,
    floor: float | None = None,
    mode: str = "exact",
    scope: str = "layer",
    window: int | None = None,
    refresh: int | None = None,
    metric: MetricLike = "top1",
    preset: Preset | None = None,
    graph: ModelGraph | None = None,
    batch_size: int = 100,
    engine: AblationEngine | None = None,
    progress: Callable[[PruneStep], None] | None = None,
    delta: float = 0.01,
    first_images: int = 200,
    seed: int = 0,
) -> GreedyResult:
    """Greedy CAR pruning: remove the lowest-CAR filter, re-score, repeat.

    Args:
        model: the classifier (unchanged; pruning is recorded as masks).
        images: scoring images (float normalised or uint8 with ``preset``).
        labels: int64 ``[N]``.
        layers: the layers in scope.
        amount: filters to remove: an int count, or a ratio in (0, 1) of the filters -- per
            layer for ``scope="layer"``, of all filters in scope for ``scope="global"``.
        floor: stop before top-1 accuracy on the scoring images would fall below this value.
            With no ``amount``, prune until the floor (at most all filters but one per layer).
        mode: ``"exact"`` (re-score every remaining candidate on every image each step),
            ``"lazy"`` (re-score only the ``window`` candidates with the lowest previous CAR)
            or ``"racing"`` (every candidate, but candidates confidently worse than the
            leader stop being scored early: :mod:`netcarve.racing`; top-1/top-5 metrics).
        scope: ``"layer"``: layers one after another, each given the earlier removals;
            ``"global"``: one pool of candidates across the layers.
        window: candidates re-scored per lazy step (default ``max(4, ceil(remaining / 8))``).
        refresh: lazy mode only: re-score every candidate every ``refresh`` steps (default:
            only at the start of each layer / group).
        metric: the CAR metric (ties broken by loss).
        preset: the model's preset.
        graph: the model's graph.
        batch_size: images per forward pass.
        engine: reuse an :class:`AblationEngine` built on these images.
        progress: called after every removal.
        delta: racing: the probability bound, per step, of dropping the candidate exact
            greedy would choose.
        first_images: racing: images in the first round (rounded up to whole chunks).
        seed: racing: the seed of the order in which image chunks are drawn.

    Returns:
        a :class:`GreedyResult` with the order, the masks and the accuracy after each step.

    Raises:
        AblationError: a bad amount (ratio outside (0, 1), a count leaving a layer empty),
            neither amount nor floor, unknown mode or scope.

    Example:
        >>> res = greedy_prune(model, x, y, "features.0", amount=0.5)  # doctest: +SKIP
        >>> res.order[:3]  # doctest: +SKIP
        [('features.0', 12), ('features.0', 30), ('features.0', 7)]
    """
    if mode not in GREEDY_MODES:
        raise AblationError(f"mode must be one of {', '.join(GREEDY_MODES)}, got {mode!r}")
    if scope not in ("layer", "global"):
        raise AblationError(f"scope must be 'layer' or 'global', got {scope!r}")
    if amount is None and floor is None:
        raise AblationError("give an amount (count or ratio) or an accuracy floor")
    m = resolve_metric(metric)
    if mode == "racing" and m.name not in RACING_METRICS:
        raise AblationError(f"racing greedy compares per-image hits, so it needs metric top1 or "
                            f"top5, got {m.name!r}; use mode='lazy' or 'exact'")
    if not 0 < delta < 1:
        raise AblationError(f"delta must lie in (0, 1), got {delta}")
    start = time.perf_counter()
    eng = _engine(model, images, labels, preset, graph, batch_size, m, engine)
    names = resolve_layers(eng.graph, layers)
    targets = _targets(eng.graph, names, amount, scope)
    masks = {n: torch.ones(eng.graph.layer(n).out_channels, dtype=torch.bool) for n in names}
    counts = ForwardCounts()
    steps: list[PruneStep] = []
    state: dict[str, Any] = {"evaluations": 0, "stopped": "count", "image_evaluations": 0,
                             "exact_image_evaluations": 0, "eliminated": 0}
    if mode == "racing":
        gen = torch.Generator().manual_seed(seed)
        state["race"] = (torch.randperm(eng.n_chunks, generator=gen).tolist(),
                         -(-max(1, first_images) // eng.batch_size), delta)
    base_stats = eng.evaluate(names[0], torch.ones(1, masks[names[0]].numel(), dtype=torch.bool))
    counts.add(base_stats.counts)
    base_acc, base_loss = base_stats.base_metric("top1"), base_stats.base_metric("loss")
    groups = [[n] for n in names] if scope == "layer" else [names]
    for group in groups:
        goal = targets[group[0]] if isinstance(targets, dict) else targets
        _greedy_group(eng, group, masks, goal, floor, mode, window, refresh, m, counts, steps,
                      state, progress)
        if state["stopped"] == "floor" and scope == "global":
            break
    if amount is None and state["stopped"] == "count":
        state["stopped"] = "exhausted"  # only a floor was given and it was never reached
    return GreedyResult(
        mode=mode, scope=scope, metric=m.name, layers=names, steps=steps,
        masks={n: k.clone() for n, k in masks.items()}, base_accuracy=base_acc,
        base_loss=base_loss, n_images=len(eng.labels), evaluations=int(state["evaluations"]),
        seconds=time.perf_counter() - start, counts=counts, stopped=str(state["stopped"]),
        window=window if mode == "lazy" else None, refresh=refresh if mode == "lazy" else None,
        image_evaluations=int(state["image_evaluations"]),
        exact_image_evaluations=int(state["exact_image_evaluations"]),
        eliminated=int(state["eliminated"]), delta=delta if mode == "racing" else None,
    )


def _score(eng: AblationEngine, layer: str, filters: list[int], masks: dict[str, torch.Tensor],
           m: Metric, counts: ForwardCounts) -> dict[tuple[str, int], tuple[float, float, float,
                                                                            float]]:
    """``{(layer, filter): (car, loss_car, accuracy_after, loss_after)}`` given ``masks``."""
    if not filters:
        return {}
    keep = masks[layer]
    stats = eng.evaluate(layer, single_removals(keep.numel(), filters, keep), masks)
    counts.add(stats.counts)
    car, loss_car = stats.drop(m), stats.drop("loss")
    acc, loss = stats.accuracy(), stats.loss()
    return {(layer, f): (float(car[i]), float(loss_car[i]), float(acc[i]), float(loss[i]))
            for i, f in enumerate(filters)}


def _greedy_group(eng: AblationEngine, group: list[str], masks: dict[str, torch.Tensor],
                  goal: int, floor: float | None, mode: str, window: int | None,
                  refresh: int | None, m: Metric, counts: ForwardCounts, steps: list[PruneStep],
                  state: dict[str, Any], progress: Callable[[PruneStep], None] | None) -> None:
    stale: dict[tuple[str, int], tuple[float, float, float, float]] = {}
    removed = 0
    while removed < goal:
        remaining = [(n, f) for n in group for f in masks[n].nonzero().reshape(-1).tolist()
                     if int(masks[n].sum()) > 1]
        if not remaining:
            state["stopped"] = "exhausted"
            return
        if mode == "exact" or not stale or (refresh and removed % refresh == 0):
            chosen = remaining
        else:
            w = window or max(4, math.ceil(len(remaining) / 8))
            chosen = sorted(remaining, key=lambda key: (stale[key][0], stale[key][1], key[1]))[:w]
        n_img = len(eng.labels)
        state["exact_image_evaluations"] += len(remaining) * n_img
        state["evaluations"] += len(chosen)
        if mode == "racing":
            order, first, delta = state["race"]
            race = race_step(eng, chosen, masks, m.name, order, first, delta, counts)
            state["image_evaluations"] += race.image_evaluations
            state["eliminated"] += race.eliminated
            best = race.best
            acc, loss = race.top1 / n_img, race.loss_sum / n_img
            car = (race.base_correct - race.correct) / n_img
            loss_car = (race.loss_sum - race.base_loss_sum) / n_img
        else:
            fresh: dict[tuple[str, int], tuple[float, float, float, float]] = {}
            for n in group:
                fresh.update(_score(eng, n, [f for ln, f in chosen if ln == n], masks, m,
                                    counts))
            state["image_evaluations"] += len(chosen) * n_img
            stale.update(fresh)
            best = min(fresh, key=lambda key: (fresh[key][0], fresh[key][1], key[1]))
            car, loss_car, acc, loss = fresh[best]
        if floor is not None and acc < floor:
            state["stopped"] = "floor"
            return
        layer, filt = best
        masks[layer] = masks[layer].clone()
        masks[layer][filt] = False
        stale.pop(best, None)
        step = PruneStep(layer, filt, car, loss_car, acc, loss, len(chosen))
        steps.append(step)
        removed += 1
        if progress is not None:
            progress(step)
    state["stopped"] = "count"


# --------------------------------------------------------------------------- agreement


def kendall_tau(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall's tau-b between two score vectors (ties handled; nan if either is constant).

    Example:
        >>> kendall_tau([1, 2, 3, 4], [1, 3, 2, 4])
        0.6666666666666666
    """
    x = torch.as_tensor(list(a), dtype=torch.float64)
    y = torch.as_tensor(list(b), dtype=torch.float64)
    if x.numel() != y.numel():
        raise ValueError("kendall_tau needs two vectors of the same length")
    dx = torch.sign(x[:, None] - x[None, :])
    dy = torch.sign(y[:, None] - y[None, :])
    upper = torch.triu(torch.ones_like(dx, dtype=torch.bool), diagonal=1)
    s = float((dx * dy)[upper].sum())
    nx = float((dx != 0)[upper].sum())
    ny = float((dy != 0)[upper].sum())
    if nx == 0 or ny == 0:
        return math.nan
    return s / math.sqrt(nx * ny)


def order_agreement(a: Sequence[tuple[str, int]], b: Sequence[tuple[str, int]],
                    ) -> dict[str, float]:
    """How far two pruning orders agree.

    Every filter pruned by either order gets its position in each order (filters an order did
    not prune share the last rank in it); the result holds Kendall's tau-b between the two
    position vectors, tau-b over the filters both orders pruned (``kendall_tau_common``), the
    overlap of the pruned sets (|A ∩ B| / |A ∪ B|) and the fraction of steps that removed the
    same filter.

    Example:
        >>> order_agreement([("l", 1), ("l", 2)], [("l", 1), ("l", 2)])["kendall_tau"]
        1.0
    """
    union = list(dict.fromkeys([*a, *b]))
    pos_a = {k: i for i, k in enumerate(a)}
    pos_b = {k: i for i, k in enumerate(b)}
    ra = [pos_a.get(k, len(a)) for k in union]
    rb = [pos_b.get(k, len(b)) for k in union]
    same_steps = sum(1 for x, y in zip(a, b, strict=False) if x == y)
    common = [k for k in a if k in pos_b]
    inter = len(common)
    return {
        "kendall_tau": kendall_tau(ra, rb) if len(union) > 1 else 1.0,
        "kendall_tau_common": kendall_tau([pos_a[k] for k in common],
                                          [pos_b[k] for k in common])
        if inter > 1 else math.nan,
        "overlap": inter / len(union) if union else 1.0,
        "same_step_fraction": same_steps / max(1, min(len(a), len(b))),
        "n_a": float(len(a)),
        "n_b": float(len(b)),
    }


# --------------------------------------------------------------------------- compression


@dataclass
class CompressionReport:
    """Greedy CAR pruning, the physically smaller model and (optionally) fine-tuning.

    Attributes:
        greedy: the :class:`GreedyResult`.
        pruned: the :class:`~netcarve.compress.PrunedModel`.
        accuracy_before: top-1 of the original model on the evaluation images.
        accuracy_pruned: of the pruned model before fine-tuning.
        accuracy_finetuned: after fine-tuning (None when not fine-tuned).
        finetune: the fine-tuning record (``FinetuneResult.to_dict()``), or None.
    """

    greedy: GreedyResult
    pruned: Any
    accuracy_before: float
    accuracy_pruned: float
    accuracy_finetuned: float | None = None
    finetune: dict[str, Any] | None = None
    n_eval: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary."""
        return {"greedy": self.greedy.to_dict(), "pruned_model": self.pruned.to_dict(),
                "eval_images": self.n_eval, "accuracy_before": self.accuracy_before,
                "accuracy_pruned": self.accuracy_pruned,
                "accuracy_finetuned": self.accuracy_finetuned, "finetune": self.finetune,
                **self.extra}

    def save(self, directory: str | Path, spec: str | None = None) -> Path:
        """Write ``order.csv``, ``compression.json`` and the model (``pruned/``)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self.greedy.save(out / "order.csv")
        self.pruned.save(out / "pruned", spec=spec)
        (out / "compression.json").write_text(json.dumps(self.to_dict(), indent=2))
        return out


def car_compress(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    layers: str | Sequence[str],
    *,
    eval_images: torch.Tensor,
    eval_labels: torch.Tensor,
    amount: int | float | None = None,
    floor: float | None = None,
    mode: str = "exact",
    scope: str = "layer",
    window: int | None = None,
    metric: MetricLike = "top1",
    preset: Preset | None = None,
    batch_size: int = 100,
    finetune_epochs: int = 0,
    lr: float = 0.01,
    finetune_images: torch.Tensor | None = None,
    finetune_labels: torch.Tensor | None = None,
    seed: int = 0,
    spec: str | None = None,
) -> CompressionReport:
    """Greedy CAR pruning → physically smaller model → optional fine-tuning, all measured.

    Args:
        model: the classifier (unchanged).
        images / labels: scoring images for the greedy decisions.
        layers: layers in scope (each must be prunable, see
            :func:`netcarve.compress.prunable_layers`).
        eval_images / eval_labels: evaluation images for the reported accuracies.
        amount / floor / mode / scope / window / metric: see :func:`greedy_prune`.
        preset: the model's preset (needed for uint8 images).
        batch_size: images per forward pass.
        finetune_epochs: fine-tune the pruned model this many epochs (0 = no).
        lr: fine-tuning learning rate.
        finetune_images / finetune_labels: fine-tuning data (default: the preset's train
            split).
        seed: seeds fine-tuning.
        spec: how to rebuild the base model when saving.

    Returns:
        a :class:`CompressionReport`.

    Raises:
        CompressError: a layer in scope is not prunable. AblationError: bad amount.

    Example:
        >>> rep = car_compress(model, x, y, "features.0", eval_images=xt, eval_labels=yt,
        ...                    amount=0.5, preset=preset)  # doctest: +SKIP
    """
    from netcarve.compress import CompressError, prunable_layers, prune_filters
    from netcarve.evaluation import evaluate

    eng = AblationEngine(model, images, labels, preset=preset, batch_size=batch_size)
    names = resolve_layers(eng.graph, layers)
    why = prunable_layers(model, eng.graph)
    bad = {n: why[n] for n in names if why[n] is not None}
    if bad:
        ok = [n for n, w in why.items() if w is None]
        first = next(iter(bad))
        raise CompressError(f"layer {first} has no filters that can be removed physically: "
                            f"{bad[first]}. Prunable layers: {', '.join(ok) or 'none'}")
    greedy = greedy_prune(model, images, labels, names, amount=amount, floor=floor, mode=mode,
                          scope=scope, window=window, metric=metric, preset=preset,
                          engine=eng)
    check = eval_images[:8]
    if check.dtype == torch.uint8 and preset is not None:
        check = preset.normalize(check)
    device, dtype = next(((p.device, p.dtype) for p in model.parameters()),
                         (torch.device("cpu"), torch.float32))
    pruned = prune_filters(model, greedy.masks, graph=eng.graph,
                           check_input=check.to(device=device, dtype=dtype), spec=spec,
                           order=greedy.order)
    eval_preset = preset or Preset(1, 1, (0.0,), (1.0,))
    before = evaluate(model, eval_images, eval_labels, eval_preset, batch_size=batch_size,
                      device=device).accuracy
    after = evaluate(pruned.module, eval_images, eval_labels, eval_preset,
                     batch_size=batch_size, device=device).accuracy
    report = CompressionReport(greedy, pruned, before, after, n_eval=len(eval_labels))
    if finetune_epochs > 0:
        from netcarve.finetune import finetune

        if preset is None and finetune_images is None:
            raise AblationError("fine-tuning needs a preset or fine-tuning images")
        result = finetune(pruned.module, preset=preset, epochs=finetune_epochs, lr=lr,
                          seed=seed, images=finetune_images, labels=finetune_labels,
                          eval_images=eval_images, eval_labels=eval_labels, inplace=True,
                          batch_size=128)
        report.accuracy_finetuned = result.accuracy_after
        report.finetune = result.to_dict()
    return report
