"""Circuit diagrams: the JSON graph and its schema, layout, SVG/PNG/HTML output, safety, CLI."""

from __future__ import annotations

import copy
import itertools
import json
import random
import re
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from _nets import make
from click.testing import CliRunner
from PIL import Image
from torch import nn

from netcarve.circuits.circuit import Circuit
from netcarve.circuits.extract import extract
from netcarve.cli.diagram import diagram
from netcarve.core.errors import NetcarveError
from netcarve.core.graph import ModelGraph
from netcarve.core.targets import Target
from netcarve.data import make_shapes
from netcarve.diagram import (
    DiagramError,
    circuit_to_json,
    compose,
    compute_geometry,
    default_pictures,
    dump_diagram_json,
    load_diagram_json,
    load_schema,
    order_columns,
    render_diagram,
    render_html,
    render_png,
    render_svg,
    validate_diagram,
    write_diagram,
)
from netcarve.diagram.graph_json import synthetic_diagram
from netcarve.diagram.layout import count_crossings
from netcarve.diagram.pictures import NodePicture, png_data_uri
from netcarve.training.evaluation import analysis_data
from netcarve.zoo import Preset, load_model

SVG = "{http://www.w3.org/2000/svg}"


def hand_circuit(model, graph, spec, keep, seed=0, input_shape=None, name=None):
    """A circuit built by hand: random scores, a random subset of the relevant kernels."""
    gen = torch.Generator().manual_seed(seed)
    target = Target.parse(spec).resolve(graph)
    relevant = graph.relevant_kernels(target.layer, target.channels)
    scores = {n: torch.rand(r.shape, generator=gen) * r for n, r in relevant.items()}
    raw = {n: (torch.rand(r.shape, generator=gen) < keep) & r for n, r in relevant.items()}
    masks, collapsed = graph.effective_mask(raw, target.layer, target.channels)
    metadata = {"input_shape": list(input_shape or graph.input_shape)}
    if name:
        metadata["model"] = name
    return Circuit(target=target, criterion="random", keep=keep, masks=masks, scores=scores,
                   relevant=relevant, selected=sum(int(m.sum()) for m in raw.values()),
                   collapsed=collapsed, metadata=metadata)


@pytest.fixture(scope="module")
def shapes():
    """shapes_cnn, 48 normalised images, a hand-built circuit of features.8:5."""
    lm = load_model("shapes_cnn")
    x, _ = make_shapes(48, seed=3, size=32)
    x = lm.preset.normalize(x)
    graph = ModelGraph.build(lm.model, x[:1])
    circuit = hand_circuit(lm.model, graph, "features.8:5", 0.08, name="shapes_cnn")
    data = circuit_to_json(circuit, lm.model, graph=graph, images=x, preset=lm.preset,
                           top_k=3)
    return lm, x, graph, circuit, data


# ---------------------------------------------------------------------------- JSON graph


def test_json_lists_every_kept_kernel_with_its_weights_score_and_sign(shapes):
    lm, _, graph, circuit, data = shapes
    edges = data["edges"]
    kept = {(n, o, j) for n, m in circuit.masks.items() for o, j in torch.nonzero(m).tolist()}
    assert {(e["layer"], *e["kernel"]) for e in edges} == kept
    assert len(edges) == len(kept) == data["metrics"]["kept_kernels"]  # sequential: 1 source
    params = dict(lm.model.named_parameters())
    modules = dict(lm.model.named_modules())
    for e in edges:
        o, j = e["kernel"]
        w = params[graph.layers[e["layer"]].weight_param][o, j]
        np.testing.assert_allclose(e["weights"], w.tolist(), rtol=1e-3, atol=1e-6)
        assert e["score"] == pytest.approx(float(circuit.scores[e["layer"]][o, j]), rel=1e-5)
        bn = modules[graph.bn_after[e["layer"]][0]]
        scale = bn.weight[o] / torch.sqrt(bn.running_var[o] + bn.eps)
        assert e["sign"] == int(torch.sign(w.sum() * scale))
        assert e["target"] == f"{e['layer']}:{o}" and e["kept"] is True
    assert {e["sign"] for e in edges} == {-1, 1}


