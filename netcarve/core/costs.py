"""What a model costs: parameter elements and multiply-adds per image.

Shared by circuit surgery (:mod:`netcarve.surgery`) and structural pruning
(:mod:`netcarve.surgery.pruned`) so both report sizes the same way.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.fx
from torch import nn

from netcarve.core.graph import ModelGraph
from netcarve.core.layers import GraphError, close_names

__all__ = ["count_macs", "count_parameters", "upstream_mixing_macs"]


def count_parameters(module: nn.Module) -> int:
    """Number of parameter elements (shared parameters counted once; buffers excluded).

    Args:
        module: any module.

    Returns:
        the count.

    Example:
        >>> count_parameters(nn.Conv2d(3, 4, 3))
        112
    """
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def _layer_macs(modules: dict[str, nn.Module], graph: ModelGraph, name: str) -> int:
    info = graph.layers[name]
    if info.kind == "linear":
        # a channels-last Linear (a 1×1 conv over [N, H, W, C]) runs at every position
        positions = math.prod(info.output_shape[:-1]) if info.channels_last else 1
        return info.in_channels * info.spatial * info.out_channels * positions
    weight = getattr(modules.get(name), "weight", None)
    kernel = math.prod(weight.shape[2:]) if isinstance(weight, torch.Tensor) else 1
    out_positions = math.prod(info.output_shape[1:])
    return info.out_channels * (info.in_channels // info.groups) * kernel * out_positions


def count_macs(model: nn.Module, graph: ModelGraph, layers: Iterable[str] | None = None) -> int:
    """Multiply-adds of one forward pass of one image, from the graph's shapes.

    A conv costs ``out · (in/groups) · kh · kw · H_out · W_out``, a Linear ``in · out`` (per
    position when it is applied to a feature map, as ConvNeXt's channels-last pointwise
    Linears, which the whole-model count includes); BatchNorm, activations, pooling and
    additions are not counted.

    Args:
        model: the model the graph was built from (for the kernel sizes).
        graph: its :class:`~netcarve.core.graph.ModelGraph`; its example input fixes the shapes.
        layers: count only these layers (default: every layer of the graph).

    Returns:
        the number of multiply-adds.

    Raises:
        GraphError: a name in ``layers`` is not a layer of the graph (close names listed).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 2 * 2, 3))
        >>> g = ModelGraph.build(net, torch.zeros(1, 1, 4, 4))
        >>> count_macs(net, g)  # 2·1·9·4 + 8·3
        96
    """
    modules = dict(model.named_modules())
    names = list(graph.layers) if layers is None else list(layers)
    for name in names:
        if name not in graph.layers:
            hint = close_names(str(name), graph.layers)
            raise GraphError(f"unknown layer '{name}'"
                             + (f"; did you mean {', '.join(hint)}?" if hint else "")
                             + f" (the graph has {len(graph.layers)} conv/linear layers)")
    total = sum(_layer_macs(modules, graph, name) for name in names)
    if layers is None:  # the whole model: also the Linears followed as channel-mixing ops
        total += sum(graph._mixing_linear_macs.values())
    return total


def upstream_mixing_macs(graph: ModelGraph, layer: str) -> int:
    """Multiply-adds of the channel-mixing Linears (ConvNeXt's pointwise convs, see
    :attr:`ModelGraph.mixing`) that run before ``layer`` and feed it.

    Example:
        >>> upstream_mixing_macs(g, "features.3.0.block.0")  # doctest: +SKIP
        81920
    """
    if not graph._mixing_linear_macs:
        return 0
    seen: set[torch.fx.Node] = set()
    todo = [graph.layer_node(layer)]
    total = 0
    while todo:
        node = todo.pop()
        for arg in node.all_input_nodes:
            if arg in seen:
                continue
            seen.add(arg)
            if arg.op == "call_module":
                total += graph._mixing_linear_macs.get(str(arg.target), 0)
            todo.append(arg)
    return total
