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

from netcarve.benchmarks.planted_build import (
    CANCELLING,
    DEAD_OUTPUT,
    GATE_OPEN,
    GROUND_TRUTH,
    IRRELEVANT,
    SILENT_INPUT,
    UNREACHING,
    WEAK,
    ZERO,
    Built,
    Kernel,
    build_stage,
    fill_kinds,
    head_stage,
    input_states,
    live_channels,
    mirrors_in,
    mirrors_out,
    open_shift,
    reach_abs,
    roles_in_order,
    states,
    weights,
)
from netcarve.circuits.circuit import count
from netcarve.core.errors import NetcarveError
from netcarve.core.graph import ModelGraph
from netcarve.core.targets import Target

__all__ = [
    "ARCHITECTURES",
    "CANCELLING",
    "COLUMNS",
    "EPSILONS",
    "GATE_OPEN",
    "GROUND_TRUTH",
    "GT_MULTIPLES",
    "KIND_NAMES",
    "WEAK",
    "ZERO",
    "Maxout",
    "PlantedCase",
    "PlantedConcat",
    "PlantedError",
    "PlantedResidual",
    "PlantedSequential",
    "build_planted",
    "planted_images",
]

ARCHITECTURES = ("sequential", "residual", "concat")
"""Architectures :func:`build_planted` knows."""

EPSILONS = (0.0, 0.02, 0.05, 0.1, 0.2)
"""Weak-distractor strengths of the graded benchmark (``eps``)."""

GT_MULTIPLES = (0.5, 1.0, 2.0)
"""Keep fractions used when ``keeps=None``: these multiples of ``|GT| / |relevant|``."""

KIND_NAMES = {
    ZERO: "zero",
    GROUND_TRUTH: "ground_truth",
    SILENT_INPUT: "silent_input",
    DEAD_OUTPUT: "dead_output",
    UNREACHING: "unreaching",
    IRRELEVANT: "irrelevant",
    WEAK: "weak",
    CANCELLING: "cancelling",
}
"""Kernel kinds (codes in :attr:`PlantedCase.kinds`)."""

COLUMNS = [
    "architecture", "seed", "eps", "criterion", "keep_label", "keep", "k", "relevant",
    "ground_truth", "kept", "true_positives", "precision", "recall", "gated_recall",
    "kept_weak", "kept_cancelling", "cancel_halves", "pearson", "collapsed", "seconds",
]
"""Columns of :meth:`PlantedReport.write_csv` (the keys of every row)."""

IN_CHANNELS = 6
LIVE_INPUTS = 3
WIDTH = 12
OUT_CHANNELS = 4
SIZE = 16
TARGET = "head:0"
CONTRAST = (0.2, 1.0)
"""Range of the per-image contrast that scales the live input channels."""


class PlantedError(NetcarveError):
    """Bad planted-benchmark arguments (unknown architecture, keep outside (0, 1], ...)."""


# ---------------------------------------------------------------------------- networks


def _conv(cin: int, cout: int, bias: bool = True) -> nn.Conv2d:
    """A 3×3 conv with replicate padding: a channel's constant part (its bias, shifted up to
    keep its ReLU open) then stays constant at the borders instead of drawing a border pattern
    that would dominate the target's variance."""
    return nn.Conv2d(cin, cout, 3, padding=1, padding_mode="replicate", bias=bias)