def test_json_nodes_columns_and_pictures(shapes):
    _, _, _, circuit, data = shapes
    nodes = {n["id"]: n for n in data["nodes"]}
    assert [lay["name"] for lay in data["layers"]] == [None, "features.0", "features.4",
                                                       "features.8"]
    assert {f"input:{c}" for c in range(3)} <= set(nodes)
    assert data["target"]["nodes"] == ["features.8:5"]
    assert nodes["features.8:5"]["role"] == "target"
    ends = {e["source"] for e in data["edges"]} | {e["target"] for e in data["edges"]}
    assert set(nodes) == ends | {f"input:{c}" for c in range(3)} | {"features.8:5"}
    for n in data["nodes"]:
        assert n["picture"].startswith("data:image/png;base64,")
        kind = {None: "input", "features.0": "kernel"}.get(n["layer"], "dataset-example")
        assert n["picture_kind"] == kind
        if n["layer"] is not None:
            assert 1 <= len(n["examples"]) <= 3
            acts = [ex["activation"] for ex in n["examples"]]
            assert acts == sorted(acts, reverse=True)
        rel = circuit.relevant.get(n["layer"])
        if rel is not None:  # filter score = sum over the node's relevant kernels
            want = float(circuit.scores[n["layer"]][n["channel"]][rel[n["channel"]]].sum())
            assert n["score"] == pytest.approx(want, rel=1e-5)
    # a first-layer RGB kernel picture really is the kernel (mid-grey = 0)
    first = next(n for n in data["nodes"] if n["layer"] == "features.0")
    img = Image.open(_png_bytes(first["picture"]))
    assert img.mode == "RGB" and img.size[0] >= 32
    slots = {(n["column"], n["order"]) for n in data["nodes"]}
    assert len(slots) == len(data["nodes"])


def _png_bytes(uri):
    import base64
    import io

    return io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))


def test_json_roundtrip_and_provenance(shapes, tmp_path):
    _, _, _, _, data = shapes
    path = dump_diagram_json(data, tmp_path / "d.json")
    assert load_diagram_json(path) == data
    assert data["format"] == "netcarve-diagram" and data["version"] == 1
    assert data["model"]["name"] == "shapes_cnn"
    assert data["metrics"]["preservation"] is None
    assert data["provenance"]["input_shape"] == [3, 32, 32]
    assert data["layout"]["crossings"] <= data["layout"]["crossings_initial"]


def test_extracted_fmnist_circuit_becomes_a_diagram():
    lm = load_model("fmnist_vgg")
    scoring, heldout = analysis_data(lm.preset, 100, 100)
    c = extract(lm.model, "features.7:3", scoring, heldout=heldout, keep=0.1)
    c.metadata["model"] = "fmnist_vgg"
    data = circuit_to_json(c, lm.model, images=scoring[:40], preset=lm.preset, top_k=2)
    assert data["title"] == "Circuit of features.7:3 in fmnist_vgg"
    assert data["metrics"]["kept_kernels"] == c.kept_kernels == len(data["edges"])
    assert data["metrics"]["preservation"]["pearson"] == pytest.approx(c.preservation.pearson,
                                                                       abs=1e-5)
    assert data["metrics"]["preservation"]["n_images"] == 100
    first = next(n for n in data["nodes"] if n["layer"] == "features.0")
    assert first["picture_kind"] == "kernel"
    assert Image.open(_png_bytes(first["picture"])).mode == "L"  # greyscale kernel
    assert len(data["edges"][0]["weights"]) == 3 and len(data["edges"][0]["weights"][0]) == 3


