"""ImageNet architectures whose parameters line up exactly with torchvision's.

The classes here are written from scratch (torchvision is an optional dependency that
netcarve never imports), but every ``state_dict()`` key, every tensor shape and every
``named_modules()`` name is the same as in torchvision, so a weight file saved from a
torchvision model (``torch.save(model.state_dict(), path)``) loads into the matching
factory below with :func:`netcarve.core.weights.load_weights`.

Like torchvision, the ReLUs are ``inplace=True`` and the residual addition in
:class:`BasicBlock` is written ``out += identity``; code that hooks or traces these models
has to cope with in-place operations.

Example:
    >>> import torch
    >>> from netcarve.zoo.torchvision_models import TORCHVISION_ARCHITECTURES
    >>> model = TORCHVISION_ARCHITECTURES["resnet18"](num_classes=10)
    >>> model(torch.zeros(1, 3, 64, 64)).shape
    torch.Size([1, 10])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from netcarve.core.errors import ModelSpecError
from netcarve.data.preset import Preset

__all__ = [
    "IMAGENET_PRESET",
    "TORCHVISION_ARCHITECTURES",
    "VGG",
    "AlexNet",
    "BasicBlock",
    "ResNet",
    "alexnet",
    "build_torchvision_model",
    "resnet18",
    "vgg11",
    "vgg11_bn",
    "vgg16",
    "vgg16_bn",
]

IMAGENET_PRESET = Preset(
    224,
    3,
    (0.485, 0.456, 0.406),
    (0.229, 0.224, 0.225),
    class_names=tuple(f"class_{i}" for i in range(1000)),
    dataset="imagenet",
    resize=256,
)
"""Input preset of the ImageNet models: the 224×224 centre crop of a 256 resize, RGB,
ImageNet mean/std, 1000 classes (named ``class_i`` until ``--class-names`` gives names)."""


# --------------------------------------------------------------------------- AlexNet


class AlexNet(nn.Module):
    """AlexNet in torchvision's layout (``features`` / ``avgpool`` / ``classifier``).

    Args:
        num_classes: number of output logits.
        dropout: dropout probability in the classifier.
    """

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),  # 0
            nn.ReLU(inplace=True),  # 1
            nn.MaxPool2d(kernel_size=3, stride=2),  # 2
            nn.Conv2d(64, 192, kernel_size=5, padding=2),  # 3
            nn.ReLU(inplace=True),  # 4
            nn.MaxPool2d(kernel_size=3, stride=2),  # 5
            nn.Conv2d(192, 384, kernel_size=3, padding=1),  # 6
            nn.ReLU(inplace=True),  # 7
            nn.Conv2d(384, 256, kernel_size=3, padding=1),  # 8
            nn.ReLU(inplace=True),  # 9
            nn.Conv2d(256, 256, kernel_size=3, padding=1),  # 10
            nn.ReLU(inplace=True),  # 11
            nn.MaxPool2d(kernel_size=3, stride=2),  # 12
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout),  # 0
            nn.Linear(256 * 6 * 6, 4096),  # 1
            nn.ReLU(inplace=True),  # 2
            nn.Dropout(p=dropout),  # 3
            nn.Linear(4096, 4096),  # 4
            nn.ReLU(inplace=True),  # 5
            nn.Linear(4096, num_classes),  # 6
        )
        # torchvision keeps PyTorch's default initialisation for AlexNet.

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


# --------------------------------------------------------------------------- VGG

# "M" is a 2×2 max-pool, an int is a 3×3 convolution with that many output channels.
_VGG_CONFIGS: dict[str, tuple[int | str, ...]] = {
    "A": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "D": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
}


def _vgg_features(config: Sequence[int | str], batch_norm: bool) -> nn.Sequential:
    """Build VGG's ``features`` Sequential (conv [+ BN] + ReLU blocks and max-pools)."""
    layers: list[nn.Module] = []
    in_channels = 3
    for item in config:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        out_channels = int(item)
        layers.append(nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_channels))
        layers.append(nn.ReLU(inplace=True))
        in_channels = out_channels
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """VGG in torchvision's layout (``features`` / ``avgpool`` / ``classifier``).

    Args:
        features: the convolutional trunk (see :func:`vgg11` etc.).
        num_classes: number of output logits.
        dropout: dropout probability in the classifier.
    """

    def __init__(self, features: nn.Sequential, num_classes: int = 1000, dropout: float = 0.5):
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096),  # 0
            nn.ReLU(inplace=True),  # 1
            nn.Dropout(p=dropout),  # 2
            nn.Linear(4096, 4096),  # 3
            nn.ReLU(inplace=True),  # 4
            nn.Dropout(p=dropout),  # 5
            nn.Linear(4096, num_classes),  # 6
        )
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


# --------------------------------------------------------------------------- ResNet


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """ResNet's two-convolution residual block, named as in torchvision.

    Args:
        inplanes: input channels.
        planes: output channels of both convolutions.
        stride: stride of the first convolution (and of the shortcut projection).
        downsample: optional shortcut projection (``Sequential(conv1x1, BatchNorm2d)``).
    """

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x

        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)

        out = self.conv2(out)
        out = self.bn2(out)

        if self.downsample is not None:
            identity = self.downsample(x)

        out += identity
        out = self.relu(out)
        return out


