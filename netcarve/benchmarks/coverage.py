"""Architecture coverage: run every netcarve capability on one model and measure it.

:func:`coverage_row` builds the channel graph, extracts a circuit for a middle conv unit and
makes it a standalone module, scores a late conv by CAR with the ablation engine and the
naive loop side by side, prunes filters physically and optimises a feature visualisation,
recording a number for each (or the error message that refused it). ``bench/coverage_table.py``
runs it on one model per CNN family and writes ``docs/coverage.md``; the tests assert the
same numbers against their bounds.

Example:
    >>> row = coverage_row(model, "layer2.0.conv2", "layer3.1.conv2", x, y)  # doctest: +SKIP
    >>> row["to_module"]["rel_error"] < 1e-5  # doctest: +SKIP
    True
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from netcarve.car.engine import AblationEngine
from netcarve.car.naive import ablate_naive, single_removals
from netcarve.car.stats import compare_stats
from netcarve.circuits.extract import extract
from netcarve.core.errors import NetcarveError
from netcarve.core.graph import ModelGraph
from netcarve.core.hooks import apply_kernel_masks, capture, forward_until
from netcarve.surgery.prune import prunable_layers, prune_filters
from netcarve.viz.render import visualize

__all__ = ["CAPABILITIES", "coverage_row"]

CAPABILITIES = ("graph", "extract", "to_module", "car", "prune", "featureviz")
"""The columns of a coverage row, in order."""


def _refused(exc: BaseException) -> dict[str, Any]:
    """A capability that raised: netcarve's own errors are refusals, anything else a bug."""
    kind = "refused" if isinstance(exc, NetcarveError) else "crashed"
    out: dict[str, Any] = {"status": kind, "error": f"{type(exc).__name__}: {exc}"}
    if kind == "crashed":
        out["traceback"] = traceback.format_exc(limit=4)
    return out


def _timed(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    start = time.perf_counter()
    try:
        out = {"status": "ok", **fn()}
    except Exception as exc:  # recorded in the table, never hidden
        out = _refused(exc)
    out["seconds"] = round(time.perf_counter() - start, 3)
    return out


def _liveliest(model: nn.Module, graph: ModelGraph, layer: str, x: torch.Tensor) -> int:
    """The channel of ``layer`` whose response varies most over ``x`` (never a dead one)."""
    with torch.no_grad(), capture(model, [layer]) as acts:
        model(x)
    z = acts[layer].transpose(0, 1).flatten(1)
    return int(z.std(dim=1).argmax())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) / max(float(b.abs().max()), 1e-12)


