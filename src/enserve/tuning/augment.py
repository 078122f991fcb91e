"""Training-split augmentations of Table 5 as hyperparameters: zoom, translation, shear, channel
shift and rotation, drawn per image and applied on the batch with one affine resampling."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Augmentation:
    zoom: float = 0.0  # scale drawn in [1 - zoom, 1 + zoom]
    translation: float = 0.0  # content shift, a fraction of the image size, in [-t, t]
    shear: float = 0.0  # shear factor in [-s, s]
    channel_shift: float = 0.0  # added to each channel, in [-c, c] (pixel values in [0, 1])
    rotation: float = 0.0  # degrees in [-r, r]

    @property
    def active(self) -> bool:
        return any((self.zoom, self.translation, self.shear, self.channel_shift, self.rotation))


def apply_affine(x: torch.Tensor, angle: torch.Tensor, scale: torch.Tensor, shear: torch.Tensor,
                 tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    """Resample (N, C, H, W) images: rotate by ``angle`` (radians), zoom by ``scale``, shear, and
    move the content by (tx, ty) fractions of the width and height. Outside pixels repeat the border."""
    cos, sin = torch.cos(angle), torch.sin(angle)
    # output pixel p samples input at A p + b, with A = (R S H)^-1 and b = -2 (tx, ty) in [-1, 1] units
    inv_scale = 1.0 / scale
    a = torch.stack([
        torch.stack([cos * inv_scale, (sin - shear * cos) * inv_scale], dim=1),
        torch.stack([-sin * inv_scale, (cos + shear * sin) * inv_scale], dim=1),
    ], dim=1)
    b = torch.stack([-2.0 * tx, -2.0 * ty], dim=1).unsqueeze(2)
    theta = torch.cat([a, torch.bmm(a, b)], dim=2)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def augment(x: torch.Tensor, aug: Augmentation, generator: torch.Generator | None = None) -> torch.Tensor:
    """A randomly augmented copy of the batch (identity when every range is 0)."""
    if not aug.active:
        return x
    n = x.shape[0]

    def uniform(bound: float) -> torch.Tensor:
        return (torch.rand(n, generator=generator) * 2 - 1) * bound

    out = apply_affine(x, uniform(math.radians(aug.rotation)), 1.0 + uniform(aug.zoom), uniform(aug.shear),
                       uniform(aug.translation), uniform(aug.translation))
    if aug.channel_shift:
        shift = (torch.rand(n, x.shape[1], 1, 1, generator=generator) * 2 - 1) * aug.channel_shift
        out = (out + shift).clamp(0.0, 1.0)
    return out
