"""The standalone module a circuit is cut into: :class:`CircuitModule` wraps the smaller
:class:`torch.fx.GraphModule` that :func:`netcarve.surgery.extract.extract_module` builds and
reports its size (parameters, multiply-adds) beside the original's."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
from torch import nn

from netcarve.core.costs import count_macs, count_parameters, upstream_mixing_macs
from netcarve.core.graph import ModelGraph
from netcarve.surgery._plan import SurgeryError, _unknown_layer

__all__ = ["CircuitModule"]


# --------------------------------------------------------------------------- counting


def _module_macs(module: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-adds of conv/linear submodules of ``module`` for one input of ``input_shape``,
    measured with forward hooks on a zero input."""
    total = [0]

    def hook(mod: nn.Module, args: Any, out: Any) -> None:
        if not isinstance(out, torch.Tensor):
            return
        if isinstance(mod, nn.Linear):
            total[0] += mod.in_features * mod.out_features * math.prod(out.shape[1:-1])
        else:
            assert isinstance(mod, nn.modules.conv._ConvNd)
            kernel = math.prod(mod.kernel_size)
            if mod.transposed:  # every input position is spread over a kernel
                positions = math.prod(args[0].shape[2:])
                total[0] += mod.in_channels * (mod.out_channels // mod.groups) * kernel * positions
            else:
                total[0] += (mod.out_channels * (mod.in_channels // mod.groups) * kernel
                             * math.prod(out.shape[2:]))

    from netcarve.core.hooks import preserved_state

    handles = [m.register_forward_hook(hook) for m in module.modules()
               if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    param = next(iter(module.parameters()), None)
    dtype = param.dtype if param is not None else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    try:
        with preserved_state(module), torch.no_grad():
            module.eval()
            module(torch.zeros(1, *input_shape, dtype=dtype, device=device))
    finally:
        for handle in handles:
            handle.remove()
    return total[0]


# --------------------------------------------------------------------------- the module


class CircuitModule(nn.Module):
    """A circuit cut out of a model: computes the target layer's raw output on the target
    channels, ``[N, len(target_channels), ...]``.

    It takes the same input as the original model (all image channels; it selects the ones it
    reads itself). Build it with :func:`extract_module` (or ``Circuit.to_module()``).

    Attributes:
        net: the :class:`torch.fx.GraphModule` doing the work (its submodules keep the
            original dotted names, e.g. ``net.features.0``).
        target_layer: the original name of the target layer.
        target_channels: the original ids of the output channels, in output order.
        channel_map: ``{layer: [original output-channel ids kept, in order]}`` for every
            conv/linear layer kept.
        input_channel_map: ``{layer: [original input-channel ids of its weight columns]}``
            (for a Linear after a flatten, channel blocks of ``spatial`` columns).
        input_channels: the channels of the model input that the module reads.
        input_shape: the example input shape (without batch) the module was cut for.

    Example:
        >>> circuit = extract_module(net, graph, masks, "features.8", [3])  # doctest: +SKIP
        >>> circuit.compare(net)["parameter_ratio"] < 0.1  # doctest: +SKIP
        True
    """

    def __init__(
        self,
        net: torch.fx.GraphModule,
        *,
        target_layer: str,
        target_channels: list[int],
        channel_map: dict[str, list[int]],
        input_channel_map: dict[str, list[int]],
        input_channels: list[int],
        input_shape: tuple[int, ...],
    ) -> None:
        """Wrap an extracted GraphModule; use :func:`extract_module` to make one."""
        super().__init__()
        self.net = net
        self.target_layer = target_layer
        self.target_channels = list(target_channels)
        self.channel_map = {k: list(v) for k, v in channel_map.items()}
        self.input_channel_map = {k: list(v) for k, v in input_channel_map.items()}
        self.input_channels = list(input_channels)
        self.input_shape = tuple(input_shape)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The target layer's raw output on the target channels.

        Args:
            x: a batch shaped like the model's input.
            args, kwargs: further arguments of the model's ``forward``, if it has any.

        Returns:
            ``[N, len(target_channels), ...]`` (``[N, len(target_channels)]`` for a Linear).
        """
        return self.net(x, *args, **kwargs)

    def extra_repr(self) -> str:
        kept = ", ".join(f"{k}: {len(v)}" for k, v in self.channel_map.items())
        return f"target={self.target_layer}:{self.target_channels}, kept channels {{{kept}}}"

    def parameter_count(self) -> int:
        """Number of parameter elements (see :func:`count_parameters`).

        Example:
            >>> circuit.parameter_count()  # doctest: +SKIP
            1234
        """
        return count_parameters(self)

    def macs(self, input_shape: Sequence[int] | None = None) -> int:
        """Multiply-adds of one forward pass of one image (conv and linear layers only).

        Args:
            input_shape: ``(C, H, W)`` of one input (default: the example input's shape).

        Returns:
            ``Σ out · (in/groups) · kh · kw · H_out · W_out`` over the convs plus
            ``Σ in · out`` over the Linear layers, as the module computes them (zero rows of
            channels without kernels included).

        Example:
            >>> circuit.macs((1, 28, 28))  # doctest: +SKIP
            52992
        """
        shape = tuple(self.input_shape if input_shape is None else input_shape)
        return _module_macs(self, shape)

    def compare(
        self,
        original_model: nn.Module,
        input_shape: Sequence[int] | None = None,
        graph: ModelGraph | None = None,
    ) -> dict[str, Any]:
        """Size and cost of the circuit against the model it was cut from.

        Args:
            original_model: the full model.
            input_shape: ``(C, H, W)`` of one input (default: the example input's shape).
            graph: the model's graph, if already built for that input shape (saves a trace;
                needed when the graph was built with ``channelwise=...``).

        Returns:
            ``{"parameters", "macs"}`` of the circuit; ``"original_parameters"`` and
            ``"original_macs"`` of the whole model; ``"original_parameters_to_target"`` and
            ``"original_macs_to_target"`` counting only the target layer and the layers
            upstream of it (with the BatchNorms that follow them); and the ratios
            ``"parameter_ratio"``, ``"mac_ratio"`` (vs the whole model) and
            ``"parameter_ratio_to_target"``, ``"mac_ratio_to_target"``.

        Raises:
            SurgeryError: the target layer is not a layer of the original model's graph.

        Example:
            >>> circuit.compare(net)["mac_ratio"]  # doctest: +SKIP
            0.013
        """
        shape = tuple(self.input_shape if input_shape is None else input_shape)
        if graph is None or tuple(graph.input_shape) != shape:
            param = next(iter(original_model.parameters()), None)
            dtype = param.dtype if param is not None else torch.float32
            device = param.device if param is not None else torch.device("cpu")
            graph = ModelGraph.build(
                original_model, torch.zeros(1, *shape, dtype=dtype, device=device))
        if self.target_layer not in graph.layers:
            raise SurgeryError(_unknown_layer(self.target_layer, graph))
        modules = dict(original_model.named_modules())
        upstream = [*graph.upstream(self.target_layer), self.target_layer]
        counted: list[str] = list(upstream)
        for name in upstream:
            if name != self.target_layer:
                counted.extend(graph.bn_after.get(name, []))
        params_to_target = sum(count_parameters(modules[n]) for n in dict.fromkeys(counted)
                               if n in modules)
        params, macs = self.parameter_count(), self.macs(shape)
        original_params = count_parameters(original_model)
        original_macs = count_macs(original_model, graph)
        macs_to_target = (count_macs(original_model, graph, upstream)
                          + upstream_mixing_macs(graph, self.target_layer))

        def ratio(a: int, b: int) -> float:
            return a / b if b else float("nan")

        return {
            "parameters": params,
            "macs": macs,
            "original_parameters": original_params,
            "original_macs": original_macs,
            "original_parameters_to_target": params_to_target,
            "original_macs_to_target": macs_to_target,
            "parameter_ratio": ratio(params, original_params),
            "mac_ratio": ratio(macs, original_macs),
            "parameter_ratio_to_target": ratio(params, params_to_target),
            "mac_ratio_to_target": ratio(macs, macs_to_target),
        }
