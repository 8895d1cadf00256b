"""Which filters repeat each other: similarity of descriptors and clusters of filters.

:func:`filter_similarity` is the cosine of (by default mean-centred) descriptor vectors averaged
over descriptors, :func:`cka_similarity` linear CKA of activation maps; :func:`cluster_filters`
merges filters agglomeratively (average linkage, while similarity >= threshold) or by k-means on
an embedding of the similarity with ``k`` chosen by the silhouette score;
:func:`keep_representatives` keeps the most important member of every cluster."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from netcarve.core.hooks import preserved_state
from netcarve.data.preset import Preset
from netcarve.function.descriptors import (
    FilterDescriptors,
    FunctionalError,
    _as_inputs,
    _check_descriptors,
    _cosine_matrix,
    _device_dtype,
    _relative,
)

if TYPE_CHECKING:  # pruning builds on clustering; only the type is needed here
    from netcarve.function.pruning import LayerPruning

from netcarve.core.plotting import pyplot, save_figure

__all__ = [
    "FilterClusters",
    "cka_similarity",
    "cluster_filters",
    "filter_similarity",
    "keep_representatives",
    "plot_clusters",
]


# --------------------------------------------------------------------------- similarity


def filter_similarity(
    descriptors: FilterDescriptors,
    *,
    use: str | Sequence[str] | None = None,
    relative: bool = True,
    center: bool = True,
) -> torch.Tensor:
    """Filter × filter cosine similarity, averaged over descriptor kinds.

    Args:
        descriptors: measured descriptors.
        use: kinds to use (default: all measured).
        relative: first z-score every descriptor feature (an image of the profile, a class of
            the class preference, a pixel of the AM image) over the layer's filters, so a
            filter is described relative to the layer's average filter. Without it, what all
            filters share dominates: every filter responds more to bright, large objects, and
            ``|∂p_c/∂z|`` is large for every filter on classes the model is unsure about, so
            raw class-preference vectors of a trained layer have cosine ≈ 0.98 on median.
        center: subtract each vector's mean before the cosine (the Pearson correlation).

    Returns:
        float64 ``[C, C]``, symmetric, 1 on the diagonal; a filter with a constant descriptor
        has similarity 0 to the others.

    Raises:
        FunctionalError: a requested kind was not measured.

    Example:
        >>> filter_similarity(d, use="class_preference").shape  # doctest: +SKIP
        torch.Size([64, 64])
    """
    kinds = descriptors.kinds if use is None else _check_descriptors(use)
    if not kinds:
        raise FunctionalError("no descriptors measured")
    mats = []
    for kind in kinds:
        v = descriptors.vectors(kind)
        mats.append(_cosine_matrix(_relative(v) if relative else v, center=center))
    return torch.stack(mats).mean(dim=0)


@torch.no_grad()
def cka_similarity(
    model: nn.Module,
    layer: str,
    images: torch.Tensor,
    *,
    preset: Preset | None = None,
    max_images: int = 256,
    batch_size: int = 128,
) -> torch.Tensor:
    """Linear CKA between the activation maps of every pair of filters of ``layer``.

    Filter ``o`` is represented by ``X_o``: images × positions of its raw output, centred over
    images. With ``K_o = X_o X_oᵀ`` (images × images),
    ``CKA(o, o') = ⟨K_o, K_o'⟩ / (‖K_o‖ ‖K_o'‖)``, which is invariant to scaling a filter and
    to rotations of its spatial features.

    Args:
        model: the model (comes back unchanged).
        layer: a conv or linear layer.
        images: probe images (normalised, or uint8 with ``preset``); the first ``max_images``
            are used (memory grows with ``filters × images²``).
        preset: the model's preset.
        max_images: cap on probe images.
        batch_size: images per forward pass.

    Returns:
        float64 ``[C, C]`` in [0, 1], 1 on the diagonal (0 for a filter whose map is constant).

    Raises:
        GraphError: unknown layer. FunctionalError: no images.

    Example:
        >>> cka_similarity(lm.model, "features.4", x[:128]).shape  # doctest: +SKIP
        torch.Size([64, 64])
    """
    from netcarve.core.hooks import stop_at

    x = _as_inputs(images, preset)[: int(max_images)]
    device, dtype = _device_dtype(model)
    maps = []
    with preserved_state(model):
        model.eval()
        with stop_at(model, layer) as run:
            for lo in range(0, len(x), batch_size):
                z = run(x[lo : lo + batch_size].to(device=device, dtype=dtype)).double()
                maps.append(z.reshape(z.shape[0], z.shape[1], -1).cpu())
    z = torch.cat(maps)  # [N, C, P]
    z = z - z.mean(dim=0, keepdim=True)
    grams = torch.einsum("ncp,mcp->cnm", z, z).reshape(z.shape[1], -1)
    norms = grams.norm(dim=1, keepdim=True)
    unit = grams / norms.clamp(min=1e-300)
    sim = (unit @ unit.T).clamp(0.0, 1.0)
    sim.fill_diagonal_(1.0)
    return sim


# --------------------------------------------------------------------------- clustering


@dataclass
class FilterClusters:
    """A partition of a layer's filters into functional groups.

    Attributes:
        labels: int64 ``[C]`` cluster id of each filter; ids are numbered in order of their
            lowest member, so the labels are canonical.
        method: ``"agglomerative"`` or ``"kmeans"``.
        threshold: the similarity threshold (agglomerative), or None.
        silhouette: silhouette score of the partition (None when undefined, e.g. one cluster).
        silhouette_by_k: for k-means with automatic k, the score of every k tried.

    Example:
        >>> FilterClusters(torch.tensor([0, 1, 0]), "kmeans").groups()
        [[0, 2], [1]]
    """

    labels: torch.Tensor
    method: str
    threshold: float | None = None
    silhouette: float | None = None
    silhouette_by_k: dict[int, float] = field(default_factory=dict)

    @property
    def n_clusters(self) -> int:
        """Number of clusters."""
        return int(self.labels.max()) + 1 if len(self.labels) else 0

    def groups(self) -> list[list[int]]:
        """Members of every cluster (ascending), cluster by cluster."""
        return [torch.nonzero(self.labels == k).flatten().tolist()
                for k in range(self.n_clusters)]

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly description."""
        return {"method": self.method, "threshold": self.threshold,
                "n_clusters": self.n_clusters, "silhouette": self.silhouette,
                "silhouette_by_k": {str(k): v for k, v in self.silhouette_by_k.items()},
                "groups": self.groups()}


def _canonical(labels: Sequence[int]) -> torch.Tensor:
    mapping: dict[int, int] = {}
    out = []
    for lab in labels:
        mapping.setdefault(int(lab), len(mapping))
        out.append(mapping[int(lab)])
    return torch.tensor(out, dtype=torch.int64)


def _embedding(similarity: torch.Tensor) -> torch.Tensor:
    """Points whose Gram matrix is (the PSD part of) ``similarity``."""
    values, vectors = torch.linalg.eigh(similarity)
    keep = values > values.max().clamp(min=0) * 1e-9
    return vectors[:, keep] * values[keep].sqrt()


def _silhouette(distance: torch.Tensor, labels: torch.Tensor) -> float | None:
    """Mean silhouette width from a precomputed distance matrix (None if k < 2 or k = n)."""
    n = len(labels)
    k = int(labels.max()) + 1
    if k < 2 or k >= n:
        return None
    onehot = F.one_hot(labels, k).double()  # [n, k]
    sizes = onehot.sum(0)
    mean_to = distance @ onehot  # [n, k] summed distance to each cluster
    own = labels
    own_size = sizes[own]
    a = mean_to.gather(1, own[:, None]).squeeze(1) / (own_size - 1).clamp(min=1)
    other = mean_to / sizes[None, :]
    other = other.scatter(1, own[:, None], float("inf"))
    b = other.min(dim=1).values
    s = (b - a) / torch.maximum(a, b).clamp(min=1e-300)
    s = torch.where(own_size > 1, s, torch.zeros_like(s))  # singletons score 0
    return float(s.mean())


def _check_similarity(similarity: torch.Tensor) -> torch.Tensor:
    s = torch.as_tensor(similarity).double()
    if s.dim() != 2 or s.shape[0] != s.shape[1] or s.shape[0] == 0:
        raise FunctionalError(f"similarity must be a non-empty square matrix, got shape "
                              f"{tuple(s.shape)}")
    if not bool(torch.isfinite(s).all()):
        raise FunctionalError("the similarity matrix has NaN or infinite entries")
    return (s + s.T) / 2


def cluster_filters(
    similarity: torch.Tensor,
    *,
    method: str = "agglomerative",
    threshold: float | None = 0.8,
    k: int | None = None,
    k_range: tuple[int, int] | None = None,
    seed: int = 0,
) -> FilterClusters:
    """Group filters that do the same job.

    Args:
        similarity: ``[C, C]`` filter similarity (cosine or CKA; 1 = identical function).
        method: ``"agglomerative"``: average linkage on ``1 − similarity``; filters are merged
            while the average similarity between two groups is at least ``threshold`` (or the
            tree is cut into ``k`` clusters when ``k`` is given). ``"kmeans"``: k-means on an
            embedding whose Gram matrix is the similarity, with ``k`` given or chosen in
            ``k_range`` by the best silhouette score.
        threshold: similarity in [-1, 1] (agglomerative without ``k``).
        k: number of clusters, in [1, C].
        k_range: ``(k_min, k_max)`` for the silhouette search (default ``(2, C − 1)``).
        seed: seeds k-means.

    Returns:
        a :class:`FilterClusters`.

    Raises:
        FunctionalError: unknown method, threshold outside [-1, 1] or NaN, bad ``k`` or
            ``k_range``, a non-square or non-finite similarity.

    Example:
        >>> s = torch.tensor([[1.0, 0.95, 0.1], [0.95, 1.0, 0.2], [0.1, 0.2, 1.0]])
        >>> cluster_filters(s, threshold=0.9).groups()
        [[0, 1], [2]]
    """
    s = _check_similarity(similarity)
    n = s.shape[0]
    if method not in ("agglomerative", "kmeans"):
        raise FunctionalError(f"unknown clustering method {method!r}; use 'agglomerative' or "
                              "'kmeans'")
    if k is not None and not (1 <= int(k) <= n):
        raise FunctionalError(f"k must be between 1 and the number of filters ({n}), got {k}")
    distance = (1.0 - s).clamp(min=0.0)
    distance.fill_diagonal_(0.0)
    if method == "agglomerative":
        if k is None and (threshold is None or not isinstance(threshold, (int, float)) or not (
                math.isfinite(threshold) and -1.0 <= threshold <= 1.0)):
            raise FunctionalError(
                f"threshold must be a similarity in [-1, 1] (filters at least this similar are "
                f"merged), got {threshold!r}")
        if n == 1:
            labels = torch.zeros(1, dtype=torch.int64)
        else:
            from scipy.cluster.hierarchy import cut_tree, fcluster, linkage
            from scipy.spatial.distance import squareform

            tree = linkage(squareform(distance.numpy(), checks=False), method="average")
            if k is not None:  # exactly k clusters, following the merge order (also on ties)
                raw = cut_tree(tree, n_clusters=int(k)).reshape(-1)
            else:
                assert threshold is not None
                # merge while average distance <= 1 - threshold (a tiny slack for rounding)
                raw = fcluster(tree, t=1.0 - float(threshold) + 1e-12, criterion="distance")
            labels = _canonical(raw.tolist())
        return FilterClusters(labels, method, None if k is not None else float(threshold),
                              _silhouette(distance, labels))
    # k-means
    from sklearn.cluster import KMeans

    points = _embedding(s).numpy()
    if k is not None:
        candidates = [int(k)]
    else:
        lo, hi = k_range if k_range is not None else (2, n - 1)
        if not (2 <= lo <= hi <= n - 1):
            raise FunctionalError(f"k_range must satisfy 2 <= k_min <= k_max <= C - 1 = {n - 1}"
                                  f" for the silhouette search, got {(lo, hi)}")
        candidates = list(range(int(lo), int(hi) + 1))
    best: tuple[float, torch.Tensor] | None = None
    scores: dict[int, float] = {}
    for kk in candidates:
        km = KMeans(n_clusters=kk, n_init=10, random_state=seed).fit(points)
        labels = _canonical(km.labels_.tolist())
        score = _silhouette(distance, labels)
        if score is not None:
            scores[kk] = score
        if best is None or (score is not None and score > best[0]):
            best = (score if score is not None else -math.inf, labels)
    assert best is not None
    labels = best[1]
    return FilterClusters(labels, method, None, _silhouette(distance, labels),
                          scores if k is None else {})


def keep_representatives(clusters: FilterClusters, importance: torch.Tensor) -> torch.Tensor:
    """Keep the most important filter of every cluster; prune the others.

    Args:
        clusters: the partition.
        importance: ``[C]`` scores, higher = more important (ties: the lower index wins).

    Returns:
        bool ``[C]``, True = kept; exactly one True per cluster.

    Raises:
        FunctionalError: ``importance`` has the wrong length or NaNs.

    Example:
        >>> keep_representatives(FilterClusters(torch.tensor([0, 0, 1]), "kmeans"),
        ...                      torch.tensor([0.1, 0.5, 0.2])).tolist()
        [False, True, True]
    """
    imp = torch.as_tensor(importance).double().flatten()
    if imp.shape[0] != len(clusters.labels) or bool(torch.isnan(imp).any()):
        raise FunctionalError(f"importance must be {len(clusters.labels)} finite scores")
    keep = torch.zeros(len(imp), dtype=torch.bool)
    for members in clusters.groups():
        vals = imp[members]
        best = members[int(torch.nonzero(vals == vals.max()).flatten()[0])]
        keep[best] = True
    return keep


def plot_clusters(lp: LayerPruning, path: str | Path) -> Path:
    """A PNG: the similarity matrix with filters ordered by cluster (kept filters marked),
    and, when activation-maximisation images were measured, the members of the largest
    clusters side by side.

    Returns:
        the path written.
    """
    plt = pyplot()

    groups = sorted(lp.clusters.groups(), key=lambda g: (-len(g), g[0]))
    order = [m for g in groups for m in g]
    sim = lp.similarity[order][:, order].numpy()
    am = lp.descriptors.am_images if lp.descriptors is not None else None
    multi = [g for g in groups if len(g) > 1][:6]
    show_am = am is not None and bool(multi)
    width = max(len(g) for g in multi) if show_am else 0
    fig = plt.figure(figsize=(5.2 + (1.0 * min(width, 8) if show_am else 0), 4.6))
    grid = fig.add_gridspec(max(len(multi), 1), 2 if show_am else 1,
                            width_ratios=[5.2, 1.0 * min(width, 8)] if show_am else [1])
    ax = fig.add_subplot(grid[:, 0])
    im = ax.imshow(sim, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    edges = [0]
    for g in groups:
        edges.append(edges[-1] + len(g))
    for e in edges[1:-1]:
        ax.axhline(e - 0.5, color="k", linewidth=0.3)
        ax.axvline(e - 0.5, color="k", linewidth=0.3)
    kept_pos = [i for i, m in enumerate(order) if bool(lp.keep[m])]
    ax.scatter(kept_pos, [-1.5] * len(kept_pos), marker="v", s=6, color="k", clip_on=False)
    ax.set_title(f"{lp.layer}: {len(lp.keep)} filters, {lp.clusters.n_clusters} clusters, "
                 f"{int(lp.keep.sum())} kept (▼)", fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    if show_am:
        assert am is not None
        cmap = "gray" if am.shape[1] == 1 else None
        for r, g in enumerate(multi):
            sub = grid[r, 1].subgridspec(1, min(width, 8), wspace=0.05)
            for j, m in enumerate(g[:8]):
                a = fig.add_subplot(sub[0, j])
                img = am[m].permute(1, 2, 0).numpy()
                a.imshow(img[:, :, 0] if img.shape[2] == 1 else img, cmap=cmap, vmin=0, vmax=1)
                a.set_title(f"{m}{'*' if bool(lp.keep[m]) else ''}", fontsize=6, pad=1)
                a.axis("off")
    return save_figure(fig, path, dpi=120, bbox_inches="tight")
