"""What an ablation pass measures, and when two measurements agree.

:class:`AblationStats` holds, per candidate removal, top-1/top-5 hits, loss sums, per-class
counts and near-ties (images whose two deciding logits differ by less than
:data:`NEAR_TIE_RTOL` of the largest); :class:`ForwardCounts` counts the forward passes.
:func:`compare_stats` is the engine's contract with the naive loop: loss sums within
:data:`TOLERANCES` (relative, by dtype), decisions equal except at the naive loop's near-ties."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F

from netcarve.core.errors import NetcarveError

__all__ = [
    "METRICS",
    "NEAR_TIE_RTOL",
    "TOLERANCES",
    "AblationError",
    "AblationStats",
    "ForwardCounts",
    "Metric",
    "StatsAgreement",
    "compare_stats",
    "resolve_metric",
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
        reused_items: items (removal × image, or the unablated network × image) not run
            because the same masks on the same chunk were already computed: by an earlier
            call, by this call's unablated run, or as an equal row of this call.
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
    reused_items: int = 0
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

    @classmethod
    def merged(cls, parts: Sequence[AblationStats]) -> AblationStats:
        """The statistics of the same candidates over the union of disjoint image sets.

        Counts, loss sums and near-ties add up; per-image rows are concatenated in order.
        Used to evaluate removals over a stream one bounded chunk of images at a time.

        Raises:
            AblationError: no parts, or parts with different candidates or classes.

        Example:
            >>> whole = AblationStats.merged([first_half, second_half])  # doctest: +SKIP
        """
        if not parts:
            raise AblationError("nothing to merge")
        first = parts[0]
        for p in parts[1:]:
            if p.num_classes != first.num_classes or p.correct.shape != first.correct.shape:
                raise AblationError("cannot merge statistics of different candidates or "
                                    "classes")
        values: dict[str, Any] = {"n": sum(p.n for p in parts),
                                  "num_classes": first.num_classes}
        counts = ForwardCounts()
        for p in parts:
            counts.add(p.counts)
        values["counts"] = counts
        for f in fields(cls):
            if f.name in values:
                continue
            items = [getattr(p, f.name) for p in parts]
            if any(item is None for item in items):
                values[f.name] = None
            elif f.name.startswith("image_"):
                values[f.name] = torch.cat(items, dim=1)
            else:
                total = items[0].clone()
                for item in items[1:]:
                    total += item
                values[f.name] = total
        return cls(**values)

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
