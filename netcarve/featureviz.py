"""Feature visualisation: activation maximisation, data-set examples, receptive fields.

**Activation maximisation** (:func:`visualize`) optimises one input image per objective so that
it drives a unit as high as possible. The objectives are the project's targets
(:class:`~netcarve.targets.Target`): a channel (mean of its raw output map over positions), a
neuron (one position of a channel), a direction (a weighted sum of channels, averaged over
positions) or a logit. Many objectives are optimised at once, one per batch item, and they may
sit in different layers. The image is

* parameterised in Fourier space: the coefficients of a real 2-D FFT, scaled by ``1/f^decay``
  (``f`` the spatial frequency in cycles per pixel), so that gradient steps favour the low
  frequencies natural images are made of;
* for RGB models, colour-decorrelated: the three latent channels are mixed by a square root of
  the RGB covariance of real images (:func:`colour_decorrelation`; the default is estimated from
  the coloured-shapes data set, see :data:`SHAPES_RGB_COVARIANCE`), so each latent channel is
  an uncorrelated colour direction; greyscale models use the single latent channel as is;
* squashed to ``[0, 1]`` with a sigmoid and normalised with the model's preset;
* shown to the model through random robustness transforms (:class:`Transforms`): padding, then
  one affine resampling per item that scales, rotates and shifts (jitters) it, drawn from a
  per-item random stream, so an item's optimisation does not depend on the batch it was in
  (up to float rounding in the convolutions, which hundreds of steps can amplify).

Everything is seeded (``seed`` and the item's position), runs on the model's device, and leaves
the model exactly as it was (weights, hooks, training flags, ``requires_grad``). To see a node
*as a circuit computes it*, pass ``circuit=``: the optimisation then runs inside
``circuit.masked(model)``.

**Receptive fields** (:func:`receptive_field`) are derived from the model graph's fx trace by
walking backwards from a layer position through convolutions, pooling (also adaptive pooling),
padding, residual additions and element-wise ops, composing kernel size, stride, padding and
dilation exactly; boxes are clipped to the image.

**Data-set examples** (:func:`dataset_examples`) are the top-k images per channel by the
channel's maximum (or mean) raw response, with the receptive-field box of the peak position.

Example:
    >>> from netcarve.zoo import load_model
    >>> lm = load_model("fmnist_vgg")
    >>> viz = visualize(lm.model, "features.4", channels=[0, 1], preset=lm.preset,
    ...                 steps=32)  # doctest: +SKIP
    >>> viz.images.shape  # doctest: +SKIP
    torch.Size([2, 1, 28, 28])
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .data.stream import Images, as_stream
from .errors import NetcarveError
from .graph import ModelGraph
from .hooks import capture, preserved_state, stop_at
from .targets import Target
from .zoo.preset import Preset

if TYPE_CHECKING:
    from .circuit import Circuit

__all__ = [
    "SHAPES_RGB_COVARIANCE",
    "DatasetExamples",
    "FeatureVisualization",
    "FeatureVizError",
    "ReceptiveFieldError",
    "Transforms",
    "build_graph",
    "colour_covariance",
    "colour_decorrelation",
    "dataset_examples",
    "featureviz_pictures",
    "layer_activations",
    "plot_channel",
    "plot_grid",
    "receptive_field",
    "resolve_targets",
    "to_display",
    "visualize",
]


class FeatureVizError(NetcarveError):
    """Bad feature-visualisation arguments (steps, learning rate, transforms, shapes)."""


class ReceptiveFieldError(FeatureVizError):
    """The receptive field cannot be followed through some operation of the model."""


# --------------------------------------------------------------------------- colour

#: RGB covariance of pixel values (scaled to [0, 1]) of the coloured-shapes data set, measured
#: on ``make_shapes(2000, seed=10_000)`` (the project's analysis seed) at 32×32 by
#: ``colour_covariance(images)``; rounded to 4 decimals. tests/test_featureviz.py re-measures it.
SHAPES_RGB_COVARIANCE: tuple[tuple[float, float, float], ...] = (
    (0.0714, 0.0449, 0.0439),
    (0.0449, 0.0717, 0.0442),
    (0.0439, 0.0442, 0.0723),
)


def colour_covariance(images: torch.Tensor) -> torch.Tensor:
    """The ``C×C`` covariance of pixel colours over a set of images.

    Args:
        images: ``uint8 [N, C, H, W]`` (scaled to [0, 1]) or float images in [0, 1].

    Returns:
        float64 ``[C, C]`` covariance, pixels of all images pooled.

    Raises:
        FeatureVizError: not a 4-D tensor or fewer than two pixels.

    Example:
        >>> colour_covariance(torch.rand(4, 3, 8, 8)).shape
        torch.Size([3, 3])
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise FeatureVizError("images must be a [N, C, H, W] tensor")
    x = images.double() / 255.0 if images.dtype == torch.uint8 else images.double()
    pixels = x.transpose(0, 1).reshape(x.shape[1], -1)
    if pixels.shape[1] < 2:
        raise FeatureVizError("need at least two pixels to estimate a colour covariance")
    return torch.cov(pixels)


def colour_decorrelation(covariance: torch.Tensor | Sequence[Sequence[float]] | None = None
                         ) -> torch.Tensor:
    """The matrix that turns uncorrelated latent colours into correlated RGB.

    It is the symmetric square root ``M = U diag(√λ) Uᵀ`` of the colour covariance (so latent
    white noise becomes noise with the data's colour covariance), divided by its largest column
    norm so that no latent channel is amplified.

    Args:
        covariance: ``C×C`` covariance (default: :data:`SHAPES_RGB_COVARIANCE`).

    Returns:
        float32 ``[C, C]``; ``rgb = M @ latent`` per pixel.

    Raises:
        FeatureVizError: not a square, symmetric matrix.

    Example:
        >>> m = colour_decorrelation()
        >>> m.shape, bool((m.norm(dim=0) <= 1 + 1e-6).all())
        (torch.Size([3, 3]), True)
    """
    cov = torch.as_tensor(SHAPES_RGB_COVARIANCE if covariance is None else covariance,
                          dtype=torch.float64)
    if cov.dim() != 2 or cov.shape[0] != cov.shape[1] or not torch.allclose(cov, cov.T):
        raise FeatureVizError("a colour covariance must be a symmetric square matrix")
    values, vectors = torch.linalg.eigh(cov)
    root = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T
    norm = root.norm(dim=0).max()
    if not norm > 0:
        raise FeatureVizError("the colour covariance is zero")
    return (root / norm).float()


# --------------------------------------------------------------------------- transforms


