"""Fashion-MNIST: locate the IDX files, parse them strictly, and load them as tensors.

The reader is deliberately strict: a truncated download, a file with trailing bytes or a
corrupt gzip stream is reported as a :class:`~netcarve.core.errors.DataError` naming the file,
instead of surfacing later as a confusing shape error or, worse, silently wrong data.
"""

from __future__ import annotations

import functools
import gzip
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from netcarve.core.errors import DataError

__all__ = [
    "DEFAULT_FASHION_MNIST_DIR",
    "FASHION_MNIST_CLASSES",
    "find_fashion_mnist_dir",
    "load_fashion_mnist",
    "read_idx",
]

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

#: Environment variable that points at the data directory (or at a parent of ``fashion-mnist/``).
ENV_VAR = "NETCARVE_DATA"

_INSTALL_HINT = (
    "To fix this, install the data with `sudo apt-get install -y dataset-fashion-mnist`, "
    f"or set {ENV_VAR}=/path/to/dir (the folder holding the files, or a folder containing a "
    "fashion-mnist/ sub-folder)."
)

# IDX type codes -> big-endian numpy dtypes (the format stores everything big-endian).
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_GZIP_MAGIC = b"\x1f\x8b"

# File stems per split; each may exist gzipped or raw, and some mirrors use a dot
# instead of the last dash ("train-images.idx3-ubyte").
_SPLIT_PREFIX = {"train": "train", "test": "t10k"}
_IMAGE_SIDE = 28


def _candidate_names(prefix: str, kind: str) -> list[str]:
    ndim = 3 if kind == "images" else 1
    stems = [f"{prefix}-{kind}-idx{ndim}-ubyte", f"{prefix}-{kind}.idx{ndim}-ubyte"]
    # Raw first: it is faster to read when both are present.
    return [name for stem in stems for name in (stem, stem + ".gz")]


def _find_file(directory: Path, prefix: str, kind: str) -> Path | None:
    for name in _candidate_names(prefix, kind):
        path = directory / name
        if path.is_file():
            return path
    return None


def _has_splits(directory: Path, splits: tuple[str, ...]) -> bool:
    if not directory.is_dir():
        return False
    return all(
        _find_file(directory, _SPLIT_PREFIX[split], kind) is not None
        for split in splits
        for kind in ("images", "labels")
    )


def _locate(root: str | Path | None, splits: tuple[str, ...]) -> Path:
    """Search order shared by :func:`find_fashion_mnist_dir` and :func:`load_fashion_mnist`."""
    places: list[tuple[Path, str]] = []
    if root is not None:
        # An explicit path is honoured strictly: silently falling back to another copy of
        # the data would hide a typo in the path the user asked for.
        base = Path(root).expanduser()
        places += [(base, "root argument"), (base / "fashion-mnist", "root argument")]
    else:
        env = os.environ.get(ENV_VAR, "").strip()
        if env:
            base = Path(env).expanduser()
            places += [(base, f"${ENV_VAR}"), (base / "fashion-mnist", f"${ENV_VAR}")]
        # Looked up at call time so tests (and embedders) can repoint the default.
        places.append((Path(DEFAULT_FASHION_MNIST_DIR), "default"))

    for directory, _source in places:
        if _has_splits(directory, splits):
            return directory

    wanted = ", ".join(
        f"{_candidate_names(_SPLIT_PREFIX[s], kind)[0]}[.gz]"
        for s in splits
        for kind in ("images", "labels")
    )
    looked = "\n".join(
        f"  - {directory} ({source}{'' if directory.is_dir() else ', does not exist'})"
        for directory, source in places
    )
    raise DataError(
        f"Fashion-MNIST files not found. Looked in:\n{looked}\n"
        f"Needed files: {wanted}.\n{_INSTALL_HINT}"
    )


def find_fashion_mnist_dir(root: str | Path | None = None) -> Path:
    """Find the directory holding the Fashion-MNIST IDX files.

    Search order: ``root`` if given (that folder or its ``fashion-mnist/`` sub-folder, and
    nothing else, so a mistyped path is reported rather than papered over); otherwise the
    ``NETCARVE_DATA`` environment variable (the folder itself or its ``fashion-mnist/``
    sub-folder), then :data:`DEFAULT_FASHION_MNIST_DIR`. A folder qualifies when it holds
    the image and label files of both splits, each either gzipped or raw.

    Args:
        root: explicit directory, or ``None`` to use the environment and the default.

    Returns:
        The directory that holds the files.

    Raises:
        DataError: if no place holds the files; the message lists every place looked and
            how to install the data or point ``NETCARVE_DATA`` at it.

    Example:
        >>> find_fashion_mnist_dir()  # doctest: +SKIP
        PosixPath('/usr/share/datasets/fashion-mnist')
    """
    return _locate(root, ("train", "test"))


