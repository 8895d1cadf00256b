"""The diagram JSON: a circuit as a versioned, validated graph of channels and kernels.

:func:`circuit_to_json` builds it from a circuit and its model; :func:`validate_diagram`
checks a dict against ``schema.json`` (a JSON Schema, draft 2020-12, shipped with the package)
and against the rules a schema cannot express (unique ids, edges between existing nodes,
columns that match the layers); :func:`load_diagram_json` reads and validates a file. The
format is documented in ``docs/diagram-format.md``.

What is drawn:

* **columns**: the model input, then every layer of the circuit that has a drawn node, in
  execution (topological) order; the target layer is last.
* **nodes**: every channel of the model input (at most 16; beyond that only used ones), every
  layer channel with a kept kernel into it or out of it, and the target channel(s).
* **edges**: one per kept kernel ``(o, j)`` of a layer and per *alive* source channel feeding
  its input channel ``i`` (usually one; several when the input channel is a residual sum).
  With ``pruned_edges=True`` the relevant but pruned kernels between drawn nodes are added
  with ``kept: false``.
* **score**: an edge's score is the circuit's score of its kernel (at filter granularity, the
  score of the filter it enters). A node's ``score`` is its filter score: the sum of the scores
  of all its relevant kernels (None for image channels); ``score_in``/``score_out`` sum its
  drawn kept edges.
* **sign**: ``sign(Σ weights · s)``, where ``s`` is the product of the scales
  ``γ / √(running_var + ε)`` of the BatchNorm modules right after the layer (1 without
  BatchNorm). It tells whether a uniform positive input on the source channel raises
  (``+1``, excitatory) or lowers (``-1``, inhibitory) the target channel after its
  normalisation; ``0`` when the sum is exactly zero.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from netcarve._version import __version__
from netcarve.core.graph import ModelGraph
from netcarve.data.preset import Preset
from netcarve.diagram.format import (
    FORMAT,
    FORMAT_VERSION,
    MAX_INPUT_NODES,
    SIGN_RULE,
    DiagramError,
    validate_diagram,
)

from .layout import order_columns
from .pictures import NodeRef, PictureProvider, default_pictures, pictures_for, png_data_uri

__all__ = ["circuit_to_json", "synthetic_diagram"]


# --------------------------------------------------------------------------- building


def _num(value: float, digits: int = 6) -> float:
    """Finite float rounded to ``digits`` significant digits (non-finite → 0.0)."""
    v = float(value)
    if not math.isfinite(v):
        return 0.0
    return float(f"{v:.{digits}g}")


def _jsonable(value: Any) -> Any:
    """Best-effort conversion of metadata to JSON (non-finite floats become None)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    return str(value)


def _preservation(p: Any) -> dict[str, Any] | None:
    if p is None:
        return None

    def fin(v: Any) -> float | None:
        return None if v is None or not math.isfinite(float(v)) else _num(v)

    return {"pearson": fin(p.pearson), "nmad": fin(p.nmad),
            "per_image_median": fin(p.per_image_median), "n_images": int(p.n_images)}


def _kernel_2d(weight: torch.Tensor, kind: str, o: int, j: int, spatial: int) -> torch.Tensor:
    """The 2-D picture of kernel (o, j): conv taps, or a Linear block as its input map."""
    if kind == "linear":
        block = weight[o, j * spatial:(j + 1) * spatial]
        side = math.isqrt(spatial)
        return block.reshape(side, side) if side * side == spatial else block.reshape(1, -1)
    w = weight[o, j]
    if w.dim() == 1:
        return w.reshape(1, -1)
    while w.dim() > 2:
        w = w.sum(dim=0)
    return w.reshape(1, 1) if w.dim() == 0 else w


def _bn_scales(model: nn.Module, graph: ModelGraph, layer: str) -> torch.Tensor | None:
    names = graph.bn_after.get(layer, [])
    if not names:
        return None
    modules = dict(model.named_modules())
    scale = torch.ones(graph.layers[layer].out_channels, dtype=torch.float64)
    for name in names:
        bn = modules.get(name)
        if bn is None:
            continue
        s = torch.ones_like(scale)
        if getattr(bn, "weight", None) is not None:
            s = s * bn.weight.detach().double().cpu()
        var = getattr(bn, "running_var", None)
        if var is not None:
            s = s / torch.sqrt(var.detach().double().cpu() + bn.eps)
        scale = scale * s
    return scale


