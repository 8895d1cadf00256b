"""``netcarve reproduce``: report header, the quick mode of every experiment, determinism, CLI."""

from __future__ import annotations

import csv
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from netcarve.cli.main import cli
from netcarve.reproduce import EXPERIMENTS
from netcarve.reproduce.car import CarSettings, run_car
from netcarve.reproduce.circuits import CircuitsSettings, plan_units, run_circuits, statistics
from netcarve.reproduce.fop import FopSettings, run_fop
from netcarve.reproduce.report import (
    Report,
    ReproduceError,
    canonical_command,
    environment,
    run_context,
)
from netcarve.reproduce.subfeatures import SubfeatureSettings, run_subfeatures

HEADER_FIELDS = ("- Command: `netcarve reproduce", "- Seed: ", "- Mode: ", "- Versions: netcarve ",
                 "torch ", "Python ", "- Platform: ", "- Date: ", "- Wall time: ")


def _check_header(report: Path, name: str, seed: int, quick: bool = True) -> str:
    text = report.read_text()
    head = text.split("\n## ", 1)[0]
    for field in HEADER_FIELDS:
        assert field in head, f"{field!r} missing from the header of {report}"
    assert f"netcarve reproduce {name}" in head
    assert f"- Seed: {seed}" in head
    assert ("quick" in head) == quick
    assert torch.__version__ in head
    return text


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def _is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- shared pieces


def test_report_renders_header_tables_and_summary(tmp_path):
    rep = Report("demo", "A demo", command="netcarve reproduce demo --seed 4", seed=4,
                 threads=1)
    rep.h2("Section")
    rep.table(["a", "b"], [[1, 0.12345], ["x", None]])
    path = rep.write(tmp_path, {"headline": 1.5})
    text = path.read_text()
    assert text.startswith("# A demo\n")
    for field in ("- Command: `netcarve reproduce demo --seed 4`", "- Seed: 4", "- Mode: full",
                  "- Versions: netcarve ", "- Date: ", "- Wall time: "):
        assert field in text
    assert "| 1 | 0.123 |" in text and "| x | — |" in text
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["headline"] == 1.5 and summary["seed"] == 4
    assert set(summary["environment"]) >= {"netcarve", "torch", "python", "platform", "date"}


def test_canonical_command_and_environment():
    assert canonical_command("car", quick=False, seed=2, out="o") == \
        "netcarve reproduce car --seed 2 --out o"
    assert canonical_command("fop", quick=True, seed=0, out="o", threads=2).endswith(
        "--threads 2")
    env = environment(threads=3)
    assert env["threads"] == 3 and env["torch"] == torch.__version__


def test_run_context_restores_threads_and_global_rng():
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    with run_context(seed=7, threads=1):
        inside = torch.rand(3)
    assert torch.equal(torch.rand(3), expected)
    assert torch.get_num_threads() == threads
    with run_context(seed=7, threads=1):
        assert torch.equal(torch.rand(3), inside)
    with pytest.raises(ReproduceError), run_context(seed=0, threads=0):
        pass


def test_bad_settings_and_output_folder_raise_clear_errors(tmp_path):
    with pytest.raises(ReproduceError, match="unknown model"):
        CircuitsSettings(models=("nope",)).check()
    with pytest.raises(ReproduceError, match="keep"):
        CircuitsSettings(keeps=(0.0,)).check()
    with pytest.raises(ReproduceError, match="top_images"):
        SubfeatureSettings(top_images=4).check()
    with pytest.raises(ReproduceError, match="ratio"):
        CarSettings(ratio=1.0).check()
    with pytest.raises(ReproduceError, match="greedy_mode"):
        CarSettings(greedy_mode="fast").check()
    with pytest.raises(ReproduceError, match="fine-tuning"):
        FopSettings(settings=((0.0, 1),)).check()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ReproduceError, match="not a folder"):
        run_circuits(blocker, settings=CircuitsSettings(models=("fmnist_vgg",), units=1))


def test_units_cover_every_conv_layer_after_the_stem():
    layers, targets = plan_units("fmnist_resnet", 60)
    assert len(targets) >= 60
    assert {t.rsplit(":", 1)[0] for t in targets} == set(layers)
    assert "conv1" not in layers and "layer3.downsample.0" in layers


