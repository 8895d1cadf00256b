"""Racing greedy: the sign test, the schedule and agreement with exact greedy."""

from __future__ import annotations

import math

import pytest
import torch
from _nets import make

from netcarve.car.engine import AblationEngine
from netcarve.car.greedy import greedy_prune
from netcarve.car.racing import _schedule, race_step, sign_test_pvalues
from netcarve.car.stats import AblationError, ForwardCounts
from netcarve.core.graph import ModelGraph


@pytest.fixture(autouse=True)
def _private_rng():
    with torch.random.fork_rng(devices=[]):
        yield


@pytest.fixture(scope="module")
def data():
    net, x = make("plain", seed=11, batch=600)
    last = [m for m in net.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        # spread the random net's decisions, then label images by them: removing an
        # important filter breaks many decisions (CARs 0 to 0.19 on features.4)
        logits = net(x)
        last.bias -= logits.mean(0)
        last.weight /= logits.std(0)[:, None]
        y = net(x).argmax(1)
    return net, x, y, ModelGraph.build(net, x[:1])


def test_sign_test_equals_the_binomial_tail() -> None:
    worse = torch.tensor([0, 3, 7, 10, 25, 0])
    better = torch.tensor([0, 2, 1, 0, 20, 4])
    got = sign_test_pvalues(worse, better)
    for k, (a, b) in enumerate(zip(worse.tolist(), better.tolist(), strict=True)):
        m = a + b
        want = 1.0 if m == 0 else sum(math.comb(m, j) for j in range(a, m + 1)) / 2 ** m
        assert float(got[k]) == pytest.approx(want, rel=1e-9)


def test_schedule_doubles_and_ends_on_every_chunk() -> None:
    assert _schedule(20, 2) == [2, 4, 8, 16, 20]
    assert _schedule(5, 8) == [5]
    assert _schedule(1, 1) == [1]


def test_racing_chooses_like_exact_and_scores_fewer_images(data) -> None:
    net, x, y, graph = data
    eng = AblationEngine(net, x, y, graph=graph, batch_size=50)
    exact = greedy_prune(net, x, y, "features.4", amount=3, graph=graph, engine=eng)
    race = greedy_prune(net, x, y, "features.4", amount=3, mode="racing", graph=graph,
                        engine=eng, first_images=50, delta=0.2)
    assert race.order == exact.order
    for a, b in zip(race.steps, exact.steps, strict=True):
        assert a.accuracy == pytest.approx(b.accuracy, abs=1e-12)
        assert a.car == pytest.approx(b.car, abs=1e-12)
        assert a.loss == pytest.approx(b.loss, rel=1e-5)
    assert exact.image_evaluations == exact.exact_image_evaluations == (6 + 5 + 4) * 600
    assert race.exact_image_evaluations == exact.exact_image_evaluations
    assert race.eliminated > 0 and race.image_evaluations < exact.image_evaluations
    assert 0 < race.saved_fraction < 1
    assert race.to_dict()["mode"] == "racing" and race.to_dict()["delta"] == 0.2


def test_race_step_scores_the_lone_survivor_on_every_image(data) -> None:
    net, x, y, graph = data
    eng = AblationEngine(net, x, y, graph=graph, batch_size=50)
    masks = {"features.4": torch.ones(6, dtype=torch.bool)}
    cands = [("features.4", f) for f in range(6)]
    out = race_step(eng, cands, masks, "top1", list(range(eng.n_chunks)), 1, 0.5,
                    ForwardCounts())
    full = eng.evaluate("features.4", torch.eye(6, dtype=torch.bool).logical_not(), masks)
    f = out.best[1]
    assert out.n_images == 600 and out.base_correct == int(full.base_correct)
    assert out.correct == int(full.correct[f])
    assert out.loss_sum == pytest.approx(float(full.loss_sum[f]), rel=1e-5)
    assert out.correct == int(full.correct.max())


def test_racing_refuses_loss_metrics_and_bad_delta(data) -> None:
    net, x, y, graph = data
    with pytest.raises(AblationError, match="top1 or top5"):
        greedy_prune(net, x, y, "features.4", amount=1, mode="racing", metric="loss",
                     graph=graph)
    with pytest.raises(AblationError, match=r"delta must lie in \(0, 1\)"):
        greedy_prune(net, x, y, "features.4", amount=1, mode="racing", delta=1.5, graph=graph)
    with pytest.raises(AblationError, match="metric must be one of"):
        race_step(AblationEngine(net, x[:50], y[:50], graph=graph), [("features.4", 0)],
                  {"features.4": torch.ones(6, dtype=torch.bool)}, "loss", [0], 1, 0.1,
                  ForwardCounts())
