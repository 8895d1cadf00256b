"""The main job on the embedded default (what ``make demo`` runs).

Evaluates every bundled model on its real test data; extracts the circuit of one
``fmnist_vgg`` unit, cuts it out as a smaller module and draws its diagram; splits that unit
into sub-feature circuits; sweeps the criteria over a few units; and writes
``index.html`` linking every figure, table and diagram.
"""

from __future__ import annotations

import html
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .circuit import extract
from .evaluation import analysis_data
from .graph import ModelGraph
from .hooks import forward_until
from .report import zoo_report
from .subcircuits import subcircuits
from .sweep import sweep
from .zoo import load_model

DEMO_MODEL = "fmnist_vgg"
DEMO_TARGET = "features.11:5"
SWEEP_UNITS = ("features.4:3", "features.7:10", "features.11:40", "features.14:7")
SWEEP_IMAGES = 200
SUBCIRCUIT_IMAGES = 200


class _Page:
    """A tiny HTML page builder: every piece of text goes through ``html.escape``."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.parts: list[str] = []

    def h2(self, text: str) -> None:
        self.parts.append(f"<h2>{html.escape(text)}</h2>")

    def p(self, text: str) -> None:
        self.parts.append(f"<p>{html.escape(text)}</p>")

    def bullets(self, items: list[str]) -> None:
        self.parts.append("<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in items) + "</ul>")

    def links(self, items: list[tuple[str, str]]) -> None:
        self.parts.append("<p>" + " · ".join(
            f'<a href="{html.escape(href)}">{html.escape(label)}</a>' for label, href in items
        ) + "</p>")

    def image(self, src: str, alt: str, width: int = 900) -> None:
        self.parts.append(f'<p><a href="{html.escape(src)}"><img src="{html.escape(src)}" '
                          f'alt="{html.escape(alt)}" style="max-width:{width}px;width:100%">'
                          "</a></p>")

    def table(self, header: list[str], rows: list[list[Any]]) -> None:
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
            for row in rows
        )
        self.parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")

    def write(self, path: Path) -> None:
        style = ("body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}"
                 "table{border-collapse:collapse;margin:1em 0}"
                 "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
                 "th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}")
        path.write_text(
            f"<!doctype html><html><head><meta charset='utf-8'>"
            f"<title>{html.escape(self.title)}</title><style>{style}</style></head><body>"
            f"<h1>{html.escape(self.title)}</h1>" + "\n".join(self.parts) + "</body></html>\n"
        )


def _fmt(v: Any, digits: int = 3) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def run_demo(out_dir: str | Path = "out/demo", *, progress: bool = True,
             log: Callable[[str], None] = print) -> Path:
    """Run the demo and return the path of its ``index.html``.

    Args:
        out_dir: output folder (created).
        progress: show progress bars.
        log: where to report each step (``print`` by default).

    Returns:
        Path of ``index.html``.

    Example:
        >>> run_demo("out/demo")  # doctest: +SKIP
        PosixPath('out/demo/index.html')
    """
    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    page = _Page("netcarve demo: the embedded default")
    page.p("Every number on this page was measured by this run "
           f"(netcarve demo, seed 0, torch {torch.__version__}).")

    log("[1/5] evaluating the bundled models on their full test sets")
    _, zoo_results = zoo_report(out / "zoo", progress=progress)
    page.h2("Model zoo")
    page.table(["model", "data set", "test images", "measured top-1", "recorded at training"],
               [[r.name, r.dataset, f"{r.test_images:,}", f"{r.measured_accuracy:.2%}",
                 "—" if r.recorded_accuracy is None else f"{r.recorded_accuracy:.2%}"]
                for r in zoo_results])
    page.links([(f"{r.name} sample predictions", f"zoo/{r.figure}") for r in zoo_results]
               + [("zoo report (Markdown)", "zoo/zoo.md")])

    log(f"[2/5] extracting the circuit of {DEMO_MODEL} {DEMO_TARGET}")
    lm = load_model(DEMO_MODEL)
    scoring, heldout = analysis_data(lm.preset, 1000, 1000, seed=0)
    graph = ModelGraph.build(lm.model, scoring[:1])
    circuit = extract(lm.model, DEMO_TARGET, scoring, heldout=heldout, criterion="actgrad",
                      keep=0.1, seed=0, graph=graph)
    circuit.metadata["model"] = DEMO_MODEL
    cdir = out / "circuit"
    cdir.mkdir(exist_ok=True)
    circuit.save(cdir / "circuit.safetensors")
    module = circuit.to_module(lm.model, graph)
    with torch.no_grad(), circuit.masked(lm.model, graph) as masked:
        expected = forward_until(masked, circuit.target.layer, heldout[:64])
        got = module(heldout[:64])
    size = module.compare(lm.model, tuple(heldout.shape[1:]), graph)
    diff = float((got - expected[:, circuit.target.channels]).abs().max())
    summary = {"model": DEMO_MODEL, **circuit.summary(),
               "module": {**size, "max_abs_difference_vs_masked_model": diff}}
    (cdir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))

    log("[3/5] drawing the circuit diagram")
    from .diagram import write_diagram

    files = write_diagram(circuit, lm.model, cdir, images=scoring[:300], preset=lm.preset,
                          graph=graph, model_name=DEMO_MODEL)
    pres = circuit.preservation
    page.h2(f"Circuit of {DEMO_MODEL} unit {circuit.target}")
    page.bullets([
        f"criterion actgrad, keep 0.1 of {circuit.relevant_kernels:,} relevant kernels: "
        f"{circuit.kept_kernels:,} kept after the effective-mask clean-up "
        f"(effective keep {circuit.effective_keep:.3f})",
        f"preservation on 1,000 held-out test images: Pearson r = {pres.pearson:.3f}, "
        f"median per-image r = {pres.per_image_median:.3f}, normalised MAD = {pres.nmad:.3f}",
        f"preservation on the 1,000 scoring images: r = "
        f"{circuit.preservation_scoring.pearson:.3f}",
        f"extraction took {circuit.metadata['seconds']:.1f} s",
        f"standalone module: {size['parameters']:,} parameters and {size['macs']:,} "
        f"multiply-adds, against {size['original_parameters']:,} and "
        f"{size['original_macs']:,} for the whole model; largest difference from the "
        f"masked model {diff:.1e}",
    ])
    page.links([("interactive diagram", f"circuit/{files['html'].name}"),
                ("SVG", f"circuit/{files['svg'].name}"),
                ("diagram JSON", f"circuit/{files['json'].name}"),
                ("circuit file", "circuit/circuit.safetensors"),
                ("summary.json", "circuit/summary.json")])
    page.image(f"circuit/{files['png'].name}", "circuit diagram")
    page.table(["layer", "relevant kernels", "kept"],
               [[r["layer"], f"{r['relevant']:,}", f"{r['kept']:,}"]
                for r in circuit.per_layer()])

    log("[4/5] sub-feature circuits")
    rep = subcircuits(lm.model, circuit.target, scoring[:SUBCIRCUIT_IMAGES], n_groups=2,
                      general=circuit, criterion="actgrad", keep=0.1, sub_keep=0.5, seed=0,
                      graph=graph)
    sdir = out / "subcircuits"
    sdir.mkdir(exist_ok=True)
    for i, sc in enumerate(rep.subcircuits):
        sc.save(sdir / f"subcircuit_{i}.safetensors")
    sub_summary = rep.summary()
    (sdir / "summary.json").write_text(json.dumps(sub_summary, indent=2, default=str))
    page.h2("Sub-feature circuits (groups found by PCA + k-means)")
    rows = []
    for s in sub_summary["subcircuits"]:
        other = s["other_groups"][0] if s["other_groups"] else {}
        rows.append([f"group {s['group']}", s["images"], f"{s['kept_kernels']:,}",
                     f"{s['keep_vs_general']:.2f}", _fmt(s["own_group"]["pearson"]),
                     _fmt(other.get("pearson")), _fmt(s["own_group"]["nmad"]),
                     _fmt(other.get("nmad"))])
    page.table(["sub-circuit", "images", "kernels", "of general", "own-group r",
                "other-group r", "own-group NMAD", "other-group NMAD"], rows)
    ious = [mat[0][1] for mat in rep.iou.values()]
    page.p("Per-layer IoU between the two sub-circuits: " + ", ".join(
        f"{layer} {mat[0][1]:.2f}" for layer, mat in rep.iou.items()) +
        f" (mean {sum(ious) / len(ious):.2f}).")
    page.links([("summary.json", "subcircuits/summary.json")])

    log("[5/5] sweeping the criteria over a few units")
    res = sweep(lm.model, list(SWEEP_UNITS), scoring[:SWEEP_IMAGES], heldout[:SWEEP_IMAGES],
                graph=graph,
                progress=progress)
    wdir = out / "sweep"
    res.write_csv(wdir / "sweep.csv")
    res.plot(wdir / "sweep.png", title=f"{DEMO_MODEL}: preservation vs keep "
                                       f"({len(SWEEP_UNITS)} units)")
    page.h2("Criteria sweep")
    med = res.table("median")
    crits = list(med)
    keeps = sorted({k for v in med.values() for k in v}, reverse=True)
    page.table(["keep", *crits], [[f"{k:g}", *[_fmt(med[c][k]) for c in crits]]
                                  for k in keeps])
    page.p("Median held-out Pearson r over units (a collapsed circuit counts as 0).")
    page.image("sweep/sweep.png", "preservation vs keep", width=700)
    page.links([("sweep.csv", "sweep/sweep.csv")])

    page.p(f"Total time {time.perf_counter() - start:.0f} s.")
    index = out / "index.html"
    page.write(index)
    return index
