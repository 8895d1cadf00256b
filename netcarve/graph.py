"""Channel-level graph of a CNN: which channel of which layer feeds which kernel.

:meth:`ModelGraph.build` traces a model with :mod:`torch.fx`, runs it once on an example input
to learn every intermediate shape, and follows channels through everything that sits between
*layers*. Only convolutions (``nn.Conv1d/2d/3d``) and ``nn.Linear`` modules are layers; all
other operations must be channel-wise (BatchNorm, activations, pooling, dropout, residual
additions, ``torch.cat`` along channels, flatten/view before a Linear, ...). An operation that
mixes channels (``permute``, ``x.mean(1)``, matmul, channel shuffle, an unknown module) is only
an error when its output reaches a layer: the :class:`GraphError` names the operation and where
it sits in the model.

Vocabulary (see the project spec): a *kernel* ``(o, j)`` of a layer is ``weight[o, j]`` for a
conv (``j`` indexes the ``in_channels // groups`` inputs of output channel ``o``'s group); for a
Linear fed by a flattened ``C×H×W`` map it is the block of ``H*W`` weights from input channel
``j`` to output unit ``o``. Kernel masks are bool tensors of shape
:attr:`LayerInfo.mask_shape` ``(out_channels, in_channels // groups)``, True = kept.

How channels are followed: a residual addition (``+``, ``+=``, ``torch.add``, ``add_``) gives
channel ``c`` the union of its operands' sources for ``c``; every other elementwise op with
several feature operands (e.g. a squeeze-excitation product ``x * gate``) is treated the same
way, which is conservative for products. ``torch.cat``/``torch.split``/channel slices move
channel positions; flatten/view before a Linear assigns feature ``j`` to channel
``j // (H*W)``. In-place ops are followed through the tensor they mutate (``y.add_(z)`` makes
later uses of ``y`` depend on ``z``); mutation through a *view* of another tensor is not.
Modules declared ``channelwise`` are opaque: convs inside them are not layers.

Masking convention (the project's documented choice): masking zeroes kernel *weights* only;
biases and BatchNorm parameters stay, so a channel with no kernels left still emits its bias /
BatchNorm shift as a constant. Effective masks (:meth:`ModelGraph.effective_mask`) describe the
paths that carry input-dependent signal; the constants are not paths.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.Flatten(),
    ...                     nn.Linear(4 * 6 * 6, 2))
    >>> graph = ModelGraph.build(net, torch.zeros(1, 3, 8, 8))
    >>> list(graph.layers)
    ['0', '3']
    >>> graph.layer("3").in_channels, graph.layer("3").spatial
    (4, 36)
"""

from __future__ import annotations

import difflib
import math
import operator
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import activation as _act
from torch.nn.modules import batchnorm as _bn
from torch.nn.modules import conv as _conv
from torch.nn.modules import dropout as _drop
from torch.nn.modules import instancenorm as _inorm
from torch.nn.modules import padding as _pad
from torch.nn.modules import pooling as _pool

from netcarve.errors import NetcarveError

__all__ = [
    "ChannelLink",
    "GraphError",
    "LayerInfo",
    "MaskError",
    "ModelGraph",
    "close_names",
]


class GraphError(NetcarveError):
    """The model's channel graph cannot be built, or a layer/channel name does not exist."""


class MaskError(NetcarveError):
    """A mask names an unknown layer or has the wrong shape or type."""


# --------------------------------------------------------------------------- public records


@dataclass(frozen=True)
class LayerInfo:
    """One layer (conv or linear) of the channel graph.

    Attributes:
        name: dotted ``named_modules()`` name, e.g. ``"features.3"``.
        kind: ``"conv"`` or ``"linear"``.
        in_channels: channels feeding the layer in the kernel sense (conv: ``in_channels``;
            Linear after a flattened ``C×H×W`` map: ``C``; Linear after a vector:
            ``in_features``).
        out_channels: output channels / units.
        groups: conv groups (1 for Linear).
        spatial: for a Linear after a flatten, the ``H*W`` input features per input channel
            (consecutive columns of the weight); otherwise 1.
        input_shape: input shape without the batch dimension.
        output_shape: output shape without the batch dimension.
        mask_shape: ``(out_channels, in_channels // groups)``, the shape of a kernel mask.
        weight_param: name of the weight parameter, e.g. ``"features.3.weight"``.
        bias_param: name of the bias parameter, or None when the layer has no bias.
    """

    name: str
    kind: str
    in_channels: int
    out_channels: int
    groups: int
    spatial: int
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    mask_shape: tuple[int, int]
    weight_param: str
    bias_param: str | None = None

    @property
    def n_kernels(self) -> int:
        """Number of kernels (edges) into this layer: ``out * in / groups``."""
        return self.mask_shape[0] * self.mask_shape[1]


@dataclass(frozen=True)
class ChannelLink:
    """What feeds some of a layer's input channels.

    ``input_channels[k]`` of the consuming layer receives channel ``source_channels[k]`` of
    layer ``source`` (``None`` = the model input, i.e. image channels). An input channel fed
    through a residual addition appears in several links (one per summand).

    Attributes:
        source: producing layer name, or None for the model input.
        source_channels: int64 ``[K]`` channel indices in the source.
        input_channels: int64 ``[K]`` positions on the consuming layer's input-channel axis.
    """

    source: str | None
    source_channels: torch.Tensor
    input_channels: torch.Tensor


