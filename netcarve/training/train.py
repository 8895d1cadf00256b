"""Training the bundled models with the project's own code (``netcarve train NAME``)."""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from netcarve._version import __version__
from netcarve.core.errors import ModelSpecError
from netcarve.core.weights import save_weights
from netcarve.data import load_fashion_mnist, make_shapes
from netcarve.data.preset import Preset
from netcarve.training.evaluation import SHAPES_DATASETS, evaluate, reference_data
from netcarve.zoo.registry import ZOO


@dataclass(frozen=True)
class Recipe:
    """How a bundled model is trained."""

    epochs: int
    lr: float
    batch_size: int = 128
    weight_decay: float = 5e-4
    flip: bool = True
    shapes_per_epoch: int = 0  # >0: fresh coloured shapes every epoch


RECIPES: dict[str, Recipe] = {
    "fmnist_vgg": Recipe(epochs=6, lr=3e-3),
    "fmnist_resnet": Recipe(epochs=6, lr=3e-3),
    "shapes_cnn": Recipe(epochs=15, lr=3e-3, shapes_per_epoch=24_000),
    "shapes_clutter_cnn": Recipe(epochs=16, lr=3e-3, shapes_per_epoch=16_000),
    "shapes_colour_cnn": Recipe(epochs=4, lr=3e-3, shapes_per_epoch=16_000),
}


def _augment(x: torch.Tensor, gen: torch.Generator, flip: bool) -> torch.Tensor:
    """Random horizontal flip and a random shift of up to 2 pixels (zero padded)."""
    n = x.shape[0]
    if flip:
        mask = torch.rand(n, generator=gen) < 0.5
        x = torch.where(mask.view(-1, 1, 1, 1), x.flip(-1), x)
    pad = 2
    padded = F.pad(x, (pad, pad, pad, pad))
    dy, dx = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,), generator=gen))
    return padded[..., dy : dy + x.shape[-2], dx : dx + x.shape[-1]]


def _epoch_data(name: str, recipe: Recipe, epoch: int, seed: int) -> tuple[torch.Tensor, ...]:
    if recipe.shapes_per_epoch:
        # A fresh draw every epoch; seeds stay far below the held-out test seed.
        task = SHAPES_DATASETS[ZOO[name].preset.dataset]
        return make_shapes(recipe.shapes_per_epoch, seed=seed * 1000 + epoch, task=task)
    return load_fashion_mnist("train")


@dataclass
class TrainResult:
    """What ``train_model`` produced."""

    name: str
    path: Path
    test_accuracy: float
    seconds: float
    metadata: dict[str, str]


def train_model(
    name: str,
    out: str | Path | None = None,
    *,
    epochs: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> TrainResult:
    """Train a bundled zoo model from scratch and save it as safetensors with metadata.

    Args:
        name: a zoo model with a recipe (``fmnist_vgg``, ``fmnist_resnet``, ``shapes_cnn``).
        out: where to write the weights (default: the zoo's bundled weights file).
        epochs: override the recipe's epoch count.
        seed: seeds initialisation, shuffling and augmentation.
        progress: show progress bars.

    Returns:
        A :class:`TrainResult` with the measured test accuracy.

    Raises:
        ModelSpecError: ``name`` has no training recipe.

    Example:
        >>> train_model("fmnist_vgg", "/tmp/w.safetensors", epochs=1)  # doctest: +SKIP
    """
    if name not in RECIPES:
        raise ModelSpecError(
            f"no training recipe for {name!r}; trainable models: {', '.join(sorted(RECIPES))}"
        )
    recipe = RECIPES[name]
    epochs = recipe.epochs if epochs is None else epochs
    entry = ZOO[name]
    preset: Preset = entry.preset
    out_path = Path(out) if out is not None else entry.weights_path
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model: nn.Module = entry.factory()
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    first_images, _ = _epoch_data(name, recipe, 0, seed)
    steps_per_epoch = (len(first_images) + recipe.batch_size - 1) // recipe.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=recipe.lr, total_steps=epochs * steps_per_epoch
    )
    start = time.perf_counter()
    for epoch in range(epochs):
        images, labels = _epoch_data(name, recipe, epoch, seed)
        order = torch.randperm(len(images), generator=gen)
        model.train()
        bar = tqdm(
            range(steps_per_epoch), desc=f"{name} epoch {epoch + 1}/{epochs}", disable=not progress
        )
        for step in bar:
            idx = order[step * recipe.batch_size : (step + 1) * recipe.batch_size]
            x = _augment(preset.normalize(images[idx]), gen, recipe.flip)
            loss = F.cross_entropy(model(x), labels[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
    seconds = time.perf_counter() - start
    model.eval()
    test_x, test_y = reference_data(preset, "test")
    result = evaluate(model, test_x, test_y, preset, progress=progress)
    metadata = {
        "model": name,
        "dataset": preset.dataset,
        "test_accuracy": f"{result.accuracy:.4f}",
        "test_images": str(result.n),
        "seed": str(seed),
        "epochs": str(epochs),
        "date": datetime.date.today().isoformat(),
        "train_seconds": f"{seconds:.0f}",
        "netcarve_version": __version__,
        "torch_version": torch.__version__,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_weights(model, out_path, metadata)
    return TrainResult(name, out_path, result.accuracy, seconds, metadata)
