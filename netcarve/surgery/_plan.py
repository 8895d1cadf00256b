"""Circuit surgery, step one: which channels every node of the model's fx graph must keep.

:class:`_SurgeryPlan` records the shapes of a traced model, classifies every node (layer,
channel-wise, shape-only, concatenation, barrier) and propagates the kept channels backwards
from the target; :class:`netcarve.surgery._build._Surgeon` then builds the smaller module."""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.nn.modules import batchnorm as _bn
from torch.nn.modules import dropout as _drop
from torch.nn.modules import instancenorm as _inorm
from torch.nn.modules import padding as _pad
from torch.nn.modules import pooling as _pool

from netcarve.core._channel_maps import _shape_of
from netcarve.core.errors import NetcarveError
from netcarve.core.graph import ModelGraph
from netcarve.core.layers import close_names

__all__ = ["SurgeryError"]


class SurgeryError(NetcarveError):
    """A circuit cannot be extracted: unknown target layer or channel, bad masks, or a graph
    that was not built from the model."""


# --------------------------------------------------------------------------- op tables

_UNARY_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus,
    nn.Softsign, nn.Tanhshrink, nn.Threshold, nn.LogSigmoid, nn.Hardshrink, nn.Softshrink,
    nn.Identity, nn.Upsample,
    _pool._MaxPoolNd, _pool._AvgPoolNd, _pool._AdaptiveAvgPoolNd, _pool._AdaptiveMaxPoolNd,
    _pool._LPPoolNd, _drop._DropoutNd,
    _pad._ConstantPadNd, _pad._ReflectionPadNd, _pad._ReplicationPadNd, _pad._CircularPadNd,
)
_SOFTMAX_MODULES: tuple[type[nn.Module], ...] = (nn.Softmax, nn.LogSoftmax, nn.Softmin)

# functions / methods that act on each channel of their first argument separately
_UNARY = {
    "relu", "relu_", "relu6", "leaky_relu", "leaky_relu_", "rrelu", "rrelu_", "elu", "elu_",
    "selu", "selu_", "celu", "celu_", "gelu", "silu", "mish", "sigmoid", "sigmoid_", "tanh",
    "tanh_", "hardtanh", "hardtanh_", "hardswish", "hardsigmoid", "softplus", "softsign",
    "logsigmoid", "tanhshrink", "hardshrink", "softshrink", "threshold", "threshold_", "neg",
    "neg_", "abs", "abs_", "exp", "exp_", "log", "log_", "sqrt", "sqrt_", "rsqrt", "square",
    "sign", "nan_to_num", "round", "floor", "ceil", "trunc", "dropout", "dropout1d",
    "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout", "max_pool1d",
    "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
    "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d", "lp_pool1d",
    "lp_pool2d", "interpolate", "upsample", "upsample_nearest", "upsample_bilinear", "pad",
    "contiguous", "clone", "detach", "float", "double", "half", "bfloat16", "to", "type",
    "type_as", "cpu", "cuda", "requires_grad_", "zeros_like", "ones_like", "empty_like",
    "full_like",
}
# functions whose tensor arguments are combined element by element (with broadcasting)
_ELEMENTWISE = {
    "add", "add_", "iadd", "sub", "sub_", "isub", "rsub", "mul", "mul_", "imul", "truediv",
    "itruediv", "div", "div_", "true_divide", "floordiv", "floor_divide", "maximum", "minimum",
    "fmax", "fmin", "pow", "pow_", "clamp", "clamp_", "clip", "clip_", "clamp_min",
    "clamp_max", "where", "lerp", "addcmul", "addcdiv",
}
_REDUCE = {"mean", "sum", "amax", "amin", "logsumexp", "nansum", "nanmean", "std", "var"}
_SOFTMAX = {"softmax", "log_softmax", "softmin"}
_RESHAPE = {"view", "reshape", "squeeze", "unsqueeze", "view_as", "reshape_as", "unflatten"}
_CAT = {"cat", "concat", "concatenate"}
_INPLACE_OPERATORS = {
    "iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "iand", "ior", "ixor",
    "ilshift", "irshift", "imatmul",
}
_HOOK_DICTS = (
    "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
    "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called",
)
_STANDARD_CONVS: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


# --------------------------------------------------------------------------- small helpers


