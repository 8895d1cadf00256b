"""Feature-preserving circuits: the few kernels that reproduce one hidden feature.

:mod:`~netcarve.circuits.extract` scores kernels and keeps the top ones,
:mod:`~netcarve.circuits.circuit` is the :class:`~netcarve.circuits.circuit.Circuit` object
(masks, scores, provenance), :mod:`~netcarve.circuits.files` its safetensors file,
:mod:`~netcarve.circuits.preservation` the streamed Pearson r, :mod:`~netcarve.circuits.sweep`
many targets and keeps at once, and :mod:`~netcarve.circuits.subcircuits` circuits of groups of
images.
"""
