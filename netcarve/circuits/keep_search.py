"""Keep search: the smallest circuit that still preserves its feature.

A researcher rarely knows the right keep in advance; they know how faithful the circuit must be
("held-out Pearson r >= 0.9"). :func:`find_keep` scores the kernels once (one-shot criteria
give the same scores for every keep; FORCE and iterative re-scoring are re-run per keep), then
brackets and bisects over the number of kept kernels ``k`` (``keep = k / relevant``):

1. a geometric scan down from every relevant kernel (``keep = 1``) by ``factor`` until a keep
   misses the goal (or the smallest keep, one kernel, still reaches it);
2. bisection, in log space, between the last keep that reached the goal and the first that
   missed, until the two differ by at most ``rtol`` relative (or by one kernel).

Each sampled keep costs one top-k selection and one preservation pass over the search images;
the original responses are computed once. Preservation is not guaranteed to be monotone in
``k``, so the result is the smallest keep *found* to reach the goal, every sampled point is
reported (``curve``), and ``monotone`` says whether the sampled curve ever went down while keep
went up.

Which images decide: ``search_on="heldout"`` (the default, the issue's "held-out r >= tau")
checks the goal on the held-out images; ``search_on="scoring"`` checks it on the scoring images
and leaves the held-out images untouched, so the preservation reported for the final circuit
is an unbiased estimate.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import torch
from torch import nn

from netcarve.circuits.circuit import Circuit, CircuitError, count, select_top_k
from netcarve.circuits.extract import (
    _as_target,
    _split_heldout,
    extract,
    measure_preservation,
    score_kernels,
    target_responses,
)
from netcarve.core.graph import ModelGraph
from netcarve.core.targets import Target
from netcarve.data.stream import Images, as_stream

__all__ = ["KeepSearch", "find_keep"]

SEARCH_SETS = ("heldout", "scoring")


@dataclass
class KeepSearch:
    """The result of :func:`find_keep`.

    Attributes:
        circuit: the circuit at the chosen keep, built and measured as :func:`extract` does
            (held-out and scoring preservation); at keep 1 when even that misses the goal.
        goal: the preservation goal (Pearson r).
        reached: whether some sampled keep reached the goal.
        keep: the chosen keep (``kept / relevant`` before the effective mask).
        curve: every sampled point, sorted by keep: ``keep``, ``k`` (kernels selected),
            ``kept_kernels`` (after the effective mask), ``effective_keep``, ``pearson`` on the
            search images, ``collapsed``, ``reached``.
        search_on: ``"heldout"`` or ``"scoring"``.
        evaluations: preservation passes made by the search.
        seconds: wall time of the whole search.
    """

    circuit: Circuit
    goal: float
    reached: bool
    keep: float
    curve: list[dict[str, Any]] = field(default_factory=list)
    search_on: str = "heldout"
    evaluations: int = 0
    seconds: float = 0.0

    @property
    def monotone(self) -> bool:
        """True when preservation never decreased as keep increased over the sampled points."""
        rs = [_r(p["pearson"]) for p in self.curve]
        return all(b >= a - 1e-12 for a, b in pairwise(rs))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (without the circuit's tensors)."""
        return {"goal": self.goal, "reached": self.reached, "keep": self.keep,
                "search_on": self.search_on, "evaluations": self.evaluations,
                "monotone": self.monotone, "seconds": self.seconds,
                "curve": [dict(p) for p in self.curve]}


def _r(value: float | None) -> float:
    """A missing or NaN correlation (constant response, collapse) counts as 0."""
    return 0.0 if value is None or math.isnan(value) else float(value)


