"""The engine's prefix: the network run once per image chunk up to the ablated layer.

The prefix pass keeps the ablated layer's raw output and every value from outside its
descendants that the suffix reads; chunks come from a tensor or a stream, and prefixes are
cached across calls (``cache_mb``) while the masks of the layers before the ablated one stay
the same.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.fx
from torch import nn

from netcarve.car._conv import run_conv
from netcarve.car._plan import (
    _arg_nodes,
    _Chunk,
    _keep_view,
    _Plan,
    _strided_max_pool,
    _Unsafe,
)
from netcarve.car.naive import (
    _chunks,
)
from netcarve.car.stats import (
    AblationError,
)

__all__: list[str] = []


class _PrefixMixin:
    """Prefix passes and the chunk source of :class:`netcarve.car.engine.AblationEngine`."""

    def _fetch_attr(self, target: str) -> Any:
        obj: Any = self.gm
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj

    def _run(self, node: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if node.op == "call_module":
            module = self.modules[str(node.target)]
            if isinstance(module, nn.Conv2d) and len(args) == 1 and not kwargs:
                return run_conv(module, args[0], self._routes.get(node), self.channels_last)
            if isinstance(module, nn.MaxPool2d) and len(args) == 1 and not kwargs:
                pooled = _strided_max_pool(module, args[0])
                if pooled is not None:
                    return pooled
            return module(*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)  # type: ignore[operator]
        if node.op == "call_method":
            obj, *rest = args
            return getattr(obj, str(node.target))(*rest, **kwargs)
        if node.op == "get_attr":
            return self._fetch_attr(str(node.target))
        if node.op == "output":
            return args[0]
        raise AblationError(f"unexpected fx node {node.op}")  # pragma: no cover

    def _mask(self, node: torch.fx.Node, out: Any, plan: _Plan, fixed: dict[str, torch.Tensor],
              rows_keep: torch.Tensor | None) -> Any:
        name = plan.mask_at.get(node)
        if name is None or not isinstance(out, torch.Tensor):
            return out
        last = self.graph.layers[name].channels_last
        if name == plan.layer and rows_keep is not None:
            return out.masked_fill(~_keep_view(rows_keep, out, last), 0)
        keep = fixed.get(name)
        if keep is None:
            return out
        return out.masked_fill(~_keep_view(keep.to(out.device), out, last), 0)

    def _prefix_pass(self, plan: _Plan, x: torch.Tensor, y: torch.Tensor,
                     fixed: dict[str, torch.Tensor]) -> _Chunk:
        """Run the prefix on one chunk; keep the cut value and snapshots for the suffix."""
        env: dict[torch.fx.Node, Any] = {}
        snaps: dict[tuple[torch.fx.Node, torch.fx.Node], Any] = {}
        prefix_set = set(plan.prefix)
        remaining: dict[torch.fx.Node, int] = {}
        for n in plan.nodes:
            if n in plan.suffix_set or n in prefix_set:
                for a in _arg_nodes(n):
                    remaining[a] = remaining.get(a, 0) + 1
        b = x.shape[0]
        nbytes = 0
        version_snap: dict[int, tuple[int, Any]] = {}
        for n in plan.nodes:
            if n in plan.suffix_set:
                for a in _arg_nodes(n):
                    if a in plan.suffix_set or a is plan.cut:
                        continue
                    value = env[a]
                    if a in plan.batched:
                        if not isinstance(value, torch.Tensor) or value.dim() == 0 or \
                                value.shape[0] != b:
                            raise _Unsafe
                        seen = version_snap.get(id(value))
                        if seen is not None and seen[0] == value._version:
                            snaps[(n, a)] = seen[1]
                        else:
                            copy = value.detach().clone()
                            version_snap[id(value)] = (value._version, copy)
                            snaps[(n, a)] = copy
                            nbytes += copy.numel() * copy.element_size()
                    else:
                        snaps[(n, a)] = value
                    remaining[a] -= 1
                    if remaining[a] == 0 and a is not plan.cut:
                        env.pop(a, None)
                continue
            if n not in prefix_set:
                continue
            if n.op == "placeholder":
                env[n] = x
            else:
                args, kwargs = torch.fx.node.map_arg((n.args, n.kwargs), lambda a: env[a])
                out = self._run(n, args, kwargs)
                if n is not plan.layer_node:
                    out = self._mask(n, out, plan, fixed, None)
                env[n] = out
                for a in _arg_nodes(n):
                    remaining[a] -= 1
                    if remaining[a] == 0 and a is not plan.cut:
                        env.pop(a, None)
        start = env[plan.cut]
        if not isinstance(start, torch.Tensor):
            raise AblationError(f"layer {plan.layer} does not output a tensor")
        start = start.detach()
        nbytes += start.numel() * start.element_size()
        return _Chunk(start, snaps, y, nbytes)

    def _check_chunks(self, chunks: Sequence[int]) -> list[int]:
        out = [int(i) for i in chunks]
        bad = [i for i in out if not 0 <= i < self.n_chunks]
        if bad:
            raise AblationError(f"chunk {bad[0]} does not exist: the engine has "
                                f"{self.n_chunks} chunks of {self.batch_size} images "
                                f"(0..{self.n_chunks - 1})")
        if len(set(out)) != len(out):
            raise AblationError("chunks must not repeat")
        return out

    def _chunk_source(self, plan: _Plan, fixed: dict[str, torch.Tensor],
                      select: Sequence[int] | None = None) -> Iterator[tuple[int, _Chunk]]:
        """``(number, prefix results)`` of the image chunks (all, or those numbered in
        ``select``, in that order), from the cache where they are already there."""
        key = tuple(sorted((name, tuple(fixed[name].tolist())) for name in plan.prefix_layers
                           if name in fixed))
        cached = self._cache.get(plan.layer)
        if cached is None or cached[0] != key:
            cached = (key, {})
            self._cache.pop(plan.layer, None)
            if self.cache_bytes > 0:
                self._cache[plan.layer] = cached
        store = cached[1]
        total = sum(c.nbytes for c in store.values())
        n_chunks = self.n_chunks
        for i in (range(n_chunks) if select is None else select):
            chunk = store.get(i)
            if chunk is None:
                lo = i * self.batch_size
                (xb, yb), = _chunks(self.images[lo:lo + self.batch_size],
                                    self.labels[lo:lo + self.batch_size], self.batch_size,
                                    self.preset, self.device, self.dtype)
                chunk = self._prefix_pass(plan, xb, yb, fixed)
                self.counts.prefix_passes += 1
                self.counts.prefix_images += len(xb)
                if self.cache_bytes > 0 and total + chunk.nbytes <= self.cache_bytes:
                    store[i] = chunk
                    total += chunk.nbytes
            yield i, chunk