def close_names(name: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """Names among ``candidates`` that look like ``name`` (difflib, then substring matches).

    Args:
        name: the misspelt name.
        candidates: the valid names.
        n: at most this many suggestions.

    Returns:
        up to ``n`` suggestions, best first.

    Example:
        >>> close_names("feature.3", ["features.0", "features.3", "classifier.1"])[0]
        'features.3'
    """
    pool = list(candidates)
    found = difflib.get_close_matches(name, pool, n=n, cutoff=0.5)
    for cand in pool:
        if len(found) >= n:
            break
        if cand not in found and name and (name in cand or cand in name):
            found.append(cand)
    return found


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


@dataclass(frozen=True)
class _TupleMap:
    """Channel maps of the elements of a tuple-valued node (``torch.split`` etc.)."""

    items: tuple[_Map | None, ...]


_CONST = None  # map of a tensor that carries no input-dependent channels

# short op names (torch / torch.nn.functional / operator / Tensor method) by category
_ELEMENTWISE = {
    "add", "add_", "iadd", "sub", "sub_", "isub", "rsub", "mul", "mul_", "imul", "truediv",
    "itruediv", "div", "div_", "true_divide", "floordiv", "floor_divide", "maximum", "minimum",
    "fmax", "fmin", "pow", "pow_", "clamp", "clamp_", "clip", "clip_", "clamp_min",
    "clamp_max", "neg", "neg_", "abs", "abs_", "exp", "exp_", "log", "log_", "sqrt", "sqrt_",
    "rsqrt", "square", "sign", "where", "lerp", "addcmul", "addcdiv", "prelu",
    "relu", "relu_", "relu6", "leaky_relu", "leaky_relu_", "elu", "elu_", "selu", "selu_",
    "celu", "celu_", "gelu", "silu", "mish", "sigmoid", "sigmoid_", "tanh", "tanh_",
    "hardtanh", "hardtanh_", "hardswish", "hardsigmoid", "softplus", "softsign", "logsigmoid",
    "tanhshrink", "hardshrink", "softshrink", "threshold", "threshold_", "rrelu", "rrelu_",
    "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
    "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
    "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d", "lp_pool1d",
    "lp_pool2d", "interpolate", "upsample", "upsample_nearest", "upsample_bilinear", "pad",
    "batch_norm", "instance_norm", "nan_to_num", "round", "floor", "ceil", "trunc",
}
# ops whose data comes from the first argument only (other tensor args give shape/dtype)
_FIRST_ARG = {
    "contiguous", "clone", "detach", "detach_", "float", "double", "half", "bfloat16", "to",
    "type", "type_as", "cpu", "cuda", "expand", "expand_as", "requires_grad_",
}
_RESHAPE = {"flatten", "view", "reshape", "squeeze", "unsqueeze", "view_as", "reshape_as",
            "unflatten"}
_CAT = {"cat", "concat", "concatenate"}
_REDUCE = {"mean", "sum", "amax", "amin", "std", "var", "prod", "logsumexp", "nansum",
           "nanmean"}
_SOFTMAX = {"softmax", "log_softmax", "softmin"}
_SPLIT = {"split", "chunk", "tensor_split"}
_CONST_OPS = {"zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like",
              "new_zeros", "new_ones", "new_full", "new_empty", "new_tensor"}

_CHANNELWISE_MODULES: tuple[type[nn.Module], ...] = (
    _bn._BatchNorm, _inorm._InstanceNorm,
    _act.ReLU, _act.ReLU6, _act.LeakyReLU, _act.PReLU, _act.RReLU, _act.ELU, _act.SELU,
    _act.CELU, _act.GELU, _act.SiLU, _act.Mish, _act.Sigmoid, _act.Tanh, _act.Hardtanh,
    _act.Hardswish, _act.Hardsigmoid, _act.Softplus, _act.Softsign, _act.Tanhshrink,
    _act.Threshold, _act.LogSigmoid, _act.Hardshrink, _act.Softshrink,
    _pool._MaxPoolNd, _pool._AvgPoolNd, _pool._AdaptiveAvgPoolNd, _pool._AdaptiveMaxPoolNd,
    _pool._LPPoolNd, _drop._DropoutNd, nn.Identity,
    _pad._ConstantPadNd, _pad._ReflectionPadNd, _pad._ReplicationPadNd, _pad._CircularPadNd,
    nn.Upsample,
)
_SOFTMAX_MODULES: tuple[type[nn.Module], ...] = (_act.Softmax, _act.LogSoftmax, _act.Softmin)

_FUNC_NAMES: dict[int, tuple[Any, str, str]] = {}


def _function_name(target: Any) -> tuple[str, str]:
    """``(short name, qualified name)`` of an fx ``call_function`` target."""
    if not _FUNC_NAMES:
        for namespace, prefix in ((F, "torch.nn.functional"), (torch, "torch"),
                                  (operator, "operator")):
            names = sorted(dir(namespace), key=lambda s: (s.startswith("_"), s))
            for attr in names:
                try:
                    obj = getattr(namespace, attr, None)
                except Exception:  # lazily imported or deprecated attributes
                    continue
                if callable(obj) and not isinstance(obj, type):
                    _FUNC_NAMES.setdefault(id(obj), (obj, prefix, attr))
    entry = _FUNC_NAMES.get(id(target))
    if entry is not None and entry[0] is target:
        return entry[2], f"{entry[1]}.{entry[2]}"
    short = getattr(target, "__name__", repr(target))
    module = getattr(target, "__module__", None) or ""
    qual = getattr(target, "__qualname__", short)
    return short, f"{module}.{qual}" if module else qual


def _shape_of(value: Any) -> Any:
    """Recorded shape: a tuple for a tensor, a list for a tuple of tensors, else None."""
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value):
        return [tuple(v.shape) if isinstance(v, torch.Tensor) else None for v in value]
    return None


