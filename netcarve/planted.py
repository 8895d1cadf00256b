"""Planted-circuit benchmark: networks whose circuit for a target is known by construction.

Every saliency criterion is asked to recover a circuit that was *planted* in a hand-built
network, and the recovered kernel set (the circuit's effective mask) is compared with the
ground truth: precision, recall and held-out preservation per criterion and keep fraction.

Architectures (input 6 channels × 16×16, hidden width 12, target ``head:0``):

* ``sequential``: ``conv1 → ReLU → conv2 → ReLU → conv3 → ReLU → head``, a plain chain
  without skip connections whose ``conv2`` is a two-piece *maxout* conv
  (``torch.maximum(conv2.a(x), conv2.b(x))``).
* ``residual``: ``stem → ReLU → h0``; a basic block ``conv1`` (two-piece maxout) ``→ ReLU →
  conv2 → BatchNorm``, added to ``h0`` (residual ``add``) ``→ ReLU → head``. Residual-stream
  channels carry signal through the skip only, through the block only, through both, feed the
  block without reaching the head, die at the add (BatchNorm shift far below zero), or stay
  silent.

The data generator fills 3 of the 6 input channels (chosen per seed) with smooth random fields
in [0, 1]; the other 3 are exactly zero on every image. Hidden channels are built with roles:

* **live** channels read live channels through *small* kernels (taps ``|w|`` in
  [0.02, 0.2]; a quarter negative outside maxout pieces) and reach the target; their bias
  lies above the bound of their negative inputs, so their ReLU never clips on the data;
* **silent** channels read only silent channels (so they are exactly 0 on the data);
* **dead** channels have a bias (or BatchNorm shift) below minus an interval-arithmetic bound
  of their input, so their ReLU never opens, whatever subset of kernels is kept;
* **orphan** channels are live but every kernel from them toward the target is zero.

Each relevant kernel (upstream of ``head:0``, plus the kernels into it) then has a kind
(:data:`KIND_NAMES`): ``ground_truth``; ``silent_input`` (a *distractor*: taps ``|w|`` in
[0.5, 1.5] reading a channel that is 0 on the data); ``dead_output`` (large, writes a dead
channel); ``unreaching`` (large, writes an orphan); ``zero`` (weight exactly 0). Every
non-ground-truth kernel with a non-zero weight is larger than every ground-truth kernel, so
magnitude pruning ranks all of them first.

**Duplicate paths.** The two pieces of a maxout conv have identical weights; ground-truth
kernels in them have positive taps and read non-negative channels, so removing one kernel of
one piece only lowers that piece and the maximum is unchanged *exactly*. Removing both copies
(the *duplicate pair*) changes the target. ``torch.maximum`` splits the gradient of a tie
evenly, so both copies get equal, non-zero data-aware scores.

**Ground truth (definition).** A relevant kernel is in the ground truth iff removing it alone,
or removing it together with its duplicate copy, changes the target response on the data.
Both copies of a duplicate pair therefore count (keeping one copy of each pair would already
reproduce the target exactly; preservation shows that). By construction the ground truth
alone reproduces the target exactly (biases and BatchNorm stay, as everywhere in
netcarve), removing any single non-ground-truth kernel leaves it unchanged, and removing any
single ground-truth kernel outside duplicate pairs changes it. ``tests/test_planted.py``
checks all of this by brute force.

**What to expect.** Every non-ground-truth kernel has a zero activation map or a zero gradient
on the data, so ``actgrad``, ``snip`` and ``force`` score it exactly 0 and every
ground-truth kernel above 0: at keep ``1×GT`` they should recover the circuit exactly, while
``magnitude`` keeps only distractors. Below ``1×GT`` the one-shot criteria tend to keep
high-scoring kernels near the target whose upstream path is gone (the effective mask then
drops them), so recall falls below the keep multiple; FORCE's iterative masking does better.
These are the measured numbers (``run_planted`` writes them), not assumptions.

**Keep fractions.** With ``keeps=None`` each case is evaluated at ``m × |GT| / |relevant|``
for ``m`` in :data:`GT_MULTIPLES` (0.5, 1, 2), labelled ``0.5×GT``, ``1×GT``, ``2×GT``: at
``1×GT`` a perfect criterion keeps exactly the ground truth.

Example:
    >>> report = planted_benchmark(seeds=(0,), n_images=32, criteria=("actgrad",))
    >>> [r["recall"] for r in report.rows if r["keep_label"] == "1×GT"]
    [1.0, 1.0]
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._csv import write_rows
from .circuit import (
    count,
    keep_count,
    measure_preservation,
    score_kernels,
    select_top_k,
    target_responses,
)
from .criteria import get_criterion
from .errors import NetcarveError
from .graph import ModelGraph
from .targets import Target

__all__ = [
    "ARCHITECTURES",
    "COLUMNS",
    "GT_MULTIPLES",
    "KIND_NAMES",
    "Maxout",
    "PlantedCase",
    "PlantedError",
    "PlantedReport",
    "PlantedResidual",
    "PlantedSequential",
    "build_planted",
    "planted_benchmark",
    "planted_images",
    "run_planted",
]

ARCHITECTURES = ("sequential", "residual")
"""Architectures :func:`build_planted` knows."""

GT_MULTIPLES = (0.5, 1.0, 2.0)
"""Keep fractions used when ``keeps=None``: these multiples of ``|GT| / |relevant|``."""

ZERO, GROUND_TRUTH, SILENT_INPUT, DEAD_OUTPUT, UNREACHING, IRRELEVANT = range(6)
KIND_NAMES = {
    ZERO: "zero",
    GROUND_TRUTH: "ground_truth",
    SILENT_INPUT: "silent_input",
    DEAD_OUTPUT: "dead_output",
    UNREACHING: "unreaching",
    IRRELEVANT: "irrelevant",
}
"""Kernel kinds (codes in :attr:`PlantedCase.kinds`)."""

COLUMNS = [
    "architecture", "seed", "criterion", "keep_label", "keep", "k", "relevant",
    "ground_truth", "kept", "true_positives", "precision", "recall", "pearson", "collapsed",
    "seconds",
]
"""Columns of :meth:`PlantedReport.write_csv` (the keys of every row)."""

IN_CHANNELS = 6
LIVE_INPUTS = 3
WIDTH = 12
OUT_CHANNELS = 4
SIZE = 16
TARGET = "head:0"

_GT_TAPS = (0.02, 0.2)
_BIG_TAPS = (0.5, 1.5)
_P_GT = 0.6  # chance that a possible ground-truth kernel is present
_P_BIG = 0.6  # chance that a possible large non-ground-truth kernel is present
_P_NEGATIVE = 0.25  # chance that a ground-truth kernel outside maxout pieces is negative
_LINESTYLES = ("-", "--", "-.", ":", (0, (5, 1, 1, 1)))


class PlantedError(NetcarveError):
    """Bad planted-benchmark arguments (unknown architecture, keep outside (0, 1], ...)."""


# ---------------------------------------------------------------------------- networks


class Maxout(nn.Module):
    """Two convolutions of the same input merged by an element-wise maximum (a maxout unit).

    Layers ``a`` and ``b`` (3×3, padding 1). With identical weights they are duplicate paths.

    Example:
        >>> Maxout(2, 3)(torch.zeros(1, 2, 5, 5)).shape
        torch.Size([1, 3, 5, 5])
    """

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.a = nn.Conv2d(cin, cout, 3, padding=1)
        self.b = nn.Conv2d(cin, cout, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``max(a(x), b(x))`` element-wise."""
        return torch.maximum(self.a(x), self.b(x))


