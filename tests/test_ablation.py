"""The ablation engine agrees with the naive loop within the stated tolerances (loss sums to
relative 1e-5 in float32, 1e-9 in float64; decisions identical except at counted near-ties),
counts its passes and leaves models alone."""

from __future__ import annotations

import copy

import pytest
import torch
from _nets import make
from _state import assert_unchanged, snapshot
from torch import nn

from netcarve.car.engine import AblationEngine, ablate
from netcarve.car.naive import ablate_naive, single_removals
from netcarve.car.stats import AblationError, AblationStats, Metric, compare_stats, resolve_metric
from netcarve.core.errors import DataError
from netcarve.core.graph import ModelGraph
from netcarve.core.layers import GraphError
from netcarve.zoo import FASHION_MNIST_PRESET, ZOO


@pytest.fixture(autouse=True)
def _private_rng():
    """Seeds set inside a test (torch.manual_seed, _nets.make) do not leak out of it."""
    with torch.random.fork_rng(devices=[]):
        yield


def assert_same(a: AblationStats, b: AblationStats, dtype: torch.dtype = torch.float32) -> None:
    """Engine ``a`` agrees with reference ``b`` under the contract of ``compare_stats``."""
    agreement = compare_stats(a, b, dtype)
    assert agreement.ok, agreement.describe()
    # the contract's allowance is only for near-ties, and these nets have none in practice
    assert agreement.decision_changes <= agreement.near_ties


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


@pytest.mark.parametrize("name", ["plain", "resnet", "cat", "group", "functional"])
def test_linear_shortcut_agrees_with_the_layer_and_the_naive_loop(name: str) -> None:
    """The next layer's output computed as the unablated output plus each removed channel's
    change through that layer gives the same statistics as running the layer (and as the naive
    loop) within the contract's tolerances; it is used wherever the next layer is a plain conv
    or linear (here: at least one layer of every net)."""
    net, x, y = labelled(name, seed=6)
    graph = ModelGraph.build(net, x[:1])
    short = AblationEngine(net, x, y, graph=graph, batch_size=7, max_items=20)
    full = AblationEngine(net, x, y, graph=graph, batch_size=7, max_items=20,
                          linear_shortcut=False)
    used = 0
    for layer, info in graph.layers.items():
        cand = candidates(info.out_channels, seed=7)
        a = short.evaluate(layer, cand)
        b = full.evaluate(layer, cand)
        assert b.counts.shortcut_items == 0
        assert a.counts.shortcut_items <= a.counts.suffix_items
        used += a.counts.shortcut_items
        assert_same(a, b)
        assert_same(a, ablate_naive(net, layer, cand, x, y, graph=graph, batch_size=7))
    assert used > 0


@pytest.mark.parametrize("layer", ["features.7", "features.11", "features.14"])
def test_linear_shortcut_on_fmnist_vgg(layer: str) -> None:
    """conv -> BN -> ReLU (-> pool) -> conv and, for the last conv, pool -> flatten -> Linear:
    the shortcut is taken for every evaluated single-removal item, not for masks removing
    many channels at once (running the layer is cheaper there), and both agree with the naive
    loop."""
    torch.manual_seed(1)
    net = ZOO["fmnist_vgg"].factory().eval()
    x = torch.randint(0, 256, (40, 1, 28, 28), dtype=torch.uint8)
    y = torch.randint(0, 10, (40,))
    c = net.get_submodule(layer).out_channels
    singles, many = single_removals(c)[::8], torch.rand(2, c) > 0.7
    for cand, shortcut in ((singles, True), (many, False)):
        engine = AblationEngine(net, x, y, preset=FASHION_MNIST_PRESET, batch_size=20)
        got = engine.evaluate(layer, cand)
        if shortcut:  # every item that was not skipped as unchanged took the shortcut
            assert got.counts.shortcut_items + got.counts.skipped_items == len(cand) * 40
            assert got.counts.shortcut_items > 0
        else:
            assert got.counts.shortcut_items == 0
        assert_same(got, ablate_naive(net, layer, cand, x, y, preset=FASHION_MNIST_PRESET,
                                      batch_size=20))


def test_linear_shortcut_is_turned_off_when_the_check_fails(monkeypatch) -> None:
    """If the one-time check against the real layer disagrees, the engine runs the layer
    instead (and still gives the naive loop's numbers)."""
    import netcarve.car._shortcut as shortcut

    monkeypatch.setattr(shortcut, "_close", lambda fast, real: False)
    net, x, y = labelled("plain", n=20, seed=8)
    cand = candidates(6)
    got = AblationEngine(net, x, y, batch_size=10).evaluate("features.4", cand)
    assert got.counts.shortcut_items == 0
    assert_same(got, ablate_naive(net, "features.4", cand, x, y, batch_size=10))


def test_removing_a_silent_filter_is_skipped() -> None:
    net, x, y = labelled("plain", n=12, seed=5)
    with torch.no_grad():  # filter 2 of features.4 never fires: ReLU keeps it at 0
        net.features[4].weight[2].zero_()
        net.features[4].bias[2] = -1.0
    engine = AblationEngine(net, x, y, batch_size=12)
    stats = engine.evaluate("features.4", single_removals(6, [2]))
    assert stats.counts.skipped_items == 12
    assert int(stats.correct[0]) == int(stats.base_correct)
    # skipped items reuse the unablated logits, so the sums are the same numbers
    torch.testing.assert_close(stats.loss_sum[0], stats.base_loss_sum, rtol=1e-12, atol=0.0)


