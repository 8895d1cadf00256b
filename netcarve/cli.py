"""The ``netcarve`` command line. Thin by design: every command is one call into the API."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import click

from . import __version__
from .errors import NetcarveError


def _fail_cleanly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn user mistakes (NetcarveError) into a one-line message and a meaningful exit code."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except NetcarveError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)

    return wrapper


def _emit(data: Any, as_json: bool, text: str) -> None:
    click.echo(json.dumps(data, indent=2) if as_json else text)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="netcarve")
def cli() -> None:
    """netcarve: interpret convolutional networks by pruning them.

    Exit codes: 0 success, 1 unexpected failure, 2 bad arguments or names,
    3 data problem, 4 weight-file problem.
    """


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_fail_cleanly
def models(as_json: bool) -> None:
    """List the model zoo with the recorded test accuracy of bundled weights."""
    from .zoo import ZOO

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
    _emit(rows, as_json, "\n".join(lines))


@cli.command()
@click.argument("name")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Override the recipe.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Weight file to write (default: the zoo's bundled file).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_fail_cleanly
def train(name: str, epochs: int | None, seed: int, out: Path | None, as_json: bool) -> None:
    """Train bundled model NAME from scratch and save its weights with metadata."""
    from .training import train_model

    result = train_model(name, out, epochs=epochs, seed=seed, progress=not as_json)
    data = {"name": name, "path": str(result.path), "test_accuracy": result.test_accuracy,
            "seconds": result.seconds, "metadata": result.metadata}
    _emit(data, as_json, f"{name}: test accuracy {result.test_accuracy:.2%} → {result.path}")


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
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_fail_cleanly
def evaluate(model: str, weights: Path | None, preset: str | None, images_dir: Path | None,
             split: str, limit: int | None, batch_size: int, device: str, as_json: bool) -> None:
    """Measure top-1 accuracy of MODEL (zoo name or package.module:factory)."""
    from .data import load_image_folder
    from .evaluation import evaluate as run_evaluate
    from .evaluation import reference_data
    from .zoo import load_model

    lm = load_model(model, weights, preset=preset, device=device)
    if images_dir is not None:
        folder = load_image_folder(images_dir, lm.preset)
        x, y = folder.images, folder.labels
        if limit is not None:
            x, y = x[:limit], y[:limit]
    else:
        x, y = reference_data(lm.preset, split, limit)
    result = run_evaluate(lm.model, x, y, lm.preset, batch_size=batch_size, device=device,
                          progress=not as_json)
    data = {"model": lm.name, "weights": lm.weights, **result.to_dict()}
    _emit(data, as_json, f"{lm.name}: top-1 {result.accuracy:.2%} on {result.n:,} images "
                         f"(loss {result.loss:.4f})")


@cli.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("out/demo"),
              show_default=True)
@_fail_cleanly
def demo(out: Path) -> None:
    """Run the main job on the embedded default and print the report's path."""
    from .report import zoo_report

    path = zoo_report(out, progress=True)
    click.echo(str(path))


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="netcarve")


if __name__ == "__main__":
    main()
