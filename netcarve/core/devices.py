"""Device names: ``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``, checked before any work starts.

``torch.device("cuda")`` is accepted on a machine without CUDA and fails much later, deep inside
the first ``.to()`` with an ``AssertionError``; resolving the name up front turns that into one
clear message.
"""

from __future__ import annotations

import torch

from netcarve.core.errors import NetcarveError

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"


class DeviceError(NetcarveError):
    """A device name is unknown or names hardware this machine does not have."""

    exit_code = 2


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """The device a name means on this machine.

    Args:
        spec: ``"auto"`` (the first CUDA GPU when there is one, else the CPU), ``"cpu"``,
            ``"cuda"``, ``"cuda:N"``, ``"mps"``, or a :class:`torch.device`.

    Returns:
        The :class:`torch.device`.

    Raises:
        DeviceError: an unknown name, or CUDA / MPS / a GPU index this machine lacks.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if isinstance(spec, torch.device):
        text = str(spec)
    elif isinstance(spec, str):
        text = spec.strip().lower()
    else:
        raise DeviceError(f"device must be a string ({DEVICE_CHOICES}), got {type(spec).__name__}")
    if text == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise DeviceError(f"unknown device {spec!r}: use {DEVICE_CHOICES}") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {spec!r} asked for, but this machine has no CUDA GPU "
                              "(or this torch build has no CUDA): use --device cpu or auto")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise DeviceError(f"device {spec!r} asked for, but this machine has {count} CUDA "
                              f"GPU(s): cuda:0..cuda:{count - 1}")
        return device
    if device.type == "mps":
        if not _mps_available():
            raise DeviceError(f"device {spec!r} asked for, but MPS is not available here: "
                              "use --device cpu or auto")
        return device
    raise DeviceError(f"device {spec!r} is not supported: use {DEVICE_CHOICES}")
