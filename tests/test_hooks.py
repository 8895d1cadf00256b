"""Tests of netcarve.core.hooks: masks restore the model exactly, capture/stop_at are correct."""

from __future__ import annotations

import copy
from contextlib import AbstractContextManager

import pytest
import torch
from _state import assert_unchanged, snapshot
from torch import nn

from netcarve.core.graph import ModelGraph
from netcarve.core.hooks import (
    apply_filter_masks,
    apply_kernel_masks,
    capture,
    forward_until,
    preserved_state,
    resolve_module,
    stop_at,
)
from netcarve.core.layers import GraphError, MaskError

try:  # tests/ as a package or as a plain folder on sys.path
    from tests import _nets
except ImportError:  # pragma: no cover
    import _nets  # type: ignore[no-redef]

make = _nets.make


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread avoids OpenMP contention on shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _enter(context: AbstractContextManager) -> None:
    """Enter a context that is expected to raise before its body runs."""
    with context:
        pytest.fail("the body must not run")


def _masks(g: ModelGraph, keep: float, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.rand(i.mask_shape, generator=gen) < keep for n, i in g.layers.items()}


def _odd_state(net: nn.Module) -> None:
    """Mixed training flags and requires_grad, so restoring them is actually tested."""
    net.train()
    for i, module in enumerate(net.modules()):
        if i % 2:
            module.training = False
    for i, param in enumerate(net.parameters()):
        param.requires_grad_(i % 3 != 0)


# --------------------------------------------------------------------------- kernel masks


