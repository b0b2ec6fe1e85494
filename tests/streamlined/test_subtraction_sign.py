"""c − αh in full mode: the random operand's cross-covariances with live activations carry −α, not +α.

One random Linear followed by linear ops only, so the full mode is exact: its covariance must equal J Σ Jᵀ.
"""

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from posthoc.streamlined import Streamlined

pytestmark = pytest.mark.usefixtures("float64_default")


class Subtracted(nn.Module):
    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.random = nn.Linear(3, 2)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.random(x)
        if self.form == "rsub":
            other = 1.0 - h
        elif self.form == "sub_alpha":
            other = torch.sub(torch.ones_like(h), h, alpha=2)
        else:  # "cancels": (1 - h) + h has no variance at all
            return self.head(torch.cat([(1.0 - h) + h, h], dim=1))
        return self.head(torch.cat([h, other], dim=1))


@pytest.mark.parametrize("form", ["rsub", "sub_alpha", "cancels"])
def test_full_mode_subtraction_equals_the_exact_covariance(form):
    torch.manual_seed(0)
    model = Subtracted(form).eval()
    x = torch.randn(5, 3)
    var = {n: torch.rand_like(p) * 0.1 for n, p in model.random.named_parameters()}
    pred = Streamlined(model, weight_var={f"random.{n}": v for n, v in var.items()},
                       activation_covariance="full").predict(x)
    params = {n: p.detach() for n, p in model.random.named_parameters()}

    def f(p):
        return functional_call(model, {**{f"random.{n}": t for n, t in p.items()},
                                       **{f"head.{n}": t for n, t in model.head.named_parameters()}}, (x,))

    jac = jacrev(f)(params)
    exact = sum(torch.einsum("bc...,...,bd...->bcd", jac[n], var[n], jac[n]) for n in params)
    torch.testing.assert_close(pred.mean, model(x).detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(pred.cov, exact, rtol=1e-10, atol=1e-14)
