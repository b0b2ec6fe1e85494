import pytest
import torch
import torch.nn.functional as F

from posthoc.utils.conv import MIN_ROW_WIDTH, conv_input_gram, unfold_patches


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


@pytest.mark.parametrize(("channels", "kernel", "dilation", "padding", "stride"), [
    (6, 3, 1, 1, 1), (6, 3, 1, 0, 1), (8, (2, 3), 1, (1, 0), (2, 1)), (6, 3, 2, 2, 1), (6, (3, 1), (1, 2), 1, (1, 3)),
    (16, (3, 1), 1, 1, 1), (9, (4, 2), (1, 1), (2, 1), (3, 2)),
    (2, 3, 1, 1, 1), (16, (1, 3), 1, 0, 1),  # below the row width / a single kernel row: the patches' gram
])
def test_conv_input_gram_equals_the_gram_of_unfolded_patches(channels, kernel, dilation, padding, stride):
    x = torch.randn(3, channels, 10, 9, dtype=torch.float64).transpose(2, 3)  # (3, C, 9, 10), not contiguous
    patches = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # (N, D, L)
    expected = torch.einsum("ndl,nel->de", patches, patches)
    torch.testing.assert_close(conv_input_gram(x, kernel, dilation, padding, stride), expected, rtol=1e-12, atol=1e-10)


def test_conv_input_gram_takes_the_row_lag_route_where_wide_enough():
    # the parametrisation above must cover both routes, or the row-lag code would go untested
    assert 6 * 3 >= MIN_ROW_WIDTH > 2 * 3


def test_bad_input():
    with pytest.raises(ValueError, match="expects"):
        unfold_patches(torch.zeros(2, 3, 4), 3)
    with pytest.raises(ValueError, match="does not fit"):
        unfold_patches(torch.zeros(1, 1, 2, 2), 3)
    with pytest.raises(ValueError, match="expects"):
        conv_input_gram(torch.zeros(2, 3, 4), 3)
    with pytest.raises(ValueError, match="does not fit"):
        conv_input_gram(torch.zeros(1, 16, 2, 2), 3)