@pytest.mark.parametrize("net_name", ["plain", "group", "resnet"])
def test_kernel_masks_match_manual_zeroing_and_restore(net_name: str) -> None:
    net, x = make(net_name)
    g = ModelGraph.build(net, x)
    masks = _masks(g, 0.5, seed=1)
    manual = copy.deepcopy(net)
    modules = dict(manual.named_modules())
    with torch.no_grad():
        for name, mask in masks.items():
            info, weight = g.layer(name), modules[name].weight
            for o, j in (~mask).nonzero().tolist():
                if info.kind == "linear":
                    weight[o, j * info.spatial:(j + 1) * info.spatial] = 0
                else:
                    weight[o, j] = 0
    _odd_state(net)
    snap = snapshot(net)
    net.eval()
    manual.eval()
    with torch.no_grad():
        expected = manual(x)
        with apply_kernel_masks(net, g, masks) as masked:
            assert masked is net
            got = net(x)
            for name in masks:  # biases untouched
                bias = dict(net.named_modules())[name].bias
                if bias is not None:
                    assert torch.equal(bias, dict(manual.named_modules())[name].bias)
        unmasked = net(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.equal(unmasked, got)
    for key, (_, training, _) in snap["modules"].items():  # undo the eval() above first
        dict(net.named_modules())[key].training = training
    assert_unchanged(net, snap)


def test_kernel_masks_restore_on_exception_and_keep_grads() -> None:
    net, x = make("plain")
    g = ModelGraph.build(net, x)
    _odd_state(net)
    snap = snapshot(net)
    with pytest.raises(RuntimeError, match="boom"), apply_kernel_masks(net, g, _masks(g, 0.3, 2)):
        assert (net.features[0].weight == 0).any()
        raise RuntimeError("boom")
    assert_unchanged(net, snap)

    # gradients computed inside the block flow through the masked weights
    net.features[0].weight.requires_grad_(True)
    mask = torch.ones(g.layer("features.0").mask_shape, dtype=torch.bool)
    mask[0] = False
    with apply_kernel_masks(net, g, {"features.0": mask}):
        net(x).sum().backward()
    assert net.features[0].weight.grad is not None
    assert torch.equal(net.features[0].weight, snap["tensors"]["features.0.weight"][0])


def test_kernel_mask_validation_happens_before_touching() -> None:
    net, x = make("plain")
    g = ModelGraph.build(net, x)
    snap = snapshot(net)
    good = torch.zeros(g.layer("features.0").mask_shape, dtype=torch.bool)
    with pytest.raises(MaskError, match=r"unknown layer 'features\.5'.*features\.4"):
        _enter(apply_kernel_masks(net, g, {"features.0": good, "features.5": good}))
    with pytest.raises(MaskError, match=r"shape \(6, 4\), expected \(4, 3\)"):
        _enter(apply_kernel_masks(net, g, {"features.4": torch.ones(6, 4, dtype=torch.bool),
                                           "features.0": torch.ones(6, 4, dtype=torch.bool)}))
    with pytest.raises(MaskError, match="torch.Tensor"):
        _enter(apply_kernel_masks(net, g, {"features.0": [[True] * 3] * 4}))  # type: ignore[dict-item]
    assert_unchanged(net, snap)


# --------------------------------------------------------------------------- filter masks


def test_filter_mask_is_zero_after_batchnorm() -> None:
    net, x = make("plain")
    g = ModelGraph.build(net, x)
    assert net.features[1].bias.abs().min() > 0  # a non-trivial BN shift
    keep = torch.ones(4, dtype=torch.bool)
    keep[1] = False
    snap = snapshot(net)
    with torch.no_grad():
        with capture(net, ["features.0", "features.1"]) as ref:
            net(x)
        ref = dict(ref)
        with apply_filter_masks(net, g, {"features.0": keep}), capture(
            net, ["features.0", "features.1", "features.3"]
        ) as out:
            net(x)
    assert torch.all(out["features.1"][:, 1] == 0) and torch.all(out["features.0"][:, 1] == 0)
    assert torch.all(out["features.3"][:, 1] == 0)  # ReLU and max-pool keep it at 0
    assert torch.equal(out["features.1"][:, keep], ref["features.1"][:, keep])
    assert_unchanged(net, snap)


def test_filter_mask_on_linear_and_resnet() -> None:
    net, x = make("plain")
    g = ModelGraph.build(net, x)
    keep = torch.tensor([True, False, True, False, True])
    with torch.no_grad(), apply_filter_masks(net, g, {"classifier.1": keep}), capture(
        net, ["classifier.1"]
    ) as out:
        net(x)
    assert torch.all(out["classifier.1"][:, ~keep] == 0)

    net, x = make("resnet")
    g = ModelGraph.build(net, x)
    keep = torch.ones(6, dtype=torch.bool)
    keep[4] = False
    with torch.no_grad(), apply_filter_masks(
        net, g, {"layer2.downsample.0": keep}
    ), capture(net, ["layer2.downsample"]) as out:
        net(x)
    assert torch.all(out["layer2.downsample"][:, 4] == 0)
    with pytest.raises(MaskError, match=r"expected \(6,\)"):
        _enter(apply_filter_masks(net, g, {"layer2.conv1": torch.ones(5, dtype=torch.bool)}))
    with pytest.raises(MaskError, match="did you mean"):
        _enter(apply_filter_masks(net, g, {"layer2.conv": keep}))
    assert all(not m._forward_hooks for m in net.modules())


# --------------------------------------------------------------------------- capture / stop


def test_capture_returns_pre_activation_with_inplace_relu() -> None:
    net, x = make("plain")
    with torch.no_grad():
        expected = net.features[:5](x)  # conv output, before its in-place ReLU
        with capture(net, ["features.4", "features.0"]) as out:
            net(x)
    assert (expected < 0).any()
    torch.testing.assert_close(out["features.4"], expected, rtol=0, atol=0)
    assert set(out) == {"features.4", "features.0"}
    with torch.no_grad(), capture(net, "features.4", clone=False) as raw:
        net(x)
    assert (raw["features.4"] >= 0).all()  # without a clone the in-place ReLU overwrote it
    assert all(not m._forward_hooks for m in net.modules())
    with pytest.raises(GraphError, match=r"did you mean features\.4"):
        _enter(capture(net, ["feature.4"]))


def test_stop_at_skips_later_layers() -> None:
    net, x = make("plain")
    calls = {"later": 0}

    def count(*_: object) -> None:
        calls["later"] += 1

    handles = [net.features[5].register_forward_hook(count),
               net.classifier[1].register_forward_hook(count)]
    with torch.no_grad():
        expected = net.features[:5](x)
        with stop_at(net, "features.4") as run:
            first = run(x)
            second = run(x)
        direct = forward_until(net, "features.4", x)
    for handle in handles:
        handle.remove()
    assert calls["later"] == 0
    for z in (first, second, direct):
        torch.testing.assert_close(z, expected, rtol=0, atol=0)
    assert all(not m._forward_hooks for m in net.modules())

    # gradients flow to the weights feeding the stopped layer
    z = forward_until(net, "features.4", x)
    z.abs().sum().backward()
    assert net.features[0].weight.grad is not None

    class Skip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Conv2d(1, 1, 1)
            self.unused = nn.Conv2d(1, 1, 1)

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return self.used(t)

    with pytest.raises(GraphError, match="without calling 'unused'"):
        forward_until(Skip(), "unused", torch.zeros(1, 1, 2, 2))


def test_stop_is_not_swallowed_by_except_exception() -> None:
    class Careful(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 1)
            self.after = nn.Conv2d(2, 1, 1)

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            try:
                t = self.conv(t)
            except Exception:  # a model's own error handling must not eat the stop
                return t
            return self.after(t)

    out = forward_until(Careful(), "conv", torch.zeros(1, 1, 2, 2))
    assert out.shape == (1, 2, 2, 2)


def test_preserved_state_and_resolve_module() -> None:
    net, _ = make("resnet")
    _odd_state(net)
    snap = snapshot(net)
    with pytest.raises(ValueError), preserved_state(net):
        net.train()
        for p in net.parameters():
            p.requires_grad_(False)
        raise ValueError
    assert_unchanged(net, snap)
    with preserved_state(net) as same:
        assert same is net
        net.eval()
    assert_unchanged(net, snap)
    assert resolve_module(net, "layer2.downsample.0") is net.layer2.downsample[0]
    with pytest.raises(GraphError, match=r"layer2\.downsample"):
        resolve_module(net, "layer2.downsampl")
