"""The demo page (quick mode): every section, figure and link is produced and resolves."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from netcarve.reproduce.demo import run_demo


@pytest.mark.slow
def test_quick_demo_writes_every_section_and_linked_file(tmp_path: Path):
    messages: list[str] = []
    index = run_demo(tmp_path / "demo", progress=False, log=messages.append, quick=True)
    assert index == tmp_path / "demo" / "index.html"
    assert [m[:5] for m in messages[:7]] == [f"[{i}/7]" for i in range(1, 8)]
    page = index.read_text()
    for heading in ("Model zoo", "Circuit of fmnist_vgg unit features.11:8",
                    "Sub-feature circuits", "Criteria sweep",
                    "Class-wise CAR of fmnist_vgg features.7",
                    "Atlas of fmnist_vgg features.11 (4 units)", "Time per step"):
        assert f"<h2>{heading}" in page, heading
    targets = re.findall(r'(?:href|src)="([^"#]+)"', page)
    assert len(targets) >= 15
    for target in targets:
        assert (index.parent / target).is_file(), target

    # the headline circuit's keep was chosen by keep search and reaches its goal
    circuit = json.loads((index.parent / "circuit" / "summary.json").read_text())
    search = circuit["keep_search"]
    assert search["reached"] and search["goal"] == 0.8 and search["search_on"] == "scoring"
    assert circuit["keep"] == pytest.approx(search["keep"])
    assert circuit["preservation_scoring"]["pearson"] >= 0.8
    assert "keep chosen by keep search" in page

    # the atlas section links a browsable atlas of the units it lists
    assert (index.parent / "atlas" / "index.html").is_file()
    assert len(list((index.parent / "atlas" / "store" / "units").glob("*/*.parquet"))) == 4

    # the diagram's nodes carry feature visualisations; first-layer nodes their kernels
    diagram = json.loads((index.parent / "circuit" / "diagram.json").read_text())
    kinds: dict[str, set[str]] = {}
    for node in diagram["nodes"]:
        kinds.setdefault(node["layer"], set()).add(node["picture_kind"])
    assert "feature-visualisation" in kinds["features.7"]
    assert kinds["features.0"] == {"kernel"}

    # sub-circuits next to their control: random groups of the same sizes, same measurements
    sub = json.loads((index.parent / "subcircuits" / "summary.json").read_text())
    assert sub["control"]["method"] == "given"
    assert ([s["images"] for s in sub["control"]["subcircuits"]]
            == [s["images"] for s in sub["subcircuits"]])
    for key, part in (("k-means", sub), ("random (control)", sub["control"])):
        diffs = [s["own_group"]["pearson"] - s["other_groups"][0]["pearson"]
                 for s in part["subcircuits"]]
        assert sub["own_group_advantage"][key] == pytest.approx(sum(diffs) / 2, abs=1e-9)
    assert "random (control) group 0" in page
    test = sub["heldout_test"]
    assert len(test["random"]) == 4 and test["ci_low"] <= test["double_difference"]
    assert "Held-out test: the k-means grouping" in page

    car = json.loads((index.parent / "car" / "summary.json").read_text())
    rows = car["classwise"]["filters"]
    assert len(rows) == 64 and len(car["classwise"]["classes"]) == 10
    assert all(len(r["class_car"]) == 10 for r in rows)
