"""JSON read from files netcarve did not necessarily write: bounded size and nesting depth.

``json.loads`` recurses once per nesting level and raises ``RecursionError`` (not
``ValueError``) on a few thousand brackets, and a hostile file can be any size. Every loader of
a netcarve data file (circuit headers, diagram JSON) parses through :func:`loads_limited`, which
turns each of these into a ``ValueError`` with a message the loader prefixes with the file name.
"""

from __future__ import annotations

import json
from typing import Any

MAX_DEPTH = 32


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def depth(value: Any) -> int:
    """Nesting depth of parsed JSON (a scalar is 0, ``[1]`` is 1), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        if isinstance(item, dict):
            stack.extend((v, level + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, level + 1) for v in item)
    return deepest


def loads_limited(text: str | bytes, *, max_bytes: int, max_depth: int = MAX_DEPTH) -> Any:
    """Parse JSON text after checking its size, rejecting NaN/Infinity and deep nesting.

    Args:
        text: the JSON text.
        max_bytes: the largest accepted text (characters or bytes).
        max_depth: the deepest accepted nesting of objects and arrays.

    Returns:
        The parsed value.

    Raises:
        ValueError: too large, not JSON, a non-finite constant, or nested too deeply.

    Example:
        >>> loads_limited('{"a": [1, 2]}', max_bytes=100)
        {'a': [1, 2]}
    """
    if len(text) > max_bytes:
        raise ValueError(f"{len(text):,} bytes of JSON, more than the {max_bytes:,} accepted")
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise ValueError(f"JSON nested more than {max_depth} levels deep") from None
    if depth(value) > max_depth:
        raise ValueError(f"JSON nested more than {max_depth} levels deep")
    return value
