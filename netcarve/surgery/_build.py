"""Circuit surgery, step two: write the smaller fx graph and the sliced modules.

:class:`_Surgeon` extends the plan of :mod:`netcarve.surgery._plan` (which channels each node
keeps) with the forward pass that emits the new graph node by node: layers sliced to their kept
rows and input columns, BatchNorm-like modules sliced to the kept channels, concatenations with
remapped offsets, and everything else copied.
"""

from __future__ import annotations

import copy
import inspect
import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
from torch import nn

from netcarve.surgery._plan import (
    _HOOK_DICTS,
    _STANDARD_CONVS,
    _Rec,
    _SurgeryPlan,
)
from netcarve.surgery.circuit_module import CircuitModule

__all__: list[str] = []



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


class _Surgeon(_SurgeryPlan):
    """Plans and builds one extraction (see :func:`netcarve.surgery.extract.extract_module`)."""

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
        if info.channels_last:  # whole, masked; reads its input as it is
            weight = mod.weight.detach()  # type: ignore[union-attr]
            bias = getattr(mod, "bias", None)
            new_w = weight.masked_fill(~self._mask(name).to(weight.device), 0)
            new_b = bias.detach().clone() if isinstance(bias, torch.Tensor) else None
            module_name = self._register(name, self._new_layer(mod, new_w, new_b, groups=1))
            self.env[n] = self.new_graph.create_node("call_module", module_name,
                                                     (self.env[first],), {}, name=n.name)
            return list(range(info.in_channels))
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