class Maxout(nn.Module):
    """Two convolutions of the same input merged by an element-wise maximum (a maxout unit).

    Layers ``a`` and ``b`` (3×3, padding 1). With identical weights they are duplicate paths.

    Example:
        >>> Maxout(2, 3)(torch.zeros(1, 2, 5, 5)).shape
        torch.Size([1, 3, 5, 5])
    """

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.a = _conv(cin, cout)
        self.b = _conv(cin, cout)

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
        self.conv1 = _conv(cin, width)
        self.conv2 = Maxout(width, width)
        self.conv3 = _conv(width, width)
        self.head = _conv(width, cout)

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
        self.stem = _conv(cin, width)
        self.conv1 = Maxout(width, width)
        self.conv2 = _conv(width, width, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.head = _conv(width, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The head's raw output ``[N, cout, H, W]``."""
        h0 = F.relu(self.stem(x))
        u = F.relu(self.conv1(h0))
        v = self.bn2(self.conv2(u))
        return self.head(F.relu(v + h0))


class PlantedConcat(nn.Module):
    """``stem → ReLU``, two branches ``branch_a`` / ``branch_b`` (each conv → ReLU),
    concatenated (``torch.cat``), then ``head``.

    Layers: ``stem`` (6→12), ``branch_a`` and ``branch_b`` (12→6 each), ``head`` (12→4); the
    output is ``head``'s raw map. :func:`build_planted` sets the weights.

    Example:
        >>> PlantedConcat()(torch.zeros(2, 6, 16, 16)).shape
        torch.Size([2, 4, 16, 16])
    """

    def __init__(self, cin: int = IN_CHANNELS, width: int = WIDTH, cout: int = OUT_CHANNELS):
        super().__init__()
        self.stem = _conv(cin, width)
        self.branch_a = _conv(width, width // 2)
        self.branch_b = _conv(width, width - width // 2)
        self.head = _conv(width, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The head's raw output ``[N, cout, H, W]``."""
        h = F.relu(self.stem(x))
        both = torch.cat([F.relu(self.branch_a(h)), F.relu(self.branch_b(h))], dim=1)
        return self.head(both)


# ---------------------------------------------------------------------------- data


def planted_images(
    n: int,
    live: Sequence[int],
    *,
    generator: torch.Generator,
    channels: int = IN_CHANNELS,
    size: int = SIZE,
    contrast: tuple[float, float] | None = CONTRAST,
) -> torch.Tensor:
    """Images whose ``live`` channels are smooth random fields in [0, 1]; the rest are 0.

    Each image's live channels are scaled by its own contrast, drawn uniformly from
    ``contrast`` (so a gated channel can open on some images and stay shut on the others).

    Args:
        n: number of images.
        live: indices of the live input channels.
        generator: the random generator (consumed).
        channels: input channels.
        size: height and width.
        contrast: ``(low, high)`` in [0, 1], or None for contrast 1 everywhere.

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
    if contrast is not None:
        lo, hi = contrast
        x *= lo + (hi - lo) * torch.rand(n, 1, 1, 1, generator=generator, dtype=torch.float64)
    return x


# ---------------------------------------------------------------------------- construction


def _set(conv: nn.Conv2d, w: torch.Tensor, b: torch.Tensor | None) -> None:
    """Copy weights (and a bias, zero when None) into a conv."""
    with torch.no_grad():
        conv.weight.copy_(w)
        if conv.bias is not None:
            conv.bias.copy_(b if b is not None else torch.zeros(conv.out_channels))


def _build_sequential(gen: torch.Generator, live_in: list[int], calib: torch.Tensor,
                      eps: float) -> Built:
    """The sequential net: maxout ``conv2``; a gated channel and a cancelling pair in
    ``conv3``, read by the head."""
    model = PlantedSequential()
    x_states, ub = input_states(live_in, IN_CHANNELS)
    r1 = roles_in_order(gen, [("G", 4), ("dead", 2), ("silent", 4), ("orphan", 2)])
    s1 = build_stage(gen, r1, x_states, ub, eps=eps, calib_in=calib)
    _set(model.conv1, s1.weight, s1.bias)
    r2 = roles_in_order(gen, [("G", 4), ("dead", 2), ("silent", 4), ("orphan", 2)])
    s2 = build_stage(gen, r2, states(r1), s1.ub, eps=eps, positive=True,
                     cover=live_channels(states(r1)), calib_in=s1.calib)
    _set(model.conv2.a, s2.weight, s2.bias)
    _set(model.conv2.b, s2.weight, s2.bias)
    r3 = roles_in_order(gen, [("G", 3), ("gate", 1), ("cancel_a", 1), ("cancel_b", 1),
                              ("dead", 2), ("silent", 2), ("orphan", 2)])
    s3 = build_stage(gen, r3, states(r2), s2.ub, eps=eps, cover=live_channels(states(r2)),
                     calib_in=s2.calib)
    _set(model.conv3, s3.weight, s3.bias)
    head_kinds, head_w = head_stage(gen, states(r3), eps=eps, out_channels=OUT_CHANNELS,
                                    cancel_in=s3.cancel_pairs, gate_in=s3.gates)
    _set(model.head, head_w, torch.zeros(OUT_CHANNELS))
    kinds = {"conv1": s1.kinds, "conv2.a": s2.kinds, "conv2.b": s2.kinds.clone(),
             "conv3": s3.kinds, "head": head_kinds}
    gated = [("conv3", "row", g) for g in s3.gates] + [("head", "col", g) for g in s3.gates]
    cancelling = mirrors_in("conv3", s3) + mirrors_out("head", head_kinds, s3.cancel_pairs)
    return Built(model, kinds, ["conv2"], gated, cancelling)


def _build_residual(gen: torch.Generator, live_in: list[int], calib: torch.Tensor,
                    eps: float) -> Built:
    """The residual net: a cancelling pair in the stream (skip only), a gated channel in the
    maxout ``conv1``."""
    model = PlantedResidual()
    x_states, ub_x = input_states(live_in, IN_CHANNELS)
    stream = roles_in_order(gen, [("skip", 2), ("blockout", 2), ("both", 1), ("feed", 2),
                                  ("deadend", 1), ("cancel_a", 1), ("cancel_b", 1),
                                  ("silent", 2)])
    # stem: h0 is live for skip / both / feed, a live orphan for deadend, silent for
    # blockout and silent; the cancelling pair reaches the head through the skip only
    stem_roles = [{"skip": "G", "both": "G", "feed": "G", "deadend": "orphan",
                   "cancel_a": "cancel_a", "cancel_b": "cancel_b"}.get(s, "silent")
                  for s in stream]
    s0 = build_stage(gen, stem_roles, x_states, ub_x, eps=eps, calib_in=calib)
    _set(model.stem, s0.weight, s0.bias)
    u_roles = roles_in_order(gen, [("G", 4), ("gate", 1), ("dead", 2), ("silent", 3),
                                   ("orphan", 2)])
    feed = [c for c, s in enumerate(stream) if s == "feed"]
    s1 = build_stage(gen, u_roles, states(stem_roles), s0.ub, eps=eps, positive=True,
                     cover=feed, calib_in=s0.calib)
    _set(model.conv1.a, s1.weight, s1.bias)
    _set(model.conv1.b, s1.weight, s1.bias)
    # conv2 + bn2: v is live where the stream carries block output, an orphan for the feed
    # channels (the head ignores them), dead (BN shift) for the dead-end channel, 0 elsewhere
    v_roles = [{"blockout": "G", "both": "G", "feed": "orphan", "deadend": "dead"}.get(
        s, "silent") for s in stream]
    u_states = states(u_roles)
    k = fill_kinds(gen, v_roles, u_states, cover=live_channels(u_states))
    w, full = weights(gen, k, v_roles, positive=False, eps=eps, gate_in=s1.gates)
    _set(model.conv2, w, None)
    bn = model.bn2
    gamma = 0.5 + torch.rand(WIDTH, generator=gen, dtype=torch.float64)
    var = 0.5 + 1.5 * torch.rand(WIDTH, generator=gen, dtype=torch.float64)
    scale = gamma / torch.sqrt(var + bn.eps)
    beta = torch.zeros(WIDTH, dtype=torch.float64)
    shift = scale * open_shift(full, k, s1.ub) + 0.05 * torch.rand(
        WIDTH, generator=gen, dtype=torch.float64)
    bound = scale * reach_abs(full, s1.ub) + s0.ub
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
    h1_states = [{"skip": "G", "blockout": "G", "both": "G", "feed": "O", "cancel_a": "C",
                  "cancel_b": "C"}.get(s, "Z") for s in stream]
    head_kinds, head_w = head_stage(gen, h1_states, eps=eps, out_channels=OUT_CHANNELS,
                                    cancel_in=s0.cancel_pairs)
    _set(model.head, head_w, torch.zeros(OUT_CHANNELS))
    kinds = {"stem": s0.kinds, "conv1.a": s1.kinds, "conv1.b": s1.kinds.clone(),
             "conv2": k, "head": head_kinds}
    gated = [(f"conv1.{p}", "row", g) for g in s1.gates for p in "ab"]
    gated += [("conv2", "col", g) for g in s1.gates]
    cancelling = mirrors_in("stem", s0) + mirrors_out("head", head_kinds, s0.cancel_pairs)
    return Built(model, kinds, ["conv1"], gated, cancelling)


def _build_concat(gen: torch.Generator, live_in: list[int], calib: torch.Tensor,
                  eps: float) -> Built:
    """The concat net: a gated channel in the stem, a cancelling pair in branch ``a``."""
    model = PlantedConcat()
    x_states, ub = input_states(live_in, IN_CHANNELS)
    r0 = roles_in_order(gen, [("G", 4), ("gate", 1), ("dead", 2), ("silent", 3), ("orphan", 2)])
    s0 = build_stage(gen, r0, x_states, ub, eps=eps, calib_in=calib)
    _set(model.stem, s0.weight, s0.bias)
    h_states = states(r0)
    ra = roles_in_order(gen, [("G", 2), ("cancel_a", 1), ("cancel_b", 1), ("dead", 1),
                              ("orphan", 1)])
    sa = build_stage(gen, ra, h_states, s0.ub, eps=eps, cover=live_channels(h_states),
                     gate_in=s0.gates)
    _set(model.branch_a, sa.weight, sa.bias)
    rb = roles_in_order(gen, [("G", 2), ("dead", 1), ("silent", 2), ("orphan", 1)])
    sb = build_stage(gen, rb, h_states, s0.ub, eps=eps, gate_in=s0.gates)
    _set(model.branch_b, sb.weight, sb.bias)
    head_kinds, head_w = head_stage(gen, states(ra) + states(rb), eps=eps,
                                    out_channels=OUT_CHANNELS, cancel_in=sa.cancel_pairs)
    _set(model.head, head_w, torch.zeros(OUT_CHANNELS))
    kinds = {"stem": s0.kinds, "branch_a": sa.kinds, "branch_b": sb.kinds, "head": head_kinds}
    gated = [("stem", "row", g) for g in s0.gates]
    gated += [(b, "col", g) for g in s0.gates for b in ("branch_a", "branch_b")]
    cancelling = mirrors_in("branch_a", sa) + mirrors_out("head", head_kinds,
                                                             sa.cancel_pairs)
    return Built(model, kinds, [], gated, cancelling)


_BUILDERS = {"sequential": _build_sequential, "residual": _build_residual,
             "concat": _build_concat}


@dataclass
class PlantedCase:
    """One planted network with its data and known circuit for :data:`TARGET` (``head:0``).

    Attributes:
        architecture: one of :data:`ARCHITECTURES`.
        seed: the construction seed.
        eps: the weak-distractor strength.
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
        cancelling: mirror pairs of cancelling kernels (one kernel into or out of each half
            of a cancelling pair): removing one matters, removing both does not.
        gated: ``{layer: bool mask}`` of the ground-truth kernels into and out of the gated
            channel (open on about :data:`GATE_OPEN` of the images).
        gate: ``(layer, channel)`` of the gated channel (for maxout, the first piece).
        live_inputs: the input channels that carry data (the others are 0).

    Example:
        >>> case = build_planted("sequential", n_images=4)
        >>> case.model(case.images).shape, len(case.duplicates) > 0, len(case.cancelling) > 0
        (torch.Size([4, 4, 16, 16]), True, True)
    """

    architecture: str
    seed: int
    eps: float
    model: nn.Module
    target: str
    images: torch.Tensor
    heldout: torch.Tensor
    graph: ModelGraph
    relevant: dict[str, torch.Tensor]
    ground_truth: dict[str, torch.Tensor]
    kinds: dict[str, torch.Tensor]
    duplicates: list[tuple[Kernel, Kernel]]
    cancelling: list[tuple[Kernel, Kernel]]
    gated: dict[str, torch.Tensor]
    gate: tuple[str, int]
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

    def gate_opens(self, images: torch.Tensor) -> torch.Tensor:
        """bool ``[N]``: whether the gated channel is above 0 anywhere on each image.

        Example:
            >>> case = build_planted("concat", n_images=64)
            >>> 0 < int(case.gate_opens(case.images).sum()) < 64
            True
        """
        module = self.model.get_submodule(self.gate[0])
        seen: list[torch.Tensor] = []
        handle = module.register_forward_hook(lambda _m, _i, out: seen.append(out.detach()))
        try:
            with torch.no_grad():
                self.model(images)
        finally:
            handle.remove()
        return (seen[0][:, self.gate[1]] > 0).flatten(1).any(dim=1)

    def kind_mask(self, code: int) -> dict[str, torch.Tensor]:
        """``{layer: bool mask}`` of the relevant kernels of one kind (a :data:`KIND_NAMES`
        code).

        Example:
            >>> case = build_planted("concat", n_images=2, eps=0.1)
            >>> sum(int(m.sum()) for m in case.kind_mask(WEAK).values()) > 0
            True
        """
        return {layer: rel & (self.kinds[layer] == code) for layer, rel in self.relevant.items()}

    def composition(self) -> dict[str, int]:
        """Relevant kernels per kind (the names of :data:`KIND_NAMES` except ``irrelevant``).

        Returns:
            ``{kind: count}``; the counts sum to :attr:`n_relevant`.

        Example:
            >>> comp = build_planted("sequential", n_images=2).composition()
            >>> comp["ground_truth"] == build_planted("sequential", n_images=2).n_ground_truth
            True
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
    eps: float = 0.0,
    n_images: int = 256,
    n_heldout: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> PlantedCase:
    """Build a planted network, its data and its ground-truth circuit (deterministic).

    Builds of one seed with different ``eps`` are the same network except for the weak
    kernels' weights (``eps`` times the same taps); at ``eps = 0`` there are no weak kernels
    (their places are zero kernels).

    Args:
        architecture: one of :data:`ARCHITECTURES` (see the module docstring).
        seed: seeds every random choice (roles, weights, silent inputs, data); the global
            torch RNG is left untouched.
        eps: weak-distractor strength in [0, 1].
        n_images: scoring images.
        n_heldout: held-out images (default ``max(n_images // 2, 2)``).
        dtype: model and data dtype.

    Returns:
        A :class:`PlantedCase`.

    Raises:
        PlantedError: unknown architecture, ``eps`` outside [0, 1] or fewer than 2 images.

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
    if not (isinstance(eps, (int, float)) and 0.0 <= eps <= 1.0):
        raise PlantedError(f"eps must be in [0, 1], got {eps!r}")
    n_heldout = max(n_images // 2, 2) if n_heldout is None else n_heldout
    gen = torch.Generator().manual_seed(int(seed) * 8 + ARCHITECTURES.index(architecture))
    live = sorted(torch.randperm(IN_CHANNELS, generator=gen)[:LIVE_INPUTS].tolist())
    calib = planted_images(512, live, generator=gen)
    with torch.random.fork_rng(devices=[]):  # default inits must not move the global RNG
        built = _BUILDERS[architecture](gen, live, calib, float(eps))
    kinds = built.kinds
    if eps == 0:
        kinds = {n: torch.where(k == WEAK, ZERO, k) for n, k in kinds.items()}
    images = planted_images(n_images, live, generator=gen)
    heldout = planted_images(n_heldout, live, generator=gen)
    model = built.model.to(dtype).eval()
    images, heldout = images.to(dtype), heldout.to(dtype)
    graph = ModelGraph.build(model, images[:1])
    target = Target.parse(TARGET).resolve(graph)
    relevant = graph.relevant_kernels(target.layer, target.channels)
    ground_truth = {name: rel & (kinds[name] == GROUND_TRUTH) for name, rel in relevant.items()}
    duplicates = [
        ((f"{m}.a", int(o), int(i)), (f"{m}.b", int(o), int(i)))
        for m in built.maxouts
        for o, i in torch.nonzero(ground_truth[f"{m}.a"]).tolist()
    ]
    gated = {name: torch.zeros_like(rel) for name, rel in relevant.items()}
    for layer, axis, channel in built.gated:
        if axis == "row":
            gated[layer][channel] = ground_truth[layer][channel]
        else:
            gated[layer][:, channel] = ground_truth[layer][:, channel]
    gate = next((layer, ch) for layer, axis, ch in built.gated if axis == "row")
    return PlantedCase(
        architecture=architecture, seed=int(seed), eps=float(eps), model=model, target=TARGET,
        images=images, heldout=heldout, graph=graph, relevant=relevant,
        ground_truth=ground_truth, kinds=kinds, duplicates=duplicates,
        cancelling=built.cancelling, gated=gated, gate=gate, live_inputs=live,
    )
