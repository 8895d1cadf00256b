"""Sub-feature circuits: split a feature's images into groups and carve, from within the
general circuit, one sparser circuit per group that preserves the feature on that group.

Groups are given by the user or found automatically: per-image kernel-score vectors over the
general circuit's kernels → PCA → k-means. Each group's images are split in two halves
(seeded): one half scores, the other measures, so own-group and other-group preservation are
both measured on images no circuit was scored on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from netcarve.circuits.circuit import Circuit, CircuitError, count, select_top_k
from netcarve.circuits.extract import extract, measure_preservation, score_kernels
from netcarve.circuits.preservation import Preservation
from netcarve.core.graph import ModelGraph
from netcarve.core.targets import Target
from netcarve.data.stream import Images, in_memory


@dataclass
class SubcircuitReport:
    """General circuit, the groups, one sub-circuit per group, and how they relate.

    Attributes:
        general: the circuit for the whole feature.
        groups: group label per input image.
        subcircuits: one circuit per group (masks within ``general``'s masks).
        preservation: ``preservation[i][j]``: sub-circuit i measured on group j's held-out half.
        iou: ``{layer: [[IoU of sub-circuits i and j]]}`` over kept kernels.
        method: ``"given"`` or ``"pca+kmeans"``.
    """

    general: Circuit
    groups: list[int]
    subcircuits: list[Circuit]
    preservation: list[list[Preservation]]
    iou: dict[str, list[list[float]]]
    method: str
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """JSON-friendly summary."""
        kept_general = max(self.general.kept_kernels, 1)
        n = len(self.subcircuits)
        subs = []
        for i, sc in enumerate(self.subcircuits):
            own = self.preservation[i][i]
            others = [self.preservation[i][j] for j in range(n) if j != i]
            subs.append({
                "group": i,
                "images": self.groups.count(i),
                "kept_kernels": sc.kept_kernels,
                "keep_vs_general": sc.kept_kernels / kept_general,
                "keep_vs_model": sc.effective_keep,
                "collapsed": sc.collapsed,
                "own_group": own.to_dict(),
                "other_groups": [p.to_dict() for p in others],
            })
        return {
            "target": str(self.general.target),
            "method": self.method,
            "general": self.general.summary(),
            "subcircuits": subs,
            "iou_per_layer": self.iou,
            **self.extra,
        }


def per_image_scores(
    model: nn.Module,
    graph: ModelGraph,
    target: Target,
    images: Images,
    kernels: dict[str, torch.Tensor],
    *,
    criterion: str = "actgrad",
) -> torch.Tensor:
    """One score vector per image over the given kernels: ``float [N, #kernels]``."""
    rows = []
    for i in range(len(images)):
        scores = score_kernels(model, graph, target, images[i : i + 1], criterion=criterion,
                               relevant=kernels, batch_size=1)
        rows.append(torch.cat([scores[n][m] for n, m in kernels.items()]))
    return torch.stack(rows)


def find_groups(features: torch.Tensor, n_groups: int, *, components: int = 10,
                seed: int = 0) -> list[int]:
    """Cluster rows of ``features``: standardise, PCA to ``components`` dimensions, k-means.

    Raises:
        CircuitError: fewer rows than groups, or scikit-learn missing.
    """
    if len(features) < n_groups:
        raise CircuitError(f"need at least {n_groups} images to find {n_groups} groups")
    labels, _ = fit_groups(features, n_groups, components=components, seed=seed)
    return [int(v) for v in labels]


def _unit_rows(features: torch.Tensor | np.ndarray) -> np.ndarray:
    x = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
    # Normalise each image's vector: groups should differ in which kernels matter, not in
    # how strongly the image drives the feature overall.
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def fit_groups(features: torch.Tensor | np.ndarray, n_groups: int, *, components: int = 10,
               seed: int = 0) -> tuple[np.ndarray, Callable[[Any], np.ndarray]]:
    """Fit the grouping :func:`find_groups` uses (unit-length rows, PCA, k-means).

    Returns:
        the rows' labels and a function that assigns new rows with the fitted PCA and
        k-means (no re-clustering).

    Raises:
        CircuitError: scikit-learn missing.
    """
    try:
        from sklearn.cluster import KMeans
        from sklearn.decomposition import PCA
    except ImportError as exc:  # pragma: no cover - the extra is installed by the set-up
        raise CircuitError("finding groups needs scikit-learn: pip install 'netcarve[cluster]'") \
            from exc
    x = _unit_rows(features)
    k = max(1, min(components, x.shape[0] - 1, x.shape[1]))
    pca = PCA(n_components=k, random_state=seed)
    km = KMeans(n_clusters=n_groups, n_init=10, random_state=seed)
    labels = km.fit_predict(pca.fit_transform(x)).astype(int)

    def assign(new: Any) -> np.ndarray:
        return km.predict(pca.transform(_unit_rows(new))).astype(int)

    return labels, assign


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else 1.0


def subcircuits(
    model: nn.Module,
    target: Target | str,
    images: torch.Tensor,
    *,
    groups: Sequence[int] | None = None,
    n_groups: int = 2,
    general: Circuit | None = None,
    criterion: str = "actgrad",
    keep: float = 0.2,
    sub_keep: float = 0.5,
    components: int = 10,
    batch_size: int = 64,
    seed: int = 0,
    graph: ModelGraph | None = None,
) -> SubcircuitReport:
    """Extract one sub-circuit per image group from within the general circuit.

    Args:
        model: the model (restored afterwards).
        target: the feature (``Target`` or ``"layer:channel"``).
        images: normalised images ``[N, C, H, W]``, or a stream read once into memory (the
            groups index them; each group is split into a scoring and a
            held-out half).
        groups: a group label per image; when omitted, groups are found with PCA + k-means
            on per-image kernel-score vectors.
        n_groups: number of groups to find.
        general: the general circuit (extracted from ``images`` with ``keep`` when omitted).
        criterion: saliency criterion.
        keep: keep fraction of the general circuit (of the relevant kernels).
        sub_keep: keep fraction of each sub-circuit relative to the general circuit's kernels.
        components: PCA dimensions when finding groups.
        batch_size: images per batch.
        seed: seeds the split and the clustering.
        graph: a prebuilt graph.

    Returns:
        A :class:`SubcircuitReport`.

    Raises:
        CircuitError: bad keep values, a group with fewer than 2 images, wrong label count.

    Example:
        >>> rep = subcircuits(model, "features.10:5", x, n_groups=2)  # doctest: +SKIP
        >>> rep.summary()["subcircuits"][0]["own_group"]["pearson"]  # doctest: +SKIP
    """
    images, _ = in_memory(images)
    if not 0 < sub_keep <= 1:
        raise CircuitError(f"sub_keep must be in (0, 1], got {sub_keep}")
    p = next(model.parameters())
    images = images.to(dtype=p.dtype)
    graph = graph or ModelGraph.build(model, images[:1].to(p.device))
    target = (Target.parse(target) if isinstance(target, str) else target).resolve(graph)
    if general is None:
        general = extract(model, target, images, criterion=criterion, keep=keep,
                          batch_size=batch_size, seed=seed, graph=graph)
    if general.collapsed or general.kept_kernels == 0:
        raise CircuitError("the general circuit collapsed: raise keep before splitting it")
    method = "given"
    if groups is None:
        feats = per_image_scores(model, graph, target, images, general.masks,
                                 criterion=criterion)
        groups = find_groups(feats, n_groups, components=components, seed=seed)
        method = "pca+kmeans"
    groups = [int(g) for g in groups]
    if len(groups) != len(images):
        raise CircuitError(f"{len(groups)} group labels for {len(images)} images")
    labels = sorted(set(groups))
    gen = torch.Generator().manual_seed(seed)
    halves = []
    for g in labels:
        idx = torch.tensor([i for i, v in enumerate(groups) if v == g])
        if len(idx) < 2:
            raise CircuitError(f"group {g} has {len(idx)} image(s); each group needs at least 2")
        idx = idx[torch.randperm(len(idx), generator=gen)]
        halves.append((idx[: len(idx) // 2], idx[len(idx) // 2 :]))
    k = max(1, round(sub_keep * general.kept_kernels))
    subs: list[Circuit] = []
    for (score_idx, held_idx), g in zip(halves, labels, strict=True):
        scores = score_kernels(model, graph, target, images[score_idx], criterion=criterion,
                               keep=keep * sub_keep, relevant=general.masks,
                               batch_size=batch_size, seed=seed)
        raw = select_top_k(scores, general.masks, k)
        masks, collapsed = graph.effective_mask(raw, target.layer, target.channels)
        subs.append(Circuit(
            target=target, criterion=criterion, keep=keep * sub_keep, masks=masks,
            scores=scores, relevant=general.relevant, selected=count(raw), collapsed=collapsed,
            metadata={**general.metadata, "group": g, "sub_keep": sub_keep,
                      "scoring_images": len(score_idx), "heldout_images": len(held_idx)},
        ))
    preservation = [
        [measure_preservation(model, graph, target, sc.masks, images[held])
         for _, held in halves]
        for sc in subs
    ]
    for sc, row, i in zip(subs, preservation, range(len(subs)), strict=True):
        sc.preservation = row[i]
    iou = {
        layer: [[_iou(a.masks[layer], b.masks[layer]) for b in subs] for a in subs]
        for layer in general.masks
    }
    return SubcircuitReport(general, groups, subs, preservation, iou, method,
                            extra={"sub_keep": sub_keep, "general_keep": general.keep})
