"""Tracing a model into the channel graph: how every fx operation moves channels.

:class:`_Builder` walks a traced model once, in order, and records for each tensor which
layer channels it depends on (a channel map, :mod:`netcarve.core._channel_maps`). The tables
below say which operations are channel-wise, which move channel positions (cat, split, slices,
flatten/view; views, permutes and shuffles that the simple rules cannot follow are run on
channel indices by :mod:`netcarve.core._movement`) and which mix channels;
:meth:`netcarve.core.graph.ModelGraph.build` drives it and owns the result."""

from __future__ import annotations

import math
import operator
from typing import TYPE_CHECKING, Any

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

from netcarve.core._channel_maps import (
    _CONST,
    _dims,
    _Grid,
    _Map,
    _Source,
    _TupleMap,
    _union,
)
from netcarve.core._movement import _DataMovement
from netcarve.core.layers import ChannelLink, GraphError, LayerInfo

if TYPE_CHECKING:  # the graph drives this module; only its type is needed here
    from netcarve.core.graph import ModelGraph

__all__: list[str] = []

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
_PERMUTE = {"permute", "transpose", "transpose_", "swapaxes", "swapdims", "movedim",
            "moveaxis", "t", "flip", "roll", "narrow", "select", "channel_shuffle",
            "pixel_shuffle", "pixel_unshuffle"}
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


def _refuse_attention(model: nn.Module) -> None:
    """Vision Transformers (and any model with attention) are refused before tracing:
    attention mixes every position and channel with data-dependent weights, which no
    channel graph of kernels can express."""
    for name, mod in model.named_modules():
        kind = type(mod).__name__
        # token attention (query/key/value projections), not a channel gate such as
        # squeeze-excitation or CBAM's ChannelAttn, which the graph follows
        projections = {child for child, _ in mod.named_children()} & {
            "qkv", "q", "k", "v", "q_proj", "k_proj", "v_proj", "query", "key", "value"}
        named_attention = ("Attention" in kind or "Attn" in kind) and bool(projections)
        if isinstance(mod, nn.MultiheadAttention) or named_attention:
            raise GraphError(
                f"{type(model).__name__} contains attention (module '{name}', {kind}); "
                "netcarve analyses convolutional networks: attention mixes every token and "
                "channel with input-dependent weights, so kernel-level circuits, CAR removal "
                "semantics and filter pruning are not defined for it. Vision Transformers "
                "are not supported; use a CNN (ResNet, ConvNeXt, MobileNet, ...), or analyse "
                "a convolutional part of the model on its own (e.g. its stem as a separate "
                "nn.Module).")


# --------------------------------------------------------------------------- builder


