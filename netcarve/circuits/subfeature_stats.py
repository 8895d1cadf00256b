"""Do a unit's sub-feature circuits hold on new images? The double difference, with a control.

A unit "has sub-features" when its images fall into groups that each need a different part of
the unit's circuit. The test, all on images the grouping and the sub-circuits never saw:

1. **Group** the scoring images: per-image feature vectors (``grouping="scores"``: kernel
   scores over the general circuit's kernels, as :func:`~netcarve.circuits.subcircuits`
   does; ``"responses"``: the unit's own response map), each normalised to unit length,
   PCA, k-means. The *fitted* PCA and k-means then assign every held-out image to a group
   (nothing is re-clustered on held-out images).
2. **Sub-circuits**: one per group, the top ``sub_keep`` of the general circuit's kernels by
   the criterion on that group's scoring images (effective mask applied).
3. **Double difference** on held-out images: ``r[i][j]`` is sub-circuit i's Pearson r with
   the unit on group j's held-out images; ``DD = mean_i (r[i][i] - mean_{j!=i} r[i][j])``
   (two groups: ``(r00 - r01 + r11 - r10) / 2``). DD > 0: each sub-circuit is better on its
   own group. A 95% bootstrap interval resamples held-out images within each group.
4. **Control**: the same pipeline with random groups of the same sizes (scoring and held-out),
   ``random_splits`` times. A sub-feature structure is real only where DD clearly exceeds the
   random DDs (``p_value``: the share of random DDs at least as large, with the +1 rule).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from netcarve.circuits.circuit import Circuit, CircuitError, select_top_k
from netcarve.circuits.extract import score_kernels, target_responses
from netcarve.circuits.subcircuits import fit_groups, per_image_scores
from netcarve.core.graph import ModelGraph
from netcarve.core.targets import Target
from netcarve.data.stream import Images, in_memory

__all__ = ["GROUPINGS", "SubfeatureStatistic", "subfeature_statistic"]

GROUPINGS = ("scores", "responses")


@dataclass
class SubfeatureStatistic:
    """The held-out double difference of one unit's sub-circuits and its random control.

    Attributes:
        target: the unit.
        grouping: ``"scores"`` or ``"responses"``.
        groups_scoring / groups_heldout: images per group.
        r: ``r[i][j]``, sub-circuit i on group j's held-out images.
        double_difference: the statistic (NaN when a held-out group has < 2 images).
        ci: its 95% bootstrap interval.
        random: the control's double differences, one per random split.
        p_value: ``(1 + #{random >= DD}) / (1 + len(random))``.
        kept_kernels: kernels of each sub-circuit.
    """

    target: str
    grouping: str
    groups_scoring: list[int]
    groups_heldout: list[int]
    r: list[list[float]]
    double_difference: float
    ci: tuple[float, float]
    random: list[float] = field(default_factory=list)
    p_value: float = float("nan")
    kept_kernels: list[int] = field(default_factory=list)

    @property
    def random_mean(self) -> float:
        """Mean double difference of the random splits."""
        finite = [v for v in self.random if math.isfinite(v)]
        return float(np.mean(finite)) if finite else float("nan")

    @property
    def random_interval(self) -> tuple[float, float]:
        """The 2.5% and 97.5% quantiles of the random splits' double differences."""
        finite = [v for v in self.random if math.isfinite(v)]
        if not finite:
            return (float("nan"), float("nan"))
        return (float(np.quantile(finite, 0.025)), float(np.quantile(finite, 0.975)))

    def row(self) -> dict[str, Any]:
        """One flat table row."""
        lo, hi = self.random_interval
        return {"unit": self.target, "grouping": self.grouping,
                "groups_scoring": "/".join(map(str, self.groups_scoring)),
                "groups_heldout": "/".join(map(str, self.groups_heldout)),
                "double_difference": self.double_difference, "ci_low": self.ci[0],
                "ci_high": self.ci[1], "random_mean": self.random_mean, "random_low": lo,
                "random_high": hi, "p_value": self.p_value,
                "kept_kernels": "/".join(map(str, self.kept_kernels))}


def fit_and_assign(scoring: np.ndarray, heldout: np.ndarray, n_groups: int, *,
                   components: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Cluster ``scoring`` rows as :func:`~netcarve.circuits.subcircuits.find_groups` does
    and assign ``heldout`` rows with the fitted PCA and k-means. Returns both label arrays."""
    labels, assign = fit_groups(scoring, n_groups, components=components, seed=seed)
    return labels, assign(heldout)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    den = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / den if den > 0 else float("nan")


def _dd(original: np.ndarray, circuits: list[np.ndarray], members: list[np.ndarray]
        ) -> tuple[float, list[list[float]]]:
    n = len(circuits)
    if any(len(m) < 2 for m in members):
        return float("nan"), [[float("nan")] * n for _ in range(n)]
    r = [[_pearson(original[m], c[m]) for m in members] for c in circuits]
    own = [r[i][i] - float(np.mean([r[i][j] for j in range(n) if j != i])) for i in range(n)]
    return float(np.mean(own)), r


def _responses(model: nn.Module, graph: ModelGraph, target: Target, images: torch.Tensor,
               masks: dict[str, torch.Tensor] | None = None) -> np.ndarray:
    maps = torch.cat(list(target_responses(model, graph, target, images, masks=masks)))
    return maps.reshape(len(maps), -1).double().numpy()


def _sub_masks(model: nn.Module, graph: ModelGraph, target: Target, images: torch.Tensor,
               general: Circuit, k: int, criterion: str, seed: int
               ) -> dict[str, torch.Tensor]:
    scores = score_kernels(model, graph, target, images, criterion=criterion,
                           relevant=general.masks, seed=seed)
    masks, _ = graph.effective_mask(select_top_k(scores, general.masks, k), target.layer,
                                    target.channels)
    return masks


def _split_dd(model: nn.Module, graph: ModelGraph, target: Target, scoring: torch.Tensor,
              labels_s: np.ndarray, labels_h: np.ndarray, original: np.ndarray,
              heldout: torch.Tensor, general: Circuit, k: int, n_groups: int,
              criterion: str, seed: int) -> tuple[float, list[list[float]], list[np.ndarray],
                                                  list[np.ndarray], list[int]]:
    circuits, kept = [], []
    for g in range(n_groups):
        idx = np.flatnonzero(labels_s == g)
        if len(idx) == 0:
            raise CircuitError(f"group {g} has no scoring images")
        masks = _sub_masks(model, graph, target, scoring[torch.as_tensor(idx)], general, k,
                           criterion, seed)
        kept.append(int(sum(int(m.sum()) for m in masks.values())))
        circuits.append(_responses(model, graph, target, heldout, masks))
    members = [np.flatnonzero(labels_h == g) for g in range(n_groups)]
    dd, r = _dd(original, circuits, members)
    return dd, r, circuits, members, kept


def subfeature_statistic(
    model: nn.Module,
    target: Target | str,
    scoring: Images,
    heldout: torch.Tensor,
    general: Circuit,
    *,
    grouping: str = "scores",
    n_groups: int = 2,
    sub_keep: float = 0.5,
    criterion: str = "actgrad",
    components: int = 10,
    bootstrap: int = 1000,
    random_splits: int = 20,
    seed: int = 0,
    graph: ModelGraph | None = None,
) -> SubfeatureStatistic:
    """The held-out double difference of ``general``'s sub-circuits, with a random control.

    Args:
        model: the model (it comes back exactly as it was).
        target: the unit (``"layer:channel"`` or a Target).
        scoring: images the grouping is fitted on and the sub-circuits are scored on (a
            tensor, or a stream read once into memory).
        heldout: images the fitted grouping assigns and the statistic is measured on.
        general: the unit's general circuit (sub-circuits are carved from its kernels).
        grouping: ``"scores"`` (per-image kernel scores) or ``"responses"`` (the unit's
            response map).
        n_groups: groups (k-means clusters).
        sub_keep: each sub-circuit's share of the general circuit's kernels.
        criterion: the saliency criterion.
        components: PCA dimensions.
        bootstrap: bootstrap resamples for the interval.
        random_splits: random splits of the control (0: no control).
        seed: seeds clustering, bootstrap and the random splits.
        graph: a prebuilt graph.

    Returns:
        a :class:`SubfeatureStatistic`.

    Raises:
        CircuitError: unknown grouping, bad sub_keep, a collapsed general circuit, fewer
            scoring images than groups.

    Example:
        >>> st = subfeature_statistic(model, "features.11:5", s, h, general)  # doctest: +SKIP
        >>> st.double_difference, st.p_value  # doctest: +SKIP
        (0.08, 0.05)
    """
    scoring, _ = in_memory(scoring)
    if grouping not in GROUPINGS:
        raise CircuitError(f"grouping must be one of {GROUPINGS}, got {grouping!r}")
    if not 0 < sub_keep <= 1:
        raise CircuitError(f"sub_keep must be in (0, 1], got {sub_keep}")
    if general.collapsed or general.kept_kernels == 0:
        raise CircuitError("the general circuit collapsed: raise its keep before splitting it")
    if len(scoring) < 2 * n_groups:
        raise CircuitError(f"need at least {2 * n_groups} scoring images for {n_groups} groups")
    p = next(model.parameters())
    graph = graph or ModelGraph.build(model, scoring[:1].to(p.device))
    tgt = (Target.parse(target) if isinstance(target, str) else target).resolve(graph)
    if grouping == "scores":
        fs = per_image_scores(model, graph, tgt, scoring, general.masks, criterion=criterion)
        fh = per_image_scores(model, graph, tgt, heldout, general.masks, criterion=criterion)
        fs, fh = fs.double().numpy(), fh.double().numpy()
    else:
        fs, fh = _responses(model, graph, tgt, scoring), _responses(model, graph, tgt, heldout)
    labels_s, labels_h = fit_and_assign(fs, fh, n_groups, components=components, seed=seed)
    k = max(1, round(sub_keep * general.kept_kernels))
    original = _responses(model, graph, tgt, heldout)
    dd, r, circuits, members, kept = _split_dd(model, graph, tgt, scoring, labels_s, labels_h,
                                               original, heldout, general, k, n_groups,
                                               criterion, seed)
    rng = np.random.default_rng(seed)
    boots = []
    if math.isfinite(dd):
        for _ in range(bootstrap):
            resampled = [m[rng.integers(0, len(m), len(m))] for m in members]
            boots.append(_dd(original, circuits, resampled)[0])
    finite = [b for b in boots if math.isfinite(b)]
    ci = ((float(np.quantile(finite, 0.025)), float(np.quantile(finite, 0.975))) if finite
          else (float("nan"), float("nan")))
    random = []
    for _ in range(random_splits):
        rs, rh = rng.permutation(labels_s), rng.permutation(labels_h)
        random.append(_split_dd(model, graph, tgt, scoring, rs, rh, original, heldout,
                                general, k, n_groups, criterion, seed)[0])
    finite_random = [v for v in random if math.isfinite(v)]
    p_value = ((1 + sum(v >= dd for v in finite_random)) / (1 + len(finite_random))
               if finite_random and math.isfinite(dd) else float("nan"))
    return SubfeatureStatistic(
        target=str(tgt), grouping=grouping,
        groups_scoring=[int((labels_s == g).sum()) for g in range(n_groups)],
        groups_heldout=[int((labels_h == g).sum()) for g in range(n_groups)],
        r=r, double_difference=dd, ci=ci, random=random, p_value=p_value, kept_kernels=kept)
