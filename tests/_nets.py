"""Tiny test networks covering the architectures netcarve must follow channel-wise.

Self-contained (torch only), deterministic under ``torch.manual_seed`` and small enough for
brute-force checks that loop over every kernel. Each net has an ``example_input()`` giving a
matching input batch, and ``NETS`` maps a short name to a factory.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class PlainNet(nn.Module):
    """conv-BN-ReLU(inplace)-pool, conv-ReLU(inplace)-pool, Flatten → Linear → Linear.

    Layers: ``features.0`` (3→4), ``features.4`` (4→6), ``classifier.1`` (6 ch × 4 px → 5),
    ``classifier.3`` (5→3). Input 8×8.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),  # 0
            nn.BatchNorm2d(4),  # 1
            nn.ReLU(inplace=True),  # 2
            nn.MaxPool2d(2),  # 3
            nn.Conv2d(4, 6, 3, padding=1),  # 4
            nn.ReLU(inplace=True),  # 5
            nn.MaxPool2d(2),  # 6
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),  # 0
            nn.Linear(6 * 2 * 2, 5),  # 1
            nn.ReLU(inplace=True),  # 2
            nn.Linear(5, 3),  # 3
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    @staticmethod
    def example_input(batch: int = 2) -> torch.Tensor:
        return torch.randn(batch, 3, 8, 8)


class Block(nn.Module):
    """torchvision-style basic block: ``out += identity`` and a shared in-place ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

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


class TinyResNet(nn.Module):
    """Stem conv, an identity block, a stride-2 block with a 1×1 downsample, avgpool, fc."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = Block(4, 4)
        self.layer2 = Block(4, 6, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)

    @staticmethod
    def example_input(batch: int = 2) -> torch.Tensor:
        return torch.randn(batch, 3, 6, 6)


class CatNet(nn.Module):
    """Inception-like: three branches concatenated along channels, then a 1×1 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.b1 = nn.Conv2d(4, 2, 1)
        self.b2 = nn.Sequential(nn.Conv2d(4, 2, 1), nn.ReLU(), nn.Conv2d(2, 3, 3, padding=1))
        self.pool = nn.MaxPool2d(3, stride=1, padding=1)
        self.b3 = nn.Conv2d(4, 2, 1)
        self.mix = nn.Conv2d(7, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = torch.cat([self.b1(x), self.b2(x), self.b3(self.pool(x))], dim=1)
        x = self.mix(torch.relu(x))
        x = F.adaptive_avg_pool2d(x, 1)
        return self.fc(torch.flatten(x, 1))

    @staticmethod
    def example_input(batch: int = 2) -> torch.Tensor:
        return torch.randn(batch, 3, 5, 5)


class GroupNet(nn.Module):
    """Grouped conv (groups=2), depthwise conv (multiplier 2), ``x.view(x.size(0), -1)``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.grouped = nn.Conv2d(6, 4, 3, padding=1, groups=2)
        self.depthwise = nn.Conv2d(4, 8, 3, padding=1, groups=4)
        self.point = nn.Conv2d(8, 4, 1)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(4 * 2 * 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.grouped(x))
        x = F.relu(self.depthwise(x))
        x = self.pool(self.point(x))
        x = x.view(x.size(0), -1)
        return self.fc(x)

    @staticmethod
    def example_input(batch: int = 2) -> torch.Tensor:
        return torch.randn(batch, 3, 4, 4)


