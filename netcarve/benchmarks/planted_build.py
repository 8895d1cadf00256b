"""Weights of the planted-circuit networks: channel roles, kernel kinds, taps and biases.

Internal to :mod:`netcarve.benchmarks.planted_models` (which documents the construction).
Every stage (one convolution) is built from the *roles* of its output channels and the
*states* of its input channels; it returns the kernel kinds, the weights, the biases and an
interval bound of its post-ReLU output that the next stage needs for its own biases.

Weak kernels (kind ``WEAK``) are drawn whatever ``eps`` is and then scaled by it, and every
bias and bound is computed with them at ``max(eps, EPS_BOUND)``, so two builds of one seed
with ``eps <= EPS_BOUND`` differ only in the weak kernels' weights and in the gated channel's
bias (calibrated on the network as built): the difficulty is graded on the same network.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

ZERO, GROUND_TRUTH, SILENT_INPUT, DEAD_OUTPUT, UNREACHING, IRRELEVANT, WEAK, CANCELLING = (
    range(8))

GATE_OPEN = 0.15
"""Fraction of calibration images on which a gated channel opens (anywhere in the map)."""

EPS_BOUND = 0.2
"""Biases and bounds are computed with weak kernels at ``max(eps, EPS_BOUND)``: builds with
any ``eps <= EPS_BOUND`` share them."""

GATE_GAIN = 1.0
"""Kernels out of a gated channel have taps ``GATE_GAIN`` × [0.5, 1.5]."""

_GT_TAPS = (0.02, 0.2)
_BIG_TAPS = (0.5, 1.5)
_P_GT = 0.6  # chance that a possible ground-truth kernel is present (the rest become weak)
_P_BIG = 0.6  # chance that a possible large non-ground-truth kernel is present
_P_NEGATIVE = 0.25  # chance that a ground-truth kernel outside positive rows is negative
_LIVE_OUT = ("G", "gate")  # roles whose channels carry the circuit


@dataclass
class Stage:
    """One built convolution.

    Attributes:
        weight: taps with weak kernels scaled by ``eps`` (what the model gets).
        bias: biases (identical for every ``eps``).
        kinds: kernel kinds ``int64 [out, in]``.
        ub: upper bound of each output channel after the ReLU (for ``eps <= EPS_BOUND``).
        calib: post-ReLU activations of the calibration images (None when the stage got
            none).
        cancel_pairs: output channel pairs ``(a, b)`` that cancel in the next stage.
        gates: output channels that are gated.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    kinds: torch.Tensor
    ub: torch.Tensor
    calib: torch.Tensor | None
    cancel_pairs: list[tuple[int, int]] = field(default_factory=list)
    gates: list[int] = field(default_factory=list)


def roles_in_order(gen: torch.Generator, counts: Sequence[tuple[str, int]]) -> list[str]:
    """Channel roles, shuffled (seeded) so no role sits at a fixed index."""
    roles = [role for role, n in counts for _ in range(n)]
    order = torch.randperm(len(roles), generator=gen).tolist()
    return [roles[j] for j in order]


def states(roles: Sequence[str]) -> list[str]:
    """Channel states of roles: ``G`` live and reaching, ``O`` live orphan, ``C`` one half
    of a cancelling pair, ``Z`` zero on the data."""
    table = {"G": "G", "gate": "G", "orphan": "O", "cancel_a": "C", "cancel_b": "C"}
    return [table.get(r, "Z") for r in roles]


def cancel_pairs(roles: Sequence[str]) -> list[tuple[int, int]]:
    """The ``(cancel_a, cancel_b)`` channel pair of roles (at most one pair per stage)."""
    a = [c for c, r in enumerate(roles) if r == "cancel_a"]
    b = [c for c, r in enumerate(roles) if r == "cancel_b"]
    return list(zip(a, b, strict=True))


def _rule(out_role: str, in_state: str) -> int:
    """Kind of a possible kernel from a channel in ``in_state`` into one with ``out_role``."""
    if in_state == "Z":
        return SILENT_INPUT
    if out_role in _LIVE_OUT:
        return GROUND_TRUTH if in_state == "G" else ZERO
    if out_role in ("cancel_a", "cancel_b"):
        return CANCELLING if in_state == "G" else ZERO
    if out_role == "dead":
        return DEAD_OUTPUT
    if out_role == "orphan":
        return UNREACHING
    return ZERO  # a silent channel reads no live channel


