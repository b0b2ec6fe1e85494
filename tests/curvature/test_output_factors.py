"""Output-space factors: S S^T reproduces each curvature's per-example output matrix."""

import pytest
import torch

from posthoc.curvature.output_factors import OutputFactors

DTYPE = torch.float64


def test_softmax_ggn_factor_is_exact_with_c_minus_1_columns():
    logits = torch.randn(50, 10, generator=torch.Generator().manual_seed(0), dtype=DTYPE) * 4
    logits[0] = torch.tensor([40.0] + [0.0] * 9)  # p nearly one-hot: the reflection must stay stable
    s = OutputFactors("classification", "ggn")(logits, torch.zeros(50, dtype=torch.long))
    assert s.shape == (50, 10, 9)
    p = torch.softmax(logits, -1)
    gamma = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    torch.testing.assert_close(s @ s.transpose(1, 2), gamma, rtol=0, atol=1e-15)


def test_ef_and_regression_factors():
    logits = torch.randn(4, 3, dtype=DTYPE)
    y = torch.tensor([0, 2, 1, 1])
    ef = OutputFactors("classification", "ef")(logits, y)
    torch.testing.assert_close(ef[..., 0], torch.softmax(logits, -1) - torch.nn.functional.one_hot(y, 3).to(DTYPE))
    reg = OutputFactors("regression", "ggn")(logits, torch.zeros(4, 3, dtype=DTYPE))
    torch.testing.assert_close(reg @ reg.transpose(1, 2), torch.eye(3, dtype=DTYPE).expand(4, 3, 3))
    assert float(OutputFactors("regression", "ef").scale(torch.tensor(2.0))) == pytest.approx(1 / 16)
    assert float(OutputFactors("regression", "ggn").scale(torch.tensor(2.0))) == pytest.approx(1 / 4)


def test_bad_options():
    with pytest.raises(ValueError, match="'ggn', 'ggn_mc', 'ef'"):
        OutputFactors("classification", "hessian")
    with pytest.raises(ValueError, match="mc_samples"):
        OutputFactors("classification", "ggn_mc", mc_samples=0)
