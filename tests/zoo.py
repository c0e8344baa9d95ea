"""Models nobody in this project designed, rebuilt for the tests without their packages.

The registry's torchvision wheel needs CUDA operators that fail to import on the CPU torch build, so
``resnet18`` here follows torchvision's ``resnet18`` module for module (the same qualified names:
``layer1.0.relu`` called before and after the residual add, ``layer2.0.downsample.0``, ``avgpool``,
``fc``). The time-major models use PyTorch's own defaults (``batch_first=False``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class BasicBlock(nn.Module):
    """torchvision's ``BasicBlock``: two 3x3 convolutions, one ReLU module called twice."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """torchvision's ``ResNet`` with ``BasicBlock`` (``resnet18``: two blocks per stage)."""

    def __init__(self, blocks: tuple[int, ...] = (2, 2, 2, 2), num_classes: int = 10, width: int = 64):
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._stage(width, blocks[0], 1)
        self.layer2 = self._stage(width * 2, blocks[1], 2)
        self.layer3 = self._stage(width * 4, blocks[2], 2)
        self.layer4 = self._stage(width * 8, blocks[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 8, num_classes)

    def _stage(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 10, width: int = 64) -> ResNet:
    """torchvision's ``resnet18`` (``width`` 64); a smaller ``width`` keeps every module and name."""
    torch.manual_seed(0)
    return ResNet((2, 2, 2, 2), num_classes, width)


class TimeMajorGRU(nn.Module):
    """(steps, batch, features) in, logits out: a plain Linear input projection, a ``batch_first=False``
    GRU, a head on the last step."""

    def __init__(self, features: int = 5, hidden: int = 12, classes: int = 3):
        super().__init__()
        self.inp = nn.Linear(features, hidden)
        self.act = nn.Tanh()
        self.gru = nn.GRU(hidden, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.gru(self.act(self.inp(x)))
        return self.head(out[-1])


class TimeMajorEncoder(nn.Module):
    """(steps, batch, features) in: a Linear embedding, a ``batch_first=False`` TransformerEncoder, a
    head on the mean over steps."""

    def __init__(self, features: int = 5, d_model: int = 16, classes: int = 3, layers: int = 2):
        super().__init__()
        self.embed = nn.Linear(features, d_model)
        layer = nn.TransformerEncoderLayer(d_model, 2, 32, dropout=0.0)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(self.embed(x)).mean(0))


def square_images(n: int, classes: int, size: int, seed: int = 1) -> tuple[Tensor, Tensor]:
    """``n`` noisy RGB images of ``size``×``size``; class ``c`` shows as a bright 4×4 square at (3c, 3c)
    in channel ``c % 3`` (so a network learns something within two epochs)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = 0.3 * torch.randn(n, 3, size, size, generator=g)
    for c in range(classes):
        x[y == c, c % 3, 3 * c : 3 * c + 4, 3 * c : 3 * c + 4] += 3.0
    return x, y


def record_training(
    model: nn.Module, store, x: Tensor, y: Tensor, classes: int, epochs: int = 2, **trace_args
):
    """Train ``model`` with SGD for ``epochs`` epochs of batches of 32 while a NetworkTrace records it
    (``set_targets`` before each batch); returns the loaded trace."""
    from nn_staining import NetworkTrace, load_trace

    optimiser = torch.optim.SGD(model.parameters(), lr=0.05)
    with NetworkTrace(model, store, num_classes=classes, **trace_args) as trace:
        for epoch in range(epochs):
            trace.start_epoch(epoch)
            for start in range(0, len(y), 32):
                trace.set_targets(y[start : start + 32])
                loss = nn.functional.cross_entropy(model(x[start : start + 32]), y[start : start + 32])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
            trace.end_epoch()
    return load_trace(store)
