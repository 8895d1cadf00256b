"""Model specs a user brings: ``torchvision.models:NAME``, ``timm:NAME``, any
``package.module:factory``; the ImageNet preset (224 crop of a 256 resize) and class names from
a file or a folder. torchvision and timm cannot be installed here, so stand-in modules with
their calling conventions are put in ``sys.modules``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest
import torch
from torch import nn

from netcarve.core.errors import DataError, ModelSpecError
from netcarve.data.preset import Preset
from netcarve.zoo import load_model
from netcarve.zoo.torchvision_models import IMAGENET_PRESET, resnet18


def _tiny() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 1000))


@pytest.fixture
def fake_torchvision(monkeypatch):
    tv = types.ModuleType("torchvision")
    models = types.ModuleType("torchvision.models")
    models.resnet18 = lambda: resnet18()
    tv.models = models
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setitem(sys.modules, "torchvision.models", models)
    return models


@pytest.fixture
def fake_timm(monkeypatch):
    timm = types.ModuleType("timm")
    made = []

    def create_model(name: str, pretrained: bool = False) -> nn.Module:
        made.append((name, pretrained))
        return _tiny()

    timm.create_model = create_model
    timm.list_models = lambda: ["convnext_tiny", "resnet50"]
    monkeypatch.setitem(sys.modules, "timm", timm)
    return made


def test_torchvision_spec_gets_the_imagenet_preset_and_weights(fake_torchvision, tmp_path):
    from safetensors.torch import save_file

    reference = resnet18()
    save_file(reference.state_dict(), str(tmp_path / "w.safetensors"))
    lm = load_model("torchvision.models:resnet18", tmp_path / "w.safetensors")
    assert lm.preset == IMAGENET_PRESET and lm.preset.resize == 256 and lm.preset.size == 224
    for name, t in reference.state_dict().items():
        assert torch.equal(lm.model.state_dict()[name], t), name  # a copy, bit for bit
    assert not lm.model.training


def test_timm_spec_builds_by_name_without_pretrained_download(fake_timm):
    lm = load_model("timm:convnext_tiny")
    assert fake_timm == [("convnext_tiny", False)]
    assert lm.preset.dataset == "imagenet" and lm.name == "timm:convnext_tiny"
    with pytest.raises(ModelSpecError, match="did you mean convnext_tiny"):
        load_model("timm:convnext_tiyn")


def test_timm_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    with pytest.raises(ModelSpecError, match="needs timm, which is not installed"):
        load_model("timm:convnext_tiny")


def test_preset_by_name_and_unknown_preset():
    lm = load_model("fmnist_vgg", preset="fmnist_vgg")
    assert lm.preset.size == 28
    assert load_model("resnet18", preset="imagenet").preset is IMAGENET_PRESET
    with pytest.raises(ModelSpecError, match="use imagenet or a zoo model name"):
        load_model("resnet18", preset="imagenette")


def test_class_names_from_a_file_a_json_list_and_a_folder(tmp_path):
    base = Preset(8, 1, (0.5,), (0.5,), ("a", "b", "c"))
    (tmp_path / "names.txt").write_text("tench\n\ngoldfish\nshark\n")
    assert base.with_class_names(tmp_path / "names.txt").class_names == (
        "tench", "goldfish", "shark")
    (tmp_path / "names.json").write_text(json.dumps(["x", "y", "z"]))
    assert base.with_class_names(tmp_path / "names.json").class_names == ("x", "y", "z")
    folder = tmp_path / "train"
    for name in ("n02", "n01", "n03", ".cache"):
        (folder / name).mkdir(parents=True)
    assert base.with_class_names(folder).class_names == ("n01", "n02", "n03")
    with pytest.raises(DataError, match="2 class names from the list, but the model has 3"):
        base.with_class_names(["p", "q"])
    with pytest.raises(DataError, match="neither a file nor a folder"):
        base.with_class_names(tmp_path / "missing")
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(DataError, match="no class names"):
        base.with_class_names(tmp_path / "empty.txt")


def test_load_model_applies_class_names(tmp_path):
    names = [f"synset_{i}" for i in range(1000)]
    (tmp_path / "names.txt").write_text("\n".join(names))
    lm = load_model("resnet18", class_names=tmp_path / "names.txt")
    assert lm.preset.class_names[:2] == ("synset_0", "synset_1")
    assert IMAGENET_PRESET.class_names[0] == "class_0"  # the shared preset is not changed


def test_cli_class_names_reach_the_command(tmp_path):
    (tmp_path / "names.txt").write_text("\n".join(f"kind_{i}" for i in range(10)))
    proc = subprocess.run(
        [sys.executable, "-m", "netcarve.cli", "atlas", "fmnist_vgg", "--layers", "features.0",
         "--units", "0,", "--images", "16", "--heldout", "16", "--car-images", "50",
         "--featureviz-steps", "2", "--workers", "0", "--class-names",
         str(tmp_path / "names.txt"), "--out", str(tmp_path / "a"), "--json"],
        capture_output=True, text=True, timeout=300, env={**os.environ})
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((tmp_path / "a" / "atlas.json").read_text())
    assert meta["class_names"] == [f"kind_{i}" for i in range(10)]


_USER_FILE = '''
import torch
from torch import nn


class Net(nn.Module):
    """A user's torchvision-style network: stem, inverted residual (expand, depthwise,
    project), a channel shuffle, a spatial mean and a Linear head over 8 shape classes."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8),
                          nn.ReLU6(inplace=True)),
            nn.Sequential(nn.Conv2d(8, 24, 1, bias=False), nn.BatchNorm2d(24),
                          nn.ReLU6(inplace=True),
                          nn.Conv2d(24, 24, 3, 1, 1, groups=24, bias=False),
                          nn.BatchNorm2d(24), nn.ReLU6(inplace=True),
                          nn.Conv2d(24, 16, 1, bias=False), nn.BatchNorm2d(16)))
        self.classifier = nn.Linear(16, 8)

    def forward(self, x):
        x = self.features(x)
        b, c, h, w = x.size()
        x = x.view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)
        return self.classifier(x.mean([2, 3]))


