"""Tests of netcarve.function: descriptors, similarity, clustering, pruning, defection."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from _state import assert_unchanged, snapshot
from torch import nn

from netcarve.core.layers import GraphError
from netcarve.function.clustering import (
    FilterClusters,
    _silhouette,
    cka_similarity,
    cluster_filters,
    filter_similarity,
    keep_representatives,
)
from netcarve.function.defection import defection
from netcarve.function.descriptors import (
    FunctionalError,
    _class_preference_loop,
    class_preference,
    describe_filters,
)
from netcarve.function.pruning import (
    compare_pruning,
    filter_importance,
    functional_prune,
    magnitude_masks,
)

try:  # tests/ as a package or as a plain folder on sys.path
    from tests import _nets
except ImportError:  # pragma: no cover
    import _nets  # type: ignore[no-redef]


@pytest.fixture(scope="module")
def vgg():
    from netcarve.zoo import load_model

    return load_model("fmnist_vgg")


@pytest.fixture(scope="module")
def data(vgg):
    from netcarve.training.evaluation import reference_data

    x, y = reference_data(vgg.preset, "train", limit=600)
    xt, yt = reference_data(vgg.preset, "test", limit=300)
    return {"probe_x": x[:96], "probe_y": y[:96], "train_x": x, "train_y": y,
            "eval_x": xt, "eval_y": yt}


class TwinNet(nn.Module):
    """Filters 0 and 1 of ``conv`` are identical and so are their outgoing weights (the same
    function, also for the class preference); filter 3 is filter 2 scaled by 3."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 5, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(5 * 4, 4)
        with torch.no_grad():
            self.conv.weight[1] = self.conv.weight[0]
            self.conv.bias[1] = self.conv.bias[0]
            self.conv.weight[3] = 3 * self.conv.weight[2]
            self.conv.bias[3] = 3 * self.conv.bias[2]
            self.fc.weight[:, 4:8] = self.fc.weight[:, 0:4]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.relu(self.conv(x))), 1))


# --------------------------------------------------------------------------- descriptors


def test_batched_class_preference_equals_the_per_filter_loop():
    torch.manual_seed(0)
    net, _ = _nets.make("plain", double=False)  # conv-BN-ReLU(inplace), hidden Linear
    x = torch.randn(10, 3, 8, 8)
    snap = snapshot(net)
    fast = class_preference(net, "features.4", x, batch_size=4)
    slow = _class_preference_loop(net, "features.4", x, batch_size=4)
    assert fast.shape == (6, 3)
    assert torch.allclose(fast, slow, rtol=1e-6, atol=1e-12)
    assert_unchanged(net, snap)
    # definition check for one entry: mean over images and positions of |∂p_c/∂z_o|
    z = None

    def keep(mod, args, out):
        nonlocal z
        z = out.detach().requires_grad_(True)
        return z.clone()

    h = net.features[4].register_forward_hook(keep)
    p = net(x[:1]).softmax(1)
    h.remove()
    (g,) = torch.autograd.grad(p[0, 2], z)
    one = class_preference(net, "features.4", x[:1])
    assert math.isclose(float(one[5, 2]), float(g[0, 5].abs().mean()), rel_tol=1e-6)


def test_describe_filters_measures_every_descriptor_and_leaves_the_model_alone(vgg, data):
    snap = snapshot(vgg.model)
    d = describe_filters(vgg.model, "features.4", data["probe_x"][:32], preset=vgg.preset,
                         descriptors=("am", "profile", "class_preference"), am_steps=4)
    assert_unchanged(vgg.model, snap)
    assert d.kinds == ["am", "profile", "class_preference"]
    assert d.profile.shape == (64, 32) and d.class_preference.shape == (64, 10)
    assert d.am_images.shape == (64, 1, 28, 28)
    assert d.vectors("am").shape == (64, 784)
    sub = d.select([5, 2])
    assert sub.channels == [5, 2] and torch.equal(sub.profile[1], d.profile[2])
    with pytest.raises(FunctionalError, match="unknown descriptor"):
        describe_filters(vgg.model, "features.4", data["probe_x"], descriptors=["colour"],
                         preset=vgg.preset)
    with pytest.raises(GraphError, match="did you mean"):
        describe_filters(vgg.model, "feature.4", data["probe_x"], preset=vgg.preset)


