"""Functionality-oriented filter pruning: what each filter does, which filters repeat each
other, pruning the repetitions, and how fine-tuning changes the survivors ("defection").

Pipeline (each step is a function a notebook user can call on its own)::

    describe_filters ──► filter_similarity / cka_similarity ──► cluster_filters
        ──► keep_representatives (most important member per cluster) ──► masks
        ──► compare_pruning (physically smaller model, accuracy before/after fine-tuning,
            against magnitude pruning of the same number of filters)
        ──► defection (descriptor drift of the surviving filters under fine-tuning)

**Descriptors** of a filter ``o`` of a layer (its raw output map ``z_o``, before any following
activation), measured on a probe set of images:

* ``"am"``: its activation-maximisation image (:func:`netcarve.featureviz.visualize`),
  flattened (compared pixel by pixel, so the same pattern at another phase or place counts as
  different: use it together with the other two);
* ``"profile"``: the activation profile, the mean of ``z_o`` over positions for every probe
  image (a vector over images);
* ``"class_preference"``: for every class ``c`` the mean over probe images and positions of
  ``|∂p_c/∂z_o|``, with ``p = softmax(logits)`` (:func:`class_preference`). One backward pass
  per class and batch gives it for every filter of the layer at once.

**Similarity**: the cosine similarity of descriptor vectors (by default of mean-centred
vectors, i.e. the Pearson correlation, so that a shared offset does not make every pair
similar), averaged over the chosen descriptors; or linear CKA between the filters' activation
maps (:func:`cka_similarity`). **Clustering**: agglomerative (average linkage on
``1 − similarity``, merged while the similarity stays at least ``threshold``) or k-means on
an embedding whose Gram matrix is the similarity, with ``k`` chosen by the silhouette score.
**Keep rule**: in every cluster the most important member by a criterion (weight L1 by
default; see :data:`KEEP_RULES`) stays; the rest is pruned.

Removal semantics are the project's (:func:`netcarve.hooks.apply_filter_masks`): a removed
filter outputs exactly 0 after its BatchNorm. The physically smaller model comes from
:func:`netcarve.compress.prune_filters`, fine-tuning from :func:`netcarve.finetune.finetune`,
the L1 baseline from :func:`netcarve.baselines.baseline_scores`.

Example:
    >>> from netcarve.zoo import load_model
    >>> from netcarve.evaluation import reference_data
    >>> lm = load_model("fmnist_vgg")
    >>> x, y = reference_data(lm.preset, "train", limit=256)
    >>> fop = functional_prune(lm.model, ["features.4"], x, y, preset=lm.preset,
    ...                        threshold=0.9)  # doctest: +SKIP
    >>> fop.masks()["features.4"].sum()  # doctest: +SKIP
"""

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
import torch.nn.functional as F
from torch import nn

from ._csv import write_rows
from .data.stream import Images, as_stream
from .errors import NetcarveError
from .graph import ModelGraph
from .hooks import preserved_state, resolve_module
from .zoo.preset import Preset

if TYPE_CHECKING:
    from .compress import PrunedModel

__all__ = [
    "DESCRIPTORS",
    "KEEP_RULES",
    "DefectionReport",
    "FilterClusters",
    "FilterDescriptors",
    "FunctionalError",
    "FunctionalPruning",
    "LayerPruning",
    "PruningComparison",
    "cka_similarity",
    "class_preference",
    "cluster_filters",
    "compare_pruning",
    "defection",
    "describe_filters",
    "filter_importance",
    "filter_similarity",
    "functional_prune",
    "keep_representatives",
    "magnitude_masks",
    "plot_clusters",
]

DESCRIPTORS: tuple[str, ...] = ("am", "profile", "class_preference")
"""Descriptor kinds: activation-maximisation image, activation profile, class preference."""

KEEP_RULES: tuple[str, ...] = ("l1", "mean_activation", "apoz", "taylor", "car",
                               "class_preference")
"""Importance criteria for the keep rule (the most important member of a cluster stays):
``l1`` weight L1 norm, ``mean_activation`` / ``apoz`` / ``taylor`` as in
:mod:`netcarve.baselines`, ``car`` the CAR rank (:func:`netcarve.car.car_scores`),
``class_preference`` the filter's summed class preference."""


class FunctionalError(NetcarveError):
    """Bad arguments for functional pruning (thresholds, k, descriptors, keep rules, data)."""


# --------------------------------------------------------------------------- helpers


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters(), None)
    return (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)