def net():
    return Net()
'''


def test_a_users_model_file_and_weights_end_to_end_on_the_cli(tmp_path, monkeypatch):
    """``package.module:factory`` + ``--weights`` + ``--images-dir``: extract a circuit and
    run CAR with physical pruning (the expand conv takes its depthwise channels with it) on
    a user's own architecture; the pruned model reloads and equals the masked original."""
    import numpy as np
    from click.testing import CliRunner
    from PIL import Image
    from safetensors.torch import save_file

    from netcarve.cli.main import cli
    from netcarve.core.graph import ModelGraph
    from netcarve.core.hooks import apply_filter_masks
    from netcarve.data import SHAPE_CLASSES, load_image_folder, make_shapes
    from netcarve.surgery.pruned import load_pruned
    from netcarve.zoo import ZOO

    (tmp_path / "user_nets.py").write_text(_USER_FILE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import user_nets

    torch.manual_seed(3)
    trained = user_nets.Net().eval()
    for m in trained.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    save_file(trained.state_dict(), str(tmp_path / "w.safetensors"))
    images, labels = make_shapes(48, seed=0, size=64)
    for i, (img, label) in enumerate(zip(images, labels.tolist(), strict=True)):
        folder = tmp_path / "imgs" / SHAPE_CLASSES[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(img.permute(1, 2, 0).numpy())).save(
            folder / f"{i:03d}.png")
    common = ["--weights", str(tmp_path / "w.safetensors"), "--preset", "shapes_cnn",
              "--images-dir", str(tmp_path / "imgs"), "--device", "cpu", "--json"]
    runner = CliRunner()
    res = runner.invoke(cli, ["extract", "user_nets:net", "features.1.6:3", "--images", "20",
                              "--heldout", "20", "--keep", "0.3", "--out",
                              str(tmp_path / "circuit"), *common], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["preservation_heldout"]["n_images"] == 20
    res = runner.invoke(cli, ["car", "user_nets:net", "--layers", "features.1.0", "--prune",
                              "4", "--images", "20", "--eval-images", "28", "--curve-points",
                              "2", "--out", str(tmp_path / "car"), *common],
                        catch_exceptions=False)
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)
    assert summary["n_eval"] == 28 and summary["layers"] == ["features.1.0"]
    folder = load_image_folder(tmp_path / "imgs", ZOO["shapes_cnn"].preset)
    perm = torch.randperm(48, generator=torch.Generator().manual_seed(0))
    pruned = load_pruned(tmp_path / "car" / "pruned", architecture=user_nets.Net)
    dw = dict(pruned.module.named_modules())["features.1.3"]
    assert dw.groups == dw.out_channels == 20  # 4 expand filters and their depthwise channels
    graph = ModelGraph.build(trained, folder.images[:1])
    keep = torch.ones(24, dtype=torch.bool)
    keep[torch.tensor(summary["pruned_model"]["removed"]["features.1.0"])] = False
    x = folder.images[perm][20:]
    with torch.no_grad(), apply_filter_masks(trained, graph, {"features.1.0": keep}):
        want = trained(x)
    with torch.no_grad():
        got = pruned.module(x)
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-5
