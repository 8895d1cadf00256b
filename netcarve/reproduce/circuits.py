"""``netcarve reproduce circuits``: compare saliency criteria for feature-preserving circuits.

The circuits paper scores every kernel upstream of a unit with a criterion, keeps the top
fraction and measures how well the sparse circuit preserves the unit's response. It reports
the median |Pearson r| over 60 AlexNet units (20 each in conv3-5) on ImageNet. This experiment
runs the same comparison on the bundled Fashion-MNIST models:

* models ``fmnist_vgg`` and ``fmnist_resnet``; units drawn at random (seeded) from every conv
  layer except the stem, as evenly as the layers allow, at least ``units`` per model (the
  stem is left out: on a one-channel image its units have a single relevant kernel, so every
  keep fraction keeps it and preservation is trivially 1);
* criteria ``actgrad``, ``snip``, ``force`` (10 steps), ``magnitude`` and ``random``;
* keep fractions from 0.9 down to 0.001;
* scoring images drawn from the train split, preservation measured on held-out test images
  (the paper measured on the scoring images);
* per criterion and keep: median and quartiles of held-out preservation (a collapsed circuit
  counts as 0), the total-collapse fraction, and the effective keep (kernels kept after the
  effective-mask clean-up ÷ relevant kernels).

Work is spread over worker processes (one torch thread each) by chunks of units; the rows do
not depend on how the work was split.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from netcarve.core._csv import write_rows
from netcarve.reproduce.report import (
    Logger,
    Report,
    ReproduceError,
    pyplot,
    quiet,
    run_context,
    save_figure,
    start_report,
)

__all__ = ["REFERENCE", "CircuitsSettings", "run_circuits", "statistics"]

REFERENCE: dict[str, dict[float, float]] = {
    "actgrad": {0.5: 0.925, 0.2: 0.729, 0.1: 0.518, 0.05: 0.350, 0.01: 0.080},
    "snip": {0.5: 0.877, 0.2: 0.571, 0.1: 0.393, 0.05: 0.304, 0.01: 0.057},
    "force": {0.5: 0.879, 0.2: 0.622, 0.1: 0.472, 0.05: 0.364, 0.01: 0.272},
    "magnitude": {0.5: 0.822, 0.2: 0.425, 0.1: 0.243, 0.05: 0.166, 0.01: 0.000},
}
"""The circuits paper's table: median |Pearson r| of the masked AlexNet (ImageNet, 60 units
in conv3-5, measured on the scoring images), by criterion and keep."""


@dataclass(frozen=True)
class CircuitsSettings:
    """What the circuits experiment runs.

    Attributes:
        models: bundled model names.
        units: at least this many units per model, spread over its conv layers after the stem.
        criteria: criterion names.
        keeps: keep fractions (of the relevant kernels).
        scoring_images: train images the criteria score on.
        heldout_images: test images preservation is measured on.
        batch_size: images per scoring batch.
        workers: worker processes (1 = run in this process).
        chunk: units per work item sent to a worker.
    """

    models: tuple[str, ...] = ("fmnist_vgg", "fmnist_resnet")
    units: int = 60
    criteria: tuple[str, ...] = ("actgrad", "snip", "force", "magnitude", "random")
    keeps: tuple[float, ...] = (0.9, 0.5, 0.2, 0.1, 0.05, 0.01, 0.005, 0.001)
    scoring_images: int = 64
    heldout_images: int = 128
    batch_size: int = 64
    workers: int = 2
    chunk: int = 4

    @classmethod
    def quick(cls) -> CircuitsSettings:
        """Smoke-test settings: 2 units per model, 3 keep fractions, few images, in-process."""
        return cls(units=2, keeps=(0.5, 0.1, 0.01), scoring_images=24, heldout_images=32,
                   workers=1)

    def check(self) -> None:
        """Raise :class:`ReproduceError` for settings that cannot run."""
        from netcarve.criteria import get_criterion
        from netcarve.zoo import ZOO

        if not self.models:
            raise ReproduceError("give at least one model")
        for name in self.models:
            if name not in ZOO:
                raise ReproduceError(f"unknown model {name!r}; bundled: {', '.join(ZOO)}")
        for crit in self.criteria:
            get_criterion(crit)
        if not self.criteria or not self.keeps:
            raise ReproduceError("give at least one criterion and one keep fraction")
        for k in self.keeps:
            if not 0 < k <= 1:
                raise ReproduceError(f"keep fractions must lie in (0, 1], got {k}")
        if min(self.units, self.scoring_images, self.heldout_images, self.batch_size,
               self.workers, self.chunk) < 1:
            raise ReproduceError("units, image counts, batch size, workers and chunk must be "
                                 "at least 1")


# --------------------------------------------------------------------------- work


_CACHE: dict[tuple[str, int, int, int], Any] = {}


def _prepared(model: str, scoring: int, heldout: int, seed: int) -> Any:
    """Model, graph and images of one model, cached per process (a worker serves several
    chunks)."""
    key = (model, scoring, heldout, seed)
    if key not in _CACHE:
        from netcarve.core.graph import ModelGraph
        from netcarve.training.evaluation import analysis_data
        from netcarve.zoo import load_model

        lm = load_model(model)
        x_score, x_held = analysis_data(lm.preset, scoring, heldout, seed=seed)
        graph = ModelGraph.build(lm.model, x_score[:1])
        _CACHE[key] = (lm, graph, x_score, x_held)
    return _CACHE[key]


def plan_units(model: str, units: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """The conv layers after the stem and at least ``units`` targets spread over them.

    Returns:
        ``(layers, targets)``: targets as ``"layer:channel"`` strings, layer by layer.

    Raises:
        ReproduceError: the model has fewer than two conv layers.

    Example:
        >>> layers, targets = plan_units("fmnist_vgg", 60)
        >>> len(layers), len(targets)
        (4, 60)
    """
    from netcarve.circuits.sweep import pick_units
    from netcarve.core.graph import ModelGraph
    from netcarve.zoo import load_model

    lm = load_model(model)
    example = torch.zeros(1, lm.preset.channels, lm.preset.size, lm.preset.size)
    graph = ModelGraph.build(lm.model, example)
    convs = [n for n, info in graph.layers.items() if info.kind == "conv"]
    layers = convs[1:]
    if not layers:
        raise ReproduceError(f"{model} has no conv layer after its stem")
    per_layer = math.ceil(units / len(layers))
    targets = [str(t) for t in pick_units(graph, layers, per_layer, seed=seed)]
    return layers, targets


def _sweep_chunk(model: str, targets: list[str], settings: dict[str, Any], seed: int,
                 threads: int | None) -> list[dict[str, Any]]:
    """Sweep a chunk of units of one model (runs in a worker process or in this one)."""
    from netcarve.circuits.sweep import sweep

    if threads is not None:
        torch.set_num_threads(threads)
    lm, graph, x_score, x_held = _prepared(model, settings["scoring_images"],
                                           settings["heldout_images"], seed)
    res = sweep(lm.model, targets, x_score, x_held, criteria=settings["criteria"],
                keeps=settings["keeps"], batch_size=settings["batch_size"], seed=seed,
                graph=graph)
    return [{"model": model, **row} for row in res.rows]


def _run_sweeps(settings: CircuitsSettings, plans: dict[str, list[str]], seed: int,
                log: Logger) -> list[dict[str, Any]]:
    """Every model's units through :func:`netcarve.circuits.sweep.sweep`, chunk by chunk."""
    jobs = [(model, targets[i:i + settings.chunk]) for model, targets in plans.items()
            for i in range(0, len(targets), settings.chunk)]
    conf = asdict(settings)
    rows: list[dict[str, Any]] = []
    done = 0
    total = sum(len(t) for t in plans.values())
    start = time.perf_counter()
    if settings.workers == 1:
        for model, chunk in jobs:
            rows += _sweep_chunk(model, chunk, conf, seed, None)
            done += len(chunk)
            log(f"{done}/{total} units swept ({time.perf_counter() - start:.0f} s)")
        return rows
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(settings.workers, len(jobs)),
                             mp_context=ctx) as pool:
        futures = [pool.submit(_sweep_chunk, model, chunk, conf, seed, 1)
                   for model, chunk in jobs]
        for fut, (_, chunk) in zip(futures, jobs, strict=True):
            rows += fut.result()
            done += len(chunk)
            log(f"{done}/{total} units swept ({time.perf_counter() - start:.0f} s)")
    return rows


