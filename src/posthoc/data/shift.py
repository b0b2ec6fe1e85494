"""Dataset shift by rotation: images turned about their centre (rotated-MNIST, Laplace Redux)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from posthoc.utils.checks import check_finite, check_ndim

__all__ = ["rotate_images"]


def rotate_images(images: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate every image of a batch counter-clockwise by ``degrees`` about its centre.

    Bilinear interpolation; pixels whose source lies outside the image are filled with 0
    (black, the MNIST background). Positive angles turn the picture counter-clockwise as
    displayed (row 0 at the top), the convention of ``torch.rot90(x, 1, dims=(-2, -1))`` and of
    torchvision's ``rotate``; multiples of 360 return the input unchanged, and multiples of 90 on
    square images equal ``torch.rot90`` up to float round-off, because pixel centres then map
    onto pixel centres.

    Args:
        images: ``(N, C, H, W)`` floating-point images (any range).
        degrees: the angle, a finite number.

    Returns:
        ``(N, C, H, W)`` rotated images, same dtype and device. Cost: O(N·C·H·W) time and memory.

    Raises:
        ValueError: ``images`` is not 4-D or holds NaN/Inf, or ``degrees`` is not finite.
        TypeError: ``images`` is not floating point.
    """
    check_ndim(images, 4, "images", "(N, C, H, W)")
    if not images.is_floating_point():
        raise TypeError(f"images must be floating point (e.g. images.float() / 255), got {images.dtype}")
    check_finite(images, "images")
    angle = float(degrees)
    if not math.isfinite(angle):
        raise ValueError(f"degrees must be a finite number, got {degrees!r}")
    if angle % 360.0 == 0.0:
        return images.clone()
    height, width = images.shape[-2:]
    radians = math.radians(angle)
    cos, sin = math.cos(radians), math.sin(radians)
    # affine_grid works in coordinates normalised to [-1, 1] per axis (y pointing down). An output pixel
    # at pixel offset (u, v) from the centre reads the input at the offset turned back by the angle; the
    # scalings convert between pixel and normalised units so non-square images rotate rigidly too.
    theta = torch.tensor(
        [[cos, -sin * height / width, 0.0],
         [sin * width / height, cos, 0.0]],
        dtype=images.dtype, device=images.device,
    )
    grid = F.affine_grid(theta.expand(images.shape[0], 2, 3), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
