"""Every capability on one small model per CNN family (tests/_families.py), with numbers.

The channel graph's links are checked against dependencies measured by perturbing each
channel with every other layer frozen; circuits, CAR, pruning and feature visualisation are
run through :func:`netcarve.benchmarks.coverage.coverage_row` (what docs/coverage.md shows)
and held to their bounds.
"""

from __future__ import annotations

import copy

import _families as fam
import pytest
import torch
from _dependencies import graph_links, measured_links
from _state import assert_unchanged, snapshot
from torch import nn

from netcarve.benchmarks.coverage import coverage_row
from netcarve.core.graph import ModelGraph
from netcarve.core.layers import GraphError

FAMILIES = list(fam.FAMILIES)
# filters of these families cannot be removed physically (reason asserted below)
NOT_PRUNABLE: dict[str, str] = {}


@pytest.fixture(autouse=True)
def _private_rng():
    with torch.random.fork_rng(devices=[]):
        yield


def _data(n: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, *fam.INPUT_SHAPE, generator=gen),
            torch.randint(0, fam.NUM_CLASSES, (n,), generator=gen))


@pytest.mark.parametrize("family", FAMILIES)
def test_graph_links_equal_measured_dependencies(family: str) -> None:
    model = fam.build(family)
    x, _ = _data(2)
    graph = ModelGraph.build(model, x[:1])
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    assert set(graph.layers) == set(convs) - set(graph.mixing)
    before = snapshot(model)
    links = missing = 0
    for source in [None, *graph.layers]:
        drawn, measured = graph_links(graph, source), measured_links(model, graph, x, source)
        for consumer in set(drawn) | set(measured):
            # sound: every measured dependency is a link of the graph
            assert measured.get(consumer, set()) <= drawn.get(consumer, set()), (source,
                                                                                consumer)
            links += len(drawn.get(consumer, ()))
            missing += len(drawn.get(consumer, set()) - measured.get(consumer, set()))
    # and tight: a link nothing flows through is rare (a squeeze-excitation gate multiplies
    # a channel that a ReLU keeps at zero for these images: 7 of RegNet's 357 links, none
    # in any other family)
    assert missing <= 0.03 * links, (missing, links)
    assert_unchanged(model, before)


@pytest.fixture(scope="module")
def rows() -> dict[str, dict]:
    x, y = _data(32)
    out = {}
    for family, (_, middle, late) in fam.FAMILIES.items():
        out[family] = coverage_row(fam.build(family), middle, late, x, y)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_every_capability_on_the_family(rows: dict[str, dict], family: str) -> None:
    row = rows[family]
    for cap in ("graph", "extract", "to_module", "car", "featureviz"):
        assert row[cap]["status"] == "ok", (cap, row[cap])
    assert row["extract"]["heldout_r"] > 0.5
    assert 0 < row["extract"]["kept"] < row["extract"]["relevant"]
    assert row["to_module"]["rel_error"] <= 1e-5
    assert row["car"]["agree"], row["car"]
    assert row["featureviz"]["objective_end"] > row["featureviz"]["objective_start"]
    prune = row["prune"]
    if family in NOT_PRUNABLE:
        assert prune["status"] == "refused" and NOT_PRUNABLE[family] in prune["error"]
    else:
        assert prune["status"] == "ok", prune
        assert prune["rel_error"] <= 1e-5 and prune["params_fraction"] < 1


def test_channel_shuffle_links_follow_the_permutation() -> None:
    """ShuffleNet's shuffle interleaves the two branches (position 2i: branch 1's channel i,
    2i + 1: branch 2's), and the next unit's branch reads the second half (positions 6..11)
    of the 12 shuffled channels: its input j is channel 3 + j // 2 of branch j % 2."""
    model = fam.build("shufflenet_v2")
    graph = ModelGraph.build(model, _data(1)[0])
    links = {link.source: link for link in graph.links["stage2.1.branch2.0"]}
    assert set(links) == {"stage2.0.branch1.2", "stage2.0.branch2.5"}
    for source, positions in (("stage2.0.branch1.2", [0, 2, 4]),
                              ("stage2.0.branch2.5", [1, 3, 5])):
        assert links[source].source_channels.tolist() == [3, 4, 5]
        assert links[source].input_channels.tolist() == positions


