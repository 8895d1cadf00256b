"""Data sources for netcarve.

- Fashion-MNIST from its IDX files (:func:`load_fashion_mnist`, :func:`read_idx`).
- A user's image folder with one sub-folder per class (:func:`load_image_folder`).
- Procedural coloured shapes, generated on the fly from a seed (:func:`make_shapes`).

Every problem with files or folders is raised as :class:`netcarve.errors.DataError`.
"""

from netcarve.data.fashion_mnist import (
    DEFAULT_FASHION_MNIST_DIR,
    FASHION_MNIST_CLASSES,
    find_fashion_mnist_dir,
    load_fashion_mnist,
    read_idx,
)
from netcarve.data.image_folder import ImageFolderData, load_image_folder
from netcarve.data.shapes import SHAPE_CLASSES, SHAPES_MEAN, SHAPES_STD, make_shapes

__all__ = [
    "DEFAULT_FASHION_MNIST_DIR",
    "FASHION_MNIST_CLASSES",
    "SHAPES_MEAN",
    "SHAPES_STD",
    "SHAPE_CLASSES",
    "ImageFolderData",
    "find_fashion_mnist_dir",
    "load_fashion_mnist",
    "load_image_folder",
    "make_shapes",
    "read_idx",
]
