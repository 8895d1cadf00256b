"""The ``snip`` criterion: connection sensitivity ``|w ⊙ ∂L/∂w|`` (Lee et al., SNIP).

Kernel ``(o, i)``: ``Σ_taps |w ⊙ ∂L/∂w|``. The gradient is accumulated over the images of a
batch, the absolute value is taken per batch, and the per-batch values are summed over batches:
so (unlike ``actgrad``) the score depends on how the images are split into batches; with a
single batch it is the textbook SNIP score of that batch. Filter ``o``: the sum of its kernels'
scores. With ``ctx.masks`` the weights of masked kernels are zero, and so are their scores.
"""

from __future__ import annotations

from contextlib import closing
from typing import TYPE_CHECKING

import torch

from netcarve.criteria._forward import (
    check_layers,
    kernel_view,
    to_result,
    weight_grad_batches,
)

if TYPE_CHECKING:
    from netcarve.criteria import ScoringContext

__all__ = ["Snip", "snip_kernel_scores"]


def snip_kernel_scores(
    ctx: ScoringContext,
    masks: dict[str, torch.Tensor] | None = None,
    weights: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """``Σ_batches Σ_taps |w ⊙ ∂L/∂w|`` per kernel, on the model's device and dtype.

    Args:
        ctx: the scoring context.
        masks: kernel masks to apply instead of ``ctx.masks`` (used by FORCE).
        weights: the ``w`` to multiply the gradient with, per layer (FORCE passes the original,
            unmasked weights); default: the weights as they are while scoring (masked).

    Returns:
        ``{layer: [out, in // groups]}`` (not yet converted to float32 CPU).

    Raises:
        CriterionError: bad batches. GraphError: unknown layer.

    Example:
        >>> raw = snip_kernel_scores(ctx)  # doctest: +SKIP
    """
    modules = check_layers(ctx)
    infos = {n: ctx.graph.layers[n] for n in modules}
    totals: dict[str, torch.Tensor] = {}
    with closing(weight_grad_batches(ctx, masks)) as batches:
        for grads in batches:
            with torch.no_grad():
                for name, grad in grads.items():
                    w = weights[name] if weights is not None else modules[name].weight
                    s = kernel_view((w.detach() * grad).abs_(), infos[name]).sum(dim=2)
                    totals[name] = s if name not in totals else totals[name].add_(s)
    return totals


class Snip:
    """SNIP saliency (see the module docstring for the batch convention).

    Example:
        >>> Snip().name
        'snip'
    """

    name = "snip"

    def kernel_scores(self, ctx: ScoringContext) -> dict[str, torch.Tensor]:
        """``Σ_taps |w ⊙ ∂L/∂w|`` for every kernel of ``ctx.layers``.

        Args:
            ctx: the scoring context.

        Returns:
            ``{layer: float32 CPU [out, in // groups]}``.

        Raises:
            CriterionError: bad batches. GraphError: unknown layer.

        Example:
            >>> Snip().kernel_scores(ctx)["features.0"].shape  # doctest: +SKIP
            torch.Size([32, 1])
        """
        return {n: to_result(s) for n, s in snip_kernel_scores(ctx).items()}

    def filter_scores(self, ctx: ScoringContext) -> dict[str, torch.Tensor]:
        """The sum of each filter's kernel SNIP scores.

        Args:
            ctx: the scoring context.

        Returns:
            ``{layer: float32 CPU [out]}``.

        Raises:
            CriterionError: bad batches. GraphError: unknown layer.

        Example:
            >>> Snip().filter_scores(ctx)["features.0"].shape  # doctest: +SKIP
            torch.Size([32])
        """
        return {n: to_result(s.sum(dim=1)) for n, s in snip_kernel_scores(ctx).items()}
