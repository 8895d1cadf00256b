"""Load a user's image folder (one sub-folder per class) as normalised model input."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from netcarve.core.errors import DataError
from netcarve.data.preset import Preset

__all__ = ["DEFAULT_EXTENSIONS", "ImageFolderData", "ImageFolderDataset", "load_image_folder"]

DEFAULT_EXTENSIONS: tuple[str, ...] = (
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".gif",
    ".webp",
    ".tif",
    ".tiff",
)

_PIL_MODE = {1: "L", 3: "RGB"}

#: Largest image (width × height) decoded; a bigger one is refused before its pixels are read.
#: 64 megapixels is an 8000 × 8000 photo, far above what a CNN input is resized from, and
#: keeps one decoded RGB image under 200 MB (a tiny "decompression bomb" PNG can otherwise
#: claim gigabytes).
MAX_PIXELS = 64_000_000


@dataclass(frozen=True)
class ImageFolderData:
    """Images loaded from a class-per-sub-folder directory.

    Attributes:
        images: float32 ``[N, C, size, size]``, already normalised with the preset.
        labels: int64 ``[N]``, indices into ``class_names``.
        class_names: one name per label index (see :func:`load_image_folder` for the order).
        paths: source file of each image, in the same order as ``images``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    class_names: tuple[str, ...]
    paths: tuple[Path, ...]

    def __len__(self) -> int:
        return len(self.paths)


def _name_key(name: str) -> str:
    # Folder names cannot contain "/" (Fashion-MNIST has "T-shirt/top"), and people write
    # "ankle_boot" or "Ankle Boot"; compare on lower-case letters and digits only.
    return re.sub(r"[^0-9a-z]", "", name.lower())


def _preset_order(folder_classes: list[str], preset_classes: tuple[str, ...]) -> list[int] | None:
    """Label index of each folder class in the preset's order, or None if one does not match.

    The folder may hold a subset of the preset's classes (a folder with only "Bag" and
    "Sneaker" still labels them 8 and 7, as the model's outputs are numbered)."""
    if not preset_classes or len(folder_classes) > len(preset_classes):
        return None
    preset_index = {_name_key(name): i for i, name in enumerate(preset_classes)}
    if len(preset_index) != len(preset_classes):
        return None  # names that collide after normalisation cannot be matched safely
    mapping = [preset_index.get(_name_key(name)) for name in folder_classes]
    if any(i is None for i in mapping) or len(set(mapping)) != len(mapping):
        return None
    return [int(i) for i in mapping if i is not None]


def _is_visible(path: Path) -> bool:
    # Skip .DS_Store, ._foo.png (macOS resource forks), .ipynb_checkpoints and the like.
    return not path.name.startswith(".")


def _list_images(class_dir: Path, extensions: set[str]) -> list[Path]:
    found = [
        p
        for p in class_dir.rglob("*")
        if p.is_file()
        and p.suffix.lower() in extensions
        and all(_is_visible(part) for part in p.relative_to(class_dir).parents if part.name)
        and _is_visible(p)
    ]
    return sorted(found)


def _resize(image: Image.Image, preset: Preset) -> Image.Image:
    """The preset's geometry: a stretch to ``size²``, or resize-shorter-side then centre crop.

    Presets with a ``resize`` attribute (ImageNet-style: 224 crop of a 256 resize) get the
    aspect-preserving path; every other preset keeps the stretch this loader always did."""
    size = preset.size
    resize = getattr(preset, "resize", None)
    if not resize:
        return image.resize((size, size), Image.Resampling.BILINEAR)
    w, h = image.size
    scale = int(resize) / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def _read_image(path: Path, mode: str, preset: Preset) -> np.ndarray:
    with Image.open(path) as im:
        width, height = im.size  # read from the header, before any pixel is decoded
        if width * height > MAX_PIXELS:
            raise DataError(
                f"{width}×{height} pixels is over the limit of {MAX_PIXELS:,} "
                "(netcarve.data.image_folder.MAX_PIXELS); shrink the image or raise the limit"
            )
        im.load()  # decode now so truncated/corrupt files fail here, inside the try
        converted = im.convert(mode)
    array = np.array(_resize(converted, preset), dtype=np.uint8)  # a writable copy
    return array[:, :, None] if array.ndim == 2 else array


