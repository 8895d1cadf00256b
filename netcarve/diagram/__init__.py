"""Circuit diagrams: a versioned JSON graph, static SVG/PNG, and a self-contained HTML page.

Data flows one way: circuit + model → :func:`circuit_to_json` (nodes, edges, pictures,
column order) → renderers that only read the JSON (:func:`render_svg`, :func:`render_png`,
:func:`render_html`). :func:`write_diagram` does all of it into a folder; :func:`render_diagram`
renders a JSON that was built earlier (or by another tool). The format is documented in
``docs/diagram-format.md`` and checked by ``schema.json``.

Example:
    >>> from netcarve.diagram import write_diagram
    >>> files = write_diagram(circuit, lm.model, "out/diagram", images=x,
    ...                       preset=lm.preset)  # doctest: +SKIP
    >>> sorted(files)  # doctest: +SKIP
    ['html', 'json', 'png', 'svg']
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from netcarve.core.errors import NetcarveError
from netcarve.core.graph import ModelGraph
from netcarve.data.preset import Preset
from netcarve.diagram.format import (
    FORMAT,
    FORMAT_VERSION,
    DiagramError,
    dump_diagram_json,
    load_diagram_json,
    load_schema,
    validate_diagram,
)
from netcarve.diagram.graph_json import circuit_to_json

from .html import render_html
from .layout import compute_geometry, order_columns
from .pictures import (
    Example,
    NodePicture,
    NodeRef,
    PictureProvider,
    PictureRequest,
    compose,
    dataset_examples,
    default_pictures,
    input_pictures,
    kernel_pictures,
)
from .svg import render_png, render_svg

__all__ = [
    "FORMAT",
    "FORMATS",
    "FORMAT_VERSION",
    "DiagramError",
    "Example",
    "NodePicture",
    "NodeRef",
    "PictureProvider",
    "PictureRequest",
    "circuit_to_json",
    "compose",
    "compute_geometry",
    "dataset_examples",
    "default_pictures",
    "dump_diagram_json",
    "input_pictures",
    "kernel_pictures",
    "load_diagram_json",
    "load_schema",
    "order_columns",
    "parse_formats",
    "render_diagram",
    "render_html",
    "render_png",
    "render_svg",
    "validate_diagram",
    "write_diagram",
]

FORMATS = ("html", "svg", "png", "json")


def parse_formats(formats: str | Iterable[str]) -> list[str]:
    """Normalise a format list (``"html,svg"`` or ``["html", "svg"]``), order kept.

    Raises:
        NetcarveError: an unknown format (exit code 2).

    Example:
        >>> parse_formats("svg, HTML,svg")
        ['svg', 'html']
    """
    items = formats.split(",") if isinstance(formats, str) else list(formats)
    out: list[str] = []
    for item in items:
        f = str(item).strip().lower()
        if not f:
            continue
        if f not in FORMATS:
            raise NetcarveError(
                f"unknown diagram format {item!r}; choose from {', '.join(FORMATS)}")
        if f not in out:
            out.append(f)
    if not out:
        raise NetcarveError(f"no diagram format given; choose from {', '.join(FORMATS)}")
    return out


def render_diagram(data: dict[str, Any], out_dir: str | Path,
                   formats: str | Iterable[str] = FORMATS, *,
                   stem: str = "diagram") -> dict[str, Path]:
    """Render an existing diagram dict into ``out_dir`` in the given formats.

    Args:
        data: a diagram dict (validated).
        out_dir: output folder (created).
        formats: any of ``html``, ``svg``, ``png``, ``json``.
        stem: file name without extension.

    Returns:
        ``{format: path written}``.

    Raises:
        DiagramError: invalid diagram. NetcarveError: unknown format.

    Example:
        >>> render_diagram(load_diagram_json("d.json"), "out", "svg")  # doctest: +SKIP
        {'svg': PosixPath('out/diagram.svg')}
    """
    fmts = parse_formats(formats)
    validate_diagram(data)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    geo = compute_geometry(data)
    files: dict[str, Path] = {}
    for f in fmts:
        path = out / f"{stem}.{f}"
        if f == "json":
            dump_diagram_json(data, path)
        elif f == "svg":
            render_svg(data, path, geometry=geo)
        elif f == "png":
            render_png(data, path, geometry=geo)
        else:
            render_html(data, path, geometry=geo)
        files[f] = path
    return files


def write_diagram(
    circuit: Any,
    model: nn.Module,
    out_dir: str | Path,
    formats: str | Iterable[str] = FORMATS,
    *,
    graph: ModelGraph | None = None,
    images: torch.Tensor | None = None,
    preset: Preset | None = None,
    pictures: PictureProvider | bool | None = True,
    model_name: str | None = None,
    title: str | None = None,
    pruned_edges: bool = False,
    top_k: int = 4,
    stem: str = "diagram",
) -> dict[str, Path]:
    """Draw a circuit: build its JSON graph and write it in the requested formats.

    Args:
        circuit: a :class:`~netcarve.circuits.circuit.Circuit`.
        model: the model it was extracted from.
        out_dir: output folder (created); files are ``<stem>.<format>``.
        formats: any of ``html``, ``svg``, ``png``, ``json`` (a list or ``"html,svg"``).
        graph, images, preset, pictures, model_name, title, pruned_edges, top_k: as in
            :func:`circuit_to_json`.
        stem: file name without extension.

    Returns:
        ``{format: path written}``.

    Raises:
        NetcarveError: unknown format. DiagramError: the circuit does not fit the model.

    Example:
        >>> write_diagram(circuit, lm.model, "out/d", "html,png", images=x,
        ...               preset=lm.preset)  # doctest: +SKIP
        {'html': PosixPath('out/d/diagram.html'), 'png': PosixPath('out/d/diagram.png')}
    """
    fmts = parse_formats(formats)
    data = circuit_to_json(circuit, model, graph=graph, images=images, preset=preset,
                           pictures=pictures, model_name=model_name, title=title,
                           pruned_edges=pruned_edges, top_k=top_k)
    return render_diagram(data, out_dir, fmts, stem=stem)
