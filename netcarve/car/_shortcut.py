"""The engine's channel substitution and linear shortcut.

For a removal of layer ``l``'s channels, the first layers after ``l`` read the cached unablated
output with the removed channels overwritten by their removal value. When such a layer is
linear in that input (a conv or Linear after channel-wise ops), its output for removal ``c`` is
the unablated output minus channel ``c``'s contribution: one small grouped conv for all
removals instead of the whole layer. Both are exact in real arithmetic;
``_verify_substitution`` checks them on the first chunk and turns them off when the check
fails.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
from torch import nn

from netcarve.car._conv import trimmed_weight_conv
from netcarve.car._plan import (
    _SHORTCUT_CHANNELS_PER_ITEM,
    _bits,
    _Chunk,
    _close,
    _Plan,
)

__all__: list[str] = []


class _ShortcutMixin:
    """Channel substitution and the linear shortcut of
    :class:`netcarve.car.engine.AblationEngine`."""

    def _substituted(self, plan: _Plan, base: dict[torch.fx.Node, torch.Tensor],
                     zero: dict[torch.fx.Node, torch.Tensor], keep_rows: torch.Tensor,
                     item: torch.Tensor) -> dict[torch.fx.Node, torch.Tensor]:
        """Live values for items whose removed channels take their all-removed values."""
        made: dict[int, torch.Tensor] = {}
        env: dict[torch.fx.Node, torch.Tensor] = {}
        c = keep_rows.shape[1]
        for a, bv in base.items():
            if id(bv) not in made:
                s = bv.shape[1] // c
                kv = keep_rows.repeat_interleave(s, dim=1) if s > 1 else keep_rows
                # copy the unablated values, then overwrite only the removed channels (a
                # handful per item) with their all-removed values
                out = bv.index_select(0, item)
                rows, chans = (~kv.to(bv.device)).nonzero(as_tuple=True)
                out[rows, chans] = zero[a][item.index_select(0, rows), chans]
                made[id(bv)] = out
            env[a] = made[id(bv)]
        return env

    def _can_substitute(self, plan: _Plan, base: dict[torch.fx.Node, torch.Tensor] | None,
                        zero: dict[torch.fx.Node, torch.Tensor] | None, c: int) -> bool:
        if plan.substitute is False or base is None or zero is None or set(base) != set(zero):
            return False
        if self.graph.layers[plan.layer].channels_last:
            return False  # its channels are the last dim: the generic way
        # channel c of the layer must sit at position c of every live value -- or, once
        # flattened to [N, C * s], in the block c * s .. (c + 1) * s - 1; anything else (e.g.
        # a concatenation with another branch) goes the generic way. The substitution is also
        # checked bitwise against the real computation once per layer.
        return all(v.shape == zero[a].shape and (v.shape[1] == c or (
            v.dim() == 2 and v.shape[1] % c == 0)) for a, v in base.items())

    def _verify_substitution(self, plan: _Plan, chunk: _Chunk, keeps: torch.Tensor,
                             fixed: dict[str, torch.Tensor],
                             base: dict[torch.fx.Node, torch.Tensor],
                             zero: dict[torch.fx.Node, torch.Tensor]) -> bool:
        """Compare substituted live values with the real ones for some candidates, bitwise."""
        env, item, rows_keep = self._start(plan, chunk, keeps)
        self._count(len(item))
        assert plan.compact_at is not None
        self._walk(plan, chunk, env, item, rows_keep, fixed, 0, plan.compact_at)
        real = self._live(plan, env, len(item))
        if real is None or set(real) != set(base):
            return False
        made = self._substituted(plan, base, zero, rows_keep, item)
        return all(torch.equal(_bits(real[a]), _bits(made[a])) for a in real)

    def _run_substituted(self, plan: _Plan, chunk: _Chunk, rows_all: torch.Tensor,
                         removed: torch.Tensor, fixed: dict[str, torch.Tensor],
                         base_live: dict[torch.fx.Node, torch.Tensor],
                         zero_live: dict[torch.fx.Node, torch.Tensor],
                         base_logits: torch.Tensor) -> torch.Tensor:
        """All candidates of a chunk: only (candidate, image) pairs whose live values change
        are run, from the compaction point on, in passes of at most ``max_items``."""
        assert plan.compact_at is not None
        b = chunk.start.shape[0]
        c = rows_all.shape[1]
        diff = torch.zeros(b, c, dtype=torch.bool, device=chunk.start.device)
        for a, bv in base_live.items():
            diff |= (_bits(bv).reshape(b, c, -1) != _bits(zero_live[a]).reshape(b, c, -1)).any(-1)
        changed = (removed.to(diff.device) @ diff.T.float()) > 0  # [R, B]
        idx = changed.reshape(-1).nonzero().reshape(-1)
        total = rows_all.shape[0] * b
        self.counts.skipped_items += total - idx.numel()
        logits = base_logits.repeat(rows_all.shape[0], 1)
        rows_dev = rows_all.to(chunk.start.device)
        removed_dev = removed.to(chunk.start.device) > 0
        short = self._shortcut_for(plan, base_live) if self.linear_shortcut else None
        base_raw = None
        if short is not None:
            node, a = short
            base_raw = self._run(node, (base_live[a],), {})
        for lo in range(0, idx.numel(), self.max_items):
            sel = idx[lo:lo + self.max_items]
            item = sel % b
            keep_rows = rows_dev.index_select(0, sel // b)
            start = plan.compact_at
            env: dict[torch.fx.Node, Any]
            if short is not None and base_raw is not None:
                node, a = short
                active = removed_dev.index_select(0, sel // b) & diff.index_select(0, item)
                # one small per-channel product per removed channel: cheaper than the layer
                # itself only while few channels per item are removed (single removals, greedy
                # steps); masks removing many channels at once (curves) run the layer instead
                few = int(active.sum()) <= _SHORTCUT_CHANNELS_PER_ITEM * len(sel)
                fast = self._shortcut_output(node, base_raw, base_live[a], zero_live[a], item,
                                             active) if few else None
                if fast is None:
                    pass
                elif plan.shortcut is None:
                    env = dict(self._substituted(plan, base_live, zero_live, keep_rows, item))
                    real = self._run(node, (env[a],), {})
                    plan.shortcut = _close(fast, real)
                    if not plan.shortcut:
                        short = None
                if fast is not None and plan.shortcut:
                    env = {node: self._mask(node, fast, plan, fixed, keep_rows)}
                    start = plan.compact_at + 1
                    self.counts.shortcut_items += len(sel)
            if start == plan.compact_at:
                env = dict(self._substituted(plan, base_live, zero_live, keep_rows, item))
            self._count(len(sel))
            out = self._walk(plan, chunk, env, item, keep_rows, fixed, start, len(plan.suffix))
            logits[sel] = out.to(logits.dtype)
        return logits

    def _shortcut_for(self, plan: _Plan, base_live: dict[torch.fx.Node, torch.Tensor],
                      ) -> tuple[torch.fx.Node, torch.fx.Node] | None:
        """``(next layer node, its input node)`` when the next layer's output can be computed
        by subtracting contributions: one live value, read only by a plain ``Conv2d``
        (``groups=1``, zero padding) or ``Linear`` at the compaction point."""
        if plan.shortcut is False or plan.compact_at is None or len(base_live) != 1:
            return None
        node = plan.suffix[plan.compact_at]
        (a,) = base_live
        if node.op != "call_module" or node.kwargs or len(node.args) != 1 or node.args[0] is not a:
            return None
        if plan.last_use.get(a) != plan.compact_at:
            return None
        module = self.modules[str(node.target)]
        if isinstance(module, nn.Conv2d):
            ok = module.groups == 1 and module.padding_mode == "zeros" and \
                not isinstance(module.padding, str) and base_live[a].dim() == 4
        else:
            ok = isinstance(module, nn.Linear) and base_live[a].dim() == 2
        if not ok:
            plan.shortcut = False
            return None
        return node, a

    def _shortcut_output(self, node: torch.fx.Node, base_raw: torch.Tensor,
                         base_in: torch.Tensor, zero_in: torch.Tensor, item: torch.Tensor,
                         active: torch.Tensor) -> torch.Tensor:
        """The next layer's raw output for each item: the unablated output of its image plus,
        for every removed channel that changed on it, the layer applied (without bias) to that
        channel's change alone. ``active``: bool ``[items, C]``."""
        module = self.modules[str(node.target)]
        # a channels-last base (the engine's CPU layout) is gathered and summed as [N, H, W, C]:
        # gathering it into NCHW, or adding NCHW parts to it, costs a slow strided copy
        nhwc = isinstance(module, nn.Conv2d) and base_raw.dim() == 4 and \
            not base_raw.is_contiguous() and \
            base_raw.is_contiguous(memory_format=torch.channels_last)
        out = (base_raw.permute(0, 2, 3, 1) if nhwc else base_raw).index_select(0, item)
        pairs, chans = active.nonzero(as_tuple=True)
        if not pairs.numel():
            return out.permute(0, 3, 1, 2) if nhwc else out
        c_all = active.shape[1]
        for c in torch.unique(chans).tolist():
            rows = pairs[chans == c]
            img = item.index_select(0, rows)
            if isinstance(module, nn.Conv2d):
                delta = (zero_in[:, c].index_select(0, img) -
                         base_in[:, c].index_select(0, img)).unsqueeze(1)
                contrib = trimmed_weight_conv(module, delta, module.weight[:, c:c + 1],
                                              self._routes.get(node), nhwc)
            else:
                s = base_in.shape[1] // c_all
                block = slice(c * s, (c + 1) * s)
                delta = zero_in[:, block].index_select(0, img) - \
                    base_in[:, block].index_select(0, img)
                contrib = delta @ module.weight[:, block].T
            out.index_add_(0, rows, contrib.to(out.dtype))
        return out.permute(0, 3, 1, 2) if nhwc else out
