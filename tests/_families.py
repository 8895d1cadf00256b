"""Small models with the structures of the main CNN families (torchvision / timm shaped).

torchvision's wheels need CUDA on the test machines, so these are written from scratch with
the same building blocks, module names and forward-pass idioms as the real models (in-place
ReLUs, ``out += identity``, ``torch.cat`` of lists, ``x.chunk`` + channel shuffle, squeeze-
excitation gates, stochastic depth, NHWC ``permute`` + ``LayerNorm`` + ``Linear`` in ConvNeXt),
only narrower and shallower (the ResNet reuses the zoo's torchvision-shaped
:class:`~netcarve.zoo.torchvision_models.BasicBlock`). Every model takes ``[N, 3, 32, 32]``
and returns 10 logits.

:data:`FAMILIES` maps a family name to ``(factory, middle conv, late conv)``: the layers the
coverage tests and ``bench/coverage_table.py`` probe.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from netcarve.zoo.torchvision_models import BasicBlock

NUM_CLASSES = 10
INPUT_SHAPE = (3, 32, 32)


def _conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1,
             act: type[nn.Module] | None = nn.ReLU) -> nn.Sequential:
    """torchvision's ``Conv2dNormActivation``: conv (no bias) → BatchNorm → activation."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act is not None:
        layers.append(act(inplace=True) if act in (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.SiLU)
                      else act())
    return nn.Sequential(*layers)


