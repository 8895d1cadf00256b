"""Removals evaluated over a stream, chunk by chunk, equal the engine on the whole tensor."""

from __future__ import annotations

import pytest
import torch
from _nets import make
from _state import assert_unchanged, snapshot

from netcarve.car.engine import AblationEngine
from netcarve.car.naive import single_removals
from netcarve.car.stats import AblationError, AblationStats, compare_stats
from netcarve.car.streamed import evaluate_stream
from netcarve.core.graph import ModelGraph


def _labelled(name: str, n: int = 37):
    with torch.random.fork_rng(devices=[]):
        net, x = make(name, seed=0, batch=n)
        with torch.no_grad():
            k = net(x).shape[1]
        y = torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(0))
    return net, x, y


@pytest.mark.parametrize("name", ["plain", "resnet", "cat"])
@pytest.mark.parametrize("chunk", [1, 10, 1000])
def test_stream_equals_engine_on_the_whole_tensor(name: str, chunk: int) -> None:
    net, x, y = _labelled(name)
    graph = ModelGraph.build(net, x[:1])
    layer = next(iter(graph.layers))
    cands = single_removals(graph.layers[layer].out_channels)
    want = AblationEngine(net, x, y, graph=graph, batch_size=8).evaluate(layer, cands)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    before = snapshot(net)
    got = evaluate_stream(net, layer, cands, loader, graph=graph, batch_size=8,
                          chunk_images=chunk)
    assert_unchanged(net, before)
    agreement = compare_stats(got, want)
    assert agreement.ok, agreement.describe()
    assert got.n == want.n == 37
    assert torch.equal(got.class_count, want.class_count)
    assert torch.equal(got.correct, want.correct)  # integer counts: exact here (no near-ties)


def test_merged_adds_counts_and_concatenates_per_image_rows() -> None:
    net, x, y = _labelled("plain", n=20)
    graph = ModelGraph.build(net, x[:1])
    layer = next(iter(graph.layers))
    cands = single_removals(graph.layers[layer].out_channels)
    eng = AblationEngine(net, x, y, graph=graph)
    whole = eng.evaluate(layer, cands, per_image=True)
    parts = [AblationEngine(net, x[a:b], y[a:b], graph=graph).evaluate(layer, cands,
                                                                       per_image=True)
             for a, b in ((0, 7), (7, 20))]
    merged = AblationStats.merged(parts)
    assert merged.n == 20
    assert torch.equal(merged.image_correct, whole.image_correct)
    assert torch.allclose(merged.loss_sum, whole.loss_sum, rtol=1e-5)
    assert merged.counts.prefix_images == sum(p.counts.prefix_images for p in parts)


def test_bad_arguments() -> None:
    net, x, y = _labelled("plain", n=4)
    with pytest.raises(AblationError, match="chunk_images"):
        evaluate_stream(net, "features.0", single_removals(4), x, y, chunk_images=0)
    with pytest.raises(AblationError, match="nothing to merge"):
        AblationStats.merged([])
