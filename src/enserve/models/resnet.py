"""The paper's ResNet family (Table 5): residual blocks "v1" (post-activation), "v2"
(pre-activation) and "next" (ResNeXt bottleneck with grouped convolutions), activation
tanh/relu/elu, first-layer filters, filters added at each of the 4 stages, blocks per stage, and
the small-input stem (3x3, stride 1) for small images. Plain PyTorch modules; the network ends
in logits (export appends the softmax)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

BLOCKS = ("v1", "v2", "next")
ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "elu": nn.ELU}


@dataclass(frozen=True)
class ResNetConfig:
    block: str = "v1"
    activation: str = "relu"
    filters: int = 16  # channels of the stem and of stage 1
    filter_step: int = 16  # channels added at each later stage ("multiplier of filters" in Table 5)
    blocks: tuple[int, int, int, int] = (1, 1, 1, 1)
    in_channels: int = 3
    classes: int = 10
    small_input: bool = True  # 3x3 stride-1 stem; else ImageNet's 7x7 stride-2 + max-pool
    groups: int = 4  # cardinality of "next" blocks

    def __post_init__(self) -> None:
        if self.block not in BLOCKS:
            raise ValueError(f"block '{self.block}' is not one of {BLOCKS}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation '{self.activation}' is not one of {tuple(ACTIVATIONS)}")
        if len(self.blocks) != 4 or min(self.blocks) < 1:
            raise ValueError(f"blocks is {self.blocks}, but must be 4 stages of >= 1 block")
        if self.filters < 1 or self.filter_step < 0:
            raise ValueError(f"filters {self.filters} must be >= 1 and filter_step {self.filter_step} >= 0")

    def stage_channels(self) -> list[int]:
        return [self.filters + k * self.filter_step for k in range(4)]


def _conv(c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2, groups=groups, bias=False)


class _Shortcut(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.proj = None
        if stride != 1 or c_in != c_out:
            self.proj = nn.Sequential(_conv(c_in, c_out, 1, stride), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.proj is None else self.proj(x)


class BlockV1(nn.Module):
    """conv-bn-act-conv-bn, add the shortcut, act (He et al. 2016a)."""

    def __init__(self, c_in: int, c_out: int, stride: int, act: type[nn.Module], groups: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_conv(c_in, c_out, 3, stride), nn.BatchNorm2d(c_out), act(),
                                  _conv(c_out, c_out, 3), nn.BatchNorm2d(c_out))
        self.shortcut = _Shortcut(c_in, c_out, stride)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


class BlockV2(nn.Module):
    """bn-act-conv-bn-act-conv plus the shortcut, no activation after the sum (He et al. 2016b)."""

    def __init__(self, c_in: int, c_out: int, stride: int, act: type[nn.Module], groups: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.BatchNorm2d(c_in), act(), _conv(c_in, c_out, 3, stride),
                                  nn.BatchNorm2d(c_out), act(), _conv(c_out, c_out, 3))
        self.shortcut = _Shortcut(c_in, c_out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


class BlockNext(nn.Module):
    """ResNeXt bottleneck: 1x1 reduce, grouped 3x3, 1x1 expand (Xie et al. 2017)."""

    def __init__(self, c_in: int, c_out: int, stride: int, act: type[nn.Module], groups: int) -> None:
        super().__init__()
        width = max(groups, (c_out // 2) // groups * groups)
        self.body = nn.Sequential(_conv(c_in, width, 1), nn.BatchNorm2d(width), act(),
                                  _conv(width, width, 3, stride, groups=groups), nn.BatchNorm2d(width), act(),
                                  _conv(width, c_out, 1), nn.BatchNorm2d(c_out))
        self.shortcut = _Shortcut(c_in, c_out, stride)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


_BLOCK_TYPES = {"v1": BlockV1, "v2": BlockV2, "next": BlockNext}


class ResNet(nn.Module):
    def __init__(self, config: ResNetConfig) -> None:
        super().__init__()
        self.config = config
        act = ACTIVATIONS[config.activation]
        c = config.filters
        if config.small_input:
            stem = [_conv(config.in_channels, c, 3), nn.BatchNorm2d(c), act()]
        else:
            stem = [nn.Conv2d(config.in_channels, c, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(c), act(),
                    nn.MaxPool2d(3, stride=2, padding=1)]
        self.stem = nn.Sequential(*stem)
        block = _BLOCK_TYPES[config.block]
        layers = []
        c_in = c
        for stage, (c_out, n) in enumerate(zip(config.stage_channels(), config.blocks)):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                layers.append(block(c_in, c_out, stride, act, config.groups))
                c_in = c_out
        self.stages = nn.Sequential(*layers)
        tail = [nn.BatchNorm2d(c_in), act()] if config.block == "v2" else []
        self.head = nn.Sequential(*tail, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, config.classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))
