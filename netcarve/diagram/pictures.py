"""Node pictures for circuit diagrams: a small image that says what each drawn channel does.

A *picture provider* is any callable ``provider(request) -> {node id: NodePicture}``. It
receives a :class:`PictureRequest` (the model, its graph, the nodes to picture, the images and
their preset) and returns pictures for the nodes it can picture; it may skip any node.
:func:`compose` chains providers: a node takes its picture from the first provider that gives
one, and its dataset examples from the first provider that gives any. This is the hook a
feature-visualisation module plugs into::

    pictures = compose(my_featureviz_provider, default_pictures())
    circuit_to_json(circuit, model, images=x, preset=p, pictures=pictures)

Built-in providers:

* :func:`kernel_pictures`: nodes of a first layer (a conv fed directly by the image) show their
  kernel, RGB for 3 input channels, greyscale otherwise; zero weight is mid-grey, so the
  kernel's sign pattern is visible.
* :func:`input_pictures`: image channels show the mean data-set image in that channel (tinted
  red, green or blue for RGB input), or a plain colour swatch when there are no images.
* :func:`dataset_examples`: every other layer channel shows the crop of the data-set image
  that activates it most (the crop is the region where the activation's input gradient is
  non-negligible, i.e. its effective receptive field), and lists its ``top_k`` activating
  crops with their activation values as examples. Activation = the channel's raw output
  (before any activation function), maximised over positions.

Pictures are float arrays in ``[0, 1]`` (``H×W`` greyscale or ``H×W×3`` RGB); they are
encoded as PNG data URIs by :func:`png_data_uri`.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import nn

from netcarve.core.graph import ModelGraph
from netcarve.core.hooks import capture, preserved_state, stop_at
from netcarve.data.preset import Preset

__all__ = [
    "Example",
    "NodePicture",
    "NodeRef",
    "PictureProvider",
    "PictureRequest",
    "compose",
    "dataset_examples",
    "default_pictures",
    "display_images",
    "input_pictures",
    "kernel_pictures",
    "png_bytes",
    "png_data_uri",
]


@dataclass(frozen=True)
class NodeRef:
    """A node to picture.

    Attributes:
        id: the node id in the diagram (``"features.4:12"``, ``"input:0"``).
        layer: the layer name, or None for a channel of the model input.
        channel: the channel index.
    """

    id: str
    layer: str | None
    channel: int


@dataclass
class Example:
    """One data-set example of a node: an image (crop) and the activation it produced."""

    image: np.ndarray
    activation: float | None = None


@dataclass
class NodePicture:
    """The picture of one node.

    Attributes:
        image: float array in [0, 1], ``H×W`` or ``H×W×3``.
        kind: what it shows (``"kernel"``, ``"input"``, ``"dataset-example"``, or a
            provider's own word such as ``"feature-visualisation"``).
        examples: top activating data-set examples, best first (may be empty).
    """

    image: np.ndarray
    kind: str
    examples: list[Example] = field(default_factory=list)


@dataclass
class PictureRequest:
    """What a picture provider gets.

    Attributes:
        model: the model (providers must leave it unchanged; use :mod:`netcarve.core.hooks`).
        graph: its :class:`~netcarve.core.graph.ModelGraph`.
        nodes: the nodes to picture.
        images: normalised images ``[N, C, H, W]`` for data-set examples, or None.
        preset: the images' preset (to undo the normalisation for display), or None.
    """

    model: nn.Module
    graph: ModelGraph
    nodes: list[NodeRef]
    images: torch.Tensor | None = None
    preset: Preset | None = None


PictureProvider = Callable[[PictureRequest], Mapping[str, NodePicture]]


# --------------------------------------------------------------------------- encoding


def _to_uint8(image: np.ndarray) -> np.ndarray:
    arr = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0)
    return (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def png_data_uri(image: np.ndarray, min_size: int = 32) -> str:
    """Encode a picture as a ``data:image/png;base64,...`` URI.

    Small pictures are enlarged by an integer factor (nearest neighbour) to at least
    ``min_size`` pixels on their longer side, so every viewer shows crisp pixels.

    Args:
        image: float array in [0, 1], ``H×W`` or ``H×W×3`` (``H×W×1`` is treated as ``H×W``).
        min_size: minimum longer side after enlargement.

    Returns:
        The data URI.

    Raises:
        ValueError: the array is not 2-D or 3-D with 1 or 3 channels.

    Example:
        >>> png_data_uri(np.zeros((3, 3)))[:22]
        'data:image/png;base64,'
    """
    return "data:image/png;base64," + base64.b64encode(png_bytes(image, min_size)).decode("ascii")


def png_bytes(image: np.ndarray, min_size: int = 32) -> bytes:
    """Encode a picture as PNG file bytes, enlarged as :func:`png_data_uri` does.

    Args:
        image: float array in [0, 1], ``H×W`` or ``H×W×3`` (``H×W×1`` is treated as ``H×W``).
        min_size: minimum longer side after enlargement.

    Returns:
        The PNG file's bytes.

    Raises:
        ValueError: the array is not 2-D or 3-D with 1 or 3 channels.

    Example:
        >>> png_bytes(np.zeros((3, 3)))[:4]
        b'\\x89PNG'
    """
    from PIL import Image

    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3) or 0 in arr.shape:
        raise ValueError(f"a picture must be H×W or H×W×3, got shape {arr.shape}")
    factor = max(1, math.ceil(min_size / max(arr.shape[0], arr.shape[1])))
    pixels = _to_uint8(arr)
    if factor > 1:
        pixels = pixels.repeat(factor, axis=0).repeat(factor, axis=1)
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L" if pixels.ndim == 2 else "RGB").save(
        buf, format="PNG", optimize=True
    )
    return buf.getvalue()


def display_images(images: torch.Tensor, preset: Preset | None = None) -> np.ndarray:
    """Turn normalised model inputs into displayable pictures.

    Args:
        images: ``[N, C, H, W]`` normalised floats.
        preset: undo its normalisation (``x·std + mean``, clipped to [0, 1]); without one
            (or when its channel count differs) each image is min-max scaled.

    Returns:
        float array ``[N, H, W, C]`` in [0, 1].

    Example:
        >>> display_images(torch.zeros(2, 1, 4, 4)).shape
        (2, 4, 4, 1)
    """
    x = images.detach().float().cpu()
    if preset is not None and len(preset.mean) == x.shape[1]:
        mean = torch.tensor(preset.mean).view(1, -1, 1, 1)
        std = torch.tensor(preset.std).view(1, -1, 1, 1)
        x = (x * std + mean).clamp(0, 1)
    else:
        flat = x.reshape(len(x), -1)
        lo = flat.min(dim=1).values.view(-1, 1, 1, 1)
        hi = flat.max(dim=1).values.view(-1, 1, 1, 1)
        x = (x - lo) / (hi - lo).clamp(min=1e-12)
    return x.permute(0, 2, 3, 1).numpy()


def _squeeze(image: np.ndarray) -> np.ndarray:
    return image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else image


# --------------------------------------------------------------------------- providers


def compose(*providers: PictureProvider) -> PictureProvider:
    """Chain providers: the first picture and the first non-empty examples win.

    Each provider is asked only about the nodes that still lack a picture or examples.

    Example:
        >>> p = compose(kernel_pictures, input_pictures)
        >>> callable(p)
        True
    """

    def provider(request: PictureRequest) -> dict[str, NodePicture]:
        result: dict[str, NodePicture] = {}
        for p in providers:
            remaining = [n for n in request.nodes
                         if n.id not in result or not result[n.id].examples]
            if not remaining:
                break
            for node_id, pic in p(replace(request, nodes=remaining)).items():
                if node_id not in result:
                    result[node_id] = pic
                elif not result[node_id].examples and pic.examples:
                    result[node_id] = replace(result[node_id], examples=list(pic.examples))
        return result

    return provider


def _first_layers(graph: ModelGraph) -> set[str]:
    """Conv layers all of whose input channels come straight from the model input."""
    return {
        name for name, info in graph.layers.items()
        if info.kind == "conv" and graph.links[name]
        and all(link.source is None for link in graph.links[name])
    }


def kernel_pictures(request: PictureRequest) -> dict[str, NodePicture]:
    """Pictures of first-layer kernels (RGB for 3 input channels, greyscale otherwise).

    Each filter ``weight[o]`` is scaled symmetrically, ``0.5 + 0.5·w / max|w|``, so zero is
    mid-grey. More than 3 or exactly 2 input channels are averaged to greyscale; 3-D kernels
    are summed over depth; 1-D kernels become a one-row picture.

    Args:
        request: the picture request.

    Returns:
        ``{node id: NodePicture(kind="kernel")}`` for nodes of first layers.
    """
    firsts = _first_layers(request.graph)
    out: dict[str, NodePicture] = {}
    params = dict(request.model.named_parameters())
    for node in request.nodes:
        if node.layer not in firsts:
            continue
        info = request.graph.layers[node.layer]
        w = params[info.weight_param].detach().float().cpu()[node.channel]  # [C', k...]
        if w.dim() == 4:
            w = w.sum(dim=1)
        elif w.dim() == 2:
            w = w[:, None, :]
        scale = float(w.abs().max())
        w = 0.5 + 0.5 * w / scale if scale > 0 else torch.full_like(w, 0.5)
        img = w.permute(1, 2, 0).numpy() if w.shape[0] == 3 else w.mean(dim=0).numpy()
        out[node.id] = NodePicture(image=img, kind="kernel")
    return out


_TINTS = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))


def input_pictures(request: PictureRequest) -> dict[str, NodePicture]:
    """Pictures of model-input channels: the mean image of that channel (tinted for RGB).

    Args:
        request: the picture request (images optional).

    Returns:
        ``{node id: NodePicture(kind="input")}`` for the input nodes.
    """
    nodes = [n for n in request.nodes if n.layer is None]
    if not nodes:
        return {}
    channels = request.graph.input_shape[0] if request.graph.input_shape else 1
    mean_img = None
    if request.images is not None and request.images.dim() == 4 and len(request.images):
        mean_img = display_images(request.images[:512], request.preset).mean(axis=0)
    out: dict[str, NodePicture] = {}
    for node in nodes:
        plane = (mean_img[:, :, node.channel] if mean_img is not None
                 and node.channel < mean_img.shape[2] else np.full((8, 8), 0.75))
        if channels == 3 and node.channel < 3:
            img = plane[:, :, None] * np.array(_TINTS[node.channel])[None, None, :]
        else:
            img = plane
        out[node.id] = NodePicture(image=img, kind="input")
    return out


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _top_activations(
    model: nn.Module, graph: ModelGraph, wanted: dict[str, list[int]], images: torch.Tensor,
    top_k: int, batch_size: int,
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per layer: ``(values [k, C], image index [k, C], flat position [k, C])`` of the top-k
    images by the channel's maximum over positions (one entry per image)."""
    layers = [n for n in graph.layers if n in wanted]
    device = _device_of(model)
    dtype = next(model.parameters()).dtype
    best: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    with preserved_state(model), torch.no_grad():
        model.eval()
        with capture(model, layers) as store, stop_at(model, layers[-1]) as run:
            for start in range(0, len(images), batch_size):
                xb = images[start:start + batch_size].to(device=device, dtype=dtype)
                run(xb)
                for name in layers:
                    z = store[name][:, wanted[name]].float().cpu()
                    z = z.reshape(z.shape[0], z.shape[1], -1)
                    vals, pos = z.max(dim=2)  # [B, C]
                    idx = torch.arange(start, start + len(xb))[:, None].expand_as(vals)
                    if name in best:
                        v0, i0, p0 = best[name]
                        vals, idx, pos = (torch.cat([v0, vals]), torch.cat([i0, idx]),
                                          torch.cat([p0, pos]))
                    k = min(top_k, vals.shape[0])
                    order = torch.topk(vals, k, dim=0).indices
                    best[name] = (vals.gather(0, order), idx.gather(0, order),
                                  pos.gather(0, order))
    return best


def _receptive_boxes(
    model: nn.Module, layer: str, images: torch.Tensor, index: torch.Tensor,
    channels: torch.Tensor, positions: torch.Tensor, batch_size: int,
) -> list[tuple[int, int, int, int]]:
    """Square crop ``(y0, y1, x0, x1)`` per item ``(images[index[k]], channels[k],
    positions[k])``: where |∂z/∂x| exceeds 5% of its maximum."""
    device = _device_of(model)
    dtype = next(model.parameters()).dtype
    boxes: list[tuple[int, int, int, int]] = []
    height, width = images.shape[-2], images.shape[-1]
    with preserved_state(model), torch.enable_grad():
        model.eval()
        with stop_at(model, layer) as run:
            for start in range(0, len(index), batch_size):
                xb = images[index[start:start + batch_size]].to(device=device, dtype=dtype)
                xb = xb.detach().requires_grad_(True)
                z = run(xb)
                z = z.reshape(z.shape[0], z.shape[1], -1)
                rows = torch.arange(len(xb), device=z.device)
                ch = channels[start:start + len(xb)].to(z.device)
                pos = positions[start:start + len(xb)].to(z.device)
                (grad,) = torch.autograd.grad(z[rows, ch, pos].sum(), xb)
                g = grad.detach().abs().sum(dim=1).cpu()  # [B, H, W]
                for gi in g:
                    boxes.append(_square_box(gi, height, width))
    return boxes


def _square_box(g: torch.Tensor, height: int, width: int) -> tuple[int, int, int, int]:
    peak = float(g.max())
    if not peak > 0:
        return 0, height, 0, width
    ys, xs = torch.nonzero(g > 0.05 * peak, as_tuple=True)
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    side = min(max(y1 - y0, x1 - x0, 3), height, width)
    cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
    y0 = int(min(max(round(cy - side / 2), 0), height - side))
    x0 = int(min(max(round(cx - side / 2), 0), width - side))
    return y0, y0 + side, x0, x0 + side


def dataset_examples(top_k: int = 4, batch_size: int = 128) -> PictureProvider:
    """A provider of data-set example pictures for layer channels.

    For each node, the ``top_k`` images whose maximum activation (raw layer output, before
    any activation function) is highest are found in one pass over ``request.images``; each
    is cropped to the effective receptive field of its peak position (the square around the
    pixels where the input gradient of that activation exceeds 5% of its maximum). The
    node's picture is the best crop; all crops are its examples.

    Args:
        top_k: examples per node.
        batch_size: images per forward pass.

    Returns:
        A provider; it returns nothing when the request has no images.

    Example:
        >>> provider = dataset_examples(top_k=3)
        >>> pics = provider(request)  # doctest: +SKIP
    """

    def provider(request: PictureRequest) -> dict[str, NodePicture]:
        images = request.images
        nodes = [n for n in request.nodes if n.layer is not None]
        if images is None or images.dim() != 4 or not len(images) or not nodes:
            return {}  # no images, or not images (1-D signals): nothing to show
        wanted: dict[str, list[int]] = {}
        ids: dict[tuple[str, int], list[str]] = {}
        for n in nodes:
            wanted.setdefault(n.layer, [])
            if n.channel not in wanted[n.layer]:
                wanted[n.layer].append(n.channel)
            ids.setdefault((n.layer, n.channel), []).append(n.id)
        top = _top_activations(request.model, request.graph, wanted, images, top_k, batch_size)
        used = sorted({int(i) for v in top.values() for i in v[1].reshape(-1).tolist()})
        shown = dict(zip(used, display_images(images[used], request.preset), strict=True))
        out: dict[str, NodePicture] = {}
        for layer, chans in wanted.items():
            vals, idx, pos = top[layer]  # [k, C]
            k = vals.shape[0]
            flat_idx = idx.t().reshape(-1)  # channel-major: C × k
            flat_pos = pos.t().reshape(-1)
            flat_ch = torch.tensor(chans).repeat_interleave(k)
            boxes = _receptive_boxes(request.model, layer, images, flat_idx, flat_ch, flat_pos,
                                     batch_size)
            for c_i, channel in enumerate(chans):
                examples = []
                for r in range(k):
                    j = c_i * k + r
                    y0, y1, x0, x1 = boxes[j]
                    crop = _squeeze(shown[int(flat_idx[j])][y0:y1, x0:x1])
                    examples.append(Example(crop, float(vals[r, c_i])))
                for node_id in ids[(layer, channel)]:
                    out[node_id] = NodePicture(examples[0].image, "dataset-example", examples)
        return out

    return provider


def default_pictures(top_k: int = 4, batch_size: int = 128) -> PictureProvider:
    """Kernels for first layers, mean channels for the input, data-set examples elsewhere.

    Equivalent to ``compose(kernel_pictures, input_pictures, dataset_examples(top_k))``:
    first-layer nodes show their kernel and still get data-set examples.

    Example:
        >>> provider = default_pictures(top_k=2)
    """
    return compose(kernel_pictures, input_pictures, dataset_examples(top_k, batch_size))


def pictures_for(
    provider: PictureProvider, model: nn.Module, graph: ModelGraph, nodes: Sequence[NodeRef],
    images: torch.Tensor | None, preset: Preset | None,
) -> dict[str, NodePicture]:
    """Run ``provider`` on ``nodes`` and keep only the pictures of requested nodes."""
    request = PictureRequest(model, graph, list(nodes), images, preset)
    wanted = {n.id for n in nodes}
    return {k: v for k, v in provider(request).items() if k in wanted}
