"""Physically smaller models equal the masked ones; prunable layers; sizes; save and reload."""

from __future__ import annotations

import json

import pytest
import torch
from _nets import CatNet, make
from torch import nn

from netcarve.core.costs import count_macs, count_parameters
from netcarve.core.errors import ModelSpecError
from netcarve.core.graph import ModelGraph
from netcarve.core.hooks import apply_filter_masks
from netcarve.surgery.prune import prunable_layers, prune_filters
from netcarve.surgery.pruned import CompressError, load_pruned
from netcarve.zoo import ZOO
from netcarve.zoo.torchvision_models import resnet18, vgg11_bn


@pytest.fixture(autouse=True)
def _private_rng():
    """Seeds set inside a test (torch.manual_seed, _nets.make) do not leak out of it."""
    with torch.random.fork_rng(devices=[]):
        yield


def randomise_bn(net: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
    return net.eval()


def random_masks(graph: ModelGraph, layers: list[str], seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    masks = {}
    for name in layers:
        keep = torch.rand(graph.layer(name).out_channels, generator=gen) > 0.5
        keep[0] = True
        masks[name] = keep
    return masks


def check_equivalence(net: nn.Module, x: torch.Tensor, expected_prunable: list[str] | None,
                      tol: float = 1e-5):
    graph = ModelGraph.build(net, x[:1])
    ok = [n for n, why in prunable_layers(net, graph).items() if why is None]
    if expected_prunable is not None:
        assert ok == expected_prunable
    masks = random_masks(graph, ok)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    pruned = prune_filters(net, masks, graph=graph, example_input=x)
    with torch.no_grad():
        with apply_filter_masks(net, graph, masks):
            want = net(x)
        got = pruned.module(x)
    err = float((got - want).abs().max() / want.abs().max())
    assert err <= tol
    assert pruned.max_rel_error is not None and pruned.max_rel_error <= tol
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # untouched
    assert pruned.params_after < pruned.params_before
    assert pruned.macs_after < pruned.macs_before
    for name, keep in masks.items():
        if bool(keep.all()):
            assert name not in pruned.kept
            continue
        assert pruned.kept[name] == keep.nonzero().reshape(-1).tolist()
        assert pruned.module.get_submodule(name).weight.shape[0] == int(keep.sum())
    return pruned, graph, masks


def test_fmnist_vgg_equals_masked() -> None:
    torch.manual_seed(0)
    net = randomise_bn(ZOO["fmnist_vgg"].factory())
    check_equivalence(net, torch.randn(4, 1, 28, 28),
                      ["features.0", "features.4", "features.7", "features.11", "features.14",
                       "classifier.2"])


def test_fmnist_resnet_residual_adds() -> None:
    torch.manual_seed(1)
    net = randomise_bn(ZOO["fmnist_resnet"].factory())
    x = torch.randn(4, 1, 28, 28)
    check_equivalence(net, x, ["conv1", "layer1.conv1", "layer2.conv1", "layer3.conv1"])
    why = prunable_layers(net, example_input=x)
    assert "merged" in why["layer2.conv2"] and "merged" in why["layer1.downsample.0"]
    graph = ModelGraph.build(net, x[:1])
    keep = torch.ones(64, dtype=torch.bool)
    keep[3] = False
    with pytest.raises(CompressError, match=r"layer2\.conv2.*merged.*Prunable layers"):
        prune_filters(net, {"layer2.conv2": keep}, graph=graph)


def test_torchvision_resnet18_with_inplace_relus() -> None:
    torch.manual_seed(2)
    net = randomise_bn(resnet18(num_classes=10))
    x = torch.randn(2, 3, 32, 32)
    pruned, _, _ = check_equivalence(
        net, x, [f"layer{i}.{j}.conv1" for i in range(1, 5) for j in range(2)])
    assert pruned.module.layer3[0].conv2.in_channels < 256


@pytest.mark.slow
def test_torchvision_vgg11_bn() -> None:
    torch.manual_seed(3)
    net = randomise_bn(vgg11_bn(num_classes=10))
    check_equivalence(net, torch.randn(2, 3, 32, 32), None)


@pytest.mark.parametrize("name,expected", [
    ("cat", ["stem", "b1", "b2.0", "b2.2", "b3", "mix"]),
    ("plain", ["features.0", "features.4", "classifier.1"]),
    ("conv1d", ["c1", "c2"]),
])
def test_small_nets(name: str, expected: list[str]) -> None:
    net, x = make(name, double=True, batch=3)
    check_equivalence(net, x, expected, tol=1e-12)


def test_grouped_convs_are_refused() -> None:
    net, x = make("group", double=True)
    why = prunable_layers(net, example_input=x)
    assert "grouped" in why["grouped"] and "grouped" in why["conv1"]
    assert why["point"] is None


class _MeanHead(nn.Module):
    """conv-BN-ReLU, then ``x.mean(dims)`` into a Linear (ShuffleNetV2's head)."""

    def __init__(self, dims: list[int]) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 2)
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.relu(self.bn(self.conv(x))).mean(self.dims)
        return self.fc(z.flatten(1))


def test_spatial_mean_keeps_removed_channels_at_zero() -> None:
    x = torch.randn(5, 3, 6, 6)
    check_equivalence(randomise_bn(_MeanHead([2, 3])), x, ["conv"])


def test_depthwise_channels_go_with_their_input_filter(tmp_path) -> None:
    """MobileNetV2: an expand conv's filter takes its depthwise channel with it; the
    depthwise filter's constant output (its BatchNorm shift through ReLU6) is folded into the
    project conv's new bias, so the result equals the masked model; it saves and reloads."""
    import _families as fam

    net = fam.build("mobilenet_v2")
    x = torch.randn(5, 3, 32, 32)
    check_equivalence(net, x, ["features.2.conv.0.0", "features.3.conv.0.0",
                               "features.4.conv.0.0", "features.4.conv.2.0", "features.5.0"])
    graph = ModelGraph.build(net, x[:1])
    keep = torch.ones(24, dtype=torch.bool)
    keep[[1, 5, 6, 20]] = False
    pruned = prune_filters(net, {"features.2.conv.0.0": keep}, graph=graph, example_input=x,
                           spec="_families:MobileNetV2")
    mods = dict(pruned.module.named_modules())
    dw = mods["features.2.conv.1.0"]
    assert (dw.in_channels, dw.out_channels, dw.groups) == (20, 20, 20)
    assert tuple(dw.weight.shape) == (20, 1, 3, 3)
    assert mods["features.2.conv.1.1"].num_features == 20
    project = mods["features.2.conv.2.0"]
    assert project.in_channels == 20 and project.bias is not None  # the folded constants
    assert dict(net.named_modules())["features.2.conv.2.0"].bias is None  # original untouched
    again = load_pruned(pruned.save(tmp_path / "pruned"), architecture=fam.MobileNetV2)
    with torch.no_grad():
        assert torch.equal(again.module(x), pruned.module(x))


def test_depthwise_with_a_gate_or_zero_padding_is_refused() -> None:
    import _families as fam

    net = fam.build("mobilenet_v3")
    why = prunable_layers(net, example_input=torch.randn(1, 3, 32, 32))
    assert "squeeze-excitation gate" in why["features.3.conv.0.0"]
    padded = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 3, groups=4),
                           nn.Conv2d(4, 2, 3, padding=1), nn.Flatten(), nn.Linear(2 * 16, 2))
    why = prunable_layers(padded.eval(), example_input=torch.randn(1, 3, 6, 6))
    assert "zero-padded conv" in why["0"]


