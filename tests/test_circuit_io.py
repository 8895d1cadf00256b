"""Circuit files: exact round trip, and clear errors for damaged or edited files."""

from __future__ import annotations

import json

import pytest
import torch
from _nets import make
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from netcarve.circuits.circuit import Circuit, load_circuit
from netcarve.circuits.extract import extract
from netcarve.circuits.files import CircuitFileError


@pytest.fixture(scope="module")
def circuit():
    net, _ = make("resnet", double=False)
    x = net.example_input(12)
    from netcarve.core.graph import ModelGraph

    g = ModelGraph.build(net, x[:1])
    conv = [n for n, i in g.layers.items() if i.kind == "conv"][-1]
    return extract(net, f"{conv}:1@1,1", x, keep=0.3, criterion="actgrad", graph=g)


def test_round_trip_is_exact(circuit, tmp_path):
    path = tmp_path / "c.safetensors"
    circuit.save(path)
    back = Circuit.load(path)
    assert back.target == circuit.target and back.target.position == (1, 1)
    assert back.criterion == circuit.criterion and back.keep == circuit.keep
    assert list(back.masks) == list(circuit.masks)
    for n in circuit.masks:
        assert torch.equal(back.masks[n], circuit.masks[n])
        assert torch.equal(back.relevant[n], circuit.relevant[n])
        assert torch.equal(back.scores[n], circuit.scores[n].float())
    assert back.selected == circuit.selected and back.collapsed == circuit.collapsed
    assert back.preservation.pearson == circuit.preservation.pearson
    assert back.metadata["model_fingerprint"] == circuit.metadata["model_fingerprint"]
    assert back.summary() == circuit.summary()


def test_direction_target_round_trip(tmp_path):
    net, _ = make("plain", double=False)
    x = net.example_input(8)
    from netcarve.core.targets import Target

    t = Target.from_direction("features.4", [1, 0, -2, 0, 0, 0.5])
    c = extract(net, t, x, keep=0.5)
    c.save(tmp_path / "d.safetensors")
    back = load_circuit(tmp_path / "d.safetensors")
    assert torch.equal(back.target.direction, t.direction)
    assert back.target.channels == [0, 2, 5]


def test_missing_truncated_foreign_and_edited_files(circuit, tmp_path):
    with pytest.raises(CircuitFileError, match="not found"):
        load_circuit(tmp_path / "nope.safetensors")
    path = tmp_path / "c.safetensors"
    circuit.save(path)
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) - 40])
    with pytest.raises(CircuitFileError, match="truncated"):
        load_circuit(cut)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(CircuitFileError, match="not a netcarve circuit"):
        load_circuit(foreign)
    # Flip one kept kernel and write the file back with the original header.
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    key = next(k for k in tensors if k.startswith("mask/") and tensors[k].any())
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[int(torch.nonzero(tensors[key].view(-1))[0])] = 0
    edited = tmp_path / "edited.safetensors"
    save_file(tensors, str(edited), metadata=meta)
    with pytest.raises(CircuitFileError, match="checksum"):
        load_circuit(edited)
    header = json.loads(meta["netcarve_circuit"])
    del header["target"]
    bad = tmp_path / "bad.safetensors"
    save_file(load_file(str(path)), str(bad), metadata={"netcarve_circuit": json.dumps(header)})
    with pytest.raises(CircuitFileError, match="malformed"):
        load_circuit(bad)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x80\x04not a safetensors file at all")
    with pytest.raises(CircuitFileError):
        load_circuit(garbage)
