"""The atlas pages in headless Chromium: the index loads offline, its table sorts and filters,
a unit's page opens with its diagram, and nothing is requested from the network."""

from __future__ import annotations

import pytest

pytest.importorskip("pyarrow")

from test_diagram_browser import ARGS, CHROMIUM

from netcarve.atlas import AtlasConfig, AtlasStore, run_atlas
from netcarve.training.evaluation import analysis_data, reference_data
from netcarve.zoo import load_model

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="needs Debian's chromium at /usr/bin/chromium (make test-deps installs it)")

UNITS = "0,1,2,3,4"


@pytest.fixture(scope="module")
def atlas(tmp_path_factory):
    out = tmp_path_factory.mktemp("atlas")
    lm = load_model("fmnist_vgg")
    s, h = analysis_data(lm.preset, 64, 64)
    x, y = reference_data(lm.preset, "test", 100)
    run_atlas(lm.model, "features.4", out, s, h, units=UNITS,
              config=AtlasConfig(featureviz_steps=8, examples=3), car_images=x, car_labels=y,
              preset=lm.preset, model_name="fmnist_vgg", workers=0, progress=False)
    return out


@pytest.fixture(scope="module")
def page():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        p = browser.new_page(viewport={"width": 1300, "height": 900})
        p.errors, p.outside = [], []
        p.on("pageerror", lambda e: p.errors.append(str(e)))
        p.on("console", lambda m: m.type == "error" and p.errors.append(m.text))

        def route(r):
            if r.request.url.startswith(("file:", "data:")):
                r.continue_()
            else:
                p.outside.append(r.request.url)
                r.abort()

        p.route("**/*", route)
        yield p
        browser.close()


def _units(page) -> list[int]:
    return page.eval_on_selector_all("#units tbody tr",
                                     "rows => rows.map(r => +r.dataset.unit.split(':')[1])")


def _column(page, index: int) -> list[float]:
    return page.eval_on_selector_all(
        "#units tbody tr", f"rows => rows.map(r => parseFloat(r.cells[{index}].textContent))")


def test_index_sorts_filters_and_opens_unit_pages(atlas, page):
    rows = {r["unit"]: r for r in AtlasStore(atlas).rows()}
    page.goto((atlas / "index.html").as_uri())
    assert _units(page) == [0, 1, 2, 3, 4]
    assert page.text_content("#count") == "5 of 5 units"
    header = page.locator("#units th", has_text="held-out r")
    r_col = 5
    header.click()
    ascending = sorted(rows, key=lambda u: (rows[u]["pearson"], u))
    assert _units(page) == ascending
    assert _column(page, r_col) == sorted(_column(page, r_col))
    header.click()
    assert _column(page, r_col) == sorted(_column(page, r_col), reverse=True)
    # numeric filter: held-out r >= a threshold between the units' values
    cut = sorted(r["pearson"] for r in rows.values())[2]
    page.fill("#min-r", f"{cut:.6f}")
    expected = sorted(u for u, r in rows.items() if r["pearson"] >= float(f"{cut:.6f}"))
    assert sorted(_units(page)) == expected
    page.fill("#min-r", "")
    page.fill("#filter", "features.4:3")
    assert _units(page) == [3]
    page.fill("#filter", "")
    assert len(_units(page)) == 5
    # a unit's page opens with its diagram
    page.click("#units tbody tr[data-unit='features.4:2'] a")
    page.wait_for_load_state()
    assert page.url.endswith("units/features.4/00002/index.html")
    assert page.text_content("h1") == "features.4:2"
    frame = page.frame_locator("iframe")
    frame.locator("svg").first.wait_for()
    diagram = next(f for f in page.frames if f.url.endswith("diagram.html"))
    diagram.wait_for_function("window.netcarveDiagram && window.netcarveDiagram.ready")
    assert page.locator("img[src='featureviz.png']").evaluate("i => i.naturalWidth") > 0
    assert page.locator("img[src='examples.png']").evaluate("i => i.naturalWidth") > 0
    page.click("text=← atlas")
    page.wait_for_load_state()
    assert len(_units(page)) == 5
    assert page.errors == [] and page.outside == []
