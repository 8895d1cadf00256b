"""Least-squares folding after pruning (netcarve.surgery.fold) against naive references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from netcarve.surgery.fold import FoldError, fold_lstsq
from netcarve.surgery.prune import prune_filters
from netcarve.surgery.pruned import CompressError
from tests._nets import TinyResNet
from tests._state import assert_unchanged, snapshot


def _bn_stats(net: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.3 * torch.randn(m.num_features, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=gen))
                m.weight.copy_(0.5 + torch.rand(m.num_features, generator=gen))
                m.bias.copy_(0.2 * torch.randn(m.num_features, generator=gen))
    return net.eval()


def _vgg_like() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3), nn.ReLU(),
        nn.Flatten(), nn.Linear(3 * 8 * 8, 5))
    return _bn_stats(net)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_duplicate_filter_folds_exactly() -> None:
    """A filter that copies another (with its BatchNorm) is removed without changing the model
    once its share is folded into the next conv; dropping it changes the logits."""
    net = _vgg_like()
    with torch.no_grad():
        net[0].weight[3] = net[0].weight[1]
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(net[1], name)[3] = getattr(net[1], name)[1]
    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    keep = torch.tensor([True, True, True, False])
    snap = snapshot(net)
    dropped = prune_filters(net, {"0": keep}, example_input=x[:2])
    folded = prune_filters(net, {"0": keep}, example_input=x[:2], fold="lstsq",
                           fold_images=x, ridge=1e-9)
    assert_unchanged(net, snap)
    with torch.no_grad():
        want = net(x)
        assert _rel(folded.module(x), want) < 1e-5  # float32 rounding of the refit
        assert _rel(dropped.module(x), want) > 1e-2
    fit = folded.metadata["fold_fit"]["3"]
    assert fit["intercept"] == "batchnorm" and fit["columns"] == 3 * 9
    assert fit["r2_fold"] > 1 - 1e-9 and fit["r2_drop"] < 0.99
    assert folded.metadata["fold"] == "lstsq" and dropped.metadata["fold"] == "none"
    assert folded.module[3].in_channels == 3 and folded.params_after == dropped.params_after


def _patches(h: torch.Tensor) -> torch.Tensor:
    """Naive 3×3 / padding 1 / stride 1 patches, rows (image, y, x), columns (c, ky, kx)."""
    n, _, hh, ww = h.shape
    padded = F.pad(h, (1, 1, 1, 1))
    rows = []
    for i in range(n):
        for y in range(hh):
            for x in range(ww):
                rows.append(padded[i, :, y:y + 3, x:x + 3].reshape(-1))
    return torch.stack(rows)


def test_folded_conv_equals_ridge_prediction() -> None:
    """The refitted conv outputs the explicit ridge least-squares prediction on the probe set
    (design built by hand, solved with the closed form in float64)."""
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(2, 5, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(5, 3, 3, padding=1)).eval()
    x = torch.randn(6, 2, 5, 5, generator=torch.Generator().manual_seed(3))
    keep = torch.tensor([True, False, True, False, True])
    ridge = 0.05
    folded = prune_filters(net, {"0": keep}, example_input=x[:2], fold="lstsq",
                           fold_images=x, ridge=ridge)
    with torch.no_grad():
        h = torch.relu(net[0](x))[:, keep].double()
        a = _patches(h)
        y = net(x).double().permute(0, 2, 3, 1).reshape(-1, 3)
        ac, yc = a - a.mean(0), y - y.mean(0)
        gram = ac.T @ ac
        lam = ridge * float(torch.trace(gram)) / gram.shape[0]
        w = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype),
                               ac.T @ yc)
        b = y.mean(0) - a.mean(0) @ w
        want = (a @ w + b).reshape(6, 5, 5, 3).permute(0, 3, 1, 2)
        got = folded.module[2](torch.relu(folded.module[0](x))).double()
    assert _rel(got, want) < 1e-5
    assert folded.metadata["fold_fit"]["2"]["intercept"] == "bias"
    r2 = 1 - float(((y - (a @ w + b)) ** 2).sum() / (yc ** 2).sum())
    assert folded.metadata["fold_fit"]["2"]["r2_fold"] == pytest.approx(r2, abs=1e-6)


def test_nothing_pruned_is_a_no_op() -> None:
    net = _vgg_like()
    x = torch.randn(8, 1, 8, 8)
    full = {"0": torch.ones(4, dtype=torch.bool), "3": torch.ones(3, dtype=torch.bool)}
    folded = prune_filters(net, full, example_input=x[:2], fold="lstsq", fold_images=x)
    assert folded.metadata["fold_fit"] == {}
    for (name, p), (_, q) in zip(net.state_dict().items(), folded.module.state_dict().items(),
                                 strict=True):
        assert p.shape == q.shape and float((p.float() - q.float()).abs().max()) == 0.0, name


def test_flatten_linear_and_two_layers() -> None:
    """Pruning both convs refits the second conv and the Linear after the flatten (its column
    blocks); every refit fits the probe set at least as well as dropping."""
    net = _vgg_like()
    gen = torch.Generator().manual_seed(4)
    probe = torch.randn(96, 1, 8, 8, generator=gen)
    masks = {"0": torch.tensor([True, False, True, True]),
             "3": torch.tensor([True, True, False])}
    dropped = prune_filters(net, masks, example_input=probe[:2])
    folded = prune_filters(net, masks, example_input=probe[:2], fold="lstsq", fold_images=probe,
                           ridge=1e-4)
    fits = folded.metadata["fold_fit"]
    assert list(fits) == ["3", "7"]
    assert fits["7"]["columns"] == 2 * 64 and fits["7"]["intercept"] == "bias"
    for fit in fits.values():
        assert fit["r2_fold"] >= fit["r2_drop"] - 1e-9
    with torch.no_grad():
        want = net(probe)
        assert _rel(folded.module(probe), want) < _rel(dropped.module(probe), want)


def test_residual_block_consumer() -> None:
    """In a residual block the refitted conv2 is fitted before the addition, so the identity
    operand is untouched and the block output gets closer to the original."""
    torch.manual_seed(5)
    net = _bn_stats(TinyResNet())
    x = torch.randn(48, 3, 6, 6, generator=torch.Generator().manual_seed(6))
    snap = snapshot(net.train())
    masks = {"layer1.conv1": torch.tensor([True, False, True, False])}
    dropped = prune_filters(net, masks, example_input=x[:2])
    folded = prune_filters(net, masks, example_input=x[:2], fold="lstsq", fold_images=x)
    assert_unchanged(net, snap)
    fit = folded.metadata["fold_fit"]["layer1.conv2"]
    assert fit["r2_fold"] > fit["r2_drop"]
    net.eval()
    with torch.no_grad():
        want = net(x)
        assert _rel(folded.module(x), want) < _rel(dropped.module(x), want)
    assert not folded.module.training


def test_bad_fold_settings() -> None:
    net = _vgg_like()
    x = torch.randn(4, 1, 8, 8)
    keep = {"0": torch.tensor([True, False, True, True])}
    with pytest.raises(CompressError, match="unknown fold"):
        prune_filters(net, keep, example_input=x, fold="merge")
    with pytest.raises(CompressError, match="fold_images"):
        prune_filters(net, keep, example_input=x, fold="lstsq")
    small = prune_filters(net, keep, example_input=x)
    with pytest.raises(FoldError, match="ridge"):
        fold_lstsq(net, small, x, ridge=-1.0)
    with pytest.raises(FoldError, match="uint8"):
        fold_lstsq(net, small, torch.zeros(4, 1, 8, 8, dtype=torch.uint8))
