"""Tests for :mod:`netcarve.surgery`: the extracted circuit module equals the masked model.

Every equality check compares the :class:`CircuitModule` output with the masked full model's
target layer output (``apply_kernel_masks`` + ``forward_until``), sliced to the target
channels, at ≤1e-5 relative error in float32.
"""

from __future__ import annotations

import copy
import io
import sys
from pathlib import Path

import pytest
import torch
from _state import assert_unchanged, snapshot
from torch import nn

from netcarve.core.costs import count_macs, count_parameters
from netcarve.core.errors import NetcarveError
from netcarve.core.graph import ModelGraph
from netcarve.core.hooks import apply_kernel_masks, forward_until
from netcarve.surgery._plan import SurgeryError
from netcarve.surgery.circuit_module import CircuitModule
from netcarve.surgery.extract import extract_module
from netcarve.zoo.small_models import FmnistResNet, FmnistVGG

sys.path.insert(0, str(Path(__file__).parent))
try:
    import _nets  # the graph engineer's brute-force nets (optional extra coverage)
except ImportError:  # pragma: no cover - the file belongs to another test module
    _nets = None

KEEPS = (0.5, 0.1, 0.02)
WEIGHTS = Path(__file__).resolve().parents[1] / "netcarve" / "zoo" / "weights"


# --------------------------------------------------------------------------- test nets