def find_keep(
    model: nn.Module,
    target: Target | str,
    images: Images,
    *,
    heldout: Images | None = None,
    goal: float = 0.9,
    criterion: str = "actgrad",
    search_on: str = "heldout",
    factor: float = 2.0,
    rtol: float = 0.1,
    max_evaluations: int = 40,
    per_layer_norm: bool = False,
    batch_size: int = 64,
    seed: int = 0,
    graph: ModelGraph | None = None,
    scores: dict[str, torch.Tensor] | None = None,
    original: list[torch.Tensor] | None = None,
) -> KeepSearch:
    """The smallest keep whose circuit reaches a preservation goal.

    Args:
        model: any CNN ``nn.Module`` (it comes back exactly as it was).
        target: a :class:`~netcarve.core.targets.Target` or a string such as
            ``"features.11:5"``.
        images: normalised scoring images (tensor or stream).
        heldout: held-out images (tensor or stream); split off ``images`` as :func:`extract`
            does when omitted.
        goal: the Pearson r to reach, in (-1, 1].
        criterion: the saliency criterion (``actgrad``, ``snip``, ``force``, ``magnitude``,
            ``random``).
        search_on: ``"heldout"`` or ``"scoring"``: which images the goal is checked on.
        factor: the scan's step (keep divided by ``factor`` each time), > 1.
        rtol: stop bisecting when the bracket's ends differ by at most this fraction.
        max_evaluations: at most this many sampled keeps.
        per_layer_norm: per-layer score normalisation before the global top-k.
        batch_size: images per forward pass while scoring.
        seed: seeds the random criterion and the scoring/held-out split.
        graph: a prebuilt graph.
        scores: kernel scores already computed by :func:`score_kernels` for this target,
            criterion and scoring images (one-shot criteria only); the scoring pass is skipped.
        original: the target's responses on the search images, batch by batch as
            :func:`target_responses` yields them (with ``heldout`` given); not recomputed.

    Returns:
        A :class:`KeepSearch` with the circuit, the chosen keep and the sampled curve.

    Raises:
        CircuitError: goal, factor, rtol, max_evaluations or search_on out of range.
        GraphError / TargetError: unknown layer, channel out of range, untraceable model.

    Example:
        >>> res = find_keep(model, "features.11:5", x, heldout=x_test, goal=0.9)  # doctest: +SKIP
        >>> res.keep, res.circuit.preservation.pearson  # doctest: +SKIP
        (0.0625, 0.91)
    """
    if not (isinstance(goal, (int, float)) and -1 < goal <= 1) or math.isnan(goal):
        raise CircuitError(f"goal (a Pearson r) must be in (-1, 1], got {goal!r}")
    if not factor > 1:
        raise CircuitError(f"factor must be > 1, got {factor}")
    if not 0 < rtol < 1:
        raise CircuitError(f"rtol must be in (0, 1), got {rtol}")
    if max_evaluations < 2:
        raise CircuitError(f"max_evaluations must be >= 2, got {max_evaluations}")
    if search_on not in SEARCH_SETS:
        raise CircuitError(f"search_on must be one of {SEARCH_SETS}, got {search_on!r}")
    start = time.perf_counter()
    stream = as_stream(images)
    if stream.count() == 0:
        raise CircuitError("no scoring images given")
    p = next(model.parameters())
    if graph is None:
        graph = ModelGraph.build(model, stream.first(device=p.device, dtype=p.dtype))
    tgt = _as_target(target, graph)
    scoring, held = _split_heldout(stream, heldout, seed)
    search = held if search_on == "heldout" else scoring
    relevant = graph.relevant_kernels(tgt.layer, tgt.channels)
    total = count(relevant)
    if total == 0:
        raise CircuitError(f"{tgt} has no relevant kernels to keep")
    one_shot = criterion != "force"
    if scores is not None and not one_shot:
        raise CircuitError("FORCE re-scores at every keep: do not pass scores")
    if one_shot and scores is None:
        scores = score_kernels(model, graph, tgt, scoring, criterion=criterion,
                               relevant=relevant, batch_size=batch_size, seed=seed)
    eval_bs = max(batch_size, 256)
    if original is None:
        original = list(target_responses(model, graph, tgt, search, batch_size=eval_bs))
    points: dict[int, dict[str, Any]] = {}

    def sample(k: int) -> bool:
        if k in points:
            return points[k]["reached"]
        keep = k / total
        s = scores if one_shot else score_kernels(
            model, graph, tgt, scoring, criterion=criterion, keep=keep, relevant=relevant,
            batch_size=batch_size, seed=seed)
        raw = select_top_k(s, relevant, k, per_layer_norm=per_layer_norm)
        masks, collapsed = graph.effective_mask(raw, tgt.layer, tgt.channels)
        pres = measure_preservation(model, graph, tgt, masks, search, batch_size=eval_bs,
                                    original=original)
        r = None if math.isnan(pres.pearson) else float(pres.pearson)
        kept = count(masks)
        points[k] = {"keep": keep, "k": k, "kept_kernels": kept,
                     "effective_keep": kept / total, "pearson": r, "collapsed": collapsed,
                     "reached": (not collapsed) and _r(r) >= goal}
        return points[k]["reached"]

    # 1. scan down geometrically from every kernel until the goal is missed
    good: int | None = None
    bad: int | None = None
    k = total
    while len(points) < max_evaluations:
        if sample(k):
            good = k
            if k == 1:
                break
            k = max(1, math.floor(k / factor))
        else:
            bad = k
            break
    # 2. bisect in log space between the smallest good and the largest bad keep
    while (good is not None and bad is not None and good - bad > 1
           and (good - bad) / good > rtol and len(points) < max_evaluations):
        mid = round(math.sqrt(good * bad))
        mid = min(max(mid, bad + 1), good - 1)
        if sample(mid):
            good = mid
        else:
            bad = mid
    chosen = good if good is not None else total
    circuit = extract(model, tgt, scoring, heldout=held, criterion=criterion,
                      keep=chosen / total, per_layer_norm=per_layer_norm,
                      batch_size=batch_size, seed=seed, graph=graph, scores=scores)
    result = KeepSearch(circuit=circuit, goal=float(goal), reached=good is not None,
                        keep=chosen / total,
                        curve=[points[k] for k in sorted(points)],
                        search_on=search_on, evaluations=len(points),
                        seconds=time.perf_counter() - start)
    circuit.metadata["keep_search"] = result.to_dict()
    return result
