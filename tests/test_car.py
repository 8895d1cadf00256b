"""CAR scores, class-wise CAR, greedy (exact / lazy) pruning, order agreement, compression."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from _nets import make

from netcarve.car.compress import car_compress
from netcarve.car.greedy import greedy_prune, kendall_tau, order_agreement
from netcarve.car.scores import car_scores, classwise_car, resolve_layers
from netcarve.car.stats import AblationError
from netcarve.core.graph import ModelGraph
from netcarve.core.hooks import apply_filter_masks
from netcarve.surgery.pruned import CompressError


@pytest.fixture(autouse=True)
def _private_rng():
    """Seeds set inside a test (torch.manual_seed, _nets.make) do not leak out of it."""
    with torch.random.fork_rng(devices=[]):
        yield


@pytest.fixture(scope="module")
def data():
    net, x = make("plain", seed=11, batch=60)
    with torch.no_grad():
        logits = net(x)
    # labels: mostly the net's own prediction, so removals have something to break
    y = logits.argmax(1)
    y[::5] = torch.randint(0, 3, (12,), generator=torch.Generator().manual_seed(0))
    return net, x, y, ModelGraph.build(net, x[:1])


def masked_eval(net, graph, masks, x, y):
    with torch.no_grad(), apply_filter_masks(net, graph, masks):
        logits = net(x)
    acc = float((logits.argmax(1) == y).double().mean())
    loss = float(F.cross_entropy(logits, y, reduction="none").double().mean())
    return acc, loss


def test_car_scores_match_the_definition(data) -> None:
    net, x, y, graph = data
    rep = car_scores(net, x, y, "features.4", graph=graph, batch_size=16)
    lc = rep.layers["features.4"]
    base_acc, base_loss = masked_eval(net, graph, {}, x, y)
    assert lc.base_accuracy == pytest.approx(base_acc, abs=1e-12)
    for i, f in enumerate(lc.filters):
        keep = torch.ones(6, dtype=torch.bool)
        keep[f] = False
        acc, loss = masked_eval(net, graph, {"features.4": keep}, x, y)
        assert float(lc.car[i]) == pytest.approx(base_acc - acc, abs=1e-12)
        assert float(lc.loss_car[i]) == pytest.approx(loss - base_loss, rel=1e-6, abs=1e-9)
    ranking = lc.ranking()
    keys = [(float(lc.car[lc.filters.index(f)]), float(lc.loss_car[lc.filters.index(f)]))
            for f in ranking]
    assert keys == sorted(keys)  # ascending CAR, ties broken by loss
    assert sorted(ranking) == list(range(6))


def test_car_scores_over_a_stream_equal_the_tensor_scores(data) -> None:
    """A DataLoader is scored chunk by chunk (evaluate_stream): the same CAR, the same
    rankings, the same class-wise counts, and the classes counted from the stream."""
    net, x, y, graph = data
    want = car_scores(net, x, y, None, graph=graph, batch_size=16)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=9)
    got = car_scores(net, loader, None, None, batch_size=16)
    assert got.n_images == want.n_images == 60 and got.class_names == want.class_names
    for name, lc in want.layers.items():
        other = got.layers[name]
        assert other.filters == lc.filters
        assert torch.equal(other.car, lc.car)  # top-1 counts: integers, no near-ties here
        assert torch.allclose(other.loss_car, lc.loss_car, rtol=1e-5, atol=1e-7)
        assert other.ranking() == lc.ranking()


def test_car_report_save_and_dict(data, tmp_path) -> None:
    net, x, y, graph = data
    rep = car_scores(net, x, y, None, graph=graph, batch_size=30, model_name="plain")
    assert list(rep.layers) == ["features.0", "features.4"]  # every conv layer by default
    path = rep.save(tmp_path)
    lines = path.read_text().strip().splitlines()
    assert lines[0] == "layer,filter,car,loss_car,accuracy_after,rank"
    assert len(lines) == 1 + 4 + 6
    summary = json.loads(json.dumps(rep.to_dict()))
    assert summary["layers"]["features.0"]["filters"] == 4
    assert rep.counts.naive_passes == (4 + 1) * 2 + (6 + 1) * 2


def test_classwise_car(data, tmp_path) -> None:
    net, x, y, graph = data
    cw = classwise_car(net, x, y, "features.0", graph=graph, batch_size=20)
    assert cw.matrix.shape == (4, 3)
    counts = torch.bincount(y, minlength=3).double()
    overall = car_scores(net, x, y, "features.0", graph=graph).layers["features.0"].car
    # the overall drop is the class-count-weighted mean of the per-class drops
    assert torch.allclose((cw.matrix * counts).sum(1) / len(y), overall, atol=1e-12)
    most, least = cw.most_important(), cw.least_important()
    for i, f in enumerate(cw.filters):
        assert float(cw.matrix[i, cw.class_names.index(most[f][0])]) == float(cw.matrix[i].max())
        assert float(cw.matrix[i, cw.class_names.index(least[f][0])]) == float(cw.matrix[i].min())
    csv_path = cw.save(tmp_path)
    assert csv_path.with_suffix(".png").stat().st_size > 1000
    header = csv_path.read_text().splitlines()[0].split(",")
    assert header[:2] == ["layer", "filter"] and header[-2:] == ["most_important",
                                                                "least_important"]


def test_exact_greedy_follows_rescored_car(data) -> None:
    net, x, y, graph = data
    res = greedy_prune(net, x, y, "features.4", amount=3, graph=graph, batch_size=20)
    assert len(res.steps) == 3 and res.stopped == "count"
    first = car_scores(net, x, y, "features.4", graph=graph).layers["features.4"].ranking()[0]
    assert res.order[0] == ("features.4", first)
    masks = {"features.4": torch.ones(6, dtype=torch.bool)}
    for step in res.steps:
        masks["features.4"][step.filter] = False
        acc, loss = masked_eval(net, graph, masks, x, y)
        assert step.accuracy == pytest.approx(acc, abs=1e-12)
        assert step.loss == pytest.approx(loss, rel=1e-6)
    assert torch.equal(res.masks["features.4"], masks["features.4"])
    assert res.evaluations == 6 + 5 + 4
    again = greedy_prune(net, x, y, "features.4", amount=3, graph=graph, batch_size=20)
    assert again.order == res.order  # deterministic


def test_ratio_floor_and_amount_errors(data) -> None:
    net, x, y, graph = data
    half = greedy_prune(net, x, y, ["features.0", "features.4"], amount=0.5, graph=graph)
    assert len(half.removed("features.0")) == 2 and len(half.removed("features.4")) == 3
    floor = half.base_accuracy - 0.02
    res = greedy_prune(net, x, y, "features.4", floor=floor, graph=graph)
    assert all(s.accuracy >= floor for s in res.steps)
    assert res.stopped in ("floor", "exhausted")
    with pytest.raises(AblationError, match=r"\(0, 1\)"):
        greedy_prune(net, x, y, "features.4", amount=1.5, graph=graph)
    with pytest.raises(AblationError, match="at least one must stay"):
        greedy_prune(net, x, y, "features.4", amount=6, graph=graph)
    with pytest.raises(AblationError, match="amount"):
        greedy_prune(net, x, y, "features.4", graph=graph)
    with pytest.raises(AblationError, match="mode"):
        greedy_prune(net, x, y, "features.4", amount=1, mode="fast", graph=graph)


def test_global_scope_counts_in_total(data) -> None:
    net, x, y, graph = data
    res = greedy_prune(net, x, y, ["features.0", "features.4"], amount=4, scope="global",
                       graph=graph, batch_size=30)
    assert len(res.steps) == 4
    assert sum(int((~m).sum()) for m in res.masks.values()) == 4


def test_lazy_greedy(data) -> None:
    net, x, y, graph = data
    exact = greedy_prune(net, x, y, "features.4", amount=4, graph=graph)
    wide = greedy_prune(net, x, y, "features.4", amount=4, mode="lazy", window=6, graph=graph)
    assert wide.order == exact.order  # a window covering every candidate is exact
    fresh = greedy_prune(net, x, y, "features.4", amount=4, mode="lazy", window=1, refresh=1,
                         graph=graph)
    assert fresh.order == exact.order  # re-scoring everything at every step is exact
    lazy = greedy_prune(net, x, y, "features.4", amount=4, mode="lazy", window=1, graph=graph)
    assert lazy.evaluations == 6 + 1 + 1 + 1
    assert lazy.order[0] == exact.order[0]
    agree = order_agreement(exact.order, lazy.order)
    assert -1.0 <= agree["kendall_tau"] <= 1.0 and 0.0 <= agree["overlap"] <= 1.0


def test_kendall_tau_and_agreement() -> None:
    assert kendall_tau([1, 2, 3, 4], [1, 2, 3, 4]) == pytest.approx(1.0)
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(2 / 3)
    # tau-b with ties: x has a tie, 5 concordant - 0 discordant of sqrt(5 * 6) pairs
    assert kendall_tau([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(5 / math.sqrt(30))
    assert math.isnan(kendall_tau([1, 1], [1, 2]))
    a = [("l", 0), ("l", 1), ("l", 2)]
    assert order_agreement(a, a) == {"kendall_tau": 1.0, "kendall_tau_common": 1.0,
                                     "overlap": 1.0, "same_step_fraction": 1.0, "n_a": 3.0,
                                     "n_b": 3.0}
    swapped = order_agreement(a, [("l", 1), ("l", 0), ("l", 3)])
    assert swapped["overlap"] == pytest.approx(2 / 4)
    assert swapped["same_step_fraction"] == 0.0
    assert swapped["kendall_tau_common"] == pytest.approx(-1.0)


def test_resolve_layers(data) -> None:
    _, _, _, graph = data
    assert resolve_layers(graph, "features.4, features.0") == ["features.0", "features.4"]
    assert resolve_layers(graph, None) == ["features.0", "features.4"]


def test_car_compress_equals_masked_and_reports(data) -> None:
    net, x, y, graph = data
    rep = car_compress(net, x, y, "features.0", eval_images=x, eval_labels=y, amount=2,
                       batch_size=20)
    assert rep.pruned.module.features[0].out_channels == 2
    acc, _ = masked_eval(net, graph, rep.greedy.masks, x, y)
    assert rep.accuracy_pruned == pytest.approx(acc, abs=1e-6)  # evaluate() uses float32
    assert rep.pruned.params_after < rep.pruned.params_before
    json.dumps(rep.to_dict())
    with pytest.raises(CompressError, match="reach the model output"):
        car_compress(net, x, y, "classifier.3", eval_images=x, eval_labels=y, amount=1)


def test_finetune_is_seeded_and_leaves_the_model_alone(data) -> None:
    from netcarve.core.errors import DataError
    from netcarve.training.finetune import FinetuneError, finetune

    net, x, y, _ = data
    net = copy.deepcopy(net).float()  # the fixture's net is shared: work on a copy
    xf = x.float()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    a = finetune(net, images=xf, labels=y, epochs=2, lr=0.05, seed=3, batch_size=16,
                 eval_images=xf, eval_labels=y)
    b = finetune(net, images=xf, labels=y, epochs=2, lr=0.05, seed=3, batch_size=16)
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is untouched
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], before[k]) for k in sa)
    assert a.steps == 2 * 4 and len(a.epoch_losses) == 2 and not a.model.training
    assert a.accuracy_before is not None and 0.0 <= a.accuracy_after <= 1.0
    with pytest.raises(FinetuneError, match="epochs"):
        finetune(net, images=xf, labels=y, epochs=0)
    with pytest.raises(FinetuneError, match="learning rate"):
        finetune(net, images=xf, labels=y, lr=0.0)
    with pytest.raises(DataError, match="empty"):
        finetune(net, images=xf[:0], labels=y[:0])
