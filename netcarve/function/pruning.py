"""Functionality-oriented pruning: prune the repeats of every cluster and compare with magnitude
pruning at the same number of filters (physically smaller models, accuracy before and after
fine-tuning, optionally refitting the next layer by least squares)."""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from netcarve.core._csv import write_rows
from netcarve.core.graph import ModelGraph
from netcarve.data.preset import Preset

if TYPE_CHECKING:
    from netcarve.surgery.pruned import PrunedModel

from netcarve.data.stream import Images, in_memory
from netcarve.function.clustering import (
    FilterClusters,
    cka_similarity,
    cluster_filters,
    filter_similarity,
    keep_representatives,
    plot_clusters,
)
from netcarve.function.descriptors import (
    FilterDescriptors,
    FunctionalError,
    _as_inputs,
    _check_descriptors,
    _device_dtype,
    _graph_for,
    class_preference,
    describe_filters,
)

__all__ = [
    "KEEP_RULES",
    "FunctionalPruning",
    "LayerPruning",
    "PruningComparison",
    "compare_pruning",
    "filter_importance",
    "functional_prune",
    "magnitude_masks",
]

KEEP_RULES: tuple[str, ...] = ("l1", "mean_activation", "apoz", "taylor", "car",
                               "class_preference")
"""Importance criteria for the keep rule (the most important member of a cluster stays):
``l1`` weight L1 norm, ``mean_activation`` / ``apoz`` / ``taylor`` as in
:mod:`netcarve.car.baselines`, ``car`` the CAR rank (:func:`netcarve.car.car_scores`),
``class_preference`` the filter's summed class preference."""


# --------------------------------------------------------------------------- importance


def filter_importance(
    model: nn.Module,
    layer: str,
    rule: str = "l1",
    *,
    images: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    preset: Preset | None = None,
    descriptors: FilterDescriptors | None = None,
    graph: ModelGraph | None = None,
    batch_size: int = 128,
) -> torch.Tensor:
    """Importance of every filter of ``layer`` by a keep rule (higher = more important).

    Args:
        model: the classifier (comes back unchanged).
        layer: the layer.
        rule: one of :data:`KEEP_RULES`.
        images / labels: scoring data (data-driven rules; labels for ``taylor`` and ``car``).
        preset: the model's preset.
        descriptors: measured descriptors (``class_preference`` reuses them).
        graph: the model's graph.
        batch_size: images per pass.

    Returns:
        float64 ``[out_channels]``.

    Raises:
        FunctionalError: unknown rule, or missing data for it.

    Example:
        >>> filter_importance(lm.model, "features.4", "l1").shape  # doctest: +SKIP
        torch.Size([64])
    """
    if rule not in KEEP_RULES:
        raise FunctionalError(f"unknown keep rule {rule!r}; use one of {', '.join(KEEP_RULES)}")
    if rule == "class_preference":
        if descriptors is not None and descriptors.class_preference is not None:
            return descriptors.class_preference.sum(dim=1).double()
        if images is None:
            raise FunctionalError("the class_preference keep rule needs probe images")
        return class_preference(model, layer, images, preset=preset,
                                batch_size=batch_size).sum(dim=1)
    if rule == "car":
        if images is None or labels is None:
            raise FunctionalError("the car keep rule needs images and labels")
        from netcarve.car.scores import car_scores

        report = car_scores(model, images, labels, [layer], preset=preset, graph=graph,
                            batch_size=batch_size)
        ranks = report.layers[layer].rank_of()
        scores = torch.zeros(len(ranks), dtype=torch.float64)
        for f, r in ranks.items():
            scores[f] = float(r)
        return scores
    from netcarve.car.baselines import baseline_scores

    if rule != "l1" and images is None:
        raise FunctionalError(f"the {rule} keep rule needs probe images")
    if rule == "taylor" and labels is None:
        raise FunctionalError("the taylor keep rule needs labels")
    return baseline_scores(model, layer, rule, images=images, labels=labels, preset=preset,
                           graph=graph, batch_size=batch_size).double()


# --------------------------------------------------------------------------- pruning