def test_identical_filters_are_found_by_cosine_and_cka():
    torch.manual_seed(1)
    net = TwinNet().eval()
    x = torch.randn(40, 1, 6, 6)
    d = describe_filters(net, "conv", x)
    s = filter_similarity(d)
    assert math.isclose(float(s[0, 1]), 1.0, abs_tol=1e-9)
    assert float(s[0, 2]) < 0.99
    cka = cka_similarity(net, "conv", x)
    assert math.isclose(float(cka[0, 1]), 1.0, abs_tol=1e-9)
    assert math.isclose(float(cka[2, 3]), 1.0, abs_tol=1e-9)  # CKA ignores the scale
    clusters = cluster_filters(cka, threshold=0.999)
    assert [0, 1] in clusters.groups() and [2, 3] in clusters.groups()
    imp = filter_importance(net, "conv", "l1")
    keep = keep_representatives(clusters, imp)
    assert keep.tolist() == [True, False, False, True, True]  # tie → lower index; 3 > 2 in L1


# --------------------------------------------------------------------------- clustering


def _blocks() -> torch.Tensor:
    s = torch.full((7, 7), 0.1, dtype=torch.float64)
    for group in ([0, 1, 2], [3, 4], [5], [6]):
        for i in group:
            for j in group:
                s[i, j] = 0.95
    s.fill_diagonal_(1.0)
    return s


def test_agglomerative_threshold_and_k():
    s = _blocks()
    c = cluster_filters(s, threshold=0.9)
    assert c.groups() == [[0, 1, 2], [3, 4], [5], [6]]
    assert c.labels.tolist() == [0, 0, 0, 1, 1, 2, 3]
    assert cluster_filters(s, threshold=0.96).n_clusters == 7
    assert cluster_filters(s, threshold=0.05).n_clusters == 1
    assert cluster_filters(s, k=2).n_clusters == 2
    assert c.to_dict()["n_clusters"] == 4


def test_kmeans_picks_k_by_silhouette():
    torch.manual_seed(0)
    centres = torch.randn(3, 6)
    points = torch.cat([centres[i] + 0.05 * torch.randn(5, 6) for i in range(3)])
    unit = points / points.norm(dim=1, keepdim=True)
    s = unit @ unit.T
    c = cluster_filters(s, method="kmeans", k_range=(2, 6))
    assert c.n_clusters == 3
    assert sorted(len(g) for g in c.groups()) == [5, 5, 5]
    assert set(c.silhouette_by_k) == {2, 3, 4, 5, 6}
    assert cluster_filters(s, method="kmeans", k=4).n_clusters == 4


def test_silhouette_matches_scikit_learn():
    from sklearn.metrics import silhouette_score

    torch.manual_seed(2)
    d = torch.rand(12, 12, dtype=torch.float64)
    d = (d + d.T) / 2
    d.fill_diagonal_(0)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 0, 1, 2, 2, 3])
    ours = _silhouette(d, labels)
    ref = silhouette_score(d.numpy(), labels.numpy(), metric="precomputed")
    assert math.isclose(ours, float(ref), rel_tol=1e-9)


def test_bad_clustering_arguments_are_clear():
    s = _blocks()
    for bad in (1.5, -2.0, float("nan"), None):
        with pytest.raises(FunctionalError, match=r"threshold must be a similarity in \[-1, 1\]"):
            cluster_filters(s, threshold=bad)
    with pytest.raises(FunctionalError, match="k must be between 1"):
        cluster_filters(s, k=8)
    with pytest.raises(FunctionalError, match="k_range"):
        cluster_filters(s, method="kmeans", k_range=(1, 3))
    with pytest.raises(FunctionalError, match="method"):
        cluster_filters(s, method="dbscan")
    with pytest.raises(FunctionalError, match="square"):
        cluster_filters(torch.ones(2, 3))
    with pytest.raises(FunctionalError, match="NaN"):
        cluster_filters(torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]))
    with pytest.raises(FunctionalError):
        keep_representatives(FilterClusters(torch.tensor([0, 1]), "kmeans"), torch.ones(3))


# --------------------------------------------------------------------------- pruning


