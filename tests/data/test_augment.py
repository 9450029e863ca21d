import math

import numpy as np
import pytest
import torch

from lowlearn.data.augment import random_affine, random_affine_matrices, shifted_copies, warp


def images(n=6, size=12, seed=0):
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed))


def test_zero_ranges_give_the_images_back():
    x = images()
    out = random_affine(x, torch.Generator().manual_seed(0), rotation=0, scale=0, shear=0, shift=0)
    torch.testing.assert_close(out, x)


def test_warp_by_a_quarter_turn_equals_rot90_and_by_a_shift_moves_the_pixels():
    x = images(n=1)
    quarter = torch.tensor([[[0.0, -1.0, 0.0], [1.0, 0.0, 0.0]]])
    torch.testing.assert_close(warp(x, quarter), torch.rot90(x, 1, dims=(-2, -1)), atol=1e-6, rtol=0)
    one_pixel = torch.tensor([[[1.0, 0.0, 2 / 12], [0.0, 1.0, 0.0]]])      # sample one pixel to the right
    shifted = warp(x, one_pixel)
    torch.testing.assert_close(shifted[..., :-1], x[..., 1:], atol=1e-6, rtol=0)
    assert (shifted[..., -1] == 0).all()


def test_random_matrices_stay_in_their_ranges():
    theta = random_affine_matrices(2000, torch.Generator().manual_seed(1), rotation=10, scale=0.1, shear=0.2,
                                   shift=0.07)
    det = torch.linalg.det(theta[:, :, :2])
    assert det.min() >= 0.9 ** 2 - 1e-6 and det.max() <= 1.1 ** 2 + 1e-6      # det = s_x s_y (rotation, shear: 1)
    assert theta[:, :, 2].abs().max() <= 0.14 + 1e-6
    # with only rotation, the matrices are rotations by at most 10 degrees
    rotations = random_affine_matrices(500, torch.Generator().manual_seed(2), rotation=10, scale=0, shear=0, shift=0)
    angles = torch.atan2(rotations[:, 1, 0], rotations[:, 0, 0])
    assert angles.abs().max() <= math.radians(10) + 1e-6 and angles.abs().max() > math.radians(9)
    orthogonal = rotations[:, :, :2] @ rotations[:, :, :2].transpose(1, 2)
    torch.testing.assert_close(orthogonal, torch.eye(2).expand(500, 2, 2))


def test_each_image_gets_its_own_distortion_reproducibly_and_leading_dimensions_are_kept():
    x = images(n=1).expand(4, 3, 1, 12, 12)
    first = random_affine(x, torch.Generator().manual_seed(3))
    assert first.shape == x.shape
    torch.testing.assert_close(first, random_affine(x, torch.Generator().manual_seed(3)))
    assert not torch.allclose(first[0, 0], first[0, 1])


def test_bad_ranges_are_clear_errors():
    with pytest.raises(ValueError, match="rotation must be a finite number >= 0, got -1"):
        random_affine(images(), rotation=-1)
    with pytest.raises(ValueError, match="scale must be below 1"):
        random_affine(images(), scale=1.0)
    for name, bad in (("rotation", math.nan), ("shear", math.inf), ("shift", 10**400), ("rotation", "10")):
        with pytest.raises(ValueError, match=f"{name} must be a finite number >= 0"):    # not NaN images
            random_affine(images(), **{name: bad})


def test_a_number_of_matrices_that_is_not_a_count_is_a_clear_error():
    """torch refused a float count with a list of rand()'s signatures and a negative one as a tensor dimension."""
    for bad in (2.0, -1, True, "3"):
        with pytest.raises(ValueError, match=r"n \(the number of matrices\) must be an int >= 0; got"):
            random_affine_matrices(bad)
    assert random_affine_matrices(np.int64(3), torch.Generator().manual_seed(0)).shape == (3, 2, 3)
    assert random_affine_matrices(0).shape == (0, 2, 3)


def test_images_that_are_not_float_or_not_images_are_clear_errors_and_an_empty_batch_comes_back_empty():
    with pytest.raises(ValueError, match=r"\(\.\.\., C, H, W\), got shape \(9, 9\).*unsqueeze\(-3\)"):
        random_affine(torch.rand(9, 9))
    with pytest.raises(ValueError, match=r"must be float .*got torch.uint8.*images.float\(\) / 255"):
        random_affine((images() * 255).to(torch.uint8))
    empty = torch.zeros(0, 1, 12, 12)
    out = random_affine(empty)
    assert out.shape == empty.shape and out is not empty


