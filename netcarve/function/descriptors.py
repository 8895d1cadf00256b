"""What a filter does, as vectors that can be compared: filter descriptors.

For every filter of a layer, measured on probe images from its raw output map: ``"am"`` its
activation-maximisation image (flattened), ``"profile"`` its mean response per probe image,
``"class_preference"`` the mean ``|dp_c/dz|`` per class (:func:`class_preference`, one
backward pass per class and batch for the whole layer)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from netcarve.core.errors import NetcarveError
from netcarve.core.graph import ModelGraph
from netcarve.core.hooks import channels_first, preserved_state, resolve_module
from netcarve.data.preset import Preset
from netcarve.data.stream import Images, as_stream, in_memory

__all__ = [
    "DESCRIPTORS",
    "FilterDescriptors",
    "FunctionalError",
    "class_preference",
    "describe_filters",
]

DESCRIPTORS: tuple[str, ...] = ("am", "profile", "class_preference")
"""Descriptor kinds: activation-maximisation image, activation profile, class preference."""


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
                    g = channels_first(module, g)  # a channels-last Linear: channels on dim 1
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
    images: Images,
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
        images: probe images, normalised floats or uint8 (with ``preset``), or a stream
            read once into memory.
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
    images, _ = in_memory(images)
    from netcarve.viz.render import layer_activations, visualize

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