def fill_kinds(
    gen: torch.Generator,
    out_roles: Sequence[str],
    in_states: Sequence[str],
    *,
    cover: Sequence[int] = (),
    cancel_in: Sequence[tuple[int, int]] = (),
    weak: bool = True,
) -> torch.Tensor:
    """Kernel kinds ``int64 [out, in]`` for one conv.

    A possible ground-truth kernel into a ``G`` channel that is not drawn becomes ``WEAK``
    (``ZERO`` when ``weak`` is False); gated channels get no weak input. Every live output
    gets at least one ground-truth kernel, every input in ``cover`` at least one into a ``G``
    output, each cancelling input pair feeds one ``G`` output through both of its halves,
    and both halves of a cancelling output pair read the same inputs.
    """
    n_out, n_in = len(out_roles), len(in_states)
    kinds = torch.zeros(n_out, n_in, dtype=torch.int64)
    draws = torch.rand(n_out, n_in, generator=gen)
    for o, role in enumerate(out_roles):
        for i, state in enumerate(in_states):
            kind = _rule(role, state)
            p = _P_GT if kind == GROUND_TRUTH else _P_BIG
            if kind == ZERO:
                continue
            if draws[o, i] < p:
                kinds[o, i] = kind
            elif kind == GROUND_TRUTH and role == "G" and weak:
                kinds[o, i] = WEAK
    live_in = [i for i, s in enumerate(in_states) if s == "G"]
    g_out = [o for o, r in enumerate(out_roles) if r == "G"]

    def pick(options: list[int]) -> int:
        return options[int(torch.randint(len(options), (1,), generator=gen))]

    for o in [o for o, r in enumerate(out_roles) if r in _LIVE_OUT]:
        if not (kinds[o] == GROUND_TRUTH).any():
            kinds[o, pick(live_in)] = GROUND_TRUTH
    for i in cover:
        if not (kinds[g_out, i] == GROUND_TRUTH).any():
            kinds[pick(g_out), i] = GROUND_TRUTH
    for a, b in cancel_in:
        o = pick(g_out)
        kinds[o, a] = kinds[o, b] = CANCELLING
    for a, b in cancel_pairs(out_roles):
        if not (kinds[a] == CANCELLING).any():
            kinds[a, pick(live_in)] = CANCELLING
        kinds[b] = kinds[a]
    return kinds


