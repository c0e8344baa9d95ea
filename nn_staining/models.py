"""Demo models for ``main.py`` and the tests; the recorder never depends on them."""

from __future__ import annotations

import torch
from torch import nn


class SimpleNN(nn.Module):
    """The proof-of-concept MLP: ``input`` → ``hidden_1`` → ``output``, ReLU applied functionally.

    With functional activations only the three ``nn.Linear`` layers are recorded
    (``L_input``, ``L_hidden_1``, ``L_output``), their neurons holding pre-activations.
    """

    def __init__(self, in_features: int, hidden: int = 64, num_classes: int = 2) -> None:
        super().__init__()
        self.input = nn.Linear(in_features, hidden)
        self.hidden_1 = nn.Linear(hidden, hidden)
        self.output = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.input(x))
        x = torch.relu(self.hidden_1(x))
        return self.output(x)


class SmallCNN(nn.Module):
    """A small CNN for 8×8 (or larger) single-channel images: conv–BN–ReLU–pool twice, then an MLP head."""

    def __init__(self, num_classes: int = 10, channels: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(channels, 2 * channels, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(8 * channels, 32), nn.ReLU(), nn.Linear(32, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def build_model(name: str, in_features: int, num_classes: int, hidden: int = 64) -> nn.Module:
    """A demo model by name: ``simple`` (SimpleNN) or ``cnn`` (SmallCNN, for image data sets)."""
    if name == "simple":
        return SimpleNN(in_features, hidden, num_classes)
    if name == "cnn":
        return SmallCNN(num_classes)
    raise ValueError(f"model {name!r} is not one of: simple, cnn")
