"""Greedy CAR pruning: remove the lowest-CAR filter, re-score the rest, repeat.

Per layer (each layer given the removals already made) or across layers (one pool), until a
count, a ratio or an accuracy floor. Three step rules: ``exact`` (every candidate on every
image), ``lazy`` (only the ``window`` candidates with the lowest previous CAR) and ``racing``
(:mod:`netcarve.car.racing`: candidates confidently worse than the leader stop early).
:func:`order_agreement` compares two orders (Kendall tau, overlap)."""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from netcarve.car.engine import AblationEngine
from netcarve.car.naive import single_removals
from netcarve.car.racing import RACING_METRICS, race_step
from netcarve.car.scores import MetricLike, _engine, resolve_layers
from netcarve.car.stats import AblationError, ForwardCounts, Metric, resolve_metric
from netcarve.core.graph import ModelGraph
from netcarve.data.preset import Preset
from netcarve.data.stream import Images, in_memory

__all__ = [
    "GreedyResult",
    "PruneStep",
    "greedy_prune",
    "kendall_tau",
    "order_agreement",
    "planned_removals",
]
GREEDY_MODES = ("exact", "lazy", "racing")


# --------------------------------------------------------------------------- greedy


@dataclass
class PruneStep:
    """One greedy removal.

    Attributes:
        layer / filter: what was removed.
        car: its CAR at the time of removal (given all earlier removals).
        loss_car: its loss CAR then.
        accuracy: top-1 accuracy on the scoring images after the removal.
        loss: mean loss after the removal.
        rescored: candidates evaluated at this step.
    """

    layer: str
    filter: int
    car: float
    loss_car: float
    accuracy: float
    loss: float
    rescored: int


