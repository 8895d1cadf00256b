"""Procedural shapes: determinism, format, balance, class/colour independence, visibility."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from netcarve.data import SHAPE_CLASSES, SHAPES_MEAN, SHAPES_STD, make_shapes
from netcarve.data import shapes as shapes_module


def test_classes_declared():
    assert len(SHAPE_CLASSES) >= 6
    assert len(set(SHAPE_CLASSES)) == len(SHAPE_CLASSES)


def test_format():
    images, labels = make_shapes(10, seed=0)
    assert images.shape == (10, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.shape == (10,) and labels.dtype == torch.int64
    assert int(labels.min()) >= 0 and int(labels.max()) < len(SHAPE_CLASSES)
    big, _ = make_shapes(3, seed=0, size=48)
    assert big.shape == (3, 3, 48, 48)
    empty_images, empty_labels = make_shapes(0)
    assert empty_images.shape == (0, 3, 32, 32) and empty_labels.shape == (0,)


def test_same_seed_identical_different_seed_differs():
    a_images, a_labels = make_shapes(300, seed=5)
    b_images, b_labels = make_shapes(300, seed=5)
    assert torch.equal(a_images, b_images) and torch.equal(a_labels, b_labels)
    c_images, _ = make_shapes(300, seed=6)
    differs = (a_images != c_images).flatten(1).any(dim=1)
    assert differs.all()


def test_prefix_does_not_depend_on_n():
    long_images, long_labels = make_shapes(300, seed=2)
    for n in (1, 40, 260):  # 260 crosses the internal chunk boundary
        images, labels = make_shapes(n, seed=2)
        assert torch.equal(images, long_images[:n]) and torch.equal(labels, long_labels[:n])


def test_images_within_a_batch_are_varied():
    images, _ = make_shapes(64, seed=0)
    flat = images.flatten(1).float()
    assert len({tuple(row.tolist()) for row in images[:, :, 0, 0]}) > 50  # corner colours
    assert flat.std(dim=1).min() > 5  # no flat, empty images


def test_all_classes_present_and_balanced():
    _, labels = make_shapes(600, seed=3)
    counts = torch.bincount(labels, minlength=len(SHAPE_CLASSES))
    expected = 600 / len(SHAPE_CLASSES)
    assert (counts > 0).all()
    assert counts.min() >= 0.7 * expected and counts.max() <= 1.3 * expected


def test_class_not_predictable_from_mean_colour():
    k = len(SHAPE_CLASSES)
    train_x, train_y = make_shapes(2000, seed=11)
    test_x, test_y = make_shapes(2000, seed=12)
    train_feat = train_x.float().mean(dim=(2, 3))
    test_feat = test_x.float().mean(dim=(2, 3))
    centroids = torch.stack([train_feat[train_y == c].mean(0) for c in range(k)])
    predicted = torch.cdist(test_feat, centroids).argmin(dim=1)
    accuracy = (predicted == test_y).float().mean().item()
    # Chance is 1/k (0.125 for 8 classes). The bound is well under the 0.35 the data must
    # satisfy because weak leaks (e.g. shape hue = class) only reach about 0.37 here.
    assert accuracy < min(0.35, 1.6 / k), accuracy
    # Same on the training set itself, which is the most favourable case for the classifier.
    train_pred = torch.cdist(train_feat, centroids).argmin(dim=1)
    assert (train_pred == train_y).float().mean().item() < min(0.35, 1.6 / k)


def test_class_not_predictable_from_shape_colour():
    k = len(SHAPE_CLASSES)
    features, labels = [], []
    for chunk in range(4):
        image, coverage, label = shapes_module._render_chunk(
            np.random.default_rng([99, chunk]), 256, 32
        )
        inside = (coverage > 0.99)[:, None]
        features.append((image * inside).sum(axis=(2, 3)) / inside.sum(axis=(2, 3)))
        labels.append(label)
    feat = torch.from_numpy(np.concatenate(features))
    y = torch.from_numpy(np.concatenate(labels))
    half = len(y) // 2
    centroids = torch.stack([feat[:half][y[:half] == c].mean(0) for c in range(k)])
    predicted = torch.cdist(feat[half:], centroids).argmin(dim=1)
    accuracy = (predicted == y[half:]).float().mean().item()
    assert accuracy < min(0.35, 1.6 / k), accuracy


def test_normalisation_constants_match_generated_data():
    images, _ = make_shapes(2000, seed=21)
    pixels = images.double() / 255
    mean = pixels.mean(dim=(0, 2, 3))
    std = pixels.std(dim=(0, 2, 3))
    assert len(SHAPES_MEAN) == len(SHAPES_STD) == 3
    assert torch.allclose(mean, torch.tensor(SHAPES_MEAN, dtype=torch.float64), atol=0.01)
    assert torch.allclose(std, torch.tensor(SHAPES_STD, dtype=torch.float64), atol=0.01)


def test_shape_is_visible_against_background():
    rng = np.random.default_rng(0)
    image, coverage, _ = shapes_module._render_chunk(rng, 256, 32)
    value = image.max(axis=1)  # HSV value of every (noisy) pixel
    for i in range(len(image)):
        inside = coverage[i] > 0.99
        outside = coverage[i] < 0.01
        assert inside.sum() >= 12, f"image {i} shows too little of its shape"
        assert outside.sum() >= 0.4 * 32 * 32
        gap = abs(np.median(value[i][inside]) - np.median(value[i][outside]))
        assert gap > 0.2, f"image {i}: shape/background value gap {gap:.2f}"


def _canonical_mask(cls: int, angle: float, size: int = 48) -> np.ndarray:
    axis = (np.arange(size) + 0.5) / size * 2 - 1
    x, y = np.meshgrid(axis, axis)
    c, s = np.cos(angle), np.sin(angle)
    px, py = (c * x + s * y) / 0.8, (c * y - s * x) / 0.8
    return shapes_module._SDFS[cls](px[None], py[None])[0] < 0


def test_shapes_are_distinct_under_any_rotation():
    k = len(SHAPE_CLASSES)
    angles = np.linspace(0, 2 * np.pi, 36, endpoint=False)
    masks = [[_canonical_mask(c, a) for a in angles] for c in range(k)]
    for a in range(k):
        assert masks[a][0].mean() > 0.15, SHAPE_CLASSES[a]
        for b in range(a + 1, k):
            best = max((masks[a][0] & m).sum() / (masks[a][0] | m).sum() for m in masks[b])
            assert best < 0.85, (SHAPE_CLASSES[a], SHAPE_CLASSES[b], best)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"n": -1}, "n must be"),
        ({"n": 2, "seed": -3}, "seed must be"),
        ({"n": 2, "size": 4}, "size must be"),
        ({"n": 2, "task": "hue"}, "unknown task"),
    ],
)
def test_invalid_arguments(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        make_shapes(**kwargs)


def _shape_hue_matches(task: str) -> float:
    """Fraction of images whose shape pixels' median colour lies in the label's hue bin."""
    import colorsys

    from netcarve.data.shapes import _render_chunk

    image, coverage, labels = _render_chunk(np.random.default_rng([5, 0]), 256, 32, task)
    hits = 0
    for img, cov, lab in zip(image, coverage, labels, strict=True):
        rgb = np.median(img[:, cov > 0.95], axis=1).clip(0, 1)
        hue = colorsys.rgb_to_hsv(*rgb)[0]
        hits += round(hue * 8) % 8 == lab
    return hits / len(labels)


def test_harder_tasks_keep_labels_and_colour_task_labels_the_hue():
    x_shape, y_shape = make_shapes(64, seed=4)
    x_clutter, y_clutter = make_shapes(64, seed=4, task="clutter")
    x_colour, y_colour = make_shapes(64, seed=4, task="colour")
    assert torch.equal(y_shape, y_clutter) and torch.equal(y_shape, y_colour)
    assert not torch.equal(x_shape, x_clutter) and not torch.equal(x_clutter, x_colour)
    a, _ = make_shapes(8, seed=4, task="clutter")
    assert torch.equal(a, x_clutter[:8])  # deterministic, prefix independent of n
    # the shape's own pixels carry the label's hue in the colour task (the occluding bar
    # and noise leave most of them alone), and only by chance (1/8) in the clutter task
    assert _shape_hue_matches("colour") > 0.8
    assert _shape_hue_matches("clutter") < 0.3
