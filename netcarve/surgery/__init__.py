"""Surgery: models that are physically smaller than the one they came from.

:mod:`~netcarve.surgery.extract` cuts a circuit out as a standalone module
(:class:`~netcarve.surgery.circuit_module.CircuitModule`; planned in
:mod:`~netcarve.surgery._plan`, built in :mod:`~netcarve.surgery._build`);
:mod:`~netcarve.surgery.prune` removes whole filters of a classifier
(:class:`~netcarve.surgery.pruned.PrunedModel`, with its file format), and
:mod:`~netcarve.surgery.fold` refits the layers after pruned ones on the kept channels.
"""

from netcarve.core.costs import count_macs, count_parameters
from netcarve.surgery._plan import SurgeryError
from netcarve.surgery.circuit_module import CircuitModule
from netcarve.surgery.extract import extract_module

__all__ = ["CircuitModule", "SurgeryError", "count_macs", "count_parameters", "extract_module"]
