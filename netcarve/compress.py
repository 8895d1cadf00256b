"""A physically smaller classifier from filter masks.

:func:`prune_filters` copies a model and removes whole filters: the rows of the pruned layer's
weight and bias, the matching entries of the BatchNorm that follows it, and the matching input
channels of every layer it feeds (for a Linear after a flatten, the whole block of columns of
each removed channel). The result, a :class:`PrunedModel`, computes what the original model
computes under :func:`netcarve.hooks.apply_filter_masks` with the same masks (a removed filter
outputs exactly 0 after its BatchNorm), up to float rounding (the sums run over fewer terms);
:func:`prune_filters` checks that on an input and refuses a result that differs by more than
``tol`` (relative to the largest output).

Which filters can be removed physically (:func:`prunable_layers`): a conv (``groups == 1``) or
Linear layer whose channels reach the layers they feed only through operations that keep a
zero channel at zero and act on each channel alone -- its own BatchNorm, ReLU-like
activations, pooling, dropout, padding with zeros, flatten / view, ``torch.cat`` along channels.
Not prunable, with the reason in the error:

* a layer whose channels are *merged* with other tensors by a residual addition (or product):
  the add's channel ``c`` would still carry the other operand, so removing the filter is not
  removing the channel. In a ResNet block this leaves the first conv of each block (and a
  stem that feeds only convolutions) prunable, not the block's last conv or its shortcut;
* a layer feeding a grouped or depthwise conv, a grouped conv itself;
* the output layer (its units are the logits);
* a layer followed by an activation with ``f(0) != 0`` (sigmoid) or by a BatchNorm that is not
  its own.

The model is traced by :mod:`torch.fx` (via :class:`~netcarve.graph.ModelGraph`), so in-place
ReLUs (torchvision style) and ``out += identity`` are followed. The user's model is never
changed: the result is a new module (a deep copy with resized layers).

Files: :meth:`PrunedModel.save` writes ``model.safetensors`` and ``architecture.json`` (the base
architecture as a zoo name or ``package.module:factory`` spec, the kept filters of every pruned
layer, input shape, sizes); :func:`load_pruned` rebuilds the same smaller module from them.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
    ...                     nn.Flatten(), nn.Linear(4 * 4 * 4, 2)).eval()
    >>> keep = torch.tensor([True, False, True, True])
    >>> small = prune_filters(net, {"0": keep}, example_input=torch.randn(2, 1, 6, 6))
    >>> small.module[0].out_channels, small.module[4].in_features, small.params_after
    (3, 48, 134)
"""

from __future__ import annotations

import copy
import importlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.nn.modules import activation as _act
from torch.nn.modules import batchnorm as _bn
from torch.nn.modules import conv as _conv
from torch.nn.modules import dropout as _drop
from torch.nn.modules import padding as _pad
from torch.nn.modules import pooling as _pool

from netcarve._json_limits import loads_limited
from netcarve.costs import count_macs, count_parameters
from netcarve.errors import ModelSpecError, NetcarveError
from netcarve.graph import ModelGraph
from netcarve.hooks import apply_filter_masks, preserved_state

__all__ = [
    "ARCHITECTURE_FORMAT",
    "CompressError",
    "PrunedModel",
    "build_from_spec",
    "count_macs",
    "count_parameters",
    "load_pruned",
    "prunable_layers",
    "prune_filters",
]

ARCHITECTURE_FORMAT = "netcarve-pruned-model"
_FORMAT_VERSION = 1


class CompressError(NetcarveError):
    """Filters cannot be removed physically (the message says which layer and why)."""


# --------------------------------------------------------------------------- what is safe

