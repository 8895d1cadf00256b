"""Circuit surgery: cut a circuit out of a model as a standalone, physically smaller module.

:func:`extract_module` takes a model, its :class:`~netcarve.graph.ModelGraph`, kernel masks
and a target (a layer and some of its output channels) and returns a :class:`CircuitModule`:
an ordinary ``nn.Module`` (it wraps a :class:`torch.fx.GraphModule`) that computes the target
layer's raw output on the target channels, in the given order, and nothing else.

Semantics (the project's documented convention): masking zeroes kernel *weights* only;
biases and BatchNorm parameters stay. A channel whose kernels are all masked therefore still
emits a constant map (bias → BatchNorm → activation), and with zero padding downstream that
constant produces border effects. The extracted module reproduces this exactly: its output
equals the target layer's output of the model in eval mode under
:func:`~netcarve.hooks.apply_kernel_masks` (up to float rounding, since the sums run over
fewer terms), restricted to the target channels.

What is kept:

* only the part of the model's fx graph that the target depends on (no layer after it);
* in every conv/linear layer, the output channels needed downstream (by a kept kernel, a
  residual addition, a concatenation or the target) and the input channels some kept kernel
  of those outputs reads. Masked kernels inside the kept rows and columns stay as zero
  weights. A needed channel without any kept kernel keeps its row (all zeros) so that it emits
  its bias / BatchNorm constant; when a whole layer has no kept kernel in its needed rows it
  still reads one input channel (with zero weights) to learn the spatial size;
* BatchNorm (also InstanceNorm, per-channel PReLU) sliced to the channels kept, statistics and
  ``eps``/``momentum`` copied; activations, pooling, dropout, padding pass through;
* residual additions see both operands on the same channel subset; concatenations get their
  parts' subsets with offsets remapped; a Linear after a flatten keeps whole ``spatial``
  blocks of columns per input channel;
* grouped convolutions keep whole groups (all outputs and inputs of every group that has a
  needed output channel); a depthwise conv therefore keeps the same set of inputs and outputs.

Anything the surgery does not understand (an unknown module or function between layers) is
kept whole with all its input channels: the result stays exact, only less small. Nothing of the
user's model is shared or changed: every tensor is a copy.

Limitations: reshapes other than ``flatten`` (``view``, ``reshape``, ``unsqueeze``) use the
trailing sizes seen on the example input; an in-place operation on a *view* of a tensor that is
read again later is not followed (the same limitation as the channel graph).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from netcarve.graph import ModelGraph
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3))
    >>> graph = ModelGraph.build(net, torch.zeros(1, 3, 8, 8))
    >>> masks = {"2": torch.zeros(4, 8, dtype=torch.bool)}
    >>> masks["2"][1, :2] = True
    >>> circuit = extract_module(net.eval(), graph, masks, "2", [1])
    >>> circuit.channel_map
    {'0': [0, 1], '2': [1]}
    >>> circuit(torch.zeros(2, 3, 8, 8)).shape
    torch.Size([2, 1, 6, 6])
"""

from __future__ import annotations

import copy
import inspect
import math
import operator
import warnings
from collections.abc import Sequence
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

from netcarve.costs import count_macs, count_parameters
from netcarve.errors import NetcarveError
from netcarve.graph import GraphError, MaskError, ModelGraph, close_names

__all__ = [
    "CircuitModule",
    "SurgeryError",
    "count_macs",
    "count_parameters",
    "extract_module",
]


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


def _shape_of(value: Any) -> Any:
    """A tensor's shape as a tuple, a list of shapes for a tuple of tensors, else None."""
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value):
        return [tuple(v.shape) if isinstance(v, torch.Tensor) else None for v in value]
    return None


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


