"""``netcarve visualize``, ``netcarve fop`` and ``netcarve defection``.

Registered in :mod:`netcarve.cli` with ``cli.add_command(...)``. Thin like every command: each
loads a model and data, calls :mod:`netcarve.viz` / :mod:`netcarve.function.descriptors`, and
writes files plus a ``summary.json``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from netcarve.cli.common import fail_cleanly as _fail_cleanly
from netcarve.cli.common import run_options, source_options


def _write_summary(out: Path, summary: dict, as_json: bool, text: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    click.echo(json.dumps(summary, indent=2, default=str) if as_json else text)


def _ints(value: str | None, name: str) -> list[int] | None:
    """``"0,3,5"`` or ranges ``"0-7,12"`` → ints."""
    if value is None:
        return None
    out: list[int] = []
    try:
        for part in value.split(","):
            part = part.strip()
            if not part:
                continue
            if "-" in part[1:]:
                a, b = part[0] + part[1:].split("-", 1)[0], part[1:].split("-", 1)[1]
                out.extend(range(int(a), int(b) + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise click.BadParameter(f"{name} must be comma-separated integers or ranges such as "
                                 f"0-7, got {value!r}") from None
    if not out:
        raise click.BadParameter(f"{name} is empty")
    return out


def _floats(value: str, name: str) -> list[float]:
    try:
        out = [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{name} must be comma-separated numbers, got {value!r}") from None
    if not out:
        raise click.BadParameter(f"{name} is empty")
    return out


def _common(fn: Callable[..., Any]) -> Callable[..., Any]:
    return source_options(run_options(fn))


def _labelled(preset: Any, images_dir: Path | None, seed: int, n_probe: int,
              n_eval: int, n_train: int | None = None) -> dict[str, Any]:
    """Probe images (train split), evaluation images (test split) and fine-tuning data.

    With ``images_dir`` the folder is shuffled (seeded): the first ``n_eval`` images evaluate,
    the rest is fine-tuning data (its first ``n_train``, the most fine-tuning reads), and the
    probe images are the first ``n_probe`` of the rest. Only those images are decoded, so
    memory does not grow with the folder.
    """
    import torch

    from netcarve.core.errors import DataError
    from netcarve.training.evaluation import reference_data

    gen = torch.Generator().manual_seed(seed)
    if images_dir is not None:
        from netcarve.data import ImageFolderDataset

        folder = ImageFolderDataset(images_dir, preset)
        if len(folder) < n_eval + 2:
            raise DataError(f"{images_dir} has {len(folder)} images; need more than "
                            f"--eval-images {n_eval}")
        perm = torch.randperm(len(folder), generator=gen)
        rest = len(folder) - n_eval
        wanted = n_eval + min(rest, max(n_probe, n_train if n_train is not None else rest))
        x, y = folder.load(perm[:wanted].tolist())
        train_x, train_y = x[n_eval:], y[n_eval:]
        return {"probe_x": train_x[:n_probe], "probe_y": train_y[:n_probe],
                "eval_x": x[:n_eval], "eval_y": y[:n_eval], "train_x": train_x,
                "train_y": train_y}
    train_x, train_y = reference_data(preset, "train")
    test_x, test_y = reference_data(preset, "test")
    if n_probe > len(train_x) or n_eval > len(test_x):
        raise DataError(f"at most {len(train_x)} probe and {len(test_x)} evaluation images")
    perm = torch.randperm(len(train_x), generator=gen)
    train_x, train_y = train_x[perm], train_y[perm]
    return {"probe_x": train_x[:n_probe], "probe_y": train_y[:n_probe],
            "eval_x": test_x[:n_eval], "eval_y": test_y[:n_eval], "train_x": train_x,
            "train_y": train_y}


# --------------------------------------------------------------------------- visualize


@click.command()
@click.argument("model")
@click.argument("layer")
@click.option("--channels", default=None,
              help="Channels, e.g. 0,3,5 or 0-15 [default: all; with --circuit: the circuit's "
                   "nodes in LAYER].")
@click.option("--neuron", is_flag=True,
              help="Maximise the centre position of each channel instead of its mean.")
@click.option("--steps", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=0.05, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Channels optimised together.")
@click.option("--parameterization", type=click.Choice(["fourier", "pixel"]), default="fourier",
              show_default=True)
@click.option("--no-decorrelate", is_flag=True, help="RGB: optimise RGB directly.")
@click.option("--no-transforms", is_flag=True, help="No pad/jitter/scale/rotate.")
@click.option("--images", "n_images", type=click.IntRange(min=0), default=1000,
              show_default=True, help="Images searched for data-set examples (0: none).")
@click.option("--top-k", type=click.IntRange(1, 32), default=6, show_default=True,
              help="Data-set examples per channel.")
@click.option("--circuit", "circuit_file", type=click.Path(path_type=Path), default=None,
              help="A circuit file: also show each node as the circuit computes it.")
@_common
@_fail_cleanly
def visualize(model: str, layer: str, channels: str | None, neuron: bool, steps: int, lr: float,
              batch_size: int, parameterization: str, no_decorrelate: bool,
              no_transforms: bool, n_images: int, top_k: int, circuit_file: Path | None,
              weights: Path | None, preset: str | None, images_dir: Path | None, device: str,
              seed: int, out: Path, as_json: bool) -> None:
    """Activation maximisation of LAYER's channels of MODEL ("logit" for the logits).

    Writes LAYER.png (all channels: visualisation, circuit version, best data-set patch),
    LAYER/channel_NNNN.png (visualisation beside its top data-set examples and their
    receptive fields), visualization.safetensors and summary.json.
    """
    import torch
    from safetensors.torch import save_file

    from netcarve.cli.common import load_cli_model
    from netcarve.core.errors import NetcarveError
    from netcarve.core.targets import Target
    from netcarve.training.evaluation import analysis_data
    from netcarve.viz.examples import dataset_examples
    from netcarve.viz.pictures import plot_channel, plot_grid
    from netcarve.viz.receptive_field import receptive_field
    from netcarve.viz.render import build_graph, resolve_targets
    from netcarve.viz.render import visualize as run_visualize
    from netcarve.viz.transforms import Transforms

    start = time.perf_counter()
    lm = load_cli_model(model, weights, preset, device)
    shape = (lm.preset.channels, lm.preset.size, lm.preset.size)
    graph = build_graph(lm.model, shape)
    circuit = None
    if circuit_file is not None:
        from netcarve.circuits.circuit import Circuit, model_fingerprint

        circuit = Circuit.load(circuit_file)
        fp = circuit.metadata.get("model_fingerprint")
        if fp and fp != model_fingerprint(lm.model):
            raise NetcarveError(f"{circuit_file} was extracted from a different model (weights "
                                f"fingerprint {fp}); pass the same MODEL and --weights")
    base = resolve_targets(graph, layer, None)
    layer_name = base[0].layer
    chans = _ints(channels, "--channels")
    if chans is None and circuit is not None:
        if layer_name == circuit.target.layer:
            chans = list(circuit.target.channels)
        elif layer_name in circuit.masks:
            chans = torch.nonzero(circuit.masks[layer_name].any(dim=1)).flatten().tolist()
        else:
            raise NetcarveError(f"layer {layer_name} is not part of the circuit; its layers: "
                                f"{', '.join(circuit.masks)}")
        if not chans:
            raise NetcarveError(f"the circuit keeps no channel of {layer_name}")
    targets = resolve_targets(graph, layer_name, chans)
    if neuron:
        info = graph.layer(layer_name)
        if len(info.output_shape) != 3:
            raise NetcarveError(f"{layer_name} has no spatial map; drop --neuron")
        centre = (info.output_shape[1] // 2, info.output_shape[2] // 2)
        targets = [Target(t.layer, channel=t.channel, position=centre) for t in targets]
    transforms = Transforms.none() if no_transforms else None
    kwargs = dict(preset=lm.preset, steps=steps, lr=lr, seed=seed, transforms=transforms,
                  parameterization=parameterization, decorrelate=not no_decorrelate,
                  batch_size=batch_size, graph=graph)
    viz = run_visualize(lm.model, targets, **kwargs)
    compare = run_visualize(lm.model, targets, circuit=circuit, **kwargs) if circuit else None
    images = examples = None
    if n_images > 0:
        images, _ = analysis_data(lm.preset, n_images, 1, seed=seed,
                                  images_dir=None if images_dir is None else str(images_dir))
        images = images.to(device)
        channels_list = [t.channel for t in targets]
        examples = dataset_examples(lm.model, layer_name, images, channels=channels_list,
                                    top_k=top_k, graph=graph)
    out.mkdir(parents=True, exist_ok=True)
    safe = layer_name.replace("/", "_")
    grid = plot_grid(viz, out / f"{safe}.png", compare=compare, examples=examples,
                     images=images, preset=lm.preset)
    per_dir = out / safe
    channel_files = []
    for i, t in enumerate(targets):
        channel_files.append(str(plot_channel(
            viz, i, per_dir / f"channel_{t.channel:04d}.png", compare=compare,
            examples=examples, images=images, preset=lm.preset)))
    tensors = {"images": viz.images.contiguous(), "activations": viz.activations.contiguous()}
    if compare is not None:
        tensors["circuit_images"] = compare.images.contiguous()
        tensors["circuit_activations"] = compare.activations.contiguous()
    save_file(tensors, str(out / "visualization.safetensors"),
              metadata={"targets": json.dumps(viz.targets), "model": lm.name})
    info = graph.layer(layer_name)
    rf = receptive_field(graph, layer_name) if len(info.output_shape) == 3 else None
    summary: dict[str, Any] = {
        "model": lm.name, "layer": layer_name, "channels": [t.channel for t in targets],
        "objective": "neuron" if neuron else "channel", "visualization": viz.summary(),
        "circuit": None if compare is None else {
            "file": str(circuit_file), "target": str(circuit.target),  # type: ignore[union-attr]
            "activations": [round(float(v), 6) for v in compare.activations]},
        "receptive_field_of_centre": None if rf is None else list(rf),
        "dataset_examples": None if examples is None else {
            "images_searched": len(images), **examples.to_dict()},  # type: ignore[arg-type]
        "files": {"grid": str(grid), "channels": channel_files,
                  "tensors": str(out / "visualization.safetensors")},
        "seconds": time.perf_counter() - start,
    }
    text = (f"{lm.name} {layer_name}: visualised {len(targets)} channel(s) in "
            f"{viz.metadata['seconds']:.1f} s ({steps} steps)"
            + ("" if compare is None else "; circuit versions beside them")
            + f"\nwrote {grid}, {len(channel_files)} channel PNGs in {per_dir} and "
              f"{out / 'summary.json'}")
    _write_summary(out, summary, as_json, text)


# --------------------------------------------------------------------------- fop / defection


def _fop_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--layers", required=True, help="Comma-separated layers to prune."),
        click.option("--descriptors", default="profile,class_preference", show_default=True,
                     help="Comma-separated: am, profile, class_preference."),
        click.option("--similarity", type=click.Choice(["cosine", "cka"]), default="cosine",
                     show_default=True),
        click.option("--method", type=click.Choice(["agglomerative", "kmeans"]),
                     default="agglomerative", show_default=True),
        click.option("--threshold", type=float, default=0.8, show_default=True,
                     help="Agglomerative: merge filters at least this similar (in [-1, 1])."),
        click.option("--k", "k", type=click.IntRange(min=1), default=None,
                     help="Number of clusters per layer (instead of threshold / silhouette)."),
        click.option("--keep-rule", default="l1", show_default=True,
                     help="Most important cluster member by: l1, mean_activation, apoz, "
                          "taylor, car, class_preference."),
        click.option("--images", "n_images", type=click.IntRange(min=2), default=500,
                     show_default=True, help="Probe images (train split)."),
        click.option("--eval-images", "n_eval", type=click.IntRange(min=1), default=2000,
                     show_default=True, help="Evaluation images (test split)."),
        click.option("--finetune-images", type=click.IntRange(min=1), default=10000,
                     show_default=True, help="Training images per fine-tuning epoch."),
        click.option("--am-steps", type=click.IntRange(min=1), default=128, show_default=True,
                     help="Activation-maximisation steps (descriptor 'am')."),
        click.option("--batch-size", type=click.IntRange(min=1), default=128,
                     show_default=True),
        click.option("--fold", type=click.Choice(["lstsq", "none"]), default="lstsq",
                     show_default=True,
                     help="lstsq: refit the layers after the pruned ones on the kept channels "
                          "by ridge least squares over the probe images (both methods); "
                          "none: drop the removed filters' contributions (the paper)."),
        click.option("--ridge", type=click.FloatRange(min=0), default=1e-2, show_default=True,
                     help="Relative ridge penalty of --fold lstsq."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _run_fop(lm: Any, data: dict[str, Any], layers: str, descriptors: str, similarity: str,
             method: str, threshold: float, k: int | None, keep_rule: str, am_steps: int,
             batch_size: int, seed: int) -> tuple[Any, dict[str, Any]]:
    from netcarve.function.pruning import functional_prune, magnitude_masks

    fop = functional_prune(
        lm.model, layers, data["probe_x"], data["probe_y"], preset=lm.preset,
        descriptors=[d for d in descriptors.split(",") if d.strip()], similarity=similarity,
        method=method, threshold=threshold, k=k, keep_rule=keep_rule, am_steps=am_steps,
        batch_size=batch_size, seed=seed)
    masks = {"functional": fop.masks(), "magnitude": magnitude_masks(lm.model,
                                                                      fop.removed_counts())}
    return fop, masks


@click.command()
@click.argument("model")
@_fop_options
@click.option("--finetune-epochs", type=click.IntRange(min=0), default=1, show_default=True,
              help="0: no fine-tuning.")
@click.option("--finetune-lr", type=click.FloatRange(0, min_open=True), default=0.01,
              show_default=True)
@_common
@_fail_cleanly
def fop(model: str, layers: str, descriptors: str, similarity: str, method: str,
        threshold: float, k: int | None, keep_rule: str, n_images: int, n_eval: int,
        finetune_images: int, am_steps: int, batch_size: int, fold: str, ridge: float,
        finetune_epochs: int, finetune_lr: float, weights: Path | None, preset: str | None,
        images_dir: Path | None, device: str, seed: int, out: Path, as_json: bool) -> None:
    """Functionality-oriented pruning of MODEL's --layers, against magnitude pruning of the
    same number of filters: multiply-adds and parameters removed, accuracy before and after
    fine-tuning. Writes summary.json, comparison.csv, clusters.json/.csv, clusters_LAYER.png
    and the smaller model (functional_model/)."""
    from netcarve.cli.common import load_cli_model
    from netcarve.function.pruning import compare_pruning

    start = time.perf_counter()
    lm = load_cli_model(model, weights, preset, device)
    data = _labelled(lm.preset, images_dir, seed, n_images, n_eval, finetune_images)
    result, masks = _run_fop(lm, data, layers, descriptors, similarity, method, threshold, k,
                             keep_rule, am_steps, batch_size, seed)
    cmp = compare_pruning(lm.model, masks, preset=lm.preset, eval_images=data["eval_x"],
                          eval_labels=data["eval_y"], train_images=data["train_x"],
                          train_labels=data["train_y"], finetune_epochs=finetune_epochs,
                          finetune_lr=finetune_lr, max_train_images=finetune_images, seed=seed,
                          fold=fold, fold_images=data["probe_x"], ridge=ridge)
    out.mkdir(parents=True, exist_ok=True)
    files = {k_: str(v) for k_, v in result.save(out).items()}
    files["comparison_csv"] = str(cmp.save_csv(out / "comparison.csv"))
    if ":" not in model:
        files["functional_model"] = str(cmp.pruned["functional"].save(
            out / "functional_model", spec=lm.name))
    summary = {"model": lm.name, **result.summary(), "comparison": cmp.to_dict(),
               "files": files, "seconds": time.perf_counter() - start}
    lines = [f"{lm.name}: functional pruning of {', '.join(result.layers)} "
             f"({result.settings['similarity']}, {method}) removed "
             f"{sum(result.removed_counts().values())} filters"]
    for row in cmp.rows:
        ft = row["accuracy_finetuned"]
        lines.append(
            f"  {row['method']:<10} (fold {row['fold']}) MACs -{row['macs_removed']:.1%}, params "
            f"-{row['params_removed']:.1%}: accuracy {row['accuracy_original']:.2%} → "
            f"{row['accuracy_pruned']:.2%} pruned"
            + ("" if ft is None else f" → {ft:.2%} fine-tuned"))
    lines.append(f"wrote {out / 'summary.json'}")
    _write_summary(out, summary, as_json, "\n".join(lines))


@click.command()
@click.argument("model")
@_fop_options
@click.option("--lrs", default="0.01,0.001", show_default=True,
              help="Fine-tuning learning rates (comma-separated).")
@click.option("--epochs", "epoch_list", default="1,2", show_default=True,
              help="Fine-tuning epoch counts (comma-separated); every lr × epochs is run.")
@click.option("--drift-descriptors", default="class_preference,profile", show_default=True,
              help="Descriptors whose drift is measured: am, profile, class_preference.")
@_common
@_fail_cleanly
def defection(model: str, layers: str, descriptors: str, similarity: str, method: str,
              threshold: float, k: int | None, keep_rule: str, n_images: int, n_eval: int,
              finetune_images: int, am_steps: int, batch_size: int, fold: str, ridge: float,
              lrs: str, epoch_list: str,
              drift_descriptors: str, weights: Path | None, preset: str | None,
              images_dir: Path | None, device: str, seed: int, out: Path,
              as_json: bool) -> None:
    """Functionality defection: prune MODEL's --layers functionally and by magnitude (same
    filter counts), fine-tune each with every learning rate × epoch count, and measure how far
    every surviving filter's descriptors drift (cosine before vs after). Writes
    defection.csv, defection.png and summary.json."""
    from netcarve.cli.common import load_cli_model
    from netcarve.function.defection import defection as run_defection

    start = time.perf_counter()
    rates = _floats(lrs, "--lrs")
    epochs = [int(e) for e in _floats(epoch_list, "--epochs")]
    if any(e < 1 for e in epochs) or any(r <= 0 for r in rates):
        raise click.BadParameter("learning rates must be > 0 and epochs >= 1")
    lm = load_cli_model(model, weights, preset, device)
    data = _labelled(lm.preset, images_dir, seed, n_images, n_eval, finetune_images)
    result, masks = _run_fop(lm, data, layers, descriptors, similarity, method, threshold, k,
                             keep_rule, am_steps, batch_size, seed)
    report = run_defection(
        lm.model, masks, data["probe_x"], preset=lm.preset,
        settings=[(r, e) for r in rates for e in epochs],
        descriptors=[d for d in drift_descriptors.split(",") if d.strip()],
        train_images=data["train_x"], train_labels=data["train_y"],
        max_train_images=finetune_images, eval_images=data["eval_x"],
        eval_labels=data["eval_y"], am_steps=am_steps, batch_size=batch_size, seed=seed,
        fold=fold, fold_images=data["probe_x"], ridge=ridge)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = report.save_csv(out / "defection.csv")
    png_path = report.plot(out / "defection.png")
    summary = {"model": lm.name, "pruning": result.summary(), "defection": report.to_dict(),
               "files": {"csv": str(csv_path), "png": str(png_path)},
               "seconds": time.perf_counter() - start}
    lines = [f"{lm.name}: {sum(result.removed_counts().values())} filters pruned per method; "
             "mean cosine (before vs after fine-tuning) of surviving filters:"]
    def num(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    for s in report.summary():
        lines.append(f"  {s['method']:<10} lr {s['lr']:<6g} {s['epochs']} ep {s['layer']:<12} "
                     f"{s['descriptor']:<16} {num(s['mean_cosine'])} (relative "
                     f"{num(s['mean_cosine_relative'])}, vs unpruned "
                     f"{num(s['mean_cosine_vs_original'])})")
    lines.append(f"wrote {csv_path}, {png_path} and {out / 'summary.json'}")
    _write_summary(out, summary, as_json, "\n".join(lines))


COMMANDS = (visualize, fop, defection)
"""The commands of this module, for ``for c in COMMANDS: cli.add_command(c)``."""