def test_sizes_by_hand() -> None:
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
                        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 2 * 2, 3)).eval()
    x = torch.randn(2, 2, 4, 4)
    graph = ModelGraph.build(net, x[:1])
    assert count_parameters(net) == (4 * 2 * 9 + 4) + 8 + (16 * 3 + 3)
    assert count_macs(net, graph) == 4 * 4 * 4 * 2 * 9 + 16 * 3
    keep = torch.tensor([True, False, False, True])
    pruned = prune_filters(net, {"0": keep}, graph=graph, example_input=x)
    assert pruned.params_after == (2 * 2 * 9 + 2) + 4 + (8 * 3 + 3)
    assert pruned.macs_after == 2 * 4 * 4 * 2 * 9 + 8 * 3
    assert pruned.module[5].in_features == 8
    assert pruned.removed == {"0": [1, 2]}


def test_mask_errors() -> None:
    net, x = make("plain", double=True)
    graph = ModelGraph.build(net, x[:1])
    with pytest.raises(CompressError, match="removes all"):
        prune_filters(net, {"features.0": torch.zeros(4, dtype=torch.bool)}, graph=graph)
    with pytest.raises(CompressError, match="shape"):
        prune_filters(net, {"features.0": torch.ones(5, dtype=torch.bool)}, graph=graph)
    with pytest.raises(CompressError, match="output"):
        prune_filters(net, {"classifier.3": torch.tensor([True, False, True])}, graph=graph)


