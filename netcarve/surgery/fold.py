"""Folding removed filters into the layers they fed: a least-squares refit after pruning.

Dropping a filter also drops its share of the next layer's input. When the filter repeated
others (functional pruning removes exactly those), that share is mostly expressible through
the kept channels: :func:`fold_lstsq` re-fits, for every layer fed by a pruned layer (a
*consumer*), the weights on its kept input channels so that its output on a probe set matches
the original model's output, by ridge-regularised least squares.

What is fitted, layer by layer in execution order:

* the input: what the consumer receives in the pruned (and already refitted) model -- every
  operation in between (BatchNorm, activation, pooling, concatenation, flatten) is simply run,
  so the fit is exact on the graph whatever lies between the layers;
* the target: the consumer's raw output in the original model (before its own BatchNorm or
  residual addition, so the addition's other operand is untouched), on the output channels the
  consumer keeps;
* the design: a conv's input patches (``unfold`` with its kernel, stride, dilation and padding,
  one row per image and output position), a Linear's input vector (after a flatten: the
  blocks of columns of the kept channels);
* the intercept: the consumer's bias; for a conv without bias followed directly by its own
  BatchNorm, the running mean absorbs it (``BN(z + b) = BN'(z)`` with ``mean' = mean - b``),
  which is exact; otherwise no intercept.

The problem solved per consumer, with ``A`` the design, ``Y`` the target and centred
statistics (the intercept is not penalised)::

    W = argmin ||Y - A W - b||^2 + lam ||W||^2,   lam = ridge * trace(Ac^T Ac) / columns

Sufficient statistics (``A^T A``, ``A^T Y``, sums) are accumulated in float64 over batches, so
memory does not grow with the probe set. The probe images must not be the evaluation images:
the fit sees the targets.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from netcarve.surgery.prune import prune_filters
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3)).eval()
    >>> x = torch.randn(8, 1, 8, 8)
    >>> keep = torch.tensor([True, True, False, True])
    >>> small = prune_filters(net, {"0": keep}, example_input=x, fold="lstsq", fold_images=x)
    >>> small.metadata["fold"], sorted(small.metadata["fold_fit"])
    ('lstsq', ['2'])
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import batchnorm as _bn
from torch.nn.modules import conv as _conv

from netcarve.core.errors import NetcarveError
from netcarve.core.graph import ModelGraph
from netcarve.core.hooks import preserved_state, resolve_module
from netcarve.data.stream import Images, in_memory

if TYPE_CHECKING:
    from netcarve.surgery.pruned import PrunedModel

__all__ = ["FOLDS", "FoldError", "FoldFit", "fold_lstsq"]

FOLDS: tuple[str, ...] = ("none", "lstsq")
"""What happens to a removed filter's share of the next layer's input: ``"none"`` drops it
(the papers' pruning), ``"lstsq"`` refits the next layer on the kept channels."""


class FoldError(NetcarveError):
    """Bad fold settings or a layer the least-squares fold cannot refit."""


@dataclass(frozen=True)
class FoldFit:
    """How well one consumer's refit reproduces its original output on the probe set.

    Attributes:
        layer: the consumer layer.
        rows: fitted samples (images × output positions).
        columns: weights per output channel after pruning.
        intercept: ``"bias"``, ``"batchnorm"`` (absorbed into the running mean) or ``"none"``.
        lam: the ridge penalty used (absolute).
        r2_fold: 1 − SSE/SST of the refitted layer against the original output.
        r2_drop: the same for the dropped (not refitted) weights, in the same pruned model.
    """

    layer: str
    rows: int
    columns: int
    intercept: str
    lam: float
    r2_fold: float
    r2_drop: float


class _Stop(Exception):
    """Raised by a capture hook to end a forward pass early."""


@contextmanager
def _capture(module: nn.Module, box: dict[str, torch.Tensor]) -> Iterator[None]:
    def hook(mod: nn.Module, args: Any, out: Any) -> None:
        box["input"] = args[0]
        box["output"] = out
        raise _Stop

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _run_to(net: nn.Module, layer: str, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Input and raw output of ``layer`` on ``x`` (the forward pass stops there)."""
    box: dict[str, torch.Tensor] = {}
    with _capture(resolve_module(net, layer), box), suppress(_Stop):
        net(x)
    if "input" not in box:
        raise FoldError(f"layer {layer!r} is not called in the model's forward pass")
    return box


def _design(mod: nn.Module, a: torch.Tensor) -> torch.Tensor:
    """Rows of the layer's linear map: conv patches ``[N·P, C·k]`` or Linear inputs."""
    if isinstance(mod, nn.Linear):
        return a.reshape(-1, a.shape[-1])
    assert isinstance(mod, _conv._ConvNd)
    if a.dim() == 3:  # Conv1d as a 2-d conv of height 1
        a = a.unsqueeze(-2)
        kernel, dilation, stride = ((1, mod.kernel_size[0]), (1, mod.dilation[0]),
                                    (1, mod.stride[0]))
    else:
        kernel, dilation, stride = mod.kernel_size, mod.dilation, mod.stride
    pads = mod._reversed_padding_repeated_twice  # (left, right, top, bottom) for 2-d
    if any(pads):
        mode = "constant" if mod.padding_mode == "zeros" else mod.padding_mode
        a = F.pad(a, list(pads), mode=mode)
    cols = F.unfold(a, kernel_size=kernel, dilation=dilation, stride=stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _targets(mod: nn.Module, y: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """Raw outputs as ``[samples, out_channels]``, restricted to the kept output rows."""
    if rows is not None:
        y = y.index_select(-1 if isinstance(mod, nn.Linear) else 1, rows.to(y.device))
    if isinstance(mod, nn.Linear):
        return y.reshape(-1, y.shape[-1])
    return y.reshape(y.shape[0], y.shape[1], -1).transpose(1, 2).reshape(-1, y.shape[1])


def _own_batchnorm(graph: ModelGraph, layer: str) -> str | None:
    """The BatchNorm called directly on ``layer``'s output (and nothing else), if any."""
    users = list(graph.layer_node(layer).users)
    if len(users) == 1 and users[0].op == "call_module":
        target = str(users[0].target)
        if target in graph.bn_after.get(layer, []):
            return target
    return None


def _check(mod: nn.Module, layer: str) -> None:
    if isinstance(mod, nn.Linear):
        return
    if isinstance(mod, (nn.Conv1d, nn.Conv2d)) and not mod.transposed and mod.groups == 1:
        return
    kind = type(mod).__name__ + (f" with groups={mod.groups} (the depthwise conv that "
                                 "loses its channels with the pruned filters)"
                                 if getattr(mod, "groups", 1) != 1 else "")
    raise FoldError(f"fold='lstsq' refits Linear, Conv1d and Conv2d layers (groups=1); "
                    f"{layer} is a {kind}. Use fold='none' for this model")


class _Stats:
    """Float64 sufficient statistics of one least-squares problem."""

    def __init__(self, columns: int, outputs: int, device: torch.device) -> None:
        kw = {"dtype": torch.float64, "device": device}
        self.n = 0
        self.gram = torch.zeros(columns, columns, **kw)
        self.cross = torch.zeros(columns, outputs, **kw)
        self.sum_a = torch.zeros(columns, **kw)
        self.sum_y = torch.zeros(outputs, **kw)
        self.sum_y2 = torch.zeros(outputs, **kw)

    def add(self, a: torch.Tensor, y: torch.Tensor) -> None:
        a = a.to(self.gram)
        y = y.to(self.gram)
        self.n += a.shape[0]
        self.gram += a.T @ a
        self.cross += a.T @ y
        self.sum_a += a.sum(0)
        self.sum_y += y.sum(0)
        self.sum_y2 += (y * y).sum(0)

    def sse(self, w: torch.Tensor, b: torch.Tensor) -> float:
        """Σ ||y − a w − b||² from the statistics (w: [columns, outputs], b: [outputs])."""
        val = (self.sum_y2.sum() - 2 * (w * self.cross).sum() - 2 * (b * self.sum_y).sum()
               + (w * (self.gram @ w)).sum() + 2 * (b * (self.sum_a @ w)).sum()
               + self.n * (b * b).sum())
        return float(val)

    def sst(self) -> float:
        return float((self.sum_y2 - self.sum_y ** 2 / max(1, self.n)).sum())

    def solve(self, ridge: float, intercept: bool) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Ridge solution ``(w [columns, outputs], b [outputs], lam)``; b is 0 without
        intercept."""
        n = max(1, self.n)
        if intercept:
            mu_a, mu_y = self.sum_a / n, self.sum_y / n
            gram = self.gram - n * torch.outer(mu_a, mu_a)
            cross = self.cross - n * torch.outer(mu_a, mu_y)
        else:
            gram, cross = self.gram, self.cross
        columns = gram.shape[0]
        lam = ridge * float(torch.diagonal(gram).sum()) / max(1, columns)
        system = (gram + lam * torch.eye(columns, dtype=gram.dtype, device=gram.device)).cpu()
        # lstsq (gelsd) also copes with a singular system when ridge is 0
        w = torch.linalg.lstsq(system, cross.cpu(), driver="gelsd").solution.to(gram.device)
        b = (mu_y - mu_a @ w) if intercept else torch.zeros_like(self.sum_y)
        return w, b, lam


def _consumers(graph: ModelGraph, pruned: PrunedModel) -> list[str]:
    fed = {c for layer, gone in pruned.removed.items() if gone for c in graph.consumers(layer)}
    return [name for name in graph.layers if name in fed]


def _fold_into(
    original: nn.Module,
    new: nn.Module,
    graph: ModelGraph,
    pruned: PrunedModel,
    images: torch.Tensor,
    *,
    ridge: float,
    batch_size: int,
) -> dict[str, FoldFit]:
    """Refit every consumer of ``new`` (a pruned copy, changed in place) against ``original``."""
    param = next(new.parameters())
    device, dtype = param.device, param.dtype
    acc_device = device if device.type in ("cpu", "cuda") else torch.device("cpu")
    fits: dict[str, FoldFit] = {}
    for layer in _consumers(graph, pruned):
        mod = resolve_module(new, layer)
        _check(mod, layer)
        rows = (torch.tensor(pruned.kept[layer], dtype=torch.int64)
                if layer in pruned.kept else None)
        bn_name = None if getattr(mod, "bias", None) is not None else _own_batchnorm(graph,
                                                                                     layer)
        bn = resolve_module(new, bn_name) if bn_name else None
        if getattr(mod, "bias", None) is not None:
            intercept = "bias"
        elif isinstance(bn, _bn._BatchNorm) and bn.running_mean is not None:
            intercept = "batchnorm"
        else:
            intercept = "none"
        weight = mod.weight.detach()
        w_drop = weight.reshape(weight.shape[0], -1).T.to(torch.float64)
        columns, outputs = w_drop.shape
        stats = _Stats(columns, outputs, acc_device)
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                x = images[start:start + batch_size].to(device=device, dtype=dtype)
                target = _run_to(original, layer, x)["output"]
                given = _run_to(new, layer, x)["input"]
                stats.add(_design(mod, given).to(acc_device),
                          _targets(mod, target, rows).to(acc_device))
        b_drop = (mod.bias.detach().to(stats.gram) if intercept == "bias"
                  else torch.zeros(outputs, dtype=torch.float64, device=acc_device))
        w, b, lam = stats.solve(ridge, intercept != "none")
        sst = stats.sst() or 1.0
        fits[layer] = FoldFit(layer=layer, rows=stats.n, columns=columns, intercept=intercept,
                              lam=lam, r2_fold=1 - stats.sse(w, b) / sst,
                              r2_drop=1 - stats.sse(w_drop.to(stats.gram), b_drop) / sst)
        with torch.no_grad():
            mod.weight.copy_(w.T.reshape(weight.shape).to(weight))
            if intercept == "bias":
                mod.bias.copy_(b.to(mod.bias))
            elif intercept == "batchnorm":
                assert bn is not None and bn.running_mean is not None
                bn.running_mean.sub_(b.to(bn.running_mean))
    return fits


def fold_lstsq(
    model: nn.Module,
    pruned: PrunedModel,
    images: Images,
    *,
    graph: ModelGraph | None = None,
    ridge: float = 1e-2,
    batch_size: int = 128,
) -> PrunedModel:
    """A copy of ``pruned`` whose consumer layers are refitted to ``model`` by least squares.

    Args:
        model: the original (unpruned) model ``pruned`` was made from (not changed).
        pruned: the result of :func:`netcarve.surgery.prune.prune_filters` (not changed).
        images: normalised probe images, a batch the model takes (or a stream, read once
            into memory: the refit solves on all of them); not the evaluation images.
        graph: the original model's graph (built from ``images`` when omitted).
        ridge: penalty relative to the mean diagonal of the centred ``A^T A`` (>= 0).
        batch_size: images per forward pass.

    Returns:
        a new :class:`~netcarve.surgery.pruned.PrunedModel` with the same structure, refitted
        weights, and ``metadata["fold"] = "lstsq"``, ``metadata["fold_fit"]`` (one
        :class:`FoldFit` as a dict per consumer), ``metadata["fold_images"]``,
        ``metadata["ridge"]``. When nothing was removed it equals ``pruned``.

    Raises:
        FoldError: bad ridge / images / batch size, or a consumer that cannot be refitted
            (grouped or transposed conv, Conv3d).

    Example:
        >>> small = prune_filters(net, masks, example_input=x)  # doctest: +SKIP
        >>> folded = fold_lstsq(net, small, probe_x)  # doctest: +SKIP
        >>> folded.metadata["fold_fit"]["features.7"]["r2_fold"]  # doctest: +SKIP
        0.97
    """
    images, _ = in_memory(images)
    if not (isinstance(ridge, (int, float)) and ridge >= 0 and ridge == ridge
            and ridge != float("inf")):
        raise FoldError(f"ridge must be a finite number >= 0, got {ridge!r}")
    if int(batch_size) < 1:
        raise FoldError(f"batch_size must be >= 1, got {batch_size}")
    if not isinstance(images, torch.Tensor) or images.dim() < 2 or len(images) < 1:
        raise FoldError("fold='lstsq' needs a batch of probe images (a tensor [N, ...]), "
                        "separate from the evaluation images")
    if images.dtype == torch.uint8:
        raise FoldError("fold images must be normalised float tensors, not uint8; normalise "
                        "them with the model's preset first")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    if graph is None:
        graph = ModelGraph.build(model, images[:1].to(device=device, dtype=dtype))
    out = copy.copy(pruned)
    out.metadata = dict(pruned.metadata)
    out.module = copy.deepcopy(pruned.module)
    with preserved_state(model), preserved_state(out.module):
        model.eval()
        out.module.eval()
        fits = _fold_into(model, out.module, graph, pruned, images, ridge=float(ridge),
                          batch_size=int(batch_size))
    out.module.eval()
    out.metadata.update({"fold": "lstsq", "ridge": float(ridge), "fold_images": len(images),
                         "fold_fit": {k: asdict(v) for k, v in fits.items()}})
    return out