def _fresh_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` (new tensors) without the user's forward/backward hooks."""
    new = copy.deepcopy(module)
    for sub in new.modules():
        for attr in _HOOK_DICTS:
            hooks = getattr(sub, attr, None)
            if isinstance(hooks, dict):
                hooks.clear()
    return new


def _expand(channels: Sequence[int], spatial: int) -> list[int]:
    """Positions along dim 1 of the channel blocks ``channels`` (``spatial`` wide each)."""
    if spatial == 1:
        return list(channels)
    return [c * spatial + t for c in channels for t in range(spatial)]


def _new_param(value: torch.Tensor, like: torch.Tensor) -> nn.Parameter:
    """A new Parameter holding ``value`` (a fresh tensor), ``requires_grad`` as ``like``."""
    return nn.Parameter(value.contiguous(), requires_grad=like.requires_grad)


def _reshape_channels(x: torch.Tensor, spatial_in: int, tail: tuple[int, ...]) -> torch.Tensor:
    """Reshape ``x`` keeping batch and channel blocks: ``[N, C*s_in, ...] → [N, C*s', *tail]``.

    The replacement for ``view``/``reshape``/``unsqueeze`` on a tensor whose channels were
    sliced: the original call spelled out the full channel count.
    """
    n, width = x.shape[0], x.shape[1]
    block = spatial_in * math.prod(x.shape[2:])
    return x.reshape(n, (width // spatial_in) * (block // math.prod(tail)), *tail)


# --------------------------------------------------------------------------- counting


def _module_macs(module: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-adds of conv/linear submodules of ``module`` for one input of ``input_shape``,
    measured with forward hooks on a zero input."""
    total = [0]

    def hook(mod: nn.Module, args: Any, out: Any) -> None:
        if not isinstance(out, torch.Tensor):
            return
        if isinstance(mod, nn.Linear):
            total[0] += mod.in_features * mod.out_features * math.prod(out.shape[1:-1])
        else:
            assert isinstance(mod, nn.modules.conv._ConvNd)
            kernel = math.prod(mod.kernel_size)
            if mod.transposed:  # every input position is spread over a kernel
                positions = math.prod(args[0].shape[2:])
                total[0] += mod.in_channels * (mod.out_channels // mod.groups) * kernel * positions
            else:
                total[0] += (mod.out_channels * (mod.in_channels // mod.groups) * kernel
                             * math.prod(out.shape[2:]))

    from netcarve.hooks import preserved_state  # local import: hooks imports the graph

    handles = [m.register_forward_hook(hook) for m in module.modules()
               if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    param = next(iter(module.parameters()), None)
    dtype = param.dtype if param is not None else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    try:
        with preserved_state(module), torch.no_grad():
            module.eval()
            module(torch.zeros(1, *input_shape, dtype=dtype, device=device))
    finally:
        for handle in handles:
            handle.remove()
    return total[0]


# --------------------------------------------------------------------------- the module


class CircuitModule(nn.Module):
    """A circuit cut out of a model: computes the target layer's raw output on the target
    channels, ``[N, len(target_channels), ...]``.

    It takes the same input as the original model (all image channels; it selects the ones it
    reads itself). Build it with :func:`extract_module` (or ``Circuit.to_module()``).

    Attributes:
        net: the :class:`torch.fx.GraphModule` doing the work (its submodules keep the
            original dotted names, e.g. ``net.features.0``).
        target_layer: the original name of the target layer.
        target_channels: the original ids of the output channels, in output order.
        channel_map: ``{layer: [original output-channel ids kept, in order]}`` for every
            conv/linear layer kept.
        input_channel_map: ``{layer: [original input-channel ids of its weight columns]}``
            (for a Linear after a flatten, channel blocks of ``spatial`` columns).
        input_channels: the channels of the model input that the module reads.
        input_shape: the example input shape (without batch) the module was cut for.

    Example:
        >>> circuit = extract_module(net, graph, masks, "features.8", [3])  # doctest: +SKIP
        >>> circuit.compare(net)["parameter_ratio"] < 0.1  # doctest: +SKIP
        True
    """

    def __init__(
        self,
        net: torch.fx.GraphModule,
        *,
        target_layer: str,
        target_channels: list[int],
        channel_map: dict[str, list[int]],
        input_channel_map: dict[str, list[int]],
        input_channels: list[int],
        input_shape: tuple[int, ...],
    ) -> None:
        """Wrap an extracted GraphModule; use :func:`extract_module` to make one."""
        super().__init__()
        self.net = net
        self.target_layer = target_layer
        self.target_channels = list(target_channels)
        self.channel_map = {k: list(v) for k, v in channel_map.items()}
        self.input_channel_map = {k: list(v) for k, v in input_channel_map.items()}
        self.input_channels = list(input_channels)
        self.input_shape = tuple(input_shape)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The target layer's raw output on the target channels.

        Args:
            x: a batch shaped like the model's input.
            args, kwargs: further arguments of the model's ``forward``, if it has any.

        Returns:
            ``[N, len(target_channels), ...]`` (``[N, len(target_channels)]`` for a Linear).
        """
        return self.net(x, *args, **kwargs)

    def extra_repr(self) -> str:
        kept = ", ".join(f"{k}: {len(v)}" for k, v in self.channel_map.items())
        return f"target={self.target_layer}:{self.target_channels}, kept channels {{{kept}}}"

    def parameter_count(self) -> int:
        """Number of parameter elements (see :func:`count_parameters`).

        Example:
            >>> circuit.parameter_count()  # doctest: +SKIP
            1234
        """
        return count_parameters(self)

    def macs(self, input_shape: Sequence[int] | None = None) -> int:
        """Multiply-adds of one forward pass of one image (conv and linear layers only).

        Args:
            input_shape: ``(C, H, W)`` of one input (default: the example input's shape).

        Returns:
            ``Σ out · (in/groups) · kh · kw · H_out · W_out`` over the convs plus
            ``Σ in · out`` over the Linear layers, as the module computes them (zero rows of
            channels without kernels included).

        Example:
            >>> circuit.macs((1, 28, 28))  # doctest: +SKIP
            52992
        """
        shape = tuple(self.input_shape if input_shape is None else input_shape)
        return _module_macs(self, shape)

    def compare(
        self,
        original_model: nn.Module,
        input_shape: Sequence[int] | None = None,
        graph: ModelGraph | None = None,
    ) -> dict[str, Any]:
        """Size and cost of the circuit against the model it was cut from.

        Args:
            original_model: the full model.
            input_shape: ``(C, H, W)`` of one input (default: the example input's shape).
            graph: the model's graph, if already built for that input shape (saves a trace;
                needed when the graph was built with ``channelwise=...``).

        Returns:
            ``{"parameters", "macs"}`` of the circuit; ``"original_parameters"`` and
            ``"original_macs"`` of the whole model; ``"original_parameters_to_target"`` and
            ``"original_macs_to_target"`` counting only the target layer and the layers
            upstream of it (with the BatchNorms that follow them); and the ratios
            ``"parameter_ratio"``, ``"mac_ratio"`` (vs the whole model) and
            ``"parameter_ratio_to_target"``, ``"mac_ratio_to_target"``.

        Raises:
            SurgeryError: the target layer is not a layer of the original model's graph.

        Example:
            >>> circuit.compare(net)["mac_ratio"]  # doctest: +SKIP
            0.013
        """
        shape = tuple(self.input_shape if input_shape is None else input_shape)
        if graph is None or tuple(graph.input_shape) != shape:
            param = next(iter(original_model.parameters()), None)
            dtype = param.dtype if param is not None else torch.float32
            device = param.device if param is not None else torch.device("cpu")
            graph = ModelGraph.build(
                original_model, torch.zeros(1, *shape, dtype=dtype, device=device))
        if self.target_layer not in graph.layers:
            raise SurgeryError(_unknown_layer(self.target_layer, graph))
        modules = dict(original_model.named_modules())
        upstream = [*graph.upstream(self.target_layer), self.target_layer]
        counted: list[str] = list(upstream)
        for name in upstream:
            if name != self.target_layer:
                counted.extend(graph.bn_after.get(name, []))
        params_to_target = sum(count_parameters(modules[n]) for n in dict.fromkeys(counted)
                               if n in modules)
        params, macs = self.parameter_count(), self.macs(shape)
        original_params = count_parameters(original_model)
        original_macs = count_macs(original_model, graph)
        macs_to_target = count_macs(original_model, graph, upstream)

        def ratio(a: int, b: int) -> float:
            return a / b if b else float("nan")

        return {
            "parameters": params,
            "macs": macs,
            "original_parameters": original_params,
            "original_macs": original_macs,
            "original_parameters_to_target": params_to_target,
            "original_macs_to_target": macs_to_target,
            "parameter_ratio": ratio(params, original_params),
            "mac_ratio": ratio(macs, original_macs),
            "parameter_ratio_to_target": ratio(params, params_to_target),
            "mac_ratio_to_target": ratio(macs, macs_to_target),
        }


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


class _Surgeon:
    """Plans and builds one extraction (see :func:`extract_module`)."""

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
        from netcarve.hooks import preserved_state  # local import: hooks imports the graph

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
        # the target computes its channels; a layer asked only for its shape, its cheapest row
        rows = list(self.channels) if n is self.target else union or [self._cheapest_row(name)]
        assert rec.first is not None
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

    # ------------------------------------------------------------------ building

    def build(self) -> CircuitModule:
        """Forward pass: write the new fx graph and the sliced modules."""
        self.plan()
        self.new_graph = torch.fx.Graph()
        self.root: dict[str, Any] = {}
        self.env: dict[torch.fx.Node, torch.fx.Node] = {}
        self.module_names: dict[tuple[str, Any], str] = {}
        self.n_index = 0
        self.input_node = self.placeholders[0] if self.placeholders else None
        self.read_input: set[int] = set()
        param = next(iter(self.model.parameters()), None)
        self.device = param.device if param is not None else torch.device("cpu")
        channel_map: dict[str, list[int]] = {}
        input_channel_map: dict[str, list[int]] = {}
        for n in self.placeholders:
            default = n.args[0] if n.args else inspect.Signature.empty
            self.env[n] = self.new_graph.placeholder(str(n.target), default_value=default)
        for n in self.order:
            if n.op == "placeholder" or n not in self.alive:
                continue
            rec = self.recs[n]
            if n in self.shape_only:
                self._build_shape_only(n, rec)
            elif rec.kind == "source":
                self._build_source(n)
            elif rec.kind == "layer":
                cols = self._build_layer(n, rec)
                name = str(n.target)
                channel_map[name] = list(self.kept[n] or [])
                input_channel_map[name] = cols
            elif rec.kind == "cat":
                self._build_cat(n, rec)
            else:
                self._build_generic(n, rec)
        output = self.env[self.target]
        kept_target = self.kept[self.target] or []
        if kept_target != self.channels:
            output = self._select(self.target, self.channels, output)
        self.new_graph.output(output)
        self.new_graph.lint()
        gm = torch.fx.GraphModule(self.root, self.new_graph, "CircuitNet")
        circuit = CircuitModule(
            gm,
            target_layer=self.target_layer,
            target_channels=self.channels,
            channel_map=channel_map,
            input_channel_map=input_channel_map,
            input_channels=sorted(self.read_input),
            input_shape=tuple(self.graph.input_shape),
        )
        return circuit.eval()

    def _register(self, name: str, obj: Any, key: Any = None) -> str:
        """Put ``obj`` into the new root under ``name`` (made unique); reuse for equal keys."""
        if key is not None and (name, key) in self.module_names:
            return self.module_names[(name, key)]
        unique, k = name, 1
        while unique in self.root or any(
            other.startswith(unique + ".") or unique.startswith(other + ".")
            for other in self.root
        ):
            unique, k = f"{name}_{k}", k + 1
        self.root[unique] = obj
        if key is not None:
            self.module_names[(name, key)] = unique
        return unique

    def _select(self, n: torch.fx.Node, want: list[int],
                value: torch.fx.Node | None = None) -> torch.fx.Node:
        """``n``'s new value restricted to channels ``want`` (original ids, in order)."""
        value = self.env[n] if value is None else value
        if n is self.input_node:
            self.read_input.update(want)
        have = self.kept.get(n)
        if want == have:
            return value
        assert have is not None, f"node {n.name} has no channel layout"
        layout = self._layout(n)
        spatial = layout[1] if layout is not None else 1
        where = {c: i for i, c in enumerate(have)}
        positions = _expand([where[c] for c in want], spatial)
        if positions == list(range(positions[0], positions[0] + len(positions))):
            return self.new_graph.call_method("narrow", (value, 1, positions[0], len(positions)))
        name = self._register(f"_index_{self.n_index}",
                              torch.tensor(positions, dtype=torch.long, device=self.device))
        self.n_index += 1
        index = self.new_graph.get_attr(name)
        return self.new_graph.call_method("index_select", (value, 1, index))

    def _raw(self, a: torch.fx.Node) -> torch.fx.Node:
        """``a``'s new value as it is (all the channels it has)."""
        if a is self.input_node:
            self.read_input.update(self.kept.get(a) or [])
        return self.env[a]

    def _value(self, a: torch.fx.Node, want: list[int] | None) -> torch.fx.Node:
        if want is None:
            return self._raw(a)
        return self._select(a, want)

    def _map_args(self, n: torch.fx.Node, rec: _Rec, aligned: list[int] | None) -> tuple[Any, Any]:
        args, kwargs = self.eff[n]
        cache: dict[torch.fx.Node, torch.fx.Node] = {}

        def transform(a: torch.fx.Node) -> torch.fx.Node:
            if a not in cache:
                role = rec.roles.get(a, "keep")
                if role == "aligned":
                    cache[a] = self._value(a, aligned)
                elif role == "full":
                    cache[a] = self._value(a, self._full(a))
                else:
                    cache[a] = self._raw(a)
            return cache[a]

        return (torch.fx.node.map_arg(args, transform), torch.fx.node.map_arg(kwargs, transform))

    def _emit(self, n: torch.fx.Node, args: Any, kwargs: Any,
              module_name: str | None = None) -> torch.fx.Node:
        if n.op == "call_module":
            assert module_name is not None
            return self.new_graph.create_node("call_module", module_name, args, kwargs,
                                              name=n.name)
        return self.new_graph.create_node(n.op, n.target, args, kwargs, name=n.name)

    def _build_source(self, n: torch.fx.Node) -> None:
        value: Any
        try:  # prefer the user's model (the traced module may be another instance)
            value = self.model
            for part in str(n.target).split("."):
                value = getattr(value, part)
        except AttributeError:
            value = self.traced
            for part in str(n.target).split("."):
                value = getattr(value, part)
        if isinstance(value, nn.Parameter):
            value = nn.Parameter(value.detach().clone(), requires_grad=value.requires_grad)
        elif isinstance(value, torch.Tensor):
            value = value.detach().clone()
        elif isinstance(value, nn.Module):
            value = _fresh_copy(value)
        name = self._register("_attr_" + str(n.target).replace(".", "_"), value)
        self.kept[n] = self._full(n)
        self.env[n] = self.new_graph.get_attr(name)

    def _module_for(self, n: torch.fx.Node, rec: _Rec, channels: list[int] | None) -> str:
        """Name of the (new) module for call_module node ``n`` producing ``channels``."""
        name = str(n.target)
        mod = self.modules[name]
        if rec.kind != "norm" or channels is None:
            if (name, "copy") in self.module_names:  # a module called more than once
                return self.module_names[(name, "copy")]
            return self._register(name, _fresh_copy(mod), key="copy")
        layout = rec.layout
        assert layout is not None
        positions = _expand(channels, layout[1])
        return self._register(name, self._slice_norm(mod, n, positions), key=tuple(positions))

    def _slice_norm(self, mod: nn.Module, n: torch.fx.Node, positions: list[int]) -> nn.Module:
        """A copy of a BatchNorm / InstanceNorm / PReLU keeping channels ``positions``."""
        names = set(self._channel_tensors(mod, n))
        holder = copy.copy(mod)  # shallow: tensors are replaced below, never shared
        holder._parameters = dict(mod._parameters)  # type: ignore[assignment]
        holder._buffers = dict(mod._buffers)  # type: ignore[assignment]
        for pname in names:  # drop the big tensors before the deep copy
            if pname in holder._parameters:
                holder._parameters[pname] = None
            else:
                holder._buffers[pname] = None
        new = _fresh_copy(holder)
        index = torch.tensor(positions, dtype=torch.long)
        for pname in names:
            if pname in mod._parameters:
                old = mod._parameters[pname]
                assert old is not None
                new._parameters[pname] = _new_param(
                    old.detach().index_select(0, index.to(old.device)), old)
            else:
                old_buf = mod._buffers[pname]
                assert old_buf is not None
                new._buffers[pname] = old_buf.detach().index_select(0, index.to(old_buf.device))
        for attr in ("num_features", "num_parameters"):
            if hasattr(new, attr):
                setattr(new, attr, len(positions))
        return new

    def _build_generic(self, n: torch.fx.Node, rec: _Rec) -> None:
        channels = self.kept.get(n)
        if rec.kind == "reshape" and rec.tail is not None:
            assert rec.first is not None
            value = self._value(rec.first, channels)
            self.env[n] = self.new_graph.call_function(
                _reshape_channels, (value, rec.spatial_in, rec.tail))
            return
        args, kwargs = self._map_args(n, rec, channels)
        module_name = None
        if n.op == "call_module":
            module_name = self._module_for(n, rec, channels)
        self.env[n] = self._emit(n, args, kwargs, module_name)

    def _build_shape_only(self, n: torch.fx.Node, rec: _Rec) -> None:
        """A node whose consumers only need its shape: keep one channel of its input."""
        assert rec.first is not None
        have = self.kept.get(rec.first)
        assert have, f"node {rec.first.name} has no channels"
        one = [have[0]]
        if rec.kind == "cat":
            self.kept[n] = one
            self.env[n] = self.new_graph.call_function(
                torch.cat, ([self._select(rec.first, one)],), {"dim": 1})
            return
        self.kept[n] = one
        self._build_generic(n, rec)

    def _build_cat(self, n: torch.fx.Node, rec: _Rec) -> None:
        union = self.kept[n] or []
        values = []
        offset = 0
        for part in rec.parts:
            width = self._layout(part)[0]  # type: ignore[index]
            sub = [c - offset for c in union if offset <= c < offset + width]
            if sub:
                values.append(self._select(part, sub))
            offset += width
        self.env[n] = self.new_graph.call_function(torch.cat, (values,), {"dim": 1})

    def _build_layer(self, n: torch.fx.Node, rec: _Rec) -> list[int]:
        """Write the sliced layer; return the original input channels of its columns."""
        name = str(n.target)
        info = self.graph.layers[name]
        mod = self.modules[name]
        rows = self.kept[n] or []
        first = rec.first
        assert first is not None
        inputs = self.layer_inputs[n]
        if inputs is None:  # no kept kernel: read one input channel (zero weights) for shape
            have = self.kept.get(first)
            assert have, f"node {first.name} has no channels"
            inputs = [have[0]]
        value = self._select(first, inputs)
        weight = mod.weight.detach()  # type: ignore[union-attr]
        bias = getattr(mod, "bias", None)
        mask = self._mask(name).to(weight.device)
        row_index = torch.tensor(rows, dtype=torch.long, device=weight.device)
        if info.groups > 1:
            cols = inputs
            new_w = weight.index_select(0, row_index)
            keep = mask.index_select(0, row_index)
        else:
            spatial = 1
            if info.kind == "linear":
                spatial = info.spatial if not rec.mismatch else 1
            col_units = (list(range(info.in_channels)) if rec.mismatch else inputs)
            col_positions = (list(range(weight.shape[1])) if rec.mismatch
                             else _expand(inputs, spatial))
            col_index = torch.tensor(col_positions, dtype=torch.long, device=weight.device)
            new_w = weight.index_select(0, row_index).index_select(1, col_index)
            unit_index = torch.tensor(col_units, dtype=torch.long, device=weight.device)
            keep = mask.index_select(0, row_index).index_select(1, unit_index)
            if info.kind == "linear" and info.spatial > 1:
                keep = keep.repeat_interleave(info.spatial, dim=1)
            cols = col_units
        keep = keep.reshape(*keep.shape, *([1] * (new_w.dim() - 2)))
        new_w = new_w.masked_fill(~keep, 0)
        new_b = (bias.detach().index_select(0, row_index)
                 if isinstance(bias, torch.Tensor) else None)
        new_mod = self._new_layer(mod, new_w, new_b, groups=len(rows) * info.groups
                                  // info.out_channels if info.groups > 1 else 1)
        module_name = self._register(name, new_mod)
        self.env[n] = self.new_graph.create_node("call_module", module_name, (value,), {},
                                                 name=n.name)
        return list(cols)

    def _new_layer(self, mod: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None,
                   groups: int) -> nn.Module:
        old_w = mod.weight  # type: ignore[union-attr]
        assert isinstance(old_w, torch.Tensor)
        old_b = getattr(mod, "bias", None)
        out_ch = weight.shape[0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zero-size init warnings on the meta device
            if type(mod) is nn.Linear:
                new: nn.Module = nn.Linear(weight.shape[1], out_ch, bias=bias is not None,
                                           device="meta", dtype=weight.dtype)
            elif type(mod) in _STANDARD_CONVS.values():
                conv = mod
                assert isinstance(conv, nn.modules.conv._ConvNd)
                new = type(mod)(
                    weight.shape[1] * groups, out_ch, conv.kernel_size, stride=conv.stride,
                    padding=conv.padding, dilation=conv.dilation, groups=groups,
                    bias=bias is not None, padding_mode=conv.padding_mode, device="meta",
                    dtype=weight.dtype)
            else:  # a subclass: keep its class and attributes, swap the tensors
                holder = copy.copy(mod)
                holder._parameters = {k: None for k in mod._parameters}  # type: ignore[assignment]
                new = _fresh_copy(holder)
                if isinstance(new, nn.Linear):
                    new.in_features, new.out_features = weight.shape[1], out_ch
                elif isinstance(new, nn.modules.conv._ConvNd):
                    new.in_channels, new.out_channels = weight.shape[1] * groups, out_ch
                    new.groups = groups
        new.weight = _new_param(weight, old_w)
        if bias is not None and isinstance(old_b, torch.Tensor):
            new.bias = _new_param(bias, old_b)
        else:
            new.register_parameter("bias", None)
        return new


# --------------------------------------------------------------------------- entry point


def extract_module(
    model: nn.Module,
    graph: ModelGraph,
    masks: dict[str, torch.Tensor],
    target_layer: str,
    channels: Sequence[int] | torch.Tensor | None = None,
    example_input: torch.Tensor | None = None,
) -> CircuitModule:
    """Cut the circuit given by kernel masks out of ``model`` as a small standalone module.

    The module's output equals ``model``'s target layer output (raw, before any activation)
    in eval mode under :func:`~netcarve.hooks.apply_kernel_masks` ``(model, graph, masks)``,
    restricted to ``channels`` in the given order (≤1e-5 relative in float32). Kernels are
    masked by zeroing weights only, so channels without kept kernels still emit their bias /
    BatchNorm constants, and the module keeps them (see the module docstring).

    Args:
        model: the model the graph was built from (not modified; nothing is shared with it).
        graph: its :class:`~netcarve.graph.ModelGraph` (from ``ModelGraph.build``).
        masks: ``{layer: bool LayerInfo.mask_shape}``, True = kept; a layer that is not named
            keeps all its kernels (as in ``apply_kernel_masks``). Effective masks work too.
        target_layer: dotted name of the target conv/linear layer.
        channels: its output channels to compute, in output order (default: all).
        example_input: an input batch to learn intermediate shapes from (default: zeros of
            the graph's input shape).

    Returns:
        a :class:`CircuitModule` in eval mode, on the model's device and dtype.

    Raises:
        SurgeryError: unknown target layer or channel (close names are suggested), invalid
            masks (unknown layer, wrong shape), or a graph that does not match the model.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(),
        ...                     nn.Linear(4 * 2 * 2, 3))
        >>> g = ModelGraph.build(net, torch.zeros(1, 1, 4, 4))
        >>> keep = {"3": torch.tensor([[True, False, False, False]] * 3)}
        >>> m = extract_module(net, g, keep, "3", [2, 0])
        >>> m.channel_map, m(torch.zeros(5, 1, 4, 4)).shape
        ({'0': [0], '3': [2, 0]}, torch.Size([5, 2]))
    """
    if not isinstance(graph, ModelGraph):
        raise SurgeryError(f"graph must be a ModelGraph, got {type(graph).__name__}")
    if target_layer not in graph.layers:
        raise SurgeryError(_unknown_layer(target_layer, graph, model))
    info = graph.layers[target_layer]
    if channels is None:
        chans = list(range(info.out_channels))
    else:
        if isinstance(channels, torch.Tensor):
            channels = channels.reshape(-1).tolist()
        if isinstance(channels, int):
            channels = [channels]
        chans = []
        for c in channels:
            try:
                c = operator.index(c)
            except TypeError:
                raise SurgeryError(f"channels must be integers, got {c!r}") from None
            if not 0 <= c < info.out_channels:
                raise SurgeryError(f"channel {c} out of range for {target_layer} "
                                   f"(0..{info.out_channels - 1})")
            chans.append(c)
        if not chans:
            raise SurgeryError("no target channels given; pass at least one channel "
                               "(or None for all)")
    try:
        checked = graph._check_masks(masks)
    except (MaskError, GraphError) as exc:
        raise SurgeryError(str(exc)) from None
    return _Surgeon(model, graph, checked, target_layer, chans, example_input).build()
