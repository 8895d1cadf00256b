"""The ablation engine: evaluate many filter removals of one layer, exactly and fast.

Removing filters of a layer ``l`` changes nothing that is computed before ``l``. The engine
uses that: for every chunk of images it runs the network once up to ``l`` (the *prefix*),
keeps the raw output of ``l`` and every value from outside ``l``'s descendants that a later
operation reads (for example the shortcut of a residual block), and then, for a batch of ``R``
candidate removals, stacks ``R`` copies of the cached output along the batch dimension, each
with its own channel mask, and runs only the rest of the network (the *suffix*) on the
``R × B`` items.

**Removal semantics** (the project's convention, as :func:`netcarve.hooks.apply_filter_masks`):
a removed filter outputs exactly 0 after its BatchNorm -- its bias and BatchNorm shift are
removed too. Later operations run normally (a ReLU keeps the channel at 0).

**Agreement with the naive loop.** The engine's statistics equal a naive loop's
(:func:`ablate_naive`: one full forward pass per removal and chunk, masks applied with hooks)
in real arithmetic: the prefix is the same computation, the suffix applies the same operations
in the same order, and the statistics are reduced by the same code. In floating point they
agree within :data:`TOLERANCES` (see :func:`compare_stats`), not bit for bit: CPU (oneDNN) and
CUDA (cuDNN) kernels pick algorithms by batch shape, and the engine stacks removals along the
batch dimension, so no backend promises batch-invariant bits. Top-1/top-5 decisions agree
except at *near-ties* (an image whose two deciding logits differ by less than
``NEAR_TIE_RTOL`` of its largest logit), which every evaluation counts. Two optional shortcuts
are exact in real arithmetic:

* *skipping unchanged items*: just before the first layer after ``l``, an item whose every
  live value is bitwise equal to the unablated network's is dropped from the batch -- its
  logits are the unablated logits (a filter that is silent after its ReLU on an image changes
  nothing for that image);
* *caching the prefix* across calls (``cache_mb``) while the masks of the layers in it stay
  the same, so greedy pruning runs the prefix once.

Models whose code mutates, in place, a tensor computed outside ``l``'s descendants that is read
again later, or that read a batch size computed before ``l`` after it, are run in a safe mode
that stacks the input images instead (still one stacked pass per batch of removals).

Every forward pass is counted (:class:`ForwardCounts`), with the number of full passes a naive
loop would have needed.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 9, 3))
    >>> x, y = torch.randn(20, 1, 5, 5), torch.randint(0, 3, (20,))
    >>> engine = AblationEngine(net.eval(), x, y, batch_size=10)
    >>> stats = engine.evaluate("0", single_removals(4))
    >>> stats.accuracy().shape, stats.counts.naive_passes
    (torch.Size([4]), 10)
"""

from __future__ import annotations

import inspect
import operator
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from netcarve.data.stream import require_finite
from netcarve.errors import DataError, NetcarveError
from netcarve.graph import GraphError, ModelGraph
from netcarve.hooks import apply_filter_masks, preserved_state
from netcarve.zoo.preset import Preset

__all__ = [
    "METRICS",
    "NEAR_TIE_RTOL",
    "TOLERANCES",
    "AblationEngine",
    "AblationError",
    "AblationStats",
    "ForwardCounts",
    "Metric",
    "StatsAgreement",
    "ablate",
    "ablate_naive",
    "compare_stats",
    "resolve_metric",
    "single_removals",
]


class AblationError(NetcarveError):
    """A removal cannot be evaluated: bad candidate masks, a model the engine cannot run."""


# --------------------------------------------------------------------------- metrics


@dataclass(frozen=True)
class Metric:
    """How a batch of logits is scored.

    Attributes:
        name: a label for reports (``"top1"``, ``"top5"``, ``"loss"`` or your own).
        fn: ``fn(logits [B, K], labels [B]) -> number``: the *sum* over the batch of a per-image
            score (the metric of a data set is that sum divided by the number of images).
            ``None`` for the built-in metrics, which the engine computes itself.
        higher_is_better: True for accuracy-like metrics, False for losses. CAR is always
            "how much worse the metric gets", so it is positive for an important filter.

    Example:
        >>> margin = Metric("margin", lambda z, y: (z.gather(1, y[:, None]) - z.mean(1,
        ...                 keepdim=True)).sum())
        >>> margin.higher_is_better
        True
    """

    name: str
    fn: Callable[[torch.Tensor, torch.Tensor], Any] | None = None
    higher_is_better: bool = True


METRICS: dict[str, Metric] = {
    "top1": Metric("top1"),
    "top5": Metric("top5"),
    "loss": Metric("loss", higher_is_better=False),
}
"""The built-in metrics: top-1 accuracy, top-5 accuracy, mean cross-entropy."""


def resolve_metric(metric: str | Metric | Callable[..., Any] | None) -> Metric:
    """A :class:`Metric` from a name (``top1``/``top5``/``loss``), a Metric, or a callable.

    A bare callable is taken as a higher-is-better per-batch *sum* (see :class:`Metric`).

    Raises:
        AblationError: unknown metric name.

    Example:
        >>> resolve_metric("loss").higher_is_better
        False
    """
    if metric is None:
        return METRICS["top1"]
    if isinstance(metric, Metric):
        return metric
    if isinstance(metric, str):
        key = metric.lower().replace("-", "").replace("_", "")
        if key in METRICS:
            return METRICS[key]
        raise AblationError(f"unknown metric {metric!r}; use one of top1, top5, loss or a callable")
    if callable(metric):
        return Metric(getattr(metric, "__name__", "custom"), metric, True)
    raise AblationError(f"metric must be a name, a Metric or a callable, got {type(metric)}")


# --------------------------------------------------------------------------- counts and stats


@dataclass
class ForwardCounts:
    """Forward passes run by the engine (or by the naive loop).

    Attributes:
        full_passes: complete forward passes (naive loop), each over ``batch_size`` images.
        prefix_passes: passes of the network up to the ablated layer (one per chunk and
            prefix-cache miss).
        suffix_passes: passes of the rest of the network over stacked removals.
        full_images: images through full passes.
        prefix_images: images through prefix passes.
        suffix_items: items (removal × image) through suffix passes.
        skipped_items: items left out because they were bitwise unchanged before the next layer.
        shortcut_items: items whose next layer's output came from the linear shortcut (the
            unablated output minus the removed channels' contributions) instead of the layer.
        naive_passes: full passes a naive loop would run for the same evaluation (one per
            removal, or the unablated model, and chunk).
        seconds: wall time.
    """

    full_passes: int = 0
    prefix_passes: int = 0
    suffix_passes: int = 0
    full_images: int = 0
    prefix_images: int = 0
    suffix_items: int = 0
    skipped_items: int = 0
    shortcut_items: int = 0
    naive_passes: int = 0
    seconds: float = 0.0

    def add(self, other: ForwardCounts) -> None:
        """Add ``other``'s counts to these (in place)."""
        for key, value in asdict(other).items():
            setattr(self, key, getattr(self, key) + value)

    def to_dict(self) -> dict[str, Any]:
        """The counts as a JSON-friendly dict."""
        return asdict(self)


