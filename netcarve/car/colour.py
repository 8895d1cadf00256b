"""Colour vs shape: how colour-selective each filter is, and which filters CAR prunes first.

Two indices per filter, both in [0, 1] (0 = responds to brightness only, 1 = to colour only):

* **weight index** (first layer on RGB input): the share of the kernel's energy outside the
  grey axis ``R = G = B``. The kernel is first brought back to pixel space (each input
  channel's weights divided by the preset's std, since the network sees
  ``(pixel - mean) / std``); at every kernel position the 3-vector of RGB weights is split
  into its component along ``(1, 1, 1) / sqrt(3)`` and the rest, and
  ``index = sum ||rest||² / sum ||w||²``. A kernel with equal weights on R, G and B scores 0;
  a random kernel scores about 2/3 on average.
* **response index** (any layer): how much the filter's rectified output ``max(z, 0)`` (``z`` =
  its output after its BatchNorm) changes when each image is replaced by its grey version
  (every pixel set to the mean of its R, G, B -- the same grey axis):
  ``||a(x) - a(grey x)|| / (||a(x)|| + ||a(grey x)||)`` over all images and positions (0 for a
  filter that never responds).

A filter is *colour-selective* when the chosen index exceeds ``threshold`` (0.5 by default).
:func:`colour_vs_pruning` compares the colour-selective fraction among the first ``k`` filters
a pruning order removes with the fraction among the filters it keeps, with the hypergeometric
probability of seeing at least that many colour filters among ``k`` drawn at random.

Example:
    >>> from netcarve.zoo import load_model
    >>> lm = load_model("shapes_cnn")
    >>> rep = colour_selectivity(lm.model, "features.0", preset=lm.preset)
    >>> rep.weight_index.shape
    torch.Size([48])
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from netcarve.car.stats import AblationError
from netcarve.core.graph import ModelGraph
from netcarve.core.hooks import preserved_state, resolve_module, stop_at
from netcarve.data.preset import Preset

__all__ = [
    "ColourReport",
    "colour_selectivity",
    "colour_vs_pruning",
    "grey_images",
    "response_colour_index",
    "weight_colour_index",
]


def weight_colour_index(weight: torch.Tensor, std: Sequence[float] | None = None) -> torch.Tensor:
    """Share of each first-layer kernel's energy outside the grey axis (see module docs).

    Args:
        weight: ``[F, 3, kh, kw]`` conv weights on RGB input.
        std: the preset's per-channel std (the kernel is mapped to pixel space with it).

    Returns:
        float64 ``[F]`` in [0, 1] (0 for an all-zero kernel).

    Raises:
        AblationError: the weight does not read 3 input channels.

    Example:
        >>> w = torch.zeros(2, 3, 1, 1); w[0, :, 0, 0] = 1.0; w[1, 0, 0, 0] = 1.0
        >>> weight_colour_index(w)
        tensor([0.0000, 0.6667], dtype=torch.float64)
    """
    if weight.dim() < 2 or weight.shape[1] != 3:
        raise AblationError(f"the weight index needs kernels on 3 (RGB) input channels, got "
                            f"weight of shape {tuple(weight.shape)}")
    w = weight.detach().double().cpu()
    if std is not None:
        w = w / torch.tensor(list(std), dtype=torch.float64).view(1, 3, *([1] * (w.dim() - 2)))
    axis = torch.full((3,), 1.0 / math.sqrt(3.0), dtype=torch.float64)
    along = torch.einsum("fc...,c->f...", w, axis)
    energy = w.pow(2).reshape(w.shape[0], -1).sum(1)
    grey = along.pow(2).reshape(w.shape[0], -1).sum(1)
    out = torch.zeros_like(energy)
    nz = energy > 0
    out[nz] = ((energy[nz] - grey[nz]) / energy[nz]).clamp(0.0, 1.0)
    return out


def grey_images(images: torch.Tensor) -> torch.Tensor:
    """Every pixel replaced by the mean of its R, G, B (same dtype; uint8 rounds).

    Example:
        >>> grey_images(torch.tensor([[[[30]], [[60]], [[90]]]], dtype=torch.uint8)).flatten()
        tensor([60, 60, 60], dtype=torch.uint8)
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise AblationError(f"grey conversion needs RGB images [N, 3, H, W], got "
                            f"{tuple(images.shape)}")
    mean = images.double().mean(1, keepdim=True).expand_as(images)
    if images.dtype == torch.uint8:
        return mean.round().clamp(0, 255).to(torch.uint8)
    return mean.to(images.dtype)


def _removal_point(graph: ModelGraph, layer: str) -> str:
    bns = graph.bn_after.get(layer, [])
    return bns[-1] if bns else layer


