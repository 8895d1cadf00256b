"""Static circuit diagrams: SVG written by hand, PNG drawn by matplotlib from the same layout.

Both show layers as columns (the model input on the left, the target layer on the right),
each node as its picture in a frame (the target in a thick gold frame), each kept kernel as a
curve coloured by sign (red excitatory, blue inhibitory, grey zero) whose width and opacity
grow with the square root of its score relative to the strongest edge; pruned kernels (when
the JSON lists them) are thin dashed grey curves underneath. A title names the target and the
model; a subtitle gives the criterion, keep fraction, kernel counts and held-out
preservation; a legend explains colours and widths. Every label is XML-escaped text.
"""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

import numpy as np

from netcarve.core.errors import NetcarveError
from netcarve.core.plotting import pyplot, save_figure
from netcarve.diagram.format import validate_diagram

from .layout import Geometry, compute_geometry, legend_size, subtitle

__all__ = ["render_png", "render_svg", "subtitle"]

RED = "#c8102e"
BLUE = "#1f5fbf"
GREY = "#8c8c8c"
GOLD = "#e0a100"
INK = "#222222"
FONT = "DejaVu Sans, Helvetica, Arial, sans-serif"


def _fmt(v: float) -> str:
    return f"{v:.1f}".rstrip("0").rstrip(".")


def _edge_style(score: float, max_score: float, sign: int, kept: bool) -> tuple[str, float, float]:
    """(colour, width px, opacity) of an edge."""
    if not kept:
        return GREY, 0.6, 0.35
    rel = math.sqrt(min(abs(score) / max_score, 1.0)) if max_score > 0 else 1.0
    colour = RED if sign > 0 else BLUE if sign < 0 else GREY
    return colour, 0.5 + 4.5 * rel, 0.3 + 0.6 * rel


def _curve(x1: float, y1: float, x2: float, y2: float) -> tuple[float, ...]:
    mx = (x1 + x2) / 2
    return x1, y1, mx, y1, mx, y2, x2, y2


def _edge_order(data: dict[str, Any]) -> list[int]:
    """Draw order: pruned first, then kept edges from weakest to strongest."""
    edges = data["edges"]
    return sorted(range(len(edges)),
                  key=lambda k: (edges[k]["kept"], abs(edges[k]["score"]), k))


def _endpoints(data: dict[str, Any], geo: Geometry) -> list[tuple[float, float, float, float]]:
    index = {n["id"]: k for k, n in enumerate(data["nodes"])}
    half = geo.node_size / 2
    out = []
    for e in data["edges"]:
        s, t = index[e["source"]], index[e["target"]]
        out.append((geo.x[s] + half, geo.y[s], geo.x[t] - half, geo.y[t]))
    return out


def _legend_items(data: dict[str, Any]) -> list[tuple[str, str, str, float, float]]:
    """Legend rows ``(kind, text, colour, width, opacity)``, kind ``line``/``dash``/``box``,
    laid out three per column by :func:`_legend_xy` (:func:`legend_size` of them)."""
    max_score = data["metrics"]["max_edge_score"]
    items = [("line", "excitatory (+)", RED, 3.0, 0.9), ("line", "inhibitory (−)", BLUE, 3.0, 0.9),
             ("box", "target", GOLD, 3.0, 1.0)]
    for frac in (1.0, 0.25, 0.04):
        _, w, op = _edge_style(frac * max_score, max_score, 1, True)
        items.append(("line", f"score {frac * max_score:.3g}", INK, w, op))
    if legend_size(data) > len(items):
        items.append(("dash", "pruned kernel", GREY, 0.6, 0.6))
    return items


def _legend_xy(k: int, geo: Geometry) -> tuple[float, float]:
    """Legend grid: three rows per column, 150 px per column, 20 px per row."""
    col, row = divmod(k, 3)
    return geo.legend_x + col * 150, geo.legend_y + row * 20


