"""The ``netcarve`` command line. Thin by design: every command is one call into the API."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from netcarve._version import __version__
from netcarve.cli.common import (
    device_option,
    emit,
    fail_cleanly,
    in_run_folder,
    run_options,
    source_options,
    workers_option,
)
from netcarve.cli.errors import DEBUG_META, EXIT_INTERRUPTED, one_line


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="netcarve")
@click.option("--debug", is_flag=True,
              help="Show the full traceback of any error (also: NETCARVE_DEBUG=1).")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """netcarve: interpret convolutional networks by pruning them.

    Exit codes: 0 success, 1 a bug (please report it) or out of memory, 2 bad arguments or
    names, 3 data problem, 4 weight-file problem, 130 interrupted.
    """
    ctx.meta[DEBUG_META] = debug


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@fail_cleanly
def models(as_json: bool) -> None:
    """List the model zoo with the recorded test accuracy of bundled weights."""
    from netcarve.zoo import ZOO

    rows = []
    for entry in ZOO.values():
        meta = entry.metadata()
        rows.append(
            {
                "name": entry.name,
                "description": entry.description,
                "dataset": entry.preset.dataset,
                "input": [entry.preset.channels, entry.preset.size, entry.preset.size],
                "classes": entry.preset.num_classes,
                "bundled_weights": entry.bundled,
                "test_accuracy": float(meta["test_accuracy"]) if "test_accuracy" in meta else None,
                "trained": {k: meta[k] for k in ("seed", "epochs", "date") if k in meta},
            }
        )
    lines = [f"{'name':<15} {'accuracy':>9}  {'input':<10} description"]
    for r in rows:
        acc = "-" if r["test_accuracy"] is None else f"{r['test_accuracy']:.2%}"
        shape = "x".join(str(v) for v in r["input"])
        lines.append(f"{r['name']:<15} {acc:>9}  {shape:<10} {r['description']}")
    emit(rows, as_json, "\n".join(lines))


@cli.command()
@click.argument("name")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Override the recipe.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Weight file to write (default: the zoo's bundled file).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@fail_cleanly
def train(name: str, epochs: int | None, seed: int, out: Path | None, as_json: bool) -> None:
    """Train bundled model NAME from scratch and save its weights with metadata."""
    from netcarve.training.train import train_model

    result = train_model(name, out, epochs=epochs, seed=seed, progress=not as_json)
    data = {"name": name, "path": str(result.path), "test_accuracy": result.test_accuracy,
            "seconds": result.seconds, "metadata": result.metadata}
    emit(data, as_json, f"{name}: test accuracy {result.test_accuracy:.2%} → {result.path}")


@cli.command()
@click.argument("model")
@click.option("--weights", type=click.Path(path_type=Path), default=None,
              help="Weight file (safetensors or a torch.save'd state dict).")
@click.option("--preset", default=None, help="Input preset (a zoo name) for a factory spec.")
@click.option("--images-dir", type=click.Path(path_type=Path), default=None,
              help="Evaluate on your own images: one sub-folder per class.")
@click.option("--split", type=click.Choice(["test", "train"]), default="test", show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use the first N images.")
@click.option("--batch-size", type=click.IntRange(min=1), default=500, show_default=True)
@device_option
@workers_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@fail_cleanly
def evaluate(model: str, weights: Path | None, preset: str | None, images_dir: Path | None,
             split: str, limit: int | None, batch_size: int, device: str, workers: int,
             as_json: bool) -> None:
    """Measure top-1 accuracy of MODEL (zoo name or package.module:factory)."""
    from netcarve.cli.common import load_cli_model
    from netcarve.core.errors import DataError
    from netcarve.data import ImageFolderDataset, image_folder_loader
    from netcarve.training.evaluation import evaluate as run_evaluate
    from netcarve.training.evaluation import reference_data

    lm = load_cli_model(model, weights, preset, device)
    y = None
    if images_dir is not None:
        folder = ImageFolderDataset(images_dir, lm.preset)
        if lm.preset.class_names and not folder.matches_preset:
            # Accuracy against labels numbered by sorted folder name would be a number
            # without meaning; say how to make the labels line up instead.
            raise DataError(
                f"the class folders of {images_dir} ({', '.join(folder.folder_classes[:6])}"
                f"{', …' if len(folder.folder_classes) > 6 else ''}) are not all among "
                f"{lm.name}'s classes ({', '.join(lm.preset.class_names)}): name each "
                "sub-folder after the class it holds so that labels match the model's outputs"
            )
        n = len(folder) if limit is None else min(limit, len(folder))
        x = image_folder_loader(folder, batch_size=batch_size, workers=workers,
                                indices=range(n))
    else:
        x, y = reference_data(lm.preset, split, limit)
    result = run_evaluate(lm.model, x, y, lm.preset, batch_size=batch_size, device=device,
                          progress=not as_json)
    data = {"model": lm.name, "weights": lm.weights, **result.to_dict()}
    emit(data, as_json, f"{lm.name}: top-1 {result.accuracy:.2%} on {result.n:,} images "
                         f"(loss {result.loss:.4f})")


def _model_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by every command that loads a model and images."""
    fn = run_options(fn)
    fn = click.option("--batch-size", type=click.IntRange(min=1), default=64,
                      show_default=True)(fn)
    fn = click.option("--heldout", "n_heldout", type=click.IntRange(min=2), default=None,
                      help="Held-out images for preservation [default: same as --images].")(fn)
    fn = click.option("--images", "n_images", type=click.IntRange(min=2), default=500,
                      show_default=True, help="Scoring images.")(fn)
    return source_options(fn)


