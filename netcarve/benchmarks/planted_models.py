"""Planted-circuit networks: small CNNs whose weights are set by hand so that the kernels a
target depends on are known exactly (the ground truth), with distractor kernels of known kinds
(zero, silent input, dead, cancelling, ...) around them. :func:`build_planted` returns a
:class:`PlantedCase`: the model, its target, the ground-truth kernel masks and the images."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from netcarve.circuits.circuit import count
from netcarve.core.errors import NetcarveError
from netcarve.core.graph import ModelGraph
from netcarve.core.targets import Target

__all__ = [
    "ARCHITECTURES",
    "COLUMNS",
    "GT_MULTIPLES",
    "KIND_NAMES",
    "Maxout",
    "PlantedCase",
    "PlantedError",
    "PlantedResidual",
    "PlantedSequential",
    "build_planted",
    "planted_images",
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
        graph: the model's :class:`~netcarve.core.graph.ModelGraph`.
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
