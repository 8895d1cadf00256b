"""Reference data for a preset, and classification accuracy of a model on it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from netcarve.core.errors import DataError
from netcarve.data import load_fashion_mnist, make_shapes
from netcarve.data.preset import Preset
from netcarve.data.stream import Images, as_stream, image_folder_loader

# Fixed seeds for the generated shapes data set: the test seed never appears in training.
SHAPES_TEST_SEED = 20_000
SHAPES_TEST_SIZE = 10_000
# "train" split for analysis (scoring images); training itself draws seed*1000+epoch.
SHAPES_SAMPLE_SEED = 10_000
# Preset dataset names of the generated shapes and their make_shapes task.
SHAPES_DATASETS = {"shapes": "shape", "shapes-clutter": "clutter", "shapes-colour": "colour"}


def reference_data(
    preset: Preset, split: str = "test", limit: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The real data set a zoo preset was trained for, as raw ``uint8`` images and labels.

    Args:
        preset: a zoo preset (``dataset`` is ``"fashion-mnist"``, ``"shapes"``,
            ``"shapes-clutter"`` or ``"shapes-colour"``).
        split: ``"test"`` or ``"train"`` (shapes: ``"test"`` is the held-out seed, ``"train"``
            another fixed seed that training never draws).
        limit: keep only the first ``limit`` images.

    Returns:
        ``(images uint8 [N, C, H, W], labels int64 [N])``.

    Raises:
        DataError: the preset has no built-in data (e.g. ImageNet): use ``--images-dir``.

    Example:
        >>> from netcarve.zoo import FASHION_MNIST_PRESET
        >>> x, y = reference_data(FASHION_MNIST_PRESET, "test", limit=8)
        >>> tuple(x.shape)
        (8, 1, 28, 28)
    """
    if preset.dataset == "fashion-mnist":
        images, labels = load_fashion_mnist(split)
    elif preset.dataset in SHAPES_DATASETS:
        if split not in ("train", "test"):
            raise DataError(f"unknown split {split!r}; use 'train' or 'test'")
        n = SHAPES_TEST_SIZE if limit is None else min(limit, SHAPES_TEST_SIZE)
        seed = SHAPES_TEST_SEED if split == "test" else SHAPES_SAMPLE_SEED
        images, labels = make_shapes(n, seed=seed, size=preset.size,
                                     task=SHAPES_DATASETS[preset.dataset])
    else:
        raise DataError(
            f"no built-in data for the {preset.dataset!r} preset: pass a folder of your own "
            "images with --images-dir (one sub-folder per class)"
        )
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return images, labels