def _load_for_analysis(model: str, weights: Path | None, preset: str | None,
                       images_dir: Path | None, n_images: int, n_heldout: int | None,
                       device: str, seed: int, *, workers: int | None = None,
                       batch_size: int = 64):
    """The model and its scoring / held-out images; with ``workers`` set, an
    ``--images-dir`` folder is streamed (DataLoaders) instead of loaded whole."""
    import torch

    from netcarve.cli.common import load_cli_model
    from netcarve.training.evaluation import analysis_data, analysis_streams

    lm = load_cli_model(model, weights, preset, device)
    folder = None if images_dir is None else str(images_dir)
    if workers is not None:
        if folder is not None:
            from netcarve.core._memory import bound_heap_growth

            # flat peak memory over a long folder (glibc; see core._memory for the cost)
            bound_heap_growth()
        scoring, heldout = analysis_streams(lm.preset, n_images, n_heldout or n_images,
                                            images_dir=folder, seed=seed,
                                            batch_size=batch_size, workers=workers)
        if isinstance(scoring, torch.Tensor) and isinstance(heldout, torch.Tensor):
            return lm, scoring.to(device), heldout.to(device)
        return lm, scoring, heldout
    scoring, heldout = analysis_data(lm.preset, n_images, n_heldout or n_images,
                                     images_dir=folder, seed=seed)
    return lm, scoring.to(device), heldout.to(device)


