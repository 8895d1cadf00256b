"""The command line, exercised through a real subprocess as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "netcarve.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def test_help_everywhere():
    for args in ([], ["models"], ["train"], ["evaluate"], ["demo"]):
        proc = run(*args, "--help")
        assert proc.returncode == 0, proc.stderr
        assert "Usage" in proc.stdout


def test_models_json_lists_bundled_models_with_accuracy():
    proc = run("models", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    for name in ("fmnist_vgg", "fmnist_resnet", "shapes_cnn"):
        assert rows[name]["bundled_weights"] is True
        assert rows[name]["test_accuracy"] >= 0.91
    assert rows["resnet18"]["bundled_weights"] is False
    assert rows["resnet18"]["test_accuracy"] is None


def test_evaluate_json_on_real_data():
    proc = run("evaluate", "fmnist_vgg", "--limit", "500", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["n"] == 500
    assert data["accuracy"] > 0.85
    assert len(data["per_class_accuracy"]) == 10


def test_unknown_model_is_a_clean_error():
    proc = run("evaluate", "fmnist_vgx")
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ")
    assert "fmnist_vgg" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_weights_file_is_a_clean_error(tmp_path):
    proc = run("evaluate", "fmnist_vgg", "--weights", str(tmp_path / "nope.safetensors"))
    assert proc.returncode == 4
    assert "nope.safetensors" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_images_dir_is_a_clean_data_error(tmp_path):
    proc = run("evaluate", "fmnist_vgg", "--images-dir", str(tmp_path / "no_such_folder"))
    assert proc.returncode == 3
    assert "no_such_folder" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_imagenet_models_need_images_dir():
    proc = run("evaluate", "alexnet")
    assert proc.returncode == 3
    assert "--images-dir" in proc.stderr


def test_bad_flag_value_is_a_usage_error():
    proc = run("evaluate", "fmnist_vgg", "--limit", "0")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr


REQUIRED_SUMMARY_KEYS = ("target", "criterion", "keep", "kept_kernels", "relevant_kernels",
                         "preservation_heldout", "preservation_scoring", "seconds")


def test_extract_writes_circuit_and_summary(tmp_path):
    out = tmp_path / "c"
    proc = run("extract", "fmnist_vgg", "features.11:5", "--keep", "0.1", "--images", "100",
               "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert json.loads(proc.stdout) == summary
    for key in REQUIRED_SUMMARY_KEYS:
        assert key in summary
    assert summary["preservation_heldout"]["n_images"] == 100
    assert summary["selected_kernels"] == round(0.1 * summary["relevant_kernels"])
    from netcarve.circuits.circuit import Circuit

    c = Circuit.load(out / "circuit.safetensors")
    assert c.kept_kernels == summary["kept_kernels"]


def test_extract_min_preservation_runs_the_keep_search(tmp_path):
    out = tmp_path / "ks"
    proc = run("extract", "fmnist_vgg", "features.11:5", "--min-preservation", "0.8",
               "--images", "200", "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    search = summary["keep_search"]
    assert search["goal"] == 0.8 and search["reached"] and search["search_on"] == "heldout"
    chosen = next(p for p in search["curve"] if p["keep"] == search["keep"])
    assert chosen["pearson"] >= 0.8
    smaller = [p for p in search["curve"] if p["keep"] < search["keep"]]
    assert smaller and not max(smaller, key=lambda p: p["keep"])["reached"]
    assert summary["preservation_heldout"]["pearson"] == chosen["pearson"]
    rows = (out / "keep_search.csv").read_text().splitlines()
    assert rows[0].startswith("keep,k,kept_kernels") and len(rows) == len(search["curve"]) + 1
    proc = run("extract", "fmnist_vgg", "features.11:5", "--min-preservation", "0.8",
               "--keep", "0.2", "--out", str(tmp_path / "x"))
    assert proc.returncode == 2 and "--min-preservation chooses the keep" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_extract_user_mistakes_are_clean(tmp_path):
    proc = run("extract", "fmnist_vgg", "features.12:5", "--out", str(tmp_path / "x"))
    assert proc.returncode == 2 and "features.11" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run("extract", "fmnist_vgg", "features.11:500", "--out", str(tmp_path / "x"))
    assert proc.returncode == 2 and "0..127" in proc.stderr
    proc = run("extract", "fmnist_vgg", "features.11:5", "--keep", "1.5",
               "--out", str(tmp_path / "x"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_sweep_and_subcircuits_commands(tmp_path):
    proc = run("sweep", "fmnist_vgg", "--units", "features.7:1,features.11:2",
               "--criteria", "actgrad,magnitude", "--keeps", "0.5,0.1", "--images", "60",
               "--out", str(tmp_path / "s"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "s" / "sweep.png").exists() and (tmp_path / "s" / "sweep.csv").exists()
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["units"] == 2 and set(summary["median_preservation"]) == {
        "actgrad", "magnitude"}
    proc = run("subcircuits", "fmnist_vgg", "features.11:5", "--images", "60",
               "--random-splits", "3", "--bootstrap", "50", "--out", str(tmp_path / "g"))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "g" / "summary.json").read_text())
    assert len(summary["subcircuits"]) == 2
    test = summary["heldout_test"]
    assert test["grouping"] == "scores" and len(test["random"]) == 3
    assert sum(int(n) for n in test["groups_heldout"].split("/")) == 60
    assert "held-out test (scores grouping" in proc.stdout
    assert (tmp_path / "g" / "subcircuit_1.safetensors").exists()
