"""Device names are resolved and checked before any work starts."""

from __future__ import annotations

import pytest
import torch

from netcarve.core.devices import DeviceError, resolve_device
from netcarve.zoo import load_model


def test_auto_and_cpu():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


@pytest.mark.parametrize("spec, text", [("tpu", "unknown device"), ("", "unknown device"),
                                        ("cuda:x", "unknown device"), (3, "must be a string")])
def test_unknown_names_are_refused_with_the_choices(spec, text):
    with pytest.raises(DeviceError, match=text) as info:
        resolve_device(spec)
    assert info.value.exit_code == 2
    if text == "unknown device":
        assert "auto, cpu, cuda, cuda:N or mps" in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_cuda_without_cuda_is_refused_before_the_model_is_built():
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        load_model("fmnist_vgg", device="cuda:1")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_gpu_index_beyond_the_machine_is_refused():
    n = torch.cuda.device_count()
    assert resolve_device(f"cuda:{n - 1}") == torch.device(f"cuda:{n - 1}")
    with pytest.raises(DeviceError, match=f"has {n} CUDA"):
        resolve_device(f"cuda:{n}")
