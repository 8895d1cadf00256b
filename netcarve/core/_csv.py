"""Writing result rows as CSV, the same way everywhere."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def write_rows(path: str | Path, rows: Sequence[dict[str, Any]],
               columns: Sequence[str] | None = None) -> Path:
    """Write dict rows as CSV; parent folders are created.

    Args:
        path: the file.
        rows: one dict per row; missing keys are written empty, extra keys ignored.
        columns: column order (default: the first row's keys).

    Returns:
        the path written. Lists and dicts in a cell are written as JSON.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    cols = list(columns) if columns is not None else (list(rows[0]) if rows else [])
    with target.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(row.get(k)) for k in cols})
    return target


def _cell(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, (dict, list, tuple)) else value