def render_svg(data: dict[str, Any], path: str | Path | None = None, *,
               geometry: Geometry | None = None) -> str:
    """Draw a diagram as a standalone SVG document (pictures embedded as data URIs).

    Args:
        data: a diagram dict (validated first).
        path: where to write it (optional).
        geometry: a precomputed :func:`~netcarve.diagram.layout.compute_geometry`.

    Returns:
        The SVG text.

    Raises:
        DiagramError: ``data`` is not a valid diagram.

    Example:
        >>> svg = render_svg(data, "out/diagram.svg")  # doctest: +SKIP
    """
    validate_diagram(data)
    geo = geometry or compute_geometry(data)
    nodes, edges = data["nodes"], data["edges"]
    max_score = data["metrics"]["max_edge_score"]
    s = geo.node_size
    out: list[str] = []
    w = out.append
    w('<?xml version="1.0" encoding="UTF-8"?>\n')
    w(f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
      f'width="{_fmt(geo.width)}" height="{_fmt(geo.height)}" '
      f'viewBox="0 0 {_fmt(geo.width)} {_fmt(geo.height)}" font-family={quoteattr(FONT)}>\n')
    w(f"<title>{escape(data['title'])}</title>\n")
    w("<style>.halo{paint-order:stroke;stroke:#fff;stroke-width:3px;stroke-linejoin:round}"
      "image{image-rendering:pixelated;image-rendering:crisp-edges}</style>\n")
    w('<rect width="100%" height="100%" fill="#ffffff"/>\n')
    # header
    w(f'<text x="28" y="36" font-size="20" font-weight="bold" fill="{INK}">'
      f"{escape(data['title'])}</text>\n")
    w(f'<text x="28" y="60" font-size="13" fill="#444">{escape(subtitle(data))}</text>\n')
    w(f'<g font-size="11" fill="{INK}">')
    legend = _legend_items(data)
    for k, (kind, text, colour, lw, op) in enumerate(legend):
        x0, y0 = _legend_xy(k, geo)
        if kind == "box":
            w(f'<rect x="{_fmt(x0 + 10)}" y="{_fmt(y0 - 7)}" width="14" height="14" '
              f'fill="#eeeeee" stroke="{colour}" stroke-width="3"/>')
        else:
            dash = ' stroke-dasharray="3 3"' if kind == "dash" else ""
            w(f'<line x1="{_fmt(x0)}" y1="{_fmt(y0)}" x2="{_fmt(x0 + 34)}" y2="{_fmt(y0)}" '
              f'stroke="{colour}" stroke-width="{lw:.2f}" stroke-opacity="{op:.2f}" '
              f'stroke-linecap="round"{dash}/>')
        w(f'<text x="{_fmt(x0 + 42)}" y="{_fmt(y0 + 4)}">{escape(text)}</text>')
    w("</g>\n")
    # column labels
    w(f'<g font-size="13" fill="{INK}" text-anchor="middle">')
    for col in geo.columns:
        w(f'<text x="{_fmt(col.x)}" y="{_fmt(geo.label_y)}" font-weight="bold">'
          f"{escape(col.label)}</text>")
        w(f'<text x="{_fmt(col.x)}" y="{_fmt(geo.label_y + 16)}" font-size="11" '
          f'fill="#555">{escape(col.detail)}</text>')
    w("</g>\n")
    # edges
    ends = _endpoints(data, geo)
    w('<g fill="none" stroke-linecap="round">\n')
    for k in _edge_order(data):
        e = edges[k]
        colour, lw, op = _edge_style(e["score"], max_score, e["sign"], e["kept"])
        x1, y1, c1x, c1y, c2x, c2y, x2, y2 = _curve(*ends[k])
        dash = "" if e["kept"] else ' stroke-dasharray="3 3"'
        w(f'<path d="M{x1:.1f} {y1:.1f}C{c1x:.1f} {c1y:.1f} {c2x:.1f} {c2y:.1f} '
          f'{x2:.1f} {y2:.1f}" stroke="{colour}" stroke-width="{lw:.2f}" '
          f'stroke-opacity="{op:.2f}"{dash}/>\n')
    w("</g>\n")
    # nodes
    w(f'<g font-size="{_fmt(geo.font)}" fill="{INK}">\n')
    for k, n in enumerate(nodes):
        x0, y0 = geo.x[k] - s / 2, geo.y[k] - s / 2
        target = n["role"] == "target"
        frame = GOLD if target else "#555555"
        fw = 3 if target else 1
        score = "–" if n["score"] is None else f"{n['score']:.4g}"
        w(f"<g><title>{escape(n['label'])} · score {score}</title>")
        w(f'<rect x="{x0:.1f}" y="{y0:.1f}" width="{s:.1f}" height="{s:.1f}" '
          f'fill="#eeeeee"/>')
        if n["picture"]:
            w(f'<image x="{x0:.1f}" y="{y0:.1f}" width="{s:.1f}" height="{s:.1f}" '
              f'preserveAspectRatio="none" href={quoteattr(n["picture"])}/>')
        dash = "" if n["kept"] else ' stroke-dasharray="2 2"'
        w(f'<rect x="{x0:.1f}" y="{y0:.1f}" width="{s:.1f}" height="{s:.1f}" fill="none" '
          f'stroke="{frame}" stroke-width="{fw}"{dash}/>')
        w(f'<text class="halo" x="{x0 - 3:.1f}" y="{y0 + geo.font * 0.9:.1f}" '
          f'text-anchor="end">{escape(str(n["channel"]))}</text>')
        if target:
            w(f'<text class="halo" x="{geo.x[k]:.1f}" y="{y0 - 5:.1f}" text-anchor="middle" '
              f'font-size="11" font-weight="bold">target</text>')
        w("</g>\n")
    w("</g>\n</svg>\n")
    text = "".join(out)
    if path is not None:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
    return text


