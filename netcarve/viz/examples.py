"""Dataset examples: the probe images (and image patches) that excite a unit most, with the
receptive-field crop of each."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.fx
from torch import nn

from netcarve.core.graph import ModelGraph
from netcarve.core.hooks import preserved_state, stop_at
from netcarve.data.preset import Preset
from netcarve.data.stream import Images, as_stream

if TYPE_CHECKING:
    from netcarve.circuits.circuit import Circuit

from netcarve.viz.parameterization import FeatureVizError
from netcarve.viz.receptive_field import receptive_field
from netcarve.viz.render import _device_dtype

__all__ = ["DatasetExamples", "dataset_examples", "to_display"]


# --------------------------------------------------------------------------- data-set examples


@dataclass
class DatasetExamples:
    """Top-k activating images per channel and the receptive-field box of each peak.

    Attributes:
        layer: the layer.
        channels: the channels, in order.
        values: ``[C, k]`` activation (raw output reduced over positions), best first.
        indices: ``[C, k]`` image indices into the images searched.
        positions: ``[C, k, 2]`` ``(y, x)`` of each image's peak in the layer's map.
        boxes: ``[C, k, 4]`` ``(y0, x0, y1, x1)`` receptive field of that peak, clipped to the
            image (half-open).
        full_boxes: ``[C, k, 4]`` the same fields unclipped (they may reach into the padding;
            all have the same size in a conv/pool stack).
        reduce: ``"max"`` or ``"mean"`` (how positions were reduced).

    Example:
        >>> ex.patches(images, preset)[0][0].shape  # doctest: +SKIP
        (10, 10)
    """

    layer: str
    channels: list[int]
    values: torch.Tensor
    indices: torch.Tensor
    positions: torch.Tensor
    boxes: torch.Tensor
    full_boxes: torch.Tensor
    reduce: str = "max"

    def patches(self, images: torch.Tensor, preset: Preset | None = None, *,
                pad: bool = True, fill: float = 0.5) -> list[list[np.ndarray]]:
        """The receptive-field crops, ``[channel][rank]``, as display arrays in [0, 1].

        Args:
            images: the images that were searched (normalised, as given to
                :func:`dataset_examples`).
            preset: undo its normalisation for display (else each crop is min-max scaled).
            pad: crop the unclipped field (:attr:`full_boxes`) and fill the part outside the
                image with ``fill``, so every crop has the same size and the peak sits at the
                same place in it; ``False`` crops the clipped :attr:`boxes`.
            fill: display value outside the image (0.5: mid-grey).

        Returns:
            nested lists of ``H×W`` (greyscale) or ``H×W×3`` arrays.
        """
        height, width = images.shape[-2], images.shape[-1]
        out = []
        for c in range(len(self.channels)):
            row = []
            for r in range(self.values.shape[1]):
                shown = to_display(images[int(self.indices[c, r])][None], preset)[0]
                box = self.full_boxes[c, r] if pad else self.boxes[c, r]
                y0, x0, y1, x1 = (int(v) for v in box)
                crop = np.full((y1 - y0, x1 - x0, *shown.shape[2:]), fill, dtype=shown.dtype)
                sy0, sx0 = max(y0, 0), max(x0, 0)
                sy1, sx1 = min(y1, height), min(x1, width)
                if sy1 > sy0 and sx1 > sx0:
                    crop[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = shown[sy0:sy1, sx0:sx1]
                row.append(crop)
            out.append(row)
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly: per channel, the ranked image indices, values, peaks and boxes."""
        return {
            "layer": self.layer,
            "reduce": self.reduce,
            "channels": {
                str(ch): [
                    {"image": int(self.indices[c, r]), "value": float(self.values[c, r]),
                     "peak": [int(v) for v in self.positions[c, r]],
                     "box": [int(v) for v in self.boxes[c, r]]}
                    for r in range(self.values.shape[1])
                ]
                for c, ch in enumerate(self.channels)
            },
        }


def to_display(images: torch.Tensor, preset: Preset | None = None) -> list[np.ndarray]:
    """Normalised images ``[N, C, H, W]`` as display arrays in [0, 1].

    With a preset of matching channel count the normalisation is undone (``x·std + mean``,
    clipped); otherwise each image is min-max scaled.

    Returns:
        a list of ``H×W`` (one channel) or ``H×W×3`` float arrays.

    Example:
        >>> to_display(torch.zeros(1, 1, 2, 2))[0].shape
        (2, 2)
    """
    from netcarve.diagram.pictures import display_images

    arr = display_images(images, preset)
    return [a[:, :, 0] if a.shape[2] == 1 else a for a in arr]


