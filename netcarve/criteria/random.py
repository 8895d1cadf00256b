"""The ``random`` criterion: uniform scores, the baseline every criterion must beat.

Scores are drawn from ``[0, 1)`` with a :class:`torch.Generator` seeded from ``ctx.seed`` and
the layer name (CRC-32), so a layer gets the same scores whatever other layers are scored, and
different layers (and the two granularities) get different streams.
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING

import torch

from netcarve.criteria._forward import check_layers, to_result

if TYPE_CHECKING:
    from netcarve.criteria import ScoringContext

__all__ = ["RandomCriterion"]


def _generator(seed: int, layer: str, granularity: str) -> torch.Generator:
    """A CPU generator seeded deterministically from the run seed and the layer."""
    salt = zlib.crc32(f"{granularity}:{layer}".encode())
    gen = torch.Generator()
    gen.manual_seed((int(seed) * 0x9E3779B1 + salt) % (2**63))
    return gen


class RandomCriterion:
    """Uniform random saliency (deterministic given ``ctx.seed``).

    Example:
        >>> RandomCriterion().name
        'random'
    """

    name = "random"

    def kernel_scores(self, ctx: ScoringContext) -> dict[str, torch.Tensor]:
        """Uniform ``[0, 1)`` scores for every kernel of ``ctx.layers``.

        Args:
            ctx: the scoring context (``graph``, ``layers`` and ``seed`` are used).

        Returns:
            ``{layer: float32 CPU [out, in // groups]}``; the same ``seed`` gives the same
            scores.

        Raises:
            GraphError: a layer name is not in the graph.

        Example:
            >>> a = RandomCriterion().kernel_scores(ctx)  # doctest: +SKIP
        """
        check_layers(ctx)
        return {
            name: to_result(torch.rand(ctx.graph.layers[name].mask_shape,
                                       generator=_generator(ctx.seed, name, "kernel")))
            for name in ctx.layers
        }

    def filter_scores(self, ctx: ScoringContext) -> dict[str, torch.Tensor]:
        """Uniform ``[0, 1)`` scores for every filter of ``ctx.layers``.

        Args:
            ctx: the scoring context (``graph``, ``layers`` and ``seed`` are used).

        Returns:
            ``{layer: float32 CPU [out]}``.

        Raises:
            GraphError: a layer name is not in the graph.

        Example:
            >>> b = RandomCriterion().filter_scores(ctx)  # doctest: +SKIP
        """
        check_layers(ctx)
        return {
            name: to_result(torch.rand(ctx.graph.layers[name].out_channels,
                                       generator=_generator(ctx.seed, name, "filter")))
            for name in ctx.layers
        }
