"""Circuit extraction: exact top-k, effective masks, held-out preservation, model restored."""

from __future__ import annotations

import pytest
import torch
from _nets import make
from _state import assert_unchanged, snapshot

from netcarve.circuits.circuit import CircuitError, count, select_top_k
from netcarve.circuits.extract import extract
from netcarve.core.graph import ModelGraph
from netcarve.core.hooks import apply_kernel_masks, forward_until


def test_select_top_k_is_exact_with_deterministic_ties():
    scores = {"a": torch.ones(3, 2), "b": torch.ones(2, 2)}
    cands = {"a": torch.ones(3, 2, dtype=torch.bool), "b": torch.ones(2, 2, dtype=torch.bool)}
    for k in range(0, 11):
        chosen = select_top_k(scores, cands, k)
        assert count(chosen) == k
    chosen = select_top_k(scores, cands, 3)  # all tied: the first three in order win
    assert chosen["a"].flatten().tolist() == [True, True, True, False, False, False]
    cands["a"][0, 0] = False  # non-candidates are never chosen, whatever their score
    scores["a"][0, 0] = 100.0
    assert not select_top_k(scores, cands, 4)["a"][0, 0]


def test_per_layer_normalisation_shares_the_budget():
    scores = {"a": torch.tensor([[100.0, 90.0]]), "b": torch.tensor([[2.0, 1.0]])}
    cands = {n: torch.ones(1, 2, dtype=torch.bool) for n in scores}
    plain = select_top_k(scores, cands, 2)
    assert plain["a"].all() and not plain["b"].any()
    normed = select_top_k(scores, cands, 2, per_layer_norm=True)
    assert normed["a"][0, 0] and normed["b"][0, 0]


def test_nan_scores_are_refused():
    with pytest.raises(CircuitError, match="NaN"):
        select_top_k({"a": torch.tensor([[float("nan")]])},
                     {"a": torch.ones(1, 1, dtype=torch.bool)}, 1)


@pytest.mark.parametrize("net_name,target", [("plain", "features.4:2"),
                                             ("resnet", None), ("cat", None)])
@pytest.mark.parametrize("criterion", ["actgrad", "snip", "magnitude", "random"])
def test_extract_properties(net_name, target, criterion):
    net, _ = make(net_name, double=False)
    torch.manual_seed(1)
    x = net.example_input(24)
    graph = ModelGraph.build(net, x[:1])
    if target is None:
        conv = [n for n, i in graph.layers.items() if i.kind == "conv"][-1]
        target = f"{conv}:1"
    snap = snapshot(net)
    c = extract(net, target, x[:12], heldout=x[12:], criterion=criterion, keep=0.3,
                graph=graph, batch_size=5)
    assert_unchanged(net, snap)
    assert c.selected == max(1, round(0.3 * c.relevant_kernels))
    assert c.kept_kernels <= c.selected
    for name, m in c.masks.items():
        assert not (m & ~c.relevant[name]).any()
    eff, _ = graph.effective_mask(c.masks, c.target.layer, c.target.channels)
    assert all(torch.equal(eff[n], c.masks[n]) for n in c.masks)  # already effective
    assert c.preservation.n_images == 12 and c.preservation_scoring.n_images == 12
    s = c.summary()
    for key in ("target", "criterion", "keep", "kept_kernels", "relevant_kernels",
                "preservation_heldout", "preservation_scoring", "seconds"):
        assert key in s


def test_keep_one_preserves_exactly_and_masked_model_matches():
    net, _ = make("resnet", double=False)
    x = net.example_input(16)
    c = extract(net, _last_conv(net, x) + ":0", x, keep=1.0)
    assert abs(c.preservation.pearson - 1.0) < 1e-6
    assert c.preservation.nmad < 1e-6


def _last_conv(net, x):
    g = ModelGraph.build(net, x[:1])
    return [n for n, i in g.layers.items() if i.kind == "conv"][-1]


