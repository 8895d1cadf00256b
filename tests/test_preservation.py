"""Preservation metrics, streamed, against numpy on the concatenated maps."""

from __future__ import annotations

import math

import numpy as np
import torch

from netcarve.circuits.preservation import PreservationMeter


def test_streamed_pearson_equals_numpy_on_concatenation():
    torch.manual_seed(0)
    a = torch.randn(10, 6, 6)
    b = 0.7 * a + 0.5 * torch.randn(10, 6, 6)
    meter = PreservationMeter()
    for i in range(0, 10, 3):
        meter.update(a[i : i + 3], b[i : i + 3])
    res = meter.result()
    expected = np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1]
    assert abs(res.pearson - expected) < 1e-9
    assert res.n_images == 10
    nmad = (a - b).abs().mean() / a.abs().mean()
    assert abs(res.nmad - float(nmad)) < 1e-6
    per_image = [np.corrcoef(a[i].flatten(), b[i].flatten())[0, 1] for i in range(10)]
    assert np.allclose(res.per_image, per_image, atol=1e-9)
    assert abs(res.per_image_median - float(np.median(per_image))) < 1e-9


def test_identical_maps_are_perfect():
    a = torch.randn(4, 3, 3)
    m = PreservationMeter()
    m.update(a, a.clone())
    r = m.result()
    assert abs(r.pearson - 1.0) < 1e-12 and r.nmad == 0.0


def test_constant_circuit_response_has_no_correlation():
    a = torch.randn(4, 3, 3)
    m = PreservationMeter()
    m.update(a, torch.full_like(a, 0.3))
    r = m.result()
    assert math.isnan(r.pearson)
    assert r.to_dict()["pearson"] is None


def test_single_position_targets_have_no_per_image_r():
    m = PreservationMeter()
    a = torch.randn(8)
    m.update(a, 2 * a)
    r = m.result()
    assert abs(r.pearson - 1) < 1e-9 and math.isnan(r.per_image_median)
