"""The diagram JSON format: its schema (``schema.json``), validation of files netcarve did not
necessarily write (types, ranges, sizes, nesting), and reading and writing them.
The format itself is documented in ``docs/diagram-format.md``."""

from __future__ import annotations

import json
import math
import re
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from netcarve.core._json_limits import loads_limited
from netcarve.core.errors import NetcarveError

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "DiagramError",
    "dump_diagram_json",
    "load_diagram_json",
    "load_schema",
    "validate_diagram",
]

FORMAT = "netcarve-diagram"
FORMAT_VERSION = 1
MAX_INPUT_NODES = 16
# Pictures are embedded as data URLs; a real diagram of a large circuit stays well under this.
MAX_DIAGRAM_BYTES = 256 * 1024 * 1024
SIGN_RULE = ("sign of the kernel's weight sum times the scale of the BatchNorm after the "
             "layer (gamma / sqrt(running_var + eps)); +1 excitatory, -1 inhibitory")


class DiagramError(NetcarveError):
    """A diagram file is unreadable or does not follow the diagram format, or a circuit
    cannot be drawn (e.g. its model does not match)."""

    exit_code = 3


# --------------------------------------------------------------------------- schema


@lru_cache(maxsize=1)
def _schema_text() -> str:
    return resources.files(__package__).joinpath("schema.json").read_text(encoding="utf-8")


def load_schema() -> dict[str, Any]:
    """The diagram JSON Schema (a fresh dict each call).

    Example:
        >>> load_schema()["properties"]["version"]
        {'const': 1}
    """
    return json.loads(_schema_text())