def test_preservation_is_measured_with_the_masks():
    net, _ = make("plain", double=False)
    x = net.example_input(20)
    c = extract(net, "features.4:0", x[:10], heldout=x[10:], keep=0.5, criterion="magnitude")
    assert not c.collapsed
    graph = ModelGraph.build(net, x[:1])
    with torch.no_grad():
        z = forward_until(net, "features.4", x[10:])[:, 0]
        with apply_kernel_masks(net, graph, c.masks):
            zc = forward_until(net, "features.4", x[10:])[:, 0]
    r = torch.corrcoef(torch.stack([z.flatten(), zc.flatten()]))[0, 1]
    assert abs(float(r) - c.preservation.pearson) < 1e-5


def test_determinism_and_default_split():
    net, _ = make("plain", double=False)
    x = net.example_input(20)
    a = extract(net, "features.4:1", x, keep=0.25, criterion="random", seed=3)
    b = extract(net, "features.4:1", x, keep=0.25, criterion="random", seed=3)
    assert all(torch.equal(a.masks[n], b.masks[n]) for n in a.masks)
    assert a.metadata["scoring_images"] == 10 and a.metadata["heldout_images"] == 10
    assert a.metadata["scoring_data_fingerprint"] != a.metadata["heldout_data_fingerprint"]


def test_total_collapse_is_reported_not_raised():
    net, _ = make("plain", double=False)
    x = net.example_input(8)
    c = extract(net, "classifier.3:0", x, keep=1e-6, criterion="magnitude")
    assert c.selected == 1
    assert c.collapsed and c.kept_kernels == 0


def test_filter_granularity_and_iterative_steps():
    net, _ = make("plain", double=False)
    x = net.example_input(16)
    f = extract(net, "classifier.1:0", x, keep=0.5, granularity="filter", criterion="actgrad")
    candidates = sum(int(r.any(1).sum()) for n, r in f.relevant.items() if n != "classifier.1")
    assert f.selected == round(0.5 * candidates)
    # Whole filters in a sequential net: every kept row of a layer keeps the same kernels
    # (those whose input filter survived).
    for m in f.masks.values():
        rows = m[m.any(1)]
        assert all(torch.equal(r, rows[0]) for r in rows)
    it = extract(net, "features.4:0", x, keep=0.2, steps=3, criterion="actgrad")
    assert it.selected == max(1, round(0.2 * it.relevant_kernels))


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, float("nan")])
def test_bad_keep_is_refused(bad):
    net, _ = make("plain", double=False)
    with pytest.raises(CircuitError, match="keep"):
        extract(net, "features.4:0", net.example_input(4), keep=bad)


def test_unknown_layer_and_channel_errors_name_the_fix():
    from netcarve.core.layers import GraphError

    net, _ = make("plain", double=False)
    x = net.example_input(4)
    with pytest.raises(GraphError, match="features.4"):
        extract(net, "feature.4:0", x)
    with pytest.raises(GraphError, match=r"0\.\.5"):
        extract(net, "features.4:9", x)


def test_streamed_responses_do_not_keep_whole_layer_outputs_alive():
    # Memory must not grow with the number of images: each yielded response owns only its
    # target channel, not the full [N, channels, H, W] layer output it was sliced from.
    from netcarve.circuits.extract import target_responses
    from netcarve.core.targets import Target

    net, _ = make("plain", double=False)
    x = net.example_input(12)
    graph = ModelGraph.build(net, x[:1])
    target = Target.parse("features.4:1").resolve(graph)
    chunks = list(target_responses(net, graph, target, x, batch_size=5))
    assert [len(c) for c in chunks] == [5, 5, 2]
    for c in chunks:
        assert c.untyped_storage().nbytes() == c.numel() * c.element_size()
    full = forward_until(net, "features.4", x)[:, 1]
    torch.testing.assert_close(torch.cat(chunks), full.detach(), rtol=0, atol=0)


def test_score_kernels_accepts_a_target_string():
    from netcarve.circuits.extract import score_kernels

    net, _ = make("plain", double=False)
    x = net.example_input(6)
    graph = ModelGraph.build(net, x[:1])
    scores = score_kernels(net, graph, "features.4:0", x, criterion="magnitude")
    assert set(scores) == set(graph.relevant_kernels("features.4", [0]))
