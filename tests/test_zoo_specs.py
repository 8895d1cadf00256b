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
