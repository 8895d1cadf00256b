"""Feature-preserving circuits: score kernels, keep the top fraction, measure preservation.

A :class:`Circuit` is a set of kernel masks ``{layer: bool[out, in/groups]}`` over the layers
upstream of a target, plus the scores that chose them and the provenance needed to reproduce
them. Masking follows the project convention: kernel weights are zeroed, biases and BatchNorm
stay (a channel with no kernels left emits a constant).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from netcarve.circuits.files import read_circuit_fields, save_circuit
from netcarve.circuits.preservation import Preservation
from netcarve.core.errors import NetcarveError
from netcarve.core.graph import ModelGraph
from netcarve.core.hooks import apply_kernel_masks
from netcarve.core.targets import Target
from netcarve.data.stream import Images, as_stream, fingerprint_batches

__all__ = [
    "GRANULARITIES",
    "Circuit",
    "CircuitError",
    "count",
    "data_fingerprint",
    "keep_count",
    "load_circuit",
    "model_fingerprint",
    "select_top_k",
]


class CircuitError(NetcarveError):
    """Bad extraction arguments (keep outside (0, 1], empty image set, ...)."""


GRANULARITIES = ("kernel", "filter")


# ---------------------------------------------------------------------------- selection


def select_top_k(
    scores: dict[str, torch.Tensor],
    candidates: dict[str, torch.Tensor],
    k: int,
    *,
    per_layer_norm: bool = False,
) -> dict[str, torch.Tensor]:
    """Keep exactly ``k`` candidates with the highest scores across all layers.

    Ties are broken deterministically by position: layers in the order of ``candidates``
    (topological), then row-major within a layer — the earlier entry wins.

    Args:
        scores: ``{layer: float tensor}``; same shapes as ``candidates``.
        candidates: ``{layer: bool tensor}``, the entries eligible for selection.
        k: how many to keep (clipped to the number of candidates).
        per_layer_norm: divide each layer's scores by the mean score of its candidates first,
            so layers with large activations do not take the whole budget.

    Returns:
        ``{layer: bool tensor}`` with exactly ``min(k, #candidates)`` True entries.

    Raises:
        CircuitError: a score is NaN.

    Example:
        >>> s = {"a": torch.tensor([[3.0, 1.0]]), "b": torch.tensor([[3.0, 2.0]])}
        >>> c = {"a": torch.ones(1, 2, dtype=torch.bool), "b": torch.ones(1, 2, dtype=torch.bool)}
        >>> {n: m.tolist() for n, m in select_top_k(s, c, 2).items()}
        {'a': [[True, False]], 'b': [[True, False]]}
    """
    names = list(candidates)
    flat_scores, flat_cand = [], []
    for name in names:
        cand = candidates[name].reshape(-1).cpu()
        s = scores[name].detach().reshape(-1).double().cpu()
        if torch.isnan(s[cand]).any():
            raise CircuitError(f"NaN scores in layer {name}: check the model and inputs")
        if per_layer_norm and cand.any():
            mean = s[cand].abs().mean()
            if mean > 0:
                s = s / mean
        flat_scores.append(s)
        flat_cand.append(cand)
    all_scores = torch.cat(flat_scores) if flat_scores else torch.empty(0, dtype=torch.float64)
    all_cand = torch.cat(flat_cand) if flat_cand else torch.empty(0, dtype=torch.bool)
    idx = torch.nonzero(all_cand).flatten()
    k = max(0, min(int(k), idx.numel()))
    # Stable sort of the negated scores: equal scores keep index order.
    order = torch.sort(-all_scores[idx], stable=True).indices[:k]
    chosen = torch.zeros_like(all_cand)
    chosen[idx[order]] = True
    out, start = {}, 0
    for name in names:
        n = candidates[name].numel()
        out[name] = chosen[start : start + n].reshape(candidates[name].shape)
        start += n
    return out


def count(masks: dict[str, torch.Tensor]) -> int:
    """Number of True entries over all masks."""
    return int(sum(int(m.sum()) for m in masks.values()))


def keep_count(keep: float, relevant: dict[str, torch.Tensor]) -> int:
    """Exact number of kernels a keep fraction means: ``round(keep × relevant)``, at least 1."""
    return max(1, round(keep * count(relevant)))


# ---------------------------------------------------------------------------- fingerprints


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the names, shapes, dtypes and bytes of a model's state dict (first 16 hex)."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def data_fingerprint(images: Images) -> str:
    """SHA-256 of images' shape, dtype and bytes (first 16 hex); a tensor and a stream of
    the same images agree (see :func:`netcarve.data.stream.fingerprint_batches`)."""
    if isinstance(images, torch.Tensor):
        return fingerprint_batches([images])
    return as_stream(images).fingerprint()


# ---------------------------------------------------------------------------- circuit


@dataclass
class Circuit:
    """A feature-preserving circuit: kernel masks for one target, with provenance.

    Attributes:
        target: the preserved target.
        criterion: saliency criterion used to score kernels.
        keep: requested keep fraction of the relevant kernels.
        masks: effective kernel masks ``{layer: bool[out, in/groups]}`` (every relevant layer).
        scores: the criterion's scores ``{layer: float[out, in/groups]}``.
        relevant: relevant-kernel masks (upstream of the target, plus kernels into it).
        selected: kernels chosen by top-k before the effective-mask clean-up.
        collapsed: True when no path from the input to the target survives.
        preservation: measured on held-out images (not used for scoring).
        preservation_scoring: measured on the scoring images.
        metadata: seed, granularity, fingerprints, input shape, timings, version.
    """

    target: Target
    criterion: str
    keep: float
    masks: dict[str, torch.Tensor]
    scores: dict[str, torch.Tensor]
    relevant: dict[str, torch.Tensor]
    selected: int
    collapsed: bool
    preservation: Preservation | None = None
    preservation_scoring: Preservation | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def relevant_kernels(self) -> int:
        """Number of relevant kernels (the denominator of ``keep``)."""
        return count(self.relevant)

    @property
    def kept_kernels(self) -> int:
        """Kernels in the effective masks."""
        return count(self.masks)

    @property
    def effective_keep(self) -> float:
        """Kept ÷ relevant kernels after the effective-mask clean-up."""
        return self.kept_kernels / max(self.relevant_kernels, 1)

    def per_layer(self) -> list[dict[str, Any]]:
        """Relevant and kept kernel counts per layer, in topological order."""
        return [
            {"layer": name, "relevant": int(rel.sum()), "kept": int(self.masks[name].sum())}
            for name, rel in self.relevant.items()
        ]

    def graph_for(self, model: nn.Module) -> ModelGraph:
        """Build the model graph with the input shape the circuit was extracted with."""
        shape = self.metadata.get("input_shape")
        if shape is None:
            raise CircuitError("circuit metadata lacks 'input_shape'; pass a graph explicitly")
        p = next(model.parameters())
        return ModelGraph.build(model, torch.zeros(1, *shape, dtype=p.dtype, device=p.device))

    @contextmanager
    def masked(self, model: nn.Module, graph: ModelGraph | None = None) -> Iterator[nn.Module]:
        """Context manager: the model with this circuit's masks applied (restored on exit).

        Example:
            >>> with circuit.masked(model) as m:  # doctest: +SKIP
            ...     y = m(x)
        """
        graph = graph or self.graph_for(model)
        with apply_kernel_masks(model, graph, self.masks):
            yield model

    def to_module(self, model: nn.Module, graph: ModelGraph | None = None):
        """A standalone, physically smaller module computing the target layer's raw output
        on the target channels, equal to the masked model (see :mod:`netcarve.surgery`).

        Returns:
            a :class:`~netcarve.surgery.CircuitModule`.
        """
        from netcarve.surgery.extract import extract_module

        graph = graph or self.graph_for(model)
        return extract_module(model, graph, self.masks, self.target.layer, self.target.channels)

    def summary(self) -> dict[str, Any]:
        """JSON-friendly summary (what ``summary.json`` holds)."""
        return {
            "target": str(self.target),
            "target_layer": self.target.layer,
            "target_channels": self.target.channels,
            "criterion": self.criterion,
            "keep": self.keep,
            "granularity": self.metadata.get("granularity", "kernel"),
            "relevant_kernels": self.relevant_kernels,
            "selected_kernels": self.selected,
            "kept_kernels": self.kept_kernels,
            "effective_keep": self.effective_keep,
            "collapsed": self.collapsed,
            "preservation_heldout": None
            if self.preservation is None
            else self.preservation.to_dict(),
            "preservation_scoring": None
            if self.preservation_scoring is None
            else self.preservation_scoring.to_dict(),
            "per_layer": self.per_layer(),
            **{k: v for k, v in self.metadata.items() if k not in ("granularity",)},
        }

    def save(self, path) -> None:
        """Write the circuit file (safetensors + JSON metadata; :mod:`netcarve.circuits.files`)."""
        save_circuit(self, path)

    @classmethod
    def load(cls, path) -> Circuit:
        """Read a circuit file written by :meth:`save` (nothing is unpickled)."""
        return cls(**read_circuit_fields(path))


def load_circuit(path: str | Path) -> Circuit:
    """Read a circuit file written by :meth:`Circuit.save` (nothing is unpickled).

    Args:
        path: the ``.safetensors`` circuit file.

    Returns:
        A :class:`Circuit` equal to the one saved.

    Raises:
        CircuitFileError: the file is missing, truncated, not a circuit file, or was edited
            (masks no longer match their checksum, shapes disagree, keys missing).

    Example:
        >>> c = load_circuit("out/circuit.safetensors")  # doctest: +SKIP
    """
    return Circuit.load(path)
