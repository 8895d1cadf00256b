"""The atlas store: a Parquet data set partitioned by layer, the units' files, one writer.

Layout of an atlas folder::

    atlas.json                              model, settings, layers (what a resume must match)
    store/units/layer=<layer>/<unit>.parquet   one row per unit (schema: UNIT_SCHEMA)
    store/classes/layer=<layer>/classes.parquet  class-wise CAR of the layer's units
    units/<layer>/<unit>/...                circuit.safetensors, featureviz.png, examples.png,
                                            diagram.html, index.html (the unit's page)
    index.html                              the browsable table

Why one file per unit: a unit is *done* exactly when its Parquet file exists, and that file
is written last (after the unit's other files) under a temporary name and renamed into place,
which is atomic on one file system. So an interrupted run leaves whole units or nothing of a
unit that counts; a unit whose files exist without its row is redone and its files
overwritten; a retried task writes the same file name again instead of a second row.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from netcarve.core.errors import NetcarveError

__all__ = ["CLASSES_SCHEMA", "UNIT_SCHEMA", "AtlasError", "AtlasStore"]


class AtlasError(NetcarveError):
    """An atlas folder or query cannot be used as asked (other settings, bad SQL, no atlas)."""


_CURVE = pa.list_(pa.struct([("keep", pa.float64()), ("kept_kernels", pa.int64()),
                             ("effective_keep", pa.float64()), ("pearson", pa.float64()),
                             ("reached", pa.bool_())]))
_PER_LAYER = pa.list_(pa.struct([("layer", pa.string()), ("relevant", pa.int64()),
                                 ("kept", pa.int64())]))
_COMPARISON = pa.list_(pa.struct([("criterion", pa.string()), ("keep", pa.float64()),
                                  ("kept_kernels", pa.int64()), ("pearson", pa.float64()),
                                  ("collapsed", pa.bool_())]))

UNIT_SCHEMA = pa.schema([
    ("layer", pa.string()), ("unit", pa.int64()), ("target", pa.string()),
    ("criterion", pa.string()), ("goal", pa.float64()), ("search_on", pa.string()),
    ("reached", pa.bool_()), ("keep", pa.float64()), ("effective_keep", pa.float64()),
    ("kept_kernels", pa.int64()), ("relevant_kernels", pa.int64()),
    ("pearson", pa.float64()), ("pearson_scoring", pa.float64()), ("collapsed", pa.bool_()),
    ("evaluations", pa.int64()), ("curve", _CURVE), ("per_layer", _PER_LAYER),
    ("comparison", _COMPARISON), ("featureviz_activation", pa.float64()),
    ("top_images", pa.list_(pa.int64())), ("top_values", pa.list_(pa.float64())),
    ("seconds", pa.float64()),
])
"""One row per mapped unit. ``pearson`` is the held-out preservation of the circuit at the
keep found, ``effective_keep`` its share of the relevant kernels after the effective mask."""

CLASSES_SCHEMA = pa.schema([
    ("layer", pa.string()), ("unit", pa.int64()), ("car", pa.float64()),
    ("loss_car", pa.float64()), ("most_important", pa.list_(pa.string())),
    ("least_important", pa.list_(pa.string())), ("class_car", pa.list_(pa.float64())),
])
"""One row per unit of a layer whose class-wise CAR was computed (classifiers only):
``car`` the top-1 accuracy drop without the unit, ``class_car`` per class, in the order of
``atlas.json``'s ``class_names``."""


