"""Procedural coloured shapes: a small, infinite, seedable image-classification data set.

Each image shows one shape (the class) with a random colour, size, position and rotation
on a random, textured, noisy background. Colour is drawn independently of the class, so
a model (or a pruned circuit) can only solve the task by looking at the shape's outline.

Rendering is vectorised with numpy: every shape is a signed-distance function evaluated on
a pixel grid for a whole batch at once, and the distance is turned into a coverage value
with one pixel of anti-aliasing.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

__all__ = ["HUE_CLASSES", "SHAPES_MEAN", "SHAPES_STD", "SHAPE_CLASSES", "SHAPE_TASKS",
           "make_shapes"]

SHAPE_CLASSES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "ring",
    "crescent",
    "heart",
)

#: Classes of the ``"colour"`` task: the shape's hue, in eight 45° bins centred on 0°, 45°, ...
HUE_CLASSES: tuple[str, ...] = (
    "red", "orange", "chartreuse", "spring-green", "cyan", "azure", "violet", "rose",
)

SHAPE_TASKS: tuple[str, ...] = ("shape", "clutter", "colour")
"""Tasks of :func:`make_shapes`: ``shape`` (the original, easy), ``clutter`` (the same classes
on harder images) and ``colour`` (the clutter images, labelled by the shape's hue)."""

#: Per-channel (R, G, B) mean of :func:`make_shapes` pixels scaled to [0, 1], measured on
#: 20,000 images at 32×32 (seed 0). Use with ``SHAPES_STD`` to build a ``Preset``.
SHAPES_MEAN: tuple[float, float, float] = (0.383, 0.381, 0.381)
#: Per-channel (R, G, B) standard deviation, measured like :data:`SHAPES_MEAN`.
SHAPES_STD: tuple[float, float, float] = (0.269, 0.269, 0.269)

# Images are rendered in fixed-size chunks, each from its own seeded stream, so the first
# k images of make_shapes(n, seed) do not depend on n.
_CHUNK = 256

# Geometry, in "half-image" units (the image spans [-1, 1] on both axes).
_RADIUS_RANGE = (0.38, 0.72)  # shape scale: about 6 to 11.5 pixels at 32x32
_INSIDE_MARGIN = 0.85  # centres keep 85% of the scale inside the frame: shapes stay mostly in

# Colour. Contrast is enforced on HSV value so the shape always differs from the
# background in brightness, whatever the two hues are.
_MIN_VALUE_CONTRAST = 0.4
_BG_SHIFT = (0.08, 0.2, 0.1)  # max hue, saturation, value change across the background
_NOISE_RANGE = (0.01, 0.06)  # per-pixel Gaussian noise sigma, in [0, 1] pixel units

# The harder images of the "clutter" and "colour" tasks: smaller shapes, less contrast, more
# noise, small distractor discs and an occluding bar.
_HARD_RADIUS_RANGE = (0.35, 0.6)  # about 5.5 to 9.5 pixels across at 32x32
_HARD_MIN_CONTRAST = 0.3
_HARD_NOISE_RANGE = (0.03, 0.1)
_CLUTTER_DISCS = 4  # per image, each present with chance 0.75
_CLUTTER_RADIUS = (0.06, 0.16)  # image half-units: well below the smallest shape
_P_OCCLUDER = 0.5  # chance of a bar across the shape
_HUE_JITTER = 0.3  # colour task: hue within +-30% of a bin's width around its centre

_Sdf = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _box(px: np.ndarray, py: np.ndarray, hx: float, hy: float) -> np.ndarray:
    qx = np.abs(px) - hx
    qy = np.abs(py) - hy
    outside = np.hypot(np.maximum(qx, 0.0), np.maximum(qy, 0.0))
    return outside + np.minimum(np.maximum(qx, qy), 0.0)


def _polygon(vertices: np.ndarray) -> _Sdf:
    """Signed distance to a closed polygon (negative inside), by edges and an even-odd test."""
    edges = [
        (float(ax), float(ay), float(bx), float(by))
        for (ax, ay), (bx, by) in zip(vertices, np.roll(vertices, -1, axis=0), strict=True)
    ]

    def sdf(px: np.ndarray, py: np.ndarray) -> np.ndarray:
        dist2 = np.full(px.shape, np.inf, dtype=px.dtype)
        inside = np.zeros(px.shape, dtype=bool)
        for ax, ay, bx, by in edges:
            ex, ey = bx - ax, by - ay
            wx, wy = px - ax, py - ay
            t = np.clip((wx * ex + wy * ey) / (ex * ex + ey * ey), 0.0, 1.0)
            dx, dy = wx - ex * t, wy - ey * t
            np.minimum(dist2, dx * dx + dy * dy, out=dist2)
            if ey != 0.0:  # horizontal edges never cross a horizontal ray
                straddles = (ay > py) != (by > py)
                inside ^= straddles & (px < ax + (py - ay) * (ex / ey))
        dist = np.sqrt(dist2)
        return np.where(inside, -dist, dist)

    return sdf


def _star_vertices(points: int, outer: float, inner: float) -> np.ndarray:
    angles = np.pi / 2 + np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, outer, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _circle(px: np.ndarray, py: np.ndarray) -> np.ndarray:
    return np.hypot(px, py) - 0.95


def _square(px: np.ndarray, py: np.ndarray) -> np.ndarray:
    return _box(px, py, 0.78, 0.78)


def _cross(px: np.ndarray, py: np.ndarray) -> np.ndarray:
    return np.minimum(_box(px, py, 1.0, 0.32), _box(px, py, 0.32, 1.0))


def _ring(px: np.ndarray, py: np.ndarray) -> np.ndarray:
    # Wide band (outer radius 0.97, hole 0.43) so the hole stays visible on small shapes.
    return np.abs(np.hypot(px, py) - 0.7) - 0.27


def _crescent(px: np.ndarray, py: np.ndarray) -> np.ndarray:
    return np.maximum(np.hypot(px, py) - 1.0, -(np.hypot(px - 0.42, py) - 0.78))


_HEART_H = 0.85  # diamond half-diagonal; lobes are discs on its two upper edges
_HEART_DY = -0.1036 * _HEART_H  # centres the shape vertically (it spans -1.0h to +1.207h)


def _heart(px: np.ndarray, py: np.ndarray) -> np.ndarray:
    h = _HEART_H
    y = py - _HEART_DY
    c = math.sqrt(0.5)
    diamond = _box((px + y) * c, (y - px) * c, h * c, h * c)
    lobes = np.hypot(np.abs(px) - h / 2, y - h / 2) - h * c
    return np.minimum(diamond, lobes)


_SDFS: tuple[_Sdf, ...] = (
    _circle,
    _square,
    _polygon(_star_vertices(3, 1.1, 0.55)),  # a 3-point "star" with inner = outer/2 is a triangle
    _polygon(_star_vertices(5, 1.08, 0.45)),
    _cross,
    _ring,
    _crescent,
    _heart,
)
assert len(_SDFS) == len(SHAPE_CLASSES)


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """HSV in [0, 1] (any shape) -> RGB with a trailing axis of 3."""
    channels = []
    for n in (5.0, 3.0, 1.0):  # R, G, B
        k = (n + h * 6.0) % 6.0
        channels.append(v - v * s * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0))
    return np.stack(channels, axis=-1)


