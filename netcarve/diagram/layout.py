"""Layout of a circuit diagram: layers as columns, node order chosen to reduce crossings.

Two steps, both deterministic:

1. :func:`order_columns` orders the nodes inside each column. It starts from channel order,
   runs barycentre sweeps (left to right, then right to left: each node moves to the
   score-weighted mean position of its neighbours in the previous columns, then in the next
   ones), keeps the best order seen, and finishes with adjacent transpositions that remove
   crossings locally. Crossings are counted between edges that join the same pair of columns
   (edges that skip columns, e.g. residual paths, are counted with their own column pair).
2. :func:`compute_geometry` turns ``column``/``order`` into pixel positions shared by the SVG,
   PNG and HTML renderers: columns spaced evenly, each column centred vertically, the node
   size chosen from the tallest column so that the figure stays printable.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Column",
    "Geometry",
    "compute_geometry",
    "count_crossings",
    "legend_size",
    "order_columns",
    "subtitle",
]


def _positions(columns: Sequence[Sequence[str]]) -> dict[str, float]:
    """Centred position of every node in pitch units (columns are centred vertically)."""
    pos: dict[str, float] = {}
    for col in columns:
        mid = (len(col) - 1) / 2
        for k, node in enumerate(col):
            pos[node] = k - mid
    return pos


def count_crossings(
    columns: Sequence[Sequence[str]], edges: Sequence[tuple[str, str, float]]
) -> int:
    """Number of edge crossings for a column order.

    Two edges cross when they join the same pair of columns and their ends are in opposite
    vertical order (edges that share an end never cross).

    Args:
        columns: node ids per column, top to bottom.
        edges: ``(source id, target id, weight)``.

    Returns:
        The crossing count.

    Example:
        >>> count_crossings([["a", "b"], ["c", "d"]], [("a", "d", 1), ("b", "c", 1)])
        1
    """
    col_of = {n: c for c, col in enumerate(columns) for n in col}
    pos = _positions(columns)
    groups: dict[tuple[int, int], list[tuple[float, float]]] = {}
    for s, t, _ in edges:
        if s in col_of and t in col_of and col_of[s] != col_of[t]:
            a, b = (s, t) if col_of[s] < col_of[t] else (t, s)
            groups.setdefault((col_of[a], col_of[b]), []).append((pos[a], pos[b]))
    total = 0
    for pairs in groups.values():
        total += _inversions(pairs)
    return total


def _inversions(pairs: list[tuple[float, float]]) -> int:
    """Pairs (i, j) with u_i < u_j and v_i > v_j (strictly), via a Fenwick tree."""
    pairs = sorted(pairs)
    values = sorted({v for _, v in pairs})
    tree = [0] * (len(values) + 1)
    total = 0
    seen = 0
    k = 0
    while k < len(pairs):
        # Insert a run of equal u only after counting it, so equal u never counts.
        j = k
        while j < len(pairs) and pairs[j][0] == pairs[k][0]:
            j += 1
        for _, v in pairs[k:j]:
            r = bisect_left(values, v) + 1  # count inserted values > v
            le = 0
            i = r
            while i > 0:
                le += tree[i]
                i -= i & -i
            total += seen - le
        for _, v in pairs[k:j]:
            i = bisect_left(values, v) + 1
            while i <= len(values):
                tree[i] += 1
                i += i & -i
            seen += 1
        k = j
    return total


def order_columns(
    columns: Sequence[Sequence[str]],
    edges: Sequence[tuple[str, str, float]],
    *,
    sweeps: int = 8,
    fixed: Sequence[int] = (),
) -> tuple[list[list[str]], int, int]:
    """Order the nodes of each column to reduce edge crossings.

    Args:
        columns: node ids per column in their initial order.
        edges: ``(source id, target id, weight)``; weights (e.g. kernel scores) make strong
            edges straighter. Non-positive or non-finite weights count as weak.
        sweeps: barycentre sweep pairs (each is left→right then right→left).
        fixed: indices of columns whose order must not change (e.g. the input channels).

    Returns:
        ``(ordered columns, crossings before, crossings after)``; never worse than the
        initial order.

    Example:
        >>> cols, before, after = order_columns([["a", "b"], ["c", "d"]],
        ...                                     [("a", "d", 1.0), ("b", "c", 1.0)])
        >>> after
        0
    """
    cols = [list(c) for c in columns]
    col_of = {n: c for c, col in enumerate(cols) for n in col}
    wmax = max((w for _, _, w in edges if math.isfinite(w) and w > 0), default=1.0)
    left: dict[str, list[tuple[str, float]]] = {n: [] for n in col_of}
    right: dict[str, list[tuple[str, float]]] = {n: [] for n in col_of}
    for s, t, w in edges:
        if s not in col_of or t not in col_of or col_of[s] == col_of[t]:
            continue
        a, b = (s, t) if col_of[s] < col_of[t] else (t, s)
        weight = 0.05 + (w / wmax if math.isfinite(w) and w > 0 else 0.0)
        left[b].append((a, weight))
        right[a].append((b, weight))
    frozen = set(fixed)

    before = count_crossings(cols, edges)
    best, best_count = [list(c) for c in cols], before
    for _ in range(sweeps):
        for direction in ("right", "left"):
            pos = _positions(cols)
            indices = range(1, len(cols)) if direction == "right" else range(len(cols) - 2, -1, -1)
            nbrs = left if direction == "right" else right
            for c in indices:
                if c in frozen:
                    continue
                keyed = []
                for k, node in enumerate(cols[c]):
                    links = nbrs[node]
                    total = sum(w for _, w in links)
                    bary = sum(pos[m] * w for m, w in links) / total if total > 0 else pos[node]
                    keyed.append((bary, k, node))
                keyed.sort()
                cols[c] = [node for _, _, node in keyed]
                mid = (len(cols[c]) - 1) / 2
                for k, node in enumerate(cols[c]):
                    pos[node] = k - mid
            n = count_crossings(cols, edges)
            if n < best_count:
                best, best_count = [list(c) for c in cols], n
        if best_count == 0:
            break
    cols = best
    _transpose(cols, left, right, frozen)
    after = count_crossings(cols, edges)
    if after > best_count:  # cannot happen, but never return something worse
        cols, after = best, best_count
    return cols, before, after


def _transpose(cols: list[list[str]], left: dict, right: dict, frozen: set[int],
               passes: int = 4) -> None:
    """Swap adjacent nodes while that removes crossings (in place)."""
    col_of = {n: c for c, col in enumerate(cols) for n in col}

    def pair_crossings(a: str, b: str, pos: dict[str, float]) -> tuple[int, int]:
        """Crossings between a's and b's edges with a above b, and with b above a."""
        now = swapped = 0
        for side in (left, right):
            for ua, _ in side[a]:
                for ub, _ in side[b]:
                    if ua == ub or col_of[ua] != col_of[ub]:
                        continue
                    if pos[ua] > pos[ub]:
                        now += 1
                    elif pos[ua] < pos[ub]:
                        swapped += 1
        return now, swapped

    for _ in range(passes):
        improved = False
        pos = _positions(cols)
        for c, col in enumerate(cols):
            if c in frozen or len(col) < 2:
                continue
            for k in range(len(col) - 1):
                a, b = col[k], col[k + 1]
                now, swapped = pair_crossings(a, b, pos)
                if swapped < now:
                    col[k], col[k + 1] = b, a
                    pos[a], pos[b] = pos[b], pos[a]
                    improved = True
        if not improved:
            break


# --------------------------------------------------------------------------- geometry


@dataclass
class Column:
    """One drawn column: its centre x, its label and a detail line."""

    x: float
    label: str
    detail: str


@dataclass
class Geometry:
    """Pixel positions of a diagram (y grows downwards).

    Attributes:
        width, height: canvas size in px.
        node_size: side of a node's square picture.
        pitch: vertical distance between node centres.
        font: node-label font size.
        x, y: node centres, in the order of the JSON's ``nodes``.
        columns: one :class:`Column` per JSON layer, in column order.
        header: height of the title/subtitle/legend band (the HTML page shows those in its
            own header and starts its view at ``header``).
        label_y: baseline of the column labels.
        legend_x, legend_y: top-left corner of the legend grid (three rows per column,
            150 px per column, 20 px per row).
    """

    width: float
    height: float
    node_size: float
    pitch: float
    font: float
    x: list[float] = field(default_factory=list)
    y: list[float] = field(default_factory=list)
    columns: list[Column] = field(default_factory=list)
    header: float = 0.0
    label_y: float = 0.0
    legend_x: float = 0.0
    legend_y: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (coordinates rounded to 0.1 px)."""
        return {
            "width": round(self.width, 1), "height": round(self.height, 1),
            "node_size": round(self.node_size, 2), "pitch": round(self.pitch, 2),
            "font": round(self.font, 2), "header": self.header, "label_y": self.label_y,
            "x": [round(v, 1) for v in self.x], "y": [round(v, 1) for v in self.y],
            "columns": [{"x": round(c.x, 1), "label": c.label, "detail": c.detail}
                        for c in self.columns],
        }