def test_convnext_pointwise_linears_are_channels_last_layers_after_a_mixing_layernorm(
) -> None:
    """ConvNeXt: the NHWC LayerNorm mixes channels (every pwconv1 input depends on every
    depthwise channel); the pointwise Linears are layers with their channels on the last dim
    (pwconv1 → pwconv2 one to one); a filter mask zeroes the last dim, as zeroing the
    Linear's row and bias does."""
    from netcarve.core.hooks import apply_filter_masks, forward_until

    model = fam.build("convnext")
    x = _data(3)[0]
    graph = ModelGraph.build(model, x[:1])
    assert "features.1.0.block.2" in graph.mixing
    info = graph.layers["features.1.0.block.3"]
    assert info.channels_last and info.mask_shape == (32, 8)
    assert info.input_shape == (8, 8, 8) and info.output_shape == (8, 8, 32)
    (link,) = graph.links["features.1.0.block.3"]
    assert link.source == "features.1.0.block.0" and len(link.source_channels) == 8 * 8
    (link,) = graph.links["features.1.0.block.5"]
    assert link.source_channels.tolist() == link.input_channels.tolist() == list(range(32))
    keep = torch.ones(32, dtype=torch.bool)
    keep[[3, 17]] = False
    with torch.no_grad():
        with apply_filter_masks(model, graph, {"features.1.0.block.3": keep}):
            masked = model(x)
        zeroed = copy.deepcopy(model)
        lin = zeroed.get_submodule("features.1.0.block.3")
        lin.weight[~keep] = 0
        lin.bias[~keep] = 0
        assert torch.allclose(masked, zeroed(x), rtol=0, atol=0)
        z = forward_until(model, "features.1.0.block.3", x)  # presented channels-first
        assert tuple(z.shape) == (3, 32, 8, 8)


def test_convnext_circuit_module_cannot_end_at_a_channels_last_linear() -> None:
    from netcarve.circuits.extract import extract
    from netcarve.surgery._plan import SurgeryError

    model = fam.build("convnext")
    x = _data(8)[0]
    circuit = extract(model, "features.1.1.block.3:5", x[:4], heldout=x[4:], keep=0.5)
    with pytest.raises(SurgeryError, match="channels-last Linear.*Target the next conv"):
        circuit.to_module(model)


def test_vision_transformer_is_refused_clearly() -> None:
    with pytest.raises(GraphError, match=r"attention \(module 'encoder\.layers\.0\.self_attn', "
                                         r"MultiheadAttention\).*not supported"):
        ModelGraph.build(fam.TinyViT().eval(), _data(1)[0])


@pytest.mark.parametrize("family", FAMILIES)
def test_macs_from_the_graph_equal_macs_measured_by_hooks(family: str) -> None:
    """``count_macs`` (graph shapes; ConvNeXt's channels-last Linears included) equals the
    multiply-adds counted by forward hooks on every conv and Linear."""
    from netcarve.core.costs import count_macs
    from netcarve.surgery.circuit_module import _module_macs

    model = fam.build(family)
    graph = ModelGraph.build(model, _data(1)[0])
    assert count_macs(model, graph) == _module_macs(model, fam.INPUT_SHAPE)


def test_real_model_coverage_script_on_stand_ins() -> None:
    """``bench/coverage_real.py`` (run where torchvision is installed) picks its layers from
    the graph, writes a row per model and a refusal for a transformer; checked here with the
    family models standing in for torchvision's builders."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import coverage_real

    builders = {"shufflenet_v2": lambda: fam.build("shufflenet_v2"), "vit": fam.TinyViT}
    x, y = _data(8)
    rows = coverage_real.run_models(builders, x, y, "cpu")
    assert rows["shufflenet_v2"]["layers_probed"] == {"middle": "stage3.0.branch1.0",
                                                      "late": "conv5.0"}
    assert all(rows["shufflenet_v2"][cap]["status"] in ("ok", "refused")
               for cap in ("graph", "extract", "to_module", "car", "prune", "featureviz"))
    assert "attention" in rows["vit"]["error"]
    text = coverage_real.markdown(rows, "cmd")
    assert "| shufflenet_v2 | `stage3.0.branch1.0`, `conv5.0` |" in text and "**refused**" in text
