"""Running the suffix: the rest of the network after the ablated layer, on stacked items.

Part of :class:`netcarve.car.engine.AblationEngine`: the start of the suffix (``R`` masked
copies of the cached output of the layer, stacked along the batch), the walk through its nodes,
the unablated run of a chunk and a block of candidates run to the logits, dropping the items
that are bitwise unchanged just before the next layer.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx

from netcarve.car._plan import _arg_nodes, _bits, _Chunk, _keep_view, _Plan
from netcarve.car.stats import AblationError

__all__: list[str] = []


class _SuffixMixin:
    """The suffix runs of :class:`netcarve.car.engine.AblationEngine`."""

    @staticmethod
    def _suffix_args(plan: _Plan, node: torch.fx.Node, env: dict[torch.fx.Node, Any],
                     chunk: _Chunk, item: torch.Tensor) -> Any:
        """Arguments of a suffix node: suffix values, or prefix snapshots gathered per item."""

        def lookup(a: torch.fx.Node) -> Any:
            if a in env:
                return env[a]
            value = chunk.snaps[(node, a)]
            if a in plan.batched and isinstance(value, torch.Tensor):
                return value.index_select(0, item)
            return value

        return torch.fx.node.map_arg((node.args, node.kwargs), lookup)

    def _walk(self, plan: _Plan, chunk: _Chunk, env: dict[torch.fx.Node, Any],
              item: torch.Tensor, rows_keep: torch.Tensor, fixed: dict[str, torch.Tensor],
              lo: int, hi: int) -> Any:
        """Execute suffix nodes ``lo .. hi-1``; returns the model output once it is reached."""
        for i in range(lo, hi):
            n = plan.suffix[i]
            args, kwargs = self._suffix_args(plan, n, env, chunk, item)
            out = self._run(n, args, kwargs)
            if n.op == "output":
                return out
            env[n] = self._mask(n, out, plan, fixed, rows_keep)
            for a in _arg_nodes(n):
                if plan.last_use.get(a) == i:
                    env.pop(a, None)
        return None

    def _start(self, plan: _Plan, chunk: _Chunk, keeps: torch.Tensor,
               ) -> tuple[dict[torch.fx.Node, Any], torch.Tensor, torch.Tensor]:
        """Stacked start of the suffix for keep masks ``[R, C]``: env, item index, row masks."""
        b, r = chunk.start.shape[0], keeps.shape[0]
        device = chunk.start.device
        item = torch.arange(b, device=device).repeat(r)
        rows_keep = keeps.to(device).repeat_interleave(b, dim=0)
        start = chunk.start.repeat(r, *([1] * (chunk.start.dim() - 1)))
        if plan.mode == "cut":
            last = self.graph.layers[plan.layer].channels_last
            start = start.masked_fill(~_keep_view(rows_keep, start, last), 0)
        return {plan.cut: start}, item, rows_keep

    @staticmethod
    def _live(plan: _Plan, env: dict[torch.fx.Node, Any], n_items: int,
              ) -> dict[torch.fx.Node, torch.Tensor] | None:
        """The values still needed at the compaction point, or None when they cannot be
        compared item by item (a non-tensor, or two views of one storage)."""
        assert plan.compact_at is not None
        live = {a: v for a, v in env.items() if plan.last_use.get(a, -1) >= plan.compact_at}
        if not live or not all(isinstance(v, torch.Tensor) and v.dim() > 1 and
                               v.shape[0] == n_items for v in live.values()):
            return None
        ptrs = {v.untyped_storage().data_ptr() for v in live.values()}
        if len(ptrs) != len({id(v) for v in live.values()}):
            return None
        return live

    @staticmethod
    def _clone_live(live: dict[torch.fx.Node, torch.Tensor]) -> dict[torch.fx.Node, torch.Tensor]:
        copies: dict[int, torch.Tensor] = {}
        out = {}
        for a, v in live.items():
            if id(v) not in copies:
                copies[id(v)] = v.detach().clone()
            out[a] = copies[id(v)]
        return out

    def _count(self, items: int) -> None:
        self.counts.suffix_passes += 1
        self.counts.suffix_items += items

    def _base_run(self, plan: _Plan, chunk: _Chunk, keep: torch.Tensor,
                  fixed: dict[str, torch.Tensor], full: bool = True,
                  ) -> tuple[torch.Tensor | None, dict[torch.fx.Node, torch.Tensor] | None]:
        """One keep mask on the chunk: logits (if ``full``) and the live values at the
        compaction point (cloned)."""
        env, item, rows_keep = self._start(plan, chunk, keep[None])
        b = chunk.start.shape[0]
        self._count(b)
        if plan.compact_at is None:
            return self._walk(plan, chunk, env, item, rows_keep, fixed, 0, len(plan.suffix)), None
        self._walk(plan, chunk, env, item, rows_keep, fixed, 0, plan.compact_at)
        found = self._live(plan, env, b)
        live = None if found is None else self._clone_live(found)
        if not full:
            return None, live
        logits = self._walk(plan, chunk, env, item, rows_keep, fixed, plan.compact_at,
                            len(plan.suffix))
        return logits, live

    def _run_block(self, plan: _Plan, chunk: _Chunk, keeps: torch.Tensor,
                   fixed: dict[str, torch.Tensor],
                   compare: tuple[dict[torch.fx.Node, torch.Tensor], torch.Tensor] | None,
                   ) -> torch.Tensor:
        """A block of candidates through the whole suffix, dropping unchanged items at the
        compaction point when ``compare`` (unablated live values and logits) is given."""
        b, r = chunk.start.shape[0], keeps.shape[0]
        env, item, rows_keep = self._start(plan, chunk, keeps)
        n_items = r * b
        lo = 0
        rows = None
        if compare is not None and plan.compact_at is not None:
            self._walk(plan, chunk, env, item, rows_keep, fixed, 0, plan.compact_at)
            lo = plan.compact_at
            live = self._live(plan, env, n_items)
            if live is not None and set(live) == set(compare[0]):
                changed = torch.zeros(r, b, dtype=torch.bool, device=chunk.start.device)
                for a, v in live.items():
                    cur = _bits(v).reshape(r, b, -1)
                    changed |= (cur != _bits(compare[0][a]).reshape(1, b, -1)).any(-1)
                rows = changed.reshape(-1).nonzero().reshape(-1)
                self.counts.skipped_items += n_items - rows.numel()
                if rows.numel() == 0:
                    self._count(n_items)
                    return compare[1].repeat(r, 1)
                new: dict[int, torch.Tensor] = {}
                for a, v in live.items():
                    if id(v) not in new:
                        new[id(v)] = v.index_select(0, rows)
                    env[a] = new[id(v)]
                item = item.index_select(0, rows)
                rows_keep = rows_keep.index_select(0, rows)
        self._count(len(item))
        out = self._walk(plan, chunk, env, item, rows_keep, fixed, lo, len(plan.suffix))
        if not isinstance(out, torch.Tensor):
            raise AblationError("the model must return a tensor of logits")
        if rows is None or compare is None:
            return out
        full = compare[1].repeat(r, 1)
        full[rows] = out.to(full.dtype)
        return full