def _input_sources(graph: ModelGraph, layer: str) -> dict[int, list[tuple[str | None, int]]]:
    """Input channel → its sources ``(source layer or None, channel)``."""
    out: dict[int, list[tuple[str | None, int]]] = {}
    for link in graph.links[layer]:
        for s_ch, i_ch in zip(link.source_channels.tolist(), link.input_channels.tolist(),
                              strict=True):
            out.setdefault(i_ch, []).append((link.source, s_ch))
    return out


def _kernel_scores(scores: dict[str, torch.Tensor], layer: str,
                   shape: tuple[int, int]) -> torch.Tensor:
    s = scores.get(layer)
    if s is None:
        return torch.zeros(shape, dtype=torch.float64)
    s = s.detach().double().cpu()
    if s.dim() == 1:  # filter granularity: every kernel gets its filter's score
        s = s[:, None].expand(shape)
    return torch.nan_to_num(s.reshape(shape), nan=0.0, posinf=0.0, neginf=0.0)


def _class_names(preset: Preset | None, graph: ModelGraph, layer: str) -> tuple[str, ...]:
    """Class names when ``layer`` is the classifier output (last Linear, one unit per class)."""
    if preset is None or not preset.class_names:
        return ()
    linears = [n for n, info in graph.layers.items() if info.kind == "linear"]
    if linears and linears[-1] == layer \
            and graph.layers[layer].out_channels == len(preset.class_names):
        return tuple(str(c) for c in preset.class_names)
    return ()


