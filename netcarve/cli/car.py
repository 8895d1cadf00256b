"""``netcarve car``: CAR scores, class-wise CAR, greedy compression, curves vs baselines.

Thin: parses arguments and calls :mod:`netcarve.car`, :mod:`netcarve.car.baselines`,
:mod:`netcarve.surgery.prune` and :mod:`netcarve.training.finetune`. Register it on the main
group with ``cli.add_command(car)`` (after ``cli`` is defined: this module imports helpers from
:mod:`netcarve.cli`).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import click
import torch
from tqdm import tqdm

from netcarve.cli.common import emit as _emit
from netcarve.cli.common import fail_cleanly as _fail_cleanly
from netcarve.cli.common import run_options, source_options, workers_option

__all__ = ["car"]


def _parse_amount(value: str | None) -> int | float | None:
    """``"16"`` → 16 filters, ``"0.5"`` → half of them; validated by the API."""
    if value is None:
        return None
    text = value.strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise click.BadParameter(f"--prune takes a count (e.g. 16) or a ratio in (0, 1) "
                                 f"(e.g. 0.5), got {value!r}") from None


def _curve_counts(target: int, points: int) -> list[int]:
    return sorted({round(target * i / max(1, points - 1)) for i in range(points)})


def _load_data(lm: Any, images_dir: Path | None, n_images: int, n_eval: int, seed: int,
               workers: int = 0, batch_size: int = 100,
               ) -> tuple[torch.Tensor, torch.Tensor, Any, torch.Tensor | None, int, str]:
    """Scoring tensors, evaluation data (tensors, or a stream for a folder), its size."""
    from netcarve.core.errors import DataError
    from netcarve.data import ImageFolderDataset, image_folder_loader
    from netcarve.training.evaluation import reference_data

    if images_dir is not None:
        # Only the scoring images are decoded into memory (greedy CAR re-evaluates them for
        # every removal); the evaluation images are streamed from the folder, so memory does
        # not grow with the folder.
        folder = ImageFolderDataset(images_dir, lm.preset)
        gen = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(folder), generator=gen).tolist()
        if len(perm) < n_images + 1 and n_images > 0:
            raise DataError(f"{images_dir} has {len(perm)} images; --images {n_images} leaves "
                            "none for evaluation")
        score_idx, eval_idx = perm[:n_images], perm[n_images:n_images + n_eval]
        xs, ys = folder.load(score_idx)
        xe = image_folder_loader(folder, batch_size=batch_size, workers=workers,
                                 indices=eval_idx) if eval_idx else None
        return (xs, ys, xe, None, len(eval_idx),
                f"{images_dir} (shuffled with seed {seed}; {len(score_idx)} scoring images "
                f"in memory, {len(eval_idx)} evaluation images streamed)")
    xs, ys = reference_data(lm.preset, "train", n_images)
    xe, ye = reference_data(lm.preset, "test", n_eval)
    return xs, ys, xe, ye, len(ye), (f"{lm.preset.dataset}: scoring = first {n_images} train "
                                     f"images, evaluation = first {n_eval} test images")


@click.command()
@click.argument("model")
@click.option("--layers", default=None,
              help="Comma-separated layers to score and prune [default: every layer whose "
                   "filters can be removed physically].")
@click.option("--prune", "prune_amount", default=None,
              help="Filters to prune: a count (16) or a ratio in (0, 1) (0.5) -- per layer, or "
                   "in total with --scope global.")
@click.option("--floor", type=click.FloatRange(0, 1), default=None,
              help="Stop before top-1 accuracy on the scoring images falls below this.")
@click.option("--scope", type=click.Choice(["layer", "global"]), default="layer",
              show_default=True, help="Prune layers one after another, or across layers.")
@click.option("--metric", type=click.Choice(["top1", "top5", "loss"]), default="top1",
              show_default=True, help="CAR metric (ties are broken by the loss).")
@click.option("--classwise", is_flag=True, help="Write class-wise CAR (CSV + heat map).")
@click.option("--mode", type=click.Choice(["lazy", "racing", "exact"]), default="lazy",
              show_default=True,
              help="Greedy step: lazy re-scores only the candidates with the lowest earlier "
                   "CAR; racing scores every candidate but drops the confidently worse ones "
                   "early (top1/top5); exact re-scores every candidate on every image.")
@click.option("--lazy", "mode", flag_value="lazy", help="Same as --mode lazy.")
@click.option("--exact", "mode", flag_value="exact", help="Same as --mode exact.")
@click.option("--delta", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              default=0.01, show_default=True,
              help="Racing: chance per step of dropping the candidate exact greedy picks.")
@click.option("--window", type=click.IntRange(min=1), default=None,
              help="Candidates re-scored per lazy step [default: max(4, remaining/8)].")
@click.option("--refresh", type=click.IntRange(min=1), default=None,
              help="Lazy: re-score every candidate every N steps [default: never].")
@click.option("--finetune", "finetune_epochs", type=click.IntRange(min=0), default=0,
              show_default=True, help="Fine-tune the pruned models this many epochs.")
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=0.01, show_default=True,
              help="Fine-tuning learning rate.")
@click.option("--finetune-images", type=click.IntRange(min=1), default=None,
              help="Train images per fine-tuning epoch [default: the whole train split].")
@click.option("--fold", type=click.Choice(["none", "lstsq"]), default="none",
              show_default=True,
              help="none: drop the pruned filters (the paper); lstsq: refit the layers they "
                   "fed on the kept channels by ridge least squares over the scoring images.")
@click.option("--curves/--no-curves", default=True, show_default=True,
              help="Accuracy vs filters pruned for CAR and the baselines (CSV + PNG).")
@click.option("--curve-points", type=click.IntRange(min=2), default=5, show_default=True)
@source_options
@click.option("--images", "n_images", type=click.IntRange(min=0), default=500,
              show_default=True,
              help="Scoring images (first N of the train split). Exact greedy pruning costs "
                   "about (filters × pruned) removals × N images; lazy costs a fraction.")
@click.option("--eval-images", "n_eval", type=click.IntRange(min=0), default=2000,
              show_default=True, help="Evaluation images (first N of the test split).")
@click.option("--batch-size", type=click.IntRange(min=1), default=100, show_default=True)
@workers_option
@run_options
@_fail_cleanly
def car(model: str, layers: str | None, prune_amount: str | None, floor: float | None,
        scope: str, metric: str, classwise: bool, mode: str, delta: float, window: int | None,
        refresh: int | None, finetune_epochs: int, lr: float, finetune_images: int | None,
        fold: str, curves: bool, curve_points: int, weights: Path | None, preset: str | None,
        images_dir: Path | None, n_images: int, n_eval: int, batch_size: int, workers: int,
        device: str, seed: int, out: Path, as_json: bool) -> None:
    """CAR (classification accuracy reduction) of MODEL's filters, then greedy pruning.

    Scores every filter of --layers by the drop of top-1 accuracy when it is removed (its
    output is 0 after its BatchNorm), prunes the least important filters greedily to --prune
    or --floor, and writes: scores.csv, classwise_<layer>.csv/.png (--classwise), order.csv,
    curves.csv/.png (CAR vs random, L1, mean activation, APoZ, Taylor), pruned/ (the
    physically smaller model: model.safetensors + architecture.json, reload with
    netcarve.surgery.pruned.load_pruned), finetuned/ (--finetune) and summary.json.

    Scoring and greedy decisions use the first --images train images; accuracies are measured
    on the first --eval-images test images; fine-tuning uses the train split. With
    --images-dir the folder is shuffled (--seed): the first --images are decoded into memory
    for scoring and greedy pruning (which re-evaluates them for every removal), the next
    --eval-images are streamed from the folder (decoded by --workers processes), so memory
    does not grow with the folder's size.
    """
    from netcarve.car.baselines import BASELINES, CurveReport, compare_methods
    from netcarve.car.engine import AblationEngine
    from netcarve.car.greedy import greedy_prune, planned_removals
    from netcarve.car.scores import car_scores, resolve_layers
    from netcarve.car.stats import AblationError
    from netcarve.cli.common import load_cli_model
    from netcarve.core.errors import DataError
    from netcarve.core.graph import ModelGraph
    from netcarve.surgery.prune import prunable_layers, prune_filters
    from netcarve.surgery.pruned import CompressError
    from netcarve.training.evaluation import evaluate

    start = time.perf_counter()
    amount = _parse_amount(prune_amount)
    if amount is None and floor is None:
        raise AblationError("give --prune N|RATIO or --floor ACCURACY")
    if isinstance(amount, float) and not 0 < amount < 1:
        raise AblationError(f"--prune ratio must lie in (0, 1), got {amount:g}")
    lm = load_cli_model(model, weights, preset, device)
    xs, ys, xe, ye, n_eval_found, data_note = _load_data(lm, images_dir, n_images, n_eval,
                                                          seed, workers, batch_size)
    if len(xs) == 0:
        raise DataError("the scoring data set is empty (--images 0 or an empty folder)")
    if n_eval_found == 0:
        raise DataError("the evaluation data set is empty (--eval-images 0, or no images left "
                        "after the scoring ones)")
    net = lm.model
    example = xs[:1] if xs.dtype != torch.uint8 else lm.preset.normalize(xs[:1])
    p = next(net.parameters())
    graph = ModelGraph.build(net, example.to(device=p.device, dtype=p.dtype))
    why = prunable_layers(net, graph)
    prunable = [n for n, w in why.items() if w is None]
    if layers is None:
        names = [n for n in prunable if graph.layers[n].kind == "conv"]
        if not names:
            raise CompressError(f"{lm.name} has no conv layer whose filters can be removed "
                                "physically")
    else:
        names = resolve_layers(graph, layers)
        for name in names:
            if why[name] is not None:
                raise CompressError(f"layer {name} has no filters to prune: {why[name]}. "
                                    f"Layers that can be pruned: {', '.join(prunable) or 'none'}")
    out.mkdir(parents=True, exist_ok=True)
    log = (lambda msg: None) if as_json else (lambda msg: click.echo(msg, err=True))
    engine = AblationEngine(net, xs, ys, graph=graph, preset=lm.preset, batch_size=batch_size)
    log(f"scoring {len(names)} layer(s) on {len(ys)} images ...")
    scores = car_scores(net, xs, ys, names, metric=metric, preset=lm.preset, engine=engine,
                        model_name=lm.name)
    files = {"scores": str(scores.save(out / "scores.csv"))}
    if classwise:
        for name in names:
            files[f"classwise {name}"] = str(scores.classwise(name).save(out))
    if mode == "racing" and metric == "loss":
        raise AblationError("--mode racing compares per-image hits, so it needs --metric top1 "
                            "or top5; use --mode lazy or --exact with --metric loss")
    log(f"greedy {mode} pruning ({scope}) ...")
    planned = planned_removals(graph, names, amount, scope)
    bar = tqdm(total=planned, desc=f"greedy {mode}", unit="removal", disable=as_json,
               file=sys.stderr)

    def advance(step: Any) -> None:
        bar.set_postfix_str(f"{step.layer}:{step.filter} top-1 {step.accuracy:.2%}",
                            refresh=False)
        bar.update(1)

    with bar:
        greedy = greedy_prune(net, xs, ys, names, amount=amount, floor=floor, mode=mode,
                              scope=scope, window=window, refresh=refresh, metric=metric,
                              preset=lm.preset, engine=engine, delta=delta, seed=seed,
                              progress=advance)
    files["order"] = str(greedy.save(out / "order.csv"))
    check = xs[:8] if xs.dtype != torch.uint8 else lm.preset.normalize(xs[:8])
    probe = xs if xs.dtype != torch.uint8 else lm.preset.normalize(xs)
    pruned = prune_filters(net, greedy.masks, graph=graph, spec=lm.name, order=greedy.order,
                           check_input=check.to(device=p.device, dtype=p.dtype), fold=fold,
                           fold_images=probe if fold == "lstsq" else None)
    pruned.metadata.update({"model": lm.name, "weights": lm.weights or "",
                            "preset": lm.preset.to_dict()})
    files["pruned"] = str(pruned.save(out / "pruned"))
    acc_before = evaluate(net, xe, ye, lm.preset, batch_size=batch_size, device=device)
    acc_pruned = evaluate(pruned.module, xe, ye, lm.preset, batch_size=batch_size,
                          device=device)
    tuned: dict[str, Any] | None = None
    ft_x, ft_y = (xs, ys) if images_dir is not None else (None, None)
    if finetune_epochs > 0:
        from netcarve.training.finetune import finetune

        log(f"fine-tuning {finetune_epochs} epoch(s) ...")
        res = finetune(pruned.module, preset=lm.preset, epochs=finetune_epochs, lr=lr,
                       seed=seed, images=ft_x, labels=ft_y, max_images=finetune_images,
                       eval_images=xe, eval_labels=ye, batch_size=128)
        tuned_model = dataclasses.replace(pruned, module=res.model)
        files["finetuned"] = str(tuned_model.save(out / "finetuned"))
        tuned = res.to_dict()
    curve_report: CurveReport | None = None
    if curves:
        curve_report = CurveReport()
        for name in names:
            target = len(greedy.removed(name))
            if target == 0:
                continue
            ks = _curve_counts(target, curve_points)
            log(f"curves for {name}: {ks} filters ...")
            compare_methods(net, name, score_images=xs, score_labels=ys, eval_images=xe,
                            eval_labels=ye, counts=ks, methods=("car", *BASELINES),
                            # The greedy order already computed, never a second greedy run
                            # (with several layers: this layer's part of the joint order).
                            car_order=greedy.removed(name),
                            preset=lm.preset, graph=graph, batch_size=batch_size, seed=seed,
                            finetune_epochs=finetune_epochs, finetune_at=[target], lr=lr,
                            finetune_images=ft_x, finetune_labels=ft_y,
                            finetune_max_images=finetune_images, report=curve_report)
        if curve_report.rows:
            curve_report.save(out)
            files["curves"] = str(out / "curves.csv")
            files["curves_png"] = str(out / "curves.png")
    files["summary"] = str(out / "summary.json")
    summary = {
        "model": lm.name, "weights": lm.weights, "data": data_note,
        "removal": "a removed filter outputs exactly 0 after its BatchNorm (bias and BN "
                   "shift removed)",
        "n_scoring": len(ys), "n_eval": n_eval_found, "layers": names,
        "prunable_layers": prunable,
        "not_prunable": {n: w for n, w in why.items() if w is not None},
        "car": scores.to_dict(), "greedy": greedy.to_dict(),
        "greedy_cost": {"mode": greedy.mode, "seconds": greedy.seconds,
                        "removals": len(greedy.steps), "evaluations": greedy.evaluations,
                        "image_evaluations": greedy.image_evaluations,
                        "exact_image_evaluations": greedy.exact_image_evaluations,
                        "saved_fraction": greedy.saved_fraction},
        "pruned_model": pruned.to_dict(),
        "accuracy": {"original": acc_before.accuracy, "pruned": acc_pruned.accuracy,
                     "finetuned": None if tuned is None else tuned["accuracy_after"]},
        "finetune": tuned,
        "curves": None if curve_report is None else curve_report.to_dict(),
        "files": files, "seconds": time.perf_counter() - start,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    text = (f"{lm.name}: pruned {len(greedy.steps)} filter(s) of {', '.join(names)} by CAR "
            f"({greedy.mode}, {greedy.scope}); parameters {pruned.params_before:,} → "
            f"{pruned.params_after:,}, MACs {pruned.macs_before:,} → {pruned.macs_after:,}\n"
            f"top-1 on {n_eval_found} evaluation images: {acc_before.accuracy:.2%} → "
            f"{acc_pruned.accuracy:.2%}"
            + ("" if tuned is None else f" → {tuned['accuracy_after']:.2%} fine-tuned")
            + f"\nwrote {out}/ (" + ", ".join(sorted({Path(v).name for v in files.values()}))
            + ")")
    _emit(summary, as_json, text)