@pytest.mark.parametrize("net_name", ["plain", "resnet", "cat", "group", "conv1d"])
def test_every_architecture_gives_a_valid_diagram(net_name):
    net, x = make(net_name)
    graph = ModelGraph.build(net, x[:1])
    last = list(graph.layers)[-1]
    circuit = hand_circuit(net, graph, f"{last}:0", 0.6, seed=1)
    images = x if x.dim() == 4 else None
    data = circuit_to_json(circuit, net, graph=graph, images=images, top_k=1)
    nodes = {n["id"] for n in data["nodes"]}
    alive = {n: m.any(dim=1) for n, m in circuit.masks.items()}
    # one edge per kept kernel and alive source of its input channel (several via a sum)
    want = 0
    for name, mask in circuit.masks.items():
        ks = graph.kernel_sources(name)
        for o, j in torch.nonzero(mask).tolist():
            i = int(ks[o, j])
            for link in graph.links[name]:
                for s_ch, i_ch in zip(link.source_channels.tolist(), link.input_channels.tolist(),
                                      strict=True):
                    if i_ch == i and (link.source is None or bool(alive[link.source][s_ch])):
                        want += 1
    assert len(data["edges"]) == want
    assert all(e["source"] in nodes and e["target"] in nodes for e in data["edges"])
    if net_name == "resnet":  # residual sums: some kernels are drawn from two sources
        per_kernel = {}
        for e in data["edges"]:
            key = (e["layer"], *e["kernel"])
            per_kernel[key] = per_kernel.get(key, 0) + 1
        assert max(per_kernel.values()) >= 2
    if net_name == "plain":  # Linear after a 2×2 map: the kernel is that 2×2 block
        fc = next(e for e in data["edges"] if e["layer"] == "classifier.1")
        assert np.array(fc["weights"]).shape == (2, 2)
    if net_name == "conv1d":
        assert np.array(data["edges"][0]["weights"]).shape[0] == 1
    render_svg(data)
    render_html(data)


def test_pruned_edges_are_optional_and_flagged(shapes):
    lm, _, graph, circuit, data = shapes
    with_pruned = circuit_to_json(circuit, lm.model, graph=graph, pictures=False,
                                  pruned_edges=True)
    pruned = [e for e in with_pruned["edges"] if not e["kept"]]
    assert pruned and len(with_pruned["edges"]) == len(data["edges"]) + len(pruned)
    ids = {n["id"] for n in with_pruned["nodes"]}
    assert ids == {n["id"] for n in data["nodes"]}
    for e in pruned:
        assert not circuit.masks[e["layer"]][tuple(e["kernel"])]
        assert circuit.relevant[e["layer"]][tuple(e["kernel"])]
    assert all(n["picture"] is None for n in with_pruned["nodes"])
    assert "pruned kernel" in render_svg(with_pruned)


def test_negative_batchnorm_scale_flips_the_sign():
    net, x = make("plain")
    graph = ModelGraph.build(net, x[:1])
    circuit = hand_circuit(net, graph, "features.4:0", 1.0)
    before = circuit_to_json(circuit, net, graph=graph, pictures=False)
    with torch.no_grad():
        net.features[1].weight.neg_()
    after = circuit_to_json(circuit, net, graph=graph, pictures=False)
    for e0, e1 in zip(before["edges"], after["edges"], strict=True):
        if e0["layer"] == "features.0":
            assert e1["sign"] == -e0["sign"] != 0
        else:
            assert e1["sign"] == e0["sign"]


def test_collapsed_and_direction_targets():
    net, x = make("plain")
    graph = ModelGraph.build(net, x[:1])
    circuit = hand_circuit(net, graph, "features.4:2", 0.5)
    circuit.masks = {n: torch.zeros_like(m) for n, m in circuit.masks.items()}
    circuit.collapsed = True
    data = circuit_to_json(circuit, net, graph=graph, pictures=False)
    assert data["edges"] == [] and data["metrics"]["collapsed"] is True
    assert [n["id"] for n in data["nodes"]] == ["input:0", "input:1", "input:2",
                                                "features.4:2"]
    assert not any(n["kept"] for n in data["nodes"])
    assert "TOTAL COLLAPSE" in render_svg(data)

    direction = Target.from_direction("features.4", [0.0, 1.0, -2.0, 0.0, 0.0, 0.5])
    circuit.target = direction.resolve(graph)
    rel = graph.relevant_kernels("features.4", circuit.target.channels)
    circuit.relevant, circuit.scores = rel, {n: torch.ones(r.shape) for n, r in rel.items()}
    circuit.masks, circuit.collapsed = graph.effective_mask(rel, "features.4",
                                                            circuit.target.channels)
    data = circuit_to_json(circuit, net, graph=graph, pictures=False)
    assert data["target"]["nodes"] == ["features.4:1", "features.4:2", "features.4:5"]
    assert data["target"]["direction"] == [0.0, 1.0, -2.0, 0.0, 0.0, 0.5]
    assert data["title"].startswith("Circuit of features.4:direction")
    assert sum(n["role"] == "target" for n in data["nodes"]) == 3


