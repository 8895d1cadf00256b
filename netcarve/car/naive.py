"""The naive ablation loop, the reference the engine is checked against.

:func:`ablate_naive` runs one full forward pass per candidate removal and image chunk, with the
removal applied by hooks (:func:`netcarve.core.hooks.apply_filter_masks`); it shares the input
checks and the statistics code with :class:`netcarve.car.engine.AblationEngine`."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.fx
from torch import nn

from netcarve.car.stats import (
    AblationError,
    AblationStats,
    ForwardCounts,
    Metric,
    _Accumulator,
    _stats,
    resolve_metric,
)
from netcarve.core.errors import DataError
from netcarve.core.graph import ModelGraph
from netcarve.core.hooks import apply_filter_masks, preserved_state
from netcarve.data.preset import Preset
from netcarve.data.stream import require_finite

__all__ = ["ablate_naive", "single_removals"]


# --------------------------------------------------------------------------- inputs


def single_removals(n_filters: int, filters: Sequence[int] | None = None,
                    keep: torch.Tensor | None = None) -> torch.Tensor:
    """Candidate keep masks that each remove one filter.

    Args:
        n_filters: filters of the layer.
        filters: which filters to remove, one per candidate (default: all).
        keep: bool ``[n_filters]`` already kept (removed filters stay removed in every row).

    Returns:
        bool ``[len(filters), n_filters]``, row ``r`` = ``keep`` without ``filters[r]``.

    Example:
        >>> single_removals(3)
        tensor([[False,  True,  True],
                [ True, False,  True],
                [ True,  True, False]])
    """
    chosen = list(range(n_filters)) if filters is None else [int(f) for f in filters]
    base = torch.ones(n_filters, dtype=torch.bool) if keep is None else keep.cpu().bool()
    out = base.repeat(len(chosen), 1)
    if chosen:
        out[torch.arange(len(chosen)), torch.tensor(chosen)] = False
    return out


def _prepare(images: torch.Tensor, labels: torch.Tensor,
             preset: Preset | None) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(images, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise DataError("images and labels must be tensors")
    if len(images) == 0:
        raise DataError("the evaluation data set is empty: no images to evaluate removals on")
    if len(images) != len(labels):
        raise DataError(f"{len(images)} images but {len(labels)} labels")
    if images.dtype == torch.uint8 and preset is None:
        raise DataError("uint8 images need a preset to be normalised (pass preset=...)")
    require_finite(images)
    return images, labels.long()


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        return p.device, p.dtype
    for b in model.buffers():
        if b.is_floating_point():
            return b.device, b.dtype
    return torch.device("cpu"), torch.float32


def _chunks(
    images: torch.Tensor, labels: torch.Tensor, batch_size: int, preset: Preset | None,
    device: torch.device, dtype: torch.dtype,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for start in range(0, len(images), batch_size):
        xb = images[start:start + batch_size]
        if xb.dtype == torch.uint8:
            assert preset is not None
            xb = preset.normalize(xb)
        yield xb.to(device=device, dtype=dtype), labels[start:start + batch_size]


def _num_classes(model: nn.Module, example: torch.Tensor, labels: torch.Tensor) -> int:
    """Number of logits the model returns (one probe image), checked against the labels."""
    with preserved_state(model), torch.no_grad():
        model.eval()
        out = model(example)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise AblationError("the model must return logits [N, classes], got "
                            f"{getattr(out, 'shape', type(out).__name__)}")
    k = int(out.shape[1])
    if int(labels.max()) >= k or int(labels.min()) < 0:
        raise DataError(f"labels must lie in 0..{k - 1} for a model with {k} logits, got "
                        f"{int(labels.min())}..{int(labels.max())}")
    return k


def _check_candidates(candidates: torch.Tensor, n_filters: int, layer: str) -> torch.Tensor:
    if not isinstance(candidates, torch.Tensor):
        candidates = torch.as_tensor(candidates)
    if candidates.dim() == 1:
        candidates = candidates[None]
    if candidates.dim() != 2 or candidates.shape[1] != n_filters:
        raise AblationError(
            f"candidate masks for {layer} must be bool [R, {n_filters}] (True = kept), got "
            f"{tuple(candidates.shape)}")
    return candidates.detach().cpu().bool()


def _check_fixed(
    graph: ModelGraph, fixed: dict[str, torch.Tensor] | None
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, keep in (fixed or {}).items():
        info = graph.layer(name)
        keep_t = torch.as_tensor(keep).detach().cpu()
        if tuple(keep_t.shape) != (info.out_channels,):
            raise AblationError(f"fixed mask for {name} has shape {tuple(keep_t.shape)}, "
                                f"expected ({info.out_channels},)")
        keep_t = keep_t.bool()
        if not bool(keep_t.all()):
            out[name] = keep_t
    return out


# --------------------------------------------------------------------------- the naive loop


@torch.no_grad()
def ablate_naive(
    model: nn.Module,
    layer: str,
    candidates: torch.Tensor,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    graph: ModelGraph | None = None,
    fixed: dict[str, torch.Tensor] | None = None,
    batch_size: int = 100,
    preset: Preset | None = None,
    metric: str | Metric | Callable[..., Any] | None = None,
) -> AblationStats:
    """The reference: one full forward pass per candidate and chunk, masks applied by hooks.

    Same arguments and result as :meth:`AblationEngine.evaluate`; slow, simple, and what the
    engine must equal exactly.

    Example:
        >>> stats = ablate_naive(net, "0", single_removals(4), x, y)  # doctest: +SKIP
    """
    images, labels = _prepare(images, labels, preset)
    device, dtype = _model_device_dtype(model)
    if graph is None:
        graph = ModelGraph.build(model, _example(images, preset, device, dtype))
    info = graph.layer(layer)
    cands = _check_candidates(candidates, info.out_channels, layer)
    fixed_masks = _check_fixed(graph, fixed)
    own = fixed_masks.pop(layer, torch.ones(info.out_channels, dtype=torch.bool))
    k = _num_classes(model, _example(images, preset, device, dtype), labels)
    m = resolve_metric(metric)
    custom = m if m.fn is not None else None
    acc = _Accumulator(len(cands), k, custom, device)
    base = _Accumulator(1, k, custom, device)
    counts = ForwardCounts()
    start = time.perf_counter()
    with preserved_state(model):
        model.eval()
        for xb, yb in _chunks(images, labels, batch_size, preset, device, dtype):
            acc.count_labels(yb)
            base.count_labels(yb)
            rows = [(None, own)] + [(r, own & cands[r]) for r in range(len(cands))]
            for r, keep in rows:
                with apply_filter_masks(model, graph, {**fixed_masks, layer: keep}):
                    logits = model(xb)
                counts.full_passes += 1
                counts.full_images += len(xb)
                if r is None:
                    base.add([0], logits, yb)
                else:
                    acc.add([r], logits, yb)
            counts.naive_passes += len(rows)
    counts.seconds = time.perf_counter() - start
    return _stats(acc, base, counts)


def _example(images: torch.Tensor, preset: Preset | None, device: torch.device,
             dtype: torch.dtype) -> torch.Tensor:
    x = images[:1]
    if x.dtype == torch.uint8:
        assert preset is not None
        x = preset.normalize(x)
    return x.to(device=device, dtype=dtype)
