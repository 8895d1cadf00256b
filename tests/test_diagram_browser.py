"""The interactive diagram in a real headless browser (Debian's chromium via Playwright).

Skipped only when ``/usr/bin/chromium`` is absent (``make test`` installs it). Set
``NETCARVE_TEST_ARTIFACTS=<folder>`` to keep the screenshots.
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
from pathlib import Path

import pytest

from netcarve.circuits.extract import extract
from netcarve.diagram import circuit_to_json, render_html
from netcarve.diagram.graph_json import synthetic_diagram
from netcarve.training.evaluation import analysis_data
from netcarve.zoo import load_model

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="needs Debian's chromium at /usr/bin/chromium (make test-deps installs it)",
)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()


class Page:
    """A page that records script errors, dialogs and any attempt to leave the file."""

    def __init__(self, browser, path: Path, viewport=(1400, 900)) -> None:
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.requests: list[str] = []
        self.page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        self.page.route("**/*", self._route)
        self.page.goto(path.as_uri())
        self.page.wait_for_function("window.netcarveDiagram && window.netcarveDiagram.ready")

    def _route(self, route) -> None:
        url = route.request.url
        if url.startswith(("file:", "data:")):
            route.continue_()
        else:
            self.requests.append(url)
            route.abort()

    def visible(self, selector: str) -> list[int]:
        return self.page.eval_on_selector_all(
            selector, "els => els.filter(e => getComputedStyle(e).display !== 'none')"
                      ".map(e => +e.getAttribute('data-i')).sort((a, b) => a - b)")

    def settle(self) -> None:
        """Wait two animation frames (updates are applied on the next frame)."""
        self.page.evaluate("() => new Promise(r => requestAnimationFrame(() => "
                           "requestAnimationFrame(r)))")


def paths_through(data: dict, i: int, threshold: float = float("-inf")):
    """Edges and nodes on a path through node i, computed from the JSON alone."""
    index = {n["id"]: k for k, n in enumerate(data["nodes"])}
    ends = [(index[e["source"]], index[e["target"]]) for e in data["edges"]]
    ok = [e["kept"] and abs(e["score"]) >= threshold for e in data["edges"]]
    edges, nodes = set(), {i}
    for forward in (False, True):
        seen, stack = {i}, [i]
        while stack:
            v = stack.pop()
            for k, (s, t) in enumerate(ends):
                a, b = (s, t) if forward else (t, s)
                if ok[k] and a == v:
                    edges.add(k)
                    if b not in seen:
                        seen.add(b)
                        nodes.add(b)
                        stack.append(b)
    return sorted(edges), sorted(nodes)


def keep_artifact(path: Path) -> None:
    folder = os.environ.get("NETCARVE_TEST_ARTIFACTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(folder) / path.name)


@pytest.fixture(scope="module")
def real_diagram(tmp_path_factory):
    lm = load_model("fmnist_vgg")
    scoring, heldout = analysis_data(lm.preset, 100, 100)
    circuit = extract(lm.model, "features.7:3", scoring, heldout=heldout, keep=0.1)
    circuit.metadata["model"] = "fmnist_vgg"
    data = circuit_to_json(circuit, lm.model, images=scoring[:60], preset=lm.preset)
    path = tmp_path_factory.mktemp("browser") / "diagram.html"
    render_html(data, path)
    return data, path


def test_real_circuit_in_the_browser(browser, real_diagram, tmp_path):
    data, path = real_diagram
    p = Page(browser, path)
    page = p.page
    edges, nodes = data["edges"], data["nodes"]
    # drawn elements match the JSON
    assert page.locator("path.edge").count() == len(edges)
    assert page.locator("g.node").count() == len(nodes)
    assert page.locator("g.node image").count() == sum(1 for n in nodes if n["picture"])
    assert page.locator("#title").text_content() == data["title"]
    assert page.locator("#edge-count").text_content() == \
        f"showing {len(edges)} of {len(edges)} edges"
    assert p.visible("path.edge") == list(range(len(edges)))
    shot = tmp_path / "diagram-browser.png"
    page.screenshot(path=str(shot))
    keep_artifact(shot)

    # hover on an edge: its kernel as a heat map and its scores
    k = max(range(len(edges)), key=lambda j: abs(edges[j]["score"]))
    page.dispatch_event(f'path.edge[data-i="{k}"]', "pointerover")
    tip = page.locator("#tip")
    assert tip.is_visible()
    assert page.locator("#tip canvas").count() == 1
    assert page.eval_on_selector("#tip canvas", "c => [c.width, c.height]") == [3 * 24, 3 * 24]
    text = tip.text_content()
    assert "rank 1 of" in text and f"{edges[k]['score']:.4g}"[:5] in text
    assert ("excitatory" in text) == (edges[k]["sign"] > 0)

    # hover on a node: its picture large, scores and data-set examples
    mid = next(i for i, n in enumerate(nodes) if n["layer"] == "features.4")
    page.hover(f'g.node[data-i="{mid}"]')
    assert page.locator("#tip img.big").count() == 1
    assert page.locator("#tip .examples img").count() == len(nodes[mid]["examples"]) > 0
    assert nodes[mid]["label"] in tip.text_content()
    shot = tmp_path / "diagram-browser-hover.png"
    page.screenshot(path=str(shot))
    keep_artifact(shot)

    # click a node: only its upstream and downstream paths stay visible
    page.click(f'g.node[data-i="{mid}"]')
    p.settle()
    want_edges, want_nodes = paths_through(data, mid)
    assert 0 < len(want_edges) < len(edges)
    assert p.visible("path.edge") == want_edges
    assert p.visible("g.node") == want_nodes
    shot = tmp_path / "diagram-browser-isolated.png"
    page.screenshot(path=str(shot))
    keep_artifact(shot)
    page.keyboard.press("Escape")
    p.settle()
    assert len(p.visible("path.edge")) == len(edges)

    # the slider hides the weakest edges
    page.locator("#slider").fill("600")
    p.settle()
    strengths = sorted(abs(e["score"]) for e in edges)
    threshold = strengths[min(len(edges) - 1, int(600 / 1000 * len(edges)))]
    want = [j for j, e in enumerate(edges) if abs(e["score"]) >= threshold]
    assert p.visible("path.edge") == want
    assert len(want) < 0.5 * len(edges)
    # selection and slider combine
    page.click(f'g.node[data-i="{mid}"]')
    p.settle()
    assert p.visible("path.edge") == paths_through(data, mid, threshold)[0]

    # wheel zooms, R resets view, selection and slider
    before = page.eval_on_selector("#canvas", "e => e.style.transform")
    page.mouse.move(700, 500)
    page.mouse.wheel(0, -400)
    p.settle()
    assert page.eval_on_selector("#canvas", "e => e.style.transform") != before
    page.mouse.move(5, 5)
    page.keyboard.press("r")
    p.settle()
    assert page.eval_on_selector("#canvas", "e => e.style.transform") == before
    assert page.input_value("#slider") == "0"
    assert p.visible("path.edge") == list(range(len(edges)))
    assert p.visible("g.node") == list(range(len(nodes)))
    assert p.errors == [] and p.requests == [] and p.dialogs == []
    page.close()


def test_hostile_names_stay_text_in_the_browser(browser, tmp_path):
    from test_diagram import HOSTILE_CLASS, HOSTILE_LAYER, hostile_diagram

    data = hostile_diagram()
    path = tmp_path / "hostile.html"
    render_html(data, path)
    p = Page(browser, path)
    page = p.page
    page.hover('g.node[data-i="0"]')
    target = next(i for i, n in enumerate(data["nodes"]) if n["role"] == "target")
    page.hover(f'g.node[data-i="{target}"]')
    p.settle()
    assert p.dialogs == [] and p.errors == [] and p.requests == []
    assert page.locator("#title").text_content() == data["title"]
    assert page.title() == data["title"]
    labels = page.eval_on_selector_all("#columns text", "els => els.map(e => e.textContent)")
    assert HOSTILE_LAYER + "\"'" in labels
    assert HOSTILE_CLASS in page.locator("#tip .head").text_content()
    injected = page.evaluate("""() => [
        document.querySelectorAll('img[src="x"], b, svg svg, script:not([id])').length,
        document.querySelectorAll('script').length]""")
    assert injected == [1, 2]  # only our own code script, and the data script
    page.close()


def _time_in_page(page, action: str) -> float:
    """Milliseconds from running ``action`` (JS) to the second animation frame after it."""
    return page.evaluate(f"""() => new Promise(resolve => {{
        const t0 = performance.now();
        {action};
        requestAnimationFrame(() => requestAnimationFrame(() => resolve(performance.now() - t0)));
    }})""")


def _gesture_frames(page, kind: str, frames: int = 24) -> list[float]:
    """Frame intervals (ms) while a wheel zoom or a drag pan runs, one event per frame."""
    return page.evaluate(f"""() => new Promise(resolve => {{
        const stage = document.getElementById('stage');
        const times = [];
        let k = 0, last = performance.now();
        const o = (x, y) => ({{bubbles: true, cancelable: true, button: 0, pointerId: 7,
                              clientX: x, clientY: y}});
        if ('{kind}' === 'drag') stage.dispatchEvent(new PointerEvent('pointerdown', o(500, 400)));
        function step() {{
            const now = performance.now();
            if (k > 0) times.push(now - last);
            last = now;
            if (k++ >= {frames}) {{
                if ('{kind}' === 'drag')
                    stage.dispatchEvent(new PointerEvent('pointerup', o(500, 400)));
                return resolve(times);
            }}
            if ('{kind}' === 'wheel')
                stage.dispatchEvent(new WheelEvent('wheel', {{deltaY: k < {frames} / 2 ? -40 : 40,
                    clientX: 600, clientY: 400, bubbles: true, cancelable: true}}));
            else
                stage.dispatchEvent(new PointerEvent('pointermove', o(500 + 8 * k, 400 + 3 * k)));
            requestAnimationFrame(step);
        }}
        requestAnimationFrame(step);
    }})""")


def test_300_nodes_and_3000_edges_stay_responsive(browser, tmp_path):
    data = synthetic_diagram(300, 3000, seed=0)
    path = tmp_path / "synthetic.html"
    t0 = time.perf_counter()
    render_html(data, path)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    p = Page(browser, path)
    load_s = time.perf_counter() - t0
    page = p.page
    assert page.locator("path.edge").count() == 3000
    assert page.locator("g.node").count() == 300

    slider_ms = []
    for value in (250, 500, 750, 900, 100, 0):
        slider_ms.append(_time_in_page(
            page, f"const s = document.getElementById('slider'); s.value = '{value}'; "
                  "s.dispatchEvent(new Event('input', {bubbles: true}))"))
    assert len(p.visible("path.edge")) == 3000
    apply_ms = page.evaluate("window.netcarveDiagram.lastApplyMs")

    index = {n["id"]: k for k, n in enumerate(data["nodes"])}
    mid = index[next(n["id"] for n in data["nodes"] if n["column"] == 3)]
    click_ms = []
    for _ in range(3):
        for target in (mid, mid):  # select, then deselect
            click_ms.append(_time_in_page(page, f"""
                const r = document.querySelector('g.node[data-i="{target}"] .frame');
                const box = r.getBoundingClientRect();
                const o = {{bubbles: true, button: 0, pointerId: 1,
                           clientX: box.x + box.width / 2, clientY: box.y + box.height / 2}};
                r.dispatchEvent(new PointerEvent('pointerdown', o));
                r.dispatchEvent(new PointerEvent('pointerup', o))"""))
    page.click(f'g.node[data-i="{mid}"]')
    p.settle()
    assert p.visible("path.edge") == paths_through(data, mid)[0]
    page.keyboard.press("Escape")

    zoom_ms = _gesture_frames(page, "wheel")
    pan_ms = _gesture_frames(page, "drag")
    shot = tmp_path / "synthetic-300-3000.png"
    page.screenshot(path=str(shot))
    keep_artifact(shot)
    size = path.stat().st_size
    print(f"\n300 nodes / 3,000 edges: HTML {size / 1e6:.2f} MB built in {build_s:.2f} s, "
          f"opened in {load_s:.2f} s; slider move → painted: median "
          f"{statistics.median(slider_ms):.1f} ms, max {max(slider_ms):.1f} ms "
          f"(visibility update {apply_ms:.1f} ms); click → painted: median "
          f"{statistics.median(click_ms):.1f} ms, max {max(click_ms):.1f} ms; frame interval "
          f"while zooming: median {statistics.median(zoom_ms):.1f} ms (max "
          f"{max(zoom_ms):.1f}), while panning: median {statistics.median(pan_ms):.1f} ms "
          f"(max {max(pan_ms):.1f})")
    assert max(slider_ms) < 500 and max(click_ms) < 500
    assert statistics.median(zoom_ms) < 100 and statistics.median(pan_ms) < 100
    assert size < 5_000_000
    assert p.errors == [] and p.requests == []
    page.close()


def test_empty_and_collapsed_circuits_render(browser, tmp_path):
    data = synthetic_diagram(8, 1, n_layers=2, seed=0)
    data["edges"] = []
    data["metrics"]["collapsed"] = True
    data["metrics"]["max_edge_score"] = 0.0
    path = tmp_path / "empty.html"
    render_html(data, path)
    p = Page(browser, path)
    assert p.page.locator("g.node").count() == 8
    assert "TOTAL COLLAPSE" in p.page.locator("#subtitle").text_content()
    p.page.locator("#slider").fill("500")
    p.page.click('g.node[data-i="4"]')
    p.settle()
    assert p.visible("g.node") == [4]
    assert p.errors == []
    p.page.close()
