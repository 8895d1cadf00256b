"""CAR scores of every filter of some layers: ``CAR_i = metric(net) - metric(net without i)``.

:func:`car_scores` runs the ablation engine once per layer on the scoring images and returns
a :class:`CARReport` (per layer: the CARs, accuracies and losses without each filter, and the
order from least to most important; ties in accuracy broken by the loss, then by index).

**Class-wise CAR** (:func:`classwise_car`) is the ``[filters x classes]`` matrix of per-class
top-1 accuracy drops; a filter's most (least) important class is the one whose accuracy falls
most (least) without it, ties broken by the per-class loss."""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from netcarve.car.engine import AblationEngine
from netcarve.car.naive import single_removals
from netcarve.car.stats import AblationError, AblationStats, ForwardCounts, Metric, resolve_metric
from netcarve.core.graph import ModelGraph
from netcarve.core.plotting import pyplot, save_figure
from netcarve.data.preset import Preset

__all__ = ["CARReport", "ClasswiseCAR", "LayerCAR", "car_scores", "classwise_car", "resolve_layers"]

MetricLike = str | Metric | Callable[..., Any] | None


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
    images: torch.Tensor | Any,
    labels: torch.Tensor | None,
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
        images: scoring images, float normalised or uint8 (with ``preset``), or a stream
            (DataLoader / iterable of ``(images, labels)`` batches) read once per layer and
            evaluated one bounded chunk at a time (:func:`~netcarve.car.streamed.evaluate_stream`).
        labels: int64 ``[N]`` (None for a stream).
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
    if engine is None and not isinstance(images, torch.Tensor):
        return _streamed_scores(model, images, layers, m, preset, graph, batch_size, fixed,
                                model_name, start)
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


def _streamed_scores(model: nn.Module, images: Any, layers: str | Sequence[str] | None,
                     m: Metric, preset: Preset | None, graph: ModelGraph | None,
                     batch_size: int, fixed: dict[str, torch.Tensor] | None, model_name: str,
                     start: float) -> CARReport:
    """:func:`car_scores` over a stream: each layer's removals in one pass, chunk by chunk."""
    from netcarve.car.streamed import evaluate_stream
    from netcarve.data.stream import as_stream

    stream = as_stream(images, preset=preset)
    if graph is None:
        param = next(model.parameters())
        graph = ModelGraph.build(model, stream.first(device=param.device, dtype=param.dtype))
    counts = ForwardCounts()
    out: dict[str, LayerCAR] = {}
    n = k = 0
    for name in resolve_layers(graph, layers):
        info = graph.layer(name)
        own = (fixed or {}).get(name)
        keep = torch.ones(info.out_channels, dtype=torch.bool) if own is None else \
            torch.as_tensor(own).cpu().bool()
        filters = keep.nonzero().reshape(-1).tolist()
        stats = evaluate_stream(model, name, single_removals(info.out_channels, filters, keep),
                                stream, graph=graph, preset=preset, fixed=fixed,
                                batch_size=batch_size, metric=m if m.fn else None)
        counts.add(stats.counts)
        out[name] = _layer_car(name, filters, stats, m)
        n, k = stats.n, stats.num_classes
    return CARReport(out, m.name, n, _class_names(preset, k), counts,
                     time.perf_counter() - start, model_name)


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
        plt = pyplot()
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
        return save_figure(fig, path, dpi=110)



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
