"""Targets: what a circuit must preserve, and the objective its saliency is computed from.

A target names a layer's raw output (before any following activation) and selects from it:
one channel (``"features.8:42"``), one position of a channel (``"features.8:42@3,5"``), a
direction over channels (a weighted sum), or a logit (a channel of a Linear layer;
``"logit:3"`` is the last Linear layer's output 3).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from netcarve.core.errors import NetcarveError

Objective = str | Callable[[torch.Tensor], torch.Tensor]
OBJECTIVES = ("sum_abs", "mean", "max")

_SPEC = re.compile(r"^(?P<layer>[^:@]+):(?P<channel>-?\d+)(?:@(?P<y>-?\d+),(?P<x>-?\d+))?$")


class TargetError(NetcarveError):
    """A target string or objective is malformed or does not fit the model."""


@dataclass(frozen=True)
class Target:
    """A target feature: a layer plus a selection of its raw output.

    Attributes:
        layer: dotted module name of a conv or Linear layer.
        channel: the output channel (``None`` for a direction).
        position: ``(y, x)`` for a single-position target.
        direction: ``float [C]`` weights over the layer's channels (instead of ``channel``).
        objective: ``"sum_abs"`` (default, Σ|z_t| over images and positions), ``"mean"``
            (signed mean), ``"max"`` (per-image maximum, summed over images) or a callable
            mapping the response map ``[N, ...]`` to a scalar.

    Example:
        >>> t = Target.parse("features.3:7@2,1")
        >>> t.channel, t.position
        (7, (2, 1))
    """

    layer: str
    channel: int | None = None
    position: tuple[int, int] | None = None
    direction: torch.Tensor | None = field(default=None, compare=False)
    objective: Objective = "sum_abs"

    def __post_init__(self) -> None:
        if (self.channel is None) == (self.direction is None):
            raise TargetError("a target needs exactly one of `channel` or `direction`")
        if isinstance(self.objective, str) and self.objective not in OBJECTIVES:
            raise TargetError(
                f"unknown objective {self.objective!r}; use one of {', '.join(OBJECTIVES)} "
                "or a callable"
            )

    @classmethod
    def parse(cls, spec: str, objective: Objective = "sum_abs") -> Target:
        """Parse ``"layer:channel"`` or ``"layer:channel@y,x"`` (``"logit:K"`` too).

        A ``logit:K`` target is resolved to the last Linear layer by :meth:`resolve`.

        Raises:
            TargetError: the string does not have that form.
        """
        m = _SPEC.match(spec.strip())
        if m is None:
            raise TargetError(
                f"cannot parse target {spec!r}: write 'layer:channel' (e.g. 'features.8:42'), "
                "'layer:channel@y,x' for one position, or 'logit:K' for a class logit"
            )
        pos = None if m["y"] is None else (int(m["y"]), int(m["x"]))
        return cls(m["layer"], channel=int(m["channel"]), position=pos, objective=objective)

    @classmethod
    def from_direction(
        cls, layer: str, weights: Sequence[float] | torch.Tensor, objective: Objective = "sum_abs"
    ) -> Target:
        """A direction target: the weighted sum ``Σ_c w_c z_c`` of a layer's channels."""
        w = torch.as_tensor(weights, dtype=torch.float32).flatten()
        if not torch.isfinite(w).all() or not w.abs().sum() > 0:
            raise TargetError("a direction needs finite weights, not all zero")
        return cls(layer, direction=w, objective=objective)

    def resolve(self, graph) -> Target:  # graph: netcarve.core.graph.ModelGraph
        """Check the target against a model graph (and resolve ``logit``).

        Args:
            graph: the model's :class:`~netcarve.core.graph.ModelGraph`.

        Returns:
            The target with ``logit`` replaced by the last Linear layer's name.

        Raises:
            GraphError: unknown layer (closest names listed) or channel out of range.
            TargetError: position outside the output map, direction of the wrong length.
        """
        layer = self.layer
        if layer == "logit" and "logit" not in graph.layers:
            linears = [name for name, info in graph.layers.items() if info.kind == "linear"]
            if not linears:
                raise TargetError("'logit' targets need a model that ends in a Linear layer")
            layer = linears[-1]
        info = graph.layer(layer)
        if self.channel is not None:
            graph.check_channel(layer, self.channel)
        elif self.direction is not None and self.direction.numel() != info.out_channels:
            raise TargetError(
                f"direction has {self.direction.numel()} weights but {layer} has "
                f"{info.out_channels} channels"
            )
        if self.position is not None:
            spatial = info.output_shape[1:]
            if len(spatial) != 2:
                raise TargetError(f"{layer} has no spatial map; drop the '@y,x' part")
            y, x = self.position
            if not (0 <= y < spatial[0] and 0 <= x < spatial[1]):
                raise TargetError(
                    f"position ({y}, {x}) outside {layer}'s {spatial[0]}×{spatial[1]} map "
                    f"(y in 0..{spatial[0] - 1}, x in 0..{spatial[1] - 1})"
                )
        if layer == self.layer:
            return self
        return Target(layer, self.channel, self.position, self.direction, self.objective)

    @property
    def channels(self) -> list[int]:
        """Output channels of the target layer that the target depends on."""
        if self.channel is not None:
            return [self.channel]
        assert self.direction is not None
        return torch.nonzero(self.direction).flatten().tolist()

    def response(self, z: torch.Tensor) -> torch.Tensor:
        """The target response map from the target layer's raw output ``z``.

        Args:
            z: ``[N, C, ...]`` raw output of the target layer.

        Returns:
            ``[N, ...]``: the channel (or direction) map, or ``[N]`` at one position.
        """
        if self.channel is not None:
            r = z[:, self.channel]
        else:
            assert self.direction is not None
            w = self.direction.to(device=z.device, dtype=z.dtype)
            r = torch.tensordot(z, w, dims=([1], [0]))
        if self.position is not None:
            r = r[:, self.position[0], self.position[1]]
        return r

    def objective_value(self, response: torch.Tensor) -> torch.Tensor:
        """The scalar objective ``L`` whose gradients drive the saliency criteria."""
        if callable(self.objective):
            value = self.objective(response)
            if not isinstance(value, torch.Tensor) or value.numel() != 1:
                raise TargetError("a callable objective must return a scalar tensor")
            return value.reshape(())
        if self.objective == "sum_abs":
            return response.abs().sum()
        if self.objective == "mean":
            return response.mean()
        return response.reshape(response.shape[0], -1).amax(dim=1).sum()

    def __str__(self) -> str:
        if self.channel is None:
            return f"{self.layer}:direction"
        pos = "" if self.position is None else f"@{self.position[0]},{self.position[1]}"
        return f"{self.layer}:{self.channel}{pos}"