def _op_name(node: torch.fx.Node) -> str | None:
    """Short name of a torch / operator function or of a Tensor method; None otherwise."""
    if node.op == "call_method":
        return str(node.target)
    if node.op != "call_function":
        return None
    target = node.target
    module = getattr(target, "__module__", None) or ""
    if module and not (module.startswith("torch") or module in ("_operator", "operator")):
        return None  # a user function that happens to share a name
    return getattr(target, "__name__", None)


def _node_args(args: Any, kwargs: Any) -> list[torch.fx.Node]:
    """The fx nodes among (nested) arguments, in order, without duplicates."""
    found: list[torch.fx.Node] = []

    def visit(n: torch.fx.Node) -> torch.fx.Node:
        if n not in found:
            found.append(n)
        return n

    torch.fx.node.map_arg((args, kwargs), visit)
    return found


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], index: int, name: str) -> Any:
    """Argument ``name`` given by keyword or at position ``index`` (None if absent)."""
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else None


def _dims(raw: Any, ndim: int) -> list[int] | None:
    """A ``dim`` argument as non-negative ints (None when absent or not constant)."""
    if isinstance(raw, int):
        raw = [raw]
    if not isinstance(raw, (list, tuple)) or not raw or not all(isinstance(d, int) for d in raw):
        return None
    return [d % ndim for d in raw]


# --------------------------------------------------------------------------- analysis


@dataclass
class _Rec:
    """How one fx node is treated.

    kinds: ``source`` (model input, constant attribute: produces all channels), ``layer``,
    ``norm`` (a module with per-channel tensors: sliced), ``unary`` (channel-wise on its first
    argument), ``elementwise`` (channel-aligned tensor arguments, with broadcasting),
    ``reshape``, ``cat`` (along channels), ``barrier`` (not understood: all channels in, all
    out), ``opaque`` (not a feature map: sizes, tuples; kept as is).
    """

    kind: str
    layout: tuple[int, int] | None = None  # (channels, spatial); dim 1 = channels * spatial
    first: torch.fx.Node | None = None
    roles: dict[torch.fx.Node, str] = field(default_factory=dict)  # aligned / full / keep
    parts: list[torch.fx.Node] = field(default_factory=list)
    tail: tuple[int, ...] | None = None  # reshape through the helper (None: original op)
    spatial_in: int = 1
    mismatch: bool = False  # layer: input layout differs from the graph's view


class _Stop(Exception):
    """Ends the shape-recording run after the target node."""


class _ShapeRecorder(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, stop: torch.fx.Node) -> None:
        super().__init__(gm)
        self.stop = stop
        self.shapes: dict[torch.fx.Node, Any] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        result = super().run_node(n)
        self.shapes[n] = _shape_of(result)
        if n is self.stop:
            raise _Stop
        return result


def _unknown_layer(name: str, graph: ModelGraph, model: nn.Module | None = None) -> str:
    module = dict(model.named_modules()).get(name) if model is not None and name else None
    if module is not None:
        return (f"target layer '{name}' is a {type(module).__name__}, not a conv/linear layer; "
                f"pick one of the graph's layers (ModelGraph.layers), e.g. "
                f"{', '.join(close_names(str(name), graph.layers, 3)) or next(iter(graph.layers))}")
    hint = close_names(str(name), graph.layers)
    return (f"unknown target layer '{name}'"
            + (f"; did you mean {', '.join(hint)}?" if hint else "")
            + f" (the graph has {len(graph.layers)} conv/linear layers: ModelGraph.layers)")


