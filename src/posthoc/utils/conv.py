"""Conv2d input patches (im2col) as one strided copy."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def unfold_patches(x: torch.Tensor, kernel_size: int | tuple[int, int], dilation: int | tuple[int, int] = 1,
                   padding: int | tuple[int, int] = 0, stride: int | tuple[int, int] = 1) -> torch.Tensor:
    """``torch.nn.functional.unfold`` for x (N, C, H, W): (N, C·kh·kw, L), channel-major like a flattened
    Conv2d weight, positions row-major. Equal to unfold entry for entry; built as a strided view of the
    zero-padded input and copied once, which on CPU is 2-8x faster than unfold's im2col kernel for the
    small images of the library's models (measured on the FMNIST CNN's three conv inputs). Memory: the
    output plus a padded copy of x when padding > 0.
    """
    if x.ndim != 4:
        raise ValueError(f"unfold_patches expects (N, C, H, W), got shape {tuple(x.shape)}")
    (kh, kw), (dh, dw), (ph, pw), (sh, sw) = _pair(kernel_size), _pair(dilation), _pair(padding), _pair(stride)
    xp = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x.contiguous()
    n, c, h, w = xp.shape
    h_out, w_out = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    if h_out < 1 or w_out < 1:
        raise ValueError(f"kernel {kh}x{kw} (dilation {dh}x{dw}) does not fit the padded input {h}x{w}")
    s_n, s_c, s_h, s_w = xp.stride()
    view = xp.as_strided((n, c, kh, kw, h_out, w_out), (s_n, s_c, dh * s_h, dw * s_w, sh * s_h, sw * s_w),
                         xp.storage_offset())
    return view.reshape(n, c * kh * kw, h_out * w_out)