def weights(
    gen: torch.Generator,
    kinds: torch.Tensor,
    out_roles: Sequence[str],
    *,
    positive: bool,
    eps: float,
    cancel_in: Sequence[tuple[int, int]] = (),
    gate_in: Sequence[int] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """3×3 taps ``float64 [out, in, 3, 3]``: ``(weights, bound weights)``; the bound weights
    have the weak taps at ``max(eps, EPS_BOUND)``.

    Ground truth: taps in [0.02, 0.2], positive when ``positive`` (else negative with chance
    0.25, keeping one positive ground-truth kernel per output); into a gated channel:
    positive taps in [0.5, 1.5]; out of one (``gate_in``): :data:`GATE_GAIN` times that (the
    gated path only acts on the images where it opens, so it is strong there). Weak: ``eps``
    × taps in [0.02, 0.2] of random sign. Cancelling: positive taps in [0.5, 1.5] into both
    halves of a pair (the same taps), and ``+V`` / ``-V`` (the same ``V``) from the two
    halves of an input pair. Other non-zero kinds: taps of random sign
    with ``|w|`` in [0.5, 1.5]. ``IRRELEVANT``: N(0, 0.3²).
    """
    n_out, n_in = kinds.shape
    shape = (n_out, n_in, 3, 3)

    def uniform(lo_hi: tuple[float, float]) -> torch.Tensor:
        lo, hi = lo_hi
        return lo + (hi - lo) * torch.rand(*shape, generator=gen, dtype=torch.float64)

    small, big, weak_taps = uniform(_GT_TAPS), uniform(_BIG_TAPS), uniform(_GT_TAPS)
    big_sign = torch.where(torch.rand(*shape, generator=gen) < 0.5, -1.0, 1.0).double()
    weak_sign = torch.where(torch.rand(n_out, n_in, generator=gen) < 0.5, -1.0, 1.0).double()
    gt_sign = torch.where(torch.rand(n_out, n_in, generator=gen) < _P_NEGATIVE, -1.0, 1.0)
    noise = 0.3 * torch.randn(*shape, generator=gen, dtype=torch.float64)
    gt = kinds == GROUND_TRUTH
    for o, role in enumerate(out_roles):
        if positive or role == "gate":
            gt_sign[o] = 1.0
        row = gt[o]
        if row.any() and not (gt_sign[o][row] > 0).any():
            gt_sign[o, int(torch.nonzero(row)[0])] = 1.0
    w = torch.zeros(*shape, dtype=torch.float64)
    w[gt] = (small * gt_sign[:, :, None, None].double())[gt]
    into_gate = torch.zeros_like(gt)
    into_gate[[o for o, r in enumerate(out_roles) if r == "gate"]] = True
    into_gate &= gt
    w[into_gate] = big[into_gate]
    out_of_gate = torch.zeros_like(gt)
    out_of_gate[:, list(gate_in)] = True
    out_of_gate &= gt
    w[out_of_gate] = GATE_GAIN * big[out_of_gate]
    cancel = kinds == CANCELLING
    other = (kinds != ZERO) & ~gt & ~cancel & (kinds != IRRELEVANT) & (kinds != WEAK)
    w[other] = (big * big_sign)[other]
    w[cancel] = big[cancel]
    for a, b in cancel_pairs(out_roles):
        w[b] = w[a]
    for a, b in cancel_in:
        rows = kinds[:, a] == CANCELLING
        w[rows, b] = -w[rows, a]
    w[kinds == IRRELEVANT] = noise[kinds == IRRELEVANT]
    weak = kinds == WEAK
    taps = (weak_taps * weak_sign[:, :, None, None])[weak]
    full = w.clone()
    full[weak] = max(eps, EPS_BOUND) * taps
    w[weak] = eps * taps
    return w, full


def reach_up(w: torch.Tensor, ub_in: torch.Tensor) -> torch.Tensor:
    """Upper bound of ``Σ_i w_oi ⋆ x_i`` for inputs in ``[0, ub_in]`` (per output)."""
    return (w.clamp(min=0).sum(dim=(2, 3)) * ub_in[None, :]).sum(dim=1)


def reach_abs(w: torch.Tensor, ub_in: torch.Tensor) -> torch.Tensor:
    """Bound of ``|Σ_i w_oi ⋆ x_i|`` under any subset of kernels, inputs in ``[0, ub_in]``."""
    return (w.abs().sum(dim=(2, 3)) * ub_in[None, :]).sum(dim=1)


def open_shift(w: torch.Tensor, kinds: torch.Tensor, ub_in: torch.Tensor) -> torch.Tensor:
    """Bound of the negative ground-truth and weak contributions into each output: a live
    channel's bias (or BatchNorm shift) above it keeps its ReLU open on all data, whatever
    subset of those kernels is kept."""
    circuit = (kinds == GROUND_TRUTH) | (kinds == WEAK)
    return reach_up((-w).clamp(min=0) * circuit[:, :, None, None], ub_in)


def _conv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """The networks' 3×3 convolution (replicate padding) as a function."""
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), w, b)


def gate_threshold(pre: torch.Tensor) -> torch.Tensor:
    """Per channel, the ``1 - GATE_OPEN`` quantile over images of the map's maximum of the
    pre-bias response ``pre [N, C, H, W]``: minus it is a gated channel's bias."""
    return torch.quantile(pre.amax(dim=(2, 3)), 1.0 - GATE_OPEN, dim=0)


