"""Channel maps: which layer channels every element of a traced tensor depends on.

A :class:`_Map` describes a tensor whose channels sit on dim 1 (with a spatial block per
channel after a flatten); a :class:`_Grid` one whose channels are spread over several dims
(a channel shuffle's 5-D view, an NHWC permute), element by element; a :class:`_TupleMap`
the items of a tuple-valued node. :mod:`netcarve.core.tracing` computes them."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

__all__: list[str] = []


# --------------------------------------------------------------------------- channel maps

_Source = tuple[str | None, int]


@dataclass(frozen=True)
class _Map:
    """How dimension 1 of a tensor maps to channel sources.

    Position ``p`` of dim 1 belongs to ``groups[p // spatial]``; each group is the set of
    ``(layer or None, channel)`` that flow into it. ``error`` marks a tensor whose channels
    were mixed by an unsupported op (the message says which op and where).
    """

    groups: tuple[frozenset[_Source], ...] = ()
    spatial: int = 1
    error: str | None = None

    def expanded(self) -> tuple[frozenset[_Source], ...]:
        """Groups per position of dim 1 (spatial 1)."""
        if self.spatial == 1:
            return self.groups
        return tuple(g for g in self.groups for _ in range(self.spatial))


@dataclass(frozen=True, eq=False)
class _Grid:
    """Channel sources of a tensor whose channels are spread over several dimensions.

    A channel shuffle's ``[N, g, C/g, H, W]`` view or an ``NHWC`` permute has no single
    channel dimension; ``ids`` (the tensor's shape without the batch) holds, per element, an
    index into ``groups``. Only data-movement operations may act on it; a movement that
    brings every channel back onto dim 1 turns it into a :class:`_Map` again.
    """

    groups: tuple[frozenset[_Source], ...]
    ids: torch.Tensor
    origin: str = ""  # the op (and where) that spread the channels


@dataclass(frozen=True)
class _TupleMap:
    """Channel maps of the elements of a tuple-valued node (``torch.split`` etc.)."""

    items: tuple[_Map | None, ...]


def _shape_of(value: Any) -> Any:
    """Recorded shape: a tuple for a tensor, a list for a tuple of tensors, else None."""
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value):
        return [tuple(v.shape) if isinstance(v, torch.Tensor) else None for v in value]
    return None


def _dims(arg: Any, ndim: int) -> list[int] | None:
    """Normalise a ``dim`` argument (int or sequence) to non-negative ints; None if absent."""
    if arg is None:
        return None
    if isinstance(arg, int):
        arg = [arg]
    if not isinstance(arg, (list, tuple)) or not all(isinstance(d, int) for d in arg):
        return None
    return [d % ndim if ndim else d for d in arg]


def _union(sets: Iterable[frozenset[_Source]]) -> frozenset[_Source]:
    out: set[_Source] = set()
    for s in sets:
        out |= s
    return frozenset(out)


def _ids_of(m: _Map, shape: tuple[int, ...]) -> torch.Tensor:
    """Per-element group indices (shape without the batch) of a tensor with map ``m``."""
    per_pos = torch.arange(shape[1]) // m.spatial
    return per_pos.view(-1, *([1] * (len(shape) - 2))).expand(*shape[1:])


def _from_ids(groups: tuple[frozenset[_Source], ...], ids: torch.Tensor) -> _Map | _Grid:
    """A :class:`_Map` when every position of dim 1 has one source group, else a grid."""
    if ids.dim() == 0 or ids.shape[0] == 0:
        return _Grid(groups, ids)
    rows = ids.reshape(ids.shape[0], -1)
    if rows.shape[1] and not bool((rows == rows[:, :1]).all()):
        return _Grid(groups, ids)
    idx = rows[:, 0] if rows.shape[1] else torch.zeros(ids.shape[0], dtype=torch.long)
    width = idx.numel()
    # fold runs of equal groups back into a spatial block (the layout a flatten gives)
    spatial = 1
    for s in range(width, 1, -1):
        if width % s == 0 and bool((idx.view(-1, s) == idx.view(-1, s)[:, :1]).all()):
            spatial = s
            break
    picked = idx.view(-1, spatial)[:, 0].tolist()
    return _Map(tuple(groups[i] for i in picked), spatial)


class _NotConcrete(Exception):
    """An argument of a data-movement op is a tensor or a value the shape pass did not keep."""


_CONST = None  # map of a tensor that carries no input-dependent channels
