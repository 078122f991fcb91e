"""Augmentations: identity at zero, exact pixel shifts and quarter turns, bounded channel shifts."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch", reason="the 'tune' extra (torch) is not installed")

from enserve.tuning.augment import Augmentation, apply_affine, augment  # noqa: E402


def one_hot_image(row: int, col: int) -> torch.Tensor:
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, row, col] = 1.0
    return x


def params(angle=0.0, scale=1.0, shear=0.0, tx=0.0, ty=0.0, n=1):
    return [torch.full((n,), v, dtype=torch.float32) for v in (angle, scale, shear, tx, ty)]


def test_zero_ranges_are_the_identity():
    x = torch.rand(4, 3, 8, 8)
    assert augment(x, Augmentation()) is x
    torch.testing.assert_close(apply_affine(x, *params(n=4)), x, atol=1e-6, rtol=0)


def test_translation_moves_content_by_whole_pixels():
    out = apply_affine(one_hot_image(3, 2), *params(tx=2 / 8, ty=1 / 8))
    assert out[0, 0].argmax().item() == 4 * 8 + 4  # (3, 2) -> (4, 4)
    assert out.max().item() == pytest.approx(1.0)


def test_quarter_turn_rotates_exactly():
    x = torch.arange(64, dtype=torch.float32).reshape(1, 1, 8, 8)
    out = apply_affine(x, *params(angle=math.pi / 2))
    # a positive angle turns the content clockwise as displayed (row 0 at the top)
    assert torch.equal(out.round(), torch.rot90(x, k=-1, dims=(2, 3)))


def test_random_augmentation_stays_in_range_and_is_seeded():
    x = torch.rand(16, 3, 8, 8)
    aug = Augmentation(zoom=0.3, translation=0.2, shear=0.1, channel_shift=0.1, rotation=30)
    a = augment(x, aug, torch.Generator().manual_seed(0))
    b = augment(x, aug, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == x.shape
    assert a.min() >= 0 and a.max() <= 1
    shifted = augment(x, Augmentation(channel_shift=0.05), torch.Generator().manual_seed(1))
    assert (shifted - x).abs().max() <= 0.05 + 1e-6
