"""The atlas driver: fan units out to Ray workers, write the store, resume, build the pages.

The model and the images go to Ray's object store once (``ray.put``); every task gets the
references, maps a small batch of units of one layer (:func:`netcarve.atlas.unit.map_units`)
and returns rows and file bytes. The driver alone writes (:class:`AtlasStore`), as results
arrive, so a task that dies (its worker killed, its machine gone) loses only itself: Ray
runs it again (``max_retries``) and its rows replace nothing but themselves. A layer's
class-wise CAR is one task of its own.

``workers=0`` maps every unit in this process without Ray (small atlases, debugging).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from netcarve.atlas.pages import write_pages
from netcarve.atlas.store import AtlasError, AtlasStore
from netcarve.atlas.unit import AtlasConfig, check_units, map_units
from netcarve.car.scores import car_scores
from netcarve.core.graph import ModelGraph
from netcarve.data.preset import Preset

__all__ = ["AtlasRun", "class_rows", "run_atlas", "select_units"]


@dataclass
class AtlasRun:
    """What one :func:`run_atlas` call did.

    Attributes:
        out: the atlas folder.
        layers: ``{layer: units asked for}``.
        mapped: units mapped by this run.
        skipped: units already in the store (a resumed run).
        failed: ``[{"layer", "unit", "error"}]`` units whose task raised (not in the store;
            a re-run tries them again).
        classes: layers whose class-wise CAR this run computed.
        workers: Ray workers (0: in this process).
        seconds: wall time.
        unit_seconds: the mapped units' own compute times (the per-unit cost).
    """

    out: Path
    layers: dict[str, list[int]]
    mapped: int = 0
    skipped: int = 0
    failed: list[dict[str, Any]] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    workers: int = 0
    seconds: float = 0.0
    unit_seconds: list[float] = field(default_factory=list)

    @property
    def units_per_minute(self) -> float:
        """Units mapped per minute of wall time by this run."""
        return 60.0 * self.mapped / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        n = len(self.unit_seconds)
        return {"out": str(self.out), "layers": {k: len(v) for k, v in self.layers.items()},
                "mapped": self.mapped, "skipped": self.skipped, "failed": self.failed,
                "classes": self.classes, "workers": self.workers,
                "seconds": round(self.seconds, 3),
                "units_per_minute": round(self.units_per_minute, 3),
                "mean_unit_seconds": round(sum(self.unit_seconds) / n, 3) if n else None}


def select_units(channels: int, units: str | int | Sequence[int], seed: int = 0) -> list[int]:
    """The units of a layer with ``channels`` channels that ``units`` names.

    Args:
        channels: the layer's output channels.
        units: ``"all"``; a count ``N`` (an int or ``"16"``: N units drawn at random, seeded,
            returned sorted); or a list of channels (``[0, 5]``, ``"0,5"``, or ``"5,"`` for
            channel 5 alone).
        seed: seeds the draw.

    Returns:
        sorted channel indices.

    Raises:
        AtlasError: a count outside 1..channels or a channel out of range.

    Example:
        >>> select_units(8, "all")
        [0, 1, 2, 3, 4, 5, 6, 7]
        >>> select_units(8, "0,3")
        [0, 3]
    """
    if isinstance(units, str):
        text = units.strip()
        if text == "all":
            return list(range(channels))
        try:
            units = int(text) if "," not in text else [int(u) for u in text.split(",") if u]
        except ValueError:
            raise AtlasError(f"--units must be 'all', a count or comma-separated channels, "
                             f"got {units!r}") from None
    if isinstance(units, int):
        if not 1 <= units <= channels:
            raise AtlasError(f"--units {units}: a layer with {channels} channels has 1.."
                             f"{channels} units to draw (for the single channel {units}, "
                             f"write '{units},')")
        return sorted(random.Random(seed).sample(range(channels), units))
    chosen = sorted({int(u) for u in units})
    bad = [u for u in chosen if not 0 <= u < channels]
    if bad:
        raise AtlasError(f"units {bad} are out of range: the layer has channels "
                         f"0..{channels - 1}")
    return chosen


def class_rows(model: nn.Module, layer: str, images: torch.Tensor, labels: torch.Tensor,
               preset: Preset | None, k: int, batch_size: int = 100) -> dict[str, Any]:
    """Class-wise CAR of every filter of ``layer``: the rows of the ``classes`` table.

    Returns:
        ``{"rows": [...], "class_names": [...]}``.
    """
    report = car_scores(model, images, labels, [layer], preset=preset, batch_size=batch_size)
    lc = report.layers[layer]
    cw = report.classwise(layer)
    most, least = cw.most_important(k), cw.least_important(k)
    rows = [{"layer": layer, "unit": int(f), "car": float(lc.car[i]),
             "loss_car": float(lc.loss_car[i]), "most_important": most[f],
             "least_important": least[f],
             "class_car": [float(v) for v in lc.class_car[i]]}
            for i, f in enumerate(lc.filters)]
    return {"rows": rows, "class_names": list(cw.class_names)}


def _unit_job(model: nn.Module, data: dict[str, Any], layer: str, units: list[int],
              config: AtlasConfig, device: str, threads: int) -> list[dict[str, Any]]:
    """One task: map ``units`` (runs in a Ray worker or in the driver)."""
    if threads:
        torch.set_num_threads(threads)
    model = model.to(device).eval()
    results = map_units(model, layer, units, data["scoring"].to(device),
                        data["heldout"].to(device), config, preset=data["preset"],
                        model_name=data["model_name"])
    return [{"row": r.row, "files": r.files} for r in results]


def _class_job(model: nn.Module, data: dict[str, Any], layer: str, k: int, device: str,
               threads: int) -> dict[str, Any]:
    """One task: the class-wise CAR of ``layer``."""
    if threads:
        torch.set_num_threads(threads)
    model = model.to(device).eval()
    return class_rows(model, layer, data["car_images"].to(device), data["car_labels"],
                      data["preset"], k)


def _check_meta(store: AtlasStore, meta: dict[str, Any]) -> dict[str, Any]:
    """The folder's settings must be this run's (a resumed atlas stays one atlas)."""
    old = store.read_meta()
    if old is None:
        return meta
    for key in ("model", "config", "data"):
        if old.get(key) != meta[key]:
            diff = meta[key] if not isinstance(meta[key], dict) else {
                k: (old.get(key, {}).get(k), v) for k, v in meta[key].items()
                if old.get(key, {}).get(k) != v}
            raise AtlasError(f"{store.root} holds an atlas made with other {key} settings "
                             f"(was -> now: {diff}); use another --out, or delete the folder "
                             "to start again")
    layers = list(old.get("layers", []))
    layers += [name for name in meta["layers"] if name not in layers]
    return {**old, "layers": layers, "class_names": meta.get("class_names")
            or old.get("class_names")}


def run_atlas(
    model: nn.Module,
    layers: str | Sequence[str],
    out: str | Path,
    scoring: torch.Tensor,
    heldout: torch.Tensor,
    *,
    units: str | int | Sequence[int] = "all",
    config: AtlasConfig | None = None,
    car_images: torch.Tensor | None = None,
    car_labels: torch.Tensor | None = None,
    preset: Preset | None = None,
    model_name: str = "model",
    workers: int = 2,
    address: str | None = None,
    task_units: int = 4,
    retries: int = 3,
    device: str = "cpu",
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> AtlasRun:
    """Map every chosen unit of ``layers`` into the atlas folder ``out`` (resuming it).

    Args:
        model: a CNN (it comes back exactly as it was: tasks work on copies).
        layers: conv layers, ``"a,b"`` or a list.
        out: the atlas folder (created; an existing atlas there is resumed).
        scoring: normalised scoring images.
        heldout: normalised held-out images.
        units: ``"all"``, a count per layer (seeded draw) or a list of channels.
        config: the mapping settings (:class:`AtlasConfig`).
        car_images, car_labels: labelled images for each layer's class-wise CAR (classifiers;
            omitted: no classes).
        preset: the model's preset (display, class names).
        model_name: recorded in ``atlas.json`` and the circuit files.
        workers: local Ray workers (0: no Ray, everything in this process).
        address: join a running Ray cluster (``"auto"`` or ``"HOST:PORT"``) instead of
            starting a local one.
        task_units: units per task (one layer each).
        retries: how often Ray re-runs a task whose worker died.
        device: where tasks run the model.
        progress: show a progress bar (units done / planned, with an ETA).
        log: a callable for one-line messages.

    Returns:
        an :class:`AtlasRun`.

    Raises:
        AtlasError: the folder holds an atlas with other settings; bad ``units``.
        GraphError: unknown layer (close names listed).
        KeyboardInterrupt: interrupted (the store keeps every finished unit; run again to
            resume).

    Example:
        >>> run = run_atlas(lm.model, "features.11", "out/atlas", s, h, units=16,
        ...                 workers=2)  # doctest: +SKIP
        >>> run.mapped, run.skipped  # doctest: +SKIP
        (16, 0)
    """
    config = config or AtlasConfig()
    say = log or (lambda _m: None)
    start = time.perf_counter()
    names = [s.strip() for s in layers.split(",") if s.strip()] if isinstance(layers, str) \
        else list(layers)
    if not names:
        raise AtlasError("no layer given: --layers features.11 (comma-separated)")
    if task_units < 1:
        raise AtlasError(f"task_units must be >= 1, got {task_units}")
    if workers < 0:
        raise AtlasError(f"workers must be >= 0, got {workers}")
    model_device = next(model.parameters()).device
    graph = ModelGraph.build(model, scoring[:1].to(model_device))
    chosen: dict[str, list[int]] = {}
    for name in names:
        info = graph.layer(name)
        if info.kind != "conv":
            raise AtlasError(f"{name} is a {info.kind} layer; the atlas maps conv units")
        chosen[name] = select_units(info.out_channels, units, config.seed)
        check_units(graph, name, chosen[name])
    store = AtlasStore(out)
    with_classes = car_images is not None and car_labels is not None
    meta = _check_meta(store, {
        "model": model_name, "config": config.to_dict(), "layers": names,
        "data": {"scoring": len(scoring), "heldout": len(heldout),
                 "car_images": len(car_images) if with_classes else 0,
                 "input_shape": list(scoring.shape[1:])},
        "class_names": None})
    store.root.mkdir(parents=True, exist_ok=True)
    store.clean_partial()
    store.write_meta(meta)
    run = AtlasRun(out=Path(out), layers=chosen, workers=workers)
    todo = []
    for name, us in chosen.items():
        done = store.done_units(name)
        run.skipped += sum(u in done for u in us)
        left = [u for u in us if u not in done]
        todo += [(name, left[i:i + task_units]) for i in range(0, len(left), task_units)]
    class_layers = [n for n in chosen if with_classes and not store.has_classes(n)]
    planned = sum(len(us) for _, us in todo)
    say(f"atlas: {planned} units to map in {len(todo)} tasks ({run.skipped} already in "
        f"{out}), {len(class_layers)} class-wise CAR tasks, "
        + ("in this process" if workers == 0 and address is None else
           f"on the Ray cluster at {address}" if address else f"{workers} local Ray workers"))
    data = {"scoring": scoring.cpu(), "heldout": heldout.cpu(), "preset": preset,
            "model_name": model_name,
            "car_images": car_images.cpu() if with_classes else None,
            "car_labels": car_labels.cpu() if with_classes else None}
    # Tasks get a CPU copy; the caller's model object is never moved or touched.
    import copy

    cpu_model = copy.deepcopy(model).cpu().eval()
    bar = _progress(planned, progress)

    def on_units(results: list[dict[str, Any]]) -> None:
        for r in results:
            store.write_unit(r["row"], r["files"])
            run.mapped += 1
            run.unit_seconds.append(float(r["row"]["seconds"]))
        if bar is not None:
            bar.update(len(results))

    def on_classes(layer: str, result: dict[str, Any]) -> None:
        store.write_classes(layer, result["rows"])
        run.classes.append(layer)
        m = store.read_meta() or meta
        store.write_meta({**m, "class_names": result["class_names"]})

    def on_failure(layer: str, us: list[int], error: BaseException) -> None:
        message = _error_line(error)
        for u in us:
            run.failed.append({"layer": layer, "unit": u, "error": message})
        say(f"atlas: {layer} units {us} failed: {message}")
        if bar is not None:
            bar.update(len(us))

    try:
        if not todo and not class_layers:
            pass  # everything is in the store already: no cluster to start
        elif workers == 0 and address is None:
            for layer in class_layers:
                on_classes(layer, _class_job(cpu_model, data, layer, config.classes, device, 0))
            for layer, us in todo:
                try:
                    on_units(_unit_job(cpu_model, data, layer, us, config, device, 0))
                except Exception as exc:
                    on_failure(layer, us, exc)
        else:
            _run_on_ray(cpu_model, data, todo, class_layers, config, device, workers, address,
                        retries, on_units, on_classes, on_failure)
    finally:
        if bar is not None:
            bar.close()
        write_pages(store)
        run.seconds = time.perf_counter() - start
    return run


def _error_line(error: BaseException) -> str:
    cause = getattr(error, "cause", None)  # a RayTaskError carries the task's own exception
    err = cause if isinstance(cause, BaseException) else error
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def _progress(total: int, show: bool) -> Any:
    if not show or total == 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="atlas units", unit="unit", dynamic_ncols=True)


def _run_on_ray(model: nn.Module, data: dict[str, Any], todo: list[tuple[str, list[int]]],
                class_layers: list[str], config: AtlasConfig, device: str, workers: int,
                address: str | None, retries: int, on_units: Callable[..., None],
                on_classes: Callable[..., None], on_failure: Callable[..., None]) -> None:
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is in the atlas extra
        raise AtlasError("the atlas runs on Ray: pip install 'netcarve[atlas]' (or --workers "
                         "0 to map in this process)") from None
    started = not ray.is_initialized()
    if started:
        if address is None:
            # "local" always starts a fresh cluster of `workers` CPUs, never a stranger's.
            ray.init(address="local", num_cpus=max(1, workers), include_dashboard=False,
                     log_to_driver=False, logging_level="ERROR")
        else:
            ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    gpus = 1.0 / max(1, workers) if device.startswith("cuda") else 0
    unit_task = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=retries)(_unit_job)
    class_task = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=retries)(_class_job)
    pending: dict[Any, tuple[str, str, list[int]]] = {}
    try:
        model_ref, data_ref = ray.put(model), ray.put(data)
        for layer in class_layers:
            ref = class_task.remote(model_ref, data_ref, layer, config.classes, device, 1)
            pending[ref] = ("classes", layer, [])
        for layer, us in todo:
            ref = unit_task.remote(model_ref, data_ref, layer, us, config, device, 1)
            pending[ref] = ("units", layer, us)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            kind, layer, us = pending.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except Exception as exc:
                if kind == "classes":
                    raise AtlasError(f"class-wise CAR of {layer} failed: "
                                     f"{_error_line(exc)}") from None
                on_failure(layer, us, exc)
                continue
            if kind == "classes":
                on_classes(layer, result)
            else:
                on_units(result)
    finally:
        if started:
            # Our own local cluster: shutting it down stops every task. Force-cancelling tasks
            # first races with tasks that are just finishing and can abort the driver inside
            # Ray's core worker ("Tried to complete task that was not pending").
            ray.shutdown()
        else:
            for ref in pending:  # a joined cluster outlives us: ask its workers to stop
                ray.cancel(ref)