# Modules that act on each channel alone and keep an all-zero channel at zero.
_ZERO_SAFE_MODULES: tuple[type[nn.Module], ...] = (
    _act.ReLU, _act.ReLU6, _act.LeakyReLU, _act.ELU, _act.SELU, _act.CELU, _act.GELU,
    _act.SiLU, _act.Mish, _act.Tanh, _act.Hardtanh, _act.Hardswish, _act.Softsign,
    _act.Tanhshrink, _act.Hardshrink, _act.Softshrink, _act.RReLU,
    _pool._MaxPoolNd, _pool._AvgPoolNd, _pool._AdaptiveAvgPoolNd, _pool._AdaptiveMaxPoolNd,
    _drop._DropoutNd, nn.Identity, nn.Flatten, nn.Upsample,
    _pad.ZeroPad1d, _pad.ZeroPad2d, _pad.ZeroPad3d,
)
# Functions / methods with the same property (the tensor being followed is their first input).
_ZERO_SAFE_FUNCS = {
    "relu", "relu_", "relu6", "leaky_relu", "leaky_relu_", "elu", "elu_", "selu", "celu",
    "gelu", "silu", "mish", "tanh", "tanh_", "hardtanh", "hardtanh_", "hardswish",
    "softsign", "tanhshrink", "hardshrink", "softshrink", "rrelu",
    "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
    "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d",
    "dropout", "dropout1d", "dropout2d", "dropout3d", "feature_alpha_dropout",
    "flatten", "view", "reshape", "contiguous", "clone", "detach", "interpolate",
    "upsample", "upsample_nearest", "squeeze", "unsqueeze",
}
# Reading the shape does not carry channel values onwards.
_SHAPE_FUNCS = {"size", "dim", "getattr", "shape"}
_SCALING = {"mul", "mul_", "imul", "truediv", "itruediv", "div", "div_"}
_MERGING = {"add", "add_", "iadd", "sub", "sub_", "isub", "mul", "mul_", "imul", "truediv",
            "div", "div_", "maximum", "minimum", "where", "addcmul", "lerp"}


def _short_name(node: torch.fx.Node) -> str:
    if node.op == "call_method":
        return str(node.target)
    return getattr(node.target, "__name__", str(node.target)).lstrip("_")


def _layer_node(gm: torch.fx.GraphModule, layer: str) -> torch.fx.Node:
    for node in gm.graph.nodes:
        if node.op == "call_module" and str(node.target) == layer:
            return node
    raise CompressError(f"layer {layer!r} is not called in the traced model")


def _why_not(graph: ModelGraph, layer: str) -> str | None:
    """None when ``layer``'s filters can be removed physically, else the reason."""
    info = graph.layer(layer)
    gm = graph.traced
    assert gm is not None
    modules = dict(gm.named_modules())
    mod = modules.get(layer)
    if info.out_channels < 2:
        return f"{layer} has a single output channel"
    if isinstance(mod, _conv._ConvNd) and (mod.groups != 1 or mod.transposed):
        return (f"{layer} is a grouped or transposed conv (groups={mod.groups}); its filters "
                "cannot be removed one by one")
    if not isinstance(mod, (_conv._ConvNd, nn.Linear)):
        return f"{layer} is a {type(mod).__name__}, not a conv or linear layer"
    own_bns = set(graph.bn_after.get(layer, []))
    start = _layer_node(gm, layer)
    todo = [start]
    seen: set[torch.fx.Node] = set()
    reaches_layer = False
    while todo:
        node = todo.pop()
        for user in node.users:
            if user in seen:
                continue
            seen.add(user)
            if user.op == "output":
                return (f"{layer}'s channels reach the model output directly (its units are "
                        "outputs, not filters)")
            if user.op == "call_module":
                target = str(user.target)
                sub = modules[target]
                if target in graph.layers:
                    if isinstance(sub, _conv._ConvNd) and sub.groups != 1:
                        return (f"{layer} feeds the grouped conv {target} (groups="
                                f"{sub.groups}); removing an input channel would break its "
                                "groups")
                    reaches_layer = True
                    continue
                if isinstance(sub, _bn._BatchNorm):
                    if target in own_bns:
                        todo.append(user)
                        continue
                    return (f"{layer}'s channels pass through the BatchNorm {target}, which is "
                            "not its own: a removed channel would come out as its shift")
                if isinstance(sub, _ZERO_SAFE_MODULES):
                    todo.append(user)
                    continue
                return (f"{layer}'s channels pass through {target} ({type(sub).__name__}), "
                        "which netcarve does not know to keep a removed (zero) channel at zero")
            name = _short_name(user)
            if name in _SHAPE_FUNCS:
                continue
            if name in {"cat", "concat", "concatenate"}:
                todo.append(user)
                continue
            others = [a for a in _tensor_args(user) if a is not node]
            if name in _SCALING and not others and user.args and user.args[0] is node:
                todo.append(user)  # times / divided by a constant: zero stays zero
                continue
            if name in _MERGING or (name not in _ZERO_SAFE_FUNCS and others):
                return (f"{layer}'s channels are merged with another tensor by '{name}' (as in "
                        "a residual addition): removing the filter would leave the other "
                        "operand in that channel, so it is not the same as removing the channel")
            if name in _ZERO_SAFE_FUNCS:
                if others and name not in {"view", "reshape", "flatten"}:
                    return f"{layer}'s channels are combined with another tensor by '{name}'"
                todo.append(user)
                continue
            return (f"{layer}'s channels pass through '{name}', which netcarve does not know "
                    "to keep a removed (zero) channel at zero")
    if not reaches_layer:
        return f"{layer}'s channels feed no other layer"
    # every consumer input position fed by this layer must be fed by it alone
    for consumer in graph.consumers(layer):
        owners: dict[int, int] = {}
        for link in graph.links[consumer]:
            for pos in link.input_channels.tolist():
                owners[pos] = owners.get(pos, 0) + 1
        for link in graph.links[consumer]:
            if link.source == layer and any(owners[p] > 1 for p in link.input_channels.tolist()):
                return (f"{layer}'s channels are merged with other channels before {consumer} "
                        "(e.g. a residual addition)")
    return None