@dataclass
class AblationStats:
    """What happened to the classifier under each candidate removal, summed over the data.

    Row ``r`` of every tensor belongs to candidate ``r``; ``base_*`` fields describe the network
    with only the fixed masks (no candidate removal). Integer counts are exact; losses are
    float64 sums of the per-image cross-entropies.

    Attributes:
        n: number of images.
        num_classes: number of logits.
        correct: int64 ``[R]`` top-1 hits.
        correct5: int64 ``[R]`` top-5 hits (top-k with k = min(5, classes)).
        loss_sum: float64 ``[R]`` summed cross-entropy.
        class_correct: int64 ``[R, K]`` top-1 hits per true class.
        class_loss: float64 ``[R, K]`` summed cross-entropy per true class.
        class_count: int64 ``[K]`` images per true class.
        custom: float64 ``[R]`` sums of a custom metric, or None.
        near_ties: int64 ``[R]`` images whose top-1 decision is a near-tie (the best two logits
            differ by less than :data:`NEAR_TIE_RTOL` of the largest absolute logit): another
            kernel's rounding may flip them.
        near_ties5: int64 ``[R]`` the same for the top-5 boundary (5th vs 6th logit).
        base_*: the same for the unablated network (``base_correct`` is a 0-d tensor, etc.).
        counts: the :class:`ForwardCounts` of the evaluation.
        image_correct / image_correct5: bool ``[R, n]`` per-image top-1 / top-5 hits, in the
            order the images were evaluated (only with ``evaluate(..., per_image=True)``).
        image_loss: float64 ``[R, n]`` per-image cross-entropy (likewise).
    """

    n: int
    num_classes: int
    correct: torch.Tensor
    correct5: torch.Tensor
    loss_sum: torch.Tensor
    class_correct: torch.Tensor
    class_loss: torch.Tensor
    class_count: torch.Tensor
    custom: torch.Tensor | None
    base_correct: torch.Tensor
    base_correct5: torch.Tensor
    base_loss_sum: torch.Tensor
    base_class_correct: torch.Tensor
    base_class_loss: torch.Tensor
    base_custom: torch.Tensor | None
    near_ties: torch.Tensor | None = None
    near_ties5: torch.Tensor | None = None
    base_near_ties: torch.Tensor | None = None
    base_near_ties5: torch.Tensor | None = None
    counts: ForwardCounts = field(default_factory=ForwardCounts)
    image_correct: torch.Tensor | None = None
    image_correct5: torch.Tensor | None = None
    image_loss: torch.Tensor | None = None

    def accuracy(self) -> torch.Tensor:
        """float64 ``[R]`` top-1 accuracy of each candidate."""
        return self.correct.double() / self.n

    def loss(self) -> torch.Tensor:
        """float64 ``[R]`` mean cross-entropy of each candidate."""
        return self.loss_sum / self.n

    def class_accuracy(self) -> torch.Tensor:
        """float64 ``[R, K]`` top-1 accuracy per true class (0 for a class without images)."""
        return self.class_correct.double() / self.class_count.clamp(min=1).double()

    def base_class_accuracy(self) -> torch.Tensor:
        """float64 ``[K]`` per-class top-1 accuracy of the unablated network."""
        return self.base_class_correct.double() / self.class_count.clamp(min=1).double()

    def metric(self, metric: str | Metric | Callable[..., Any] | None = None) -> torch.Tensor:
        """float64 ``[R]`` value of ``metric`` for each candidate (top-1 by default)."""
        return self._value(resolve_metric(metric), base=False)

    def base_metric(self, metric: str | Metric | Callable[..., Any] | None = None) -> float:
        """The metric of the unablated network."""
        return float(self._value(resolve_metric(metric), base=True))

    def _value(self, m: Metric, base: bool) -> torch.Tensor:
        if m.fn is not None:
            source = self.base_custom if base else self.custom
            if source is None:
                raise AblationError(f"metric {m.name!r} was not computed by this evaluation")
            return source / self.n
        pick = {"top1": ("base_correct", "correct"), "top5": ("base_correct5", "correct5"),
                "loss": ("base_loss_sum", "loss_sum")}[m.name]
        value = getattr(self, pick[0] if base else pick[1])
        return value.double() / self.n

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly: per-candidate accuracy, top-5 accuracy and loss, base values,
        forward passes."""
        return {"n": self.n, "accuracy": self.accuracy().tolist(),
                "top5": (self.correct5.double() / self.n).tolist(), "loss": self.loss().tolist(),
                "base_accuracy": self.base_metric("top1"), "base_top5": self.base_metric("top5"),
                "base_loss": self.base_metric("loss"),
                "near_ties": None if self.near_ties is None else self.near_ties.tolist(),
                "forward_passes": self.counts.to_dict()}

    def drop(self, metric: str | Metric | Callable[..., Any] | None = None) -> torch.Tensor:
        """float64 ``[R]``: how much worse the metric is than unablated (CAR; > 0 = worse)."""
        m = resolve_metric(metric)
        delta = self._value(m, base=True) - self._value(m, base=False)
        return delta if m.higher_is_better else -delta


class _Accumulator:
    """Sums the statistics of each candidate over chunks, identically for engine and naive."""

    def __init__(self, n_candidates: int, num_classes: int, custom: Metric | None,
                 device: torch.device, per_image: int = 0) -> None:
        self.k = num_classes
        self.custom = custom
        r = n_candidates
        self.correct = torch.zeros(r, dtype=torch.int64)
        self.correct5 = torch.zeros(r, dtype=torch.int64)
        self.loss_sum = torch.zeros(r, dtype=torch.float64)
        self.class_correct = torch.zeros(r, num_classes, dtype=torch.int64)
        self.class_loss = torch.zeros(r, num_classes, dtype=torch.float64)
        self.class_count = torch.zeros(num_classes, dtype=torch.int64)
        self.custom_sum = torch.zeros(r, dtype=torch.float64) if custom else None
        self.near = torch.zeros(r, dtype=torch.int64)
        self.near5 = torch.zeros(r, dtype=torch.int64)
        self.n = 0
        self._at = 0  # first image of the current chunk
        # per-image hits and losses [R, images] when asked for (racing greedy pairs them)
        self.image_hit = torch.zeros(r, per_image, dtype=torch.bool) if per_image else None
        self.image_hit5 = torch.zeros(r, per_image, dtype=torch.bool) if per_image else None
        self.image_loss = torch.zeros(r, per_image, dtype=torch.float64) if per_image else None

    def add(self, rows: Sequence[int], logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a chunk: ``logits`` ``[len(rows) * B, K]``, candidate-major; ``labels`` ``[B]``."""
        b = labels.shape[0]
        if logits.dim() != 2 or logits.shape[1] != self.k:
            raise AblationError(
                f"the model must return logits [N, {self.k}], got {tuple(logits.shape)}")
        labels = labels.to(logits.device)
        onehot = F.one_hot(labels, self.k).to(torch.float64)
        k5 = min(5, self.k)
        for j, r in enumerate(rows):
            z = logits[j * b:(j + 1) * b]
            per_image = F.cross_entropy(z, labels, reduction="none").to(torch.float64)
            hit = z.argmax(1) == labels
            hit5 = (z.topk(k5, dim=1).indices == labels[:, None]).any(1)
            self.correct[r] += int(hit.sum())
            self.correct5[r] += int(hit5.sum())
            self.loss_sum[r] += per_image.sum().cpu()
            self.class_correct[r] += torch.bincount(labels[hit], minlength=self.k).cpu()
            self.class_loss[r] += (onehot * per_image[:, None]).sum(0).cpu()
            near, near5 = _near_ties(z, k5)
            self.near[r] += int(near.sum())
            self.near5[r] += int(near5.sum())
            if self.image_hit is not None:
                assert self.image_hit5 is not None and self.image_loss is not None
                self.image_hit[r, self._at:self._at + b] = hit.cpu()
                self.image_hit5[r, self._at:self._at + b] = hit5.cpu()
                self.image_loss[r, self._at:self._at + b] = per_image.cpu()
            if self.custom_sum is not None and self.custom is not None:
                value = self.custom.fn(z, labels)  # type: ignore[misc]
                self.custom_sum[r] += float(value)

    def count_labels(self, labels: torch.Tensor) -> None:
        self.class_count += torch.bincount(labels.cpu(), minlength=self.k)[: self.k]
        self._at = self.n
        self.n += int(labels.shape[0])


def _stats(acc: _Accumulator, base: _Accumulator, counts: ForwardCounts) -> AblationStats:
    return AblationStats(
        n=acc.n, num_classes=acc.k, correct=acc.correct, correct5=acc.correct5,
        loss_sum=acc.loss_sum, class_correct=acc.class_correct, class_loss=acc.class_loss,
        class_count=acc.class_count, custom=acc.custom_sum,
        base_correct=base.correct[0], base_correct5=base.correct5[0],
        base_loss_sum=base.loss_sum[0], base_class_correct=base.class_correct[0],
        base_class_loss=base.class_loss[0],
        base_custom=None if base.custom_sum is None else base.custom_sum[0],
        near_ties=acc.near, near_ties5=acc.near5, base_near_ties=base.near[0],
        base_near_ties5=base.near5[0], counts=counts, image_correct=acc.image_hit,
        image_correct5=acc.image_hit5, image_loss=acc.image_loss,
    )


NEAR_TIE_RTOL = 1e-5
"""A decision is a near-tie when its two deciding logits differ by less than this fraction of
the image's largest absolute logit."""


