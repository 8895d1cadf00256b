"""Input presets: what a model expects to be fed (size, channels, normalisation, classes)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch


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
