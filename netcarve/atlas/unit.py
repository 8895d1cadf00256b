"""One atlas task: map a few units of one layer (keep search, comparison, pictures, diagram).

Everything a unit's row and page need is computed here, in whichever process runs the task
(a Ray worker or the driver itself), and comes back as plain data: the row (a dict that fits
:data:`netcarve.atlas.store.UNIT_SCHEMA`) and the unit's files as bytes keyed by their path
inside the atlas folder. Nothing is written here: the driver is the store's only writer, so a
task that dies or is retried can never leave half a unit behind, and workers on other
machines need no shared disk.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from netcarve.circuits.circuit import CircuitError, count, select_top_k
from netcarve.circuits.extract import measure_preservation, score_kernels, target_responses
from netcarve.circuits.keep_search import find_keep
from netcarve.core.graph import ModelGraph
from netcarve.core.targets import Target
from netcarve.data.preset import Preset
from netcarve.diagram import write_diagram
from netcarve.diagram.pictures import png_bytes
from netcarve.viz.examples import dataset_examples
from netcarve.viz.render import visualize

__all__ = ["AtlasConfig", "UnitResult", "check_units", "map_units", "unit_folder"]


@dataclass(frozen=True)
class AtlasConfig:
    """How every unit of an atlas is mapped (stored in ``atlas.json``; a resumed run must use
    the same settings, so the rows of one atlas are comparable).

    Attributes:
        goal: the keep search's preservation goal (held-out Pearson r, unless ``search_on``).
        search_on: ``"heldout"`` or ``"scoring"`` (see :func:`~netcarve.find_keep`).
        criterion: the criterion the circuits are extracted with.
        compare: criteria compared with ``criterion`` at ``compare_factors`` × the keep found.
        compare_factors: the keeps of the comparison, as multiples of the keep found (clipped
            to (0, 1]).
        featureviz_steps: optimisation steps of each unit's feature visualisation.
        examples: top data-set examples per unit.
        diagram_pictures: data-set example pictures per node of the circuit diagram.
        diagrams: draw each unit's interactive diagram (about 1 MB and a quarter of a unit's
            time on fmnist_vgg; off for big networks, draw chosen units with
            ``netcarve diagram`` from their circuit files).
        classes: most/least important classes listed per unit (class-wise CAR).
        batch_size: images per forward pass.
        seed: seeds the scoring/held-out split, the random criterion and the visualisation.
    """

    goal: float = 0.9
    search_on: str = "heldout"
    criterion: str = "actgrad"
    compare: tuple[str, ...] = ("snip", "magnitude", "random")
    compare_factors: tuple[float, ...] = (0.5, 1.0, 2.0)
    featureviz_steps: int = 64
    examples: int = 6
    diagram_pictures: int = 2
    diagrams: bool = True
    classes: int = 3
    batch_size: int = 64
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AtlasConfig:
        """The config :meth:`to_dict` wrote (unknown keys are an error)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown atlas settings {unknown}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


@dataclass
class UnitResult:
    """What one unit's mapping produced: its store row and its files (path -> bytes)."""

    row: dict[str, Any]
    files: dict[str, bytes]


def unit_folder(layer: str, unit: int) -> str:
    """The unit's folder inside the atlas, e.g. ``units/features.11/00005``."""
    return f"units/{layer}/{unit:05d}"