class ResNet(nn.Module):
    """ResNet built from :class:`BasicBlock` s, in torchvision's layout.

    Args:
        layers: number of blocks in each of the four stages (``[2, 2, 2, 2]`` for ResNet18).
        num_classes: number of output logits.
    """

    def __init__(self, layers: Sequence[int], num_classes: int = 1000) -> None:
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"ResNet needs 4 stage depths, got {list(layers)}")
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * BasicBlock.expansion, num_classes)

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        # The final Linear keeps PyTorch's default initialisation, as in torchvision.

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample: nn.Module | None = None
        if stride != 1 or self.inplanes != planes * BasicBlock.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, planes * BasicBlock.expansion, stride),  # 0
                nn.BatchNorm2d(planes * BasicBlock.expansion),  # 1
            )
        stage: list[nn.Module] = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * BasicBlock.expansion
        for _ in range(1, blocks):
            stage.append(BasicBlock(self.inplanes, planes))
        return nn.Sequential(*stage)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)

        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)

        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


# --------------------------------------------------------------------------- factories


def alexnet(num_classes: int = 1000) -> AlexNet:
    """AlexNet (61,100,840 parameters with 1000 classes), keys as torchvision's ``alexnet``.

    Args:
        num_classes: number of output logits.

    Returns:
        a randomly initialised :class:`AlexNet` (deterministic under ``torch.manual_seed``).

    Example:
        >>> alexnet(num_classes=10).classifier[6].out_features
        10
    """
    return AlexNet(num_classes=num_classes)


def vgg11(num_classes: int = 1000) -> VGG:
    """VGG11 without batch norm (configuration "A"), keys as torchvision's ``vgg11``.

    Args:
        num_classes: number of output logits.

    Returns:
        a randomly initialised :class:`VGG` (deterministic under ``torch.manual_seed``).

    Example:
        >>> len(vgg11().features)
        21
    """
    return VGG(_vgg_features(_VGG_CONFIGS["A"], batch_norm=False), num_classes=num_classes)


def vgg11_bn(num_classes: int = 1000) -> VGG:
    """VGG11 with batch norm after every convolution, keys as torchvision's ``vgg11_bn``.

    Args:
        num_classes: number of output logits.

    Returns:
        a randomly initialised :class:`VGG` (deterministic under ``torch.manual_seed``).

    Example:
        >>> len(vgg11_bn().features)
        29
    """
    return VGG(_vgg_features(_VGG_CONFIGS["A"], batch_norm=True), num_classes=num_classes)


def vgg16(num_classes: int = 1000) -> VGG:
    """VGG16 without batch norm (configuration "D"), keys as torchvision's ``vgg16``.

    Args:
        num_classes: number of output logits.

    Returns:
        a randomly initialised :class:`VGG` (deterministic under ``torch.manual_seed``).

    Example:
        >>> len(vgg16().features)
        31
    """
    return VGG(_vgg_features(_VGG_CONFIGS["D"], batch_norm=False), num_classes=num_classes)


def vgg16_bn(num_classes: int = 1000) -> VGG:
    """VGG16 with batch norm after every convolution, keys as torchvision's ``vgg16_bn``.

    Args:
        num_classes: number of output logits.

    Returns:
        a randomly initialised :class:`VGG` (deterministic under ``torch.manual_seed``).

    Example:
        >>> len(vgg16_bn().features)
        44
    """
    return VGG(_vgg_features(_VGG_CONFIGS["D"], batch_norm=True), num_classes=num_classes)


def resnet18(num_classes: int = 1000) -> ResNet:
    """ResNet18 (11,689,512 parameters with 1000 classes), keys as torchvision's ``resnet18``.

    Args:
        num_classes: number of output logits.

    Returns:
        a randomly initialised :class:`ResNet` (deterministic under ``torch.manual_seed``).

    Example:
        >>> resnet18().layer2[0].downsample[0].stride
        (2, 2)
    """
    return ResNet([2, 2, 2, 2], num_classes=num_classes)


TORCHVISION_ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "alexnet": alexnet,
    "vgg11": vgg11,
    "vgg11_bn": vgg11_bn,
    "vgg16": vgg16,
    "vgg16_bn": vgg16_bn,
    "resnet18": resnet18,
}
"""Architecture name (torchvision's) → factory ``fn(num_classes=1000) -> nn.Module``."""


def build_torchvision_model(name: str, num_classes: int = 1000) -> nn.Module:
    """Construct one of :data:`TORCHVISION_ARCHITECTURES` by name.

    Args:
        name: architecture name such as ``"vgg16_bn"`` (case-insensitive, ``-`` allowed
            for ``_``).
        num_classes: number of output logits.

    Returns:
        the randomly initialised model.

    Raises:
        ModelSpecError: if the name is not one of the known architectures.

    Example:
        >>> build_torchvision_model("ResNet18", num_classes=10).fc.out_features
        10
    """
    key = name.strip().lower().replace("-", "_")
    factory = TORCHVISION_ARCHITECTURES.get(key)
    if factory is None:
        known = ", ".join(sorted(TORCHVISION_ARCHITECTURES))
        raise ModelSpecError(f"unknown torchvision architecture {name!r}; known: {known}")
    return factory(num_classes=num_classes)