def test_hard_coded_view_is_caught() -> None:
    class Fixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.fc = nn.Linear(4 * 4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.conv(x)).view(-1, 16))

    net = Fixed().eval()
    x = torch.randn(2, 1, 4, 4)
    with pytest.raises(CompressError, match="channel count"):
        prune_filters(net, {"conv": torch.tensor([True, False, True, True])}, example_input=x)


def test_save_and_reload_zoo_model(tmp_path) -> None:
    torch.manual_seed(4)
    net = randomise_bn(ZOO["fmnist_vgg"].factory())
    x = torch.randn(3, 1, 28, 28)
    graph = ModelGraph.build(net, x[:1])
    masks = random_masks(graph, ["features.0", "features.11"], seed=5)
    pruned = prune_filters(net, masks, graph=graph, spec="fmnist_vgg",
                           order=[("features.0", 3)])
    with pytest.raises(CompressError, match="spec"):
        prune_filters(net, masks, graph=graph).save(tmp_path / "nospec")
    folder = pruned.save(tmp_path / "pruned")
    desc = json.loads((folder / "architecture.json").read_text())
    assert desc["spec"] == "fmnist_vgg" and desc["order"] == [["features.0", 3]]
    again = load_pruned(folder)
    with torch.no_grad():
        assert torch.equal(again.module(x), pruned.module(x))
    assert again.params_after == pruned.params_after and again.macs_after == pruned.macs_after
    assert again.kept == pruned.kept


def test_save_and_reload_factory_spec(tmp_path) -> None:
    net, x = make("cat", double=False, batch=2)
    graph = ModelGraph.build(net, x[:1])
    pruned = prune_filters(net, random_masks(graph, ["b1", "b2.0", "mix"], seed=1),
                           graph=graph, spec="_nets:CatNet")
    folder = pruned.save(tmp_path / "cat")
    # The file's spec is a label: a module:factory named in a file is never imported.
    with pytest.raises(ModelSpecError, match="never imports code named inside a file"):
        load_pruned(folder)
    for architecture in ("_nets:CatNet", CatNet, CatNet()):
        again = load_pruned(folder, architecture=architecture)
        with torch.no_grad():
            assert torch.equal(again.module(x), pruned.module(x))


def test_load_pruned_errors(tmp_path) -> None:
    with pytest.raises(CompressError, match="architecture.json"):
        load_pruned(tmp_path)
    (tmp_path / "architecture.json").write_text('{"format": "other"}')
    with pytest.raises(CompressError, match="not a netcarve"):
        load_pruned(tmp_path)


def test_load_pruned_refuses_malformed_descriptions_before_building(tmp_path) -> None:
    torch.manual_seed(4)
    net = ZOO["fmnist_vgg"].factory()
    graph = ModelGraph.build(net, torch.zeros(1, 1, 28, 28))
    folder = prune_filters(net, random_masks(graph, ["features.0"], seed=5), graph=graph,
                           spec="fmnist_vgg").save(tmp_path / "p")
    good = json.loads((folder / "architecture.json").read_text())
    cases = {
        "filters of features.0 must lie in": {"kept": {"features.0": [0, 10_000]}},
        "'kept' must map": {"kept": {"features.0": "all"}},
        "input_shape must be": {"input_shape": [1, 60_000, 60_000]},
        "format version": {"version": "1"},
        "nested more than": {"metadata": {"a": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]
                                                ]]]]]]]]]]]]]]]]]]]}},
    }
    for message, change in cases.items():
        (folder / "architecture.json").write_text(json.dumps({**good, **change}))
        with pytest.raises(CompressError, match=message):
            load_pruned(folder)
