"""Safe reading, checking, loading and saving of model weights.

netcarve reads two kinds of weight files and never unpickles arbitrary Python objects:

* **safetensors** files (recognised by their content: an 8-byte little-endian header
  length followed by a JSON header starting with ``{``), and
* **PyTorch state dicts** written with ``torch.save(model.state_dict(), path)``, read with
  ``torch.load(..., weights_only=True)`` so that only tensors and plain containers are
  rebuilt. Checkpoints that wrap the state dict under ``"state_dict"`` or ``"model"`` are
  accepted, and a ``"module."`` prefix left by ``nn.DataParallel`` is removed.

:func:`load_weights` compares keys and shapes with the model *before* copying anything,
so a model is never left half-loaded. Every problem is reported as a
:class:`~netcarve.core.errors.WeightsError` whose message names the file and what is wrong.

Example:
    >>> import torch
    >>> from netcarve.core.weights import load_weights, save_weights
    >>> model = torch.nn.Linear(3, 2)
    >>> path = save_weights(model, "/tmp/linear.safetensors", metadata={"arch": "linear"})
    >>> load_weights(torch.nn.Linear(3, 2), path).weight.shape
    torch.Size([2, 3])
"""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
import sys
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from netcarve.core.errors import WeightsError

__all__ = [
    "is_safetensors",
    "load_weights",
    "read_metadata",
    "read_state_dict",
    "save_weights",
]

PathLike = str | os.PathLike

_HINT = "did you pick the right architecture? `netcarve models` lists them"
_CONVERT_HELP = (
    "netcarve only reads plain state dicts (tensors in dicts) and safetensors files. "
    "Convert the checkpoint in a trusted Python session, e.g. "
    "`torch.save(model.state_dict(), 'weights.pt')` or "
    "`safetensors.torch.save_file(model.state_dict(), 'weights.safetensors')`"
)
_MAX_LISTED = 10
_MAX_HEADER_BYTES = 100_000_000  # the limit the safetensors format itself imposes
_WRAPPER_KEYS = ("state_dict", "model")
_DP_PREFIX = "module."


# --------------------------------------------------------------------------- reading


def _check_file(path: Path) -> int:
    """Return the size of ``path`` or raise WeightsError if it is not a readable file."""
    if not path.exists():
        raise WeightsError(f"weight file not found: {path}")
    if not path.is_file():
        raise WeightsError(f"weight path is not a file: {path}")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise WeightsError(f"cannot read weight file {path}: {exc}") from exc
    if size == 0:
        raise WeightsError(f"weight file is empty (truncated?): {path}")
    return size


def _read_prefix(path: Path, n: int) -> bytes:
    try:
        with path.open("rb") as fh:
            return fh.read(n)
    except OSError as exc:
        raise WeightsError(f"cannot read weight file {path}: {exc}") from exc


