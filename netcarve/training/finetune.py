"""A small, seeded fine-tuning loop for pruned (or otherwise edited) classifiers.

SGD with Nesterov momentum and a cosine learning-rate schedule over all steps, cross-entropy,
light augmentation (random horizontal flip and a shift of up to 2 pixels, as in training).
Everything random -- shuffling, augmentation, dropout -- is drawn from generators seeded with
``seed``; the global torch RNG is restored afterwards, so a call changes nothing outside the
model it trains. By default the model is copied first and the copy is trained, so the caller's
module comes back exactly as it was.

Example:
    >>> from netcarve.zoo import load_model
    >>> lm = load_model("fmnist_vgg")
    >>> res = finetune(lm.model, preset=lm.preset, epochs=1, max_images=256, lr=0.001)
    >>> res.steps
    2
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from netcarve.core.errors import DataError, NetcarveError
from netcarve.data.preset import Preset

__all__ = ["FinetuneError", "FinetuneResult", "finetune"]


class FinetuneError(NetcarveError):
    """Bad fine-tuning settings (epochs, learning rate, data)."""


@dataclass
class FinetuneResult:
    """What :func:`finetune` did.

    Attributes:
        model: the trained module (a copy unless ``inplace=True``), in eval mode.
        epochs / lr / seed / batch_size: the settings.
        n_images: training images per epoch.
        steps: optimiser steps.
        epoch_losses: mean training loss of every epoch.
        accuracy_before / accuracy_after: top-1 on the evaluation images (None without them).
        seconds: wall time of the training.
    """

    model: nn.Module
    epochs: int
    lr: float
    seed: int
    batch_size: int
    n_images: int
    steps: int
    epoch_losses: list[float] = field(default_factory=list)
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly record (without the module)."""
        return {"epochs": self.epochs, "lr": self.lr, "seed": self.seed,
                "batch_size": self.batch_size, "n_images": self.n_images, "steps": self.steps,
                "epoch_losses": self.epoch_losses, "accuracy_before": self.accuracy_before,
                "accuracy_after": self.accuracy_after, "seconds": self.seconds}


def _augment(x: torch.Tensor, gen: torch.Generator, flip: bool) -> torch.Tensor:
    """Random horizontal flips (per image) and one random shift of up to 2 pixels."""
    if flip:
        which = torch.rand(x.shape[0], generator=gen) < 0.5
        x = torch.where(which.to(x.device).view(-1, *([1] * (x.dim() - 1))), x.flip(-1), x)
    pad = 2
    shifted = F.pad(x, (pad, pad, pad, pad))
    dy, dx = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,), generator=gen))
    return shifted[..., dy:dy + x.shape[-2], dx:dx + x.shape[-1]]


def _accuracy(model: nn.Module, images: Any, labels: torch.Tensor | None,
              preset: Preset | None, batch_size: int, device: torch.device) -> float:
    from netcarve.training.evaluation import evaluate

    return evaluate(model, images, labels, preset or Preset(1, 1, (0.0,), (1.0,)),
                    batch_size=max(batch_size, 256), device=device).accuracy


