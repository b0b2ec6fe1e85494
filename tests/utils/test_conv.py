import pytest
import torch
import torch.nn.functional as F

from posthoc.utils.conv import unfold_patches


@pytest.mark.parametrize(("kernel", "dilation", "padding", "stride"), [
    (3, 1, 1, 1), (3, 1, 0, 1), ((2, 3), 1, (1, 0), (2, 1)), (3, 2, 2, 1), (1, 1, 0, 2), ((3, 1), (1, 2), 1, (1, 3)),
])
def test_equals_unfold(kernel, dilation, padding, stride):
    x = torch.randn(3, 2, 9, 8, dtype=torch.float64)
    expected = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    assert torch.equal(unfold_patches(x, kernel, dilation, padding, stride), expected)


def test_non_contiguous_input_and_gradient():
    x = torch.randn(2, 8, 7, 3, dtype=torch.float64).permute(0, 3, 1, 2).requires_grad_()  # (2, 3, 8, 7) strided
    out = unfold_patches(x, 3, padding=1)
    assert torch.equal(out, F.unfold(x, 3, padding=1))
    (g,) = torch.autograd.grad(out.square().sum(), x)
    (g_ref,) = torch.autograd.grad(F.unfold(x, 3, padding=1).square().sum(), x)
    torch.testing.assert_close(g, g_ref)


def test_bad_input():
    with pytest.raises(ValueError, match="expects"):
        unfold_patches(torch.zeros(2, 3, 4), 3)
    with pytest.raises(ValueError, match="does not fit"):
        unfold_patches(torch.zeros(1, 1, 2, 2), 3)
