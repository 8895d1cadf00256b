"""Criteria: registry, shared contract, determinism, and leaving the model exactly as it was."""

from __future__ import annotations

import _nets
import pytest
import torch
from _state import assert_unchanged, snapshot
from torch import nn

from netcarve.core.errors import NetcarveError
from netcarve.core.graph import ModelGraph
from netcarve.core.targets import Target
from netcarve.criteria import (
    CRITERIA,
    Criterion,
    CriterionError,
    GranularityError,
    Magnitude,
    ScoringContext,
    get_criterion,
)
from netcarve.criteria.force import push_below, top_k_masks

DATA_CRITERIA = ["actgrad", "snip", "force"]


def make_ctx(name: str = "plain", spec: str = "features.4:2", batch: int = 4, **kw):
    net, x = _nets.make(name, batch=batch)
    graph = ModelGraph.build(net, x[:1])
    target = Target.parse(spec).resolve(graph)
    relevant = graph.relevant_kernels(target.layer, target.channels)
    batches = [x[:2], x[2:]]
    ctx = ScoringContext(net, graph, target, lambda: iter(batches), layers=list(relevant),
                         relevant=relevant, **kw)
    return net, x, graph, ctx


# ----------------------------------------------------------------------------- registry


def test_registry_and_protocol():
    assert sorted(CRITERIA) == ["actgrad", "force", "magnitude", "random", "snip"]
    for name, crit in CRITERIA.items():
        assert isinstance(crit, Criterion)
        assert crit.name == name
        assert get_criterion(name.upper()) is crit


def test_unknown_criterion_lists_names_and_close_match():
    with pytest.raises(CriterionError) as err:
        get_criterion("actgard")
    msg = str(err.value)
    assert "'actgrad'" in msg and "magnitude" in msg and "snip" in msg
    assert isinstance(err.value, NetcarveError)


def test_force_has_no_filter_scores():
    _, _, _, ctx = make_ctx()
    with pytest.raises(GranularityError) as err:
        get_criterion("force").filter_scores(ctx)
    assert isinstance(err.value, NotImplementedError)
    assert isinstance(err.value, NetcarveError)
    assert "kernel" in str(err.value)


@pytest.mark.parametrize("name", sorted(CRITERIA))
def test_shapes_dtype_device(name):
    _, _, graph, ctx = make_ctx("group", "fc:1")
    ctx.keep = 0.5
    kernel = CRITERIA[name].kernel_scores(ctx)
    assert list(kernel) == ctx.layers
    for layer, s in kernel.items():
        assert s.dtype == torch.float32 and s.device.type == "cpu" and s.is_contiguous()
        assert tuple(s.shape) == graph.layers[layer].mask_shape
        assert bool(torch.isfinite(s).all())
    if name == "force":
        return
    filt = CRITERIA[name].filter_scores(ctx)
    for layer, s in filt.items():
        assert s.dtype == torch.float32 and tuple(s.shape) == (graph.layers[layer].out_channels,)


# ----------------------------------------------------------------------------- data-free


def test_magnitude_reference():
    net, _, graph, ctx = make_ctx("plain", "classifier.3:0")
    modules = dict(net.named_modules())
    kernel = get_criterion("magnitude").kernel_scores(ctx)
    l1 = get_criterion("magnitude").filter_scores(ctx)
    l2 = Magnitude(norm=2).filter_scores(ctx)
    for name in ctx.layers:
        w = modules[name].weight.detach()
        info = graph.layers[name]
        for o in range(info.out_channels):
            assert l1[name][o] == pytest.approx(float(w[o].abs().sum()), rel=1e-6)
            assert l2[name][o] == pytest.approx(float(w[o].pow(2).sum().sqrt()), rel=1e-6)
            for j in range(info.mask_shape[1]):
                block = w[o, j] if w.dim() > 2 else w[o, j * info.spatial:(j + 1) * info.spatial]
                assert kernel[name][o, j] == pytest.approx(float(block.abs().mean()), rel=1e-6)
    with pytest.raises(CriterionError):
        Magnitude(norm=3)


