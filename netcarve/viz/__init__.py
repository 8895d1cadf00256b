"""Seeing what a unit does: activation maximisation, dataset examples, receptive fields.

:mod:`~netcarve.viz.render` optimises images (:func:`~netcarve.viz.render.visualize`), with the
image parameterised as in :mod:`~netcarve.viz.parameterization` and shown through
:mod:`~netcarve.viz.transforms`; :mod:`~netcarve.viz.examples` finds the probe images that
excite a unit, :mod:`~netcarve.viz.receptive_field` what input a unit sees, and
:mod:`~netcarve.viz.pictures` draws the figures.
"""
