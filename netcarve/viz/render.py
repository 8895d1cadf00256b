"""Feature visualisation: activation maximisation, data-set examples, receptive fields.

**Activation maximisation** (:func:`visualize`) optimises one input image per objective so that
it drives a unit as high as possible. The objectives are the project's targets
(:class:`~netcarve.core.targets.Target`): a channel (mean of its raw output map over positions), a
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
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.fx
from torch import nn

from netcarve.core.graph import ModelGraph
from netcarve.core.hooks import capture, preserved_state, stop_at
from netcarve.core.targets import Target
from netcarve.data.preset import Preset

if TYPE_CHECKING:
    from netcarve.circuits.circuit import Circuit

from netcarve.viz.parameterization import FeatureVizError, _ImageParam, colour_decorrelation
from netcarve.viz.transforms import Transforms

__all__ = [
    "FeatureVisualization",
    "build_graph",
    "layer_activations",
    "resolve_targets",
    "visualize",
]


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
    """The model's :class:`~netcarve.core.graph.ModelGraph` for one ``input_shape`` image.

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
            :class:`~netcarve.core.targets.Target` (``Target.from_direction`` for a direction), or
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