def _upsample_matrix(coarse: int, size: int) -> np.ndarray:
    """``[size, coarse]`` linear-interpolation weights from a coarse grid to pixel centres."""
    pos = (np.arange(size) + 0.5) / size * (coarse - 1)
    lo = np.minimum(np.floor(pos).astype(int), coarse - 2)
    frac = pos - lo
    weights = np.zeros((size, coarse), dtype=np.float32)
    weights[np.arange(size), lo] = 1.0 - frac
    weights[np.arange(size), lo + 1] = frac
    return weights


def _texture(rng: np.random.Generator, count: int, size: int) -> np.ndarray:
    """Smooth random field in [0, 1], ``[count, size, size]``: two octaves of value noise."""
    field = np.zeros((count, size, size), dtype=np.float32)
    for coarse, weight in ((4, 0.65), (9, 0.35)):
        grid = rng.random((count, coarse, coarse), dtype=np.float32)
        up = _upsample_matrix(coarse, size)
        field += weight * np.einsum("yi,nij,xj->nyx", up, grid, up, optimize=True)
    return field


def _contrasting_value(rng: np.random.Generator, v_bg: np.ndarray,
                       contrast: float = _MIN_VALUE_CONTRAST) -> np.ndarray:
    """A value in [0, 1] at least ``contrast`` away from ``v_bg``, uniformly."""
    below = np.maximum(v_bg - contrast, 0.0)
    above = np.maximum(1.0 - (v_bg + contrast), 0.0)
    u = rng.random(v_bg.shape) * (below + above)
    return np.where(u < below, u, v_bg + contrast + (u - below))


