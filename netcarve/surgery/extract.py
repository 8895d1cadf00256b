"""Circuit surgery: cut a circuit out of a model as a standalone, physically smaller module.

:func:`extract_module` takes a model, its :class:`~netcarve.core.graph.ModelGraph`, kernel masks
and a target (a layer and some of its output channels) and returns a :class:`CircuitModule`:
an ordinary ``nn.Module`` (it wraps a :class:`torch.fx.GraphModule`) that computes the target
layer's raw output on the target channels, in the given order, and nothing else.

Semantics (the project's documented convention): masking zeroes kernel *weights* only;
biases and BatchNorm parameters stay. A channel whose kernels are all masked therefore still
emits a constant map (bias → BatchNorm → activation), and with zero padding downstream that
constant produces border effects. The extracted module reproduces this exactly: its output
equals the target layer's output of the model in eval mode under
:func:`~netcarve.core.hooks.apply_kernel_masks` (up to float rounding, since the sums run over
fewer terms), restricted to the target channels.

What is kept:

* only the part of the model's fx graph that the target depends on (no layer after it);
* in every conv/linear layer, the output channels needed downstream (by a kept kernel, a
  residual addition, a concatenation or the target) and the input channels some kept kernel
  of those outputs reads. Masked kernels inside the kept rows and columns stay as zero
  weights. A needed channel without any kept kernel keeps its row (all zeros) so that it emits
  its bias / BatchNorm constant; when a whole layer has no kept kernel in its needed rows it
  still reads one input channel (with zero weights) to learn the spatial size;
* BatchNorm (also InstanceNorm, per-channel PReLU) sliced to the channels kept, statistics and
  ``eps``/``momentum`` copied; activations, pooling, dropout, padding pass through;
* residual additions see both operands on the same channel subset; concatenations get their
  parts' subsets with offsets remapped; a Linear after a flatten keeps whole ``spatial``
  blocks of columns per input channel;
* grouped convolutions keep whole groups (all outputs and inputs of every group that has a
  needed output channel); a depthwise conv therefore keeps the same set of inputs and outputs.

Anything the surgery does not understand (an unknown module or function between layers) is
kept whole with all its input channels: the result stays exact, only less small. Nothing of the
user's model is shared or changed: every tensor is a copy.

Limitations: reshapes other than ``flatten`` (``view``, ``reshape``, ``unsqueeze``) use the
trailing sizes seen on the example input; an in-place operation on a *view* of a tensor that is
read again later is not followed (the same limitation as the channel graph).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from netcarve.core.graph import ModelGraph
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3))
    >>> graph = ModelGraph.build(net, torch.zeros(1, 3, 8, 8))
    >>> masks = {"2": torch.zeros(4, 8, dtype=torch.bool)}
    >>> masks["2"][1, :2] = True
    >>> circuit = extract_module(net.eval(), graph, masks, "2", [1])
    >>> circuit.channel_map
    {'0': [0, 1], '2': [1]}
    >>> circuit(torch.zeros(2, 3, 8, 8)).shape
    torch.Size([2, 1, 6, 6])
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
import torch.fx
from torch import nn

from netcarve.core.graph import ModelGraph
from netcarve.core.layers import GraphError, MaskError
from netcarve.surgery._build import _Surgeon
from netcarve.surgery._plan import SurgeryError, _unknown_layer
from netcarve.surgery.circuit_module import CircuitModule

__all__ = ["extract_module"]


# --------------------------------------------------------------------------- entry point


def extract_module(
    model: nn.Module,
    graph: ModelGraph,
    masks: dict[str, torch.Tensor],
    target_layer: str,
    channels: Sequence[int] | torch.Tensor | None = None,
    example_input: torch.Tensor | None = None,
) -> CircuitModule:
    """Cut the circuit given by kernel masks out of ``model`` as a small standalone module.

    The module's output equals ``model``'s target layer output (raw, before any activation)
    in eval mode under :func:`~netcarve.core.hooks.apply_kernel_masks` ``(model, graph, masks)``,
    restricted to ``channels`` in the given order (≤1e-5 relative in float32). Kernels are
    masked by zeroing weights only, so channels without kept kernels still emit their bias /
    BatchNorm constants, and the module keeps them (see the module docstring).

    Args:
        model: the model the graph was built from (not modified; nothing is shared with it).
        graph: its :class:`~netcarve.core.graph.ModelGraph` (from ``ModelGraph.build``).
        masks: ``{layer: bool LayerInfo.mask_shape}``, True = kept; a layer that is not named
            keeps all its kernels (as in ``apply_kernel_masks``). Effective masks work too.
        target_layer: dotted name of the target conv/linear layer.
        channels: its output channels to compute, in output order (default: all).
        example_input: an input batch to learn intermediate shapes from (default: zeros of
            the graph's input shape).

    Returns:
        a :class:`CircuitModule` in eval mode, on the model's device and dtype.

    Raises:
        SurgeryError: unknown target layer or channel (close names are suggested), invalid
            masks (unknown layer, wrong shape), or a graph that does not match the model.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(),
        ...                     nn.Linear(4 * 2 * 2, 3))
        >>> g = ModelGraph.build(net, torch.zeros(1, 1, 4, 4))
        >>> keep = {"3": torch.tensor([[True, False, False, False]] * 3)}
        >>> m = extract_module(net, g, keep, "3", [2, 0])
        >>> m.channel_map, m(torch.zeros(5, 1, 4, 4)).shape
        ({'0': [0], '3': [2, 0]}, torch.Size([5, 2]))
    """
    if not isinstance(graph, ModelGraph):
        raise SurgeryError(f"graph must be a ModelGraph, got {type(graph).__name__}")
    if target_layer not in graph.layers:
        raise SurgeryError(_unknown_layer(target_layer, graph, model))
    info = graph.layers[target_layer]
    if channels is None:
        chans = list(range(info.out_channels))
    else:
        if isinstance(channels, torch.Tensor):
            channels = channels.reshape(-1).tolist()
        if isinstance(channels, int):
            channels = [channels]
        chans = []
        for c in channels:
            try:
                c = operator.index(c)
            except TypeError:
                raise SurgeryError(f"channels must be integers, got {c!r}") from None
            if not 0 <= c < info.out_channels:
                raise SurgeryError(f"channel {c} out of range for {target_layer} "
                                   f"(0..{info.out_channels - 1})")
            chans.append(c)
        if not chans:
            raise SurgeryError("no target channels given; pass at least one channel "
                               "(or None for all)")
    try:
        checked = graph._check_masks(masks)
    except (MaskError, GraphError) as exc:
        raise SurgeryError(str(exc)) from None
    return _Surgeon(model, graph, checked, target_layer, chans, example_input).build()
