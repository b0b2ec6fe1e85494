"""One default link for a Laplace's probabilities: ``la.predict(x).probs()`` is ``la(x)`` (issue 17).

posthoc's Laplace predicts with the centred probit; its glm predictive's ``probs()`` followed laplace-torch's
probit before and now follows ``la.default_link_approx``, with a FutureWarning when no link is passed.
posthoc.compat.laplace keeps laplace-torch's probit for both; other Gaussian predictives keep probit.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from references import DTYPE, mlp_data, small_mlp

from posthoc import Laplace
from posthoc.compat.laplace import Laplace as CompatLaplace
from posthoc.predictive import GaussianPredictive, links


@pytest.fixture(scope="module")
def fitted() -> tuple[Laplace, torch.Tensor]:
    x, y = mlp_data("classification", 24, seed=1)
    la = Laplace(small_mlp(seed=3), "classification", subset_of_weights="all", hessian_structure="full",
                 progress=False).fit([(x[:12], y[:12]), (x[12:], y[12:])])
    return la, x


def test_predict_probs_default_is_la_call_default(fitted):
    la, x = fitted
    with pytest.warns(FutureWarning, match="probit_centred.*link_approx='probit'"):
        default = la.predict(x).probs()
    torch.testing.assert_close(default, la(x), rtol=0, atol=0)
    torch.testing.assert_close(default, links.probit_centred(la.predict(x).mean, la.predict(x).cov), rtol=0, atol=0)
    assert not torch.allclose(default, la.predict(x).probs("probit"))  # the default did change
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an explicit link, either one, does not warn
        la.predict(x).probs("probit_centred")
        la.predict(x).probs("probit")


def test_a_changed_default_link_changes_both(fitted):
    la, x = fitted
    la.default_link_approx = "probit"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # probit was the old default: nothing changed, nothing warns
            torch.testing.assert_close(la.predict(x).probs(), la(x), rtol=0, atol=0)
            torch.testing.assert_close(la(x), links.probit(la.predict(x).mean, la.predict(x).cov), rtol=0, atol=0)
    finally:
        la.default_link_approx = "probit_centred"


def test_compat_laplace_keeps_probit_for_both():
    x, y = mlp_data("classification", 16, seed=2)
    la = CompatLaplace(small_mlp(seed=4), "classification", subset_of_weights="all", hessian_structure="diag")
    la.fit([(x, y)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        default = la.predict(x).probs()
    torch.testing.assert_close(default, la(x), rtol=0, atol=0)
    torch.testing.assert_close(default, la.predict(x).probs("probit"), rtol=0, atol=0)


def test_other_gaussian_predictives_keep_probit_and_the_link_survives_copies():
    g = torch.Generator().manual_seed(0)
    mean, var = torch.randn(4, 3, generator=g, dtype=DTYPE), torch.rand(4, 3, generator=g, dtype=DTYPE)
    plain = GaussianPredictive(mean, var=var)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(plain.probs(), links.probit(mean, var), rtol=0, atol=0)
        # no variance: both links are the softmax of the mean, so nothing changed and nothing warns
        zero = GaussianPredictive(mean, var=torch.zeros_like(var), link_approx="probit_centred")
        torch.testing.assert_close(zero.probs(), torch.softmax(mean, -1))
    centred = GaussianPredictive(mean, var=var, link_approx="probit_centred")
    assert centred.to(torch.float32).link_approx is links.LinkApprox.PROBIT_CENTRED
    assert centred.with_noise(0.1).link_approx is links.LinkApprox.PROBIT_CENTRED
    with pytest.raises(ValueError, match="link_approx"):
        GaussianPredictive(mean, var=var, link_approx="nope")
