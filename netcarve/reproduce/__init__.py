"""Scripted experiments that reproduce the papers' tables on the bundled models.

Each experiment writes ``report.md`` (with the exact command, seed and versions at the top),
PNG figures, CSV tables and ``summary.json`` into its output folder:

* ``circuits``: saliency criteria for feature-preserving circuits (:mod:`.circuits`);
* ``subfeatures``: sub-feature circuits of a polysemantic-looking unit (:mod:`.subfeatures`);
* ``car``: CAR vs baseline filter pruning, and colour vs shape (:mod:`.car`);
* ``fop``: functionality-oriented vs magnitude pruning, and functionality defection
  (:mod:`.fop`);
* ``planted``: criteria recovering circuits planted in hand-built networks
  (:func:`netcarve.benchmarks.planted.run_planted`).

Example:
    >>> from netcarve.reproduce import EXPERIMENTS
    >>> sorted(EXPERIMENTS)
    ['car', 'circuits', 'fop', 'planted', 'subfeatures']
"""

from __future__ import annotations

EXPERIMENTS: dict[str, str] = {
    "circuits": "criteria comparison for feature-preserving circuits (fmnist_vgg, fmnist_resnet)",
    "subfeatures": "sub-feature circuits of a polysemantic-looking unit",
    "car": ("CAR vs baseline filter pruning on fmnist_vgg; colour vs shape on "
            "shapes_clutter_cnn, with a colour-label control"),
    "fop": "functionality-oriented vs magnitude pruning at equal MACs; functionality defection",
    "planted": "criteria recovering circuits planted in hand-built networks, graded by eps",
}
"""Experiment name → one-line description (the ``netcarve reproduce`` sub-commands)."""

__all__ = ["EXPERIMENTS"]
