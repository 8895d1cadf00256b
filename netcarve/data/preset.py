"""Input presets: what a model expects to be fed (size, channels, normalisation, classes)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from netcarve.core.errors import DataError


@dataclass(frozen=True)
class Preset:
    """How to turn raw images into a model's input, and what its outputs mean.

    Args:
        size: square input side in pixels (images are resized to ``size × size``).
        channels: 1 (greyscale) or 3 (RGB).
        mean: per-channel mean subtracted after scaling pixels to [0, 1].
        std: per-channel standard deviation divided by after subtracting ``mean``.
        class_names: one name per output logit.
        dataset: name of the data set the model was trained on (informational).
        resize: when set, image files are resized so that their shorter side is ``resize``
            and then centre-cropped to ``size`` (ImageNet-style: 224 of 256); otherwise they
            are stretched to ``size × size``.

    Example:
        >>> p = Preset(28, 1, (0.286,), (0.353,), ("a", "b"))
        >>> p.normalize(torch.zeros(2, 1, 28, 28, dtype=torch.uint8)).shape
        torch.Size([2, 1, 28, 28])
    """

    size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...] = field(default_factory=tuple)
    dataset: str = ""
    resize: int | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Convert ``uint8 [N, C, H, W]`` (or float in [0, 1]) images to normalised floats.

        Args:
            images: ``[N, C, H, W]`` or ``[N, H, W]`` (greyscale) tensor.

        Returns:
            float32 tensor ``[N, C, H, W]`` with ``(x - mean) / std`` applied per channel.

        Raises:
            ValueError: if the channel count does not match the preset.
        """
        if images.dim() == 3:
            images = images.unsqueeze(1)
        if images.shape[1] != self.channels:
            raise ValueError(
                f"images have {images.shape[1]} channels but the preset expects {self.channels}"
            )
        x = images.float()
        if images.dtype == torch.uint8:
            x = x / 255.0
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std

    def to_dict(self) -> dict:
        """JSON-friendly description of the preset."""
        return asdict(self)

    def with_class_names(self, source: str | Path | Sequence[str]) -> Preset:
        """This preset with class names from a list, a text file (one name per line, or a
        JSON list) or a folder (its sorted sub-folder names, as an image folder labels them).

        Raises:
            DataError: the source is missing or empty, or holds another number of names than
                the preset's classes.

        Example:
            >>> Preset(8, 1, (0.5,), (0.5,), ("a", "b")).with_class_names(["x", "y"]).class_names
            ('x', 'y')
        """
        names = _read_class_names(source)
        if self.class_names and len(names) != len(self.class_names):
            raise DataError(f"{len(names)} class names from {_describe(source)}, but the model "
                            f"has {len(self.class_names)} outputs: give one name per output")
        return dataclasses.replace(self, class_names=tuple(names))


def _describe(source: str | Path | Sequence[str]) -> str:
    return str(source) if isinstance(source, (str, Path)) else "the list"


def _read_class_names(source: str | Path | Sequence[str]) -> list[str]:
    if not isinstance(source, (str, Path)):
        names = [str(n) for n in source]
    else:
        path = Path(source)
        if path.is_dir():
            names = sorted(p.name for p in path.iterdir()
                           if p.is_dir() and not p.name.startswith("."))
        elif path.is_file():
            text = path.read_text(encoding="utf-8")
            try:
                data = json.loads(text)
            except ValueError:
                data = None
            if isinstance(data, list) and all(isinstance(n, str) for n in data):
                names = data
            else:
                names = [line.strip() for line in text.splitlines() if line.strip()]
        else:
            raise DataError(f"class names: {path} is neither a file nor a folder")
    if not names:
        raise DataError(f"no class names in {_describe(source)}")
    return names
