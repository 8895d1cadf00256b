"""Following data-movement and channel-mixing ops exactly (a mixin of the graph builder).

``split`` / ``chunk`` and plain channel indexing are followed directly (:meth:`_split`,
:meth:`_getitem`). Other views, permutes, transposes, shuffles and indexing move data without
computing: :meth:`_simulate` runs the op on a tensor of channel-group indices, so a channel
shuffle or an ``x[:, 0]`` maps exactly. LayerNorm over trailing dims (ConvNeXt's NHWC
LayerNorm) makes each output element depend on its whole trailing block: :meth:`_mix_trailing`
unions the sources there and records the module in :attr:`ModelGraph.mixing`. A Linear over
the last dim of a tensor whose channels are that dim (ConvNeXt's pointwise convs) is a layer
with ``channels_last`` (:meth:`_channels_last_groups`); over the last dim of a channels-first
tensor it mixes, like the LayerNorm."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.fx
from torch import nn

from netcarve.core._channel_maps import (
    _from_ids,
    _Grid,
    _ids_of,
    _Map,
    _NotConcrete,
    _TupleMap,
    _union,
)

if TYPE_CHECKING:
    from netcarve.core.graph import ModelGraph

__all__: list[str] = []


class _DataMovement:
    """Rules for data-movement and trailing-dim mixing ops; mixed into ``_Builder``."""

    graph: ModelGraph
    maps: dict[torch.fx.Node, Any]
    shapes: dict[torch.fx.Node, Any]
    values: dict[torch.fx.Node, Any]
    modules: dict[str, nn.Module]

    if TYPE_CHECKING:  # provided by the builder this is mixed into
        def _mixed(self, node: torch.fx.Node, why: str) -> _Map: ...

        def _op_name(self, node: torch.fx.Node) -> tuple[str, str]: ...

        def _where(self, node: torch.fx.Node) -> str: ...

    def _linear_on_last_dim(self, node: torch.fx.Node) -> bool:
        src = node.args[0] if node.args else None
        in_shape = self.shapes.get(src) if isinstance(src, torch.fx.Node) else None
        return isinstance(in_shape, tuple) and len(in_shape) > 2 and isinstance(
            self.maps.get(src), _Map | _Grid)

    def _channels_last_groups(self, node: torch.fx.Node
                              ) -> tuple[frozenset[Any], ...] | None:
        """Per feature of the last dim, its channel sources, when the input holds its channels
        on the last dim (the same sources at every position, as after ConvNeXt's NHWC
        permute and LayerNorm); None otherwise."""
        src = node.args[0]
        m = self.maps.get(src)
        in_shape = self.shapes.get(src)
        if not isinstance(m, _Map | _Grid) or not isinstance(in_shape, tuple) or (
                isinstance(m, _Map) and m.error):
            return None
        ids = m.ids if isinstance(m, _Grid) else _ids_of(m, in_shape)
        rows = ids.reshape(-1, ids.shape[-1])
        if not bool((rows == rows[:1]).all()):
            return None
        return tuple(m.groups[i] for i in rows[0].tolist())

    def _trailing(self, node: torch.fx.Node) -> int | None:
        """How many trailing dims a LayerNorm / channels-last Linear mixes (None: neither)."""
        if node.op == "call_module":
            mod = self.modules.get(str(node.target))
            if isinstance(mod, nn.LayerNorm):
                return len(mod.normalized_shape)
            if isinstance(mod, nn.Linear) and self._linear_on_last_dim(node):
                return 1
            return None
        if self._op_name(node)[0] == "layer_norm":
            raw = node.kwargs.get("normalized_shape", node.args[1] if len(node.args) > 1
                                  else None)
            raw = self.values.get(raw, raw) if isinstance(raw, torch.fx.Node) else raw
            if isinstance(raw, int):
                return 1
            if isinstance(raw, (list, tuple, torch.Size)):
                return len(raw)
        return None

    def _mix_trailing(self, node: torch.fx.Node, k: int, shape: Any) -> Any:
        """LayerNorm over trailing dims, or a Linear over the last dim: every output element
        depends on every input element of its trailing block (channels mixed when the
        block holds the channels, e.g. ConvNeXt's NHWC LayerNorm and pointwise Linears)."""
        src = node.args[0] if node.args else None
        m = self._first_map(node)
        in_shape = self.shapes.get(src) if isinstance(src, torch.fx.Node) else None
        if (not isinstance(m, _Map | _Grid) or not isinstance(in_shape, tuple)
                or not isinstance(shape, tuple) or len(in_shape) != len(shape)
                or len(in_shape) - 1 < k or (isinstance(m, _Map) and m.error)):
            return self._mixed(node, "normalises or projects in a way netcarve cannot follow")
        ids = m.ids if isinstance(m, _Grid) else _ids_of(m, in_shape)
        lead = tuple(ids.shape[: ids.dim() - k])
        rows = ids.reshape(-1, math.prod(ids.shape[ids.dim() - k:]))
        uniq, inverse = torch.unique(rows, dim=0, return_inverse=True)
        groups = tuple(_union(m.groups[i] for i in row.unique().tolist()) for row in uniq)
        out_ids = inverse.view(*lead, *([1] * k)).expand(*shape[1:])
        result = _from_ids(groups, out_ids.contiguous())
        qual = self._op_name(node)[1]
        path = self._module_path(node)
        self.graph._mixing[path] = f"{qual} over the last {k} dim(s) of its {in_shape} input"
        mod = self.modules.get(str(node.target)) if node.op == "call_module" else None
        if isinstance(mod, nn.Linear):  # its multiply-adds still count in the model's cost
            self.graph._mixing_linear_macs[path] = (
                mod.in_features * mod.out_features * math.prod(in_shape[1:-1]))
        if isinstance(result, _Grid):
            result = _Grid(result.groups, result.ids, m.origin if isinstance(m, _Grid)
                           else f"{qual} ({self._where(node)})")
        return result

    def _module_path(self, node: torch.fx.Node) -> str:
        if node.op == "call_module":
            return str(node.target)
        stack = node.meta.get("nn_module_stack")
        if stack:
            last = list(stack.values())[-1]
            return last[0] if isinstance(last, tuple) else str(last)
        return node.name

    def _first_map(self, node: torch.fx.Node) -> Any:
        src = node.args[0] if node.args else None
        return self.maps.get(src) if isinstance(src, torch.fx.Node) else None

    def _simulate(self, node: torch.fx.Node, shape: Any, failed: _Map | None) -> Any:
        """Follow a data-movement op (view, permute, transpose, indexing, ...) exactly by
        running it on a tensor of channel-group indices."""
        src = node.args[0] if node.args else None
        m = self._first_map(node)
        in_shape = self.shapes.get(src) if isinstance(src, torch.fx.Node) else None
        why = failed or self._mixed(node, "moves data in a way netcarve cannot follow")
        if not isinstance(m, _Map | _Grid) or not isinstance(in_shape, tuple) or not in_shape:
            return why
        if isinstance(m, _Map):
            if len(in_shape) < 2:
                return why
            groups, ids = m.groups, _ids_of(m, in_shape)
        else:
            groups, ids = m.groups, m.ids
        batch, n_groups = in_shape[0], max(len(groups), 1)
        offset = (torch.arange(batch) * n_groups).view(-1, *([1] * ids.dim()))
        tag = (ids.unsqueeze(0) + offset).contiguous()

        def concrete(a: torch.fx.Node) -> Any:
            if a is src:
                return tag
            if a in self.values:
                return self.values[a]
            raise _NotConcrete(a.name)

        try:
            args = torch.fx.node.map_arg(node.args, concrete)
            kwargs = torch.fx.node.map_arg(node.kwargs, concrete)
            if node.op == "call_method":
                out = getattr(args[0], str(node.target))(*args[1:], **kwargs)
            elif node.op == "call_function":
                out = node.target(*args, **kwargs)  # type: ignore[operator]
            else:
                out = self.modules[str(node.target)](*args, **kwargs)
        except Exception:
            return why
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != shape or not shape:
            return why
        if out.shape[0] != batch or not bool(
            (out.reshape(batch, -1) // n_groups == torch.arange(batch)[:, None]).all()
        ):
            return self._mixed(node, "moves data between images of the batch")
        result = _from_ids(groups, out[0].clone())
        if isinstance(result, _Grid):
            origin = f"{self._op_name(node)[1]} ({self._where(node)})"
            result = _Grid(result.groups, result.ids, origin)
        return result

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
