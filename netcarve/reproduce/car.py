"""``netcarve reproduce car``: CAR pruning vs baselines, and colour vs shape.

Two experiments from the CAR papers, on the bundled models:

1. **CAR vs baselines** (``fmnist_vgg``). Half of the filters of the first conv
   (``features.0``, 16 of 32) and, separately, of the second (``features.4``, 32 of 64) are
   pruned by greedy CAR (scored on random train images) and by each baseline (random, weight L1,
   mean activation, APoZ, Taylor; data-driven ones scored on the same images). Every pruned
   network is evaluated on the same test images with the same removal semantics (the filter's
   output is 0 after its BatchNorm), giving accuracy-vs-filters-pruned curves; at 50% each
   method's physically pruned model is fine-tuned with the same recipe and seed and evaluated
   again. The paper: pruning half the filters of AlexNet layer 1 or 2 kept 26% / 20% more
   accuracy than the best benchmark scheme.
2. **Colour vs shape** (``shapes_clutter_cnn``: cluttered, occluded, low-contrast shapes whose
   class is the shape only, a narrower network short of saturation; and the control
   ``shapes_colour_cnn``: the same network on the same kind of images, labelled by the shape's
   hue). A colour-selectivity index for each first-layer filter (weight index: share of the
   kernel's energy off the luminance axis; response index: how much its response changes when
   the image turns grey), and the colour-selective fraction among the first 20 filters pruned
   by greedy CAR vs the kept ones (also for one-shot CAR and L1), with hypergeometric and
   permutation p-values. The paper: of AlexNet's top-20 CAR-pruned filters, 17 (layer 1) and
   14 (layer 2) were colour-selective.

:func:`car_vs_baselines` and :func:`colour_vs_shape` are reusable on their own
(``bench/quality_car.py`` calls them); :func:`run_car` runs both and writes the report.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from netcarve.core._csv import write_rows
from netcarve.reproduce.report import (
    Logger,
    Report,
    ReproduceError,
    draw,
    pyplot,
    quiet,
    run_context,
    save_figure,
    start_report,
)

__all__ = [
    "PAPER_COLOUR",
    "PAPER_GAIN",
    "CarSettings",
    "car_vs_baselines",
    "colour_markdown",
    "colour_vs_shape",
    "half_table",
    "half_table_markdown",
    "run_car",
]

PAPER_GAIN = {"layer 1": 0.26, "layer 2": 0.20}
"""CAR paper (AlexNet): accuracy kept at 50% pruning, relative to the best benchmark."""

PAPER_COLOUR = {"layer 1": (17, 20), "layer 2": (14, 20)}
"""CAR paper (AlexNet): colour-selective filters among the top-20 CAR-pruned."""


@dataclass(frozen=True)
class CarSettings:
    """What the CAR experiment runs.

    Attributes:
        model: the model of the curves.
        layers: the layers pruned (each on its own).
        ratio: fraction of each layer's filters pruned at the end of the curve.
        points: curve points from 0 to ``ratio`` (evenly spaced counts).
        scoring_images: random train images CAR and the data-driven baselines score on.
        eval_images: first test images every pruned network is evaluated on.
        greedy_mode: ``"exact"`` greedy CAR or ``"lazy"``.
        finetune_epochs: epochs of fine-tuning at ``ratio`` (0: none).
        finetune_images: train images per fine-tuning epoch.
        lr: fine-tuning learning rate.
        colour_model / colour_layer: the colour-vs-shape model and layer.
        colour_control_model: the control whose label is the colour (None: no control).
        colour_scoring_images: random train images of the colour model for CAR.
        colour_permutations: random relabellings for the permutation p-values.
        colour_images: test images for the response colour index.
        colour_k: first-pruned filters looked at.
        colour_threshold: a filter is colour-selective when its index exceeds this.
        batch_size: images per forward pass.
    """

    model: str = "fmnist_vgg"
    layers: tuple[str, ...] = ("features.0", "features.4")
    ratio: float = 0.5
    points: int = 5
    scoring_images: int = 250
    eval_images: int = 5000
    greedy_mode: str = "exact"
    finetune_epochs: int = 1
    finetune_images: int = 5000
    lr: float = 0.01
    colour_model: str = "shapes_clutter_cnn"
    colour_control_model: str | None = "shapes_colour_cnn"
    colour_layer: str = "features.0"
    colour_scoring_images: int = 2000
    colour_images: int = 500
    colour_permutations: int = 10_000
    colour_k: int = 20
    colour_threshold: float = 0.5
    batch_size: int = 100

    @classmethod
    def quick(cls) -> CarSettings:
        """Smoke-test settings: lazy greedy CAR on few images, short fine-tuning."""
        return cls(points=3, scoring_images=48, eval_images=300, greedy_mode="lazy",
                   finetune_images=128, colour_scoring_images=48, colour_images=64,
                   colour_permutations=1000)

    def check(self) -> None:
        """Raise :class:`ReproduceError` for settings that cannot run."""
        from netcarve.zoo import ZOO

        for name in (self.model, self.colour_model, self.colour_control_model):
            if name is not None and name not in ZOO:
                raise ReproduceError(f"unknown model {name!r}; bundled: {', '.join(ZOO)}")
        if not self.layers:
            raise ReproduceError("give at least one layer")
        if not 0 < self.ratio < 1:
            raise ReproduceError(f"ratio must lie in (0, 1), got {self.ratio}")
        if self.greedy_mode not in ("exact", "lazy"):
            raise ReproduceError(f"greedy_mode must be 'exact' or 'lazy', got "
                                 f"{self.greedy_mode!r}")
        if min(self.points, self.scoring_images, self.eval_images, self.colour_k,
               self.colour_scoring_images, self.colour_images, self.batch_size) < 1:
            raise ReproduceError("points, image counts, colour_k and batch_size must be at "
                                 "least 1")
        if self.points < 2:
            raise ReproduceError("a curve needs at least 2 points")
        if self.finetune_epochs < 0 or (self.finetune_epochs and self.finetune_images < 1):
            raise ReproduceError("finetune_epochs must be >= 0, with finetune_images >= 1")
        if not self.lr > 0:
            raise ReproduceError(f"lr must be positive, got {self.lr}")


def _counts(target: int, points: int) -> list[int]:
    return sorted({round(target * i / (points - 1)) for i in range(points)})


# --------------------------------------------------------------------------- experiment 1


def car_vs_baselines(settings: CarSettings, seed: int = 0,
                     log: Logger | None = None) -> dict[str, Any]:
    """Accuracy vs filters pruned for CAR and every baseline, before and after fine-tuning.

    Args:
        settings: the experiment settings (model, layers, ratio, data sizes, fine-tuning).
        seed: seeds the scoring-image draw, the random baseline and fine-tuning.
        log: progress messages.

    Returns:
        ``{"curves": CurveReport, "greedy": {layer: {...}}, "table": half_table rows, ...}``.

    Raises:
        ReproduceError: bad settings. AblationError / CompressError: from pruning.

    Example:
        >>> res = car_vs_baselines(CarSettings.quick())  # doctest: +SKIP
        >>> res["table"][0]["car"]  # doctest: +SKIP
    """
    from netcarve.car.baselines import CurveReport, compare_methods
    from netcarve.car.greedy import greedy_prune
    from netcarve.training.evaluation import reference_data
    from netcarve.zoo import load_model

    settings.check()
    log = log or quiet()
    lm = load_model(settings.model)
    xs, ys = draw(lm.preset, "train", settings.scoring_images, seed)
    xe, ye = reference_data(lm.preset, "test", settings.eval_images)
    ft_x, ft_y = draw(lm.preset, "train", settings.finetune_images, seed + 1) \
        if settings.finetune_epochs else (None, None)
    report = CurveReport()
    greedy: dict[str, dict[str, Any]] = {}
    for layer in settings.layers:
        n = lm.model.get_submodule(layer).out_channels
        target = max(1, min(n - 1, round(settings.ratio * n)))
        start = time.perf_counter()

        done = [0]

        def step(_: Any, layer: str = layer, target: int = target, done: list = done) -> None:
            done[0] += 1
            if done[0] % 4 == 0 or done[0] == target:
                log(f"greedy CAR {layer}: {done[0]}/{target} filters removed")

        g = greedy_prune(lm.model, xs, ys, layer, amount=target, mode=settings.greedy_mode,
                         preset=lm.preset, batch_size=settings.batch_size, progress=step)
        greedy[layer] = {"filters": n, "pruned": target, "seconds": time.perf_counter() - start,
                         "order": g.removed(layer), "evaluations": g.evaluations,
                         "scoring_accuracy_before": g.base_accuracy,
                         "scoring_accuracy_after": g.steps[-1].accuracy}
        compare_methods(lm.model, layer, score_images=xs, score_labels=ys, eval_images=xe,
                        eval_labels=ye, counts=_counts(target, settings.points),
                        car_order=g.removed(layer), preset=lm.preset,
                        batch_size=settings.batch_size, seed=seed,
                        finetune_epochs=settings.finetune_epochs,
                        finetune_at=[target] if settings.finetune_epochs else [],
                        lr=settings.lr, finetune_images=ft_x, finetune_labels=ft_y,
                        report=report)
        log(f"curves for {layer} done ({time.perf_counter() - start:.0f} s)")
    return {"model": settings.model, "curves": report, "greedy": greedy,
            "table": half_table(report, greedy), "n_scoring": len(ys), "n_eval": len(ye)}


def half_table(curves: Any, greedy: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Accuracy of every method at the end of the curve (``ratio`` pruned), per layer and
    before / after fine-tuning, with CAR's margin over the best baseline.

    Returns:
        one dict per (layer, finetuned): ``layer, pruned, filters, finetuned, unpruned,
        <method>: accuracy ..., best_baseline, best_baseline_accuracy, gain_points,
        gain_relative``.
    """
    from netcarve.car.baselines import BASELINES

    rows = []
    for layer, info in greedy.items():
        base = curves.table(layer, 0, False)
        unpruned = next(iter(base.values())) if base else math.nan
        for tuned in (False, True):
            acc = curves.table(layer, info["pruned"], tuned)
            if not acc:
                continue
            baselines = {m: acc[m] for m in BASELINES if m in acc}
            best = max(baselines, key=lambda m: (baselines[m], m)) if baselines else None
            best_acc = baselines[best] if best else math.nan
            car = acc.get("car", math.nan)
            rows.append({"layer": layer, "pruned": info["pruned"], "filters": info["filters"],
                         "finetuned": tuned, "unpruned": unpruned, **acc,
                         "best_baseline": best, "best_baseline_accuracy": best_acc,
                         "gain_points": car - best_acc,
                         "gain_relative": (car - best_acc) / best_acc if best_acc else math.nan})
    return rows


