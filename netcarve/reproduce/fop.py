"""``netcarve reproduce fop``: functionality-oriented vs magnitude pruning, and defection.

On ``fmnist_vgg``:

1. **Functional pruning** of the conv layers after the first: each filter is described by its
   activation profile over probe images and its class-preference vector; filters are clustered
   by the cosine similarity of their layer-relative descriptors (agglomerative, at a
   threshold), and only the filter with the largest weight L1 norm survives in every cluster.
2. **Magnitude pruning** (weight L1) removes the same number of filters from every layer, so
   both pruned networks have identical parameters and multiply-adds.
3. Each mask set twice: with the **least-squares fold** (:mod:`netcarve.surgery.fold`: the layers
   fed by the pruned ones are refitted on the kept channels by ridge least squares over the probe
   images, which are train images, never the evaluation images) and with the papers' plain
   drop -- four physically smaller networks at identical multiply-adds (:data:`METHODS`).
   Top-1 accuracy of each before fine-tuning and after fine-tuning with every
   (learning rate, epochs) setting (same seed and data for all).
4. **Functionality defection**: every surviving filter's descriptors before vs after each
   fine-tuning (cosine similarity, raw and layer-relative), and after fine-tuning vs the same
   filter in the unpruned network.

The paper reports up to 68.88% of the FLOPs removed for under 0.34% accuracy drop.
:func:`fop_vs_magnitude` and the Markdown helpers are reusable on their own
(``bench/quality_fop.py`` calls them); :func:`run_fop` writes the report.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from netcarve.reproduce.report import (
    Logger,
    Report,
    ReproduceError,
    quiet,
    run_context,
    start_report,
)

__all__ = [
    "PAPER_FOP",
    "FopSettings",
    "accuracy_markdown",
    "defection_markdown",
    "fop_vs_magnitude",
    "per_layer_markdown",
    "run_fop",
]

PAPER_FOP = {"flops_removed": 0.6888, "accuracy_drop": 0.0034}
"""Functionality-oriented pruning paper: FLOPs removed and the accuracy drop at that point."""

METHODS: tuple[str, ...] = ("functional+fold", "functional", "magnitude+fold", "magnitude")
"""The four pruned networks, all at the same multiply-adds: functional or magnitude masks,
with the least-squares fold (:mod:`netcarve.surgery.fold`) or the papers' drop."""
_FOLDS = {"functional+fold": "lstsq", "magnitude+fold": "lstsq"}


@dataclass(frozen=True)
class FopSettings:
    """What the functionality-oriented pruning experiment runs.

    Attributes:
        model: bundled model name.
        layers: conv layers pruned.
        thresholds: similarity thresholds of the clustering, one pruned network each.
        probe_images: random train images the descriptors are measured on.
        eval_images: first test images for accuracy.
        finetune_images: train images per fine-tuning epoch.
        settings: ``(learning rate, epochs)`` fine-tuning settings for the first threshold.
        other_settings: the settings for the other thresholds (fewer, to save time).
        defection_probe: probe images for the defection descriptors (at most
            ``probe_images``).
        ridge: relative ridge penalty of the least-squares fold (fitted on the probe images).
    """

    model: str = "fmnist_vgg"
    layers: tuple[str, ...] = ("features.4", "features.7", "features.11", "features.14")
    thresholds: tuple[float, ...] = (0.8, 0.7)
    probe_images: int = 1000
    eval_images: int = 5000
    finetune_images: int = 5000
    settings: tuple[tuple[float, int], ...] = ((0.01, 1), (0.01, 2), (0.001, 1), (0.001, 2))
    other_settings: tuple[tuple[float, int], ...] = ((0.01, 2),)
    defection_probe: int = 256
    ridge: float = 1e-2

    @classmethod
    def quick(cls) -> FopSettings:
        """Smoke-test settings: two layers, one threshold, one short fine-tuning."""
        return cls(layers=("features.4", "features.7"), thresholds=(0.8,), probe_images=200,
                   eval_images=500, finetune_images=256, settings=((0.01, 1),),
                   defection_probe=64)

    def check(self) -> None:
        """Raise :class:`ReproduceError` for settings that cannot run."""
        from netcarve.zoo import ZOO

        if self.model not in ZOO:
            raise ReproduceError(f"unknown model {self.model!r}; bundled: {', '.join(ZOO)}")
        if not self.layers or not self.thresholds:
            raise ReproduceError("give at least one layer and one threshold")
        for t in self.thresholds:
            if not -1 <= t <= 1:
                raise ReproduceError(f"a cosine threshold lies in [-1, 1], got {t}")
        if not self.settings:
            raise ReproduceError("give at least one fine-tuning setting")
        for lr, ep in (*self.settings, *self.other_settings):
            if not (lr > 0 and math.isfinite(lr)) or int(ep) < 1:
                raise ReproduceError(f"bad fine-tuning setting lr={lr}, epochs={ep}")
        if min(self.probe_images, self.eval_images, self.finetune_images,
               self.defection_probe) < 2:
            raise ReproduceError("image counts must be at least 2")


