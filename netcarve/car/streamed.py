"""Removals evaluated over a stream of images, one bounded chunk at a time.

The :class:`~netcarve.car.engine.AblationEngine` caches activations of the images it is
built on, so its memory grows with them. :func:`evaluate_stream` reads a DataLoader / image
folder stream once, builds an engine on each chunk of ``chunk_images`` images, evaluates the
same candidates there and adds the statistics up (:meth:`AblationStats.merged`): the result
is the engine's on the whole set (sums in a different order, within the agreement contract
of :func:`~netcarve.car.stats.compare_stats`) while memory stays that of one chunk.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from netcarve.car.engine import AblationEngine
from netcarve.car.stats import AblationError, AblationStats
from netcarve.core.graph import ModelGraph
from netcarve.data.preset import Preset
from netcarve.data.stream import as_stream

__all__ = ["evaluate_stream"]


def evaluate_stream(
    model: nn.Module,
    layer: str,
    candidates: torch.Tensor,
    images: Any,
    labels: torch.Tensor | None = None,
    *,
    graph: ModelGraph | None = None,
    preset: Preset | None = None,
    fixed: dict[str, torch.Tensor] | None = None,
    batch_size: int = 100,
    chunk_images: int = 1000,
    metric: Any = None,
) -> AblationStats:
    """Statistics of the classifier under each candidate keep mask, over a stream.

    Args:
        model: the classifier (comes back unchanged).
        layer: the layer whose filters the candidates remove.
        candidates: bool ``[R, out_channels]`` keep masks.
        images: a tensor (with ``labels``), a DataLoader or an iterable of
            ``(images, labels)`` batches; read once.
        labels: labels of a tensor.
        graph: the model's graph (built from the first image when omitted).
        preset: normalises uint8 images.
        fixed: removals already made on other layers (``{layer: bool keep}``).
        batch_size: images per forward pass.
        chunk_images: images per engine (the memory bound).
        metric: a custom metric (callable / :class:`~netcarve.car.stats.Metric`) whose sums
            are also collected, as in :class:`~netcarve.car.engine.AblationEngine`.

    Returns:
        the merged :class:`AblationStats` (``n`` = every image of the stream).

    Raises:
        AblationError: ``chunk_images`` < 1 or an empty stream; DataError: bad batches.

    Example:
        >>> stats = evaluate_stream(net, "features.4", keeps, loader)  # doctest: +SKIP
    """
    if int(chunk_images) < 1:
        raise AblationError(f"chunk_images must be >= 1, got {chunk_images}")
    stream = as_stream(images, labels, preset=preset)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    if graph is None:
        graph = ModelGraph.build(model, stream.first(device=device, dtype=dtype))
    parts: list[AblationStats] = []
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []

    def flush() -> None:
        engine = AblationEngine(model, torch.cat(xs), torch.cat(ys), graph=graph,
                                batch_size=batch_size, metric=metric)
        parts.append(engine.evaluate(layer, candidates, fixed))
        xs.clear()
        ys.clear()

    held = 0
    for x, y in stream.batches(batch_size, device=device, dtype=dtype, labels=True):
        assert y is not None
        xs.append(x)
        ys.append(y)
        held += len(x)
        if held >= chunk_images:
            flush()
            held = 0
    if xs:
        flush()
    if not parts:
        raise AblationError("the stream yielded no images")
    return AblationStats.merged(parts)
