"""An MLP family for tabular data: hidden widths, activation, batch normalisation, dropout; ends
in logits. Each hidden layer: linear, batch norm (if on), activation, dropout (as the tuned simple
nets of Kadra et al. 2021 and the MLP baseline of Gorishniy et al. 2021)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from enserve.models.resnet import ACTIVATIONS


@dataclass(frozen=True)
class MLPConfig:
    features: int
    classes: int
    hidden: tuple[int, ...] = (64, 64)
    activation: str = "relu"
    dropout: float = 0.0
    batch_norm: bool = False

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation '{self.activation}' is not one of {tuple(ACTIVATIONS)}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout is {self.dropout}, but must be in [0, 1)")


class MLP(nn.Module):
    def __init__(self, config: MLPConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = config.features
        for h in config.hidden:
            layers.append(nn.Linear(width, h))
            if config.batch_norm:
                layers.append(nn.BatchNorm1d(h))
            layers.append(ACTIVATIONS[config.activation]())
            if config.dropout:
                layers.append(nn.Dropout(config.dropout))
            width = h
        layers.append(nn.Linear(width, config.classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))
