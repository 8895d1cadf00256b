"""Image-folder loader: conversion, resizing, normalisation, label order and error reporting."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from netcarve.core.errors import DataError
from netcarve.data import FASHION_MNIST_CLASSES, ImageFolderData, load_image_folder
from netcarve.data.preset import Preset

RGB8 = Preset(8, 3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
GREY4 = Preset(4, 1, (0.0,), (1.0,))


def save(path: Path, array: np.ndarray, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return path


def solid(colour: tuple[int, int, int], h: int = 10, w: int = 6) -> np.ndarray:
    return np.broadcast_to(np.array(colour, np.uint8), (h, w, 3)).copy()


def test_loads_resizes_normalises_and_sorts(tmp_path):
    save(tmp_path / "zebra" / "z1.png", solid((255, 0, 0)))
    save(tmp_path / "apple" / "b.bmp", solid((0, 255, 0), 3, 20))
    save(tmp_path / "apple" / "a.JPG", solid((0, 0, 255), 40, 40), quality=100)
    (tmp_path / "apple" / "notes.txt").write_text("not an image")
    (tmp_path / "zebra" / ".hidden.png").write_bytes(b"junk, but hidden")
    (tmp_path / "empty_class").mkdir()

    data = load_image_folder(tmp_path, RGB8)
    assert isinstance(data, ImageFolderData) and len(data) == 3
    assert data.class_names == ("apple", "empty_class", "zebra")
    assert [p.name for p in data.paths] == ["a.JPG", "b.bmp", "z1.png"]
    assert data.labels.dtype == torch.int64 and data.labels.tolist() == [0, 0, 2]
    assert data.images.dtype == torch.float32 and data.images.shape == (3, 3, 8, 8)
    # Solid colours survive bilinear resizing; (x - 0.5) / 0.25 maps 0 -> -2 and 1 -> 2.
    red = data.images[2]
    assert torch.allclose(red[0], torch.full((8, 8), 2.0))
    assert torch.allclose(red[1:], torch.full((2, 8, 8), -2.0))
    assert torch.allclose(data.images[1, 1], torch.full((8, 8), 2.0))
    assert torch.allclose(data.images[0, 2], torch.full((8, 8), 2.0), atol=0.05)  # JPEG


def test_resize_is_bilinear_and_matches_preset_normalize(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(13, 17, 3), dtype=np.uint8)
    path = save(tmp_path / "c" / "x.png", pixels)
    data = load_image_folder(tmp_path, RGB8)
    expected = np.array(Image.fromarray(pixels).resize((8, 8), Image.Resampling.BILINEAR))
    expected_t = RGB8.normalize(torch.from_numpy(expected).permute(2, 0, 1)[None].contiguous())
    assert torch.allclose(data.images, expected_t)
    assert data.paths == (path,)


def test_channels_follow_preset(tmp_path):
    save(tmp_path / "c" / "rgb.png", solid((255, 255, 255)))
    grey = np.full((5, 5), 128, np.uint8)
    save(tmp_path / "c" / "grey.png", grey)
    save(tmp_path / "c" / "palette.gif", solid((255, 255, 255)))
    rgba = np.zeros((6, 6, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[..., 3] = 255
    save(tmp_path / "c" / "rgba.webp", rgba, lossless=True)

    as_grey = load_image_folder(tmp_path, GREY4)
    assert as_grey.images.shape == (4, 1, 4, 4)
    by_name = {p.name: img for p, img in zip(as_grey.paths, as_grey.images, strict=True)}
    assert torch.allclose(by_name["grey.png"], torch.full((1, 4, 4), 128 / 255))
    for name in ("rgb.png", "palette.gif", "rgba.webp"):
        assert torch.allclose(by_name[name], torch.ones(1, 4, 4)), name

    as_rgb = load_image_folder(tmp_path, RGB8)
    assert as_rgb.images.shape == (4, 3, 8, 8)
    grey_rgb = as_rgb.images[[p.name for p in as_rgb.paths].index("grey.png")]
    assert torch.allclose(grey_rgb, torch.full((3, 8, 8), (128 / 255 - 0.5) / 0.25), atol=1e-5)


def test_corrupt_images_are_all_listed(tmp_path):
    save(tmp_path / "a" / "good.png", solid((1, 2, 3)))
    garbage = tmp_path / "a" / "garbage.png"
    garbage.write_bytes(b"this is not a png at all")
    good_bytes = save(
        tmp_path / "b" / "full.png", np.arange(3 * 64 * 64, dtype=np.uint8).reshape(64, 64, 3)
    ).read_bytes()
    truncated = tmp_path / "b" / "truncated.png"
    truncated.write_bytes(good_bytes[: len(good_bytes) // 2])
    empty = tmp_path / "b" / "empty.jpg"
    empty.write_bytes(b"")

    with pytest.raises(DataError) as err:
        load_image_folder(tmp_path, RGB8)
    message = str(err.value)
    for bad in (garbage, truncated, empty):
        assert str(bad) in message
    assert "good.png" not in message and "full.png" not in message
    assert message.startswith("3 of 5 images")


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_image_folder(tmp_path / "absent", RGB8)
    file = tmp_path / "file.png"
    file.write_bytes(b"")
    with pytest.raises(DataError, match="not a directory"):
        load_image_folder(file, RGB8)
    flat = tmp_path / "flat"
    save(flat / "loose.png", solid((0, 0, 0)))
    with pytest.raises(DataError, match="no class sub-folders"):
        load_image_folder(flat, RGB8)
    no_images = tmp_path / "no_images"
    (no_images / "cat").mkdir(parents=True)
    (no_images / "cat" / "readme.txt").write_text("hi")
    with pytest.raises(DataError, match="no images") as err:
        load_image_folder(no_images, RGB8)
    assert "cat" in str(err.value)


def test_labels_follow_preset_order_when_names_match(tmp_path):
    preset = Preset(8, 3, (0.5,) * 3, (0.25,) * 3, ("zebra", "apple", "mango"))
    for name in ("apple", "mango", "zebra"):
        save(tmp_path / name / "1.png", solid((0, 0, 0)))
    data = load_image_folder(tmp_path, preset)
    assert data.class_names == ("zebra", "apple", "mango")
    # Files come in sorted folder order: apple, mango, zebra.
    assert data.labels.tolist() == [1, 2, 0]
    assert [data.class_names[i] for i in data.labels] == [p.parent.name for p in data.paths]


def test_fashion_names_match_despite_slash(tmp_path):
    preset = Preset(28, 1, (0.286,), (0.353,), FASHION_MNIST_CLASSES)
    folders = [
        "T-shirt_top",
        "trouser",
        "Pullover",
        "dress",
        "coat",
        "sandal",
        "shirt",
        "sneaker",
        "bag",
        "ankle_boot",
    ]
    for name in folders:
        save(tmp_path / name / "x.png", np.zeros((28, 28), np.uint8))
    data = load_image_folder(tmp_path, preset)
    assert data.class_names == FASHION_MNIST_CLASSES
    by_folder = {
        p.parent.name: int(label) for p, label in zip(data.paths, data.labels, strict=True)
    }
    assert by_folder["T-shirt_top"] == 0
    assert by_folder["ankle_boot"] == 9
    assert by_folder["bag"] == 8


def test_labels_follow_sorted_folders_when_names_differ(tmp_path):
    preset = Preset(8, 3, (0.5,) * 3, (0.25,) * 3, ("zebra", "apple", "kiwi"))
    for name in ("zebra", "apple", "mango"):
        save(tmp_path / name / "1.png", solid((0, 0, 0)))
    data = load_image_folder(tmp_path, preset)
    assert data.class_names == ("apple", "mango", "zebra")
    assert data.labels.tolist() == [0, 1, 2]


def test_custom_extensions_and_nested_files(tmp_path):
    save(tmp_path / "a" / "deep" / "er" / "x.png", solid((9, 9, 9)))
    save(tmp_path / "a" / "y.bmp", solid((9, 9, 9)))
    only_png = load_image_folder(tmp_path, RGB8, extensions=("png",))
    assert [p.name for p in only_png.paths] == ["x.png"]
    assert len(load_image_folder(tmp_path, RGB8)) == 2


def test_dataset_load_decodes_only_the_requested_items(tmp_path, monkeypatch):
    """``ImageFolderDataset.load`` gives exactly the rows of ``load_image_folder`` and decodes
    nothing else; ``analysis_data`` on a folder therefore reads only its drawn images."""
    from netcarve.data import ImageFolderDataset
    from netcarve.training.evaluation import analysis_data

    gen = np.random.default_rng(0)
    for i in range(12):
        save(tmp_path / ("a" if i % 3 else "b") / f"{i:02d}.png",
             gen.integers(0, 256, (9, 7, 3), dtype=np.uint8))
    whole = load_image_folder(tmp_path, RGB8)
    ds = ImageFolderDataset(tmp_path, RGB8)
    read: list[int] = []
    real = ImageFolderDataset.read_pixels
    monkeypatch.setattr(ImageFolderDataset, "read_pixels",
                        lambda self, i: read.append(i) or real(self, i))
    x, y = ds.load([7, 2, 11])
    assert read == [7, 2, 11]
    assert torch.equal(x, whole.images[[7, 2, 11]]) and torch.equal(y, whole.labels[[7, 2, 11]])
    read.clear()
    scoring, heldout = analysis_data(RGB8, 3, 2, images_dir=str(tmp_path), seed=4)
    assert len(read) == 5
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(4))
    assert torch.equal(scoring, whole.images[perm[:3]])
    assert torch.equal(heldout, whole.images[perm[3:5]])
