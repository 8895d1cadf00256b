"""Circuit files: masks and scores in safetensors, provenance as JSON in the same header.

One file holds everything: tensors ``mask/<layer>``, ``relevant/<layer>`` (uint8) and
``score/<layer>`` (float32), keyed by original layer names; the safetensors metadata entry
``netcarve_circuit`` holds the JSON description (target, criterion, keep, preservation,
fingerprints, seed, version), a SHA-256 of the masks and one of the header itself, so that an
edited or damaged file is caught (a checksum, not a signature: it catches edits and damage,
not someone who recomputes it on purpose).
Loading never unpickles anything.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from netcarve.circuits.preservation import Preservation
from netcarve.core._json_limits import loads_limited
from netcarve.core.errors import NetcarveError
from netcarve.core.targets import Target, TargetError

FORMAT = "netcarve-circuit"
FORMAT_VERSION = 1

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MAX_HEADER_BYTES",
    "CircuitFileError",
    "read_circuit_fields",
    "save_circuit",
]



class CircuitFileError(NetcarveError):
    """A circuit file is missing, truncated, edited or not a circuit file."""

    exit_code = 3


def _mask_digest(masks: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(masks):
        m = masks[name].to(torch.uint8).contiguous()
        h.update(f"{name}:{tuple(m.shape)}".encode())
        h.update(m.numpy().tobytes())
    return h.hexdigest()


def _header_digest(header: dict[str, Any]) -> str:
    """SHA-256 of the header's canonical JSON, without the digest itself."""
    body = {k: v for k, v in header.items() if k != "header_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _target_to_json(t: Target) -> dict[str, Any]:
    return {
        "layer": t.layer,
        "channel": t.channel,
        "position": None if t.position is None else list(t.position),
        "direction": None if t.direction is None else t.direction.tolist(),
        # A callable cannot be stored; it is recorded by name and reloaded as sum_abs.
        "objective": t.objective if isinstance(t.objective, str) else
        f"custom:{getattr(t.objective, '__qualname__', 'callable')}",
    }


def _target_from_json(d: dict[str, Any]) -> Target:
    objective = d.get("objective", "sum_abs")
    if not isinstance(objective, str) or objective.startswith("custom:"):
        objective = "sum_abs"
    pos = d.get("position")
    position = None if pos is None else (int(pos[0]), int(pos[1]))
    if d.get("direction") is not None:
        return Target(d["layer"], direction=torch.tensor(d["direction"]), position=position,
                      objective=objective)
    return Target(d["layer"], channel=int(d["channel"]), position=position, objective=objective)


def save_circuit(circuit, path: str | Path) -> Path:
    """Write ``circuit`` to ``path`` (safetensors with JSON metadata).

    Args:
        circuit: a :class:`~netcarve.circuits.circuit.Circuit`.
        path: destination file (parent folders are created).

    Returns:
        The path written.

    Example:
        >>> save_circuit(circuit, "out/circuit.safetensors")  # doctest: +SKIP
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, rel in circuit.relevant.items():
        tensors[f"relevant/{name}"] = rel.to(torch.uint8).contiguous()
        tensors[f"mask/{name}"] = circuit.masks[name].to(torch.uint8).contiguous()
    for name, s in circuit.scores.items():
        tensors[f"score/{name}"] = s.detach().float().cpu().contiguous()
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "layers": list(circuit.relevant),
        "target": _target_to_json(circuit.target),
        "criterion": circuit.criterion,
        "keep": circuit.keep,
        "selected": circuit.selected,
        "collapsed": circuit.collapsed,
        "kept_kernels": circuit.kept_kernels,
        "mask_sha256": _mask_digest(circuit.masks),
        "preservation": None if circuit.preservation is None
        else circuit.preservation.to_dict(per_image=True),
        "preservation_scoring": None if circuit.preservation_scoring is None
        else circuit.preservation_scoring.to_dict(per_image=True),
        "metadata": circuit.metadata,
    }
    # Round-trip through JSON first so the digest covers exactly what a reader will parse.
    header = json.loads(json.dumps(header))
    header["header_sha256"] = _header_digest(header)
    save_file(tensors, str(path), metadata={"netcarve_circuit": json.dumps(header)})
    return path


def _preservation(d: dict[str, Any] | None) -> Preservation | None:
    if d is None:
        return None
    nan = float("nan")
    return Preservation(
        pearson=nan if d.get("pearson") is None else d["pearson"],
        nmad=nan if d.get("nmad") is None else d["nmad"],
        per_image_median=nan if d.get("per_image_median") is None else d["per_image_median"],
        n_images=d["n_images"],
        per_image=[nan if v is None else v for v in d.get("per_image", [])],
    )


# ------------------------------------------------------------------------ header validation
# A circuit file may come from anyone. Everything in its header is checked for type, range and
# size before it is used, so that a hostile or damaged file fails with one message instead of
# reaching code that assumes well-formed values (or allocating what a number asks for).

MAX_HEADER_BYTES = 64 * 1024 * 1024
MAX_NAME = 512
MAX_LAYERS = 100_000
MAX_TRACE_ELEMENTS = 1 << 26  # the zero input traced to rebuild the graph (256 MiB in float32)


class _Bad(ValueError):
    """One header problem, with the JSON path of the offending field."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _expect(ok: bool, where: str, what: str, value: Any) -> None:
    if not ok:
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise _Bad(f"{where} must be {what}, got {shown}")


def _name(v: Any, where: str) -> str:
    _expect(isinstance(v, str) and 0 < len(v) <= MAX_NAME, where,
            f"a non-empty string of at most {MAX_NAME} characters", v)
    return v


def _check_target(t: Any, layer_shapes: dict[str, tuple[int, ...]]) -> None:
    _expect(isinstance(t, dict), "target", "an object", t)
    _name(t.get("layer"), "target.layer")
    direction, channel = t.get("direction"), t.get("channel")
    out = layer_shapes[t["layer"]][0] if t["layer"] in layer_shapes else None
    if direction is not None:
        _expect(isinstance(direction, list) and 0 < len(direction) <= 1 << 20
                and all(_is_number(v) for v in direction), "target.direction",
                "a list of finite numbers", direction)
        if out is not None:
            _expect(len(direction) == out, "target.direction",
                    f"{out} numbers (one per channel of {t['layer']})", len(direction))
    else:
        rng = "an integer ≥ 0" if out is None else f"an integer in 0..{out - 1}"
        _expect(_is_int(channel) and channel >= 0 and (out is None or channel < out),
                "target.channel", rng, channel)
    pos = t.get("position")
    _expect(pos is None or (isinstance(pos, list) and len(pos) == 2
                            and all(_is_int(v) and 0 <= v < 1 << 20 for v in pos)),
            "target.position", "null or two integers ≥ 0", pos)
    objective = t.get("objective", "sum_abs")
    _expect(isinstance(objective, str) and len(objective) <= MAX_NAME, "target.objective",
            "a string", objective)


def _check_preservation(d: Any, where: str) -> None:
    if d is None:
        return
    _expect(isinstance(d, dict), where, "null or an object", d)
    for key in ("pearson", "nmad", "per_image_median"):
        _expect(d.get(key) is None or _is_number(d.get(key)), f"{where}.{key}",
                "a finite number or null", d.get(key))
    _expect(_is_int(d.get("n_images")) and d["n_images"] >= 0, f"{where}.n_images",
            "an integer ≥ 0", d.get("n_images"))
    per_image = d.get("per_image", [])
    _expect(isinstance(per_image, list) and all(v is None or _is_number(v) for v in per_image),
            f"{where}.per_image", "a list of finite numbers or nulls", per_image)


def _check_metadata(meta: Any) -> None:
    _expect(isinstance(meta, dict), "metadata", "an object", meta)
    shape = meta.get("input_shape")
    if shape is not None:
        _expect(isinstance(shape, list) and 1 <= len(shape) <= 4
                and all(_is_int(v) and 0 < v <= 1 << 16 for v in shape)
                and math.prod(shape) <= MAX_TRACE_ELEMENTS, "metadata.input_shape",
                f"1 to 4 positive integers whose product is at most {MAX_TRACE_ELEMENTS:,}", shape)
    for key in ("model", "model_fingerprint", "data_fingerprint", "granularity"):
        if key in meta:
            _name(meta[key], f"metadata.{key}")


def _check_header(header: Any, tensors: dict[str, torch.Tensor]) -> list[str]:
    """Validate a parsed header against its tensors; return the layer names."""
    _expect(isinstance(header, dict), "the header", "a JSON object", header)
    _expect(header.get("format") == FORMAT, "format", repr(FORMAT), header.get("format"))
    version = header.get("format_version", 0)
    _expect(_is_int(version) and version >= 1, "format_version", "an integer ≥ 1", version)
    layers = header.get("layers")
    _expect(isinstance(layers, list) and len(layers) <= MAX_LAYERS, "layers",
            "a list of layer names", layers)
    for k, name in enumerate(layers):
        _name(name, f"layers[{k}]")
    _expect(len(set(layers)) == len(layers), "layers", "a list without repeats", layers)
    expected = {f"{kind}/{n}" for n in layers for kind in ("mask", "relevant")}
    missing = sorted(expected - set(tensors))
    _expect(not missing, "the tensors", "present for every layer", missing[:3])
    allowed = expected | {f"score/{n}" for n in layers}
    extra = sorted(set(tensors) - allowed)
    _expect(not extra, "the tensors", "only mask/, relevant/ and score/ of listed layers",
            extra[:3])
    shapes: dict[str, tuple[int, ...]] = {}
    for n in layers:
        for kind in ("mask", "relevant"):
            t = tensors[f"{kind}/{n}"]
            _expect(t.dtype == torch.uint8 and t.dim() == 2, f"tensor {kind}/{n}",
                    "a 2-D uint8 tensor", f"{t.dtype} of shape {tuple(t.shape)}")
            _expect(bool(((t == 0) | (t == 1)).all()), f"tensor {kind}/{n}", "0s and 1s",
                    "other values")
        shapes[n] = tuple(tensors[f"mask/{n}"].shape)
        score = tensors.get(f"score/{n}")
        _expect(score is None or (score.is_floating_point() and tuple(score.shape) == shapes[n]),
                f"tensor score/{n}", f"floats of shape {shapes[n]}",
                None if score is None else f"{score.dtype} of shape {tuple(score.shape)}")
    _check_target(header.get("target"), shapes)
    _name(header.get("criterion"), "criterion")
    keep = header.get("keep")
    _expect(_is_number(keep) and 0 < keep <= 1, "keep", "a number in (0, 1]", keep)
    _expect(_is_int(header.get("selected")) and header["selected"] >= 0, "selected",
            "an integer ≥ 0", header.get("selected"))
    _expect(isinstance(header.get("collapsed"), bool), "collapsed", "true or false",
            header.get("collapsed"))
    digest = header.get("mask_sha256")
    _expect(isinstance(digest, str) and len(digest) == 64, "mask_sha256",
            "a 64-character SHA-256 hex digest", digest)
    header_digest = header.get("header_sha256")
    _expect(header_digest is None or (isinstance(header_digest, str) and len(header_digest) == 64),
            "header_sha256", "a 64-character SHA-256 hex digest", header_digest)
    _check_preservation(header.get("preservation"), "preservation")
    _check_preservation(header.get("preservation_scoring"), "preservation_scoring")
    _check_metadata(header.get("metadata", {}))
    return layers


def read_circuit_fields(path: str | Path) -> dict[str, Any]:
    """Read and check a circuit file written by :func:`save_circuit`.

    Args:
        path: the ``.safetensors`` circuit file.

    Returns:
        the :class:`~netcarve.circuits.circuit.Circuit` constructor's arguments (target,
        criterion, keep, masks, scores, ...), every one checked; ``Circuit(**fields)`` is the
        circuit that was saved (:func:`netcarve.circuits.circuit.load_circuit` does that).

    Raises:
        CircuitFileError: the file is missing, truncated, not a circuit file, or was edited
            (masks no longer match their checksum, shapes disagree, keys missing).

    Example:
        >>> fields = read_circuit_fields("out/circuit.safetensors")  # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_file():
        raise CircuitFileError(f"circuit file not found: {path}")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CircuitFileError(f"{path} is not a readable safetensors file ({exc}); "
                               "it may be truncated or corrupt") from exc
    raw = meta.get("netcarve_circuit")
    if raw is None:
        raise CircuitFileError(f"{path} is a safetensors file but not a netcarve circuit")
    try:
        header = loads_limited(raw, max_bytes=MAX_HEADER_BYTES)
        if isinstance(header, dict) and header.get("format") == FORMAT:
            version = header.get("format_version", 0)
            if _is_int(version) and version > FORMAT_VERSION:
                raise CircuitFileError(
                    f"{path} uses circuit format {version}; this netcarve reads up to "
                    f"{FORMAT_VERSION}: upgrade netcarve"
                )
        layers = _check_header(header, tensors)
        relevant = {n: tensors[f"relevant/{n}"].bool() for n in layers}
        masks = {n: tensors[f"mask/{n}"].bool() for n in layers}
        scores = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("score/")}
        target = _target_from_json(header["target"])
    except CircuitFileError:
        raise
    except _Bad as exc:
        raise CircuitFileError(f"{path}: malformed circuit header: {exc}") from None
    except (ValueError, TargetError) as exc:
        raise CircuitFileError(f"{path}: malformed circuit header ({exc})") from None
    for n in layers:
        if masks[n].shape != relevant[n].shape:
            raise CircuitFileError(f"{path}: mask and relevant shapes differ for layer {n}")
        if bool((masks[n] & ~relevant[n]).any()):
            raise CircuitFileError(f"{path}: layer {n} keeps kernels that are not relevant")
    if _mask_digest(masks) != header.get("mask_sha256"):
        raise CircuitFileError(f"{path}: the masks do not match their checksum "
                               "(the file was edited or damaged)")
    # Files written before the header checksum existed have none; every newer file has one.
    digest = header.get("header_sha256")
    if digest is not None and digest != _header_digest(header):
        raise CircuitFileError(f"{path}: the header does not match its checksum (a field such "
                               "as keep or the target was edited, or the file is damaged); "
                               "extract the circuit again")
    return dict(
        target=target,
        criterion=header["criterion"],
        keep=header["keep"],
        masks=masks,
        scores=scores,
        relevant=relevant,
        selected=header["selected"],
        collapsed=header["collapsed"],
        preservation=_preservation(header.get("preservation")),
        preservation_scoring=_preservation(header.get("preservation_scoring")),
        metadata=header.get("metadata", {}),
    )