def circuit_to_json(
    circuit: Any,
    model: nn.Module,
    *,
    graph: ModelGraph | None = None,
    images: torch.Tensor | None = None,
    preset: Preset | None = None,
    pictures: PictureProvider | bool | None = True,
    model_name: str | None = None,
    title: str | None = None,
    pruned_edges: bool = False,
    top_k: int = 4,
) -> dict[str, Any]:
    """Build the diagram JSON of a circuit.

    Args:
        circuit: a :class:`~netcarve.circuits.circuit.Circuit` (its ``target``, ``masks``,
            ``scores``, ``relevant``, ``criterion``, ``keep``, ``collapsed``,
            ``preservation`` and ``metadata`` are read).
        model: the model the circuit was extracted from (weights give kernel pictures,
            weights and signs; it is not modified).
        graph: its :class:`~netcarve.core.graph.ModelGraph` (``circuit.graph_for(model)`` when
            omitted: built from the circuit's ``metadata["input_shape"]``).
        images: normalised images ``[N, C, H, W]`` for data-set example pictures.
        preset: the images' preset (display colours; class names of logit targets).
        pictures: True for :func:`~netcarve.diagram.pictures.default_pictures`, a provider
            of your own, or False/None for no pictures.
        model_name: shown in the title (default: ``circuit.metadata["model"]``).
        title: the diagram's title (default: ``"Circuit of <target> in <model>"``).
        pruned_edges: also list relevant but pruned kernels between drawn nodes
            (``kept: false``).
        top_k: data-set examples per node with the default pictures.

    Returns:
        A dict that passes :func:`validate_diagram`.

    Raises:
        DiagramError: the circuit does not fit the model (unknown layer, wrong mask shape).
        CircuitError: no graph given and the circuit's metadata lacks ``input_shape``.

    Example:
        >>> data = circuit_to_json(circuit, lm.model, images=x, preset=lm.preset)  # doctest: +SKIP
        >>> len(data["nodes"]), len(data["edges"])  # doctest: +SKIP
        (61, 214)
    """
    graph = graph or circuit.graph_for(model)
    target = circuit.target
    metadata = dict(getattr(circuit, "metadata", None) or {})
    model_name = model_name if model_name is not None else metadata.get("model")
    masks = {n: m.detach().cpu().bool() for n, m in circuit.masks.items()}
    for name, mask in masks.items():
        if name not in graph.layers:
            raise DiagramError(f"the circuit names layer {name!r}, which this model lacks: "
                               "is it the model the circuit was extracted from?")
        if tuple(mask.shape) != graph.layers[name].mask_shape:
            raise DiagramError(f"mask of {name} has shape {tuple(mask.shape)} but the model's "
                               f"layer needs {graph.layers[name].mask_shape}: wrong model?")
    if target.layer not in graph.layers:
        raise DiagramError(f"target layer {target.layer!r} is not a layer of this model")
    n_out = graph.layers[target.layer].out_channels
    if target.direction is not None and target.direction.numel() != n_out:
        raise DiagramError(f"the circuit's target direction has {target.direction.numel()} "
                           f"entries but {target.layer} has {n_out} channels: wrong model?")
    if any(not 0 <= c < n_out for c in target.channels):
        raise DiagramError(f"the circuit's target channels {target.channels} are outside "
                           f"{target.layer}'s 0..{n_out - 1}: wrong model?")
    relevant = {n: r.detach().cpu().bool() for n, r in circuit.relevant.items()}
    layer_order = [n for n in graph.layers if n in masks or n == target.layer]
    alive = {n: masks[n].any(dim=1) if n in masks else
             torch.zeros(graph.layers[n].out_channels, dtype=torch.bool) for n in layer_order}
    params = dict(model.named_parameters())
    in_channels = graph.input_shape[0] if graph.input_shape else 1
    layer_names = set(graph.layers)
    prefix = "input"
    while any(n == prefix for n in layer_names):
        prefix = "model-" + prefix

    def node_id(layer: str | None, ch: int) -> str:
        return f"{prefix}:{ch}" if layer is None else f"{layer}:{ch}"

    # ---- edges (kept kernels, one per alive source of their input channel)
    kscores = {n: _kernel_scores(circuit.scores, n, graph.layers[n].mask_shape)
               for n in layer_order}
    weights = {n: params[graph.layers[n].weight_param].detach().double().cpu()
               for n in layer_order}
    bn_scale = {n: _bn_scales(model, graph, n) for n in layer_order}
    edges: list[dict[str, Any]] = []
    node_keys: dict[str, tuple[str | None, int]] = {}
    pending_pruned: list[tuple[str, int, int, int, list]] = []
    for name in layer_order:
        info = graph.layers[name]
        mask = masks.get(name, torch.zeros(info.mask_shape, dtype=torch.bool))
        sources = _input_sources(graph, name)
        ks = graph.kernel_sources(name)
        kept_list = torch.nonzero(mask).tolist()
        candidates = [(o, j, True) for o, j in kept_list]
        if pruned_edges:
            rel = relevant.get(name, torch.zeros_like(mask))
            candidates += [(o, j, False) for o, j in torch.nonzero(rel & ~mask).tolist()]
        for o, j, kept in candidates:
            i = int(ks[o, j])
            srcs = [(s, c) for s, c in sources.get(i, [])
                    if s is None or (s in alive and bool(alive[s][c]))]
            if not kept:
                pending_pruned.append((name, o, j, i, srcs))
                continue
            for s, c in srcs:
                edges.append(_edge(node_id(s, c), node_id(name, o), name, o, j, i,
                                   weights[name], info.kind, info.spatial, kscores[name],
                                   bn_scale[name], True))
                node_keys[node_id(s, c)] = (s, c)
                node_keys[node_id(name, o)] = (name, o)

    # ---- nodes: input channels, endpoints of kept edges, target channels
    n_inputs = in_channels if in_channels <= MAX_INPUT_NODES else 0
    for c in range(n_inputs):
        node_keys.setdefault(node_id(None, c), (None, c))
    target_ids = []
    for c in target.channels:
        node_keys.setdefault(node_id(target.layer, c), (target.layer, c))
        target_ids.append(node_id(target.layer, c))
    for name, o, j, i, srcs in pending_pruned:
        info = graph.layers[name]
        if node_id(name, o) not in node_keys:
            continue
        for s, c in srcs:
            if node_id(s, c) in node_keys:
                edges.append(_edge(node_id(s, c), node_id(name, o), name, o, j, i,
                                   weights[name], info.kind, info.spatial, kscores[name],
                                   bn_scale[name], False))

    drawn_layers = {layer for layer, _ in node_keys.values()}
    columns_layers: list[str | None] = [None] + [n for n in layer_order if n in drawn_layers]
    column_of = {name: c for c, name in enumerate(columns_layers)}
    columns: list[list[str]] = [[] for _ in columns_layers]
    for nid, (layer, _ch) in sorted(node_keys.items(),
                                    key=lambda kv: (column_of[kv[1][0]], kv[1][1])):
        columns[column_of[layer]].append(nid)
    kept_edges = [(e["source"], e["target"], abs(e["score"])) for e in edges if e["kept"]]
    ordered, before, after = order_columns(columns, kept_edges, fixed=(0,))
    order = {nid: k for col in ordered for k, nid in enumerate(col)}

    score_in: dict[str, float] = {}
    score_out: dict[str, float] = {}
    for e in edges:
        if e["kept"]:
            score_in[e["target"]] = score_in.get(e["target"], 0.0) + e["score"]
            score_out[e["source"]] = score_out.get(e["source"], 0.0) + e["score"]

    # ---- pictures
    refs = [NodeRef(nid, layer, ch) for nid, (layer, ch) in node_keys.items()]
    provider = default_pictures(top_k) if pictures is True else (pictures or None)
    pics = pictures_for(provider, model, graph, refs, images, preset) if provider else {}

    target_set = set(target_ids)
    classes = _class_names(preset, graph, target.layer)
    nodes: list[dict[str, Any]] = []
    for nid, (layer, ch) in sorted(node_keys.items(),
                                   key=lambda kv: (column_of[kv[1][0]], order[kv[0]])):
        role = "input" if layer is None else ("target" if nid in target_set else "hidden")
        if layer is None:
            score = None
            kept = nid in score_out
        else:
            s = kscores[layer][ch]
            rel = relevant.get(layer)
            score = _num(float(s[rel[ch]].sum()) if rel is not None else float(s.sum()))
            kept = bool(alive[layer][ch]) if layer in alive else False
        label = nid
        if layer is not None and layer == target.layer and classes and ch < len(classes):
            label = f"{nid} ({classes[ch]})"
        pic = pics.get(nid)
        scale = bn_scale.get(layer) if layer is not None else None
        nodes.append({
            "id": nid,
            "layer": layer,
            "channel": int(ch),
            "column": column_of[layer],
            "order": order[nid],
            "role": role,
            "label": label,
            "score": score,
            "score_in": _num(score_in.get(nid, 0.0)),
            "score_out": _num(score_out.get(nid, 0.0)),
            "bn_scale": None if scale is None else _num(float(scale[ch])),
            "kept": kept,
            "picture": None if pic is None else png_data_uri(pic.image),
            "picture_kind": None if pic is None else pic.kind,
            "examples": [] if pic is None else [
                {"picture": png_data_uri(ex.image),
                 "activation": None if ex.activation is None else _num(ex.activation, 4)}
                for ex in pic.examples],
        })

    layers_json: list[dict[str, Any]] = []
    for c, name in enumerate(columns_layers):
        n_nodes = len(columns[c])
        if name is None:
            layers_json.append({"name": None, "kind": "input", "column": 0, "in_channels": 0,
                                "out_channels": max(in_channels, 1), "groups": 1,
                                "kernel_shape": None, "nodes": n_nodes, "relevant_kernels": 0,
                                "kept_kernels": 0})
            continue
        info = graph.layers[name]
        w = params[info.weight_param]
        kshape = list(w.shape[2:]) if info.kind == "conv" else None
        layers_json.append({
            "name": name, "kind": info.kind, "column": c,
            "in_channels": info.in_channels, "out_channels": info.out_channels,
            "groups": info.groups, "kernel_shape": kshape or None, "nodes": n_nodes,
            "relevant_kernels": int(relevant[name].sum()) if name in relevant else 0,
            "kept_kernels": int(masks[name].sum()) if name in masks else 0,
        })

    relevant_total = sum(int(r.sum()) for r in relevant.values())
    kept_total = sum(int(m.sum()) for m in masks.values())
    max_score = max((abs(e["score"]) for e in edges), default=0.0)
    spec = str(target)
    default_title = f"Circuit of {spec}" + (f" in {model_name}" if model_name else "")
    if classes and target.channel is not None and target.channel < len(classes):
        default_title += f" (class {classes[target.channel]})"
    data: dict[str, Any] = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "generator": {"name": "netcarve", "version": __version__},
        "title": title if title is not None else default_title,
        "model": {
            "name": model_name,
            "fingerprint": metadata.get("model_fingerprint"),
            "input_shape": [int(v) for v in graph.input_shape],
        },
        "target": {
            "spec": spec,
            "layer": target.layer,
            "channels": [int(c) for c in target.channels],
            "position": None if target.position is None else [int(v) for v in target.position],
            "direction": None if target.direction is None
            else [_num(v) for v in target.direction.tolist()],
            "objective": target.objective if isinstance(target.objective, str) else "custom",
            "nodes": target_ids,
        },
        "metrics": {
            "criterion": str(circuit.criterion),
            "keep": _num(circuit.keep),
            "granularity": str(metadata.get("granularity", "kernel")),
            "relevant_kernels": relevant_total,
            "kept_kernels": kept_total,
            "effective_keep": _num(kept_total / max(relevant_total, 1)),
            "collapsed": bool(circuit.collapsed),
            "preservation": _preservation(getattr(circuit, "preservation", None)),
            "preservation_scoring": _preservation(getattr(circuit, "preservation_scoring",
                                                          None)),
            "max_edge_score": _num(max_score),
            "sign_rule": SIGN_RULE,
        },
        "layers": layers_json,
        "nodes": nodes,
        "edges": edges,
        "layout": {"crossings": after, "crossings_initial": before,
                   "method": "barycentre sweeps + adjacent transpositions"},
        "provenance": _jsonable({k: v for k, v in metadata.items() if k != "model"}),
    }
    if classes:
        data["model"]["class_names"] = list(classes)
    return validate_diagram(data)