def _decode_picture(uri: str) -> np.ndarray:
    from PIL import Image

    raw = base64.b64decode(uri.split(",", 1)[1])
    img = Image.open(io.BytesIO(raw))
    return np.asarray(img.convert("RGB"))


def render_png(data: dict[str, Any], path: str | Path, *, geometry: Geometry | None = None,
               scale: float = 2.0) -> Path:
    """Draw a diagram as a PNG with matplotlib (same layout, colours and labels as the SVG).

    Args:
        data: a diagram dict (validated first).
        path: the PNG file to write.
        geometry: a precomputed geometry.
        scale: pixels per layout pixel (2 gives a print-quality image).

    Returns:
        The path written.

    Raises:
        DiagramError: ``data`` is not a valid diagram.
        NetcarveError: matplotlib is not installed (``pip install netcarve[report]``).

    Example:
        >>> render_png(data, "out/diagram.png")  # doctest: +SKIP
    """
    validate_diagram(data)
    try:
        plt = pyplot()
        import matplotlib
        from matplotlib import patheffects
        from matplotlib.collections import LineCollection, PatchCollection
        from matplotlib.patches import Rectangle
    except ImportError as exc:  # pragma: no cover - matplotlib is in the test extras
        raise NetcarveError("PNG diagrams need matplotlib: pip install 'netcarve[report]'") \
            from exc
    geo = geometry or compute_geometry(data)
    nodes, edges = data["nodes"], data["edges"]
    max_score = data["metrics"]["max_edge_score"]
    s = geo.node_size
    pt = 72.0 / 100.0  # layout px → points at 100 px per inch
    fig = plt.figure(figsize=(geo.width / 100, geo.height / 100), dpi=100 * scale)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, geo.width)
    ax.set_ylim(geo.height, 0)
    ax.axis("off")
    halo = [patheffects.withStroke(linewidth=2.5, foreground="white")]

    ax.text(28, 36, data["title"], fontsize=20 * pt, fontweight="bold", color=INK,
            va="baseline")
    ax.text(28, 60, subtitle(data), fontsize=13 * pt, color="#444444", va="baseline")
    legend = _legend_items(data)
    for k, (kind, text, colour, lw, op) in enumerate(legend):
        x0, y0 = _legend_xy(k, geo)
        if kind == "box":
            ax.add_patch(Rectangle((x0 + 10, y0 - 7), 14, 14, facecolor="#eeeeee",
                                   edgecolor=colour, linewidth=3 * pt))
        else:
            ax.plot([x0, x0 + 34], [y0, y0], color=colour, linewidth=lw * pt, alpha=op,
                    solid_capstyle="round", linestyle="solid" if kind == "line" else (0, (3, 3)))
        ax.text(x0 + 42, y0 + 4, text, fontsize=11 * pt, color=INK, va="baseline")
    for col in geo.columns:
        ax.text(col.x, geo.label_y, col.label, fontsize=13 * pt, fontweight="bold",
                ha="center", va="baseline", color=INK)
        ax.text(col.x, geo.label_y + 16, col.detail, fontsize=11 * pt, ha="center",
                va="baseline", color="#555555")

    t = np.linspace(0.0, 1.0, 24)[:, None]
    ends = _endpoints(data, geo)
    segs, colours, widths, styles = [], [], [], []
    for k in _edge_order(data):
        e = edges[k]
        colour, lw, op = _edge_style(e["score"], max_score, e["sign"], e["kept"])
        x1, y1, c1x, c1y, c2x, c2y, x2, y2 = _curve(*ends[k])
        p0, p1, p2, p3 = (np.array(v) for v in ((x1, y1), (c1x, c1y), (c2x, c2y), (x2, y2)))
        pts = ((1 - t) ** 3) * p0 + 3 * ((1 - t) ** 2) * t * p1 + 3 * (1 - t) * t ** 2 * p2 \
            + t ** 3 * p3
        segs.append(pts)
        rgba = matplotlib.colors.to_rgba(colour, op)
        colours.append(rgba)
        widths.append(lw * pt)
        styles.append("solid" if e["kept"] else (0, (3, 3)))
    if segs:
        ax.add_collection(LineCollection(segs, colors=colours, linewidths=widths,
                                         linestyles=styles, capstyle="round", zorder=1))
    backs, frames, frame_cols, frame_ws = [], [], [], []
    for k, n in enumerate(nodes):
        x0, y0 = geo.x[k] - s / 2, geo.y[k] - s / 2
        backs.append(Rectangle((x0, y0), s, s))
        if n["picture"]:
            ax.imshow(_decode_picture(n["picture"]), extent=(x0, x0 + s, y0 + s, y0),
                      interpolation="nearest", zorder=3)
        target = n["role"] == "target"
        frames.append(Rectangle((x0, y0), s, s))
        frame_cols.append(GOLD if target else "#555555")
        frame_ws.append((3 if target else 1) * pt)
        ax.text(x0 - 3, y0 + geo.font * 0.9, str(n["channel"]), fontsize=geo.font * pt,
                ha="right", va="baseline", color=INK, path_effects=halo, zorder=5)
        if target:
            ax.text(geo.x[k], y0 - 5, "target", fontsize=11 * pt, fontweight="bold",
                    ha="center", va="baseline", color=INK, path_effects=halo, zorder=5)
    ax.add_collection(PatchCollection(backs, facecolor="#eeeeee", edgecolor="none", zorder=2))
    ax.add_collection(PatchCollection(frames, facecolor="none", edgecolors=frame_cols,
                                      linewidths=frame_ws, zorder=4))
    ax.set_xlim(0, geo.width)
    ax.set_ylim(geo.height, 0)
    return save_figure(fig, path, dpi=100 * scale, facecolor="white")
