"""Everything that touches a user's model: masking, capturing outputs, stopping early.

All context managers here leave the model exactly as they found it on exit, also when the
body raises: the same parameter tensor objects with bitwise-identical values, the same
``requires_grad`` and training flags, and no hooks left behind.

Conventions:

* **Kernel masks** (:func:`apply_kernel_masks`) zero kernel *weights* only; biases and
  BatchNorm parameters stay, so a channel whose kernels are all masked still emits its bias /
  BatchNorm shift (a constant). Weights are zeroed in place, so run ``backward()`` inside the
  ``with`` block (autograd refuses to differentiate through weights changed after use).
* **Filter masks** (:func:`apply_filter_masks`) remove whole filters: a removed filter outputs
  exactly 0 after its BatchNorm (bias and BN shift included). This is done with forward hooks
  on the layer and on the BatchNorm modules that directly follow it
  (:attr:`netcarve.core.graph.ModelGraph.bn_after`). What comes after is computed normally, so
  ReLU, pooling and linear maps keep the removed channel at 0, while e.g. a sigmoid turns it
  into 0.5.
* **Captured outputs** (:func:`capture`, :func:`stop_at`) are a layer's raw output, before any
  following activation, even when that activation is an in-place ReLU.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(inplace=True), nn.Conv2d(2, 1, 1))
    >>> with capture(net, ["0"]) as out:
    ...     _ = net(torch.randn(1, 1, 5, 5))
    >>> out["0"].shape
    torch.Size([1, 2, 3, 3])
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from netcarve.core.layers import GraphError, MaskError, close_names

if TYPE_CHECKING:
    from netcarve.core.graph import ModelGraph

__all__ = [
    "GraphError",
    "MaskError",
    "apply_filter_masks",
    "apply_kernel_masks",
    "capture",
    "forward_until",
    "preserved_state",
    "resolve_module",
    "stop_at",
]


class _StopForward(BaseException):
    """Raised by a hook to abandon a forward pass after the target layer.

    A BaseException so that a model's own ``except Exception`` cannot swallow it.
    """


def resolve_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name`` (``named_modules()`` spelling).

    Raises:
        GraphError: unknown name (the message lists close names).

    Example:
        >>> resolve_module(nn.Sequential(nn.ReLU()), "0")
        ReLU()
    """
    modules = dict(model.named_modules())
    if name in modules and name != "":
        return modules[name]
    hint = close_names(str(name), [n for n in modules if n])
    raise GraphError(
        f"model has no module '{name}'"
        + (f"; did you mean {', '.join(hint)}?" if hint else "")
        + " (model.named_modules() lists them all)"
    )


@contextmanager
def preserved_state(model: nn.Module) -> Iterator[nn.Module]:
    """Snapshot every submodule's training flag and every parameter's ``requires_grad``.

    Both are restored on exit (also on exception), module by module, so a body that calls
    ``model.eval()`` or ``requires_grad_(False)`` leaves no trace.

    Yields:
        the model.

    Example:
        >>> net = nn.Sequential(nn.Dropout())
        >>> with preserved_state(net):
        ...     _ = net.eval()
        >>> net.training
        True
    """
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield model
    finally:
        for module, mode in modes:
            module.training = mode
        for param, flag in flags:
            if param.requires_grad != flag:
                param.requires_grad_(flag)


def _weight_of(model: nn.Module, name: str) -> torch.Tensor:
    module = resolve_module(model, name)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise MaskError(f"layer {name} has no weight tensor")
    return weight


def _kernel_mask_to_weight(
    mask: torch.Tensor, weight: torch.Tensor, spatial: int
) -> torch.Tensor:
    """Broadcastable bool tensor over ``weight``: True where the weight is kept."""
    mask = mask.to(weight.device)
    if weight.dim() == 2:  # Linear: each input channel owns `spatial` consecutive columns
        return mask.repeat_interleave(spatial, dim=1) if spatial > 1 else mask
    return mask.reshape(*mask.shape, *([1] * (weight.dim() - 2)))


