"""Safe weight reading/loading/saving: formats, wrappers, refusals, mismatch messages."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch
from _state import assert_unchanged
from _state import snapshot as model_snapshot
from torch import nn

from netcarve.core.errors import NetcarveError, WeightsError
from netcarve.core.weights import (
    is_safetensors,
    load_weights,
    read_metadata,
    read_state_dict,
    save_weights,
)


def make_model(seed: int = 0, classes: int = 4) -> nn.Module:
    """A tiny conv net with BN buffers (running stats, num_batches_tracked)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, classes),
    )


def trained_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict whose BN buffers are not the defaults."""
    model = make_model(seed)
    model.train()
    model(torch.randn(4, 3, 6, 6))
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_state_equal(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert got.keys() == state.keys()
    for key in state:
        assert torch.equal(got[key], state[key].to(got[key].dtype)), key


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- round trips


def test_safetensors_round_trip_with_metadata(tmp_path: Path):
    state = trained_state()
    path = save_weights(state, tmp_path / "sub" / "w.safetensors", {"arch": "tiny", "n": "4"})
    assert path == tmp_path / "sub" / "w.safetensors"
    assert is_safetensors(path)
    assert read_metadata(path) == {"arch": "tiny", "n": "4"}
    assert not list(path.parent.glob("*.tmp"))  # the temporary file is gone

    model = load_weights(make_model(seed=1), path)
    assert_state_equal(model, state)
    assert model.state_dict()["1.num_batches_tracked"].item() == 1


def test_save_from_module_and_no_metadata(tmp_path: Path):
    model = make_model()
    path = save_weights(model, tmp_path / "m.safetensors")
    assert read_metadata(path) == {}
    assert_state_equal(load_weights(make_model(seed=5), path), snapshot(model))


def test_safetensors_detected_by_content_not_extension(tmp_path: Path):
    state = trained_state()
    path = save_weights(state, tmp_path / "weights.bin")
    assert is_safetensors(path)
    loaded = read_state_dict(path)
    assert all(torch.equal(loaded[k], state[k]) for k in state)


@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy"])
def test_torch_save_state_dict_round_trip(tmp_path: Path, zipfile: bool):
    state = trained_state()
    path = tmp_path / "w.pt"
    torch.save(state, path, _use_new_zipfile_serialization=zipfile)
    assert not is_safetensors(path)
    assert_state_equal(load_weights(make_model(seed=3), path), state)


def test_torch_file_named_safetensors_still_loads(tmp_path: Path):
    state = trained_state()
    path = tmp_path / "actually_torch.safetensors"
    torch.save(state, path)
    loaded = read_state_dict(path)
    assert loaded.keys() == state.keys()


def test_dataparallel_prefix_is_stripped(tmp_path: Path):
    state = trained_state()
    path = tmp_path / "dp.pt"
    torch.save({f"module.{k}": v for k, v in state.items()}, path)
    assert set(read_state_dict(path)) == set(state)
    assert_state_equal(load_weights(make_model(seed=2), path), state)
    # Also for an in-memory mapping.
    prefixed = {f"module.{k}": v for k, v in state.items()}
    assert_state_equal(load_weights(make_model(seed=2), prefixed), state)


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_wrapped_checkpoint_is_unwrapped(tmp_path: Path, wrapper: str):
    state = trained_state()
    path = tmp_path / "ckpt.pth"
    torch.save(
        {wrapper: {f"module.{k}": v for k, v in state.items()}, "epoch": 7, "optim": {"lr": 0.1}},
        path,
    )
    assert set(read_state_dict(path)) == set(state)
    assert_state_equal(load_weights(make_model(seed=4), path), state)


def test_values_are_cast_to_model_dtype():
    state = {k: (v.double() if v.is_floating_point() else v) for k, v in trained_state().items()}
    model = load_weights(make_model(seed=1), state)
    assert model[0].weight.dtype == torch.float32
    assert torch.allclose(model[0].weight, state["0.weight"].float())


def test_save_handles_shared_and_non_contiguous_tensors(tmp_path: Path):
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.Linear(4, 4, bias=False)
            self.decoder = nn.Linear(4, 4, bias=False)
            self.decoder.weight = self.encoder.weight

    tied = Tied()
    path = save_weights(tied, tmp_path / "tied.safetensors")
    loaded = read_state_dict(path)
    assert torch.equal(loaded["encoder.weight"], loaded["decoder.weight"])

    base = torch.arange(12.0).reshape(3, 4)
    path = save_weights({"t": base.t(), "row": base[1]}, tmp_path / "views.safetensors")
    loaded = read_state_dict(path)
    assert torch.equal(loaded["t"], base.t())
    assert torch.equal(loaded["row"], base[1])


# --------------------------------------------------------------------------- refusals


class CustomThing:
    """A class that weights-only loading must refuse to rebuild."""

    def __init__(self) -> None:
        self.value = 3


def _create_marker(path: str) -> None:
    Path(path).write_text("the pickle ran code")


class SideEffect:
    """Unpickling this would call ``func(*args)`` — which must never happen."""

    def __init__(self, func: object, args: tuple) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def test_pickle_with_custom_class_is_refused(tmp_path: Path):
    path = tmp_path / "custom.pt"
    torch.save({"0.weight": torch.zeros(2), "extra": CustomThing()}, path)
    with pytest.raises(WeightsError) as info:
        read_state_dict(path)
    message = str(info.value)
    assert str(path) in message
    assert "CustomThing" in message
    assert "state_dict()" in message and "save_file" in message


@pytest.mark.parametrize("via_builtin", [False, True], ids=["function", "builtin-open"])
def test_reduce_side_effect_never_runs(tmp_path: Path, via_builtin: bool):
    marker = tmp_path / "pwned.txt"
    payload = SideEffect(open, (str(marker), "w")) if via_builtin else None
    if payload is None:
        payload = SideEffect(_create_marker, (str(marker),))
    for name in ("evil.pt", "evil.safetensors"):
        path = tmp_path / name
        torch.save({"weight": payload}, path)
        with pytest.raises(WeightsError, match="refusing"):
            read_state_dict(path)
        with pytest.raises(WeightsError):
            load_weights(make_model(), path)
    assert not marker.exists()


def test_whole_model_pickle_is_refused(tmp_path: Path):
    path = tmp_path / "whole.pt"
    torch.save(make_model(), path)
    with pytest.raises(WeightsError, match=r"state_dict\(\)"):
        read_state_dict(path)


def test_non_tensor_entries_and_non_dicts_are_rejected(tmp_path: Path):
    path = tmp_path / "mixed.pt"
    torch.save({"w": torch.zeros(1), "note": "hello"}, path)
    with pytest.raises(WeightsError, match="note"):
        read_state_dict(path)
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(WeightsError, match="list"):
        read_state_dict(path)


# --------------------------------------------------------------------------- broken files


def test_missing_file(tmp_path: Path):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(WeightsError, match="not found") as info:
        read_state_dict(path)
    assert str(path) in str(info.value)
    with pytest.raises(WeightsError, match="not found"):
        load_weights(make_model(), path)
    with pytest.raises(WeightsError, match="not found"):
        read_metadata(path)


def test_directory_and_empty_file(tmp_path: Path):
    with pytest.raises(WeightsError, match="not a file"):
        read_state_dict(tmp_path)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(WeightsError, match="empty"):
        read_state_dict(empty)


def test_truncated_torch_files(tmp_path: Path):
    full = tmp_path / "full.pt"
    torch.save(trained_state(), full)
    data = full.read_bytes()
    for cut in (10, len(data) // 2, len(data) - 5):
        path = tmp_path / f"cut{cut}.pt"
        path.write_bytes(data[:cut])
        with pytest.raises(WeightsError) as info:
            read_state_dict(path)
        assert str(path) in str(info.value)

    legacy = tmp_path / "legacy.pt"
    torch.save(trained_state(), legacy, _use_new_zipfile_serialization=False)
    cut_legacy = tmp_path / "legacy_cut.pt"
    cut_legacy.write_bytes(legacy.read_bytes()[:200])
    with pytest.raises(WeightsError, match="truncated") as info:
        read_state_dict(cut_legacy)
    assert str(cut_legacy) in str(info.value)


def test_truncated_and_corrupt_safetensors(tmp_path: Path):
    full = save_weights(trained_state(), tmp_path / "full.safetensors", {"a": "b"})
    data = full.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])

    in_data = tmp_path / "in_data.safetensors"
    in_data.write_bytes(data[: 8 + header_len + 10])
    with pytest.raises(WeightsError, match="truncated") as info:
        read_state_dict(in_data)
    assert str(in_data) in str(info.value)
    # The metadata is in the intact header, and reading it does not touch the tensors.
    assert read_metadata(in_data) == {"a": "b"}

    in_header = tmp_path / "in_header.safetensors"
    in_header.write_bytes(data[: 8 + header_len // 2])
    with pytest.raises(WeightsError, match="truncated"):
        read_state_dict(in_header)
    with pytest.raises(WeightsError, match="truncated"):
        read_metadata(in_header)

    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(data[:5])
    with pytest.raises(WeightsError) as info:
        read_state_dict(tiny)
    assert str(tiny) in str(info.value)

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(data[:8] + b"{not json" + data[17:])
    with pytest.raises(WeightsError, match="not a valid safetensors"):
        read_state_dict(garbage)

    noise = tmp_path / "noise.bin"
    noise.write_bytes(b"definitely not a checkpoint" * 20)
    with pytest.raises(WeightsError, match=r"noise\.bin"):
        read_state_dict(noise)


def test_read_metadata_of_torch_file_is_an_error(tmp_path: Path):
    path = tmp_path / "w.pt"
    torch.save(trained_state(), path)
    with pytest.raises(WeightsError, match="not a safetensors"):
        read_metadata(path)


def test_bad_metadata_and_bad_values_are_rejected(tmp_path: Path):
    with pytest.raises(WeightsError, match="metadata"):
        save_weights(trained_state(), tmp_path / "m.safetensors", {"epochs": 3})  # type: ignore[dict-item]
    with pytest.raises(WeightsError, match="only tensors"):
        save_weights({"w": [1, 2]}, tmp_path / "v.safetensors")  # type: ignore[dict-item]
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- mismatches


def test_missing_keys_are_listed_and_model_unchanged():
    model = make_model(seed=1)
    before = model_snapshot(model)
    state = trained_state()
    del state["5.weight"], state["1.running_var"]
    with pytest.raises(WeightsError) as info:
        load_weights(model, state)
    message = str(info.value)
    assert "2 missing key(s)" in message
    assert "5.weight" in message and "1.running_var" in message
    assert "unexpected" not in message
    assert "netcarve models" in message
    assert_unchanged(model, before)


def test_unexpected_keys_are_listed(tmp_path: Path):
    state = trained_state()
    state["head.extra.weight"] = torch.zeros(3)
    path = save_weights(state, tmp_path / "extra.safetensors")
    model = make_model(seed=1)
    before = model_snapshot(model)
    with pytest.raises(WeightsError) as info:
        load_weights(model, path)
    message = str(info.value)
    assert str(path) in message
    assert "1 unexpected key(s)" in message and "head.extra.weight" in message
    assert "missing" not in message
    assert_unchanged(model, before)


def test_shape_conflicts_are_listed_with_both_shapes_and_model_unchanged(tmp_path: Path):
    model = make_model(seed=1, classes=10)
    before = model_snapshot(model)
    state = trained_state()  # 4 classes
    path = save_weights(state, tmp_path / "four_classes.safetensors")
    with pytest.raises(WeightsError) as info:
        load_weights(model, path)
    message = str(info.value)
    assert "2 shape conflict(s)" in message
    assert "5.weight: model expects [10, 8], file has [4, 8]" in message
    assert "5.bias: model expects [10], file has [4]" in message
    assert_unchanged(model, before)

    # Shape conflicts are errors even when strict=False.
    with pytest.raises(WeightsError, match="shape conflict"):
        load_weights(model, state, strict=False)
    assert_unchanged(model, before)


def test_all_three_kinds_together_and_truncated_listing():
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(15)])  # keys 0.weight … 14.bias
    before = model_snapshot(model)
    state = {f"other.{i}": torch.zeros(1) for i in range(13)}
    state["0.weight"] = torch.zeros(3, 3)
    state["0.bias"] = torch.zeros(2)
    with pytest.raises(WeightsError) as info:
        load_weights(model, state)
    message = str(info.value)
    assert "28 missing key(s)" in message
    assert "… and 18 more" in message
    assert "13 unexpected key(s)" in message and "other.0" in message
    assert "… and 3 more" in message
    assert "0.weight: model expects [2, 2], state dict has [3, 3]" in message
    assert len(message.splitlines()) < 40
    assert_unchanged(model, before)


def test_prefix_hint():
    state = {f"backbone.{k}": v for k, v in trained_state().items()}
    with pytest.raises(WeightsError, match=r"'backbone\.' prefix"):
        load_weights(make_model(), state)


def test_non_strict_loads_the_common_keys():
    state = trained_state()
    del state["5.weight"]
    state["unused"] = torch.ones(1)
    model = make_model(seed=9)
    old_head = model[5].weight.detach().clone()
    load_weights(model, state, strict=False)
    assert torch.equal(model[0].weight, state["0.weight"])
    assert torch.equal(model[5].weight, old_head)


def test_errors_are_netcarve_errors_with_exit_code(tmp_path: Path):
    with pytest.raises(NetcarveError) as info:
        read_state_dict(tmp_path / "missing.pt")
    assert info.value.exit_code == WeightsError.exit_code
    with pytest.raises(WeightsError):
        load_weights(make_model(), 42)  # type: ignore[arg-type]