def test_functional_pruning_against_magnitude_at_the_same_macs(vgg, data, tmp_path):
    snap = snapshot(vgg.model)
    fop = functional_prune(vgg.model, "features.0,features.4", data["probe_x"][:64],
                           data["probe_y"][:64], preset=vgg.preset, threshold=0.8)
    counts = fop.removed_counts()
    assert set(counts) == {"features.0", "features.4"} and all(n > 0 for n in counts.values())
    for name, lp in fop.layers.items():
        assert int(lp.keep.sum()) == lp.clusters.n_clusters  # one representative per cluster
        assert len(lp.removed) == counts[name]
    mag = magnitude_masks(vgg.model, counts)
    assert {k: int((~v).sum()) for k, v in mag.items()} == counts
    cmp = compare_pruning(vgg.model, {"functional": fop.masks(), "magnitude": mag},
                          preset=vgg.preset, eval_images=data["eval_x"],
                          eval_labels=data["eval_y"], train_images=data["train_x"],
                          train_labels=data["train_y"], max_train_images=128,
                          finetune_epochs=1, finetune_lr=0.005)
    assert_unchanged(vgg.model, snap)
    rows = {r["method"]: r for r in cmp.rows}
    assert {r["fold"] for r in cmp.rows} == {"lstsq"}  # the default: refit the next layers
    assert cmp.settings["fold_images"] == 600  # the first (up to 1,000) training images
    assert rows["functional"]["macs_after"] == rows["magnitude"]["macs_after"]
    assert rows["functional"]["params_after"] == rows["magnitude"]["params_after"]
    assert 0 < rows["functional"]["macs_removed"] < 1
    for r in rows.values():
        assert 0 <= r["accuracy_pruned"] <= 1 and 0 <= r["accuracy_finetuned"] <= 1
    small = cmp.pruned["functional"].module
    assert small.features[4].out_channels == 64 - counts["features.4"]
    files = fop.save(tmp_path)
    assert files["clusters_csv"].exists() and (tmp_path / "clusters_features.4.png").exists()
    cmp.save_csv(tmp_path / "comparison.csv")
    with (tmp_path / "comparison.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == 2


def test_keep_rules_and_cka_route(vgg, data):
    fop = functional_prune(vgg.model, ["features.0"], data["probe_x"], data["probe_y"],
                           preset=vgg.preset, similarity="cka", method="kmeans", k=8,
                           keep_rule="taylor")
    assert int(fop.masks()["features.0"].sum()) == 8
    assert fop.summary()["settings"]["similarity"] == "cka"
    cp = filter_importance(vgg.model, "features.0", "class_preference",
                           images=data["probe_x"][:16], preset=vgg.preset)
    assert cp.shape == (32,)
    with pytest.raises(FunctionalError, match="keep rule"):
        functional_prune(vgg.model, "features.0", data["probe_x"], keep_rule="biggest",
                         preset=vgg.preset)
    with pytest.raises(FunctionalError, match="labels"):
        filter_importance(vgg.model, "features.0", "taylor", images=data["probe_x"],
                          preset=vgg.preset)
    with pytest.raises(FunctionalError, match="threshold"):
        functional_prune(vgg.model, "features.0", data["probe_x"], threshold=3.0,
                         preset=vgg.preset)
    with pytest.raises(GraphError, match="features.0"):
        functional_prune(vgg.model, "feature.0", data["probe_x"], preset=vgg.preset)
    with pytest.raises(FunctionalError, match="cannot remove"):
        magnitude_masks(vgg.model, {"features.0": 32})


def test_defection_reports_drift_of_every_survivor(vgg, data, tmp_path):
    masks = {"functional": {"features.7": torch.arange(64) % 4 != 0},
             "magnitude": magnitude_masks(vgg.model, {"features.7": 16})}
    snap = snapshot(vgg.model)
    report = defection(vgg.model, masks, data["probe_x"][:32], preset=vgg.preset,
                       settings=[(0.01, 1), (0.001, 1)], train_images=data["train_x"],
                       train_labels=data["train_y"], max_train_images=96,
                       eval_images=data["eval_x"][:64], eval_labels=data["eval_y"][:64])
    assert_unchanged(vgg.model, snap)
    assert len(report.rows) == 2 * 2 * 48 * 2  # methods × settings × survivors × descriptors
    assert {r["filter"] for r in report.rows if r["method"] == "functional"} == {
        f for f in range(64) if f % 4}
    assert all(-1 <= r["cosine"] <= 1 + 1e-9 for r in report.rows)
    summary = report.summary()
    assert len(summary) == 2 * 2 * 2
    for s in summary:
        assert -1 <= s["mean_cosine_relative"] <= 1 and -1 <= s["mean_cosine_vs_original"] <= 1
        assert s["filters"] == 48 and s["undefined"] >= 0
    assert len(report.runs) == 4 and report.runs[0]["accuracy_after"] is not None
    report.save_csv(tmp_path / "d.csv")
    report.plot(tmp_path / "d.png")
    assert (tmp_path / "d.png").stat().st_size > 10_000
    with pytest.raises(FunctionalError, match="setting"):
        defection(vgg.model, masks, data["probe_x"], preset=vgg.preset, settings=[(0.0, 1)])