def test_statistics_count_collapse_as_zero():
    rows = [{"model": "m", "criterion": "c", "keep": 0.1, "pearson": p, "collapsed": col,
             "effective_keep": e}
            for p, col, e in ((0.9, False, 0.1), (None, True, 0.0), (0.5, False, 0.05))]
    s = statistics(rows)[0]
    assert s["median"] == 0.5 and s["q1"] == 0.25
    assert s["collapse_fraction"] == pytest.approx(1 / 3)
    assert s["effective_keep_median"] == 0.05


# --------------------------------------------------------------------------- quick runs


@pytest.fixture(scope="module")
def circuits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("circuits")
    return out, run_circuits(out, quick=True, seed=0)


def test_circuits_quick_writes_report_tables_and_figure(circuits_run):
    out, summary = circuits_run
    text = _check_header(out / "report.md", "circuits", 0)
    assert "AlexNet" in text and "Fashion-MNIST" in text
    assert "0.925" in text  # the paper's number, side by side with ours
    assert _is_png(out / "comparison.png")
    quick = CircuitsSettings.quick()
    for model in quick.models:
        rows = _rows(out / f"{model}_sweep.csv")
        assert len({r["unit"] for r in rows}) == summary["units"][model] >= quick.units
        assert len(rows) == summary["units"][model] * len(quick.criteria) * len(quick.keeps)
    stats = _rows(out / "statistics.csv")
    assert len(stats) == len(quick.models) * len(quick.criteria) * len(quick.keeps)
    for s in stats:
        q1, med, q3 = float(s["q1"]), float(s["median"]), float(s["q3"])
        assert -1 <= q1 <= med <= q3 <= 1
        assert 0 <= float(s["collapse_fraction"]) <= 1
        assert 0 <= float(s["effective_keep_median"]) <= float(s["keep"]) + 1e-9
    best = {(s["model"], s["criterion"]): float(s["median"]) for s in stats
            if float(s["keep"]) == 0.5}
    for model in quick.models:
        assert best[(model, "actgrad")] > 0.5
    assert json.loads((out / "summary.json").read_text())["quick"] is True


@pytest.fixture(scope="module")
def subfeatures_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("subfeatures")
    return out, run_subfeatures(out, quick=True, seed=0)


def test_subfeatures_quick_picks_a_unit_and_reports_subcircuits(subfeatures_run):
    out, summary = subfeatures_run
    text = _check_header(out / "report.md", "subfeatures", 0)
    assert f"Chosen unit: {summary['chosen']}" in text
    for name in ("groups.png", "embedding.png", "preservation.png"):
        assert _is_png(out / name)
    scan = _rows(out / "scan.csv")
    assert scan[0]["unit"] == summary["chosen"]
    for r in scan:
        assert -1 <= float(r["silhouette"]) <= 1
        assert 0 <= float(r["class_separation"]) <= 1
    subs = _rows(out / "subcircuits.csv")
    assert {r["split"] for r in subs} == {"k-means", "random"}
    for r in subs:
        assert -1 <= float(r["pearson"]) <= 1 and float(r["nmad"]) >= 0
        assert 0 < float(r["keep_vs_general"]) <= 1
        assert float(r["keep_vs_model"]) <= SubfeatureSettings().keep + 1e-9
    for r in _rows(out / "iou.csv"):
        assert 0 <= float(r["iou"]) <= 1
    head = summary["headline"]
    assert head["unit"] == summary["chosen"] and "k-means" in head and "random" in head
    # the held-out double difference of every scanned unit, both groupings, with its control
    dd = _rows(out / "double_difference.csv")
    assert {(r["unit"], r["grouping"]) for r in dd} == {
        (r["unit"], g) for r in scan for g in ("scores", "responses")}
    for r in dd:
        if r["double_difference"] not in ("nan", ""):
            assert float(r["ci_low"]) <= float(r["double_difference"]) <= float(r["ci_high"])
            assert 0 < float(r["p_value"]) <= 1
    assert head["double_difference"]["better_grouping"] in ("scores", "responses")
    assert "Do the sub-features hold on held-out images?" in text