def _tensor_args(node: torch.fx.Node) -> list[torch.fx.Node]:
    found: list[torch.fx.Node] = []
    torch.fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) or n)
    return found


def prunable_layers(model: nn.Module, graph: ModelGraph | None = None,
                    example_input: torch.Tensor | None = None) -> dict[str, str | None]:
    """For every layer: None when its filters can be removed physically, else the reason.

    Args:
        model: the model.
        graph: its graph (or pass ``example_input`` to build it).
        example_input: an input batch, when ``graph`` is omitted.

    Returns:
        ``{layer: None | reason}`` in execution order.

    Raises:
        CompressError: neither a graph nor an example input was given.

    Example:
        >>> from netcarve.zoo import ZOO
        >>> import torch
        >>> net = ZOO["fmnist_resnet"].factory().eval()
        >>> ok = prunable_layers(net, example_input=torch.zeros(1, 1, 28, 28))
        >>> [name for name, why in ok.items() if why is None]
        ['conv1', 'layer1.conv1', 'layer2.conv1', 'layer3.conv1']
    """
    graph = _graph(model, graph, example_input)
    return {name: _why_not(graph, name) for name in graph.layers}


def _graph(model: nn.Module, graph: ModelGraph | None,
           example_input: torch.Tensor | None) -> ModelGraph:
    if graph is not None:
        return graph
    if example_input is None:
        raise CompressError("pass the model's graph or an example input")
    return ModelGraph.build(model, example_input[:1])


# --------------------------------------------------------------------------- sizes


# --------------------------------------------------------------------------- the result


