"""Benchmarks with a known answer: planted circuits (:mod:`~netcarve.benchmarks.planted_models`
builds the networks and their ground truth, :mod:`~netcarve.benchmarks.planted` scores the
saliency criteria against it)."""