@torch.no_grad()
def dataset_examples(
    model: nn.Module,
    layer: str,
    images: Images,
    *,
    channels: Sequence[int] | None = None,
    top_k: int = 9,
    reduce: str = "max",
    batch_size: int = 256,
    graph: ModelGraph | None = None,
    circuit: Circuit | None = None,
) -> DatasetExamples:
    """The ``top_k`` images that activate each channel most, with receptive-field boxes.

    One pass over ``images``: a channel's activation on an image is its raw output (before any
    following activation function) reduced over positions by ``reduce``; the box is the exact
    receptive field (:func:`receptive_field`) of the peak position. Ties keep the earlier image.

    Args:
        model: the model (comes back unchanged).
        layer: a conv or linear layer.
        images: normalised images ``[N, C, H, W]``, or a stream of them (DataLoader or
            iterable of batches, read once; indices count images in stream order).
        channels: channels to search for (default all).
        top_k: images per channel (clipped to N).
        reduce: ``"max"`` (default) or ``"mean"`` over positions.
        batch_size: images per forward pass.
        graph: the model's graph (built from ``images[:1]`` when omitted).
        circuit: search as this circuit computes the layer.

    Returns:
        a :class:`DatasetExamples`.

    Raises:
        GraphError: unknown layer or channel out of range.
        FeatureVizError: no images, bad ``top_k`` or ``reduce``.

    Example:
        >>> ex = dataset_examples(lm.model, "features.4", x, channels=[3], top_k=4)
        ...     # doctest: +SKIP
        >>> ex.indices.shape  # doctest: +SKIP
        torch.Size([1, 4])
    """
    if isinstance(images, torch.Tensor) and (images.dim() != 4 or len(images) == 0):
        raise FeatureVizError("dataset_examples needs a non-empty [N, C, H, W] image tensor")
    stream = as_stream(images)
    if int(top_k) < 1:
        raise FeatureVizError(f"top_k must be >= 1, got {top_k}")
    if reduce not in ("max", "mean"):
        raise FeatureVizError(f"reduce must be 'max' or 'mean', got {reduce!r}")
    device, dtype = _device_dtype(model)
    first = stream.first(device=device, dtype=dtype)
    if graph is None:
        graph = ModelGraph.build(model, first)
    info = graph.layer(layer)
    chans = graph._channels(layer, channels)
    k = int(top_k)  # fewer when the stream has fewer images
    lo = 0
    best_v = best_i = best_p = None
    sel = torch.tensor(chans, device=device)
    with preserved_state(model), ExitStack() as stack:
        model.eval()
        if circuit is not None:
            stack.enter_context(circuit.masked(model, graph))
        with stop_at(model, layer) as run:
            for xb in stream.images(batch_size, device=device, dtype=dtype):
                z = run(xb)
                z = z.index_select(1, sel).float()
                z = z.reshape(z.shape[0], z.shape[1], -1)
                peak_v, peak_p = z.max(dim=2)
                vals = peak_v if reduce == "max" else z.mean(dim=2)
                idx = torch.arange(lo, lo + len(z), device=device)[:, None].expand_as(vals)
                if best_v is not None:
                    vals = torch.cat([best_v, vals])
                    idx = torch.cat([best_i, idx])
                    peak_p = torch.cat([best_p, peak_p])
                order = torch.sort(vals, dim=0, descending=True, stable=True).indices[:k]
                best_v, best_i = vals.gather(0, order), idx.gather(0, order)
                best_p = peak_p.gather(0, order)
                lo += len(xb)
    k = best_v.shape[0] if best_v is not None else 0
    assert best_v is not None and best_i is not None and best_p is not None
    width = info.output_shape[2] if len(info.output_shape) == 3 else 1
    flat = best_p.t().cpu()  # [C, k]
    positions = torch.stack([flat // width, flat % width], dim=2)
    if len(info.output_shape) == 3:
        flat_pos = positions.reshape(-1, 2)
        boxes = receptive_field(graph, layer, flat_pos).reshape(len(chans), k, 4)  # type: ignore[union-attr]
        full = receptive_field(graph, layer, flat_pos, clip=False).reshape(  # type: ignore[union-attr]
            len(chans), k, 4)
    else:
        boxes = torch.tensor([0, 0, *first.shape[-2:]]).expand(len(chans), k, 4).clone()
        full = boxes.clone()
    return DatasetExamples(layer=layer, channels=chans, values=best_v.t().cpu(),
                           indices=best_i.t().cpu(), positions=positions, boxes=boxes,
                           full_boxes=full, reduce=reduce)
