"""Augmentations against independent slow references (per-example and per-pixel Python loops).

tests/data/test_cifar.py recovers *some* crop/flip for each output by search; tests/data/test_augment.py checks
ranges and a few special matrices. These tests instead replay the *same random draws* and rebuild every output
with plain loops, so a wrong offset range, a flip applied to the wrong axis or example, or a sampling
convention error in warp shows up as a value mismatch.
"""

from __future__ import annotations

import math

import torch

from lowlearn.data.augment import random_affine, random_affine_matrices, warp
from lowlearn.data.cifar import augment_cifar

PAD = 4


def _slow_crop_flip(image: torch.Tensor, dy: int, dx: int, flip: bool) -> torch.Tensor:
    """One image (C, H, W): zero-pad by 4 on every side, cut the H x W window at (dy, dx), mirror left-right."""
    channels, height, width = image.shape
    out = torch.zeros_like(image)
    for c in range(channels):
        for i in range(height):
            for j in range(width):
                jj = width - 1 - j if flip else j                         # output column j shows window column jj
                r, s = dy + i - PAD, dx + jj - PAD                        # position in the unpadded image
                if 0 <= r < height and 0 <= s < width:
                    out[c, i, j] = image[c, r, s]
    return out


def _replayed_draws(batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The offsets (2, B) in 0..8 and flips (B,) that augment_cifar draws from a generator seeded with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.randint(0, 2 * PAD + 1, (2, batch, 1), generator=generator)[..., 0]
    flips = torch.rand(batch, 1, generator=generator)[:, 0] < 0.5
    return offsets, flips


def test_augment_cifar_equals_a_per_example_loop_with_the_same_draws():
    """Padding 4, offsets uniform in 0..8 for rows and columns separately, flip with p = 1/2, per example."""
    batch = 24
    x = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = augment_cifar(x, torch.Generator().manual_seed(11))
    offsets, flips = _replayed_draws(batch, 11)
    assert offsets.min() == 0 and offsets.max() == 8 and flips.any() and (~flips).any()
    for b in range(batch):
        expected = _slow_crop_flip(x[b], int(offsets[0, b]), int(offsets[1, b]), bool(flips[b]))
        assert torch.equal(out[b], expected), b


def test_augment_cifar_on_non_square_integer_images_equals_the_loop():
    """The batched indexing must keep rows and columns apart (H != W) and leave integer pixels exact."""
    batch = 12
    x = torch.randint(1, 256, (batch, 2, 6, 11), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    out = augment_cifar(x, torch.Generator().manual_seed(5))
    assert out.dtype == torch.uint8 and out.shape == x.shape
    offsets, flips = _replayed_draws(batch, 5)
    for b in range(batch):
        assert torch.equal(out[b], _slow_crop_flip(x[b], int(offsets[0, b]), int(offsets[1, b]), bool(flips[b])))


def test_augment_cifar_window_keeps_exactly_the_pixels_the_offset_allows():
    """Hand count: offset (dy, dx) keeps (32 - |dy - 4|) x (32 - |dx - 4|) pixels of the image; the rest is padding."""
    batch = 64
    out = augment_cifar(torch.ones(batch, 1, 32, 32), torch.Generator().manual_seed(2))
    offsets, _ = _replayed_draws(batch, 2)
    kept = out.sum(dim=(1, 2, 3))
    expected = (32 - (offsets[0] - PAD).abs()) * (32 - (offsets[1] - PAD).abs())
    assert torch.equal(kept, expected.float())


def _slow_bilinear_warp(image: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """One image (C, H, W) sampled at theta @ (x, y, 1), pixel centres at (2k + 1)/n - 1, zeros outside."""
    channels, height, width = image.shape
    out = torch.zeros_like(image)
    for i in range(height):
        for j in range(width):
            x, y = (2 * j + 1) / width - 1, (2 * i + 1) / height - 1
            sx = float(theta[0, 0] * x + theta[0, 1] * y + theta[0, 2])
            sy = float(theta[1, 0] * x + theta[1, 1] * y + theta[1, 2])
            u, v = ((sx + 1) * width - 1) / 2, ((sy + 1) * height - 1) / 2   # back to pixel indices
            u0, v0 = math.floor(u), math.floor(v)
            for r, wr in ((v0, 1 - (v - v0)), (v0 + 1, v - v0)):
                for s, ws in ((u0, 1 - (u - u0)), (u0 + 1, u - u0)):
                    if 0 <= r < height and 0 <= s < width:
                        out[:, i, j] += wr * ws * image[:, r, s]
    return out


def test_warp_equals_a_per_pixel_bilinear_loop():
    """warp on a non-square float64 batch with generic matrices, against bilinear interpolation by hand."""
    g = torch.Generator().manual_seed(3)
    images = torch.rand(3, 2, 5, 7, generator=g, dtype=torch.float64)
    theta = torch.eye(2, 3, dtype=torch.float64) + 0.3 * torch.randn(3, 2, 3, generator=g, dtype=torch.float64)
    out = warp(images, theta)
    for n in range(3):
        torch.testing.assert_close(out[n], _slow_bilinear_warp(images[n], theta[n]), atol=1e-12, rtol=0)


def test_random_affine_applies_each_image_its_own_matrix():
    """random_affine == warp of each image by the matrices random_affine_matrices draws from the same seed."""
    images = torch.rand(2, 3, 1, 9, 9, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    out = random_affine(images, torch.Generator().manual_seed(8), rotation=20, scale=0.2, shear=0.3, shift=0.1)
    theta = random_affine_matrices(6, torch.Generator().manual_seed(8), rotation=20, scale=0.2, shear=0.3, shift=0.1)
    flat, expected = images.reshape(6, 1, 9, 9), []
    for n in range(6):
        expected.append(_slow_bilinear_warp(flat[n], theta[n].double()))
    torch.testing.assert_close(out, torch.stack(expected).reshape(images.shape), atol=1e-6, rtol=0)


def test_random_affine_matrices_factor_as_documented():
    """A = R(θ) [[s_x, h], [0, s_y]] is a QR factorisation: Q recovers R(θ), R's entries s_x, h, s_y (hand algebra)."""
    theta = random_affine_matrices(3000, torch.Generator().manual_seed(6), rotation=10, scale=0.1, shear=0.2,
                                   shift=0.07).double()
    q, r = torch.linalg.qr(theta[:, :, :2])
    sign = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))           # make the diagonal of r positive
    q, r = q * sign[:, None, :], r * sign[:, :, None]
    angle = torch.atan2(q[:, 1, 0], q[:, 0, 0])
    torch.testing.assert_close(q[:, 0, 0], q[:, 1, 1])                # Q is a rotation, not a reflection
    torch.testing.assert_close(q[:, 0, 1], -q[:, 1, 0])
    assert angle.abs().max() <= math.radians(10) + 1e-9 and angle.abs().max() > math.radians(9.8)
    sx, sy, h = r[:, 0, 0], r[:, 1, 1], r[:, 0, 1]
    for s in (sx, sy):
        assert s.min() >= 0.9 - 1e-6 and s.max() <= 1.1 + 1e-6 and s.min() < 0.91 and s.max() > 1.09
    assert h.abs().max() <= 0.2 + 1e-6 and h.min() < -0.19 and h.max() > 0.19
    # Each parameter is uniform: its mean is the centre of its range, its variance (width)^2 / 12.
    for values, centre, half in ((angle, 0.0, math.radians(10)), (sx, 1.0, 0.1), (h, 0.0, 0.2),
                                 (theta[:, 0, 2], 0.0, 0.14)):
        assert abs(float(values.mean()) - centre) < 4 * half / math.sqrt(3 * 3000)
        assert abs(float(values.var()) / (half ** 2 / 3) - 1) < 0.1