def _edge(source: str, target: str, layer: str, o: int, j: int, i: int, weight: torch.Tensor,
          kind: str, spatial: int, scores: torch.Tensor, scale: torch.Tensor | None,
          kept: bool) -> dict[str, Any]:
    k2 = _kernel_2d(weight, kind, o, j, spatial)
    wsum = float(k2.sum())
    gain = wsum * (float(scale[o]) if scale is not None else 1.0)
    return {
        "source": source,
        "target": target,
        "layer": layer,
        "kernel": [int(o), int(j)],
        "input_channel": int(i),
        "weights": [[_num(v, 4) for v in row] for row in k2.tolist()],
        "score": _num(float(scores[o, j])),
        "sign": (gain > 0) - (gain < 0),
        "weight_sum": _num(wsum),
        "kept": kept,
    }


def synthetic_diagram(n_nodes: int = 300, n_edges: int = 3000, *, n_layers: int = 5,
                      seed: int = 0, order: bool = True) -> dict[str, Any]:
    """A random but valid diagram, for benchmarks and renderer tests (no model needed).

    Three input channels, then ``n_layers`` conv layers sharing the remaining nodes; edges
    join consecutive columns (about one in ten skips a column, like a residual path), with
    log-normal scores, random signs and random 3×3 kernels. No pictures.

    Args:
        n_nodes: total nodes (at least ``n_layers + 3``).
        n_edges: total edges.
        n_layers: layer columns after the input column.
        seed: random seed.
        order: run :func:`~netcarve.diagram.layout.order_columns` (else channel order).

    Returns:
        A diagram dict that passes :func:`validate_diagram`.

    Example:
        >>> d = synthetic_diagram(40, 120, seed=1)
        >>> len(d["nodes"]), len(d["edges"])
        (40, 120)
    """
    import random

    if n_nodes < n_layers + 3:
        raise ValueError(f"need at least {n_layers + 3} nodes for {n_layers} layers")
    rng = random.Random(seed)
    sizes = [3] + [(n_nodes - 3) // n_layers + (1 if k < (n_nodes - 3) % n_layers else 0)
                   for k in range(n_layers)]
    names: list[str | None] = [None] + [f"features.{3 * k}" for k in range(n_layers)]
    ids = [[f"input:{c}" if k == 0 else f"{names[k]}:{c}" for c in range(n)]
           for k, n in enumerate(sizes)]
    edges = []
    for _ in range(n_edges):
        t_col = rng.randrange(1, len(sizes))
        s_col = t_col - 2 if t_col >= 2 and rng.random() < 0.1 else t_col - 1
        o, i = rng.randrange(sizes[t_col]), rng.randrange(sizes[s_col])
        sign = rng.choice((-1, 1))
        weights = [[round(sign * abs(rng.gauss(0, 0.1)) + rng.gauss(0, 0.02), 4)
                    for _ in range(3)] for _ in range(3)]
        edges.append({
            "source": ids[s_col][i], "target": ids[t_col][o], "layer": names[t_col],
            "kernel": [o, i], "input_channel": i, "weights": weights,
            "score": round(rng.lognormvariate(-3, 1), 6), "sign": sign,
            "weight_sum": round(sum(map(sum, weights)), 6), "kept": True,
        })
    columns = [list(col) for col in ids]
    before = after = 0
    if order:
        columns, before, after = order_columns(
            columns, [(e["source"], e["target"], e["score"]) for e in edges], fixed=(0,))
    nodes = []
    for c, col in enumerate(columns):
        for k, nid in enumerate(col):
            ch = int(nid.rsplit(":", 1)[1])
            role = "input" if c == 0 else ("target" if c == len(columns) - 1 and ch == 0
                                           else "hidden")
            nodes.append({
                "id": nid, "layer": names[c], "channel": ch, "column": c, "order": k,
                "role": role, "label": nid, "score": None if c == 0 else round(rng.random(), 4),
                "score_in": 0.0, "score_out": 0.0, "kept": True, "picture": None,
                "picture_kind": None, "examples": [],
            })
    s_in: dict[str, float] = {}
    s_out: dict[str, float] = {}
    for e in edges:
        s_in[e["target"]] = s_in.get(e["target"], 0.0) + e["score"]
        s_out[e["source"]] = s_out.get(e["source"], 0.0) + e["score"]
    for n in nodes:
        n["score_in"] = round(s_in.get(n["id"], 0.0), 6)
        n["score_out"] = round(s_out.get(n["id"], 0.0), 6)
    target_id = f"{names[-1]}:0"
    data = {
        "format": FORMAT, "version": FORMAT_VERSION,
        "generator": {"name": "netcarve", "version": __version__},
        "title": f"Synthetic diagram: {n_nodes} nodes, {n_edges} edges",
        "model": {"name": None, "fingerprint": None, "input_shape": [3, 32, 32]},
        "target": {"spec": target_id, "layer": names[-1], "channels": [0], "position": None,
                   "objective": "sum_abs", "nodes": [target_id]},
        "metrics": {"criterion": "synthetic", "keep": 0.1, "relevant_kernels": n_edges * 10,
                    "kept_kernels": n_edges, "effective_keep": 0.1, "collapsed": False,
                    "preservation": None, "max_edge_score": max(e["score"] for e in edges),
                    "sign_rule": SIGN_RULE},
        "layers": [{"name": names[k], "kind": "input" if k == 0 else "conv", "column": k,
                    "in_channels": 0 if k == 0 else sizes[k - 1], "out_channels": sizes[k],
                    "nodes": sizes[k], "relevant_kernels": 0,
                    "kept_kernels": sum(1 for e in edges if e["layer"] == names[k])}
                   for k in range(len(sizes))],
        "nodes": nodes,
        "edges": edges,
        "layout": {"crossings": after, "crossings_initial": before},
    }
    return validate_diagram(data)
