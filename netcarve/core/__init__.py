"""The core every method builds on.

:mod:`~netcarve.core.graph` (the channel graph of a model; traced in
:mod:`~netcarve.core.tracing`, made of the records in :mod:`~netcarve.core.layers`),
:mod:`~netcarve.core.hooks` (the only code that touches a user's model: masks, captures, and the
guarantee that the model comes back as it was), :mod:`~netcarve.core.targets` (``layer:channel``
strings), :mod:`~netcarve.core.errors`, :mod:`~netcarve.core.costs` (parameters and MACs),
:mod:`~netcarve.core.devices` (``auto``/``cpu``/``cuda``), :mod:`~netcarve.core.weights`
(reading weight files safely) and :mod:`~netcarve.core.plotting` (matplotlib on Agg).
Nothing here imports a higher layer of the package.
"""
