"""Targets: parsing, validation against a graph, responses and objectives."""

from __future__ import annotations

import pytest
import torch
from _nets import make

from netcarve.core.graph import ModelGraph
from netcarve.core.layers import GraphError
from netcarve.core.targets import Target, TargetError


@pytest.fixture(scope="module")
def graph():
    net, x = make("plain")
    return ModelGraph.build(net, x)


def test_parse_forms():
    assert Target.parse("features.4:3") == Target("features.4", channel=3)
    t = Target.parse("features.4:3@1,0")
    assert t.position == (1, 0) and t.channel == 3
    assert Target.parse("logit:2").layer == "logit"
    with pytest.raises(TargetError, match="layer:channel"):
        Target.parse("features.4")
    with pytest.raises(TargetError, match="objective"):
        Target("a", channel=0, objective="median")


def test_resolve_checks_layer_channel_position(graph):
    with pytest.raises(GraphError, match="features.4"):
        Target.parse("features.5:0").resolve(graph)
    with pytest.raises(GraphError, match=r"0\.\.5"):
        Target.parse("features.4:6").resolve(graph)
    with pytest.raises(TargetError, match="outside"):
        Target.parse("features.4:1@4,0").resolve(graph)
    assert Target.parse("logit:1").resolve(graph).layer == "classifier.3"
    with pytest.raises(TargetError, match="6 channels"):
        Target.from_direction("features.4", [1.0, 2.0]).resolve(graph)


def test_responses_and_objectives():
    z = torch.randn(2, 3, 4, 4)
    assert torch.equal(Target("l", channel=1).response(z), z[:, 1])
    assert torch.equal(Target("l", channel=1, position=(2, 3)).response(z), z[:, 1, 2, 3])
    d = Target.from_direction("l", [0.5, 0.0, -1.0])
    assert torch.allclose(d.response(z), 0.5 * z[:, 0] - z[:, 2])
    assert d.channels == [0, 2]
    r = z[:, 0]
    assert torch.allclose(Target("l", channel=0).objective_value(r), r.abs().sum())
    assert torch.allclose(Target("l", channel=0, objective="mean").objective_value(r), r.mean())
    assert torch.allclose(
        Target("l", channel=0, objective="max").objective_value(r),
        r.reshape(2, -1).max(1).values.sum(),
    )
    custom = Target("l", channel=0, objective=lambda t: (t**2).sum())
    assert torch.allclose(custom.objective_value(r), (r**2).sum())
    with pytest.raises(TargetError, match="scalar"):
        Target("l", channel=0, objective=lambda t: t).objective_value(r)
