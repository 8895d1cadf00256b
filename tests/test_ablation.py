"""The ablation engine equals the naive loop bit for bit, counts its passes, leaves models alone."""

from __future__ import annotations

import pytest
import torch
from _nets import make
from torch import nn

from netcarve.ablation import (
    AblationEngine,
    AblationError,
    AblationStats,
    Metric,
    ablate,
    ablate_naive,
    resolve_metric,
    single_removals,
)
from netcarve.errors import DataError
from netcarve.graph import GraphError, ModelGraph
from netcarve.zoo import FASHION_MNIST_PRESET, ZOO


@pytest.fixture(autouse=True)
def _private_rng():
    """Seeds set inside a test (torch.manual_seed, _nets.make) do not leak out of it."""
    with torch.random.fork_rng(devices=[]):
        yield


FIELDS = ["correct", "correct5", "loss_sum", "class_correct", "class_loss", "class_count",
          "base_correct", "base_correct5", "base_loss_sum", "base_class_correct",
          "base_class_loss"]


def assert_same(a: AblationStats, b: AblationStats) -> None:
    assert a.n == b.n
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert torch.equal(x, y), f"{name}: engine {x} != naive {y}"


def labelled(name: str, n: int = 23, seed: int = 0):
    net, x = make(name, seed=seed, batch=n)
    with torch.no_grad():
        k = net(x).shape[1]
    y = torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(seed))
    return net, x, y


def candidates(c: int, seed: int = 0) -> torch.Tensor:
    """Single removals plus a few random multi-filter removals."""
    gen = torch.Generator().manual_seed(seed)
    multi = torch.rand(3, c, generator=gen) > 0.5
    multi[:, 0] = True
    return torch.cat([single_removals(c), multi])


@pytest.mark.parametrize("name", ["plain", "resnet", "cat", "group", "functional", "conv1d"])
def test_engine_equals_naive_on_every_layer(name: str) -> None:
    net, x, y = labelled(name)
    graph = ModelGraph.build(net, x[:1])
    engine = AblationEngine(net, x, y, graph=graph, batch_size=7, max_items=20)
    for layer, info in graph.layers.items():
        cand = candidates(info.out_channels)
        got = engine.evaluate(layer, cand)
        want = ablate_naive(net, layer, cand, x, y, graph=graph, batch_size=7)
        assert_same(got, want)
        assert got.counts.naive_passes == want.counts.full_passes == (len(cand) + 1) * 4


@pytest.mark.parametrize("name", ["plain", "resnet", "cat"])
def test_fixed_masks_on_other_layers(name: str) -> None:
    net, x, y = labelled(name, seed=1)
    graph = ModelGraph.build(net, x[:1])
    names = list(graph.layers)
    gen = torch.Generator().manual_seed(3)
    fixed = {}
    for other in (names[0], names[-2]):
        keep = torch.rand(graph.layers[other].out_channels, generator=gen) > 0.4
        keep[0] = True
        fixed[other] = keep
    engine = AblationEngine(net, x, y, graph=graph, batch_size=10)
    for layer in names[:-1]:
        cand = candidates(graph.layers[layer].out_channels, seed=2)
        assert_same(engine.evaluate(layer, cand, fixed),
                    ablate_naive(net, layer, cand, x, y, graph=graph, fixed=fixed,
                                 batch_size=10))


def test_engine_equals_naive_on_fmnist_vgg_float32() -> None:
    torch.manual_seed(0)
    net = ZOO["fmnist_vgg"].factory().eval()
    x = torch.randint(0, 256, (48, 1, 28, 28), dtype=torch.uint8)
    y = torch.randint(0, 10, (48,))
    cand = single_removals(64)[::4]
    engine = AblationEngine(net, x, y, preset=FASHION_MNIST_PRESET, batch_size=16)
    got = engine.evaluate("features.7", cand)
    want = ablate_naive(net, "features.7", cand, x, y, preset=FASHION_MNIST_PRESET,
                        batch_size=16)
    assert_same(got, want)
    assert got.counts.prefix_passes == 3 and got.counts.full_passes == 0
    assert got.counts.naive_passes == 3 * (len(cand) + 1)


def test_skipping_and_caching_do_not_change_results() -> None:
    net, x, y = labelled("plain", n=30, seed=4)
    cand = candidates(6)
    plain = AblationEngine(net, x, y, batch_size=8, skip_unchanged=False, cache_mb=0)
    fast = AblationEngine(net, x, y, batch_size=8)
    a = plain.evaluate("features.4", cand)
    b = fast.evaluate("features.4", cand)
    assert_same(a, b)
    assert a.counts.skipped_items == 0
    again = fast.evaluate("features.4", cand)
    assert_same(again, b)
    assert b.counts.prefix_passes == 4 and again.counts.prefix_passes == 0  # prefix cached


def test_removing_a_silent_filter_is_skipped() -> None:
    net, x, y = labelled("plain", n=12, seed=5)
    with torch.no_grad():  # filter 2 of features.4 never fires: ReLU keeps it at 0
        net.features[4].weight[2].zero_()
        net.features[4].bias[2] = -1.0
    engine = AblationEngine(net, x, y, batch_size=12)
    stats = engine.evaluate("features.4", single_removals(6, [2]))
    assert stats.counts.skipped_items == 12
    assert torch.equal(stats.correct[0], stats.base_correct)
    assert torch.equal(stats.loss_sum[0], stats.base_loss_sum)


