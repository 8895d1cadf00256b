"""Preservation: how faithfully a circuit reproduces its target's response.

Pearson r between the original and the circuit's target response maps, flattened over
images × positions, accumulated in float64 so it can be streamed batch by batch; plus the
per-image r and the normalised mean absolute difference (mean |original − circuit| divided by
mean |original|).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch


@dataclass
class Preservation:
    """Preservation of a target response on a set of images.

    Attributes:
        pearson: Pearson r over images × positions (``nan`` when either map is constant).
        nmad: mean |original − circuit| ÷ mean |original| (0 is perfect).
        per_image_median: median of the per-image Pearson r (``nan`` for one-position targets).
        n_images: images measured.
        per_image: the per-image r values.
    """

    pearson: float
    nmad: float
    per_image_median: float
    n_images: int
    per_image: list[float] = field(default_factory=list, repr=False)

    def to_dict(self, *, per_image: bool = False) -> dict:
        """JSON-friendly dict (``nan`` becomes ``None``)."""
        d = asdict(self)
        if not per_image:
            d.pop("per_image")
        return {k: _json_number(v) for k, v in d.items()}


def _json_number(v):
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, list):
        return [_json_number(x) for x in v]
    return v


class PreservationMeter:
    """Streams batches of (original, circuit) response maps into a :class:`Preservation`.

    Example:
        >>> m = PreservationMeter()
        >>> a = torch.randn(4, 5, 5)
        >>> m.update(a, 2 * a + 1)
        >>> round(m.result().pearson, 6)
        1.0
    """

    def __init__(self) -> None:
        self._sums = torch.zeros(5, dtype=torch.float64)  # Σx Σy Σxx Σyy Σxy
        self._n = 0
        self._abs_diff = 0.0
        self._abs_orig = 0.0
        self._per_image: list[torch.Tensor] = []
        self._images = 0

    def update(self, original: torch.Tensor, circuit: torch.Tensor) -> None:
        """Add one batch of response maps ``[N, ...]`` (same shape for both)."""
        if original.shape != circuit.shape:
            raise ValueError(f"shape mismatch {tuple(original.shape)} vs {tuple(circuit.shape)}")
        x = original.detach().reshape(original.shape[0], -1).double().cpu()
        y = circuit.detach().reshape(circuit.shape[0], -1).double().cpu()
        self._sums += torch.stack(
            [x.sum(), y.sum(), (x * x).sum(), (y * y).sum(), (x * y).sum()]
        )
        self._n += x.numel()
        self._abs_diff += float((x - y).abs().sum())
        self._abs_orig += float(x.abs().sum())
        self._images += x.shape[0]
        if x.shape[1] > 1:
            self._per_image.append(_rowwise_pearson(x, y))

    def result(self) -> Preservation:
        """The accumulated :class:`Preservation`."""
        sx, sy, sxx, syy, sxy = self._sums.tolist()
        n = max(self._n, 1)
        cov = sxy / n - (sx / n) * (sy / n)
        vx = sxx / n - (sx / n) ** 2
        vy = syy / n - (sy / n) ** 2
        denom = math.sqrt(max(vx, 0.0) * max(vy, 0.0))
        # Relative threshold: a numerically constant map has no defined correlation.
        scale = max(sxx / n, syy / n, 1e-300)
        pearson = cov / denom if denom > 1e-12 * scale else float("nan")
        nmad = self._abs_diff / self._abs_orig if self._abs_orig > 0 else float("nan")
        per_image = torch.cat(self._per_image) if self._per_image else torch.empty(0)
        valid = per_image[~torch.isnan(per_image)]
        median = float(torch.quantile(valid, 0.5)) if valid.numel() else float("nan")
        return Preservation(
            pearson=float(max(-1.0, min(1.0, pearson))) if not math.isnan(pearson) else pearson,
            nmad=nmad,
            per_image_median=median,
            n_images=self._images,
            per_image=per_image.tolist(),
        )


def _rowwise_pearson(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    xc = x - x.mean(1, keepdim=True)
    yc = y - y.mean(1, keepdim=True)
    denom = (xc.norm(dim=1) * yc.norm(dim=1))
    r = (xc * yc).sum(1) / denom
    return torch.where(denom > 1e-12, r, torch.full_like(r, float("nan"))).clamp(-1, 1)
