"""Interactive circuit diagrams: one self-contained HTML file that works offline.

The page (``template.html``: hand-written CSS and JavaScript, no library, no network) gets
the diagram JSON and its layout inside ``<script type="application/json">``, with ``<``,
``>``, ``&``, U+2028 and U+2029 escaped as ``\\uXXXX`` so no data can close the script
element. The script builds an SVG from it with ``createElementNS``/``textContent`` only: no
label, layer or class name is ever parsed as markup. A Content-Security-Policy forbids any
network access (pictures are ``data:`` URIs, validated before use).

In the page: drag to pan, wheel to zoom (at the pointer), hover an edge to see its kernel as a
red/blue heat map with its score, rank and sign, hover a node to see its picture large with
its scores and top data-set examples, click a node to keep only the paths through it
(upstream and downstream), click the background or press Esc to clear, move the slider to
hide the weakest edges (by quantile of |score|), press R (or the Reset button) to reset view,
selection and slider. ``window.netcarveDiagram`` exposes counts and state for scripts.
"""

from __future__ import annotations

import html as _html
import json
import re
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from netcarve.diagram.format import FORMAT_VERSION, validate_diagram

from .layout import Geometry, compute_geometry, subtitle

__all__ = ["render_html", "script_json"]

_PLACEHOLDER = re.compile(r"%%NETCARVE_(TITLE|DATA|VERSION)%%")


@lru_cache(maxsize=1)
def _template() -> str:
    return resources.files(__package__).joinpath("template.html").read_text(encoding="utf-8")


def script_json(obj: Any) -> str:
    """JSON text that is safe inside an HTML ``<script>`` element.

    ``<``, ``>``, ``&``, U+2028 and U+2029 are written as ``\\u`` escapes (they can only occur
    inside JSON strings, where the escapes mean the same characters).

    Example:
        >>> script_json({"name": "</script>"})
        '{"name":"\\\\u003c/script\\\\u003e"}'
    """
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def render_html(data: dict[str, Any], path: str | Path | None = None, *,
                geometry: Geometry | None = None) -> str:
    """Write a diagram as one self-contained interactive HTML page.

    Args:
        data: a diagram dict (validated first).
        path: where to write it (optional).
        geometry: a precomputed :func:`~netcarve.diagram.layout.compute_geometry`.

    Returns:
        The HTML text.

    Raises:
        DiagramError: ``data`` is not a valid diagram.

    Example:
        >>> page = render_html(data, "out/diagram.html")  # doctest: +SKIP
    """
    validate_diagram(data)
    geo = geometry or compute_geometry(data)
    payload = {"graph": data, "layout": geo.to_dict(), "subtitle": subtitle(data)}
    values = {
        "TITLE": _html.escape(data["title"], quote=True).replace("\u2028", "&#8232;")
        .replace("\u2029", "&#8233;"),
        "DATA": script_json(payload),
        "VERSION": str(FORMAT_VERSION),
    }
    # One pass: inserted text is never scanned for placeholders again.
    page = _PLACEHOLDER.sub(lambda m: values[m.group(1)], _template())
    if path is not None:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(page, encoding="utf-8")
    return page