class PlantedSequential(nn.Module):
    """``conv1 → ReLU → conv2 (maxout) → ReLU → conv3 → ReLU → head`` (3×3 convs, no skips).

    Layers: ``conv1`` (6→12), ``conv2.a`` / ``conv2.b`` (12→12), ``conv3`` (12→12), ``head``
    (12→4); the output is ``head``'s raw map. :func:`build_planted` sets the weights.

    Example:
        >>> PlantedSequential()(torch.zeros(2, 6, 16, 16)).shape
        torch.Size([2, 4, 16, 16])
    """

    def __init__(self, cin: int = IN_CHANNELS, width: int = WIDTH, cout: int = OUT_CHANNELS):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 3, padding=1)
        self.conv2 = Maxout(width, width)
        self.conv3 = nn.Conv2d(width, width, 3, padding=1)
        self.head = nn.Conv2d(width, cout, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The head's raw output ``[N, cout, H, W]``."""
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        return self.head(x)


class PlantedResidual(nn.Module):
    """``stem → ReLU``, then ``relu(bn2(conv2(relu(conv1(h0)))) + h0)``, then ``head``.

    Layers: ``stem`` (6→12), ``conv1.a`` / ``conv1.b`` (maxout, 12→12), ``conv2`` (12→12, no
    bias) with ``bn2``, ``head`` (12→4); the output is ``head``'s raw map.
    :func:`build_planted` sets the weights.

    Example:
        >>> PlantedResidual().eval()(torch.zeros(2, 6, 16, 16)).shape
        torch.Size([2, 4, 16, 16])
    """

    def __init__(self, cin: int = IN_CHANNELS, width: int = WIDTH, cout: int = OUT_CHANNELS):
        super().__init__()
        self.stem = nn.Conv2d(cin, width, 3, padding=1)
        self.conv1 = Maxout(width, width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.head = nn.Conv2d(width, cout, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The head's raw output ``[N, cout, H, W]``."""
        h0 = F.relu(self.stem(x))
        u = F.relu(self.conv1(h0))
        v = self.bn2(self.conv2(u))
        return self.head(F.relu(v + h0))


# ---------------------------------------------------------------------------- data


def planted_images(
    n: int,
    live: Sequence[int],
    *,
    generator: torch.Generator,
    channels: int = IN_CHANNELS,
    size: int = SIZE,
) -> torch.Tensor:
    """Images whose ``live`` channels are smooth random fields in [0, 1]; the rest are 0.

    Args:
        n: number of images.
        live: indices of the live input channels.
        generator: the random generator (consumed).
        channels: input channels.
        size: height and width.

    Returns:
        float64 ``[n, channels, size, size]``.

    Raises:
        PlantedError: ``n < 1`` or a live channel out of range.

    Example:
        >>> x = planted_images(2, [0, 2], generator=torch.Generator().manual_seed(0))
        >>> x.shape, float(x[:, 1].abs().max())
        (torch.Size([2, 6, 16, 16]), 0.0)
    """
    if n < 1:
        raise PlantedError(f"need at least 1 image, got {n}")
    if any(not 0 <= c < channels for c in live):
        raise PlantedError(f"live channels {list(live)} out of range for {channels} channels")
    noise = torch.rand(n, len(live), size + 2, size + 2, generator=generator,
                       dtype=torch.float64)
    x = torch.zeros(n, channels, size, size, dtype=torch.float64)
    x[:, list(live)] = F.avg_pool2d(noise, 3, stride=1)
    return x


# ---------------------------------------------------------------------------- construction


def _kinds_in_order(gen: torch.Generator, counts: Sequence[tuple[str, int]]) -> list[str]:
    """Channel roles, shuffled (seeded) so no role sits at a fixed index."""
    roles = [role for role, n in counts for _ in range(n)]
    order = torch.randperm(len(roles), generator=gen).tolist()
    return [roles[j] for j in order]


def _rule(out_role: str, in_state: str) -> int:
    """Kind of a possible kernel from a channel in ``in_state`` (G live and reaching, O live
    orphan, Z zero on the data) into a channel with ``out_role``."""
    if in_state == "Z":
        return SILENT_INPUT
    if out_role == "G":
        return GROUND_TRUTH if in_state == "G" else ZERO
    if out_role == "dead":
        return DEAD_OUTPUT
    if out_role == "orphan":
        return UNREACHING
    return ZERO  # a silent channel reads no live channel


def _fill_kinds(
    gen: torch.Generator,
    out_roles: Sequence[str],
    in_states: Sequence[str],
    cover: Sequence[int] = (),
) -> torch.Tensor:
    """Kernel kinds ``int64 [out, in]`` for one conv.

    Every ``G`` output gets at least one ground-truth kernel, and every input channel in
    ``cover`` gets at least one ground-truth kernel into a ``G`` output (so it reaches).
    """
    n_out, n_in = len(out_roles), len(in_states)
    kinds = torch.zeros(n_out, n_in, dtype=torch.int64)
    draws = torch.rand(n_out, n_in, generator=gen)
    for o, role in enumerate(out_roles):
        for i, state in enumerate(in_states):
            kind = _rule(role, state)
            p = _P_GT if kind == GROUND_TRUTH else _P_BIG
            if kind != ZERO and draws[o, i] < p:
                kinds[o, i] = kind
    live_in = [i for i, s in enumerate(in_states) if s == "G"]
    g_out = [o for o, r in enumerate(out_roles) if r == "G"]
    for o in g_out:
        if not (kinds[o] == GROUND_TRUTH).any():
            kinds[o, live_in[int(torch.randint(len(live_in), (1,), generator=gen))]] = (
                GROUND_TRUTH
            )
    for i in cover:
        if not (kinds[g_out, i] == GROUND_TRUTH).any():
            kinds[g_out[int(torch.randint(len(g_out), (1,), generator=gen))], i] = GROUND_TRUTH
    return kinds


def _weights(gen: torch.Generator, kinds: torch.Tensor, positive: bool) -> torch.Tensor:
    """3×3 weights ``float64 [out, in, 3, 3]`` for kernel kinds.

    Ground truth: taps in [0.02, 0.2], positive when ``positive`` (else negative with chance
    0.25, keeping at least one positive ground-truth kernel per output). Other non-zero
    kinds: taps of random sign with ``|w|`` in [0.5, 1.5]. ``IRRELEVANT``: N(0, 0.3²).
    """
    n_out, n_in = kinds.shape
    small = _GT_TAPS[0] + (_GT_TAPS[1] - _GT_TAPS[0]) * torch.rand(
        n_out, n_in, 3, 3, generator=gen, dtype=torch.float64)
    big = _BIG_TAPS[0] + (_BIG_TAPS[1] - _BIG_TAPS[0]) * torch.rand(
        n_out, n_in, 3, 3, generator=gen, dtype=torch.float64)
    big_sign = torch.where(torch.rand(n_out, n_in, 3, 3, generator=gen) < 0.5, -1.0, 1.0)
    gt_sign = torch.where(torch.rand(n_out, n_in, generator=gen) < _P_NEGATIVE, -1.0, 1.0)
    noise = 0.3 * torch.randn(n_out, n_in, 3, 3, generator=gen, dtype=torch.float64)
    gt = kinds == GROUND_TRUTH
    if positive:
        gt_sign = torch.ones_like(gt_sign)
    for o in range(n_out):
        row = gt[o]
        if row.any() and not (gt_sign[o][row] > 0).any():
            gt_sign[o, int(torch.nonzero(row)[0])] = 1.0
    w = torch.zeros(n_out, n_in, 3, 3, dtype=torch.float64)
    w[gt] = (small * gt_sign[:, :, None, None].double())[gt]
    other = (kinds != ZERO) & ~gt & (kinds != IRRELEVANT)
    w[other] = (big * big_sign.double())[other]
    w[kinds == IRRELEVANT] = noise[kinds == IRRELEVANT]
    return w


def _reach_up(w: torch.Tensor, ub_in: torch.Tensor) -> torch.Tensor:
    """Upper bound of ``Σ_i w_oi ⋆ x_i`` for inputs in ``[0, ub_in]`` (per output)."""
    return (w.clamp(min=0).sum(dim=(2, 3)) * ub_in[None, :]).sum(dim=1)


def _reach_abs(w: torch.Tensor, ub_in: torch.Tensor) -> torch.Tensor:
    """Bound of ``|Σ_i w_oi ⋆ x_i|`` under any subset of kernels, inputs in ``[0, ub_in]``."""
    return (w.abs().sum(dim=(2, 3)) * ub_in[None, :]).sum(dim=1)


def _open_shift(w: torch.Tensor, kinds: torch.Tensor, ub_in: torch.Tensor) -> torch.Tensor:
    """Bound of the negative ground-truth contributions into each output: a live channel's
    bias (or BatchNorm shift) above it keeps its ReLU open on all data."""
    neg = (-w).clamp(min=0) * (kinds == GROUND_TRUTH)[:, :, None, None]
    return _reach_up(neg, ub_in)


def _biases(gen: torch.Generator, roles: Sequence[str], w: torch.Tensor, kinds: torch.Tensor,
            ub_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Biases for roles and the upper bound of the post-ReLU output.

    Live: the bound of its negative ground-truth contributions plus [0, 0.05] (its ReLU never
    clips on the data); silent and orphan: 0; dead: below minus the bound of its input.
    """
    b = 0.05 * torch.rand(len(roles), generator=gen, dtype=torch.float64)
    b += _open_shift(w, kinds, ub_in)
    bound = _reach_abs(w, ub_in)
    for o, role in enumerate(roles):
        if role == "dead":
            b[o] = -(bound[o] + 1.0)
        elif role != "G":
            b[o] = 0.0
    return b, (b + _reach_up(w, ub_in)).clamp(min=0)


def _states(roles: Sequence[str]) -> list[str]:
    """Channel states (G live and reaching, O live orphan, Z zero on the data) of roles."""
    return [{"G": "G", "orphan": "O"}.get(r, "Z") for r in roles]


def _set(conv: nn.Conv2d, w: torch.Tensor, b: torch.Tensor | None) -> None:
    """Copy weights (and a bias, zero when None) into a conv."""
    with torch.no_grad():
        conv.weight.copy_(w)
        if conv.bias is not None:
            conv.bias.copy_(b if b is not None else torch.zeros(conv.out_channels))


def _head_kinds(gen: torch.Generator, in_states: Sequence[str]) -> torch.Tensor:
    """Head kinds: row 0 is the target (every live input covered), other rows irrelevant."""
    live = [i for i, s in enumerate(in_states) if s == "G"]
    row0 = _fill_kinds(gen, ["G"], in_states, cover=live)
    rest = torch.full((OUT_CHANNELS - 1, len(in_states)), IRRELEVANT, dtype=torch.int64)
    return torch.cat([row0, rest])


_Built = tuple[nn.Module, dict[str, torch.Tensor], list[str]]


def _build_sequential(gen: torch.Generator, live_in: list[int]) -> _Built:
    """The sequential net's weights, its kernel kinds and its maxout layers."""
    model = PlantedSequential()
    in_states = ["G" if c in live_in else "Z" for c in range(IN_CHANNELS)]
    ub = torch.tensor([1.0 if s == "G" else 0.0 for s in in_states], dtype=torch.float64)
    kinds: dict[str, torch.Tensor] = {}
    stages = [
        ("conv1", model.conv1, [("G", 4), ("dead", 2), ("silent", 4), ("orphan", 2)], False),
        ("conv2", model.conv2, [("G", 4), ("dead", 2), ("silent", 4), ("orphan", 2)], True),
        ("conv3", model.conv3, [("G", 3), ("dead", 2), ("silent", 4), ("orphan", 3)], False),
    ]
    cover: list[int] = []
    for name, module, counts, maxout in stages:
        roles = _kinds_in_order(gen, counts)
        k = _fill_kinds(gen, roles, in_states, cover)
        w = _weights(gen, k, positive=maxout)
        b, ub = _biases(gen, roles, w, k, ub)
        if maxout:
            _set(module.a, w, b)
            _set(module.b, w, b)
            kinds[f"{name}.a"], kinds[f"{name}.b"] = k, k.clone()
        else:
            _set(module, w, b)
            kinds[name] = k
        in_states = _states(roles)
        cover = [i for i, s in enumerate(in_states) if s == "G"]
    k = _head_kinds(gen, in_states)
    _set(model.head, _weights(gen, k, positive=False), torch.zeros(OUT_CHANNELS))
    kinds["head"] = k
    return model, kinds, ["conv2"]


def _build_residual(gen: torch.Generator, live_in: list[int]) -> _Built:
    """The residual net's weights, its kernel kinds and its maxout layers."""
    model = PlantedResidual()
    in_states = ["G" if c in live_in else "Z" for c in range(IN_CHANNELS)]
    ub_x = torch.tensor([1.0 if s == "G" else 0.0 for s in in_states], dtype=torch.float64)
    kinds: dict[str, torch.Tensor] = {}
    stream = _kinds_in_order(gen, [("skip", 2), ("blockout", 2), ("both", 1), ("feed", 2),
                                   ("deadend", 1), ("silent", 4)])
    # stem: h0 is live for skip / both / feed, a live orphan for deadend, silent otherwise
    stem_roles = [{"skip": "G", "both": "G", "feed": "G", "deadend": "orphan"}.get(s, "silent")
                  for s in stream]
    k = _fill_kinds(gen, stem_roles, in_states)
    w = _weights(gen, k, positive=False)
    b, ub_h0 = _biases(gen, stem_roles, w, k, ub_x)
    _set(model.stem, w, b)
    kinds["stem"] = k
    h0_states = _states(stem_roles)
    # block conv1 (maxout): the feed channels must reach the head through the block
    u_roles = _kinds_in_order(gen, [("G", 4), ("dead", 2), ("silent", 4), ("orphan", 2)])
    feed = [c for c, s in enumerate(stream) if s == "feed"]
    k = _fill_kinds(gen, u_roles, h0_states, cover=feed)
    w = _weights(gen, k, positive=True)
    b, ub_u = _biases(gen, u_roles, w, k, ub_h0)
    _set(model.conv1.a, w, b)
    _set(model.conv1.b, w, b)
    kinds["conv1.a"], kinds["conv1.b"] = k, k.clone()
    u_states = _states(u_roles)
    # block conv2 + bn2: v is live where the stream carries block output, an orphan for the
    # feed channels (the head ignores them), dead (BN shift) for the dead-end channel
    v_roles = [{"blockout": "G", "both": "G", "feed": "orphan", "deadend": "dead"}.get(
        s, "silent") for s in stream]
    k = _fill_kinds(gen, v_roles, u_states,
                    cover=[i for i, s in enumerate(u_states) if s == "G"])
    w = _weights(gen, k, positive=False)
    _set(model.conv2, w, None)
    kinds["conv2"] = k
    bn = model.bn2
    gamma = 0.5 + torch.rand(WIDTH, generator=gen, dtype=torch.float64)
    var = 0.5 + 1.5 * torch.rand(WIDTH, generator=gen, dtype=torch.float64)
    scale = gamma / torch.sqrt(var + bn.eps)
    beta = torch.zeros(WIDTH, dtype=torch.float64)
    shift = scale * _open_shift(w, k, ub_u) + 0.05 * torch.rand(WIDTH, generator=gen,
                                                                dtype=torch.float64)
    bound = scale * _reach_abs(w, ub_u) + ub_h0
    for c, role in enumerate(v_roles):
        if role == "G":
            beta[c] = shift[c]
        elif role == "dead":
            beta[c] = -(bound[c] + 1.0)
    with torch.no_grad():
        bn.weight.copy_(gamma)
        bn.bias.copy_(beta)
        bn.running_mean.zero_()
        bn.running_var.copy_(var)
    h1_states = ["G" if s in ("skip", "blockout", "both") else "O" if s == "feed" else "Z"
                 for s in stream]
    k = _head_kinds(gen, h1_states)
    _set(model.head, _weights(gen, k, positive=False), torch.zeros(OUT_CHANNELS))
    kinds["head"] = k
    return model, kinds, ["conv1"]


@dataclass
class PlantedCase:
    """One planted network with its data and known circuit for :data:`TARGET` (``head:0``).

    Attributes:
        architecture: ``"sequential"`` or ``"residual"``.
        seed: the construction seed.
        model: the network, in eval mode.
        target: the target string (``"head:0"``).
        images: scoring images ``[n, 6, 16, 16]``.
        heldout: held-out images for preservation.
        graph: the model's :class:`~netcarve.graph.ModelGraph`.
        relevant: relevant-kernel masks of the target.
        ground_truth: ``{layer: bool mask}`` (same keys as ``relevant``), the planted circuit.
        kinds: ``{layer: int64 [out, in]}`` kernel kinds (codes of :data:`KIND_NAMES`).
        duplicates: duplicate pairs ``((layer_a, o, i), (layer_b, o, i))`` of ground-truth
            kernels in maxout pieces.
        live_inputs: the input channels that carry data (the others are 0).

    Example:
        >>> case = build_planted("sequential", n_images=4)
        >>> case.model(case.images).shape, len(case.duplicates)
        (torch.Size([4, 4, 16, 16]), 11)
    """

    architecture: str
    seed: int
    model: nn.Module
    target: str
    images: torch.Tensor
    heldout: torch.Tensor
    graph: ModelGraph
    relevant: dict[str, torch.Tensor]
    ground_truth: dict[str, torch.Tensor]
    kinds: dict[str, torch.Tensor]
    duplicates: list[tuple[tuple[str, int, int], tuple[str, int, int]]]
    live_inputs: list[int]

    @property
    def n_relevant(self) -> int:
        """Number of relevant kernels."""
        return count(self.relevant)

    @property
    def n_ground_truth(self) -> int:
        """Number of ground-truth kernels."""
        return count(self.ground_truth)

    @property
    def gt_keep(self) -> float:
        """The keep fraction at which a perfect criterion keeps exactly the ground truth."""
        return self.n_ground_truth / self.n_relevant

    def composition(self) -> dict[str, int]:
        """Relevant kernels per kind (the names of :data:`KIND_NAMES` except ``irrelevant``).

        Returns:
            ``{kind: count}``; the counts sum to :attr:`n_relevant`.

        Example:
            >>> comp = build_planted("sequential", n_images=2).composition()
            >>> comp["ground_truth"], sum(comp.values())
            (43, 516)
        """
        out = {name: 0 for code, name in KIND_NAMES.items() if code != IRRELEVANT}
        for layer, rel in self.relevant.items():
            codes = self.kinds[layer][rel]
            for code, name in KIND_NAMES.items():
                if code != IRRELEVANT:
                    out[name] += int((codes == code).sum())
        return out


def build_planted(
    architecture: str,
    seed: int = 0,
    *,
    n_images: int = 256,
    n_heldout: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> PlantedCase:
    """Build a planted network, its data and its ground-truth circuit (deterministic).

    Args:
        architecture: ``"sequential"`` or ``"residual"`` (see the module docstring).
        seed: seeds every random choice (roles, weights, silent inputs, data); the global
            torch RNG is left untouched.
        n_images: scoring images.
        n_heldout: held-out images (default ``max(n_images // 2, 2)``).
        dtype: model and data dtype.

    Returns:
        A :class:`PlantedCase`.

    Raises:
        PlantedError: unknown architecture or fewer than 2 images.

    Example:
        >>> case = build_planted("residual", seed=1, n_images=8)
        >>> case.target, case.n_ground_truth < case.n_relevant
        ('head:0', True)
    """
    if architecture not in ARCHITECTURES:
        raise PlantedError(
            f"unknown architecture {architecture!r}; use one of {', '.join(ARCHITECTURES)}")
    if n_images < 2:
        raise PlantedError(f"need at least 2 scoring images, got {n_images}")
    n_heldout = max(n_images // 2, 2) if n_heldout is None else n_heldout
    gen = torch.Generator().manual_seed(int(seed) * 2 + ARCHITECTURES.index(architecture))
    live = sorted(torch.randperm(IN_CHANNELS, generator=gen)[:LIVE_INPUTS].tolist())
    with torch.random.fork_rng(devices=[]):  # default inits must not move the global RNG
        build = _build_sequential if architecture == "sequential" else _build_residual
        model, kinds, maxouts = build(gen, live)
    images = planted_images(n_images, live, generator=gen)
    heldout = planted_images(n_heldout, live, generator=gen)
    model = model.to(dtype).eval()
    images, heldout = images.to(dtype), heldout.to(dtype)
    graph = ModelGraph.build(model, images[:1])
    target = Target.parse(TARGET).resolve(graph)
    relevant = graph.relevant_kernels(target.layer, target.channels)
    ground_truth = {name: rel & (kinds[name] == GROUND_TRUTH) for name, rel in relevant.items()}
    duplicates = [
        ((f"{m}.a", int(o), int(i)), (f"{m}.b", int(o), int(i)))
        for m in maxouts
        for o, i in torch.nonzero(ground_truth[f"{m}.a"]).tolist()
    ]
    return PlantedCase(
        architecture=architecture, seed=int(seed), model=model, target=TARGET, images=images,
        heldout=heldout, graph=graph, relevant=relevant, ground_truth=ground_truth,
        kinds=kinds, duplicates=duplicates, live_inputs=live,
    )


# ---------------------------------------------------------------------------- benchmark


def _nan_to_zero(v: float | None) -> float:
    return 0.0 if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def _span(values: list[int]) -> str:
    """``"38"`` or ``"28–43"``."""
    lo, hi = min(values), max(values)
    return f"{lo}" if lo == hi else f"{lo}–{hi}"


@dataclass
class PlantedReport:
    """Results of :func:`planted_benchmark`: one row per architecture × seed × criterion × keep.

    Attributes:
        rows: dicts with the keys of :data:`COLUMNS`: ``architecture, seed, criterion,
            keep_label`` (``"1×GT"`` or the keep as text), ``keep`` (fraction of relevant
            kernels), ``k`` (kernels selected by top-k), ``relevant``, ``ground_truth``,
            ``kept`` (kernels in the effective mask), ``true_positives``, ``precision``
            (``true_positives / kept``, 0 when nothing is kept), ``recall``
            (``true_positives / ground_truth``), ``pearson`` (held-out preservation, ``nan``
            for a constant response), ``collapsed``, ``seconds``.
        cases: one dict per architecture × seed: ``architecture, seed, relevant,
            ground_truth, duplicate_pairs, composition``.
        n_images: scoring images per case.

    Example:
        >>> rep = planted_benchmark(seeds=(0,), n_images=8, criteria=("magnitude",))
        >>> rep.table("recall")["residual"]["1×GT"]
        {'magnitude': 0.0}
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    cases: list[dict[str, Any]] = field(default_factory=list)
    n_images: int = 0

    def table(self, metric: str = "recall") -> dict[str, dict[str, dict[str, float]]]:
        """Median of a metric over seeds: ``{architecture: {keep_label: {criterion: value}}}``.

        Args:
            metric: ``"precision"``, ``"recall"``, ``"pearson"`` (``nan`` counts as 0: a
                constant response preserves nothing), ``"keep"`` or ``"kept"``.

        Returns:
            nested dicts in row order (architectures, keep labels, criteria as first seen).

        Raises:
            PlantedError: unknown metric.

        Example:
            >>> report.table("recall")["sequential"]["1×GT"]["actgrad"]  # doctest: +SKIP
            1.0
        """
        if metric not in ("precision", "recall", "pearson", "keep", "kept"):
            raise PlantedError(f"unknown metric {metric!r}")
        groups: dict[str, dict[str, dict[str, list[float]]]] = {}
        for r in self.rows:
            cell = groups.setdefault(r["architecture"], {}).setdefault(r["keep_label"], {})
            cell.setdefault(r["criterion"], []).append(_nan_to_zero(r[metric]))
        return {
            arch: {label: {c: statistics.median(v) for c, v in crits.items()}
                   for label, crits in labels.items()}
            for arch, labels in groups.items()
        }

    def to_markdown(self) -> str:
        """Markdown: per architecture, median precision / recall and preservation tables.

        Returns:
            the document (criteria as columns, keep labels as rows).

        Example:
            >>> print(report.to_markdown())  # doctest: +SKIP
        """
        seeds = sorted({r["seed"] for r in self.rows})
        lines = [
            "# Planted-circuit benchmark",
            "",
            f"Seeds {', '.join(map(str, seeds))}; {self.n_images} scoring images per case "
            "(held-out preservation on separate images). Cells are medians over seeds.",
            "Ground truth = the planted circuit: kernels whose removal alone, or together "
            "with their duplicate copy, changes the target `head:0` (see `netcarve.planted`).",
            "Precision and recall compare the circuit's effective mask with it; keep `m×GT` "
            "is m × |ground truth| / |relevant|.",
        ]
        prec, rec, pres, keep, kept = (
            self.table(m) for m in ("precision", "recall", "pearson", "keep", "kept"))
        for arch, labels in rec.items():
            cases = [c for c in self.cases if c["architecture"] == arch]
            crits = list(next(iter(labels.values())))
            lines += ["", f"## {arch}", ""]
            if cases:
                first = cases[0]
                lines.append(
                    f"Ground truth {_span([c['ground_truth'] for c in cases])} of "
                    f"{_span([c['relevant'] for c in cases])} relevant kernels, "
                    f"{_span([c['duplicate_pairs'] for c in cases])} duplicate pairs. "
                    f"Relevant kernels by kind (seed {first['seed']}): "
                    + ", ".join(f"{k} {v}" for k, v in first["composition"].items()) + ".")
                lines.append("")
            lines += ["Precision / recall:", "",
                      "| keep | " + " | ".join(crits) + " |", "|---|" + "---|" * len(crits)]
            for label in labels:
                cells = [f"{prec[arch][label][c]:.2f} / {rec[arch][label][c]:.2f}"
                         for c in crits]
                frac = next(iter(keep[arch][label].values()))
                lines.append(f"| {label} ({frac:.3f}) | " + " | ".join(cells) + " |")
            lines += ["", "Held-out preservation (Pearson r; a constant response counts as 0):",
                      "", "| keep | " + " | ".join(crits) + " |", "|---|" + "---|" * len(crits)]
            for label in labels:
                cells = [f"{pres[arch][label][c]:.3f}" for c in crits]
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
            lines += ["", "Kernels kept after the effective mask (0 = no path left):", "",
                      "| keep | " + " | ".join(crits) + " |", "|---|" + "---|" * len(crits)]
            for label in labels:
                cells = [f"{kept[arch][label][c]:g}" for c in crits]
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def write_csv(self, path: str | Path) -> Path:
        """Write every row as CSV (columns :data:`COLUMNS`).

        Args:
            path: the file to write (parent folders are created).

        Returns:
            the path written.

        Example:
            >>> report.write_csv("out/planted.csv")  # doctest: +SKIP
        """
        return write_rows(path, self.rows, COLUMNS)

    def plot(self, path: str | Path) -> Path:
        """PNG: median recall (top) and precision (bottom) vs keep, one column per
        architecture, one line per criterion; a dotted line marks the ground-truth keep.

        Args:
            path: the PNG to write (parent folders are created).

        Returns:
            the path written.

        Raises:
            PlantedError: matplotlib is not installed, or the report has no rows.

        Example:
            >>> report.plot("out/planted.png")  # doctest: +SKIP
        """
        try:
            import matplotlib
        except ImportError as exc:
            raise PlantedError(
                "plotting needs matplotlib: pip install 'netcarve[report]'") from exc
        if not self.rows:
            raise PlantedError("nothing to plot: the report has no rows")
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rec, prec, keep = self.table("recall"), self.table("precision"), self.table("keep")
        archs = list(rec)
        fig, axes = plt.subplots(2, len(archs), figsize=(5.2 * len(archs), 7.0),
                                 squeeze=False, sharey=True)
        for col, arch in enumerate(archs):
            labels = list(rec[arch])
            crits = list(rec[arch][labels[0]])
            xs = [statistics.median(keep[arch][lab].values()) for lab in labels]
            gt = [c["ground_truth"] / c["relevant"] for c in self.cases
                  if c["architecture"] == arch]
            for row, (table, name) in enumerate(((rec, "recall"), (prec, "precision"))):
                ax = axes[row][col]
                for j, crit in enumerate(crits):
                    # distinct dashes and shrinking markers keep coinciding curves visible
                    ax.plot(xs, [table[arch][lab][crit] for lab in labels], marker="o",
                            markersize=max(3.0, 9.0 - 1.5 * j), alpha=0.85,
                            linestyle=_LINESTYLES[j % len(_LINESTYLES)], label=crit)
                if gt:
                    ax.axvline(statistics.median(gt), color="grey", linestyle=":",
                               label="|GT| / |relevant|")
                ax.set_xscale("log")
                ax.set_ylim(-0.05, 1.05)
                ax.grid(alpha=0.3)
                ax.set_xlabel("keep (fraction of relevant kernels)")
                ax.set_ylabel(f"median {name}")
                ax.set_title(f"{arch}: {name} of the planted circuit")
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def _keep_plan(case: PlantedCase, keeps: Sequence[float] | None) -> list[tuple[str, float]]:
    if keeps is None:
        return [(f"{m:g}×GT", min(1.0, m * case.gt_keep)) for m in GT_MULTIPLES]
    return [(f"{k:g}", float(k)) for k in sorted(keeps)]


def planted_benchmark(
    *,
    architectures: Sequence[str] = ARCHITECTURES,
    criteria: Sequence[str] = ("actgrad", "snip", "force", "magnitude", "random"),
    keeps: Sequence[float] | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    n_images: int = 256,
) -> PlantedReport:
    """Measure how well each criterion recovers the planted circuits.

    For every architecture × seed a :class:`PlantedCase` is built; every criterion scores the
    relevant kernels once on the scoring images (FORCE once per keep, its schedule depends on
    it), keeps exactly ``round(keep × relevant)`` by global top-k
    (:func:`~netcarve.circuit.select_top_k`), applies the effective mask, and the result is
    compared with the ground truth; preservation is measured on held-out images. This is what
    :func:`~netcarve.circuit.extract` does, with the scores shared across keeps.

    Args:
        architectures: any of :data:`ARCHITECTURES`.
        criteria: saliency criterion names.
        keeps: keep fractions in (0, 1]; None: ``m × |GT| / |relevant|`` for ``m`` in
            :data:`GT_MULTIPLES` (0.5, 1, 2) per case, labelled ``"0.5×GT"`` etc.
        seeds: construction seeds (also the random criterion's seed).
        n_images: scoring images per case (held-out: half as many).

    Returns:
        A :class:`PlantedReport`.

    Raises:
        PlantedError: unknown architecture, keep outside (0, 1], no seeds, fewer than 2 images.
        CriterionError: unknown criterion.

    Example:
        >>> rep = planted_benchmark(architectures=("sequential",), seeds=(0,), n_images=32,
        ...                         criteria=("actgrad", "magnitude"))
        >>> [(r["criterion"], r["recall"]) for r in rep.rows if r["keep_label"] == "1×GT"]
        [('actgrad', 1.0), ('magnitude', 0.0)]
    """
    for arch in architectures:
        if arch not in ARCHITECTURES:
            raise PlantedError(
                f"unknown architecture {arch!r}; use one of {', '.join(ARCHITECTURES)}")
    for crit in criteria:
        get_criterion(crit)
    if keeps is not None:
        if not keeps:
            raise PlantedError("keeps is empty (pass None for multiples of the ground truth)")
        for k in keeps:
            if not (isinstance(k, (int, float)) and 0 < k <= 1):
                raise PlantedError(f"keep must be in (0, 1], got {k!r}")
    if not seeds:
        raise PlantedError("no seeds given")
    if n_images < 2:
        raise PlantedError(f"need at least 2 scoring images, got {n_images}")
    report = PlantedReport(n_images=n_images)
    for arch in architectures:
        for seed in seeds:
            case = build_planted(arch, seed, n_images=n_images)
            report.cases.append({
                "architecture": arch, "seed": int(seed), "relevant": case.n_relevant,
                "ground_truth": case.n_ground_truth, "duplicate_pairs": len(case.duplicates),
                "composition": case.composition(),
            })
            report.rows += _run_case(case, criteria, _keep_plan(case, keeps))
    return report


def _run_case(
    case: PlantedCase, criteria: Sequence[str], plan: list[tuple[str, float]]
) -> list[dict[str, Any]]:
    graph, model = case.graph, case.model
    target = Target.parse(case.target).resolve(graph)
    relevant = case.relevant
    n_gt = case.n_ground_truth
    original = list(target_responses(model, graph, target, case.heldout, batch_size=256))
    rows = []
    for crit in criteria:
        scores = None
        for label, keep in plan:
            start = time.perf_counter()
            if scores is None or crit == "force":
                scores = score_kernels(model, graph, target, case.images, criterion=crit,
                                       keep=keep, relevant=relevant, seed=case.seed)
            k = keep_count(keep, relevant)
            raw = select_top_k(scores, relevant, k)
            masks, collapsed = graph.effective_mask(raw, target.layer, target.channels)
            pres = measure_preservation(model, graph, target, masks, case.heldout,
                                        batch_size=256, original=original)
            kept = count(masks)
            tp = sum(int((masks[n] & case.ground_truth[n]).sum()) for n in masks)
            rows.append({
                "architecture": case.architecture, "seed": case.seed, "criterion": crit,
                "keep_label": label, "keep": keep, "k": k, "relevant": case.n_relevant,
                "ground_truth": n_gt, "kept": kept, "true_positives": tp,
                "precision": tp / kept if kept else 0.0, "recall": tp / n_gt,
                "pearson": pres.pearson, "collapsed": collapsed,
                "seconds": time.perf_counter() - start,
            })
    return rows


def run_planted(out_dir: Path, *, quick: bool = False, seed: int = 0) -> dict[str, Any]:
    """Run the planted-circuit benchmark and write ``planted.md``, ``planted.csv`` and
    ``planted.png`` into ``out_dir``.

    Args:
        out_dir: output folder (created).
        quick: one seed and 32 scoring images (about 10 s on 2 busy CPU cores); otherwise
            seeds ``seed``, ``seed + 1``, ``seed + 2`` and 256 images (about 2 minutes).
        seed: first construction seed.

    Returns:
        ``{"quick", "seeds", "n_images", "seconds", "files": {"markdown", "csv", "plot"},
        "recall_at_gt", "precision_at_gt", "preservation_at_gt"}``; the last three map
        ``architecture → criterion → median`` at keep ``1×GT``.

    Raises:
        PlantedError: matplotlib is missing (the markdown and CSV are written first).

    Example:
        >>> summary = run_planted(Path("out/planted"), quick=True)  # doctest: +SKIP
        >>> summary["recall_at_gt"]["residual"]["actgrad"]  # doctest: +SKIP
        1.0
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seeds = (seed,) if quick else tuple(range(seed, seed + 3))
    n_images = 32 if quick else 256
    report = planted_benchmark(seeds=seeds, n_images=n_images)
    files = {
        "markdown": str(out_dir / "planted.md"),
        "csv": str(out_dir / "planted.csv"),
        "plot": str(out_dir / "planted.png"),
    }
    Path(files["markdown"]).write_text(report.to_markdown())
    report.write_csv(files["csv"])
    report.plot(files["plot"])

    def at_gt(metric: str) -> dict[str, dict[str, float]]:
        """``{architecture: {criterion: median}}`` at keep ``1×GT``."""
        return {arch: labels.get("1×GT", {}) for arch, labels in report.table(metric).items()}

    return {
        "quick": quick,
        "seeds": list(seeds),
        "n_images": n_images,
        "seconds": round(time.perf_counter() - start, 2),
        "files": files,
        "recall_at_gt": at_gt("recall"),
        "precision_at_gt": at_gt("precision"),
        "preservation_at_gt": at_gt("pearson"),
    }