class _ShapeRecorder(torch.fx.Interpreter):
    """Runs a GraphModule and records every node's output shape."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__(gm)
        self.shapes: dict[torch.fx.Node, Any] = {}
        self.current: torch.fx.Node | None = None
        self.extra_traceback = False  # keep the op's own message; skip fx's slow error path

    def run_node(self, n: torch.fx.Node) -> Any:
        self.current = n
        result = super().run_node(n)
        self.shapes[n] = _shape_of(result)
        return result


class _Tracer(torch.fx.Tracer):
    """fx tracer that keeps user-declared channel-wise modules as opaque leaves."""

    def __init__(self, leaf_names: set[str], leaf_types: tuple[type, ...]) -> None:
        super().__init__()
        self.leaf_names = leaf_names
        self.leaf_types = leaf_types

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_names or (
            self.leaf_types and isinstance(m, self.leaf_types)
        ):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _trace_failure_site(exc: BaseException, modules: dict[str, nn.Module]) -> str:
    """`` in module 'a.b' (Type), file.py:12`` for the innermost ``forward`` that raised."""
    names = {id(m): n for n, m in modules.items()}
    site = ""
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        owner = frame.f_locals.get("self")
        if frame.f_code.co_name == "forward" and isinstance(owner, nn.Module):
            name = names.get(id(owner))
            if name is not None:
                label = f"module '{name}'" if name else "the model's forward"
                where = f"{frame.f_code.co_filename}:{lineno}"
                site = f" (in {label} ({type(owner).__name__}), {where})"
    return site


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


# --------------------------------------------------------------------------- the graph


class ModelGraph:
    """The channel graph of a model: layers, what feeds them, and path queries.

    Build it with :meth:`build`. Attributes:

    * ``layers``: ``{name: LayerInfo}`` in topological (execution) order.
    * ``links``: ``{name: [ChannelLink, ...]}``, what feeds each layer's input channels.
    * ``bn_after``: ``{name: [BatchNorm module names]}``, the BatchNorm modules that normalise
      the layer's channels directly after it (possibly behind other channel-wise unary ops
      such as an activation or dropout, never behind an addition or concatenation).
    * ``input_shape``: the example input's shape without the batch dimension.
    * ``traced``: the :class:`torch.fx.GraphModule` (it shares the model's submodules).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        ...                     nn.Conv2d(4, 2, 1))
        >>> g = ModelGraph.build(net, torch.zeros(1, 3, 8, 8))
        >>> g.upstream("3"), g.bn_after["0"]
        (['0'], ['1'])
    """

    def __init__(self) -> None:
        """Use :meth:`build`; the constructor makes an empty graph."""
        self.layers: dict[str, LayerInfo] = {}
        self.links: dict[str, list[ChannelLink]] = {}
        self.bn_after: dict[str, list[str]] = {}
        self.input_shape: tuple[int, ...] = ()
        self.traced: torch.fx.GraphModule | None = None
        self._consumers: dict[str, list[str]] = {}
        self._n_params: dict[str, int] = {}
        self._module_types: dict[str, str] = {}

    def __repr__(self) -> str:
        kinds = [info.kind for info in self.layers.values()]
        return (f"ModelGraph({kinds.count('conv')} conv + {kinds.count('linear')} linear "
                f"layers, input {self.input_shape})")

    # ------------------------------------------------------------------ building

    @classmethod
    def build(
        cls,
        model: nn.Module,
        example_input: torch.Tensor,
        channelwise: Iterable[str | type[nn.Module]] = (),
    ) -> ModelGraph:
        """Trace ``model`` and build its channel graph.

        The model is run once on ``example_input`` in eval mode without gradients (to learn
        shapes); its training flags and ``requires_grad`` flags are restored afterwards and
        its parameters and buffers are not changed.

        Args:
            model: any CNN whose forward :func:`torch.fx.symbolic_trace` can trace.
            example_input: a batch shaped like the model's input (batch size 1 is enough);
                on the model's device.
            channelwise: module names (dotted) or module classes to treat as opaque,
                channel-wise operations (not traced into). Use it for submodules with
                data-dependent control flow that act on each channel separately.

        Returns:
            the :class:`ModelGraph`.

        Raises:
            GraphError: tracing fails (control flow on tensor values), the model cannot run
                on the example input, a channel-mixing operation feeds a layer, or a layer
                module is called more than once.

        Example:
            >>> import torch
            >>> from torch import nn
            >>> g = ModelGraph.build(nn.Sequential(nn.Conv2d(1, 2, 3)), torch.zeros(1, 1, 5, 5))
            >>> g.layer("0").mask_shape
            (2, 1)
        """
        from netcarve.hooks import preserved_state  # local import: hooks imports this module

        if not isinstance(model, nn.Module):
            raise GraphError(f"expected an nn.Module, got {type(model).__name__}")
        if not isinstance(example_input, torch.Tensor) or example_input.dim() < 2:
            raise GraphError(
                "example_input must be a tensor with a batch and a channel dimension "
                f"(e.g. [1, 3, 224, 224]); got {getattr(example_input, 'shape', example_input)!r}"
            )
        leaf_names = {c for c in channelwise if isinstance(c, str)}
        leaf_types = tuple(c for c in channelwise if isinstance(c, type))
        modules = dict(model.named_modules())
        unknown = sorted(n for n in leaf_names if n not in modules)
        if unknown:
            hint = close_names(unknown[0], modules)
            raise GraphError(f"channelwise names unknown modules {unknown}; close: {hint}")
        try:
            tracer = _Tracer(leaf_names, leaf_types)
            fx_graph = tracer.trace(model)
            gm = torch.fx.GraphModule(tracer.root, fx_graph, type(model).__name__)
        except Exception as exc:  # fx raises TraceError, TypeError, RuntimeError, ...
            raise GraphError(
                f"torch.fx could not trace {type(model).__name__}"
                f"{_trace_failure_site(exc, modules)}: {type(exc).__name__}: "
                f"{exc}. Tracing fails on Python code that needs concrete tensor values "
                "(if/while on a tensor, len() of a tensor, item assignment). Move such code "
                "into a submodule and declare it as a leaf with "
                "ModelGraph.build(..., channelwise=[name or class]) if it acts on each "
                "channel separately, or rewrite it without data-dependent control flow."
            ) from None
        recorder = _ShapeRecorder(gm)
        with preserved_state(model), torch.no_grad():
            model.eval()
            try:
                recorder.run(example_input)
            except Exception as exc:
                where = f" at fx node '{recorder.current.name}'" if recorder.current else ""
                raise GraphError(
                    f"running {type(model).__name__} on the example input of shape "
                    f"{tuple(example_input.shape)} failed{where}: {type(exc).__name__}: {exc}"
                ) from None
        graph = cls()
        graph.input_shape = tuple(example_input.shape[1:])
        graph.traced = gm
        _Builder(graph, gm, modules, recorder.shapes, leaf_names, leaf_types).run()
        return graph

    # ------------------------------------------------------------------ lookups

    def layer(self, name: str) -> LayerInfo:
        """The :class:`LayerInfo` of layer ``name``.

        Raises:
            GraphError: unknown name (the message lists the closest layer names).

        Example:
            >>> g.layer("features.0").kind  # doctest: +SKIP
            'conv'
        """
        info = self.layers.get(name)
        if info is not None:
            return info
        what = ""
        if name in self._module_types:
            what = f" ({name} is a {self._module_types[name]}, not a conv/linear layer)"
        hint = close_names(name, self.layers)
        hint_txt = f"; did you mean {', '.join(hint)}?" if hint else ""
        raise GraphError(
            f"unknown layer '{name}'{what}{hint_txt} "
            f"(ModelGraph.layers / describe() list all {len(self.layers)} layers)"
        )

    def check_channel(self, layer: str, channel: int) -> None:
        """Check that ``channel`` is an output channel of ``layer``.

        Raises:
            GraphError: unknown layer, or ``channel 70 out of range for features.3 (0..63)``.
        """
        info = self.layer(layer)
        try:
            c = operator.index(channel)
        except TypeError:
            raise GraphError(f"channel must be an integer, got {channel!r}") from None
        if not 0 <= c < info.out_channels:
            raise GraphError(
                f"channel {c} out of range for {layer} (0..{info.out_channels - 1})"
            )

    def _channels(self, layer: str, channels: Sequence[int] | torch.Tensor | None) -> list[int]:
        info = self.layer(layer)
        if channels is None:
            return list(range(info.out_channels))
        if isinstance(channels, torch.Tensor):
            channels = channels.reshape(-1).tolist()
        out = []
        for c in channels:
            self.check_channel(layer, c)
            out.append(operator.index(c))
        return out

    def sources(self, layer: str) -> list[str]:
        """Layers that feed ``layer`` directly (the model input is not listed)."""
        self.layer(layer)
        seen: list[str] = []
        for link in self.links[layer]:
            if link.source is not None and link.source not in seen:
                seen.append(link.source)
        return [n for n in self.layers if n in seen]

    def consumers(self, layer: str) -> list[str]:
        """Layers that ``layer`` feeds directly."""
        self.layer(layer)
        return list(self._consumers.get(layer, []))

    def upstream(self, layer: str) -> list[str]:
        """Layers with a path into ``layer``, topological order, ``layer`` excluded."""
        found = self._closure(layer, self.sources)
        return [n for n in self.layers if n in found]

    def downstream(self, layer: str) -> list[str]:
        """Layers reachable from ``layer``, topological order, ``layer`` excluded."""
        found = self._closure(layer, self.consumers)
        return [n for n in self.layers if n in found]

    def _closure(self, layer: str, step: Any) -> set[str]:
        self.layer(layer)
        found: set[str] = set()
        todo = [layer]
        while todo:
            for nxt in step(todo.pop()):
                if nxt not in found:
                    found.add(nxt)
                    todo.append(nxt)
        found.discard(layer)
        return found

    def kernel_sources(self, layer: str) -> torch.Tensor:
        """Input-channel position of every kernel of ``layer``.

        Returns:
            int64 ``[out_channels, in_channels // groups]``: entry ``(o, j)`` is the input
            channel that kernel ``(o, j)`` reads, ``(o // (out/g)) * (in/g) + j``.

        Example:
            >>> g.kernel_sources("dw")  # depthwise 2→2, groups=2  # doctest: +SKIP
            tensor([[0], [1]])
        """
        info = self.layer(layer)
        out_c, per_group = info.mask_shape
        g = info.groups
        group_of_o = torch.arange(out_c, device="cpu") // (out_c // g)
        return group_of_o[:, None] * per_group + torch.arange(per_group, device="cpu")[None, :]

    # ------------------------------------------------------------------ path algebra

    def _gather_inputs(self, layer: str, per_input: torch.Tensor) -> torch.Tensor:
        """``per_input[kernel_sources]`` without materialising the index tensor."""
        info = self.layers[layer]
        out_c, per_group = info.mask_shape
        g = info.groups
        return (per_input.view(g, 1, per_group).expand(g, out_c // g, per_group)
                .reshape(out_c, per_group))

    def _scatter_inputs(self, layer: str, kernels: torch.Tensor) -> torch.Tensor:
        """bool ``[in_channels]``: input channels read by at least one True kernel."""
        info = self.layers[layer]
        out_c, per_group = info.mask_shape
        g = info.groups
        return kernels.reshape(g, out_c // g, per_group).any(dim=1).reshape(info.in_channels)

    def _reach(
        self, target: str, channels: list[int], usable: dict[str, torch.Tensor] | None
    ) -> dict[str, torch.Tensor]:
        """bool ``[out]`` per layer: channels with a path (through ``usable`` kernels, or
        any kernel when None) into the target channels."""
        order = [*self.upstream(target), target]
        reach = {
            n: torch.zeros(self.layers[n].out_channels, dtype=torch.bool, device="cpu")
            for n in order
        }
        reach[target][channels] = True
        for name in reversed(order):
            r = reach[name]
            if not bool(r.any()):
                continue
            kernels = r[:, None].expand(self.layers[name].mask_shape)
            if usable is not None:
                kernels = kernels & usable[name]
            in_reach = self._scatter_inputs(name, kernels)
            for link in self.links[name]:
                if link.source is None:
                    continue
                hit = in_reach[link.input_channels]
                reach[link.source][link.source_channels[hit]] = True
        return reach

    def relevant_kernels(
        self, layer: str, channels: Sequence[int] | None = None
    ) -> dict[str, torch.Tensor]:
        """Kernels on some path to the given output channels of ``layer``.

        Args:
            layer: the target layer.
            channels: its target channels (None = all).

        Returns:
            ``{layer: bool mask_shape}`` for every layer with at least one relevant kernel
            (the target layer included: its kernels into the target channels are relevant),
            in topological order.

        Raises:
            GraphError: unknown layer or channel out of range.

        Example:
            >>> rel = g.relevant_kernels("features.3", [5])  # doctest: +SKIP
            >>> int(rel["features.3"].sum())  # in_channels of features.3  # doctest: +SKIP
            64
        """
        chans = self._channels(layer, channels)
        reach = self._reach(layer, chans, None)
        out: dict[str, torch.Tensor] = {}
        for name, r in reach.items():
            if bool(r.any()):
                out[name] = r[:, None].expand(self.layers[name].mask_shape).clone()
        return out

    def _check_masks(self, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Validate kernel masks; return them as CPU bool tensors."""
        if not isinstance(masks, dict):
            raise MaskError(f"masks must be a dict {{layer: bool tensor}}, got {type(masks)}")
        checked: dict[str, torch.Tensor] = {}
        for name, mask in masks.items():
            if name not in self.layers:
                hint = close_names(str(name), self.layers)
                raise MaskError(
                    f"mask for unknown layer '{name}'"
                    + (f"; did you mean {', '.join(hint)}?" if hint else "")
                )
            if not isinstance(mask, torch.Tensor):
                raise MaskError(f"mask for {name} must be a torch.Tensor, got {type(mask)}")
            expected = self.layers[name].mask_shape
            if tuple(mask.shape) != expected:
                raise MaskError(
                    f"mask for {name} has shape {tuple(mask.shape)}, expected {expected} "
                    "(out_channels, in_channels // groups)"
                )
            mask = mask.detach().to("cpu")
            checked[name] = mask if mask.dtype == torch.bool else mask != 0
        return checked

    def effective_mask(
        self,
        masks: dict[str, torch.Tensor],
        layer: str,
        channels: Sequence[int] | None = None,
    ) -> tuple[dict[str, torch.Tensor], bool]:
        """Keep only the kernels that lie on a complete input → target path.

        A kernel ``(o, i)`` of layer ``L`` survives iff it is kept in ``masks``, its input
        channel is *alive* (fed by the model input or by at least one alive source channel;
        a layer channel is alive iff it has a surviving kernel from an alive input channel;
        computed forward in topological order) and its output channel ``L:o`` is a target
        channel or reaches one through surviving kernels (computed backward). The result is
        idempotent: the effective mask of an effective mask is itself.

        Semantics: masking zeroes kernel weights only; biases and BatchNorm shifts stay. A dead
        channel therefore still emits a constant; effective masks ignore constants (they are
        not paths), so dropping a kernel fed by a dead channel changes the masked model's
        output by a constant at most (nothing when biases and BN shifts are zero).

        Args:
            masks: ``{layer: bool mask_shape}``, True = kept. Layers upstream of the target
                (or the target itself) that are absent count as **all-False**; masks of layers
                not upstream of the target are ignored.
            layer: the target layer.
            channels: its target channels (None = all).

        Returns:
            ``(effective, collapsed)``: ``effective`` has one bool mask per layer in
            :meth:`relevant_kernels` (same keys, each a subset of the relevant kernels);
            ``collapsed`` is True when no target channel is alive (total collapse; every mask
            is then all-False). Collapse is reported, not raised.

        Raises:
            MaskError: a mask names an unknown layer or has the wrong shape.
            GraphError: unknown target layer or channel.

        Example:
            >>> eff, collapsed = g.effective_mask(masks, "features.3", [5])  # doctest: +SKIP
        """
        chans = self._channels(layer, channels)
        kept = self._check_masks(masks)
        order = [*self.upstream(layer), layer]
        alive: dict[str, torch.Tensor] = {}
        usable: dict[str, torch.Tensor] = {}
        for name in order:
            info = self.layers[name]
            in_alive = torch.zeros(info.in_channels, dtype=torch.bool, device="cpu")
            for link in self.links[name]:
                if link.source is None:
                    in_alive[link.input_channels] = True
                else:
                    live = alive[link.source][link.source_channels]
                    in_alive[link.input_channels[live]] = True
            mask = kept.get(name)
            if mask is None:
                mask = torch.zeros(info.mask_shape, dtype=torch.bool, device="cpu")
            usable[name] = mask & self._gather_inputs(name, in_alive)
            alive[name] = usable[name].any(dim=1)
        collapsed = not bool(alive[layer][chans].any())
        reach = self._reach(layer, chans, usable)
        structural = self._reach(layer, chans, None)
        effective: dict[str, torch.Tensor] = {}
        for name in order:
            if bool(structural[name].any()):
                effective[name] = usable[name] & reach[name][:, None]
        return effective, collapsed

    # ------------------------------------------------------------------ summary

    def describe(self) -> list[dict[str, Any]]:
        """One JSON-friendly row per layer, in topological order.

        Returns:
            dicts with ``name, kind, type, in_channels, out_channels, groups, spatial,
            input_shape, output_shape, kernels, parameters, sources`` (source layer names,
            ``"input"`` for the model input).

        Example:
            >>> [row["name"] for row in g.describe()]  # doctest: +SKIP
            ['features.0', 'features.3', 'classifier.1']
        """
        rows = []
        for name, info in self.layers.items():
            srcs: list[str] = []
            for link in self.links[name]:
                label = "input" if link.source is None else link.source
                if label not in srcs:
                    srcs.append(label)
            rows.append({
                "name": name,
                "kind": info.kind,
                "type": self._module_types.get(name, ""),
                "in_channels": info.in_channels,
                "out_channels": info.out_channels,
                "groups": info.groups,
                "spatial": info.spatial,
                "input_shape": list(info.input_shape),
                "output_shape": list(info.output_shape),
                "kernels": info.n_kernels,
                "parameters": self._n_params.get(name, 0),
                "sources": srcs,
            })
        return rows


# --------------------------------------------------------------------------- builder


class _Builder:
    """Walks the fx graph once, computing channel maps and filling a :class:`ModelGraph`."""

    def __init__(
        self,
        graph: ModelGraph,
        gm: torch.fx.GraphModule,
        modules: dict[str, nn.Module],
        shapes: dict[torch.fx.Node, Any],
        leaf_names: set[str],
        leaf_types: tuple[type, ...],
    ) -> None:
        self.graph = graph
        self.gm = gm
        self.modules = modules
        self.shapes = shapes
        self.leaf_names = leaf_names
        self.leaf_types = leaf_types
        self.maps: dict[torch.fx.Node, _Map | _TupleMap | None] = {}
        self.unary: dict[torch.fx.Node, torch.fx.Node] = {}  # node → its single feature input
        self.layer_nodes: dict[str, torch.fx.Node] = {}
        self.seen_input = False

    # -------------------------------------------------------------- helpers

    def _where(self, node: torch.fx.Node) -> str:
        if node.op == "call_module":
            mod = self.modules.get(str(node.target))
            return f"fx node '{node.name}', module '{node.target}' ({type(mod).__name__})"
        stack = node.meta.get("nn_module_stack")
        path = ""
        if stack:
            last = list(stack.values())[-1]
            path = last[0] if isinstance(last, tuple) else str(last)
        inside = f" inside module '{path}'" if path else " in the model's top-level forward"
        return f"fx node '{node.name}'{inside}"

    def _op_name(self, node: torch.fx.Node) -> tuple[str, str]:
        if node.op == "call_method":
            return str(node.target), f"torch.Tensor.{node.target}"
        if node.op == "call_function":
            return _function_name(node.target)
        mod = self.modules.get(str(node.target))
        return type(mod).__name__, type(mod).__name__

    def _mixed(self, node: torch.fx.Node, why: str) -> _Map:
        qual = self._op_name(node)[1]
        return _Map(error=f"{qual} ({self._where(node)}) {why}")

    def _feature_inputs(self, node: torch.fx.Node, first_only: bool = False) -> list[Any]:
        """``(node, map, shape)`` for input nodes that carry channels (constants skipped)."""
        found: list[torch.fx.Node] = []
        if first_only:
            args: Any = node.args[:1]
        else:
            args = (node.args, node.kwargs)
        torch.fx.node.map_arg(args, lambda n: found.append(n) or n)
        out = []
        for n in found:
            m = self.maps.get(n)
            if m is not None:
                out.append((n, m, self.shapes.get(n)))
        return out

    def _is_inplace(self, node: torch.fx.Node, short: str) -> bool:
        if node.kwargs.get("inplace") is True:
            return True
        if node.op == "call_module":
            return bool(getattr(self.modules.get(str(node.target)), "inplace", False))
        return short.endswith("_") and not short.startswith("_")

    # -------------------------------------------------------------- main pass

    def run(self) -> None:
        for node in self.gm.graph.nodes:
            self._visit(node)
        self._finish()

    def _visit(self, node: torch.fx.Node) -> None:
        shape = self.shapes.get(node)
        if node.op == "output":
            return
        if node.op == "placeholder":
            if isinstance(shape, tuple) and not self.seen_input:
                self.seen_input = True
                self.maps[node] = _Map(tuple(frozenset({(None, c)}) for c in range(shape[1])))
            return
        if node.op == "get_attr":
            return  # parameters / buffers are constants
        if shape is None:
            return  # not a tensor (sizes, dtypes, ...): no data flow to follow
        if node.op == "call_module":
            mod = self.modules[str(node.target)]
            if isinstance(mod, (_conv._ConvNd, nn.Linear)) and not getattr(
                mod, "transposed", False
            ):
                self._layer(node, mod)
                return
        feats = self._feature_inputs(node)
        if not feats:
            self.maps[node] = (_TupleMap(tuple(None for _ in shape))
                               if isinstance(shape, list) else _CONST)
            return
        bad = [m for _, m, _ in feats if isinstance(m, _Map) and m.error]
        if bad:
            result: Any = bad[0]
        elif any(isinstance(m, _TupleMap) for _, m, _ in feats) and not (
            node.op == "call_function" and node.target is operator.getitem
        ) and self._op_name(node)[0] not in _CAT:
            result = self._mixed(node, "consumes a tuple of tensors")
        else:
            result = self._classify(node, feats, shape)
        if isinstance(shape, list) and isinstance(result, _Map):
            result = _TupleMap(tuple(result for _ in shape))
        self.maps[node] = result
        short = self._op_name(node)[0]
        if node.args and isinstance(node.args[0], torch.fx.Node) and self._is_inplace(
            node, short
        ):
            # in-place op: later users of the mutated tensor see the new channels
            self.maps[node.args[0]] = result

    def _classify(self, node: torch.fx.Node, feats: list[Any], shape: Any) -> Any:
        if node.op == "call_module":
            mod = self.modules[str(node.target)]
            name = str(node.target)
            if isinstance(mod, _CHANNELWISE_MODULES) or name in self.leaf_names or (
                self.leaf_types and isinstance(mod, self.leaf_types)
            ):
                return self._channelwise(node, feats[:1] if len(feats) else feats, shape)
            if isinstance(mod, _SOFTMAX_MODULES):
                return self._softmax(node, feats, shape, mod.dim)
            if isinstance(mod, nn.Flatten | nn.Unflatten):
                return self._reshape(node, feats[0], shape)
            return self._mixed(node, "is not a known channel-wise module")
        short, _ = self._op_name(node)
        if short in _ELEMENTWISE:
            return self._channelwise(node, feats, shape)
        if short in _FIRST_ARG:
            first = self._feature_inputs(node, first_only=True)
            return self._channelwise(node, first, shape) if first else _CONST
        if short in _CONST_OPS:
            return _CONST
        if short in _RESHAPE:
            first = self._feature_inputs(node, first_only=True)
            if not first:
                return _CONST
            return self._reshape(node, first[0], shape)
        if short in _CAT:
            return self._cat(node, shape)
        if short in _REDUCE:
            return self._reduce(node, feats, shape)
        if short in _SOFTMAX:
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
            return self._softmax(node, feats, shape, dim)
        if short in _SPLIT:
            return self._split(node, feats, shape)
        if short == "getitem":
            return self._getitem(node, feats, shape)
        if short in {"max", "min"} and len(feats) == 2 and not isinstance(shape, list):
            return self._channelwise(node, feats, shape)
        return self._mixed(node, "mixes channels or is not a known channel-wise operation")

    # -------------------------------------------------------------- op rules

    def _channelwise(self, node: torch.fx.Node, feats: list[Any], shape: Any) -> Any:
        if not isinstance(shape, tuple) or len(shape) < 2:
            return self._mixed(node, f"returns shape {shape}, which has no channel dimension")
        ndim, width = len(shape), shape[1]
        full: list[_Map] = []
        bcast: list[_Map] = []
        for _, m, s in feats:
            if not isinstance(s, tuple) or len(s) != ndim:
                return self._mixed(
                    node, f"combines a feature map of shape {s} into shape {shape}")
            if s[1] == width:
                full.append(m)
            elif s[1] == 1:
                bcast.append(m)
            else:
                return self._mixed(
                    node, f"changes the channel dimension from {s[1]} to {width}")
        extra = _union(m.expanded()[0] for m in bcast) if bcast else frozenset()
        if not full:
            return _Map(tuple(extra for _ in range(width)))
        if len(full) == 1 and not bcast:
            if len(full[0].groups) * full[0].spatial != width:
                return self._mixed(node, "changes the channel layout")
            self.unary[node] = next(n for n, m, _ in feats if m is full[0])
            return full[0]
        spatials = {m.spatial for m in full}
        if len(spatials) == 1 and len({len(m.groups) for m in full}) == 1:
            per = zip(*(m.groups for m in full), strict=True)
            groups = tuple(_union(gs) | extra for gs in per)
            return _Map(groups, full[0].spatial)
        per = zip(*(m.expanded() for m in full), strict=True)
        return _Map(tuple(_union(gs) | extra for gs in per), 1)

    def _reshape(self, node: torch.fx.Node, feat: Any, shape: Any) -> _Map:
        _, m, in_shape = feat
        if not isinstance(shape, tuple) or len(shape) < 2 or shape[0] != in_shape[0]:
            return self._mixed(
                node, f"reshapes {in_shape} to {shape}, moving the batch or channel dimension")
        block = m.spatial * math.prod(in_shape[2:])
        rest = math.prod(shape[2:])
        if rest == 0 or block % rest or len(m.groups) * (block // rest) != shape[1]:
            return self._mixed(
                node, f"reshapes {in_shape} to {shape}, which mixes channels along dim 1")
        return _Map(m.groups, block // rest)

    def _cat(self, node: torch.fx.Node, shape: Any) -> _Map:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        if isinstance(tensors, torch.fx.Node) and isinstance(self.maps.get(tensors), _TupleMap):
            parts: list[Any] = list(self.maps[tensors].items)  # type: ignore[union-attr]
            part_shapes = list(self.shapes.get(tensors) or [])
        elif isinstance(tensors, (list, tuple)):
            parts = [self.maps.get(t) if isinstance(t, torch.fx.Node) else None for t in tensors]
            part_shapes = [self.shapes.get(t) if isinstance(t, torch.fx.Node) else None
                           for t in tensors]
        else:
            return self._mixed(node, "has inputs netcarve cannot follow")
        if not isinstance(shape, tuple) or not isinstance(dim, int):
            return self._mixed(node, "has inputs netcarve cannot follow")
        dim %= len(shape)
        if dim == 1:
            groups: list[frozenset[_Source]] = []
            same_spatial = len({p.spatial for p in parts if isinstance(p, _Map)}) <= 1
            for p, s in zip(parts, part_shapes, strict=True):
                if isinstance(p, _Map):
                    groups.extend(p.groups if same_spatial else p.expanded())
                elif isinstance(s, tuple):
                    groups.extend(frozenset() for _ in range(s[1]))  # constant channels
            spatial = next((p.spatial for p in parts if isinstance(p, _Map)), 1)
            if not same_spatial:
                spatial = 1
            if len(groups) * spatial != shape[1]:
                return self._mixed(node, "concatenates tensors with unexpected shapes")
            return _Map(tuple(groups), spatial)
        feats = [p for p in parts if isinstance(p, _Map)]
        if dim == 0 or all(p == feats[0] for p in feats):
            if dim == 0 and any(p != feats[0] for p in feats):
                return self._mixed(node, "concatenates different feature maps along the batch")
            return feats[0]
        return self._mixed(
            node, f"concatenates along dim {dim} tensors whose channels come from different "
            "sources")

    def _reduce(self, node: torch.fx.Node, feats: list[Any], shape: Any) -> Any:
        _, m, in_shape = feats[0]
        if len(feats) != 1 or not isinstance(in_shape, tuple):
            return self._mixed(node, "reduces several tensors")
        raw = node.kwargs.get("dim", node.kwargs.get("axis"))
        if raw is None and len(node.args) > 1:
            raw = node.args[1]
        dims = _dims(raw, len(in_shape))
        if not dims or min(dims) < 2:
            return self._mixed(node, f"reduces over dim {raw}, which mixes channels or images")
        return m

    def _softmax(self, node: torch.fx.Node, feats: list[Any], shape: Any, dim: Any) -> Any:
        if isinstance(dim, int) and isinstance(shape, tuple) and dim % len(shape) >= 2:
            return self._channelwise(node, feats[:1], shape)
        return self._mixed(node, f"normalises over dim {dim}, which mixes channels")

    def _split(self, node: torch.fx.Node, feats: list[Any], shape: Any) -> Any:
        _, m, in_shape = feats[0]
        if len(feats) != 1 or not isinstance(shape, list) or not isinstance(in_shape, tuple):
            return self._mixed(node, "splits in a way netcarve cannot follow")
        dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0)
        if not isinstance(dim, int):
            return self._mixed(node, "splits along a dynamic dimension")
        dim %= len(in_shape)
        if dim == 0:
            return self._mixed(node, "splits the batch")
        if dim != 1:
            return _TupleMap(tuple(m for _ in shape))
        positions = m.expanded()
        items: list[_Map | None] = []
        start = 0
        for s in shape:
            width = s[1] if isinstance(s, tuple) and len(s) > 1 else 0
            items.append(_Map(positions[start:start + width], 1))
            start += width
        return _TupleMap(tuple(items))

    def _getitem(self, node: torch.fx.Node, feats: list[Any], shape: Any) -> Any:
        src = node.args[0]
        smap = self.maps.get(src) if isinstance(src, torch.fx.Node) else None
        idx = node.args[1]
        if isinstance(smap, _TupleMap):
            if isinstance(idx, int) and -len(smap.items) <= idx < len(smap.items):
                return smap.items[idx]
            return self._mixed(node, "indexes a tuple of tensors dynamically")
        if not isinstance(smap, _Map):
            return self._mixed(node, "indexes with a tensor")
        in_shape = self.shapes.get(src)
        index = idx if isinstance(idx, tuple) else (idx,)
        if not index:
            return smap
        full = slice(None, None, None)
        if index[0] != full:
            return self._mixed(node, "indexes the batch dimension")
        rest_ok = all(i is None or i is Ellipsis or isinstance(i, int) or (
            isinstance(i, slice) and all(
                isinstance(v, int | None) for v in (i.start, i.stop, i.step))
        ) for i in index[2:])
        if not rest_ok:
            return self._mixed(node, "uses an index netcarve cannot follow")
        if len(index) == 1 or index[1] == full:
            return smap
        sel = index[1]
        if isinstance(sel, slice) and all(
            isinstance(v, int | None) for v in (sel.start, sel.stop, sel.step)
        ) and isinstance(in_shape, tuple):
            positions = smap.expanded()
            picked = tuple(positions[p] for p in range(in_shape[1])[sel])
            return _Map(picked, 1)
        return self._mixed(node, "indexes the channel dimension")

    # -------------------------------------------------------------- layers

    def _layer(self, node: torch.fx.Node, mod: nn.Module) -> None:
        name = str(node.target)
        if name in self.layer_nodes:
            raise GraphError(
                f"layer '{name}' ({type(mod).__name__}) is called more than once in forward; "
                "netcarve needs one call per conv/linear module (give each use its own module)"
            )
        inputs = [n for n in node.args if isinstance(n, torch.fx.Node)]
        if len(inputs) != 1 or node.kwargs:
            raise GraphError(f"layer '{name}' must be called with a single tensor argument")
        m = self.maps.get(inputs[0])
        in_shape = self.shapes.get(inputs[0])
        out_shape = self.shapes[node]
        if isinstance(m, _Map) and m.error:
            raise GraphError(
                f"cannot follow channels into layer '{name}': {m.error}. Only channel-wise "
                "operations (BatchNorm, activations, pooling, dropout, residual add, "
                "torch.cat along channels, flatten/view before a Linear) may sit between "
                "conv/linear layers. If the operation is channel-wise, declare its module with "
                "ModelGraph.build(..., channelwise=[...])."
            )
        if not isinstance(m, _Map) or not isinstance(in_shape, tuple):
            raise GraphError(f"layer '{name}' is fed by a constant, not by the model input")
        is_conv = isinstance(mod, _conv._ConvNd)
        if is_conv:
            assert isinstance(mod, _conv._ConvNd)
            groups_pos = m.expanded()
            in_channels, out_channels, groups, spatial = (
                mod.in_channels, mod.out_channels, mod.groups, 1)
            if len(groups_pos) != in_channels:
                raise GraphError(f"layer '{name}': input has {len(groups_pos)} channels, "
                                 f"expected {in_channels}")
        else:
            assert isinstance(mod, nn.Linear)
            if len(in_shape) != 2:
                raise GraphError(
                    f"Linear layer '{name}' is applied to a tensor of shape {in_shape}; netcarve "
                    "supports Linear layers on [N, features] inputs (flatten first)"
                )
            groups_pos, spatial = m.groups, m.spatial
            in_channels, out_channels, groups = len(groups_pos), mod.out_features, 1
            if in_channels * spatial != mod.in_features:
                raise GraphError(f"Linear layer '{name}': input has {in_channels * spatial} "
                                 f"features, expected {mod.in_features}")
        by_source: dict[str | None, tuple[list[int], list[int]]] = {}
        for pos, group in enumerate(groups_pos):
            for src, ch in sorted(group, key=lambda t: (t[0] is not None, t[0] or "", t[1])):
                src_list, pos_list = by_source.setdefault(src, ([], []))
                src_list.append(ch)
                pos_list.append(pos)
        order = {n: i for i, n in enumerate(self.graph.layers)}
        links = [
            ChannelLink(src, torch.tensor(chs, dtype=torch.int64, device="cpu"),
                        torch.tensor(pos, dtype=torch.int64, device="cpu"))
            for src, (chs, pos) in sorted(
                by_source.items(), key=lambda kv: -1 if kv[0] is None else order[kv[0]])
        ]
        has_bias = getattr(mod, "bias", None) is not None
        self.graph.layers[name] = LayerInfo(
            name=name,
            kind="conv" if is_conv else "linear",
            in_channels=in_channels,
            out_channels=out_channels,
            groups=groups,
            spatial=spatial,
            input_shape=tuple(in_shape[1:]),
            output_shape=tuple(out_shape[1:]),
            mask_shape=(out_channels, in_channels // groups),
            weight_param=f"{name}.weight",
            bias_param=f"{name}.bias" if has_bias else None,
        )
        self.graph.links[name] = links
        for link in links:
            if link.source is not None:
                cons = self.graph._consumers.setdefault(link.source, [])
                if name not in cons:
                    cons.append(name)
        self.graph._n_params[name] = sum(p.numel() for p in mod.parameters(recurse=False))
        self.layer_nodes[name] = node
        self.maps[node] = _Map(tuple(frozenset({(name, o)}) for o in range(out_channels)))

    def _finish(self) -> None:
        for name, mod in self.modules.items():
            if name:
                self.graph._module_types[name] = type(mod).__name__
        calls: dict[str, int] = {}
        for node in self.gm.graph.nodes:
            if node.op == "call_module":
                calls[str(node.target)] = calls.get(str(node.target), 0) + 1
        users: dict[torch.fx.Node, list[torch.fx.Node]] = {}
        for node, src in self.unary.items():
            users.setdefault(src, []).append(node)
        for name, start in self.layer_nodes.items():
            found: list[str] = []
            todo = [start]
            while todo:
                cur = todo.pop()
                for nxt in users.get(cur, []):
                    target = str(nxt.target)
                    mod = self.modules.get(target) if nxt.op == "call_module" else None
                    if isinstance(mod, _bn._BatchNorm):
                        if calls.get(target) == 1 and target not in found:
                            found.append(target)
                    else:
                        todo.append(nxt)
            self.graph.bn_after[name] = found