def finetune(
    model: nn.Module,
    *,
    preset: Preset | None = None,
    epochs: int = 1,
    lr: float = 0.01,
    seed: int = 0,
    images: torch.Tensor | Any = None,
    labels: torch.Tensor | None = None,
    max_images: int | None = None,
    batch_size: int = 128,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    augment: bool = True,
    eval_images: torch.Tensor | Any = None,
    eval_labels: torch.Tensor | None = None,
    inplace: bool = False,
) -> FinetuneResult:
    """Fine-tune a classifier for a few epochs and report its accuracy before and after.

    Args:
        model: the classifier. Trained in place only with ``inplace=True``; otherwise a deep
            copy is trained and returned in the result.
        preset: its input preset (normalises uint8 images; gives the default data).
        epochs: passes over the training images (>= 1).
        lr: peak learning rate (> 0); cosine-annealed to 0 over all steps.
        seed: seeds shuffling, augmentation and dropout.
        images / labels: training data (uint8 with ``preset``, or normalised floats; or a
            DataLoader of ``(images, labels)``, read once into memory). Default:
            the preset's train split (:func:`netcarve.training.evaluation.reference_data`).
        max_images: use only the first N training images per epoch.
        batch_size: images per step.
        momentum / weight_decay: SGD settings.
        augment: random flips and shifts.
        eval_images / eval_labels: measure top-1 accuracy before and after on these (or
            on a stream of ``(images, labels)`` batches given as ``eval_images``).
        inplace: train ``model`` itself.

    Returns:
        a :class:`FinetuneResult` (``.model`` is the trained module, in eval mode).

    Raises:
        FinetuneError: epochs < 1, lr <= 0, no data source.
        DataError: empty data or mismatched images and labels.

    Example:
        >>> res = finetune(pruned, preset=preset, epochs=1, eval_images=xt,
        ...                eval_labels=yt)  # doctest: +SKIP
        >>> res.accuracy_after > res.accuracy_before  # doctest: +SKIP
        True
    """
    if epochs < 1:
        raise FinetuneError(f"epochs must be at least 1, got {epochs}")
    if not lr > 0:
        raise FinetuneError(f"the learning rate must be positive, got {lr}")
    if images is None:
        if preset is None:
            raise FinetuneError("pass training images or a preset with built-in data")
        from netcarve.training.evaluation import reference_data

        images, labels = reference_data(preset, "train", max_images)
    elif not isinstance(images, torch.Tensor):  # a DataLoader: epochs re-read it, so hold it
        from netcarve.data.stream import in_memory

        images, labels = in_memory(images)
    if labels is None or len(images) != len(labels):
        raise DataError("fine-tuning needs as many labels as images")
    if max_images is not None:
        images, labels = images[:max_images], labels[:max_images]
    if len(images) == 0:
        raise DataError("the fine-tuning data set is empty")
    if images.dtype == torch.uint8 and preset is None:
        raise DataError("uint8 images need a preset to be normalised")
    net = model if inplace else copy.deepcopy(model)
    device = next((p.device for p in net.parameters()), torch.device("cpu"))
    dtype = next((p.dtype for p in net.parameters()), torch.float32)
    # a stream's batches carry their labels; a tensor needs eval_labels
    has_eval = eval_images is not None and (
        eval_labels is not None or not isinstance(eval_images, torch.Tensor))
    before = None
    if has_eval:
        assert eval_images is not None
        before = _accuracy(net, eval_images, eval_labels, preset, batch_size, device)
    params = [p for p in net.parameters() if p.requires_grad]
    if not params:
        raise FinetuneError("the model has no trainable parameters")
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=momentum > 0,
                          weight_decay=weight_decay)
    steps_per_epoch = (len(images) + batch_size - 1) // batch_size
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total)))
    gen = torch.Generator().manual_seed(seed)
    labels = labels.long()
    losses: list[float] = []
    start = time.perf_counter()
    fork_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        net.train()
        for _ in range(epochs):
            order = torch.randperm(len(images), generator=gen)
            running, seen = 0.0, 0
            for step in range(steps_per_epoch):
                idx = order[step * batch_size:(step + 1) * batch_size]
                xb = images[idx]
                xb = preset.normalize(xb) if xb.dtype == torch.uint8 and preset else xb
                xb = xb.to(device=device, dtype=dtype)
                if augment:
                    xb = _augment(xb, gen, flip=True)
                yb = labels[idx].to(device)
                loss = F.cross_entropy(net(xb), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                running += float(loss.detach()) * len(idx)
                seen += len(idx)
            losses.append(running / max(1, seen))
    net.eval()
    seconds = time.perf_counter() - start
    after = None
    if has_eval:
        assert eval_images is not None
        after = _accuracy(net, eval_images, eval_labels, preset, batch_size, device)
    return FinetuneResult(net, epochs, lr, seed, batch_size, len(images), total, losses,
                          before, after, seconds)
