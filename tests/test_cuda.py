"""Circuits, feature visualisation and the architecture coverage on a GPU agree with the CPU.

Within stated tolerances, never bitwise (cuDNN picks algorithms by shape): kernel scores to
relative 1e-4 of the largest score, kept kernels the same except at score near-ties (at most
1%), preservation r to 1e-3; a feature visualisation's first-step objective to relative 1e-3.
The ``cpu`` rows run everywhere (they check the comparisons); the ``cuda`` rows skip cleanly on
a machine without a GPU (CI has none).
"""

from __future__ import annotations

import copy

import _families as fam
import pytest
import torch

from netcarve.benchmarks.coverage import coverage_row
from netcarve.circuits.extract import extract, score_kernels
from netcarve.core.graph import ModelGraph
from netcarve.training.evaluation import reference_data
from netcarve.viz.render import visualize
from netcarve.zoo import load_model

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU")]),
]
TARGET = "features.11:8"


@pytest.fixture(scope="module")
def data():
    lm = load_model("fmnist_vgg")
    x, _ = reference_data(lm.preset, "test", limit=120)
    return lm, lm.preset.normalize(x)


@pytest.mark.parametrize("device", DEVICES)
def test_extract_on_the_device_agrees_with_cpu(data, device):
    lm, x = data
    graph = ModelGraph.build(lm.model, x[:1])
    want_scores = score_kernels(lm.model, graph, TARGET, x[:60])
    want = extract(lm.model, TARGET, x[:60], heldout=x[60:], keep=0.2, graph=graph)
    model = copy.deepcopy(lm.model).to(device)
    dev_graph = ModelGraph.build(model, x[:1].to(device))
    got_scores = score_kernels(model, dev_graph, TARGET, x[:60].to(device))
    for name, s in want_scores.items():
        scale = float(s.abs().max()) or 1.0
        assert float((got_scores[name].cpu() - s).abs().max()) <= 1e-4 * scale, name
    got = extract(model, TARGET, x[:60].to(device), heldout=x[60:].to(device), keep=0.2,
                  graph=dev_graph)
    kept = sum(int(m.sum()) for m in want.masks.values())
    differ = sum(int((got.masks[n].cpu() != m).sum()) for n, m in want.masks.items())
    assert differ <= 0.01 * kept
    assert got.preservation.pearson == pytest.approx(want.preservation.pearson, abs=1e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_featureviz_on_the_device_agrees_with_cpu(data, device):
    lm, _ = data
    want = visualize(lm.model, TARGET, preset=lm.preset, steps=4, seed=0)
    got = visualize(copy.deepcopy(lm.model).to(device), TARGET, preset=lm.preset, steps=4,
                    seed=0)
    first_want, first_got = float(want.history[0, 0]), float(got.history[0, 0])
    assert first_got == pytest.approx(first_want, rel=1e-3, abs=1e-6)
    assert float(got.activations[0]) > first_got  # it still climbs on the device


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", ["resnext", "mobilenet_v2", "convnext"])
def test_coverage_row_on_the_device(device, family):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, *fam.INPUT_SHAPE, generator=gen)
    y = torch.randint(0, fam.NUM_CLASSES, (16,), generator=gen)
    _, middle, late = fam.FAMILIES[family]
    row = coverage_row(fam.build(family).to(device), middle, late, x, y, viz_steps=4)
    for cap in ("graph", "extract", "to_module", "car", "featureviz"):
        assert row[cap]["status"] == "ok", (cap, row[cap])
    assert row["to_module"]["rel_error"] <= 1e-5 and row["car"]["agree"]