def _as_inputs(images: torch.Tensor, preset: Preset | None) -> torch.Tensor:
    """Normalised float images (uint8 images are normalised with the preset)."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or len(images) == 0:
        raise FunctionalError("need a non-empty [N, C, H, W] image tensor")
    if images.dtype == torch.uint8:
        if preset is None:
            raise FunctionalError("uint8 images need the model's preset to be normalised")
        return preset.normalize(images)
    return images.float()


def _graph_for(model: nn.Module, images: torch.Tensor, graph: ModelGraph | None) -> ModelGraph:
    if graph is not None:
        return graph
    device, dtype = _device_dtype(model)
    return ModelGraph.build(model, images[:1].to(device=device, dtype=dtype))


def _relative(vectors: torch.Tensor) -> torch.Tensor:
    """Every feature (column) z-scored over the filters (rows); constant columns become 0."""
    v = vectors.double()
    std = v.std(dim=0, keepdim=True) if v.shape[0] > 1 else torch.zeros_like(v[:1])
    return torch.where(std > 0, (v - v.mean(dim=0, keepdim=True)) / std.clamp(min=1e-300),
                       torch.zeros_like(v))


def _cosine_matrix(a: torch.Tensor, b: torch.Tensor | None = None, *, center: bool = True
                   ) -> torch.Tensor:
    """Cosine similarity of the rows of ``a`` with the rows of ``b`` (default ``a``).

    A zero row has similarity 0 with everything (1 with itself when ``b`` is None)."""
    x = a.double()
    y = x if b is None else b.double()
    if center:
        x = x - x.mean(dim=1, keepdim=True)
        y = y - y.mean(dim=1, keepdim=True)
    xn = x / x.norm(dim=1, keepdim=True).clamp(min=1e-300)
    yn = y / y.norm(dim=1, keepdim=True).clamp(min=1e-300)
    sim = (xn @ yn.T).clamp(-1.0, 1.0)
    if b is None:
        sim.fill_diagonal_(1.0)
    return sim


# --------------------------------------------------------------------------- descriptors


def class_preference(
    model: nn.Module,
    layer: str,
    images: Images,
    *,
    preset: Preset | None = None,
    batch_size: int = 128,
    graph: ModelGraph | None = None,
) -> torch.Tensor:
    """Class-preference vectors of every filter of ``layer``: mean ``|∂p_c/∂z_o|``.

    ``z_o`` is filter ``o``'s raw output map (before any following activation) and
    ``p = softmax(logits)``. The value for ``(o, c)`` is the mean over images and positions of
    ``|∂p_c/∂z_o|``. For every batch one forward pass runs, the layer's output becomes a leaf
    of the autograd graph (nothing before the layer is differentiated), and one backward pass
    per class gives the gradient for every filter at once.

    Args:
        model: the classifier (comes back unchanged).
        layer: a conv or linear layer.
        images: probe images, normalised floats or uint8 (with ``preset``), or a stream of
            them (DataLoader or iterable of batches, read once).
        preset: the model's preset (for uint8 images).
        batch_size: images per forward pass.
        graph: the model's graph (only used to check the layer name).

    Returns:
        float64 CPU ``[out_channels, classes]``.

    Raises:
        GraphError: unknown layer (close names listed).
        FunctionalError: no images, or the model does not return ``[N, classes]`` logits.

    Example:
        >>> class_preference(lm.model, "features.4", x, preset=lm.preset).shape
        ...     # doctest: +SKIP
        torch.Size([64, 10])
    """
    if isinstance(images, torch.Tensor):
        _as_inputs(images, preset)  # the tensor checks and their messages
    stream = as_stream(images, preset=preset)
    if graph is not None:
        graph.layer(layer)
    module = resolve_module(model, layer)
    device, dtype = _device_dtype(model)
    box: dict[str, torch.Tensor] = {}

    def hook(mod: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        leaf = out.detach().requires_grad_(True)
        box["z"] = leaf
        return leaf.clone()  # not a leaf: a following in-place ReLU may overwrite it

    total: torch.Tensor | None = None
    seen = 0
    with preserved_state(model), torch.enable_grad():
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        handle = module.register_forward_hook(hook)
        try:
            for xb in stream.images(batch_size, device=device, dtype=dtype):
                seen += len(xb)
                logits = model(xb)
                if logits.dim() != 2:
                    raise FunctionalError(f"the model returns shape {tuple(logits.shape)}, "
                                          "not [N, classes] logits")
                probs = logits.float().softmax(dim=1)
                z = box["z"]
                rows = []
                for c in range(probs.shape[1]):
                    (g,) = torch.autograd.grad(probs[:, c].sum(), z, retain_graph=True)
                    g = g.abs().reshape(g.shape[0], g.shape[1], -1).mean(dim=2)
                    rows.append(g.sum(dim=0).double().cpu())
                part = torch.stack(rows, dim=1)
                total = part if total is None else total + part
        finally:
            handle.remove()
    if total is None:
        raise FunctionalError("no probe images: the stream yielded no batch")
    return total / seen


def _class_preference_loop(model: nn.Module, layer: str, images: torch.Tensor, *,
                           preset: Preset | None = None, batch_size: int = 128) -> torch.Tensor:
    """Reference implementation, one filter at a time: for every filter, every batch and every
    class, a forward pass in which only that filter's output map is a leaf, and a backward.
    Same result as :func:`class_preference`; used by the tests and the speed benchmark."""
    x_all = _as_inputs(images, preset)
    module = resolve_module(model, layer)
    device, dtype = _device_dtype(model)
    box: dict[str, Any] = {}

    def hook(mod: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        o = box["filter"]
        leaf = out[:, o].detach().requires_grad_(True)
        box["z"] = leaf
        parts = [out[:, :o].detach(), leaf[:, None], out[:, o + 1 :].detach()]
        return torch.cat(parts, dim=1)

    result = []
    with preserved_state(model), torch.enable_grad():
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        handle = module.register_forward_hook(hook)
        try:
            n_filters = None
            o = 0
            while n_filters is None or o < n_filters:
                box["filter"] = o
                acc: torch.Tensor | None = None
                for lo in range(0, len(x_all), batch_size):
                    xb = x_all[lo : lo + batch_size].to(device=device, dtype=dtype)
                    probs = model(xb).float().softmax(dim=1)
                    vals = []
                    for c in range(probs.shape[1]):
                        (g,) = torch.autograd.grad(probs[:, c].sum(), box["z"],
                                                   retain_graph=True)
                        vals.append(g.abs().reshape(g.shape[0], -1).mean(dim=1).sum().double())
                    part = torch.stack(vals).cpu()
                    acc = part if acc is None else acc + part
                    if n_filters is None:
                        weight = getattr(module, "weight", None)
                        n_filters = int(weight.shape[0]) if weight is not None else 1
                assert acc is not None
                result.append(acc / len(x_all))
                o += 1
        finally:
            handle.remove()
    return torch.stack(result)


@dataclass
class FilterDescriptors:
    """What the filters of one layer do.

    Attributes:
        layer: the layer.
        channels: the filters described (indices in the model they were measured on).
        profile: ``[C, N]`` mean raw response per probe image, or None.
        class_preference: ``[C, classes]`` mean ``|∂p_c/∂z_o|``, or None.
        am_images: ``[C, channels, H, W]`` activation-maximisation images in [0, 1], or None.
        metadata: probe size, steps, seconds per descriptor.

    Example:
        >>> d.vectors("class_preference").shape  # doctest: +SKIP
        torch.Size([64, 10])
    """

    layer: str
    channels: list[int]
    profile: torch.Tensor | None = None
    class_preference: torch.Tensor | None = None
    am_images: torch.Tensor | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def kinds(self) -> list[str]:
        """The descriptor kinds present, in :data:`DESCRIPTORS` order."""
        present = {"am": self.am_images, "profile": self.profile,
                   "class_preference": self.class_preference}
        return [k for k in DESCRIPTORS if present[k] is not None]

    def vectors(self, kind: str) -> torch.Tensor:
        """One row per filter: ``[C, D]`` float64 for descriptor ``kind``.

        Raises:
            FunctionalError: unknown kind, or not measured.
        """
        if kind not in DESCRIPTORS:
            raise FunctionalError(f"unknown descriptor {kind!r}; use one of "
                                  f"{', '.join(DESCRIPTORS)}")
        value = {"am": self.am_images, "profile": self.profile,
                 "class_preference": self.class_preference}[kind]
        if value is None:
            raise FunctionalError(f"the {kind!r} descriptor was not measured for {self.layer}")
        return value.reshape(value.shape[0], -1).double()

    def select(self, rows: Sequence[int]) -> FilterDescriptors:
        """The descriptors of some rows (positions in :attr:`channels`), in that order."""
        idx = torch.as_tensor(list(rows), dtype=torch.long)

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.index_select(0, idx)

        return FilterDescriptors(self.layer, [self.channels[i] for i in idx.tolist()],
                                 pick(self.profile), pick(self.class_preference),
                                 pick(self.am_images), dict(self.metadata))


def _check_descriptors(descriptors: str | Sequence[str]) -> list[str]:
    kinds = [descriptors] if isinstance(descriptors, str) else list(descriptors)
    kinds = [k.strip() for k in kinds if k.strip()]
    unknown = [k for k in kinds if k not in DESCRIPTORS]
    if unknown or not kinds:
        raise FunctionalError(f"unknown descriptor(s) {unknown or kinds}; use some of "
                              f"{', '.join(DESCRIPTORS)}")
    return kinds


def describe_filters(
    model: nn.Module,
    layer: str,
    images: torch.Tensor,
    *,
    descriptors: str | Sequence[str] = ("profile", "class_preference"),
    preset: Preset | None = None,
    am_steps: int = 128,
    seed: int = 0,
    batch_size: int = 128,
    graph: ModelGraph | None = None,
) -> FilterDescriptors:
    """Measure functionality descriptors for every filter of ``layer``.

    Args:
        model: the classifier (comes back unchanged).
        layer: a conv or linear layer.
        images: probe images, normalised floats or uint8 (with ``preset``).
        descriptors: some of ``"am"``, ``"profile"``, ``"class_preference"``.
        preset: the model's preset (uint8 images, and the activation-maximisation input).
        am_steps: optimisation steps of the activation-maximisation images.
        seed: seeds the activation maximisation.
        batch_size: images per forward pass.
        graph: the model's graph (built from the first image when omitted).

    Returns:
        a :class:`FilterDescriptors` for all of the layer's filters.

    Raises:
        GraphError: unknown layer (close names listed).
        FunctionalError: unknown descriptor, no images.

    Example:
        >>> d = describe_filters(lm.model, "features.4", x, preset=lm.preset)  # doctest: +SKIP
        >>> d.profile.shape  # doctest: +SKIP
        torch.Size([64, 256])
    """
    from .featureviz import layer_activations, visualize

    kinds = _check_descriptors(descriptors)
    x = _as_inputs(images, preset)
    graph = _graph_for(model, x, graph)
    info = graph.layer(layer)
    out = FilterDescriptors(layer, list(range(info.out_channels)))
    out.metadata["probe_images"] = len(x)
    if "profile" in kinds:
        start = time.perf_counter()
        out.profile = layer_activations(model, layer, x, batch_size=batch_size).T.double()
        out.metadata["profile_seconds"] = time.perf_counter() - start
    if "class_preference" in kinds:
        start = time.perf_counter()
        out.class_preference = class_preference(model, layer, x, batch_size=batch_size)
        out.metadata["class_preference_seconds"] = time.perf_counter() - start
    if "am" in kinds:
        start = time.perf_counter()
        viz = visualize(model, layer, preset=preset, input_shape=tuple(x.shape[1:]),
                        steps=am_steps, seed=seed, graph=graph)
        out.am_images = viz.images
        out.metadata["am_steps"] = am_steps
        out.metadata["am_seconds"] = time.perf_counter() - start
    return out


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
    from .hooks import stop_at

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
        from .car import car_scores

        report = car_scores(model, images, labels, [layer], preset=preset, graph=graph,
                            batch_size=batch_size)
        ranks = report.layers[layer].rank_of()
        scores = torch.zeros(len(ranks), dtype=torch.float64)
        for f, r in ranks.items():
            scores[f] = float(r)
        return scores
    from .baselines import baseline_scores

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
        """``{layer: bool [out_channels]}``, True = kept (for :mod:`netcarve.compress`)."""
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


def plot_clusters(lp: LayerPruning, path: str | Path) -> Path:
    """A PNG: the similarity matrix with filters ordered by cluster (kept filters marked),
    and, when activation-maximisation images were measured, the members of the largest
    clusters side by side.

    Returns:
        the path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out


def functional_prune(
    model: nn.Module,
    layers: str | Sequence[str],
    images: torch.Tensor,
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
        images: probe images (normalised, or uint8 with ``preset``).
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
    from .baselines import baseline_order, baseline_scores

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
    from .fold import FOLDS

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
            from .evaluation import reference_data

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

    For every method: :func:`netcarve.compress.prune_filters` (parameters and multiply-adds
    before/after), top-1 accuracy on the evaluation images before fine-tuning, then
    :func:`netcarve.finetune.finetune` with the same recipe and seed for every method, and the
    accuracy after it.

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
            :mod:`netcarve.fold`), ``"none"`` (the papers' drop), or ``{method: fold}``
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
    from .compress import prune_filters
    from .evaluation import evaluate
    from .finetune import finetune

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
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

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
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=110)
        plt.close(fig)
        return out


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
    from .compress import prune_filters
    from .evaluation import evaluate
    from .finetune import finetune

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