@contextmanager
def apply_kernel_masks(
    model: nn.Module, graph: ModelGraph, masks: dict[str, torch.Tensor]
) -> Iterator[nn.Module]:
    """Zero the weights of masked kernels for the duration of the block.

    Args:
        model: the model the graph was built from.
        graph: its :class:`~netcarve.core.graph.ModelGraph`.
        masks: ``{layer: bool tensor of LayerInfo.mask_shape}``, True = kept. Layers not
            named stay untouched. For a Linear after a flattened map, masking input channel
            ``i`` zeroes its whole block of ``spatial`` columns.

    Yields:
        the model, with masked weights zeroed in place (biases and BatchNorm untouched).
        On exit every weight gets its original values back (same tensor objects, bitwise).

    Raises:
        MaskError: unknown layer names (with close names) or wrong mask shapes; checked
            before anything is touched.

    Example:
        >>> mask = torch.zeros(graph.layer("0").mask_shape, dtype=torch.bool)  # doctest: +SKIP
        >>> with apply_kernel_masks(net, graph, {"0": mask}):  # doctest: +SKIP
        ...     y = net(x)
    """
    checked = graph._check_masks(masks)
    targets = []
    for name, mask in checked.items():
        weight = _weight_of(model, name)
        info = graph.layers[name]
        expected_rows = info.out_channels
        if weight.shape[0] != expected_rows:
            raise MaskError(
                f"layer {name}'s weight has shape {tuple(weight.shape)}, but the graph expects "
                f"{expected_rows} output channels: was the graph built from this model?"
            )
        if bool(mask.all()):
            continue
        targets.append((weight, _kernel_mask_to_weight(mask, weight, info.spatial)))
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for weight, keep in targets:
                saved.append((weight, weight.detach().clone()))
                weight.masked_fill_(~keep, 0)
        yield model
    finally:
        with torch.no_grad():
            for weight, original in saved:
                weight.copy_(original)


def _channel_view(keep: torch.Tensor, out: torch.Tensor, last: bool = False) -> torch.Tensor:
    if last:  # a channels-last Linear: the channels are the last dim
        return keep.to(out.device).reshape(*([1] * (out.dim() - 1)), -1)
    return keep.to(out.device).reshape(1, -1, *([1] * (out.dim() - 2)))


def channels_first(module: nn.Module, out: Any) -> Any:
    """A layer output as netcarve presents it: a Linear applied to an ``[N, ..., F]`` tensor
    (ConvNeXt's channels-last pointwise convs) has its features moved to dim 1, so that
    ``out[:, c]`` is channel ``c`` for every layer."""
    if isinstance(module, nn.Linear) and isinstance(out, torch.Tensor) and out.dim() > 2:
        return out.movedim(-1, 1)
    return out