def _r(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def _scores(model: nn.Module, graph: ModelGraph, target: Target, scoring: torch.Tensor,
            criterion: str, config: AtlasConfig) -> dict[str, torch.Tensor]:
    return score_kernels(model, graph, target, scoring, criterion=criterion,
                         relevant=graph.relevant_kernels(target.layer, target.channels),
                         batch_size=config.batch_size, seed=config.seed)


def _comparison(model: nn.Module, graph: ModelGraph, target: Target, scoring: torch.Tensor,
                search: torch.Tensor, original: list[torch.Tensor], keep: float,
                config: AtlasConfig, own_scores: dict[str, torch.Tensor] | None
                ) -> list[dict[str, Any]]:
    """Preservation of every compared criterion at the comparison keeps (one scoring pass per
    criterion: the one-shot scores do not change with keep; ``own_scores`` are
    ``config.criterion``'s, already computed for the keep search)."""
    relevant = graph.relevant_kernels(target.layer, target.channels)
    total = count(relevant)
    keeps = sorted({min(1.0, keep * f) for f in config.compare_factors})
    rows = []
    for criterion in (config.criterion, *config.compare):
        scores = (own_scores if criterion == config.criterion and own_scores is not None
                  else _scores(model, graph, target, scoring, criterion, config))
        for k in keeps:
            n = max(1, round(k * total))
            masks, collapsed = graph.effective_mask(select_top_k(scores, relevant, n),
                                                    target.layer, target.channels)
            pres = measure_preservation(model, graph, target, masks, search,
                                        batch_size=max(config.batch_size, 256),
                                        original=original)
            rows.append({"criterion": criterion, "keep": float(k), "kept_kernels": count(masks),
                         "pearson": _r(pres.pearson), "collapsed": bool(collapsed)})
    return rows


def _examples_png(patches: list[np.ndarray]) -> bytes:
    """The top examples side by side, one pixel of grey between them."""
    h = max(p.shape[0] for p in patches)
    gap = np.full((h, 1, *patches[0].shape[2:]), 0.5, dtype=np.float32)
    tiles = []
    for p in patches:
        pad = np.full((h, p.shape[1], *p.shape[2:]), 0.5, dtype=np.float32)
        pad[:p.shape[0]] = p
        tiles += [pad, gap]
    return png_bytes(np.concatenate(tiles[:-1], axis=1), min_size=96)


def map_units(
    model: nn.Module,
    layer: str,
    units: list[int],
    scoring: torch.Tensor,
    heldout: torch.Tensor,
    config: AtlasConfig,
    *,
    preset: Preset | None = None,
    model_name: str | None = None,
) -> list[UnitResult]:
    """Map ``units`` of ``layer``: for each, the keep search's circuit, the criterion
    comparison, a feature visualisation, the top data-set examples and the circuit diagram.

    Args:
        model: the model (eval mode; it comes back exactly as it was).
        layer: a conv layer of ``model``.
        units: channels of ``layer``.
        scoring: normalised scoring images ``[N, C, H, W]``.
        heldout: normalised held-out images (preservation, examples, diagram pictures).
        config: the atlas settings.
        preset: the model's preset (display colours, the visualisation's normaliser).
        model_name: recorded in each circuit file.

    Returns:
        one :class:`UnitResult` per unit, in order.

    Raises:
        CircuitError / GraphError / TargetError: a unit that cannot be mapped (unknown
        layer, channel out of range, nothing relevant).

    Example:
        >>> res = map_units(lm.model, "features.11", [5], s, h, AtlasConfig())  # doctest: +SKIP
        >>> res[0].row["keep"], sorted(res[0].files)[:1]  # doctest: +SKIP
        (0.545, ['units/features.11/00005/circuit.safetensors'])
    """
    if not units:
        return []
    graph = ModelGraph.build(model, scoring[:1])
    start = time.perf_counter()
    viz = visualize(model, [f"{layer}:{u}" for u in units], preset=preset,
                    steps=config.featureviz_steps, seed=config.seed, graph=graph,
                    batch_size=config.batch_size)
    ex = dataset_examples(model, layer, heldout, channels=units, top_k=config.examples,
                          batch_size=max(config.batch_size, 256), graph=graph)
    patches = ex.patches(heldout, preset)
    shared = (time.perf_counter() - start) / len(units)
    results = []
    for i, unit in enumerate(units):
        t0 = time.perf_counter()
        target = Target(layer, channel=int(unit)).resolve(graph)
        # One scoring pass and one pass for the original responses serve both the keep search
        # and the criterion comparison.
        own = (None if config.criterion == "force"
               else _scores(model, graph, target, scoring, config.criterion, config))
        images = heldout if config.search_on == "heldout" else scoring
        original = list(target_responses(model, graph, target, images,
                                         batch_size=max(config.batch_size, 256)))
        search = find_keep(model, target, scoring, heldout=heldout, goal=config.goal,
                           criterion=config.criterion, search_on=config.search_on,
                           batch_size=config.batch_size, seed=config.seed, graph=graph,
                           scores=own, original=original)
        circuit = search.circuit
        circuit.metadata["model"] = model_name
        comparison = _comparison(model, graph, target, scoring, images, original,
                                 search.keep, config, own)
        folder = unit_folder(layer, unit)
        files: dict[str, bytes] = {
            f"{folder}/featureviz.png": png_bytes(viz.picture(i), min_size=96),
            f"{folder}/examples.png": _examples_png(patches[i]),
        }
        with tempfile.TemporaryDirectory(prefix="netcarve-atlas-") as tmp:
            circuit.save(Path(tmp) / "circuit.safetensors")
            files[f"{folder}/circuit.safetensors"] = (Path(tmp) / "circuit.safetensors"
                                                      ).read_bytes()
            if config.diagrams:
                written = write_diagram(circuit, model, tmp, "html", graph=graph,
                                        images=heldout[:256], preset=preset,
                                        model_name=model_name, top_k=config.diagram_pictures,
                                        title=f"{target}: circuit at keep {search.keep:.3g}")
                files[f"{folder}/diagram.html"] = written["html"].read_bytes()
        pres = circuit.preservation
        scoring_pres = circuit.preservation_scoring
        row = {
            "layer": layer, "unit": int(unit), "target": str(target),
            "criterion": config.criterion, "goal": float(config.goal),
            "search_on": config.search_on, "reached": bool(search.reached),
            "keep": float(search.keep), "effective_keep": float(circuit.effective_keep),
            "kept_kernels": int(circuit.kept_kernels),
            "relevant_kernels": int(circuit.relevant_kernels),
            "pearson": _r(pres.pearson) if pres is not None else None,
            "pearson_scoring": (_r(scoring_pres.pearson) if scoring_pres is not None
                                else None),
            "collapsed": bool(circuit.collapsed), "evaluations": int(search.evaluations),
            "curve": [{"keep": float(p["keep"]), "kept_kernels": int(p["kept_kernels"]),
                       "effective_keep": float(p["effective_keep"]), "pearson": p["pearson"],
                       "reached": bool(p["reached"])} for p in search.curve],
            "per_layer": circuit.per_layer(),
            "comparison": comparison,
            "featureviz_activation": float(viz.activations[i]),
            "top_images": [int(v) for v in ex.indices[i]],
            "top_values": [float(v) for v in ex.values[i]],
            "seconds": float(time.perf_counter() - t0 + shared),
        }
        results.append(UnitResult(row=row, files=files))
    return results


def check_units(graph: ModelGraph, layer: str, units: list[int]) -> None:
    """Raise a clear error for a unit outside ``layer``'s channels (before any work starts)."""
    channels = graph.layer(layer).out_channels
    bad = [u for u in units if not 0 <= u < channels]
    if bad:
        raise CircuitError(f"units {bad} are out of range for {layer}: it has channels "
                           f"0..{channels - 1}")
