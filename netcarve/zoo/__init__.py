"""Model zoo: torchvision-shaped architectures, the bundled small models, input presets."""

from netcarve.data.preset import Preset

from .registry import (
    FASHION_MNIST_PRESET,
    SHAPES_PRESET,
    ZOO,
    LoadedModel,
    ZooEntry,
    load_model,
)

__all__ = [
    "FASHION_MNIST_PRESET",
    "SHAPES_PRESET",
    "ZOO",
    "LoadedModel",
    "Preset",
    "ZooEntry",
    "load_model",
]
