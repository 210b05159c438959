"""A tiny seeded CNN for the Conv2d tests (fresh processes rebuild the same base from the seed)."""

from __future__ import annotations

import torch
from torch import nn


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 12, (3, 2), stride=2, padding=(1, 2))
        self.conv3 = nn.Conv2d(12, 12, 1)
        self.head = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x))
        h = torch.relu(self.conv2(h))
        return self.head(self.conv3(h).mean(dim=(2, 3)))


def tiny_cnn(seed: int = 0) -> TinyCNN:
    torch.manual_seed(seed)
    return TinyCNN()


def images(batch: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 10, 10, generator=torch.Generator().manual_seed(seed))
