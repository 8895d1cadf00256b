"""Fashion-MNIST IDX reader and loader: real data where installed, synthetic files otherwise."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from netcarve.core.errors import DataError
from netcarve.data import (
    DEFAULT_FASHION_MNIST_DIR,
    FASHION_MNIST_CLASSES,
    find_fashion_mnist_dir,
    load_fashion_mnist,
    read_idx,
)
from netcarve.data import fashion_mnist as fm

REAL_DIR = Path(DEFAULT_FASHION_MNIST_DIR)
needs_real = pytest.mark.skipif(
    not (REAL_DIR / "t10k-labels-idx1-ubyte.gz").is_file(),
    reason="Fashion-MNIST not installed (sudo apt-get install -y dataset-fashion-mnist)",
)

CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C}
CODES.update({np.float32: 0x0D, np.float64: 0x0E})


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode an array as IDX (big-endian), written independently of the reader."""
    code = CODES[array.dtype.type]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_split(
    directory: Path,
    prefix: str,
    images: np.ndarray,
    labels: np.ndarray,
    gz: bool = True,
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
        blob = idx_bytes(array)
        name = f"{prefix}-{kind}-ubyte"
        if gz:
            (directory / (name + ".gz")).write_bytes(gzip.compress(blob))
        else:
            (directory / name).write_bytes(blob)


def fake_dataset(directory: Path, n: int = 5, gz: bool = True, fill: int = 7) -> Path:
    rng = np.random.default_rng(fill)
    for prefix in ("train", "t10k"):
        images = np.full((n, 28, 28), fill, dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        write_split(directory, prefix, images, labels, gz=gz)
    return directory


@pytest.fixture
def no_default(monkeypatch, tmp_path):
    """Isolate from the real installation and the user's environment."""
    monkeypatch.setattr(fm, "DEFAULT_FASHION_MNIST_DIR", str(tmp_path / "nowhere"))
    monkeypatch.delenv("NETCARVE_DATA", raising=False)


# --- real data ---------------------------------------------------------------------------


@needs_real
def test_real_test_split_counts_and_balance():
    images, labels = load_fashion_mnist("test")
    assert images.shape == (10_000, 1, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (10_000,) and labels.dtype == torch.int64
    # The published test set has exactly 1,000 images of each class.
    assert torch.bincount(labels, minlength=10).tolist() == [1000] * 10
    # Known first labels: Ankle boot, Pullover, Trouser, Trouser.
    assert labels[:4].tolist() == [9, 2, 1, 1]
    assert FASHION_MNIST_CLASSES[labels[0]] == "Ankle boot"
    assert 0.27 < images.float().mean().item() / 255 < 0.30


@needs_real
def test_real_train_split_and_cache_is_not_shared():
    images, labels = load_fashion_mnist("train")
    assert images.shape == (60_000, 1, 28, 28)
    assert torch.bincount(labels, minlength=10).tolist() == [6000] * 10
    assert labels[:6].tolist() == [9, 0, 0, 3, 0, 2]
    first_pixel = images[0, 0, 14, 14].item()
    images[0].fill_(255 - first_pixel)
    labels[0] = 3
    again_images, again_labels = load_fashion_mnist("train")
    assert again_images[0, 0, 14, 14].item() == first_pixel
    assert again_labels[0].item() == 9


@needs_real
def test_real_gzip_and_raw_are_equivalent(tmp_path):
    gz_path = REAL_DIR / "t10k-labels-idx1-ubyte.gz"
    raw_path = tmp_path / "t10k-labels-idx1-ubyte"
    raw_path.write_bytes(gzip.decompress(gz_path.read_bytes()))
    from_gz, from_raw = read_idx(gz_path), read_idx(raw_path)
    assert from_gz.dtype == np.uint8 and from_gz.shape == (10_000,)
    np.testing.assert_array_equal(from_gz, from_raw)


@needs_real
def test_find_default_dir(monkeypatch):
    monkeypatch.delenv("NETCARVE_DATA", raising=False)
    assert find_fashion_mnist_dir() == REAL_DIR


# --- read_idx on synthetic files ---------------------------------------------------------


@pytest.mark.parametrize("dtype", list(CODES))
def test_read_idx_round_trips_every_type(tmp_path, dtype):
    array = (np.arange(2 * 3 * 4) - 5).astype(dtype).reshape(2, 3, 4)
    path = tmp_path / "a.idx"
    path.write_bytes(idx_bytes(array))
    out = read_idx(path)
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative
    np.testing.assert_array_equal(out, array)
    out[0, 0, 0] = 1  # must be writable


def test_gzip_detected_by_magic_not_name(tmp_path):
    array = np.arange(60, dtype=np.uint8).reshape(3, 4, 5)
    disguised = tmp_path / "plain-name-idx3-ubyte"  # gzipped, no .gz suffix
    disguised.write_bytes(gzip.compress(idx_bytes(array)))
    misnamed = tmp_path / "raw.gz"  # raw, with a .gz suffix
    misnamed.write_bytes(idx_bytes(array))
    np.testing.assert_array_equal(read_idx(disguised), array)
    np.testing.assert_array_equal(read_idx(misnamed), array)


def test_truncated_raw_file(tmp_path):
    blob = idx_bytes(np.zeros((4, 28, 28), dtype=np.uint8))
    path = tmp_path / "short-idx3-ubyte"
    path.write_bytes(blob[:-100])
    with pytest.raises(DataError) as err:
        read_idx(path)
    message = str(err.value)
    assert str(path) in message
    assert "truncated" in message
    assert f"expected {4 * 28 * 28} bytes" in message and f"found {4 * 28 * 28 - 100}" in message


def test_truncated_gzip_stream(tmp_path):
    blob = gzip.compress(idx_bytes(np.arange(1000, dtype=np.int32)))
    path = tmp_path / "cut.gz"
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match="corrupt gzip") as err:
        read_idx(path)
    assert str(path) in str(err.value)


def test_gzip_bad_crc(tmp_path):
    blob = bytearray(gzip.compress(idx_bytes(np.arange(100, dtype=np.uint8))))
    blob[-8] ^= 0xFF  # first byte of the CRC32 trailer
    path = tmp_path / "crc.gz"
    path.write_bytes(bytes(blob))
    with pytest.raises(DataError, match="corrupt gzip") as err:
        read_idx(path)
    assert str(path) in str(err.value)


def test_trailing_bytes(tmp_path):
    path = tmp_path / "long"
    path.write_bytes(idx_bytes(np.zeros((2, 3), dtype=np.uint8)) + b"\x00\x01\x02")
    with pytest.raises(DataError, match="3 trailing bytes") as err:
        read_idx(path)
    assert str(path) in str(err.value) and "expected 6 bytes, found 9" in str(err.value)


@pytest.mark.parametrize(
    ("blob", "needle"),
    [
        (b"\x1f\x00\x08\x01" + struct.pack(">I", 1) + b"\x00", "magic"),
        (b"\x00\x01\x08\x01" + struct.pack(">I", 1) + b"\x00", "magic"),
        (b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x00", "type code 0x07"),
        (b"\x00\x00\x08\x00", "0 dimensions"),
        (b"\x00\x00\x08\x03" + struct.pack(">I", 1), "header truncated"),
        (b"\x00\x00", "only 2 bytes"),
        (b"", "only 0 bytes"),
    ],
)
def test_bad_headers(tmp_path, blob, needle):
    path = tmp_path / "bad.idx"
    path.write_bytes(blob)
    with pytest.raises(DataError, match=needle) as err:
        read_idx(path)
    assert str(path) in str(err.value)


def test_huge_declared_dims_are_reported_not_allocated(tmp_path):
    path = tmp_path / "huge"
    path.write_bytes(b"\x00\x00\x0e\x03" + struct.pack(">3I", 2**32 - 1, 2**32 - 1, 9) + b"x")
    with pytest.raises(DataError, match="truncated"):
        read_idx(path)


def test_missing_file_is_data_error(tmp_path):
    with pytest.raises(DataError, match="cannot read"):
        read_idx(tmp_path / "absent.gz")


# --- load_fashion_mnist validation on synthetic data sets ----------------------------------


def test_load_from_synthetic_raw_files(tmp_path, no_default):
    root = fake_dataset(tmp_path / "raw", n=6, gz=False)
    images, labels = load_fashion_mnist("test", root=root)
    assert images.shape == (6, 1, 28, 28) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and int(images[0, 0, 0, 0]) == 7


def test_unknown_split(tmp_path):
    with pytest.raises(DataError, match="'train', 'test'"):
        load_fashion_mnist("validation", root=tmp_path)


@pytest.mark.parametrize(
    ("images", "labels", "needle", "bad_file"),
    [
        (np.zeros((3, 27, 28), np.uint8), np.zeros(3, np.uint8), "28, 28", "images"),
        (np.zeros((3, 784), np.uint8)[:, :, None], np.zeros(3, np.uint8), "28, 28", "images"),
        (np.zeros((3, 28, 28), np.uint8), np.zeros((3, 1), np.uint8), "1-D", "labels"),
        (np.zeros((3, 28, 28), np.uint8), np.zeros(4, np.uint8), "3 images but", "images"),
        (np.zeros((2, 28, 28), np.uint8), np.array([0, 10], np.uint8), "outside 0..9", "labels"),
        (np.zeros((2, 28, 28), np.float32), np.zeros(2, np.uint8), "uint8", "images"),
    ],
)
def test_load_validates_contents(tmp_path, no_default, images, labels, needle, bad_file):
    write_split(tmp_path, "t10k", images, labels)
    with pytest.raises(DataError, match=needle) as err:
        load_fashion_mnist("test", root=tmp_path)
    assert f"t10k-{bad_file}" in str(err.value)


def test_cache_notices_replaced_file(tmp_path, no_default):
    write_split(tmp_path, "t10k", np.zeros((2, 28, 28), np.uint8), np.array([1, 2], np.uint8))
    assert load_fashion_mnist("test", root=tmp_path)[1].tolist() == [1, 2]
    write_split(tmp_path, "t10k", np.zeros((3, 28, 28), np.uint8), np.array([4, 5, 6], np.uint8))
    assert load_fashion_mnist("test", root=tmp_path)[1].tolist() == [4, 5, 6]


# --- locating the data --------------------------------------------------------------------


def test_env_var_directory_and_parent_forms(tmp_path, monkeypatch, no_default):
    direct = fake_dataset(tmp_path / "direct")
    monkeypatch.setenv("NETCARVE_DATA", str(direct))
    assert find_fashion_mnist_dir() == direct

    parent = tmp_path / "parent"
    nested = fake_dataset(parent / "fashion-mnist", fill=11)
    monkeypatch.setenv("NETCARVE_DATA", str(parent))
    assert find_fashion_mnist_dir() == nested
    assert int(load_fashion_mnist("train")[0][0, 0, 0, 0]) == 11


def test_env_var_beats_default_and_root_beats_env(tmp_path, monkeypatch):
    default = fake_dataset(tmp_path / "default", fill=1)
    env = fake_dataset(tmp_path / "env", fill=2)
    explicit = fake_dataset(tmp_path / "explicit", fill=3, gz=False)
    monkeypatch.setattr(fm, "DEFAULT_FASHION_MNIST_DIR", str(default))
    monkeypatch.delenv("NETCARVE_DATA", raising=False)
    assert find_fashion_mnist_dir() == default
    monkeypatch.setenv("NETCARVE_DATA", str(env))
    assert find_fashion_mnist_dir() == env
    assert int(load_fashion_mnist("test")[0][0, 0, 0, 0]) == 2
    assert find_fashion_mnist_dir(explicit) == explicit
    assert int(load_fashion_mnist("test", root=explicit)[0][0, 0, 0, 0]) == 3


def test_env_var_without_data_falls_back_to_default(tmp_path, monkeypatch):
    default = fake_dataset(tmp_path / "default")
    monkeypatch.setattr(fm, "DEFAULT_FASHION_MNIST_DIR", str(default))
    monkeypatch.setenv("NETCARVE_DATA", str(tmp_path / "empty"))
    assert find_fashion_mnist_dir() == default


def test_missing_everywhere_lists_places_and_fix(tmp_path, monkeypatch, no_default):
    monkeypatch.setenv("NETCARVE_DATA", str(tmp_path / "envdir"))
    with pytest.raises(DataError) as err:
        find_fashion_mnist_dir()
    message = str(err.value)
    assert "sudo apt-get install -y dataset-fashion-mnist" in message
    assert "NETCARVE_DATA=/path/to/dir" in message
    assert str(tmp_path / "envdir") in message
    assert str(tmp_path / "envdir" / "fashion-mnist") in message
    assert str(tmp_path / "nowhere") in message


def test_explicit_root_is_strict(tmp_path, monkeypatch):
    monkeypatch.setattr(fm, "DEFAULT_FASHION_MNIST_DIR", str(fake_dataset(tmp_path / "d")))
    with pytest.raises(DataError, match="apt-get install") as err:
        load_fashion_mnist("test", root=tmp_path / "typo")
    assert str(tmp_path / "typo") in str(err.value)


def test_split_only_needs_its_own_files(tmp_path, no_default):
    write_split(tmp_path, "t10k", np.zeros((2, 28, 28), np.uint8), np.zeros(2, np.uint8))
    assert load_fashion_mnist("test", root=tmp_path)[0].shape == (2, 1, 28, 28)
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        load_fashion_mnist("train", root=tmp_path)
    with pytest.raises(DataError, match="not found"):
        find_fashion_mnist_dir(tmp_path)  # the directory finder wants both splits
