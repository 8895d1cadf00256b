"""Random transforms applied to the image at every optimisation step (jitter, scale, rotation,
padding), seeded, so that the visualisation is robust rather than adversarial."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.fx
import torch.nn.functional as F

if TYPE_CHECKING:
    pass

from netcarve.viz.parameterization import FeatureVizError

__all__ = ["Transforms"]


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
