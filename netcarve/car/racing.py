"""Racing (successive-halving) selection of the lowest-CAR removal for one greedy step.

Exact greedy CAR scores every remaining candidate on every scoring image at every step. Most
of that work goes to candidates that are clearly worse than the best one after a few hundred
images. A racing step instead

1. scores every candidate on a first block of image chunks (in a seeded random order of the
   engine's chunks),
2. compares each candidate with the current leader (most hits, then lowest loss) by an exact
   one-sided **sign test** on the images where exactly one of the two is right (McNemar's
   test): ``P(X >= a)`` for ``X ~ Binomial(a + b, 1/2)``, where ``a`` counts images the
   leader gets right and the candidate wrong and ``b`` the reverse. A candidate whose
   p-value is at most ``delta / (candidates * rounds)`` (Bonferroni over every test the step
   can make) is dropped,
3. doubles the number of images seen by the survivors and repeats until one survivor is left
   or every image has been used; a lone survivor is then scored on the images it has not
   seen, so the step's accuracy and loss are exact on all scoring images.

Why this returns exact greedy's choice. Images are drawn without replacement from the finite
scoring set, so the discordant images a round sees are a random subset of all discordant
images; if the candidate is really no worse than the leader on the whole set (``A <= B``),
``a`` is hypergeometric with success fraction at most 1/2, whose upper tail is bounded by the
binomial one (Hoeffding, 1963). So a candidate that exact greedy would choose is dropped with
probability at most ``delta`` per step, and among survivors the choice is exact greedy's key
(fewest errors on all images, then lowest loss, then lowest filter index). Candidates that tie
with the leader on every image (silent filters, equal decisions) are never dropped: they are
decided by the exact key on all images.

Only the hit-based metrics (``top1``, ``top5``) race; loss-type metrics have no bounded
per-image difference for the test, and greedy pruning refuses ``mode="racing"`` for them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from netcarve.car.engine import AblationEngine
from netcarve.car.naive import single_removals
from netcarve.car.stats import AblationError, ForwardCounts

__all__ = ["RaceOutcome", "race_step", "sign_test_pvalues"]

RACING_METRICS = ("top1", "top5")


def sign_test_pvalues(worse: torch.Tensor, better: torch.Tensor) -> torch.Tensor:
    """One-sided exact sign-test p-values ``P(X >= worse)``, ``X ~ Bin(worse + better, 1/2)``.

    Args:
        worse: int ``[K]`` images the leader gets right and the candidate wrong.
        better: int ``[K]`` images the candidate gets right and the leader wrong.

    Returns:
        float64 ``[K]`` p-values (1 where there is no discordant image).

    Example:
        >>> sign_test_pvalues(torch.tensor([10]), torch.tensor([0])).item() == 2 ** -10
        True
    """
    a = worse.to(torch.float64)
    m = a + better.to(torch.float64)
    top = int(m.max()) if m.numel() else 0
    j = torch.arange(top + 1, dtype=torch.float64)
    logpmf = (torch.lgamma(m[:, None] + 1) - torch.lgamma(j[None] + 1)
              - torch.lgamma((m[:, None] - j[None]).clamp(min=0) + 1) - m[:, None] * math.log(2))
    inside = (j[None] >= a[:, None]) & (j[None] <= m[:, None])
    logpmf = logpmf.masked_fill(~inside, -math.inf)
    p = torch.logsumexp(logpmf, dim=1).exp()
    return torch.where(m > 0, p.clamp(max=1.0), torch.ones_like(p))


@dataclass
class RaceOutcome:
    """The winner of one racing step and what it cost.

    Attributes:
        best: ``(layer, filter)`` chosen.
        correct / loss_sum: the winner's hits (of the racing metric) and summed loss on all
            scoring images after its removal.
        top1: the winner's top-1 hits on all scoring images (= ``correct`` for top1).
        base_correct / base_loss_sum: the same for the network before the removal.
        n_images: scoring images.
        image_evaluations: (candidate, image) pairs evaluated.
        rounds: rounds run.
        eliminated: candidates dropped by the test.
    """

    best: tuple[str, int]
    correct: int
    loss_sum: float
    top1: int
    base_correct: int
    base_loss_sum: float
    n_images: int
    image_evaluations: int
    rounds: int
    eliminated: int


def _schedule(n_chunks: int, first: int) -> list[int]:
    """Cumulative chunk counts per round: first, 2*first, 4*first, ..., n_chunks."""
    out, k = [], max(1, min(first, n_chunks))
    while k < n_chunks:
        out.append(k)
        k *= 2
    out.append(n_chunks)
    return out


def race_step(eng: AblationEngine, candidates: Sequence[tuple[str, int]],
              masks: dict[str, torch.Tensor], metric: str, order: Sequence[int],
              first_chunks: int, delta: float, counts: ForwardCounts) -> RaceOutcome:
    """Choose the candidate removal exact greedy would choose, scoring fewer images.

    Args:
        eng: the engine holding the scoring images.
        candidates: ``(layer, filter)`` removals to race (each layer's filter still kept).
        masks: the current keep masks (``{layer: bool}``) of the layers in scope.
        metric: ``"top1"`` or ``"top5"``.
        order: the engine's chunk numbers in the (seeded) order images are drawn.
        first_chunks: chunks in the first round (then doubling).
        delta: probability bound of dropping the candidate exact greedy would choose.
        counts: forward-pass counts to add to.

    Returns:
        a :class:`RaceOutcome`.

    Raises:
        AblationError: an unsupported metric, no candidates, or a bad ``delta``.

    Example:
        >>> out = race_step(eng, [("features.0", f) for f in range(32)], masks, "top1",
        ...                 range(eng.n_chunks), 2, 0.01, ForwardCounts())  # doctest: +SKIP
    """
    if metric not in RACING_METRICS:
        raise AblationError(f"racing compares per-image hits: metric must be one of "
                            f"{', '.join(RACING_METRICS)}, got {metric!r} (use mode 'exact' or "
                            "'lazy' for a loss-type metric)")
    if not candidates:
        raise AblationError("racing needs at least one candidate")
    if not 0 < delta < 1:
        raise AblationError(f"delta must lie in (0, 1), got {delta}")
    order = list(order)
    plan = _schedule(len(order), first_chunks)
    k_all = len(candidates)
    threshold = delta / (k_all * len(plan))
    alive = list(range(k_all))
    hits: list[list[torch.Tensor]] = [[] for _ in range(k_all)]
    losses = torch.zeros(k_all, dtype=torch.float64)
    top1 = torch.zeros(k_all, dtype=torch.int64)
    base_correct, base_loss, seen, evaluated, rounds = 0, 0.0, 0, 0, 0

    def run(who: list[int], chunk_ids: list[int]) -> tuple[int, float]:
        """Score candidates ``who`` on ``chunk_ids``; returns the base hits and loss there."""
        nonlocal evaluated
        b_hit, b_loss = 0, 0.0
        for layer in dict.fromkeys(candidates[i][0] for i in who):
            mine = [i for i in who if candidates[i][0] == layer]
            keep = masks[layer]
            stats = eng.evaluate(layer, single_removals(keep.numel(),
                                                        [candidates[i][1] for i in mine], keep),
                                 masks, chunks=chunk_ids, per_image=True)
            counts.add(stats.counts)
            img = stats.image_correct if metric == "top1" else stats.image_correct5
            assert img is not None
            for row, i in enumerate(mine):
                hits[i].append(img[row])
                losses[i] += stats.loss_sum[row]
                top1[i] += stats.correct[row]
            evaluated += len(mine) * stats.n
            b_hit = int(stats.base_correct if metric == "top1" else stats.base_correct5)
            b_loss = float(stats.base_loss_sum)
        return b_hit, b_loss

    for upto in plan:
        rounds += 1
        b_hit, b_loss = run(alive, order[seen:upto])
        base_correct, base_loss, seen = base_correct + b_hit, base_loss + b_loss, upto
        if upto == len(order):
            break
        stacked = torch.stack([torch.cat(hits[i]) for i in alive])
        total = stacked.sum(1)
        lead = min(range(len(alive)), key=lambda r: (-int(total[r]), float(losses[alive[r]]),
                                                      candidates[alive[r]][1], alive[r]))
        worse = (stacked[lead][None] & ~stacked).sum(1)
        better = (~stacked[lead][None] & stacked).sum(1)
        p = sign_test_pvalues(worse, better)
        alive = [i for r, i in enumerate(alive) if r == lead or float(p[r]) > threshold]
        if len(alive) == 1:
            b_hit, b_loss = run(alive, order[seen:])
            base_correct, base_loss = base_correct + b_hit, base_loss + b_loss
            break
    final = {i: int(torch.cat(hits[i]).sum()) for i in alive}
    # exact greedy's key: fewest errors, then lowest loss, then filter index, then layer order
    best = min(alive, key=lambda i: (-final[i], float(losses[i]), candidates[i][1], i))
    return RaceOutcome(best=candidates[best], correct=final[best], loss_sum=float(losses[best]),
                       top1=int(top1[best]),
                       base_correct=base_correct, base_loss_sum=base_loss,
                       n_images=len(eng.labels), image_evaluations=evaluated, rounds=rounds,
                       eliminated=k_all - len(alive))
