"""Random affine distortions of images, batched on the device.

Koch, Zemel & Salakhutdinov (2015), "Siamese neural networks for one-shot image
recognition" (ICML Deep Learning Workshop), section 3.3, trained their Omniglot
verification network on affine distortions of the background set: small
rotations, scalings, shears and translations of every drawing, which a
handwritten character survives as the same character. :func:`random_affine`
draws one such transform per image and applies all of them in one
``affine_grid`` / ``grid_sample`` call; the area uncovered by the transform is
filled with 0 (no ink).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..checks import check_count, check_non_negative, is_integer
from ..train import check_draws_on, draw_with


def random_affine(images: Tensor, generator: torch.Generator | None = None, *, rotation: float = 10.0,
                  scale: float = 0.1, shear: float = 0.2, shift: float = 0.07) -> Tensor:
    """Each image under its own random rotation, scaling, shear and translation.

    The maps act in :func:`warp`'s normalised coordinates, in which both sides of an
    image span ``[-1, 1]``: on a square image (Omniglot's) a rotation is a rotation of
    the pixels, on an ``H ≠ W`` image it also stretches and shears them.

    Args:
        images: ``(..., C, H, W)`` float images, any leading dimensions (e.g. a batch of episodes).
        generator: for reproducible distortions; on the images' device.
        rotation, scale, shear, shift: the ranges of :func:`random_affine_matrices`.

    Returns:
        The images, each warped (:func:`warp`) by its own random matrix, as a new tensor of the same shape.

    Raises:
        ValueError: images that are not float or have fewer than three dimensions, a
            generator on another device than the images, or a range that
            :func:`random_affine_matrices` refuses.
    """
    if images.dim() < 3:
        raise ValueError(f"images must be (..., C, H, W), got shape {tuple(images.shape)}: for one-channel images "
                         "(..., H, W), pass images.unsqueeze(-3)")
    if not images.is_floating_point():
        raise ValueError(f"images must be float (interpolation mixes pixel values), got {images.dtype}: pass e.g. "
                         "images.float() / 255")
    check_draws_on(generator, images.device, "the images")
    if images.numel() == 0:
        return images.clone()
    flat = images.reshape(-1, *images.shape[-3:])
    theta = random_affine_matrices(flat.shape[0], generator, rotation=rotation, scale=scale, shear=shear,
                                   shift=shift, device=images.device)
    return warp(flat, theta).reshape(images.shape)


def random_affine_matrices(n: int, generator: torch.Generator | None = None, *, rotation: float = 10.0,
                           scale: float = 0.1, shear: float = 0.2, shift: float = 0.07,
                           device: torch.device | str | None = None) -> Tensor:
    """``n`` random affine maps ``(n, 2, 3)`` in the normalised coordinates of :func:`warp`.

    Each is ``A = R(θ) · [[s_x, h], [0, s_y]]`` followed by a shift ``t``, with
    ``θ`` uniform in ``±rotation`` degrees, ``s_x`` and ``s_y`` uniform in
    ``1 ± scale``, ``h`` uniform in ``±shear``, and each component of ``t``
    uniform in ``±shift`` times the image side. All four ranges 0 give the identity.
    Drawn with ``generator`` on its own device and moved to ``device`` (by default the
    generator's, else torch's default device).

    Raises:
        ValueError: an ``n`` that is not an int >= 0, a range that is not a finite number >= 0, or a
            ``scale`` of 1 or more.
    """
    n = check_count("n (the number of matrices)", n, 0)
    for name, value in (("rotation", rotation), ("scale", scale), ("shear", shear), ("shift", shift)):
        check_non_negative(name, value)
    if scale >= 1:
        raise ValueError(f"scale must be below 1, or an image could be flipped or collapsed; got {scale}")

    def uniform(bound: float, *shape: int) -> Tensor:
        return (2 * draw_with(torch.rand, (n, *shape), generator, device) - 1) * bound

    angle = uniform(math.radians(rotation))
    cos, sin = angle.cos(), angle.sin()
    sx, sy, h = 1 + uniform(scale), 1 + uniform(scale), uniform(shear)
    linear = torch.stack([torch.stack([cos * sx, cos * h - sin * sy], -1),
                          torch.stack([sin * sx, sin * h + cos * sy], -1)], -2)
    return torch.cat([linear, 2 * uniform(shift, 2, 1)], -1)   # coordinates span [-1, 1]: twice the fraction


def warp(images: Tensor, theta: Tensor) -> Tensor:
    """Resample ``(n, C, H, W)`` images at ``theta @ (x, y, 1)`` for every output pixel ``(x, y)``.

    ``theta`` is ``(n, 2, 3)`` in the coordinates of :func:`torch.nn.functional.affine_grid`
    (``x`` and ``y`` in ``[-1, 1]`` across the image, pixel centres as with
    ``align_corners=False``); bilinear interpolation, 0 outside the image. The result has
    the images' dtype; float16 and bfloat16 images are resampled in float32, since a grid
    of sampling positions in their precision misplaces them by up to half a pixel of a
    105-pixel side (the identity map then blurs and shifts the images).
    """
    dtype = torch.promote_types(images.dtype, torch.float32)
    grid = F.affine_grid(theta.to(dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images.to(dtype), grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False).to(images.dtype)


def shifted_copies(images: Tensor, pixels: int = 1) -> Tensor:
    """The images and four copies shifted by ``pixels`` right, left, down and up, zero-filled: ``(5, ...)``.

    The views of test-time augmentation: a prediction averaged over slightly moved
    copies of an input is less sensitive to where exactly a stroke falls (as
    Krizhevsky et al. 2012 averaged over crops and reflections).

    Args:
        images: ``(..., H, W)``.
        pixels: the shift, ``0 < pixels < min(H, W)``.

    Raises:
        ValueError: ``images`` with fewer than two dimensions, or a shift outside that range.
    """
    if images.dim() < 2:
        raise ValueError(f"images must be (..., H, W), got shape {tuple(images.shape)}: pass images, not a vector")
    height, width = images.shape[-2:]
    if not is_integer(pixels) or not 0 < pixels < min(height, width):
        raise ValueError(f"pixels must be an integer in 1 .. {min(height, width) - 1}; got {pixels!r}")
    p = int(pixels)
    padded = F.pad(images, (p, p, p, p))
    views = [(p, p), (p, 0), (p, 2 * p), (0, p), (2 * p, p)]          # (top, left) of each window in the padding
    return torch.stack([padded[..., top:top + height, left:left + width] for top, left in views])
