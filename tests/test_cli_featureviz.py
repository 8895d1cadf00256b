"""The ``visualize``, ``fop`` and ``defection`` commands, run in-process with click's runner."""

from __future__ import annotations

import json

import click
import pytest
from click.testing import CliRunner

from netcarve.cli.featureviz import COMMANDS


@click.group()
def app() -> None:
    """The three commands, as ``netcarve`` registers them."""


for _command in COMMANDS:
    app.add_command(_command)


def run(*args: str):
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def test_help():
    for name in ("visualize", "fop", "defection"):
        result = run(name, "--help")
        assert result.exit_code == 0 and "Usage" in result.output


def test_visualize_writes_grid_channel_pngs_tensors_and_summary(tmp_path):
    out = tmp_path / "viz"
    result = run("visualize", "fmnist_vgg", "features.4", "--channels", "0-1", "--steps", "4",
                 "--images", "40", "--top-k", "2", "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["channels"] == [0, 1]
    assert len(summary["visualization"]["activations"]) == 2
    assert summary["receptive_field_of_centre"] == [11, 11, 19, 19]
    assert len(summary["dataset_examples"]["channels"]["1"]) == 2
    assert (out / "features.4.png").exists() and (out / "visualization.safetensors").exists()
    assert sorted(p.name for p in (out / "features.4").iterdir()) == [
        "channel_0000.png", "channel_0001.png"]


def test_visualize_a_circuit_beside_the_original(tmp_path):
    from netcarve.circuits.extract import extract
    from netcarve.training.evaluation import analysis_data
    from netcarve.zoo import load_model

    lm = load_model("fmnist_vgg")
    x, _ = analysis_data(lm.preset, 64, 1)
    circuit = extract(lm.model, "features.7:5", x, keep=0.05, measure=False)
    circuit.save(tmp_path / "c.safetensors")
    out = tmp_path / "viz"
    result = run("visualize", "fmnist_vgg", "features.7", "--circuit",
                 str(tmp_path / "c.safetensors"), "--steps", "4", "--images", "0",
                 "--out", str(out))
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["channels"] == [5]
    assert summary["circuit"]["target"] == "features.7:5"
    assert len(summary["circuit"]["activations"]) == 1
    result = run("visualize", "fmnist_vgg", "classifier.2", "--circuit",
                 str(tmp_path / "c.safetensors"), "--steps", "2", "--out", str(out))
    assert result.exit_code == 2 and "not part of the circuit" in result.output


@pytest.mark.parametrize(("args", "message"), [
    (["feature.4"], "did you mean features.4"),
    (["features.4", "--channels", "64"], "out of range for features.4 (0..63)"),
    (["features.4", "--channels", "a,b"], "--channels must be comma-separated"),
])
def test_visualize_errors_are_one_line(tmp_path, args, message):
    result = CliRunner().invoke(app, ["visualize", "fmnist_vgg", *args, "--steps", "2",
                                      "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_fop_compares_with_magnitude_pruning(tmp_path):
    out = tmp_path / "fop"
    result = run("fop", "fmnist_vgg", "--layers", "features.4", "--images", "64",
                 "--eval-images", "200", "--finetune-images", "128", "--threshold", "0.75",
                 "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "functional" in result.output and "magnitude" in result.output
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["method"]: r for r in summary["comparison"]["methods"]}
    assert rows["functional"]["macs_after"] == rows["magnitude"]["macs_after"]
    assert rows["functional"]["accuracy_finetuned"] is not None
    for name in ("clusters.json", "clusters.csv", "clusters_features.4.png", "comparison.csv",
                 "functional_model/architecture.json"):
        assert (out / name).exists(), name
    bad = CliRunner().invoke(app, ["fop", "fmnist_vgg", "--layers", "features.4",
                                   "--threshold", "1.5", "--images", "8", "--out", str(out)])
    assert bad.exit_code == 2 and "threshold must be a similarity" in bad.output


@pytest.mark.slow
def test_defection_writes_csv_png_and_summary(tmp_path):
    out = tmp_path / "def"
    result = run("defection", "fmnist_vgg", "--layers", "features.7", "--images", "32",
                 "--eval-images", "100", "--finetune-images", "128", "--lrs", "0.01",
                 "--epochs", "1", "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    methods = {s["method"] for s in summary["defection"]["summary"]}
    assert methods == {"functional", "magnitude"}
    assert (out / "defection.csv").exists() and (out / "defection.png").exists()


def test_fop_on_an_image_folder_decodes_only_the_images_it_uses(tmp_path, monkeypatch):
    """``--images-dir``: evaluation, probe and the ``--finetune-images`` fine-tuning images are
    decoded; the rest of the folder is never read."""
    from PIL import Image

    from netcarve.data import ImageFolderDataset
    from netcarve.training.evaluation import reference_data
    from netcarve.zoo import FASHION_MNIST_PRESET

    x, y = reference_data(FASHION_MNIST_PRESET, "test", 90)
    for i, (img, label) in enumerate(zip(x, y.tolist(), strict=True)):
        folder = tmp_path / "imgs" / FASHION_MNIST_PRESET.class_names[label].replace("/", "_")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[0].numpy()).save(folder / f"{i:03d}.png")
    read: list[int] = []
    real = ImageFolderDataset.read_pixels
    monkeypatch.setattr(ImageFolderDataset, "read_pixels",
                        lambda self, i: read.append(i) or real(self, i))
    out = tmp_path / "fop"
    result = run("fop", "fmnist_vgg", "--layers", "features.4", "--images", "16",
                 "--eval-images", "30", "--finetune-images", "20", "--threshold", "0.75",
                 "--am-steps", "2", "--images-dir", str(tmp_path / "imgs"), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert len(read) == len(set(read)) == 30 + 20  # evaluation + fine-tuning (probe ⊂ it)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["comparison"]["settings"]["eval_images"] == 30