def _stochastic_depth(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """torchvision.ops.stochastic_depth ("row" mode); the identity in eval mode."""
    if not training or p == 0.0:
        return x
    keep = torch.empty([x.shape[0]] + [1] * (x.ndim - 1), dtype=x.dtype, device=x.device)
    keep = keep.bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


class StochasticDepth(nn.Module):
    """torchvision.ops.StochasticDepth."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _stochastic_depth(x, self.p, self.training)


class SqueezeExcitation(nn.Module):
    """torchvision.ops.SqueezeExcitation: pool → 1×1 conv → act → 1×1 conv → gate × input."""

    def __init__(self, channels: int, squeeze: int, activation: type[nn.Module] = nn.ReLU,
                 scale_activation: type[nn.Module] = nn.Sigmoid) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = activation()
        self.scale_activation = scale_activation()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x


# --------------------------------------------------------------------------- AlexNet / VGG


class AlexNet(nn.Module):
    """torchvision AlexNet's layout: features / avgpool / classifier with dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 5, stride=2, padding=2), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2),
            nn.Conv2d(16, 24, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(24, 24, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(24, 16, 3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((3, 3))
        self.classifier = nn.Sequential(
            nn.Dropout(0.5), nn.Linear(16 * 9, 32), nn.ReLU(inplace=True),
            nn.Dropout(0.5), nn.Linear(32, NUM_CLASSES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


class VGG(nn.Module):
    """torchvision vgg*_bn's layout: conv-BN-ReLU stacks, max pools, a 3-layer classifier."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for v in (8, "M", 16, 16, "M", 24, 24, "M"):
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, int(v), 3, padding=1), nn.BatchNorm2d(int(v)),
                           nn.ReLU(inplace=True)]
                cin = int(v)
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(
            nn.Linear(24 * 4, 32), nn.ReLU(True), nn.Dropout(),
            nn.Linear(32, 32), nn.ReLU(True), nn.Dropout(),
            nn.Linear(32, NUM_CLASSES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


# --------------------------------------------------------------------------- ResNet / ResNeXt


def _shortcut(cin: int, cout: int, stride: int) -> nn.Sequential | None:
    """torchvision's projection shortcut (1×1 conv + BN) when the shape changes."""
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


def _basic(cin: int, cout: int, stride: int = 1) -> BasicBlock:
    """The zoo's torchvision BasicBlock (``out += identity``) with its shortcut."""
    return BasicBlock(cin, cout, stride, _shortcut(cin, cout, stride))


class Bottleneck(nn.Module):
    """torchvision's Bottleneck; ``groups > 1`` makes it ResNeXt's grouped 3×3."""

    expansion = 2

    def __init__(self, cin: int, planes: int, stride: int = 1, groups: int = 1,
                 width_per_group: int = 4) -> None:
        super().__init__()
        width = planes * width_per_group // 4 * groups
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """torchvision's ResNet layout (conv1/bn1/relu/maxpool, layer1..layer3, avgpool, fc)."""

    def __init__(self, bottleneck: bool = False, groups: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 8
        stages = []
        for planes, stride in ((8, 1), (12, 2), (16, 2)):
            if bottleneck:
                blocks = [Bottleneck(cin, planes, stride, groups),
                          Bottleneck(planes * 2, planes, 1, groups)]
                cin = planes * 2
            else:
                blocks = [_basic(cin, planes, stride), _basic(planes, planes)]
                cin = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(cin, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# --------------------------------------------------------------------------- DenseNet


class _DenseLayer(nn.Module):
    """torchvision's _DenseLayer: cat of all earlier features → BN-ReLU-1×1 → BN-ReLU-3×3."""

    def __init__(self, cin: int, growth: int, bn_size: int = 2) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)
        self.drop_rate = 0.1

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        concatenated = torch.cat(inputs, 1)
        bottleneck = self.conv1(self.relu1(self.norm1(concatenated)))
        new = self.conv2(self.relu2(self.norm2(bottleneck)))
        return F.dropout(new, p=self.drop_rate, training=self.training)


class _DenseBlock(nn.ModuleDict):
    def __init__(self, layers: int, cin: int, growth: int) -> None:
        super().__init__()
        for i in range(layers):
            self.add_module(f"denselayer{i + 1}", _DenseLayer(cin + i * growth, growth))

    def forward(self, init: torch.Tensor) -> torch.Tensor:
        features = [init]
        for _, layer in self.items():
            features.append(layer(features))
        return torch.cat(features, 1)


class DenseNet(nn.Module):
    """torchvision's DenseNet layout (features.conv0 … denseblockN/transitionN, norm5)."""

    def __init__(self, growth: int = 6) -> None:
        super().__init__()
        feats: dict[str, nn.Module] = {
            "conv0": nn.Conv2d(3, 12, 3, 1, 1, bias=False), "norm0": nn.BatchNorm2d(12),
            "relu0": nn.ReLU(inplace=True), "pool0": nn.MaxPool2d(3, 2, 1),
        }
        c = 12
        for i, n in enumerate((2, 2)):
            feats[f"denseblock{i + 1}"] = _DenseBlock(n, c, growth)
            c += n * growth
            if i == 0:
                feats["transition1"] = nn.Sequential()
                t = feats["transition1"]
                t.add_module("norm", nn.BatchNorm2d(c))
                t.add_module("relu", nn.ReLU(inplace=True))
                t.add_module("conv", nn.Conv2d(c, c // 2, 1, bias=False))
                t.add_module("pool", nn.AvgPool2d(2, 2))
                c //= 2
        feats["norm5"] = nn.BatchNorm2d(c)
        self.features = nn.Sequential()
        for k, v in feats.items():
            self.features.add_module(k, v)
        self.classifier = nn.Linear(c, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.features(x), inplace=True)
        out = torch.flatten(F.adaptive_avg_pool2d(out, (1, 1)), 1)
        return self.classifier(out)


# --------------------------------------------------------------------------- GoogLeNet


class BasicConv2d(nn.Module):
    def __init__(self, cin: int, cout: int, **kw: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


class Inception(nn.Module):
    """GoogLeNet's four parallel branches joined by ``torch.cat``."""

    def __init__(self, cin: int, c1: int, c3r: int, c3: int, c5r: int, c5: int,
                 pool: int) -> None:
        super().__init__()
        self.branch1 = BasicConv2d(cin, c1, kernel_size=1)
        self.branch2 = nn.Sequential(BasicConv2d(cin, c3r, kernel_size=1),
                                     BasicConv2d(c3r, c3, kernel_size=3, padding=1))
        self.branch3 = nn.Sequential(BasicConv2d(cin, c5r, kernel_size=1),
                                     BasicConv2d(c5r, c5, kernel_size=3, padding=1))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, 1, 1, ceil_mode=True),
                                     BasicConv2d(cin, pool, kernel_size=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = [self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)]
        return torch.cat(outputs, 1)


class GoogLeNet(nn.Module):
    """torchvision GoogLeNet's layout, with its ``transform_input`` channel re-scaling."""

    def __init__(self) -> None:
        super().__init__()
        self.transform_input = True
        self.conv1 = BasicConv2d(3, 8, kernel_size=5, stride=2, padding=2)
        self.maxpool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = BasicConv2d(8, 12, kernel_size=3, padding=1)
        self.inception3a = Inception(12, 4, 4, 6, 2, 4, 4)
        self.inception3b = Inception(18, 6, 4, 8, 2, 4, 4)
        self.maxpool3 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.inception4a = Inception(22, 8, 4, 8, 2, 4, 4)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(24, NUM_CLASSES)

    def _transform_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.transform_input:
            x_ch0 = torch.unsqueeze(x[:, 0], 1) * (0.229 / 0.5) + (0.485 - 0.5) / 0.5
            x_ch1 = torch.unsqueeze(x[:, 1], 1) * (0.224 / 0.5) + (0.456 - 0.5) / 0.5
            x_ch2 = torch.unsqueeze(x[:, 2], 1) * (0.225 / 0.5) + (0.406 - 0.5) / 0.5
            x = torch.cat((x_ch0, x_ch1, x_ch2), 1)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._transform_input(x)
        x = self.conv2(self.maxpool1(self.conv1(x)))
        x = self.maxpool3(self.inception3b(self.inception3a(x)))
        x = self.avgpool(self.inception4a(x))
        return self.fc(self.dropout(torch.flatten(x, 1)))


# --------------------------------------------------------------------------- MobileNet V2 / V3


class InvertedResidual(nn.Module):
    """MobileNetV2's block (expand 1×1, depthwise 3×3, linear project, ``x + conv(x)``);
    with ``se``/``hswish`` it is MobileNetV3's."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int, se: bool = False,
                 act: type[nn.Module] = nn.ReLU6) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_conv_bn(cin, hidden, 1, act=act))
        layers.append(_conv_bn(hidden, hidden, 3, stride, groups=hidden, act=act))
        if se:
            layers.append(SqueezeExcitation(hidden, max(hidden // 4, 2),
                                            scale_activation=nn.Hardsigmoid))
        layers.append(_conv_bn(hidden, cout, 1, act=None))
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn(3, 8, 3, 2, act=nn.ReLU6),
            InvertedResidual(8, 8, 1, 1),
            InvertedResidual(8, 12, 2, 3),
            InvertedResidual(12, 12, 1, 3),
            InvertedResidual(12, 16, 2, 3),
            _conv_bn(16, 32, 1, act=nn.ReLU6),
        )
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(32, NUM_CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


class MobileNetV3(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn(3, 8, 3, 2, act=nn.Hardswish),
            InvertedResidual(8, 8, 1, 1, se=True, act=nn.ReLU),
            InvertedResidual(8, 12, 2, 3, act=nn.ReLU),
            InvertedResidual(12, 12, 1, 3, se=True, act=nn.Hardswish),
            InvertedResidual(12, 16, 2, 3, se=True, act=nn.Hardswish),
            _conv_bn(16, 32, 1, act=nn.Hardswish),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(32, 48), nn.Hardswish(inplace=True),
                                        nn.Dropout(0.2, inplace=True),
                                        nn.Linear(48, NUM_CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


# --------------------------------------------------------------------------- EfficientNet


class MBConv(nn.Module):
    """EfficientNet's MBConv: expand, depthwise, SE (SiLU / sigmoid), project, stochastic
    depth and ``result += input``."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int, sd_prob: float) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_conv_bn(cin, hidden, 1, act=nn.SiLU))
        layers.append(_conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.SiLU))
        layers.append(SqueezeExcitation(hidden, max(1, cin // 4), activation=nn.SiLU))
        layers.append(_conv_bn(hidden, cout, 1, act=None))
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(sd_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.block(x)
        if self.use_res_connect:
            result = self.stochastic_depth(result)
            result += x
        return result


class EfficientNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn(3, 8, 3, 2, act=nn.SiLU),
            nn.Sequential(MBConv(8, 8, 1, 1, 0.0)),
            nn.Sequential(MBConv(8, 12, 2, 4, 0.05), MBConv(12, 12, 1, 4, 0.1)),
            nn.Sequential(MBConv(12, 16, 2, 4, 0.15)),
            _conv_bn(16, 32, 1, act=nn.SiLU),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2, inplace=True),
                                        nn.Linear(32, NUM_CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


# --------------------------------------------------------------------------- RegNet


class ResBottleneckBlock(nn.Module):
    """RegNet's block: ``proj(x) + f(x)`` with f = 1×1, grouped 3×3, SE, 1×1."""

    def __init__(self, cin: int, cout: int, stride: int, group_width: int = 4) -> None:
        super().__init__()
        self.proj = None
        if cin != cout or stride != 1:
            self.proj = _conv_bn(cin, cout, 1, stride, act=None)
        f = nn.Sequential()
        f.add_module("a", _conv_bn(cin, cout, 1))
        f.add_module("b", _conv_bn(cout, cout, 3, stride, groups=cout // group_width))
        f.add_module("se", SqueezeExcitation(cout, max(1, cin // 4)))
        f.add_module("c", _conv_bn(cout, cout, 1, act=None))
        self.f = f
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.proj(x) if self.proj is not None else x
        return self.activation(shortcut + self.f(x))


class RegNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = _conv_bn(3, 8, 3, 2)
        self.trunk_output = nn.Sequential(
            nn.Sequential(ResBottleneckBlock(8, 8, 1), ResBottleneckBlock(8, 8, 1)),
            nn.Sequential(ResBottleneckBlock(8, 16, 2), ResBottleneckBlock(16, 16, 1)),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(16, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.trunk_output(self.stem(x)))
        return self.fc(x.flatten(start_dim=1))


# --------------------------------------------------------------------------- ShuffleNetV2


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """torchvision's channel shuffle: view into groups, transpose, flatten back."""
    batchsize, num_channels, height, width = x.size()
    per_group = num_channels // groups
    x = x.view(batchsize, groups, per_group, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(batchsize, num_channels, height, width)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2's InvertedResidual: channel split (``chunk``) or two strided branches,
    ``torch.cat`` and a channel shuffle."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        half = cout // 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin),
                nn.Conv2d(cin, half, 1, bias=False), nn.BatchNorm2d(half),
                nn.ReLU(inplace=True))
        else:
            self.branch1 = nn.Sequential()
        b_in = cin if stride > 1 else half
        self.branch2 = nn.Sequential(
            nn.Conv2d(b_in, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True),
            nn.Conv2d(half, half, 3, stride, 1, groups=half, bias=False), nn.BatchNorm2d(half),
            nn.Conv2d(half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8),
                                   nn.ReLU(inplace=True))
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.stage2 = nn.Sequential(ShuffleUnit(8, 12, 2), ShuffleUnit(12, 12, 1))
        self.stage3 = nn.Sequential(ShuffleUnit(12, 16, 2), ShuffleUnit(16, 16, 1))
        self.conv5 = nn.Sequential(nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32),
                                   nn.ReLU(inplace=True))
        self.fc = nn.Linear(32, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage3(self.stage2(self.maxpool(self.conv1(x))))
        x = self.conv5(x).mean([2, 3])
        return self.fc(x)


# --------------------------------------------------------------------------- SqueezeNet


class Fire(nn.Module):
    def __init__(self, cin: int, squeeze: int, e1: int, e3: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.squeeze_activation = nn.ReLU(inplace=True)
        self.expand1x1 = nn.Conv2d(squeeze, e1, 1)
        self.expand1x1_activation = nn.ReLU(inplace=True)
        self.expand3x3 = nn.Conv2d(squeeze, e3, 3, padding=1)
        self.expand3x3_activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat([self.expand1x1_activation(self.expand1x1(x)),
                          self.expand3x3_activation(self.expand3x3(x))], 1)


class SqueezeNet(nn.Module):
    """SqueezeNet 1.1's layout; the classifier is a 1×1 conv, ReLU and global pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(16, 4, 8, 8), Fire(16, 4, 8, 8),
            nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(16, 6, 12, 12),
        )
        final_conv = nn.Conv2d(24, NUM_CLASSES, 1)
        self.classifier = nn.Sequential(nn.Dropout(0.5), final_conv, nn.ReLU(inplace=True),
                                        nn.AdaptiveAvgPool2d((1, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.classifier(self.features(x)), 1)


# --------------------------------------------------------------------------- ConvNeXt


class Permute(nn.Module):
    """torchvision.ops.Permute."""

    def __init__(self, dims: list[int]) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.permute(x, self.dims)


class LayerNorm2d(nn.LayerNorm):
    """torchvision's LayerNorm2d: LayerNorm over the channels of an NCHW tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class CNBlock(nn.Module):
    """ConvNeXt's block: depthwise 7×7, NHWC LayerNorm, Linear ×4 / GELU / Linear (the
    pointwise convs), layer scale, stochastic depth, residual."""

    def __init__(self, dim: int, sd_prob: float) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, 7, padding=3, groups=dim, bias=True),
            Permute([0, 2, 3, 1]),
            nn.LayerNorm(dim, eps=1e-6),
            nn.Linear(dim, 4 * dim),
            nn.GELU(),
            nn.Linear(4 * dim, dim),
            Permute([0, 3, 1, 2]),
        )
        self.layer_scale = nn.Parameter(torch.ones(dim, 1, 1) * 0.5)
        self.stochastic_depth = StochasticDepth(sd_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.layer_scale * self.block(x)
        result = self.stochastic_depth(result)
        result += x
        return result


class ConvNeXt(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv2d(3, 8, 4, 4), LayerNorm2d(8, eps=1e-6)),
            nn.Sequential(CNBlock(8, 0.0), CNBlock(8, 0.05)),
            nn.Sequential(LayerNorm2d(8, eps=1e-6), nn.Conv2d(8, 16, 2, 2)),
            nn.Sequential(CNBlock(16, 0.1)),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(LayerNorm2d(16, eps=1e-6), nn.Flatten(1),
                                        nn.Linear(16, NUM_CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.features(x)))


# --------------------------------------------------------------------------- Vision Transformer


class TinyViT(nn.Module):
    """torchvision ViT's shape: conv patch embedding, class token, encoder with attention."""

    def __init__(self, dim: int = 16, patch: int = 8) -> None:
        super().__init__()
        self.conv_proj = nn.Conv2d(3, dim, patch, patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        n = (INPUT_SHAPE[1] // patch) ** 2 + 1
        self.pos_embedding = nn.Parameter(torch.randn(1, n, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, 2, 2 * dim, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.heads = nn.Linear(dim, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_proj(x)
        n, c = x.shape[0], x.shape[1]
        x = x.reshape(n, c, -1).permute(0, 2, 1)
        x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1) + self.pos_embedding
        x = self.encoder(x)
        return self.heads(x[:, 0])


# (factory, middle conv, late conv): the layers coverage probes
FAMILIES: dict[str, tuple[Callable[[], nn.Module], str, str]] = {
    "alexnet": (AlexNet, "features.5", "features.7"),
    "vgg_bn": (VGG, "features.7", "features.14"),
    "resnet": (ResNet, "layer2.0.conv2", "layer3.1.conv2"),
    "resnext": (lambda: ResNet(bottleneck=True, groups=4), "layer2.0.conv2",
                "layer3.1.conv3"),
    "densenet": (DenseNet, "features.transition1.conv",
                 "features.denseblock2.denselayer2.conv2"),
    "googlenet": (GoogLeNet, "inception3b.branch2.1.conv", "inception4a.branch3.1.conv"),
    "mobilenet_v2": (MobileNetV2, "features.3.conv.2.0", "features.5.0"),
    "mobilenet_v3": (MobileNetV3, "features.3.conv.3.0", "features.5.0"),
    "efficientnet": (EfficientNet, "features.2.1.block.3.0", "features.4.0"),
    "regnet": (RegNet, "trunk_output.0.1.f.b.0", "trunk_output.1.1.f.c.0"),
    "shufflenet_v2": (ShuffleNetV2, "stage2.1.branch2.5", "conv5.0"),
    "squeezenet": (SqueezeNet, "features.4.expand3x3", "features.6.expand3x3"),
    "convnext": (ConvNeXt, "features.1.1.block.0", "features.3.0.block.0"),
}


def build(family: str, seed: int = 0) -> nn.Module:
    """The family's model with seeded random weights and randomised BatchNorm statistics,
    in eval mode (so BN is not an identity and removals have an effect)."""
    torch.manual_seed(seed)
    model = FAMILIES[family][0]()
    g = torch.Generator().manual_seed(seed + 1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()
