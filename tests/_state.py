"""One check for "the user's model comes back exactly as it was", shared by every test.

``snapshot(model)`` records every parameter and buffer (values, dtype, device, identity of the
tensor object and its storage, the ``.grad`` object), each module's training flag, each
parameter's ``requires_grad`` and the number
of entries in every hook dictionary ``nn.Module`` keeps; ``assert_unchanged(model, snap)``
compares a model against it. Weights are compared bit for bit on purpose: restoring a model
is a copy, not a computation, so any difference at all is a bug.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

_HOOK_DICTS = (
    "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
    "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
)


def snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything about ``model`` that netcarve promises to leave alone."""
    tensors = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        grad = t.grad if isinstance(t, nn.Parameter) else None
        tensors[name] = (t.detach().clone(), t.dtype, t.device, id(t),
                         bool(getattr(t, "requires_grad", False)), t.data_ptr(),
                         None if grad is None else id(grad))
    modules = {}
    for name, m in model.named_modules():
        hooks = tuple(len(getattr(m, d, {}) or {}) for d in _HOOK_DICTS)
        modules[name] = (type(m), m.training, hooks)
    return {"tensors": tensors, "modules": modules}


def assert_unchanged(model: nn.Module, snap: dict[str, Any]) -> None:
    """Fail with the first difference between ``model`` and ``snapshot`` ``snap``."""
    now = snapshot(model)
    assert now["modules"].keys() == snap["modules"].keys(), "modules were added or removed"
    for name, (kind, training, hooks) in snap["modules"].items():
        k2, t2, h2 = now["modules"][name]
        assert k2 is kind, f"module {name!r} was replaced ({kind.__name__} -> {k2.__name__})"
        assert t2 == training, f"module {name!r}: training flag {training} -> {t2}"
        left = dict(zip(_HOOK_DICTS, h2, strict=True))
        assert h2 == hooks, f"module {name!r}: hooks left behind {left}"
    assert now["tensors"].keys() == snap["tensors"].keys(), "parameters/buffers added or removed"
    for name, (value, dtype, device, ident, grad, ptr, gid) in snap["tensors"].items():
        v2, d2, dev2, id2, g2, ptr2, gid2 = now["tensors"][name]
        assert d2 == dtype and dev2 == device, f"{name}: {dtype}@{device} -> {d2}@{dev2}"
        assert id2 == ident, f"{name}: the tensor object was replaced"
        assert g2 == grad, f"{name}: requires_grad {grad} -> {g2}"
        assert ptr2 == ptr, f"{name}: the tensor's storage was replaced"
        assert gid2 == gid, f"{name}: .grad was {'set' if gid is None else 'replaced or cleared'}"
        assert torch.equal(v2, value), f"{name}: values changed"
