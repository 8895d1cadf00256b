"""``netcarve diagram``: draw a circuit file (or re-render a diagram JSON).

Registered in :mod:`netcarve.cli` with ``cli.add_command(diagram)``. Thin like every command:
it loads the circuit, the model named in its metadata and some images, and calls
:func:`netcarve.diagram.write_diagram`.
"""

from __future__ import annotations

from pathlib import Path

import click

from netcarve.cli.common import device_option as _device_option
from netcarve.cli.common import emit as _emit
from netcarve.cli.common import in_run_folder as _in_run_folder


def _formats(ctx: click.Context, param: click.Parameter, value: str) -> list[str]:
    from netcarve.core.errors import NetcarveError
    from netcarve.diagram import parse_formats

    try:
        return parse_formats(value)
    except NetcarveError as exc:
        raise click.BadParameter(str(exc)) from None


@click.command()
@click.argument("circuit", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Output folder (diagram.html, .svg, .png, .json).")
@click.option("--format", "formats", default="html,svg,png,json", show_default=True,
              callback=_formats, help="Comma-separated: html, svg, png, json.")
@click.option("--model", "model_spec", default=None,
              help="Zoo name or package.module:factory [default: the circuit's metadata].")
@click.option("--weights", type=click.Path(path_type=Path), default=None,
              help="Weight file (safetensors or a torch.save'd state dict).")
@click.option("--preset", default=None,
              help="Input preset (a zoo name) for a package.module:factory model.")
@click.option("--images-dir", type=click.Path(path_type=Path), default=None,
              help="Your own images (one sub-folder per class) for data-set examples.")
@click.option("--images", "n_images", type=click.IntRange(min=0), default=300,
              show_default=True, help="Images searched for data-set examples (0: none).")
@click.option("--examples", "top_k", type=click.IntRange(1, 16), default=4, show_default=True,
              help="Data-set examples per node.")
@click.option("--no-pictures", is_flag=True, help="Draw nodes without pictures.")
@click.option("--pruned-edges", is_flag=True,
              help="Also list pruned kernels between drawn nodes (faint, kept=false).")
@click.option("--title", default=None, help="Diagram title [default: target and model].")
@_device_option
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the image draw.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_in_run_folder
def diagram(circuit: Path, out: Path, formats: list[str], model_spec: str | None,
            weights: Path | None, preset: str | None, images_dir: Path | None, n_images: int,
            top_k: int, no_pictures: bool, pruned_edges: bool, title: str | None, device: str,
            seed: int, as_json: bool) -> None:
    """Draw CIRCUIT (a circuit file from `netcarve extract`) as HTML, SVG, PNG and JSON.

    CIRCUIT may also be a diagram .json written earlier: it is validated and re-rendered
    without the model.
    """
    from netcarve.diagram import load_diagram_json, render_diagram

    if circuit.suffix.lower() == ".json":
        data = load_diagram_json(circuit)
        files = render_diagram(data, out, formats)
    else:
        data, files = _draw_circuit(circuit, out, formats, model_spec, weights, preset,
                                    images_dir, n_images, top_k, no_pictures, pruned_edges,
                                    title, device, seed)
    summary = {
        "title": data["title"],
        "nodes": len(data["nodes"]),
        "edges": len(data["edges"]),
        "crossings": data.get("layout", {}).get("crossings"),
        "files": {f: str(p) for f, p in files.items()},
        "bytes": {f: p.stat().st_size for f, p in files.items()},
    }
    _emit(summary, as_json, f"{data['title']}: {summary['nodes']} nodes, {summary['edges']} "
                            f"edges\nwrote " + ", ".join(str(p) for p in files.values()))


def _draw_circuit(circuit_path: Path, out: Path, formats: list[str], model_spec: str | None,
                  weights: Path | None, preset: str | None, images_dir: Path | None,
                  n_images: int, top_k: int, no_pictures: bool, pruned_edges: bool,
                  title: str | None, device: str, seed: int) -> tuple[dict, dict[str, Path]]:
    from netcarve.circuits.circuit import Circuit, model_fingerprint
    from netcarve.cli.common import load_cli_model
    from netcarve.diagram import circuit_to_json, render_diagram
    from netcarve.training.evaluation import analysis_data

    circuit = Circuit.load(circuit_path)
    spec = _model_to_load(circuit_path, circuit.metadata.get("model"), model_spec)
    lm = load_cli_model(spec, weights, preset, device)
    recorded = circuit.metadata.get("model_fingerprint")
    if recorded and recorded != model_fingerprint(lm.model):
        click.echo(f"warning: {lm.name}'s weights differ from those the circuit was extracted "
                   "from (model fingerprint mismatch); weights and signs shown are the "
                   "current model's", err=True)
    images = None
    if n_images > 0 and not no_pictures:
        images, _ = analysis_data(lm.preset, n_images, 1,
                                  images_dir=None if images_dir is None else str(images_dir),
                                  seed=seed)
        images = images.to(device)
    data = circuit_to_json(circuit, lm.model, images=images, preset=lm.preset,
                           pictures=not no_pictures, model_name=lm.name, title=title,
                           pruned_edges=pruned_edges, top_k=top_k)
    return data, render_diagram(data, out, formats)


def _model_to_load(circuit_path: Path, label: object, model_spec: str | None) -> str:
    """The model spec to load: ``--model`` if given, else the file's label if it is a zoo name.

    A circuit file is data: the model it names is only a label, matched against the zoo's
    registered names and never imported or called (a ``module:function`` label from a file
    could run any code on this machine). Only a spec the user types is resolved as code.
    """
    from netcarve.core.errors import ModelSpecError
    from netcarve.zoo import ZOO

    shown = repr(label) if len(repr(label)) <= 80 else repr(label)[:77] + "..."
    if model_spec is not None:
        if isinstance(label, str) and label and label != model_spec:
            click.echo(f"warning: {circuit_path} was extracted from model {shown}; drawing it "
                       f"with --model {model_spec}", err=True)
        return model_spec
    if label is None or label == "":
        raise ModelSpecError(f"{circuit_path} does not name its model (no metadata 'model'): "
                             "pass --model (and --weights if needed)")
    if isinstance(label, str) and label in ZOO:
        return label
    raise ModelSpecError(
        f"{circuit_path} names its model {shown}, which is not a zoo model; netcarve never "
        "imports code named inside a file. If you trust the file, pass the model yourself: "
        "--model package.module:factory (and --weights)"
    )