def fop_vs_magnitude(settings: FopSettings, threshold: float, *, seed: int = 0,
                     finetune: tuple[tuple[float, int], ...] | None = None,
                     log: Logger | None = None) -> dict[str, Any]:
    """Functional vs magnitude pruning at identical multiply-adds, with defection.

    Args:
        settings: the experiment settings.
        threshold: the clustering's cosine-similarity threshold.
        seed: seeds the data draw, clustering and fine-tuning.
        finetune: ``(lr, epochs)`` settings (default: ``settings.settings``).
        log: progress messages.

    Returns:
        ``{"threshold", "pruning" (FunctionalPruning), "comparison" (PruningComparison),
        "defection" (DefectionReport), "counts", "seconds", ...}``.

    Example:
        >>> res = fop_vs_magnitude(FopSettings.quick(), 0.8)  # doctest: +SKIP
    """
    from netcarve.function.defection import defection
    from netcarve.function.pruning import compare_pruning, functional_prune, magnitude_masks
    from netcarve.training.evaluation import reference_data
    from netcarve.zoo import load_model

    settings.check()
    log = log or quiet()
    grid = tuple(finetune or settings.settings)
    start = time.perf_counter()
    lm = load_model(settings.model)
    train_x, train_y = reference_data(lm.preset, "train")
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(train_x), generator=gen)
    train_x, train_y = train_x[perm], train_y[perm]
    probe_x, probe_y = train_x[:settings.probe_images], train_y[:settings.probe_images]
    test_x, test_y = reference_data(lm.preset, "test", limit=settings.eval_images)
    t0 = time.perf_counter()
    fop = functional_prune(lm.model, list(settings.layers), probe_x, probe_y,
                           preset=lm.preset, threshold=threshold, seed=seed)
    t_fop = time.perf_counter() - t0
    counts = fop.removed_counts()
    log(f"threshold {threshold:g}: functional pruning removes {sum(counts.values())} filters "
        f"({t_fop:.0f} s)")
    functional, magnitude = fop.masks(), magnitude_masks(lm.model, counts)
    masks = {m: functional if m.startswith("functional") else magnitude for m in METHODS}
    folds = dict(_FOLDS)
    cmp = compare_pruning(lm.model, masks, preset=lm.preset, eval_images=test_x,
                          eval_labels=test_y, finetune_epochs=0, seed=seed, fold=folds,
                          fold_images=probe_x, ridge=settings.ridge)
    t0 = time.perf_counter()
    n_def = min(settings.defection_probe, settings.probe_images)
    report = defection(lm.model, masks, probe_x[:n_def], preset=lm.preset,
                       settings=grid, train_images=train_x, train_labels=train_y,
                       max_train_images=settings.finetune_images, eval_images=test_x,
                       eval_labels=test_y, seed=seed, fold=folds, fold_images=probe_x,
                       ridge=settings.ridge)
    t_def = time.perf_counter() - t0
    log(f"threshold {threshold:g}: {len(grid)} fine-tuning setting(s) × {len(masks)} methods "
        f"({t_def:.0f} s)")
    return {"threshold": threshold, "model": settings.model, "layers": list(settings.layers),
            "pruning": fop, "comparison": cmp, "defection": report, "counts": counts,
            "grid": list(grid), "n_eval": len(test_y), "n_probe": len(probe_y),
            "finetune_images": settings.finetune_images, "seconds_pruning": t_fop,
            "seconds_defection": t_def, "seconds": time.perf_counter() - start}


