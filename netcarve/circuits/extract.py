"""Extracting a circuit: score every kernel for a target, keep the top ones, measure preservation.

:func:`score_kernels` runs a saliency criterion over the scoring images, :func:`extract` turns
the scores into a :class:`~netcarve.circuits.circuit.Circuit` at a keep fraction and measures
its preservation on held-out images; :func:`target_responses` and
:func:`measure_preservation` are the response maps and the streamed Pearson r they use."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from netcarve._version import __version__
from netcarve.circuits.circuit import (
    GRANULARITIES,
    Circuit,
    CircuitError,
    count,
    keep_count,
    model_fingerprint,
    select_top_k,
)
from netcarve.circuits.preservation import Preservation, PreservationMeter
from netcarve.core.graph import ModelGraph
from netcarve.core.hooks import apply_kernel_masks, preserved_state, stop_at
from netcarve.core.targets import Target
from netcarve.criteria import ScoringContext, get_criterion
from netcarve.data.stream import Images, ImageStream, as_stream

__all__ = [
    "extract",
    "measure_preservation",
    "score_kernels",
    "target_responses",
]


# ---------------------------------------------------------------------------- responses


def _batches(images: Images, batch_size: int, device: torch.device,
             dtype: torch.dtype | None = None) -> Iterator[torch.Tensor]:
    yield from as_stream(images).images(batch_size, device=device, dtype=dtype)


@torch.no_grad()
def target_responses(
    model: nn.Module,
    graph: ModelGraph,
    target: Target,
    images: Images,
    *,
    masks: dict[str, torch.Tensor] | None = None,
    batch_size: int = 256,
) -> Iterator[torch.Tensor]:
    """Yield the target response map batch by batch (the forward stops at the target layer).

    Args:
        model: the model (its state is restored afterwards).
        graph: its :class:`ModelGraph`.
        target: a resolved target.
        images: normalised inputs ``[N, C, H, W]``, or a stream of them (DataLoader,
            iterable of batches: :mod:`netcarve.data.stream`).
        masks: kernel masks to apply (None: the original model).
        batch_size: images per forward pass.

    Yields:
        ``target.response(z)`` for each batch, on CPU.
    """
    device, dtype = _device_of(model), _dtype_of(model)
    with preserved_state(model), _maybe_masked(model, graph, masks):
        model.eval()
        with stop_at(model, target.layer) as run:
            for xb in _batches(images, batch_size, device, dtype):
                yield _compact(target.response(run(xb)).cpu())


def _compact(t: torch.Tensor) -> torch.Tensor:
    # A channel slice is a view that keeps the whole layer output alive; callers often keep
    # every batch's response, so copy out what is needed.
    if t.untyped_storage().nbytes() > t.numel() * t.element_size():
        return t.clone()
    return t


@contextmanager
def _maybe_masked(model: nn.Module, graph: ModelGraph, masks: dict[str, torch.Tensor] | None):
    if masks is None:
        yield
    else:
        with apply_kernel_masks(model, graph, masks):
            yield


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _dtype_of(model: nn.Module) -> torch.dtype:
    p = next(model.parameters(), None)
    return p.dtype if p is not None else torch.float32


def measure_preservation(
    model: nn.Module,
    graph: ModelGraph,
    target: Target,
    masks: dict[str, torch.Tensor],
    images: Images,
    *,
    batch_size: int = 256,
    original: list[torch.Tensor] | None = None,
) -> Preservation:
    """Preservation of ``target`` by the masked model on ``images``.

    Without ``original``, one pass over the images: each batch runs through the original
    model and then the masked one, so a stream is read once and nothing grows with ``N``.

    Args:
        images: normalised images (tensor or stream, see :mod:`netcarve.data.stream`).
        original: precomputed original responses (one tensor per batch, as yielded by
            :func:`target_responses` with the same ``batch_size``) to skip recomputing them.

    Returns:
        A :class:`~netcarve.circuits.preservation.Preservation`.
    """
    meter = PreservationMeter()
    if original is None:
        device, dtype = _device_of(model), _dtype_of(model)
        with preserved_state(model):
            model.eval()
            with stop_at(model, target.layer) as run:
                for xb in _batches(images, batch_size, device, dtype):
                    orig = target.response(run(xb)).cpu()
                    with apply_kernel_masks(model, graph, masks):
                        circ = target.response(run(xb)).cpu()
                    meter.update(orig, circ)
        return meter.result()
    masked = target_responses(model, graph, target, images, masks=masks, batch_size=batch_size)
    for orig, circ in zip(original, masked, strict=True):
        meter.update(orig, circ)
    return meter.result()


# ---------------------------------------------------------------------------- extraction


def _as_target(target: Target | str, graph: ModelGraph) -> Target:
    t = Target.parse(target) if isinstance(target, str) else target
    return t.resolve(graph)


def _split_heldout(
    images: ImageStream, heldout: Images | None, seed: int
) -> tuple[ImageStream, ImageStream]:
    if heldout is not None:
        return images, as_stream(heldout)
    if images.tensor is None:
        return images.halves(seed)
    x = images.tensor
    if len(x) < 2:
        raise CircuitError("need at least 2 images to split into scoring and held-out halves")
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    half = len(x) // 2
    return as_stream(x[perm[:half]]), as_stream(x[perm[half:]])


def _count(stream: ImageStream) -> int:
    n = stream.count()
    if n is None:
        stream.fingerprint()  # one pass, which also counts
        n = stream.count()
    assert n is not None
    return n


def _filter_candidates(
    relevant: dict[str, torch.Tensor], target_layer: str
) -> dict[str, torch.Tensor]:
    """Relevant filters: rows with a relevant kernel; the target's own filters always stay."""
    return {
        name: rel.any(dim=1) for name, rel in relevant.items() if name != target_layer
    }


