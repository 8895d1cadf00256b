"""Baseline criteria against hand computations; curves on the same footing as CAR."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _nets import make
from torch import nn

from netcarve.car.baselines import BASELINES, baseline_order, baseline_scores, compare_methods
from netcarve.car.stats import AblationError
from netcarve.core.graph import ModelGraph
from netcarve.core.hooks import apply_filter_masks


@pytest.fixture(autouse=True)
def _private_rng():
    """Seeds set inside a test (torch.manual_seed, _nets.make) do not leak out of it."""
    with torch.random.fork_rng(devices=[]):
        yield


def small_net(inplace: bool) -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5),
                        nn.ReLU(inplace=inplace), nn.Flatten(), nn.Linear(5 * 16, 3))
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.3, 0.3)
        net[1].bias.uniform_(-0.5, 0.5)
    return net.eval().double()


@pytest.fixture(scope="module")
def xy():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(20, 3, 4, 4, generator=gen).double(), torch.randint(0, 3, (20,),
                                                                            generator=gen)


def test_weight_l1_and_random(xy) -> None:
    net = small_net(True)
    l1 = baseline_scores(net, "0", "l1")
    assert torch.allclose(l1, net[0].weight.detach().abs().sum((1, 2, 3)).double())
    r1 = baseline_scores(net, "0", "random", seed=3)
    assert sorted(r1.tolist()) == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert torch.equal(r1, baseline_scores(net, "0", "random", seed=3))


@pytest.mark.parametrize("inplace", [True, False])
def test_activation_criteria_by_hand(xy, inplace: bool) -> None:
    x, _ = xy
    net = small_net(inplace)
    with torch.no_grad():
        z = net[1](net[0](x))
    a = z.clamp(min=0).transpose(0, 1).reshape(5, -1)
    mean_act = baseline_scores(net, "0", "mean_activation", images=x, batch_size=7)
    apoz = baseline_scores(net, "0", "apoz", images=x, batch_size=7)
    assert torch.allclose(mean_act, a.mean(1))
    assert torch.allclose(apoz, 1 - (a <= 0).double().mean(1))


@pytest.mark.parametrize("inplace", [True, False])
def test_taylor_by_hand(xy, inplace: bool) -> None:
    x, y = xy
    net = small_net(inplace)
    z = net[1](net[0](x))
    logits = net[4](torch.flatten(torch.relu(z), 1))
    (g,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), [z])
    expected = (z * g).detach().mean((2, 3)).abs().mean(0)
    got = baseline_scores(net, "0", "taylor", images=x, labels=y, batch_size=6)
    assert torch.allclose(got, expected, rtol=1e-9, atol=1e-12)
    assert all(p.grad is None for p in net.parameters())


def test_scores_leave_model_alone(xy) -> None:
    x, y = xy
    net = small_net(True)
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    for method in BASELINES:
        baseline_scores(net, "0", method, images=x, labels=y)
    assert net.training and all(m.training for m in net.modules())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(not m._forward_hooks for m in net.modules())


def test_order_and_errors(xy) -> None:
    assert baseline_order(torch.tensor([0.5, 0.1, 0.5, 0.0])) == [3, 1, 0, 2]
    net = small_net(True)
    with pytest.raises(AblationError, match="unknown baseline"):
        baseline_scores(net, "0", "magnitude")
    with pytest.raises(AblationError, match="needs scoring images"):
        baseline_scores(net, "0", "apoz")


def test_compare_methods_curves(tmp_path) -> None:
    net, x = make("plain", seed=2, batch=40)
    with torch.no_grad():
        y = net(x).argmax(1)
    graph = ModelGraph.build(net, x[:1])
    rep = compare_methods(net, "features.4", score_images=x[:20], score_labels=y[:20],
                          eval_images=x[20:], eval_labels=y[20:], counts=[0, 2, 4],
                          graph=graph, batch_size=10)
    assert len(rep.rows) == (1 + len(BASELINES)) * 3
    base = {r["accuracy"] for r in rep.rows if r["pruned"] == 0}
    assert base == {1.0}  # labels are the unpruned predictions
    order = rep.orders["features.4"]["l1"]
    assert order == baseline_order(baseline_scores(net, "features.4", "l1"))
    keep = torch.ones(6, dtype=torch.bool)
    keep[order[:4]] = False
    with torch.no_grad(), apply_filter_masks(net, graph, {"features.4": keep}):
        acc = float((net(x[20:]).argmax(1) == y[20:]).double().mean())
    assert rep.table("features.4", 4)["l1"] == pytest.approx(acc, abs=1e-12)
    csv_path = rep.save(tmp_path)
    assert len(csv_path.read_text().strip().splitlines()) == 1 + len(rep.rows)
    assert (tmp_path / "curves.png").stat().st_size > 1000
    with pytest.raises(AblationError, match="counts"):
        compare_methods(net, "features.4", score_images=x, score_labels=y, eval_images=x,
                        eval_labels=y, counts=[6])


@pytest.mark.slow
def test_compare_methods_with_finetuning() -> None:
    net, x = make("plain", seed=3, batch=64, double=False)
    with torch.no_grad():
        y = net(x).argmax(1)
    rep = compare_methods(net, "features.0", score_images=x, score_labels=y, eval_images=x,
                          eval_labels=y, counts=[0, 2], methods=("car", "l1"),
                          finetune_epochs=1, finetune_at=[2], finetune_images=x,
                          finetune_labels=y, lr=0.01, batch_size=32)
    tuned = [r for r in rep.rows if r["finetuned"]]
    assert {r["method"] for r in tuned} == {"car", "l1"}
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in tuned)