@dataclass
class LayerPruning:
    """Functional pruning of one layer.

    Attributes:
        layer: the layer.
        similarity: ``[C, C]`` the similarity that was clustered.
        clusters: the partition.
        importance: ``[C]`` the keep rule's scores.
        keep: bool ``[C]``, True = kept (one per cluster).
        descriptors: the descriptors (None with CKA-only similarity).
    """

    layer: str
    similarity: torch.Tensor
    clusters: FilterClusters
    importance: torch.Tensor
    keep: torch.Tensor
    descriptors: FilterDescriptors | None = None

    @property
    def removed(self) -> list[int]:
        """Pruned filters (ascending)."""
        return torch.nonzero(~self.keep).flatten().tolist()

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary of the layer's clusters and what was kept."""
        groups = self.clusters.groups()
        return {
            "layer": self.layer,
            "filters": len(self.keep),
            "kept": int(self.keep.sum()),
            "removed": self.removed,
            "clusters": self.clusters.to_dict(),
            "representatives": [next(m for m in g if bool(self.keep[m])) for g in groups],
            "largest_cluster": max(len(g) for g in groups),
            "mean_within_cluster_similarity": _within(self.similarity, groups),
        }


def _within(similarity: torch.Tensor, groups: list[list[int]]) -> float | None:
    vals = []
    for g in groups:
        if len(g) > 1:
            sub = similarity[g][:, g]
            n = len(g)
            vals.append(float((sub.sum() - sub.diagonal().sum()) / (n * (n - 1))))
    return sum(vals) / len(vals) if vals else None


