"""CAR -- classification accuracy reduction: filter importance, class-wise CAR, greedy pruning.

Modules, from the bottom up: :mod:`~netcarve.car.stats` (what an ablation pass measures and the
tolerances two measurements must agree within), :mod:`~netcarve.car.naive` (the reference
loop), :mod:`~netcarve.car.engine` (the fast engine, with its prefix, plan and linear-shortcut
parts), :mod:`~netcarve.car.scores` (CAR and class-wise CAR), :mod:`~netcarve.car.racing` and
:mod:`~netcarve.car.greedy` (greedy pruning: exact, lazy, racing), :mod:`~netcarve.car.compress`
(greedy pruning -> smaller model -> fine-tuning), :mod:`~netcarve.car.baselines` (L1, APoZ,
Taylor, ... on the same footing) and :mod:`~netcarve.car.colour` (colour vs shape).


``CAR_i = metric(net) - metric(net without filter i)`` (for a loss, the increase of the loss),
measured on a set of scoring images with :class:`~netcarve.car.engine.AblationEngine`. The metric
is top-1 accuracy by default (``"top5"``, ``"loss"`` or any callable, see
:class:`~netcarve.car.stats.Metric`). Accuracy moves in steps of ``1/N``, so ties are common:
they are broken by the loss (the filter whose removal raises the loss less is less important),
then by filter index.

**Removal** = the filter outputs exactly 0 after its BatchNorm: its kernels, bias and
BatchNorm shift are all gone (:func:`netcarve.core.hooks.apply_filter_masks`).

**Class-wise CAR** is the ``[filters × classes]`` matrix of per-class top-1 accuracy drops;
a filter's most (least) important class is the one whose accuracy falls most (least) without
it (ties broken by the per-class loss).

**Greedy compression** (:func:`greedy_prune`) removes the filter with the lowest CAR,
re-scores the others with it removed, and repeats -- per layer (layers one after another, each
given the removals already made) or across layers (one pool of candidates) -- until a count, a
ratio or an accuracy floor is reached. ``mode="lazy"`` re-scores only the ``window`` most
promising candidates (lowest previous CAR) at each step; :func:`order_agreement` says how far
its order departs from the exact one (Kendall tau). :func:`car_compress` chains greedy pruning,
the physically smaller model (:func:`netcarve.surgery.prune.prune_filters`) and optional
fine-tuning.

Data (the CLI's choice, documented in ``netcarve car --help``): scores and greedy decisions use
*scoring* images (the first N of the train split, "held in"); accuracies reported for the
pruned networks use the *evaluation* images (the test split), so no decision sees them.

Example:
    >>> from netcarve.zoo import load_model
    >>> from netcarve.training.evaluation import reference_data
    >>> lm = load_model("fmnist_vgg")
    >>> x, y = reference_data(lm.preset, "train", limit=200)
    >>> report = car_scores(lm.model, x, y, ["features.0"], preset=lm.preset)
    >>> len(report.layers["features.0"].car)
    32
"""

from netcarve.car.compress import CompressionReport, car_compress
from netcarve.car.engine import AblationEngine, ablate
from netcarve.car.greedy import (
    GreedyResult,
    PruneStep,
    greedy_prune,
    kendall_tau,
    order_agreement,
    planned_removals,
)
from netcarve.car.naive import ablate_naive, single_removals
from netcarve.car.scores import (
    CARReport,
    ClasswiseCAR,
    LayerCAR,
    car_scores,
    classwise_car,
    resolve_layers,
)
from netcarve.car.stats import AblationError, AblationStats, compare_stats

__all__ = [
    "AblationEngine",
    "AblationError",
    "AblationStats",
    "CARReport",
    "ClasswiseCAR",
    "CompressionReport",
    "GreedyResult",
    "LayerCAR",
    "PruneStep",
    "ablate",
    "ablate_naive",
    "car_compress",
    "car_scores",
    "classwise_car",
    "compare_stats",
    "greedy_prune",
    "kendall_tau",
    "order_agreement",
    "planned_removals",
    "resolve_layers",
    "single_removals",
]
