"""The main job on the embedded default (what ``make demo`` runs).

It evaluates every bundled model on its real test data, then extracts the circuit of one
``fmnist_vgg`` unit, turns it into a standalone smaller module, and writes one Markdown report
linking everything.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .circuit import extract
from .evaluation import analysis_data
from .report import accuracy_table, zoo_report
from .zoo import load_model

DEMO_MODEL = "fmnist_vgg"
DEMO_TARGET = "features.11:5"


def run_demo(out_dir: str | Path = "out/demo", *, progress: bool = True) -> Path:
    """Run the demo and return the path of its report.

    Args:
        out_dir: output folder (created).
        progress: show progress bars.

    Returns:
        Path of ``report.md``.

    Example:
        >>> run_demo("out/demo")  # doctest: +SKIP
        PosixPath('out/demo/report.md')
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    zoo_md, zoo_results = zoo_report(out / "zoo", progress=progress)

    lm = load_model(DEMO_MODEL)
    scoring, heldout = analysis_data(lm.preset, 1000, 1000, seed=0)
    circuit = extract(lm.model, DEMO_TARGET, scoring, heldout=heldout, criterion="actgrad",
                      keep=0.1, seed=0)
    circuit.metadata["model"] = DEMO_MODEL
    cdir = out / "circuit"
    cdir.mkdir(exist_ok=True)
    circuit.save(cdir / "circuit.safetensors")
    summary = {"model": DEMO_MODEL, **circuit.summary()}
    module = circuit.to_module(lm.model)
    with torch.no_grad(), circuit.masked(lm.model) as masked:
        from .hooks import forward_until

        z = forward_until(masked, circuit.target.layer, heldout[:64])
        expected = z[:, circuit.target.channels]
        got = module(heldout[:64])
    summary["module"] = {
        **module.compare(lm.model, tuple(heldout.shape[1:])),
        "max_abs_difference_vs_masked_model": float((got - expected).abs().max()),
    }
    (cdir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))

    pres = circuit.preservation
    m = summary["module"]
    lines = [
        "# netcarve demo",
        "",
        "## Model zoo",
        "",
        "Every bundled model measured on its full real test set "
        f"([zoo report]({zoo_md.relative_to(out)})):",
        "",
        accuracy_table(zoo_results),
        "",
        f"## Circuit of `{DEMO_MODEL}` unit `{circuit.target}`",
        "",
        f"- criterion `actgrad`, keep 0.1 of {circuit.relevant_kernels:,} relevant kernels: "
        f"{circuit.kept_kernels:,} kept after the effective-mask clean-up "
        f"(effective keep {circuit.effective_keep:.3f})",
        f"- preservation on 1,000 held-out test images: Pearson r = {pres.pearson:.3f}, "
        f"median per-image r = {pres.per_image_median:.3f}, normalised MAD = {pres.nmad:.3f}",
        f"- preservation on the 1,000 scoring images: r = "
        f"{circuit.preservation_scoring.pearson:.3f}",
        f"- extraction took {circuit.metadata['seconds']:.1f} s",
        f"- standalone module (`circuit.to_module()`): {m['parameters']:,} parameters and "
        f"{m['macs']:,} multiply-adds vs {m['original_parameters']:,} and "
        f"{m['original_macs']:,} for the whole model; largest difference from the masked "
        f"model {m['max_abs_difference_vs_masked_model']:.2e}",
        "",
        "| layer | relevant kernels | kept |",
        "|---|---|---|",
        *[f"| {r['layer']} | {r['relevant']:,} | {r['kept']:,} |" for r in circuit.per_layer()],
        "",
        "Files: [circuit.safetensors](circuit/circuit.safetensors), "
        "[summary.json](circuit/summary.json).",
    ]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report
