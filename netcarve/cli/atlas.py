"""``netcarve atlas`` (map whole layers into a browsable, queryable atlas) and
``netcarve atlas-query`` (SQL over it). Thin: argument parsing and one call into
:mod:`netcarve.atlas` each."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import click

from netcarve.cli.common import device_option, emit, fail_cleanly, in_run_folder, source_options

__all__ = ["COMMANDS", "atlas", "atlas_query"]


def _names(value: str, option: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    if option == "--compare":
        from netcarve.criteria import get_criterion

        for name in names:
            get_criterion(name)
    return names


@click.command()
@click.argument("model")
@click.option("--layers", required=True, help="Comma-separated conv layers to map.")
@click.option("--units", default="all", show_default=True,
              help="'all', a count per layer (drawn with --seed) or channels '0,5,9' ('5,' for "
                   "channel 5 alone).")
@click.option("--goal", type=click.FloatRange(-1, 1, min_open=True), default=0.9,
              show_default=True, help="Preservation each unit's circuit must reach (Pearson r).")
@click.option("--search-on", type=click.Choice(["heldout", "scoring"]), default="heldout",
              show_default=True, help="Images the goal is checked on.")
@click.option("--criterion", type=click.Choice(["actgrad", "snip", "force", "magnitude"]),
              default="actgrad", show_default=True)
@click.option("--compare", default="snip,magnitude,random", show_default=True,
              help="Criteria compared with --criterion at 0.5x, 1x and 2x the keep found.")
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True,
              help="Local Ray workers (0: no Ray, map in this process).")
@click.option("--address", default=None,
              help="Join a running Ray cluster ('auto' or HOST:PORT) instead of starting one.")
@click.option("--task-units", type=click.IntRange(min=1), default=4, show_default=True,
              help="Units per Ray task (a failed task loses only these).")
@click.option("--images", "n_images", type=click.IntRange(min=2), default=300,
              show_default=True, help="Scoring images.")
@click.option("--heldout", "n_heldout", type=click.IntRange(min=2), default=300,
              show_default=True, help="Held-out images (preservation, examples).")
@click.option("--car-images", type=click.IntRange(min=0), default=500, show_default=True,
              help="Labelled images for each layer's class-wise CAR (0: no classes).")
@click.option("--featureviz-steps", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--diagrams/--no-diagrams", default=True, show_default=True,
              help="Draw every unit's interactive circuit diagram (about 1 MB each).")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@source_options
@device_option
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Atlas folder (an atlas already there is resumed).")
@click.option("--json", "as_json", is_flag=True, help="Print the run summary as JSON.")
@in_run_folder(resumable=True)
def atlas(model: str, layers: str, units: str, goal: float, search_on: str, criterion: str,
          compare: str, workers: int, address: str | None, task_units: int, n_images: int,
          n_heldout: int, car_images: int, featureviz_steps: int, diagrams: bool,
          batch_size: int,
          weights: Path | None, preset: str | None, images_dir: Path | None, device: str,
          seed: int, out: Path, as_json: bool) -> None:
    """Map every unit of --layers: its smallest circuit reaching --goal, pictures, classes.

    Writes a Parquet store (query it with `netcarve atlas-query`), each unit's circuit file,
    pictures and diagram, and OUT/index.html to browse offline. Re-running the same command
    resumes: units already stored are skipped.
    """
    from netcarve.atlas import AtlasConfig, run_atlas
    from netcarve.cli.common import load_cli_model
    from netcarve.training.evaluation import analysis_data, reference_data

    config = AtlasConfig(goal=goal, search_on=search_on, criterion=criterion,
                         compare=_names(compare, "--compare"),
                         featureviz_steps=featureviz_steps, diagrams=diagrams,
                         batch_size=batch_size, seed=seed)
    lm = load_cli_model(model, weights, preset, device)
    folder = None if images_dir is None else str(images_dir)
    scoring, heldout = analysis_data(lm.preset, n_images, n_heldout, images_dir=folder,
                                     seed=seed)
    x = y = None
    if car_images:
        if images_dir is not None:
            from netcarve.data import ImageFolderDataset

            data = ImageFolderDataset(images_dir, lm.preset)  # decodes only these images
            x, y = data.load(range(min(car_images, len(data))))
        else:
            x, y = reference_data(lm.preset, "test", car_images)
    run = run_atlas(lm.model, layers, out, scoring, heldout, units=units, config=config,
                    car_images=x, car_labels=y, preset=lm.preset, model_name=lm.name,
                    workers=workers, address=address, task_units=task_units, device=device,
                    progress=not as_json, log=None if as_json else
                    (lambda m: click.echo(m, err=True)))
    summary = run.to_dict()
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    lines = [f"atlas of {lm.name} ({', '.join(run.layers)}): {run.mapped} units mapped, "
             f"{run.skipped} already there, {len(run.failed)} failed, in {run.seconds:.1f} s "
             f"({run.units_per_minute:.1f} units/minute, {workers} workers)"]
    lines += [f"  failed {f['layer']}:{f['unit']}: {f['error']}" for f in run.failed]
    lines.append(f"browse {out / 'index.html'}; query: netcarve atlas-query {out} "
                 "\"SELECT layer, unit, keep, pearson FROM units ORDER BY keep\"")
    emit(summary, as_json, "\n".join(lines))
    if run.failed:
        raise SystemExit(1)


@click.command("atlas-query")
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@click.argument("sql")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table",
              show_default=True)
@fail_cleanly
def atlas_query(folder: Path, sql: str, fmt: str) -> None:
    """Run SQL over the atlas in FOLDER (views: units, classes, atlas).

    Example: netcarve atlas-query out/atlas "SELECT unit, effective_keep, pearson FROM units
    WHERE layer = 'features.11' AND effective_keep < 0.05 AND pearson >= 0.9"
    """
    from netcarve.atlas import atlas_query as run_query

    result = run_query(folder, sql)
    if fmt == "json":
        click.echo(json.dumps(result.records(), indent=1, default=str))
    elif fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(result.columns)
        writer.writerows(result.rows)
        click.echo(buf.getvalue(), nl=False)
    else:
        click.echo(result.text())


COMMANDS = (atlas, atlas_query)