def score_kernels(
    model: nn.Module,
    graph: ModelGraph,
    target: Target | str,
    images: Images,
    *,
    criterion: str = "actgrad",
    granularity: str = "kernel",
    keep: float = 1.0,
    masks: dict[str, torch.Tensor] | None = None,
    relevant: dict[str, torch.Tensor] | None = None,
    batch_size: int = 64,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Score the relevant kernels (or filters) of a target with a saliency criterion.

    Args:
        model, graph: the model and its graph.
        target: a :class:`Target` or a target string such as ``"features.11:5"``.
        images: normalised scoring images ``[N, C, H, W]`` or a stream of them (a
            DataLoader or iterable of batches; read once per pass the criterion needs).
        criterion: ``actgrad``, ``snip``, ``force``, ``magnitude`` or ``random``.
        granularity: ``"kernel"`` (``[out, in/groups]`` scores) or ``"filter"`` (``[out]``).
        keep: final keep fraction (FORCE's schedule depends on it).
        masks: kernel masks applied while scoring (iterative re-scoring).
        relevant: relevant-kernel masks (computed when omitted).
        batch_size: images per batch.
        seed: seed for the random criterion.

    Returns:
        ``{layer: scores}`` for every relevant layer.
    """
    if granularity not in GRANULARITIES:
        raise CircuitError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    target = _as_target(target, graph)
    relevant = relevant if relevant is not None else graph.relevant_kernels(
        target.layer, target.channels
    )
    crit = get_criterion(criterion)
    device, dtype = _device_of(model), _dtype_of(model)
    stream = as_stream(images)
    ctx = ScoringContext(
        model=model,
        graph=graph,
        target=target,
        batches=lambda: _batches(stream, batch_size, device, dtype),
        layers=list(relevant),
        masks=masks,
        keep=keep,
        seed=seed,
        relevant=relevant,
    )
    if granularity == "kernel":
        return crit.kernel_scores(ctx)
    return crit.filter_scores(ctx)


def extract(
    model: nn.Module,
    target: Target | str,
    images: Images,
    *,
    heldout: Images | None = None,
    criterion: str = "actgrad",
    keep: float = 0.1,
    granularity: str = "kernel",
    per_layer_norm: bool = False,
    steps: int = 1,
    batch_size: int = 64,
    seed: int = 0,
    graph: ModelGraph | None = None,
    measure: bool = True,
    scores: dict[str, torch.Tensor] | None = None,
) -> Circuit:
    """Extract a feature-preserving circuit for ``target``.

    Scores every relevant kernel (those upstream of the target plus the kernels into it) on
    the scoring ``images``, keeps exactly ``round(keep × relevant)`` of them (global top-k,
    deterministic ties), removes kernels that lie on no input → target path (effective mask),
    and measures preservation on ``heldout`` images.

    Args:
        model: any CNN ``nn.Module`` (it comes back exactly as it was).
        target: a :class:`Target` or a string such as ``"features.8:42"``.
        images: normalised scoring images ``[N, C, H, W]``, or a stream of them: a
            DataLoader or re-iterable of ``(images, labels)`` batches, read once per scoring
            step and once for preservation (memory does not grow with the number of images).
        heldout: normalised held-out images (tensor or stream) for preservation. When
            omitted, ``images`` is split in two at random (seeded): a tensor into two halves,
            a stream image by image (a seeded coin per image; see
            :meth:`~netcarve.data.stream.ImageStream.halves`).
        criterion: ``actgrad`` (default), ``snip``, ``force``, ``magnitude`` or ``random``.
        keep: fraction of relevant kernels to keep, in (0, 1].
        granularity: ``"kernel"`` or ``"filter"`` (keep whole filters; the target's own
            filters always stay and ``keep`` counts the other relevant filters).
        per_layer_norm: normalise scores per layer before the global top-k.
        steps: >1 for iterative re-scoring: keep ``keep**(t/steps)`` at step t, re-scoring
            with the current mask applied (FORCE iterates by itself).
        batch_size: images per forward pass.
        seed: seeds the random criterion and the scoring/held-out split.
        graph: a prebuilt :class:`ModelGraph` (built from the first image when omitted).
        measure: measure preservation (skip for speed when only masks are needed).
        scores: kernel scores already computed by :func:`score_kernels` for this target,
            criterion and scoring images (one-shot kernel granularity only: ``steps=1``, not
            FORCE); the scoring pass is then skipped (used by the keep search).

    Returns:
        A :class:`Circuit`. Total collapse is reported in ``circuit.collapsed``.

    Raises:
        CircuitError: keep outside (0, 1], no images, bad granularity or steps.
        DataError: a stream that cannot be read as often as needed (one-shot iterator,
            shuffling loader) or yields bad batches.
        GraphError / TargetError: unknown layer, channel out of range, untraceable model.

    Example:
        >>> from netcarve.zoo import load_model
        >>> lm = load_model("fmnist_vgg")  # doctest: +SKIP
        >>> c = extract(lm.model, "features.10:3", x, heldout=x_test, keep=0.1)  # doctest: +SKIP
        >>> round(c.preservation.pearson, 2)  # doctest: +SKIP
        0.93
    """
    if not (isinstance(keep, (int, float)) and 0 < keep <= 1) or math.isnan(keep):
        raise CircuitError(f"keep must be in (0, 1], got {keep!r}")
    if steps < 1:
        raise CircuitError(f"steps must be >= 1, got {steps}")
    stream = as_stream(images)
    if stream.count() == 0:
        raise CircuitError("no scoring images given")
    if granularity not in GRANULARITIES:
        raise CircuitError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    given = scores
    if given is not None and (granularity != "kernel" or steps != 1 or criterion == "force"):
        raise CircuitError("precomputed scores need granularity='kernel', steps=1 and a "
                           f"one-shot criterion (got {granularity!r}, {steps}, {criterion!r})")
    start = time.perf_counter()
    p = next(model.parameters())
    first = stream.first(device=p.device, dtype=p.dtype)
    if graph is None:
        graph = ModelGraph.build(model, first)
    target = _as_target(target, graph)
    scoring, held = _split_heldout(stream, heldout, seed)
    relevant = graph.relevant_kernels(target.layer, target.channels)
    common = dict(batch_size=batch_size, seed=seed, relevant=relevant)

    if granularity == "filter":
        cands = _filter_candidates(relevant, target.layer)
        scores = score_kernels(model, graph, target, scoring, criterion=criterion,
                               granularity="filter", keep=keep, **common)
        k = round(keep * count(cands))
        kept_filters = select_top_k(scores, cands, k, per_layer_norm=per_layer_norm)
        raw = {
            name: rel & (kept_filters[name][:, None] if name in kept_filters else True)
            for name, rel in relevant.items()
        }
        selected = count(kept_filters)
    else:
        k_final = keep_count(keep, relevant)
        current = {name: rel.clone() for name, rel in relevant.items()}
        n_steps = 1 if criterion == "force" else steps
        for t in range(1, n_steps + 1):
            keep_t = keep ** (t / n_steps)
            k_t = k_final if t == n_steps else max(k_final, round(keep_t * count(relevant)))
            scores = given if given is not None else score_kernels(
                model, graph, target, scoring, criterion=criterion, keep=keep,
                masks=None if t == 1 else current, **common,
            )
            current = select_top_k(scores, current, k_t, per_layer_norm=per_layer_norm)
        raw = current
        selected = count(raw)
    masks, collapsed = graph.effective_mask(raw, target.layer, target.channels)
    scoring_seconds = time.perf_counter() - start

    circuit = Circuit(
        target=target,
        criterion=criterion,
        keep=float(keep),
        masks=masks,
        scores={n: s.detach().float().cpu() for n, s in scores.items()},
        relevant=relevant,
        selected=selected,
        collapsed=collapsed,
        metadata={
            "granularity": granularity,
            "per_layer_norm": per_layer_norm,
            "steps": steps,
            "seed": seed,
            "input_shape": list(first.shape[1:]),
            "model_fingerprint": model_fingerprint(model),
            "netcarve_version": __version__,
            "torch_version": torch.__version__,
            "scoring_seconds": scoring_seconds,
        },
    )
    if measure:
        circuit.preservation = measure_preservation(model, graph, target, masks, held,
                                                    batch_size=max(batch_size, 256))
        circuit.preservation_scoring = measure_preservation(
            model, graph, target, masks, scoring, batch_size=max(batch_size, 256)
        )
    # After the passes above a stream knows its size and fingerprint (read here otherwise).
    circuit.metadata.update(
        scoring_images=_count(scoring),
        heldout_images=_count(held),
        scoring_data_fingerprint=scoring.fingerprint(),
        heldout_data_fingerprint=held.fingerprint(),
    )
    circuit.metadata["seconds"] = time.perf_counter() - start
    return circuit
