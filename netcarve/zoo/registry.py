"""The model zoo: named architectures, their input presets, and bundled weights."""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from netcarve.core.devices import resolve_device
from netcarve.core.errors import ModelSpecError
from netcarve.core.weights import load_weights, read_metadata
from netcarve.data.fashion_mnist import FASHION_MNIST_CLASSES
from netcarve.data.preset import Preset
from netcarve.data.shapes import HUE_CLASSES, SHAPE_CLASSES, SHAPES_MEAN, SHAPES_STD
from netcarve.zoo.small_models import FmnistResNet, FmnistVGG, ShapesCNN
from netcarve.zoo.torchvision_models import IMAGENET_PRESET, TORCHVISION_ARCHITECTURES

WEIGHTS_DIR = Path(__file__).parent / "weights"

FASHION_MNIST_PRESET = Preset(
    size=28,
    channels=1,
    mean=(0.2860,),
    std=(0.3530,),
    class_names=FASHION_MNIST_CLASSES,
    dataset="fashion-mnist",
)
SHAPES_PRESET = Preset(
    size=32,
    channels=3,
    mean=tuple(SHAPES_MEAN),
    std=tuple(SHAPES_STD),
    class_names=SHAPE_CLASSES,
    dataset="shapes",
)
# The harder tasks keep the shape task's normalisation (their pixel statistics are close).
SHAPES_CLUTTER_PRESET = replace(SHAPES_PRESET, dataset="shapes-clutter")
SHAPES_COLOUR_PRESET = replace(SHAPES_PRESET, dataset="shapes-colour", class_names=HUE_CLASSES)
NARROW_SHAPES_WIDTHS = (48, 32, 48)


@dataclass(frozen=True)
class ZooEntry:
    """One model of the zoo.

    Attributes:
        name: the name used on the command line (``fmnist_vgg``).
        factory: builds the architecture (random weights).
        preset: the input preset.
        description: one line for ``netcarve models``.
        bundled: whether netcarve ships trained weights for it.
    """

    name: str
    factory: Callable[[], nn.Module]
    preset: Preset
    description: str
    bundled: bool = False

    @property
    def weights_path(self) -> Path:
        return WEIGHTS_DIR / f"{self.name}.safetensors"

    def metadata(self) -> dict[str, str]:
        """Metadata stored with the bundled weights ({} when there are none)."""
        if self.bundled and self.weights_path.exists():
            return read_metadata(self.weights_path)
        return {}


def _entries() -> dict[str, ZooEntry]:
    fm = FASHION_MNIST_PRESET
    n_shapes = len(SHAPE_CLASSES)
    zoo = {
        "fmnist_vgg": ZooEntry(
            "fmnist_vgg", FmnistVGG, fm, "VGG-style, 5 convs + BatchNorm, Fashion-MNIST", True
        ),
        "fmnist_resnet": ZooEntry(
            "fmnist_resnet", FmnistResNet, fm, "small ResNet, residual adds, Fashion-MNIST", True
        ),
        "shapes_cnn": ZooEntry(
            "shapes_cnn",
            lambda: ShapesCNN(num_classes=n_shapes),
            SHAPES_PRESET,
            "RGB CNN, 48 first-layer filters, coloured shapes",
            True,
        ),
        "shapes_clutter_cnn": ZooEntry(
            "shapes_clutter_cnn",
            lambda: ShapesCNN(num_classes=n_shapes, widths=NARROW_SHAPES_WIDTHS),
            SHAPES_CLUTTER_PRESET,
            "narrower RGB CNN (48 first-layer filters), cluttered shapes; the class is the shape",
            True,
        ),
        "shapes_colour_cnn": ZooEntry(
            "shapes_colour_cnn",
            lambda: ShapesCNN(num_classes=len(HUE_CLASSES), widths=NARROW_SHAPES_WIDTHS),
            SHAPES_COLOUR_PRESET,
            "the same network on the same images; the class is the shape's hue",
            True,
        ),
    }
    for arch, fn in TORCHVISION_ARCHITECTURES.items():
        zoo[arch] = ZooEntry(
            arch, fn, IMAGENET_PRESET, f"torchvision-shaped {arch} (bring --weights)", False
        )
    return zoo


ZOO: dict[str, ZooEntry] = _entries()


@dataclass
class LoadedModel:
    """A model ready to use: the module (in eval mode), its preset and provenance."""

    name: str
    model: nn.Module
    preset: Preset
    weights: str | None
    metadata: dict[str, str] = field(default_factory=dict)


#: Presets by name for ``--preset`` besides the zoo's model names.
PRESETS: dict[str, Preset] = {"imagenet": IMAGENET_PRESET}