MARGIN = 28.0
TITLE_BAND = 76.0
LABEL_BAND = 46.0
MIN_WIDTH = 900.0
LEGEND_COLUMN = 150.0
MAX_ASPECT = 1.4  # widen the columns of tall figures up to height / width = 1.4


def _text_width(text: str, size: float) -> float:
    """Rough rendered width of ``text`` in px (sans-serif; errs on the wide side)."""
    return 0.6 * size * len(text)


def _column_detail(layer: dict[str, Any]) -> str:
    if layer["kind"] == "input":
        n = layer["out_channels"]
        return "RGB image" if n == 3 else f"{n} channel" + ("" if n == 1 else "s")
    kernels = layer.get("kept_kernels", 0)
    return f"{layer['kind']} · {layer['nodes']} ch · {kernels:,} kernels"


def subtitle(data: dict[str, Any]) -> str:
    """One line describing the circuit: criterion, keep, kernels, preservation.

    Example:
        >>> subtitle(data)  # doctest: +SKIP
        'actgrad · keep 0.1 · 171 of 2,144 kernels kept · preservation r = 0.850 (held-out, ...'
    """
    m = data["metrics"]
    parts = [m["criterion"], f"keep {m['keep']:g}",
             f"{m['kept_kernels']:,} of {m['relevant_kernels']:,} kernels kept"]
    p = m.get("preservation")
    if p and p.get("pearson") is not None:
        parts.append(f"preservation r = {p['pearson']:.3f} (held-out, {p['n_images']:,} images)")
    elif p is None:
        parts.append("preservation not measured")
    if m.get("collapsed"):
        parts.append("TOTAL COLLAPSE: no path to the target")
    return " · ".join(parts)