def _partition(root: Path, layer: str) -> Path:
    # Hive-style partition folders (layer=...) so that DuckDB and pyarrow read the layer back
    # as a column; layer names are dotted module names, safe in a path.
    return root / f"layer={layer}"


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _write_table(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


class AtlasStore:
    """Read and write one atlas folder (see the module docstring for its layout).

    Args:
        root: the atlas folder.

    Example:
        >>> store = AtlasStore("out/atlas")  # doctest: +SKIP
        >>> store.done_units("features.11")  # doctest: +SKIP
        {0, 1, 2}
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.units_dir = self.root / "store" / "units"
        self.classes_dir = self.root / "store" / "classes"

    # -- settings --------------------------------------------------------------------------
    @property
    def meta_path(self) -> Path:
        return self.root / "atlas.json"

    def read_meta(self) -> dict[str, Any] | None:
        """``atlas.json`` or None when the folder holds no atlas yet."""
        if not self.meta_path.exists():
            return None
        try:
            return json.loads(self.meta_path.read_text())
        except (OSError, ValueError) as exc:
            raise AtlasError(f"{self.meta_path} is unreadable ({exc}); delete it to start "
                             "the atlas again") from None

    def write_meta(self, meta: dict[str, Any]) -> None:
        """Write ``atlas.json`` atomically."""
        _write_atomic(self.meta_path, (json.dumps(meta, indent=1) + "\n").encode())

    # -- units -----------------------------------------------------------------------------
    def unit_path(self, layer: str, unit: int) -> Path:
        """The Parquet file that marks ``layer:unit`` as done."""
        return _partition(self.units_dir, layer) / f"{unit:05d}.parquet"

    def done_units(self, layer: str) -> set[int]:
        """Units of ``layer`` whose row is in the store."""
        folder = _partition(self.units_dir, layer)
        if not folder.is_dir():
            return set()
        return {int(p.stem) for p in folder.glob("*.parquet") if p.stem.isdigit()}

    def clean_partial(self) -> int:
        """Remove the temporary files an interrupted write left; returns how many."""
        removed = 0
        if self.root.is_dir():
            for p in [*self.root.glob("store/**/*.tmp"), *self.root.glob("units/**/*.tmp")]:
                p.unlink(missing_ok=True)
                removed += 1
        return removed

    def write_unit(self, row: dict[str, Any], files: dict[str, bytes]) -> Path:
        """Write a unit's files, then its row (last, atomically: the unit is now done).

        Args:
            row: the unit's row (:data:`UNIT_SCHEMA`).
            files: ``{path inside the atlas: bytes}``.

        Returns:
            the row's Parquet file.
        """
        for rel, data in files.items():
            target = (self.root / rel).resolve()
            if self.root.resolve() not in target.parents:
                raise AtlasError(f"a unit file would land outside the atlas: {rel!r}")
            _write_atomic(target, data)
        path = self.unit_path(row["layer"], int(row["unit"]))
        _write_table(pa.Table.from_pylist([row], schema=UNIT_SCHEMA), path)
        return path

    def write_classes(self, layer: str, rows: list[dict[str, Any]]) -> Path:
        """Write the class-wise CAR rows of ``layer`` (replacing earlier ones of that layer)."""
        path = _partition(self.classes_dir, layer) / "classes.parquet"
        _write_table(pa.Table.from_pylist(rows, schema=CLASSES_SCHEMA), path)
        return path

    def has_classes(self, layer: str) -> bool:
        """Whether the class-wise CAR of ``layer`` is in the store."""
        return (_partition(self.classes_dir, layer) / "classes.parquet").exists()

    # -- reading ---------------------------------------------------------------------------
    def _read(self, folder: Path, schema: pa.Schema) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        if not folder.is_dir():
            return rows
        for part in sorted(folder.glob("layer=*/*.parquet")):
            rows += pq.read_table(part, schema=schema).to_pylist()
        return rows

    def rows(self, layers: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """Every unit row (optionally of some layers), sorted by layer order then unit."""
        rows = self._read(self.units_dir, UNIT_SCHEMA)
        order = {name: i for i, name in enumerate((self.read_meta() or {}).get("layers", []))}
        if layers is not None:
            wanted = set(layers)
            rows = [r for r in rows if r["layer"] in wanted]
        rows.sort(key=lambda r: (order.get(r["layer"], len(order)), r["layer"], r["unit"]))
        return rows

    def classes(self) -> dict[tuple[str, int], dict[str, Any]]:
        """``{(layer, unit): class-wise CAR row}``."""
        return {(r["layer"], r["unit"]): r for r in self._read(self.classes_dir, CLASSES_SCHEMA)}