# --------------------------------------------------------------------------- statistics


def _quantile(values: list[float], q: float) -> float:
    return float(torch.quantile(torch.tensor(values, dtype=torch.float64), q))


def _r(row: dict[str, Any]) -> float:
    """Held-out preservation of a row; a collapsed circuit or constant response counts as 0."""
    value = row["pearson"]
    if row["collapsed"] or value is None or (isinstance(value, float) and math.isnan(value)):
        return 0.0
    return float(value)


def statistics(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per model, criterion and keep: median and quartiles of held-out preservation, the
    median |r|, the total-collapse fraction and the median and mean effective keep.

    Args:
        rows: sweep rows with a ``model`` column.

    Returns:
        one dict per (model, criterion, keep), in the rows' order.

    Example:
        >>> statistics([{"model": "m", "criterion": "c", "keep": 0.5, "pearson": 0.9,
        ...              "collapsed": False, "effective_keep": 0.4}])[0]["median"]
        0.9
    """
    groups: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["criterion"], row["keep"]), []).append(row)
    out = []
    for (model, crit, keep), group in groups.items():
        rs = [_r(r) for r in group]
        eff = [float(r["effective_keep"]) for r in group]
        out.append({
            "model": model, "criterion": crit, "keep": keep, "units": len(group),
            "median": _quantile(rs, 0.5), "q1": _quantile(rs, 0.25), "q3": _quantile(rs, 0.75),
            "median_abs": _quantile([abs(v) for v in rs], 0.5),
            "collapse_fraction": sum(bool(r["collapsed"]) for r in group) / len(group),
            "effective_keep_median": _quantile(eff, 0.5),
            "effective_keep_mean": sum(eff) / len(eff),
        })
    return out


def _lookup(stats: list[dict[str, Any]]) -> dict[tuple[str, str, float], dict[str, Any]]:
    return {(s["model"], s["criterion"], s["keep"]): s for s in stats}


def _best(stats: list[dict[str, Any]], model: str, keep: float) -> str:
    """The criteria with the highest median at one keep (``"none"`` when every median is 0)."""
    cands = [s for s in stats if s["model"] == model and s["keep"] == keep]
    top = max(s["median"] for s in cands)
    if top <= 0:
        return "none (every median is 0)"
    return ", ".join(s["criterion"] for s in cands if s["median"] == top)


# --------------------------------------------------------------------------- figures


def _plot(stats: list[dict[str, Any]], settings: CircuitsSettings, path: Path) -> Path:
    """One panel for the paper's table and one per model: median preservation vs keep."""
    plt = pyplot()
    panels = ["paper (AlexNet / ImageNet)", *settings.models]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.9), sharey=True,
                             squeeze=False)
    colours = dict(zip(settings.criteria, plt.rcParams["axes.prop_cycle"].by_key()["color"],
                       strict=False))
    for ax, panel in zip(axes[0], panels, strict=True):
        for crit in settings.criteria:
            colour = colours.get(crit)
            if panel.startswith("paper"):
                ref = REFERENCE.get(crit)
                if not ref:
                    continue
                ks = sorted(ref)
                ax.plot(ks, [ref[k] for k in ks], marker="s", color=colour, label=crit)
                continue
            pts = sorted((s["keep"], s["median"], s["q1"], s["q3"]) for s in stats
                         if s["model"] == panel and s["criterion"] == crit)
            if not pts:
                continue
            ks, med, q1, q3 = (list(v) for v in zip(*pts, strict=True))
            ax.plot(ks, med, marker="o", color=colour, label=crit)
            ax.fill_between(ks, q1, q3, color=colour, alpha=0.15)
        ax.set_xscale("log")
        ax.set_xlabel("keep (fraction of relevant kernels)")
        ax.set_title(panel, fontsize=10)
        ax.set_ylim(-0.05, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("median preservation (Pearson r)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


# --------------------------------------------------------------------------- report


def _describe_units(plans: dict[str, list[str]]) -> list[str]:
    lines = []
    for model, targets in plans.items():
        per_layer: dict[str, int] = {}
        for t in targets:
            per_layer[t.rsplit(":", 1)[0]] = per_layer.get(t.rsplit(":", 1)[0], 0) + 1
        lines.append(f"{model}: {len(targets)} units — " + ", ".join(
            f"{layer} {n}" for layer, n in per_layer.items()))
    return lines


def _write_report(rep: Report, settings: CircuitsSettings, plans: dict[str, list[str]],
                  stats: list[dict[str, Any]], seconds: dict[str, float]) -> None:
    look = _lookup(stats)
    crits = list(settings.criteria)
    keeps = sorted(settings.keeps, reverse=True)
    rep.p("Feature-preserving circuits: every kernel upstream of a unit is scored by a "
          "saliency criterion, the top `keep` fraction of the relevant kernels is kept "
          "(exact global top-k), kernels on no input → unit path are dropped (effective "
          "mask), and the circuit's response is compared with the original unit's.")
    rep.h2("Setting")
    rep.bullets([
        "**Theirs** (SPEC, circuits paper): AlexNet on ImageNet, 60 units (20 each in "
        "conv3–5), median |Pearson r| of the masked model, measured on the scoring images.",
        "**Ours**: the bundled Fashion-MNIST models (28×28 greyscale, 10 classes), units drawn "
        f"at random (seed) from every conv layer after the stem; {settings.scoring_images} "
        f"scoring images from the train split, preservation (Pearson r over images × "
        f"positions) on {settings.heldout_images} held-out test images; a collapsed circuit "
        "(no input → unit path left) counts as r = 0.",
        *_describe_units(plans),
        f"Criteria: {', '.join(crits)} (FORCE: 10 steps on an exponential schedule, re-run "
        f"for every keep); keep fractions: {', '.join(f'{k:g}' for k in keeps)}.",
        "Effective keep = kernels kept after the effective-mask clean-up ÷ relevant kernels "
        "(lower than keep when top-k picks kernels that lie on no path).",
    ])
    rep.h2("Side by side with the paper")
    rep.p("Median preservation per criterion; each cell is *paper / "
          + " / ".join(settings.models) + "*. The paper's numbers are |r| on the scoring "
          "images for AlexNet/ImageNet; ours are r on held-out Fashion-MNIST images, so they "
          "compare trends, not values.")
    ref_keeps = [k for k in keeps if any(k in v for v in REFERENCE.values())]
    rows = []
    for k in ref_keeps:
        cells: list[Any] = [f"{k:g}"]
        for crit in crits:
            parts = [f"{REFERENCE[crit][k]:.3f}" if crit in REFERENCE else "—"]
            parts += [f"{look[(m, crit, k)]['median']:.3f}" if (m, crit, k) in look else "—"
                      for m in settings.models]
            cells.append(" / ".join(parts))
        rows.append(cells)
    if rows:
        rep.table(["keep", *crits], rows)
    rep.image("comparison.png", "median preservation vs keep: paper and ours")
    findings = []
    for m in settings.models:
        best = [f"{k:g}: {_best(stats, m, k)}" for k in keeps]
        findings.append(f"{m} — best median per keep: " + "; ".join(best))
    rep.p("The paper finds actgrad best at moderate keep, FORCE best at extreme keep and "
          "magnitude worst. Measured here:")
    rep.bullets(findings)
    for m in settings.models:
        rep.h2(f"{m}")
        rep.p(f"{len(plans[m])} units; {seconds.get(m, 0.0):.0f} s of scoring and measuring "
              f"(summed over workers). All rows: `{m}_sweep.csv`.")
        rep.h3("Held-out preservation: median [first quartile, third quartile]")
        rep.table(["keep", *crits], [
            [f"{k:g}", *[f"{look[(m, c, k)]['median']:.3f} [{look[(m, c, k)]['q1']:.2f}, "
                         f"{look[(m, c, k)]['q3']:.2f}]" for c in crits]] for k in keeps])
        rep.h3("Total-collapse fraction")
        rep.table(["keep", *crits], [[f"{k:g}", *[look[(m, c, k)]["collapse_fraction"]
                                                  for c in crits]] for k in keeps], digits=2)
        rep.h3("Effective keep (median over units)")
        rep.table(["keep", *crits], [[f"{k:g}", *[f"{look[(m, c, k)]['effective_keep_median']:.3g}"
                                                  for c in crits]] for k in keeps])
    rep.h2("Files")
    rep.bullets(["`comparison.png`: the paper's curves next to ours (median, quartile bands)",
                 "`statistics.csv`: every statistic above, one row per model × criterion × keep",
                 *[f"`{m}_sweep.csv`: one row per unit × criterion × keep" for m in
                   settings.models]])


def run_circuits(
    out_dir: str | Path,
    *,
    quick: bool = False,
    seed: int = 0,
    threads: int | None = 1,
    command: str | None = None,
    settings: CircuitsSettings | None = None,
    log: Logger | None = None,
) -> dict[str, Any]:
    """Run the criteria comparison and write its report into ``out_dir``.

    Args:
        out_dir: output folder (created).
        quick: smoke-test settings (:meth:`CircuitsSettings.quick`).
        seed: seeds the unit draw, the image draw and the random criterion.
        threads: torch threads in this process (workers always use one).
        command: the command line recorded in the report (default: the equivalent
            ``netcarve reproduce`` command).
        settings: override the settings entirely (``quick`` is then ignored).
        log: progress messages.

    Returns:
        the summary written to ``summary.json`` (``report``, ``statistics``, ``units``, ...).

    Raises:
        ReproduceError: bad settings or output folder.

    Example:
        >>> run_circuits("out/reproduce/circuits", quick=True)  # doctest: +SKIP
    """
    settings = settings or (CircuitsSettings.quick() if quick else CircuitsSettings())
    settings.check()
    log = log or quiet()
    out, rep = start_report(
        "circuits", "Reproduce: criteria for feature-preserving circuits",
        out_dir, quick=quick, seed=seed, threads=threads, command=command)
    with run_context(seed, threads):
        plans = {m: plan_units(m, settings.units, seed)[1] for m in settings.models}
        log(f"{sum(len(t) for t in plans.values())} units, {len(settings.criteria)} criteria, "
            f"{len(settings.keeps)} keep fractions, {settings.workers} worker(s)")
        rows = _run_sweeps(settings, plans, seed, log)
    stats = statistics(rows)
    seconds = {m: sum(r["seconds"] for r in rows if r["model"] == m) for m in settings.models}
    cols = ["model", "unit", "layer", "channel", "criterion", "keep", "relevant_kernels",
            "kept_kernels", "effective_keep", "collapsed", "pearson", "nmad",
            "per_image_median", "seconds"]
    for m in settings.models:
        write_rows(out / f"{m}_sweep.csv", [r for r in rows if r["model"] == m], cols)
    write_rows(out / "statistics.csv", stats)
    _plot(stats, settings, out / "comparison.png")
    _write_report(rep, settings, plans, stats, seconds)
    summary = {"settings": asdict(settings), "units": {m: len(t) for m, t in plans.items()},
               "statistics": stats, "reference": {c: {str(k): v for k, v in ks.items()}
                                                  for c, ks in REFERENCE.items()}}
    path = rep.write(out, summary)
    return {"report": str(path), **summary}