def _decompress(path: Path, blob: bytes) -> bytes:
    try:
        return gzip.decompress(blob)
    except (OSError, EOFError, zlib.error) as exc:
        # gzip reports a bad CRC / bad header as OSError (BadGzipFile) and a cut-off
        # stream as EOFError; both mean the file on disk is damaged.
        raise DataError(f"{path}: corrupt gzip data ({exc}); re-download the file") from exc


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST container format), gzipped or raw.

    Gzip is detected by its magic bytes (``1f 8b``), not by the file name. The header is
    validated: two zero bytes, a known type code (0x08 uint8, 0x09 int8, 0x0B int16,
    0x0C int32, 0x0D float32, 0x0E float64), at least one dimension, and a payload of
    exactly ``prod(dims) * itemsize`` bytes.

    Args:
        path: the file to read.

    Returns:
        A writable numpy array in native byte order with the shape stored in the header.

    Raises:
        DataError: if the file cannot be read, the gzip stream is corrupt, the header is
            malformed, or the payload is shorter or longer than the header says. The
            message names the file and the problem.

    Example:
        >>> path = "/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz"
        >>> labels = read_idx(path)  # doctest: +SKIP
        >>> labels.shape, labels.dtype  # doctest: +SKIP
        ((10000,), dtype('uint8'))
    """
    path = Path(path)
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read IDX file ({exc.strerror or exc})") from exc
    if blob[:2] == _GZIP_MAGIC:
        blob = _decompress(path, blob)

    if len(blob) < 4:
        raise DataError(f"{path}: not an IDX file (only {len(blob)} bytes, header needs 4)")
    if blob[0] != 0 or blob[1] != 0:
        raise DataError(
            f"{path}: bad IDX magic number {blob[:4].hex(' ')} (the first two bytes must be 00)"
        )
    code, ndim = blob[2], blob[3]
    if code not in _IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
        raise DataError(f"{path}: unknown IDX data type code 0x{code:02X} (known: {known})")
    if ndim == 0:
        raise DataError(f"{path}: IDX header declares 0 dimensions")
    header_len = 4 + 4 * ndim
    if len(blob) < header_len:
        raise DataError(
            f"{path}: IDX header truncated: {ndim} dimensions need {header_len} header bytes, "
            f"file has {len(blob)}"
        )
    dims = tuple(int(d) for d in np.frombuffer(blob, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    # Python ints, so a hostile header cannot overflow the size computation.
    expected = dtype.itemsize * int(np.prod(dims, dtype=object))
    found = len(blob) - header_len
    if found < expected:
        raise DataError(
            f"{path}: IDX data truncated: dimensions {dims} of {dtype.name} "
            f"expected {expected} bytes of data, found {found}"
        )
    if found > expected:
        raise DataError(
            f"{path}: IDX file has {found - expected} trailing bytes after the data: "
            f"dimensions {dims} of {dtype.name} expected {expected} bytes, found {found}"
        )
    array = np.frombuffer(blob, dtype=dtype, count=expected // dtype.itemsize, offset=header_len)
    # astype copies, which also detaches the result from the immutable bytes buffer.
    return array.astype(dtype.newbyteorder("="), copy=True).reshape(dims)


@functools.lru_cache(maxsize=8)
def _read_cached(resolved: str, mtime_ns: int, size: int) -> np.ndarray:
    # mtime and size are part of the key so a replaced file is re-read.
    array = read_idx(resolved)
    array.flags.writeable = False
    return array


def _read_file_cached(path: Path) -> np.ndarray:
    resolved = path.resolve()
    try:
        stat = resolved.stat()
    except OSError as exc:
        raise DataError(f"{path}: cannot read IDX file ({exc.strerror or exc})") from exc
    return _read_cached(str(resolved), stat.st_mtime_ns, stat.st_size)


def load_fashion_mnist(
    split: str = "train", root: str | Path | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one split of Fashion-MNIST.

    Parsed files are cached in-process (keyed on the resolved path, mtime and size), so
    repeated loads cost only a memory copy. The returned tensors are fresh copies: mutating
    them does not affect later loads.

    Args:
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000 images).
        root: data directory; see :func:`find_fashion_mnist_dir` for the search order.

    Returns:
        ``(images, labels)``: ``uint8 [N, 1, 28, 28]`` and ``int64 [N]`` with class
        indices into :data:`FASHION_MNIST_CLASSES`.

    Raises:
        DataError: for an unknown split, missing files, malformed files, images that are
            not 28×28, labels outside 0..9, or image and label counts that disagree.

    Example:
        >>> images, labels = load_fashion_mnist("test")  # doctest: +SKIP
        >>> images.shape, labels.shape  # doctest: +SKIP
        (torch.Size([10000, 1, 28, 28]), torch.Size([10000]))
    """
    if split not in _SPLIT_PREFIX:
        valid = ", ".join(repr(s) for s in _SPLIT_PREFIX)
        raise DataError(f"unknown Fashion-MNIST split {split!r}; valid splits are {valid}")
    directory = _locate(root, (split,))
    prefix = _SPLIT_PREFIX[split]
    image_path = _find_file(directory, prefix, "images")
    label_path = _find_file(directory, prefix, "labels")
    assert image_path is not None and label_path is not None  # guaranteed by _locate

    images = _read_file_cached(image_path)
    labels = _read_file_cached(label_path)

    if (
        images.dtype != np.uint8
        or images.ndim != 3
        or images.shape[1:] != (_IMAGE_SIDE, _IMAGE_SIDE)
    ):
        raise DataError(
            f"{image_path}: expected uint8 images of shape [N, {_IMAGE_SIDE}, {_IMAGE_SIDE}], "
            f"found {images.dtype} {list(images.shape)}"
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DataError(
            f"{label_path}: expected a 1-D uint8 label array, found {labels.dtype} "
            f"{list(labels.shape)}"
        )
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"Fashion-MNIST {split} split: {image_path} has {images.shape[0]} images but "
            f"{label_path} has {labels.shape[0]} labels"
        )
    n_classes = len(FASHION_MNIST_CLASSES)
    if labels.size and int(labels.max()) >= n_classes:
        bad = int(np.count_nonzero(labels >= n_classes))
        raise DataError(
            f"{label_path}: {bad} labels outside 0..{n_classes - 1} "
            f"(largest is {int(labels.max())})"
        )

    image_tensor = torch.from_numpy(images.copy()).unsqueeze(1)
    label_tensor = torch.from_numpy(labels.astype(np.int64))
    return image_tensor, label_tensor
