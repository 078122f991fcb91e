"""Parameter and FLOP counts (multiply-add = 2 FLOPs) of convolutions and dense layers."""

from __future__ import annotations

import torch
from torch import nn


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flop_count(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs of one sample through the Conv1d, Conv2d and Linear layers (what dominates these networks)."""
    total = 0

    def conv_hook(module: nn.Conv1d | nn.Conv2d, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        window = 1
        for k in module.kernel_size:
            window *= k
        total += 2 * output[0].numel() * (module.in_channels // module.groups) * window

    def linear_hook(module: nn.Linear, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        total += 2 * module.in_features * module.out_features

    hooks = []
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return total