def _near_ties(z: torch.Tensor, k5: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bool ``[B]`` near-ties of the top-1 and of the top-``k5`` boundary of logits ``z``."""
    k = z.shape[1]
    if k < 2:
        none = torch.zeros(z.shape[0], dtype=torch.bool, device=z.device)
        return none, none
    top = z.detach().topk(min(k5 + 1, k), dim=1).values.double()
    scale = z.detach().abs().amax(1).double().clamp_min(torch.finfo(torch.float64).tiny)
    near = (top[:, 0] - top[:, 1]) < NEAR_TIE_RTOL * scale
    near5 = (top[:, k5 - 1] - top[:, k5]) < NEAR_TIE_RTOL * scale if k5 < k else \
        torch.zeros_like(near)
    return near, near5


TOLERANCES: dict[torch.dtype, float] = {
    torch.float64: 1e-9,
    torch.float32: 1e-5,
    torch.bfloat16: 2e-2,
    torch.float16: 5e-3,
}
"""Relative tolerance on summed losses (and custom metric sums) by the model's dtype."""


@dataclass
class StatsAgreement:
    """How closely two evaluations of the same removals agree (see :func:`compare_stats`).

    Attributes:
        ok: everything within the contract.
        rtol: the relative tolerance applied to float sums.
        max_loss_error: largest ``|a - b| / (|b| + floor)`` over the loss sums (all rows,
            classes and the base), in units of ``rtol`` × reference.
        decision_changes: images counted differently (top-1, top-5 and per class), summed.
        near_ties: near-ties of the reference, which bound the allowed decision changes.
        problems: one line per violation.
    """

    ok: bool
    rtol: float
    max_loss_error: float
    decision_changes: int
    near_ties: int
    problems: list[str]

    def describe(self) -> str:
        """A one-paragraph summary for test messages and reports."""
        head = (f"{'agree' if self.ok else 'DISAGREE'}: max relative loss error "
                f"{self.max_loss_error:.2e} (rtol {self.rtol:.0e}), {self.decision_changes} "
                f"decision changes, {self.near_ties} near-ties")
        return "\n".join([head, *self.problems])


def compare_stats(got: AblationStats, want: AblationStats,
                  dtype: torch.dtype = torch.float32,
                  rtol: float | None = None) -> StatsAgreement:
    """Check two evaluations of the same candidates against the agreement contract.

    The contract: loss sums (per candidate, per class and unablated) agree to relative
    ``rtol`` (default :data:`TOLERANCES` of ``dtype``: 1e-5 for float32, 1e-9 for float64),
    with an absolute floor of ``rtol × 1e-2`` per image so that a sum of near-zero losses is
    not held to a relative bound its rounding cannot meet; integer counts of correct images
    (top-1, top-5, per class) differ by at most the reference's near-ties of the same row.

    Args:
        got: the evaluation under test (e.g. the engine, or CUDA).
        want: the reference (e.g. :func:`ablate_naive`, or CPU).
        dtype: the model's dtype (picks the tolerance).
        rtol: override the tolerance.

    Returns:
        :class:`StatsAgreement`.

    Example:
        >>> agreement = compare_stats(engine_stats, naive_stats)  # doctest: +SKIP
        >>> assert agreement.ok, agreement.describe()  # doctest: +SKIP
    """
    tol = TOLERANCES.get(dtype, 1e-5) if rtol is None else rtol
    problems: list[str] = []
    if got.n != want.n or got.num_classes != want.num_classes:
        problems.append(f"different data: n {got.n} vs {want.n}, classes {got.num_classes} vs "
                        f"{want.num_classes}")
        return StatsAgreement(False, tol, float("inf"), 0, 0, problems)
    if not torch.equal(got.class_count, want.class_count):
        problems.append("different label counts per class")
    floor = tol * 1e-2
    worst = 0.0
    pairs = [("loss_sum", got.loss_sum, want.loss_sum, want.n),
             ("class_loss", got.class_loss, want.class_loss, want.class_count[None].double()),
             ("base_loss_sum", got.base_loss_sum, want.base_loss_sum, want.n),
             ("base_class_loss", got.base_class_loss, want.base_class_loss,
              want.class_count.double())]
    if got.custom is not None and want.custom is not None:
        pairs.append(("custom", got.custom, want.custom, want.n))
    for name, a, b, n in pairs:
        err = (a.double() - b.double()).abs()
        bound = tol * (b.double().abs() + floor * torch.as_tensor(n, dtype=torch.float64))
        ratio = float((err / bound.clamp_min(torch.finfo(torch.float64).tiny)).max()) \
            if err.numel() else 0.0
        worst = max(worst, ratio * tol)
        if ratio > 1.0:
            problems.append(f"{name}: relative error {ratio * tol:.2e} exceeds {tol:.0e}")
    ties = want.near_ties if want.near_ties is not None else torch.zeros_like(want.correct)
    ties5 = want.near_ties5 if want.near_ties5 is not None else torch.zeros_like(want.correct)
    bties = int(want.base_near_ties or 0)
    bties5 = int(want.base_near_ties5 or 0)
    d1 = (got.correct - want.correct).abs()
    d5 = (got.correct5 - want.correct5).abs()
    dc = (got.class_correct - want.class_correct).abs().sum(1)
    b1 = abs(int(got.base_correct) - int(want.base_correct))
    b5 = abs(int(got.base_correct5) - int(want.base_correct5))
    bc = int((got.base_class_correct - want.base_class_correct).abs().sum())
    for name, diff, allowed in [("correct", d1, ties), ("correct5", d5, ties5),
                                ("class_correct", dc, ties)]:
        bad = (diff > allowed).nonzero().reshape(-1)
        if bad.numel():
            r = int(bad[0])
            problems.append(f"{name}: candidate {r} differs by {int(diff[r])} images with only "
                            f"{int(allowed[r])} near-ties ({bad.numel()} candidates)")
    for name, diff, allowed in [("base_correct", b1, bties), ("base_correct5", b5, bties5),
                                ("base_class_correct", bc, bties)]:
        if diff > allowed:
            problems.append(f"{name}: differs by {diff} images with only {allowed} near-ties")
    changes = int(d1.sum() + d5.sum() + dc.sum()) + b1 + b5 + bc
    return StatsAgreement(not problems, tol, worst, changes, int(ties.sum()) + bties, problems)


# --------------------------------------------------------------------------- inputs


def single_removals(n_filters: int, filters: Sequence[int] | None = None,
                    keep: torch.Tensor | None = None) -> torch.Tensor:
    """Candidate keep masks that each remove one filter.

    Args:
        n_filters: filters of the layer.
        filters: which filters to remove, one per candidate (default: all).
        keep: bool ``[n_filters]`` already kept (removed filters stay removed in every row).

    Returns:
        bool ``[len(filters), n_filters]``, row ``r`` = ``keep`` without ``filters[r]``.

    Example:
        >>> single_removals(3)
        tensor([[False,  True,  True],
                [ True, False,  True],
                [ True,  True, False]])
    """
    chosen = list(range(n_filters)) if filters is None else [int(f) for f in filters]
    base = torch.ones(n_filters, dtype=torch.bool) if keep is None else keep.cpu().bool()
    out = base.repeat(len(chosen), 1)
    if chosen:
        out[torch.arange(len(chosen)), torch.tensor(chosen)] = False
    return out


def _prepare(images: torch.Tensor, labels: torch.Tensor,
             preset: Preset | None) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(images, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise DataError("images and labels must be tensors")
    if len(images) == 0:
        raise DataError("the evaluation data set is empty: no images to evaluate removals on")
    if len(images) != len(labels):
        raise DataError(f"{len(images)} images but {len(labels)} labels")
    if images.dtype == torch.uint8 and preset is None:
        raise DataError("uint8 images need a preset to be normalised (pass preset=...)")
    require_finite(images)
    return images, labels.long()


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        return p.device, p.dtype
    for b in model.buffers():
        if b.is_floating_point():
            return b.device, b.dtype
    return torch.device("cpu"), torch.float32


def _chunks(
    images: torch.Tensor, labels: torch.Tensor, batch_size: int, preset: Preset | None,
    device: torch.device, dtype: torch.dtype,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for start in range(0, len(images), batch_size):
        xb = images[start:start + batch_size]
        if xb.dtype == torch.uint8:
            assert preset is not None
            xb = preset.normalize(xb)
        yield xb.to(device=device, dtype=dtype), labels[start:start + batch_size]


def _num_classes(model: nn.Module, example: torch.Tensor, labels: torch.Tensor) -> int:
    """Number of logits the model returns (one probe image), checked against the labels."""
    with preserved_state(model), torch.no_grad():
        model.eval()
        out = model(example)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise AblationError("the model must return logits [N, classes], got "
                            f"{getattr(out, 'shape', type(out).__name__)}")
    k = int(out.shape[1])
    if int(labels.max()) >= k or int(labels.min()) < 0:
        raise DataError(f"labels must lie in 0..{k - 1} for a model with {k} logits, got "
                        f"{int(labels.min())}..{int(labels.max())}")
    return k


def _check_candidates(candidates: torch.Tensor, n_filters: int, layer: str) -> torch.Tensor:
    if not isinstance(candidates, torch.Tensor):
        candidates = torch.as_tensor(candidates)
    if candidates.dim() == 1:
        candidates = candidates[None]
    if candidates.dim() != 2 or candidates.shape[1] != n_filters:
        raise AblationError(
            f"candidate masks for {layer} must be bool [R, {n_filters}] (True = kept), got "
            f"{tuple(candidates.shape)}")
    return candidates.detach().cpu().bool()


def _check_fixed(
    graph: ModelGraph, fixed: dict[str, torch.Tensor] | None
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, keep in (fixed or {}).items():
        info = graph.layer(name)
        keep_t = torch.as_tensor(keep).detach().cpu()
        if tuple(keep_t.shape) != (info.out_channels,):
            raise AblationError(f"fixed mask for {name} has shape {tuple(keep_t.shape)}, "
                                f"expected ({info.out_channels},)")
        keep_t = keep_t.bool()
        if not bool(keep_t.all()):
            out[name] = keep_t
    return out


# --------------------------------------------------------------------------- the naive loop


@torch.no_grad()
def ablate_naive(
    model: nn.Module,
    layer: str,
    candidates: torch.Tensor,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    graph: ModelGraph | None = None,
    fixed: dict[str, torch.Tensor] | None = None,
    batch_size: int = 100,
    preset: Preset | None = None,
    metric: str | Metric | Callable[..., Any] | None = None,
) -> AblationStats:
    """The reference: one full forward pass per candidate and chunk, masks applied by hooks.

    Same arguments and result as :meth:`AblationEngine.evaluate`; slow, simple, and what the
    engine must equal exactly.

    Example:
        >>> stats = ablate_naive(net, "0", single_removals(4), x, y)  # doctest: +SKIP
    """
    images, labels = _prepare(images, labels, preset)
    device, dtype = _model_device_dtype(model)
    if graph is None:
        graph = ModelGraph.build(model, _example(images, preset, device, dtype))
    info = graph.layer(layer)
    cands = _check_candidates(candidates, info.out_channels, layer)
    fixed_masks = _check_fixed(graph, fixed)
    own = fixed_masks.pop(layer, torch.ones(info.out_channels, dtype=torch.bool))
    k = _num_classes(model, _example(images, preset, device, dtype), labels)
    m = resolve_metric(metric)
    custom = m if m.fn is not None else None
    acc = _Accumulator(len(cands), k, custom, device)
    base = _Accumulator(1, k, custom, device)
    counts = ForwardCounts()
    start = time.perf_counter()
    with preserved_state(model):
        model.eval()
        for xb, yb in _chunks(images, labels, batch_size, preset, device, dtype):
            acc.count_labels(yb)
            base.count_labels(yb)
            rows = [(None, own)] + [(r, own & cands[r]) for r in range(len(cands))]
            for r, keep in rows:
                with apply_filter_masks(model, graph, {**fixed_masks, layer: keep}):
                    logits = model(xb)
                counts.full_passes += 1
                counts.full_images += len(xb)
                if r is None:
                    base.add([0], logits, yb)
                else:
                    acc.add([r], logits, yb)
            counts.naive_passes += len(rows)
    counts.seconds = time.perf_counter() - start
    return _stats(acc, base, counts)


def _example(images: torch.Tensor, preset: Preset | None, device: torch.device,
             dtype: torch.dtype) -> torch.Tensor:
    x = images[:1]
    if x.dtype == torch.uint8:
        assert preset is not None
        x = preset.normalize(x)
    return x.to(device=device, dtype=dtype)


# --------------------------------------------------------------------------- the engine

# The linear shortcut is used for a pass only while its items remove at most this many
# channels each on average (measured on fmnist_vgg: single removals 1.4-3x faster with it,
# masks removing 8-32 channels slower than running the layer).
_SHORTCUT_CHANNELS_PER_ITEM = 2

_INPLACE_OPERATORS = {
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
    operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
    operator.ilshift, operator.irshift, operator.imatmul,
}


def _is_inplace(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether an fx node mutates its first argument."""
    if node.op == "call_module":
        return bool(getattr(modules.get(str(node.target)), "inplace", False))
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.endswith("__")
    if node.op == "call_function":
        if node.target in _INPLACE_OPERATORS:
            return True
        name = getattr(node.target, "__name__", "")
        if name.endswith("_") and not name.endswith("__"):
            return True
        if node.kwargs.get("inplace") is True:
            return True
        try:
            bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return False
        return bound.arguments.get("inplace") is True
    return False


def _reachable(start: torch.fx.Node) -> set[torch.fx.Node]:
    found: set[torch.fx.Node] = set()
    todo = [start]
    while todo:
        for user in todo.pop().users:
            if user not in found:
                found.add(user)
                todo.append(user)
    return found


def _arg_nodes(node: torch.fx.Node) -> list[torch.fx.Node]:
    out: list[torch.fx.Node] = []
    torch.fx.node.map_arg((node.args, node.kwargs), lambda n: out.append(n) or n)
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    """A bitwise view of a floating tensor (so -0.0 != 0.0 and NaN == NaN of same bits)."""
    t = t.contiguous()
    size = t.element_size()
    if t.is_floating_point() and size in (2, 4, 8):
        return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[size])
    return t


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _strided_max_pool(module: nn.MaxPool2d, x: Any) -> torch.Tensor | None:
    """Non-overlapping max pooling as elementwise maxima of strided views, or None.

    Bitwise equal to ``module(x)`` (a maximum is exact and both propagate NaN) and, with
    torch 2.13's CPU kernel for NCHW tensors, about 10× faster; the engine runs pooling
    once per stacked item, so this is a large share of its time. Only the plain case is
    taken: kernel = stride, no padding, no dilation, floor mode, no indices.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        return None
    kernel = _pair(module.kernel_size)
    stride = _pair(module.stride if module.stride is not None else module.kernel_size)
    if (kernel != stride or _pair(module.padding) != (0, 0) or _pair(module.dilation) != (1, 1)
            or module.ceil_mode or module.return_indices):
        return None
    kh, kw = kernel
    h, w = x.shape[2] // kh, x.shape[3] // kw
    if h == 0 or w == 0:
        return None
    if (h * kh, w * kw) != tuple(x.shape[2:]):
        # floor mode drops the last rows/columns; a compact copy keeps the maxima fast
        x = x[:, :, :h * kh, :w * kw].contiguous()
    out: torch.Tensor | None = None
    for i in range(kh):
        for j in range(kw):
            view = x[:, :, i::kh, j::kw]
            out = view if out is None else torch.maximum(out, view)
    assert out is not None
    return out.contiguous() if kh * kw > 1 else out.clone()


def _keep_view(keep: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Broadcast bool keep ``[C]`` or ``[N, C]`` over an output ``[N, C, ...]``."""
    if keep.dim() == 1:
        return keep.reshape(1, -1, *([1] * (out.dim() - 2)))
    return keep.reshape(keep.shape[0], keep.shape[1], *([1] * (out.dim() - 2)))


@dataclass
class _Plan:
    """How to split the traced network around one layer."""

    layer: str
    mode: str  # "cut": stack the layer's output; "input": stack the input images
    nodes: list[torch.fx.Node]
    cut: torch.fx.Node
    layer_node: torch.fx.Node
    suffix: list[torch.fx.Node]
    suffix_set: set[torch.fx.Node]
    prefix: list[torch.fx.Node]
    batched: set[torch.fx.Node]
    compact_at: int | None  # index in suffix before which unchanged items are dropped
    last_use: dict[torch.fx.Node, int]
    mask_at: dict[torch.fx.Node, str]  # node -> layer whose filter mask applies to its output
    prefix_layers: set[str]
    substitute: bool | None = None  # channel substitution at the compaction point verified?
    shortcut: bool | None = None  # linear shortcut through the next layer checked and usable?


@dataclass
class _Chunk:
    start: torch.Tensor
    snaps: dict[tuple[torch.fx.Node, torch.fx.Node], Any]
    labels: torch.Tensor
    nbytes: int


class AblationEngine:
    """Evaluates many removals of one layer's filters per forward pass (see module docs).

    Args:
        model: a classifier returning ``[N, classes]`` logits. It is used in eval mode and
            comes back exactly as it was (weights, flags); no hooks are installed on it.
        images: evaluation images: float, already normalised (used as is), or ``uint8``
            (normalised with ``preset``). Kept where they are and streamed in chunks.
        labels: int64 ``[N]`` true classes.
        graph: the model's :class:`~netcarve.graph.ModelGraph` (built from the first image
            when omitted).
        preset: the model's input preset (needed for uint8 images).
        batch_size: images per chunk; every forward pass (prefix or naive) sees this many.
        max_items: items (removal × image) per stacked suffix pass; a block of candidates
            holds ``max(1, max_items // batch_size)`` removals. On CPU, passes of about 100
            items ran fastest per item (64: 14% slower, 256: 11%, 512: 23% on fmnist_vgg
            features.7); the memory of a pass grows with it.
        cache_mb: keep the prefix results of all chunks between calls when they fit in this
            many MiB (0 disables).
        skip_unchanged: drop items that are bitwise unchanged before the next layer.
        linear_shortcut: compute the next layer's output (a ``Conv2d`` with ``groups=1`` or a
            ``Linear`` reading only the ablated layer's values) as the unablated output minus
            the removed channels' contributions, instead of running the layer per item. Exact
            in real arithmetic; in floating point within :data:`TOLERANCES`. Needs
            ``skip_unchanged``.
        metric: extra metric to sum (a custom callable); top-1, top-5 and loss are always
            computed.

    Raises:
        DataError: empty data, mismatched images and labels.
        GraphError: the model cannot be traced.

    Example:
        >>> engine = AblationEngine(model, x, y, batch_size=100)  # doctest: +SKIP
        >>> stats = engine.evaluate("features.7", single_removals(64))  # doctest: +SKIP
        >>> car = stats.drop("top1")  # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        graph: ModelGraph | None = None,
        preset: Preset | None = None,
        batch_size: int = 100,
        max_items: int = 100,
        cache_mb: float = 512.0,
        skip_unchanged: bool = True,
        linear_shortcut: bool = True,
        metric: str | Metric | Callable[..., Any] | None = None,
    ) -> None:
        if batch_size < 1:
            raise AblationError("batch_size must be at least 1")
        self.model = model
        self.images, self.labels = _prepare(images, labels, preset)
        self.preset = preset
        self.device, self.dtype = _model_device_dtype(model)
        self.graph = graph if graph is not None else ModelGraph.build(
            model, _example(self.images, preset, self.device, self.dtype))
        if self.graph.traced is None:
            raise GraphError("the model graph has no traced module")
        self.gm: torch.fx.GraphModule = self.graph.traced
        self.modules = dict(self.gm.named_modules())
        self.batch_size = int(batch_size)
        self.max_items = int(max_items)
        if self.max_items < 1:
            raise AblationError("max_items must be at least 1")
        self.cache_bytes = cache_mb * 2**20
        self.skip_unchanged = skip_unchanged
        self.linear_shortcut = linear_shortcut
        m = resolve_metric(metric)
        self.custom = m if m.fn is not None else None
        self.num_classes = _num_classes(
            model, _example(self.images, preset, self.device, self.dtype), self.labels)
        self.counts = ForwardCounts()
        self._plans: dict[str, _Plan] = {}
        self._cache: dict[str, tuple[Any, dict[int, _Chunk]]] = {}

    # ------------------------------------------------------------------ planning

    def _layer_node(self, layer: str) -> torch.fx.Node:
        for node in self.gm.graph.nodes:
            if node.op == "call_module" and str(node.target) == layer:
                return node
        raise GraphError(f"layer {layer!r} is not called in the traced model")

    def plan(self, layer: str) -> _Plan:
        """The split of the network around ``layer`` (computed once per layer)."""
        if layer not in self._plans:
            self.graph.layer(layer)
            self._plans[layer] = self._make_plan(layer, "cut")
        return self._plans[layer]

    def _make_plan(self, layer: str, mode: str) -> _Plan:
        nodes = list(self.gm.graph.nodes)
        order = {n: i for i, n in enumerate(nodes)}
        placeholders = [n for n in nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise AblationError("the engine supports models with exactly one input tensor")
        layer_node = self._layer_node(layer)
        cut = layer_node if mode == "cut" else placeholders[0]
        suffix_set = _reachable(cut)
        if mode == "cut" and self._has_hazard(suffix_set, order):
            return self._make_plan(layer, "input")
        suffix = [n for n in nodes if n in suffix_set]
        batched = _reachable(placeholders[0]) | {placeholders[0]}
        # prefix: cut plus the non-suffix nodes that suffix nodes (transitively) read
        needed: set[torch.fx.Node] = set()
        todo = [cut, *(a for n in suffix for a in _arg_nodes(n) if a not in suffix_set)]
        while todo:
            while todo:
                cur = todo.pop()
                if cur in needed:
                    continue
                needed.add(cur)
                todo.extend(a for a in _arg_nodes(cur) if a not in needed)
            # in-place ops on needed tensors run too, even when their result is unused
            todo = [n for n in nodes if n not in needed and n not in suffix_set
                    and n.args and isinstance(n.args[0], torch.fx.Node)
                    and n.args[0] in needed and _is_inplace(n, self.modules)]
        prefix = [n for n in nodes if n in needed]
        mask_at: dict[torch.fx.Node, str] = {}
        bn_names = {bn: name for name, bns in self.graph.bn_after.items() for bn in bns}
        for n in nodes:
            if n.op != "call_module":
                continue
            t = str(n.target)
            if t in self.graph.layers:
                mask_at[n] = t
            elif t in bn_names:
                mask_at[n] = bn_names[t]
        last_use: dict[torch.fx.Node, int] = {}
        for i, n in enumerate(suffix):
            for a in _arg_nodes(n):
                last_use[a] = i
        compact_at = None
        below = _reachable(layer_node)
        for i, n in enumerate(suffix):
            if n in below and n.op == "call_module" and str(n.target) in self.graph.layers:
                compact_at = i
                break
        prefix_layers = {mask_at[n] for n in prefix if n in mask_at and n is not layer_node}
        if mode == "input":
            prefix_layers = set()
        return _Plan(layer, mode, nodes, cut, layer_node, suffix, suffix_set, prefix, batched,
                     compact_at, last_use, mask_at, prefix_layers)

    def _has_hazard(self, suffix_set: set[torch.fx.Node], order: dict[torch.fx.Node, int]) -> bool:
        """A suffix op mutates, in place, a prefix tensor that is read again afterwards."""
        for n in suffix_set:
            if not _is_inplace(n, self.modules):
                continue
            args = _arg_nodes(n)
            if not args:
                continue
            target = n.args[0] if n.args and isinstance(n.args[0], torch.fx.Node) else None
            if target is None or target in suffix_set:
                continue
            if any(order[u] > order[n] for u in target.users if u is not n):
                return True
        return False

    # ------------------------------------------------------------------ execution

    def _fetch_attr(self, target: str) -> Any:
        obj: Any = self.gm
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj

    def _run(self, node: torch.fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if node.op == "call_module":
            module = self.modules[str(node.target)]
            if isinstance(module, nn.MaxPool2d) and len(args) == 1 and not kwargs:
                pooled = _strided_max_pool(module, args[0])
                if pooled is not None:
                    return pooled
            return module(*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)  # type: ignore[operator]
        if node.op == "call_method":
            obj, *rest = args
            return getattr(obj, str(node.target))(*rest, **kwargs)
        if node.op == "get_attr":
            return self._fetch_attr(str(node.target))
        if node.op == "output":
            return args[0]
        raise AblationError(f"unexpected fx node {node.op}")  # pragma: no cover

    def _mask(self, node: torch.fx.Node, out: Any, plan: _Plan, fixed: dict[str, torch.Tensor],
              rows_keep: torch.Tensor | None) -> Any:
        name = plan.mask_at.get(node)
        if name is None or not isinstance(out, torch.Tensor):
            return out
        if name == plan.layer and rows_keep is not None:
            return out.masked_fill(~_keep_view(rows_keep, out), 0)
        keep = fixed.get(name)
        if keep is None:
            return out
        return out.masked_fill(~_keep_view(keep.to(out.device), out), 0)

    def _prefix_pass(self, plan: _Plan, x: torch.Tensor, y: torch.Tensor,
                     fixed: dict[str, torch.Tensor]) -> _Chunk:
        """Run the prefix on one chunk; keep the cut value and snapshots for the suffix."""
        env: dict[torch.fx.Node, Any] = {}
        snaps: dict[tuple[torch.fx.Node, torch.fx.Node], Any] = {}
        prefix_set = set(plan.prefix)
        remaining: dict[torch.fx.Node, int] = {}
        for n in plan.nodes:
            if n in plan.suffix_set or n in prefix_set:
                for a in _arg_nodes(n):
                    remaining[a] = remaining.get(a, 0) + 1
        b = x.shape[0]
        nbytes = 0
        version_snap: dict[int, tuple[int, Any]] = {}
        for n in plan.nodes:
            if n in plan.suffix_set:
                for a in _arg_nodes(n):
                    if a in plan.suffix_set or a is plan.cut:
                        continue
                    value = env[a]
                    if a in plan.batched:
                        if not isinstance(value, torch.Tensor) or value.dim() == 0 or \
                                value.shape[0] != b:
                            raise _Unsafe
                        seen = version_snap.get(id(value))
                        if seen is not None and seen[0] == value._version:
                            snaps[(n, a)] = seen[1]
                        else:
                            copy = value.detach().clone()
                            version_snap[id(value)] = (value._version, copy)
                            snaps[(n, a)] = copy
                            nbytes += copy.numel() * copy.element_size()
                    else:
                        snaps[(n, a)] = value
                    remaining[a] -= 1
                    if remaining[a] == 0 and a is not plan.cut:
                        env.pop(a, None)
                continue
            if n not in prefix_set:
                continue
            if n.op == "placeholder":
                env[n] = x
            else:
                args, kwargs = torch.fx.node.map_arg((n.args, n.kwargs), lambda a: env[a])
                out = self._run(n, args, kwargs)
                if n is not plan.layer_node:
                    out = self._mask(n, out, plan, fixed, None)
                env[n] = out
                for a in _arg_nodes(n):
                    remaining[a] -= 1
                    if remaining[a] == 0 and a is not plan.cut:
                        env.pop(a, None)
        start = env[plan.cut]
        if not isinstance(start, torch.Tensor):
            raise AblationError(f"layer {plan.layer} does not output a tensor")
        start = start.detach()
        nbytes += start.numel() * start.element_size()
        return _Chunk(start, snaps, y, nbytes)

    # ------------------------------------------------------------------ public

    def evaluate(
        self,
        layer: str,
        candidates: torch.Tensor,
        fixed: dict[str, torch.Tensor] | None = None,
        *,
        chunks: Sequence[int] | None = None,
        per_image: bool = False,
    ) -> AblationStats:
        """Statistics of the classifier under each candidate keep mask of ``layer``.

        Args:
            layer: the layer whose filters are removed.
            candidates: bool ``[R, out_channels]``, True = kept; row ``r`` is one candidate
                (e.g. :func:`single_removals`). A filter removed in ``fixed[layer]`` stays
                removed in every row.
            fixed: ``{layer: bool [out_channels]}`` removals that hold for every candidate and
                for the unablated ``base_*`` statistics (e.g. filters already pruned).
            chunks: evaluate only these image chunks (numbers in ``range(n_chunks)``, in this
                order; chunk ``i`` is images ``i * batch_size ...``) instead of all images.
            per_image: also return per-image hits and losses (``image_*`` fields).

        Returns:
            :class:`AblationStats` (``counts`` holds this call's forward passes).

        Raises:
            AblationError: malformed candidate or fixed masks.
            GraphError: unknown layer.

        Example:
            >>> stats = engine.evaluate("features.7", single_removals(64))  # doctest: +SKIP
        """
        info = self.graph.layer(layer)
        cands = _check_candidates(candidates, info.out_channels, layer)
        fixed_masks = _check_fixed(self.graph, fixed)
        own = fixed_masks.pop(layer, torch.ones(info.out_channels, dtype=torch.bool))
        select = None if chunks is None else self._check_chunks(chunks)
        n_sel = len(self.labels) if select is None else sum(
            min(self.batch_size, len(self.labels) - i * self.batch_size) for i in select)
        before = ForwardCounts(**self.counts.to_dict())
        start_time = time.perf_counter()

        def accumulators() -> tuple[_Accumulator, _Accumulator]:
            return (_Accumulator(len(cands), self.num_classes, self.custom, self.device,
                                 n_sel if per_image else 0),
                    _Accumulator(1, self.num_classes, self.custom, self.device))

        acc, base_acc = accumulators()
        with preserved_state(self.model), torch.no_grad():
            self.model.eval()
            try:
                self._evaluate(layer, cands, own, fixed_masks, acc, base_acc, select)
            except _Unsafe:
                self._plans[layer] = self._make_plan(layer, "input")
                self._cache.pop(layer, None)
                acc, base_acc = accumulators()
                self._evaluate(layer, cands, own, fixed_masks, acc, base_acc, select)
        counts = ForwardCounts(**self.counts.to_dict())
        for key, value in before.to_dict().items():
            setattr(counts, key, getattr(counts, key) - value)
        counts.seconds = time.perf_counter() - start_time
        self.counts.seconds += counts.seconds
        return _stats(acc, base_acc, counts)

    def _check_chunks(self, chunks: Sequence[int]) -> list[int]:
        out = [int(i) for i in chunks]
        bad = [i for i in out if not 0 <= i < self.n_chunks]
        if bad:
            raise AblationError(f"chunk {bad[0]} does not exist: the engine has "
                                f"{self.n_chunks} chunks of {self.batch_size} images "
                                f"(0..{self.n_chunks - 1})")
        if len(set(out)) != len(out):
            raise AblationError("chunks must not repeat")
        return out

    def _chunk_source(self, plan: _Plan, fixed: dict[str, torch.Tensor],
                      select: Sequence[int] | None = None) -> Iterator[_Chunk]:
        """Prefix results of the image chunks (all, or those numbered in ``select``, in that
        order), from the cache where they are already there."""
        key = tuple(sorted((name, tuple(fixed[name].tolist())) for name in plan.prefix_layers
                           if name in fixed))
        cached = self._cache.get(plan.layer)
        if cached is None or cached[0] != key:
            cached = (key, {})
            self._cache.pop(plan.layer, None)
            if self.cache_bytes > 0:
                self._cache[plan.layer] = cached
        store = cached[1]
        total = sum(c.nbytes for c in store.values())
        n_chunks = self.n_chunks
        for i in (range(n_chunks) if select is None else select):
            chunk = store.get(i)
            if chunk is None:
                lo = i * self.batch_size
                (xb, yb), = _chunks(self.images[lo:lo + self.batch_size],
                                    self.labels[lo:lo + self.batch_size], self.batch_size,
                                    self.preset, self.device, self.dtype)
                chunk = self._prefix_pass(plan, xb, yb, fixed)
                self.counts.prefix_passes += 1
                self.counts.prefix_images += len(xb)
                if self.cache_bytes > 0 and total + chunk.nbytes <= self.cache_bytes:
                    store[i] = chunk
                    total += chunk.nbytes
            yield chunk

    @property
    def n_chunks(self) -> int:
        """Number of image chunks (``ceil(images / batch_size)``); chunk ``i`` holds images
        ``i * batch_size`` up to ``(i + 1) * batch_size``."""
        return -(-len(self.labels) // self.batch_size)

    @staticmethod
    def _suffix_args(plan: _Plan, node: torch.fx.Node, env: dict[torch.fx.Node, Any],
                     chunk: _Chunk, item: torch.Tensor) -> Any:
        """Arguments of a suffix node: suffix values, or prefix snapshots gathered per item."""

        def lookup(a: torch.fx.Node) -> Any:
            if a in env:
                return env[a]
            value = chunk.snaps[(node, a)]
            if a in plan.batched and isinstance(value, torch.Tensor):
                return value.index_select(0, item)
            return value

        return torch.fx.node.map_arg((node.args, node.kwargs), lookup)

    def _walk(self, plan: _Plan, chunk: _Chunk, env: dict[torch.fx.Node, Any],
              item: torch.Tensor, rows_keep: torch.Tensor, fixed: dict[str, torch.Tensor],
              lo: int, hi: int) -> Any:
        """Execute suffix nodes ``lo .. hi-1``; returns the model output once it is reached."""
        for i in range(lo, hi):
            n = plan.suffix[i]
            args, kwargs = self._suffix_args(plan, n, env, chunk, item)
            out = self._run(n, args, kwargs)
            if n.op == "output":
                return out
            env[n] = self._mask(n, out, plan, fixed, rows_keep)
            for a in _arg_nodes(n):
                if plan.last_use.get(a) == i:
                    env.pop(a, None)
        return None

    def _start(self, plan: _Plan, chunk: _Chunk, keeps: torch.Tensor,
               ) -> tuple[dict[torch.fx.Node, Any], torch.Tensor, torch.Tensor]:
        """Stacked start of the suffix for keep masks ``[R, C]``: env, item index, row masks."""
        b, r = chunk.start.shape[0], keeps.shape[0]
        device = chunk.start.device
        item = torch.arange(b, device=device).repeat(r)
        rows_keep = keeps.to(device).repeat_interleave(b, dim=0)
        start = chunk.start.repeat(r, *([1] * (chunk.start.dim() - 1)))
        if plan.mode == "cut":
            start = start.masked_fill(~_keep_view(rows_keep, start), 0)
        return {plan.cut: start}, item, rows_keep

    @staticmethod
    def _live(plan: _Plan, env: dict[torch.fx.Node, Any], n_items: int,
              ) -> dict[torch.fx.Node, torch.Tensor] | None:
        """The values still needed at the compaction point, or None when they cannot be
        compared item by item (a non-tensor, or two views of one storage)."""
        assert plan.compact_at is not None
        live = {a: v for a, v in env.items() if plan.last_use.get(a, -1) >= plan.compact_at}
        if not live or not all(isinstance(v, torch.Tensor) and v.dim() > 1 and
                               v.shape[0] == n_items for v in live.values()):
            return None
        ptrs = {v.untyped_storage().data_ptr() for v in live.values()}
        if len(ptrs) != len({id(v) for v in live.values()}):
            return None
        return live

    @staticmethod
    def _clone_live(live: dict[torch.fx.Node, torch.Tensor]) -> dict[torch.fx.Node, torch.Tensor]:
        copies: dict[int, torch.Tensor] = {}
        out = {}
        for a, v in live.items():
            if id(v) not in copies:
                copies[id(v)] = v.detach().clone()
            out[a] = copies[id(v)]
        return out

    def _count(self, items: int) -> None:
        self.counts.suffix_passes += 1
        self.counts.suffix_items += items

    def _base_run(self, plan: _Plan, chunk: _Chunk, keep: torch.Tensor,
                  fixed: dict[str, torch.Tensor], full: bool = True,
                  ) -> tuple[torch.Tensor | None, dict[torch.fx.Node, torch.Tensor] | None]:
        """One keep mask on the chunk: logits (if ``full``) and the live values at the
        compaction point (cloned)."""
        env, item, rows_keep = self._start(plan, chunk, keep[None])
        b = chunk.start.shape[0]
        self._count(b)
        if plan.compact_at is None:
            return self._walk(plan, chunk, env, item, rows_keep, fixed, 0, len(plan.suffix)), None
        self._walk(plan, chunk, env, item, rows_keep, fixed, 0, plan.compact_at)
        found = self._live(plan, env, b)
        live = None if found is None else self._clone_live(found)
        if not full:
            return None, live
        logits = self._walk(plan, chunk, env, item, rows_keep, fixed, plan.compact_at,
                            len(plan.suffix))
        return logits, live

    def _substituted(self, plan: _Plan, base: dict[torch.fx.Node, torch.Tensor],
                     zero: dict[torch.fx.Node, torch.Tensor], keep_rows: torch.Tensor,
                     item: torch.Tensor) -> dict[torch.fx.Node, torch.Tensor]:
        """Live values for items whose removed channels take their all-removed values."""
        made: dict[int, torch.Tensor] = {}
        env: dict[torch.fx.Node, torch.Tensor] = {}
        c = keep_rows.shape[1]
        for a, bv in base.items():
            if id(bv) not in made:
                s = bv.shape[1] // c
                kv = keep_rows.repeat_interleave(s, dim=1) if s > 1 else keep_rows
                # copy the unablated values, then overwrite only the removed channels (a
                # handful per item) with their all-removed values
                out = bv.index_select(0, item)
                rows, chans = (~kv.to(bv.device)).nonzero(as_tuple=True)
                out[rows, chans] = zero[a][item.index_select(0, rows), chans]
                made[id(bv)] = out
            env[a] = made[id(bv)]
        return env

    def _can_substitute(self, plan: _Plan, base: dict[torch.fx.Node, torch.Tensor] | None,
                        zero: dict[torch.fx.Node, torch.Tensor] | None, c: int) -> bool:
        if plan.substitute is False or base is None or zero is None or set(base) != set(zero):
            return False
        # channel c of the layer must sit at position c of every live value -- or, once
        # flattened to [N, C * s], in the block c * s .. (c + 1) * s - 1; anything else (e.g.
        # a concatenation with another branch) goes the generic way. The substitution is also
        # checked bitwise against the real computation once per layer.
        return all(v.shape == zero[a].shape and (v.shape[1] == c or (
            v.dim() == 2 and v.shape[1] % c == 0)) for a, v in base.items())

    def _verify_substitution(self, plan: _Plan, chunk: _Chunk, keeps: torch.Tensor,
                             fixed: dict[str, torch.Tensor],
                             base: dict[torch.fx.Node, torch.Tensor],
                             zero: dict[torch.fx.Node, torch.Tensor]) -> bool:
        """Compare substituted live values with the real ones for some candidates, bitwise."""
        env, item, rows_keep = self._start(plan, chunk, keeps)
        self._count(len(item))
        assert plan.compact_at is not None
        self._walk(plan, chunk, env, item, rows_keep, fixed, 0, plan.compact_at)
        real = self._live(plan, env, len(item))
        if real is None or set(real) != set(base):
            return False
        made = self._substituted(plan, base, zero, rows_keep, item)
        return all(torch.equal(_bits(real[a]), _bits(made[a])) for a in real)

    def _evaluate(self, layer: str, cands: torch.Tensor, own: torch.Tensor,
                  fixed: dict[str, torch.Tensor], acc: _Accumulator,
                  base_acc: _Accumulator, select: Sequence[int] | None = None) -> None:
        plan = self.plan(layer)
        rows_all = own[None] & cands
        n_c = own.shape[0]
        removed = (own[None] & ~rows_all).float()
        for chunk in self._chunk_source(plan, fixed, select):
            b = chunk.start.shape[0]
            acc.count_labels(chunk.labels)
            base_acc.count_labels(chunk.labels)
            self.counts.naive_passes += len(cands) + 1
            base_logits, base_live = self._base_run(plan, chunk, own, fixed)
            assert isinstance(base_logits, torch.Tensor)
            base_acc.add([0], base_logits, chunk.labels)
            if not len(cands):
                continue
            zero_live = None
            if self.skip_unchanged and plan.mode == "cut" and plan.substitute is not False \
                    and base_live is not None:
                _, zero_live = self._base_run(plan, chunk, torch.zeros_like(own), fixed,
                                              full=False)
            if self.skip_unchanged and self._can_substitute(plan, base_live, zero_live, n_c):
                assert base_live is not None and zero_live is not None
                if plan.substitute is None:
                    probe = rows_all[: max(1, self.max_items // b)]
                    plan.substitute = self._verify_substitution(plan, chunk, probe, fixed,
                                                                base_live, zero_live)
                if plan.substitute:
                    logits = self._run_substituted(plan, chunk, rows_all, removed, fixed,
                                                   base_live, zero_live, base_logits)
                    acc.add(list(range(len(cands))), logits, chunk.labels)
                    continue
            r_max = max(1, self.max_items // b)
            compare = (base_live, base_logits) if self.skip_unchanged and base_live else None
            for lo in range(0, len(cands), r_max):
                block = rows_all[lo:lo + r_max]
                logits = self._run_block(plan, chunk, block, fixed, compare)
                acc.add(list(range(lo, lo + len(block))), logits, chunk.labels)

    def _run_substituted(self, plan: _Plan, chunk: _Chunk, rows_all: torch.Tensor,
                         removed: torch.Tensor, fixed: dict[str, torch.Tensor],
                         base_live: dict[torch.fx.Node, torch.Tensor],
                         zero_live: dict[torch.fx.Node, torch.Tensor],
                         base_logits: torch.Tensor) -> torch.Tensor:
        """All candidates of a chunk: only (candidate, image) pairs whose live values change
        are run, from the compaction point on, in passes of at most ``max_items``."""
        assert plan.compact_at is not None
        b = chunk.start.shape[0]
        c = rows_all.shape[1]
        diff = torch.zeros(b, c, dtype=torch.bool, device=chunk.start.device)
        for a, bv in base_live.items():
            diff |= (_bits(bv).reshape(b, c, -1) != _bits(zero_live[a]).reshape(b, c, -1)).any(-1)
        changed = (removed.to(diff.device) @ diff.T.float()) > 0  # [R, B]
        idx = changed.reshape(-1).nonzero().reshape(-1)
        total = rows_all.shape[0] * b
        self.counts.skipped_items += total - idx.numel()
        logits = base_logits.repeat(rows_all.shape[0], 1)
        rows_dev = rows_all.to(chunk.start.device)
        removed_dev = removed.to(chunk.start.device) > 0
        short = self._shortcut_for(plan, base_live) if self.linear_shortcut else None
        base_raw = None
        if short is not None:
            node, a = short
            base_raw = self._run(node, (base_live[a],), {})
        for lo in range(0, idx.numel(), self.max_items):
            sel = idx[lo:lo + self.max_items]
            item = sel % b
            keep_rows = rows_dev.index_select(0, sel // b)
            start = plan.compact_at
            env: dict[torch.fx.Node, Any]
            if short is not None and base_raw is not None:
                node, a = short
                active = removed_dev.index_select(0, sel // b) & diff.index_select(0, item)
                # one small per-channel product per removed channel: cheaper than the layer
                # itself only while few channels per item are removed (single removals, greedy
                # steps); masks removing many channels at once (curves) run the layer instead
                few = int(active.sum()) <= _SHORTCUT_CHANNELS_PER_ITEM * len(sel)
                fast = self._shortcut_output(node, base_raw, base_live[a], zero_live[a], item,
                                             active) if few else None
                if fast is None:
                    pass
                elif plan.shortcut is None:
                    env = dict(self._substituted(plan, base_live, zero_live, keep_rows, item))
                    real = self._run(node, (env[a],), {})
                    plan.shortcut = _close(fast, real)
                    if not plan.shortcut:
                        short = None
                if fast is not None and plan.shortcut:
                    env = {node: self._mask(node, fast, plan, fixed, keep_rows)}
                    start = plan.compact_at + 1
                    self.counts.shortcut_items += len(sel)
            if start == plan.compact_at:
                env = dict(self._substituted(plan, base_live, zero_live, keep_rows, item))
            self._count(len(sel))
            out = self._walk(plan, chunk, env, item, keep_rows, fixed, start, len(plan.suffix))
            logits[sel] = out.to(logits.dtype)
        return logits

    def _shortcut_for(self, plan: _Plan, base_live: dict[torch.fx.Node, torch.Tensor],
                      ) -> tuple[torch.fx.Node, torch.fx.Node] | None:
        """``(next layer node, its input node)`` when the next layer's output can be computed
        by subtracting contributions: one live value, read only by a plain ``Conv2d``
        (``groups=1``, zero padding) or ``Linear`` at the compaction point."""
        if plan.shortcut is False or plan.compact_at is None or len(base_live) != 1:
            return None
        node = plan.suffix[plan.compact_at]
        (a,) = base_live
        if node.op != "call_module" or node.kwargs or len(node.args) != 1 or node.args[0] is not a:
            return None
        if plan.last_use.get(a) != plan.compact_at:
            return None
        module = self.modules[str(node.target)]
        if isinstance(module, nn.Conv2d):
            ok = module.groups == 1 and module.padding_mode == "zeros" and \
                not isinstance(module.padding, str) and base_live[a].dim() == 4
        else:
            ok = isinstance(module, nn.Linear) and base_live[a].dim() == 2
        if not ok:
            plan.shortcut = False
            return None
        return node, a

    def _shortcut_output(self, node: torch.fx.Node, base_raw: torch.Tensor,
                         base_in: torch.Tensor, zero_in: torch.Tensor, item: torch.Tensor,
                         active: torch.Tensor) -> torch.Tensor:
        """The next layer's raw output for each item: the unablated output of its image plus,
        for every removed channel that changed on it, the layer applied (without bias) to that
        channel's change alone. ``active``: bool ``[items, C]``."""
        module = self.modules[str(node.target)]
        out = base_raw.index_select(0, item)
        pairs, chans = active.nonzero(as_tuple=True)
        if not pairs.numel():
            return out
        c_all = active.shape[1]
        for c in torch.unique(chans).tolist():
            rows = pairs[chans == c]
            img = item.index_select(0, rows)
            if isinstance(module, nn.Conv2d):
                delta = (zero_in[:, c].index_select(0, img) -
                         base_in[:, c].index_select(0, img)).unsqueeze(1)
                contrib = F.conv2d(delta, module.weight[:, c:c + 1], None, module.stride,
                                   module.padding, module.dilation)
            else:
                s = base_in.shape[1] // c_all
                block = slice(c * s, (c + 1) * s)
                delta = zero_in[:, block].index_select(0, img) - \
                    base_in[:, block].index_select(0, img)
                contrib = delta @ module.weight[:, block].T
            out.index_add_(0, rows, contrib.to(out.dtype))
        return out

    def _run_block(self, plan: _Plan, chunk: _Chunk, keeps: torch.Tensor,
                   fixed: dict[str, torch.Tensor],
                   compare: tuple[dict[torch.fx.Node, torch.Tensor], torch.Tensor] | None,
                   ) -> torch.Tensor:
        """A block of candidates through the whole suffix, dropping unchanged items at the
        compaction point when ``compare`` (unablated live values and logits) is given."""
        b, r = chunk.start.shape[0], keeps.shape[0]
        env, item, rows_keep = self._start(plan, chunk, keeps)
        n_items = r * b
        lo = 0
        rows = None
        if compare is not None and plan.compact_at is not None:
            self._walk(plan, chunk, env, item, rows_keep, fixed, 0, plan.compact_at)
            lo = plan.compact_at
            live = self._live(plan, env, n_items)
            if live is not None and set(live) == set(compare[0]):
                changed = torch.zeros(r, b, dtype=torch.bool, device=chunk.start.device)
                for a, v in live.items():
                    cur = _bits(v).reshape(r, b, -1)
                    changed |= (cur != _bits(compare[0][a]).reshape(1, b, -1)).any(-1)
                rows = changed.reshape(-1).nonzero().reshape(-1)
                self.counts.skipped_items += n_items - rows.numel()
                if rows.numel() == 0:
                    self._count(n_items)
                    return compare[1].repeat(r, 1)
                new: dict[int, torch.Tensor] = {}
                for a, v in live.items():
                    if id(v) not in new:
                        new[id(v)] = v.index_select(0, rows)
                    env[a] = new[id(v)]
                item = item.index_select(0, rows)
                rows_keep = rows_keep.index_select(0, rows)
        self._count(len(item))
        out = self._walk(plan, chunk, env, item, rows_keep, fixed, lo, len(plan.suffix))
        if not isinstance(out, torch.Tensor):
            raise AblationError("the model must return a tensor of logits")
        if rows is None or compare is None:
            return out
        full = compare[1].repeat(r, 1)
        full[rows] = out.to(full.dtype)
        return full

    def evaluate_removals(self, layer: str, filters: Sequence[int] | None = None,
                          fixed: dict[str, torch.Tensor] | None = None) -> AblationStats:
        """Shorthand: remove each of ``filters`` (default: every filter still kept) alone.

        Example:
            >>> stats = engine.evaluate_removals("features.7")  # doctest: +SKIP
        """
        info = self.graph.layer(layer)
        own = (fixed or {}).get(layer)
        own_t = torch.ones(info.out_channels, dtype=torch.bool) if own is None else \
            torch.as_tensor(own).cpu().bool()
        chosen = [c for c in range(info.out_channels) if own_t[c]] if filters is None \
            else list(filters)
        return self.evaluate(layer, single_removals(info.out_channels, chosen, own_t), fixed)


def _close(fast: torch.Tensor, real: torch.Tensor) -> bool:
    """The shortcut's output agrees with the layer's own within float rounding (checked once
    per layer; anything else means an op the shortcut misreads, and it is turned off)."""
    if fast.shape != real.shape:
        return False
    rtol = 1e-4 if real.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-10
    scale = float(real.abs().max()) if real.numel() else 0.0
    return bool((fast - real).abs().max() <= rtol * max(scale, 1e-30)) if real.numel() else True


class _Unsafe(Exception):
    """The prefix produced a batch-dependent non-tensor value the suffix reads."""


def ablate(
    model: nn.Module,
    layer: str,
    candidates: torch.Tensor,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    graph: ModelGraph | None = None,
    fixed: dict[str, torch.Tensor] | None = None,
    batch_size: int = 100,
    preset: Preset | None = None,
    metric: str | Metric | Callable[..., Any] | None = None,
    skip_unchanged: bool = True,
) -> AblationStats:
    """One-shot :class:`AblationEngine` evaluation of candidate keep masks of ``layer``.

    Args:
        model: the classifier (comes back unchanged).
        layer: the layer whose filters are removed.
        candidates: bool ``[R, out_channels]`` keep masks (True = kept).
        images: float (normalised) or uint8 images ``[N, C, H, W]``.
        labels: int64 ``[N]``.
        graph: the model's graph (built when omitted).
        fixed: removals that hold for every candidate.
        batch_size: images per chunk.
        preset: needed for uint8 images.
        metric: an extra custom metric to sum.
        skip_unchanged: drop bitwise-unchanged items before the next layer.

    Returns:
        :class:`AblationStats`.

    Raises:
        DataError: empty data. AblationError: bad masks. GraphError: unknown layer.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(27, 2))
        >>> x, y = torch.randn(8, 1, 5, 5), torch.randint(0, 2, (8,))
        >>> ablate(net.eval(), "0", single_removals(3), x, y).correct.shape
        torch.Size([3])
    """
    engine = AblationEngine(model, images, labels, graph=graph, preset=preset,
                            batch_size=batch_size, skip_unchanged=skip_unchanged, metric=metric,
                            cache_mb=0)
    return engine.evaluate(layer, candidates, fixed)