@dataclass(frozen=True)
class Transforms:
    """Random robustness transforms applied to the image before every forward pass.

    The image (in [0, 1]) is padded by ``pad`` pixels of ``pad_value``, then resampled once
    (bilinear) through an affine map that scales it by a factor drawn uniformly from
    ``scale``, rotates it by an angle drawn uniformly from ``[-rotate, rotate]`` degrees and
    shifts it by up to ``jitter`` pixels in each direction; the result is cropped to the model's
    input size. Each batch item draws its own transform every step.

    Attributes:
        pad: padding in pixels (>= 0).
        jitter: maximum shift in pixels (>= 0).
        scale: ``(low, high)`` scale factors (> 0).
        rotate: maximum rotation in degrees (>= 0).
        pad_value: value of the padding, in [0, 1] image units.

    Example:
        >>> Transforms.for_size(28).jitter
        2
        >>> Transforms.none().is_identity
        True
    """

    pad: int = 2
    jitter: int = 2
    scale: tuple[float, float] = (0.95, 1.05)
    rotate: float = 5.0
    pad_value: float = 0.5

    def __post_init__(self) -> None:
        lo, hi = self.scale
        if self.pad < 0 or self.jitter < 0 or self.rotate < 0:
            raise FeatureVizError("pad, jitter and rotate must be >= 0")
        if not (0 < lo <= hi):
            raise FeatureVizError(f"scale must be (low, high) with 0 < low <= high, got "
                                  f"{self.scale}")

    @classmethod
    def for_size(cls, size: int) -> Transforms:
        """Defaults scaled to the input size: pad and jitter ``max(1, round(size / 14))``
        pixels (2 at 28 px, 16 at 224 px), scale 0.95–1.05, rotation ±5°."""
        step = max(1, round(size / 14))
        return cls(pad=step, jitter=step)

    @classmethod
    def none(cls) -> Transforms:
        """No transform at all (the image is shown as it is)."""
        return cls(pad=0, jitter=0, scale=(1.0, 1.0), rotate=0.0)

    @property
    def is_identity(self) -> bool:
        """True when the transform never changes the image."""
        return self.jitter == 0 and self.scale == (1.0, 1.0) and self.rotate == 0

    def draw(self, generator: torch.Generator) -> list[float]:
        """One random draw ``[scale, angle (radians), dy, dx (pixels)]`` from ``generator``."""
        u = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
        lo, hi = self.scale
        return [lo + (hi - lo) * u[0], math.radians(self.rotate) * (2 * u[1] - 1),
                self.jitter * (2 * u[2] - 1), self.jitter * (2 * u[3] - 1)]

    def apply(self, images: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        """Transform ``images [B, C, H, W]`` with one draw per item (``draws [B, 4]``).

        Returns a tensor of the same shape; differentiable with respect to ``images``.
        """
        if self.is_identity and self.pad == 0:
            return images
        b, _, h, w = images.shape
        p = self.pad
        padded = F.pad(images, (p, p, p, p), value=self.pad_value) if p else images
        hp, wp = h + 2 * p, w + 2 * p
        d = draws.to(torch.float64)
        s, a, dy, dx = d[:, 0], d[:, 1], d[:, 2], d[:, 3]
        cos, sin = torch.cos(a) / s, torch.sin(a) / s
        # Output pixel offsets from the centre (normalised by h/2, w/2) map to padded-image
        # offsets (normalised by hp/2, wp/2) through the rotation/scale in pixel units.
        theta = torch.zeros(b, 2, 3, dtype=torch.float64)
        theta[:, 0, 0] = cos * w / wp
        theta[:, 0, 1] = -sin * h / wp
        theta[:, 0, 2] = 2 * dx / wp
        theta[:, 1, 0] = sin * w / hp
        theta[:, 1, 1] = cos * h / hp
        theta[:, 1, 2] = 2 * dy / hp
        theta = theta.to(device=images.device, dtype=images.dtype)
        grid = F.affine_grid(theta, [b, images.shape[1], h, w], align_corners=False)
        return F.grid_sample(padded, grid, mode="bilinear", padding_mode="border",
                             align_corners=False)


# --------------------------------------------------------------------------- parameterisation


def _spectrum_scale(h: int, w: int, decay: float) -> torch.Tensor:
    """``1 / max(f, 1/max(h, w))^decay`` over the rfft2 grid, normalised to RMS 1."""
    fy = torch.fft.fftfreq(h, dtype=torch.float64)[:, None]
    fx = torch.fft.rfftfreq(w, dtype=torch.float64)[None, :]
    freq = torch.sqrt(fy**2 + fx**2).clamp(min=1.0 / max(h, w))
    scale = freq.pow(-decay)
    return (scale / scale.pow(2).mean().sqrt()).float()


class _ImageParam:
    """The optimised tensor and its map to images in [0, 1]."""

    def __init__(self, n: int, channels: int, h: int, w: int, *, fourier: bool, decay: float,
                 colour: torch.Tensor | None, init_std: float,
                 generators: Sequence[torch.Generator], device: torch.device) -> None:
        self.h, self.w, self.fourier = h, w, fourier
        if fourier:
            shape = (channels, h, w // 2 + 1, 2)
            self.scale = _spectrum_scale(h, w, decay).to(device)[None, None, :, :, None]
        else:
            shape = (channels, h, w)
            self.scale = None
        init = torch.stack([torch.randn(shape, generator=g) for g in generators]) * init_std
        self.tensor = init.to(device).requires_grad_(True)
        self.colour = None if colour is None else colour.to(device)

    def images(self) -> torch.Tensor:
        """``[N, C, H, W]`` float32 images in [0, 1]."""
        x = self.tensor
        if self.fourier:
            assert self.scale is not None
            spec = torch.view_as_complex((x * self.scale).contiguous())
            x = torch.fft.irfft2(spec, s=(self.h, self.w), norm="ortho")
        if self.colour is not None:
            x = torch.einsum("ij,njhw->nihw", self.colour, x)
        return torch.sigmoid(x)


# --------------------------------------------------------------------------- targets


def resolve_targets(
    graph: ModelGraph,
    targets: str | Target | Sequence[str | Target],
    channels: Sequence[int] | None = None,
) -> list[Target]:
    """Turn the ways of naming objectives into resolved :class:`Target` objects.

    Args:
        graph: the model's graph.
        targets: a layer name (all its channels, or ``channels``; ``"logit"`` is the last
            Linear layer), a target string
            (``"features.4:3"``, ``"features.4:3@7,7"`` for a neuron, ``"logit:2"``), a
            :class:`Target` (also a direction), or a list of those (a layer name in a list
            means all its channels).
        channels: with a bare layer name, the channels to use.

    Returns:
        one resolved target per objective, in order.

    Raises:
        GraphError: unknown layer (close names listed) or channel out of range (range given).
        TargetError: malformed target string or position.
        FeatureVizError: ``channels`` given with something other than a layer name, or no
            objective at all.

    Example:
        >>> [str(t) for t in resolve_targets(graph, "features.0", [1, 2])]  # doctest: +SKIP
        ['features.0:1', 'features.0:2']
    """
    if channels is not None and not (isinstance(targets, str) and ":" not in targets):
        raise FeatureVizError("`channels` goes with a bare layer name such as 'features.4'")
    items = [targets] if isinstance(targets, (str, Target)) else list(targets)
    out: list[Target] = []
    for item in items:
        if isinstance(item, Target):
            out.append(item.resolve(graph))
        elif isinstance(item, str) and ":" not in item:
            name = item.strip()
            if name == "logit" and "logit" not in graph.layers:
                linears = [n for n, i in graph.layers.items() if i.kind == "linear"]
                name = linears[-1] if linears else name
            info = graph.layer(name)
            chans = range(info.out_channels) if channels is None else channels
            for c in chans:
                graph.check_channel(info.name, c)
                out.append(Target(info.name, channel=int(c)))
        elif isinstance(item, str):
            out.append(Target.parse(item).resolve(graph))
        else:
            raise FeatureVizError(f"cannot use {item!r} as an objective: give a layer name, a "
                                  "target string or a Target")
    if not out:
        raise FeatureVizError("no objective to visualise (empty channel list?)")
    return out


def _objective_values(targets: Sequence[Target], outputs: Mapping[str, torch.Tensor],
                      rows: Sequence[int]) -> torch.Tensor:
    """Objective of item ``k`` (target ``targets[rows[k]]``) on its own batch row ``k``."""
    values = []
    for k, i in enumerate(rows):
        t = targets[i]
        z = outputs[t.layer][k : k + 1].float()
        values.append(t.response(z).mean())
    return torch.stack(values)


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters(), None)
    if p is None:
        return torch.device("cpu"), torch.float32
    return p.device, p.dtype


@contextmanager
def _frozen(model: nn.Module, circuit: Circuit | None, graph: ModelGraph) -> Iterator[None]:
    """Eval mode, no parameter gradients, the circuit's masks applied; all undone on exit."""
    with ExitStack() as stack:
        stack.enter_context(preserved_state(model))
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        if circuit is not None:
            stack.enter_context(circuit.masked(model, graph))
        yield


@contextmanager
def _hooked(model: nn.Module, graph: ModelGraph, layers: Sequence[str]
            ) -> Iterator[Callable[[torch.Tensor], dict[str, torch.Tensor]]]:
    order = {name: i for i, name in enumerate(graph.layers)}
    wanted = sorted(set(layers), key=lambda n: order.get(n, -1))
    last = wanted[-1]
    others = wanted[:-1]
    with capture(model, others) as store, stop_at(model, last) as run:

        def forward(x: torch.Tensor) -> dict[str, torch.Tensor]:
            z = run(x)
            out = {name: store[name] for name in others}
            out[last] = z
            return out

        yield forward


def _input_shape(preset: Preset | None, graph: ModelGraph | None,
                 input_shape: Sequence[int] | None) -> tuple[int, int, int]:
    if input_shape is not None:
        shape = tuple(int(s) for s in input_shape)
    elif preset is not None:
        shape = (preset.channels, preset.size, preset.size)
    elif graph is not None:
        shape = tuple(graph.input_shape)
    else:
        raise FeatureVizError("pass `preset` (or `input_shape`/`graph`) so the input size "
                              "is known")
    if len(shape) != 3:
        raise FeatureVizError(f"activation maximisation needs [C, H, W] images, got {shape}")
    return shape  # type: ignore[return-value]


def _normaliser(preset: Preset | None, channels: int, device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor]:
    if preset is None:
        return (torch.zeros(1, channels, 1, 1, device=device),
                torch.ones(1, channels, 1, 1, device=device))
    if len(preset.mean) != channels:
        raise FeatureVizError(f"the preset has {len(preset.mean)} channels, the model input "
                              f"{channels}")
    mean = torch.tensor(preset.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(preset.std, device=device).view(1, -1, 1, 1)
    return mean, std


def build_graph(model: nn.Module, input_shape: Sequence[int]) -> ModelGraph:
    """The model's :class:`~netcarve.graph.ModelGraph` for one ``input_shape`` image.

    Example:
        >>> g = build_graph(nn.Sequential(nn.Conv2d(1, 2, 3)), (1, 8, 8))
        >>> list(g.layers)
        ['0']
    """
    device, dtype = _device_dtype(model)
    return ModelGraph.build(model, torch.zeros(1, *input_shape, device=device, dtype=dtype))


# --------------------------------------------------------------------------- visualisation


@dataclass
class FeatureVisualization:
    """The result of :func:`visualize`.

    Attributes:
        targets: the objectives, one per image (``"features.4:3"``, ``"features.4:3@7,7"``,
            ``"features.4:direction"``, ``"classifier.5:2"`` for a logit).
        images: ``float32 [N, C, H, W]`` in [0, 1] (display space), on CPU.
        inputs: the same images normalised for the model (what it was shown), on CPU.
        activations: ``[N]`` objective value of each image on its own objective, measured
            without transforms (for a circuit: as the circuit computes it).
        history: ``[steps, N]`` objective values during optimisation (on transformed images).
        metadata: steps, lr, seed, parameterisation, transforms, seconds, circuit, ...

    Example:
        >>> viz.picture(0).shape  # doctest: +SKIP
        (28, 28)
    """

    targets: list[str]
    images: torch.Tensor
    inputs: torch.Tensor
    activations: torch.Tensor
    history: torch.Tensor
    metadata: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.targets)

    def picture(self, index: int) -> np.ndarray:
        """Image ``index`` as a float array in [0, 1]: ``H×W`` (greyscale) or ``H×W×3``."""
        img = self.images[index].permute(1, 2, 0).numpy()
        return img[:, :, 0] if img.shape[2] == 1 else img

    def summary(self) -> dict[str, Any]:
        """JSON-friendly summary: targets, final activations, settings, timing."""
        return {
            "targets": list(self.targets),
            "activations": [round(float(v), 6) for v in self.activations],
            "image_shape": list(self.images.shape[1:]),
            **self.metadata,
        }


def visualize(
    model: nn.Module,
    targets: str | Target | Sequence[str | Target],
    *,
    channels: Sequence[int] | None = None,
    preset: Preset | None = None,
    input_shape: Sequence[int] | None = None,
    steps: int = 256,
    lr: float = 0.05,
    seed: int = 0,
    transforms: Transforms | None = None,
    parameterization: str = "fourier",
    decay: float = 1.0,
    decorrelate: bool = True,
    colour_covariance: torch.Tensor | Sequence[Sequence[float]] | None = None,
    init_std: float = 0.01,
    batch_size: int = 64,
    graph: ModelGraph | None = None,
    circuit: Circuit | None = None,
) -> FeatureVisualization:
    """Activation maximisation: one optimised image per objective, many at once.

    Each objective gets its own batch item; the summed objective of all items is maximised
    with Adam, so the items do not interact (a model in eval mode treats them independently).
    Item ``i``'s initial image and its random transforms come from a generator seeded with
    ``(seed, i)``: the result does not depend on ``batch_size`` beyond float rounding (which
    the optimisation can amplify: on fmnist_vgg features.7 after 256 steps, batched and
    one-at-a-time images differ by up to 0.16 in some pixels; both are equally good).

    Args:
        model: any CNN (it comes back exactly as it was).
        targets: a layer name (all its channels, or ``channels``), a target string
            (``"features.4:3"``, a neuron ``"features.4:3@7,7"``, a logit ``"logit:2"``), a
            :class:`~netcarve.targets.Target` (``Target.from_direction`` for a direction), or
            a list of those. The objective is the mean of the target's raw response over
            positions (the value itself for a neuron or a logit).
        channels: channels of a bare layer name.
        preset: the model's input preset (size, channels, normalisation). Without one, the
            model is fed the [0, 1] images directly and ``input_shape`` or ``graph`` must be
            given.
        input_shape: ``(C, H, W)`` overriding the preset's size.
        steps: optimisation steps (>= 1).
        lr: Adam learning rate (> 0).
        seed: seeds initialisation and transforms.
        transforms: robustness transforms (default ``Transforms.for_size(H)``;
            ``Transforms.none()`` for none).
        parameterization: ``"fourier"`` (default) or ``"pixel"``.
        decay: the Fourier coefficients are scaled by ``1 / f^decay``.
        decorrelate: for 3-channel input, optimise in a decorrelated colour space.
        colour_covariance: RGB covariance for the decorrelation (default: the shapes data
            set's, :data:`SHAPES_RGB_COVARIANCE`; :func:`colour_covariance` estimates one).
        init_std: standard deviation of the initial coefficients.
        batch_size: objectives optimised together.
        graph: the model's graph (built when omitted).
        circuit: optimise the node as this circuit computes it (kernel masks applied).

    Returns:
        a :class:`FeatureVisualization`.

    Raises:
        GraphError: unknown layer (close names listed) or channel out of range (range given).
        TargetError: malformed target string.
        FeatureVizError: bad steps, lr, batch size, parameterisation or shapes.

    Example:
        >>> viz = visualize(lm.model, ["features.4:3", "logit:1"], preset=lm.preset,
        ...                 steps=64)  # doctest: +SKIP
        >>> viz.activations.shape  # doctest: +SKIP
        torch.Size([2])
    """
    if int(steps) < 1:
        raise FeatureVizError(f"steps must be >= 1, got {steps}")
    if not (lr > 0 and math.isfinite(lr)):
        raise FeatureVizError(f"lr must be a positive number, got {lr}")
    if int(batch_size) < 1:
        raise FeatureVizError(f"batch_size must be >= 1, got {batch_size}")
    if parameterization not in ("fourier", "pixel"):
        raise FeatureVizError(f"parameterization must be 'fourier' or 'pixel', got "
                              f"{parameterization!r}")
    shape = _input_shape(preset, graph, input_shape)
    device, dtype = _device_dtype(model)
    if graph is None:
        graph = build_graph(model, shape)
    resolved = resolve_targets(graph, targets, channels)
    channels_in, h, w = shape
    transforms = Transforms.for_size(min(h, w)) if transforms is None else transforms
    colour = None
    if decorrelate and channels_in == 3:
        colour = colour_decorrelation(colour_covariance)
    mean, std = _normaliser(preset, channels_in, device)
    layers = sorted({t.layer for t in resolved})

    start = time.perf_counter()
    images, histories = [], []
    with _frozen(model, circuit, graph), _hooked(model, graph, layers) as forward:
        for lo in range(0, len(resolved), int(batch_size)):
            rows = list(range(lo, min(lo + int(batch_size), len(resolved))))
            gens = [torch.Generator().manual_seed(_item_seed(seed, i)) for i in rows]
            param = _ImageParam(len(rows), channels_in, h, w,
                                fourier=parameterization == "fourier", decay=decay,
                                colour=colour, init_std=init_std, generators=gens,
                                device=device)
            opt = torch.optim.Adam([param.tensor], lr=lr)
            hist = []
            for _ in range(int(steps)):
                draws = torch.tensor([transforms.draw(g) for g in gens], dtype=torch.float64)
                x = transforms.apply(param.images(), draws)
                outs = forward(((x - mean) / std).to(dtype))
                values = _objective_values(resolved, outs, rows)
                (grad,) = torch.autograd.grad(-values.sum(), param.tensor)
                param.tensor.grad = grad
                opt.step()
                hist.append(values.detach())
            with torch.no_grad():
                images.append(param.images().detach())
                histories.append(torch.stack(hist).cpu())
        final = torch.cat(images)
        inputs = (final - mean) / std
        with torch.no_grad():
            acts = []
            for lo in range(0, len(resolved), int(batch_size)):
                rows = list(range(lo, min(lo + int(batch_size), len(resolved))))
                outs = forward(inputs[lo : lo + len(rows)].to(dtype))
                acts.append(_objective_values(resolved, outs, rows).cpu())
    seconds = time.perf_counter() - start
    meta = {
        "steps": int(steps), "lr": lr, "seed": seed, "parameterization": parameterization,
        "decay": decay, "decorrelated": colour is not None, "transforms": asdict(transforms),
        "batch_size": int(batch_size), "circuit": None if circuit is None else str(
            circuit.target), "seconds": seconds, "device": str(device),
    }
    return FeatureVisualization(
        targets=[str(t) for t in resolved], images=final.float().cpu(),
        inputs=inputs.float().cpu(), activations=torch.cat(acts).float(),
        history=torch.cat(histories, dim=1).float(), metadata=meta,
    )


def _item_seed(seed: int, index: int) -> int:
    """A 63-bit seed for item ``index`` of a run seeded with ``seed``."""
    return (int(seed) * 1_000_003 + int(index) * 7_919 + 0x5EED) % (2**63 - 1)


@torch.no_grad()
def layer_activations(
    model: nn.Module,
    layer: str,
    inputs: torch.Tensor,
    *,
    reduce: str = "mean",
    batch_size: int = 256,
    circuit: Circuit | None = None,
    graph: ModelGraph | None = None,
) -> torch.Tensor:
    """Every channel's raw response of ``layer`` to each input, reduced over positions.

    Args:
        model: the model (comes back unchanged).
        layer: a layer (any ``named_modules()`` name).
        inputs: normalised images ``[N, C, H, W]``.
        reduce: ``"mean"`` or ``"max"`` over positions.
        batch_size: images per forward pass.
        circuit: measure as this circuit computes it (needs the graph or the circuit's
            metadata).
        graph: the model's graph (only needed with a circuit).

    Returns:
        float32 CPU ``[N, channels]``.

    Raises:
        GraphError: unknown layer.
        FeatureVizError: unknown ``reduce``.

    Example:
        >>> layer_activations(lm.model, "features.4", viz.inputs).shape  # doctest: +SKIP
        torch.Size([64, 64])
    """
    if reduce not in ("mean", "max"):
        raise FeatureVizError(f"reduce must be 'mean' or 'max', got {reduce!r}")
    device, dtype = _device_dtype(model)
    rows = []
    with preserved_state(model), ExitStack() as stack:
        model.eval()
        if circuit is not None:
            stack.enter_context(circuit.masked(model, graph))
        with stop_at(model, layer) as run:
            for lo in range(0, len(inputs), batch_size):
                z = run(inputs[lo : lo + batch_size].to(device=device, dtype=dtype)).float()
                z = z.reshape(z.shape[0], z.shape[1], -1)
                rows.append((z.mean(2) if reduce == "mean" else z.amax(2)).cpu())
    return torch.cat(rows)


# --------------------------------------------------------------------------- receptive fields

_SHAPES: weakref.WeakKeyDictionary[ModelGraph, dict[torch.fx.Node, Any]] = (
    weakref.WeakKeyDictionary())


class _Shapes(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__(gm)
        self.shapes: dict[torch.fx.Node, Any] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            self.shapes[n] = tuple(result.shape)
        elif isinstance(result, (tuple, list)):
            self.shapes[n] = [tuple(r.shape) if isinstance(r, torch.Tensor) else None
                              for r in result]
        return result


def _node_shapes(graph: ModelGraph) -> dict[torch.fx.Node, Any]:
    cached = _SHAPES.get(graph)
    if cached is not None:
        return cached
    gm = graph.traced
    if gm is None:
        raise ReceptiveFieldError("the graph has no fx trace")
    device, dtype = _device_dtype(gm)
    rec = _Shapes(gm)
    with preserved_state(gm), torch.no_grad():
        gm.eval()
        rec.run(torch.zeros(1, *graph.input_shape, device=device, dtype=dtype))
    _SHAPES[graph] = rec.shapes
    return rec.shapes


def _spatial(shape: Any) -> tuple[int, int] | None:
    if isinstance(shape, tuple) and len(shape) == 4:
        return shape[2], shape[3]
    return None


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return int(v[0]), int(v[-1])
    return int(v), int(v)


# intervals: (ylo, yhi, xlo, xhi), inclusive int64 tensors [P]; None = "everything"
_Ivl = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None


def _window(ivl: tuple[torch.Tensor, ...], kernel: tuple[int, int], stride: tuple[int, int],
            padding: tuple[int, int], dilation: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    ylo, yhi, xlo, xhi = ivl
    return (ylo * stride[0] - padding[0],
            yhi * stride[0] - padding[0] + dilation[0] * (kernel[0] - 1),
            xlo * stride[1] - padding[1],
            xhi * stride[1] - padding[1] + dilation[1] * (kernel[1] - 1))


def _adaptive(ivl: tuple[torch.Tensor, ...], size_in: tuple[int, int],
              size_out: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    ylo, yhi, xlo, xhi = ivl
    (hi_, wi), (ho, wo) = size_in, size_out
    # output i pools input [floor(i*In/Out), ceil((i+1)*In/Out) - 1]
    return ((ylo * hi_) // ho, -((-(yhi + 1) * hi_) // ho) - 1,
            (xlo * wi) // wo, -((-(xhi + 1) * wi) // wo) - 1)


def _conv_padding(mod: nn.Module, kernel: tuple[int, int], dilation: tuple[int, int]
                  ) -> tuple[int, int]:
    pad = mod.padding  # type: ignore[attr-defined]
    if pad == "valid":
        return 0, 0
    if pad == "same":
        return tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation, strict=True))  # type: ignore[return-value]
    return _pair(pad)


def _arg_nodes(node: torch.fx.Node) -> list[torch.fx.Node]:
    found: list[torch.fx.Node] = []
    torch.fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) or n)
    return found


def _short(node: torch.fx.Node) -> str:
    target = node.target
    if node.op == "call_method":
        return str(target)
    return getattr(target, "__name__", str(target))


def _back(node: torch.fx.Node, ivl: _Ivl, modules: dict[str, nn.Module],
          shapes: dict[torch.fx.Node, Any]) -> list[tuple[torch.fx.Node, _Ivl]]:
    """Intervals of the inputs of ``node`` that its output intervals depend on."""
    args = _arg_nodes(node)
    if ivl is None:  # a non-spatial output depends on all of its inputs
        return [(a, None) for a in args]
    out_size = _spatial(shapes.get(node))
    first = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
    if node.op == "call_module":
        mod = modules[str(node.target)]
        if isinstance(mod, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)) and first is not None:
            if isinstance(mod, nn.Conv2d):
                kernel, stride = _pair(mod.kernel_size), _pair(mod.stride)
                dilation = _pair(mod.dilation)
                if mod.padding_mode == "circular":
                    raise ReceptiveFieldError(
                        f"circular padding in '{node.target}' wraps the receptive field around "
                        "the image; no box describes it")
                padding = _conv_padding(mod, kernel, dilation)
            else:
                kernel = _pair(mod.kernel_size)
                stride = _pair(mod.stride if mod.stride is not None else mod.kernel_size)
                padding = _pair(mod.padding)
                dilation = _pair(getattr(mod, "dilation", 1))
            return [(first, _window(ivl, kernel, stride, padding, dilation))]
        if isinstance(mod, nn.ConvTranspose2d) and first is not None:
            kernel, stride = _pair(mod.kernel_size), _pair(mod.stride)
            padding, dilation = _pair(mod.padding), _pair(mod.dilation)
            ylo, yhi, xlo, xhi = ivl
            return [(first, (
                -((-(ylo + padding[0] - dilation[0] * (kernel[0] - 1))) // stride[0]),
                (yhi + padding[0]) // stride[0],
                -((-(xlo + padding[1] - dilation[1] * (kernel[1] - 1))) // stride[1]),
                (xhi + padding[1]) // stride[1]))]
        if isinstance(mod, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) and first is not None:
            return [(first, _adaptive(ivl, _spatial(shapes[first]), out_size))]  # type: ignore[arg-type]
        if isinstance(mod, (nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d,
                            nn.ReplicationPad2d)) and first is not None:
            left, _, top, _ = mod.padding  # type: ignore[misc]
            ylo, yhi, xlo, xhi = ivl
            return [(first, (ylo - top, yhi - top, xlo - left, xhi - left))]
        if isinstance(mod, nn.Upsample) and first is not None:
            return [(first, _resample(ivl, _spatial(shapes[first]), out_size))]  # type: ignore[arg-type]
    if node.op in ("call_function", "call_method"):
        short = _short(node)
        if short in ("max_pool2d", "avg_pool2d") and first is not None:
            kw = dict(zip(("kernel_size", "stride", "padding", "dilation"), node.args[1:],
                          strict=False))
            kw.update(node.kwargs)
            kernel = _pair(kw["kernel_size"])
            stride = _pair(kw.get("stride") or kw["kernel_size"])
            return [(first, _window(ivl, kernel, stride, _pair(kw.get("padding", 0)),
                                    _pair(kw.get("dilation", 1))))]
        if short in ("adaptive_avg_pool2d", "adaptive_max_pool2d") and first is not None:
            return [(first, _adaptive(ivl, _spatial(shapes[first]), out_size))]  # type: ignore[arg-type]
        if short in ("interpolate", "upsample", "upsample_nearest", "upsample_bilinear") \
                and first is not None:
            return [(first, _resample(ivl, _spatial(shapes[first]), out_size))]  # type: ignore[arg-type]
        if short == "conv2d" and first is not None:
            raise ReceptiveFieldError("functional conv2d is not followed; use nn.Conv2d")
        if short == "pad" and first is not None:
            pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
            left, top = int(pad[0]), int(pad[2]) if len(pad) > 2 else 0
            ylo, yhi, xlo, xhi = ivl
            return [(first, (ylo - top, yhi - top, xlo - left, xhi - left))]
    # element-wise / channel-wise: spatially aligned operands keep the interval
    out: list[tuple[torch.Tensor | Any, _Ivl]] = []
    for a in args:
        size = _spatial(shapes.get(a))
        if size is None:
            sub = shapes.get(a)
            sizes = {_spatial(s) for s in sub} if isinstance(sub, list) else set()
            size = sizes.pop() if len(sizes) == 1 else None
        if size is None:
            if isinstance(shapes.get(a), tuple):
                out.append((a, None))  # a non-spatial tensor (e.g. a gate's input): all of it
            continue  # not a tensor (a size, a constant)
        if size == out_size:
            out.append((a, ivl))
        elif size == (1, 1):
            empty = _is_empty(ivl)
            lo = torch.where(empty, _EMPTY, 0)
            hi = torch.where(empty, -_EMPTY, 0)
            out.append((a, (lo, hi, lo.clone(), hi.clone())))
        else:
            raise ReceptiveFieldError(
                f"cannot follow the receptive field through '{node.name}' ({_short(node)}): it "
                f"maps a {size[0]}×{size[1]} map to {out_size}")
    return out


def _resample(ivl: tuple[torch.Tensor, ...], size_in: tuple[int, int],
              size_out: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """Conservative (superset) interval for nearest/bilinear resampling."""
    ylo, yhi, xlo, xhi = ivl
    (hi_, wi), (ho, wo) = size_in, size_out
    return ((ylo * hi_) // ho - 1, -((-(yhi + 1) * hi_) // ho),
            (xlo * wi) // wo - 1, -((-(xhi + 1) * wi) // wo))


def receptive_field(
    graph: ModelGraph,
    layer: str,
    positions: tuple[int, int] | Sequence[tuple[int, int]] | torch.Tensor | None = None,
    *,
    clip: bool = True,
) -> tuple[int, int, int, int] | torch.Tensor:
    """Input box that a layer position can see: ``(y0, x0, y1, x1)``, half-open, clipped.

    The box is derived from the graph's fx trace by walking back from ``layer`` to the input:
    convolutions and pooling map an output interval ``[lo, hi]`` to
    ``[lo·s − p, hi·s − p + d·(k − 1)]`` (kernel k, stride s, padding p, dilation d), adaptive
    pooling to the exact pooled range, padding shifts it, element-wise operations and residual
    additions pass it to every spatially aligned operand (a 1×1 operand, e.g. a gate, depends on
    its whole input), and a flatten/Linear depends on everything. Branches are merged by the
    enclosing box. Every interval is clipped to its map, so the box is clipped to the image.
    Exact for conv/pool stacks (also with residual branches); interpolation gives a
    conservative (larger) box.

    Args:
        graph: the model's graph.
        layer: a conv/linear layer, or any module called once in forward.
        positions: one ``(y, x)``, a list of them, or an int tensor ``[P, 2]``; ``None`` is the
            centre of the layer's output map.
        clip: clip every interval to its map (default). ``clip=False`` gives the theoretical
            field, which may extend into the padding (negative or too large coordinates): all
            fields of a conv/pool stack then have the same size.

    Returns:
        for a single ``(y, x)`` (or None) a tuple ``(y0, x0, y1, x1)`` with
        ``image[..., y0:y1, x0:x1]`` the field; otherwise an int64 tensor ``[P, 4]``. A
        layer without a spatial map (Linear) sees the whole image; a position that sees only
        padding gets the empty box ``(0, 0, 0, 0)``.

    Raises:
        GraphError: unknown layer (close names listed).
        ReceptiveFieldError: a position outside the layer's map, a non-image input, or an
            operation the walk cannot follow (functional conv2d, circular padding).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.MaxPool2d(2),
        ...                     nn.Conv2d(2, 2, 3))
        >>> g = ModelGraph.build(net, torch.zeros(1, 1, 16, 16))
        >>> receptive_field(g, "2", (0, 0))
        (0, 0, 7, 7)
    """
    gm = graph.traced
    if gm is None or len(graph.input_shape) != 3:
        raise ReceptiveFieldError("receptive fields need a graph of a model on [C, H, W] images")
    node = next((n for n in gm.graph.nodes
                 if n.op == "call_module" and str(n.target) == layer), None)
    if node is None:
        graph.layer(layer)  # raises with close names when it is no layer at all
        raise ReceptiveFieldError(f"'{layer}' is not called in forward")
    shapes = _node_shapes(graph)
    size_out = _spatial(shapes.get(node))
    single = positions is None or (isinstance(positions, tuple) and len(positions) == 2
                                   and all(isinstance(v, int) for v in positions))
    height, width = graph.input_shape[1], graph.input_shape[2]
    if size_out is None:  # Linear: all of the image
        n = 1 if single else len(torch.as_tensor(positions))
        full = torch.tensor([[0, 0, height, width]] * n, dtype=torch.int64)
        return tuple(full[0].tolist()) if single else full  # type: ignore[return-value]
    if positions is None:
        positions = (size_out[0] // 2, size_out[1] // 2)
    pos = torch.as_tensor(positions, dtype=torch.int64).reshape(-1, 2)
    bad = (pos[:, 0] < 0) | (pos[:, 0] >= size_out[0]) | (pos[:, 1] < 0) | (
        pos[:, 1] >= size_out[1])
    if bool(bad.any()):
        y, x = pos[bad][0].tolist()
        raise ReceptiveFieldError(
            f"position ({y}, {x}) outside {layer}'s {size_out[0]}×{size_out[1]} map "
            f"(y in 0..{size_out[0] - 1}, x in 0..{size_out[1] - 1})")
    modules = dict(gm.named_modules())
    order = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(order)}
    pending: dict[torch.fx.Node, _Ivl] = {node: (pos[:, 0], pos[:, 0].clone(), pos[:, 1],
                                                 pos[:, 1].clone())}
    result: _Ivl | bool = False
    for current in reversed(order[: index[node] + 1]):
        if current not in pending:
            continue
        ivl = pending.pop(current)
        if current.op == "placeholder":
            result = ivl if result is False else _hull(result, ivl)  # type: ignore[arg-type]
            continue
        for arg, sub in _back(current, ivl, modules, shapes):
            size = _spatial(shapes.get(arg))
            if clip and sub is not None and size is not None:
                sub = _clip(sub, size)
            pending[arg] = sub if arg not in pending else _hull(pending[arg], sub)
    if result is False:
        raise ReceptiveFieldError(f"'{layer}' does not depend on the model input")
    if result is None:
        boxes = torch.tensor([[0, 0, height, width]] * len(pos), dtype=torch.int64)
    else:
        ylo, yhi, xlo, xhi = result  # type: ignore[misc]
        boxes = torch.stack([ylo, xlo, yhi + 1, xhi + 1], dim=1)
        boxes[_is_empty(result)] = 0  # type: ignore[arg-type]  # sees only padding
    return tuple(int(v) for v in boxes[0]) if single else boxes  # type: ignore[return-value]


# An empty interval (a position that sees only padding) is (_EMPTY, -_EMPTY): every map of
# the walk is monotone with a positive slope, so it stays empty, and a hull ignores it.
_EMPTY = 2**40


def _is_empty(ivl: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return (ivl[0] > ivl[1]) | (ivl[2] > ivl[3])


def _clip(ivl: tuple[torch.Tensor, ...], size: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """Intersect with the map ``[0, size)``; positions left with nothing become empty."""
    ylo, yhi = ivl[0].clamp(min=0), ivl[1].clamp(max=size[0] - 1)
    xlo, xhi = ivl[2].clamp(min=0), ivl[3].clamp(max=size[1] - 1)
    empty = (ylo > yhi) | (xlo > xhi)
    big = torch.full_like(ylo, _EMPTY)
    return (torch.where(empty, big, ylo), torch.where(empty, -big, yhi),
            torch.where(empty, big, xlo), torch.where(empty, -big, xhi))


def _hull(a: _Ivl, b: _Ivl) -> _Ivl:
    if a is None or b is None:
        return None
    return (torch.minimum(a[0], b[0]), torch.maximum(a[1], b[1]),
            torch.minimum(a[2], b[2]), torch.maximum(a[3], b[3]))


# --------------------------------------------------------------------------- data-set examples


@dataclass
class DatasetExamples:
    """Top-k activating images per channel and the receptive-field box of each peak.

    Attributes:
        layer: the layer.
        channels: the channels, in order.
        values: ``[C, k]`` activation (raw output reduced over positions), best first.
        indices: ``[C, k]`` image indices into the images searched.
        positions: ``[C, k, 2]`` ``(y, x)`` of each image's peak in the layer's map.
        boxes: ``[C, k, 4]`` ``(y0, x0, y1, x1)`` receptive field of that peak, clipped to the
            image (half-open).
        full_boxes: ``[C, k, 4]`` the same fields unclipped (they may reach into the padding;
            all have the same size in a conv/pool stack).
        reduce: ``"max"`` or ``"mean"`` (how positions were reduced).

    Example:
        >>> ex.patches(images, preset)[0][0].shape  # doctest: +SKIP
        (10, 10)
    """

    layer: str
    channels: list[int]
    values: torch.Tensor
    indices: torch.Tensor
    positions: torch.Tensor
    boxes: torch.Tensor
    full_boxes: torch.Tensor
    reduce: str = "max"

    def patches(self, images: torch.Tensor, preset: Preset | None = None, *,
                pad: bool = True, fill: float = 0.5) -> list[list[np.ndarray]]:
        """The receptive-field crops, ``[channel][rank]``, as display arrays in [0, 1].

        Args:
            images: the images that were searched (normalised, as given to
                :func:`dataset_examples`).
            preset: undo its normalisation for display (else each crop is min-max scaled).
            pad: crop the unclipped field (:attr:`full_boxes`) and fill the part outside the
                image with ``fill``, so every crop has the same size and the peak sits at the
                same place in it; ``False`` crops the clipped :attr:`boxes`.
            fill: display value outside the image (0.5: mid-grey).

        Returns:
            nested lists of ``H×W`` (greyscale) or ``H×W×3`` arrays.
        """
        height, width = images.shape[-2], images.shape[-1]
        out = []
        for c in range(len(self.channels)):
            row = []
            for r in range(self.values.shape[1]):
                shown = to_display(images[int(self.indices[c, r])][None], preset)[0]
                box = self.full_boxes[c, r] if pad else self.boxes[c, r]
                y0, x0, y1, x1 = (int(v) for v in box)
                crop = np.full((y1 - y0, x1 - x0, *shown.shape[2:]), fill, dtype=shown.dtype)
                sy0, sx0 = max(y0, 0), max(x0, 0)
                sy1, sx1 = min(y1, height), min(x1, width)
                if sy1 > sy0 and sx1 > sx0:
                    crop[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = shown[sy0:sy1, sx0:sx1]
                row.append(crop)
            out.append(row)
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly: per channel, the ranked image indices, values, peaks and boxes."""
        return {
            "layer": self.layer,
            "reduce": self.reduce,
            "channels": {
                str(ch): [
                    {"image": int(self.indices[c, r]), "value": float(self.values[c, r]),
                     "peak": [int(v) for v in self.positions[c, r]],
                     "box": [int(v) for v in self.boxes[c, r]]}
                    for r in range(self.values.shape[1])
                ]
                for c, ch in enumerate(self.channels)
            },
        }


def to_display(images: torch.Tensor, preset: Preset | None = None) -> list[np.ndarray]:
    """Normalised images ``[N, C, H, W]`` as display arrays in [0, 1].

    With a preset of matching channel count the normalisation is undone (``x·std + mean``,
    clipped); otherwise each image is min-max scaled.

    Returns:
        a list of ``H×W`` (one channel) or ``H×W×3`` float arrays.

    Example:
        >>> to_display(torch.zeros(1, 1, 2, 2))[0].shape
        (2, 2)
    """
    from .diagram.pictures import display_images

    arr = display_images(images, preset)
    return [a[:, :, 0] if a.shape[2] == 1 else a for a in arr]


@torch.no_grad()
def dataset_examples(
    model: nn.Module,
    layer: str,
    images: Images,
    *,
    channels: Sequence[int] | None = None,
    top_k: int = 9,
    reduce: str = "max",
    batch_size: int = 256,
    graph: ModelGraph | None = None,
    circuit: Circuit | None = None,
) -> DatasetExamples:
    """The ``top_k`` images that activate each channel most, with receptive-field boxes.

    One pass over ``images``: a channel's activation on an image is its raw output (before any
    following activation function) reduced over positions by ``reduce``; the box is the exact
    receptive field (:func:`receptive_field`) of the peak position. Ties keep the earlier image.

    Args:
        model: the model (comes back unchanged).
        layer: a conv or linear layer.
        images: normalised images ``[N, C, H, W]``, or a stream of them (DataLoader or
            iterable of batches, read once; indices count images in stream order).
        channels: channels to search for (default all).
        top_k: images per channel (clipped to N).
        reduce: ``"max"`` (default) or ``"mean"`` over positions.
        batch_size: images per forward pass.
        graph: the model's graph (built from ``images[:1]`` when omitted).
        circuit: search as this circuit computes the layer.

    Returns:
        a :class:`DatasetExamples`.

    Raises:
        GraphError: unknown layer or channel out of range.
        FeatureVizError: no images, bad ``top_k`` or ``reduce``.

    Example:
        >>> ex = dataset_examples(lm.model, "features.4", x, channels=[3], top_k=4)
        ...     # doctest: +SKIP
        >>> ex.indices.shape  # doctest: +SKIP
        torch.Size([1, 4])
    """
    if isinstance(images, torch.Tensor) and (images.dim() != 4 or len(images) == 0):
        raise FeatureVizError("dataset_examples needs a non-empty [N, C, H, W] image tensor")
    stream = as_stream(images)
    if int(top_k) < 1:
        raise FeatureVizError(f"top_k must be >= 1, got {top_k}")
    if reduce not in ("max", "mean"):
        raise FeatureVizError(f"reduce must be 'max' or 'mean', got {reduce!r}")
    device, dtype = _device_dtype(model)
    first = stream.first(device=device, dtype=dtype)
    if graph is None:
        graph = ModelGraph.build(model, first)
    info = graph.layer(layer)
    chans = graph._channels(layer, channels)
    k = int(top_k)  # fewer when the stream has fewer images
    lo = 0
    best_v = best_i = best_p = None
    sel = torch.tensor(chans, device=device)
    with preserved_state(model), ExitStack() as stack:
        model.eval()
        if circuit is not None:
            stack.enter_context(circuit.masked(model, graph))
        with stop_at(model, layer) as run:
            for xb in stream.images(batch_size, device=device, dtype=dtype):
                z = run(xb)
                z = z.index_select(1, sel).float()
                z = z.reshape(z.shape[0], z.shape[1], -1)
                peak_v, peak_p = z.max(dim=2)
                vals = peak_v if reduce == "max" else z.mean(dim=2)
                idx = torch.arange(lo, lo + len(z), device=device)[:, None].expand_as(vals)
                if best_v is not None:
                    vals = torch.cat([best_v, vals])
                    idx = torch.cat([best_i, idx])
                    peak_p = torch.cat([best_p, peak_p])
                order = torch.sort(vals, dim=0, descending=True, stable=True).indices[:k]
                best_v, best_i = vals.gather(0, order), idx.gather(0, order)
                best_p = peak_p.gather(0, order)
                lo += len(xb)
    k = best_v.shape[0] if best_v is not None else 0
    assert best_v is not None and best_i is not None and best_p is not None
    width = info.output_shape[2] if len(info.output_shape) == 3 else 1
    flat = best_p.t().cpu()  # [C, k]
    positions = torch.stack([flat // width, flat % width], dim=2)
    if len(info.output_shape) == 3:
        flat_pos = positions.reshape(-1, 2)
        boxes = receptive_field(graph, layer, flat_pos).reshape(len(chans), k, 4)  # type: ignore[union-attr]
        full = receptive_field(graph, layer, flat_pos, clip=False).reshape(  # type: ignore[union-attr]
            len(chans), k, 4)
    else:
        boxes = torch.tensor([0, 0, *first.shape[-2:]]).expand(len(chans), k, 4).clone()
        full = boxes.clone()
    return DatasetExamples(layer=layer, channels=chans, values=best_v.t().cpu(),
                           indices=best_i.t().cpu(), positions=positions, boxes=boxes,
                           full_boxes=full, reduce=reduce)


# --------------------------------------------------------------------------- figures


def plot_grid(
    viz: FeatureVisualization,
    path: str | Path,
    *,
    compare: FeatureVisualization | None = None,
    examples: DatasetExamples | None = None,
    images: torch.Tensor | None = None,
    preset: Preset | None = None,
    columns: int | None = None,
    title: str | None = None,
) -> Path:
    """A PNG grid: for every objective its visualisation, next to the circuit's version
    (``compare``) and its best data-set example patch when given.

    Args:
        viz: the visualisations.
        path: PNG file to write.
        compare: a second visualisation of the same objectives (e.g. as a circuit computes
            them), shown right of each image.
        examples: data-set examples of the same channels (the best patch is shown).
        images: the images ``examples`` indexes into.
        preset: to display the examples.
        columns: cells per row (default about square).
        title: figure title.

    Returns:
        the path written.

    Example:
        >>> plot_grid(viz, "out/features.4.png")  # doctest: +SKIP
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    patches = None
    if examples is not None and images is not None:
        patches = [[p[0]] for p in examples.patches(images, preset)]
    per = 1 + (compare is not None) + (patches is not None)
    n = len(viz)
    cols = columns or max(1, math.ceil(math.sqrt(n * per) / per))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols * per, figsize=(1.15 * cols * per, 1.35 * rows + 0.4),
                             squeeze=False)
    cmap = "gray" if viz.images.shape[1] == 1 else None
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        r, c = divmod(i, cols)
        cells = [(viz.picture(i), viz.targets[i].split(":")[-1])]
        if compare is not None:
            cells.append((compare.picture(i), "circuit"))
        if patches is not None:
            cells.append((patches[i][0], "data"))
        for j, (img, label) in enumerate(cells):
            ax = axes[r, c * per + j]
            ax.imshow(img, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(label, fontsize=7, pad=2)
    layer = viz.targets[0].rsplit(":", 1)[0] if viz.targets else ""
    height = fig.get_size_inches()[1]
    fig.suptitle(title or f"{layer}: activation maximisation", fontsize=9)
    fig.tight_layout(pad=0.3, rect=(0, 0, 1, 1 - 0.35 / height))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_channel(
    viz: FeatureVisualization,
    index: int,
    path: str | Path,
    *,
    compare: FeatureVisualization | None = None,
    examples: DatasetExamples | None = None,
    images: torch.Tensor | None = None,
    preset: Preset | None = None,
) -> Path:
    """A PNG for one objective: its visualisation (and the circuit's), and beside them the
    top data-set examples as receptive-field patches and as full images with the box drawn.

    Args:
        viz: the visualisations.
        index: which objective of ``viz``.
        path: PNG file to write.
        compare: the same objective as a circuit computes it.
        examples: data-set examples; the row for ``viz.targets[index]``'s channel is used.
        images: the images ``examples`` indexes into.
        preset: to display the examples.

    Returns:
        the path written.

    Example:
        >>> plot_channel(viz, 0, "out/features.4_0.png", examples=ex, images=x)
        ...     # doctest: +SKIP
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    target = viz.targets[index]
    row = None
    if examples is not None and images is not None:
        channel = int(target.split(":")[-1].split("@")[0]) if ":" in target else None
        if channel in examples.channels:
            row = examples.channels.index(channel)
    k = 0 if row is None else examples.values.shape[1]  # type: ignore[union-attr]
    big = 1 + (compare is not None)
    cols = big + max(k, 0)
    fig = plt.figure(figsize=(1.9 * big + 1.05 * max(k, 1) + 0.2, 3.0))
    grid = fig.add_gridspec(2, 2 * big + max(k, 1), hspace=0.35, wspace=0.15)
    cmap = "gray" if viz.images.shape[1] == 1 else None
    ax = fig.add_subplot(grid[:, 0:2])
    ax.imshow(viz.picture(index), cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(f"visualisation\nobjective {float(viz.activations[index]):.3g}", fontsize=8)
    ax.axis("off")
    if compare is not None:
        ax = fig.add_subplot(grid[:, 2:4])
        ax.imshow(compare.picture(index), cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"as the circuit computes it\nobjective "
                     f"{float(compare.activations[index]):.3g}", fontsize=8)
        ax.axis("off")
    if row is not None:
        assert examples is not None and images is not None
        patches = examples.patches(images, preset)[row]
        full = to_display(images[examples.indices[row]], preset)
        for r in range(k):
            ax = fig.add_subplot(grid[0, 2 * big + r])
            ax.imshow(patches[r], cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(f"{examples.reduce} {float(examples.values[row, r]):.3g}", fontsize=7)
            ax.axis("off")
            ax = fig.add_subplot(grid[1, 2 * big + r])
            ax.imshow(full[r], cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
            y0, x0, y1, x1 = (int(v) for v in examples.boxes[row, r])
            ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False,
                                   edgecolor="red", linewidth=1))
            ax.set_title(f"image {int(examples.indices[row, r])}", fontsize=6)
            ax.axis("off")
    del cols
    fig.suptitle(f"{target}: visualisation and top data-set examples", fontsize=9)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


# --------------------------------------------------------------------------- diagrams


def featureviz_pictures(
    *,
    steps: int = 128,
    lr: float = 0.05,
    seed: int = 0,
    top_k: int = 4,
    batch_size: int = 64,
    transforms: Transforms | None = None,
    circuit: Circuit | None = None,
) -> Callable[[Any], dict[str, Any]]:
    """A picture provider for circuit diagrams (:mod:`netcarve.diagram.pictures`).

    Every node of a layer gets its activation-maximisation image (kind
    ``"feature-visualisation"``) and, when the request carries images, its top data-set
    examples as exact receptive-field patches. Nodes of the model input are skipped (other
    providers picture them). All nodes of one layer are optimised in one batch.

    Use it first in a chain so that the other providers fill in what it skips (put
    ``kernel_pictures`` before it to keep showing first-layer kernels)::

        from netcarve.diagram.pictures import compose, default_pictures
        pictures = compose(featureviz_pictures(steps=128, circuit=circuit), default_pictures())
        write_diagram(circuit, model, out, images=x, preset=p, pictures=pictures)

    Args:
        steps, lr, seed, transforms, batch_size: as for :func:`visualize`.
        top_k: data-set examples per node.
        circuit: picture every node as this circuit computes it (its kernel masks applied),
            for both the visualisation and the data-set examples.

    Returns:
        ``provider(request) -> {node id: NodePicture}``.

    Example:
        >>> provider = featureviz_pictures(steps=64)
        >>> callable(provider)
        True
    """

    def provider(request: Any) -> dict[str, Any]:
        from .diagram.pictures import Example, NodePicture

        by_layer: dict[str, list[Any]] = {}
        for node in request.nodes:
            if node.layer is not None:
                by_layer.setdefault(node.layer, []).append(node)
        out: dict[str, Any] = {}
        if not by_layer:
            return out
        shape = tuple(request.graph.input_shape)
        for layer, nodes in by_layer.items():
            chans = sorted({n.channel for n in nodes})
            viz = visualize(request.model, layer, channels=chans, preset=request.preset,
                            input_shape=shape, steps=steps, lr=lr, seed=seed,
                            transforms=transforms, batch_size=batch_size, graph=request.graph,
                            circuit=circuit)
            ex = None
            if request.images is not None and request.images.dim() == 4 and len(request.images):
                ex = dataset_examples(request.model, layer, request.images, channels=chans,
                                      top_k=top_k, batch_size=max(batch_size, 128),
                                      graph=request.graph, circuit=circuit)
                patches = ex.patches(request.images, request.preset)
            for node in nodes:
                i = chans.index(node.channel)
                examples = [] if ex is None else [
                    Example(patches[i][r], float(ex.values[i, r])) for r in range(len(patches[i]))
                ]
                out[node.id] = NodePicture(viz.picture(i), "feature-visualisation", examples)
        return out

    return provider
