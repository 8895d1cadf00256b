"""The sub-feature statistic: the double difference and its parts equal hand computations,
held-out images are assigned by the fitted grouping, a unit with two planted sub-features
is found (large DD, small p) while random groups of the same unit give DD near 0."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _state import assert_unchanged, snapshot
from torch import nn

from netcarve.circuits.circuit import CircuitError
from netcarve.circuits.extract import extract
from netcarve.circuits.subfeature_stats import (
    _dd,
    _pearson,
    fit_and_assign,
    subfeature_statistic,
)


def test_double_difference_by_hand():
    rng = np.random.default_rng(0)
    original = rng.normal(size=(8, 5))
    c0 = original.copy()
    c0[4:] = rng.normal(size=(4, 5))  # circuit 0 right on group 0 only
    c1 = original.copy()
    c1[:4] = rng.normal(size=(4, 5))
    members = [np.arange(4), np.arange(4, 8)]
    dd, r = _dd(original, [c0, c1], members)
    r01 = _pearson(original[4:], c0[4:])
    r10 = _pearson(original[:4], c1[:4])
    assert r[0][0] == pytest.approx(1.0) and r[1][1] == pytest.approx(1.0)
    assert dd == pytest.approx((1 - r01 + 1 - r10) / 2, abs=1e-12)
    assert np.corrcoef(original[4:].ravel(), c0[4:].ravel())[0, 1] == pytest.approx(r01)
    same, _ = _dd(original, [c0, c0], members)
    assert same == pytest.approx(((1 - r01) + (r01 - 1)) / 2, abs=1e-12)  # = 0
    nan, _ = _dd(original, [c0, c1], [np.arange(1), np.arange(1, 8)])
    assert math.isnan(nan)  # a held-out group of one image has no correlation


def test_heldout_images_are_assigned_by_the_fitted_grouping():
    rng = np.random.default_rng(1)
    a, b = np.zeros(6), np.zeros(6)
    a[0], b[1] = 1.0, 1.0
    scoring = np.stack([a + 0.05 * rng.normal(size=6) for _ in range(10)]
                       + [b + 0.05 * rng.normal(size=6) for _ in range(10)])
    heldout = np.stack([b + 0.05 * rng.normal(size=6), a + 0.05 * rng.normal(size=6)])
    ls, lh = fit_and_assign(scoring, heldout, 2, components=3)
    assert len(set(ls[:10])) == 1 and len(set(ls[10:])) == 1 and ls[0] != ls[10]
    # two held-out images are never clustered on their own: each gets its fitted group
    assert lh[0] == ls[10] and lh[1] == ls[0]


class TwoFeatures(nn.Module):
    """A unit that sums a horizontal-edge and a vertical-edge detector (plus two near-silent
    distractors): horizontal-stripe images need one path, vertical-stripe images the other."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(4, 1, 1, bias=False)
        with torch.no_grad():
            horizontal = torch.tensor([[1.0, 1, 1], [0, 0, 0], [-1, -1, -1]])
            self.conv1.weight.zero_()
            self.conv1.weight[0, 0] = horizontal
            self.conv1.weight[1, 0] = horizontal.T
            self.conv1.weight[2:, 0] = 0.01 * torch.randn(2, 3, 3,
                                                          generator=torch.Generator().manual_seed(0))
            self.conv2.weight.copy_(torch.tensor([1.0, 1.0, 0.01, 0.01]).view(1, 4, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.conv1(x)))


def _stripes(n: int, vertical: bool, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    images = []
    for _ in range(n):
        period = int(torch.randint(2, 5, (1,), generator=g))
        phase = int(torch.randint(0, period, (1,), generator=g))
        line = ((torch.arange(12) + phase) % period == 0).float()
        img = line.view(12, 1).expand(12, 12) if not vertical else line.view(1, 12).expand(12, 12)
        images.append(img + 0.3 * torch.randn(12, 12, generator=g))
    return torch.stack(images)[:, None]


@pytest.fixture(scope="module")
def planted():
    model = TwoFeatures().eval()
    scoring = torch.cat([_stripes(20, False, 1), _stripes(20, True, 2)])
    heldout = torch.cat([_stripes(20, False, 3), _stripes(20, True, 4)])
    general = extract(model, "conv2:0", scoring, heldout=heldout, keep=1.0)
    return model, scoring, heldout, general


def test_planted_sub_features_are_found_and_random_groups_are_not(planted):
    model, scoring, heldout, general = planted
    snap = snapshot(model)
    st = subfeature_statistic(model, "conv2:0", scoring, heldout, general, grouping="scores",
                              sub_keep=0.25, bootstrap=200, random_splits=10, seed=0)
    assert_unchanged(model, snap)
    # kernel-score vectors separate the two stripe orientations (a few noisy images stray)
    assert all(abs(n - 20) <= 3 for n in st.groups_scoring + st.groups_heldout)
    # each sub-circuit (its 2 kernels) reproduces the unit on its own stripes, far less on
    # the others
    assert st.kept_kernels == [2, 2]
    assert st.r[0][0] > 0.9 and st.r[1][1] > 0.9 and max(st.r[0][1], st.r[1][0]) < 0.5
    assert st.double_difference > 0.4
    assert st.ci[0] <= st.double_difference <= st.ci[1] and st.ci[0] > 0.3
    assert len(st.random) == 10 and abs(st.random_mean) < 0.1
    assert st.double_difference > st.random_interval[1]
    assert st.p_value == pytest.approx(1 / 11)  # no random split comes close
    assert st.row()["p_value"] == st.p_value


def test_response_grouping_is_measured_the_same_way(planted):
    model, scoring, heldout, general = planted
    st = subfeature_statistic(model, "conv2:0", scoring, heldout, general,
                              grouping="responses", sub_keep=0.25, bootstrap=100,
                              random_splits=10, seed=0)
    # response maps split the stripes less cleanly than kernel scores, yet the held-out
    # double difference still beats every random split of the same sizes
    assert sum(st.groups_heldout) == 40 and st.double_difference > st.random_interval[1]
    assert st.p_value == pytest.approx(1 / 11)


def test_bad_settings_are_clear_errors(planted):
    model, scoring, heldout, general = planted
    with pytest.raises(CircuitError, match="grouping must be one of"):
        subfeature_statistic(model, "conv2:0", scoring, heldout, general, grouping="pixels")
    with pytest.raises(CircuitError, match="sub_keep"):
        subfeature_statistic(model, "conv2:0", scoring, heldout, general, sub_keep=0)
    with pytest.raises(CircuitError, match="at least 4 scoring images"):
        subfeature_statistic(model, "conv2:0", scoring[:3], heldout, general)
