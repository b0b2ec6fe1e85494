"""check_finite: a finite sum is its fast path; sums that overflow or cancel must not decide the answer."""

import pytest
import torch

from posthoc.utils.checks import check_finite


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64])
def test_finite_entries_whose_sum_overflows_pass(dtype: torch.dtype) -> None:
    big = torch.finfo(dtype if not dtype.is_complex else torch.float32).max
    x = torch.full((4,), big / 2, dtype=torch.float64).to(dtype)  # sum 2·max: overflows to Inf
    assert not bool(torch.isfinite(x.sum()))
    assert check_finite(x, "x") is x


@pytest.mark.parametrize("bad", [[float("nan")], [float("inf"), float("-inf")], [float("-inf")]])
def test_nan_and_inf_are_refused_with_their_count(bad: list[float]) -> None:
    x = torch.cat([torch.ones(10), torch.tensor(bad)])
    with pytest.raises(ValueError, match=f"{len(bad)} NaN/Inf value"):
        check_finite(x, "x")


def test_integer_and_empty_tensors_pass() -> None:
    assert check_finite(torch.arange(5), "x").dtype == torch.int64
    assert check_finite(torch.empty(0, 3), "x").numel() == 0