_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    and math.isfinite(v),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def _same(a: Any, b: Any) -> bool:
    """JSON equality: booleans are not numbers."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


@lru_cache(maxsize=64)
def _regex(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def _check(value: Any, schema: dict[str, Any], root: dict[str, Any], where: str) -> None:
    """Validate ``value`` against the subset of JSON Schema that ``schema.json`` uses:
    type, const, enum, properties, required, additionalProperties (bool), items, minItems,
    maxItems, minimum, maximum, minLength, pattern, anyOf and local ``$ref``."""
    if "$ref" in schema:
        ref = schema["$ref"]
        if not ref.startswith("#/"):
            raise DiagramError(f"schema: only local $ref supported, got {ref}")
        target: Any = root
        for part in ref[2:].split("/"):
            target = target[part]
        _check(value, target, root, where)
    if "anyOf" in schema:
        errors = []
        for option in schema["anyOf"]:
            try:
                _check(value, option, root, where)
                break
            except DiagramError as exc:
                errors.append(str(exc))
        else:
            raise DiagramError(f"{where}: matches none of the allowed forms ({'; '.join(errors)})")
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_TYPES[t](value) for t in types):
            shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
            if isinstance(shown, str) and len(shown) > 60:
                shown = shown[:57] + "..."
            raise DiagramError(f"{where}: expected {' or '.join(types)}, got {shown}")
    if "const" in schema and not _same(value, schema["const"]):
        raise DiagramError(f"{where}: must be {schema['const']!r}, got {value!r}")
    if "enum" in schema and not any(_same(value, e) for e in schema["enum"]):
        raise DiagramError(f"{where}: must be one of {schema['enum']}, got {value!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            raise DiagramError(f"{where}: {value} is below the minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            raise DiagramError(f"{where}: {value} is above the maximum {schema['maximum']}")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            raise DiagramError(f"{where}: must not be empty")
        if "pattern" in schema and not _regex(schema["pattern"]).search(value):
            raise DiagramError(f"{where}: does not match the pattern {schema['pattern']}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            raise DiagramError(f"{where}: needs at least {schema['minItems']} items")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            raise DiagramError(f"{where}: allows at most {schema['maxItems']} items")
        if "items" in schema:
            for k, item in enumerate(value):
                _check(item, schema["items"], root, f"{where}[{k}]")
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                raise DiagramError(f"{where}: missing required field {key!r}")
        props = schema.get("properties", {})
        if schema.get("additionalProperties", True) is False:
            extra = sorted(set(value) - set(props))
            if extra:
                raise DiagramError(f"{where}: unknown field(s) {extra}")
        for key, sub in props.items():
            if key in value:
                _check(value[key], sub, root, f"{where}.{key}")


def validate_diagram(data: Any) -> dict[str, Any]:
    """Check a diagram dict against the JSON Schema and the format's cross-field rules.

    Cross-field rules: node ids are unique; every edge joins existing nodes and goes from a
    lower to a higher column; ``layers[k].column == k``; node columns name existing layers and
    ``(column, order)`` pairs are unique; target nodes exist.

    Args:
        data: the parsed JSON.

    Returns:
        ``data`` unchanged.

    Raises:
        DiagramError: the first problem found, with its JSON path (``$.nodes[3].score``).
            A newer format version gets an "upgrade netcarve" message.

    Example:
        >>> validate_diagram({"format": "netcarve-diagram", "version": 1})  # doctest: +SKIP
        Traceback (most recent call last):
        DiagramError: $: missing required field 'generator'
    """
    if isinstance(data, dict) and data.get("format") == FORMAT:
        version = data.get("version")
        if isinstance(version, int) and not isinstance(version, bool) \
                and version > FORMAT_VERSION:
            raise DiagramError(f"diagram format version {version} is newer than this netcarve "
                               f"reads ({FORMAT_VERSION}): upgrade netcarve")
    schema = load_schema()
    _check(data, schema, schema, "$")
    layers, nodes = data["layers"], data["nodes"]
    for k, layer in enumerate(layers):
        if layer["column"] != k:
            raise DiagramError(f"$.layers[{k}].column: must be {k}, got {layer['column']}")
    ids: dict[str, int] = {}
    slots: set[tuple[int, int]] = set()
    for k, node in enumerate(nodes):
        if node["id"] in ids:
            raise DiagramError(f"$.nodes[{k}].id: duplicate node id {node['id']!r}")
        ids[node["id"]] = node["column"]
        if node["column"] >= len(layers):
            raise DiagramError(f"$.nodes[{k}].column: no layer has column {node['column']}")
        slot = (node["column"], node["order"])
        if slot in slots:
            raise DiagramError(f"$.nodes[{k}].order: two nodes share column {slot[0]}, "
                               f"order {slot[1]}")
        slots.add(slot)
    for k, edge in enumerate(data["edges"]):
        for end in ("source", "target"):
            if edge[end] not in ids:
                raise DiagramError(f"$.edges[{k}].{end}: unknown node {edge[end]!r}")
        if ids[edge["source"]] >= ids[edge["target"]]:
            raise DiagramError(f"$.edges[{k}]: goes from column {ids[edge['source']]} to "
                               f"column {ids[edge['target']]} (must go right)")
    for k, node_id in enumerate(data["target"]["nodes"]):
        if node_id not in ids:
            raise DiagramError(f"$.target.nodes[{k}]: unknown node {node_id!r}")
    return data


def load_diagram_json(path: str | Path) -> dict[str, Any]:
    """Read a diagram JSON file and validate it.

    Args:
        path: the ``.json`` file.

    Returns:
        The diagram dict.

    Raises:
        DiagramError: missing file, invalid JSON, or not a valid diagram.

    Example:
        >>> data = load_diagram_json("out/diagram/diagram.json")  # doctest: +SKIP
    """
    path = Path(path)
    try:
        if path.stat().st_size > MAX_DIAGRAM_BYTES:
            raise DiagramError(f"{path} is {path.stat().st_size:,} bytes, larger than any "
                               f"diagram netcarve writes ({MAX_DIAGRAM_BYTES:,} at most)")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DiagramError(f"diagram file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DiagramError(f"cannot read {path}: {exc}") from exc
    try:
        data = loads_limited(text, max_bytes=MAX_DIAGRAM_BYTES)
    except ValueError as exc:
        raise DiagramError(f"{path} is not valid JSON for a diagram: {exc}") from None
    try:
        return validate_diagram(data)
    except DiagramError as exc:
        raise DiagramError(f"{path}: {exc}") from None


def dump_diagram_json(data: dict[str, Any], path: str | Path, *, indent: int | None = 1) -> Path:
    """Validate ``data`` and write it as UTF-8 JSON.

    Returns:
        The path written.

    Raises:
        DiagramError: ``data`` is not a valid diagram.
    """
    validate_diagram(data)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=indent, ensure_ascii=False, allow_nan=False),
                    encoding="utf-8")
    return path