def test_picture_providers_are_pluggable(shapes):
    lm, x, graph, circuit, _ = shapes
    calls = []

    def featureviz(request):
        calls.append(len(request.nodes))
        return {n.id: NodePicture(np.full((4, 4), 0.5), "feature-visualisation")
                for n in request.nodes if n.layer == "features.4"}

    data = circuit_to_json(circuit, lm.model, graph=graph, images=x[:16], preset=lm.preset,
                           pictures=compose(featureviz, default_pictures(top_k=2)))
    kinds = {n["layer"]: n["picture_kind"] for n in data["nodes"]}
    assert kinds == {None: "input", "features.0": "kernel",
                     "features.4": "feature-visualisation", "features.8": "dataset-example"}
    four = [n for n in data["nodes"] if n["layer"] == "features.4"]
    assert all(len(n["examples"]) == 2 for n in four)  # examples still come from the data
    assert calls == [len(data["nodes"])]


def test_png_data_uri_enlarges_small_pictures():
    img = Image.open(_png_bytes(png_data_uri(np.eye(3))))
    assert img.size == (33, 33) and img.mode == "L"
    with pytest.raises(ValueError):
        png_data_uri(np.zeros((2, 2, 2)))


# ---------------------------------------------------------------------------- validation


def test_schema_is_versioned_and_checks_itself():
    schema = load_schema()
    assert schema["properties"]["version"] == {"const": 1}
    assert schema["$id"].startswith("netcarve-diagram-1")
    jsonschema = pytest.importorskip("jsonschema", reason="cross-check with jsonschema")
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(synthetic_diagram(30, 60), schema)


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d.pop("nodes"), "missing required field 'nodes'"),
    (lambda d: d.update(version=2), "upgrade netcarve"),
    (lambda d: d.update(version=True), "must be 1"),
    (lambda d: d.update(colour="red"), "unknown field"),
    (lambda d: d["nodes"][0].update(score="high"), r"\$\.nodes\[0\]\.score"),
    (lambda d: d["nodes"][1].update(id=d["nodes"][0]["id"]), "duplicate node id"),
    (lambda d: d["nodes"][0].update(picture="javascript:alert(1)"), "allowed forms"),
    (lambda d: d["edges"][0].update(source="nowhere:1"), "unknown node"),
    (lambda d: d["edges"][0].update(sign=2), "must be one of"),
    (lambda d: d["edges"][0].update(weights=[]), "at least 1"),
    (lambda d: d["edges"][0].update(source=d["edges"][0]["target"],
                                    target=d["edges"][0]["source"]), "must go right"),
    (lambda d: d["layers"][1].update(column=5), "must be 1"),
    (lambda d: d["nodes"][1].update(order=d["nodes"][0]["order"]), "share column"),
    (lambda d: d["metrics"].update(keep=1.5), "above the maximum"),
    (lambda d: d["target"].update(nodes=["ghost:0"]), "unknown node"),
])
def test_validation_rejects_bad_documents(mutate, message):
    data = synthetic_diagram(20, 40, seed=2)
    validate_diagram(copy.deepcopy(data))
    bad = copy.deepcopy(data)
    mutate(bad)
    with pytest.raises(DiagramError, match=message):
        validate_diagram(bad)


def test_loading_rejects_files_that_are_not_diagrams(tmp_path):
    with pytest.raises(DiagramError, match="not found"):
        load_diagram_json(tmp_path / "missing.json")
    p = tmp_path / "nan.json"
    text = json.dumps(synthetic_diagram(12, 20)).replace('"keep": 0.1', '"keep": NaN')
    p.write_text(text)
    with pytest.raises(DiagramError, match="not valid JSON"):
        load_diagram_json(p)
    p.write_text("[1, 2")
    with pytest.raises(DiagramError, match="not valid JSON"):
        load_diagram_json(p)
    p.write_text("[]")
    with pytest.raises(DiagramError, match="expected object"):
        load_diagram_json(p)


# ---------------------------------------------------------------------------- layout


def _brute_crossings(columns, edges):
    col = {n: c for c, cs in enumerate(columns) for n in cs}
    pos = {n: k - (len(cs) - 1) / 2 for cs in columns for k, n in enumerate(cs)}
    total = 0
    for (a, b, _), (c, d, _) in itertools.combinations(edges, 2):
        if (col[a], col[b]) != (col[c], col[d]):
            continue
        if (pos[a] - pos[c]) * (pos[b] - pos[d]) < 0:
            total += 1
    return total