def _describe_failure(path: Path, exc: Exception) -> str:
    if isinstance(exc, DataError):
        return f"{path}: {exc}"
    # One line whatever PIL says (some of its messages span lines).
    reason = " ".join(str(exc).split()) or "unreadable"
    return f"{path}: {type(exc).__name__}: {reason}"


#: How many unreadable files an error names before summarising the rest.
_NAMED_FAILURES = 5


class ImageFolderDataset(torch.utils.data.Dataset):
    """A class-per-sub-folder image directory, decoded one image at a time.

    Listing the folder (names, labels) happens here; pixels are decoded only in
    ``__getitem__``, so a :class:`torch.utils.data.DataLoader` over this data set decodes in
    its worker processes and holds only the batches in flight, whatever the folder's size.
    Each item is ``(image float32 [C, size, size] normalised with the preset, label int)``,
    exactly the rows of :func:`load_image_folder`'s tensors.

    Args:
        path: directory with one sub-folder per class.
        preset: the model's input preset (size, channels, normalisation, class names).
        extensions: file suffixes treated as images.

    Attributes:
        paths: source file of each item.
        labels: int64 ``[N]`` label of each item.
        class_names: one name per label index (label order as in :func:`load_image_folder`).
        folder_classes: the class sub-folders found, sorted.
        matches_preset: every folder is named after one of the preset's classes, so labels
            are the model's output indices.

    Raises:
        DataError: missing folder, no class sub-folders or no images (at construction);
            an undecodable file (when that item is read, naming the file).

    Example:
        >>> ds = ImageFolderDataset("my_photos", preset)  # doctest: +SKIP
        >>> loader = torch.utils.data.DataLoader(ds, batch_size=64, num_workers=2)  # doctest: +SKIP
    """

    def __init__(
        self, path: str | Path, preset: Preset, *, extensions: Iterable[str] = DEFAULT_EXTENSIONS
    ) -> None:
        root = Path(path).expanduser()
        if not root.exists():
            raise DataError(f"image folder {root} does not exist")
        if not root.is_dir():
            raise DataError(f"image folder {root} is not a directory")
        if preset.channels not in _PIL_MODE:
            raise DataError(f"preset has {preset.channels} channels; only 1 or 3 are supported")
        suffixes = {e.lower() if e.startswith(".") else "." + e.lower() for e in extensions}
        folder_classes = sorted(p.name for p in root.iterdir() if p.is_dir() and _is_visible(p))
        if not folder_classes:
            raise DataError(
                f"image folder {root} has no class sub-folders; expected "
                f"{root}/<class name>/<image>"
            )
        files: list[tuple[Path, int]] = []
        for folder_index, name in enumerate(folder_classes):
            files += [(p, folder_index) for p in _list_images(root / name, suffixes)]
        if not files:
            raise DataError(
                f"image folder {root} has class sub-folders ({', '.join(folder_classes)}) but "
                f"no images with extensions {', '.join(sorted(suffixes))}"
            )
        mapping = _preset_order(folder_classes, preset.class_names)
        self.folder_classes: tuple[str, ...] = tuple(folder_classes)
        self.matches_preset = mapping is not None
        if mapping is None:
            self.class_names = tuple(folder_classes)
            labels = [folder_index for _, folder_index in files]
        else:
            self.class_names = tuple(preset.class_names)
            labels = [mapping[folder_index] for _, folder_index in files]
        self.root = root
        self.preset = preset
        self.paths: tuple[Path, ...] = tuple(file for file, _ in files)
        self.labels = torch.tensor(labels, dtype=torch.int64)
        self._mode = _PIL_MODE[preset.channels]

    def __len__(self) -> int:
        return len(self.paths)

    def read_pixels(self, index: int) -> np.ndarray:
        """The ``uint8 [size, size, C]`` pixels of item ``index`` (resized, not normalised).

        Raises:
            DataError: the file cannot be decoded (the message names it).
        """
        path = self.paths[index]
        try:
            return _read_image(path, self._mode, self.preset)
        except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError...)
            raise DataError(f"image {_describe_failure(path, exc)}") from exc

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        pixels = torch.from_numpy(self.read_pixels(index)).permute(2, 0, 1)[None]
        return self.preset.normalize(pixels.contiguous())[0], int(self.labels[index])

    def load(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode only these items into memory: ``(images [K, C, H, W], labels [K])``.

        Memory grows with ``len(indices)``, not with the folder (e.g. a seeded sample of a
        folder of any size).

        Raises:
            DataError: an undecodable file (named).

        Example:
            >>> x, y = ImageFolderDataset("photos", preset).load(range(100))  # doctest: +SKIP
        """
        idx = [int(i) for i in indices]
        size = (self.preset.channels, self.preset.size, self.preset.size)
        images = torch.empty(len(idx), *size)
        for row, i in enumerate(idx):
            images[row] = self[i][0]
        labels = self.labels[torch.tensor(idx, dtype=torch.int64)] if idx else \
            torch.zeros(0, dtype=torch.int64)
        return images, labels


def load_image_folder(
    path: str | Path,
    preset: Preset,
    *,
    extensions: Iterable[str] = DEFAULT_EXTENSIONS,
) -> ImageFolderData:
    """Load ``path/<class>/<image>`` files as a normalised batch for a model.

    Every image is converted to the preset's channels (PIL mode ``"L"`` for 1 channel,
    ``"RGB"`` for 3), resized to ``preset.size × preset.size`` with PIL's bilinear filter
    (the aspect ratio is not preserved: images are stretched to the square), then
    normalised with :meth:`Preset.normalize`. Files are found recursively inside each
    class folder and matched by extension (case-insensitive); hidden files and folders
    are ignored. The whole folder is held in memory: for large folders stream it with
    :class:`ImageFolderDataset` / :func:`netcarve.data.stream.image_folder_loader`.

    Label order: if every folder is named after one of ``preset.class_names`` (all of them
    or a subset; compared case-insensitively on letters and digits only, so ``T-shirt_top``
    matches ``T-shirt/top``), labels follow the preset's order and ``class_names`` is the
    preset's, so labels line up with the model's logits. Otherwise labels follow the
    sorted folder names and ``class_names`` is that sorted list.

    Args:
        path: directory with one sub-folder per class.
        preset: the model's input preset (size, channels, normalisation, class names).
        extensions: file suffixes treated as images.

    Returns:
        An :class:`ImageFolderData` with images, labels, class names and source paths.

    Raises:
        DataError: if the folder is missing, has no class sub-folders, holds no images,
            or if any image cannot be decoded (all bad files are listed in one error).

    Example:
        >>> data = load_image_folder("my_photos", preset)  # doctest: +SKIP
        >>> data.images.shape  # doctest: +SKIP
        torch.Size([12, 1, 28, 28])
    """
    dataset = ImageFolderDataset(path, preset, extensions=extensions)
    arrays: list[np.ndarray] = []
    bad: list[str] = []
    for file in dataset.paths:
        try:
            arrays.append(_read_image(file, dataset._mode, preset))
        except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError...)
            bad.append(_describe_failure(file, exc))
    if bad:
        named = "; ".join(bad[:_NAMED_FAILURES])
        more = f"; and {len(bad) - _NAMED_FAILURES} more" if len(bad) > _NAMED_FAILURES else ""
        raise DataError(
            f"{len(bad)} of {len(dataset)} images in {dataset.root} could not be read "
            f"(remove or replace them): {named}{more}"
        )
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return ImageFolderData(
        images=preset.normalize(batch),
        labels=dataset.labels,
        class_names=dataset.class_names,
        paths=dataset.paths,
    )
