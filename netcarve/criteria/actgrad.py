"""The ``actgrad`` criterion: activation × gradient, per kernel or per filter.

Kernel ``(o, i)``: the mean over images and output positions of ``|a_oi(p) · g_o(p)|``, where
``a_oi = x_i ⋆ w_oi`` is the kernel's contribution map (``z_o = Σ_i a_oi + b_o``) and
``g_o = ∂L/∂z_o``. For a Linear fed by a flattened ``C×H×W`` map, ``a_oi = Σ_hw W[o, i·HW + hw]
x[i·HW + hw]`` is one number per image; after a plain vector ``a_oi = W[o, i] x_i``. Filter
``o``: the mean over images and positions of ``|z_o(p) · g_o(p)|`` (``z_o`` the raw output,
bias included).

How it is computed (the expensive part is the kernel score, which needs every kernel's map):

* One forward pass to the target and one backward pass that produces only the gradients w.r.t.
  the scored layers' outputs (no weight gradients). Each layer is scored inside the backward
  pass as soon as its ``g`` exists, then its tensors are released: memory stays close to a
  plain forward + backward.
* Per layer, only the rows (output channels) with a path to the target are computed; the
  others are exactly zero. Input channels whose kernels are all zero (masked) are skipped.
* ``k×k`` convs: per input channel ``i``, the maps of all kernels ``(·, i)`` are one small
  matrix product ``W_i [R, taps] @ X_i [taps, positions]`` on ``X_i``, the channel's shifted
  windows (built by ``taps`` strided copies of the padded input). The product is made in
  cache-sized blocks of positions, then ``|·|``, times ``|g|`` and summed in place, so no
  ``batch × in·out × positions`` tensor ever exists. On CPU float32 the product is one oneDNN
  call per channel (``torch.ops.mkldnn._linear_pointwise``, about twice as fast as MKL for
  such thin products) when available; otherwise (float64, CUDA, no oneDNN) one ``torch.bmm``
  per block of channels.
* On CPU with ``k = torch.get_num_threads() > 1``, each layer's work is split into ``k`` parts
  run by ``k`` Python threads with single-threaded ops (intra-op threads are set to 1 while
  they run and restored afterwards): the many small products then need no per-op
  synchronisation.
* When a layer has only a few relevant rows (the target layer), each row's maps for all input
  channels are one depthwise convolution instead.
* ``1×1`` convs and Linear layers after a vector: ``|a·g| = |w| |x| |g|``, so the score is
  ``|w| ⊙ (|X|ᵀ |G|)``: one matrix product. Convs with one input channel per group
  (depthwise): ``a_o0`` is the bias-free output itself.

Precision: per-block sums are in the model's dtype, accumulated in float64 across blocks and
batches.
"""

from __future__ import annotations