@dataclass
class PrunedModel:
    """A physically smaller copy of a model and what was removed.

    Attributes:
        module: the new, smaller ``nn.Module`` (in eval mode).
        kept: ``{layer: original indices of the filters kept}`` for every pruned layer.
        removed: ``{layer: original indices removed}``.
        params_before / params_after: parameter counts.
        macs_before / macs_after: multiply-accumulates per image (:func:`count_macs`).
        input_shape: one input's shape (without batch).
        spec: how to rebuild the base architecture (zoo name or ``package.module:factory``),
            or None when unknown (then :meth:`save` needs one).
        order: the pruning order ``[(layer, filter), ...]`` when known.
        max_rel_error: largest relative difference to the masked model on the check input.
        metadata: free-form string information saved with the files.
    """

    module: nn.Module
    kept: dict[str, list[int]]
    removed: dict[str, list[int]]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    input_shape: tuple[int, ...]
    spec: str | None = None
    order: list[tuple[str, int]] = field(default_factory=list)
    max_rel_error: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly description (no weights)."""
        return {
            "format": ARCHITECTURE_FORMAT,
            "version": _FORMAT_VERSION,
            "spec": self.spec,
            "input_shape": list(self.input_shape),
            "kept": {k: list(v) for k, v in self.kept.items()},
            "removed": {k: list(v) for k, v in self.removed.items()},
            "filters_removed": sum(len(v) for v in self.removed.values()),
            "params_before": self.params_before,
            "params_after": self.params_after,
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "params_ratio": self.params_after / max(1, self.params_before),
            "macs_ratio": self.macs_after / max(1, self.macs_before),
            "order": [[layer, int(f)] for layer, f in self.order],
            "max_rel_error": self.max_rel_error,
            "metadata": self.metadata,
        }

    def save(self, directory: str | Path, spec: str | None = None) -> Path:
        """Write ``model.safetensors`` and ``architecture.json`` into ``directory``.

        Args:
            directory: output folder (created).
            spec: base architecture spec, overriding :attr:`spec`.

        Returns:
            the folder.

        Raises:
            CompressError: no spec is known, so the files could not be loaded back.

        Example:
            >>> pruned.save("out/pruned")  # doctest: +SKIP
        """
        from netcarve.weights import save_weights

        spec = spec or self.spec
        if not spec:
            raise CompressError(
                "cannot save a pruned model without an architecture spec: pass spec= (a zoo "
                "name or 'package.module:factory' that builds the unpruned model)")
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        desc = self.to_dict()
        desc["spec"] = spec
        save_weights(self.module, out / "model.safetensors",
                     {"format": ARCHITECTURE_FORMAT, "spec": spec})
        (out / "architecture.json").write_text(json.dumps(desc, indent=2))
        return out


# --------------------------------------------------------------------------- surgery


def _check_masks(graph: ModelGraph, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if not isinstance(masks, dict):
        raise CompressError(f"masks must be a dict {{layer: bool [out_channels]}}, got "
                            f"{type(masks).__name__}")
    out: dict[str, torch.Tensor] = {}
    for name, keep in masks.items():
        info = graph.layer(name)
        keep_t = torch.as_tensor(keep).detach().cpu()
        if tuple(keep_t.shape) != (info.out_channels,):
            raise CompressError(f"mask for {name} has shape {tuple(keep_t.shape)}, expected "
                                f"({info.out_channels},)")
        keep_t = keep_t.bool()
        if bool(keep_t.all()):
            continue
        if not bool(keep_t.any()):
            raise CompressError(f"the mask for {name} removes all {info.out_channels} filters; "
                                "keep at least one")
        out[name] = keep_t
    return out


def _new_param(value: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(value.detach().clone().contiguous(), requires_grad=like.requires_grad)


def _slice_out(mod: nn.Module, idx: torch.Tensor) -> None:
    idx = idx.to(mod.weight.device)
    mod.weight = _new_param(mod.weight.index_select(0, idx), mod.weight)
    if getattr(mod, "bias", None) is not None:
        mod.bias = _new_param(mod.bias.index_select(0, idx), mod.bias)
    if isinstance(mod, _conv._ConvNd):
        mod.out_channels = len(idx)
    else:
        mod.out_features = len(idx)


def _slice_bn(bn: _bn._BatchNorm, idx: torch.Tensor) -> None:
    dev_idx = idx.to(bn.running_mean.device if bn.running_mean is not None else "cpu")
    if bn.affine:
        bn.weight = _new_param(bn.weight.index_select(0, dev_idx.to(bn.weight.device)),
                               bn.weight)
        bn.bias = _new_param(bn.bias.index_select(0, dev_idx.to(bn.bias.device)), bn.bias)
    if bn.running_mean is not None:
        bn.running_mean = bn.running_mean.index_select(0, dev_idx).clone()
    if bn.running_var is not None:
        bn.running_var = bn.running_var.index_select(0, dev_idx).clone()
    bn.num_features = len(idx)


def _slice_in(mod: nn.Module, keep_pos: torch.Tensor, spatial: int) -> None:
    if isinstance(mod, _conv._ConvNd):
        idx = keep_pos.to(mod.weight.device)
        mod.weight = _new_param(mod.weight.index_select(1, idx), mod.weight)
        mod.in_channels = len(keep_pos)
    else:
        cols = (keep_pos[:, None] * spatial + torch.arange(spatial)[None, :]).reshape(-1)
        mod.weight = _new_param(mod.weight.index_select(1, cols.to(mod.weight.device)),
                                mod.weight)
        mod.in_features = len(cols)


def _apply_structure(module: nn.Module, graph: ModelGraph,
                     masks: dict[str, torch.Tensor]) -> None:
    """Resize ``module`` (a copy) in place for ``masks`` (validated, prunable)."""
    mods = dict(module.named_modules())
    removed_pos: dict[str, set[int]] = {}
    for name, keep in masks.items():
        idx = keep.nonzero().reshape(-1)
        _slice_out(mods[name], idx)
        for bn_name in graph.bn_after.get(name, []):
            _slice_bn(mods[bn_name], idx)  # type: ignore[arg-type]
        gone = set((~keep).nonzero().reshape(-1).tolist())
        for consumer in graph.consumers(name):
            for link in graph.links[consumer]:
                if link.source != name:
                    continue
                hit = [p for s, p in zip(link.source_channels.tolist(),
                                         link.input_channels.tolist(), strict=True) if s in gone]
                removed_pos.setdefault(consumer, set()).update(hit)
    for consumer, gone_pos in removed_pos.items():
        info = graph.layers[consumer]
        keep_pos = torch.tensor([p for p in range(info.in_channels) if p not in gone_pos],
                                dtype=torch.int64)
        _slice_in(mods[consumer], keep_pos, info.spatial)


def _base_spec(model: nn.Module) -> str | None:
    spec = getattr(model, "netcarve_spec", None)
    return spec if isinstance(spec, str) else None


def prune_filters(
    model: nn.Module,
    masks: dict[str, torch.Tensor],
    *,
    graph: ModelGraph | None = None,
    example_input: torch.Tensor | None = None,
    check_input: torch.Tensor | None = None,
    spec: str | None = None,
    order: Sequence[tuple[str, int]] = (),
    tol: float = 1e-5,
    fold: str = "none",
    fold_images: torch.Tensor | None = None,
    ridge: float = 1e-2,
) -> PrunedModel:
    """A new, physically smaller model without the masked filters.

    With ``fold="lstsq"`` the layers fed by the pruned layers are then refitted on the kept
    channels by ridge least squares over ``fold_images`` (:func:`netcarve.fold.fold_lstsq`),
    so a removed filter's contribution is re-expressed through the kept ones; the equivalence
    check above is made before the refit.

    Args:
        model: the original model (not changed).
        masks: ``{layer: bool [out_channels]}``, True = kept. Every layer named must be
            prunable (:func:`prunable_layers`).
        graph: the model's graph (built from ``example_input`` when omitted).
        example_input: an input batch (for the graph, and the equivalence check).
        check_input: input batch compared between the masked original and the result
            (default: ``example_input``, else 4 random normal images of the graph's shape).
        spec: how to rebuild the base architecture for :meth:`PrunedModel.save`.
        order: the pruning order, recorded in the result.
        tol: largest allowed ``max|pruned - masked| / max|masked|`` on the check input.
        fold: ``"none"`` (drop the removed filters' contributions, the papers' pruning) or
            ``"lstsq"`` (refit the next layers; see :mod:`netcarve.fold`).
        fold_images: normalised probe images for ``fold="lstsq"``, separate from the images
            the result is evaluated on.
        ridge: the refit's relative ridge penalty (:func:`netcarve.fold.fold_lstsq`).

    Returns:
        a :class:`PrunedModel` whose module is in eval mode, on the model's device and dtype
        (``metadata["fold"]`` says which fold was applied).

    Raises:
        CompressError: a named layer's filters cannot be removed physically (the reason is
            given), a mask removes every filter, the result differs from the masked model, or
            an unknown fold / ``fold="lstsq"`` without ``fold_images``.
        GraphError: unknown layer. FoldError: a layer the refit cannot handle, bad ridge.

    Example:
        >>> pruned = prune_filters(net, {"features.0": keep}, example_input=x)  # doctest: +SKIP
        >>> pruned.params_after < pruned.params_before  # doctest: +SKIP
        True
    """
    from netcarve.fold import FOLDS, fold_lstsq

    if fold not in FOLDS:
        raise CompressError(f"unknown fold {fold!r}; use one of {', '.join(FOLDS)}")
    if fold == "lstsq" and fold_images is None:
        raise CompressError("fold='lstsq' refits the next layers on probe images: pass "
                            "fold_images (normalised, not the evaluation images)")
    graph = _graph(model, graph, example_input)
    checked = _check_masks(graph, masks)
    for name in checked:
        why = _why_not(graph, name)
        if why is not None:
            ok = [n for n in graph.layers if _why_not(graph, n) is None]
            raise CompressError(f"cannot remove filters of {name} physically: {why}. Prunable "
                                f"layers of this model: {', '.join(ok) or 'none'}")
    with preserved_state(model):
        new = copy.deepcopy(model)
    _apply_structure(new, graph, checked)
    new.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    if check_input is None:
        check_input = example_input
    if check_input is None:
        gen = torch.Generator().manual_seed(0)
        check_input = torch.randn(4, *graph.input_shape, generator=gen)
    x = check_input.to(device=device, dtype=dtype)
    with preserved_state(model), torch.no_grad():
        model.eval()
        with apply_filter_masks(model, graph, checked):
            want = model(x)
        try:
            got = new(x)
        except RuntimeError as exc:
            raise CompressError(
                f"the pruned model fails to run ({exc}); something between the pruned layers "
                "and the layers they feed depends on the channel count (e.g. a hard-coded "
                "view)") from None
    if got.shape != want.shape:
        raise CompressError(f"the pruned model returns {tuple(got.shape)}, the masked model "
                            f"{tuple(want.shape)}")
    scale = float(want.abs().max()) or 1.0
    err = float((got - want).abs().max()) / scale
    if not err <= tol:
        raise CompressError(
            f"the pruned model differs from the masked model by {err:.3g} (relative; tol "
            f"{tol:g}). Something between the pruned layers and the layers they feed depends "
            "on the channel count (e.g. a hard-coded view) or is not channel-wise.")
    new_graph = ModelGraph.build(new, x[:1])
    kept = {n: keep.nonzero().reshape(-1).tolist() for n, keep in checked.items()}
    removed = {n: (~keep).nonzero().reshape(-1).tolist() for n, keep in checked.items()}
    result = PrunedModel(
        module=new, kept=kept, removed=removed,
        params_before=count_parameters(model), params_after=count_parameters(new),
        macs_before=count_macs(model, graph), macs_after=count_macs(new, new_graph),
        input_shape=tuple(graph.input_shape), spec=spec or _base_spec(model),
        order=[(str(a), int(b)) for a, b in order], max_rel_error=err,
        metadata={"fold": "none"},
    )
    if fold == "lstsq":
        assert fold_images is not None
        result = fold_lstsq(model, result, fold_images.to(device=device, dtype=dtype),
                            graph=graph, ridge=ridge)
    return result


# --------------------------------------------------------------------------- loading


def build_from_spec(spec: str) -> nn.Module:
    """The unpruned architecture (random weights) named by a zoo name or a factory spec.

    Only call this with a spec the user gave: a ``package.module:factory`` spec imports and
    calls code. :func:`load_pruned` resolves a spec read from a file against the zoo only.

    Raises:
        ModelSpecError: the spec cannot be resolved.

    Example:
        >>> type(build_from_spec("fmnist_vgg")).__name__
        'FmnistVGG'
    """
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ModelSpecError(f"cannot resolve {spec!r}: {exc}") from exc
        model = factory()
    else:
        from netcarve.zoo import ZOO

        if spec not in ZOO:
            raise ModelSpecError(f"unknown zoo model {spec!r} in the architecture description")
        model = ZOO[spec].factory()
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"{spec!r} did not build an nn.Module")
    return model


Architecture = str | Callable[[], nn.Module] | nn.Module


def _base_architecture(recorded: Any, given: Architecture | None, where: Path) -> nn.Module:
    """The unpruned module: the caller's ``architecture``, else the file's spec if a zoo name.

    A spec read from a file is a label, never imported: a ``module:factory`` string inside
    architecture.json could otherwise run any code on the machine that loads it.
    """
    from netcarve.zoo import ZOO

    if given is None:
        if isinstance(recorded, str) and recorded in ZOO:
            return ZOO[recorded].factory()
        shown = repr(recorded) if len(repr(recorded)) <= 80 else repr(recorded)[:77] + "..."
        raise ModelSpecError(
            f"{where} names architecture {shown}, which is not a zoo model; netcarve never "
            "imports code named inside a file. If you trust it, pass it yourself: "
            f"load_pruned(..., architecture={shown}) or a factory / module")
    if isinstance(given, nn.Module):
        return copy.deepcopy(given)
    if isinstance(given, str):
        return build_from_spec(given)
    model = given()
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"architecture factory returned {type(model).__name__}, "
                             "not an nn.Module")
    return model


def _input_shape(value: Any, where: Path) -> tuple[int, ...]:
    ok = (isinstance(value, list) and 1 <= len(value) <= 4
          and all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 1 << 16
                  for v in value) and math.prod(value) <= 1 << 26)
    if not ok:
        raise CompressError(f"{where}: input_shape must be 1 to 4 positive integers of "
                            f"moderate size, got {str(value)[:60]}")
    return tuple(value)


def load_pruned(directory: str | Path, device: str | torch.device = "cpu", *,
                architecture: Architecture | None = None) -> PrunedModel:
    """Rebuild a pruned model saved by :meth:`PrunedModel.save`.

    The base architecture is built, resized to the kept filters, and filled with the saved
    weights. The file names its architecture, but only a zoo name is used from it; any other
    architecture must come from the caller.

    Args:
        directory: the folder with ``architecture.json`` and ``model.safetensors``.
        device: where to put the module.
        architecture: the unpruned architecture when it is not a zoo model: a
            ``package.module:factory`` spec, a zero-argument factory, or a module (copied).

    Returns:
        the :class:`PrunedModel` (module in eval mode).

    Raises:
        CompressError: missing or malformed files.
        ModelSpecError: the file names a non-zoo architecture and none was given, or the
            spec cannot be built. WeightsError: the weights do not fit.

    Example:
        >>> again = load_pruned("out/pruned")  # doctest: +SKIP
        >>> mine = load_pruned("out/pruned", architecture="mypkg.nets:build")  # doctest: +SKIP
    """
    from netcarve.devices import resolve_device
    from netcarve.weights import load_weights

    target_device = resolve_device(device)
    folder = Path(directory)
    desc_path = folder / "architecture.json"
    if not desc_path.is_file():
        raise CompressError(f"no architecture.json in {folder}")
    try:
        desc = loads_limited(desc_path.read_text(encoding="utf-8"), max_bytes=64 << 20)
    except (ValueError, OSError) as exc:
        raise CompressError(f"{desc_path} is not valid JSON: {exc}") from exc
    if not isinstance(desc, dict) or desc.get("format") != ARCHITECTURE_FORMAT:
        raise CompressError(f"{desc_path} is not a netcarve pruned-model description")
    version = desc.get("version", 0)
    if not isinstance(version, int) or version > _FORMAT_VERSION:
        raise CompressError(f"{desc_path} has format version {version!r}; this netcarve "
                            f"reads up to {_FORMAT_VERSION}")
    kept_desc = desc.get("kept")
    if not isinstance(kept_desc, dict) or not all(
            isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in v)
            for v in kept_desc.values()):
        raise CompressError(f"{desc_path}: 'kept' must map layer names to lists of filter "
                            "indices")
    input_shape = _input_shape(desc.get("input_shape"), desc_path)
    base = _base_architecture(desc.get("spec"), architecture, desc_path).eval()
    graph = ModelGraph.build(base, torch.zeros(1, *input_shape))
    masks: dict[str, torch.Tensor] = {}
    for name, kept in kept_desc.items():
        keep = torch.zeros(graph.layer(name).out_channels, dtype=torch.bool)
        if any(not 0 <= i < len(keep) for i in kept):
            raise CompressError(f"{desc_path}: kept filters of {name} must lie in "
                                f"0..{len(keep) - 1}")
        keep[torch.tensor(kept, dtype=torch.int64)] = True
        masks[name] = keep
    checked = _check_masks(graph, masks)
    module = copy.deepcopy(base)
    _apply_structure(module, graph, checked)
    load_weights(module, folder / "model.safetensors")
    module.eval().to(target_device)
    new_graph = ModelGraph.build(module, torch.zeros(1, *input_shape, device=target_device))
    return PrunedModel(
        module=module, kept={k: list(v) for k, v in desc["kept"].items()},
        removed={k: list(v) for k, v in desc.get("removed", {}).items()},
        params_before=int(desc.get("params_before", count_parameters(base))),
        params_after=count_parameters(module),
        macs_before=int(desc.get("macs_before", count_macs(base, graph))),
        macs_after=count_macs(module, new_graph), input_shape=input_shape, spec=desc.get("spec"),
        order=[(str(a), int(b)) for a, b in desc.get("order", [])],
        max_rel_error=desc.get("max_rel_error"), metadata=desc.get("metadata", {}),
    )