def test_model_comes_back_unchanged() -> None:
    net, x, y = labelled("resnet", seed=6)
    net.train()
    net.layer1.bn1.eval()
    snap = snapshot(net)
    engine = AblationEngine(net, x, y, batch_size=9)
    engine.evaluate("layer1.conv1", single_removals(4))
    ablate_naive(net, "layer1.conv1", single_removals(4), x, y, batch_size=9)
    assert_unchanged(net, snap)


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
    assert stats.class_correct.sum(1).tolist() == stats.correct.tolist()


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
    from netcarve.car._plan import _strided_max_pool

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
        # a maximum selects one of its inputs, so zero tolerance is the right one here
        torch.testing.assert_close(got, expected, rtol=0.0, atol=0.0, equal_nan=True)
    # cases it must leave to the module
    x = torch.randn(1, 2, 8, 8)
    for other in (torch.nn.MaxPool2d(3, stride=2), torch.nn.MaxPool2d(2, padding=1),
                  torch.nn.MaxPool2d(2, ceil_mode=True), torch.nn.MaxPool2d(2, dilation=2)):
        assert _strided_max_pool(other, x) is None


def test_engine_agrees_with_naive_in_float64_to_1e9() -> None:
    net, x, y = labelled("resnet", n=17, seed=10)
    net, x = net.double(), x.double()
    graph = ModelGraph.build(net, x[:1])
    for layer in list(graph.layers)[:3]:
        cand = candidates(graph.layers[layer].out_channels, seed=3)
        got = AblationEngine(net, x, y, graph=graph, batch_size=5).evaluate(layer, cand)
        want = ablate_naive(net, layer, cand, x, y, graph=graph, batch_size=5)
        assert_same(got, want, torch.float64)
        assert compare_stats(got, want, torch.float64).rtol == 1e-9


def test_near_ties_are_counted_and_allow_decision_changes() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(27, 2)).eval()
    with torch.no_grad():  # logits 0 and 1 are the same function up to the bias
        net[3].weight[1] = net[3].weight[0]
        net[3].bias[1] = net[3].bias[0] + 10.0  # logit 1 always wins, never a tie
    x, y = torch.randn(9, 1, 5, 5), torch.zeros(9, dtype=torch.long)
    stats = ablate(net, "0", single_removals(3), x, y)
    assert stats.near_ties is not None and stats.near_ties.tolist() == [0, 0, 0]
    with torch.no_grad():
        net[3].bias[1] = net[3].bias[0]  # now an exact tie on every image
    tied = ablate(net, "0", single_removals(3), x, y)
    assert tied.near_ties.tolist() == [9, 9, 9] and int(tied.base_near_ties) == 9
    # a decision that flips on a tied image is allowed; on an untied one it is not
    for reference, allowed in [(tied, True), (stats, False)]:
        flipped = copy.deepcopy(reference)
        flipped.correct[0] -= 1
        flipped.class_correct[0, 0] -= 1
        result = compare_stats(flipped, reference)
        assert result.ok is allowed, result.describe()
        assert result.decision_changes == 2
    assert "correct: candidate 0 differs by 1 images with only 0 near-ties" in result.describe()


def test_compare_stats_catches_loss_errors_above_the_tolerance() -> None:
    net, x, y = labelled("plain", seed=11)
    want = ablate_naive(net, "features.4", single_removals(6), x, y)
    off = ablate_naive(net, "features.4", single_removals(6), x, y)
    off.loss_sum = off.loss_sum * (1 + 3e-5)
    result = compare_stats(off, want)
    assert not result.ok and "loss_sum" in result.describe()
    assert result.max_loss_error == pytest.approx(3e-5, rel=0.05)
    assert compare_stats(off, want, rtol=1e-4).ok


def test_chunks_and_per_image_results() -> None:
    """Evaluating chunks [2, 0] gives the statistics of those images alone (as an engine built
    on them), per-image hits/losses add up to the sums, and bad chunk numbers are refused."""
    net, x, y = labelled("plain", n=30, seed=9)
    cand = candidates(6)
    engine = AblationEngine(net, x, y, batch_size=8)
    assert engine.n_chunks == 4
    got = engine.evaluate("features.4", cand, chunks=[2, 0], per_image=True)
    sub = torch.cat([torch.arange(16, 24), torch.arange(0, 8)])
    want = ablate_naive(net, "features.4", cand, x[sub], y[sub], batch_size=8)
    assert got.n == 16
    assert_same(got, want)
    assert got.image_correct is not None and got.image_loss is not None
    assert got.image_correct.shape == (len(cand), 16)
    assert torch.equal(got.image_correct.sum(1), got.correct)
    assert got.image_correct5 is not None
    assert torch.equal(got.image_correct5.sum(1), got.correct5)
    torch.testing.assert_close(got.image_loss.sum(1), got.loss_sum, rtol=1e-12, atol=0.0)
    last = engine.evaluate("features.4", cand, chunks=[3], per_image=True)
    assert last.n == 6 and last.image_correct is not None and last.image_correct.shape[1] == 6
    assert engine.evaluate("features.4", cand).image_correct is None
    with pytest.raises(AblationError, match=r"chunk 4 does not exist.*0\.\.3"):
        engine.evaluate("features.4", cand, chunks=[4])
    with pytest.raises(AblationError, match="repeat"):
        engine.evaluate("features.4", cand, chunks=[1, 1])
