"""Streamlined moment propagation on the conformance family, posteriors from a Laplace fitted on it.

Reference: Monte Carlo of the same weight posterior (tests/streamlined/mc.py) through the eval-mode network,
with weights drawn here from N(theta, Sigma) where Sigma is the fitted structure's dense Lambda^-1 with the
covariances between different layers removed (Streamlined treats layers as independent; diag, kron and ekfac
have none). The prior precision is large (PRIOR) so the posterior is narrow, the regime where propagation by
linearisation holds. Checks: mean = the eval-mode model(x) to 1e-6; "full" activation covariance: every output
variance within 10 % (+ 4.5 MC standard errors) of the Monte-Carlo one (measured: at most 8.6 %, of which the
MC error is up to 7 %); "diagonal" (drops the covariances between units, by design): the summed variance within a
factor of 2 of the Monte-Carlo one (measured 0.64 with two hidden layers, 1.00-1.03 with one), which catches
gross errors, not the approximation itself.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conformance.models import MODELS, Case, model_params
from conformance.references import (
    Covered,
    Expected,
    assert_covers,
    assert_mean_is_eval_model,
    covariance,
    covered,
    outcome,
)
from streamlined.mc import mc_moments, total_ratio

from posthoc.laplace import Laplace
from posthoc.streamlined import Streamlined

STRUCTURES = ["diag", "kron", "ekfac", "full"]
SUBSETS = ["all", "last_layer"]
MODES = ["diagonal", "full"]
PRIOR = 1000.0
N_MC = 8000
FULL_MODE_RTOL, Z_MAX = 0.10, 4.5
DIAGONAL_MODE_BAND = (0.5, 2.0)

_CALLED_TWICE = ("one Linear with random weights applied twice: one weight draw enters both calls, which the rules "
                 "(weights independent of their input) cannot express, so the traced path refuses it and names "
                 "register_rule; with the shared layer fixed (last_layer) the traced path propagates it")
_TIED = ("one Parameter held by several modules: Streamlined would propagate each holder's weights as independent "
         "(or one as fixed), so it refuses the posterior and names the Laplace glm predictive; a tied last layer is "
         "refused by the Laplace itself (see test_laplace), with the same words")
EXPECTED_ERRORS = [
    Expected("linear_twice", "*-all-*", ValueError, "called 2 times.*register_rule", _CALLED_TWICE),
    Expected("tied_embedding", "*", ValueError, "tied weights", _TIED),
    Expected("tied_head_first", "*", ValueError, "tied weights", _TIED),
    Expected("tied_sequential", "*-all-*", ValueError, "tied weights", _TIED),
    Expected("two_holders", "*-all-*", ValueError, "tied weights", _TIED),
    Expected("dropout_batchnorm", "full-all-*", ValueError, "BatchNorm.weight has a non-diagonal posterior",
             "the BatchNorm rule takes diagonal weight variances only; a full Laplace over all weights gives it a "
             "dense block"),
]


def _layer_block_sampler(cov: Covered, sigma: torch.Tensor):
    """mc.py's sample_params: weights ~ N(theta, Sigma with cross-layer blocks zeroed), as parameter dicts."""
    params = dict(cov.model.named_parameters())
    layers = [name.rpartition(".")[0] for name in cov.names]
    layer_of = torch.cat([torch.full((params[name].numel(),), layers.index(layer))
                          for name, layer in zip(cov.names, layers, strict=True)])
    if cov.indices is not None:
        layer_of = layer_of[cov.indices]
    same_layer = layer_of.unsqueeze(0) == layer_of.unsqueeze(1)
    chol = torch.linalg.cholesky(sigma * same_layer)
    theta = cov.theta()

    def sample(n: int, generator: torch.Generator) -> dict:
        eps = torch.randn(n, theta.numel(), generator=generator, dtype=theta.dtype)
        thetas = theta + eps @ chol.T
        full = thetas if cov.indices is None else cov._base().expand(n, -1).index_put(
            (slice(None), cov.indices), thetas)
        pieces = torch.split(full, [params[name].numel() for name in cov.names], dim=1)
        return {name: piece.reshape(n, *params[name].shape) for name, piece in zip(cov.names, pieces, strict=True)}

    return sample


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("subset", SUBSETS)
@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("model_name", model_params())
def test_streamlined(model_name: str, structure: str, subset: str, mode: str) -> None:
    case: Case = MODELS[model_name]()
    with outcome(EXPECTED_ERRORS, model_name, f"{structure}-{subset}-{mode}"):
        la = Laplace(case.model, case.likelihood, subset_of_weights=subset, hessian_structure=structure,
                     prior_precision=PRIOR, progress=False)
        case.after_build(case.model)
        la.fit(case.loader())
        sp = Streamlined(case.model, posterior=la, activation_covariance=mode)
        case.before_predict(case.model)
        pred = sp.predict(case.x_test)
        assert_mean_is_eval_model(pred.mean, case, case.x_test)
        cov = covered(case, subset)
        assert_covers(la.n_params, cov, subset)
        precision = la.structure.dense_precision(la.prior_precision, la.factors.scale(la.sigma_noise)).detach()
        reference = mc_moments(copy.deepcopy(case.reference), case.x_test,
                               _layer_block_sampler(cov, covariance(precision)), n_samples=N_MC)
        if mode == "full":
            excess = (pred.var - reference.var).abs() - FULL_MODE_RTOL * reference.var - Z_MAX * reference.var_se
            assert float(excess.max()) <= 0, (
                f"full-mode output variance vs Monte Carlo: worst relative error "
                f"{float(((pred.var - reference.var).abs() / reference.var).max()):.3g}")
        else:
            ratio = total_ratio(pred.var, reference)
            assert DIAGONAL_MODE_BAND[0] <= ratio <= DIAGONAL_MODE_BAND[1], \
                f"diagonal-mode summed variance / Monte Carlo = {ratio:.3g}"
