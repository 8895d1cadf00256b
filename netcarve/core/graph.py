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

import operator
import traceback
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.fx
from torch import nn

from netcarve.core._channel_maps import _shape_of
from netcarve.core.layers import ChannelLink, GraphError, LayerInfo, MaskError, close_names
from netcarve.core.tracing import _Builder, _refuse_attention

__all__ = ["ModelGraph"]


class _ShapeRecorder(torch.fx.Interpreter):
    """Runs a GraphModule and records every node's output shape."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__(gm)
        self.shapes: dict[torch.fx.Node, Any] = {}
        self.values: dict[torch.fx.Node, Any] = {}  # small non-tensor results (sizes)
        self.current: torch.fx.Node | None = None
        self.extra_traceback = False  # keep the op's own message; skip fx's slow error path

    def run_node(self, n: torch.fx.Node) -> Any:
        self.current = n
        result = super().run_node(n)
        self.shapes[n] = _shape_of(result)
        if isinstance(result, (int, float, bool, torch.Size)) or (
            isinstance(result, tuple) and all(isinstance(v, int) for v in result)
        ):
            self.values[n] = result
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
        self._layer_nodes: dict[str, torch.fx.Node] = {}
        self._consumers: dict[str, list[str]] = {}
        self._n_params: dict[str, int] = {}
        self._module_types: dict[str, str] = {}
        self._mixing: dict[str, str] = {}  # module → the channel-mixing op netcarve saw
        self._mixing_linear_macs: dict[str, int] = {}  # channels-last Linear → MACs per image

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
        from netcarve.core.hooks import preserved_state

        if not isinstance(model, nn.Module):
            raise GraphError(f"expected an nn.Module, got {type(model).__name__}")
        if not isinstance(example_input, torch.Tensor) or example_input.dim() < 2:
            raise GraphError(
                "example_input must be a tensor with a batch and a channel dimension "
                f"(e.g. [1, 3, 224, 224]); got {getattr(example_input, 'shape', example_input)!r}"
            )
        _refuse_attention(model)
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
        _Builder(graph, gm, modules, recorder.shapes, leaf_names, leaf_types,
                 recorder.values).run()
        return graph

    # ------------------------------------------------------------------ lookups

    @property
    def mixing(self) -> dict[str, str]:
        """Modules netcarve follows as channel-mixing operations, not as layers, with the op.

        A LayerNorm over channels (ConvNeXt's NHWC ``LayerNorm``, ``LayerNorm2d``) makes
        every output channel depend on every input channel: the graph links them that way
        (sound for circuits, CAR and effective masks), and filters feeding it cannot be
        pruned physically. (ConvNeXt's pointwise Linears after it are layers, with
        ``LayerInfo.channels_last``.)

        Example:
            >>> ModelGraph.build(convnext, x).mixing  # doctest: +SKIP
            {'features.1.0.block.2': 'LayerNorm over the last 1 dim(s) of its (1, 8, 8, 8) input'}
        """
        return dict(self._mixing)

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
        if name in self._mixing:
            what = (f" ({name} applies {self._mixing[name]}: it mixes channels, so "
                    "netcarve treats it as one channel-mixing operation between layers, "
                    "not as a layer)")
        elif name in self._module_types:
            what = f" ({name} is a {self._module_types[name]}, not a conv/linear layer)"
        hint = close_names(name, self.layers)
        hint_txt = f"; did you mean {', '.join(hint)}?" if hint else ""
        raise GraphError(
            f"unknown layer '{name}'{what}{hint_txt} "
            f"(ModelGraph.layers / describe() list all {len(self.layers)} layers)"
        )

    def layer_node(self, name: str) -> torch.fx.Node:
        """The node of :attr:`traced` that calls layer ``name``.

        Raises:
            GraphError: unknown layer (the message lists the closest layer names).

        Example:
            >>> g.layer_node("features.0").op  # doctest: +SKIP
            'call_module'
        """
        self.layer(name)
        return self._layer_nodes[name]

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
