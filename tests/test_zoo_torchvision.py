"""The torchvision-shaped architectures: exact state-dict keys/shapes, sizes, forward passes.

The expected key lists below are torchvision's, written out by hand so that a change in
``netcarve.zoo.torchvision_models`` that breaks weight compatibility fails loudly.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from netcarve.core.errors import ModelSpecError
from netcarve.data.preset import Preset
from netcarve.zoo.torchvision_models import (
    IMAGENET_PRESET,
    TORCHVISION_ARCHITECTURES,
    build_torchvision_model,
)

# fmt: off
ALEXNET_EXPECTED: dict[str, tuple[int, ...]] = {
    "features.0.weight": (64, 3, 11, 11),
    "features.0.bias": (64,),
    "features.3.weight": (192, 64, 5, 5),
    "features.3.bias": (192,),
    "features.6.weight": (384, 192, 3, 3),
    "features.6.bias": (384,),
    "features.8.weight": (256, 384, 3, 3),
    "features.8.bias": (256,),
    "features.10.weight": (256, 256, 3, 3),
    "features.10.bias": (256,),
    "classifier.1.weight": (4096, 9216),
    "classifier.1.bias": (4096,),
    "classifier.4.weight": (4096, 4096),
    "classifier.4.bias": (4096,),
    "classifier.6.weight": (1000, 4096),
    "classifier.6.bias": (1000,),
}

VGG11_EXPECTED: dict[str, tuple[int, ...]] = {
    "features.0.weight": (64, 3, 3, 3),
    "features.0.bias": (64,),
    "features.3.weight": (128, 64, 3, 3),
    "features.3.bias": (128,),
    "features.6.weight": (256, 128, 3, 3),
    "features.6.bias": (256,),
    "features.8.weight": (256, 256, 3, 3),
    "features.8.bias": (256,),
    "features.11.weight": (512, 256, 3, 3),
    "features.11.bias": (512,),
    "features.13.weight": (512, 512, 3, 3),
    "features.13.bias": (512,),
    "features.16.weight": (512, 512, 3, 3),
    "features.16.bias": (512,),
    "features.18.weight": (512, 512, 3, 3),
    "features.18.bias": (512,),
    "classifier.0.weight": (4096, 25088),
    "classifier.0.bias": (4096,),
    "classifier.3.weight": (4096, 4096),
    "classifier.3.bias": (4096,),
    "classifier.6.weight": (1000, 4096),
    "classifier.6.bias": (1000,),
}

VGG11_BN_EXPECTED: dict[str, tuple[int, ...]] = {
    "features.0.weight": (64, 3, 3, 3),
    "features.0.bias": (64,),
    "features.1.weight": (64,),
    "features.1.bias": (64,),
    "features.1.running_mean": (64,),
    "features.1.running_var": (64,),
    "features.1.num_batches_tracked": (),
    "features.4.weight": (128, 64, 3, 3),
    "features.4.bias": (128,),
    "features.5.weight": (128,),
    "features.5.bias": (128,),
    "features.5.running_mean": (128,),
    "features.5.running_var": (128,),
    "features.5.num_batches_tracked": (),
    "features.8.weight": (256, 128, 3, 3),
    "features.8.bias": (256,),
    "features.9.weight": (256,),
    "features.9.bias": (256,),
    "features.9.running_mean": (256,),
    "features.9.running_var": (256,),
    "features.9.num_batches_tracked": (),
    "features.11.weight": (256, 256, 3, 3),
    "features.11.bias": (256,),
    "features.12.weight": (256,),
    "features.12.bias": (256,),
    "features.12.running_mean": (256,),
    "features.12.running_var": (256,),
    "features.12.num_batches_tracked": (),
    "features.15.weight": (512, 256, 3, 3),
    "features.15.bias": (512,),
    "features.16.weight": (512,),
    "features.16.bias": (512,),
    "features.16.running_mean": (512,),
    "features.16.running_var": (512,),
    "features.16.num_batches_tracked": (),
    "features.18.weight": (512, 512, 3, 3),
    "features.18.bias": (512,),
    "features.19.weight": (512,),
    "features.19.bias": (512,),
    "features.19.running_mean": (512,),
    "features.19.running_var": (512,),
    "features.19.num_batches_tracked": (),
    "features.22.weight": (512, 512, 3, 3),
    "features.22.bias": (512,),
    "features.23.weight": (512,),
    "features.23.bias": (512,),
    "features.23.running_mean": (512,),
    "features.23.running_var": (512,),
    "features.23.num_batches_tracked": (),
    "features.25.weight": (512, 512, 3, 3),
    "features.25.bias": (512,),
    "features.26.weight": (512,),
    "features.26.bias": (512,),
    "features.26.running_mean": (512,),
    "features.26.running_var": (512,),
    "features.26.num_batches_tracked": (),
    "classifier.0.weight": (4096, 25088),
    "classifier.0.bias": (4096,),
    "classifier.3.weight": (4096, 4096),
    "classifier.3.bias": (4096,),
    "classifier.6.weight": (1000, 4096),
    "classifier.6.bias": (1000,),
}

VGG16_EXPECTED: dict[str, tuple[int, ...]] = {
    "features.0.weight": (64, 3, 3, 3),
    "features.0.bias": (64,),
    "features.2.weight": (64, 64, 3, 3),
    "features.2.bias": (64,),
    "features.5.weight": (128, 64, 3, 3),
    "features.5.bias": (128,),
    "features.7.weight": (128, 128, 3, 3),
    "features.7.bias": (128,),
    "features.10.weight": (256, 128, 3, 3),
    "features.10.bias": (256,),
    "features.12.weight": (256, 256, 3, 3),
    "features.12.bias": (256,),
    "features.14.weight": (256, 256, 3, 3),
    "features.14.bias": (256,),
    "features.17.weight": (512, 256, 3, 3),
    "features.17.bias": (512,),
    "features.19.weight": (512, 512, 3, 3),
    "features.19.bias": (512,),
    "features.21.weight": (512, 512, 3, 3),
    "features.21.bias": (512,),
    "features.24.weight": (512, 512, 3, 3),
    "features.24.bias": (512,),
    "features.26.weight": (512, 512, 3, 3),
    "features.26.bias": (512,),
    "features.28.weight": (512, 512, 3, 3),
    "features.28.bias": (512,),
    "classifier.0.weight": (4096, 25088),
    "classifier.0.bias": (4096,),
    "classifier.3.weight": (4096, 4096),
    "classifier.3.bias": (4096,),
    "classifier.6.weight": (1000, 4096),
    "classifier.6.bias": (1000,),
}

VGG16_BN_EXPECTED: dict[str, tuple[int, ...]] = {
    "features.0.weight": (64, 3, 3, 3),
    "features.0.bias": (64,),
    "features.1.weight": (64,),
    "features.1.bias": (64,),
    "features.1.running_mean": (64,),
    "features.1.running_var": (64,),
    "features.1.num_batches_tracked": (),
    "features.3.weight": (64, 64, 3, 3),
    "features.3.bias": (64,),
    "features.4.weight": (64,),
    "features.4.bias": (64,),
    "features.4.running_mean": (64,),
    "features.4.running_var": (64,),
    "features.4.num_batches_tracked": (),
    "features.7.weight": (128, 64, 3, 3),
    "features.7.bias": (128,),
    "features.8.weight": (128,),
    "features.8.bias": (128,),
    "features.8.running_mean": (128,),
    "features.8.running_var": (128,),
    "features.8.num_batches_tracked": (),
    "features.10.weight": (128, 128, 3, 3),
    "features.10.bias": (128,),
    "features.11.weight": (128,),
    "features.11.bias": (128,),
    "features.11.running_mean": (128,),
    "features.11.running_var": (128,),
    "features.11.num_batches_tracked": (),
    "features.14.weight": (256, 128, 3, 3),
    "features.14.bias": (256,),
    "features.15.weight": (256,),
    "features.15.bias": (256,),
    "features.15.running_mean": (256,),
    "features.15.running_var": (256,),
    "features.15.num_batches_tracked": (),
    "features.17.weight": (256, 256, 3, 3),
    "features.17.bias": (256,),
    "features.18.weight": (256,),
    "features.18.bias": (256,),
    "features.18.running_mean": (256,),
    "features.18.running_var": (256,),
    "features.18.num_batches_tracked": (),
    "features.20.weight": (256, 256, 3, 3),
    "features.20.bias": (256,),
    "features.21.weight": (256,),
    "features.21.bias": (256,),
    "features.21.running_mean": (256,),
    "features.21.running_var": (256,),
    "features.21.num_batches_tracked": (),
    "features.24.weight": (512, 256, 3, 3),
    "features.24.bias": (512,),
    "features.25.weight": (512,),
    "features.25.bias": (512,),
    "features.25.running_mean": (512,),
    "features.25.running_var": (512,),
    "features.25.num_batches_tracked": (),
    "features.27.weight": (512, 512, 3, 3),
    "features.27.bias": (512,),
    "features.28.weight": (512,),
    "features.28.bias": (512,),
    "features.28.running_mean": (512,),
    "features.28.running_var": (512,),
    "features.28.num_batches_tracked": (),
    "features.30.weight": (512, 512, 3, 3),
    "features.30.bias": (512,),
    "features.31.weight": (512,),
    "features.31.bias": (512,),
    "features.31.running_mean": (512,),
    "features.31.running_var": (512,),
    "features.31.num_batches_tracked": (),
    "features.34.weight": (512, 512, 3, 3),
    "features.34.bias": (512,),
    "features.35.weight": (512,),
    "features.35.bias": (512,),
    "features.35.running_mean": (512,),
    "features.35.running_var": (512,),
    "features.35.num_batches_tracked": (),
    "features.37.weight": (512, 512, 3, 3),
    "features.37.bias": (512,),
    "features.38.weight": (512,),
    "features.38.bias": (512,),
    "features.38.running_mean": (512,),
    "features.38.running_var": (512,),
    "features.38.num_batches_tracked": (),
    "features.40.weight": (512, 512, 3, 3),
    "features.40.bias": (512,),
    "features.41.weight": (512,),
    "features.41.bias": (512,),
    "features.41.running_mean": (512,),
    "features.41.running_var": (512,),
    "features.41.num_batches_tracked": (),
    "classifier.0.weight": (4096, 25088),
    "classifier.0.bias": (4096,),
    "classifier.3.weight": (4096, 4096),
    "classifier.3.bias": (4096,),
    "classifier.6.weight": (1000, 4096),
    "classifier.6.bias": (1000,),
}

RESNET18_EXPECTED: dict[str, tuple[int, ...]] = {
    "conv1.weight": (64, 3, 7, 7),
    "bn1.weight": (64,),
    "bn1.bias": (64,),
    "bn1.running_mean": (64,),
    "bn1.running_var": (64,),
    "bn1.num_batches_tracked": (),
    "layer1.0.conv1.weight": (64, 64, 3, 3),
    "layer1.0.bn1.weight": (64,),
    "layer1.0.bn1.bias": (64,),
    "layer1.0.bn1.running_mean": (64,),
    "layer1.0.bn1.running_var": (64,),
    "layer1.0.bn1.num_batches_tracked": (),
    "layer1.0.conv2.weight": (64, 64, 3, 3),
    "layer1.0.bn2.weight": (64,),
    "layer1.0.bn2.bias": (64,),
    "layer1.0.bn2.running_mean": (64,),
    "layer1.0.bn2.running_var": (64,),
    "layer1.0.bn2.num_batches_tracked": (),
    "layer1.1.conv1.weight": (64, 64, 3, 3),
    "layer1.1.bn1.weight": (64,),
    "layer1.1.bn1.bias": (64,),
    "layer1.1.bn1.running_mean": (64,),
    "layer1.1.bn1.running_var": (64,),
    "layer1.1.bn1.num_batches_tracked": (),
    "layer1.1.conv2.weight": (64, 64, 3, 3),
    "layer1.1.bn2.weight": (64,),
    "layer1.1.bn2.bias": (64,),
    "layer1.1.bn2.running_mean": (64,),
    "layer1.1.bn2.running_var": (64,),
    "layer1.1.bn2.num_batches_tracked": (),
    "layer2.0.conv1.weight": (128, 64, 3, 3),
    "layer2.0.bn1.weight": (128,),
    "layer2.0.bn1.bias": (128,),
    "layer2.0.bn1.running_mean": (128,),
    "layer2.0.bn1.running_var": (128,),
    "layer2.0.bn1.num_batches_tracked": (),
    "layer2.0.conv2.weight": (128, 128, 3, 3),
    "layer2.0.bn2.weight": (128,),
    "layer2.0.bn2.bias": (128,),
    "layer2.0.bn2.running_mean": (128,),
    "layer2.0.bn2.running_var": (128,),
    "layer2.0.bn2.num_batches_tracked": (),
    "layer2.0.downsample.0.weight": (128, 64, 1, 1),
    "layer2.0.downsample.1.weight": (128,),
    "layer2.0.downsample.1.bias": (128,),
    "layer2.0.downsample.1.running_mean": (128,),
    "layer2.0.downsample.1.running_var": (128,),
    "layer2.0.downsample.1.num_batches_tracked": (),
    "layer2.1.conv1.weight": (128, 128, 3, 3),
    "layer2.1.bn1.weight": (128,),
    "layer2.1.bn1.bias": (128,),
    "layer2.1.bn1.running_mean": (128,),
    "layer2.1.bn1.running_var": (128,),
    "layer2.1.bn1.num_batches_tracked": (),
    "layer2.1.conv2.weight": (128, 128, 3, 3),
    "layer2.1.bn2.weight": (128,),
    "layer2.1.bn2.bias": (128,),
    "layer2.1.bn2.running_mean": (128,),
    "layer2.1.bn2.running_var": (128,),
    "layer2.1.bn2.num_batches_tracked": (),
    "layer3.0.conv1.weight": (256, 128, 3, 3),
    "layer3.0.bn1.weight": (256,),
    "layer3.0.bn1.bias": (256,),
    "layer3.0.bn1.running_mean": (256,),
    "layer3.0.bn1.running_var": (256,),
    "layer3.0.bn1.num_batches_tracked": (),
    "layer3.0.conv2.weight": (256, 256, 3, 3),
    "layer3.0.bn2.weight": (256,),
    "layer3.0.bn2.bias": (256,),
    "layer3.0.bn2.running_mean": (256,),
    "layer3.0.bn2.running_var": (256,),
    "layer3.0.bn2.num_batches_tracked": (),
    "layer3.0.downsample.0.weight": (256, 128, 1, 1),
    "layer3.0.downsample.1.weight": (256,),
    "layer3.0.downsample.1.bias": (256,),
    "layer3.0.downsample.1.running_mean": (256,),
    "layer3.0.downsample.1.running_var": (256,),
    "layer3.0.downsample.1.num_batches_tracked": (),
    "layer3.1.conv1.weight": (256, 256, 3, 3),
    "layer3.1.bn1.weight": (256,),
    "layer3.1.bn1.bias": (256,),
    "layer3.1.bn1.running_mean": (256,),
    "layer3.1.bn1.running_var": (256,),
    "layer3.1.bn1.num_batches_tracked": (),
    "layer3.1.conv2.weight": (256, 256, 3, 3),
    "layer3.1.bn2.weight": (256,),
    "layer3.1.bn2.bias": (256,),
    "layer3.1.bn2.running_mean": (256,),
    "layer3.1.bn2.running_var": (256,),
    "layer3.1.bn2.num_batches_tracked": (),
    "layer4.0.conv1.weight": (512, 256, 3, 3),
    "layer4.0.bn1.weight": (512,),
    "layer4.0.bn1.bias": (512,),
    "layer4.0.bn1.running_mean": (512,),
    "layer4.0.bn1.running_var": (512,),
    "layer4.0.bn1.num_batches_tracked": (),
    "layer4.0.conv2.weight": (512, 512, 3, 3),
    "layer4.0.bn2.weight": (512,),
    "layer4.0.bn2.bias": (512,),
    "layer4.0.bn2.running_mean": (512,),
    "layer4.0.bn2.running_var": (512,),
    "layer4.0.bn2.num_batches_tracked": (),
    "layer4.0.downsample.0.weight": (512, 256, 1, 1),
    "layer4.0.downsample.1.weight": (512,),
    "layer4.0.downsample.1.bias": (512,),
    "layer4.0.downsample.1.running_mean": (512,),
    "layer4.0.downsample.1.running_var": (512,),
    "layer4.0.downsample.1.num_batches_tracked": (),
    "layer4.1.conv1.weight": (512, 512, 3, 3),
    "layer4.1.bn1.weight": (512,),
    "layer4.1.bn1.bias": (512,),
    "layer4.1.bn1.running_mean": (512,),
    "layer4.1.bn1.running_var": (512,),
    "layer4.1.bn1.num_batches_tracked": (),
    "layer4.1.conv2.weight": (512, 512, 3, 3),
    "layer4.1.bn2.weight": (512,),
    "layer4.1.bn2.bias": (512,),
    "layer4.1.bn2.running_mean": (512,),
    "layer4.1.bn2.running_var": (512,),
    "layer4.1.bn2.num_batches_tracked": (),
    "fc.weight": (1000, 512),
    "fc.bias": (1000,),
}
# fmt: on

EXPECTED: dict[str, dict[str, tuple[int, ...]]] = {
    "alexnet": ALEXNET_EXPECTED,
    "vgg11": VGG11_EXPECTED,
    "vgg11_bn": VGG11_BN_EXPECTED,
    "vgg16": VGG16_EXPECTED,
    "vgg16_bn": VGG16_BN_EXPECTED,
    "resnet18": RESNET18_EXPECTED,
}

PARAMETER_COUNTS = {
    "alexnet": 61_100_840,
    "vgg11": 132_863_336,
    "vgg11_bn": 132_868_840,
    "vgg16": 138_357_544,
    "vgg16_bn": 138_365_992,
    "resnet18": 11_689_512,
}

# Module names (as torchvision's named_modules() gives them) and their types.
MODULE_NAMES: dict[str, dict[str, type[nn.Module]]] = {
    "alexnet": {
        "features": nn.Sequential,
        "features.0": nn.Conv2d,
        "features.2": nn.MaxPool2d,
        "features.8": nn.Conv2d,
        "features.12": nn.MaxPool2d,
        "avgpool": nn.AdaptiveAvgPool2d,
        "classifier.0": nn.Dropout,
        "classifier.6": nn.Linear,
    },
    "vgg11": {
        "features.18": nn.Conv2d,
        "features.20": nn.MaxPool2d,
        "avgpool": nn.AdaptiveAvgPool2d,
        "classifier.2": nn.Dropout,
        "classifier.6": nn.Linear,
    },
    "vgg11_bn": {
        "features.25": nn.Conv2d,
        "features.26": nn.BatchNorm2d,
        "features.27": nn.ReLU,
        "features.28": nn.MaxPool2d,
    },
    "vgg16": {
        "features.28": nn.Conv2d,
        "features.29": nn.ReLU,
        "features.30": nn.MaxPool2d,
    },
    "vgg16_bn": {
        "features.40": nn.Conv2d,
        "features.41": nn.BatchNorm2d,
        "features.43": nn.MaxPool2d,
    },
    "resnet18": {
        "conv1": nn.Conv2d,
        "bn1": nn.BatchNorm2d,
        "relu": nn.ReLU,
        "maxpool": nn.MaxPool2d,
        "layer1.0.relu": nn.ReLU,
        "layer2.0.downsample": nn.Sequential,
        "layer2.0.downsample.0": nn.Conv2d,
        "layer2.0.downsample.1": nn.BatchNorm2d,
        "layer3.1.conv2": nn.Conv2d,
        "layer4.1.bn2": nn.BatchNorm2d,
        "avgpool": nn.AdaptiveAvgPool2d,
        "fc": nn.Linear,
    },
}

# Smallest convenient input each architecture accepts (adaptive pooling does the rest).
SMALL_INPUT = {
    "alexnet": 64,
    "vgg11": 32,
    "vgg11_bn": 32,
    "vgg16": 32,
    "vgg16_bn": 32,
    "resnet18": 32,
}

NAMES = list(EXPECTED)


def test_registry_lists_exactly_the_six_architectures():
    assert sorted(TORCHVISION_ARCHITECTURES) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_architecture_matches_torchvision(name: str):
    torch.manual_seed(0)
    model = TORCHVISION_ARCHITECTURES[name]()
    state = model.state_dict()

    expected = EXPECTED[name]
    assert set(state) == set(expected), (
        f"missing: {sorted(set(expected) - set(state))}, "
        f"extra: {sorted(set(state) - set(expected))}"
    )
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert shapes == expected

    assert sum(p.numel() for p in model.parameters()) == PARAMETER_COUNTS[name]

    modules = dict(model.named_modules())
    for module_name, module_type in MODULE_NAMES[name].items():
        assert type(modules[module_name]) is module_type, module_name
    relus = [m for m in modules.values() if isinstance(m, nn.ReLU)]
    assert relus and all(m.inplace for m in relus)

    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, SMALL_INPUT[name], SMALL_INPUT[name]))
    assert out.shape == (1, 1000)
    assert torch.isfinite(out).all()


def test_resnet18_full_size_forward():
    torch.manual_seed(0)
    model = TORCHVISION_ARCHITECTURES["resnet18"]().eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 1000)


def test_resnet_block_uses_inplace_residual_add():
    model = TORCHVISION_ARCHITECTURES["resnet18"]()
    block = model.layer2[0]
    assert block.downsample is not None and model.layer2[1].downsample is None
    assert model.layer1[0].downsample is None
    # The residual add is in-place, as in torchvision: the block's output tensor is the
    # one bn2 produced (then relu'd in place), not a fresh tensor.
    seen: dict[str, torch.Tensor] = {}
    block.bn2.register_forward_hook(lambda m, i, o: seen.__setitem__("bn2", o))
    block.eval()
    with torch.no_grad():
        out = block(torch.randn(1, 64, 8, 8))
    assert out.data_ptr() == seen["bn2"].data_ptr()


@pytest.mark.parametrize("name", ["alexnet", "vgg11_bn", "resnet18"])
def test_num_classes_and_deterministic_construction(name: str):
    factory = TORCHVISION_ARCHITECTURES[name]
    torch.manual_seed(123)
    a = factory(num_classes=10)
    torch.manual_seed(123)
    b = factory(num_classes=10)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)

    last = "fc.weight" if name == "resnet18" else "classifier.6.weight"
    assert sa[last].shape[0] == 10
    a.eval()
    with torch.no_grad():
        out = a(torch.randn(1, 3, SMALL_INPUT[name], SMALL_INPUT[name]))
    assert out.shape == (1, 10)


def test_initialisation_follows_torchvision_scheme():
    torch.manual_seed(0)
    model = TORCHVISION_ARCHITECTURES["resnet18"]()
    assert torch.equal(model.bn1.weight, torch.ones(64))
    assert torch.equal(model.bn1.bias, torch.zeros(64))
    # kaiming normal, fan_out, relu: std = sqrt(2 / (out_channels * k * k))
    w = model.layer4[0].conv1.weight
    expected_std = (2.0 / (512 * 3 * 3)) ** 0.5
    assert abs(w.std().item() - expected_std) / expected_std < 0.05


def test_build_by_name_and_bad_name():
    model = build_torchvision_model("ResNet18", num_classes=7)
    assert model.fc.out_features == 7
    with pytest.raises(ModelSpecError, match="resnet18"):
        build_torchvision_model("resnet19")


def test_imagenet_preset():
    assert isinstance(IMAGENET_PRESET, Preset)
    assert IMAGENET_PRESET.size == 224
    assert IMAGENET_PRESET.channels == 3
    assert IMAGENET_PRESET.mean == (0.485, 0.456, 0.406)
    assert IMAGENET_PRESET.std == (0.229, 0.224, 0.225)
    assert IMAGENET_PRESET.num_classes == 1000
    assert IMAGENET_PRESET.class_names[0] == "class_0"
    assert IMAGENET_PRESET.class_names[999] == "class_999"
    assert IMAGENET_PRESET.dataset == "imagenet"


@pytest.mark.parametrize("name", NAMES)
def test_keys_match_real_torchvision_if_installed(name: str):
    tv_models = pytest.importorskip("torchvision.models")
    reference = getattr(tv_models, name)(weights=None)
    ours = TORCHVISION_ARCHITECTURES[name]()
    ref_shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert our_shapes == ref_shapes
    assert [n for n, _ in ours.named_modules()] == [n for n, _ in reference.named_modules()]