def _rows(res: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["method"]: r for r in res["comparison"].rows}


def headline(res: dict[str, Any]) -> dict[str, Any]:
    """MACs and parameters removed, accuracy before and after fine-tuning per method, and the
    accuracy drop of the best fine-tuned network of each method."""
    rows = _rows(res)
    f = rows[METHODS[0]]
    runs = res["defection"].runs
    out: dict[str, Any] = {"threshold": res["threshold"], "filters_removed": res["counts"],
                           "macs_removed": f["macs_removed"],
                           "params_removed": f["params_removed"],
                           "accuracy_unpruned": f["accuracy_original"]}
    for method in METHODS:
        after = {f"lr {r['lr']:g}, {r['epochs']} ep": r["accuracy_after"] for r in runs
                 if r["method"] == method}
        best = max(after.values())
        out[method] = {"before_finetuning": rows[method]["accuracy_pruned"],
                       "after_finetuning": after, "best_after": best,
                       "drop_best": f["accuracy_original"] - best}
    return out


def accuracy_markdown(res: dict[str, Any]) -> str:
    """Accuracy of the pruned networks before and after every fine-tuning, as Markdown."""
    rows = _rows(res)
    runs = {(r["method"], r["lr"], r["epochs"]): r for r in res["defection"].runs}
    lines = ["| accuracy (top-1) | " + " | ".join(METHODS) + " |",
             "|---|" + "---|" * len(METHODS),
             "| unpruned | " + " | ".join(f"{rows[m]['accuracy_original']:.2%}"
                                         for m in METHODS) + " |",
             "| before fine-tuning | " + " | ".join(f"{rows[m]['accuracy_pruned']:.2%}"
                                                   for m in METHODS) + " |"]
    for lr, ep in res["grid"]:
        lines.append(f"| after fine-tuning, lr {lr:g}, {ep} epoch(s) of "
                     f"{res['finetune_images']:,} images | "
                     + " | ".join(f"{runs[(m, lr, ep)]['accuracy_after']:.2%}"
                                  for m in METHODS) + " |")
    return "\n".join(lines)


def _pooled(res: dict[str, Any]) -> dict[tuple[Any, ...], list[dict[str, Any]]]:
    pooled: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in res["defection"].rows:
        pooled.setdefault((r["descriptor"], r["lr"], r["epochs"], r["method"]), []).append(r)
    return pooled


def _mean(rows: list[dict[str, Any]], field: str) -> float:
    vals = [r[field] for r in rows if math.isfinite(r[field])]
    return sum(vals) / len(vals) if vals else math.nan


