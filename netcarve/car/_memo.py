"""The engine's memory of logits already computed for a whole set of masks.

Greedy pruning asks the engine, step after step, for the unablated network given the
removals so far -- which is exactly the candidate it chose one step earlier -- and the first
greedy step of a layer repeats the CAR scores computed just before it. The logits of a chunk
depend only on the complete set of keep masks (every layer's, wherever the call puts them) and
on the chunk, so the engine keeps them under that key, bounded in bytes, oldest dropped first.
A key never mentions which layer a call ablates: "features.4 without filter 3, given nothing
fixed" and "nothing ablated, given features.4 without filter 3" are the same network.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

__all__: list[str] = []

MaskKey = tuple[tuple[str, bytes], ...]


def row_keys(layer: str, rows: torch.Tensor, fixed: dict[str, torch.Tensor]) -> list[MaskKey]:
    """The key of each candidate row ``rows[r]`` of ``layer`` with the other layers' ``fixed``
    masks (one key per row; rows that are equal get equal keys)."""
    others = [(name, bytes(k.cpu().numpy().tobytes()))
              for name, k in fixed.items() if name != layer and not bool(k.all())]
    out = []
    for row in rows.cpu():
        items = list(others)
        if not bool(row.all()):
            items.append((layer, bytes(row.numpy().tobytes())))
        out.append(tuple(sorted(items)))
    return out


class LogitsMemo:
    """Logits per ``(masks, chunk)``, at most ``max_bytes`` in all, least recently used out.

    With ``max_bytes`` 0 nothing is kept (every lookup misses).
    """

    def __init__(self, max_bytes: float) -> None:
        self.max_bytes = float(max_bytes)
        self._store: OrderedDict[tuple[MaskKey, int], torch.Tensor] = OrderedDict()
        self._bytes = 0

    def get(self, key: MaskKey, chunk: int) -> torch.Tensor | None:
        """The logits stored for these masks and chunk, or None."""
        value = self._store.get((key, chunk))
        if value is not None:
            self._store.move_to_end((key, chunk))
        return value

    def put(self, key: MaskKey, chunk: int, logits: torch.Tensor) -> None:
        """Keep a copy of ``logits`` (dropping the oldest entries to stay within the bound)."""
        size = logits.numel() * logits.element_size()
        if size > self.max_bytes or (key, chunk) in self._store:
            return
        while self._store and self._bytes + size > self.max_bytes:
            _, old = self._store.popitem(last=False)
            self._bytes -= old.numel() * old.element_size()
        self._store[(key, chunk)] = logits.detach().clone()
        self._bytes += size
