"""Shared machinery for the saliency criteria: running a model up to the target, once per batch.

Two ways of getting gradients of the target objective ``L`` are offered:

* :func:`layer_grad_batches` streams, for every scored layer, its input ``x``, its raw output
  ``z`` (on demand) and ``g = ∂L/∂z``. The backward pass computes no weight gradients, and a
  layer's ``g`` is handed to a callback *as soon as the backward pass produces it*, so the
  callback can turn ``(x, g)`` into scores and the tensors can be freed before the backward pass
  moves on: peak memory stays close to that of a plain forward + backward.
* :func:`weight_grad_batches` yields ``∂L/∂w`` of the scored layers' weights per batch.

Both run the model in eval mode, only up to the target layer (later modules never run), with the
kernel masks of :class:`~netcarve.criteria.ScoringContext` applied, and leave the model exactly as
they found it (parameter values, ``requires_grad`` flags, ``.grad`` attributes, training flags,
no hooks left), also when an exception interrupts them.

In-place activations (``ReLU(inplace=True)``) after a layer overwrite its output tensor. The
gradient still refers to the raw output (the tensor hook is registered before the in-place op);
when the raw output values are needed and were overwritten, they are recomputed from the captured
input with ``module.forward``. A layer *input* changed in place after the layer used it is
detected through the tensor's version counter and the batch is re-run with cloned inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from netcarve.core.errors import NetcarveError
from netcarve.core.hooks import apply_kernel_masks, preserved_state, resolve_module, stop_at

if TYPE_CHECKING:
    from netcarve.core.layers import LayerInfo
    from netcarve.criteria import ScoringContext

__all__ = [
    "CriterionError",
    "GranularityError",
    "LayerCompute",
    "check_layers",
    "kernel_view",
    "layer_grad_batches",
    "objective",
    "relevant_masks",
    "relevant_rows",
    "scoring_session",
    "to_result",
    "weight_grad_batches",
]


class CriterionError(NetcarveError):
    """A criterion name is unknown, or scoring cannot run on the given model / data."""


class GranularityError(CriterionError, NotImplementedError):
    """The criterion has no score at the requested granularity (e.g. FORCE for filters)."""


# A callback that turns one layer's tensors into a per-batch partial result:
# compute(name, module, x, z_fn, g) -> anything, where z_fn() returns the raw output.
LayerCompute = Callable[[str, nn.Module, torch.Tensor, Callable[[], torch.Tensor], torch.Tensor],
                        Any]


_HAS_EDGES = hasattr(torch.autograd.graph, "get_gradient_edge")


class _InputModified(Exception):
    """A captured layer input was modified in place after the layer read it."""


def check_layers(ctx: ScoringContext) -> dict[str, nn.Module]:
    """Validate ``ctx.layers`` against the graph and return ``{name: module}``.

    Args:
        ctx: the scoring context.

    Returns:
        ``{layer name: module}`` in ``ctx.layers`` order.

    Raises:
        GraphError: a name is not a layer of the graph.
        CriterionError: a layer is a transposed convolution (not supported).

    Example:
        >>> list(check_layers(ctx))  # doctest: +SKIP
        ['features.0', 'features.3']
    """
    modules: dict[str, nn.Module] = {}
    for name in ctx.layers:
        ctx.graph.layer(name)
        module = resolve_module(ctx.model, name)
        if isinstance(module, nn.modules.conv._ConvTransposeNd):
            raise CriterionError(
                f"layer {name} is a transposed convolution; saliency criteria support "
                "nn.Conv1d/2d/3d and nn.Linear layers"
            )
        modules[name] = module
    return modules


def kernel_view(weight: torch.Tensor, info: LayerInfo) -> torch.Tensor:
    """``weight`` as ``[out, in // groups, taps]``: one row of taps per kernel ``(o, i)``.

    A conv's taps are its ``kh·kw`` (or ``k``, ``kd·kh·kw``) weights; for a Linear fed by a
    flattened ``C×H×W`` map they are the ``H·W`` consecutive columns of input channel ``i``.

    Args:
        weight: the layer's weight (or anything shaped like it, e.g. its gradient).
        info: the layer's :class:`~netcarve.core.layers.LayerInfo`.

    Returns:
        a view ``[out, in // groups, taps]``.

    Example:
        >>> kernel_view(torch.zeros(4, 6), type("I", (), {"mask_shape": (4, 3)})()).shape
        torch.Size([4, 3, 2])
    """
    return weight.reshape(info.mask_shape[0], info.mask_shape[1], -1)


def to_result(scores: torch.Tensor) -> torch.Tensor:
    """Scores as a contiguous float32 CPU tensor (the criteria's return convention).

    Example:
        >>> to_result(torch.ones(2, dtype=torch.float64)).dtype
        torch.float32
    """
    return scores.detach().to(device="cpu", dtype=torch.float32).contiguous()


def relevant_masks(ctx: ScoringContext) -> dict[str, torch.Tensor]:
    """``ctx.relevant``, or the graph's relevant kernels of the target when it is None.

    Example:
        >>> rel = relevant_masks(ctx)  # doctest: +SKIP
    """
    if ctx.relevant is not None:
        return ctx.relevant
    return ctx.graph.relevant_kernels(ctx.target.layer, ctx.target.channels)


def relevant_rows(relevant: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """Output channels of ``name`` with at least one relevant kernel (int64, sorted, CPU).

    Rows outside this set have an exactly zero gradient when ``relevant`` is the graph's
    relevant-kernel set (no path to the target), so gradient criteria may skip them.

    Example:
        >>> relevant_rows({"c": torch.tensor([[False, False], [True, False]])}, "c")
        tensor([1])
    """
    mask = relevant.get(name)
    if mask is None:
        return torch.empty(0, dtype=torch.int64)
    mask = mask.detach().cpu()
    return torch.nonzero(mask.reshape(mask.shape[0], -1).ne(0).any(dim=1)).flatten()


def objective(ctx: ScoringContext, z_target: torch.Tensor) -> torch.Tensor:
    """The scalar objective ``L`` of one batch from the target layer's raw output.

    Example:
        >>> loss = objective(ctx, forward_until(model, ctx.target.layer, x))  # doctest: +SKIP
    """
    return ctx.target.objective_value(ctx.target.response(z_target))


def _batches(ctx: ScoringContext) -> Iterator[torch.Tensor]:
    count = 0
    for batch in ctx.batches():
        if not isinstance(batch, torch.Tensor) or batch.dim() < 2:
            what = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
            raise CriterionError(
                f"ctx.batches() must yield image tensors [N, C, ...]; got {what}"
            )
        if batch.shape[0] == 0:
            continue
        count += 1
        yield batch
    if count == 0:
        raise CriterionError("no scoring images: ctx.batches() yielded no non-empty batch")


@contextmanager
def scoring_session(
    ctx: ScoringContext, weights_need_grad: list[str] | None = None, masks: bool = True
) -> Iterator[None]:
    """Put the model in scoring state for the duration of the block.

    Eval mode, gradients enabled, ``ctx.masks`` applied (when ``masks``), and
    ``requires_grad=True`` on the weights of the named layers; all of it is undone on exit,
    also on exceptions (:func:`netcarve.core.hooks.preserved_state`, which restores training flags
    and ``requires_grad``; :func:`netcarve.core.hooks.apply_kernel_masks`, which restores weights).

    Args:
        ctx: the scoring context.
        weights_need_grad: layers whose weight must require grad inside the block.
        masks: apply ``ctx.masks``.

    Raises:
        MaskError: ``ctx.masks`` names unknown layers or has wrong shapes.

    Example:
        >>> with scoring_session(ctx):  # doctest: +SKIP
        ...     loss = objective(ctx, forward_until(ctx.model, ctx.target.layer, x))
    """
    with ExitStack() as stack:
        stack.enter_context(preserved_state(ctx.model))
        ctx.model.eval()
        for name in weights_need_grad or []:
            weight = resolve_module(ctx.model, name).weight
            if not weight.requires_grad:
                weight.requires_grad_(True)
        if masks and ctx.masks:
            stack.enter_context(apply_kernel_masks(ctx.model, ctx.graph, ctx.masks))
        stack.enter_context(torch.enable_grad())
        yield


def _source_layers(ctx: ScoringContext, names: list[str]) -> set[str]:
    """Scored layers with no other scored layer upstream (the backward pass ends there)."""
    chosen = set(names)
    return {n for n in names if not chosen.intersection(ctx.graph.upstream(n))}


@dataclass
class _BatchState:
    """What the hooks of one batch collect."""

    clone_inputs: bool = False
    entries: dict[str, tuple[torch.Tensor, int, torch.Tensor | None, int]] = field(
        default_factory=dict)
    edges: list[Any] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)
    error: BaseException | None = None


def layer_grad_batches(
    ctx: ScoringContext,
    compute: LayerCompute,
    *,
    need_output: bool = False,
    layers: list[str] | None = None,
) -> Iterator[tuple[dict[str, Any], int]]:
    """Per batch, call ``compute`` for every scored layer with its input and output gradient.

    For each batch of ``ctx.batches()``: run the model up to ``ctx.target.layer``, compute
    ``L``, and run one backward pass that produces ``g = ∂L/∂z`` for the outputs of
    ``ctx.layers`` (no weight gradients). ``compute(name, module, x, z_fn, g)`` is called inside
    the backward pass, under ``torch.no_grad()``, as soon as a layer's ``g`` exists; ``x`` is
    the layer's input, ``z_fn()`` returns its raw output (recomputed from ``x`` if an in-place
    op overwrote it; only available with ``need_output=True``).

    Args:
        ctx: the scoring context (model, graph, resolved target, batches, layers, masks).
        compute: the per-layer callback; it returns a partial result (any object).
        need_output: keep the layers' raw outputs for ``z_fn``.
        layers: score only these (a subset of ``ctx.layers``); default all of them.

    Yields:
        ``(results, n_images)`` per batch: ``results[name]`` is what ``compute`` returned for
        the layers that received a gradient (layers with no path to the target, or that did
        not run, are absent); ``n_images`` is the batch size.

    Raises:
        CriterionError: bad batches, or a layer input keeps being modified in place.

    Example:
        >>> total = lambda name, module, x, z_fn, g: g.abs().sum()
        >>> for results, n in layer_grad_batches(ctx, total):  # doctest: +SKIP
        ...     print(n, {k: float(v) for k, v in results.items()})
    """
    modules = check_layers(ctx)
    if layers is not None:
        modules = {n: modules[n] for n in layers}
    names = list(modules)
    sources = _source_layers(ctx, names)
    state = _BatchState()

    def make_forward_hook(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            if not isinstance(out, torch.Tensor) or not out.requires_grad or not args:
                return
            x = args[0].detach()
            if state.clone_inputs:
                x = x.clone()
            z = out.detach() if need_output else None
            state.entries[name] = (x, x._version, z, -1 if z is None else z._version)
            out.register_hook(make_grad_hook(name))
            if name in sources and _HAS_EDGES:
                state.edges.append(torch.autograd.graph.get_gradient_edge(out))

        return hook

    def make_grad_hook(name: str) -> Callable[[torch.Tensor], None]:
        def hook(g: torch.Tensor) -> None:
            entry = state.entries.pop(name, None)
            if entry is None or state.error is not None:
                return
            x, x_version, z, z_version = entry
            if x._version != x_version:
                state.error = _InputModified(name)
                raise state.error
            module = modules[name]

            def z_fn() -> torch.Tensor:
                if z is not None and z._version == z_version:
                    return z
                if not need_output:
                    raise CriterionError("internal: raw outputs were not captured")
                return module.forward(x)

            with torch.no_grad():
                state.results[name] = compute(name, module, x, z_fn, g)

        return hook

    with scoring_session(ctx), ExitStack() as stack:
        for name, module in modules.items():
            handle = module.register_forward_hook(make_forward_hook(name))
            stack.callback(handle.remove)
        run = stack.enter_context(stop_at(ctx.model, ctx.target.layer))
        for batch in _batches(ctx):
            for clone_inputs in (False, True):
                state.clone_inputs = clone_inputs
                state.entries.clear()
                state.edges.clear()
                state.results = {}
                state.error = None
                try:
                    # The input requires grad so every layer output does, whatever the weights'
                    # requires_grad; the clone keeps in-place ops on the input legal.
                    leaf = batch.detach().requires_grad_(True)
                    loss = objective(ctx, run(leaf.clone()))
                    # The backward pass stops at the outputs of the first scored layers (their
                    # gradient edges, taken before any in-place op); without edges (old torch)
                    # it runs down to the input instead, at the cost of one more input gradient.
                    ends = state.edges if _HAS_EDGES else [leaf]
                    if loss.requires_grad and ends:
                        torch.autograd.grad(loss, ends, allow_unused=True)
                    del loss, leaf
                except _InputModified as exc:
                    if clone_inputs:
                        raise CriterionError(
                            f"the input of layer {exc} keeps changing in place during the "
                            "forward pass; netcarve cannot capture it"
                        ) from None
                    continue
                except RuntimeError:
                    if isinstance(state.error, _InputModified) and not clone_inputs:
                        continue
                    raise
                break
            results = state.results
            state.entries.clear()
            state.edges.clear()
            state.results = {}
            yield results, int(batch.shape[0])


def weight_grad_batches(
    ctx: ScoringContext,
    masks: dict[str, torch.Tensor] | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Per batch, the gradient of ``L`` w.r.t. the weights of ``ctx.layers``.

    Args:
        ctx: the scoring context; ``ctx.masks`` is applied unless ``masks`` is given.
        masks: kernel masks to apply instead of ``ctx.masks`` (FORCE combines its own).

    Yields:
        ``{name: ∂L/∂weight}`` per batch (zeros for layers with no path to the target). The
        gradient is taken at the masked weights, i.e. w.r.t. the effective weight ``w ⊙ m``.

    Example:
        >>> for grads in weight_grad_batches(ctx):  # doctest: +SKIP
        ...     print({k: v.shape for k, v in grads.items()})
    """
    modules = check_layers(ctx)
    names = list(modules)
    weights = [modules[n].weight for n in names]
    with ExitStack() as stack:
        stack.enter_context(scoring_session(ctx, weights_need_grad=names, masks=masks is None))
        if masks:
            stack.enter_context(apply_kernel_masks(ctx.model, ctx.graph, masks))
        run = stack.enter_context(stop_at(ctx.model, ctx.target.layer))
        for batch in _batches(ctx):
            loss = objective(ctx, run(batch))
            if loss.requires_grad:
                grads = torch.autograd.grad(loss, weights, allow_unused=True)
            else:
                grads = (None,) * len(weights)
            del loss
            yield {
                n: torch.zeros_like(w) if gw is None else gw
                for n, w, gw in zip(names, weights, grads, strict=True)
            }
