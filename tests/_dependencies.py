"""Channel dependencies of a model, from its graph and measured by perturbation.

:func:`measured_links` perturbs each channel of a layer (or of the input) while every layer
outputs its unperturbed value, so that only the direct, layer-free paths carry the change, and
records which input positions of which layers change; :func:`graph_links` reads the same pairs
from :attr:`ModelGraph.links`. Tests compare the two.
"""

from __future__ import annotations

import torch
from torch import nn

from netcarve.core.graph import ModelGraph


def measured_links(model: nn.Module, graph: ModelGraph, x: torch.Tensor,
                    source: str | None) -> dict[str, set[tuple[int, int]]]:
    """``{consumer: {(source channel, input position)}}`` found by perturbing each channel
    of ``source`` (None: the model input) while every layer outputs its unperturbed value,
    so that only the direct (layer-free) paths from ``source`` carry the perturbation."""
    modules = dict(model.named_modules())
    base_out: dict[str, torch.Tensor] = {}
    base_in: dict[str, torch.Tensor] = {}
    seen_in: dict[str, torch.Tensor] = {}
    state: dict[str, object] = {"mode": "record", "channel": None}
    gen = torch.Generator().manual_seed(1)
    noise_of: dict[str, torch.Tensor] = {}

    def out_hook(name: str):
        def hook(_m: nn.Module, _i: object, out: torch.Tensor) -> torch.Tensor | None:
            if state["mode"] == "record":
                base_out[name] = out.detach().clone()
                return None
            fixed = base_out[name].clone()
            if name == source:
                c = int(state["channel"])  # type: ignore[arg-type]
                if graph.layers[name].channels_last:
                    fixed[..., c] += noise_of[name][..., c]
                else:
                    fixed[:, c] += noise_of[name][:, c]
            return fixed
        return hook

    def in_hook(name: str):
        def hook(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            store = base_in if state["mode"] == "record" else seen_in
            store[name] = args[0].detach().clone()
        return hook

    handles = []
    for name in graph.layers:
        handles.append(modules[name].register_forward_hook(out_hook(name)))
        handles.append(modules[name].register_forward_pre_hook(in_hook(name)))
    found: dict[str, set[tuple[int, int]]] = {c: set() for c in graph.layers}
    try:
        with torch.no_grad():
            model(x)
            last = source is not None and graph.layers[source].channels_last
            width = x.shape[1] if source is None else base_out[source].shape[-1 if last else 1]
            ref = x if source is None else base_out[source]
            # large and one-signed (each sign in turn): a ReLU or clamp after the source
            # cannot swallow it for every image
            magnitude = 10 * (ref.std() + 1) * (1 + torch.rand(ref.shape, generator=gen))
            state["mode"] = "perturb"
            for c, sign in [(c, s) for c in range(width) for s in (1, -1)]:
                noise_of[source or ""] = sign * magnitude
                state["channel"] = c
                xin = x.clone()
                if source is None:
                    xin[:, c] += noise_of[""][:, c]
                model(xin)
                for name, info in graph.layers.items():
                    diff = (seen_in[name] - base_in[name]).abs()
                    if info.channels_last:
                        diff = diff.movedim(-1, 1)
                    scale = float(base_in[name].abs().max()) + 1e-6
                    per_pos = diff.reshape(diff.shape[0], info.in_channels, -1) > 1e-5 * scale
                    for p in torch.nonzero(per_pos.any(dim=(0, 2))).flatten().tolist():
                        found[name].add((c, p))
    finally:
        for h in handles:
            h.remove()
    return {k: v for k, v in found.items() if v}


def graph_links(graph: ModelGraph, source: str | None) -> dict[str, set[tuple[int, int]]]:
    out: dict[str, set[tuple[int, int]]] = {}
    for name, links in graph.links.items():
        for link in links:
            if link.source == source:
                out.setdefault(name, set()).update(
                    zip(link.source_channels.tolist(), link.input_channels.tolist(), strict=True))
    return out
