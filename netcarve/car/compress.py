"""CAR compression: greedy pruning, the physically smaller model and optional fine-tuning."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from netcarve.car.engine import AblationEngine
from netcarve.car.greedy import GreedyResult, greedy_prune
from netcarve.car.scores import MetricLike, resolve_layers
from netcarve.car.stats import AblationError
from netcarve.data.preset import Preset
from netcarve.data.stream import Images, in_memory

__all__ = ["CompressionReport", "car_compress"]


# --------------------------------------------------------------------------- compression


@dataclass
class CompressionReport:
    """Greedy CAR pruning, the physically smaller model and (optionally) fine-tuning.

    Attributes:
        greedy: the :class:`GreedyResult`.
        pruned: the :class:`~netcarve.surgery.pruned.PrunedModel`.
        accuracy_before: top-1 of the original model on the evaluation images.
        accuracy_pruned: of the pruned model before fine-tuning.
        accuracy_finetuned: after fine-tuning (None when not fine-tuned).
        finetune: the fine-tuning record (``FinetuneResult.to_dict()``), or None.
    """

    greedy: GreedyResult
    pruned: Any
    accuracy_before: float
    accuracy_pruned: float
    accuracy_finetuned: float | None = None
    finetune: dict[str, Any] | None = None
    n_eval: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary."""
        return {"greedy": self.greedy.to_dict(), "pruned_model": self.pruned.to_dict(),
                "eval_images": self.n_eval, "accuracy_before": self.accuracy_before,
                "accuracy_pruned": self.accuracy_pruned,
                "accuracy_finetuned": self.accuracy_finetuned, "finetune": self.finetune,
                **self.extra}

    def save(self, directory: str | Path, spec: str | None = None) -> Path:
        """Write ``order.csv``, ``compression.json`` and the model (``pruned/``)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self.greedy.save(out / "order.csv")
        self.pruned.save(out / "pruned", spec=spec)
        (out / "compression.json").write_text(json.dumps(self.to_dict(), indent=2))
        return out


def car_compress(
    model: nn.Module,
    images: Images,
    labels: torch.Tensor | None,
    layers: str | Sequence[str],
    *,
    eval_images: Images,
    eval_labels: torch.Tensor | None,
    amount: int | float | None = None,
    floor: float | None = None,
    mode: str = "exact",
    scope: str = "layer",
    window: int | None = None,
    metric: MetricLike = "top1",
    preset: Preset | None = None,
    batch_size: int = 100,
    finetune_epochs: int = 0,
    lr: float = 0.01,
    finetune_images: torch.Tensor | None = None,
    finetune_labels: torch.Tensor | None = None,
    seed: int = 0,
    spec: str | None = None,
) -> CompressionReport:
    """Greedy CAR pruning → physically smaller model → optional fine-tuning, all measured.

    Args:
        model: the classifier (unchanged).
        images / labels: scoring images for the greedy decisions (tensors, or a stream read
            once into memory with ``labels`` None).
        layers: layers in scope (each must be prunable, see
            :func:`netcarve.surgery.prune.prunable_layers`).
        eval_images / eval_labels: evaluation images for the reported accuracies (likewise).
        amount / floor / mode / scope / window / metric: see :func:`greedy_prune`.
        preset: the model's preset (needed for uint8 images).
        batch_size: images per forward pass.
        finetune_epochs: fine-tune the pruned model this many epochs (0 = no).
        lr: fine-tuning learning rate.
        finetune_images / finetune_labels: fine-tuning data (default: the preset's train
            split).
        seed: seeds fine-tuning.
        spec: how to rebuild the base model when saving.

    Returns:
        a :class:`CompressionReport`.

    Raises:
        CompressError: a layer in scope is not prunable. AblationError: bad amount.

    Example:
        >>> rep = car_compress(model, x, y, "features.0", eval_images=xt, eval_labels=yt,
        ...                    amount=0.5, preset=preset)  # doctest: +SKIP
    """
    images, labels = in_memory(images, labels, preset=preset)
    eval_images, eval_labels = in_memory(eval_images, eval_labels, preset=preset)
    from netcarve.surgery.prune import prunable_layers, prune_filters
    from netcarve.surgery.pruned import CompressError
    from netcarve.training.evaluation import evaluate

    eng = AblationEngine(model, images, labels, preset=preset, batch_size=batch_size)
    names = resolve_layers(eng.graph, layers)
    why = prunable_layers(model, eng.graph)
    bad = {n: why[n] for n in names if why[n] is not None}
    if bad:
        ok = [n for n, w in why.items() if w is None]
        first = next(iter(bad))
        raise CompressError(f"layer {first} has no filters that can be removed physically: "
                            f"{bad[first]}. Prunable layers: {', '.join(ok) or 'none'}")
    greedy = greedy_prune(model, images, labels, names, amount=amount, floor=floor, mode=mode,
                          scope=scope, window=window, metric=metric, preset=preset,
                          engine=eng)
    check = eval_images[:8]
    if check.dtype == torch.uint8 and preset is not None:
        check = preset.normalize(check)
    device, dtype = next(((p.device, p.dtype) for p in model.parameters()),
                         (torch.device("cpu"), torch.float32))
    pruned = prune_filters(model, greedy.masks, graph=eng.graph,
                           check_input=check.to(device=device, dtype=dtype), spec=spec,
                           order=greedy.order)
    eval_preset = preset or Preset(1, 1, (0.0,), (1.0,))
    before = evaluate(model, eval_images, eval_labels, eval_preset, batch_size=batch_size,
                      device=device).accuracy
    after = evaluate(pruned.module, eval_images, eval_labels, eval_preset,
                     batch_size=batch_size, device=device).accuracy
    report = CompressionReport(greedy, pruned, before, after, n_eval=len(eval_labels))
    if finetune_epochs > 0:
        from netcarve.training.finetune import finetune

        if preset is None and finetune_images is None:
            raise AblationError("fine-tuning needs a preset or fine-tuning images")
        result = finetune(pruned.module, preset=preset, epochs=finetune_epochs, lr=lr,
                          seed=seed, images=finetune_images, labels=finetune_labels,
                          eval_images=eval_images, eval_labels=eval_labels, inplace=True,
                          batch_size=128)
        report.accuracy_finetuned = result.accuracy_after
        report.finetune = result.to_dict()
    return report
