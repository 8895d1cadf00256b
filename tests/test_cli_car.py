"""``netcarve car`` end to end on a tiny Fashion-MNIST-shaped net, and its error messages."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from netcarve.cli.car import car
from netcarve.core.graph import ModelGraph
from netcarve.core.hooks import apply_filter_masks
from netcarve.surgery.pruned import load_pruned
from netcarve.training.evaluation import reference_data
from netcarve.zoo import FASHION_MNIST_PRESET

SPEC = "test_cli_car:tiny_fmnist"


class Tiny(nn.Module):
    """conv-BN-ReLU ×2 (stride 2) → global average → Linear; 28×28 greyscale, 10 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def tiny_fmnist() -> nn.Module:
    """Factory for the CLI (seeded, so every call builds the same weights)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Tiny()


def run(*args: str):
    return CliRunner().invoke(car, [SPEC, "--preset", "fmnist_vgg", *args],
                              catch_exceptions=False)


def test_end_to_end(tmp_path) -> None:
    out = tmp_path / "run"
    res = run("--layers", "conv1,conv2", "--prune", "0.5", "--classwise", "--lazy",
              "--finetune", "1", "--finetune-images", "64", "--images", "40",
              "--eval-images", "30", "--curve-points", "2", "--batch-size", "20",
              "--out", str(out), "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)
    assert summary == json.loads((out / "summary.json").read_text())
    for name in ["scores.csv", "order.csv", "curves.csv", "curves.png", "summary.json",
                 "classwise_conv1.csv", "classwise_conv1.png", "classwise_conv2.png",
                 "pruned/model.safetensors", "pruned/architecture.json",
                 "finetuned/model.safetensors"]:
        assert (out / name).is_file(), name
    assert summary["layers"] == ["conv1", "conv2"]
    assert summary["greedy"]["filters_removed"] == 3 + 4
    assert summary["greedy"]["mode"] == "lazy"
    assert summary["n_scoring"] == 40 and summary["n_eval"] == 30
    assert "fc" in summary["not_prunable"]
    assert summary["accuracy"]["finetuned"] is not None
    pm = summary["pruned_model"]
    assert pm["params_after"] < pm["params_before"] and pm["macs_after"] < pm["macs_before"]
    # the saved model reloads and equals the masked original
    again = load_pruned(out / "pruned", architecture=tiny_fmnist)
    x, _ = reference_data(FASHION_MNIST_PRESET, "test", 8)
    x = FASHION_MNIST_PRESET.normalize(x)
    net = tiny_fmnist().eval()
    graph = ModelGraph.build(net, x[:1])
    masks = {}
    for layer, kept in pm["kept"].items():
        keep = torch.zeros(graph.layer(layer).out_channels, dtype=torch.bool)
        keep[kept] = True
        masks[layer] = keep
    with torch.no_grad(), apply_filter_masks(net, graph, masks):
        want = net(x)
    with torch.no_grad():
        got = again.module(x)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    rows = (out / "curves.csv").read_text().strip().splitlines()
    assert rows[0] == "layer,method,pruned,accuracy,loss,finetuned"
    assert sum(1 for r in rows if r.endswith(",True")) == 2 * 6  # 6 methods, 2 layers


def test_default_layers_text_output(tmp_path) -> None:
    res = run("--prune", "1", "--images", "20", "--eval-images", "20", "--no-curves",
              "--out", str(tmp_path))
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["layers"] == ["conv1", "conv2"]
    assert "pruned 2 filter(s)" in res.output


def test_fold_refits_the_next_layers(tmp_path) -> None:
    res = run("--layers", "conv1", "--prune", "2", "--images", "20", "--eval-images", "20",
              "--no-curves", "--fold", "lstsq", "--out", str(tmp_path))
    assert res.exit_code == 0, res.output
    desc = json.loads((tmp_path / "pruned" / "architecture.json").read_text())
    assert desc["metadata"]["fold"] == "lstsq" and desc["metadata"]["fold_images"] == 20
    fit = desc["metadata"]["fold_fit"]["conv2"]
    assert fit["intercept"] == "bias" and fit["columns"] == 4 * 9
    assert fit["r2_fold"] >= fit["r2_drop"] - 1e-9


@pytest.mark.parametrize("flags,mode", [([], "lazy"), (["--exact"], "exact"),
                                        (["--mode", "racing"], "racing"),
                                        (["--mode", "exact"], "exact")])
def test_greedy_modes_and_their_cost_in_the_summary(tmp_path, flags: list[str],
                                                    mode: str) -> None:
    res = run("--layers", "conv1,conv2", "--prune", "2", "--images", "40", "--eval-images",
              "20", "--no-curves", *flags, "--out", str(tmp_path))
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    cost = summary["greedy_cost"]
    assert summary["greedy"]["mode"] == cost["mode"] == mode and cost["removals"] == 4
    # exact scores every remaining candidate of each step on every image: (6+5) + (8+7)
    assert cost["exact_image_evaluations"] == (6 + 5 + 8 + 7) * 40
    if mode == "exact":
        assert cost["image_evaluations"] == cost["exact_image_evaluations"]
        assert cost["saved_fraction"] == 0
    assert 0 <= cost["saved_fraction"] < 1 and cost["seconds"] > 0
    assert f"greedy {mode}" in res.output  # the log and the progress bar name the mode


@pytest.mark.parametrize("args,code,message", [
    (["--layers", "conv1", "--prune", "1", "--mode", "racing", "--metric", "loss"], 2,
     "needs --metric top1"),
    (["--layers", "fc", "--prune", "1"], 2, "no filters to prune"),
    (["--layers", "conv1", "--prune", "1.5"], 2, "(0, 1)"),
    (["--layers", "conv1", "--prune", "0"], 2, "at least 1"),
    (["--layers", "conv1"], 2, "--prune"),
    (["--layers", "conv1", "--prune", "2", "--images", "0"], 3, "empty"),
    (["--layers", "conv9", "--prune", "2"], 2, "conv1"),
])
def test_errors(tmp_path, args: list[str], code: int, message: str) -> None:
    res = CliRunner().invoke(car, [SPEC, "--preset", "fmnist_vgg", *args, "--images", "10",
                                   "--eval-images", "10", "--out", str(tmp_path)]
                             if "--images" not in args else
                             [SPEC, "--preset", "fmnist_vgg", *args, "--eval-images", "10",
                              "--out", str(tmp_path)])
    assert res.exit_code == code, res.output
    assert message in res.output


def test_empty_image_folder(tmp_path) -> None:
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    res = CliRunner().invoke(car, [SPEC, "--preset", "fmnist_vgg", "--prune", "1",
                                   "--images-dir", str(tmp_path / "imgs"),
                                   "--out", str(tmp_path / "o")])
    assert res.exit_code == 3, res.output


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_curves_reuse_the_greedy_order_and_never_rerun_greedy(tmp_path, monkeypatch,
                                                               scope) -> None:
    import netcarve.car.greedy

    calls = []
    real = netcarve.car.greedy.greedy_prune

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(netcarve.car.greedy, "greedy_prune", counting)
    res = run("--layers", "conv1,conv2", "--prune", "0.5", "--scope", scope, "--lazy",
              "--images", "30", "--eval-images", "20", "--curve-points", "2",
              "--batch-size", "30", "--out", str(tmp_path / "o"), "--json")
    assert res.exit_code == 0, res.output
    assert len(calls) == 1, f"greedy ran {len(calls)} times; the curves must reuse its order"
    assert (tmp_path / "o" / "curves.csv").is_file()


def test_image_folder_streams_the_evaluation_images(tmp_path) -> None:
    """``--images-dir``: the scoring images are decoded, the evaluation ones streamed; the
    accuracies equal an in-memory evaluation of the same (seeded) evaluation images."""
    from PIL import Image

    from netcarve.data import load_image_folder
    from netcarve.training.evaluation import evaluate

    x, y = reference_data(FASHION_MNIST_PRESET, "test", 40)
    names = FASHION_MNIST_PRESET.class_names
    for i, (img, label) in enumerate(zip(x, y.tolist(), strict=True)):
        folder = tmp_path / "imgs" / names[label].replace("/", "_")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[0].numpy()).save(folder / f"{i:03d}.png")
    out = tmp_path / "o"
    res = run("--layers", "conv2", "--prune", "2", "--images-dir", str(tmp_path / "imgs"),
              "--images", "15", "--eval-images", "100", "--curve-points", "2",
              "--batch-size", "7", "--workers", "1", "--out", str(out), "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)
    assert summary["n_scoring"] == 15 and summary["n_eval"] == 25  # the rest of the folder
    assert "25 evaluation images streamed" in summary["data"]
    folder = load_image_folder(tmp_path / "imgs", FASHION_MNIST_PRESET)
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    xe, ye = folder.images[perm][15:], folder.labels[perm][15:]
    want = evaluate(tiny_fmnist(), xe, ye, FASHION_MNIST_PRESET).accuracy
    assert summary["accuracy"]["original"] == pytest.approx(want, abs=1e-12)
    assert summary["curves"] is not None and (out / "curves.png").is_file()