def test_crossing_count_matches_brute_force():
    rng = random.Random(0)
    for _ in range(20):
        columns = [[f"{c}:{k}" for k in range(rng.randint(1, 6))] for c in range(4)]
        edges = []
        for _ in range(rng.randint(0, 30)):
            c = rng.randrange(3)
            t = c + (2 if c < 2 and rng.random() < 0.2 else 1)
            edges.append((rng.choice(columns[c]), rng.choice(columns[t]), 1.0))
        assert count_crossings(columns, edges) == _brute_crossings(columns, edges)


def test_order_columns_untangles_a_permutation():
    n = 12
    perm = random.Random(1).sample(range(n), n)
    columns = [[f"a{k}" for k in range(n)], [f"b{k}" for k in range(n)],
               [f"c{k}" for k in range(n)]]
    edges = [(f"a{k}", f"b{perm[k]}", 1.0) for k in range(n)]
    edges += [(f"b{k}", f"c{perm[k]}", 1.0) for k in range(n)]
    ordered, before, after = order_columns(columns, edges, fixed=(0,))
    assert before > 20 and after == 0
    assert ordered[0] == columns[0]  # the fixed column keeps its order
    assert sorted(ordered[1]) == sorted(columns[1])


def test_layout_reduces_crossings_on_random_graphs():
    data = synthetic_diagram(120, 600, seed=4)
    assert data["layout"]["crossings"] < 0.85 * data["layout"]["crossings_initial"]


def test_geometry_keeps_nodes_apart_and_inside_the_canvas():
    data = synthetic_diagram(300, 3000, seed=5)
    geo = compute_geometry(data)
    assert len(geo.x) == len(data["nodes"])
    assert min(geo.x) - geo.node_size / 2 > 0 and max(geo.x) + geo.node_size / 2 < geo.width
    assert min(geo.y) - geo.node_size / 2 > geo.header and max(geo.y) < geo.height
    by_col = {}
    for n, y in zip(data["nodes"], geo.y, strict=True):
        by_col.setdefault(n["column"], []).append((n["order"], y))
    for ys in by_col.values():
        ys.sort()
        assert all(b[1] - a[1] >= geo.node_size for a, b in itertools.pairwise(ys))


# ---------------------------------------------------------------------------- renderers


def test_svg_draws_every_node_and_edge(shapes, tmp_path):
    _, _, _, _, data = shapes
    text = render_svg(data, tmp_path / "d.svg")
    root = ET.fromstring(text.encode())
    paths = root.findall(f".//{SVG}path")
    images = root.findall(f".//{SVG}image")
    assert len(paths) == len(data["edges"])
    assert len(images) == sum(1 for n in data["nodes"] if n["picture"])
    colours = {p.get("stroke") for p in paths}
    assert colours == {"#c8102e", "#1f5fbf"}
    widths = sorted(float(p.get("stroke-width")) for p in paths)
    assert widths[0] < widths[-1]  # sized by score
    texts = [t.text for t in root.iter(f"{SVG}text")]
    assert data["title"] in texts and "excitatory (+)" in texts and "inhibitory (−)" in texts
    assert any("keep 0.08" in (t or "") for t in texts)
    assert "features.8" in texts and "target" in texts


def test_png_is_written_at_print_resolution(shapes, tmp_path):
    _, _, _, _, data = shapes
    path = render_png(data, tmp_path / "d.png")
    geo = compute_geometry(data)
    img = Image.open(path)
    assert img.size == (round(geo.width * 2), round(geo.height * 2))
    arr = np.asarray(img.convert("RGB")).astype(int)
    red = ((arr[..., 0] > 150) & (arr[..., 1] < 90) & (arr[..., 2] < 110)).sum()
    blue = ((arr[..., 2] > 150) & (arr[..., 0] < 90)).sum()
    assert red > 100 and blue > 100  # both edge colours are drawn