@dataclass
class FunctionalPruning:
    """Result of :func:`functional_prune`: per layer, the clusters and the filters kept.

    Attributes:
        layers: ``{layer: LayerPruning}`` in the order given.
        settings: descriptors, similarity, method, threshold/k, keep rule, probe size, seed.
        seconds: wall time.

    Example:
        >>> fop.masks()  # doctest: +SKIP
        {'features.4': tensor([True, False, ...])}
    """

    layers: dict[str, LayerPruning]
    settings: dict[str, Any]
    seconds: float = 0.0

    def masks(self) -> dict[str, torch.Tensor]:
        """``{layer: bool [out_channels]}``, True = kept (for :mod:`netcarve.surgery.pruned`)."""
        return {name: lp.keep.clone() for name, lp in self.layers.items()}

    def removed_counts(self) -> dict[str, int]:
        """Filters removed per layer."""
        return {name: len(lp.removed) for name, lp in self.layers.items()}

    def summary(self) -> dict[str, Any]:
        """JSON-friendly summary (what ``summary.json`` holds)."""
        return {"settings": self.settings, "seconds": self.seconds,
                "filters_removed": sum(self.removed_counts().values()),
                "layers": [lp.to_dict() for lp in self.layers.values()]}

    def save(self, directory: str | Path) -> dict[str, Path]:
        """Write ``clusters.json``, ``clusters.csv`` and one similarity PNG per layer.

        Returns:
            ``{name: path}`` of the files written.
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        files = {"clusters_json": out / "clusters.json", "clusters_csv": out / "clusters.csv"}
        files["clusters_json"].write_text(json.dumps(self.summary(), indent=2))
        with files["clusters_csv"].open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["layer", "filter", "cluster", "kept", "importance"])
            for name, lp in self.layers.items():
                for f in range(len(lp.keep)):
                    w.writerow([name, f, int(lp.clusters.labels[f]), int(lp.keep[f]),
                                f"{float(lp.importance[f]):.6g}"])
        for name, lp in self.layers.items():
            files[f"similarity_{name}"] = plot_clusters(lp, out / f"clusters_{name}.png")
        return files


def functional_prune(
    model: nn.Module,
    layers: str | Sequence[str],
    images: Images,
    labels: torch.Tensor | None = None,
    *,
    preset: Preset | None = None,
    descriptors: str | Sequence[str] = ("profile", "class_preference"),
    similarity: str = "cosine",
    method: str = "agglomerative",
    threshold: float | None = 0.8,
    k: int | None = None,
    k_range: tuple[int, int] | None = None,
    keep_rule: str = "l1",
    am_steps: int = 128,
    max_cka_images: int = 256,
    batch_size: int = 128,
    seed: int = 0,
    graph: ModelGraph | None = None,
) -> FunctionalPruning:
    """Functionality-oriented pruning: cluster each layer's filters by function and keep the
    most important member of every cluster.

    Every layer is analysed on the original model (layers do not see each other's pruning).

    Args:
        model: the classifier (comes back unchanged).
        layers: layer names (a list, or a comma-separated string).
        images: probe images (normalised, or uint8 with ``preset``), or a stream read once
            into memory.
        labels: their labels (needed by the ``taylor`` and ``car`` keep rules).
        preset: the model's preset.
        descriptors: descriptor kinds for cosine similarity (see :data:`DESCRIPTORS`).
        similarity: ``"cosine"`` (on the descriptors) or ``"cka"`` (on activation maps).
        method: ``"agglomerative"`` or ``"kmeans"`` (see :func:`cluster_filters`).
        threshold: similarity threshold for agglomerative clustering, in [-1, 1].
        k: number of clusters (instead of a threshold / silhouette search).
        k_range: silhouette search range for k-means.
        keep_rule: importance criterion, one of :data:`KEEP_RULES`.
        am_steps: activation-maximisation steps (when ``"am"`` is a descriptor).
        max_cka_images: probe images used for CKA.
        batch_size: images per forward pass.
        seed: seeds activation maximisation and k-means.
        graph: the model's graph.

    Returns:
        a :class:`FunctionalPruning`.

    Raises:
        GraphError: unknown layer. FunctionalError: bad similarity, threshold, k, keep rule,
        descriptors or data.

    Example:
        >>> fop = functional_prune(lm.model, "features.4,features.7", x, y,
        ...                        preset=lm.preset, threshold=0.85)  # doctest: +SKIP
        >>> fop.removed_counts()  # doctest: +SKIP
        {'features.4': 21, 'features.7': 17}
    """
    images, labels = in_memory(images, labels)
    start = time.perf_counter()
    names = [s.strip() for s in layers.split(",")] if isinstance(layers, str) else list(layers)
    names = [n for n in names if n]
    if not names:
        raise FunctionalError("name at least one layer to prune")
    if similarity not in ("cosine", "cka"):
        raise FunctionalError(f"similarity must be 'cosine' or 'cka', got {similarity!r}")
    if keep_rule not in KEEP_RULES:
        raise FunctionalError(f"unknown keep rule {keep_rule!r}; use one of "
                              f"{', '.join(KEEP_RULES)}")
    kinds = _check_descriptors(descriptors)
    if method == "agglomerative" and k is None and (
            threshold is None or not isinstance(threshold, (int, float))
            or not (math.isfinite(threshold) and -1.0 <= threshold <= 1.0)):
        raise FunctionalError(f"threshold must be a similarity in [-1, 1], got {threshold!r}")
    x = _as_inputs(images, preset)
    graph = _graph_for(model, x, graph)
    for name in names:
        graph.layer(name)
    result: dict[str, LayerPruning] = {}
    for name in names:
        desc = None
        if similarity == "cosine":
            desc = describe_filters(model, name, x, descriptors=kinds, preset=preset,
                                    am_steps=am_steps, seed=seed, batch_size=batch_size,
                                    graph=graph)
            sim = filter_similarity(desc)
        else:
            sim = cka_similarity(model, name, x, max_images=max_cka_images,
                                 batch_size=batch_size)
        clusters = cluster_filters(sim, method=method, threshold=threshold, k=k,
                                   k_range=k_range, seed=seed)
        importance = filter_importance(model, name, keep_rule, images=x, labels=labels,
                                       preset=preset, descriptors=desc, graph=graph,
                                       batch_size=batch_size)
        keep = keep_representatives(clusters, importance)
        result[name] = LayerPruning(name, sim, clusters, importance, keep, desc)
    settings = {"layers": names, "descriptors": kinds if similarity == "cosine" else [],
                "similarity": similarity, "method": method,
                "threshold": threshold if k is None else None, "k": k,
                "k_range": list(k_range) if k_range else None, "keep_rule": keep_rule,
                "probe_images": len(x), "seed": seed}
    return FunctionalPruning(result, settings, time.perf_counter() - start)


def magnitude_masks(
    model: nn.Module,
    counts: dict[str, int],
) -> dict[str, torch.Tensor]:
    """Masks that remove, per layer, the ``counts[layer]`` filters with the smallest weight
    L1 norm (Li et al.; ties by index) -- the baseline at the same filter counts.

    Args:
        model: the model.
        counts: ``{layer: filters to remove}``.

    Returns:
        ``{layer: bool [out_channels]}``, True = kept.

    Raises:
        FunctionalError: a count is negative or not below the layer's filter count.
        GraphError: unknown layer.

    Example:
        >>> magnitude_masks(lm.model, {"features.0": 8})["features.0"].sum()  # doctest: +SKIP
        tensor(24)
    """
    from netcarve.car.baselines import baseline_order, baseline_scores

    out = {}
    for layer, n in counts.items():
        scores = baseline_scores(model, layer, "l1")
        if not 0 <= int(n) < len(scores):
            raise FunctionalError(f"cannot remove {n} of the {len(scores)} filters of {layer}")
        keep = torch.ones(len(scores), dtype=torch.bool)
        keep[baseline_order(scores)[: int(n)]] = False
        out[layer] = keep
    return out


# --------------------------------------------------------------------------- comparison


def _fold_of(fold: str | dict[str, str], method: str) -> str:
    """The fold for one method (a single fold for all, or one per method name)."""
    from netcarve.surgery.fold import FOLDS

    chosen = fold.get(method, "none") if isinstance(fold, dict) else fold
    if chosen not in FOLDS:
        raise FunctionalError(f"unknown fold {chosen!r} for {method!r}; use one of "
                              f"{', '.join(FOLDS)}")
    return chosen


def _fold_probe(fold: str | dict[str, str], methods: Sequence[str],
                fold_images: torch.Tensor | None, train_images: torch.Tensor | None,
                preset: Preset, device: torch.device, dtype: torch.dtype,
                ) -> torch.Tensor | None:
    """Normalised probe images for the least-squares fold (None when no method folds).

    Default: the first 1,000 training images (never the evaluation images)."""
    if all(_fold_of(fold, m) == "none" for m in methods):
        return None
    if fold_images is None:
        if train_images is not None:
            fold_images = train_images[:1000]
        else:
            from netcarve.training.evaluation import reference_data

            fold_images, _ = reference_data(preset, "train", limit=1000)
    return _as_inputs(fold_images, preset).to(device=device, dtype=dtype)



@dataclass
class PruningComparison:
    """Pruned networks of several methods at the same filter counts, before and after
    fine-tuning.

    Attributes:
        rows: one dict per method: filters removed, parameters and multiply-adds before and
            after (and the fraction removed), accuracy of the original, of the pruned network
            before fine-tuning and after it.
        pruned: ``{method: PrunedModel}`` (the smaller models before fine-tuning).
        finetuned: ``{method: nn.Module}`` after fine-tuning (absent without fine-tuning).
        settings: fine-tuning settings and data sizes.
    """

    rows: list[dict[str, Any]]
    pruned: dict[str, PrunedModel] = field(default_factory=dict)
    finetuned: dict[str, nn.Module] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly: rows and settings."""
        return {"settings": self.settings, "methods": self.rows}

    def save_csv(self, path: str | Path) -> Path:
        """One row per method."""
        return write_rows(path, self.rows)


def compare_pruning(
    model: nn.Module,
    masks: dict[str, dict[str, torch.Tensor]],
    *,
    preset: Preset,
    eval_images: torch.Tensor,
    eval_labels: torch.Tensor,
    train_images: torch.Tensor | None = None,
    train_labels: torch.Tensor | None = None,
    finetune_epochs: int = 1,
    finetune_lr: float = 0.01,
    max_train_images: int | None = None,
    finetune_batch_size: int = 128,
    seed: int = 0,
    graph: ModelGraph | None = None,
    fold: str | dict[str, str] = "lstsq",
    fold_images: torch.Tensor | None = None,
    ridge: float = 1e-2,
) -> PruningComparison:
    """Build the physically smaller network of every method and measure it.

    For every method: :func:`netcarve.surgery.prune.prune_filters` (parameters and multiply-adds
    before/after), top-1 accuracy on the evaluation images before fine-tuning, then
    :func:`netcarve.training.finetune.finetune` with the same recipe and seed for every method,
    and the accuracy after it.

    Args:
        model: the original classifier (comes back unchanged).
        masks: ``{method: {layer: bool keep}}``, e.g. ``{"functional": fop.masks(),
            "magnitude": magnitude_masks(model, fop.removed_counts())}``.
        preset: the model's preset.
        eval_images / eval_labels: evaluation data (uint8 or normalised).
        train_images / train_labels: fine-tuning data (default: the preset's train split).
        finetune_epochs: 0 skips fine-tuning.
        finetune_lr: peak learning rate.
        max_train_images: fine-tune on the first N training images per epoch.
        finetune_batch_size: images per step.
        seed: seeds fine-tuning.
        graph: the model's graph.
        fold: ``"lstsq"`` (refit the layers after the pruned ones by least squares, see
            :mod:`netcarve.surgery.fold`), ``"none"`` (the papers' drop), or ``{method: fold}``
            (methods not named: ``"none"``).
        fold_images: probe images of the fold (uint8 or normalised; default: the first
            1,000 training images). Keep them apart from ``eval_images``.
        ridge: the fold's relative ridge penalty.

    Returns:
        a :class:`PruningComparison` (every row says its ``fold``).

    Raises:
        CompressError: a layer cannot be pruned physically. FinetuneError / DataError: bad
        fine-tuning settings or data.

    Example:
        >>> cmp = compare_pruning(lm.model, {"functional": m1, "magnitude": m2},
        ...                       preset=lm.preset, eval_images=xt, eval_labels=yt)
        ...     # doctest: +SKIP
    """
    from netcarve.surgery.prune import prune_filters
    from netcarve.training.evaluation import evaluate
    from netcarve.training.finetune import finetune

    if int(finetune_epochs) < 0:
        raise FunctionalError(f"finetune_epochs must be >= 0, got {finetune_epochs}")
    device, dtype = _device_dtype(model)
    example = _as_inputs(eval_images[:2], preset).to(device=device, dtype=dtype)
    graph = graph or ModelGraph.build(model, example[:1])
    base_acc = evaluate(model, eval_images, eval_labels, preset, device=device).accuracy
    probe = _fold_probe(fold, list(masks), fold_images, train_images, preset, device, dtype)
    result = PruningComparison(rows=[], settings={
        "finetune_epochs": int(finetune_epochs), "finetune_lr": finetune_lr,
        "max_train_images": max_train_images, "eval_images": len(eval_images), "seed": seed,
        "fold_images": None if probe is None else len(probe), "ridge": ridge})
    for method, mask in masks.items():
        how = _fold_of(fold, method)
        pruned = prune_filters(model, mask, graph=graph, example_input=example, fold=how,
                               fold_images=probe, ridge=ridge)
        acc_pruned = evaluate(pruned.module, eval_images, eval_labels, preset,
                              device=device).accuracy
        row: dict[str, Any] = {
            "method": method, "fold": how,
            "filters_removed": {k: len(v) for k, v in pruned.removed.items()},
            "params_before": pruned.params_before, "params_after": pruned.params_after,
            "params_removed": 1 - pruned.params_after / max(1, pruned.params_before),
            "macs_before": pruned.macs_before, "macs_after": pruned.macs_after,
            "macs_removed": 1 - pruned.macs_after / max(1, pruned.macs_before),
            "accuracy_original": base_acc, "accuracy_pruned": acc_pruned,
            "accuracy_finetuned": None, "finetune_seconds": None,
        }
        result.pruned[method] = pruned
        if finetune_epochs:
            ft = finetune(pruned.module, preset=preset, epochs=int(finetune_epochs),
                          lr=finetune_lr, seed=seed, images=train_images, labels=train_labels,
                          max_images=max_train_images, batch_size=finetune_batch_size,
                          eval_images=eval_images, eval_labels=eval_labels)
            row["accuracy_finetuned"] = ft.accuracy_after
            row["finetune_seconds"] = ft.seconds
            result.finetuned[method] = ft.model
        result.rows.append(row)
    return result
