"""Receptive fields: which input pixels a unit (or a layer position) can see, computed by walking
the traced graph backwards through convolutions, pooling and resampling."""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.fx
from torch import nn

from netcarve.core.graph import ModelGraph
from netcarve.core.hooks import preserved_state

if TYPE_CHECKING:
    pass

from netcarve.viz.parameterization import FeatureVizError
from netcarve.viz.render import _device_dtype

__all__ = ["ReceptiveFieldError", "receptive_field"]


class ReceptiveFieldError(FeatureVizError):
    """The receptive field cannot be followed through some operation of the model."""


# --------------------------------------------------------------------------- receptive fields

_SHAPES: weakref.WeakKeyDictionary[ModelGraph, dict[torch.fx.Node, Any]] = (
    weakref.WeakKeyDictionary())


class _Shapes(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__(gm)
        self.shapes: dict[torch.fx.Node, Any] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            self.shapes[n] = tuple(result.shape)
        elif isinstance(result, (tuple, list)):
            self.shapes[n] = [tuple(r.shape) if isinstance(r, torch.Tensor) else None
                              for r in result]
        return result


def _node_shapes(graph: ModelGraph) -> dict[torch.fx.Node, Any]:
    cached = _SHAPES.get(graph)
    if cached is not None:
        return cached
    gm = graph.traced
    if gm is None:
        raise ReceptiveFieldError("the graph has no fx trace")
    device, dtype = _device_dtype(gm)
    rec = _Shapes(gm)
    with preserved_state(gm), torch.no_grad():
        gm.eval()
        rec.run(torch.zeros(1, *graph.input_shape, device=device, dtype=dtype))
    _SHAPES[graph] = rec.shapes
    return rec.shapes


def _spatial(shape: Any) -> tuple[int, int] | None:
    if isinstance(shape, tuple) and len(shape) == 4:
        return shape[2], shape[3]
    return None


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return int(v[0]), int(v[-1])
    return int(v), int(v)


# intervals: (ylo, yhi, xlo, xhi), inclusive int64 tensors [P]; None = "everything"
_Ivl = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None


def _window(ivl: tuple[torch.Tensor, ...], kernel: tuple[int, int], stride: tuple[int, int],
            padding: tuple[int, int], dilation: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    ylo, yhi, xlo, xhi = ivl
    return (ylo * stride[0] - padding[0],
            yhi * stride[0] - padding[0] + dilation[0] * (kernel[0] - 1),
            xlo * stride[1] - padding[1],
            xhi * stride[1] - padding[1] + dilation[1] * (kernel[1] - 1))


def _adaptive(ivl: tuple[torch.Tensor, ...], size_in: tuple[int, int],
              size_out: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    ylo, yhi, xlo, xhi = ivl
    (hi_, wi), (ho, wo) = size_in, size_out
    # output i pools input [floor(i*In/Out), ceil((i+1)*In/Out) - 1]
    return ((ylo * hi_) // ho, -((-(yhi + 1) * hi_) // ho) - 1,
            (xlo * wi) // wo, -((-(xhi + 1) * wi) // wo) - 1)


def _conv_padding(mod: nn.Module, kernel: tuple[int, int], dilation: tuple[int, int]
                  ) -> tuple[int, int]:
    pad = mod.padding  # type: ignore[attr-defined]
    if pad == "valid":
        return 0, 0
    if pad == "same":
        return tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation, strict=True))  # type: ignore[return-value]
    return _pair(pad)


def _arg_nodes(node: torch.fx.Node) -> list[torch.fx.Node]:
    found: list[torch.fx.Node] = []
    torch.fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) or n)
    return found


def _short(node: torch.fx.Node) -> str:
    target = node.target
    if node.op == "call_method":
        return str(target)
    return getattr(target, "__name__", str(target))


