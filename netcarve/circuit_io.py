"""Circuit files: masks and scores in safetensors, provenance as JSON in the same header.

One file holds everything: tensors ``mask/<layer>``, ``relevant/<layer>`` (uint8) and
``score/<layer>`` (float32), keyed by original layer names; the safetensors metadata entry
``netcarve_circuit`` holds the JSON description (target, criterion, keep, preservation,
fingerprints, seed, version) and a SHA-256 of the masks so that an edited file is caught.
Loading never unpickles anything.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import NetcarveError
from .preservation import Preservation
from .targets import Target, TargetError

FORMAT = "netcarve-circuit"
FORMAT_VERSION = 1


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
        circuit: a :class:`~netcarve.circuit.Circuit`.
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
    save_file(tensors, str(path), metadata={"netcarve_circuit": json.dumps(header)})
    return path


def _preservation(d: dict[str, Any] | None) -> Preservation | None:
    if d is None:
        return None
    nan = float("nan")
    return Preservation(
        pearson=nan if d["pearson"] is None else d["pearson"],
        nmad=nan if d["nmad"] is None else d["nmad"],
        per_image_median=nan if d["per_image_median"] is None else d["per_image_median"],
        n_images=d["n_images"],
        per_image=[nan if v is None else v for v in d.get("per_image", [])],
    )


def load_circuit(path: str | Path):
    """Read a circuit file written by :func:`save_circuit`.

    Args:
        path: the ``.safetensors`` circuit file.

    Returns:
        A :class:`~netcarve.circuit.Circuit` equal to the one saved.

    Raises:
        CircuitFileError: the file is missing, truncated, not a circuit file, or was edited
            (masks no longer match their checksum, shapes disagree, keys missing).

    Example:
        >>> c = load_circuit("out/circuit.safetensors")  # doctest: +SKIP
    """
    from .circuit import Circuit

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
        header = json.loads(raw)
        if header.get("format") != FORMAT:
            raise ValueError("wrong format tag")
        if header.get("format_version", 0) > FORMAT_VERSION:
            raise CircuitFileError(
                f"{path} uses circuit format {header['format_version']}; this netcarve reads "
                f"up to {FORMAT_VERSION}: upgrade netcarve"
            )
        layers = header["layers"]
        relevant = {n: tensors[f"relevant/{n}"].bool() for n in layers}
        masks = {n: tensors[f"mask/{n}"].bool() for n in layers}
        scores = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("score/")}
        target = _target_from_json(header["target"])
    except CircuitFileError:
        raise
    except (KeyError, ValueError, TypeError, TargetError, json.JSONDecodeError) as exc:
        raise CircuitFileError(f"{path}: malformed circuit header or missing tensor ({exc})") \
            from exc
    for n in layers:
        if masks[n].shape != relevant[n].shape:
            raise CircuitFileError(f"{path}: mask and relevant shapes differ for layer {n}")
        if bool((masks[n] & ~relevant[n]).any()):
            raise CircuitFileError(f"{path}: layer {n} keeps kernels that are not relevant")
    if _mask_digest(masks) != header.get("mask_sha256"):
        raise CircuitFileError(f"{path}: the masks do not match their checksum "
                               "(the file was edited or damaged)")
    return Circuit(
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