@dataclass
class GreedyResult:
    """Outcome of :func:`greedy_prune`.

    Attributes:
        mode: ``"exact"``, ``"lazy"`` or ``"racing"``.
        scope: ``"layer"`` or ``"global"``.
        metric: the CAR metric.
        layers: the layers in scope.
        steps: the removals, in order.
        masks: ``{layer: bool keep}`` after pruning.
        base_accuracy / base_loss: before pruning (scoring images).
        n_images: scoring images.
        evaluations: candidate evaluations (removal × step).
        image_evaluations: (removal, image) pairs scored; exact greedy scores
            ``exact_image_evaluations`` = every remaining candidate on every image each step.
        eliminated: racing only: candidates dropped early by the sign test, over all steps.
        seconds: wall time.
        counts: forward passes.
        stopped: why pruning stopped (``"count"``, ``"floor"``, ``"exhausted"``).
    """

    mode: str
    scope: str
    metric: str
    layers: list[str]
    steps: list[PruneStep]
    masks: dict[str, torch.Tensor]
    base_accuracy: float
    base_loss: float
    n_images: int
    evaluations: int
    seconds: float
    counts: ForwardCounts
    stopped: str = "count"
    window: int | None = None
    refresh: int | None = None
    image_evaluations: int = 0
    exact_image_evaluations: int = 0
    eliminated: int = 0
    delta: float | None = None

    @property
    def saved_fraction(self) -> float:
        """Share of exact greedy's (removal, image) evaluations this run did not need."""
        if not self.exact_image_evaluations:
            return 0.0
        return 1.0 - self.image_evaluations / self.exact_image_evaluations

    @property
    def order(self) -> list[tuple[str, int]]:
        """``[(layer, filter), ...]`` in pruning order."""
        return [(s.layer, s.filter) for s in self.steps]

    def removed(self, layer: str) -> list[int]:
        """Filters of ``layer`` removed, in order."""
        return [s.filter for s in self.steps if s.layer == layer]

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary with the full order."""
        return {
            "mode": self.mode, "scope": self.scope, "metric": self.metric,
            "layers": self.layers, "n_images": self.n_images, "window": self.window,
            "refresh": self.refresh,
            "filters_removed": len(self.steps), "stopped": self.stopped,
            "base_accuracy": self.base_accuracy, "base_loss": self.base_loss,
            "final_accuracy": self.steps[-1].accuracy if self.steps else self.base_accuracy,
            "evaluations": self.evaluations, "image_evaluations": self.image_evaluations,
            "exact_image_evaluations": self.exact_image_evaluations,
            "saved_fraction": self.saved_fraction, "eliminated": self.eliminated,
            "delta": self.delta, "seconds": self.seconds,
            "forward_passes": self.counts.to_dict(),
            "order": [{"layer": s.layer, "filter": s.filter, "car": s.car,
                       "loss_car": s.loss_car, "accuracy": s.accuracy, "loss": s.loss,
                       "rescored": s.rescored} for s in self.steps],
        }

    def save(self, path: str | Path) -> Path:
        """Write the order as CSV (``step,layer,filter,car,loss_car,accuracy,loss``)."""
        target = Path(path)
        if target.suffix.lower() != ".csv":
            target.mkdir(parents=True, exist_ok=True)
            target = target / "order.csv"
        with target.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["step", "layer", "filter", "car", "loss_car", "accuracy", "loss",
                             "rescored"])
            for i, s in enumerate(self.steps, 1):
                writer.writerow([i, s.layer, s.filter, f"{s.car:.6g}", f"{s.loss_car:.6g}",
                                 f"{s.accuracy:.6g}", f"{s.loss:.6g}", s.rescored])
        return target


def planned_removals(graph: ModelGraph, layers: str | Sequence[str],
                     amount: float | int | None, scope: str = "layer") -> int:
    """How many filters :func:`greedy_prune` will remove at most (all of them, with no floor).

    Args:
        graph: the model's channel graph.
        layers: the layers in scope (names or a comma-separated string).
        amount: a count or a ratio as for :func:`greedy_prune` (``None``: all but one per layer).
        scope: ``"layer"`` or ``"global"``.

    Returns:
        the planned number of removals.

    Raises:
        AblationError: a bad amount, or a layer with fewer than two filters.

    Example:
        >>> planned_removals(graph, ["features.0", "features.4"], 0.5)  # doctest: +SKIP
        48
    """
    targets = _targets(graph, resolve_layers(graph, layers), amount, scope)
    return sum(targets.values()) if isinstance(targets, dict) else int(targets)


def _targets(graph: ModelGraph, layers: list[str], amount: float | int | None,
             scope: str) -> dict[str, int] | int:
    """Filters to remove: per layer (scope "layer") or in total (scope "global")."""
    sizes = {n: graph.layer(n).out_channels for n in layers}
    for name, size in sizes.items():
        if size < 2:
            raise AblationError(f"layer {name} has {size} filter; there is nothing to prune")
    if amount is None:
        return {n: s - 1 for n, s in sizes.items()} if scope == "layer" else \
            sum(s - 1 for s in sizes.values())
    if isinstance(amount, bool) or not isinstance(amount, (int, float)):
        raise AblationError(f"amount must be a count (int) or a ratio (float), got {amount!r}")
    if isinstance(amount, float):
        if not 0 < amount < 1:
            raise AblationError(f"a pruning ratio must lie in (0, 1), got {amount}")
        if scope == "layer":
            return {n: max(1, min(s - 1, round(amount * s))) for n, s in sizes.items()}
        total = sum(sizes.values())
        return max(1, min(total - len(sizes), round(amount * total)))
    count = int(amount)
    if count < 1:
        raise AblationError(f"the number of filters to prune must be at least 1, got {count}")
    if scope == "layer":
        for name, size in sizes.items():
            if count > size - 1:
                raise AblationError(f"cannot prune {count} of the {size} filters of {name}: "
                                    "at least one must stay")
        return dict.fromkeys(sizes, count)
    most = sum(s - 1 for s in sizes.values())
    if count > most:
        raise AblationError(f"cannot prune {count} filters from {', '.join(layers)}: at most "
                            f"{most} (one per layer must stay)")
    return count


def greedy_prune(
    model: nn.Module,
    images: Images,
    labels: torch.Tensor | None,
    layers: str | Sequence[str],
    *,
    amount: int | float | None = None,
    floor: float | None = None,
    mode: str = "exact",
    scope: str = "layer",
    window: int | None = None,
    refresh: int | None = None,
    metric: MetricLike = "top1",
    preset: Preset | None = None,
    graph: ModelGraph | None = None,
    batch_size: int = 100,
    engine: AblationEngine | None = None,
    progress: Callable[[PruneStep], None] | None = None,
    delta: float = 0.01,
    first_images: int = 200,
    seed: int = 0,
) -> GreedyResult:
    """Greedy CAR pruning: remove the lowest-CAR filter, re-score, repeat.

    Args:
        model: the classifier (unchanged; pruning is recorded as masks).
        images: scoring images (float normalised or uint8 with ``preset``), or a stream read
            once into memory (greedy re-evaluates them for every removal).
        labels: int64 ``[N]``.
        layers: the layers in scope.
        amount: filters to remove: an int count, or a ratio in (0, 1) of the filters -- per
            layer for ``scope="layer"``, of all filters in scope for ``scope="global"``.
        floor: stop before top-1 accuracy on the scoring images would fall below this value.
            With no ``amount``, prune until the floor (at most all filters but one per layer).
        mode: ``"exact"`` (re-score every remaining candidate on every image each step),
            ``"lazy"`` (re-score only the ``window`` candidates with the lowest previous CAR)
            or ``"racing"`` (every candidate, but candidates confidently worse than the
            leader stop being scored early: :mod:`netcarve.car.racing`; top-1/top-5 metrics).
        scope: ``"layer"``: layers one after another, each given the earlier removals;
            ``"global"``: one pool of candidates across the layers.
        window: candidates re-scored per lazy step (default ``max(4, ceil(remaining / 8))``).
        refresh: lazy mode only: re-score every candidate every ``refresh`` steps (default:
            only at the start of each layer / group).
        metric: the CAR metric (ties broken by loss).
        preset: the model's preset.
        graph: the model's graph.
        batch_size: images per forward pass.
        engine: reuse an :class:`AblationEngine` built on these images.
        progress: called after every removal.
        delta: racing: the probability bound, per step, of dropping the candidate exact
            greedy would choose.
        first_images: racing: images in the first round (rounded up to whole chunks).
        seed: racing: the seed of the order in which image chunks are drawn.

    Returns:
        a :class:`GreedyResult` with the order, the masks and the accuracy after each step.

    Raises:
        AblationError: a bad amount (ratio outside (0, 1), a count leaving a layer empty),
            neither amount nor floor, unknown mode or scope.

    Example:
        >>> res = greedy_prune(model, x, y, "features.0", amount=0.5)  # doctest: +SKIP
        >>> res.order[:3]  # doctest: +SKIP
        [('features.0', 12), ('features.0', 30), ('features.0', 7)]
    """
    images, labels = in_memory(images, labels, preset=preset)
    if mode not in GREEDY_MODES:
        raise AblationError(f"mode must be one of {', '.join(GREEDY_MODES)}, got {mode!r}")
    if scope not in ("layer", "global"):
        raise AblationError(f"scope must be 'layer' or 'global', got {scope!r}")
    if amount is None and floor is None:
        raise AblationError("give an amount (count or ratio) or an accuracy floor")
    m = resolve_metric(metric)
    if mode == "racing" and m.name not in RACING_METRICS:
        raise AblationError(f"racing greedy compares per-image hits, so it needs metric top1 or "
                            f"top5, got {m.name!r}; use mode='lazy' or 'exact'")
    if not 0 < delta < 1:
        raise AblationError(f"delta must lie in (0, 1), got {delta}")
    start = time.perf_counter()
    eng = _engine(model, images, labels, preset, graph, batch_size, m, engine)
    names = resolve_layers(eng.graph, layers)
    targets = _targets(eng.graph, names, amount, scope)
    masks = {n: torch.ones(eng.graph.layer(n).out_channels, dtype=torch.bool) for n in names}
    counts = ForwardCounts()
    steps: list[PruneStep] = []
    state: dict[str, Any] = {"evaluations": 0, "stopped": "count", "image_evaluations": 0,
                             "exact_image_evaluations": 0, "eliminated": 0}
    if mode == "racing":
        gen = torch.Generator().manual_seed(seed)
        state["race"] = (torch.randperm(eng.n_chunks, generator=gen).tolist(),
                         -(-max(1, first_images) // eng.batch_size), delta)
    base_stats = eng.evaluate(names[0], torch.ones(1, masks[names[0]].numel(), dtype=torch.bool))
    counts.add(base_stats.counts)
    base_acc, base_loss = base_stats.base_metric("top1"), base_stats.base_metric("loss")
    groups = [[n] for n in names] if scope == "layer" else [names]
    for group in groups:
        goal = targets[group[0]] if isinstance(targets, dict) else targets
        _greedy_group(eng, group, masks, goal, floor, mode, window, refresh, m, counts, steps,
                      state, progress)
        if state["stopped"] == "floor" and scope == "global":
            break
    if amount is None and state["stopped"] == "count":
        state["stopped"] = "exhausted"  # only a floor was given and it was never reached
    return GreedyResult(
        mode=mode, scope=scope, metric=m.name, layers=names, steps=steps,
        masks={n: k.clone() for n, k in masks.items()}, base_accuracy=base_acc,
        base_loss=base_loss, n_images=len(eng.labels), evaluations=int(state["evaluations"]),
        seconds=time.perf_counter() - start, counts=counts, stopped=str(state["stopped"]),
        window=window if mode == "lazy" else None, refresh=refresh if mode == "lazy" else None,
        image_evaluations=int(state["image_evaluations"]),
        exact_image_evaluations=int(state["exact_image_evaluations"]),
        eliminated=int(state["eliminated"]), delta=delta if mode == "racing" else None,
    )


def _score(eng: AblationEngine, layer: str, filters: list[int], masks: dict[str, torch.Tensor],
           m: Metric, counts: ForwardCounts) -> dict[tuple[str, int], tuple[float, float, float,
                                                                            float]]:
    """``{(layer, filter): (car, loss_car, accuracy_after, loss_after)}`` given ``masks``."""
    if not filters:
        return {}
    keep = masks[layer]
    stats = eng.evaluate(layer, single_removals(keep.numel(), filters, keep), masks)
    counts.add(stats.counts)
    car, loss_car = stats.drop(m), stats.drop("loss")
    acc, loss = stats.accuracy(), stats.loss()
    return {(layer, f): (float(car[i]), float(loss_car[i]), float(acc[i]), float(loss[i]))
            for i, f in enumerate(filters)}


def _greedy_group(eng: AblationEngine, group: list[str], masks: dict[str, torch.Tensor],
                  goal: int, floor: float | None, mode: str, window: int | None,
                  refresh: int | None, m: Metric, counts: ForwardCounts, steps: list[PruneStep],
                  state: dict[str, Any], progress: Callable[[PruneStep], None] | None) -> None:
    stale: dict[tuple[str, int], tuple[float, float, float, float]] = {}
    removed = 0
    while removed < goal:
        remaining = [(n, f) for n in group for f in masks[n].nonzero().reshape(-1).tolist()
                     if int(masks[n].sum()) > 1]
        if not remaining:
            state["stopped"] = "exhausted"
            return
        if mode == "exact" or not stale or (refresh and removed % refresh == 0):
            chosen = remaining
        else:
            w = window or max(4, math.ceil(len(remaining) / 8))
            chosen = sorted(remaining, key=lambda key: (stale[key][0], stale[key][1], key[1]))[:w]
        n_img = len(eng.labels)
        state["exact_image_evaluations"] += len(remaining) * n_img
        state["evaluations"] += len(chosen)
        if mode == "racing":
            order, first, delta = state["race"]
            race = race_step(eng, chosen, masks, m.name, order, first, delta, counts)
            state["image_evaluations"] += race.image_evaluations
            state["eliminated"] += race.eliminated
            best = race.best
            acc, loss = race.top1 / n_img, race.loss_sum / n_img
            car = (race.base_correct - race.correct) / n_img
            loss_car = (race.loss_sum - race.base_loss_sum) / n_img
        else:
            fresh: dict[tuple[str, int], tuple[float, float, float, float]] = {}
            for n in group:
                fresh.update(_score(eng, n, [f for ln, f in chosen if ln == n], masks, m,
                                    counts))
            state["image_evaluations"] += len(chosen) * n_img
            stale.update(fresh)
            best = min(fresh, key=lambda key: (fresh[key][0], fresh[key][1], key[1]))
            car, loss_car, acc, loss = fresh[best]
        if floor is not None and acc < floor:
            state["stopped"] = "floor"
            return
        layer, filt = best
        masks[layer] = masks[layer].clone()
        masks[layer][filt] = False
        stale.pop(best, None)
        step = PruneStep(layer, filt, car, loss_car, acc, loss, len(chosen))
        steps.append(step)
        removed += 1
        if progress is not None:
            progress(step)
    state["stopped"] = "count"


# --------------------------------------------------------------------------- agreement


def kendall_tau(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall's tau-b between two score vectors (ties handled; nan if either is constant).

    Example:
        >>> kendall_tau([1, 2, 3, 4], [1, 3, 2, 4])
        0.6666666666666666
    """
    x = torch.as_tensor(list(a), dtype=torch.float64)
    y = torch.as_tensor(list(b), dtype=torch.float64)
    if x.numel() != y.numel():
        raise ValueError("kendall_tau needs two vectors of the same length")
    dx = torch.sign(x[:, None] - x[None, :])
    dy = torch.sign(y[:, None] - y[None, :])
    upper = torch.triu(torch.ones_like(dx, dtype=torch.bool), diagonal=1)
    s = float((dx * dy)[upper].sum())
    nx = float((dx != 0)[upper].sum())
    ny = float((dy != 0)[upper].sum())
    if nx == 0 or ny == 0:
        return math.nan
    return s / math.sqrt(nx * ny)


