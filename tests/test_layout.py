"""The package layout (scripts/check_layout.py) and the old import paths (netcarve._compat)."""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import check_layout  # noqa: E402


def test_no_big_module_no_cycle_no_upward_import() -> None:
    assert check_layout.check() == []


def test_the_checker_finds_a_cycle_and_an_upward_import() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert check_layout.find_cycles(graph) == [["a", "b", "c"]]
    assert check_layout.layer_of("netcarve.core.graph") == "core"
    assert check_layout.LAYERS["core"] < check_layout.LAYERS["car"] < check_layout.LAYERS["cli"]


def test_importing_netcarve_needs_nothing_of_the_old_layout() -> None:
    code = ("import sys, netcarve; "
            "old = [m for m in sys.modules if m in ('netcarve.ablation', 'netcarve.circuit')]; "
            "print(old)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("old, name, new", [
    ("netcarve.hooks", "apply_filter_masks", "netcarve.core.hooks"),
    ("netcarve.graph", "ModelGraph", "netcarve.core.graph"),
    ("netcarve.graph", "GraphError", "netcarve.core.layers"),
    ("netcarve.ablation", "AblationEngine", "netcarve.car.engine"),
    ("netcarve.ablation", "compare_stats", "netcarve.car.stats"),
    ("netcarve.circuit", "extract", "netcarve.circuits.extract"),
    ("netcarve.circuit", "Circuit", "netcarve.circuits.circuit"),
    ("netcarve.circuit_io", "load_circuit", "netcarve.circuits.circuit"),
    ("netcarve.compress", "prune_filters", "netcarve.surgery.prune"),
    ("netcarve.functional", "functional_prune", "netcarve.function.pruning"),
    ("netcarve.featureviz", "visualize", "netcarve.viz.render"),
    ("netcarve.planted", "build_planted", "netcarve.benchmarks.planted_models"),
    ("netcarve.zoo.preset", "Preset", "netcarve.data.preset"),
    ("netcarve.car", "greedy_prune", "netcarve.car.greedy"),
    ("netcarve.surgery", "extract_module", "netcarve.surgery.extract"),
])
def test_old_paths_still_work_with_a_warning(old: str, name: str, new: str) -> None:
    moved = old.removeprefix("netcarve.") in importlib.import_module("netcarve._compat").MOVED
    if moved:
        sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mod = importlib.import_module(old)
    assert getattr(mod, name) is getattr(importlib.import_module(new), name)
    if moved:  # packages that kept their name (car, surgery) re-export without a warning
        assert any(issubclass(w.category, DeprecationWarning) and "moved to" in str(w.message)
                   for w in caught), [str(w.message) for w in caught]


def test_a_one_to_one_old_path_is_the_new_module_itself() -> None:
    import netcarve.core.hooks

    sys.modules.pop("netcarve.hooks", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import netcarve.hooks
    assert netcarve.hooks is netcarve.core.hooks


def test_unknown_old_names_are_still_import_errors() -> None:
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("netcarve.no_such_module")
