"""The ablation engine on a GPU: engine vs naive loop on CUDA, and CUDA vs CPU, within the
tolerances of :func:`netcarve.car.stats.compare_stats` (never bitwise: cuDNN picks algorithms
by shape). The ``cpu`` rows run everywhere and check the comparison itself; the ``cuda`` rows
skip cleanly on a machine without a GPU (CI has none)."""

from __future__ import annotations

import copy

import pytest
import torch

from netcarve.car.engine import ablate
from netcarve.car.naive import ablate_naive, single_removals
from netcarve.car.stats import compare_stats
from netcarve.training.evaluation import reference_data
from netcarve.zoo import load_model

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU")]),
]


@pytest.fixture(scope="module")
def data():
    lm = load_model("fmnist_vgg")
    x, y = reference_data(lm.preset, "test", limit=200)
    return lm, lm.preset.normalize(x), y


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layer", ["features.7", "features.14"])
def test_engine_agrees_with_the_naive_loop_on_the_device(data, device, layer):
    lm, x, y = data
    model = copy.deepcopy(lm.model).to(device)
    n = model.get_submodule(layer).out_channels
    cand = single_removals(n, filters=range(0, n, max(1, n // 6)))
    got = ablate(model, layer, cand, x, y, batch_size=100)
    want = ablate_naive(model, layer, cand, x, y, batch_size=100)
    agreement = compare_stats(got, want)
    assert agreement.ok, agreement.describe()


@pytest.mark.parametrize("device", DEVICES)
def test_the_device_agrees_with_the_cpu(data, device):
    lm, x, y = data
    n = lm.model.features[11].out_channels
    cand = single_removals(n, filters=range(0, n, 8))
    cpu = ablate(lm.model, "features.11", cand, x, y, batch_size=100)
    other = ablate(copy.deepcopy(lm.model).to(device), "features.11", cand, x, y, batch_size=60)
    agreement = compare_stats(other, cpu)
    assert agreement.ok, agreement.describe()
