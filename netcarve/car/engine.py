"""The ablation engine: evaluate many filter removals of one layer, exactly and fast.

Removing filters of a layer ``l`` changes nothing that is computed before ``l``. The engine
uses that: for every chunk of images it runs the network once up to ``l`` (the *prefix*),
keeps the raw output of ``l`` and every value from outside ``l``'s descendants that a later
operation reads (for example the shortcut of a residual block), and then, for a batch of ``R``
candidate removals, stacks ``R`` copies of the cached output along the batch dimension, each
with its own channel mask, and runs only the rest of the network (the *suffix*) on the
``R × B`` items.

**Removal semantics** (the project's convention, as :func:`netcarve.core.hooks.apply_filter_masks`):
a removed filter outputs exactly 0 after its BatchNorm -- its bias and BatchNorm shift are
removed too. Later operations run normally (a ReLU keeps the channel at 0).

**Agreement with the naive loop.** The engine's statistics equal a naive loop's
(:func:`ablate_naive`: one full forward pass per removal and chunk, masks applied with hooks)
in real arithmetic: the prefix is the same computation, the suffix applies the same operations
in the same order, and the statistics are reduced by the same code. In floating point they
agree within :data:`TOLERANCES` (see :func:`compare_stats`), not bit for bit: CPU (oneDNN) and
CUDA (cuDNN) kernels pick algorithms by batch shape, and the engine stacks removals along the
batch dimension, so no backend promises batch-invariant bits. Top-1/top-5 decisions agree
except at *near-ties* (an image whose two deciding logits differ by less than
``NEAR_TIE_RTOL`` of its largest logit), which every evaluation counts. Two optional shortcuts
are exact in real arithmetic:

* *skipping unchanged items*: just before the first layer after ``l``, an item whose every
  live value is bitwise equal to the unablated network's is dropped from the batch -- its
  logits are the unablated logits (a filter that is silent after its ReLU on an image changes
  nothing for that image);
* *caching the prefix* across calls (``cache_mb``) while the masks of the layers in it stay
  the same, so greedy pruning runs the prefix once;
* *remembering logits* (``memo_mb``, :mod:`netcarve.car._memo`): a network -- a whole set of
  keep masks -- already evaluated on a chunk is not run again, and equal rows of one call run
  once. Greedy pruning's next unablated network is the candidate it just chose, and its first
  step repeats the CAR scores.

Both caches assume the model's weights stay as they were when the engine was built; build a
new engine after changing them.

Besides, a conv followed (through pointwise modules) by a floor-mode pooling computes only the
rows and columns that pooling reads, and on CPU convs run in channels-last layout
(:mod:`netcarve.car._conv`); both change the values only by float rounding.

Models whose code mutates, in place, a tensor computed outside ``l``'s descendants that is read
again later, or that read a batch size computed before ``l`` after it, are run in a safe mode
that stacks the input images instead (still one stacked pass per batch of removals).

Every forward pass is counted (:class:`ForwardCounts`), with the number of full passes a naive
loop would have needed.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 9, 3))
    >>> x, y = torch.randn(20, 1, 5, 5), torch.randint(0, 3, (20,))
    >>> engine = AblationEngine(net.eval(), x, y, batch_size=10)
    >>> stats = engine.evaluate("0", single_removals(4))
    >>> stats.accuracy().shape, stats.counts.naive_passes
    (torch.Size([4]), 10)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx
from torch import nn

from netcarve.car._conv import conv_routes
from netcarve.car._memo import LogitsMemo, MaskKey, row_keys
from netcarve.car._plan import (
    _arg_nodes,
    _Chunk,
    _is_inplace,
    _Plan,
    _reachable,
    _Unsafe,
)
from netcarve.car._prefix import _PrefixMixin
from netcarve.car._shortcut import _ShortcutMixin
from netcarve.car._suffix import _SuffixMixin
from netcarve.car.naive import (
    _check_candidates,
    _check_fixed,
    _example,
    _model_device_dtype,
    _num_classes,
    _prepare,
    single_removals,
)
from netcarve.car.stats import (
    AblationError,
    AblationStats,
    ForwardCounts,
    Metric,
    _Accumulator,
    _stats,
    resolve_metric,
)
from netcarve.core.graph import ModelGraph
from netcarve.core.hooks import preserved_state
from netcarve.core.layers import GraphError
from netcarve.data.preset import Preset

__all__ = ["AblationEngine", "ablate"]


class AblationEngine(_PrefixMixin, _SuffixMixin, _ShortcutMixin):
    """Evaluates many removals of one layer's filters per forward pass (see module docs).

    Args:
        model: a classifier returning ``[N, classes]`` logits. It is used in eval mode and
            comes back exactly as it was (weights, flags); no hooks are installed on it.
        images: evaluation images: float, already normalised (used as is), or ``uint8``
            (normalised with ``preset``). Kept where they are and streamed in chunks.
        labels: int64 ``[N]`` true classes.
        graph: the model's :class:`~netcarve.core.graph.ModelGraph` (built from the first image
            when omitted).
        preset: the model's input preset (needed for uint8 images).
        batch_size: images per chunk; every forward pass (prefix or naive) sees this many.
        max_items: items (removal × image) per stacked suffix pass; a block of candidates
            holds ``max(1, max_items // batch_size)`` removals. On CPU, passes of about 100
            items ran fastest per item (64: 14% slower, 256: 11%, 512: 23% on fmnist_vgg
            features.7); the memory of a pass grows with it.
        cache_mb: keep the prefix results of all chunks between calls when they fit in this
            many MiB (0 disables).
        memo_mb: keep the logits of the mask sets already evaluated, up to this many MiB
            (0 disables): a later call that asks for the same network on the same chunk
            (greedy pruning's next unablated network is its last chosen candidate; its first
            step repeats the CAR scores) reuses them instead of running it again.
        skip_unchanged: drop items that are bitwise unchanged before the next layer.
        linear_shortcut: compute the next layer's output (a ``Conv2d`` with ``groups=1`` or a
            ``Linear`` reading only the ablated layer's values) as the unablated output minus
            the removed channels' contributions, instead of running the layer per item. Exact
            in real arithmetic; in floating point within :data:`TOLERANCES`. Needs
            ``skip_unchanged``.
        channels_last: run float32 convs on CPU in channels-last layout (see
            :mod:`netcarve.car._conv`); None (default) means on CPU, off on CUDA.
        metric: extra metric to sum (a custom callable); top-1, top-5 and loss are always
            computed.

    Raises:
        DataError: empty data, mismatched images and labels.
        GraphError: the model cannot be traced.

    Example:
        >>> engine = AblationEngine(model, x, y, batch_size=100)  # doctest: +SKIP
        >>> stats = engine.evaluate("features.7", single_removals(64))  # doctest: +SKIP
        >>> car = stats.drop("top1")  # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        graph: ModelGraph | None = None,
        preset: Preset | None = None,
        batch_size: int = 100,
        max_items: int = 100,
        cache_mb: float = 512.0,
        memo_mb: float = 64.0,
        skip_unchanged: bool = True,
        linear_shortcut: bool = True,
        channels_last: bool | None = None,
        metric: str | Metric | Callable[..., Any] | None = None,
    ) -> None:
        if batch_size < 1:
            raise AblationError("batch_size must be at least 1")
        self.model = model
        self.images, self.labels = _prepare(images, labels, preset)
        self.preset = preset
        self.device, self.dtype = _model_device_dtype(model)
        self.graph = graph if graph is not None else ModelGraph.build(
            model, _example(self.images, preset, self.device, self.dtype))
        if self.graph.traced is None:
            raise GraphError("the model graph has no traced module")
        self.gm: torch.fx.GraphModule = self.graph.traced
        self.modules = dict(self.gm.named_modules())
        self.batch_size = int(batch_size)
        self.max_items = int(max_items)
        if self.max_items < 1:
            raise AblationError("max_items must be at least 1")
        self.cache_bytes = cache_mb * 2**20
        self._memo = LogitsMemo(memo_mb * 2**20)
        self.skip_unchanged = skip_unchanged
        self.linear_shortcut = linear_shortcut
        self.channels_last = self.device.type == "cpu" if channels_last is None \
            else bool(channels_last)
        self._routes = conv_routes(self.gm, self.modules)
        m = resolve_metric(metric)
        self.custom = m if m.fn is not None else None
        self.num_classes = _num_classes(
            model, _example(self.images, preset, self.device, self.dtype), self.labels)
        self.counts = ForwardCounts()
        self._plans: dict[str, _Plan] = {}
        self._cache: dict[str, tuple[Any, dict[int, _Chunk]]] = {}

    # ------------------------------------------------------------------ planning

    def plan(self, layer: str) -> _Plan:
        """The split of the network around ``layer`` (computed once per layer)."""
        if layer not in self._plans:
            self.graph.layer(layer)
            self._plans[layer] = self._make_plan(layer, "cut")
        return self._plans[layer]

    def _make_plan(self, layer: str, mode: str) -> _Plan:
        nodes = list(self.gm.graph.nodes)
        order = {n: i for i, n in enumerate(nodes)}
        placeholders = [n for n in nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise AblationError("the engine supports models with exactly one input tensor")
        layer_node = self.graph.layer_node(layer)
        cut = layer_node if mode == "cut" else placeholders[0]
        suffix_set = _reachable(cut)
        if mode == "cut" and self._has_hazard(suffix_set, order):
            return self._make_plan(layer, "input")
        suffix = [n for n in nodes if n in suffix_set]
        batched = _reachable(placeholders[0]) | {placeholders[0]}
        # prefix: cut plus the non-suffix nodes that suffix nodes (transitively) read
        needed: set[torch.fx.Node] = set()
        todo = [cut, *(a for n in suffix for a in _arg_nodes(n) if a not in suffix_set)]
        while todo:
            while todo:
                cur = todo.pop()
                if cur in needed:
                    continue
                needed.add(cur)
                todo.extend(a for a in _arg_nodes(cur) if a not in needed)
            # in-place ops on needed tensors run too, even when their result is unused
            todo = [n for n in nodes if n not in needed and n not in suffix_set
                    and n.args and isinstance(n.args[0], torch.fx.Node)
                    and n.args[0] in needed and _is_inplace(n, self.modules)]
        prefix = [n for n in nodes if n in needed]
        mask_at: dict[torch.fx.Node, str] = {}
        bn_names = {bn: name for name, bns in self.graph.bn_after.items() for bn in bns}
        for n in nodes:
            if n.op != "call_module":
                continue
            t = str(n.target)
            if t in self.graph.layers:
                mask_at[n] = t
            elif t in bn_names:
                mask_at[n] = bn_names[t]
        last_use: dict[torch.fx.Node, int] = {}
        for i, n in enumerate(suffix):
            for a in _arg_nodes(n):
                last_use[a] = i
        compact_at = None
        below = _reachable(layer_node)
        for i, n in enumerate(suffix):
            if n in below and n.op == "call_module" and str(n.target) in self.graph.layers:
                compact_at = i
                break
        prefix_layers = {mask_at[n] for n in prefix if n in mask_at and n is not layer_node}
        if mode == "input":
            prefix_layers = set()
        return _Plan(layer, mode, nodes, cut, layer_node, suffix, suffix_set, prefix, batched,
                     compact_at, last_use, mask_at, prefix_layers)

    def _has_hazard(self, suffix_set: set[torch.fx.Node], order: dict[torch.fx.Node, int]) -> bool:
        """A suffix op mutates, in place, a prefix tensor that is read again afterwards."""
        for n in suffix_set:
            if not _is_inplace(n, self.modules):
                continue
            args = _arg_nodes(n)
            if not args:
                continue
            target = n.args[0] if n.args and isinstance(n.args[0], torch.fx.Node) else None
            if target is None or target in suffix_set:
                continue
            if any(order[u] > order[n] for u in target.users if u is not n):
                return True
        return False

    # ------------------------------------------------------------------ execution

    # ------------------------------------------------------------------ public

    def evaluate(
        self,
        layer: str,
        candidates: torch.Tensor,
        fixed: dict[str, torch.Tensor] | None = None,
        *,
        chunks: Sequence[int] | None = None,
        per_image: bool = False,
    ) -> AblationStats:
        """Statistics of the classifier under each candidate keep mask of ``layer``.

        Args:
            layer: the layer whose filters are removed.
            candidates: bool ``[R, out_channels]``, True = kept; row ``r`` is one candidate
                (e.g. :func:`single_removals`). A filter removed in ``fixed[layer]`` stays
                removed in every row.
            fixed: ``{layer: bool [out_channels]}`` removals that hold for every candidate and
                for the unablated ``base_*`` statistics (e.g. filters already pruned).
            chunks: evaluate only these image chunks (numbers in ``range(n_chunks)``, in this
                order; chunk ``i`` is images ``i * batch_size ...``) instead of all images.
            per_image: also return per-image hits and losses (``image_*`` fields).

        Returns:
            :class:`AblationStats` (``counts`` holds this call's forward passes).

        Raises:
            AblationError: malformed candidate or fixed masks.
            GraphError: unknown layer.

        Example:
            >>> stats = engine.evaluate("features.7", single_removals(64))  # doctest: +SKIP
        """
        info = self.graph.layer(layer)
        cands = _check_candidates(candidates, info.out_channels, layer)
        fixed_masks = _check_fixed(self.graph, fixed)
        own = fixed_masks.pop(layer, torch.ones(info.out_channels, dtype=torch.bool))
        select = None if chunks is None else self._check_chunks(chunks)
        n_sel = len(self.labels) if select is None else sum(
            min(self.batch_size, len(self.labels) - i * self.batch_size) for i in select)
        before = ForwardCounts(**self.counts.to_dict())
        start_time = time.perf_counter()

        def accumulators() -> tuple[_Accumulator, _Accumulator]:
            return (_Accumulator(len(cands), self.num_classes, self.custom, self.device,
                                 n_sel if per_image else 0),
                    _Accumulator(1, self.num_classes, self.custom, self.device))

        acc, base_acc = accumulators()
        with preserved_state(self.model), torch.no_grad():
            self.model.eval()
            try:
                self._evaluate(layer, cands, own, fixed_masks, acc, base_acc, select)
            except _Unsafe:
                self._plans[layer] = self._make_plan(layer, "input")
                self._cache.pop(layer, None)
                acc, base_acc = accumulators()
                self._evaluate(layer, cands, own, fixed_masks, acc, base_acc, select)
        counts = ForwardCounts(**self.counts.to_dict())
        for key, value in before.to_dict().items():
            setattr(counts, key, getattr(counts, key) - value)
        counts.seconds = time.perf_counter() - start_time
        self.counts.seconds += counts.seconds
        return _stats(acc, base_acc, counts)

    @property
    def n_chunks(self) -> int:
        """Number of image chunks (``ceil(images / batch_size)``); chunk ``i`` holds images
        ``i * batch_size`` up to ``(i + 1) * batch_size``."""
        return -(-len(self.labels) // self.batch_size)

    def _evaluate(self, layer: str, cands: torch.Tensor, own: torch.Tensor,
                  fixed: dict[str, torch.Tensor], acc: _Accumulator,
                  base_acc: _Accumulator, select: Sequence[int] | None = None) -> None:
        plan = self.plan(layer)
        rows_all = own[None] & cands
        base_key, *keys = row_keys(layer, torch.cat([own[None], rows_all]), fixed)
        for ci, chunk in self._chunk_source(plan, fixed, select):
            acc.count_labels(chunk.labels)
            base_acc.count_labels(chunk.labels)
            self.counts.naive_passes += len(cands) + 1
            base_logits = self._memo.get(base_key, ci)
            # rows already known (an earlier call, or an equal row of this one) are not run
            todo: dict[MaskKey, int] = {}
            known: dict[MaskKey, torch.Tensor] = {}
            for r, key in enumerate(keys):
                if key == base_key or key in todo or key in known:
                    continue
                hit = self._memo.get(key, ci)
                if hit is None:
                    todo[key] = r
                else:
                    known[key] = hit
            base_live = None
            if base_logits is None:
                base_logits, base_live = self._base_run(plan, chunk, own, fixed)
                assert isinstance(base_logits, torch.Tensor)
                self._memo.put(base_key, ci, base_logits)
            else:
                self.counts.reused_items += chunk.start.shape[0]
                if todo and plan.compact_at is not None:  # the live values only
                    _, base_live = self._base_run(plan, chunk, own, fixed, full=False)
            base_acc.add([0], base_logits, chunk.labels)
            if not len(cands):
                continue
            run = list(todo.values())
            got = self._run_rows(plan, chunk, rows_all[run], own, fixed, base_live,
                                 base_logits) if run else None
            b = chunk.start.shape[0]
            computed = {key: got[i * b:(i + 1) * b] for i, key in enumerate(todo)} \
                if got is not None else {}
            for key, value in computed.items():
                self._memo.put(key, ci, value)
            self.counts.reused_items += (len(keys) - len(run)) * b
            if got is not None and len(run) == len(keys):  # every row run, in order
                acc.add(list(range(len(cands))), got, chunk.labels)
                continue
            known.update(computed)
            known[base_key] = base_logits
            acc.add(list(range(len(cands))), torch.cat([known[key] for key in keys]),
                    chunk.labels)

    def _run_rows(self, plan: _Plan, chunk: _Chunk, rows: torch.Tensor, own: torch.Tensor,
                  fixed: dict[str, torch.Tensor],
                  base_live: dict[torch.fx.Node, torch.Tensor] | None,
                  base_logits: torch.Tensor) -> torch.Tensor:
        """Logits ``[R * B, K]`` (row-major) of keep rows ``rows`` (own mask applied)."""
        b = chunk.start.shape[0]
        n_c = own.shape[0]
        zero_live = None
        if self.skip_unchanged and plan.mode == "cut" and plan.substitute is not False \
                and base_live is not None:
            _, zero_live = self._base_run(plan, chunk, torch.zeros_like(own), fixed,
                                          full=False)
        if self.skip_unchanged and self._can_substitute(plan, base_live, zero_live, n_c):
            assert base_live is not None and zero_live is not None
            if plan.substitute is None:
                probe = rows[: max(1, self.max_items // b)]
                plan.substitute = self._verify_substitution(plan, chunk, probe, fixed,
                                                            base_live, zero_live)
            if plan.substitute:
                removed = (own[None] & ~rows).float()
                return self._run_substituted(plan, chunk, rows, removed, fixed, base_live,
                                             zero_live, base_logits)
        r_max = max(1, self.max_items // b)
        compare = (base_live, base_logits) if self.skip_unchanged and base_live else None
        return torch.cat([self._run_block(plan, chunk, rows[lo:lo + r_max], fixed, compare)
                          for lo in range(0, len(rows), r_max)])

    def evaluate_removals(self, layer: str, filters: Sequence[int] | None = None,
                          fixed: dict[str, torch.Tensor] | None = None) -> AblationStats:
        """Shorthand: remove each of ``filters`` (default: every filter still kept) alone.

        Example:
            >>> stats = engine.evaluate_removals("features.7")  # doctest: +SKIP
        """
        info = self.graph.layer(layer)
        own = (fixed or {}).get(layer)
        own_t = torch.ones(info.out_channels, dtype=torch.bool) if own is None else \
            torch.as_tensor(own).cpu().bool()
        chosen = [c for c in range(info.out_channels) if own_t[c]] if filters is None \
            else list(filters)
        return self.evaluate(layer, single_removals(info.out_channels, chosen, own_t), fixed)


def ablate(
    model: nn.Module,
    layer: str,
    candidates: torch.Tensor,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    graph: ModelGraph | None = None,
    fixed: dict[str, torch.Tensor] | None = None,
    batch_size: int = 100,
    preset: Preset | None = None,
    metric: str | Metric | Callable[..., Any] | None = None,
    skip_unchanged: bool = True,
) -> AblationStats:
    """One-shot :class:`AblationEngine` evaluation of candidate keep masks of ``layer``.

    Args:
        model: the classifier (comes back unchanged).
        layer: the layer whose filters are removed.
        candidates: bool ``[R, out_channels]`` keep masks (True = kept).
        images: float (normalised) or uint8 images ``[N, C, H, W]``.
        labels: int64 ``[N]``.
        graph: the model's graph (built when omitted).
        fixed: removals that hold for every candidate.
        batch_size: images per chunk.
        preset: needed for uint8 images.
        metric: an extra custom metric to sum.
        skip_unchanged: drop bitwise-unchanged items before the next layer.

    Returns:
        :class:`AblationStats`.

    Raises:
        DataError: empty data. AblationError: bad masks. GraphError: unknown layer.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(27, 2))
        >>> x, y = torch.randn(8, 1, 5, 5), torch.randint(0, 2, (8,))
        >>> ablate(net.eval(), "0", single_removals(3), x, y).correct.shape
        torch.Size([3])
    """
    engine = AblationEngine(model, images, labels, graph=graph, preset=preset,
                            batch_size=batch_size, skip_unchanged=skip_unchanged, metric=metric,
                            cache_mb=0)
    return engine.evaluate(layer, candidates, fixed)