def _back(node: torch.fx.Node, ivl: _Ivl, modules: dict[str, nn.Module],
          shapes: dict[torch.fx.Node, Any]) -> list[tuple[torch.fx.Node, _Ivl]]:
    """Intervals of the inputs of ``node`` that its output intervals depend on."""
    args = _arg_nodes(node)
    if ivl is None:  # a non-spatial output depends on all of its inputs
        return [(a, None) for a in args]
    out_size = _spatial(shapes.get(node))
    first = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
    if node.op == "call_module":
        mod = modules[str(node.target)]
        if isinstance(mod, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)) and first is not None:
            if isinstance(mod, nn.Conv2d):
                kernel, stride = _pair(mod.kernel_size), _pair(mod.stride)
                dilation = _pair(mod.dilation)
                if mod.padding_mode == "circular":
                    raise ReceptiveFieldError(
                        f"circular padding in '{node.target}' wraps the receptive field around "
                        "the image; no box describes it")
                padding = _conv_padding(mod, kernel, dilation)
            else:
                kernel = _pair(mod.kernel_size)
                stride = _pair(mod.stride if mod.stride is not None else mod.kernel_size)
                padding = _pair(mod.padding)
                dilation = _pair(getattr(mod, "dilation", 1))
            return [(first, _window(ivl, kernel, stride, padding, dilation))]
        if isinstance(mod, nn.ConvTranspose2d) and first is not None:
            kernel, stride = _pair(mod.kernel_size), _pair(mod.stride)
            padding, dilation = _pair(mod.padding), _pair(mod.dilation)
            ylo, yhi, xlo, xhi = ivl
            return [(first, (
                -((-(ylo + padding[0] - dilation[0] * (kernel[0] - 1))) // stride[0]),
                (yhi + padding[0]) // stride[0],
                -((-(xlo + padding[1] - dilation[1] * (kernel[1] - 1))) // stride[1]),
                (xhi + padding[1]) // stride[1]))]
        if isinstance(mod, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) and first is not None:
            return [(first, _adaptive(ivl, _spatial(shapes[first]), out_size))]  # type: ignore[arg-type]
        if isinstance(mod, (nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d,
                            nn.ReplicationPad2d)) and first is not None:
            left, _, top, _ = mod.padding  # type: ignore[misc]
            ylo, yhi, xlo, xhi = ivl
            return [(first, (ylo - top, yhi - top, xlo - left, xhi - left))]
        if isinstance(mod, nn.Upsample) and first is not None:
            return [(first, _resample(ivl, _spatial(shapes[first]), out_size))]  # type: ignore[arg-type]
    if node.op in ("call_function", "call_method"):
        short = _short(node)
        if short in ("max_pool2d", "avg_pool2d") and first is not None:
            kw = dict(zip(("kernel_size", "stride", "padding", "dilation"), node.args[1:],
                          strict=False))
            kw.update(node.kwargs)
            kernel = _pair(kw["kernel_size"])
            stride = _pair(kw.get("stride") or kw["kernel_size"])
            return [(first, _window(ivl, kernel, stride, _pair(kw.get("padding", 0)),
                                    _pair(kw.get("dilation", 1))))]
        if short in ("adaptive_avg_pool2d", "adaptive_max_pool2d") and first is not None:
            return [(first, _adaptive(ivl, _spatial(shapes[first]), out_size))]  # type: ignore[arg-type]
        if short in ("interpolate", "upsample", "upsample_nearest", "upsample_bilinear") \
                and first is not None:
            return [(first, _resample(ivl, _spatial(shapes[first]), out_size))]  # type: ignore[arg-type]
        if short == "conv2d" and first is not None:
            raise ReceptiveFieldError("functional conv2d is not followed; use nn.Conv2d")
        if short == "pad" and first is not None:
            pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
            left, top = int(pad[0]), int(pad[2]) if len(pad) > 2 else 0
            ylo, yhi, xlo, xhi = ivl
            return [(first, (ylo - top, yhi - top, xlo - left, xhi - left))]
    # element-wise / channel-wise: spatially aligned operands keep the interval
    out: list[tuple[torch.Tensor | Any, _Ivl]] = []
    for a in args:
        size = _spatial(shapes.get(a))
        if size is None:
            sub = shapes.get(a)
            sizes = {_spatial(s) for s in sub} if isinstance(sub, list) else set()
            size = sizes.pop() if len(sizes) == 1 else None
        if size is None:
            if isinstance(shapes.get(a), tuple):
                out.append((a, None))  # a non-spatial tensor (e.g. a gate's input): all of it
            continue  # not a tensor (a size, a constant)
        if size == out_size:
            out.append((a, ivl))
        elif size == (1, 1):
            empty = _is_empty(ivl)
            lo = torch.where(empty, _EMPTY, 0)
            hi = torch.where(empty, -_EMPTY, 0)
            out.append((a, (lo, hi, lo.clone(), hi.clone())))
        else:
            raise ReceptiveFieldError(
                f"cannot follow the receptive field through '{node.name}' ({_short(node)}): it "
                f"maps a {size[0]}×{size[1]} map to {out_size}")
    return out


def _resample(ivl: tuple[torch.Tensor, ...], size_in: tuple[int, int],
              size_out: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """Conservative (superset) interval for nearest/bilinear resampling."""
    ylo, yhi, xlo, xhi = ivl
    (hi_, wi), (ho, wo) = size_in, size_out
    return ((ylo * hi_) // ho - 1, -((-(yhi + 1) * hi_) // ho),
            (xlo * wi) // wo - 1, -((-(xhi + 1) * wi) // wo))


def receptive_field(
    graph: ModelGraph,
    layer: str,
    positions: tuple[int, int] | Sequence[tuple[int, int]] | torch.Tensor | None = None,
    *,
    clip: bool = True,
) -> tuple[int, int, int, int] | torch.Tensor:
    """Input box that a layer position can see: ``(y0, x0, y1, x1)``, half-open, clipped.

    The box is derived from the graph's fx trace by walking back from ``layer`` to the input:
    convolutions and pooling map an output interval ``[lo, hi]`` to
    ``[lo·s − p, hi·s − p + d·(k − 1)]`` (kernel k, stride s, padding p, dilation d), adaptive
    pooling to the exact pooled range, padding shifts it, element-wise operations and residual
    additions pass it to every spatially aligned operand (a 1×1 operand, e.g. a gate, depends on
    its whole input), and a flatten/Linear depends on everything. Branches are merged by the
    enclosing box. Every interval is clipped to its map, so the box is clipped to the image.
    Exact for conv/pool stacks (also with residual branches); interpolation gives a
    conservative (larger) box.

    Args:
        graph: the model's graph.
        layer: a conv/linear layer, or any module called once in forward.
        positions: one ``(y, x)``, a list of them, or an int tensor ``[P, 2]``; ``None`` is the
            centre of the layer's output map.
        clip: clip every interval to its map (default). ``clip=False`` gives the theoretical
            field, which may extend into the padding (negative or too large coordinates): all
            fields of a conv/pool stack then have the same size.

    Returns:
        for a single ``(y, x)`` (or None) a tuple ``(y0, x0, y1, x1)`` with
        ``image[..., y0:y1, x0:x1]`` the field; otherwise an int64 tensor ``[P, 4]``. A
        layer without a spatial map (Linear) sees the whole image; a position that sees only
        padding gets the empty box ``(0, 0, 0, 0)``.

    Raises:
        GraphError: unknown layer (close names listed).
        ReceptiveFieldError: a position outside the layer's map, a non-image input, or an
            operation the walk cannot follow (functional conv2d, circular padding).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.MaxPool2d(2),
        ...                     nn.Conv2d(2, 2, 3))
        >>> g = ModelGraph.build(net, torch.zeros(1, 1, 16, 16))
        >>> receptive_field(g, "2", (0, 0))
        (0, 0, 7, 7)
    """
    gm = graph.traced
    if gm is None or len(graph.input_shape) != 3:
        raise ReceptiveFieldError("receptive fields need a graph of a model on [C, H, W] images")
    node = next((n for n in gm.graph.nodes
                 if n.op == "call_module" and str(n.target) == layer), None)
    if node is None:
        graph.layer(layer)  # raises with close names when it is no layer at all
        raise ReceptiveFieldError(f"'{layer}' is not called in forward")
    shapes = _node_shapes(graph)
    size_out = _spatial(shapes.get(node))
    single = positions is None or (isinstance(positions, tuple) and len(positions) == 2
                                   and all(isinstance(v, int) for v in positions))
    height, width = graph.input_shape[1], graph.input_shape[2]
    if size_out is None:  # Linear: all of the image
        n = 1 if single else len(torch.as_tensor(positions))
        full = torch.tensor([[0, 0, height, width]] * n, dtype=torch.int64)
        return tuple(full[0].tolist()) if single else full  # type: ignore[return-value]
    if positions is None:
        positions = (size_out[0] // 2, size_out[1] // 2)
    pos = torch.as_tensor(positions, dtype=torch.int64).reshape(-1, 2)
    bad = (pos[:, 0] < 0) | (pos[:, 0] >= size_out[0]) | (pos[:, 1] < 0) | (
        pos[:, 1] >= size_out[1])
    if bool(bad.any()):
        y, x = pos[bad][0].tolist()
        raise ReceptiveFieldError(
            f"position ({y}, {x}) outside {layer}'s {size_out[0]}×{size_out[1]} map "
            f"(y in 0..{size_out[0] - 1}, x in 0..{size_out[1] - 1})")
    modules = dict(gm.named_modules())
    order = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(order)}
    pending: dict[torch.fx.Node, _Ivl] = {node: (pos[:, 0], pos[:, 0].clone(), pos[:, 1],
                                                 pos[:, 1].clone())}
    result: _Ivl | bool = False
    for current in reversed(order[: index[node] + 1]):
        if current not in pending:
            continue
        ivl = pending.pop(current)
        if current.op == "placeholder":
            result = ivl if result is False else _hull(result, ivl)  # type: ignore[arg-type]
            continue
        for arg, sub in _back(current, ivl, modules, shapes):
            size = _spatial(shapes.get(arg))
            if clip and sub is not None and size is not None:
                sub = _clip(sub, size)
            pending[arg] = sub if arg not in pending else _hull(pending[arg], sub)
    if result is False:
        raise ReceptiveFieldError(f"'{layer}' does not depend on the model input")
    if result is None:
        boxes = torch.tensor([[0, 0, height, width]] * len(pos), dtype=torch.int64)
    else:
        ylo, yhi, xlo, xhi = result  # type: ignore[misc]
        boxes = torch.stack([ylo, xlo, yhi + 1, xhi + 1], dim=1)
        boxes[_is_empty(result)] = 0  # type: ignore[arg-type]  # sees only padding
    return tuple(int(v) for v in boxes[0]) if single else boxes  # type: ignore[return-value]


# An empty interval (a position that sees only padding) is (_EMPTY, -_EMPTY): every map of
# the walk is monotone with a positive slope, so it stays empty, and a hull ignores it.
_EMPTY = 2**40


def _is_empty(ivl: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return (ivl[0] > ivl[1]) | (ivl[2] > ivl[3])


def _clip(ivl: tuple[torch.Tensor, ...], size: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """Intersect with the map ``[0, size)``; positions left with nothing become empty."""
    ylo, yhi = ivl[0].clamp(min=0), ivl[1].clamp(max=size[0] - 1)
    xlo, xhi = ivl[2].clamp(min=0), ivl[3].clamp(max=size[1] - 1)
    empty = (ylo > yhi) | (xlo > xhi)
    big = torch.full_like(ylo, _EMPTY)
    return (torch.where(empty, big, ylo), torch.where(empty, -big, yhi),
            torch.where(empty, big, xlo), torch.where(empty, -big, xhi))


def _hull(a: _Ivl, b: _Ivl) -> _Ivl:
    if a is None or b is None:
        return None
    return (torch.minimum(a[0], b[0]), torch.maximum(a[1], b[1]),
            torch.minimum(a[2], b[2]), torch.maximum(a[3], b[3]))
