"""A 1-D residual CNN family for signals (N, C, L): a stem convolution, 3 stages of basic residual
blocks (conv-bn-act-conv-bn plus the shortcut), the later stages halving the length, global
average pooling and a linear layer. Searched: kernel size, filters, filters added per stage,
blocks per stage, activation. Plain PyTorch; ends in logits (export appends the softmax)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from enserve.models.resnet import ACTIVATIONS

KERNELS = (3, 5, 7)


@dataclass(frozen=True)
class ResNet1dConfig:
    in_channels: int
    classes: int
    filters: int = 16
    filter_step: int = 16
    blocks: tuple[int, int, int] = (1, 1, 1)
    kernel: int = 5
    activation: str = "relu"

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation '{self.activation}' is not one of {tuple(ACTIVATIONS)}")
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel is {self.kernel}, but must be one of {KERNELS}")
        if len(self.blocks) != 3 or min(self.blocks) < 1:
            raise ValueError(f"blocks is {self.blocks}, but must be 3 stages of >= 1 block")
        if self.filters < 1 or self.filter_step < 0:
            raise ValueError(f"filters {self.filters} must be >= 1 and filter_step {self.filter_step} >= 0")

    def stage_channels(self) -> list[int]:
        return [self.filters + k * self.filter_step for k in range(3)]


def _conv(c_in: int, c_out: int, k: int, stride: int = 1) -> nn.Conv1d:
    return nn.Conv1d(c_in, c_out, k, stride=stride, padding=k // 2, bias=False)


class Block1d(nn.Module):
    def __init__(self, c_in: int, c_out: int, k: int, stride: int, activation: str) -> None:
        super().__init__()
        self.body = nn.Sequential(_conv(c_in, c_out, k, stride), nn.BatchNorm1d(c_out), ACTIVATIONS[activation](),
                                  _conv(c_out, c_out, k), nn.BatchNorm1d(c_out))
        self.shortcut = (nn.Sequential(_conv(c_in, c_out, 1, stride), nn.BatchNorm1d(c_out))
                         if stride != 1 or c_in != c_out else nn.Identity())
        self.act = ACTIVATIONS[activation]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


class ResNet1d(nn.Module):
    def __init__(self, config: ResNet1dConfig) -> None:
        super().__init__()
        channels = config.stage_channels()
        layers: list[nn.Module] = [_conv(config.in_channels, channels[0], config.kernel), nn.BatchNorm1d(channels[0]),
                                   ACTIVATIONS[config.activation]()]
        c_in = channels[0]
        for stage, (c_out, n) in enumerate(zip(channels, config.blocks)):
            for b in range(n):
                layers.append(Block1d(c_in, c_out, config.kernel, 2 if stage > 0 and b == 0 else 1, config.activation))
                c_in = c_out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, config.classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=2))