def half_table_markdown(rows: list[dict[str, Any]], finetuned: bool) -> str:
    """The table of :func:`half_table` as Markdown (one row per layer)."""
    from netcarve.car.baselines import BASELINES

    methods = ["car", *BASELINES]
    lines = ["| layer | pruned | unpruned | " + " | ".join(methods)
             + " | CAR − best baseline | relative |",
             "|---|---|---|" + "---|" * len(methods) + "---|---|"]
    for r in rows:
        if r["finetuned"] != finetuned:
            continue
        cells = " | ".join(f"{r[m]:.4f}" if m in r else "—" for m in methods)
        lines.append(f"| {r['layer']} | {r['pruned']}/{r['filters']} | {r['unpruned']:.4f} | "
                     f"{cells} | {r['gain_points']:+.4f} ({r['best_baseline']}) | "
                     f"{r['gain_relative']:+.1%} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- experiment 2


def colour_vs_shape(settings: CarSettings, seed: int = 0,
                    log: Logger | None = None, model: str | None = None) -> dict[str, Any]:
    """Colour-selective fraction among the first CAR-pruned filters vs the kept ones.

    Args:
        settings: the experiment settings (colour model, layer, data sizes, k, threshold).
        seed: seeds the scoring-image draw and the permutations.
        log: progress messages.
        model: the model (default ``settings.colour_model``; the control passes its own).

    Returns:
        ``{"rows": [...], "orders": {...}, "weight_index": [...], "response_index": [...],
        "test_accuracy", "grey_accuracy", ...}``; one row per (order, index): the output of
        :func:`netcarve.car.colour.colour_vs_pruning` plus ``model`` and ``order``;
        ``grey_accuracy`` is the accuracy on the same test images turned grey.

    Example:
        >>> res = colour_vs_shape(CarSettings.quick())  # doctest: +SKIP
    """
    from netcarve.car.baselines import baseline_order, baseline_scores
    from netcarve.car.colour import colour_selectivity, colour_vs_pruning, grey_images
    from netcarve.car.greedy import greedy_prune
    from netcarve.car.scores import car_scores
    from netcarve.training.evaluation import evaluate, reference_data
    from netcarve.zoo import load_model

    settings.check()
    log = log or quiet()
    name = model or settings.colour_model
    lm = load_model(name)
    layer = settings.colour_layer
    n = lm.model.get_submodule(layer).out_channels
    if settings.colour_k >= n:
        raise ReproduceError(f"colour_k must be below the {n} filters of {layer}")
    xs, ys = draw(lm.preset, "train", settings.colour_scoring_images, seed)
    xc, yc = reference_data(lm.preset, "test", settings.colour_images)
    # one report computes both indices; the second view only changes which one decides
    weight_rep = colour_selectivity(lm.model, layer, preset=lm.preset, images=xc, by="weight",
                                    threshold=settings.colour_threshold)
    reps = {"weight": weight_rep, "response": replace(weight_rep, by="response")}
    start = time.perf_counter()
    g = greedy_prune(lm.model, xs, ys, layer, amount=settings.colour_k,
                     mode=settings.greedy_mode, preset=lm.preset,
                     batch_size=settings.batch_size)
    greedy_s = time.perf_counter() - start
    log(f"greedy CAR on {name} {layer}: {greedy_s:.0f} s")
    one = car_scores(lm.model, xs, ys, layer, preset=lm.preset,
                     batch_size=settings.batch_size).layers[layer]
    orders = {"greedy CAR": g.removed(layer), "one-shot CAR": one.ranking(),
              "L1": baseline_order(baseline_scores(lm.model, layer, "l1"))}
    rows = [{"model": name, "order": label,
             **colour_vs_pruning(rep, order, settings.colour_k,
                                 permutations=settings.colour_permutations, seed=seed)}
            for label, order in orders.items() for rep in reps.values()]
    corr = torch.corrcoef(torch.stack([reps["weight"].index, reps["response"].index,
                                       one.car, one.loss_car]))
    acc = evaluate(lm.model, xc, yc, lm.preset, progress=False).accuracy
    grey = evaluate(lm.model, grey_images(xc), yc, lm.preset, progress=False).accuracy
    return {"model": name, "layer": layer, "filters": n, "rows": rows,
            "test_accuracy": acc, "grey_accuracy": grey,
            "orders": orders, "k": settings.colour_k, "greedy_seconds": greedy_s,
            "scoring_accuracy": g.base_accuracy, "n_scoring": len(ys),
            "n_colour_images": len(xc), "zero_car_filters": int((one.car == 0).sum()),
            "corr_weight_index_vs_loss_car": float(corr[0, 3]),
            "corr_response_index_vs_loss_car": float(corr[1, 3]),
            "reports": reps,
            "weight_index": [float(v) for v in reps["weight"].index],
            "response_index": [float(v) for v in reps["response"].index]}


def colour_markdown(res: dict[str, Any]) -> str:
    """The colour-vs-pruning rows of :func:`colour_vs_shape` as a Markdown table."""
    lines = ["| order | index (threshold) | colour-selective among first pruned | among kept | "
             "all filters | p hypergeometric (≥) | p permutation: more / fewer colour "
             "filters pruned | mean index first pruned / kept | p permutation on the mean: "
             "higher / lower |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(
            f"| {r['order']} | {r['by']} (> {r['threshold']:g}) | {r['pruned_colour']}/{r['k']} "
            f"= {r['pruned_fraction']:.2f} | {r['kept_colour']}/{r['kept']} = "
            f"{r['kept_fraction']:.2f} | {r['all_fraction']:.2f} | {r['p_value']:.3f} | "
            f"{r['p_perm_more']:.4f} / {r['p_perm_less']:.4f} | "
            f"{r['pruned_mean_index']:.3f} / {r['kept_mean_index']:.3f} | "
            f"{r['p_index_more']:.4f} / {r['p_index_less']:.4f} |")
    return "\n".join(lines)


def _plot_colour(res: dict[str, Any], path: Path) -> Path:
    """Both colour indices of every filter, in greedy CAR order; the first k shaded."""
    plt = pyplot()
    order = res["orders"]["greedy CAR"]
    rest = [f for f in range(res["filters"]) if f not in set(order)]
    seq = [*order, *rest]
    fig, ax = plt.subplots(figsize=(8.0, 3.4))
    xs = list(range(len(seq)))
    ax.bar([x - 0.2 for x in xs], [res["weight_index"][f] for f in seq], width=0.4,
           label="weight index")
    ax.bar([x + 0.2 for x in xs], [res["response_index"][f] for f in seq], width=0.4,
           label="response index")
    ax.axvspan(-0.5, res["k"] - 0.5, color="grey", alpha=0.15,
               label=f"first {res['k']} pruned by greedy CAR")
    threshold = res["rows"][0]["threshold"]
    ax.axhline(threshold, color="k", linewidth=0.8, linestyle="--", label="threshold")
    ax.set_xlabel("filters: greedy CAR order, then the kept ones by index")
    ax.set_ylabel("colour-selectivity index")
    ax.set_title(f"{res['model']} {res['layer']}", fontsize=10)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


# --------------------------------------------------------------------------- run


def run_car(
    out_dir: str | Path,
    *,
    quick: bool = False,
    seed: int = 0,
    threads: int | None = 1,
    command: str | None = None,
    settings: CarSettings | None = None,
    log: Logger | None = None,
) -> dict[str, Any]:
    """Run both CAR experiments and write their report into ``out_dir``.

    Args:
        out_dir: output folder (created).
        quick: smoke-test settings (:meth:`CarSettings.quick`).
        seed: seeds image draws, the random baseline and fine-tuning.
        threads: torch threads.
        command: the command line recorded in the report.
        settings: override the settings entirely (``quick`` is then ignored).
        log: progress messages.

    Returns:
        the summary written to ``summary.json`` (``report``, ``half_table``, ``colour``, ...).

    Example:
        >>> run_car("out/reproduce/car", quick=True)  # doctest: +SKIP
    """
    settings = settings or (CarSettings.quick() if quick else CarSettings())
    settings.check()
    log = log or quiet()
    out, rep = start_report(
        "car", "Reproduce: CAR pruning vs baselines, and colour vs shape",
        out_dir, quick=quick, seed=seed, threads=threads, command=command)
    with run_context(seed, threads):
        curves = car_vs_baselines(settings, seed, log)
        colour = colour_vs_shape(settings, seed, log)
        control = (colour_vs_shape(settings, seed, log, model=settings.colour_control_model)
                   if settings.colour_control_model else None)
    curves["curves"].save(out / "curves")
    write_rows(out / "half_table.csv", curves["table"])
    write_rows(out / "greedy_order.csv", [
        {"layer": layer, "step": i + 1, "filter": f}
        for layer, info in curves["greedy"].items() for i, f in enumerate(info["order"])])
    colour["reports"]["weight"].save(out / "colour_index.csv")
    write_rows(out / "colour_vs_pruning.csv",
               colour["rows"] + (control["rows"] if control else []))
    _plot_colour(colour, out / "colour.png")
    if control:
        control["reports"]["weight"].save(out / "colour_index_control.csv")
        _plot_colour(control, out / "colour_control.png")
    _write_report(rep, settings, curves, colour, control)
    summary = {
        "settings": asdict(settings),
        "half_table": curves["table"],
        "greedy": {k: {kk: vv for kk, vv in v.items() if kk != "order"}
                   for k, v in curves["greedy"].items()},
        "colour": {k: v for k, v in colour.items() if k not in ("reports",)},
        "colour_control": (None if control is None else
                           {k: v for k, v in control.items() if k not in ("reports",)}),
    }
    path = rep.write(out, summary)
    return {"report": str(path), **summary}


def _write_report(rep: Report, settings: CarSettings, curves: dict[str, Any],
                  colour: dict[str, Any], control: dict[str, Any] | None) -> None:
    from netcarve.car.baselines import BASELINES

    rep.p("CAR (classification accuracy reduction): a filter's importance is the drop in "
          "top-1 accuracy when it is removed (ties broken by the loss); greedy CAR removes the "
          "lowest-CAR filter, re-scores the rest, and repeats. Removal = the filter's output is "
          "0 after its BatchNorm, for every method.")
    rep.h2(f"1. CAR vs baselines on {curves['model']}")
    pct = f"{settings.ratio:.0%}"
    rep.bullets([
        f"Layers {', '.join(settings.layers)}, each pruned on its own to {pct} of its filters "
        f"by {settings.greedy_mode} greedy CAR and by the baselines {', '.join(BASELINES)}.",
        f"CAR and the data-driven baselines score on {curves['n_scoring']} random train "
        f"images; every curve point is top-1 accuracy on the first {curves['n_eval']:,} test "
        "images.",
        (f"Fine-tuning at {pct}: each method's physically pruned model, "
         f"{settings.finetune_epochs} epoch(s) of {settings.finetune_images:,} random train "
         f"images, SGD + Nesterov, lr {settings.lr:g} cosine-annealed, same seed for all."
         if settings.finetune_epochs else "No fine-tuning."),
        "Paper (AlexNet / ImageNet, no retraining): at 50% pruning CAR kept 26% (layer 1) and "
        "20% (layer 2) more accuracy than the best benchmark scheme.",
    ])
    rep.h3(f"{pct} of the filters pruned, no fine-tuning (top-1)")
    rep.body += [half_table_markdown(curves["table"], False), ""]
    if any(r["finetuned"] for r in curves["table"]):
        rep.h3(f"{pct} of the filters pruned, after fine-tuning (top-1)")
        rep.body += [half_table_markdown(curves["table"], True), ""]
    paper = list(PAPER_GAIN.values())
    lines = []
    for i, r in enumerate(r for r in curves["table"] if not r["finetuned"]):
        ref = f"paper {paper[i]:+.0%}" if i < len(paper) else "no paper figure"
        lines.append(f"{r['layer']} (layer {i + 1}): CAR {r['car']:.4f} vs best baseline "
                     f"{r['best_baseline']} {r['best_baseline_accuracy']:.4f}: "
                     f"{r['gain_relative']:+.1%} relative ({ref})")
    rep.p("CAR's margin over the best baseline at 50%, before fine-tuning:")
    rep.bullets(lines)
    rep.image("curves/curves.png", "accuracy vs filters pruned")
    greedy_lines = [f"{layer}: {info['pruned']} of {info['filters']} filters in "
                    f"{info['seconds']:.0f} s ({info['evaluations']:,} candidate evaluations); "
                    f"scoring-image accuracy {info['scoring_accuracy_before']:.4f} → "
                    f"{info['scoring_accuracy_after']:.4f}"
                    for layer, info in curves["greedy"].items()]
    rep.p("Greedy CAR:")
    rep.bullets(greedy_lines)
    rep.h2(f"2. Colour vs shape on {colour['model']} {colour['layer']}")
    rep.bullets([
        f"{colour['model']} classifies cluttered shapes by shape only (small, low-contrast "
        "shapes among random-colour discs, half of them crossed by a random-colour bar; colour "
        "is random), so colour filters are useless for the task by construction. It is a "
        "narrower network trained short of saturation: test accuracy "
        f"{colour['test_accuracy']:.4f} on {colour['n_colour_images']} test images, "
        f"{colour['grey_accuracy']:.4f} on the same images turned grey.",
        f"Colour index per filter of {colour['layer']} ({colour['filters']} filters): weight "
        "index (share of the kernel's energy off the luminance axis, in pixel space) and "
        f"response index (response change when {colour['n_colour_images']} test images are "
        f"turned grey); colour-selective when the index exceeds {settings.colour_threshold:g}.",
        f"Orders: {settings.greedy_mode} greedy CAR ({colour['k']} filters, "
        f"{colour['n_scoring']} random train images, {colour['greedy_seconds']:.0f} s), "
        "one-shot CAR ranking, weight L1.",
        "p hypergeometric = probability that the first k filters of a random order hold at "
        "least as many colour-selective filters; permutation p-values "
        f"({settings.colour_permutations:,} random k-subsets) for the first-pruned minus kept "
        "difference of the colour-selective fraction and of the mean index, one-sided each "
        "way ((1 + count) / (1 + permutations)).",
        f"Paper (AlexNet): {PAPER_COLOUR['layer 1'][0]}/20 (layer 1) and "
        f"{PAPER_COLOUR['layer 2'][0]}/20 (layer 2) of the top-20 CAR-pruned filters were "
        "colour-selective.",
    ])
    rep.body += [colour_markdown(colour), ""]
    rep.p(_colour_note(colour))
    rep.image("colour.png", "colour indices in greedy CAR order")
    if control is not None:
        rep.h3(f"Control: {control['model']}, where colour is the label")
        rep.p(f"The same network, images and protocol, but the class is the shape's hue (8 "
              f"bins): test accuracy {control['test_accuracy']:.4f}, "
              f"{control['grey_accuracy']:.4f} on grey images (chance 0.125). Here CAR "
              "should keep the colour filters (the 'fewer' p-values).")
        rep.body += [colour_markdown(control), ""]
        rep.p(_colour_note(control))
        rep.image("colour_control.png", "control: colour indices in greedy CAR order")
    rep.h2("Files")
    rep.bullets(["`curves/curves.csv`, `curves/curves.png`, `curves/curves.json`: accuracy vs "
                 "filters pruned, every method and layer, before and after fine-tuning",
                 "`half_table.csv`: the tables above", "`greedy_order.csv`: CAR's order",
                 "`colour_index.csv`: both colour indices per filter",
                 "`colour_index_control.csv`: the same for the control model",
                 "`colour_vs_pruning.csv` (both models), `colour.png`, `colour_control.png`"])


def _colour_note(res: dict[str, Any]) -> str:
    """One paragraph: accuracy, CAR ties, correlations and the greedy-CAR answer."""
    greedy = [r for r in res["rows"] if r["order"] == "greedy CAR"]
    answers = "; ".join(
        f"{r['by']} index: {r['pruned_colour']}/{r['k']} colour-selective among the first "
        f"pruned vs {r['kept_colour']}/{r['kept']} kept (p more {r['p_perm_more']:.4f}, p fewer "
        f"{r['p_perm_less']:.4f}; mean index {r['pruned_mean_index']:.3f} vs "
        f"{r['kept_mean_index']:.3f}, p higher {r['p_index_more']:.4f}, p lower "
        f"{r['p_index_less']:.4f})" for r in greedy)
    return (f"Scoring-image accuracy of the unpruned model: {res['scoring_accuracy']:.4f}; "
            f"{res['zero_car_filters']} of {res['filters']} filters have top-1 CAR 0 on "
            f"{res['n_scoring']} images (the loss breaks those ties). Correlation of the loss "
            f"CAR with the weight index {res['corr_weight_index_vs_loss_car']:.2f}, with the "
            f"response index {res['corr_response_index_vs_loss_car']:.2f}. Greedy CAR: "
            f"{answers}.")