#: Packages whose models expect ImageNet input unless they say otherwise.
_IMAGENET_PACKAGES = ("torchvision", "timm")


def _resolve_factory(spec: str) -> Callable[[], nn.Module]:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ModelSpecError(f"model spec {spec!r} must look like 'package.module:factory'")
    if module_name == "timm":
        # timm names its models by string (timm.create_model), not by module attribute.
        try:
            import timm
        except ImportError as exc:
            raise ModelSpecError(f"{spec!r} needs timm, which is not installed: pip install "
                                 "timm (netcarve never requires it)") from exc
        if attr not in timm.list_models():
            close = difflib.get_close_matches(attr, timm.list_models(), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ModelSpecError(f"timm has no model {attr!r}{hint}")
        return lambda: timm.create_model(attr, pretrained=False)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelSpecError(f"cannot import module {module_name!r} for {spec!r}: {exc}") from exc
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise ModelSpecError(f"{module_name!r} has no callable named {attr!r}")
    return factory


def load_model(
    spec: str,
    weights: str | Path | None = None,
    *,
    preset: Preset | str | None = None,
    device: str | torch.device = "cpu",
    class_names: str | Path | Sequence[str] | None = None,
) -> LoadedModel:
    """Build a model by zoo name or ``package.module:factory`` spec, with its weights.

    Args:
        spec: a zoo name (``netcarve models`` lists them), ``package.module:factory``
            (e.g. ``torchvision.models:resnet50``) or ``timm:NAME`` (``timm.create_model``;
            both build the architecture only: bring its weights with ``weights``).
        weights: a weight file (safetensors or a ``torch.save``'d state dict) to load
            instead of the bundled weights.
        preset: input preset (a :class:`Preset` or a zoo name whose preset to use). Needed
            for a factory spec unless the module has a ``netcarve_preset`` attribute;
            ``"imagenet"`` is the ImageNet preset (224 crop of a 256 resize, ImageNet
            mean/std), the default for torchvision and timm models.
        device: where to put the model (``"auto"``: the GPU when there is one).
        class_names: the outputs' names: a list, a text file (one per line, or a JSON list)
            or a folder (its sorted sub-folders); replaces the preset's names.

    Returns:
        A :class:`LoadedModel` whose model is in eval mode.

    Raises:
        ModelSpecError: unknown name (close names are suggested) or a bad factory spec.
        WeightsError: the weight file does not fit the architecture.
        DeviceError: ``device`` is unknown or not on this machine.

    Example:
        >>> lm = load_model("fmnist_vgg")
        >>> lm.preset.size
        28
    """
    target_device = resolve_device(device)
    metadata: dict[str, str] = {}
    if ":" in spec:
        model = _resolve_factory(spec)()
        if not isinstance(model, nn.Module):
            raise ModelSpecError(f"{spec!r} returned {type(model).__name__}, not an nn.Module")
        name = spec
        resolved_preset = getattr(model, "netcarve_preset", None)
        if resolved_preset is None and spec.split(".")[0].split(":")[0] in _IMAGENET_PACKAGES:
            resolved_preset = IMAGENET_PRESET
    else:
        entry = ZOO.get(spec)
        if entry is None:
            close = difflib.get_close_matches(spec, list(ZOO), n=3, cutoff=0.4)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ModelSpecError(
                f"unknown model {spec!r}.{hint} Run `netcarve models` to list the zoo, or name "
                "your own as 'package.module:factory'."
            )
        model = entry.factory()
        name = entry.name
        resolved_preset = entry.preset
        if weights is None and entry.bundled:
            weights = entry.weights_path
            metadata = entry.metadata()
    if isinstance(preset, str):
        if preset in PRESETS:
            resolved_preset = PRESETS[preset]
        elif preset in ZOO:
            resolved_preset = ZOO[preset].preset
        else:
            raise ModelSpecError(f"unknown preset {preset!r}; use {', '.join(PRESETS)} or a "
                                 "zoo model name")
    elif preset is not None:
        resolved_preset = preset
    if resolved_preset is None:
        raise ModelSpecError(
            f"no input preset for {spec!r}: pass --preset with a zoo name whose input format "
            "matches (e.g. fmnist_vgg), or set `netcarve_preset` on the model"
        )
    if class_names is not None:
        resolved_preset = resolved_preset.with_class_names(class_names)
    if weights is not None:
        load_weights(model, weights)
    model.eval().to(target_device)
    return LoadedModel(name, model, resolved_preset, None if weights is None else str(weights),
                       metadata)