def coverage_row(
    model: nn.Module,
    middle: str,
    late: str,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    keep: float = 0.5,
    viz_steps: int = 32,
    seed: int = 0,
) -> dict[str, Any]:
    """Every capability of netcarve on ``model``, each with its measured number.

    Args:
        model: a classifier in eval mode (it comes back unchanged).
        middle: a conv layer in the middle of the network (circuit target, pruned layer when
            it is prunable).
        late: a late conv layer (CAR and feature visualisation).
        images: normalised images ``[N, C, H, W]`` (moved to the model's device); the first
            half scores, the second half is held out.
        labels: ``[N]`` class indices for CAR.
        keep: kernel fraction of the circuit (scores normalised per layer, so that random
            weights, whose score scales differ between layers, do not starve a layer).
        viz_steps: optimisation steps of the feature visualisation.
        seed: seeds the visualisation and the pruned filters.

    Returns:
        ``{capability: {"status": "ok" | "refused" | "crashed", numbers..., "seconds"}}``
        for the capabilities in :data:`CAPABILITIES` (``"error"`` holds the message of a
        refusal). Later capabilities that need the graph are skipped when it fails.

    Example:
        >>> coverage_row(net, "features.3", "features.6", x, y)["graph"]["layers"]  # doctest: +SKIP
        8
    """
    param = next(model.parameters())
    images, labels = images.to(device=param.device, dtype=param.dtype), labels.cpu()
    half = len(images) // 2
    scoring, heldout = images[:half], images[half:]
    row: dict[str, Any] = {}
    holder: dict[str, Any] = {}

    def graph() -> dict[str, Any]:
        g = ModelGraph.build(model, images[:1])
        holder["graph"] = g
        kinds = [info.kind for info in g.layers.values()]
        return {"conv": kinds.count("conv"), "linear": kinds.count("linear"),
                "layers": len(kinds)}

    row["graph"] = _timed(graph)
    if "graph" not in holder:
        for cap in CAPABILITIES[1:]:
            row[cap] = {"status": "skipped", "error": "no graph"}
        return row
    g: ModelGraph = holder["graph"]

    def circuit() -> dict[str, Any]:
        channel = _liveliest(model, g, middle, scoring)
        c = extract(model, f"{middle}:{channel}", scoring, heldout=heldout, keep=keep,
                    graph=g, per_layer_norm=True)
        p = c.preservation
        out = {"target": f"{middle}:{channel}",
               "kept": int(sum(int(m.sum()) for m in c.masks.values())),
               "relevant": int(c.relevant_kernels), "heldout_r": p.pearson if p else None}
        holder["circuit"], holder["channel"] = c, channel
        return out

    row["extract"] = _timed(circuit)

    def to_module() -> dict[str, Any]:
        if "circuit" not in holder:
            raise RuntimeError("no circuit to convert (extract failed)")
        c, channel = holder["circuit"], holder["channel"]
        module = c.to_module(model, g)
        with torch.no_grad():
            out = module(heldout)
            with apply_kernel_masks(model, g, c.masks):
                ref = forward_until(model, middle, heldout)[:, [channel]]
        cost = module.compare(model, graph=g)
        return {"rel_error": _rel(out.reshape(ref.shape), ref),
                "mac_ratio_to_target": cost["mac_ratio_to_target"]}

    row["to_module"] = _timed(to_module)

    def car() -> dict[str, Any]:
        n = g.layer(late).out_channels
        cands = single_removals(n)
        t0 = time.perf_counter()
        engine = AblationEngine(model, images, labels, graph=g)
        got = engine.evaluate(late, cands)
        t_engine = time.perf_counter() - t0
        t0 = time.perf_counter()
        want = ablate_naive(model, late, cands, images, labels, graph=g)
        t_naive = time.perf_counter() - t0
        agreement = compare_stats(got, want)
        return {"filters": n, "agree": agreement.ok,
                "max_loss_error": agreement.max_loss_error,
                "decision_changes": agreement.decision_changes,
                "speedup": t_naive / max(t_engine, 1e-9)}

    row["car"] = _timed(car)

    def prune() -> dict[str, Any]:
        why = prunable_layers(model, graph=g)
        ok = [name for name, reason in why.items() if reason is None]
        if not ok:
            raise _NothingPrunable("no prunable layer: " + "; ".join(
                f"{name}: {reason}" for name, reason in why.items()))
        layer = middle if middle in ok else ok[len(ok) // 2]
        n = g.layer(layer).out_channels
        gen = torch.Generator().manual_seed(seed)
        keep_mask = torch.ones(n, dtype=torch.bool)
        keep_mask[torch.randperm(n, generator=gen)[: n // 2]] = False
        pruned = prune_filters(model, {layer: keep_mask}, graph=g, example_input=heldout)
        return {"prunable": len(ok), "layers": len(why), "layer": layer,
                "removed": n - int(keep_mask.sum()), "rel_error": pruned.max_rel_error,
                "params_fraction": pruned.params_after / pruned.params_before}

    row["prune"] = _timed(prune)

    def featureviz() -> dict[str, Any]:
        channel = _liveliest(model, g, late, images)
        viz = visualize(model, f"{late}:{channel}", graph=g, input_shape=images.shape[1:],
                        steps=viz_steps, seed=seed)
        first = float(viz.history[0, 0])
        return {"target": f"{late}:{channel}", "objective_start": first,
                "objective_end": float(viz.activations[0]),
                "dataset_max": _dataset_max(model, g, late, channel, images)}

    row["featureviz"] = _timed(featureviz)
    return row


class _NothingPrunable(NetcarveError):
    """No layer of the model can lose filters physically."""


def _dataset_max(model: nn.Module, graph: ModelGraph, layer: str, channel: int,
                 images: torch.Tensor) -> float:
    """The largest spatially averaged response of the unit over ``images``."""
    with torch.no_grad(), capture(model, [layer]) as acts:
        model(images)
    return float(acts[layer][:, channel].flatten(1).mean(1).max())
