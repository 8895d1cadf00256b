"""The engine's convolutions (netcarve/car/_conv.py): trimmed to the rows and columns a
floor-mode pooling reads, and in channels-last layout on CPU, they give the values of the
plain conv (within float32 rounding, relative 1e-5) wherever the pooling looks."""

from __future__ import annotations

import pytest
import torch
import torch.fx
from torch import nn

from netcarve.car._conv import conv_routes, run_conv, trimmed_weight_conv
from netcarve.car.engine import AblationEngine
from netcarve.car.naive import ablate_naive, single_removals
from netcarve.car.stats import compare_stats
from netcarve.zoo import FASHION_MNIST_PRESET, ZOO


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    scale = float(b.abs().max())
    assert float((a - b).abs().max()) <= 1e-5 * max(scale, 1e-12)


CASES = [  # conv (kernel, stride, padding, dilation, groups), pool, input size
    ((3, 1, 1, 1, 1), nn.MaxPool2d(2), 7),
    ((3, 1, 1, 1, 1), nn.MaxPool2d(2), 8),  # nothing to drop
    ((3, 1, 0, 1, 1), nn.MaxPool2d(3, 2), 12),
    ((5, 2, 2, 1, 1), nn.AvgPool2d(2), 15),
    ((3, 1, 2, 2, 1), nn.MaxPool2d(2, dilation=2), 10),
    ((3, 1, 1, 1, 4), nn.MaxPool2d(2), 9),
    ((1, 1, 0, 1, 1), nn.AvgPool2d(3), 11),
    ((3, 2, 1, 1, 1), nn.MaxPool2d(4), 13),
]


@pytest.mark.parametrize(("conv_args", "pool", "size"), CASES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_trimmed_conv_gives_the_pooled_values(conv_args, pool, size, channels_last) -> None:
    k, s, p, d, g = conv_args
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, k, s, p, d, g)
    bn = nn.BatchNorm2d(12)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    net = nn.Sequential(conv, bn, nn.ReLU(), pool).eval()
    x = torch.randn(5, 8, size, size)
    gm = torch.fx.symbolic_trace(net)
    modules = dict(gm.named_modules())
    route = conv_routes(gm, modules)[next(n for n in gm.graph.nodes if n.target == "0")]
    assert route.pool is pool and route.keeps_layout
    with torch.no_grad():
        full = conv(x)
        fast = run_conv(conv, x, route, channels_last)
        _close(pool(torch.relu(bn(fast))), net(x))
        # the rows the pooling reads, computed directly
        kh = pool.kernel_size if isinstance(pool.kernel_size, int) else pool.kernel_size[0]
        dil = getattr(pool, "dilation", 1)
        span = (dil if isinstance(dil, int) else dil[0]) * (kh - 1) + 1
        stride = pool.stride if isinstance(pool.stride, int) else pool.stride[0]
        used_h = (full.shape[2] - span) // stride * stride + span
        assert fast.shape[2:] == (used_h, used_h)
        _close(fast, full[:, :, :used_h, :used_h])
        w = conv.weight[:, :1] if g == 1 else None
        if w is not None:
            contrib = trimmed_weight_conv(conv, x[:, :1], w, route)
            ref = nn.functional.conv2d(x[:, :1], w, None, s, p, d)
            _close(contrib, ref[:, :, :used_h, :used_h])
            nhwc = trimmed_weight_conv(conv, x[:, :1], w, route, nhwc=True)
            _close(nhwc, ref[:, :, :used_h, :used_h].permute(0, 2, 3, 1))


def _route_of(net: nn.Module, target: str):
    gm = torch.fx.symbolic_trace(net)
    routes = conv_routes(gm, dict(gm.named_modules()))
    return routes[next(n for n in gm.graph.nodes if n.target == target)]


def test_routes_of_fmnist_vgg() -> None:
    """Only the last conv feeds a pooling that drops anything at 28x28 (7x7 -> 3x3), but every
    conv's output reaches only convs or poolings through BatchNorm and ReLU."""
    net = ZOO["fmnist_vgg"].factory().eval()
    for name in ("features.0", "features.4", "features.7", "features.11", "features.14"):
        assert _route_of(net, name).keeps_layout
    assert isinstance(_route_of(net, "features.14").pool, nn.MaxPool2d)
    assert isinstance(_route_of(net, "features.0").pool, nn.MaxPool2d)
    assert _route_of(net, "features.4").pool is None  # conv4 -> BN -> ReLU -> conv7
    assert _route_of(net, "features.11").pool is None


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        return self.pool(y + x), self.head(x).view(x.shape[0], -1)


def test_routes_stop_at_anything_but_pointwise_ops() -> None:
    """A residual add ends the trimming route and a ``view`` makes the layout matter."""
    net = _Residual()
    r = _route_of(net, "conv")
    assert r.pool is None and not r.keeps_layout
    r = _route_of(net, "head")
    assert r.pool is None and not r.keeps_layout
    with torch.no_grad():
        x = torch.randn(3, 4, 7, 7)
        out = run_conv(net.head, x, r, True)
        assert out.is_contiguous()  # handed back contiguous: the model's view works


@pytest.mark.parametrize("layer", ["features.4", "features.7", "features.11", "features.14"])
def test_engine_with_and_without_channels_last_agrees_with_naive(layer: str) -> None:
    torch.manual_seed(2)
    net = ZOO["fmnist_vgg"].factory().eval()
    x = torch.randint(0, 256, (30, 1, 28, 28), dtype=torch.uint8)
    y = torch.randint(0, 10, (30,))
    cand = single_removals(net.get_submodule(layer).out_channels)[::5]
    want = ablate_naive(net, layer, cand, x, y, preset=FASHION_MNIST_PRESET, batch_size=10)
    for cl in (False, True):
        engine = AblationEngine(net, x, y, preset=FASHION_MNIST_PRESET, batch_size=10,
                                channels_last=cl)
        assert engine.channels_last is cl
        got = engine.evaluate(layer, cand)
        agreement = compare_stats(got, want)
        assert agreement.ok, agreement.describe()
        assert agreement.decision_changes <= agreement.near_ties


def test_channels_last_defaults_to_cpu_only() -> None:
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 9, 3)).eval()
    x, y = torch.randn(4, 1, 5, 5), torch.tensor([0, 1, 2, 0])
    assert AblationEngine(net, x, y).channels_last is True
