"""Every criterion against a slow, obviously-correct reference written with loops over kernels.

The reference never uses netcarve's hooks: it deep-copies the model, zeroes masked weights by
hand, records each layer's input and raw output with forward hooks that hand the rest of the
network a *clone* of the output (so in-place activations cannot touch the recorded tensor), runs
the whole model, and differentiates the target objective w.r.t. the recorded outputs and the
weights. Kernel maps ``a_oi`` are made one kernel at a time with ``F.conv1d/2d`` on the single
input channel and the single kernel.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import _nets
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from netcarve.core.graph import ModelGraph
from netcarve.core.targets import Target
from netcarve.criteria import ScoringContext, get_criterion
from netcarve.criteria import actgrad as actgrad_module
from netcarve.criteria._forward import layer_grad_batches

RTOL = 1e-5


# ----------------------------------------------------------------------------- the reference


@dataclass
class Record:
    x: torch.Tensor  # layer input
    z: torch.Tensor  # raw output
    g: torch.Tensor  # dL/dz
    gw: torch.Tensor  # dL/dweight


def _weight_mask(mask: torch.Tensor, weight: torch.Tensor, spatial: int) -> torch.Tensor:
    mask = mask.to(weight.dtype)
    if weight.dim() == 2:
        return mask.repeat_interleave(spatial, dim=1)
    return mask.reshape(*mask.shape, *([1] * (weight.dim() - 2)))


def masked_copy(net: nn.Module, graph: ModelGraph,
                masks: dict[str, torch.Tensor] | None) -> nn.Module:
    net = copy.deepcopy(net)
    modules = dict(net.named_modules())
    with torch.no_grad():
        for name, mask in (masks or {}).items():
            w = modules[name].weight
            w.mul_(_weight_mask(mask, w, graph.layers[name].spatial))
    return net


def reference_records(net: nn.Module, graph: ModelGraph, target: Target,
                      batches: list[torch.Tensor], layers: list[str],
                      masks: dict[str, torch.Tensor] | None = None) -> list[dict[str, Record]]:
    """Per batch, per layer: input, raw output, dL/dz and dL/dw (masked weights)."""
    net = masked_copy(net, graph, masks)
    net.eval()
    modules = dict(net.named_modules())
    out = []
    store: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    box: dict[str, torch.Tensor] = {}

    def make(name: str):
        def hook(m, args, o):
            store[name] = (args[0].detach().clone(), o)
            return o.clone()
        return hook

    for xb in batches:
        store.clear()
        box.clear()
        handles = [modules[target.layer].register_forward_hook(
            lambda m, a, o: box.__setitem__("z", o))]
        handles += [modules[n].register_forward_hook(make(n)) for n in layers]
        try:
            net(xb)
        finally:
            for h in handles:
                h.remove()
        loss = target.objective_value(target.response(box["z"]))
        outs = [store[n][1] for n in layers]
        weights = [modules[n].weight for n in layers]
        grads = torch.autograd.grad(loss, outs + weights, allow_unused=True)
        rec = {}
        for k, n in enumerate(layers):
            z = outs[k].detach()
            g = grads[k] if grads[k] is not None else torch.zeros_like(z)
            gw = grads[len(layers) + k]
            gw = gw if gw is not None else torch.zeros_like(weights[k])
            rec[n] = Record(store[n][0], z, g, gw)
        out.append(rec)
    return out


def kernel_map(module: nn.Module, x: torch.Tensor, o: int, j: int, i: int,
               spatial: int) -> torch.Tensor:
    """``a_oi``: input channel ``i`` through kernel ``(o, j)`` alone."""
    w = module.weight
    if isinstance(module, nn.Linear):
        n = x.shape[0]
        return x.reshape(n, -1, spatial)[:, i] @ w.reshape(w.shape[0], -1, spatial)[o, j]
    xi = x[:, i:i + 1]
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[w.dim() - 2]
    padding = module.padding
    if module.padding_mode != "zeros":
        xi = F.pad(xi, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        padding = 0
    return conv(xi, w[o:o + 1, j:j + 1], None, module.stride, padding, module.dilation)[:, 0]


def ref_actgrad(net, graph, records, layers, kernel=True):
    modules = dict(net.named_modules())
    out = {}
    for name in layers:
        info, m = graph.layers[name], modules[name]
        src = graph.kernel_sources(name)
        shape = info.mask_shape if kernel else (info.out_channels,)
        total = torch.zeros(shape, dtype=torch.float64)
        count = 0
        for rec in records:
            r = rec[name]
            count += r.z[:, 0].numel()
            for o in range(info.out_channels):
                if not kernel:
                    total[o] += (r.z[:, o] * r.g[:, o]).abs().sum()
                    continue
                for j in range(info.mask_shape[1]):
                    a = kernel_map(m, r.x, o, j, int(src[o, j]), info.spatial)
                    total[o, j] += (a * r.g[:, o]).abs().sum()
        out[name] = total / count
    return out


def ref_snip(net, graph, records, layers, weights=None):
    modules = dict(net.named_modules())
    out = {}
    for name in layers:
        info = graph.layers[name]
        w = (weights or {}).get(name, modules[name].weight).detach()
        total = torch.zeros(info.mask_shape, dtype=torch.float64)
        for rec in records:
            prod = (w * rec[name].gw).abs()
            for o in range(info.mask_shape[0]):
                for j in range(info.mask_shape[1]):
                    if prod.dim() == 2:
                        s = info.spatial
                        total[o, j] += prod[o, j * s:(j + 1) * s].sum()
                    else:
                        total[o, j] += prod[o, j].sum()
        out[name] = total
    return out


def ref_force(net, graph, target, batches, layers, relevant, keep, steps):
    """FORCE with explicit loops; returns (per-step masks, last scores, final mask)."""
    flat = [(n, o, j) for n in layers for o in range(graph.layers[n].mask_shape[0])
            for j in range(graph.layers[n].mask_shape[1])]
    is_rel = {(n, o, j): bool(relevant[n][o, j]) for (n, o, j) in flat}
    n_rel = sum(is_rel.values())
    k_final = max(1, round(keep * n_rel))
    mask = {n: torch.ones(graph.layers[n].mask_shape, dtype=torch.bool) for n in layers}
    modules = dict(net.named_modules())
    originals = {n: modules[n].weight.detach().clone() for n in layers}
    history, scores = [], {}
    for t in range(1, steps + 1):
        records = reference_records(net, graph, target, batches, layers, mask)
        scores = ref_snip(net, graph, records, layers, weights=originals)
        k_t = k_final if t == steps else max(k_final, round(keep ** (t / steps) * n_rel))
        ranked = sorted((e for e in flat if is_rel[e]),
                        key=lambda e: (-float(scores[e[0]][e[1], e[2]]), flat.index(e)))
        chosen = set(ranked[:k_t])
        mask = {n: torch.tensor([[(n, o, j) in chosen or not is_rel[(n, o, j)]
                                  for j in range(graph.layers[n].mask_shape[1])]
                                 for o in range(graph.layers[n].mask_shape[0])])
                for n in layers}
        history.append({n: m.clone() for n, m in mask.items()})
    final = {n: mask[n] & relevant[n] for n in layers}
    return history, scores, final


# ----------------------------------------------------------------------------- helpers


def setup(name: str, spec: str | None = None, objective="sum_abs", direction=None,
          batch: int = 3, seed: int = 0):
    net, x = _nets.make(name, seed=seed, batch=batch)
    graph = ModelGraph.build(net, x[:1])
    layer = list(graph.layers)[-1]
    if direction is not None:
        target = Target.from_direction(direction[0], direction[1], objective=objective)
    else:
        target = Target.parse(spec or f"{layer}:1", objective=objective)
    target = target.resolve(graph)
    relevant = graph.relevant_kernels(target.layer, target.channels)
    batches = [x[:2], x[2:]] if batch > 2 else [x]
    ctx = ScoringContext(net, graph, target, lambda: iter(batches), layers=list(relevant),
                         relevant=relevant)
    return net, graph, target, batches, relevant, ctx


def assert_close(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor],
                 rtol: float = RTOL) -> None:
    assert set(got) == set(ref)
    for name in ref:
        g, r = got[name], ref[name]
        assert g.dtype == torch.float32 and g.device.type == "cpu", name
        assert tuple(g.shape) == tuple(r.shape), name
        r = r.detach()
        scale = float(r.abs().max())
        err = float((g.double() - r).abs().max())
        assert err <= rtol * max(scale, 1e-30), f"{name}: max error {err:.3e}, scale {scale:.3e}"


CASES = [
    ("plain", "classifier.3:1", "sum_abs"),     # BN + inplace ReLU + flatten -> Linear
    ("plain", "features.4:2@1,2", "sum_abs"),   # one position
    ("resnet", "fc:2", "mean"),                 # out += identity, 1x1 downsample
    ("resnet", "layer2.conv2:3", "max"),
    ("cat", "mix:1", "sum_abs"),                # torch.cat
    ("group", "fc:0", "sum_abs"),               # grouped + depthwise convs
    ("group", "point:2", "mean"),
    ("functional", "c4:3", "sum_abs"),          # in-place add on a conv output
    ("conv1d", "fc:1", "max"),
]


# ----------------------------------------------------------------------------- actgrad


@pytest.mark.parametrize("net_name,spec,objective", CASES)
def test_actgrad_kernel_and_filter_match_reference(net_name, spec, objective, monkeypatch):
    if spec.startswith(("features.4", "layer2", "point")):  # few rows: products, not depthwise
        monkeypatch.setattr(actgrad_module, "DEPTHWISE_MAX_ROWS", 0)
    net, graph, target, batches, _relevant, ctx = setup(net_name, spec, objective)
    records = reference_records(net, graph, target, batches, ctx.layers)
    crit = get_criterion("actgrad")
    assert_close(crit.kernel_scores(ctx), ref_actgrad(net, graph, records, ctx.layers))
    assert_close(crit.filter_scores(ctx),
                 ref_actgrad(net, graph, records, ctx.layers, kernel=False))


def test_actgrad_direction_and_callable_objective():
    w = torch.tensor([0.5, 0.0, -2.0, 1.0])
    net, graph, target, batches, _relevant, ctx = setup(
        "resnet", objective=lambda r: (r ** 2).sum(), direction=("layer1.conv2", w))
    records = reference_records(net, graph, target, batches, ctx.layers)
    got = get_criterion("actgrad").kernel_scores(ctx)
    assert_close(got, ref_actgrad(net, graph, records, ctx.layers))
    assert bool((got["layer1.conv2"][1] == 0).all())  # zero direction weight: no path


def test_actgrad_images_larger_than_the_graph_example():
    """Means are over the positions of the scoring images, not the graph's example input."""
    net, graph, target, _b, _r, ctx = setup("cat", "mix:1")
    big = [torch.randn(2, 3, 7, 6, dtype=torch.float64), torch.randn(1, 3, 9, 9,
                                                                     dtype=torch.float64)]
    records = reference_records(net, graph, target, big, ctx.layers)
    ctx.batches = lambda: iter(big)
    # reference mean: over all images and positions of both batches
    ref = {}
    for name in ctx.layers:
        per = [ref_actgrad(net, graph, [r], [name])[name] * r[name].z[:, 0].numel()
               for r in records]
        ref[name] = sum(per) / sum(r[name].z[:, 0].numel() for r in records)
    assert_close(get_criterion("actgrad").kernel_scores(ctx), ref)