def _clutter(rng: np.random.Generator, image: np.ndarray, alpha: np.ndarray,
             size: int) -> np.ndarray:
    """Paint the harder tasks' extras onto ``image [n, 3, s, s]`` (shape coverage ``alpha
    [n, 1, s, s]``): small random-colour discs under the shape, then a bar of random colour
    across it on some images (an occluder). Returns the new image."""
    n = image.shape[0]
    axis = ((np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0)
    gx, gy = axis[None, None, :], axis[None, :, None]
    for _ in range(_CLUTTER_DISCS):
        present = rng.random(n) < 0.75
        r = rng.uniform(*_CLUTTER_RADIUS, size=n).astype(np.float32)[:, None, None]
        cx = rng.uniform(-0.9, 0.9, size=n).astype(np.float32)[:, None, None]
        cy = rng.uniform(-0.9, 0.9, size=n).astype(np.float32)[:, None, None]
        colour = _hsv_to_rgb(rng.random(n), rng.uniform(0, 1, n), rng.uniform(0, 1, n))
        dist = (np.hypot(gx - cx, gy - cy) - r) * (size / 2.0)
        cover = np.clip(0.5 - dist, 0.0, 1.0)[:, None] * (1.0 - alpha)
        cover *= present[:, None, None, None]
        image = image + (colour.astype(np.float32)[:, :, None, None] - image) * cover
    present = rng.random(n) < _P_OCCLUDER
    angle = rng.uniform(0.0, np.pi, size=n).astype(np.float32)[:, None, None]
    offset = rng.uniform(-0.15, 0.15, size=n).astype(np.float32)[:, None, None]
    half = rng.uniform(0.04, 0.07, size=n).astype(np.float32)[:, None, None]
    colour = _hsv_to_rgb(rng.random(n), rng.uniform(0, 1, n), rng.uniform(0, 1, n))
    # the bar passes near the image centre region where the shape's own centre is drawn
    across = np.abs(np.cos(angle) * gy - np.sin(angle) * gx - offset) - half
    cover = np.clip(0.5 - across * (size / 2.0), 0.0, 1.0)[:, None]
    cover *= present[:, None, None, None]
    return image + (colour.astype(np.float32)[:, :, None, None] - image) * cover


def _render_chunk(
    rng: np.random.Generator, count: int, size: int, task: str = "shape"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render ``count`` images; returns float RGB ``[n, 3, s, s]`` in [0, 1], coverage, labels.

    All per-image parameters are drawn before any per-pixel randomness so that the same
    seed gives the same shapes, colours and poses at every ``size``.
    """
    k = len(SHAPE_CLASSES)
    hard = task != "shape"
    labels = rng.permutation(np.arange(count) % k)  # exactly balanced per full chunk
    shapes = rng.permutation(np.arange(count) % k) if task == "colour" else labels
    radius = rng.uniform(*(_HARD_RADIUS_RANGE if hard else _RADIUS_RANGE), size=count)
    reach = 1.0 - _INSIDE_MARGIN * radius
    cx = rng.uniform(-reach, reach)
    cy = rng.uniform(-reach, reach)
    theta = rng.uniform(0.0, 2.0 * np.pi, size=count)

    bg_h = rng.random(count)
    bg_s = rng.uniform(0.0, 0.85, size=count)
    bg_v = rng.uniform(0.05, 0.95, size=count)
    fg_h = rng.random(count)
    fg_s = rng.uniform(0.35, 1.0, size=count)
    fg_v = _contrasting_value(rng, bg_v, _HARD_MIN_CONTRAST if hard else _MIN_VALUE_CONTRAST)
    if task == "colour":  # the label is the hue bin: a bright, saturated hue near its centre
        fg_h = (labels + rng.uniform(-_HUE_JITTER, _HUE_JITTER, size=count)) / k % 1.0
        fg_s = rng.uniform(0.6, 1.0, size=count)
        fg_v = rng.uniform(0.6, 1.0, size=count)
        bg_v = _contrasting_value(rng, fg_v, _HARD_MIN_CONTRAST)
    shift = rng.uniform(-1.0, 1.0, size=(3, count)) * np.array(_BG_SHIFT)[:, None]
    # The second background colour moves value away from the shape, keeping the contrast.
    away = np.where(fg_v > bg_v, -1.0, 1.0)
    bg2_h = (bg_h + shift[0]) % 1.0
    bg2_s = np.clip(bg_s + shift[1], 0.0, 1.0)
    bg2_v = np.clip(bg_v + away * np.abs(shift[2]), 0.0, 1.0)
    sigma = rng.uniform(*(_HARD_NOISE_RANGE if hard else _NOISE_RANGE),
                        size=count).astype(np.float32)

    # Pixel centres in half-image units; y grows downwards like image rows.
    axis = ((np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0)[None, None, :]
    dx = axis - cx[:, None, None].astype(np.float32)
    dy = axis.transpose(0, 2, 1) - cy[:, None, None].astype(np.float32)
    cos = np.cos(theta).astype(np.float32)[:, None, None]
    sin = np.sin(theta).astype(np.float32)[:, None, None]
    inv_r = (1.0 / radius).astype(np.float32)[:, None, None]
    px = (cos * dx + sin * dy) * inv_r
    py = (cos * dy - sin * dx) * inv_r

    sdf = np.empty((count, size, size), dtype=np.float32)
    for cls, shape_sdf in enumerate(_SDFS):
        idx = np.flatnonzero(shapes == cls)
        if idx.size:
            sdf[idx] = shape_sdf(px[idx], py[idx])
    # Local distance * radius = image units; * size/2 = pixels. A 1-pixel ramp anti-aliases.
    pixels = sdf * (radius.astype(np.float32) * (size / 2.0))[:, None, None]
    coverage = np.clip(0.5 - pixels, 0.0, 1.0)

    field = _texture(rng, count, size)[:, None]
    bg1 = _hsv_to_rgb(bg_h, bg_s, bg_v).astype(np.float32)[:, :, None, None]
    bg2 = _hsv_to_rgb(bg2_h, bg2_s, bg2_v).astype(np.float32)[:, :, None, None]
    fg = _hsv_to_rgb(fg_h, fg_s, fg_v).astype(np.float32)[:, :, None, None]
    background = bg1 + (bg2 - bg1) * field
    alpha = coverage[:, None]
    image = background + (fg - background) * alpha
    if hard:
        image = _clutter(rng, image, alpha, size)
    image += rng.standard_normal(image.shape, dtype=np.float32) * sigma[:, None, None, None]
    return image, coverage, labels


def make_shapes(n: int, seed: int = 0, size: int = 32,
                task: str = "shape") -> tuple[torch.Tensor, torch.Tensor]:
    """Generate ``n`` coloured-shape images, deterministically from ``seed``.

    ``task="shape"`` (the default) is described below. ``"clutter"`` keeps its classes but
    makes the images harder: smaller shapes (about 5.5–9.5 pixels across at 32×32), a value
    contrast of only 0.3, noise sigma 0.03–0.1, up to four small random-colour discs and, on
    half of the images, a bar of random colour across the middle that can occlude the shape;
    colour is still independent of the label. ``"colour"`` renders the same kind of images but the
    label is the shape's hue bin (:data:`HUE_CLASSES`, eight 45° bins, hue within ±30% of a
    bin's width of its centre, saturation and value 0.6–1) and the shape is random.

    The class (index into :data:`SHAPE_CLASSES`) is the shape only; the shape's hue,
    saturation and value, its size, position (mostly inside the frame) and rotation, and
    the textured, noisy background colour are all random and independent of the class.
    The shape's HSV value always differs from the background's by at least 0.4, so it is
    visible. Classes are balanced in every block of 256 images. The same ``seed`` gives
    identical bytes, and the first ``k`` images do not depend on ``n``.

    Args:
        n: number of images (0 allowed).
        seed: non-negative integer seed.
        size: image side in pixels (at least 8).
        task: one of :data:`SHAPE_TASKS`.

    Returns:
        ``(images, labels)``: ``uint8 [n, 3, size, size]`` and ``int64 [n]``.

    Raises:
        ValueError: if ``n`` or ``seed`` is negative, ``size`` is below 8 or ``task``
            unknown.

    Example:
        >>> images, labels = make_shapes(4, seed=1)
        >>> images.shape, images.dtype, labels.dtype
        (torch.Size([4, 3, 32, 32]), torch.uint8, torch.int64)
    """
    n, seed, size = int(n), int(seed), int(size)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if size < 8:
        raise ValueError(f"size must be >= 8, got {size}")
    if task not in SHAPE_TASKS:
        raise ValueError(f"unknown task {task!r}; use one of {', '.join(SHAPE_TASKS)}")

    images = np.empty((n, 3, size, size), dtype=np.uint8)
    labels = np.empty(n, dtype=np.int64)
    for chunk, start in enumerate(range(0, n, _CHUNK)):
        stop = min(start + _CHUNK, n)
        rng = np.random.default_rng([seed, chunk])
        # Always render a full chunk so the random streams (and hence images) of a
        # chunk do not depend on how many of its images were asked for.
        rendered, _, chunk_labels = _render_chunk(rng, _CHUNK, size, task)
        keep = stop - start
        np.clip(rendered[:keep] * 255.0 + 0.5, 0.0, 255.0, out=rendered[:keep])
        images[start:stop] = rendered[:keep]
        labels[start:stop] = chunk_labels[:keep]
    return torch.from_numpy(images), torch.from_numpy(labels)