import itertools
import math
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from netcarve.criteria._forward import (
    check_layers,
    layer_grad_batches,
    relevant_masks,
    relevant_rows,
    to_result,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from netcarve.core.layers import LayerInfo
    from netcarve.criteria import ScoringContext

__all__ = ["BLOCK_ELEMENTS", "DEPTHWISE_MAX_ROWS", "ActGrad", "kernel_abs_sums"]

#: Elements of the per-step product block ``[rows, positions]`` (about a core's L2 cache).
BLOCK_ELEMENTS = 1 << 19
#: Elements of the shifted-window buffer built per step.
WINDOW_ELEMENTS = 1 << 20
#: Layers with at most this many relevant rows use one depthwise convolution per row.
DEPTHWISE_MAX_ROWS = 4
#: Python threads that share a layer's scoring on CPU; None = ``torch.get_num_threads()``.
#: 1 scores in the calling thread with single-threaded ops (the steadiest choice on a machine
#: whose cores are busy with other work).
THREADS: int | None = None

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_MKLDNN: list[Any] = []  # [op or None], probed once


def _mkldnn_linear() -> Any:
    """``torch.ops.mkldnn._linear_pointwise`` if usable (checked once), else None."""
    if not _MKLDNN:
        op = None
        try:
            if torch.backends.mkldnn.is_available():
                cand = torch.ops.mkldnn._linear_pointwise
                a = torch.arange(15, dtype=torch.float32).reshape(5, 3).sin()
                b = torch.arange(12, dtype=torch.float32).reshape(4, 3).cos()
                if torch.allclose(cand(a, b, None, "none", [], ""), a @ b.T, atol=1e-5):
                    op = cand
        except Exception:  # any failure: fall back to torch.mm
            op = None
        _MKLDNN.append(op)
    return _MKLDNN[0] if torch.backends.mkldnn.enabled else None


def _matmul_fn(t: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """``f(W [R, K], XT [K, M]) -> W @ XT [R, M]`` through oneDNN, or None.

    oneDNN's small-``K`` products are about twice as fast as MKL's ``torch.mm`` on CPU float32;
    elsewhere (float64, CUDA) the caller batches channels through ``torch.bmm`` instead.
    """
    op = _mkldnn_linear() if t.device.type == "cpu" and t.dtype == torch.float32 else None
    if op is None:
        return None
    no_scalars: list[Any] = []
    return lambda w, xt: op(w, xt.t(), None, "none", no_scalars, "")


def _pad_spec(module: nn.Module, dims: int) -> list[tuple[int, int]]:
    """``(before, after)`` padding per spatial dim, as the conv applies it."""
    padding = module.padding
    kernel, dilation = module.kernel_size, module.dilation
    if isinstance(padding, str):
        if padding == "valid":
            return [(0, 0)] * dims
        spec = []
        for k, d in zip(kernel, dilation, strict=True):
            total = d * (k - 1)
            spec.append((total // 2, total - total // 2))
        return spec
    return [(int(p), int(p)) for p in padding]


def _padded(module: nn.Module, x: torch.Tensor, spec: list[tuple[int, int]]) -> torch.Tensor:
    """``x`` padded as the conv pads it (zeros, reflect, replicate or circular)."""
    flat: list[int] = []
    for before, after in reversed(spec):
        flat += [before, after]
    if not any(flat):
        return x
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return F.pad(x, flat, mode=mode)


def _as_slice(index: torch.Tensor) -> slice | torch.Tensor:
    """A slice when ``index`` (sorted int64) is a contiguous range, else the index itself."""
    if index.numel() and int(index[-1]) - int(index[0]) + 1 == index.numel():
        return slice(int(index[0]), int(index[-1]) + 1)
    return index


def _take(t: torch.Tensor, dim: int, index: slice | torch.Tensor) -> torch.Tensor:
    if isinstance(index, slice):
        return t[(slice(None),) * dim + (index,)]
    return t.index_select(dim, index.to(t.device))


def _sum_but(t: torch.Tensor, keep: int) -> torch.Tensor:
    """Sum over every dim except ``keep``."""
    return t.sum(dim=[d for d in range(t.dim()) if d != keep])


# --------------------------------------------------------------------------- linear layers


def _linear_sums(
    weight: torch.Tensor, x: torch.Tensor, g: torch.Tensor, rows: torch.Tensor, spatial: int
) -> torch.Tensor:
    """``Σ_n |a_oi(n) g_o(n)|`` for a Linear layer: ``[R, in_channels]``."""
    n = x.shape[0]
    rsel = _as_slice(rows)
    w = _take(weight, 0, rsel)
    r = w.shape[0]
    cin = w.shape[1] // spatial
    gabs = _take(g, 1, rsel).abs()
    if spatial == 1:
        return w.abs() * (x.abs().t() @ gabs).t()
    xv = x.reshape(n, cin, spatial)
    wv = w.reshape(r, cin, spatial)
    block = max(1, BLOCK_ELEMENTS // max(1, n * r))

    def part(starts: list[int]) -> torch.Tensor:
        out = torch.zeros(cin, r, dtype=torch.float64, device=x.device)
        for c0 in starts:
            c1 = min(cin, c0 + block)
            y = torch.bmm(xv[:, c0:c1].transpose(0, 1), wv[:, c0:c1].permute(1, 2, 0))
            out[c0:c1] = y.abs_().mul_(gabs).sum(dim=1)
        return out

    return _parallel(part, list(range(0, cin, block)), x.device).t()


# --------------------------------------------------------------------------- convolutions


class _Conv:
    """Geometry of one conv call: padding, strides, taps, and strided tap views."""

    def __init__(self, module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> None:
        weight = module.weight
        self.module = module
        self.dims = weight.dim() - 2
        self.kernel = tuple(weight.shape[2:])
        self.taps = math.prod(self.kernel)
        self.stride = tuple(module.stride)
        self.dilation = tuple(module.dilation)
        self.groups = module.groups
        self.out = tuple(g.shape[2:])
        self.pad = _pad_spec(module, self.dims)
        self.offsets = list(itertools.product(*(range(k) for k in self.kernel)))

    def window(self, xpad: torch.Tensor, tap: tuple[int, ...], h0: int, h1: int) -> torch.Tensor:
        """``xpad[..., positions read by tap]`` for output rows ``h0:h1`` (first spatial dim)."""
        index: list[slice] = [slice(None), slice(None)]
        for d, k in enumerate(tap):
            lo, hi = (h0, h1) if d == 0 else (0, self.out[d])
            start = k * self.dilation[d] + lo * self.stride[d]
            stop = start + (hi - lo - 1) * self.stride[d] + 1
            index.append(slice(start, stop, self.stride[d]))
        return xpad[tuple(index)]

    def depthwise(self, xpad: torch.Tensor, w: torch.Tensor, groups: int) -> torch.Tensor:
        """Bias-free conv of the already padded input."""
        return _CONV[self.dims](xpad, w, None, self.stride, 0, self.dilation, groups)


def _conv_single_input(geo: _Conv, x: torch.Tensor, g: torch.Tensor,
                       weight: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """One input channel per group: ``a_o0`` is the bias-free output. Returns ``[R, 1]``."""
    rsel = _as_slice(rows)
    per_image = max(1, math.prod(geo.out) * weight.shape[0])
    step = max(1, BLOCK_ELEMENTS // per_image)

    def part(starts: list[int]) -> torch.Tensor:
        total = torch.zeros(rows.numel(), dtype=torch.float64, device=x.device)
        for n0 in starts:
            xpad = _padded(geo.module, x[n0:n0 + step], geo.pad)
            a = _take(geo.depthwise(xpad, weight, geo.groups), 1, rsel)
            total += _sum_but(a.mul_(_take(g[n0:n0 + step], 1, rsel)).abs_(), 1)
        return total

    return _parallel(part, list(range(0, x.shape[0], step)), x.device)[:, None]


def _conv_pointwise(geo: _Conv, x: torch.Tensor, g: torch.Tensor, w: torch.Tensor,
                    rsel: slice | torch.Tensor) -> torch.Tensor:
    """1×1-tap kernels of one group: ``|w| ⊙ Σ |x_i| |g_o|``. Returns ``[R, cpg]``."""
    cpg, r = x.shape[1], w.shape[0]
    positions = math.prod(geo.out)
    step = max(1, BLOCK_ELEMENTS // max(1, positions * max(cpg, r)))
    zero_tap = tuple(0 for _ in range(geo.dims))

    def part(starts: list[int]) -> torch.Tensor:
        acc = torch.zeros(cpg, r, dtype=torch.float64, device=x.device)
        for n0 in starts:
            xpad = _padded(geo.module, x[n0:n0 + step], geo.pad)
            xs = geo.window(xpad, zero_tap, 0, geo.out[0]).abs().reshape(-1, cpg, positions)
            gs = _take(g[n0:n0 + step], 1, rsel).abs().reshape(-1, r, positions)
            acc += torch.bmm(xs, gs.transpose(1, 2)).sum(dim=0)
        return acc

    acc = _parallel(part, list(range(0, x.shape[0], step)), x.device)
    return w.reshape(r, cpg).abs() * acc.t()


def _conv_rows_depthwise(geo: _Conv, x: torch.Tensor, g: torch.Tensor, w: torch.Tensor,
                         rows: torch.Tensor) -> torch.Tensor:
    """Few rows: one depthwise conv per row gives ``a_oi`` for all ``i``. Returns ``[R, cpg]``."""
    cpg = x.shape[1]
    positions = math.prod(geo.out)
    step = max(1, BLOCK_ELEMENTS // max(1, positions * cpg))

    def part(starts: list[int]) -> torch.Tensor:
        out = torch.zeros(w.shape[0], cpg, dtype=torch.float64, device=x.device)
        for n0 in starts:
            xpad = _padded(geo.module, x[n0:n0 + step], geo.pad)
            for j in range(w.shape[0]):
                a = geo.depthwise(xpad, w[j].unsqueeze(1), cpg)
                gj = g[n0:n0 + step, int(rows[j])].unsqueeze(1)
                out[j] += _sum_but(a.mul_(gj).abs_(), 1)
        return out

    return _parallel(part, list(range(0, x.shape[0], step)), x.device)


def _parallel(fn: Callable[[list[int]], torch.Tensor], items: list[int],
              device: torch.device) -> torch.Tensor:
    """``Σ fn(part)`` over contiguous parts of ``items``, run by Python threads on CPU.

    Torch ops release the GIL, so with ``torch.get_num_threads() = k > 1`` the parts run on
    ``k`` threads, each op single-threaded (intra-op threads are set to 1 for the duration and
    restored). Coarse parts avoid the per-op synchronisation of intra-op parallelism, which
    dominates for the many small products of this computation (and stalls badly on a busy
    machine).
    """
    threads = torch.get_num_threads()
    if device.type != "cpu":
        return fn(items)
    workers = min(THREADS or threads, len(items))
    if workers <= 1:
        if threads == 1:
            return fn(items)
        torch.set_num_threads(1)
        try:
            return fn(items)
        finally:
            torch.set_num_threads(threads)
    # a few more parts than threads: a thread that loses its core to another process leaves
    # the remaining parts to the others
    size = math.ceil(len(items) / min(len(items), 3 * workers))
    parts = [items[i:i + size] for i in range(0, len(items), size)]
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(fn, parts))
    finally:
        torch.set_num_threads(threads)
    total = results[0]
    for extra in results[1:]:
        total = total + extra
    return total


def _conv_gemm(geo: _Conv, x: torch.Tensor, g: torch.Tensor, w: torch.Tensor,
               rsel: slice | torch.Tensor) -> torch.Tensor:
    """General kernels of one group, per input channel, by blocks. Returns ``[R, cpg]``."""
    n, cpg = x.shape[0], x.shape[1]
    r, taps = w.shape[0], geo.taps
    wk = w.reshape(r, cpg, taps)
    active = torch.nonzero(wk.ne(0).any(dim=2).any(dim=0).cpu()).flatten().tolist()
    if not active:
        return torch.zeros(r, cpg, dtype=torch.float64, device=x.device)
    wc = wk.permute(1, 0, 2).contiguous()  # [cpg, R, taps]
    matmul = _matmul_fn(x)
    inner = math.prod(geo.out[1:])
    per_image = geo.out[0] * inner
    want = max(1, BLOCK_ELEMENTS // r)  # positions per block
    if per_image <= want:
        images, rows_per = max(1, want // per_image), geo.out[0]
    else:
        images, rows_per = 1, max(1, want // inner)

    wrows = list(wc.unbind(0))
    units = [(n0, h0) for n0 in range(0, n, images) for h0 in range(0, geo.out[0], rows_per)]

    def part(todo: list[int]) -> torch.Tensor:
        out = torch.zeros(cpg, r, dtype=torch.float64, device=x.device)
        acc = torch.zeros(cpg, r, dtype=x.dtype, device=x.device)
        accs = list(acc.unbind(0))
        padded: tuple[int, torch.Tensor] | None = None
        for unit in todo:
            n0, h0 = units[unit]
            n1, h1 = min(n, n0 + images), min(geo.out[0], h0 + rows_per)
            if padded is None or padded[0] != n0:
                padded = (n0, _padded(geo.module, x[n0:n1], geo.pad))
            xpad = padded[1]
            block_shape = (n1 - n0, h1 - h0, *geo.out[1:])
            positions = math.prod(block_shape)
            gabs = torch.empty((r, *block_shape), dtype=x.dtype, device=x.device)
            torch.abs(_take(g[n0:n1, :, h0:h1], 1, rsel).transpose(0, 1), out=gabs)
            gabs = gabs.view(r, positions)
            per_block = max(1, WINDOW_ELEMENTS // (taps * positions))
            for b0 in range(0, len(active), per_block):
                block = active[b0:b0 + per_block]
                xs = _take(xpad, 1, _as_slice(torch.tensor(block)))
                win = torch.empty((len(block), taps, *block_shape), dtype=x.dtype,
                                  device=x.device)
                for t, tap in enumerate(geo.offsets):
                    win[:, t].copy_(geo.window(xs, tap, h0, h1).transpose(0, 1))
                win = win.view(len(block), taps, positions)
                if matmul is None:  # batched products over sub-blocks of channels
                    sub = max(1, (4 * BLOCK_ELEMENTS) // (r * positions))
                    for s0 in range(0, len(block), sub):
                        idx = torch.tensor(block[s0:s0 + sub], device=x.device)
                        y = torch.bmm(wc.index_select(0, idx), win[s0:s0 + sub])
                        acc.index_copy_(0, idx, torch.sum(y.abs_().mul_(gabs), dim=2))
                    continue
                for xt, c in zip(win.unbind(0), block, strict=True):
                    y = matmul(wrows[c], xt)
                    torch.sum(y.abs_().mul_(gabs), dim=1, out=accs[c])
            out += acc
        return out

    return _parallel(part, list(range(len(units))), x.device).t()


def _conv_sums(module: nn.Module, x: torch.Tensor, g: torch.Tensor,
               rows: torch.Tensor) -> torch.Tensor:
    """``Σ_{n,p} |a_oi g_o|`` for the given rows of a conv layer: ``[R, in // groups]``."""
    geo = _Conv(module, x, g)
    weight = module.weight.detach()
    out_c, cpg = weight.shape[0], weight.shape[1]
    if cpg == 1:
        return _conv_single_input(geo, x, g, weight, rows)
    per_group = out_c // geo.groups
    result = torch.zeros(rows.numel(), cpg, dtype=torch.float64, device=x.device)
    group_of = rows // per_group
    for grp in torch.unique(group_of).tolist():
        pos = torch.nonzero(group_of == grp).flatten()
        grows = rows[pos]
        rsel = _as_slice(grows)
        xg = x[:, grp * cpg:(grp + 1) * cpg]
        w = _take(weight, 0, rsel)
        if geo.taps == 1:
            s = _conv_pointwise(geo, xg, g, w, rsel)
        elif grows.numel() <= DEPTHWISE_MAX_ROWS:
            s = _conv_rows_depthwise(geo, xg, g, w, grows)
        else:
            s = _conv_gemm(geo, xg, g, w, rsel)
        result[pos.to(x.device)] = s.to(torch.float64)
    return result


def kernel_abs_sums(module: nn.Module, info: LayerInfo, x: torch.Tensor, g: torch.Tensor,
                    rows: torch.Tensor) -> torch.Tensor:
    """``Σ_{images, positions} |a_oi · g_o|`` for the given output rows of one layer.

    Args:
        module: the conv or Linear module.
        info: its :class:`~netcarve.core.layers.LayerInfo`.
        x: the layer's input ``[N, C_in, ...]`` (or ``[N, features]``).
        g: ``∂L/∂z`` for the layer's raw output ``[N, C_out, ...]``.
        rows: int64 sorted output channels to compute.

    Returns:
        float64 ``[len(rows), in // groups]`` on ``x``'s device.

    Example:
        >>> conv = nn.Conv2d(2, 3, 3)
        >>> x, g = torch.randn(4, 2, 5, 5), torch.randn(4, 3, 3, 3)
        >>> info = type("I", (), {"kind": "conv", "spatial": 1})()
        >>> kernel_abs_sums(conv, info, x, g, torch.arange(3)).shape
        torch.Size([3, 2])
    """
    with torch.no_grad():
        if info.kind == "linear":
            s = _linear_sums(module.weight.detach(), x, g, rows, info.spatial)
            return s.to(torch.float64)
        return _conv_sums(module, x, g, rows)


class ActGrad:
    """Activation × gradient saliency (see the module docstring).

    Example:
        >>> ActGrad().name
        'actgrad'
    """

    name = "actgrad"

    def kernel_scores(self, ctx: ScoringContext) -> dict[str, torch.Tensor]:
        """Mean over images and positions of ``|a_oi · g_o|`` for every kernel.

        Args:
            ctx: the scoring context (``masks`` applied while scoring).

        Returns:
            ``{layer: float32 CPU [out, in // groups]}``; rows with no path to the target
            are 0.

        Raises:
            CriterionError: bad batches. GraphError: unknown layer.

        Example:
            >>> s = ActGrad().kernel_scores(ctx)  # doctest: +SKIP
        """
        return self._scores(ctx, kernel=True)

    def filter_scores(self, ctx: ScoringContext) -> dict[str, torch.Tensor]:
        """Mean over images and positions of ``|z_o · g_o|`` for every filter.

        Args:
            ctx: the scoring context (``masks`` applied while scoring).

        Returns:
            ``{layer: float32 CPU [out]}``; filters with no path to the target are 0.

        Raises:
            CriterionError: bad batches. GraphError: unknown layer.

        Example:
            >>> s = ActGrad().filter_scores(ctx)  # doctest: +SKIP
        """
        return self._scores(ctx, kernel=False)

    def _scores(self, ctx: ScoringContext, kernel: bool) -> dict[str, torch.Tensor]:
        modules = check_layers(ctx)
        infos = {n: ctx.graph.layers[n] for n in modules}
        relevant = relevant_masks(ctx)
        rows = {n: relevant_rows(relevant, n) for n in modules}
        scored = [n for n in modules if rows[n].numel()]

        def compute(name: str, module: nn.Module, x: torch.Tensor,
                    z_fn: Callable[[], torch.Tensor], g: torch.Tensor
                    ) -> tuple[torch.Tensor, int]:
            if infos[name].channels_last:  # a 1×1 conv over the last dim: positions as rows
                count = g.numel() // g.shape[-1]
                if kernel:
                    return kernel_abs_sums(module, infos[name], x.reshape(-1, x.shape[-1]),
                                           g.reshape(-1, g.shape[-1]), rows[name]), count
                return _filter_abs_sums(z_fn().movedim(-1, 1), g.movedim(-1, 1),
                                        rows[name]), count
            count = g[:, 0].numel()  # images × positions of this batch
            if kernel:
                return kernel_abs_sums(module, infos[name], x, g, rows[name]), count
            return _filter_abs_sums(z_fn(), g, rows[name]), count

        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        if scored:  # nothing relevant: nothing to run
            batches = layer_grad_batches(ctx, compute, need_output=not kernel, layers=scored)
            with closing(batches):
                for results, _n in batches:
                    for name, (s, count) in results.items():
                        sums[name] = s if name not in sums else sums[name] + s
                        counts[name] = counts.get(name, 0) + count
        out = {}
        for name in modules:
            info = infos[name]
            shape = info.mask_shape if kernel else (info.out_channels,)
            full = torch.zeros(shape, dtype=torch.float64)
            if name in sums:
                full[rows[name]] = sums[name].cpu() / counts[name]
            out[name] = to_result(full)
        return out


def _filter_abs_sums(z: torch.Tensor, g: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``Σ_{images, positions} |z_o g_o|`` for the given rows: float64 ``[R]``."""
    rsel = _as_slice(rows)
    step = max(1, BLOCK_ELEMENTS // max(1, g[0].numel()))

    def part(starts: list[int]) -> torch.Tensor:
        total = torch.zeros(rows.numel(), dtype=torch.float64, device=g.device)
        for n0 in starts:
            zz = _take(z[n0:n0 + step], 1, rsel)
            gg = _take(g[n0:n0 + step], 1, rsel)
            total += _sum_but((zz * gg).abs_(), 1)
        return total

    return _parallel(part, list(range(0, g.shape[0], step)), g.device)
