"""How an activation-maximisation image is parameterised: pixels or a Fourier spectrum scaled
by ``1/f``, with colours decorrelated by the data set's RGB covariance (its square root maps
decorrelated colours back to RGB)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.fx

from netcarve.core.errors import NetcarveError

if TYPE_CHECKING:
    pass


__all__ = ["SHAPES_RGB_COVARIANCE", "FeatureVizError", "colour_covariance", "colour_decorrelation"]


class FeatureVizError(NetcarveError):
    """Bad feature-visualisation arguments (steps, learning rate, transforms, shapes)."""


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