@pytest.fixture(scope="module")
def car_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("car")
    return out, run_car(out, quick=True, seed=0)


def test_car_quick_writes_curves_half_table_and_colour(car_run):
    out, summary = car_run
    text = _check_header(out / "report.md", "car", 0)
    assert "26%" in text and "17/20" in text  # the paper's figures, beside ours
    assert _is_png(out / "curves" / "curves.png") and _is_png(out / "colour.png")
    curves = _rows(out / "curves" / "curves.csv")
    methods = {r["method"] for r in curves}
    assert methods == {"car", "random", "l1", "mean_activation", "apoz", "taylor"}
    assert {r["finetuned"] for r in curves} == {"True", "False"}
    for r in curves:
        assert 0 <= float(r["accuracy"]) <= 1
    table = summary["half_table"]
    layers = CarSettings().layers
    assert [r["layer"] for r in table if not r["finetuned"]] == list(layers)
    for r in table:
        assert r["unpruned"] > 0.85
        assert r["pruned"] == r["filters"] // 2
        assert r["car"] >= r["random"] - 0.05  # CAR is not worse than a random order
    assert summary["colour"]["model"] == "shapes_clutter_cnn"
    assert summary["colour_control"]["model"] == "shapes_colour_cnn"
    assert _is_png(out / "colour_control.png") and "where colour is the label" in text
    for res in (summary["colour"], summary["colour_control"]):
        assert 0 <= res["grey_accuracy"] <= res["test_accuracy"] + 0.05
        assert {r["order"] for r in res["rows"]} == {"greedy CAR", "one-shot CAR", "L1"}
        for r in res["rows"]:
            assert 0 <= r["pruned_fraction"] <= 1 and 0 <= r["p_value"] <= 1
            assert r["k"] == 20 and r["pruned_colour"] + r["kept_colour"] <= 48
            for key in ("p_perm_more", "p_perm_less", "p_index_more", "p_index_less"):
                assert 1 / 1001 <= r[key] <= 1
            # the two one-sided p-values cover every relabelling at least once between them
            assert r["p_perm_more"] + r["p_perm_less"] >= 1
    assert len(_rows(out / "greedy_order.csv")) == sum(r["pruned"] for r in table
                                                        if not r["finetuned"])


@pytest.fixture(scope="module")
def fop_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fop")
    return out, run_fop(out, quick=True, seed=0)


def test_fop_quick_compares_at_identical_macs(fop_run):
    out, summary = fop_run
    text = _check_header(out / "report.md", "fop", 0)
    assert "68.88%" in text
    head = summary["headline"][0]
    assert 0 < head["macs_removed"] < 1 and 0 < head["params_removed"] < 1
    for method in ("functional+fold", "functional", "magnitude+fold", "magnitude"):
        assert 0 <= head[method]["before_finetuning"] <= 1
        assert all(0 <= v <= 1 for v in head[method]["after_finetuning"].values())
    cmp = _rows(out / "threshold_0.8" / "comparison.csv")
    assert {r["method"]: r["fold"] for r in cmp} == {
        "functional+fold": "lstsq", "functional": "none", "magnitude+fold": "lstsq",
        "magnitude": "none"}
    assert len({r["macs_after"] for r in cmp}) == 1  # identical multiply-adds
    # the fold refits the next layers on the probe set: it cannot do worse than dropping there
    # by much, and on this model it recovers most of the accuracy before fine-tuning
    acc = {m: head[m]["before_finetuning"] for m in ("functional+fold", "functional")}
    assert acc["functional+fold"] > acc["functional"]
    assert _is_png(out / "threshold_0.8" / "defection.png")
    for r in _rows(out / "threshold_0.8" / "defection.csv"):
        if r["cosine"] not in ("", "nan"):
            assert -1 - 1e-6 <= float(r["cosine"]) <= 1 + 1e-6