class VGGLike(nn.Module):
    """conv-BN-ReLU(inplace) ×2 with pooling, Flatten → Dropout → Linear → ReLU → Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
            nn.Conv2d(8, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Dropout(0.5), nn.Linear(5 * 2 * 2, 7), nn.ReLU(inplace=True),
            nn.Linear(7, 3),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class ResBlock(nn.Module):
    """torchvision-style basic block: ``out += identity``, optional 1×1 projection."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResLike(nn.Module):
    """Stem, an identity block, a projection block, global pool, fc."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 5, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(5)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = ResBlock(5, 5)
        self.layer2 = ResBlock(5, 7, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(7, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.pool(x), 1))


class CatLike(nn.Module):
    """Two branches concatenated along channels (with a pooled third), then a 1×1 mix."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.b1 = nn.Conv2d(6, 3, 1)
        self.b2 = nn.Sequential(nn.Conv2d(6, 2, 1), nn.ReLU(), nn.Conv2d(2, 4, 3, padding=1))
        self.b3 = nn.Conv2d(6, 2, 1)
        self.mix = nn.Conv2d(9, 5, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        y = torch.cat([self.b1(x), self.b2(x), self.b3(nn.functional.max_pool2d(x, 1))], dim=1)
        return self.mix(torch.relu(y))


class DepthwiseNet(nn.Module):
    """MobileNet-style: depthwise (multiplier 1 and 2) and pointwise convs with BN + ReLU6."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn1 = nn.BatchNorm2d(8)
        self.pw = nn.Conv2d(8, 6, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.dw2 = nn.Conv2d(6, 12, 3, stride=2, padding=1, groups=6)
        self.head = nn.Conv2d(12, 4, 1)
        self.act = nn.ReLU6(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn0(self.stem(x)))
        x = self.act(self.bn1(self.dw(x)))
        x = self.act(self.bn2(self.pw(x)))
        return self.head(self.act(self.dw2(x)))


NETS = {
    "vgg": (VGGLike, (3, 8, 8)),
    "res": (ResLike, (3, 6, 6)),
    "cat": (CatLike, (3, 5, 5)),
    "depthwise": (DepthwiseNet, (3, 6, 6)),
}


# --------------------------------------------------------------------------- helpers


def randomise_bn(net: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters (so constants are visible)."""
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return net.eval()


def make(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor, ModelGraph]:
    torch.manual_seed(seed)
    cls, shape = NETS[name]
    net = randomise_bn(cls())
    x = torch.randn(3, *shape)
    return net, x, ModelGraph.build(net, x[:1])


def random_masks(graph: ModelGraph, keep: float, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {n: torch.rand(info.mask_shape, generator=gen) < keep
            for n, info in graph.layers.items()}


def masked_output(net: nn.Module, graph: ModelGraph, masks: dict[str, torch.Tensor],
                  layer: str, channels: list[int], x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), apply_kernel_masks(net, graph, masks):
        return forward_until(net, layer, x)[:, channels].clone()


def assert_rel(out: torch.Tensor, ref: torch.Tensor, tol: float = 1e-5) -> None:
    assert out.shape == ref.shape
    scale = max(float(ref.abs().max()), 1e-6)
    err = float((out - ref).abs().max()) / scale
    assert err <= tol, f"relative error {err:.3g} > {tol}"


def check_equal(net: nn.Module, graph: ModelGraph, masks: dict[str, torch.Tensor], layer: str,
                channels: list[int], x: torch.Tensor) -> CircuitModule:
    ref = masked_output(net, graph, masks, layer, channels, x)
    circuit = extract_module(net, graph, masks, layer, channels)
    with torch.no_grad():
        out = circuit(x)
    assert_rel(out, ref)
    return circuit


# --------------------------------------------------------------------------- equality


@pytest.mark.parametrize("name", list(NETS))
@pytest.mark.parametrize("keep", KEEPS)
def test_equals_masked_model_every_layer(name: str, keep: float) -> None:
    net, x, graph = make(name)
    gen = torch.Generator().manual_seed(int(keep * 1000))
    snap = snapshot(net)
    for layer, info in graph.layers.items():
        n_ch = max(1, info.out_channels // 2)
        channels = torch.randperm(info.out_channels, generator=gen)[:n_ch].tolist()
        masks = random_masks(graph, keep, gen)
        check_equal(net, graph, masks, layer, channels, x)
        effective, _ = graph.effective_mask(masks, layer, channels)
        check_equal(net, graph, effective, layer, channels, x)
    assert_unchanged(net, snap)


@pytest.mark.skipif(_nets is None, reason="tests/_nets.py not available")
@pytest.mark.parametrize("keep", (0.3, 0.05))
def test_equals_masked_model_graph_test_nets(keep: float) -> None:
    """The graph's brute-force nets: in-place add_, split, slicing, SE gates, Conv1d, ..."""
    assert _nets is not None
    gen = torch.Generator().manual_seed(7)
    for name in _nets.NETS:
        net, x = _nets.make(name, double=False)
        graph = ModelGraph.build(net, x)
        for layer, info in graph.layers.items():
            channels = torch.randperm(info.out_channels, generator=gen)[:2].tolist()
            masks = random_masks(graph, keep, gen)
            check_equal(net, graph, masks, layer, channels, x)
            effective, _ = graph.effective_mask(masks, layer, channels)
            check_equal(net, graph, effective, layer, channels, x)


def test_channels_with_no_inputs_keep_their_constants() -> None:
    """A fully masked first conv still emits bias → BN → ReLU constants; with zero padding
    the next conv turns them into border effects, which the module must reproduce."""
    net, x, graph = make("vgg", seed=3)
    masks = {name: torch.ones(info.mask_shape, dtype=torch.bool)
             for name, info in graph.layers.items()}
    masks["features.0"][:] = False
    circuit = check_equal(net, graph, masks, "features.4", [2, 5], x)
    out = circuit(x).detach()
    # no signal reaches features.4, yet the output is not flat: borders differ from the centre
    assert torch.allclose(out, out[:1].expand_as(out))
    assert not torch.allclose(out[..., 0, 0], out[..., 1, 1])
    first = circuit.net.get_submodule("features.0")
    assert first.out_channels == 6 and bool((first.weight == 0).all())
    assert first.in_channels == 1  # reads one image channel only, for the spatial size
    # the constants matter: without them the masked model's output differs
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.bias.zero_()
                m.running_mean.zero_()
            if isinstance(m, nn.Conv2d) and m.bias is not None:
                m.bias.zero_()
    assert not torch.allclose(masked_output(net, graph, masks, "features.4", [2, 5], x), out)


def test_total_collapse_gives_the_bias_map() -> None:
    net, x, graph = make("cat")
    masks = {name: torch.zeros(info.mask_shape, dtype=torch.bool)
             for name, info in graph.layers.items()}
    circuit = check_equal(net, graph, masks, "mix", [4, 1], x)
    assert circuit.parameter_count() < count_parameters(net)


def test_depthwise_keeps_matching_inputs_and_outputs() -> None:
    net, x, graph = make("depthwise")
    gen = torch.Generator().manual_seed(0)
    masks = random_masks(graph, 0.6, gen)
    circuit = check_equal(net, graph, masks, "dw", [5, 2], x)
    assert circuit.channel_map["dw"] == [2, 5]
    assert circuit.input_channel_map["dw"] == [2, 5]
    assert circuit.net.get_submodule("dw").groups == 2
    # multiplier 2: channel 7 belongs to group 3 (outputs 6, 7; input 3)
    circuit = check_equal(net, graph, masks, "dw2", [7], x)
    assert circuit.channel_map["dw2"] == [6, 7]
    assert circuit.input_channel_map["dw2"] == [3]
    assert circuit(x).shape == (3, 1, 3, 3)
    effective, _ = graph.effective_mask(masks, "head", [1])
    check_equal(net, graph, effective, "head", [1], x)


def test_cat_branch_not_read_is_dropped() -> None:
    net, x, graph = make("cat")
    masks = {name: torch.ones(info.mask_shape, dtype=torch.bool)
             for name, info in graph.layers.items()}
    masks["mix"][:] = False
    masks["mix"][3, [4, 6]] = True  # channels 1 and 3 of b2 (offset 3)
    circuit = check_equal(net, graph, masks, "mix", [3], x)
    assert "b1" not in circuit.channel_map and "b3" not in circuit.channel_map
    assert circuit.channel_map["b2.2"] == [1, 3]
    assert circuit.input_channel_map["mix"] == [4, 6]


def test_residual_add_operands_are_aligned() -> None:
    net, x, graph = make("res")
    masks = {name: torch.ones(info.mask_shape, dtype=torch.bool)
             for name, info in graph.layers.items()}
    masks["fc"][:] = False
    masks["fc"][2, [1, 4]] = True
    circuit = check_equal(net, graph, masks, "fc", [2], x)
    # both summands of layer2's addition provide channels 1 and 4
    assert circuit.channel_map["layer2.conv2"] == [1, 4]
    assert circuit.channel_map["layer2.downsample.0"] == [1, 4]
    assert circuit.net.get_submodule("layer2.bn2").num_features == 2
    assert circuit.net.get_submodule("layer2.downsample.1").num_features == 2


# --------------------------------------------------------------------------- structure


def test_channel_map_and_sliced_weights() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(6, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 5),
    )
    randomise_bn(net)
    x = torch.randn(2, 3, 4, 4)
    graph = ModelGraph.build(net, x[:1])
    masks = {name: torch.zeros(info.mask_shape, dtype=torch.bool)
             for name, info in graph.layers.items()}
    masks["6"][2, [1, 3]] = True
    masks["6"][0, 0] = True  # another unit: irrelevant
    masks["2"][1, [0, 5]] = True
    masks["2"][3, 2] = True
    masks["0"][0, 1] = True
    masks["0"][5, 1] = True  # channel 2 of layer 0 keeps no kernel: a constant
    circuit = check_equal(net, graph, masks, "6", [2], x)
    assert circuit.channel_map == {"0": [0, 2, 5], "2": [1, 3], "6": [2]}
    assert circuit.input_channel_map == {"0": [1], "2": [0, 2, 5], "6": [1, 3]}
    assert circuit.input_channels == [1]
    assert circuit.target_layer == "6" and circuit.target_channels == [2]
    conv = circuit.net.get_submodule("2")
    expected = net[2].weight.detach()[[1, 3]][:, [0, 2, 5]].clone()
    expected[0, 1] = 0  # kernel (1, 2) is masked
    expected[1, [0, 2]] = 0  # row 3 keeps input 2 only
    assert torch.equal(conv.weight, expected)
    assert torch.equal(circuit.net.get_submodule("0").weight[1], torch.zeros(1, 3, 3))
    linear = circuit.net.get_submodule("6")
    assert linear.weight.shape == (1, 2 * 16)
    full = net[6].weight.detach()
    assert torch.equal(linear.weight[0], torch.cat([full[2, 16:32], full[2, 48:64]]))
    bn = circuit.net.get_submodule("3")
    assert torch.equal(bn.running_mean, net[3].running_mean[[1, 3]])
    assert bn.eps == net[3].eps and bn.momentum == net[3].momentum and not bn.training


def test_target_channel_order_and_defaults() -> None:
    net, x, graph = make("vgg")
    gen = torch.Generator().manual_seed(1)
    masks = random_masks(graph, 0.3, gen)
    circuit = check_equal(net, graph, masks, "features.7", [4, 0, 2], x)
    assert circuit.channel_map["features.7"] == [4, 0, 2]
    assert circuit(x).shape == (3, 3, 4, 4)
    everything = extract_module(net, graph, masks, "features.7")
    assert everything.target_channels == [0, 1, 2, 3, 4]
    as_tensor = extract_module(net, graph, masks, "features.7", torch.tensor([4, 0, 2]))
    with torch.no_grad():
        assert torch.equal(as_tensor(x), circuit(x))
        assert_rel(everything(x)[:, [4, 0, 2]], circuit(x))


def test_no_modules_after_the_target() -> None:
    net, x, graph = make("vgg")
    masks = random_masks(graph, 0.5, torch.Generator().manual_seed(0))
    circuit = extract_module(net, graph, masks, "features.4", [1])
    order = [name for name, _ in net.named_modules()]
    kept = [n.target for n in circuit.net.graph.nodes if n.op == "call_module"]
    assert kept and all(order.index(str(t)) <= order.index("features.4") for t in kept)
    assert not any(isinstance(m, nn.Linear) for m in circuit.modules())
    assert set(circuit.channel_map) <= {"features.0", "features.4"}
    assert circuit(x).shape == (3, 1, 4, 4)


def test_physically_smaller_on_zoo_models_random_weights() -> None:
    gen = torch.Generator().manual_seed(0)
    for cls, targets in ((FmnistVGG, ("features.7", "classifier.2", "classifier.5")),
                         (FmnistResNet, ("layer2.conv2", "layer3.downsample.0", "fc"))):
        torch.manual_seed(0)
        net = randomise_bn(cls())
        x = torch.randn(2, 1, 28, 28)
        graph = ModelGraph.build(net, x[:1])
        snap = snapshot(net)
        for target in targets:
            masks = random_masks(graph, 0.1, gen)
            effective, _ = graph.effective_mask(masks, target, [3])
            for m in (masks, effective):
                circuit = check_equal(net, graph, m, target, [3], x)
                report = circuit.compare(net, graph=graph)
                assert report["parameters"] < report["original_parameters_to_target"]
                assert report["macs"] < report["original_macs_to_target"]
                assert report["original_parameters"] == count_parameters(net)
        assert_unchanged(net, snap)


@pytest.mark.skipif(not (WEIGHTS / "fmnist_vgg.safetensors").exists(),
                    reason="bundled fmnist_vgg weights not present")
def test_bundled_fmnist_vgg_weights() -> None:
    from netcarve.zoo import load_model

    net = load_model("fmnist_vgg").model.eval()
    x = torch.rand(4, 1, 28, 28)
    graph = ModelGraph.build(net, x[:1])
    gen = torch.Generator().manual_seed(0)
    for target, channels in (("features.11", [7]), ("classifier.5", [3, 1])):
        for keep in (0.1, 0.02):
            masks = random_masks(graph, keep, gen)
            check_equal(net, graph, masks, target, channels, x)
            effective, _ = graph.effective_mask(masks, target, channels)
            check_equal(net, graph, effective, target, channels, x)


# --------------------------------------------------------------------------- independence


def test_model_bitwise_unchanged_and_nothing_shared() -> None:
    net, x, graph = make("res")
    net.train()
    snap = snapshot(net)
    modes = [m.training for m in net.modules()]
    masks = random_masks(graph, 0.3, torch.Generator().manual_seed(0))
    circuit = extract_module(net, graph, masks, "layer2.conv2", [0, 3])
    with torch.no_grad():
        assert circuit(x).shape == (3, 2, 3, 3)
    assert_unchanged(net, snap)
    assert [m.training for m in net.modules()] == modes
    assert not circuit.training
    ptrs = {t.data_ptr() for t in [*net.parameters(), *net.buffers()]}
    assert not any(t.data_ptr() in ptrs for t in [*circuit.parameters(), *circuit.buffers()])
    with torch.no_grad():
        for p in circuit.parameters():
            p.add_(1.0)
    assert_unchanged(net, snap)


def test_float64_and_state_dict_round_trip() -> None:
    net, x, graph = make("vgg")
    masks = random_masks(graph, 0.3, torch.Generator().manual_seed(2))
    circuit = check_equal(net, graph, masks, "classifier.2", [1, 6], x)
    ref = masked_output(net, graph, masks, "classifier.2", [1, 6], x)
    wide = copy.deepcopy(circuit).to(torch.float64)
    with torch.no_grad():
        out64 = wide(x.double())
    assert out64.dtype == torch.float64
    assert_rel(out64.float(), ref)
    buffer = io.BytesIO()
    torch.save(circuit.state_dict(), buffer)
    buffer.seek(0)
    clone = copy.deepcopy(circuit)
    with torch.no_grad():
        for p in clone.parameters():
            p.zero_()
    clone.load_state_dict(torch.load(buffer, weights_only=True))
    with torch.no_grad():
        assert torch.equal(clone(x), circuit(x))


# --------------------------------------------------------------------------- counting


def test_macs_and_parameters_hand_computed() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 2 * 2, 3))
    x = torch.randn(2, 1, 4, 4)
    graph = ModelGraph.build(net, x[:1])
    assert count_macs(net, graph) == 2 * 1 * 9 * 4 + 8 * 3  # 96
    assert count_macs(net, graph, ["0"]) == 72
    masks = {"2": torch.zeros(3, 2, dtype=torch.bool)}
    masks["2"][1, 0] = True
    circuit = check_equal(net, graph, masks, "2", [1], x)
    assert circuit.channel_map == {"0": [0], "2": [1]}
    assert circuit.macs() == 1 * 1 * 9 * 4 + 4 * 1  # 40
    assert circuit.parameter_count() == (9 + 1) + (4 + 1)
    report = circuit.compare(net)
    assert report["original_macs"] == 96 and report["original_macs_to_target"] == 96
    assert report["original_parameters"] == 2 * 9 + 2 + 8 * 3 + 3
    assert report["macs"] == 40 and report["parameters"] == 15
    assert report["mac_ratio"] == pytest.approx(40 / 96)
    convs = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 3, 1))
    g_convs = ModelGraph.build(convs, torch.zeros(1, 1, 4, 4))
    conv_only = extract_module(convs, g_convs, {}, "0", [1])
    assert conv_only.macs() == 1 * 1 * 9 * 4
    assert conv_only.macs((1, 6, 6)) == 1 * 1 * 9 * 16
    report = conv_only.compare(convs, (1, 6, 6))
    assert report["original_macs_to_target"] == 2 * 9 * 16
    assert report["original_macs"] == 2 * 9 * 16 + 3 * 2 * 16
    assert report["original_parameters_to_target"] == 2 * 9 + 2
    grouped = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, groups=4))
    g2 = ModelGraph.build(grouped, torch.zeros(1, 4, 5, 5))
    assert count_macs(grouped, g2) == 8 * 1 * 9 * 25