def _write_summary(out: Path, summary: dict, as_json: bool, text: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    emit(summary, as_json, text)


def _floats(value: str, name: str) -> list[float]:
    try:
        return [float(v) for v in value.split(",") if v.strip()]
    except ValueError as exc:
        raise click.BadParameter(f"{name} must be comma-separated numbers: {value!r}") from exc


@cli.command()
@click.argument("model")
@click.argument("target")
@click.option("--criterion", type=click.Choice(["actgrad", "snip", "force", "magnitude",
                                                "random"]), default="actgrad", show_default=True)
@click.option("--keep", type=click.FloatRange(0, 1, min_open=True), default=0.1,
              show_default=True, help="Fraction of relevant kernels to keep.")
@click.option("--granularity", type=click.Choice(["kernel", "filter"]), default="kernel",
              show_default=True)
@click.option("--per-layer-norm", is_flag=True, help="Normalise scores per layer first.")
@click.option("--steps", type=click.IntRange(min=1), default=1, show_default=True,
              help="Iterative re-scoring steps.")
@click.option("--min-preservation", type=click.FloatRange(-1, 1, min_open=True), default=None,
              help="Instead of --keep: the smallest keep whose circuit reaches this Pearson r "
                   "(keep search; the sampled curve goes to keep_search.csv).")
@click.option("--search-on", type=click.Choice(["heldout", "scoring"]), default="heldout",
              show_default=True, help="Images the --min-preservation goal is checked on "
                                      "(scoring: held-out stays an unbiased report).")
@_model_options
@workers_option
@fail_cleanly
@click.pass_context
def extract(ctx: click.Context, model: str, target: str, criterion: str, keep: float,
            granularity: str, per_layer_norm: bool, steps: int, min_preservation: float | None,
            search_on: str, weights: Path | None, preset: str | None,
            images_dir: Path | None, n_images: int, n_heldout: int | None, batch_size: int,
            device: str, seed: int, out: Path, as_json: bool, workers: int) -> None:
    """Extract the circuit of TARGET ("layer:channel", "layer:channel@y,x" or "logit:K")."""
    from netcarve.circuits.extract import extract as run_extract
    from netcarve.circuits.keep_search import find_keep

    search = None
    if min_preservation is not None:
        given = [f"--{n.replace('_', '-')}" for n in ("keep", "granularity", "steps")
                 if ctx.get_parameter_source(n) is not click.core.ParameterSource.DEFAULT]
        if given:
            raise click.UsageError(f"--min-preservation chooses the keep itself; drop "
                                   f"{', '.join(given)} (it searches kernel circuits, one step)")
    lm, scoring, heldout = _load_for_analysis(model, weights, preset, images_dir, n_images,
                                              n_heldout, device, seed, workers=workers,
                                              batch_size=batch_size)
    if min_preservation is not None:
        search = find_keep(lm.model, target, scoring, heldout=heldout, goal=min_preservation,
                           criterion=criterion, search_on=search_on,
                           per_layer_norm=per_layer_norm, batch_size=batch_size, seed=seed)
        circuit, keep = search.circuit, search.keep
    else:
        circuit = run_extract(lm.model, target, scoring, heldout=heldout, criterion=criterion,
                              keep=keep, granularity=granularity, per_layer_norm=per_layer_norm,
                              steps=steps, batch_size=batch_size, seed=seed)
    circuit.metadata["model"] = lm.name
    out.mkdir(parents=True, exist_ok=True)
    circuit.save(out / "circuit.safetensors")
    summary = {"model": lm.name, "circuit_file": str(out / "circuit.safetensors"),
               **circuit.summary()}
    pres = circuit.preservation
    text = (f"{circuit.target} [{criterion}, keep {keep:g}]: kept {circuit.kept_kernels:,} of "
            f"{circuit.relevant_kernels:,} relevant kernels; held-out preservation r = "
            f"{pres.pearson:.3f}" + (" (total collapse)" if circuit.collapsed else ""))
    if search is not None:
        from netcarve.core._csv import write_rows

        summary["keep_search"] = search.to_dict()
        write_rows(out / "keep_search.csv", search.curve, list(search.curve[0]))
        verdict = ("reached" if search.reached
                   else "NOT reached even with every relevant kernel")
        text += (f"\nkeep search: goal r >= {min_preservation:g} on {search_on} images "
                 f"{verdict} at keep {search.keep:.4g} ({search.evaluations} keeps sampled, "
                 f"curve in {out / 'keep_search.csv'})")
    text += f"\nwrote {out / 'circuit.safetensors'} and {out / 'summary.json'}"
    _write_summary(out, summary, as_json, text)


@cli.command()
@click.argument("model")
@click.option("--layers", default=None, help="Comma-separated layers to draw units from.")
@click.option("--units-per-layer", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--units", "unit_list", default=None,
              help="Comma-separated targets instead of --layers (e.g. features.3:1,features.7:4).")
@click.option("--criteria", default="actgrad,snip,force,magnitude,random", show_default=True)
@click.option("--keeps", default="0.5,0.2,0.1,0.05,0.01", show_default=True)
@click.option("--per-layer-norm", is_flag=True)
@_model_options
@fail_cleanly
def sweep(model: str, layers: str | None, units_per_layer: int, unit_list: str | None,
          criteria: str, keeps: str, per_layer_norm: bool, weights: Path | None,
          preset: str | None, images_dir: Path | None, n_images: int, n_heldout: int | None,
          batch_size: int, device: str, seed: int, out: Path, as_json: bool) -> None:
    """Preservation vs keep for several criteria and many units (CSV + PNG)."""
    from netcarve.circuits.sweep import pick_units
    from netcarve.circuits.sweep import sweep as run_sweep
    from netcarve.core.graph import ModelGraph
    from netcarve.criteria import get_criterion

    crits = [c.strip() for c in criteria.split(",") if c.strip()]
    for c in crits:
        get_criterion(c)
    keep_values = _floats(keeps, "--keeps")
    lm, scoring, heldout = _load_for_analysis(model, weights, preset, images_dir, n_images,
                                              n_heldout, device, seed)
    graph = ModelGraph.build(lm.model, scoring[:1])
    if unit_list:
        units = [u.strip() for u in unit_list.split(",") if u.strip()]
    else:
        names = [n.strip() for n in layers.split(",")] if layers else [
            n for n, info in graph.layers.items() if info.kind == "conv"]
        units = pick_units(graph, names, units_per_layer, seed)
    result = run_sweep(lm.model, units, scoring, heldout, criteria=crits, keeps=keep_values,
                       per_layer_norm=per_layer_norm, batch_size=batch_size, seed=seed,
                       graph=graph, progress=not as_json)
    result.write_csv(out / "sweep.csv")
    result.plot(out / "sweep.png", title=f"{lm.name}: preservation vs keep")
    summary = {"model": lm.name, "units": len({r["unit"] for r in result.rows}),
               "criteria": crits, "keeps": keep_values,
               "median_preservation": result.table("median"),
               "collapse_fraction": result.collapse_fraction(),
               "csv": str(out / "sweep.csv"), "plot": str(out / "sweep.png")}
    _write_summary(out, summary, as_json, result.markdown_table()
                   + f"\nwrote {out / 'sweep.csv'}, {out / 'sweep.png'}, {out / 'summary.json'}")


@cli.command()
@click.argument("model")
@click.argument("target")
@click.option("--groups", "n_groups", type=click.IntRange(min=2), default=2, show_default=True,
              help="Number of image groups to find (PCA + k-means).")
@click.option("--criterion", default="actgrad", show_default=True)
@click.option("--keep", type=click.FloatRange(0, 1, min_open=True), default=0.2,
              show_default=True, help="Keep fraction of the general circuit.")
@click.option("--sub-keep", type=click.FloatRange(0, 1, min_open=True), default=0.5,
              show_default=True, help="Keep fraction of each sub-circuit, of the general one.")
@click.option("--grouping", type=click.Choice(["scores", "responses"]), default="scores",
              show_default=True, help="What the held-out test groups images by: per-image "
                                      "kernel scores or the unit's response map.")
@click.option("--random-splits", type=click.IntRange(min=0), default=20, show_default=True,
              help="Random splits of the same sizes, the held-out test's control (0: no test).")
@click.option("--bootstrap", type=click.IntRange(min=1), default=1000, show_default=True)
@_model_options
@fail_cleanly
def subcircuits(model: str, target: str, n_groups: int, criterion: str, keep: float,
                sub_keep: float, grouping: str, random_splits: int, bootstrap: int,
                weights: Path | None, preset: str | None,
                images_dir: Path | None, n_images: int, n_heldout: int | None,
                batch_size: int, device: str, seed: int, out: Path, as_json: bool) -> None:
    """Split TARGET's images into groups and extract one sub-circuit per group.

    Then tests the split on the held-out images: the grouping fitted on the scoring images
    assigns them, and the double difference (own-group minus other-group r of the
    sub-circuits) is compared with --random-splits random groups of the same sizes.
    """
    from netcarve.circuits.extract import extract as run_extract
    from netcarve.circuits.subcircuits import subcircuits as run_subcircuits
    from netcarve.circuits.subfeature_stats import subfeature_statistic

    lm, scoring, heldout = _load_for_analysis(model, weights, preset, images_dir, n_images,
                                              n_heldout, device, seed)
    general = run_extract(lm.model, target, scoring, heldout=heldout, criterion=criterion,
                          keep=keep, batch_size=batch_size, seed=seed)
    report = run_subcircuits(lm.model, general.target, scoring, n_groups=n_groups,
                             general=general, criterion=criterion, keep=keep,
                             sub_keep=sub_keep, batch_size=batch_size, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    general.save(out / "general.safetensors")
    for i, sc in enumerate(report.subcircuits):
        sc.save(out / f"subcircuit_{i}.safetensors")
    summary = {"model": lm.name, **report.summary()}
    lines = [f"{general.target}: general circuit {general.kept_kernels:,} kernels, "
             f"held-out r = {general.preservation.pearson:.3f}"]
    for s in summary["subcircuits"]:
        other = [o["pearson"] for o in s["other_groups"]]
        lines.append(f"  group {s['group']} ({s['images']} images): {s['kept_kernels']:,} "
                     f"kernels ({s['keep_vs_general']:.0%} of general), own-group r = "
                     f"{s['own_group']['pearson']}, other groups r = {other}")
    if random_splits:
        st = subfeature_statistic(lm.model, general.target, scoring, heldout, general,
                                  grouping=grouping, n_groups=n_groups, sub_keep=sub_keep,
                                  criterion=criterion, bootstrap=bootstrap,
                                  random_splits=random_splits, seed=seed)
        summary["heldout_test"] = {**st.row(), "r": st.r, "random": st.random}
        lo, hi = st.random_interval
        lines.append(f"held-out test ({grouping} grouping fitted on the scoring images, "
                     f"held-out groups {st.groups_heldout}): double difference "
                     f"{st.double_difference:+.3f} [95% CI {st.ci[0]:+.3f}, {st.ci[1]:+.3f}]; "
                     f"{random_splits} random splits {st.random_mean:+.3f} "
                     f"[{lo:+.3f}, {hi:+.3f}]; p = {st.p_value:.3f}")
    _write_summary(out, summary, as_json, "\n".join(lines))


@cli.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("out/demo"),
              show_default=True)
@click.option("--quick", is_flag=True,
              help="A small version of every step (seconds, for checking the set-up).")
@in_run_folder
def demo(out: Path, quick: bool) -> None:
    """Run the main job on the embedded default and print the report's path."""
    from netcarve.reproduce.demo import run_demo

    path = run_demo(out, progress=True, log=lambda m: click.echo(m, err=True), quick=quick)
    click.echo(str(path))


def _register_commands() -> None:
    # Commands that live beside their feature modules; registered here so `netcarve --help`
    # lists them all.
    from netcarve.cli.atlas import COMMANDS as atlas_commands
    from netcarve.cli.car import car as car_command
    from netcarve.cli.diagram import diagram as diagram_command
    from netcarve.cli.featureviz import COMMANDS as featureviz_commands
    from netcarve.cli.reproduce import COMMANDS as reproduce_commands

    for command in (car_command, diagram_command, *featureviz_commands, *reproduce_commands,
                    *atlas_commands):
        cli.add_command(command)


_register_commands()


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run ``netcarve ARGV`` and exit with its code.

    Click's own usage errors (unknown option, bad value, missing argument) are printed as
    the one ``error:`` line every netcarve error is, with the command's ``--help`` named,
    instead of click's multi-line usage block.

    Args:
        argv: the arguments after ``netcarve`` (default: ``sys.argv[1:]``).

    Raises:
        SystemExit: always, with 0 on success, 2 for a usage error, 130 when interrupted.

    Example:
        >>> main(["--version"])  # doctest: +SKIP
    """
    try:
        code = cli.main(args=argv, prog_name="netcarve", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:  # plain `netcarve`: the help is the answer
        click.echo(exc.ctx.get_help() if exc.ctx is not None else exc.format_message())
        raise SystemExit(0) from None
    except click.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx is not None else "netcarve"
        click.echo(f"error: {one_line(exc.format_message())} (see '{where} --help')", err=True)
        raise SystemExit(exc.exit_code) from None
    except click.ClickException as exc:
        click.echo(f"error: {one_line(exc.format_message())}", err=True)
        raise SystemExit(exc.exit_code) from None
    except click.Abort:  # Ctrl-C inside a click prompt or before a command started
        click.echo("error: interrupted", err=True)
        raise SystemExit(EXIT_INTERRUPTED) from None
    # standalone_mode=False returns the command's return value (None) or the code of
    # ctx.exit(); commands that fail raise SystemExit themselves.
    raise SystemExit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