def order_agreement(a: Sequence[tuple[str, int]], b: Sequence[tuple[str, int]],
                    ) -> dict[str, float]:
    """How far two pruning orders agree.

    Every filter pruned by either order gets its position in each order (filters an order did
    not prune share the last rank in it); the result holds Kendall's tau-b between the two
    position vectors, tau-b over the filters both orders pruned (``kendall_tau_common``), the
    overlap of the pruned sets (|A ∩ B| / |A ∪ B|) and the fraction of steps that removed the
    same filter.

    Example:
        >>> order_agreement([("l", 1), ("l", 2)], [("l", 1), ("l", 2)])["kendall_tau"]
        1.0
    """
    union = list(dict.fromkeys([*a, *b]))
    pos_a = {k: i for i, k in enumerate(a)}
    pos_b = {k: i for i, k in enumerate(b)}
    ra = [pos_a.get(k, len(a)) for k in union]
    rb = [pos_b.get(k, len(b)) for k in union]
    same_steps = sum(1 for x, y in zip(a, b, strict=False) if x == y)
    common = [k for k in a if k in pos_b]
    inter = len(common)
    return {
        "kendall_tau": kendall_tau(ra, rb) if len(union) > 1 else 1.0,
        "kendall_tau_common": kendall_tau([pos_a[k] for k in common],
                                          [pos_b[k] for k in common])
        if inter > 1 else math.nan,
        "overlap": inter / len(union) if union else 1.0,
        "same_step_fraction": same_steps / max(1, min(len(a), len(b))),
        "n_a": float(len(a)),
        "n_b": float(len(b)),
    }
