"""Rotation of image batches: identities, agreement with torch.rot90, a hand example, input errors."""

import math

import pytest
import torch

from posthoc.data.shift import rotate_images


def _images(shape=(3, 2, 28, 28)) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.mark.parametrize("degrees", [0, 360, -720.0])
def test_full_turns_are_the_identity(degrees) -> None:
    x = _images()
    out = rotate_images(x, degrees)
    assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()


# A quarter turn of a non-square image changes its shape, so the 6x10 image only takes half turns.
@pytest.mark.parametrize(("k", "shape"), [(1, (3, 2, 28, 28)), (2, (3, 2, 28, 28)), (3, (3, 2, 28, 28)),
                                          (-1, (3, 2, 28, 28)), (2, (2, 1, 6, 10)), (-2, (2, 1, 6, 10))])
def test_quarter_turns_match_rot90_counter_clockwise(k, shape) -> None:
    x = _images(shape)
    torch.testing.assert_close(rotate_images(x, 90 * k), torch.rot90(x, k, dims=(-2, -1)), atol=1e-12, rtol=0)


def _blob(center_row: float, center_col: float, size: int = 41, sigma: float = 3.0) -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64),
                                indexing="ij")
    return torch.exp(-((rows - center_row) ** 2 + (cols - center_col) ** 2) / (2 * sigma**2))[None, None]


def test_a_small_angle_moves_a_blob_along_the_circle_and_fills_with_zero() -> None:
    # A smooth blob 10 pixels right of the centre (20, 20) of a 41x41 image (odd size: the centre is a pixel),
    # far enough from the border that no part of it is cut off.
    out = rotate_images(_blob(20, 30), 30)
    # Counter-clockwise as displayed: the blob rises (smaller row) and stays at radius 10.
    expected = _blob(20 - 10 * math.sin(math.radians(30)), 20 + 10 * math.cos(math.radians(30)))
    torch.testing.assert_close(out, expected, atol=0.03, rtol=0)  # bilinear error of a sigma = 3 px blob
    assert float((out - _blob(20 + 10 * math.sin(math.radians(30)), 20 + 10 * math.cos(math.radians(30))))
                 .abs().max()) > 0.5  # the clockwise turn is far off
    # A constant image loses its corners (zero fill) but keeps its centre.
    ones = rotate_images(torch.ones(1, 1, 29, 29, dtype=torch.float64), 45)
    assert float(ones[0, 0, 0, 0]) == 0.0 and float(ones[0, 0, 14, 14]) == pytest.approx(1.0)


def test_bad_inputs_fail_clearly() -> None:
    with pytest.raises(ValueError, match="N, C, H, W"):
        rotate_images(torch.rand(28, 28), 10)
    with pytest.raises(TypeError, match="floating point"):
        rotate_images(torch.zeros(1, 1, 4, 4, dtype=torch.uint8), 10)
    with pytest.raises(ValueError, match="finite"):
        rotate_images(torch.rand(1, 1, 4, 4), float("nan"))
