"""Sweeps on small nets, and the ranking on the bundled fmnist_vgg: actgrad beats magnitude."""

from __future__ import annotations

import csv
import statistics

import pytest
import torch
from _nets import make

from netcarve.circuits.sweep import COLUMNS, pick_units, sweep
from netcarve.core.graph import ModelGraph
from netcarve.training.evaluation import analysis_data
from netcarve.zoo import load_model


def test_sweep_rows_table_csv_and_plot(tmp_path):
    net, _ = make("plain", double=False)
    x = net.example_input(24)
    g = ModelGraph.build(net, x[:1])
    units = pick_units(g, ["features.0", "features.4"], 2, seed=0)
    assert len(units) == 4 and len({str(u) for u in units}) == 4
    res = sweep(net, units, x[:12], x[12:], criteria=["actgrad", "magnitude", "force"],
                keeps=[0.5, 0.1], graph=g)
    assert len(res.rows) == 4 * 3 * 2
    table = res.table()
    assert set(table) == {"actgrad", "magnitude", "force"}
    assert set(table["actgrad"]) == {0.5, 0.1}
    for crit in table:
        assert res.table("q1")[crit][0.5] <= table[crit][0.5] <= res.table("q3")[crit][0.5]
    rows = list(csv.DictReader(res.write_csv(tmp_path / "s.csv").open()))
    assert len(rows) == 24 and list(rows[0]) == COLUMNS
    png = res.plot(tmp_path / "s.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| keep |" in res.markdown_table()


def test_sweep_over_streams_equals_the_tensor_sweep():
    """DataLoaders for the scoring and held-out images give the tensor sweep's rows (the
    same kernels kept; preservation within float tolerance)."""
    net, _ = make("plain", double=False)
    x = net.example_input(24)
    units = ["features.4:1", "features.0:2"]
    kw = {"criteria": ["actgrad", "snip"], "keeps": [0.5, 0.2]}
    want = sweep(net, units, x[:12], x[12:], **kw)

    def loader(t: torch.Tensor) -> torch.utils.data.DataLoader:
        # one batch, as the tensor sweep scores them: the same sums, so no top-k near-tie
        # can flip between the two
        data = torch.utils.data.TensorDataset(t, torch.zeros(len(t), dtype=torch.int64))
        return torch.utils.data.DataLoader(data, batch_size=len(t))

    got = sweep(net, units, loader(x[:12]), loader(x[12:]), **kw)
    assert len(got.rows) == len(want.rows) == 8
    for a, b in zip(got.rows, want.rows, strict=True):
        assert (a["unit"], a["criterion"], a["keep"], a["kept_kernels"]) == (
            b["unit"], b["criterion"], b["keep"], b["kept_kernels"])
        assert a["pearson"] == pytest.approx(b["pearson"], abs=1e-5)
        assert a["nmad"] == pytest.approx(b["nmad"], abs=1e-5)


@pytest.mark.slow
def test_actgrad_beats_magnitude_at_keep_0_1_on_fmnist_vgg():
    lm = load_model("fmnist_vgg")
    scoring, heldout = analysis_data(lm.preset, 200, 200, seed=0)
    g = ModelGraph.build(lm.model, scoring[:1])
    convs = [n for n, i in g.layers.items() if i.kind == "conv"]
    units = pick_units(g, convs[2:5], 3, seed=1)
    res = sweep(lm.model, units, scoring, heldout, criteria=["actgrad", "magnitude"],
                keeps=[0.1], graph=g)
    by = {c: [r["pearson"] or 0.0 for r in res.rows if r["criterion"] == c]
          for c in ("actgrad", "magnitude")}
    assert statistics.median(by["actgrad"]) > statistics.median(by["magnitude"])
    wins = sum(a > m for a, m in zip(by["actgrad"], by["magnitude"], strict=True))
    assert wins >= len(units) * 2 // 3
    assert torch.isfinite(torch.tensor(by["actgrad"])).all()
