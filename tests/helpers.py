"""Small models shared by the tests (no Lightning here; see test_capture.py for LightningModules)."""

from __future__ import annotations

import torch
from torch import nn


class ConvBNReLULinear(nn.Module):
    """Conv-BN-ReLU-MaxPool then a 2-layer classifier; 201,610 parameters for N×1×28×28 inputs."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(16 * 14 * 14, 64)
        self.relu2 = nn.ReLU()
        self.fc2 = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu(self.bn(self.conv(x))))
        return self.fc2(self.relu2(self.fc1(self.flatten(x))))


class TinyConvNet(nn.Module):
    """A few hundred parameters: Conv(3->4)-BN-ReLU-Linear on N×3×8×8 inputs; for cheap tests."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4 * 6 * 6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.relu(self.bn(self.conv(x))).flatten(1))


class KwargsNet(nn.Module):
    """A model called with keyword-only arguments: a non-tensor ``scale`` and an optional tensor ``mask``."""

    def __init__(self, in_features: int = 16, out_features: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, 8)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(8, out_features)

    def forward(self, x: torch.Tensor, *, scale: float = 1.0, mask: torch.Tensor | None = None) -> torch.Tensor:
        y = self.fc2(self.relu(self.fc1(x))) * scale
        if mask is not None:
            y = y * mask
        return y


class DataDependent(nn.Module):
    """Python control flow on tensor values: ``torch.export`` cannot capture it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.fc(x)
        return -self.fc(x)


def with_bn_statistics(model: nn.Module, example: torch.Tensor, steps: int = 3) -> nn.Module:
    """Give BatchNorm layers non-trivial running statistics (so BN folding matters), then switch to eval."""
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(example * 2.0 + 0.5)
    return model.eval()


def output_range(t: torch.Tensor) -> float:
    return float(t.max() - t.min())