# --------------------------------------------------------------------------- errors


def test_errors_name_the_problem() -> None:
    net, _, graph = make("vgg")
    with pytest.raises(SurgeryError, match=r"unknown target layer 'features\.44'.*features\.4"):
        extract_module(net, graph, {}, "features.44", [0])
    with pytest.raises(SurgeryError, match="BatchNorm2d, not a conv/linear layer"):
        extract_module(net, graph, {}, "features.1", [0])
    with pytest.raises(SurgeryError, match=r"channel 9 out of range for features\.4 \(0\.\.7\)"):
        extract_module(net, graph, {}, "features.4", [9])
    with pytest.raises(SurgeryError, match="no target channels"):
        extract_module(net, graph, {}, "features.4", [])
    with pytest.raises(SurgeryError, match="unknown layer 'features.44'"):
        extract_module(net, graph, {"features.44": torch.ones(1, 1)}, "features.4", [0])
    with pytest.raises(SurgeryError, match="expected"):
        extract_module(net, graph, {"features.4": torch.ones(2, 2)}, "features.4", [0])
    other = nn.Sequential(nn.Conv2d(3, 2, 3))
    with pytest.raises(SurgeryError, match="graph"):
        extract_module(other, graph, {}, "features.4", [0])
    assert issubclass(SurgeryError, NetcarveError)
