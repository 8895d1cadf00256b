"""The user's model comes back exactly as it was after every API call: on success, and when the
model itself raises from inside its forward pass (a hook of the user's that fails, Ctrl-C)."""

from __future__ import annotations

import pytest
import torch
from _state import assert_unchanged, snapshot

from netcarve.car.scores import car_scores
from netcarve.circuits.extract import extract, score_kernels
from netcarve.core.errors import NetcarveError
from netcarve.core.graph import ModelGraph
from netcarve.function.descriptors import describe_filters
from netcarve.function.pruning import functional_prune
from netcarve.surgery.prune import prune_filters
from netcarve.viz.render import visualize
from netcarve.zoo import load_model


@pytest.fixture(scope="module")
def setup():
    lm = load_model("fmnist_vgg")
    x = torch.zeros(16, 1, 28, 28).normal_(generator=torch.Generator().manual_seed(0))
    y = torch.arange(16) % 10
    graph = ModelGraph.build(lm.model, x[:1])
    circuit = extract(lm.model, "features.7:2", x, keep=0.3, graph=graph)
    return lm, x, y, graph, circuit


def _calls(lm, x, y, graph, circuit):
    masks = {"features.4": torch.arange(64) % 2 == 0}
    return {
        "extract": lambda m: extract(m, "features.11:5", x, keep=0.5, graph=graph),
        "score_kernels": lambda m: score_kernels(m, graph, "features.11:5", x),
        "car_scores": lambda m: car_scores(m, x, y, layers="features.11", graph=graph),
        "visualize": lambda m: visualize(m, "features.11", channels=[0], preset=lm.preset,
                                         steps=2),
        "describe_filters": lambda m: describe_filters(m, "features.7", x,
                                                       descriptors=("profile",),
                                                       preset=lm.preset, graph=graph),
        "to_module": lambda m: circuit.to_module(m, graph),
        "prune_filters": lambda m: prune_filters(m, masks, graph=graph, example_input=x[:1],
                                                 check_input=x[:2]),
        "functional_prune": lambda m: functional_prune(m, "features.4", x, y, preset=lm.preset,
                                                       descriptors=("profile",)),
    }


NAMES = ["extract", "score_kernels", "car_scores", "visualize", "describe_filters", "to_module",
         "prune_filters", "functional_prune"]


@pytest.mark.parametrize("name", NAMES)
def test_unchanged_after_success(setup, name):
    lm, x, y, graph, circuit = setup
    model = lm.model
    snap = snapshot(model)
    _calls(lm, x, y, graph, circuit)[name](model)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("raised", [RuntimeError("user hook failed"), KeyboardInterrupt()],
                         ids=["RuntimeError", "KeyboardInterrupt"])
@pytest.mark.parametrize("name", NAMES)
def test_unchanged_after_an_exception_from_inside_forward(setup, name, raised):
    lm, x, y, graph, circuit = setup
    model = lm.model
    calls = {"n": 0}

    def failing_hook(module, inputs, output):
        calls["n"] += 1
        raise raised

    handle = model.features[11].register_forward_hook(failing_hook)
    try:
        snap = snapshot(model)  # the user's own hook is part of what must come back
        try:
            _calls(lm, x, y, graph, circuit)[name](model)
        except NetcarveError as exc:  # wrapped with context (e.g. while building the graph)
            assert "user hook failed" in str(exc) and isinstance(raised, RuntimeError), exc
        except (RuntimeError, KeyboardInterrupt) as exc:
            assert exc is raised, exc
        else:
            # A call that never runs the user's forward (e.g. to_module reads weights only).
            assert calls["n"] == 0, f"{name} swallowed an exception raised by the model"
        assert_unchanged(model, snap)
    finally:
        handle.remove()
    assert not model.features[11]._forward_hooks


def test_training_mode_float64_and_train_mode_batchnorm_are_kept(setup):
    """Documented behaviour: analyses run in eval mode (BatchNorm uses its running statistics,
    dropout is off) whatever mode the model is in, in the model's own dtype, and the modes
    are restored afterwards."""
    lm, x, _y, graph, _ = setup
    model = lm.model
    eval_result = extract(model, "features.11:5", x, keep=0.5, graph=graph)
    model.train()
    try:
        snap = snapshot(model)
        train_result = extract(model, "features.11:5", x, keep=0.5, graph=graph)
        assert_unchanged(model, snap)
        assert model.training and all(m.training for m in model.modules())
    finally:
        model.eval()
    for layer, mask in eval_result.masks.items():
        assert torch.equal(mask, train_result.masks[layer]), "train mode changed the circuit"
    double = load_model("fmnist_vgg").model.double()
    c64 = extract(double, "features.11:5", x.double(), keep=0.5)
    assert next(double.parameters()).dtype == torch.float64
    agree = sum(int((c64.masks[k] == eval_result.masks[k]).sum()) for k in c64.masks)
    total = sum(m.numel() for m in c64.masks.values())
    assert agree / total > 0.98, "float64 and float32 circuits differ beyond near-ties"