def test_magnitude_ignores_masks():
    _, _, _, ctx = make_ctx()
    plain = get_criterion("magnitude").kernel_scores(ctx)
    ctx.masks = {n: torch.zeros_like(m) for n, m in ctx.relevant.items()}
    masked = get_criterion("magnitude").kernel_scores(ctx)
    assert all(torch.equal(plain[n], masked[n]) for n in plain)


def test_random_is_deterministic_per_seed_and_layer():
    _, _, _, ctx = make_ctx("resnet", "fc:0")
    crit = get_criterion("random")
    a, b = crit.kernel_scores(ctx), crit.kernel_scores(ctx)
    assert all(torch.equal(a[n], b[n]) for n in a)
    ctx.seed = 1
    c = crit.kernel_scores(ctx)
    assert all(not torch.equal(a[n], c[n]) for n in a)
    assert all(bool((s >= 0).all() and (s < 1).all()) for s in a.values())
    # a layer's stream does not depend on which other layers are scored
    ctx.seed = 0
    ctx.layers = ctx.layers[-2:]
    d = crit.kernel_scores(ctx)
    assert all(torch.equal(d[n], a[n]) for n in d)
    f1, f2 = crit.filter_scores(ctx), crit.filter_scores(ctx)
    assert all(torch.equal(f1[n], f2[n]) for n in f1)
    same_shape = [n for n in ctx.layers if a[n].numel() > 1]
    assert all(not torch.equal(a[n][:, 0][:2], f1[n][:2]) for n in same_shape)


# ----------------------------------------------------------------------------- model state


@pytest.mark.parametrize("name", sorted(CRITERIA))
@pytest.mark.parametrize("granularity", ["kernel", "filter"])
def test_model_comes_back_unchanged(name, granularity):
    if name == "force" and granularity == "filter":
        return
    net, _, _, ctx = make_ctx("resnet", "layer2.conv2:1", keep=0.3)
    net.train()
    net.layer1.bn1.eval()
    net.conv1.weight.requires_grad_(False)
    existing = torch.ones_like(net.fc.weight)
    net.fc.weight.grad = existing
    ctx.masks = {n: torch.rand(m.shape) < 0.7 for n, m in ctx.relevant.items()}
    snap = snapshot(net)
    crit = CRITERIA[name]
    (crit.kernel_scores if granularity == "kernel" else crit.filter_scores)(ctx)
    assert_unchanged(net, snap)
    assert net.fc.weight.grad is existing and torch.equal(existing, torch.ones_like(existing))


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("name", DATA_CRITERIA)
def test_model_restored_after_exception_in_batches(name):
    net, x, _, ctx = make_ctx("plain", "classifier.3:1", keep=0.5)
    net.train()
    ctx.masks = {n: torch.rand(m.shape) < 0.5 for n, m in ctx.relevant.items()}
    snap = snapshot(net)

    def batches():
        yield x[:2]
        raise Boom("data loader failed")

    ctx.batches = batches
    with pytest.raises(Boom):
        CRITERIA[name].kernel_scores(ctx)
    assert_unchanged(net, snap)


def test_scoring_runs_in_eval_mode_and_stops_at_target():
    net, _, _, ctx = make_ctx("plain", "features.4:2")
    net.train()
    seen: dict[str, list] = {"bn_training": [], "after": []}
    bn = net.features[1]
    h1 = bn.register_forward_pre_hook(lambda m, a: seen["bn_training"].append(m.training))
    later = [net.features[5], net.features[6], net.classifier]
    hs = [m.register_forward_pre_hook(lambda m, a: seen["after"].append(m)) for m in later]
    try:
        for name in DATA_CRITERIA:
            ctx.keep = 0.5
            CRITERIA[name].kernel_scores(ctx)
            if name != "force":
                CRITERIA[name].filter_scores(ctx)
    finally:
        h1.remove()
        for h in hs:
            h.remove()
    assert seen["bn_training"] and not any(seen["bn_training"])
    assert seen["after"] == []
    assert net.training


