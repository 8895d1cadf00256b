"""What the channel graph is made of: one record per layer (:class:`LayerInfo`) and per channel
link (:class:`ChannelLink`), the graph's errors, and the "did you mean" helper every lookup
uses for unknown names."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.fx

from netcarve.core.errors import NetcarveError

__all__ = ["ChannelLink", "GraphError", "LayerInfo", "MaskError", "close_names"]


class GraphError(NetcarveError):
    """The model's channel graph cannot be built, or a layer/channel name does not exist."""


class MaskError(NetcarveError):
    """A mask names an unknown layer or has the wrong shape or type."""


# --------------------------------------------------------------------------- public records


@dataclass(frozen=True)
class LayerInfo:
    """One layer (conv or linear) of the channel graph.

    Attributes:
        name: dotted ``named_modules()`` name, e.g. ``"features.3"``.
        kind: ``"conv"`` or ``"linear"``.
        in_channels: channels feeding the layer in the kernel sense (conv: ``in_channels``;
            Linear after a flattened ``C×H×W`` map: ``C``; Linear after a vector:
            ``in_features``).
        out_channels: output channels / units.
        groups: conv groups (1 for Linear).
        spatial: for a Linear after a flatten, the ``H*W`` input features per input channel
            (consecutive columns of the weight); otherwise 1.
        input_shape: input shape without the batch dimension.
        output_shape: output shape without the batch dimension.
        mask_shape: ``(out_channels, in_channels // groups)``, the shape of a kernel mask.
        weight_param: name of the weight parameter, e.g. ``"features.3.weight"``.
        bias_param: name of the bias parameter, or None when the layer has no bias.
        channels_last: a Linear applied over the last dim of an ``[N, H, W, C]`` tensor
            (ConvNeXt's pointwise convs): its channels are the last dim of its input and
            output, and netcarve treats it as a 1×1 conv (kernel ``(o, i)``; captured
            outputs are presented channels-first).
    """

    name: str
    kind: str
    in_channels: int
    out_channels: int
    groups: int
    spatial: int
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    mask_shape: tuple[int, int]
    weight_param: str
    bias_param: str | None = None
    channels_last: bool = False

    @property
    def n_kernels(self) -> int:
        """Number of kernels (edges) into this layer: ``out * in / groups``."""
        return self.mask_shape[0] * self.mask_shape[1]


@dataclass(frozen=True)
class ChannelLink:
    """What feeds some of a layer's input channels.

    ``input_channels[k]`` of the consuming layer receives channel ``source_channels[k]`` of
    layer ``source`` (``None`` = the model input, i.e. image channels). An input channel fed
    through a residual addition appears in several links (one per summand).

    Attributes:
        source: producing layer name, or None for the model input.
        source_channels: int64 ``[K]`` channel indices in the source.
        input_channels: int64 ``[K]`` positions on the consuming layer's input-channel axis.
    """

    source: str | None
    source_channels: torch.Tensor
    input_channels: torch.Tensor


def close_names(name: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """Names among ``candidates`` that look like ``name`` (difflib, then substring matches).

    Args:
        name: the misspelt name.
        candidates: the valid names.
        n: at most this many suggestions.

    Returns:
        up to ``n`` suggestions, best first.

    Example:
        >>> close_names("feature.3", ["features.0", "features.3", "classifier.1"])[0]
        'features.3'
    """
    pool = list(candidates)
    found = difflib.get_close_matches(name, pool, n=n, cutoff=0.5)
    for cand in pool:
        if len(found) >= n:
            break
        if cand not in found and name and (name in cand or cand in name):
            found.append(cand)
    return found
