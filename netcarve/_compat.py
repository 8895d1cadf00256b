"""Import paths of netcarve 0.1 that moved in the package layout of 0.2, kept for one release.

``import netcarve.ablation`` (and every other old path in :data:`MOVED`) still works: a
finder at the end of :data:`sys.meta_path` answers only for these names, so it never shadows a
real module. An old path that became one new module is that very module object (private names
and monkeypatching behave as before); one that was split into several is a module holding the
public names of all of them (their ``__all__``, else the names they define) plus their private
helpers. Either way a :class:`DeprecationWarning` names the new path. The old paths go away in
0.3; the README lists them.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings

__all__ = ["MOVED", "install"]

MOVED: dict[str, tuple[str, ...]] = {
    "ablation": ("netcarve.car.stats", "netcarve.car.naive", "netcarve.car.engine"),
    "baselines": ("netcarve.car.baselines",),
    "circuit": ("netcarve.circuits.circuit", "netcarve.circuits.extract"),
    "circuit_io": ("netcarve.circuits.files", "netcarve.circuits.circuit"),
    "cli_car": ("netcarve.cli.car",),
    "cli_common": ("netcarve.cli.common",),
    "cli_diagram": ("netcarve.cli.diagram",),
    "cli_errors": ("netcarve.cli.errors",),
    "cli_featureviz": ("netcarve.cli.featureviz",),
    "cli_reproduce": ("netcarve.cli.reproduce",),
    "colour": ("netcarve.car.colour",),
    "compress": ("netcarve.surgery.pruned", "netcarve.surgery.prune"),
    "costs": ("netcarve.core.costs",),
    "demo": ("netcarve.reproduce.demo",),
    "devices": ("netcarve.core.devices",),
    "errors": ("netcarve.core.errors",),
    "evaluation": ("netcarve.training.evaluation",),
    "featureviz": ("netcarve.viz.parameterization", "netcarve.viz.transforms",
                   "netcarve.viz.render", "netcarve.viz.receptive_field",
                   "netcarve.viz.examples", "netcarve.viz.pictures"),
    "finetune": ("netcarve.training.finetune",),
    "fold": ("netcarve.surgery.fold",),
    "functional": ("netcarve.function.descriptors", "netcarve.function.clustering",
                   "netcarve.function.pruning", "netcarve.function.defection"),
    "graph": ("netcarve.core.layers", "netcarve.core.graph"),
    "hooks": ("netcarve.core.hooks",),
    "planted": ("netcarve.benchmarks.planted_models", "netcarve.benchmarks.planted"),
    "preservation": ("netcarve.circuits.preservation",),
    "racing": ("netcarve.car.racing",),
    "report": ("netcarve.reproduce.zoo_report",),
    "zoo.preset": ("netcarve.data.preset",),
    "zoo.report": ("netcarve.reproduce.zoo_report",),
    "run_folder": ("netcarve.cli.run_folder",),
    "subcircuits": ("netcarve.circuits.subcircuits",),
    "sweep": ("netcarve.circuits.sweep",),
    "targets": ("netcarve.core.targets",),
    "weights": ("netcarve.core.weights",),
}
"""Old module (under ``netcarve.``) -> the new module(s) that hold its contents."""


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds and loads the old module paths of :data:`MOVED` (nothing else)."""

    def find_spec(self, fullname: str, path: object = None,
                  target: object = None) -> importlib.machinery.ModuleSpec | None:
        prefix, _, old = fullname.partition(".")
        if prefix != "netcarve" or old not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        old = module.__name__.partition(".")[2]
        new = MOVED[old]
        warnings.warn(f"netcarve.{old} moved to {' + '.join(new)}; the old path goes away in "
                      "netcarve 0.3", DeprecationWarning, stacklevel=2)
        if len(new) == 1:
            # The module object itself, so private names and monkeypatching act on the real one.
            sys.modules[module.__name__] = importlib.import_module(new[0])
            return
        names: list[str] = []
        for name in new:
            mod = importlib.import_module(name)
            public = list(getattr(mod, "__all__", None) or [
                k for k, v in vars(mod).items() if not k.startswith("_")
                and not isinstance(v, types.ModuleType)
                and getattr(v, "__module__", name) == name])
            own = [k for k, v in vars(mod).items() if k.startswith("_") and not k.startswith("__")
                   and getattr(v, "__module__", None) == name]
            for key in public + own:
                setattr(module, key, getattr(mod, key))
            names += public
        module.__all__ = names
        module.__doc__ = f"Moved: the contents of {', '.join(new)} (see netcarve._compat)."


def install() -> None:
    """Put the finder for the old paths at the end of :data:`sys.meta_path` (once).

    Example:
        >>> install()
        >>> import netcarve.hooks  # doctest: +SKIP
    """
    if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
        sys.meta_path.append(_MovedModules())
