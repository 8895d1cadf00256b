"""Keep search: the smallest keep that reaches a preservation goal, from one scoring pass."""

from __future__ import annotations

import pytest
import torch
from _nets import make
from _state import assert_unchanged, snapshot

import netcarve.circuits.keep_search as ks
from netcarve.circuits.circuit import CircuitError, count, select_top_k
from netcarve.circuits.extract import measure_preservation, score_kernels
from netcarve.circuits.keep_search import find_keep
from netcarve.core.graph import ModelGraph
from netcarve.core.targets import Target

TARGET = "features.4:2"


@pytest.fixture(scope="module")
def setup():
    net, _ = make("plain", seed=3, double=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 8, 8, generator=g, dtype=torch.float64)
    held = torch.randn(64, 3, 8, 8, generator=g, dtype=torch.float64)
    return net, x, held


def _brute_force(net, x, held, goal):
    """Held-out r for every k, the naive way (the same scores, top-k, effective mask)."""
    graph = ModelGraph.build(net, x[:1])
    tgt = Target.parse(TARGET).resolve(graph)
    rel = graph.relevant_kernels(tgt.layer, tgt.channels)
    scores = score_kernels(net, graph, tgt, x, relevant=rel)
    rs = {}
    for k in range(1, count(rel) + 1):
        masks, collapsed = graph.effective_mask(select_top_k(scores, rel, k), tgt.layer,
                                                tgt.channels)
        r = measure_preservation(net, graph, tgt, masks, held).pearson
        rs[k] = 0.0 if collapsed or r != r else r
    return rs, count(rel)


@pytest.mark.parametrize("goal", [0.5, 0.9, 0.99])
def test_found_keep_reaches_the_goal_and_the_next_smaller_sample_does_not(setup, goal):
    net, x, held = setup
    snap = snapshot(net)
    res = find_keep(net, TARGET, x, heldout=held, goal=goal, rtol=0.01)
    assert_unchanged(net, snap)
    rs, total = _brute_force(net, x, held, goal)
    k = round(res.keep * total)
    assert res.reached and rs[k] >= goal
    # the search agrees with the naive loop at every sampled point
    for p in res.curve:
        assert abs((p["pearson"] or 0.0) - rs[p["k"]]) < 1e-9, p
    # the bracket is closed: the largest sampled keep below the choice misses the goal
    below = [p for p in res.curve if p["k"] < k]
    if k > 1:
        assert below and not max(below, key=lambda p: p["k"])["reached"]
        assert max(below, key=lambda p: p["k"])["k"] == k - 1  # rtol 0.01 bisects to 1 kernel
    # where the brute-force curve is monotone the search finds the true minimum
    if all(rs[j + 1] >= rs[j] for j in range(1, total)):
        assert k == min(j for j, r in rs.items() if r >= goal)
    # the final circuit is the one at that keep, measured as extract measures it
    assert res.circuit.keep == pytest.approx(res.keep)
    assert res.circuit.preservation.pearson == pytest.approx(rs[k], abs=1e-9)
    assert res.circuit.metadata["keep_search"]["keep"] == res.keep


def test_one_scoring_pass_for_a_one_shot_criterion(setup, monkeypatch):
    net, x, held = setup
    calls = []
    real = ks.score_kernels

    def counting(*args, **kwargs):
        calls.append(kwargs.get("keep"))
        return real(*args, **kwargs)

    monkeypatch.setattr(ks, "score_kernels", counting)
    res = find_keep(net, TARGET, x, heldout=held, goal=0.9)
    assert len(calls) == 1 and res.evaluations >= 2
    calls.clear()
    find_keep(net, TARGET, x, heldout=held, goal=0.9, criterion="force", max_evaluations=4)
    assert len(calls) == 4  # FORCE's scores depend on keep: re-scored per sampled keep


def test_searching_on_scoring_images_leaves_heldout_for_the_report(setup):
    net, x, held = setup
    res = find_keep(net, TARGET, x, heldout=held, goal=0.9, search_on="scoring")
    chosen = next(p for p in res.curve if p["keep"] == res.keep)
    assert chosen["pearson"] == pytest.approx(res.circuit.preservation_scoring.pearson, abs=1e-9)
    assert res.to_dict()["search_on"] == "scoring"


def test_curve_is_sorted_and_reported(setup):
    net, x, held = setup
    res = find_keep(net, TARGET, x, heldout=held, goal=0.9)
    keeps = [p["keep"] for p in res.curve]
    assert keeps == sorted(keeps) and keeps[-1] == 1.0
    assert res.curve[-1]["pearson"] == pytest.approx(1.0, abs=1e-9)  # every kernel kept
    assert isinstance(res.monotone, bool) and res.seconds > 0


@pytest.mark.parametrize("kwargs, match", [
    ({"goal": 1.5}, "goal"), ({"goal": float("nan")}, "goal"), ({"factor": 1.0}, "factor"),
    ({"rtol": 0.0}, "rtol"), ({"max_evaluations": 1}, "max_evaluations"),
    ({"search_on": "test"}, "search_on"),
])
def test_bad_arguments_are_clear_errors(setup, kwargs, match):
    net, x, held = setup
    snap = snapshot(net)
    with pytest.raises(CircuitError, match=match):
        find_keep(net, TARGET, x, heldout=held, **kwargs)
    assert_unchanged(net, snap)
