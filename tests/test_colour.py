"""Colour-selectivity indices on hand-made kernels, grey conversion, pruning comparison."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from netcarve.car.colour import (
    ColourReport,
    colour_selectivity,
    colour_vs_pruning,
    grey_images,
    response_colour_index,
    weight_colour_index,
)
from netcarve.car.stats import AblationError
from netcarve.data import make_shapes
from netcarve.data.preset import Preset
from netcarve.zoo import FASHION_MNIST_PRESET, SHAPES_PRESET, ZOO


@pytest.fixture(autouse=True)
def _private_rng():
    """Seeds set inside a test (torch.manual_seed, _nets.make) do not leak out of it."""
    with torch.random.fork_rng(devices=[]):
        yield


RGB = Preset(8, 3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), ("a", "b"))


def kernels() -> torch.Tensor:
    w = torch.zeros(4, 3, 3, 3)
    w[0] = torch.randn(1, 3, 3).expand(3, 3, 3)  # same on R, G, B: pure brightness
    w[1, 0] = torch.randn(3, 3)  # red only
    w[2, 0], w[2, 1] = 1.0, -1.0  # red-green opponent: no brightness at all
    w[3] = torch.randn(3, 3, 3)
    return w


def test_weight_index_on_known_kernels() -> None:
    torch.manual_seed(0)
    idx = weight_colour_index(kernels())
    assert idx[0] == pytest.approx(0.0, abs=1e-12)
    assert idx[1] == pytest.approx(2 / 3)
    assert idx[2] == pytest.approx(1.0)
    assert 0.0 <= float(idx[3]) <= 1.0
    # unequal std: a kernel equal in *pixel* space is grey, whatever the normalisation
    w = torch.zeros(1, 3, 1, 1)
    w[0, :, 0, 0] = torch.tensor([1.0, 2.0, 4.0])
    assert weight_colour_index(w, std=(1.0, 2.0, 4.0))[0] == pytest.approx(0.0, abs=1e-12)
    assert weight_colour_index(torch.zeros(1, 3, 2, 2))[0] == 0.0
    with pytest.raises(AblationError, match="3"):
        weight_colour_index(torch.zeros(2, 1, 3, 3))


def test_grey_images() -> None:
    x = torch.tensor([[[[10, 250]], [[20, 0]], [[31, 5]]]], dtype=torch.uint8)
    g = grey_images(x)
    assert g.dtype == torch.uint8
    assert g[0, :, 0, 0].tolist() == [20, 20, 20] and g[0, :, 0, 1].tolist() == [85, 85, 85]
    assert torch.allclose(grey_images(x.float() / 255), x.float().mean(1, keepdim=True)
                          .expand(1, 3, 1, 2) / 255)


class TwoFilters(nn.Module):
    """Filter 0 reads brightness (R+G+B), filter 1 the red-green difference."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0, :, 0, 0] = 1.0
            self.conv.weight[1, 0, 0, 0], self.conv.weight[1, 1, 0, 0] = 1.0, -1.0
        self.fc = nn.Linear(2 * 64, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))


def test_response_index_separates_brightness_and_colour() -> None:
    net = TwoFilters().eval()
    x = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    idx = response_colour_index(net, "conv", x, RGB, batch_size=5)
    assert idx[0] < 0.01  # grey conversion keeps R+G+B (up to uint8 rounding)
    assert idx[1] == pytest.approx(1.0)  # grey images have R = G: no response at all
    rep = colour_selectivity(net, "conv", preset=RGB, images=x)
    assert rep.by == "weight" and rep.selective.tolist() == [False, True]
    assert rep.response_index is not None


def test_colour_vs_pruning_counts_and_p_value() -> None:
    idx = torch.tensor([0.9, 0.8, 0.1, 0.2, 0.7, 0.0], dtype=torch.float64)
    rep = ColourReport("l", idx, None, "weight", 0.5)
    out = colour_vs_pruning(rep, [0, 1, 2, 5], k=2)
    assert out["pruned_colour"] == 2 and out["pruned_fraction"] == 1.0
    assert out["kept"] == 4 and out["kept_colour"] == 1 and out["kept_fraction"] == 0.25
    assert out["all_fraction"] == 0.5
    assert out["p_value"] == pytest.approx(math.comb(3, 2) / math.comb(6, 2))
    with pytest.raises(AblationError, match="fewer than"):
        colour_vs_pruning(rep, [0], k=2)
    with pytest.raises(AblationError, match="k must lie"):
        colour_vs_pruning(rep, list(range(6)), k=6)


def test_permutation_p_values_match_exact_enumeration() -> None:
    import itertools

    idx = torch.tensor([0.9, 0.8, 0.1, 0.2, 0.7, 0.0], dtype=torch.float64)
    rep = ColourReport("l", idx, None, "weight", 0.5)
    out = colour_vs_pruning(rep, [0, 2, 1], k=2, permutations=40_000, seed=3)
    sel = (idx > 0.5).double()

    def diff(values: torch.Tensor, subset: tuple[int, ...]) -> float:
        inside = [values[i] for i in subset]
        outside = [values[i] for i in range(6) if i not in subset]
        return float(sum(inside) / 2 - sum(outside) / 4)

    subsets = list(itertools.combinations(range(6), 2))
    for name, values in (("perm", sel), ("index", idx)):
        obs = diff(values, (0, 2))
        more = sum(diff(values, c) >= obs - 1e-12 for c in subsets) / len(subsets)
        less = sum(diff(values, c) <= obs + 1e-12 for c in subsets) / len(subsets)
        # 40,000 draws: the Monte Carlo standard error is below 0.0025
        assert out[f"p_{name}_more"] == pytest.approx(more, abs=0.01)
        assert out[f"p_{name}_less"] == pytest.approx(less, abs=0.01)
    # the fraction statistic is monotone in the count, so it matches the hypergeometric tail
    assert out["p_perm_more"] == pytest.approx(out["p_value"], abs=0.01)
    assert math.isnan(colour_vs_pruning(rep, [0, 2], k=2, permutations=0)["p_perm_more"])


def test_shapes_cnn_first_layer(tmp_path) -> None:
    net = ZOO["shapes_cnn"].factory().eval()
    x, _ = make_shapes(12, seed=1)
    rep = colour_selectivity(net, "features.0", preset=SHAPES_PRESET, images=x)
    assert rep.weight_index is not None and rep.weight_index.shape == (48,)
    assert rep.response_index is not None
    assert bool(((rep.response_index >= 0) & (rep.response_index <= 1)).all())
    assert rep.save(tmp_path).read_text().count("\n") == 49
    later = colour_selectivity(net, "features.4", preset=SHAPES_PRESET, images=x)
    assert later.weight_index is None and later.by == "response"
    with pytest.raises(AblationError, match="RGB"):
        colour_selectivity(net, "features.0", preset=FASHION_MNIST_PRESET)
