"""The main job on the embedded default (what ``make demo`` runs).

Evaluates every bundled model on its real test data; extracts the circuit of one
``fmnist_vgg`` unit at the smallest keep that preserves its feature (keep search, r >= 0.8),
cuts it out as a smaller module and draws its diagram with a feature visualisation on every
node; splits that unit into sub-feature circuits (next to random
groups of the same sizes as the control); sweeps the criteria
over a few units; scores one layer's filters with class-wise CAR; maps 16 units of one layer
into a small atlas on Ray; and writes ``index.html`` linking every figure, table and diagram.
"""

from __future__ import annotations

import html
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from netcarve.car.scores import car_scores
from netcarve.circuits.keep_search import find_keep
from netcarve.circuits.subcircuits import subcircuits
from netcarve.circuits.subfeature_stats import subfeature_statistic
from netcarve.circuits.sweep import sweep
from netcarve.core.graph import ModelGraph
from netcarve.core.hooks import forward_until
from netcarve.reproduce.zoo_report import zoo_report
from netcarve.training.evaluation import analysis_data, reference_data
from netcarve.zoo import load_model

DEMO_MODEL = "fmnist_vgg"
# The unit with the clearest sub-features on held-out images among the 24 units measured in
# bench/RESULTS.md (double difference +0.127, CI [+0.108, +0.144], random splits ~0).
DEMO_TARGET = "features.11:8"
SWEEP_UNITS = ("features.4:3", "features.7:10", "features.11:40", "features.14:7")
SWEEP_IMAGES = 200
SUBCIRCUIT_IMAGES = 200
CAR_LAYER = "features.7"
CAR_IMAGES = 1000
FEATUREVIZ_STEPS = 64
DEMO_GOAL = 0.8
ATLAS_LAYER = "features.11"
ATLAS_UNITS = 16
ATLAS_WORKERS = 2


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
             log: Callable[[str], None] = print, quick: bool = False) -> Path:
    """Run the demo and return the path of its ``index.html``.

    Args:
        out_dir: output folder (created).
        progress: show progress bars.
        log: where to report each step (``print`` by default).
        quick: a small version of every step (fewer images, steps and units; the zoo is
            evaluated on 1,000 test images each) that checks the whole pipeline in seconds.

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
           f"(netcarve demo{' --quick' if quick else ''}, seed 0, torch {torch.__version__}).")
    steps: list[tuple[str, float]] = []

    def step(message: str) -> None:
        now = time.perf_counter()
        if steps:
            steps[-1] = (steps[-1][0], now - steps[-1][1])
        steps.append((message, now))
        log(message)

    n_analysis = 200 if quick else 1000
    sweep_images = 60 if quick else SWEEP_IMAGES
    sweep_units = list(SWEEP_UNITS[1:3] if quick else SWEEP_UNITS)
    sub_images = 80 if quick else SUBCIRCUIT_IMAGES
    car_images = 300 if quick else CAR_IMAGES
    viz_steps = 8 if quick else FEATUREVIZ_STEPS

    step("[1/7] evaluating the bundled models on their "
        + ("first 1,000 test images" if quick else "full test sets"))
    _, zoo_results = zoo_report(out / "zoo", progress=progress, limit=1000 if quick else None)
    page.h2("Model zoo")
    page.table(["model", "data set", "test images", "measured top-1", "recorded at training"],
               [[r.name, r.dataset, f"{r.test_images:,}", f"{r.measured_accuracy:.2%}",
                 "—" if r.recorded_accuracy is None else f"{r.recorded_accuracy:.2%}"]
                for r in zoo_results])
    page.links([(f"{r.name} sample predictions", f"zoo/{r.figure}") for r in zoo_results]
               + [("zoo report (Markdown)", "zoo/zoo.md")])

    step(f"[2/7] extracting the circuit of {DEMO_MODEL} {DEMO_TARGET} (keep search)")
    lm = load_model(DEMO_MODEL)
    scoring, heldout = analysis_data(lm.preset, n_analysis, n_analysis, seed=0)
    graph = ModelGraph.build(lm.model, scoring[:1])
    # The keep is chosen on the scoring images, so the held-out r below is an unbiased report.
    search = find_keep(lm.model, DEMO_TARGET, scoring, heldout=heldout, goal=DEMO_GOAL,
                       criterion="actgrad", search_on="scoring", seed=0, graph=graph)
    circuit = search.circuit
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

    step("[3/7] drawing the circuit diagram with a feature visualisation on every node")
    from netcarve.diagram import write_diagram
    from netcarve.diagram.pictures import compose, default_pictures, kernel_pictures
    from netcarve.viz.pictures import featureviz_pictures

    # First-layer nodes keep their kernel as picture; every other node shows what it computes
    # inside the circuit (activation maximisation with the circuit's masks applied).
    pictures = compose(kernel_pictures,
                       featureviz_pictures(steps=viz_steps, seed=0, circuit=circuit),
                       default_pictures())
    viz_start = time.perf_counter()
    files = write_diagram(circuit, lm.model, cdir, images=scoring[:300], preset=lm.preset,
                          graph=graph, model_name=DEMO_MODEL, pictures=pictures)
    viz_seconds = time.perf_counter() - viz_start
    pres = circuit.preservation
    page.h2(f"Circuit of {DEMO_MODEL} unit {circuit.target}")
    page.bullets([
        f"keep chosen by keep search: the smallest actgrad circuit whose r on the scoring "
        f"images reaches {DEMO_GOAL:g} ({'reached' if search.reached else 'NOT reached'} at "
        f"keep {search.keep:.3f} after {search.evaluations} sampled keeps, "
        f"{search.seconds:.1f} s); the held-out images below played no part in the choice",
        f"criterion actgrad, keep {search.keep:.3f} of {circuit.relevant_kernels:,} relevant "
        f"kernels: {circuit.kept_kernels:,} kept after the effective-mask clean-up "
        f"(effective keep {circuit.effective_keep:.3f})",
        f"preservation on {len(heldout):,} held-out test images: Pearson r = {pres.pearson:.3f}, "
        f"median per-image r = {pres.per_image_median:.3f}, normalised MAD = {pres.nmad:.3f}",
        f"preservation on the {len(scoring):,} scoring images: r = "
        f"{circuit.preservation_scoring.pearson:.3f}",
        f"extraction took {circuit.metadata['seconds']:.1f} s; the diagram with its node "
        f"visualisations ({viz_steps} optimisation steps per node) {viz_seconds:.1f} s",
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
    page.p("Hover on a node in the interactive diagram for its feature visualisation and its "
           "top data-set examples (exact receptive fields); first-layer nodes show their "
           "kernels.")
    page.image(f"circuit/{files['png'].name}", "circuit diagram")
    page.table(["layer", "relevant kernels", "kept"],
               [[r["layer"], f"{r['relevant']:,}", f"{r['kept']:,}"]
                for r in circuit.per_layer()])
    page.p("The keep search's sampled points (r on the scoring images; the control is the "
           "same search's smaller keeps, which miss the goal):")
    page.table(["keep", "kernels kept", "scoring r", "goal reached"],
               [[f"{p['keep']:.4f}", f"{p['kept_kernels']:,}", _fmt(p["pearson"]),
                 "yes" if p["reached"] else "no"] for p in search.curve])

    step("[4/7] sub-feature circuits, with random groups as the control")
    sub_x = scoring[:sub_images]
    rep = subcircuits(lm.model, circuit.target, sub_x, n_groups=2, general=circuit,
                      criterion="actgrad", keep=search.keep, sub_keep=0.5, seed=0,
                      graph=graph)
    # Control: the same images in random groups of the same sizes. Sub-circuits that hold
    # for their own group beat the other group by more than random groups do.
    perm = torch.randperm(len(rep.groups), generator=torch.Generator().manual_seed(1))
    shuffled = [rep.groups[i] for i in perm.tolist()]
    control = subcircuits(lm.model, circuit.target, sub_x, groups=shuffled, general=circuit,
                          criterion="actgrad", keep=search.keep, sub_keep=0.5, seed=0,
                          graph=graph)
    sdir = out / "subcircuits"
    sdir.mkdir(exist_ok=True)
    for i, sc in enumerate(rep.subcircuits):
        sc.save(sdir / f"subcircuit_{i}.safetensors")
    sub_summary = rep.summary()
    advantage = {"k-means": _own_advantage(rep), "random (control)": _own_advantage(control)}
    sub_summary["control"] = {**control.summary(),
                              "split": "random groups of the same sizes"}
    sub_summary["own_group_advantage"] = advantage
    (sdir / "summary.json").write_text(json.dumps(sub_summary, indent=2, default=str))
    page.h2("Sub-feature circuits (groups found by PCA + k-means, against random groups)")
    rows = []
    for split, report in (("k-means", rep), ("random (control)", control)):
        for s in report.summary()["subcircuits"]:
            other = s["other_groups"][0] if s["other_groups"] else {}
            own_r, other_r = s["own_group"]["pearson"], other.get("pearson")
            rows.append([f"{split} group {s['group']}", s["images"], f"{s['kept_kernels']:,}",
                         f"{s['keep_vs_general']:.2f}", _fmt(own_r), _fmt(other_r),
                         _fmt(None if own_r is None or other_r is None else own_r - other_r),
                         _fmt(s["own_group"]["nmad"]), _fmt(other.get("nmad"))])
    page.table(["sub-circuit", "images", "kernels", "of general", "own-group r",
                "other-group r", "own − other", "own-group NMAD", "other-group NMAD"], rows)
    page.p("Each group's images are halved: one half scores its sub-circuit, the other "
           "measures it (own group) and the other sub-circuit (other group). Mean own-group "
           f"advantage (own − other r over both sub-circuits): k-means "
           f"{_fmt(advantage['k-means'])}, random groups {_fmt(advantage['random (control)'])}"
           " -- the sub-features are real only where k-means clearly beats the control.")
    ious = [mat[0][1] for mat in rep.iou.values()]
    page.p("Per-layer IoU between the two k-means sub-circuits: " + ", ".join(
        f"{layer} {mat[0][1]:.2f}" for layer, mat in rep.iou.items()) +
        f" (mean {sum(ious) / len(ious):.2f}).")
    # The stricter test: grouping fitted on scoring images assigns held-out images; the
    # double difference of the sub-circuits there, against random splits of the same sizes.
    st = subfeature_statistic(lm.model, circuit.target, sub_x, heldout[:sub_images], circuit,
                              sub_keep=0.5, bootstrap=200 if quick else 1000,
                              random_splits=4 if quick else 20, seed=0, graph=graph)
    lo, hi = st.random_interval
    sub_summary["heldout_test"] = {**st.row(), "r": st.r, "random": st.random}
    (sdir / "summary.json").write_text(json.dumps(sub_summary, indent=2, default=str))
    page.p(f"Held-out test: the k-means grouping fitted on these images assigns "
           f"{sub_images} held-out images (groups {st.groups_heldout}); double difference of "
           f"the two sub-circuits there {st.double_difference:+.3f} (95% bootstrap CI "
           f"{st.ci[0]:+.3f} to {st.ci[1]:+.3f}) against {len(st.random)} random splits of "
           f"the same sizes: mean {st.random_mean:+.3f}, 95% range {lo:+.3f} to {hi:+.3f}; "
           f"p = {st.p_value:.3f}.")
    page.links([("summary.json", "subcircuits/summary.json")])

    step("[5/7] sweeping the criteria over a few units")
    res = sweep(lm.model, sweep_units, scoring[:sweep_images], heldout[:sweep_images],
                graph=graph, progress=progress)
    wdir = out / "sweep"
    res.write_csv(wdir / "sweep.csv")
    res.plot(wdir / "sweep.png", title=f"{DEMO_MODEL}: preservation vs keep "
                                       f"({len(sweep_units)} units)")
    page.h2("Criteria sweep")
    med = res.table("median")
    crits = list(med)
    keeps = sorted({k for v in med.values() for k in v}, reverse=True)
    page.table(["keep", *crits], [[f"{k:g}", *[_fmt(med[c][k]) for c in crits]]
                                  for k in keeps])
    page.p("Median held-out Pearson r over units (a collapsed circuit counts as 0).")
    page.image("sweep/sweep.png", "preservation vs keep", width=700)
    page.links([("sweep.csv", "sweep/sweep.csv")])

    step(f"[6/7] class-wise CAR of {DEMO_MODEL} {CAR_LAYER}")
    _car_section(page, lm, graph, out / "car", car_images)

    units = 4 if quick else ATLAS_UNITS
    workers = 0 if quick else ATLAS_WORKERS
    step(f"[7/7] a small atlas: {units} units of {DEMO_MODEL} {ATLAS_LAYER}"
         + (f" on {workers} Ray workers" if workers else " (quick: in this process)"))
    _atlas_section(page, lm, out / "atlas", units, workers, quick)

    step("done")
    page.h2("Time per step")
    page.table(["step", "seconds"], [[m, f"{t:.1f}"] for m, t in steps[:-1]])
    page.p(f"Total time {time.perf_counter() - start:.0f} s.")
    index = out / "index.html"
    page.write(index)
    return index


def _own_advantage(report: Any) -> float | None:
    """Mean over sub-circuits of own-group minus other-group held-out r (None if undefined):
    ``(r00 + r11 - r01 - r10) / 2`` for two groups."""
    n = len(report.subcircuits)
    diffs = [report.preservation[i][i].pearson - report.preservation[i][j].pearson
             for i in range(n) for j in range(n) if j != i]
    finite = [d for d in diffs if d is not None and d == d]
    return sum(finite) / len(finite) if len(finite) == len(diffs) and diffs else None


def _atlas_section(page: _Page, lm: Any, out: Path, units: int, workers: int,
                   quick: bool) -> None:
    try:
        from netcarve.atlas import AtlasConfig, AtlasStore, run_atlas
    except ImportError:
        page.h2("Atlas")
        page.p("Skipped: the atlas needs its extra (pip install 'netcarve[atlas]').")
        return
    import shutil

    shutil.rmtree(out, ignore_errors=True)  # a demo atlas is always made afresh
    n = 60 if quick else 150
    scoring, heldout = analysis_data(lm.preset, n, n, seed=1)
    x, y = reference_data(lm.preset, "test", 200 if quick else 500)
    config = AtlasConfig(goal=0.9, compare=("snip", "random"), featureviz_steps=8 if quick
                         else 32, examples=4)
    run = run_atlas(lm.model, ATLAS_LAYER, out, scoring, heldout, units=units, config=config,
                    car_images=x, car_labels=y, preset=lm.preset, model_name=DEMO_MODEL,
                    workers=workers, task_units=2, progress=False)
    rows = AtlasStore(out).rows()
    classes = AtlasStore(out).classes()
    page.h2(f"Atlas of {DEMO_MODEL} {ATLAS_LAYER} ({len(rows)} units)")
    page.p(f"Each unit's smallest actgrad circuit with held-out r >= {config.goal:g} "
           f"({n} scoring and {n} held-out images), mapped in {run.seconds:.1f} s "
           f"({run.units_per_minute:.1f} units/minute, "
           f"{f'{workers} Ray workers' if workers else 'in this process'}). The control in "
           "every row: a random circuit of the same size.")
    table = []
    for r in sorted(rows, key=lambda r: r["effective_keep"]):
        rand = [c for c in r["comparison"]
                if c["criterion"] == "random" and abs(c["keep"] - r["keep"]) < 1e-12]
        cls = classes.get((r["layer"], r["unit"]))
        table.append([f"{r['layer']}:{r['unit']}", f"{r['effective_keep']:.3f}",
                      _fmt(r["pearson"]), _fmt(rand[0]["pearson"] if rand else None),
                      "—" if cls is None else ", ".join(cls["most_important"][:2])])
    page.table(["unit", "effective keep", "held-out r", "random circuit, same keep",
                "most important classes"], table)
    page.links([("browse the atlas (sortable, filterable, one page per unit)",
                 "atlas/index.html")])


def _car_section(page: _Page, lm: Any, graph: ModelGraph, out: Path, n_images: int) -> None:
    # Scored on training images so the test set stays untouched for accuracy claims.
    images, labels = reference_data(lm.preset, "train", limit=n_images)
    report = car_scores(lm.model, images, labels, [CAR_LAYER], preset=lm.preset, graph=graph,
                        model_name=DEMO_MODEL)
    layer = report.layers[CAR_LAYER]
    classwise = report.classwise(CAR_LAYER)
    out.mkdir(parents=True, exist_ok=True)
    report.save(out / "car_scores.csv")
    classwise.save(out / "classwise.csv")
    (out / "summary.json").write_text(json.dumps(
        {"model": DEMO_MODEL, "images": n_images, "car": report.to_dict(),
         "classwise": classwise.to_dict()}, indent=2, default=str))
    most, least = classwise.most_important(), classwise.least_important()
    index = {f: i for i, f in enumerate(layer.filters)}
    ranked = [index[f] for f in layer.ranking()[::-1]]  # most important first
    counts = report.counts
    page.h2(f"Class-wise CAR of {DEMO_MODEL} {CAR_LAYER}")
    page.p(f"Each of the layer's {len(layer.filters)} filters removed on its own, top-1 accuracy "
           f"on {n_images:,} training images (unpruned {layer.base_accuracy:.2%}); the ablation "
           f"engine ran {counts.prefix_passes + counts.suffix_passes:,} partial passes where a "
           f"naive loop needs {counts.naive_passes:,} full ones ({report.seconds:.1f} s).")
    page.table(["filter", "CAR (accuracy drop)", "loss increase", "most important class",
                "least important class"],
               [[f"{CAR_LAYER}:{layer.filters[i]}", f"{float(layer.car[i]):.4f}",
                 f"{float(layer.loss_car[i]):.4f}", most[layer.filters[i]][0],
                 least[layer.filters[i]][0]] for i in ranked[:10]])
    page.p("The ten filters whose removal costs most accuracy. The heat map shows every "
           "filter's accuracy drop per class (red: the class loses accuracy without it).")
    page.image("car/classwise.png", "class-wise CAR heat map", width=700)
    page.links([("CAR scores (CSV)", "car/car_scores.csv"),
                ("class-wise CAR (CSV)", "car/classwise.csv"),
                ("summary.json", "car/summary.json")])
