"""The ``force`` criterion: FORCE, iterative SNIP w.r.t. the mask (de Jorge et al.).

FORCE prunes in ``T`` steps (default 10) on an exponential schedule: at step ``t`` it keeps the
top ``k_t`` relevant kernels, ``k_t = round(keep^(t/T) × #relevant)`` (never below the final
count; the last step keeps exactly ``k = max(1, round(keep × #relevant))``, the count that
:func:`netcarve.circuits.circuit.keep_count` uses). Each step scores with the previous step's mask
applied (weights of dropped kernels zeroed) and takes the saliency w.r.t. the *mask*::

    s(o, i) = Σ_taps |w_original ⊙ ∂L/∂(w ⊙ m)|

so a kernel dropped earlier still has a gradient and can come back. The absolute value is taken
per batch and summed over batches (as in ``snip``). Ties in the top-k are broken by position
(layers in ``ctx.layers`` order, then row-major kernel index; lower first).

The returned scores are the last step's, except that every kernel outside FORCE's final mask
(irrelevant kernels included) is pushed strictly below every kept one, order among them
preserved: a global top-k with the same ``k`` over these scores reproduces FORCE's mask.
FORCE has no filter-level variant: :meth:`Force.filter_scores` raises
:class:`~netcarve.criteria.GranularityError`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from netcarve.criteria._forward import (
    CriterionError,
    GranularityError,
    check_layers,
    relevant_masks,
    to_result,
)
from netcarve.criteria.snip import snip_kernel_scores

if TYPE_CHECKING:
    from netcarve.criteria import ScoringContext

__all__ = ["Force", "push_below", "top_k_masks"]


def top_k_masks(
    scores: dict[str, torch.Tensor], candidates: dict[str, torch.Tensor], k: int
) -> dict[str, torch.Tensor]:
    """Exactly ``min(k, #candidates)`` highest-scoring candidates; ties go to the lower index.

    Args:
        scores: ``{layer: scores}`` (any device / float dtype).
        candidates: ``{layer: bool}`` of the same shapes, the eligible entries.
        k: how many to select.

    Returns:
        ``{layer: bool CPU}`` with exactly ``min(k, #candidates)`` True entries.

    Example:
        >>> s = {"a": torch.tensor([[1.0, 2.0, 2.0]])}
        >>> top_k_masks(s, {"a": torch.ones(1, 3, dtype=torch.bool)}, 2)["a"].tolist()
        [[False, True, True]]
    """
    names = list(candidates)
    flat = [scores[n].detach().reshape(-1).double().cpu() for n in names]
    cand = [candidates[n].reshape(-1).cpu() for n in names]
    all_s = torch.cat(flat) if flat else torch.empty(0, dtype=torch.float64)
    all_c = torch.cat(cand) if cand else torch.empty(0, dtype=torch.bool)
    idx = torch.nonzero(all_c).flatten()
    k = max(0, min(int(k), idx.numel()))
    order = torch.sort(-all_s[idx], stable=True).indices[:k]
    chosen = torch.zeros_like(all_c)
    chosen[idx[order]] = True
    out, start = {}, 0
    for n in names:
        size = candidates[n].numel()
        out[n] = chosen[start:start + size].reshape(candidates[n].shape)
        start += size
    return out


def push_below(
    scores: dict[str, torch.Tensor], kept: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Move every non-kept score strictly below the smallest kept one, keeping their order.

    Scores are non-negative. With ``m`` the smallest kept score and ``M`` the largest other
    one, others become ``s · m / (2M)`` when ``m > 0`` (so they stay non-negative) and
    ``s / (2M) − 1`` when ``m = 0``.

    Args:
        scores: ``{layer: float64 CPU scores ≥ 0}``.
        kept: ``{layer: bool CPU}``, same shapes.

    Returns:
        new ``{layer: float64 CPU}`` scores.

    Example:
        >>> s = {"a": torch.tensor([4.0, 9.0, 1.0], dtype=torch.float64)}
        >>> push_below(s, {"a": torch.tensor([True, False, True])})["a"].tolist()
        [4.0, 0.5, 1.0]
    """
    kept_vals = [scores[n][kept[n]] for n in scores if bool(kept[n].any())]
    other_vals = [scores[n][~kept[n]] for n in scores if bool((~kept[n]).any())]
    if not kept_vals or not other_vals:
        return {n: s.clone() for n, s in scores.items()}
    low = float(torch.cat(kept_vals).min())
    high = float(torch.cat(other_vals).max())
    out = {}
    for n, s in scores.items():
        s = s.clone()
        other = ~kept[n]
        if high > 0:
            moved = s[other] * (low / (2 * high)) if low > 0 else s[other] / (2 * high) - 1
        else:
            moved = torch.zeros_like(s[other]) if low > 0 else torch.full_like(s[other], -1.0)
        s[other] = moved
        out[n] = s
    return out


class Force:
    """FORCE saliency (iterative SNIP w.r.t. the mask).

    Args:
        steps: number of pruning steps ``T`` (default 10).

    Example:
        >>> Force(steps=5).steps
        5
    """

    name = "force"

    def __init__(self, steps: int = 10) -> None:
        if int(steps) < 1:
            raise CriterionError(f"FORCE needs at least 1 step, got {steps!r}")
        self.steps = int(steps)

    def kernel_scores(self, ctx: ScoringContext) -> dict[str, torch.Tensor]:
        """Run FORCE to ``ctx.keep`` and return its final-step scores (see the module docs).

        Args:
            ctx: the scoring context; ``keep`` sets the schedule's end, ``relevant`` the
                kernels that count (computed from the graph when None); ``masks``, if given,
                stay applied at every step.

        Returns:
            ``{layer: float32 CPU [out, in // groups]}``; the top ``max(1, round(keep ×
            #relevant))`` relevant kernels by these scores are FORCE's final mask.

        Raises:
            CriterionError: keep outside (0, 1], bad batches. GraphError: unknown layer.

        Example:
            >>> s = Force().kernel_scores(ctx)  # doctest: +SKIP
        """
        keep = float(ctx.keep)
        if not 0 < keep <= 1:
            raise CriterionError(f"keep must be in (0, 1] for FORCE, got {ctx.keep!r}")
        modules = check_layers(ctx)
        infos = {n: ctx.graph.layers[n] for n in modules}
        relevant_all = relevant_masks(ctx)
        relevant = {
            n: (relevant_all[n].detach().cpu().bool() if n in relevant_all
                else torch.zeros(infos[n].mask_shape, dtype=torch.bool))
            for n in modules
        }
        n_rel = sum(int(m.sum()) for m in relevant.values())
        base = {n: m.detach().cpu() != 0 for n, m in (ctx.masks or {}).items()}
        originals = {n: m.weight.detach().clone() for n, m in modules.items()}
        current = {n: torch.ones(infos[n].mask_shape, dtype=torch.bool) for n in modules}
        k_final = max(1, round(keep * n_rel))
        scores: dict[str, torch.Tensor] = {}
        for t in range(1, self.steps + 1):
            applied = dict(base)
            for n, m in current.items():
                applied[n] = m & base[n] if n in base else m
            raw = snip_kernel_scores(ctx, masks=applied, weights=originals)
            scores = {n: raw[n].detach().double().cpu() for n in modules}
            if any(bool(torch.isnan(s).any()) for s in scores.values()):
                raise CriterionError("FORCE produced NaN scores: check the model and inputs")
            k_t = k_final if t == self.steps else max(k_final, round(keep ** (t / self.steps)
                                                                    * n_rel))
            chosen = top_k_masks(scores, relevant, k_t)
            current = {n: chosen[n] | ~relevant[n] for n in modules}
        final = {n: current[n] & relevant[n] for n in modules}
        if n_rel == 0:
            return {n: to_result(s) for n, s in scores.items()}
        return {n: to_result(s) for n, s in push_below(scores, final).items()}

    def filter_scores(self, ctx: ScoringContext) -> dict[str, torch.Tensor]:
        """FORCE is kernel-level only.

        Raises:
            GranularityError: always (a :class:`NotImplementedError` and a
                :class:`~netcarve.core.errors.NetcarveError`).

        Example:
            >>> try:
            ...     Force().filter_scores(None)
            ... except NotImplementedError as exc:
            ...     print(type(exc).__name__)
            GranularityError
        """
        raise GranularityError(
            "FORCE scores kernels only (it prunes connections against a mask); use "
            "granularity='kernel', or snip / actgrad / magnitude / random for filters"
        )