def test_actgrad_with_masks_matches_reference():
    net, graph, target, batches, relevant, ctx = setup("plain", "classifier.3:0")
    gen = torch.Generator().manual_seed(3)
    masks = {n: torch.rand(m.shape, generator=gen) < 0.6 for n, m in relevant.items()}
    ctx.masks = masks
    records = reference_records(net, graph, target, batches, ctx.layers, masks)
    got = get_criterion("actgrad").kernel_scores(ctx)
    assert_close(got, ref_actgrad(masked_copy(net, graph, masks), graph, records, ctx.layers))
    for name, m in masks.items():
        assert bool((got[name][~m] == 0).all())  # masked kernels contribute nothing


class OddConvs(nn.Module):
    """Strides, dilation, reflect / replicate / circular padding, 'same' with an even kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 3, 3, stride=2, padding=2, dilation=2, padding_mode="reflect")
        self.b = nn.Conv2d(3, 4, (2, 4), padding="same", padding_mode="replicate")
        self.c = nn.Conv2d(4, 3, 3, padding=1, padding_mode="circular", bias=False)
        self.d = nn.Conv2d(3, 2, (3, 1), stride=(1, 2))

    def forward(self, x):
        return self.d(torch.relu(self.c(torch.tanh(self.b(F.relu(self.a(x)))))))


@pytest.mark.parametrize("depthwise_rows", [0, 4])
def test_actgrad_odd_conv_geometry_matches_reference(monkeypatch, depthwise_rows):
    monkeypatch.setattr(actgrad_module, "DEPTHWISE_MAX_ROWS", depthwise_rows)
    torch.manual_seed(1)
    net = OddConvs().double().eval()
    x = torch.randn(3, 2, 11, 9, dtype=torch.float64)
    graph = ModelGraph.build(net, x[:1])
    target = Target.parse("d:1").resolve(graph)
    relevant = graph.relevant_kernels("d", [1])
    batches = [x]
    ctx = ScoringContext(net, graph, target, lambda: iter(batches), layers=list(relevant))
    records = reference_records(net, graph, target, batches, ctx.layers)
    assert_close(get_criterion("actgrad").kernel_scores(ctx),
                 ref_actgrad(net, graph, records, ctx.layers))


@pytest.mark.parametrize("depthwise_rows", [0, 4])
def test_actgrad_conv3d_matches_reference(monkeypatch, depthwise_rows):
    monkeypatch.setattr(actgrad_module, "DEPTHWISE_MAX_ROWS", depthwise_rows)
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv3d(2, 3, 3, padding=1), nn.ReLU(inplace=True),
                        nn.Conv3d(3, 4, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)))
    net = net.double().eval()
    x = torch.randn(2, 2, 3, 5, 4, dtype=torch.float64)
    graph = ModelGraph.build(net, x[:1])
    target = Target.parse("2:1").resolve(graph)
    relevant = graph.relevant_kernels("2", [1])
    ctx = ScoringContext(net, graph, target, lambda: iter([x]), layers=list(relevant))
    records = reference_records(net, graph, target, [x], ctx.layers)
    assert_close(get_criterion("actgrad").kernel_scores(ctx),
                 ref_actgrad(net, graph, records, ctx.layers))


def test_actgrad_blocked_parallel_paths(monkeypatch):
    """Tiny blocks force image/row/channel blocking and the two-thread split."""
    monkeypatch.setattr(actgrad_module, "BLOCK_ELEMENTS", 60)
    monkeypatch.setattr(actgrad_module, "WINDOW_ELEMENTS", 150)
    monkeypatch.setattr(actgrad_module, "DEPTHWISE_MAX_ROWS", 0)
    threads = torch.get_num_threads()
    for net_name, spec in [("plain", "classifier.3:1"), ("group", "fc:2")]:
        net, graph, target, batches, _relevant, ctx = setup(net_name, spec, batch=5)
        records = reference_records(net, graph, target, batches, ctx.layers)
        ref_k = ref_actgrad(net, graph, records, ctx.layers)
        ref_f = ref_actgrad(net, graph, records, ctx.layers, kernel=False)
        torch.set_num_threads(2)  # only around the criterion: tiny ops hate two threads
        try:
            got_k = get_criterion("actgrad").kernel_scores(ctx)
            got_f = get_criterion("actgrad").filter_scores(ctx)
            assert torch.get_num_threads() == 2
        finally:
            torch.set_num_threads(threads)
        assert_close(got_k, ref_k)
        assert_close(got_f, ref_f)


@pytest.mark.parametrize("onednn", [True, False])
def test_actgrad_float32_paths_match_float64_reference(monkeypatch, onednn):
    """float32 on CPU uses oneDNN per-channel products when available, else batched bmm."""
    monkeypatch.setattr(actgrad_module, "BLOCK_ELEMENTS", 300)
    if not onednn:
        monkeypatch.setattr(actgrad_module, "_matmul_fn", lambda t: None)
    net64, graph, target, batches, relevant, _ = setup("resnet", "fc:1")
    records = reference_records(net64, graph, target, batches, list(relevant))
    ref = ref_actgrad(net64, graph, records, list(relevant))
    net32 = copy.deepcopy(net64).float()
    b32 = [b.float() for b in batches]
    ctx = ScoringContext(net32, graph, target, lambda: iter(b32), layers=list(relevant))
    assert_close(get_criterion("actgrad").kernel_scores(ctx), ref, rtol=2e-5)


def test_forward_machinery_delivers_exact_inputs_and_gradients():
    """x and g handed to callbacks equal the reference's (in-place ReLUs, residual adds)."""
    for net_name, spec in [("plain", "classifier.3:2"), ("resnet", "fc:0"),
                           ("functional", "fc:1")]:
        net, graph, target, batches, _relevant, ctx = setup(net_name, spec)
        records = reference_records(net, graph, target, batches, ctx.layers)
        seen: list[dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = []
        current: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

        def grab(name, module, x, z_fn, g, current=current):
            current[name] = (x.clone(), z_fn().clone(), g.clone())
            return g.new_zeros(())

        for _results, _n in layer_grad_batches(ctx, grab, need_output=True):
            seen.append(dict(current))
            current.clear()
        assert len(seen) == len(records)
        for got, rec in zip(seen, records, strict=True):
            for name in ctx.layers:
                x, z, g = got[name]
                assert torch.equal(x, rec[name].x), name
                assert torch.allclose(z, rec[name].z, rtol=1e-12, atol=1e-12), name
                assert torch.allclose(g, rec[name].g, rtol=1e-10, atol=1e-12), name


def test_backward_down_to_the_input_without_gradient_edges(monkeypatch):
    """Older torch has no GradientEdge: the backward pass then runs down to the input."""
    from netcarve.criteria import _forward

    monkeypatch.setattr(_forward, "_HAS_EDGES", False)
    net, graph, target, batches, _relevant, ctx = setup("resnet", "fc:2")
    records = reference_records(net, graph, target, batches, ctx.layers)
    assert_close(get_criterion("actgrad").kernel_scores(ctx),
                 ref_actgrad(net, graph, records, ctx.layers))


def test_signed_identity_sum_of_maps_times_g_equals_w_times_weight_grad():
    """Σ_p a_oi(p) g_o(p) == Σ_taps w ⊙ ∂L/∂w, kernel by kernel."""
    net, graph, target, batches, _relevant, ctx = setup("resnet", "fc:1")
    records = reference_records(net, graph, target, batches, ctx.layers)
    modules = dict(net.named_modules())
    for name in ctx.layers:
        info, m = graph.layers[name], modules[name]
        src = graph.kernel_sources(name)
        for rec in records:
            r = rec[name]
            for o in range(info.out_channels):
                for j in range(info.mask_shape[1]):
                    a = kernel_map(m, r.x, o, j, int(src[o, j]), info.spatial)
                    signed = (a * r.g[:, o]).sum()
                    via_w = (m.weight[o, j] * r.gw[o, j]).sum() if r.gw.dim() > 2 else (
                        m.weight[o, j * info.spatial:(j + 1) * info.spatial]
                        * r.gw[o, j * info.spatial:(j + 1) * info.spatial]).sum()
                    assert torch.allclose(signed, via_w, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- snip / force


@pytest.mark.parametrize("net_name,spec,objective", CASES[::2])
def test_snip_matches_reference(net_name, spec, objective):
    net, graph, target, batches, _relevant, ctx = setup(net_name, spec, objective)
    records = reference_records(net, graph, target, batches, ctx.layers)
    ref = ref_snip(net, graph, records, ctx.layers)
    crit = get_criterion("snip")
    assert_close(crit.kernel_scores(ctx), ref)
    assert_close(crit.filter_scores(ctx), {n: s.sum(dim=1) for n, s in ref.items()})


def test_snip_abs_is_per_batch():
    """One batch of all images differs from two half batches (documented convention)."""
    net, graph, target, batches, _relevant, ctx = setup("plain", "classifier.3:1", batch=4)
    split = get_criterion("snip").kernel_scores(ctx)
    whole = torch.cat(batches)
    ctx.batches = lambda: iter([whole])
    one = get_criterion("snip").kernel_scores(ctx)
    records = reference_records(net, graph, target, [whole], ctx.layers)
    assert_close(one, ref_snip(net, graph, records, ctx.layers))
    assert any(not torch.allclose(split[n], one[n]) for n in one)


@pytest.mark.parametrize("net_name,spec,keep", [("plain", "classifier.3:1", 0.3),
                                               ("resnet", "layer2.conv2:0", 0.1)])
def test_force_matches_reference_and_reproduces_its_mask(net_name, spec, keep):
    net, graph, target, batches, relevant, ctx = setup(net_name, spec)
    ctx.keep = keep
    got = get_criterion("force").kernel_scores(ctx)
    _, ref_scores, ref_final = ref_force(net, graph, target, batches, ctx.layers, relevant,
                                         keep, steps=10)
    # the top-k by the returned scores is FORCE's final mask
    from netcarve.criteria.force import top_k_masks

    k = max(1, round(keep * sum(int(m.sum()) for m in relevant.values())))
    chosen = top_k_masks(got, relevant, k)
    for name in ctx.layers:
        assert torch.equal(chosen[name], ref_final[name]), name
        kept = ref_final[name]
        if kept.any():  # kept kernels carry the last step's scores
            r = ref_scores[name][kept]
            assert torch.allclose(got[name][kept].double(), r, rtol=RTOL,
                                  atol=RTOL * float(r.abs().max()))
    low = min(float(got[n][ref_final[n]].min()) for n in ctx.layers if ref_final[n].any())
    high = max(float(got[n][~ref_final[n]].max()) for n in ctx.layers if (~ref_final[n]).any())
    assert high < low


def test_force_lets_pruned_kernels_return():
    """Scores are taken w.r.t. the mask: a kernel dropped at one step can be kept later."""
    net, graph, target, batches, relevant, ctx = setup("plain", "classifier.3:1", seed=2)
    history, _, _ = ref_force(net, graph, target, batches, ctx.layers, relevant, 0.2, 4)
    returned = sum(int((~history[t][n] & history[t + 1][n]).sum())
                   for t in range(len(history) - 1) for n in ctx.layers)
    assert returned > 0
    # and netcarve's FORCE agrees with that run
    from netcarve.criteria import Force
    from netcarve.criteria.force import top_k_masks

    ctx.keep = 0.2
    got = Force(steps=4).kernel_scores(ctx)
    k = max(1, round(0.2 * sum(int(m.sum()) for m in relevant.values())))
    chosen = top_k_masks(got, relevant, k)
    for name in ctx.layers:
        assert torch.equal(chosen[name], history[-1][name] & relevant[name])