def test_model_comes_back_unchanged() -> None:
    net, x, y = labelled("resnet", seed=6)
    net.train()
    net.layer1.bn1.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    modes = [m.training for m in net.modules()]
    engine = AblationEngine(net, x, y, batch_size=9)
    engine.evaluate("layer1.conv1", single_removals(4))
    ablate_naive(net, "layer1.conv1", single_removals(4), x, y, batch_size=9)
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [m.training for m in net.modules()] == modes
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())


def test_metrics_and_drop_signs() -> None:
    net, x, y = labelled("plain", seed=7)
    margin = Metric("margin", lambda z, t: z.gather(1, t[:, None]).sum())
    stats = ablate(net, "features.0", single_removals(4), x, y, batch_size=5, metric=margin)
    with torch.no_grad():
        base_margin = float(net(x).gather(1, y[:, None]).sum()) / len(y)
    assert stats.base_metric(margin) == pytest.approx(base_margin, rel=1e-9)
    assert torch.allclose(stats.drop("top1"), stats.base_metric("top1") - stats.accuracy())
    assert torch.allclose(stats.drop("loss"), stats.loss() - stats.base_metric("loss"))
    assert torch.all(stats.correct5 >= stats.correct)
    assert int(stats.class_count.sum()) == len(y)
    assert torch.equal(stats.class_correct.sum(1), stats.correct)


def test_resolve_metric() -> None:
    assert resolve_metric(None).name == "top1"
    assert resolve_metric("Top-5").name == "top5"
    assert not resolve_metric("loss").higher_is_better
    assert resolve_metric(lambda z, t: 0.0).fn is not None
    with pytest.raises(AblationError, match="unknown metric"):
        resolve_metric("f1")


def test_errors() -> None:
    net, x, y = labelled("plain", seed=8)
    with pytest.raises(DataError, match="empty"):
        AblationEngine(net, x[:0], y[:0])
    engine = AblationEngine(net, x, y)
    with pytest.raises(AblationError, match=r"\[R, 4\]"):
        engine.evaluate("features.0", torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(GraphError, match="unknown layer"):
        engine.evaluate("features.9", torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(DataError, match="labels must lie"):
        AblationEngine(net, x, y + 10)


def test_single_removals_respects_keep() -> None:
    keep = torch.tensor([True, False, True, True])
    rows = single_removals(4, [0, 3], keep)
    assert rows.tolist() == [[False, False, True, True], [True, False, True, False]]


def test_model_with_batch_size_read_before_the_layer_falls_back() -> None:
    class SizeNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 3, 3)
            self.fc = nn.Linear(3 * 4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            n = x.shape[0]
            return self.fc(torch.relu(self.conv(x)).reshape(n, -1))

    torch.manual_seed(0)
    net = SizeNet().eval()
    x, y = torch.randn(10, 1, 4, 4), torch.randint(0, 2, (10,))
    engine = AblationEngine(net, x, y, batch_size=4)
    got = engine.evaluate("conv", single_removals(3))
    assert engine.plan("conv").mode == "input"
    assert_same(got, ablate_naive(net, "conv", single_removals(3), x, y, batch_size=4))


@pytest.mark.parametrize("layer", ["layer2.0.conv1", "layer2.0.conv2", "layer3.0.downsample.0"])
def test_engine_equals_naive_on_torchvision_resnet18(layer: str) -> None:
    from netcarve.zoo.torchvision_models import resnet18

    torch.manual_seed(0)
    net = resnet18(num_classes=10).eval()  # in-place ReLUs, `out += identity`
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 3, 32, 32, generator=gen), torch.randint(0, 10, (6,), generator=gen)
    graph = ModelGraph.build(net, x[:1])
    cand = single_removals(graph.layer(layer).out_channels)[::16]
    got = AblationEngine(net, x, y, graph=graph, batch_size=3).evaluate(layer, cand)
    assert_same(got, ablate_naive(net, layer, cand, x, y, graph=graph, batch_size=3))


def test_stats_to_dict() -> None:
    import json

    net, x, y = labelled("plain", seed=9)
    d = json.loads(json.dumps(ablate(net, "features.0", single_removals(4), x, y).to_dict()))
    assert len(d["accuracy"]) == 4 and d["n"] == len(y)
    assert d["forward_passes"]["naive_passes"] == 5


@pytest.mark.parametrize("kernel", [2, 3, (2, 3)])
def test_strided_max_pool_is_bitwise_equal_to_max_pool(kernel):
    from netcarve.ablation import _strided_max_pool

    torch.manual_seed(0)
    pool = torch.nn.MaxPool2d(kernel)
    for shape in [(3, 4, 8, 9), (2, 5, 7, 7), (1, 1, 6, 6)]:
        x = torch.randn(shape)
        x[0, 0, 0, 0] = float("nan")
        x[0, 0, 1, 1] = float("inf")
        x[-1, -1, -1, 0] = float("-inf")
        got = _strided_max_pool(pool, x)
        assert got is not None and got.is_contiguous()
        expected = pool(x)
        assert got.shape == expected.shape
        assert torch.equal(got.isnan(), expected.isnan())
        assert torch.equal(got.nan_to_num(0.0), expected.nan_to_num(0.0))
    # cases it must leave to the module
    x = torch.randn(1, 2, 8, 8)
    for other in (torch.nn.MaxPool2d(3, stride=2), torch.nn.MaxPool2d(2, padding=1),
                  torch.nn.MaxPool2d(2, ceil_mode=True), torch.nn.MaxPool2d(2, dilation=2)):
        assert _strided_max_pool(other, x) is None
