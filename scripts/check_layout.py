"""Check the package layout: module sizes, import cycles and the direction of imports.

Run: .venv/bin/python scripts/check_layout.py  (exit 1 and a list of problems when a rule fails)

Rules (docs/architecture.md):
* no module in ``netcarve/`` over 600 lines;
* no import cycle between modules, counting imports inside functions too (only imports under
  ``if TYPE_CHECKING:`` are left out: they never run);
* a module imports only its own subpackage or lower ones in :data:`LAYERS`; ``netcarve/__init__``
  (the public API) and ``netcarve/_compat`` (old paths) may import anything.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

MAX_LINES = 600
LAYERS: dict[str, int] = {
    "_version": 0, "core": 0,
    "data": 1,
    "zoo": 2, "criteria": 2,
    "training": 3, "surgery": 3, "diagram": 3,
    "circuits": 4, "viz": 4, "car": 4,
    "atlas": 5, "benchmarks": 5, "function": 5,
    "reproduce": 6,
    "cli": 7,
}
"""Subpackage -> layer: a module may import its own layer's subpackage or a lower layer."""

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "netcarve"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking(node: ast.If) -> bool:
    return "TYPE_CHECKING" in ast.unparse(node.test)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The netcarve modules ``path`` imports (at any depth, except under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    skip = {id(n) for top in ast.walk(tree) if isinstance(top, ast.If) and _type_checking(top)
            for b in top.body for n in ast.walk(b)}
    me = module_name(path)
    pkg = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != me:
                out.add(name)
    return out


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    sys.setrecursionlimit(10_000)

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def check() -> list[str]:
    """Every broken rule, one line each (empty when the layout is fine)."""
    files = sorted(PKG.rglob("*.py"))
    modules = {module_name(f) for f in files}
    graph = {module_name(f): imports_of(f, modules) for f in files}
    problems = []
    for f in files:
        n = len(f.read_text().splitlines())
        if n > MAX_LINES:
            problems.append(f"{f.relative_to(ROOT)}: {n} lines (at most {MAX_LINES})")
    for comp in find_cycles(graph):
        problems.append("import cycle: " + " <-> ".join(comp))
    for mod, deps in sorted(graph.items()):
        sub = layer_of(mod)
        if sub is None or sub == "_compat":
            continue
        if sub not in LAYERS:
            problems.append(f"{mod}: subpackage {sub!r} has no layer in LAYERS")
            continue
        for dep in sorted(deps):
            dsub = layer_of(dep)
            if dsub is None:
                problems.append(f"{mod} imports the package root (the public API)")
            elif dsub != sub and LAYERS.get(dsub, 99) >= LAYERS[sub]:
                problems.append(f"{mod} (layer {LAYERS[sub]}) imports {dep} "
                                f"(layer {LAYERS.get(dsub)}): lower layers never import higher")
    return problems


def main() -> int:
    problems = check()
    for p in problems:
        print(p)
    n = len(list(PKG.rglob("*.py")))
    print(f"{n} modules: " + ("layout ok" if not problems else f"{len(problems)} problem(s)"))
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
