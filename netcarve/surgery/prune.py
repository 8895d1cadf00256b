"""A physically smaller classifier from filter masks.

:func:`prune_filters` copies a model and removes whole filters: the rows of the pruned layer's
weight and bias, the matching entries of the BatchNorm that follows it, and the matching input
channels of every layer it feeds (for a Linear after a flatten, the whole block of columns of
each removed channel). The result, a :class:`PrunedModel`, computes what the original model
computes under :func:`netcarve.core.hooks.apply_filter_masks` with the same masks (a removed filter
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
* a grouped conv itself, a layer feeding a grouped conv; a layer feeding a *depthwise* conv
  (MobileNetV2's expand conv) is prunable when the depthwise channels reach the next layers
  as constants (through BatchNorm, activations, pooling; into unpadded convs or Linears):
  the depthwise channel then goes with the filter, and its constant output (e.g. its
  BatchNorm shift through ReLU6) is folded into the biases of the layers it fed, so the
  result still equals the masked model. Not with a squeeze-excitation gate in between (the
  gate makes the channel input-dependent) or a zero-padded conv after it;
* the output layer (its units are the logits);
* a layer followed by an activation with ``f(0) != 0`` (sigmoid) or by a BatchNorm that is not
  its own.

The model is traced by :mod:`torch.fx` (via :class:`~netcarve.core.graph.ModelGraph`), so in-place
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
from collections.abc import Sequence

import torch
import torch.fx
from torch import nn
from torch.nn.modules import activation as _act
from torch.nn.modules import batchnorm as _bn
from torch.nn.modules import conv as _conv
from torch.nn.modules import dropout as _drop
from torch.nn.modules import padding as _pad
from torch.nn.modules import pooling as _pool

from netcarve.core.costs import count_macs, count_parameters
from netcarve.core.graph import ModelGraph
from netcarve.core.hooks import apply_filter_masks, preserved_state
from netcarve.surgery.pruned import (
    CompressError,
    PrunedModel,
    _apply_structure,
    _base_spec,
    _check_masks,
    depthwise_followers,
)

__all__ = ["prunable_layers", "prune_filters"]


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
# Channel-wise ops that keep a spatially constant channel constant (for the channels of a
# depthwise conv whose only input channel was removed).
_CONSTANT_SAFE_MODULES: tuple[type[nn.Module], ...] = (
    *(m for m in _ZERO_SAFE_MODULES if m is not _pool._AvgPoolNd and m is not nn.Upsample),
    _pool._AvgPoolNd, _act.Sigmoid, _act.Hardsigmoid, _act.Softplus, _act.LogSigmoid,
)
_CONSTANT_SAFE_FUNCS = (_ZERO_SAFE_FUNCS - {"interpolate", "upsample", "upsample_nearest"}) | {
    "sigmoid", "sigmoid_", "hardsigmoid", "softplus", "logsigmoid"}
# Reductions that keep a zero channel at zero when they run over positions only.
_SPATIAL_REDUCE = {"mean", "sum", "amax", "nanmean", "nansum"}
# Reading the shape does not carry channel values onwards.
_SHAPE_FUNCS = {"size", "dim", "getattr", "shape"}
_SCALING = {"mul", "mul_", "imul", "truediv", "itruediv", "div", "div_"}
_MERGING = {"add", "add_", "iadd", "sub", "sub_", "isub", "mul", "mul_", "imul", "truediv",
            "div", "div_", "maximum", "minimum", "where", "addcmul", "lerp"}


def _short_name(node: torch.fx.Node) -> str:
    if node.op == "call_method":
        return str(node.target)
    return getattr(node.target, "__name__", str(node.target)).lstrip("_")


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
    todo = [graph.layer_node(layer)]
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
                    if target in depthwise_followers(graph, layer):
                        why = _why_not_constant(graph, target)
                        if why is not None:
                            return (f"{layer} feeds the depthwise conv {target}, whose channel "
                                    f"would have to go with each removed filter, but {why}")
                        reaches_layer = True
                        continue
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
            if name in _SPATIAL_REDUCE and _reduces_spatial_only(user):
                todo.append(user)  # a mean / sum / max over positions of a zero channel is 0
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


def _why_not_constant(graph: ModelGraph, dw: str) -> str | None:
    """None when every channel of the depthwise conv ``dw`` reaches the layers it feeds as a
    spatially constant channel whenever its input channel is zero, so that the channel can be
    removed and its constant folded into their biases; else the reason."""
    gm = graph.traced
    assert gm is not None
    modules = dict(gm.named_modules())
    todo = [graph.layer_node(dw)]
    seen: set[torch.fx.Node] = set()
    while todo:
        node = todo.pop()
        for user in node.users:
            if user in seen:
                continue
            seen.add(user)
            if user.op == "output":
                return f"{dw}'s channels reach the model output"
            if user.op == "call_module":
                target = str(user.target)
                sub = modules[target]
                if target in graph.layers:
                    if isinstance(sub, _conv._ConvNd) and (
                            sub.groups != 1 or any(int(p) for p in _padding(sub))):
                        return (f"{dw}'s channels feed {target}, a grouped or zero-padded conv "
                                "(a constant channel would not stay constant at its borders)")
                    continue
                if isinstance(sub, _pool._AvgPoolNd) and any(int(p) for p in _padding(sub)):
                    return f"{dw}'s channels pass through the zero-padded average pool {target}"
                if isinstance(sub, (_bn._BatchNorm, *_CONSTANT_SAFE_MODULES)):
                    todo.append(user)
                    continue
                return f"{dw}'s channels pass through {target} ({type(sub).__name__})"
            name = _short_name(user)
            if name in _SHAPE_FUNCS:
                continue
            others = [a for a in _tensor_args(user) if a is not node]
            if name in _CONSTANT_SAFE_FUNCS and not others:
                todo.append(user)
                continue
            if name in _SPATIAL_REDUCE and _reduces_spatial_only(user):
                todo.append(user)
                continue
            return (f"{dw}'s channels meet '{name}'" + (" with another tensor (e.g. a "
                    "squeeze-excitation gate), so a removed channel is not a constant there"
                    if others else ""))
    return None


def _padding(mod: nn.Module) -> tuple[int, ...]:
    pad = getattr(mod, "padding", 0)
    if isinstance(pad, str):
        return (0,) if pad == "valid" else (1,)
    return tuple(pad) if isinstance(pad, (tuple, list)) else (int(pad),)


def _reduces_spatial_only(node: torch.fx.Node) -> bool:
    """A reduction whose ``dim`` argument names positions only (dims >= 2), as in
    ``x.mean([2, 3])`` before a classifier."""
    raw = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    dims = [raw] if isinstance(raw, int) else raw
    return isinstance(dims, (list, tuple)) and bool(dims) and all(
        isinstance(d, int) and d >= 2 for d in dims)


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


def _folded_constants(model: nn.Module, graph: ModelGraph, masks: dict[str, torch.Tensor],
                      x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Input values of the layers fed by a coupled depthwise conv, under the masks: the
    removed depthwise channels are constant there (checked), to be folded into their biases.

    Returns ``{layer: per input position (conv) or column (Linear) value}``.
    """
    readers = {p for name in masks for dw in depthwise_followers(graph, name)
               for p in graph.consumers(dw)}
    if not readers:
        return {}
    modules = dict(model.named_modules())
    seen: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def record(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            seen[name] = args[0].detach().clone()
        return record

    handles = [modules[p].register_forward_pre_hook(hook(p)) for p in readers]
    try:
        with preserved_state(model), torch.no_grad():
            model.eval()
            with apply_filter_masks(model, graph, masks):
                model(x)
    finally:
        for h in handles:
            h.remove()
    removed: dict[str, set[int]] = {}
    for name, keep in masks.items():
        gone = set((~keep).nonzero().reshape(-1).tolist())
        for dw in depthwise_followers(graph, name):
            dw_gone = {pos for link in graph.links[dw] if link.source == name
                       for s, pos in zip(link.source_channels.tolist(),
                                         link.input_channels.tolist(), strict=True) if s in gone}
            for reader in graph.consumers(dw):
                for link in graph.links[reader]:
                    if link.source == dw:
                        removed.setdefault(reader, set()).update(
                            pos for s, pos in zip(link.source_channels.tolist(),
                                                  link.input_channels.tolist(), strict=True)
                            if s in dw_gone)
    out: dict[str, torch.Tensor] = {}
    for reader, value in seen.items():
        spatial = graph.layers[reader].spatial
        # one row per input position (conv channel, or Linear column)
        flat = value.transpose(0, 1).flatten(1)
        scale = float(value.abs().max()) or 1.0
        cols = sorted(c * spatial + k for c in removed.get(reader, ()) for k in range(spatial))
        if cols:
            rows = flat[torch.tensor(cols, dtype=torch.int64, device=flat.device)]
            spread = float((rows.max(1).values - rows.min(1).values).max())
            if spread > 1e-6 * scale:
                raise CompressError(
                    f"a removed depthwise channel does not reach {reader} as a constant "
                    f"(spread {spread:.3g}); its constant cannot be folded into the bias")
        out[reader] = flat[:, 0].double().cpu()
    return out


def _graph(model: nn.Module, graph: ModelGraph | None,
           example_input: torch.Tensor | None) -> ModelGraph:
    if graph is not None:
        return graph
    if example_input is None:
        raise CompressError("pass the model's graph or an example input")
    return ModelGraph.build(model, example_input[:1])


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
    channels by ridge least squares over ``fold_images`` (:func:`netcarve.surgery.fold.fold_lstsq`),
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
            ``"lstsq"`` (refit the next layers; see :mod:`netcarve.surgery.fold`).
        fold_images: normalised probe images for ``fold="lstsq"``, separate from the images
            the result is evaluated on.
        ridge: the refit's relative ridge penalty (:func:`netcarve.surgery.fold.fold_lstsq`).

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
    from netcarve.surgery.fold import FOLDS, fold_lstsq

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
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    if check_input is None:
        check_input = example_input
    if check_input is None:
        gen = torch.Generator().manual_seed(0)
        check_input = torch.randn(4, *graph.input_shape, generator=gen)
    x = check_input.to(device=device, dtype=dtype)
    constants = _folded_constants(model, graph, checked, x)
    with preserved_state(model):
        new = copy.deepcopy(model)
    _apply_structure(new, graph, checked, constants)
    new.eval()
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