def test_input_modified_in_place_after_use_is_handled():
    """A layer input overwritten in place later in forward: the batch re-runs with clones."""

    class Overwrite(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(2, 3, 3, padding=1)
            self.fc = nn.Linear(3 * 5 * 5, 4)
            self.out = nn.Linear(4, 2)

        def forward(self, x):
            f = self.a(x).flatten(1)
            y = self.fc(f)
            f.mul_(0.5)  # fc's input changes after fc used it (legal: fc.weight is frozen)
            return self.out(y + f[:, :4])

    torch.manual_seed(0)
    net = Overwrite().double().eval()
    net.fc.weight.requires_grad_(False)
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    graph = ModelGraph.build(net, x[:1])
    target = Target.parse("out:0").resolve(graph)
    relevant = graph.relevant_kernels("out", [0])
    ctx = ScoringContext(net, graph, target, lambda: iter([x]), layers=list(relevant))
    got = get_criterion("actgrad").kernel_scores(ctx)["fc"]
    f = net.a(x).flatten(1).detach()  # fc's input as fc saw it
    y = net.fc(f).detach().requires_grad_()
    g = torch.autograd.grad(net.out(y + 0.5 * f[:, :4])[:, 0].abs().sum(), y)[0]
    w = net.fc.weight.detach().reshape(4, 3, 25)
    a = torch.einsum("ois,nis->noi", w, f.reshape(3, 3, 25))
    ref = (a * g[:, :, None]).abs().mean(dim=0)
    assert torch.allclose(got.double(), ref, rtol=1e-5)
    assert net.fc.weight.requires_grad is False


def test_bad_batches_raise_criterion_error():
    _, _x, _, ctx = make_ctx()
    ctx.batches = lambda: iter([])
    with pytest.raises(CriterionError, match="no scoring images"):
        get_criterion("actgrad").kernel_scores(ctx)
    ctx.batches = lambda: iter([[1, 2, 3]])
    with pytest.raises(CriterionError, match="image tensors"):
        get_criterion("snip").kernel_scores(ctx)


def test_layers_without_path_to_target_score_zero():
    _, _, _graph, ctx = make_ctx("cat", "b1:0")
    ctx.layers = ["stem", "b1", "b3"]  # b3 has no path into b1
    for name in ["actgrad", "snip"]:
        s = CRITERIA[name].kernel_scores(ctx)
        assert bool((s["b3"] == 0).all()) and bool((s["stem"] > 0).any())
        assert bool((s["b1"][1] == 0).all()) and bool((s["b1"][0] > 0).any())


# ----------------------------------------------------------------------------- FORCE helpers


def test_top_k_masks_exact_k_ties_by_index():
    scores = {"a": torch.tensor([[1.0, 2.0, 2.0]]), "b": torch.tensor([[2.0, 0.5]])}
    cand = {"a": torch.ones(1, 3, dtype=torch.bool), "b": torch.tensor([[True, True]])}
    got = top_k_masks(scores, cand, 2)
    assert got["a"].tolist() == [[False, True, True]] and got["b"].tolist() == [[False, False]]
    assert sum(int(m.sum()) for m in top_k_masks(scores, cand, 10).values()) == 5


def test_push_below_keeps_order_and_strictness():
    s = {"a": torch.tensor([0.0, 3.0, 5.0, 1.0], dtype=torch.float64)}
    kept = {"a": torch.tensor([False, True, False, True])}
    out = push_below(s, kept)["a"]
    assert out[1] == 3.0 and out[3] == 1.0
    assert out[0] < out[2] < 1.0
    zero_kept = push_below({"a": torch.tensor([0.0, 2.0], dtype=torch.float64)},
                           {"a": torch.tensor([True, False])})["a"]
    assert zero_kept[1] < zero_kept[0] == 0.0


def test_force_keep_validation_and_steps():
    _, _, _, ctx = make_ctx()
    ctx.keep = 0.0
    with pytest.raises(CriterionError):
        get_criterion("force").kernel_scores(ctx)
    from netcarve.criteria import Force

    with pytest.raises(CriterionError):
        Force(steps=0)
