"""The engine's plan of a layer's suffix: which fx nodes run after the ablated layer, which
values from before it they read, and the small exact kernels the suffix uses (strided max
pooling, in-place detection)."""

from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch import nn

__all__: list[str] = []


# --------------------------------------------------------------------------- the engine

# The linear shortcut is used for a pass only while its items remove at most this many
# channels each on average (measured on fmnist_vgg: single removals 1.4-3x faster with it,
# masks removing 8-32 channels slower than running the layer).
_SHORTCUT_CHANNELS_PER_ITEM = 2

_INPLACE_OPERATORS = {
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
    operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
    operator.ilshift, operator.irshift, operator.imatmul,
}


def _is_inplace(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether an fx node mutates its first argument."""
    if node.op == "call_module":
        return bool(getattr(modules.get(str(node.target)), "inplace", False))
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.endswith("__")
    if node.op == "call_function":
        if node.target in _INPLACE_OPERATORS:
            return True
        name = getattr(node.target, "__name__", "")
        if name.endswith("_") and not name.endswith("__"):
            return True
        if node.kwargs.get("inplace") is True:
            return True
        try:
            bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return False
        return bound.arguments.get("inplace") is True
    return False


def _reachable(start: torch.fx.Node) -> set[torch.fx.Node]:
    found: set[torch.fx.Node] = set()
    todo = [start]
    while todo:
        for user in todo.pop().users:
            if user not in found:
                found.add(user)
                todo.append(user)
    return found


def _arg_nodes(node: torch.fx.Node) -> list[torch.fx.Node]:
    out: list[torch.fx.Node] = []
    torch.fx.node.map_arg((node.args, node.kwargs), lambda n: out.append(n) or n)
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    """A bitwise view of a floating tensor (so -0.0 != 0.0 and NaN == NaN of same bits)."""
    t = t.contiguous()
    size = t.element_size()
    if t.is_floating_point() and size in (2, 4, 8):
        return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[size])
    return t


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _strided_max_pool(module: nn.MaxPool2d, x: Any) -> torch.Tensor | None:
    """Non-overlapping max pooling as elementwise maxima of strided views, or None.

    Bitwise equal to ``module(x)`` (a maximum is exact and both propagate NaN) and, with
    torch 2.13's CPU kernel for NCHW tensors, about 10× faster; the engine runs pooling
    once per stacked item, so this is a large share of its time. Only the plain case is
    taken: kernel = stride, no padding, no dilation, floor mode, no indices.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        return None
    kernel = _pair(module.kernel_size)
    stride = _pair(module.stride if module.stride is not None else module.kernel_size)
    if (kernel != stride or _pair(module.padding) != (0, 0) or _pair(module.dilation) != (1, 1)
            or module.ceil_mode or module.return_indices):
        return None
    kh, kw = kernel
    h, w = x.shape[2] // kh, x.shape[3] // kw
    if h == 0 or w == 0:
        return None
    if (h * kh, w * kw) != tuple(x.shape[2:]):
        # floor mode drops the last rows/columns; a compact copy keeps the maxima fast
        x = x[:, :, :h * kh, :w * kw].contiguous()
    out: torch.Tensor | None = None
    for i in range(kh):
        for j in range(kw):
            view = x[:, :, i::kh, j::kw]
            out = view if out is None else torch.maximum(out, view)
    assert out is not None
    return out.contiguous() if kh * kw > 1 else out.clone()


def _keep_view(keep: torch.Tensor, out: torch.Tensor, last: bool = False) -> torch.Tensor:
    """Broadcast bool keep ``[C]`` or ``[N, C]`` over an output ``[N, C, ...]`` (or, for a
    channels-last layer, ``[N, ..., C]``)."""
    if last:
        if keep.dim() == 1:
            return keep.reshape(*([1] * (out.dim() - 1)), -1)
        return keep.reshape(keep.shape[0], *([1] * (out.dim() - 2)), keep.shape[1])
    if keep.dim() == 1:
        return keep.reshape(1, -1, *([1] * (out.dim() - 2)))
    return keep.reshape(keep.shape[0], keep.shape[1], *([1] * (out.dim() - 2)))


@dataclass
class _Plan:
    """How to split the traced network around one layer."""

    layer: str
    mode: str  # "cut": stack the layer's output; "input": stack the input images
    nodes: list[torch.fx.Node]
    cut: torch.fx.Node
    layer_node: torch.fx.Node
    suffix: list[torch.fx.Node]
    suffix_set: set[torch.fx.Node]
    prefix: list[torch.fx.Node]
    batched: set[torch.fx.Node]
    compact_at: int | None  # index in suffix before which unchanged items are dropped
    last_use: dict[torch.fx.Node, int]
    mask_at: dict[torch.fx.Node, str]  # node -> layer whose filter mask applies to its output
    prefix_layers: set[str]
    substitute: bool | None = None  # channel substitution at the compaction point verified?
    shortcut: bool | None = None  # linear shortcut through the next layer checked and usable?


@dataclass
class _Chunk:
    start: torch.Tensor
    snaps: dict[tuple[torch.fx.Node, torch.fx.Node], Any]
    labels: torch.Tensor
    nbytes: int


def _close(fast: torch.Tensor, real: torch.Tensor) -> bool:
    """The shortcut's output agrees with the layer's own within float rounding (checked once
    per layer; anything else means an op the shortcut misreads, and it is turned off)."""
    if fast.shape != real.shape:
        return False
    rtol = 1e-4 if real.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-10
    scale = float(real.abs().max()) if real.numel() else 0.0
    return bool((fast - real).abs().max() <= rtol * max(scale, 1e-30)) if real.numel() else True


class _Unsafe(Exception):
    """The prefix produced a batch-dependent non-tensor value the suffix reads."""