def test_html_is_self_contained(shapes, tmp_path):
    _, _, _, _, data = shapes
    page = render_html(data, tmp_path / "d.html")
    assert page.startswith("<!DOCTYPE html>")
    assert "default-src 'none'" in page
    for bad in ("<link", "@import", 'src="http', "src='http", "url(http", "fetch(",
                "XMLHttpRequest", "innerHTML", "outerHTML", "insertAdjacentHTML",
                "document.write", "eval("):
        assert bad not in page, bad
    urls = set(re.findall(r"https?://[^\s\"'<>)]+", page))
    assert urls == {"http://www.w3.org/2000/svg"}  # a namespace name, never fetched
    payload = _payload(page)
    assert payload["graph"] == data
    assert len(payload["layout"]["x"]) == len(data["nodes"])


def _payload(page):
    m = re.search(r'<script type="application/json" id="netcarve-data">(.*?)</script>', page,
                  re.S)
    assert m and "<" not in m.group(1)
    return json.loads(m.group(1))


def test_100_node_diagram_with_pictures_is_under_5_mb(tmp_path):
    lm = load_model("shapes_cnn")
    x, _ = make_shapes(64, seed=7, size=32)
    x = lm.preset.normalize(x)
    graph = ModelGraph.build(lm.model, x[:1])
    circuit = hand_circuit(lm.model, graph, "features.8:1", 1.0, name="shapes_cnn")
    gen = torch.Generator().manual_seed(3)
    keep0 = torch.rand(48, generator=gen) < 0.85  # ~100 channels, ~15% of kernels between
    keep4 = torch.rand(64, generator=gen) < 0.85
    raw = {"features.0": circuit.relevant["features.0"] & keep0[:, None],
           "features.4": circuit.relevant["features.4"] & keep4[:, None] & keep0[None, :]
           & (torch.rand(64, 48, generator=gen) < 0.15),
           "features.8": circuit.relevant["features.8"] & keep4[None, :]}
    circuit.masks, _ = graph.effective_mask(raw, "features.8", [1])
    files = write_diagram(circuit, lm.model, tmp_path, "html,json", graph=graph, images=x,
                          preset=lm.preset)
    data = load_diagram_json(files["json"])
    n_nodes = len(data["nodes"])
    assert 95 <= n_nodes <= 120
    assert all(n["picture"] for n in data["nodes"])
    assert sum(len(n["examples"]) for n in data["nodes"]) >= 4 * (n_nodes - 4)
    size = files["html"].stat().st_size
    print(f"\n100-node diagram: {n_nodes} nodes, {len(data['edges'])} edges, "
          f"HTML {size / 1e6:.2f} MB")
    assert size < 5_000_000


# ---------------------------------------------------------------------------- safety

HOSTILE_LAYER = "<img src=x onerror=alert(1)></script><b>&amp;"
HOSTILE_CLASS = "</script><script>alert('\"x\"')</script>\u2028&lt;"