def legend_size(data: dict[str, Any]) -> int:
    """Number of legend rows: sign colours, target frame, three widths, pruned (if any)."""
    return 7 if any(not e["kept"] for e in data["edges"]) else 6


def compute_geometry(data: dict[str, Any], *, max_column_height: float = 1500.0) -> Geometry:
    """Pixel layout of a diagram JSON (its nodes' ``column`` and ``order``).

    Args:
        data: a diagram dict (see :mod:`netcarve.diagram.graph_json`).
        max_column_height: the tallest column is squeezed to fit this height (node pictures
            shrink, down to 9 px); short columns keep 64 px per node.

    Returns:
        A :class:`Geometry`.

    Example:
        >>> geo = compute_geometry(data)  # doctest: +SKIP
        >>> geo.x[0], geo.y[0]  # doctest: +SKIP
        (60.0, 400.0)
    """
    layers = data["layers"]
    nodes = data["nodes"]
    n_cols = max(len(layers), 1 + max((n["column"] for n in nodes), default=0))
    counts = [0] * n_cols
    for n in nodes:
        counts[n["column"]] += 1
    n_max = max(counts, default=1) or 1
    pitch = max(12.0, min(64.0, max_column_height / n_max))
    node_size = max(9.0, pitch - max(4.0, pitch * 0.22))
    font = max(7.0, min(11.0, pitch * 0.42))
    labels = [("input" if lay["name"] is None else str(lay["name"])) for lay in layers]
    labels += [""] * (n_cols - len(labels))
    details = [_column_detail(lay) for lay in layers] + [""] * (n_cols - len(layers))
    widest = max(max(_text_width(t, 13.0) for t in labels),
                 max(_text_width(t, 11.0) for t in details))
    col_w = max(190.0, min(340.0, widest + 24.0), node_size * 4)
    left_pad = MARGIN + max(34.0, _text_width(labels[0], 13.0) / 2 - node_size / 2,
                            _text_width(details[0], 11.0) / 2 - node_size / 2)
    right_pad = MARGIN + max(node_size / 2, _text_width(labels[-1], 13.0) / 2,
                             _text_width(details[-1], 11.0) / 2)
    col_h = n_max * pitch

    # Header: title and subtitle on the left, legend on the right, or below when too narrow.
    legend_w = LEGEND_COLUMN * ((legend_size(data) + 2) // 3)
    text_w = max(_text_width(data["title"], 20.0) * 1.05, _text_width(subtitle(data), 13.0))

    def content_width(cw: float) -> float:
        return left_pad + node_size / 2 + (n_cols - 1) * cw + right_pad

    est_height = TITLE_BAND + 20 + LABEL_BAND + col_h + MARGIN
    if n_cols > 1 and content_width(col_w) < est_height / MAX_ASPECT:
        col_w = min(420.0, col_w + (est_height / MAX_ASPECT - content_width(col_w))
                    / (n_cols - 1))
    content_w = content_width(col_w)
    width = max(MIN_WIDTH, content_w)
    if MARGIN + text_w + 40 + legend_w + MARGIN <= width:
        header = TITLE_BAND + 20.0
        legend_x, legend_y = width - MARGIN - legend_w, 26.0
    else:
        header = TITLE_BAND + 3 * 20.0 + 20.0
        legend_x, legend_y = MARGIN, TITLE_BAND + 6.0
    shift = (width - content_w) / 2
    col_x = [shift + left_pad + node_size / 2 + c * col_w for c in range(n_cols)]
    top = header + LABEL_BAND
    height = top + col_h + MARGIN
    mid_y = top + col_h / 2
    xs, ys = [], []
    for n in nodes:
        c = n["column"]
        xs.append(col_x[c])
        ys.append(mid_y + (n["order"] - (counts[c] - 1) / 2) * pitch)
    columns = [Column(col_x[c], labels[c], details[c]) for c in range(n_cols)]
    return Geometry(width=width, height=height, node_size=node_size, pitch=pitch, font=font,
                    x=xs, y=ys, columns=columns, header=header, label_y=header + 18.0,
                    legend_x=legend_x, legend_y=legend_y)