def test_planted_quick_wraps_the_benchmark_report(tmp_path):
    from netcarve.reproduce.planted import run_planted_report

    summary = run_planted_report(tmp_path, quick=True, seed=0)
    text = _check_header(tmp_path / "report.md", "planted", 0)
    assert (tmp_path / "planted.md").exists() and (tmp_path / "planted.csv").exists()
    assert "## " in text
    assert summary["quick"] is True


# --------------------------------------------------------------------------- determinism


def _tiny_circuits(workers: int) -> CircuitsSettings:
    return CircuitsSettings(models=("fmnist_vgg",), units=2, criteria=("actgrad", "random"),
                            keeps=(0.5, 0.05), scoring_images=12, heldout_images=16,
                            workers=workers, chunk=4)


def _sweep_rows(path: Path) -> list[dict[str, str]]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in _rows(path)]


def test_circuits_are_deterministic_given_the_seed_and_worker_count(tmp_path):
    a = run_circuits(tmp_path / "a", seed=1, settings=_tiny_circuits(1))
    b = run_circuits(tmp_path / "b", seed=1, settings=_tiny_circuits(2))
    c = run_circuits(tmp_path / "c", seed=2, settings=_tiny_circuits(1))
    rows_a = _sweep_rows(tmp_path / "a" / "fmnist_vgg_sweep.csv")
    assert rows_a == _sweep_rows(tmp_path / "b" / "fmnist_vgg_sweep.csv")
    assert a["statistics"] == b["statistics"]
    assert rows_a != _sweep_rows(tmp_path / "c" / "fmnist_vgg_sweep.csv")
    assert c["units"] == a["units"]


def test_subfeatures_are_deterministic_given_the_seed(tmp_path):
    tiny = SubfeatureSettings(layers=("features.14",), units_per_layer=1, pool_images=80,
                              top_images=16, heldout_pool=40, heldout_images=8,
                              detail_units=1)
    a = run_subfeatures(tmp_path / "a", seed=3, settings=tiny)
    b = run_subfeatures(tmp_path / "b", seed=3, settings=tiny)
    def scan(res: dict) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in res["scan"]]

    assert scan(a) == scan(b)
    assert _rows(tmp_path / "a" / "subcircuits.csv") == _rows(tmp_path / "b" / "subcircuits.csv")
    assert a["headline"] == b["headline"]


# --------------------------------------------------------------------------- CLI


def test_cli_lists_the_experiments():
    res = CliRunner().invoke(cli, ["reproduce", "--help"])
    assert res.exit_code == 0
    for name in (*EXPERIMENTS, "all"):
        assert re.search(rf"^\s+{name}\s", res.output, re.M), name


def test_cli_rejects_bad_arguments(tmp_path):
    runner = CliRunner()
    assert runner.invoke(cli, ["reproduce", "circuits", "--seed", "-1"]).exit_code == 2
    assert runner.invoke(cli, ["reproduce", "car", "--threads", "0"]).exit_code == 2
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert runner.invoke(cli, ["reproduce", "fop", "--out", str(blocker)]).exit_code == 2
    assert runner.invoke(cli, ["reproduce", "nope"]).exit_code == 2


def test_cli_runs_an_experiment_and_records_the_command(tmp_path, monkeypatch):
    monkeypatch.setattr(CircuitsSettings, "quick",
                        classmethod(lambda cls: _tiny_circuits(1)))
    out = tmp_path / "c"
    res = CliRunner().invoke(cli, ["reproduce", "circuits", "--quick", "--seed", "3",
                                   "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["report"] == str(out / "report.md")
    text = _check_header(out / "report.md", "circuits", 3)
    assert f"`netcarve reproduce circuits --quick --seed 3 --out {out}`" in text
    assert summary["units"] == {"fmnist_vgg": 4}
    assert all(math.isfinite(s["median"]) for s in summary["statistics"])
    plain = CliRunner().invoke(cli, ["reproduce", "circuits", "--quick", "--out", str(out)])
    assert plain.exit_code == 0 and plain.stdout.strip() == str(out / "report.md")


def test_cli_reproduce_is_registered_on_the_console_entry_point():
    res = subprocess.run([sys.executable, "-m", "netcarve.cli", "reproduce", "--help"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    assert "subfeatures" in res.stdout and "planted" in res.stdout
