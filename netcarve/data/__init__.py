"""Data sources for netcarve.

- Fashion-MNIST from its IDX files (:func:`load_fashion_mnist`, :func:`read_idx`).
- A user's image folder with one sub-folder per class (:func:`load_image_folder`).
- Procedural coloured shapes, generated on the fly from a seed (:func:`make_shapes`).
- Streams: a tensor, DataLoader or iterable of batches as one thing (:func:`as_stream`),
  and a deterministic worker-decoded loader over a folder (:func:`image_folder_loader`).

Every problem with files or folders is raised as :class:`netcarve.core.errors.DataError`.
"""

from netcarve.data.fashion_mnist import (
    DEFAULT_FASHION_MNIST_DIR,
    FASHION_MNIST_CLASSES,
    find_fashion_mnist_dir,
    load_fashion_mnist,
    read_idx,
)
from netcarve.data.image_folder import ImageFolderData, ImageFolderDataset, load_image_folder
from netcarve.data.shapes import SHAPE_CLASSES, SHAPES_MEAN, SHAPES_STD, make_shapes
from netcarve.data.stream import ImageStream, as_stream, image_folder_loader

__all__ = [
    "DEFAULT_FASHION_MNIST_DIR",
    "FASHION_MNIST_CLASSES",
    "SHAPES_MEAN",
    "SHAPES_STD",
    "SHAPE_CLASSES",
    "ImageFolderData",
    "ImageFolderDataset",
    "ImageStream",
    "as_stream",
    "find_fashion_mnist_dir",
    "image_folder_loader",
    "load_fashion_mnist",
    "load_image_folder",
    "make_shapes",
    "read_idx",
]
