"""The ``magnitude`` criterion: how large the weights are (data-free).

Kernel ``(o, i)``: mean ``|w|`` over its taps. Filter ``o``: the L1 norm of all its kernel
weights (``Σ |w|``, Li et al.'s filter norm; the bias is not included), or the L2 norm with
``Magnitude(norm=2)``. Kernel masks in the context are ignored: magnitude scores the original
weights.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from netcarve.criteria._forward import CriterionError, check_layers, kernel_view, to_result

if TYPE_CHECKING:
    from netcarve.criteria import ScoringContext

__all__ = ["Magnitude"]


class Magnitude:
    """Weight-magnitude saliency.

    Args:
        norm: 1 (default) or 2, the norm of :meth:`filter_scores`.

    Example:
        >>> Magnitude(norm=2).norm
        2
    """

    name = "magnitude"

    def __init__(self, norm: int = 1) -> None:
        if norm not in (1, 2):
            raise CriterionError(f"magnitude norm must be 1 or 2, got {norm!r}")
        self.norm = norm

    def kernel_scores(self, ctx: ScoringContext) -> dict[str, torch.Tensor]:
        """Mean ``|w|`` over the taps of every kernel of ``ctx.layers``.

        Args:
            ctx: the scoring context (only ``model``, ``graph`` and ``layers`` are used).

        Returns:
            ``{layer: float32 CPU [out, in // groups]}``.

        Raises:
            GraphError: a layer name is not in the graph.

        Example:
            >>> Magnitude().kernel_scores(ctx)["features.0"].shape  # doctest: +SKIP
            torch.Size([32, 1])
        """
        out = {}
        with torch.no_grad():
            for name, module in check_layers(ctx).items():
                w = kernel_view(module.weight.detach(), ctx.graph.layers[name])
                out[name] = to_result(w.abs().mean(dim=2))
        return out

    def filter_scores(self, ctx: ScoringContext) -> dict[str, torch.Tensor]:
        """L1 (or L2) norm of every filter's weights.

        Args:
            ctx: the scoring context (only ``model``, ``graph`` and ``layers`` are used).

        Returns:
            ``{layer: float32 CPU [out]}``.

        Raises:
            GraphError: a layer name is not in the graph.

        Example:
            >>> Magnitude(norm=2).filter_scores(ctx)["features.0"].shape  # doctest: +SKIP
            torch.Size([32])
        """
        out = {}
        with torch.no_grad():
            for name, module in check_layers(ctx).items():
                w = module.weight.detach().reshape(module.weight.shape[0], -1)
                norm = w.abs().sum(dim=1) if self.norm == 1 else w.pow(2).sum(dim=1).sqrt()
                out[name] = to_result(norm)
        return out
