"""The engine's convolutions: only the output a following pooling reads, in the faster layout.

Two rules, both exact in real arithmetic (the values differ from ``module(x)`` only by float
rounding, within the engine's tolerances):

* *trimming*: a floor-mode pooling with no padding drops the last rows or columns of its
  input when the window does not fit (fmnist_vgg's ``MaxPool2d(2)`` on a 7 × 7 map reads only
  the first 6 × 6). When only channel-wise or element-wise modules (BatchNorm in eval mode,
  activations, dropout in eval mode) sit between a plain ``nn.Conv2d`` and such a pooling,
  the conv computes just the rows and columns the pooling reads: its input is zero-padded
  (or cropped) explicitly and the conv runs without padding. The elementwise modules then run
  on the smaller map, and the pooling returns the same values.
* *layout*: on CPU, plain float32 convs run on a channels-last copy of their input. oneDNN
  computes in that layout natively; on the 2-core benchmark machine the suffix convs of
  fmnist_vgg ran 1.3-1.5× faster this way. The output stays channels-last only when every use
  of it is a pointwise module leading on to another conv or a floor pooling; anything else
  gets a contiguous output, so model code that calls ``view`` keeps working.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from netcarve.car._plan import _pair

__all__: list[str] = []

# modules that act on every position on its own, so a smaller map gives the same values on the
# positions it keeps (BatchNorm and dropout because the engine always runs the model in eval
# mode)
_POINTWISE_MODULES = (
    nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU,
    nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh,
    nn.Softplus, nn.Identity, nn.Dropout, nn.Dropout2d,
)
_POINTWISE_FUNCTIONS = {
    torch.relu, torch.relu_, F.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, F.hardswish,
    F.hardsigmoid, F.elu, torch.sigmoid, torch.tanh, F.sigmoid, F.tanh,
}
_POINTWISE_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_"}


def _pointwise(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    """``node`` maps each position of its one tensor argument on its own."""
    if node.kwargs and node.op != "call_function":
        return False
    if node.op == "call_module":
        module = modules[str(node.target)]
        return type(module) in _POINTWISE_MODULES and len(node.args) == 1
    if node.op == "call_function":
        return node.target in _POINTWISE_FUNCTIONS and len(node.args) >= 1 and all(
            not isinstance(a, torch.fx.Node) for a in node.args[1:]) and all(
            not isinstance(v, torch.fx.Node) for v in node.kwargs.values())
    if node.op == "call_method":
        return str(node.target) in _POINTWISE_METHODS and len(node.args) == 1
    return False


def _floor_pool(module: nn.Module) -> bool:
    if not isinstance(module, nn.MaxPool2d | nn.AvgPool2d):
        return False
    if getattr(module, "return_indices", False) or module.ceil_mode:
        return False
    return _pair(module.padding) == (0, 0)


@dataclass(frozen=True)
class _Route:
    """Where a conv's output goes: the floor-mode pooling it reaches through pointwise modules
    (None if another op comes first), and whether every path ends at a conv or such a pooling
    -- so a channels-last output is never seen by anything that cares about the layout."""

    pool: nn.Module | None
    keeps_layout: bool


def _layout_blind(node: torch.fx.Node, modules: dict[str, nn.Module], depth: int = 0) -> bool:
    """Every use of ``node`` is a pointwise module leading on to a conv or a floor pooling."""
    if not node.users or depth > 8:
        return False
    for user in node.users:
        if user.op != "call_module" or user.args[:1] != (node,) or user.kwargs:
            return False
        module = modules[str(user.target)]
        if isinstance(module, nn.Conv2d) or _floor_pool(module):
            continue
        if not _pointwise(user, modules) or not _layout_blind(user, modules, depth + 1):
            return False
    return True


def conv_routes(gm: torch.fx.GraphModule, modules: dict[str, nn.Module],
                ) -> dict[torch.fx.Node, _Route]:
    """The :class:`_Route` of every plain ``nn.Conv2d`` node (whether a pooling drops anything
    depends on the map size at run time)."""
    found: dict[torch.fx.Node, _Route] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or type(modules[str(node.target)]) is not nn.Conv2d:
            continue
        conv = modules[str(node.target)]
        assert isinstance(conv, nn.Conv2d)
        pool = None
        cur = node
        trimmable = conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
        while trimmable and len(cur.users) == 1:
            (user,) = cur.users
            if user.args[:1] != (cur,):
                break
            if user.op == "call_module" and _floor_pool(modules[str(user.target)]) \
                    and len(user.args) == 1 and not user.kwargs:
                pool = modules[str(user.target)]
                break
            if not _pointwise(user, modules):
                break
            cur = user
        found[node] = _Route(pool, _layout_blind(node, modules))
    return found


def _used(size: int, pool: nn.Module, dim: int) -> int:
    """How many leading rows (``dim`` 0) or columns (1) of a ``size``-long map ``pool`` reads."""
    k = _pair(pool.kernel_size)[dim]
    s = _pair(pool.stride if pool.stride is not None else pool.kernel_size)[dim]
    d = _pair(getattr(pool, "dilation", 1))[dim]
    span = d * (k - 1) + 1
    if size < span:
        return size
    return (size - span) // s * s + span


def _trim_pads(conv: nn.Conv2d, x: torch.Tensor, pool: nn.Module) -> list[int] | None:
    """``F.pad`` widths (left, right, top, bottom; negative crops) that make an unpadded
    ``conv`` produce exactly the rows and columns ``pool`` reads, or None if it reads all."""
    pads: list[int] = []
    trims = False
    for dim in (1, 0):  # F.pad lists the last dimension first
        size = x.shape[2 + dim]
        k, s = conv.kernel_size[dim], conv.stride[dim]
        d, p = conv.dilation[dim], _pair(conv.padding)[dim]
        span = d * (k - 1)
        full = (size + 2 * p - span - 1) // s + 1
        used = _used(full, pool, dim) if full > 0 else full
        trims |= used < full
        last_input = (used - 1) * s - p + span  # the last input row the used outputs read
        pads += [p, last_input - (size - 1)]
    return pads if trims else None


def _pad_channels_last(x: torch.Tensor, pads: list[int]) -> torch.Tensor:
    """``F.pad(x, pads)`` in channels-last layout, built as one zeroed ``[N, H, W, C]`` buffer
    and one copy (padding a channels-last tensor directly was a slow strided fill, 5% of the
    engine's time on fmnist_vgg features.7)."""
    left, right, top, bottom = pads
    h0, h1 = max(0, -top), x.shape[2] - max(0, -bottom)
    w0, w1 = max(0, -left), x.shape[3] - max(0, -right)
    t, b, lft, r = max(top, 0), max(bottom, 0), max(left, 0), max(right, 0)
    buf = x.new_zeros(x.shape[0], t + h1 - h0 + b, lft + w1 - w0 + r, x.shape[1])
    buf[:, t:t + h1 - h0, lft:lft + w1 - w0] = x[:, :, h0:h1, w0:w1].permute(0, 2, 3, 1)
    return buf.permute(0, 3, 1, 2)


def run_conv(conv: nn.Module, x: Any, route: _Route | None, channels_last: bool) -> Any:
    """``conv(x)``, trimmed to what its pooling reads and in channels-last layout where allowed
    (the output stays channels-last only when its route is layout-blind)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        return conv(x)
    # a Conv2d subclass may reshape its input in its own forward: only plain convs switch
    cl = channels_last and type(conv) is nn.Conv2d and x.device.type == "cpu" \
        and x.dtype == torch.float32
    pads = None
    if route is not None and route.pool is not None and isinstance(conv, nn.Conv2d):
        pads = _trim_pads(conv, x, route.pool)
    if pads is None:
        out = conv(x.contiguous(memory_format=torch.channels_last) if cl else x)
    else:
        assert isinstance(conv, nn.Conv2d)
        inp = _pad_channels_last(x, pads) if cl else F.pad(x, pads)
        out = F.conv2d(inp, conv.weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups)
    return out.contiguous() if cl and not (route is not None and route.keeps_layout) else out


def trimmed_weight_conv(conv: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor,
                        route: _Route | None, nhwc: bool = False) -> torch.Tensor:
    """``conv`` with its weight replaced (no bias), trimmed like :func:`run_conv`: the linear
    shortcut's contribution of removed channels, of the same size as the conv's output.

    With ``nhwc`` the result is ``[N, H, W, C_out]``, computed as an im2col product (one
    unfolded input times the weight matrix), which yields that layout directly."""
    pads = _trim_pads(conv, x, route.pool) if route is not None and route.pool is not None \
        else None
    # trimmed: pad (or crop) explicitly and run unpadded; otherwise the conv's own padding
    inp, padding = (x, _pair(conv.padding)) if pads is None else (F.pad(x, pads), (0, 0))
    if not nhwc:
        return F.conv2d(inp, weight, None, conv.stride, padding, conv.dilation)
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    h = (inp.shape[2] + 2 * padding[0] - dh * (kh - 1) - 1) // sh + 1
    w = (inp.shape[3] + 2 * padding[1] - dw * (kw - 1) - 1) // sw + 1
    cols = F.unfold(inp, (kh, kw), (dh, dw), padding, (sh, sw))  # [N, C * kh * kw, h * w]
    out = cols.transpose(1, 2) @ weight.reshape(weight.shape[0], -1).T
    return out.view(x.shape[0], h, w, weight.shape[0])
