"""Laplace on the conformance family: every structure x subset x predictive against dense references.

glm: the evidence equals the dense formula at the model's weights and Lambda_struct (1e-8); mean = the eval-mode
model(x) to 1e-6; covariance = J Lambda_struct^-1 J^T (J by jacrev of the covered function, Lambda_struct the
fitted structure's own dense precision) to 1e-6 relative; full and diag (and the low-rank eigenvalues) also
against the exact dense GGN posterior. nn: weight samples centred on the model's weights with covariance
Lambda_struct^-1 (a few Gaussian statistics, each within 4 standard errors), and the sampled predictive equal to
the eval-mode network at those samples. kron/ekfac, whose curvature has no dense closed form, are also held to
the same structure fitted the plain way (eval-mode model, built after its weights were loaded) where the user's
steps differ from it.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conformance.models import MODELS, Case, model_params
from conformance.references import (
    Expected,
    assert_close_relative,
    assert_covers,
    assert_mean_is_eval_model,
    assert_samples_match,
    covariance,
    covered,
    curvature_scale,
    dense_precision,
    glm_covariance,
    log_evidence,
    outcome,
)

from posthoc.laplace import Laplace

STRUCTURES = ["full", "diag", "kron", "ekfac", "lowrank"]
SUBSETS = ["all", "last_layer", "subnetwork"]
PRED_TYPES = ["glm", "nn"]
PRIOR, SIGMA = 1.0, 0.7
# rank below P for every covered set, so Lanczos runs; complement "prior": Lambda^-1 is the posterior covariance
# (the default "omit" has no dense precision; tests/laplace/test_lowrank_structure.py checks it against the exact GGN)
OPTIONS = {"lowrank": {"rank": 6, "complement": "prior"}}
N_WEIGHT_SAMPLES = 4000

# (model, "structure-subset-pred_type") pairs that must raise, and why. Anything not listed must answer correctly.
EXPECTED_ERRORS = [
    Expected("*", "kron-subnetwork-*", ValueError, "subnetwork",
             "KFAC blocks are whole weight matrices: a subnetwork is refused at construction"),
    Expected("*", "ekfac-subnetwork-*", ValueError, "subnetwork",
             "EKFAC shares KFAC's eigenbasis of whole weight matrices: a subnetwork is refused at construction"),
    Expected("tied_embedding", "*-last_layer-*", ValueError, "tied weights",
             "the output layer's weight is also the embedding's: a posterior over it that ignores its other use is "
             "not the last-layer Laplace, so fit refuses it and names subset_of_weights='all'"),
    Expected("tied_head_first", "*-last_layer-*", ValueError, "tied weights", "as tied_embedding"),
]

def _laplace(case: Case, model, structure: str, subset: str, indices) -> Laplace:
    return Laplace(model, case.likelihood, subset_of_weights=subset, hessian_structure=structure,
                   prior_precision=PRIOR, sigma_noise=SIGMA if case.likelihood == "regression" else 1.0,
                   subnetwork_indices=indices, progress=False, structure_options=OPTIONS.get(structure))


def _structure_precision(la: Laplace) -> torch.Tensor:
    """The fitted structure's own dense Lambda (P, P), at the Laplace's prior and noise."""
    return la.structure.dense_precision(la.prior_precision, la.factors.scale(la.sigma_noise)).detach()


def _check_structure(la: Laplace, case: Case, cov, structure: str, subset: str, precision: torch.Tensor) -> None:
    """The structure's Lambda against the exact dense one where the structure is exact (full, diag's diagonal,
    the low-rank's eigenvalues), else against the same structure fitted the plain way."""
    scale = curvature_scale(case, float(la.sigma_noise))
    exact = dense_precision(cov, case, PRIOR, scale)
    if structure == "full":
        assert_close_relative(precision, exact, 1e-8, "full Lambda vs the dense GGN posterior precision")
    elif structure == "diag":
        assert_close_relative(precision.diagonal(), exact.diagonal(), 1e-8, "diag Lambda vs diag of the dense GGN")
    elif structure == "lowrank":
        rank = la.structure.rank
        eye = torch.eye(exact.shape[0], dtype=exact.dtype)
        mine = torch.linalg.eigvalsh(precision - PRIOR * eye).flip(0)[:rank]
        top = torch.linalg.eigvalsh(exact - PRIOR * eye).flip(0)[:rank]
        assert_close_relative(mine, top, 1e-6, "low-rank eigenvalues vs the top eigenvalues of the dense GGN")
    elif case.has_user_steps:
        plain = _laplace(case, copy.deepcopy(case.reference), structure, subset, cov.indices).fit(case.loader())
        assert_close_relative(precision, _structure_precision(plain), 1e-8,
                              f"{structure} Lambda vs the same structure fitted on the eval-mode model")


@pytest.mark.parametrize("pred_type", PRED_TYPES)
@pytest.mark.parametrize("subset", SUBSETS)
@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("model_name", model_params())
def test_laplace(model_name: str, structure: str, subset: str, pred_type: str) -> None:
    case = MODELS[model_name]()
    with outcome(EXPECTED_ERRORS, model_name, f"{structure}-{subset}-{pred_type}"):
        cov = covered(case, subset)
        la = _laplace(case, case.model, structure, subset, cov.indices)
        case.after_build(case.model)
        la.fit(case.loader())
        assert_covers(la.n_params, cov, subset)
        precision = _structure_precision(la)
        _check_structure(la, case, cov, structure, subset, precision)
        posterior_cov = covariance(precision)
        case.before_predict(case.model)
        if pred_type == "glm":
            evidence = float(la.log_marginal_likelihood())
            expected = log_evidence(cov, case, PRIOR, float(la.sigma_noise), precision)
            assert abs(evidence - expected) <= 1e-8 * abs(expected), \
                f"log marginal likelihood {evidence:.10g} vs {expected:.10g} from the model's weights and Lambda"
            pred = la.predict(case.x_test, pred_type="glm")
            assert_mean_is_eval_model(pred.mean, case, case.x_test)
            assert_close_relative(pred.cov, glm_covariance(cov, case.x_test, posterior_cov), 1e-6,
                                  "glm covariance vs J Lambda^-1 J^T")
        else:
            assert_samples_match(la.sample(N_WEIGHT_SAMPLES, seed=1), cov.theta(), posterior_cov, cov.block_sizes())
            pred = la.predict(case.x_test, pred_type="nn", n_samples=8, seed=3)
            thetas = la.sample(8, seed=3)
            expected = torch.stack([cov.forward(case.x_test, th) for th in thetas]).detach()
            err = float((pred.samples - expected).abs().max())
            assert err <= 1e-6, f"nn predictive differs from the eval-mode network at the sampled weights by {err:.3g}"