def batches(
    images: torch.Tensor, labels: torch.Tensor, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield consecutive ``(images, labels)`` slices of at most ``batch_size``."""
    for start in range(0, len(images), batch_size):
        yield images[start : start + batch_size], labels[start : start + batch_size]


@dataclass
class EvalResult:
    """Accuracy report: top-1 accuracy, mean cross-entropy, per-class accuracy."""

    accuracy: float
    loss: float
    n: int
    per_class_accuracy: list[float]
    predictions: torch.Tensor

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("predictions")
        return d


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images: Images,
    labels: torch.Tensor | None = None,
    preset: Preset | None = None,
    *,
    batch_size: int = 500,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> EvalResult:
    """Top-1 accuracy and loss of ``model`` on images (raw uint8, or already normalised floats).

    The model's training mode is restored afterwards. One pass over the images, so a
    DataLoader over a folder of any size is evaluated in bounded memory.

    Args:
        model: a classifier producing ``[N, classes]`` logits.
        images: ``uint8 [N, C, H, W]`` (normalised with ``preset``) or float (used as is),
            or a stream of ``(images, labels)`` batches (DataLoader, iterable).
        labels: ``int64 [N]`` for a tensor (a stream's batches carry their labels).
        preset: input preset (normalisation of uint8 images, number of classes).
        batch_size: images per forward pass.
        device: device to run on.
        progress: show a progress bar.

    Returns:
        An :class:`EvalResult`.

    Raises:
        DataError: no images, or no labels.

    Example:
        >>> from netcarve.zoo import load_model
        >>> lm = load_model("fmnist_vgg")
        >>> x, y = reference_data(lm.preset, limit=100)
        >>> evaluate(lm.model, x, y, lm.preset).accuracy > 0.8
        True
    """
    stream = as_stream(images, labels, preset=preset)
    if stream.count() == 0:
        raise DataError("cannot evaluate on an empty data set")
    was_training = model.training
    model.eval()
    # Grown on the fly: a stream's largest label is known only at the end.
    num_classes = preset.num_classes if preset is not None else 0
    correct_per_class = torch.zeros(num_classes)
    count_per_class = torch.zeros(num_classes)
    total_loss = 0.0
    preds = []
    from tqdm import tqdm

    it = stream.batches(batch_size, device=device, labels=True)
    if progress:
        known = stream.count()
        total = None if known is None or not stream.is_tensor else -(-known // batch_size)
        it = tqdm(it, total=total, desc="evaluate")
    try:
        for x, yb in it:
            assert yb is not None
            logits = model(x).float().cpu()
            total_loss += F.cross_entropy(logits, yb, reduction="sum").item()
            pred = logits.argmax(1)
            preds.append(pred)
            grow = int(yb.max()) + 1 - len(count_per_class)
            if grow > 0:
                count_per_class = F.pad(count_per_class, (0, grow))
                correct_per_class = F.pad(correct_per_class, (0, grow))
            count_per_class += torch.bincount(yb, minlength=len(count_per_class)).float()
            correct_per_class += torch.bincount(
                yb[pred == yb], minlength=len(count_per_class)
            ).float()
    finally:
        model.train(was_training)
    n = int(count_per_class.sum())
    if n == 0:
        raise DataError("cannot evaluate on an empty data set")
    per_class = (correct_per_class / count_per_class.clamp(min=1)).tolist()
    return EvalResult(
        accuracy=float(correct_per_class.sum() / n),
        loss=total_loss / n,
        n=n,
        per_class_accuracy=per_class,
        predictions=torch.cat(preds),
    )


def analysis_data(
    preset: Preset,
    n_scoring: int,
    n_heldout: int,
    *,
    images_dir: str | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised scoring and held-out images for circuit work, disjoint by construction.

    Built-in data: scoring images are drawn (seeded) from the train split, held-out images
    from the test split. A user folder (``images_dir``) is shuffled (seeded) and split.

    Args:
        preset: the model's preset.
        n_scoring: number of scoring images.
        n_heldout: number of held-out images.
        images_dir: a folder with one sub-folder per class, instead of the built-in data.
        seed: seeds the draw.

    Returns:
        ``(scoring, heldout)``: float tensors ``[N, C, H, W]``.

    Raises:
        DataError: not enough images, or no built-in data for the preset.

    Example:
        >>> from netcarve.zoo import FASHION_MNIST_PRESET
        >>> s, h = analysis_data(FASHION_MNIST_PRESET, 10, 5)
        >>> tuple(s.shape), tuple(h.shape)
        ((10, 1, 28, 28), (5, 1, 28, 28))
    """
    if n_scoring < 1 or n_heldout < 1:
        raise DataError("need at least one scoring and one held-out image")
    gen = torch.Generator().manual_seed(seed)
    if images_dir is not None:
        from netcarve.data import ImageFolderDataset

        folder = ImageFolderDataset(images_dir, preset)
        if len(folder) < n_scoring + n_heldout:
            raise DataError(
                f"{images_dir} has {len(folder)} images; {n_scoring} scoring + "
                f"{n_heldout} held-out requested: lower --images/--heldout"
            )
        perm = torch.randperm(len(folder), generator=gen)
        # only the drawn images are decoded: memory does not grow with the folder
        x, _ = folder.load(perm[: n_scoring + n_heldout].tolist())
        return x[:n_scoring], x[n_scoring : n_scoring + n_heldout]
    train_x, _ = reference_data(preset, "train")
    test_x, _ = reference_data(preset, "test")
    if n_scoring > len(train_x) or n_heldout > len(test_x):
        raise DataError(
            f"at most {len(train_x)} scoring and {len(test_x)} held-out images are available"
        )
    pick = torch.randperm(len(train_x), generator=gen)[:n_scoring]
    hold = torch.randperm(len(test_x), generator=gen)[:n_heldout]
    return preset.normalize(train_x[pick]), preset.normalize(test_x[hold])


def analysis_streams(
    preset: Preset,
    n_scoring: int,
    n_heldout: int,
    *,
    images_dir: str | None = None,
    seed: int = 0,
    batch_size: int = 64,
    workers: int = 0,
) -> tuple[Images, Images]:
    """:func:`analysis_data` without holding a folder in memory.

    For ``images_dir`` the same seeded draw picks the same images as :func:`analysis_data`,
    in the same order, but they come as two DataLoaders that decode them in ``workers``
    processes, batch by batch; built-in data comes as tensors (it is generated in memory).

    Args:
        preset: the model's preset.
        n_scoring: number of scoring images.
        n_heldout: number of held-out images.
        images_dir: a folder with one sub-folder per class.
        seed: seeds the draw.
        batch_size: images per batch of the loaders.
        workers: decoding processes (0: in this process).

    Returns:
        ``(scoring, heldout)``: DataLoaders of ``(images, labels)`` for a folder, else
        float tensors ``[N, C, H, W]``.

    Raises:
        DataError: not enough images, or no built-in data for the preset.

    Example:
        >>> s, h = analysis_streams(preset, 1000, 1000, images_dir="photos", workers=2)
        ...     # doctest: +SKIP
    """
    if images_dir is None:
        return analysis_data(preset, n_scoring, n_heldout, seed=seed)
    if n_scoring < 1 or n_heldout < 1:
        raise DataError("need at least one scoring and one held-out image")
    from netcarve.data import ImageFolderDataset

    dataset = ImageFolderDataset(images_dir, preset)
    if len(dataset) < n_scoring + n_heldout:
        raise DataError(
            f"{images_dir} has {len(dataset)} images; {n_scoring} scoring + "
            f"{n_heldout} held-out requested: lower --images/--heldout"
        )
    # The same generator calls as analysis_data, so both pick the same images.
    perm = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    return (
        image_folder_loader(dataset, batch_size=batch_size, workers=workers,
                            indices=perm[:n_scoring]),
        image_folder_loader(dataset, batch_size=batch_size, workers=workers,
                            indices=perm[n_scoring:n_scoring + n_heldout]),
    )
