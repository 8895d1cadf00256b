"""Saliency criteria: one shared signature, one small module per criterion.

Every criterion scores the *kernels* ``(o, i)`` of the scored layers (``[out, in // groups]``
tensors, the layer's ``mask_shape``) or their *filters* (``[out]``), given a
:class:`ScoringContext`. Scores are float32 CPU tensors; larger = more important.

========== ==================================================== ===================================
criterion  kernel ``(o, i)``                                    filter ``o``
========== ==================================================== ===================================
actgrad    mean over images and positions of ``|a_oi · g_o|``   mean of ``|z_o · g_o|``
snip       ``Σ_taps |w ⊙ ∂L/∂w|``, abs per batch, summed        sum of its kernels
force      iterative SNIP w.r.t. the mask (FORCE)               — (raises :class:`GranularityError`)
magnitude  mean ``|w|`` over taps                               L1 norm (``Magnitude(norm=2)``: L2)
random     uniform ``[0, 1)``, seeded per layer                 uniform ``[0, 1)``, seeded per layer
========== ==================================================== ===================================

``L`` is the target objective (``target.objective_value(target.response(z_target))``, summed
over batches), ``z_o`` a layer's raw output channel, ``g_o = ∂L/∂z_o`` and
``a_oi = x_i ⋆ w_oi`` the contribution map of kernel ``(o, i)`` (``z_o = Σ_i a_oi + b_o``).

Conventions shared by all criteria:

* Only the model up to the target layer runs; it runs in eval mode; ``ctx.masks`` (when given)
  zero the masked kernels' weights while data-driven criteria score (magnitude and random
  ignore masks). The model comes back exactly as it was.
* Kernels whose output channel has no path to the target get score 0 from the gradient-based
  criteria (their gradient is exactly zero); so do kernels zeroed by ``ctx.masks`` (except in
  FORCE, which scores w.r.t. the mask). ``actgrad`` computes only the rows (output channels)
  that have a kernel in ``ctx.relevant``; the other rows are 0.
* ``actgrad``, ``snip`` and ``force`` run one forward pass to the target and one backward pass
  per batch (FORCE: per batch and step). On CPU, ``actgrad`` splits each layer's work over
  ``torch.get_num_threads()`` Python threads, setting torch's intra-op threads to 1 while they
  run (restored afterwards).

Example:
    >>> from netcarve.criteria import CRITERIA, get_criterion
    >>> sorted(CRITERIA)
    ['actgrad', 'force', 'magnitude', 'random', 'snip']
    >>> get_criterion("actgrad").name
    'actgrad'
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
from torch import nn

from netcarve.criteria._forward import CriterionError, GranularityError
from netcarve.criteria.actgrad import ActGrad
from netcarve.criteria.force import Force
from netcarve.criteria.magnitude import Magnitude
from netcarve.criteria.random import RandomCriterion
from netcarve.criteria.snip import Snip

if TYPE_CHECKING:
    from netcarve.core.graph import ModelGraph
    from netcarve.core.targets import Target

__all__ = [
    "CRITERIA",
    "ActGrad",
    "Criterion",
    "CriterionError",
    "Force",
    "GranularityError",
    "Magnitude",
    "RandomCriterion",
    "ScoringContext",
    "Snip",
    "get_criterion",
]


@dataclass
class ScoringContext:
    """Everything a criterion needs to score a target's kernels or filters.

    Attributes:
        model: the model (it comes back unchanged).
        graph: its :class:`~netcarve.core.graph.ModelGraph`.
        target: the target, already resolved (:meth:`~netcarve.core.targets.Target.resolve`).
        batches: a callable; each call returns an iterator over normalised image batches
            ``[N, C, H, W]`` already on the model's device and dtype. Criteria that need
            several passes (FORCE) call it several times.
        layers: the layers to score (the relevant ones, topological order).
        masks: ``{layer: bool mask_shape}`` kernel masks applied while scoring
            (iterative re-scoring); None = no masks.
        keep: final keep fraction (FORCE's schedule ends there).
        seed: seed of the random criterion.
        relevant: ``{layer: bool mask_shape}`` relevant kernels (FORCE counts them; when None
            they are computed from the graph).

    Example:
        >>> ctx = ScoringContext(model, graph, target, lambda: iter([x]),  # doctest: +SKIP
        ...                      layers=list(graph.relevant_kernels("features.3", [5])))
    """

    model: nn.Module
    graph: ModelGraph
    target: Target
    batches: Callable[[], Iterator[torch.Tensor]]
    layers: list[str]
    masks: dict[str, torch.Tensor] | None = None
    keep: float = 1.0
    seed: int = 0
    relevant: dict[str, torch.Tensor] | None = None


@runtime_checkable
class Criterion(Protocol):
    """The shared signature of saliency criteria.

    ``kernel_scores`` returns ``{layer: float32 CPU [out, in // groups]}`` and ``filter_scores``
    returns ``{layer: float32 CPU [out]}``, for every layer in ``ctx.layers``.
    """

    name: str

    def kernel_scores(self, ctx: ScoringContext) -> dict[str, torch.Tensor]:
        """Score every kernel of ``ctx.layers``."""
        ...

    def filter_scores(self, ctx: ScoringContext) -> dict[str, torch.Tensor]:
        """Score every filter of ``ctx.layers``."""
        ...


CRITERIA: dict[str, Criterion] = {
    c.name: c for c in (ActGrad(), Snip(), Force(), Magnitude(), RandomCriterion())
}


def get_criterion(name: str) -> Criterion:
    """The registered criterion called ``name``.

    Args:
        name: ``"actgrad"``, ``"snip"``, ``"force"``, ``"magnitude"`` or ``"random"``
            (case-insensitive).

    Returns:
        the :class:`Criterion` instance.

    Raises:
        CriterionError: unknown name; the message lists the valid names and a close match.

    Example:
        >>> get_criterion("SNIP").name
        'snip'
    """
    import difflib

    key = str(name).strip().lower()
    if key in CRITERIA:
        return CRITERIA[key]
    close = difflib.get_close_matches(key, list(CRITERIA), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise CriterionError(
        f"unknown criterion {name!r}{hint} (valid: {', '.join(sorted(CRITERIA))})"
    )
