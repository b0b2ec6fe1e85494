"""Conv2d input patches (im2col) as one strided copy."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from posthoc.utils.linalg import gram


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def unfold_patches(x: torch.Tensor, kernel_size: int | tuple[int, int], dilation: int | tuple[int, int] = 1,
                   padding: int | tuple[int, int] = 0, stride: int | tuple[int, int] = 1) -> torch.Tensor:
    """``torch.nn.functional.unfold`` for x (N, C, H, W): patches (N, C·kh·kw, L), equal entry for entry.

    Channel-major like a flattened Conv2d weight, positions row-major. Built as a strided view of the
    zero-padded input and copied once, which on CPU beats unfold's im2col kernel for the small images of the
    library's models (timings in docs/measurements/core.md). Memory: the output plus a padded copy of x when
    padding > 0.

    Raises:
        ValueError: For ``x`` not 4-d, or a kernel that does not fit the padded input.
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


# Below this row-product width (C_in·kw) the row-lag route's many small products lose to one
# gram of the unfolded patches (timings in docs/measurements/core.md).
MIN_ROW_WIDTH = 16


def conv_input_gram(x: torch.Tensor, kernel_size: int | tuple[int, int], dilation: int | tuple[int, int] = 1,
                    padding: int | tuple[int, int] = 0, stride: int | tuple[int, int] = 1) -> torch.Tensor:
    """Σ_n Σ_l a_nl a_nlᵀ over the patches a_nl of x (N, C, H, W): the (C·kh·kw, C·kh·kw) patch gram.

    The gram of :func:`unfold_patches` (same channel-major order), computed without forming the patches.

    Entry ((c, i, j), (c', i', j')) sums x_pad[c, r + i·dh, ·] x_pad[c', r + i'·dh, ·] over output rows
    r, so it depends on the kernel rows only through which input rows are paired. The horizontal patches
    of every padded input row, xh (rows, N·W_out, C·kw) (kw times the size of x, not kh·kw), give all
    products of rows ρ and ρ + δ·dh for each row lag δ in one batched product; the block of kernel rows
    (i, i + δ) is then the sum of those products over the rows the outputs read. Cost
    kh·rows·N·W_out·(C·kw)² against (C·kh·kw)²·N·H_out·W_out for the patches' gram: about kh·H_out/rows
    (≈ 3 for a 3×3 "same" convolution) times fewer multiplications, and no cancellation (only sums).
    Falls back to the patches' gram when C·kw < MIN_ROW_WIDTH or kh = 1.
    """
    (kh, kw), (dh, dw), (ph, pw), (sh, sw) = _pair(kernel_size), _pair(dilation), _pair(padding), _pair(stride)
    if x.ndim != 4:
        raise ValueError(f"conv_input_gram expects (N, C, H, W), got shape {tuple(x.shape)}")
    n, c = x.shape[:2]
    if kh == 1 or c * kw < MIN_ROW_WIDTH:
        return gram(unfold_patches(x, kernel_size, dilation, padding, stride))
    xp = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x
    h, w = xp.shape[-2:]
    h_out, w_out = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    if h_out < 1 or w_out < 1:
        raise ValueError(f"kernel {kh}x{kw} (dilation {dh}x{dw}) does not fit the padded input {h}x{w}")
    rows = (h_out - 1) * sh + (kh - 1) * dh + 1
    s_n, s_c, s_h, s_w = xp.stride()
    # xh[ρ, (n, q), (c, j)] = x_pad[n, c, ρ, q·sw + j·dw]
    xh = xp.as_strided((rows, n, w_out, c, kw), (s_h, s_n, sw * s_w, s_c, dw * s_w), xp.storage_offset())
    xh = xh.reshape(rows, n * w_out, c * kw)
    out = x.new_empty(c, kh, kw, c, kh, kw)
    for lag in range(kh):
        shift = lag * dh
        products = torch.bmm(xh[: rows - shift].mT, xh[shift:])  # (rows - shift, C·kw, C·kw): rows ρ, ρ + shift
        for i in range(kh - lag):
            read = products[i * dh: i * dh + (h_out - 1) * sh + 1: sh]  # the rows kernel row i reads
            block = read.sum(0).view(c, kw, c, kw)
            out[:, i, :, :, i + lag, :] = block
            if lag:
                out[:, i + lag, :, :, i, :] = block.permute(2, 3, 0, 1)
    return out.view(c * kh * kw, c * kh * kw)
