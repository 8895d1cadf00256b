"""Tests of netcarve.core.graph: building the channel graph, path queries, effective masks."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from netcarve.core.errors import NetcarveError
from netcarve.core.graph import ModelGraph
from netcarve.core.hooks import apply_kernel_masks, capture, forward_until
from netcarve.core.layers import ChannelLink, GraphError, MaskError

try:  # tests/ as a package or as a plain folder on sys.path
    from tests import _nets
except ImportError:  # pragma: no cover
    import _nets  # type: ignore[no-redef]

NETS, make, zero_constants = _nets.NETS, _nets.make, _nets.zero_constants


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread avoids OpenMP contention on shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def leaky(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every ReLU (module, F.relu, torch.relu) leaky, so no channel is ever dead.

    Brute-force checks compare outputs; a ReLU channel that is negative on every test image
    would hide a real dependency. Leaky ReLU has the same channel structure and f(0) = 0.
    Build graphs before using it (fx would not recognise the patched functions).
    """
    original = F.leaky_relu

    def relu(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        return original(x, 0.1, inplace=inplace)

    monkeypatch.setattr(F, "relu", relu)
    monkeypatch.setattr(torch, "relu", relu)


# --------------------------------------------------------------------------- structure


def test_plain_layers_and_shapes() -> None:
    net, x = make("plain")
    g = ModelGraph.build(net, x)
    assert list(g.layers) == ["features.0", "features.4", "classifier.1", "classifier.3"]
    fc = g.layer("classifier.1")
    assert (fc.kind, fc.in_channels, fc.out_channels, fc.spatial) == ("linear", 6, 5, 4)
    assert fc.mask_shape == (5, 6) and fc.input_shape == (24,) and fc.output_shape == (5,)
    conv = g.layer("features.4")
    assert conv.input_shape == (4, 4, 4) and conv.output_shape == (6, 4, 4)
    assert conv.weight_param == "features.4.weight" and conv.bias_param == "features.4.bias"
    assert g.layer("classifier.3").spatial == 1 and g.layer("classifier.3").in_channels == 5
    assert g.bn_after["features.0"] == ["features.1"] and g.bn_after["features.4"] == []
    (link,) = g.links["classifier.1"]
    assert link.source == "features.4"
    assert torch.equal(link.source_channels, torch.arange(6))
    assert torch.equal(link.input_channels, torch.arange(6))
    assert [lk.source for lk in g.links["features.0"]] == [None]


def test_resnet_residual_links() -> None:
    net, x = make("resnet")
    g = ModelGraph.build(net, x)
    assert len(g.layers) == 7
    assert g.sources("layer2.conv1") == ["conv1", "layer1.conv2"]
    assert g.sources("layer2.downsample.0") == ["conv1", "layer1.conv2"]
    assert g.sources("fc") == ["layer2.conv2", "layer2.downsample.0"]
    for link in g.links["fc"]:  # every fc input channel c = conv2:c + downsample:c
        assert torch.equal(link.source_channels, link.input_channels)
        assert torch.equal(link.input_channels, torch.arange(6))
    assert g.layer("fc").spatial == 1
    assert g.bn_after["layer2.downsample.0"] == ["layer2.downsample.1"]
    assert g.upstream("layer2.conv2") == ["conv1", "layer1.conv1", "layer1.conv2",
                                          "layer2.conv1"]
    assert g.downstream("layer1.conv2") == ["layer2.conv1", "layer2.conv2",
                                            "layer2.downsample.0", "fc"]
    assert g.consumers("layer2.conv2") == ["fc"]


def test_cat_and_functional_spellings() -> None:
    net, x = make("cat")
    g = ModelGraph.build(net, x)
    got = {(lk.source, tuple(lk.input_channels.tolist())) for lk in g.links["mix"]}
    assert got == {("b1", (0, 1)), ("b2.2", (2, 3, 4)), ("b3", (5, 6))}

    net, x = make("functional")
    g = ModelGraph.build(net, x)
    assert g.sources("c3") == ["c1", "c2"]  # torch.add(b, a) residual
    assert g.sources("c4") == ["c1", "c2", "c3"]  # c.add_(a) in place + cat(dim=-3)
    c4 = {lk.source: lk for lk in g.links["c4"]}
    assert c4["c3"].input_channels.tolist() == [0, 1, 2, 3]
    assert sorted(c4["c1"].input_channels.tolist()) == [0, 1, 2, 3, 4, 5, 6, 7]
    assert c4["c2"].input_channels.tolist() == [4, 5, 6, 7]
    assert g.layer("fc").spatial == 4 and g.layer("fc").in_channels == 5


def test_grouped_depthwise_and_view() -> None:
    net, x = make("group")
    g = ModelGraph.build(net, x)
    assert g.layer("grouped").mask_shape == (4, 3) and g.layer("grouped").groups == 2
    assert g.layer("depthwise").mask_shape == (8, 1) and g.layer("depthwise").groups == 4
    assert (g.layer("fc").in_channels, g.layer("fc").spatial) == (4, 4)
    for name in g.layers:
        info = g.layer(name)
        ks = g.kernel_sources(name)
        assert ks.dtype == torch.int64 and tuple(ks.shape) == info.mask_shape
        out_per_group = info.out_channels // info.groups
        in_per_group = info.in_channels // info.groups
        for o in range(info.out_channels):
            for j in range(in_per_group):
                assert ks[o, j] == (o // out_per_group) * in_per_group + j
    assert g.kernel_sources("depthwise")[:, 0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


def test_gate_split_slice_and_reordering_cat() -> None:
    net, x = make("se")
    g = ModelGraph.build(net, x)
    assert g.sources("fc1") == ["conv1"] and g.layer("fc1").in_channels == 6
    links = {lk.source: lk for lk in g.links["conv2"]}  # b = channels 2..5, gated by fc2
    assert set(links) == {"conv1", "fc2"}
    assert links["conv1"].source_channels.tolist() == [2, 3, 4, 5]
    assert links["fc2"].source_channels.tolist() == [2, 3, 4, 5]
    conv3 = {(lk.source, tuple(lk.source_channels.tolist())) for lk in g.links["conv3"]}
    assert conv3 == {("conv1", (4, 5, 0, 1)), ("fc2", (4, 5, 0, 1)), ("conv2", (0, 1, 2))}


def test_conv1d_net() -> None:
    net, x = make("conv1d")
    g = ModelGraph.build(net, x)
    assert list(g.layers) == ["c1", "c2", "fc"]
    assert (g.layer("fc").in_channels, g.layer("fc").spatial) == (2, 5)


def test_describe_is_json_friendly() -> None:
    net, x = make("resnet")
    rows = ModelGraph.build(net, x).describe()
    json.dumps(rows)
    fc = rows[-1]
    assert fc["name"] == "fc" and fc["kernels"] == 18 and fc["parameters"] == 21
    assert fc["sources"] == ["layer2.conv2", "layer2.downsample.0"]
    assert rows[0]["sources"] == ["input"]


def test_build_leaves_model_untouched() -> None:
    net, x = make("plain")
    net.train()
    net.classifier[3].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    ModelGraph.build(net, x)
    assert all(m.training for m in net.modules())
    assert not net.classifier[3].weight.requires_grad and net.features[0].weight.requires_grad
    for key, value in net.state_dict().items():  # no BN statistics update either
        assert torch.equal(value, before[key]), key
    assert all(not m._forward_hooks for m in net.modules())


# --------------------------------------------------------------------------- errors


def test_channel_mixing_op_is_refused() -> None:
    with pytest.raises(GraphError) as info:
        ModelGraph.build(_nets.PermuteNet(), _nets.PermuteNet.example_input())
    msg = str(info.value)
    assert "torch.Tensor.permute" in msg and "conv2" in msg and "fx node 'permute'" in msg

    with pytest.raises(GraphError, match=r"torch\.Tensor\.mean.*dim 1"):
        ModelGraph.build(_nets.MeanNet(), _nets.MeanNet.example_input())


def test_unknown_module_names_module_path() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.LocalResponseNorm(2), nn.Conv2d(4, 2, 1))
    with pytest.raises(GraphError, match=r"LocalResponseNorm.*module '1'"):
        ModelGraph.build(net, torch.randn(1, 3, 4, 4))


def test_mixing_after_last_layer_is_fine() -> None:
    g = ModelGraph.build(_nets.SoftmaxHeadNet(), _nets.SoftmaxHeadNet.example_input())
    assert list(g.layers) == ["conv", "fc"]


def test_control_flow_is_a_graph_error() -> None:
    net = _nets.ControlFlowNet()
    with pytest.raises(GraphError) as info:
        ModelGraph.build(net, net.example_input())
    msg = str(info.value)
    assert "could not trace" in msg and "'gate'" in msg and "channelwise" in msg
    assert isinstance(info.value, NetcarveError)
    g = ModelGraph.build(net, net.example_input(), channelwise=["gate"])
    assert g.sources("conv2") == ["conv1"]
    g = ModelGraph.build(net, net.example_input(), channelwise=[_nets.Gate])
    assert g.sources("conv2") == ["conv1"]


def test_reused_layer_and_bad_input() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(self.conv(x))

    with pytest.raises(GraphError, match="more than once"):
        ModelGraph.build(Twice(), torch.randn(1, 2, 3, 3))
    with pytest.raises(GraphError, match="example input"):
        ModelGraph.build(nn.Sequential(nn.Conv2d(3, 2, 1)), torch.randn(1, 5, 3, 3))


def test_name_and_channel_errors() -> None:
    net, x = make("plain")
    g = ModelGraph.build(net, x)
    with pytest.raises(GraphError, match=r"did you mean features\.4") as info:
        g.layer("feature.4")
    assert "describe()" in str(info.value)
    with pytest.raises(GraphError, match="is a ReLU, not a conv/linear layer"):
        g.layer("features.2")
    with pytest.raises(GraphError, match=r"channel 70 out of range for features\.4 \(0\.\.5\)"):
        g.check_channel("features.4", 70)
    with pytest.raises(GraphError, match="out of range"):
        g.relevant_kernels("features.4", [-1])
    g.check_channel("features.4", 5)


# --------------------------------------------------------------------------- relevance


def _kernel_views(net: nn.Module, g: ModelGraph):
    """Yield ``(layer, o, j, weight slice)`` for every kernel of every layer."""
    modules = dict(net.named_modules())
    for name, info in g.layers.items():
        w = modules[name].weight
        for o in range(info.mask_shape[0]):
            for j in range(info.mask_shape[1]):
                if info.kind == "linear":
                    yield name, o, j, w[o, j * info.spatial:(j + 1) * info.spatial]
                else:
                    yield name, o, j, w[o, j]


def _changed_channels(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """bool [channels]: channels (dim 1) whose values moved anywhere in the batch."""
    diff = (new - old).abs().transpose(0, 1).reshape(new.shape[1], -1)
    return diff.amax(dim=1) > 1e-9


@pytest.mark.parametrize("net_name", list(NETS))
def test_relevant_kernels_brute_force(net_name: str, request: pytest.FixtureRequest) -> None:
    """A kernel is relevant iff perturbing its weights changes the target channel."""
    net, x = make(net_name, batch=4)
    g = ModelGraph.build(net, x)
    request.getfixturevalue("leaky")
    names = list(g.layers)
    with torch.no_grad(), capture(net, names) as out:
        net(x)
        base = {n: out[n].clone() for n in names}
        effect = {}
        gen = torch.Generator().manual_seed(1)
        for name, o, j, view in _kernel_views(net, g):
            saved = view.clone()
            view.add_(torch.randn(view.shape, generator=gen, dtype=view.dtype) + 1.0)
            net(x)
            view.copy_(saved)
            effect[(name, o, j)] = {t: _changed_channels(out[t], base[t]) for t in names}
    for target in names:
        info = g.layer(target)
        subsets = [None, *([c] for c in range(info.out_channels))]
        for channels in subsets:
            rel = g.relevant_kernels(target, channels)
            chans = list(range(info.out_channels)) if channels is None else channels
            for (name, o, j), eff in effect.items():
                expected = bool(eff[target][chans].any())
                got = name in rel and bool(rel[name][o, j])
                assert got == expected, (target, channels, name, o, j)
            assert all(r.any() for r in rel.values())
            assert list(rel) == [n for n in names if n in rel]  # topological order


# --------------------------------------------------------------------------- effective masks


def _reference_effective(g: ModelGraph, masks: dict, target: str, channels: list[int]):
    """Path-enumeration reference written as plain loops over channels and kernels."""
    edges = []  # (source node, layer, o, j); a node is ("input", c) or (layer, o)
    for name, info in g.layers.items():
        feeders: dict[int, list] = {}
        for link in g.links[name]:
            for s, i in zip(link.source_channels.tolist(), link.input_channels.tolist(),
                            strict=True):
                feeders.setdefault(i, []).append(("input", s) if link.source is None
                                                  else (link.source, s))
        out_pg = info.out_channels // info.groups
        in_pg = info.in_channels // info.groups
        for o in range(info.out_channels):
            for j in range(in_pg):
                i = (o // out_pg) * in_pg + j
                for src in feeders.get(i, []):
                    edges.append((src, name, o, j))
    kept = [e for e in edges if e[1] in masks and bool(masks[e[1]][e[2], e[3]])]
    forward = {e[0] for e in edges if e[0][0] == "input"}
    grew = True
    while grew:
        grew = False
        for src, name, o, _j in kept:
            if src in forward and (name, o) not in forward:
                forward.add((name, o))
                grew = True
    backward = {(target, c) for c in channels}
    grew = True
    while grew:
        grew = False
        for src, name, o, _j in kept:
            if (name, o) in backward and src not in backward:
                backward.add(src)
                grew = True
    survivors = {(name, o, j) for src, name, o, j in kept
                 if src in forward and (name, o) in backward}
    collapsed = not any((target, c) in forward for c in channels)
    return survivors, collapsed


def _random_masks(g: ModelGraph, keep: float, gen: torch.Generator) -> dict:
    return {n: torch.rand(i.mask_shape, generator=gen) < keep for n, i in g.layers.items()}


@pytest.mark.parametrize("net_name", list(NETS))
def test_effective_mask_matches_path_reference(net_name: str) -> None:
    net, x = make(net_name)
    g = ModelGraph.build(net, x)
    gen = torch.Generator().manual_seed(3)
    for trial, keep in enumerate([0.2, 0.35, 0.5, 0.8, 1.0] * 2):
        masks = _random_masks(g, keep, gen)
        for target in g.layers:
            n_out = g.layers[target].out_channels
            channels = None if trial % 2 else [trial % n_out]
            chans = list(range(n_out)) if channels is None else channels
            eff, collapsed = g.effective_mask(masks, target, channels)
            survivors, ref_collapsed = _reference_effective(g, masks, target, chans)
            got = {(n, o, j) for n, m in eff.items() for o, j in m.nonzero().tolist()}
            assert got == survivors, (target, keep)
            assert collapsed == ref_collapsed
            rel = g.relevant_kernels(target, channels)
            assert list(eff) == list(rel)
            for n, m in eff.items():
                assert m.dtype == torch.bool and tuple(m.shape) == g.layers[n].mask_shape
                assert not (m & ~rel[n]).any()
            again, again_collapsed = g.effective_mask(eff, target, channels)
            assert again_collapsed == collapsed
            assert all(torch.equal(again[n], eff[n]) for n in eff)  # idempotent
            if collapsed:
                assert not any(m.any() for m in eff.values())
            if keep == 1.0:
                assert not collapsed and all(torch.equal(eff[n], rel[n]) for n in rel)


@pytest.mark.parametrize("net_name", list(NETS))
def test_effective_mask_preserves_masked_output(
    net_name: str, request: pytest.FixtureRequest
) -> None:
    """With zero biases/BN shifts, dropping the non-effective kernels changes nothing."""
    net, x = make(net_name)
    zero_constants(net)
    g = ModelGraph.build(net, x)
    request.getfixturevalue("leaky")
    gen = torch.Generator().manual_seed(5)
    collapses = 0
    for keep in (0.15, 0.3, 0.5, 0.7):
        masks = _random_masks(g, keep, gen)
        for target in g.layers:
            channel = int(torch.randint(g.layers[target].out_channels, (1,), generator=gen))
            eff, collapsed = g.effective_mask(masks, target, [channel])
            with torch.no_grad():
                with apply_kernel_masks(net, g, masks):
                    ref = forward_until(net, target, x)[:, channel]
                with apply_kernel_masks(net, g, eff):
                    got = forward_until(net, target, x)[:, channel]
            torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
            if collapsed:
                collapses += 1
                assert not ref.any()
            else:
                assert ref.abs().sum() > 0
    assert collapses > 0  # the sparse settings exercise total collapse


def test_effective_mask_absent_layers_and_errors() -> None:
    net, x = make("plain")
    g = ModelGraph.build(net, x)
    full = {n: torch.ones(i.mask_shape, dtype=torch.bool) for n, i in g.layers.items()}
    eff, collapsed = g.effective_mask({"features.4": full["features.4"]}, "features.4", [0])
    assert collapsed and not any(m.any() for m in eff.values())  # features.0 absent → False
    eff, collapsed = g.effective_mask(full, "features.4", [2])
    assert not collapsed and list(eff) == ["features.0", "features.4"]
    assert eff["features.4"].sum() == 4 and eff["features.4"][2].all()
    with pytest.raises(MaskError, match=r"features\.0"):
        g.effective_mask({"feature.0": full["features.0"]}, "features.4")
    with pytest.raises(MaskError, match=r"expected \(4, 3\)"):
        g.effective_mask({"features.0": torch.ones(3, 4, dtype=torch.bool)}, "features.4")


def test_channel_link_dataclass_is_frozen() -> None:
    link = ChannelLink(None, torch.arange(2), torch.arange(2))
    with pytest.raises(AttributeError):
        link.source = "x"  # type: ignore[misc]


# --------------------------------------------------------------------------- zoo


_ZOO = importlib.util.find_spec("netcarve.zoo.torchvision_models") is not None


@pytest.mark.skipif(not _ZOO, reason="netcarve.zoo.torchvision_models not available")
@pytest.mark.parametrize(
    ("arch", "size", "convs", "linears"),
    [("alexnet", 64, 5, 3), ("vgg11", 32, 8, 3), ("vgg16_bn", 32, 13, 3),
     ("resnet18", 64, 20, 1)],
)
def test_torchvision_architectures(arch: str, size: int, convs: int, linears: int) -> None:
    from netcarve.zoo import torchvision_models as tv

    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = getattr(tv, arch)(num_classes=10)
        g = ModelGraph.build(model, torch.zeros(1, 3, size, size))
    kinds = [info.kind for info in g.layers.values()]
    assert kinds.count("conv") == convs and kinds.count("linear") == linears
    last = list(g.layers)[-1]
    relevant = g.relevant_kernels(last, [3])
    assert list(relevant) == list(g.layers) and relevant[last].sum() == g.layer(last).in_channels
    assert all(link.input_channels.device.type == "cpu" for link in g.links[last])
    if arch == "resnet18":
        assert (g.layer("fc").in_channels, g.layer("fc").spatial) == (512, 1)
        assert sum("downsample" in n for n in g.layers) == 3
        assert g.sources("layer2.0.conv1") == ["conv1", "layer1.0.conv2", "layer1.1.conv2"]
        assert g.bn_after["layer3.0.downsample.0"] == ["layer3.0.downsample.1"]
    if arch == "alexnet":
        info = g.layer("classifier.1")
        assert (info.in_channels, info.spatial, info.mask_shape) == (256, 36, (4096, 256))
    if arch.startswith("vgg"):
        assert (g.layer("classifier.0").in_channels, g.layer("classifier.0").spatial) == (512, 49)
    if arch == "vgg16_bn":
        assert g.bn_after["features.0"] == ["features.1"]


class _Moves(nn.Module):
    """Data-movement ops between convs, each followed exactly by the graph."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.conv3 = nn.Conv2d(12 if op == "pixel_unshuffle" else 6, 4, 1)
        self.fc = nn.Linear(4 * 16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.conv1(x))
        if self.op == "flip":
            a = a.flip(1)
        elif self.op == "roll":
            a = torch.roll(a, 2, dims=1)
        elif self.op == "list_index":
            a = a[:, [5, 0, 3, 1, 2, 4]]
        elif self.op == "shuffle3":
            b, c, h, w = a.size()
            a = a.view(b, 3, c // 3, h, w).transpose(1, 2).reshape(b, c, h, w)
        elif self.op == "permute_round_trip":
            a = a.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
        elif self.op == "spatial_transpose":
            a = a.transpose(2, 3)
        elif self.op == "channel_shuffle":
            a = torch.nn.functional.channel_shuffle(a, 2)
        b = self.conv2(a)
        if self.op == "pixel_unshuffle":
            b = torch.nn.functional.pixel_unshuffle(b[:, :3], 2)  # 3 ch → 12 ch at half size
            b = torch.nn.functional.interpolate(b, scale_factor=2.0)
        z = torch.relu(self.conv3(b))
        return self.fc(torch.nn.functional.adaptive_avg_pool2d(z, 4).flatten(1))


@pytest.mark.parametrize("op", ["flip", "roll", "list_index", "shuffle3", "permute_round_trip",
                                "spatial_transpose", "channel_shuffle", "pixel_unshuffle"])
def test_data_movement_links_equal_measured_dependencies(op: str) -> None:
    from _dependencies import graph_links, measured_links

    torch.manual_seed(0)
    net = _Moves(op).eval()
    x = torch.randn(2, 3, 8, 8)
    graph = ModelGraph.build(net, x[:1])
    for source in [None, *graph.layers]:
        assert graph_links(graph, source) == measured_links(net, graph, x, source), source


def test_a_view_that_spreads_channels_then_reduces_them_is_refused() -> None:
    class PairMean(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 6, 1)
            self.conv2 = nn.Conv2d(3, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = self.conv1(x)
            return self.conv2(a.view(a.shape[0], 3, 2, 4, 4).mean(2))

    with pytest.raises(GraphError, match=r"spread over several dimensions by "
                                         r"torch\.Tensor\.view"):
        ModelGraph.build(PairMean(), torch.randn(1, 3, 4, 4))


def test_token_attention_is_refused_but_a_channel_attention_gate_is_followed() -> None:
    class Attention(nn.Module):  # timm's ViT attention: a qkv projection over tokens
        def __init__(self) -> None:
            super().__init__()
            self.qkv = nn.Linear(4, 12)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            return torch.softmax(q @ k.transpose(1, 2), dim=-1) @ v

    class ChannelAttn(nn.Module):  # CBAM's channel gate: pooled MLP, sigmoid, product
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Conv2d(4, 2, 1)
            self.fc2 = nn.Conv2d(2, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            gate = self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True))))
            return x * torch.sigmoid(gate)

    class Net(nn.Module):
        def __init__(self, block: nn.Module) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.block = block
            self.head = nn.Conv2d(4, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            z = self.conv(x)
            if isinstance(self.block, Attention):
                z = self.block(z.flatten(2).transpose(1, 2)).transpose(1, 2).reshape_as(z)
            else:
                z = self.block(z)
            return self.head(z)

    x = torch.randn(1, 3, 6, 6)
    with pytest.raises(GraphError, match=r"contains attention \(module 'block', Attention\)"):
        ModelGraph.build(Net(Attention()), x)
    graph = ModelGraph.build(Net(ChannelAttn()), x)
    assert sorted(graph.sources("head")) == ["block.fc2", "conv"]