def test_each_range_is_drawn_on_both_sides_and_reaches_its_bound():
    n, generator = 4000, torch.Generator().manual_seed(4)
    shears = random_affine_matrices(n, generator, rotation=0, scale=0, shear=0.2, shift=0)
    # A shear alone is [[1, h], [0, 1]]: it moves x by h * y and leaves y alone.
    torch.testing.assert_close(shears[:, :, [0, 2]], torch.tensor([[1.0, 0.0], [0.0, 0.0]]).expand(n, 2, 2))
    torch.testing.assert_close(shears[:, 1, 1], torch.ones(n))
    h = shears[:, 0, 1]
    assert h.min() < -0.19 and h.max() > 0.19 and h.abs().max() <= 0.2
    scales = random_affine_matrices(n, generator, rotation=0, scale=0.1, shear=0, shift=0)
    sx, sy = scales[:, 0, 0], scales[:, 1, 1]
    assert sx.min() < 0.91 and sx.max() > 1.09 and sy.min() < 0.91 and sy.max() > 1.09
    assert (sx - sy).abs().max() > 0.1                                  # the two scales are drawn independently
    assert (scales[:, 0, 1] == 0).all() and (scales[:, 1, 0] == 0).all()
    shifts = random_affine_matrices(n, generator, rotation=0, scale=0, shear=0, shift=0.07)[:, :, 2]
    assert shifts.min() < -0.13 and shifts.max() > 0.13 and shifts.abs().max() <= 0.14   # 7% of a side spanning 2
    angles = random_affine_matrices(n, generator, rotation=10, scale=0, shear=0, shift=0)
    angles = torch.atan2(angles[:, 1, 0], angles[:, 0, 0])
    assert angles.min() < -math.radians(9.5) and angles.max() > math.radians(9.5)


def test_warp_interpolates_between_pixels_and_keeps_the_images_dtype():
    x = images(n=2).double()
    half_pixel = torch.tensor([[[1.0, 0.0, 1 / 12], [0.0, 1.0, 0.0]]], dtype=torch.float64).expand(2, 2, 3)
    torch.testing.assert_close(warp(x, half_pixel)[..., :-1], (x[..., :-1] + x[..., 1:]) / 2)
    out = random_affine(x, torch.Generator().manual_seed(0))
    assert out.dtype == torch.float64 and out.shape == x.shape


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_images_are_warped_as_float32_ones_rounded_to_their_dtype(dtype):
    """Reference: the same warp of the images in float32, rounded to their dtype at the end. The identity map gives
    binary 105 × 105 images back to within float32's rounding of the grid (a grid in bfloat16 moved pixels by up to
    0.75 of the ink's value, in float16 by 0.12)."""
    ink = (images(n=3, size=105) > 0.7).to(dtype)
    identity = random_affine(ink, torch.Generator().manual_seed(0), rotation=0, scale=0, shear=0, shift=0)
    assert identity.dtype == dtype
    torch.testing.assert_close(identity.float(), ink.float(), atol=1e-3, rtol=0)
    out = random_affine(ink, torch.Generator().manual_seed(1))
    reference = random_affine(ink.float(), torch.Generator().manual_seed(1)).to(dtype)
    assert out.dtype == dtype and torch.equal(out, reference)


def test_shifted_copies_move_the_pixels_and_fill_with_zeros():
    x = torch.arange(1.0, 10.0).view(1, 3, 3)
    views = shifted_copies(x, 1)
    assert views.shape == (5, 1, 3, 3)
    assert torch.equal(views[0], x)
    assert views[1].tolist() == [[[0, 1, 2], [0, 4, 5], [0, 7, 8]]]        # moved right
    assert views[2].tolist() == [[[2, 3, 0], [5, 6, 0], [8, 9, 0]]]        # moved left
    assert views[3].tolist() == [[[0, 0, 0], [1, 2, 3], [4, 5, 6]]]        # moved down
    assert views[4].tolist() == [[[4, 5, 6], [7, 8, 9], [0, 0, 0]]]        # moved up
    for bad in (3, 0, 1.5, True):
        with pytest.raises(ValueError, match="pixels must be an integer in 1 .. 2"):
            shifted_copies(x, bad)
    assert torch.equal(shifted_copies(x, np.int64(1)), views)
    with pytest.raises(ValueError, match=r"images must be \(\.\.\., H, W\), got shape \(9,\)"):
        shifted_copies(x.flatten(), 1)


def test_shifted_copies_of_a_wide_image():
    x = torch.arange(1.0, 9.0).view(2, 4)
    views = shifted_copies(x, 1)
    assert views.shape == (5, 2, 4)
    assert views[1].tolist() == [[0, 1, 2, 3], [0, 5, 6, 7]] and views[3].tolist() == [[0, 0, 0, 0], [1, 2, 3, 4]]
    with pytest.raises(ValueError, match="pixels must be an integer in 1 .. 1"):
        shifted_copies(x, 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_random_affine_on_gpu():
    x = images().cuda()
    for generator in (None, torch.Generator(device="cuda").manual_seed(0)):
        out = random_affine(x, generator)
        assert out.device == x.device and out.shape == x.shape
    assert random_affine_matrices(3, torch.Generator(device="cuda").manual_seed(0)).device == x.device


def test_the_two_components_of_the_shift_are_drawn_independently():
    """random_affine_matrices' docstring: 'each component of t uniform in ±shift times the image side'.
    With the other ranges 0 the linear part is the identity and t = 2·(u_x, u_y)·shift; over 4000 draws the two
    components have sample correlation near 0 (|r| < 0.1; a shared draw gives r = 1) and fill the square, so
    the two differ in most matrices."""
    theta = random_affine_matrices(4000, torch.Generator().manual_seed(0), rotation=0, scale=0, shear=0, shift=0.1)
    assert torch.equal(theta[:, :, :2], torch.eye(2).expand(4000, 2, 2))
    tx, ty = theta[:, 0, 2].double(), theta[:, 1, 2].double()
    r = torch.corrcoef(torch.stack([tx, ty]))[0, 1]
    assert abs(r) < 0.1
    assert (tx - ty).abs().gt(0.01).float().mean() > 0.9
    assert tx.abs().max() <= 0.2 and ty.abs().max() <= 0.2