class HostileNet(nn.Module):
    """A conv whose module name is markup, then a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.add_module(HOSTILE_LAYER, nn.Conv2d(3, 4, 3, padding=1))
        self.head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(4, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(getattr(self, HOSTILE_LAYER)(x))


def hostile_diagram():
    torch.manual_seed(0)
    net = HostileNet().eval()
    x = torch.randn(8, 3, 6, 6)
    graph = ModelGraph.build(net, x[:1])
    preset = Preset(6, 3, (0.5,) * 3, (0.25,) * 3, (HOSTILE_CLASS, "b"))
    circuit = hand_circuit(net, graph, "head.3:0", 1.0)
    data = circuit_to_json(circuit, net, graph=graph, images=x, preset=preset,
                           model_name='"><svg onload=alert(2)>')
    # quotes cannot be module names for torch.fx; put them in the JSON directly too
    data["layers"][1]["name"] = HOSTILE_LAYER + "\"'"
    return data


def test_hostile_names_are_text_in_json_svg_and_html(tmp_path):
    data = hostile_diagram()
    assert data["model"]["class_names"][0] == HOSTILE_CLASS
    target = next(n for n in data["nodes"] if n["role"] == "target")
    assert target["label"] == f"head.3:0 ({HOSTILE_CLASS})"
    assert HOSTILE_CLASS in data["title"] and "<svg onload" in data["title"]
    files = render_diagram(data, tmp_path, "svg,html,json,png")
    svg_root = ET.parse(files["svg"]).getroot()  # well-formed despite the names
    texts = [t.text for t in svg_root.iter(f"{SVG}text")]
    assert data["title"] in texts and HOSTILE_LAYER + "\"'" in texts
    assert not svg_root.findall(f".//{SVG}script") and not svg_root.findall(".//img")
    page = files["html"].read_text()
    for raw in (HOSTILE_LAYER, "<svg onload", "</script><script>", "\u2028"):
        assert raw not in page, raw
    assert page.count("</script>") == 2  # ours only: the data script and the code script
    assert "<title>Circuit of head.3:0 in &quot;&gt;&lt;svg onload" in page
    assert _payload(page)["graph"] == data
    assert load_diagram_json(files["json"]) == data


# ---------------------------------------------------------------------------- API and CLI


def test_write_diagram_writes_only_the_requested_formats(shapes, tmp_path):
    lm, _, graph, circuit, _ = shapes
    files = write_diagram(circuit, lm.model, tmp_path, ["svg", "json"], graph=graph,
                          pictures=False)
    assert sorted(files) == ["json", "svg"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["diagram.json", "diagram.svg"]
    with pytest.raises(NetcarveError, match="unknown diagram format 'pdf'"):
        write_diagram(circuit, lm.model, tmp_path, "svg,pdf", graph=graph)


def test_circuit_from_another_model_is_refused(shapes):
    _, _, _, circuit, _ = shapes
    other = load_model("fmnist_vgg").model
    with pytest.raises(DiagramError, match="wrong model|lacks"):
        circuit_to_json(circuit, other, graph=ModelGraph.build(other, torch.zeros(1, 1, 28, 28)))


def test_cli_draws_a_circuit_file(tmp_path):
    lm = load_model("fmnist_vgg")
    graph = ModelGraph.build(lm.model, torch.zeros(1, 1, 28, 28))
    circuit = hand_circuit(lm.model, graph, "features.4:7", 0.05, name="fmnist_vgg")
    circuit.save(tmp_path / "circuit.safetensors")
    runner = CliRunner()
    out = tmp_path / "out"
    res = runner.invoke(diagram, [str(tmp_path / "circuit.safetensors"), "--out", str(out),
                                  "--images", "30", "--examples", "2", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert sorted(summary["files"]) == ["html", "json", "png", "svg"]
    data = load_diagram_json(out / "diagram.json")
    assert summary["nodes"] == len(data["nodes"]) and summary["edges"] == len(data["edges"])
    assert data["model"]["name"] == "fmnist_vgg"
    assert all(len(n["examples"]) == 2 for n in data["nodes"] if n["layer"])

    again = runner.invoke(diagram, [str(out / "diagram.json"), "--out", str(tmp_path / "re"),
                                    "--format", "svg"])
    assert again.exit_code == 0, again.output
    assert (tmp_path / "re" / "diagram.svg").read_text() == (out / "diagram.svg").read_text()

    bad = runner.invoke(diagram, [str(tmp_path / "circuit.safetensors"), "--out", str(out),
                                  "--format", "gif"])
    assert bad.exit_code == 2 and "unknown diagram format" in bad.output

    del circuit.metadata["model"]
    circuit.save(tmp_path / "anon.safetensors")
    anon = runner.invoke(diagram, [str(tmp_path / "anon.safetensors"), "--out", str(out)])
    assert anon.exit_code == 2 and "pass --model" in anon.output
    ok = runner.invoke(diagram, [str(tmp_path / "anon.safetensors"), "--out", str(out),
                                 "--model", "fmnist_vgg", "--no-pictures", "--format", "json"])
    assert ok.exit_code == 0, ok.output
    circuit.metadata["model_fingerprint"] = "0123456789abcdef"
    circuit.save(tmp_path / "other.safetensors")
    warn = runner.invoke(diagram, [str(tmp_path / "other.safetensors"), "--out", str(out),
                                   "--model", "fmnist_vgg", "--images", "0", "--format", "svg"])
    assert warn.exit_code == 0 and "fingerprint mismatch" in warn.stderr

    broken = tmp_path / "broken.json"
    broken.write_text('{"format": "netcarve-diagram", "version": 1}')
    res = runner.invoke(diagram, [str(broken), "--out", str(out)])
    assert res.exit_code == 3 and "missing required field" in res.output
