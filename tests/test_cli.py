"""The command line, exercised through a real subprocess as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


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


def test_missing_data_is_a_clean_error(tmp_path):
    env = {"NETCARVE_DATA": str(tmp_path)}
    proc = run("evaluate", "fmnist_vgg", "--limit", "10", env=env)
    if proc.returncode == 0:
        pytest.skip("the Debian data set is installed, so the fallback finds it")
    assert proc.returncode == 3
    assert "apt-get install" in proc.stderr


def test_imagenet_models_need_images_dir():
    proc = run("evaluate", "alexnet")
    assert proc.returncode == 3
    assert "--images-dir" in proc.stderr


def test_bad_flag_value_is_a_usage_error():
    proc = run("evaluate", "fmnist_vgg", "--limit", "0")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