class _Builder(_DataMovement):
    """Walks the fx graph once, computing channel maps and filling a :class:`ModelGraph`."""

    def __init__(
        self,
        graph: ModelGraph,
        gm: torch.fx.GraphModule,
        modules: dict[str, nn.Module],
        shapes: dict[torch.fx.Node, Any],
        leaf_names: set[str],
        leaf_types: tuple[type, ...],
        values: dict[torch.fx.Node, Any] | None = None,
    ) -> None:
        self.graph = graph
        self.values = values or {}
        self.gm = gm
        self.modules = modules
        self.shapes = shapes
        self.leaf_names = leaf_names
        self.leaf_types = leaf_types
        self.maps: dict[torch.fx.Node, _Map | _Grid | _TupleMap | None] = {}
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
            if isinstance(mod, nn.Linear) and self._linear_on_last_dim(node):
                last = self._channels_last_groups(node)
                if last is not None:  # channels on the last dim: a 1×1 conv, as a layer
                    self._layer(node, mod, last)
                    return
                # else a Linear over the last dim of a channels-first tensor: mixing, below
            elif isinstance(mod, (_conv._ConvNd, nn.Linear)) and not getattr(
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
        short = self._op_name(node)[0]
        moving = short in _RESHAPE or short in _PERMUTE or short == "getitem" or (
            node.op == "call_module"
            and isinstance(self.modules.get(str(node.target)), nn.Flatten | nn.Unflatten))
        trailing = self._trailing(node)
        if trailing is not None:
            return self._mix_trailing(node, trailing, shape)
        if any(isinstance(m, _Grid) for _, m, _ in feats):
            if len(feats) == 1 and self._elementwise_unary(node, short):
                return feats[0][1]
            if short in _FIRST_ARG and isinstance(self._first_map(node), _Grid):
                return self._first_map(node)
            if not moving:
                spread = next(m for _, m, _ in feats if isinstance(m, _Grid))
                return self._mixed(node, "acts on a tensor whose channels are spread over "
                                   f"several dimensions by {spread.origin}")
            return self._simulate(node, shape, None)
        result = self._classify_simple(node, feats, shape)
        if moving and isinstance(result, _Map) and result.error:
            return self._simulate(node, shape, result)
        return result

    def _elementwise_unary(self, node: torch.fx.Node, short: str) -> bool:
        """An op that acts on each element of its one feature input (GELU, scaling by a
        constant): it keeps any channel layout, channels-last included."""
        if node.op == "call_module":
            mod = self.modules.get(str(node.target))
            return isinstance(mod, _act.ReLU | _act.GELU | _act.SiLU | _act.Hardswish
                              | _act.Sigmoid | _act.Tanh | _act.ReLU6 | _drop._DropoutNd
                              | nn.Identity)
        return short in _ELEMENTWISE and not short.startswith(("max_pool", "avg_pool",
                                                                "adaptive", "lp_pool",
                                                                "interpolate", "upsample",
                                                                "pad", "batch_norm",
                                                                "instance_norm"))

    def _classify_simple(self, node: torch.fx.Node, feats: list[Any], shape: Any) -> Any:
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

    # -------------------------------------------------------------- layers

    def _layer(self, node: torch.fx.Node, mod: nn.Module,
               channels_last: tuple[frozenset[_Source], ...] | None = None) -> None:
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
        if isinstance(m, _Grid) and channels_last is None:
            raise GraphError(
                f"cannot follow channels into layer '{name}': its input's channels are spread "
                f"over several dimensions (shape {in_shape}) by {m.origin}; "
                f"{type(mod).__name__} layers need the channels on dim 1 (a Linear: on the "
                "last dim of a [N, features] input)")
        if isinstance(m, _Map) and m.error:
            raise GraphError(
                f"cannot follow channels into layer '{name}': {m.error}. Only channel-wise "
                "operations (BatchNorm, activations, pooling, dropout, residual add, "
                "torch.cat along channels, flatten/view before a Linear) may sit between "
                "conv/linear layers. If the operation is channel-wise, declare its module with "
                "ModelGraph.build(..., channelwise=[...])."
            )
        if not isinstance(m, _Map | _Grid) or not isinstance(in_shape, tuple):
            raise GraphError(f"layer '{name}' is fed by a constant, not by the model input")
        is_conv = isinstance(mod, _conv._ConvNd)
        if channels_last is not None:
            assert isinstance(mod, nn.Linear)
            groups_pos, spatial = channels_last, 1
            in_channels, out_channels, groups = len(groups_pos), mod.out_features, 1
        elif is_conv:
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
            channels_last=channels_last is not None,
        )
        self.graph.links[name] = links
        for link in links:
            if link.source is not None:
                cons = self.graph._consumers.setdefault(link.source, [])
                if name not in cons:
                    cons.append(name)
        self.graph._n_params[name] = sum(p.numel() for p in mod.parameters(recurse=False))
        self.layer_nodes[name] = node
        own = tuple(frozenset({(name, o)}) for o in range(out_channels))
        if channels_last is not None:
            ids = torch.arange(out_channels).expand(*out_shape[1:]).contiguous()
            self.maps[node] = _Grid(own, ids, f"the channels-last Linear '{name}'")
        else:
            self.maps[node] = _Map(own)

    def _finish(self) -> None:
        self.graph._layer_nodes = dict(self.layer_nodes)
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