@contextmanager
def apply_filter_masks(
    model: nn.Module, graph: ModelGraph, masks: dict[str, torch.Tensor]
) -> Iterator[nn.Module]:
    """Remove whole filters: their output is exactly 0 after their BatchNorm.

    A forward hook on the layer zeroes the removed channels of its output (so the bias is
    gone), and a forward hook on each BatchNorm in ``graph.bn_after[layer]`` zeroes them again
    after normalisation (so the BN shift is gone). Later operations run normally: ReLU and
    pooling keep the channel at 0; an activation with ``f(0) != 0`` (sigmoid) does not.

    Args:
        model: the model the graph was built from.
        graph: its :class:`~netcarve.core.graph.ModelGraph`.
        masks: ``{layer: bool [out_channels]}``, True = kept, False = removed.

    Yields:
        the model with the hooks installed; they are removed on exit.

    Raises:
        MaskError: unknown layer or wrong mask shape (checked before hooks are installed).

    Example:
        >>> keep = torch.ones(64, dtype=torch.bool); keep[3] = False  # doctest: +SKIP
        >>> with apply_filter_masks(net, graph, {"features.0": keep}):  # doctest: +SKIP
        ...     logits = net(x)
    """
    if not isinstance(masks, dict):
        raise MaskError(f"filter masks must be a dict {{layer: bool tensor}}, got {type(masks)}")
    plan: list[tuple[nn.Module, torch.Tensor, bool]] = []
    for name, keep in masks.items():
        if name not in graph.layers:
            hint = close_names(str(name), graph.layers)
            raise MaskError(f"filter mask for unknown layer '{name}'"
                            + (f"; did you mean {', '.join(hint)}?" if hint else ""))
        expected = (graph.layers[name].out_channels,)
        if not isinstance(keep, torch.Tensor) or tuple(keep.shape) != expected:
            got = tuple(keep.shape) if isinstance(keep, torch.Tensor) else type(keep).__name__
            raise MaskError(f"filter mask for {name} has shape {got}, expected {expected}")
        keep = keep.detach().cpu()
        keep = keep if keep.dtype == torch.bool else keep != 0
        if bool(keep.all()):
            continue
        plan.append((resolve_module(model, name), keep, graph.layers[name].channels_last))
        for bn_name in graph.bn_after.get(name, []):
            plan.append((resolve_module(model, bn_name), keep, False))

    def make_hook(keep: torch.Tensor, last: bool) -> Callable[..., torch.Tensor]:
        def hook(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
            return out.masked_fill(~_channel_view(keep, out, last), 0)

        return hook

    handles = []
    try:
        for module, keep, last in plan:
            handles.append(module.register_forward_hook(make_hook(keep, last)))
        yield model
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def capture(
    model: nn.Module, layer_names: Sequence[str], *, clone: bool = True
) -> Iterator[dict[str, torch.Tensor]]:
    """Record the outputs of some modules during forward passes.

    Args:
        model: any model.
        layer_names: ``named_modules()`` names (layers or any other module).
        clone: store a clone of each output (default). Needed when an in-place op (ReLU with
            ``inplace=True``) follows the module: the clone keeps the raw, pre-activation
            value. Clones stay in the autograd graph.

    Yields:
        a dict filled on every forward with ``{name: output}`` (a module called several
        times keeps its last output). Hooks are removed on exit.

    Raises:
        GraphError: unknown module name.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(inplace=True))
        >>> with capture(net, ["0"]) as out:
        ...     y = net(torch.randn(1, 1, 4, 4))
        >>> bool((out["0"].clamp(min=0) == y).all())  # out["0"] is the pre-ReLU value
        True
    """
    if isinstance(layer_names, str):
        layer_names = [layer_names]
    modules = [(name, resolve_module(model, name)) for name in layer_names]
    store: dict[str, torch.Tensor] = {}

    def make_hook(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            out = channels_first(module, out)
            store[name] = out.clone() if clone and isinstance(out, torch.Tensor) else out

        return hook

    handles = []
    try:
        for name, module in modules:
            handles.append(module.register_forward_hook(make_hook(name)))
        yield store
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def stop_at(model: nn.Module, layer_name: str) -> Iterator[Callable[..., torch.Tensor]]:
    """Run the model only up to a layer.

    Yields a function ``run(*args, **kwargs)`` that calls ``model(*args, **kwargs)``, abandons
    the forward pass right after ``layer_name`` has produced its output (later modules do not
    run) and returns that raw output (before any activation). The hook is removed on exit.

    Args:
        model: any model.
        layer_name: ``named_modules()`` name of the module to stop at (its first call).

    Yields:
        ``run``.

    Raises:
        GraphError: unknown module name, or (from ``run``) the module was never called.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(inplace=True), nn.Conv2d(2, 1, 1))
        >>> with stop_at(net, "0") as run:
        ...     z = run(torch.randn(1, 1, 5, 5))
        >>> z.shape
        torch.Size([1, 2, 3, 3])
    """
    module = resolve_module(model, layer_name)
    box: dict[str, Any] = {}

    def hook(mod: nn.Module, args: Any, out: Any) -> None:
        box["out"] = channels_first(mod, out)
        raise _StopForward

    def run(*args: Any, **kwargs: Any) -> torch.Tensor:
        box.clear()
        try:
            model(*args, **kwargs)
        except _StopForward:
            return box.pop("out")
        raise GraphError(f"the forward pass finished without calling '{layer_name}'")

    handle = module.register_forward_hook(hook)
    try:
        yield run
    finally:
        handle.remove()


def forward_until(model: nn.Module, layer_name: str, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Run ``model(*args, **kwargs)`` up to ``layer_name`` and return its raw output.

    Shorthand for ``with stop_at(model, layer_name) as run: return run(*args, **kwargs)``.

    Raises:
        GraphError: unknown module, or the module was never called.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 2), nn.ReLU(inplace=True), nn.Linear(2, 1))
        >>> forward_until(net, "0", torch.ones(1, 3)).shape
        torch.Size([1, 2])
    """
    with stop_at(model, layer_name) as run:
        return run(*args, **kwargs)
