"""Sub-feature circuits: given and found groups, nesting, IoU, own- vs other-group scores."""

from __future__ import annotations

import pytest
import torch

from netcarve.circuits.circuit import CircuitError
from netcarve.circuits.subcircuits import find_groups, subcircuits
from netcarve.training.evaluation import reference_data
from netcarve.zoo import load_model


@pytest.fixture(scope="module")
def fmnist():
    lm = load_model("fmnist_vgg")
    x, y = reference_data(lm.preset, "test", limit=600)
    return lm, lm.preset.normalize(x), y


def test_find_groups_separates_obvious_clusters():
    torch.manual_seed(0)
    a = torch.randn(20, 30) * 0.1 + torch.cat([torch.ones(15), torch.zeros(15)])
    b = torch.randn(20, 30) * 0.1 + torch.cat([torch.zeros(15), torch.ones(15)])
    labels = find_groups(torch.cat([a, b]), 2, components=5)
    assert len(set(labels[:20])) == 1 and len(set(labels[20:])) == 1
    assert labels[0] != labels[20]


def test_given_groups_by_class(fmnist):
    lm, x, y = fmnist
    # Trousers (1) vs bags (8): two visually distinct image groups.
    keep = (y == 1) | (y == 8)
    imgs, labels = x[keep][:80], [int(v == 8) for v in y[keep][:80]]
    rep = subcircuits(lm.model, "features.11:5", imgs, groups=labels, keep=0.2, sub_keep=0.4)
    assert rep.method == "given" and len(rep.subcircuits) == 2
    general_kept = rep.general.kept_kernels
    for sc in rep.subcircuits:
        for name, m in sc.masks.items():
            assert not (m & ~rep.general.masks[name]).any()  # nested in the general circuit
        assert sc.kept_kernels <= round(0.4 * general_kept)
    for layer, mat in rep.iou.items():
        assert mat[0][0] == 1.0 and mat[1][1] == 1.0
        assert 0.0 <= mat[0][1] <= 1.0 and mat[0][1] == mat[1][0], layer
    s = rep.summary()
    assert s["subcircuits"][0]["keep_vs_general"] <= 0.4 + 1e-9
    assert s["subcircuits"][0]["own_group"]["n_images"] + s["subcircuits"][1]["own_group"][
        "n_images"] == 80 - 40


def test_found_groups_and_errors(fmnist):
    lm, x, _ = fmnist
    rep = subcircuits(lm.model, "features.7:3", x[:40], n_groups=2, keep=0.2)
    assert rep.method == "pca+kmeans" and len(set(rep.groups)) == 2
    with pytest.raises(CircuitError, match="labels"):
        subcircuits(lm.model, "features.7:3", x[:10], groups=[0, 1])
    with pytest.raises(CircuitError, match="at least 2"):
        subcircuits(lm.model, "features.7:3", x[:10], groups=[0] * 9 + [1])
