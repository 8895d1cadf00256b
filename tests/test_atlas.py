"""The atlas without Ray (``workers=0``): rows equal direct API calls, the store resumes
without duplicates, SQL answers equal a Python filter, pages hold every unit, bad input is a
clear error. Ray itself is exercised in test_atlas_ray.py."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

pytest.importorskip("pyarrow")
pytest.importorskip("duckdb")

from _state import assert_unchanged, snapshot

from netcarve.atlas import AtlasConfig, AtlasError, AtlasStore, atlas_query, run_atlas
from netcarve.atlas.run import select_units
from netcarve.circuits.circuit import Circuit
from netcarve.circuits.keep_search import find_keep
from netcarve.core.graph import GraphError
from netcarve.training.evaluation import analysis_data, reference_data
from netcarve.zoo import load_model

LAYER = "features.4"
CONFIG = AtlasConfig(featureviz_steps=8, examples=3, goal=0.9)


@pytest.fixture(scope="module")
def setup():
    lm = load_model("fmnist_vgg")
    s, h = analysis_data(lm.preset, 64, 64)
    x, y = reference_data(lm.preset, "test", 100)
    return lm, s, h, x, y


def _run(setup, out, units="0,1,2", config=CONFIG, **kw):
    lm, s, h, x, y = setup
    return run_atlas(lm.model, LAYER, out, s, h, units=units, config=config, car_images=x,
                     car_labels=y, preset=lm.preset, model_name="fmnist_vgg", workers=0,
                     progress=False, **kw)


@pytest.fixture(scope="module")
def atlas(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("atlas")
    lm = setup[0]
    snap = snapshot(lm.model)
    run = _run(setup, out)
    assert_unchanged(lm.model, snap)
    return out, run


def test_select_units():
    assert select_units(5, "all") == [0, 1, 2, 3, 4]
    assert select_units(10, "3,1,3") == [1, 3]
    drawn = select_units(64, 8, seed=1)
    assert drawn == select_units(64, "8", seed=1) == sorted(drawn)
    assert len(set(drawn)) == 8 and all(0 <= u < 64 for u in drawn)
    assert drawn != select_units(64, 8, seed=2)
    with pytest.raises(AtlasError, match=r"0\.\.9"):
        select_units(10, "4,12")
    with pytest.raises(AtlasError, match="1..10"):
        select_units(10, 11)
    with pytest.raises(AtlasError, match="'all', a count"):
        select_units(10, "some")


def test_rows_equal_the_keep_search_run_directly(setup, atlas):
    lm, s, h, _, _ = setup
    out, run = atlas
    assert (run.mapped, run.skipped, run.failed, run.classes) == (3, 0, [], [LAYER])
    rows = AtlasStore(out).rows()
    assert [(r["layer"], r["unit"]) for r in rows] == [(LAYER, 0), (LAYER, 1), (LAYER, 2)]
    for row in rows:
        direct = find_keep(lm.model, f"{LAYER}:{row['unit']}", s, heldout=h, goal=0.9)
        assert row["keep"] == pytest.approx(direct.keep, rel=1e-12)
        assert row["kept_kernels"] == direct.circuit.kept_kernels
        assert row["pearson"] == pytest.approx(direct.circuit.preservation.pearson, abs=1e-6)
        assert row["reached"] == direct.reached
        assert len(row["curve"]) == direct.evaluations
        assert row["effective_keep"] == pytest.approx(
            row["kept_kernels"] / row["relevant_kernels"])
        assert sum(p["kept"] for p in row["per_layer"]) == row["kept_kernels"]
        # the comparison holds every criterion at 0.5x, 1x, 2x the keep found
        crits = {c["criterion"] for c in row["comparison"]}
        assert crits == {"actgrad", "snip", "magnitude", "random"}
        at_keep = [c for c in row["comparison"]
                   if c["criterion"] == "actgrad" and math.isclose(c["keep"], row["keep"])]
        assert at_keep[0]["pearson"] == pytest.approx(row["pearson"], abs=1e-6)
        assert len(row["top_images"]) == 3
        assert row["top_values"] == sorted(row["top_values"], reverse=True)
        folder = out / "units" / LAYER / f"{row['unit']:05d}"
        for name in ("circuit.safetensors", "featureviz.png", "examples.png", "diagram.html",
                     "index.html"):
            assert (folder / name).stat().st_size > 0, name
        circuit = Circuit.load(folder / "circuit.safetensors")
        assert circuit.kept_kernels == row["kept_kernels"]
        assert str(circuit.target) == row["target"]


def test_classes_are_the_layers_classwise_car(setup, atlas):
    from netcarve.car.scores import car_scores

    lm, _, _, x, y = setup
    out, _ = atlas
    classes = AtlasStore(out).classes()
    report = car_scores(lm.model, x, y, [LAYER], preset=lm.preset)
    lc = report.layers[LAYER]
    most = report.classwise(LAYER).most_important(3)
    assert len(classes) == 64  # every filter of the layer, not only the atlas's units
    for i, f in enumerate(lc.filters):
        row = classes[(LAYER, f)]
        assert row["car"] == pytest.approx(float(lc.car[i]), abs=1e-12)
        assert row["most_important"] == most[f]
    meta = json.loads((out / "atlas.json").read_text())
    assert meta["class_names"] == list(lm.preset.class_names)


def test_query_answers_equal_a_python_filter(atlas):
    out, _ = atlas
    rows = AtlasStore(out).rows()
    cut = sorted(r["effective_keep"] for r in rows)[1] + 1e-9
    q = atlas_query(out, f"SELECT unit, effective_keep, pearson FROM units WHERE layer = "
                         f"'{LAYER}' AND effective_keep < {cut} AND pearson >= 0.9 "
                         "ORDER BY unit")
    expected = [r["unit"] for r in rows if r["effective_keep"] < cut and r["pearson"] >= 0.9]
    assert [r[0] for r in q.rows] == expected and q.columns == ["unit", "effective_keep",
                                                                 "pearson"]
    joined = atlas_query(out, "SELECT unit, most_important FROM atlas ORDER BY unit")
    classes = AtlasStore(out).classes()
    assert [list(r[1]) for r in joined.rows] == [classes[(LAYER, u)]["most_important"]
                                                  for u in (0, 1, 2)]
    assert "unit" in q.text() and "(1 row" in atlas_query(out, "SELECT 1").text()
    with pytest.raises(AtlasError, match="units has columns layer, unit"):
        atlas_query(out, "SELECT nope FROM units")


def test_query_on_a_folder_without_atlas(tmp_path):
    with pytest.raises(AtlasError, match="holds no atlas"):
        atlas_query(tmp_path, "SELECT 1")


def test_resume_skips_done_units_and_redoes_half_written_ones(setup, tmp_path):
    out = tmp_path / "a"
    first = _run(setup, out, units="0,1")
    store = AtlasStore(out)
    before = {u: store.unit_path(LAYER, u).stat().st_mtime_ns for u in (0, 1)}
    # a half-written unit: its files are there, its row is not; plus a stray temporary file
    _run(setup, out, units="0,1,2")
    store.unit_path(LAYER, 2).unlink()
    (store.unit_path(LAYER, 2).parent / "00002.parquet.tmp").write_bytes(b"partial")
    again = _run(setup, out, units="0,1,2,3")
    assert (first.mapped, again.mapped, again.skipped) == (2, 2, 2)
    assert not again.classes  # the layer's classes were stored by the first run
    assert {u: store.unit_path(LAYER, u).stat().st_mtime_ns for u in (0, 1)} == before
    assert not list(out.glob("store/**/*.tmp"))
    q = atlas_query(out, "SELECT count(*), count(DISTINCT unit) FROM units")
    assert q.rows == [(4, 4)]
    # a second layer extends the same atlas
    lm, s, h, x, y = setup
    run_atlas(lm.model, "features.7", out, s, h, units="0,", config=CONFIG, workers=0,
              progress=False, model_name="fmnist_vgg", car_images=x, car_labels=y,
              preset=lm.preset)
    meta = json.loads((out / "atlas.json").read_text())
    assert meta["layers"] == [LAYER, "features.7"]
    assert [(r["layer"], r["unit"]) for r in store.rows()][-1] == ("features.7", 0)


def test_other_settings_in_the_same_folder_are_refused(setup, tmp_path):
    out = tmp_path / "a"
    _run(setup, out, units="0,")
    with pytest.raises(AtlasError, match=r"other config settings .*'goal': \(0\.9, 0\.8\)"):
        _run(setup, out, units="0,", config=AtlasConfig(featureviz_steps=8, examples=3,
                                                       goal=0.8))


def test_bad_layers_are_clear_errors(setup, tmp_path):
    lm, s, h, _, _ = setup
    with pytest.raises(GraphError, match="features.4"):
        run_atlas(lm.model, "features.44", tmp_path / "a", s, h, units="0,", workers=0)
    linear = next(n for n, m in lm.model.named_modules() if type(m).__name__ == "Linear")
    with pytest.raises(AtlasError, match="linear layer"):
        run_atlas(lm.model, linear, tmp_path / "b", s, h, units="0,", workers=0)
    with pytest.raises(AtlasError, match=r"0\.\.63"):
        run_atlas(lm.model, LAYER, tmp_path / "c", s, h, units="64,", workers=0)
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_pages_list_every_unit_and_load_nothing_from_outside(atlas):
    out, _ = atlas
    index = (out / "index.html").read_text()
    start = index.index('id="atlas-data">') + len('id="atlas-data">')
    data = json.loads(index[start:index.index("</script>", start)])
    assert [d["unit"] for d in data] == [0, 1, 2]
    assert all(d["thumb"].startswith("data:image/png;base64,") for d in data)
    assert all((out / d["page"]).exists() for d in data)
    pages = [index] + [(out / d["page"]).read_text() for d in data]
    for page in pages:
        for attr in ('src="http', "src='http", 'href="http', "url(http", "@import"):
            assert attr not in page


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "netcarve.cli", *args], capture_output=True,
                          text=True, timeout=300, env={**os.environ})


def test_cli_atlas_query_formats_and_errors(atlas, tmp_path):
    out, _ = atlas
    sql = "SELECT unit, keep FROM units ORDER BY unit"
    as_json = _cli("atlas-query", str(out), sql, "--format", "json")
    assert as_json.returncode == 0, as_json.stderr
    assert [r["unit"] for r in json.loads(as_json.stdout)] == [0, 1, 2]
    as_csv = _cli("atlas-query", str(out), sql, "--format", "csv")
    assert as_csv.stdout.splitlines()[0] == "unit,keep" and len(as_csv.stdout.splitlines()) == 4
    bad = _cli("atlas-query", str(out), "SELEC unit")
    assert bad.returncode == 2 and bad.stderr.startswith("error: the query failed")
    bad_units = _cli("atlas", "fmnist_vgg", "--layers", LAYER, "--units", "99",
                     "--workers", "0", "--out", str(tmp_path / "x"))
    assert bad_units.returncode == 2 and "1..64" in bad_units.stderr, bad_units.stderr


def test_without_diagrams_the_pages_say_how_to_draw_one(setup, tmp_path):
    config = AtlasConfig(featureviz_steps=8, examples=3, diagrams=False)
    run = _run(setup, tmp_path / "a", units="1,", config=config)
    folder = tmp_path / "a" / "units" / LAYER / "00001"
    assert run.mapped == 1 and (folder / "circuit.safetensors").exists()
    assert not (folder / "diagram.html").exists()
    page = (folder / "index.html").read_text()
    assert "<iframe" not in page and "netcarve diagram circuit.safetensors" in page
    with pytest.raises(AtlasError, match="'diagrams': \\(False, True\\)"):
        _run(setup, tmp_path / "a", units="1,")  # a resume must keep the settings


def test_a_failing_unit_is_reported_and_retried_by_the_next_run(setup, tmp_path, monkeypatch):
    import netcarve.atlas.run as atlas_run
    from netcarve.circuits.circuit import CircuitError

    real = atlas_run.map_units

    def flaky(model, layer, units, *args, **kwargs):
        if 1 in units:
            raise CircuitError("features.4:1 has no relevant kernels to keep")
        return real(model, layer, units, *args, **kwargs)

    monkeypatch.setattr(atlas_run, "map_units", flaky)
    first = _run(setup, tmp_path / "a", units="0,1,2", task_units=1)
    assert first.mapped == 2
    assert first.failed == [{"layer": LAYER, "unit": 1,
                             "error": "CircuitError: features.4:1 has no relevant kernels to keep"}]
    assert AtlasStore(tmp_path / "a").done_units(LAYER) == {0, 2}
    monkeypatch.setattr(atlas_run, "map_units", real)
    again = _run(setup, tmp_path / "a", units="0,1,2", task_units=1)
    assert (again.mapped, again.skipped, again.failed) == (1, 2, [])