def build_stage(
    gen: torch.Generator,
    out_roles: Sequence[str],
    in_states: Sequence[str],
    ub_in: torch.Tensor,
    *,
    eps: float,
    positive: bool = False,
    cover: Sequence[int] = (),
    cancel_in: Sequence[tuple[int, int]] = (),
    gate_in: Sequence[int] = (),
    calib_in: torch.Tensor | None = None,
) -> Stage:
    """Kinds, weights and biases of one conv (3×3, padding 1) followed by a ReLU.

    Biases: live ``[0, 0.05]`` above the bound of the negative circuit inputs; dead below
    minus the bound of its input; gated minus :func:`gate_threshold` of the calibration
    images (``calib_in`` is required then); silent, orphan and cancelling 0.
    """
    kinds = fill_kinds(gen, out_roles, in_states, cover=cover, cancel_in=cancel_in)
    w, full = weights(gen, kinds, out_roles, positive=positive, eps=eps, cancel_in=cancel_in,
                      gate_in=gate_in)
    b = 0.05 * torch.rand(len(out_roles), generator=gen, dtype=torch.float64)
    b += open_shift(full, kinds, ub_in)
    bound = reach_abs(full, ub_in)
    gates = [o for o, r in enumerate(out_roles) if r == "gate"]
    if gates:
        if calib_in is None:
            raise ValueError("a stage with a gated channel needs calibration images")
        pre = _conv(calib_in, w[gates])
        b[gates] = -gate_threshold(pre)
    for o, role in enumerate(out_roles):
        if role == "dead":
            b[o] = -(bound[o] + 1.0)
        elif role not in _LIVE_OUT:
            b[o] = 0.0
    ub = (b + reach_up(full, ub_in)).clamp(min=0)
    calib = None if calib_in is None else F.relu(_conv(calib_in, w, b))
    return Stage(weight=w, bias=b, kinds=kinds, ub=ub, calib=calib,
                 cancel_pairs=cancel_pairs(out_roles), gates=gates)


def head_stage(
    gen: torch.Generator,
    in_states: Sequence[str],
    *,
    eps: float,
    out_channels: int,
    cancel_in: Sequence[tuple[int, int]] = (),
    gate_in: Sequence[int] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Head kinds and weights: row 0 is the target (every live input covered, weak inputs,
    the cancelling pair), the other rows irrelevant. Returns ``(kinds, weights)``."""
    live = [i for i, s in enumerate(in_states) if s == "G"]
    row0 = fill_kinds(gen, ["G"], in_states, cover=live, cancel_in=cancel_in)
    rest = torch.full((out_channels - 1, len(in_states)), IRRELEVANT, dtype=torch.int64)
    kinds = torch.cat([row0, rest])
    roles = ["G"] + ["irrelevant"] * (out_channels - 1)
    w, _ = weights(gen, kinds, roles, positive=False, eps=eps, cancel_in=cancel_in,
                   gate_in=gate_in)
    return kinds, w


Kernel = tuple[str, int, int]


@dataclass
class Built:
    """What a builder returns besides the model's weights."""

    model: nn.Module
    kinds: dict[str, torch.Tensor]
    maxouts: list[str]
    gated: list[tuple[str, str, int]]  # (layer, "row" | "col", channel) of the gated path
    cancelling: list[tuple[Kernel, Kernel]]


def mirrors_in(layer: str, stage: Stage) -> list[tuple[Kernel, Kernel]]:
    """Kernel pairs into the two halves of a stage's cancelling pair."""
    return [((layer, a, i), (layer, b, i)) for a, b in stage.cancel_pairs
            for i in torch.nonzero(stage.kinds[a] == CANCELLING).flatten().tolist()]


def mirrors_out(layer: str, kinds: torch.Tensor,
                 pairs: list[tuple[int, int]]) -> list[tuple[Kernel, Kernel]]:
    """Kernel pairs out of the two halves of cancelling input pairs."""
    return [((layer, o, a), (layer, o, b)) for a, b in pairs
            for o in torch.nonzero(kinds[:, a] == CANCELLING).flatten().tolist()]


def input_states(live_in: list[int], channels: int) -> tuple[list[str], torch.Tensor]:
    """States and bounds of the input channels (live ones in [0, 1], the rest 0)."""
    st = ["G" if c in live_in else "Z" for c in range(channels)]
    return st, torch.tensor([1.0 if s == "G" else 0.0 for s in st], dtype=torch.float64)


def live_channels(st: list[str]) -> list[int]:
    """Indices of the live channels of states."""
    return [i for i, s in enumerate(st) if s == "G"]