class _SurgeryPlan:
    """Plans one extraction: the channels every node keeps (see
    :func:`netcarve.surgery.extract.extract_module`)."""

    def __init__(
        self,
        model: nn.Module,
        graph: ModelGraph,
        masks: dict[str, torch.Tensor],
        target_layer: str,
        channels: list[int],
        example_input: torch.Tensor | None,
    ) -> None:
        self.model = model
        self.graph = graph
        self.masks = masks
        self.target_layer = target_layer
        self.channels = channels
        self.modules = dict(model.named_modules())
        traced = graph.traced
        if traced is None:
            raise SurgeryError("the graph keeps no traced module (ModelGraph.traced is None); "
                               "build it with ModelGraph.build(model, example_input)")
        self.traced = traced
        target_nodes = [n for n in traced.graph.nodes
                        if n.op == "call_module" and n.target == target_layer]
        if not target_nodes:
            raise SurgeryError(f"layer '{target_layer}' is not called in the traced graph; was "
                               "the graph built from this model?")
        self.target = target_nodes[0]
        nodes = list(traced.graph.nodes)
        self.order = nodes[: nodes.index(self.target) + 1]
        self.placeholders = [n for n in nodes if n.op == "placeholder"]
        for n in self.order:
            if n.op == "call_function" and n.target is operator.setitem:
                raise SurgeryError(
                    f"the model assigns into a tensor in place (fx node '{n.name}', "
                    "x[...] = v) before the target layer; surgery cannot follow that. "
                    "Rewrite it without item assignment (e.g. torch.where or torch.cat)."
                )
        self.shapes = self._record_shapes(example_input)
        self.eff: dict[torch.fx.Node, tuple[tuple[Any, ...], dict[str, Any]]] = {}
        self._resolve_inplace()
        self.recs: dict[torch.fx.Node, _Rec] = {}
        for n in self.order:
            self.recs[n] = self._classify(n)

    # ------------------------------------------------------------------ preparation

    def _record_shapes(self, example_input: torch.Tensor | None) -> dict[torch.fx.Node, Any]:
        from netcarve.core.hooks import preserved_state

        if example_input is None:
            param = next(iter(self.model.parameters()), None)
            dtype = param.dtype if param is not None else torch.float32
            device = param.device if param is not None else torch.device("cpu")
            example_input = torch.zeros(1, *self.graph.input_shape, dtype=dtype, device=device)
        recorder = _ShapeRecorder(self.traced, self.target)
        with preserved_state(self.traced), torch.no_grad():
            self.traced.eval()
            try:
                recorder.run(example_input)
            except _Stop:
                pass
            except Exception as exc:
                raise SurgeryError(
                    f"running the traced model on an example input of shape "
                    f"{tuple(example_input.shape)} failed: {type(exc).__name__}: {exc}"
                ) from None
        return recorder.shapes

    def _is_inplace(self, n: torch.fx.Node) -> bool:
        if n.kwargs.get("inplace") is True:
            return True
        if n.op == "call_module":
            return bool(getattr(self.modules.get(str(n.target)), "inplace", False))
        name = _op_name(n)
        if name is None:
            return False
        return name in _INPLACE_OPERATORS or (name.endswith("_") and not name.startswith("_"))

    def _resolve_inplace(self) -> None:
        """Arguments as each node really sees them: after an in-place operation on a tensor,
        later readers of that tensor read the operation's result."""
        latest: dict[torch.fx.Node, torch.fx.Node] = {}
        for n in self.order:
            args = torch.fx.node.map_arg(n.args, lambda a: latest.get(a, a))
            kwargs = torch.fx.node.map_arg(n.kwargs, lambda a: latest.get(a, a))
            self.eff[n] = (tuple(args), dict(kwargs))
            if self._is_inplace(n) and args and isinstance(args[0], torch.fx.Node):
                base = args[0]
                for key, value in list(latest.items()):
                    if value is base:
                        latest[key] = n
                latest[base] = n
                if isinstance(n.args[0], torch.fx.Node):
                    latest[n.args[0]] = n

    # ------------------------------------------------------------------ classification

    def _layout(self, n: Any) -> tuple[int, int] | None:
        rec = self.recs.get(n) if isinstance(n, torch.fx.Node) else None
        return rec.layout if rec is not None else None

    def _tensor_layout(self, n: torch.fx.Node) -> tuple[int, int] | None:
        shape = self.shapes.get(n)
        if isinstance(shape, tuple) and len(shape) >= 2:
            return (shape[1], 1)
        return None

    def _barrier(self, n: torch.fx.Node, kind: str = "barrier") -> _Rec:
        args, kwargs = self.eff[n]
        roles = {a: ("full" if self._layout(a) is not None else "keep")
                 for a in _node_args(args, kwargs)}
        layout = self._tensor_layout(n) if kind == "barrier" else None
        return _Rec(kind, layout, roles=roles)

    def _classify(self, n: torch.fx.Node) -> _Rec:
        shape = self.shapes.get(n)
        if n.op in ("placeholder", "get_attr"):
            return _Rec("source", self._tensor_layout(n))
        if n.op == "output":
            return _Rec("opaque")
        args, kwargs = self.eff[n]
        name = _op_name(n)
        if name in ("size", "dim") and args:
            # x.size(0), x.size(2), x.dim() read no channel: any channel subset will do
            rec = self._barrier(n, "opaque")
            dim = _arg(args, kwargs, 1, "dim")
            first_shape = self.shapes.get(args[0])
            if name == "dim" or (isinstance(dim, int) and isinstance(first_shape, tuple)
                                 and dim % len(first_shape) != 1):
                rec.roles[args[0]] = "keep"
            return rec
        if not isinstance(shape, tuple):
            return self._barrier(n, "opaque")  # sizes, tuples: kept as they are
        if n.op == "call_module":
            return self._classify_module(n, self.modules.get(str(n.target)), args)
        if name is None:
            return self._barrier(n)
        if name in _UNARY:
            return self._unary(n, args, kwargs)
        if name in _ELEMENTWISE or (name in ("max", "min") and len(_node_args(args, kwargs)) == 2):
            return self._elementwise(n, args, kwargs)
        if name in _REDUCE:
            first = self.shapes.get(args[0]) if args else None
            raw = kwargs.get("dim", kwargs.get("axis", args[1] if len(args) > 1 else None))
            dims = _dims(raw, len(first)) if isinstance(first, tuple) else None
            if dims and min(dims) >= 2:
                return self._unary(n, args, kwargs)
            return self._barrier(n)
        if name in _SOFTMAX:
            dims = _dims(_arg(args, kwargs, 1, "dim"), len(shape))
            return self._unary(n, args, kwargs) if dims and dims[0] >= 2 else self._barrier(n)
        if name in _RESHAPE or name == "flatten":
            return self._reshape(n, args, keep_op=name == "flatten")
        if name in _CAT:
            return self._cat(n, args, kwargs)
        return self._barrier(n)

    def _classify_module(self, n: torch.fx.Node, mod: nn.Module | None,
                         args: tuple[Any, ...]) -> _Rec:
        name = str(n.target)
        if mod is None:
            raise SurgeryError(f"the model has no module '{name}' that the traced graph calls; "
                               "was the graph built from this model?")
        if name in self.graph.layers:
            return self._layer(n, mod, args)
        if isinstance(mod, (nn.Flatten, nn.Unflatten)):
            return self._reshape(n, args, keep_op=isinstance(mod, nn.Flatten))
        if isinstance(mod, _SOFTMAX_MODULES):
            shape = self.shapes[n]
            dims = _dims(getattr(mod, "dim", None), len(shape))
            return self._unary(n, args, {}) if dims and dims[0] >= 2 else self._barrier(n)
        if isinstance(mod, (_bn._BatchNorm, _inorm._InstanceNorm, nn.PReLU)):
            rec = self._unary(n, args, {})
            if rec.kind == "unary" and self._channel_tensors(mod, n):
                rec.kind = "norm"
            return rec
        if isinstance(mod, _UNARY_MODULES):
            return self._unary(n, args, {})
        return self._barrier(n)

    def _channel_tensors(self, mod: nn.Module, n: torch.fx.Node) -> list[str]:
        """Names of ``mod``'s own 1-D tensors with one entry per channel of its output."""
        width = self.shapes[n][1]
        found = []
        for pname, tensor in [*mod.named_parameters(recurse=False),
                              *mod.named_buffers(recurse=False)]:
            if tensor is not None and tensor.dim() == 1 and tensor.shape[0] == width > 1:
                found.append(pname)
        return found

    def _unary(self, n: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Rec:
        shape = self.shapes[n]
        first = args[0] if args else None
        layout = self._layout(first)
        in_shape = self.shapes.get(first) if isinstance(first, torch.fx.Node) else None
        if (layout is None or not isinstance(shape, tuple) or len(shape) < 2
                or not isinstance(in_shape, tuple) or in_shape[1] != shape[1]):
            return self._barrier(n)
        assert isinstance(first, torch.fx.Node)
        roles = {a: "keep" for a in _node_args(args[1:], kwargs)}
        roles[first] = "aligned"
        return _Rec("unary", layout, first=first, roles=roles)

    def _elementwise(self, n: torch.fx.Node, args: tuple[Any, ...],
                     kwargs: dict[str, Any]) -> _Rec:
        shape = self.shapes[n]
        if len(shape) < 2:
            return self._barrier(n)
        width, ndim = shape[1], len(shape)
        roles: dict[torch.fx.Node, str] = {}
        layouts = set()
        for a in _node_args(args, kwargs):
            a_shape = self.shapes.get(a)
            if not isinstance(a_shape, tuple):
                roles[a] = "keep"
                continue
            axis = 1 - (ndim - len(a_shape))
            if axis < 0 or a_shape[axis] == 1:
                roles[a] = "full" if self._layout(a) is not None else "keep"
            elif axis == 1 and a_shape[1] == width and self._layout(a) is not None:
                roles[a] = "aligned"
                layouts.add(self._layout(a))
            else:
                return self._barrier(n)
        if len(layouts) != 1:
            return self._barrier(n)
        first = next(a for a, role in roles.items() if role == "aligned")
        return _Rec("elementwise", layouts.pop(), first=first, roles=roles)

    def _reshape(self, n: torch.fx.Node, args: tuple[Any, ...], keep_op: bool) -> _Rec:
        shape = self.shapes[n]
        first = args[0] if args else None
        layout = self._layout(first)
        in_shape = self.shapes.get(first) if isinstance(first, torch.fx.Node) else None
        if (layout is None or not isinstance(in_shape, tuple) or len(shape) < 2
                or shape[0] != in_shape[0]):
            return self._barrier(n)
        assert isinstance(first, torch.fx.Node)
        channels, spatial = layout
        block = spatial * math.prod(in_shape[2:])
        rest = math.prod(shape[2:])
        if rest == 0 or block % rest or channels * (block // rest) != shape[1]:
            return self._barrier(n)
        rec = _Rec("reshape", (channels, block // rest), first=first, roles={first: "aligned"},
                   spatial_in=spatial)
        if not keep_op:
            rec.tail = tuple(shape[2:])
        return rec

    def _cat(self, n: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Rec:
        shape = self.shapes[n]
        tensors = _arg(args, kwargs, 0, "tensors")
        dim = _arg(args, kwargs, 1, "dim")
        dim = 0 if dim is None else dim
        if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int) or len(shape) < 2:
            return self._barrier(n)
        if dim % len(shape) != 1:
            return self._elementwise(n, args, kwargs)
        parts = list(tensors)
        layouts = [self._layout(p) for p in parts]
        if not all(isinstance(p, torch.fx.Node) for p in parts) or any(
            lay is None for lay in layouts
        ):
            return self._barrier(n)
        spatials = {lay[1] for lay in layouts if lay is not None}
        channels = sum(lay[0] for lay in layouts if lay is not None)
        if len(spatials) != 1:
            return self._barrier(n)
        spatial = spatials.pop()
        if channels * spatial != shape[1]:
            return self._barrier(n)
        return _Rec("cat", (channels, spatial), first=parts[0],
                    roles=dict.fromkeys(parts, "aligned"), parts=parts)

    def _layer(self, n: torch.fx.Node, mod: nn.Module, args: tuple[Any, ...]) -> _Rec:
        name = str(n.target)
        info = self.graph.layers[name]
        weight = getattr(mod, "weight", None)
        columns = (info.in_channels // info.groups if info.kind == "conv"
                   else info.in_channels * info.spatial)
        expected = (info.out_channels, columns)
        if not isinstance(weight, torch.Tensor) or tuple(weight.shape[:2]) != expected:
            got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else None
            raise SurgeryError(
                f"layer '{name}' of the model has weight shape {got}, but the graph expects "
                f"{expected} in its first two dimensions: was the graph built from this model?"
            )
        first = args[0] if args else None
        if info.channels_last and isinstance(first, torch.fx.Node):
            # channels on the last dim (ConvNeXt's pointwise Linears): kept whole, its
            # kernel masks applied; what follows it is followed as a barrier
            rec = _Rec("layer", None, first=first, roles={first: "full"})
            rec.mismatch = True
            return rec
        if not isinstance(first, torch.fx.Node) or self._layout(first) is None:
            raise SurgeryError(f"layer '{name}' is not called on a feature map")
        graph_view = (info.in_channels, info.spatial)
        rec = _Rec("layer", (info.out_channels, 1), first=first, roles={first: "aligned"})
        rec.mismatch = self._layout(first) != graph_view
        return rec

    # ------------------------------------------------------------------ planning

    def _mask(self, name: str) -> torch.Tensor:
        mask = self.masks.get(name)
        if mask is None:
            return torch.ones(self.graph.layers[name].mask_shape, dtype=torch.bool)
        return mask

    def _cheapest_row(self, name: str) -> int:
        """The output channel with the fewest kept kernels (a dead one when there is one)."""
        return int(torch.argmin(self._mask(name).sum(dim=1)).item())

    def _full(self, n: torch.fx.Node) -> list[int] | None:
        layout = self._layout(n)
        return list(range(layout[0])) if layout is not None else None

    def plan(self) -> None:
        """Backward pass: which channels every node must produce (``self.kept``)."""
        requests: dict[torch.fx.Node, list[list[int] | None]] = {self.target: []}
        self.kept: dict[torch.fx.Node, list[int] | None] = {}
        self.shape_only: set[torch.fx.Node] = set()
        self.layer_inputs: dict[torch.fx.Node, list[int] | None] = {}
        self.alive: set[torch.fx.Node] = set()

        def ask(node: torch.fx.Node, want: list[int] | None) -> None:
            requests.setdefault(node, []).append(want)

        for n in reversed(self.order):
            if n not in requests:
                continue
            self.alive.add(n)
            rec = self.recs[n]
            lists = [r for r in requests[n] if r is not None]
            union = sorted(set().union(*lists)) if lists else []
            if rec.kind in ("source", "barrier", "opaque"):
                self.kept[n] = self._full(n)
                for a, role in rec.roles.items():
                    ask(a, self._full(a) if role == "full" else None)
                continue
            if rec.kind == "layer":
                self._plan_layer(n, rec, union, ask)
                continue
            if not union and rec.kind != "elementwise":
                self.shape_only.add(n)  # channels chosen when building (any one will do)
                for a, role in rec.roles.items():
                    if role != "aligned" or a is rec.first:
                        ask(a, None)
                continue
            union = union or [0]
            self.kept[n] = union
            if rec.kind == "cat":
                offset = 0
                for part in rec.parts:
                    assert rec.layout is not None
                    width = self._layout(part)[0]  # type: ignore[index]
                    sub = [c - offset for c in union if offset <= c < offset + width]
                    if sub:
                        ask(part, sub)
                    offset += width
                continue
            for a, role in rec.roles.items():
                if role == "aligned":
                    ask(a, union)
                elif role == "full":
                    ask(a, self._full(a))
                else:
                    ask(a, None)

    def _plan_layer(self, n: torch.fx.Node, rec: _Rec, union: list[int], ask: Any) -> None:
        name = str(n.target)
        info = self.graph.layers[name]
        assert rec.first is not None
        if info.channels_last:
            if n is self.target:
                raise SurgeryError(
                    f"'{name}' is a channels-last Linear (its channels are the last dim of an "
                    "[N, H, W, C] tensor); a standalone circuit module cannot end at it yet. "
                    "Target the next conv, or use the masked model (apply_kernel_masks).")
            self.kept[n] = list(range(info.out_channels))
            self.layer_inputs[n] = list(range(info.in_channels))
            ask(rec.first, self._full(rec.first))
            return
        # the target computes its channels; a layer asked only for its shape, its cheapest row
        rows = list(self.channels) if n is self.target else union or [self._cheapest_row(name)]
        if info.groups > 1:
            if rec.mismatch:
                rows = list(range(info.out_channels))
                self.kept[n] = rows
                self.layer_inputs[n] = self._full(rec.first)
                ask(rec.first, self._full(rec.first))
                return
            per_out = info.out_channels // info.groups
            per_in = info.in_channels // info.groups
            kept_groups = sorted({r // per_out for r in rows})
            rows = [g * per_out + k for g in kept_groups for k in range(per_out)]
            inputs: list[int] | None = [g * per_in + j for g in kept_groups
                                        for j in range(per_in)]
        elif rec.mismatch:
            inputs = self._full(rec.first)
        else:
            used = self._mask(name)[torch.tensor(rows, dtype=torch.long)].any(dim=0)
            inputs = torch.nonzero(used).flatten().tolist() or None
        self.kept[n] = rows
        self.layer_inputs[n] = inputs
        ask(rec.first, inputs)