def response_colour_index(
    model: nn.Module,
    layer: str,
    images: torch.Tensor,
    preset: Preset,
    *,
    graph: ModelGraph | None = None,
    batch_size: int = 200,
) -> torch.Tensor:
    """How much each filter's rectified output changes on grey versions of the images.

    Args:
        model: the classifier (unchanged).
        layer: any conv layer.
        images: raw RGB images, ``uint8 [N, 3, H, W]`` or floats in [0, 1] (normalised here
            with ``preset``).
        preset: the model's preset (RGB).
        graph: the model's graph.
        batch_size: images per pass.

    Returns:
        float64 ``[F]`` in [0, 1].

    Raises:
        AblationError: not RGB, or no images.

    Example:
        >>> response_colour_index(model, "features.4", x, preset)  # doctest: +SKIP
    """
    if len(images) == 0:
        raise AblationError("the response index needs images")
    weight = getattr(resolve_module(model, layer), "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise AblationError(f"layer {layer} has no weight")
    device, dtype = weight.device, weight.dtype
    if graph is None:
        graph = ModelGraph.build(model, preset.normalize(images[:1]).to(device=device,
                                                                         dtype=dtype))
    point = _removal_point(graph, layer)
    diff = norm_c = norm_g = None
    with preserved_state(model), torch.no_grad(), stop_at(model, point) as run:
        model.eval()
        for start in range(0, len(images), batch_size):
            xb = images[start:start + batch_size]
            outs = []
            for variant in (xb, grey_images(xb)):
                z = run(preset.normalize(variant).to(device=device, dtype=dtype))
                z = z.double().clamp(min=0)
                outs.append(z.transpose(0, 1).reshape(z.shape[1], -1))
            d = (outs[0] - outs[1]).pow(2).sum(1).cpu()
            c = outs[0].pow(2).sum(1).cpu()
            g = outs[1].pow(2).sum(1).cpu()
            diff = d if diff is None else diff + d
            norm_c = c if norm_c is None else norm_c + c
            norm_g = g if norm_g is None else norm_g + g
    assert diff is not None and norm_c is not None and norm_g is not None
    denom = norm_c.sqrt() + norm_g.sqrt()
    out = torch.zeros_like(denom)
    nz = denom > 0
    out[nz] = diff[nz].sqrt() / denom[nz]
    return out


@dataclass
class ColourReport:
    """Colour-selectivity of the filters of one layer.

    Attributes:
        layer: the layer.
        weight_index: float64 ``[F]`` (None unless the layer reads the RGB input).
        response_index: float64 ``[F]`` (None when no images were given).
        by: which index decides ``selective`` (``"weight"`` or ``"response"``).
        threshold: the cut-off.
    """

    layer: str
    weight_index: torch.Tensor | None
    response_index: torch.Tensor | None
    by: str
    threshold: float

    @property
    def index(self) -> torch.Tensor:
        """The index that decides selectivity."""
        chosen = self.weight_index if self.by == "weight" else self.response_index
        assert chosen is not None
        return chosen

    @property
    def selective(self) -> torch.Tensor:
        """bool ``[F]``: colour-selective filters."""
        return self.index > self.threshold

    def fraction(self, filters: Sequence[int]) -> float:
        """Colour-selective fraction among ``filters`` (nan for none)."""
        if not len(filters):
            return math.nan
        sel = self.selective
        return sum(bool(sel[f]) for f in filters) / len(filters)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary with both indices."""
        def listed(t: torch.Tensor | None) -> list[float] | None:
            return None if t is None else [float(v) for v in t]

        return {"layer": self.layer, "by": self.by, "threshold": self.threshold,
                "colour_selective": int(self.selective.sum()), "filters": len(self.index),
                "weight_index": listed(self.weight_index),
                "response_index": listed(self.response_index)}

    def save(self, path: str | Path) -> Path:
        """CSV with ``filter, weight_index, response_index, colour_selective``."""
        target = Path(path)
        if target.suffix.lower() != ".csv":
            target.mkdir(parents=True, exist_ok=True)
            target = target / f"colour_{self.layer}.csv"
        sel = self.selective
        with target.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["filter", "weight_index", "response_index", "colour_selective"])
            for f in range(len(sel)):
                w = "" if self.weight_index is None else f"{float(self.weight_index[f]):.6g}"
                r = "" if self.response_index is None else f"{float(self.response_index[f]):.6g}"
                writer.writerow([f, w, r, int(bool(sel[f]))])
        return target


def colour_selectivity(
    model: nn.Module,
    layer: str,
    *,
    preset: Preset,
    images: torch.Tensor | None = None,
    graph: ModelGraph | None = None,
    by: str | None = None,
    threshold: float = 0.5,
    batch_size: int = 200,
) -> ColourReport:
    """Weight and response colour indices of every filter of ``layer``.

    Args:
        model: the classifier (unchanged).
        layer: the layer (the weight index needs it to read the 3-channel input).
        preset: the model's preset (RGB; its std maps kernels to pixel space).
        images: raw RGB images for the response index (optional for the first layer).
        graph: the model's graph.
        by: index deciding selectivity (default: weight for a first layer, else response).
        threshold: selective when the index exceeds this.
        batch_size: images per pass.

    Returns:
        a :class:`ColourReport`.

    Raises:
        AblationError: not an RGB model, or neither index can be computed.

    Example:
        >>> rep = colour_selectivity(model, "features.0", preset=preset)  # doctest: +SKIP
        >>> rep.fraction(range(10))  # doctest: +SKIP
    """
    if preset.channels != 3:
        raise AblationError(f"colour selectivity needs an RGB model; the preset has "
                            f"{preset.channels} channel(s)")
    weight = getattr(resolve_module(model, layer), "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise AblationError(f"layer {layer} has no weight")
    w_index = None
    if weight.dim() >= 3 and weight.shape[1] == 3:
        w_index = weight_colour_index(weight, preset.std)
    r_index = None
    if images is not None:
        r_index = response_colour_index(model, layer, images, preset, graph=graph,
                                        batch_size=batch_size)
    chosen = by or ("weight" if w_index is not None else "response")
    if chosen not in ("weight", "response"):
        raise AblationError(f"by must be 'weight' or 'response', got {by!r}")
    if (chosen == "weight" and w_index is None) or (chosen == "response" and r_index is None):
        raise AblationError(f"the {chosen} index of {layer} cannot be computed "
                            "(weight: first layer on RGB input only; response: needs images)")
    return ColourReport(layer, w_index, r_index, chosen, threshold)


def colour_vs_pruning(report: ColourReport, order: Sequence[int], k: int = 20, *,
                      permutations: int = 10_000, seed: int = 0) -> dict[str, Any]:
    """Colour-selective fraction among the first ``k`` pruned filters vs the kept ones.

    Args:
        report: the layer's :class:`ColourReport`.
        order: filters of that layer in pruning order (at least ``k``).
        k: how many first-pruned filters to look at.
        permutations: random relabellings for the permutation p-values (0: none).
        seed: seeds the relabellings.

    Returns:
        ``{"k", "pruned_colour", "pruned_fraction", "kept_colour", "kept", "kept_fraction",
        "all_fraction", "p_value", "pruned_mean_index", "kept_mean_index", "p_perm_more",
        "p_perm_less", "p_index_more", "p_index_less", ...}``; ``p_value`` is the
        hypergeometric probability that ``k`` filters drawn at random include at least
        ``pruned_colour`` colour-selective ones. The permutation p-values draw ``k`` filters
        at random ``permutations`` times and count how often the difference (first-pruned
        minus kept) of the colour-selective fraction (``p_perm_*``) or of the mean index
        (``p_index_*``) is at least (``more``: CAR prunes colour filters first) or at most
        (``less``: CAR keeps them) the observed one, as ``(1 + count) / (1 + permutations)``.

    Raises:
        AblationError: fewer than ``k`` filters in ``order``, or ``k`` not below the layer's
            filter count.

    Example:
        >>> colour_vs_pruning(rep, greedy.removed("features.0"), k=20)  # doctest: +SKIP
    """
    if len(order) < k:
        raise AblationError(f"the order has {len(order)} filters, fewer than k={k}")
    sel = report.selective
    n = len(sel)
    if not 0 < k < n:
        raise AblationError(f"k must lie in 1..{n - 1} for a layer of {n} filters, got {k}")
    first = [int(f) for f in order[:k]]
    kept = [f for f in range(n) if f not in set(first)]
    colour_total = int(sel.sum())
    hits = sum(bool(sel[f]) for f in first)
    p = sum(math.comb(colour_total, i) * math.comb(n - colour_total, k - i)
            for i in range(hits, min(k, colour_total) + 1)) / math.comb(n, k)
    index = report.index.double()
    out = {"k": k, "pruned_colour": hits, "pruned_fraction": hits / k,
           "kept": len(kept), "kept_colour": sum(bool(sel[f]) for f in kept),
           "kept_fraction": report.fraction(kept), "all_fraction": colour_total / n,
           "p_value": p, "by": report.by, "threshold": report.threshold,
           "pruned_mean_index": float(index[first].mean()),
           "kept_mean_index": float(index[kept].mean()), "permutations": permutations}
    out.update(_permutation_p(sel.double(), index, first, permutations, seed))
    return out


def _permutation_p(sel: torch.Tensor, index: torch.Tensor, first: list[int],
                   permutations: int, seed: int) -> dict[str, float]:
    """One-sided permutation p-values of the first-pruned minus kept differences."""
    if permutations < 1:
        return {"p_perm_more": math.nan, "p_perm_less": math.nan,
                "p_index_more": math.nan, "p_index_less": math.nan}
    n, k = len(sel), len(first)
    gen = torch.Generator().manual_seed(int(seed))
    draws = torch.rand(permutations, n, generator=gen).argsort(dim=1)[:, :k]
    picked = torch.zeros(permutations, n, dtype=torch.bool)
    picked.scatter_(1, draws, True)

    def diff(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        inside = (values * mask).sum(-1) / k
        outside = (values * ~mask).sum(-1) / (n - k)
        return inside - outside

    observed = torch.zeros(n, dtype=torch.bool)
    observed[first] = True
    tol = 1e-12  # equal differences (ties) count on both sides
    result = {}
    for name, values in (("perm", sel), ("index", index)):
        obs = diff(values, observed)
        null = diff(values, picked)
        result[f"p_{name}_more"] = float((1 + (null >= obs - tol).sum()) / (1 + permutations))
        result[f"p_{name}_less"] = float((1 + (null <= obs + tol).sum()) / (1 + permutations))
    return result
