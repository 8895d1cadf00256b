"""SQL over an atlas store (DuckDB): ``netcarve atlas-query DIR "SQL"``.

Three views are defined before the query runs:

* ``units``: one row per mapped unit (:data:`~netcarve.atlas.store.UNIT_SCHEMA`);
* ``classes``: class-wise CAR per unit (:data:`~netcarve.atlas.store.CLASSES_SCHEMA`;
  empty when no layer of the atlas had it);
* ``atlas``: ``units`` with ``car``, ``most_important`` and ``least_important`` joined in.

Example question: units of features.11 whose circuit keeps < 5% of kernels at r >= 0.9::

    SELECT unit, effective_keep, pearson FROM units
    WHERE layer = 'features.11' AND effective_keep < 0.05 AND pearson >= 0.9
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from netcarve.atlas.store import CLASSES_SCHEMA, AtlasError, AtlasStore

__all__ = ["QueryResult", "atlas_query"]


class QueryResult:
    """The answer to :func:`atlas_query`: column names and rows (tuples of Python values)."""

    def __init__(self, columns: list[str], rows: list[tuple[Any, ...]]) -> None:
        self.columns = columns
        self.rows = rows

    def records(self) -> list[dict[str, Any]]:
        """The rows as ``{column: value}`` dicts."""
        return [dict(zip(self.columns, r, strict=True)) for r in self.rows]

    def text(self, max_width: int = 40) -> str:
        """A plain aligned table (long values cut to ``max_width`` characters)."""
        def cell(v: Any) -> str:
            s = f"{v:.4g}" if isinstance(v, float) else str(v)
            return s if len(s) <= max_width else s[:max_width - 1] + "…"

        body = [[cell(v) for v in r] for r in self.rows]
        widths = [max([len(c), *(len(b[i]) for b in body)]) for i, c in enumerate(self.columns)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(self.columns, widths, strict=True))]
        lines += ["  ".join(v.ljust(w) for v, w in zip(b, widths, strict=True)) for b in body]
        lines.append(f"({len(self.rows)} row{'s' if len(self.rows) != 1 else ''})")
        return "\n".join(lines)


def _sql_path(p: Path) -> str:
    return str(p).replace("'", "''")


def atlas_query(root: str | Path, sql: str) -> QueryResult:
    """Run one SQL query over an atlas folder.

    Args:
        root: the atlas folder (what ``netcarve atlas --out`` wrote).
        sql: a DuckDB SQL query over the views ``units``, ``classes`` and ``atlas``.

    Returns:
        a :class:`QueryResult`.

    Raises:
        AtlasError: no atlas in ``root``, DuckDB missing, or the query fails (DuckDB's
            message, with the views' columns).

    Example:
        >>> q = atlas_query("out/atlas", "SELECT count(*) AS n FROM units")  # doctest: +SKIP
        >>> q.rows  # doctest: +SKIP
        [(128,)]
    """
    store = AtlasStore(root)
    if store.read_meta() is None:
        raise AtlasError(f"{root} holds no atlas (no atlas.json): run `netcarve atlas MODEL "
                         f"--layers ... --out {root}` first")
    try:
        import duckdb
    except ImportError:  # pragma: no cover - duckdb is in the atlas extra
        raise AtlasError("atlas-query needs DuckDB: pip install 'netcarve[atlas]'") from None
    con = duckdb.connect()
    try:
        units = store.units_dir / "layer=*" / "*.parquet"
        if any(store.units_dir.glob("layer=*/*.parquet")):
            con.execute(f"CREATE VIEW units AS SELECT * FROM read_parquet('{_sql_path(units)}',"
                        " hive_partitioning = false)")
        else:  # an atlas whose first unit is not written yet: an empty table, same columns
            from netcarve.atlas.store import UNIT_SCHEMA

            con.register("_no_units", UNIT_SCHEMA.empty_table())
            con.execute("CREATE VIEW units AS SELECT * FROM _no_units")
        classes = store.classes_dir / "layer=*" / "*.parquet"
        if any(store.classes_dir.glob("layer=*/*.parquet")):
            con.execute(f"CREATE VIEW classes AS SELECT * FROM read_parquet("
                        f"'{_sql_path(classes)}', hive_partitioning = false)")
        else:
            con.register("_no_classes", CLASSES_SCHEMA.empty_table())
            con.execute("CREATE VIEW classes AS SELECT * FROM _no_classes")
        con.execute("CREATE VIEW atlas AS SELECT u.*, c.car, c.most_important, "
                    "c.least_important FROM units u LEFT JOIN classes c USING (layer, unit)")
        try:
            cur = con.execute(sql)
        except duckdb.Error as exc:
            cols = [r[0] for r in con.execute("DESCRIBE units").fetchall()]
            raise AtlasError(f"the query failed: {str(exc).splitlines()[0]} (views: units, "
                             f"classes, atlas; units has columns {', '.join(cols)})") from None
        if cur.description is None:
            return QueryResult([], [])
        return QueryResult([d[0] for d in cur.description], cur.fetchall())
    finally:
        con.close()