class FunctionalNet(nn.Module):
    """Functional spellings: ``torch.add``, ``x.add_``, ``x.clone()``, scalar ``*``/``/``,
    ``torch.cat(dim=-3)``, ``reshape(N, -1)``, Dropout, Identity, ``contiguous``."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.c3 = nn.Conv2d(4, 4, 1)
        self.c4 = nn.Conv2d(8, 5, 1)
        self.drop = nn.Dropout(0.5)
        self.ident = nn.Identity()
        self.fc = nn.Linear(5 * 2 * 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.c1(x))
        b = torch.relu(self.c2(a)) * 0.5
        b = torch.add(b, a)
        c = self.c3(b.clone())
        c.add_(a)  # in place: c now also carries a's channels
        c = F.leaky_relu(c, 0.1) / 2.0
        d = torch.cat([c, b], dim=-3)
        d = self.drop(self.ident(d)).contiguous()
        e = F.adaptive_avg_pool2d(self.c4(d), 2)
        return self.fc(e.reshape(e.shape[0], -1))

    @staticmethod
    def example_input(batch: int = 2) -> torch.Tensor:
        return torch.randn(batch, 3, 4, 4)


class Conv1dNet(nn.Module):
    """Conv1d stack → flatten → Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(2, 3, 3, padding=1)
        self.c2 = nn.Conv1d(3, 2, 3, padding=1)
        self.fc = nn.Linear(2 * 5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c2(torch.tanh(self.c1(x)))
        return self.fc(torch.flatten(x, 1))

    @staticmethod
    def example_input(batch: int = 2) -> torch.Tensor:
        return torch.randn(batch, 2, 5)


class SENet(nn.Module):
    """Squeeze-excitation gate (spatial mean → Linear → sigmoid → ``x * w[:, :, None, None]``),
    ``torch.split`` along channels, a channel slice ``x[:, 4:]`` and a reordering cat."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.fc1 = nn.Linear(6, 3)
        self.fc2 = nn.Linear(3, 6)
        self.conv2 = nn.Conv2d(4, 3, 1)
        self.conv3 = nn.Conv2d(7, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        w = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3))))))
        x = x * w[:, :, None, None]
        a, b = torch.split(x, [2, 4], dim=1)
        y = self.conv2(b)
        z = torch.cat([x[:, 4:], a], dim=1)
        return self.conv3(torch.cat([z, y], dim=1))

    @staticmethod
    def example_input(batch: int = 2) -> torch.Tensor:
        return torch.randn(batch, 3, 4, 4)


class PermuteNet(nn.Module):
    """Mixes channels with ``permute`` before a conv: the graph must refuse it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x).permute(0, 2, 1, 3)  # height becomes the channel axis
        return self.conv2(x)

    @staticmethod
    def example_input(batch: int = 1) -> torch.Tensor:
        return torch.randn(batch, 3, 4, 4)


class MeanNet(nn.Module):
    """Averages over channels (``x.mean(1)``) before a conv: the graph must refuse it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(1, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x).mean(1, keepdim=True))

    @staticmethod
    def example_input(batch: int = 1) -> torch.Tensor:
        return torch.randn(batch, 3, 4, 4)


class SoftmaxHeadNet(nn.Module):
    """Ends in a channel-mixing op (softmax over classes) after the last layer: allowed."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(2 * 2 * 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.fc(torch.flatten(self.conv(x), 1)), dim=1)

    @staticmethod
    def example_input(batch: int = 1) -> torch.Tensor:
        return torch.randn(batch, 1, 4, 4)


class Gate(nn.Module):
    """Data-dependent control flow (not traceable by torch.fx); channel-wise in effect."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return torch.relu(x)
        return x * 0.5


class ControlFlowNet(nn.Module):
    """A conv, a :class:`Gate`, a conv: tracing fails unless the gate is a leaf."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.gate = Gate()
        self.conv2 = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.gate(self.conv1(x)))

    @staticmethod
    def example_input(batch: int = 1) -> torch.Tensor:
        return torch.randn(batch, 3, 4, 4)


NETS: dict[str, Callable[[], nn.Module]] = {
    "plain": PlainNet,
    "resnet": TinyResNet,
    "cat": CatNet,
    "group": GroupNet,
    "functional": FunctionalNet,
    "conv1d": Conv1dNet,
    "se": SENet,
}
"""The nets the channel graph must handle (brute-force checks loop over these)."""


def make(
    name: str, seed: int = 0, double: bool = True, batch: int = 2
) -> tuple[nn.Module, torch.Tensor]:
    """A seeded net from :data:`NETS` in eval mode (float64 by default) and an input batch.

    BatchNorm layers get random (non-trivial) running statistics and affine parameters.
    """
    torch.manual_seed(seed)
    net = NETS[name]()
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
            with torch.no_grad():
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    net.eval()
    x = net.example_input(batch)  # type: ignore[operator]
    if double:
        net = net.double()
        x = x.double()
    return net, x


def zero_constants(net: nn.Module) -> nn.Module:
    """Zero every bias, BatchNorm shift and running mean, so a channel without input is 0."""
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)) and module.bias is not None:
                module.bias.zero_()
            if isinstance(module, nn.BatchNorm2d):
                module.bias.zero_()
                module.running_mean.zero_()
    return net