def defection_markdown(res: dict[str, Any]) -> str:
    """Mean descriptor drift of the survivors, all pruned layers pooled, as Markdown: per
    method, before→after fine-tuning (raw / layer-relative cosine) and after vs unpruned."""
    pooled = _pooled(res)
    lines = ["| descriptor | setting | " + " | ".join(
        f"{m}: before→after (raw / relative) | {m}: vs unpruned" for m in METHODS) + " |",
        "|---|---|" + "---|---|" * len(METHODS)]
    for kind in ("class_preference", "profile"):
        for lr, ep in res["grid"]:
            cells = []
            for method in METHODS:
                rows = pooled.get((kind, lr, ep, method), [])
                cells.append(f"{_mean(rows, 'cosine'):.3f} / "
                             f"{_mean(rows, 'cosine_relative'):.3f}")
                cells.append(f"{_mean(rows, 'cosine_vs_original'):.3f}")
            lines.append(f"| {kind} | lr {lr:g}, {ep} ep | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_layer_markdown(res: dict[str, Any]) -> str:
    """Per layer: mean (min) layer-relative class-preference cosine, first setting."""
    lr0, ep0 = res["grid"][0]
    lines = ["| layer | " + " | ".join(METHODS) + " |", "|---|" + "---|" * len(METHODS)]
    for layer in res["layers"]:
        cells = []
        for method in METHODS:
            vals = [r["cosine_relative"] for r in res["defection"].rows if r["layer"] == layer
                    and r["method"] == method and r["descriptor"] == "class_preference"
                    and (r["lr"], r["epochs"]) == (lr0, ep0)
                    and math.isfinite(r["cosine_relative"])]
            cells.append(f"{sum(vals) / len(vals):.3f} (min {min(vals):.3f})" if vals else "—")
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_fop(
    out_dir: str | Path,
    *,
    quick: bool = False,
    seed: int = 0,
    threads: int | None = 1,
    command: str | None = None,
    settings: FopSettings | None = None,
    log: Logger | None = None,
) -> dict[str, Any]:
    """Run the functional-vs-magnitude comparison for every threshold and write the report.

    Args:
        out_dir: output folder (created).
        quick: smoke-test settings (:meth:`FopSettings.quick`).
        seed: seeds the data draw, clustering and fine-tuning.
        threads: torch threads.
        command: the command line recorded in the report.
        settings: override the settings entirely (``quick`` is then ignored).
        log: progress messages.

    Returns:
        the summary written to ``summary.json`` (``report``, ``headline`` per threshold).

    Example:
        >>> run_fop("out/reproduce/fop", quick=True)  # doctest: +SKIP
    """
    settings = settings or (FopSettings.quick() if quick else FopSettings())
    settings.check()
    log = log or quiet()
    out, rep = start_report(
        "fop", "Reproduce: functionality-oriented pruning and functionality defection",
        out_dir, quick=quick, seed=seed, threads=threads, command=command)
    results = []
    with run_context(seed, threads):
        for i, threshold in enumerate(settings.thresholds):
            grid = settings.settings if i == 0 else (settings.other_settings or
                                                     settings.settings)
            res = fop_vs_magnitude(settings, threshold, seed=seed, finetune=grid, log=log)
            sub = out / f"threshold_{threshold:g}"
            res["pruning"].save(sub)
            res["comparison"].save_csv(sub / "comparison.csv")
            res["defection"].save_csv(sub / "defection.csv")
            res["defection"].plot(sub / "defection.png")
            results.append(res)
    heads = [headline(r) for r in results]
    _write_report(rep, settings, results, heads)
    summary = {"settings": asdict(settings), "headline": heads,
               "defection_summary": {f"{r['threshold']:g}": r["defection"].summary()
                                     for r in results}}
    path = rep.write(out, summary)
    return {"report": str(path), **summary}


def _write_report(rep: Report, settings: FopSettings, results: list[dict[str, Any]],
                  heads: list[dict[str, Any]]) -> None:
    rep.p("Functionality-oriented pruning removes filters that repeat another filter's "
          "function, whatever their weight magnitude; magnitude pruning removes the same "
          "number of filters per layer by smallest weight L1 norm, so the networks have "
          "the same parameters and multiply-adds. Each mask set is applied twice: '+fold' "
          "refits the layers fed by the pruned ones on the kept channels by ridge least "
          "squares over the probe images (a removed filter's contribution re-expressed "
          "through the kept ones), the plain variant drops the removed filters' "
          "contributions as the paper does.")
    rep.h2("Setting")
    rep.bullets([
        f"Model {settings.model}; pruned layers {', '.join(settings.layers)}.",
        f"Descriptors: activation profile and class preference on {settings.probe_images:,} "
        "random train images; similarity = cosine of the layer-relative descriptors; "
        "agglomerative clustering (average linkage) at the threshold; the filter with the "
        "largest weight L1 norm stays in every cluster.",
        f"Fold: ridge least squares (relative penalty {settings.ridge:g}) of every layer fed "
        f"by a pruned layer, on the same {settings.probe_images:,} probe images, layer by "
        "layer in execution order; the target is the unpruned layer's raw output.",
        f"Accuracy on the first {settings.eval_images:,} test images. Fine-tuning: "
        f"{settings.finetune_images:,} train images per epoch, SGD + Nesterov, cosine "
        "schedule, flips and shifts, same seed and data for every network.",
        "Defection: descriptors of every surviving filter on "
        f"{min(settings.defection_probe, settings.probe_images)} "
        "probe images, before vs after fine-tuning (cosine; raw and z-scored over the "
        "layer's survivors) and after fine-tuning vs the unpruned network.",
        f"Paper: up to {PAPER_FOP['flops_removed']:.2%} of the FLOPs removed for under "
        f"{PAPER_FOP['accuracy_drop']:.2%} accuracy drop.",
    ])
    rep.h2("Headline: multiply-adds removed and accuracy drop")
    rows = []
    for h in heads:
        for method in METHODS:
            rows.append([f"{h['threshold']:g}", method, f"{h['macs_removed']:.1%}",
                         f"{h['params_removed']:.1%}", f"{h['accuracy_unpruned']:.2%}",
                         f"{h[method]['before_finetuning']:.2%}",
                         f"{h[method]['best_after']:.2%}",
                         f"{100 * h[method]['drop_best']:.2f} points"])
    rows.append(["paper", "functional", f"{PAPER_FOP['flops_removed']:.2%}", "—", "—", "—",
                 "—", f"< {100 * PAPER_FOP['accuracy_drop']:.2f} points"])
    rep.table(["threshold", "method", "MACs removed", "parameters removed", "unpruned",
               "before fine-tuning", "best after fine-tuning", "drop (unpruned − best)"], rows)
    for res, h in zip(results, heads, strict=True):
        t = f"{res['threshold']:g}"
        rep.h2(f"Threshold {t}")
        cmp = _rows(res)[METHODS[0]]
        rep.p("Filters removed: " + ", ".join(
            f"{layer} {n}/{res['pruning'].layers[layer].keep.numel()}"
            for layer, n in res["counts"].items())
            + f" ({sum(res['counts'].values())} in all). Both networks: multiply-adds "
            f"{cmp['macs_before']:,} → {cmp['macs_after']:,} (−{h['macs_removed']:.1%}), "
            f"parameters {cmp['params_before']:,} → {cmp['params_after']:,} "
            f"(−{h['params_removed']:.1%}). Functional pruning took "
            f"{res['seconds_pruning']:.0f} s, fine-tuning and defection "
            f"{res['seconds_defection']:.0f} s.")
        rep.h3("Accuracy")
        rep.body += [accuracy_markdown(res), ""]
        rep.h3("Functionality defection (mean cosine over all survivors)")
        rep.body += [defection_markdown(res), ""]
        rep.h3("Per layer: class preference, layer-relative cosine before→after "
               f"(lr {res['grid'][0][0]:g}, {res['grid'][0][1]} epoch(s))")
        rep.body += [per_layer_markdown(res), ""]
        rep.image(f"threshold_{t}/defection.png", "descriptor drift")
        rep.p(f"Files in `threshold_{t}/`: `comparison.csv`, `defection.csv`, "
              "`defection.png`, `clusters.json`, `clusters.csv`, one `clusters_<layer>.png` "
              "per layer.")