def is_safetensors(path: PathLike) -> bool:
    """Tell whether a file looks like safetensors by its content (not its extension).

    Args:
        path: file to inspect.

    Returns:
        True if the file starts with an 8-byte little-endian header length followed by
        ``{`` (the JSON header); False otherwise, also for missing or unreadable files.

    Example:
        >>> is_safetensors("/nonexistent.safetensors")
        False
    """
    try:
        with Path(path).open("rb") as fh:
            head = fh.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{"


def _read_header(path: Path) -> dict[str, Any]:
    """Parse the JSON header of a safetensors file without reading any tensor data."""
    size = _check_file(path)
    head = _read_prefix(path, 8)
    if len(head) < 8:
        raise WeightsError(f"{path} is truncated: too short to be a safetensors file")
    (header_len,) = struct.unpack("<Q", head)
    if header_len > _MAX_HEADER_BYTES:
        raise WeightsError(f"{path} is not a safetensors file (header length {header_len})")
    if 8 + header_len > size:
        raise WeightsError(
            f"{path} is truncated or corrupt: its safetensors header claims {header_len} "
            f"bytes but the file holds {size} bytes"
        )
    try:
        with path.open("rb") as fh:
            fh.seek(8)
            raw = fh.read(header_len)
        header = json.loads(raw.decode("utf-8"))
    except OSError as exc:
        raise WeightsError(f"cannot read weight file {path}: {exc}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{path} is not a valid safetensors file (bad header: {exc})") from exc
    if not isinstance(header, dict):
        raise WeightsError(f"{path} is not a valid safetensors file (header is not an object)")
    return header


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    header = _read_header(path)  # gives clearer messages for truncated headers
    try:
        data_end = max(
            (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
            default=0,
        )
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise WeightsError(f"{path} is not a valid safetensors file (bad header)") from exc
    header_len = struct.unpack("<Q", _read_prefix(path, 8))[0]
    size = path.stat().st_size
    if 8 + header_len + data_end > size:
        raise WeightsError(
            f"{path} is truncated: its header describes {8 + header_len + data_end} bytes "
            f"but the file holds {size} bytes"
        )
    try:
        return dict(load_file(str(path), device="cpu"))
    except Exception as exc:  # safetensors raises its own SafetensorError and others
        raise WeightsError(f"{path} is not a valid safetensors file (corrupt?): {exc}") from exc


_GLOBAL_RE = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def _names_missing_attribute(qualified: str) -> bool:
    """True if ``qualified`` is ``module.attr`` for an already-imported module lacking attr.

    Only ``sys.modules`` is consulted: nothing named by an untrusted file is imported.
    """
    module_name, _, attr = qualified.rpartition(".")
    module = sys.modules.get(module_name)
    return module is not None and not hasattr(module, attr)


def _torch_load(path: Path) -> Any:
    not_st = (
        " (it is named .safetensors but is not a valid safetensors file)"
        if path.suffix.lower() == ".safetensors"
        else ""
    )
    try:
        # Pass an open file, not the path: recent torch versions treat a path ending in
        # ".safetensors" specially, and the content has already told us this is not one.
        with path.open("rb") as fh, warnings.catch_warnings():
            # torch warns about pickle protocols it did not write; the file is either read
            # safely or refused below with a message of our own, so the warning adds noise.
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(fh, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = f"{exc}\n{exc.__context__ or ''}"
        match = _GLOBAL_RE.search(text)
        if match is None and "Weights only load failed" not in text:
            raise WeightsError(f"{path} is corrupt or not a weight file{not_st}: {exc}") from exc
        if match and _names_missing_attribute(match.group(1)):
            # e.g. "torch._utils._rebuild_tens": a real module, a cut-off name.
            raise WeightsError(
                f"{path} is truncated or corrupt (its pickle stream names "
                f"`{match.group(1)}`, which does not exist)"
            ) from None
        what = f" (`{match.group(1)}`)" if match else ""
        raise WeightsError(
            f"refusing to load {path}: it holds a Python object that is not a tensor{what}, "
            "and unpickling such objects could run arbitrary code. "
            f"{_CONVERT_HELP}. If the file should hold only tensors, it may be truncated "
            "or corrupt."
        ) from None
    except Exception as exc:  # EOFError, RuntimeError (bad zip), KeyError, ...
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise WeightsError(
            f"{path} is truncated, corrupt or not a PyTorch/safetensors weight file{not_st} "
            f"({type(exc).__name__}: {first_line})"
        ) from exc


def _normalize(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """Unwrap checkpoint dicts, strip a DataParallel prefix and check all values are tensors."""
    if not isinstance(obj, Mapping):
        raise WeightsError(
            f"{source} does not hold a state dict (found {type(obj).__name__}). {_CONVERT_HELP}"
        )
    for key in _WRAPPER_KEYS:
        inner = obj.get(key)
        if isinstance(inner, Mapping):
            obj = inner
            break
    state: dict[str, torch.Tensor] = {}
    bad: list[str] = []
    for key, value in obj.items():
        if not isinstance(key, str):
            bad.append(repr(key))
        elif isinstance(value, torch.Tensor):
            state[key] = value
        else:
            bad.append(f"{key} ({type(value).__name__})")
    if bad:
        listed = ", ".join(bad[:_MAX_LISTED])
        if len(bad) > _MAX_LISTED:
            listed += f", … ({len(bad)} in all)"
        raise WeightsError(
            f"{source} is not a plain state dict: entries that are not tensors: {listed}. "
            f"{_CONVERT_HELP}"
        )
    if state and all(k.startswith(_DP_PREFIX) for k in state):
        state = {k[len(_DP_PREFIX) :]: v for k, v in state.items()}
    return state


def read_state_dict(path: PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from a safetensors or ``torch.save`` file, safely.

    The format is detected from the file's content. PyTorch files are read with
    ``weights_only=True``; checkpoints wrapping the weights under ``"state_dict"`` or
    ``"model"`` are unwrapped, and a ``"module."`` prefix shared by every key (left by
    ``nn.DataParallel``) is removed.

    Args:
        path: the weight file.

    Returns:
        ``{name: tensor}`` with every tensor on the CPU.

    Raises:
        WeightsError: if the file is missing, empty, truncated or corrupt, holds
            non-tensor Python objects (which are never unpickled), or is not a state dict.

    Example:
        >>> import torch
        >>> torch.save({"module.w": torch.ones(2)}, "/tmp/w.pt")
        >>> read_state_dict("/tmp/w.pt")
        {'w': tensor([1., 1.])}
    """
    path = Path(path)
    _check_file(path)
    state = _load_safetensors(path) if is_safetensors(path) else _torch_load(path)
    return _normalize(state, str(path))


# --------------------------------------------------------------------------- loading


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def _listing(title: str, items: list[str]) -> str:
    shown = items[:_MAX_LISTED]
    more = f"\n    - … and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
    body = "".join(f"\n    - {item}" for item in shown)
    return f"- {len(items)} {title}:{body}{more}"


def _prefix_hint(missing: list[str], unexpected: list[str]) -> str | None:
    """Suggest a prefix to add or drop when the two key sets differ only by one."""
    if not missing or not unexpected:
        return None
    missing_set, unexpected_set = set(missing), set(unexpected)
    firsts = {k.split(".", 1)[0] for k in unexpected if "." in k}
    if len(firsts) == 1 and all("." in k for k in unexpected):
        prefix = next(iter(firsts)) + "."
        if all(k[len(prefix) :] in missing_set for k in unexpected):
            return f"the file's keys carry an extra {prefix!r} prefix"
    firsts = {k.split(".", 1)[0] for k in missing if "." in k}
    if len(firsts) == 1 and all("." in k for k in missing):
        prefix = next(iter(firsts)) + "."
        if all(k[len(prefix) :] in unexpected_set for k in missing):
            return f"the model's keys carry a {prefix!r} prefix that the file's lack"
    return None


def load_weights(
    model: nn.Module,
    path_or_state_dict: PathLike | Mapping[str, torch.Tensor],
    *,
    strict: bool = True,
) -> nn.Module:
    """Check a state dict against ``model`` and, if it fits, copy it in.

    Keys and shapes are compared before anything is copied, so the model is left
    untouched when an error is raised. Values are cast to the dtype of the model's
    parameter or buffer they go into.

    Args:
        model: the module to fill.
        path_or_state_dict: a weight file (see :func:`read_state_dict`) or a mapping of
            names to tensors (normalised the same way: unwrapped, ``"module."`` stripped).
        strict: if True, missing and unexpected keys are errors; if False they are
            ignored (shape conflicts and integer/bool values for a floating-point
            parameter are always errors; other floating dtypes are cast).

    Returns:
        ``model`` itself, now holding the weights.

    Raises:
        WeightsError: if the file cannot be read safely, or keys/shapes do not match;
            the message lists missing keys, unexpected keys and shape conflicts.

    Example:
        >>> import torch
        >>> weights = {"weight": torch.ones(1, 2), "bias": torch.zeros(1)}
        >>> load_weights(torch.nn.Linear(2, 1), weights)
        Linear(in_features=2, out_features=1, bias=True)
    """
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        source, holder = str(path_or_state_dict), "file"
        state = read_state_dict(path_or_state_dict)
    elif isinstance(path_or_state_dict, Mapping):
        source, holder = "the state dict", "state dict"
        state = _normalize(path_or_state_dict, source)
    else:
        raise WeightsError(
            f"expected a weight file path or a state dict, got {type(path_or_state_dict).__name__}"
        )

    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    conflicts: list[str] = []
    wrong_kind: list[str] = []
    for key, target in expected.items():
        if key not in state or nn.parameter.is_lazy(target):
            continue
        if state[key].shape != target.shape:
            conflicts.append(
                f"{key}: model expects {_shape(target)}, {holder} has {_shape(state[key])}"
            )
        elif target.is_floating_point() and not state[key].is_floating_point():
            # float16/bfloat16/float64 weights are cast like torch does; integers or bools in
            # a float parameter are never weights that were trained for it.
            wrong_kind.append(
                f"{key}: model expects floating point ({str(target.dtype)[6:]}), "
                f"{holder} has {str(state[key].dtype)[6:]}"
            )

    if conflicts or wrong_kind or (strict and (missing or unexpected)):
        lines = [f"weights from {source} do not fit {type(model).__name__}:"]
        if strict and missing:
            lines.append(_listing("missing key(s) (in the model, not in the weights)", missing))
        if strict and unexpected:
            lines.append(
                _listing("unexpected key(s) (in the weights, not in the model)", unexpected)
            )
        if conflicts:
            lines.append(_listing("shape conflict(s)", conflicts))
        if wrong_kind:
            lines.append(_listing("dtype conflict(s)", wrong_kind))
        hint = _prefix_hint(missing, unexpected) if strict else None
        if hint:
            lines.append(f"note: {hint}")
        lines.append(f"hint: {_HINT}")
        raise WeightsError("\n".join(lines))

    to_copy: dict[str, torch.Tensor] = {}
    for key, target in expected.items():
        if key in state:
            to_copy[key] = state[key].to(dtype=target.dtype)
    try:
        model.load_state_dict(to_copy, strict=False)
    except RuntimeError as exc:  # pragma: no cover - pre-checks should make this unreachable
        raise WeightsError(f"could not load weights from {source}: {exc}") from exc
    return model


# --------------------------------------------------------------------------- saving


def save_weights(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    path: PathLike,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write weights as a safetensors file, with optional string metadata.

    Every tensor is copied into its own contiguous CPU buffer first, so tied or otherwise
    shared tensors are stored once per key. The file is written to a temporary name in
    the same folder and then moved into place, so a crash never leaves half a file.

    Args:
        model_or_state_dict: a module (its ``state_dict()`` is saved) or a mapping of
            names to tensors.
        path: destination file (parent folders are created).
        metadata: ``{str: str}`` stored in the safetensors header (see
            :func:`read_metadata`).

    Returns:
        the path written, as a :class:`~pathlib.Path`.

    Raises:
        WeightsError: if a value is not a tensor, metadata is not ``{str: str}``, or the
            file cannot be written.

    Example:
        >>> import torch
        >>> save_weights({"w": torch.ones(2)}, "/tmp/w.safetensors", {"note": "ones"})
        PosixPath('/tmp/w.safetensors')
    """
    from safetensors.torch import save_file

    if isinstance(model_or_state_dict, nn.Module):
        state: Mapping[str, Any] = model_or_state_dict.state_dict()
    elif isinstance(model_or_state_dict, Mapping):
        state = model_or_state_dict
    else:
        raise WeightsError(
            f"expected a module or a state dict, got {type(model_or_state_dict).__name__}"
        )
    if metadata is not None:
        bad_meta = [
            repr(k) for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)
        ]
        if bad_meta:
            raise WeightsError(
                f"safetensors metadata must map str to str; bad entries: {', '.join(bad_meta)}"
            )
    tensors: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise WeightsError(
                f"cannot save entry {key!r} ({type(value).__name__}): only tensors can be saved"
            )
        tensors[key] = value.detach().to("cpu").clone(memory_format=torch.contiguous_format)

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp_name, metadata=dict(metadata) if metadata else None)
            os.replace(tmp_name, path)
        finally:
            if os.path.exists(tmp_name):
                os.unlink(tmp_name)
    except OSError as exc:
        raise WeightsError(f"cannot write weight file {path}: {exc}") from exc
    return path


def read_metadata(path: PathLike) -> dict[str, str]:
    """Read the string metadata of a safetensors file without loading any tensor.

    Args:
        path: a safetensors file.

    Returns:
        the ``__metadata__`` entry of the header (empty if there is none).

    Raises:
        WeightsError: if the file is missing, truncated or not a safetensors file.

    Example:
        >>> import torch
        >>> p = save_weights({"w": torch.ones(1)}, "/tmp/m.safetensors", {"arch": "tiny"})
        >>> read_metadata(p)
        {'arch': 'tiny'}
    """
    path = Path(path)
    _check_file(path)
    if not is_safetensors(path):
        raise WeightsError(f"{path} is not a safetensors file, so it has no metadata header")
    meta = _read_header(path).get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise WeightsError(f"{path} has a malformed safetensors metadata entry")
    return {str(k): str(v) for k, v in meta.items()}
