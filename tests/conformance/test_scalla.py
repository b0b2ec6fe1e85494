"""ScaLLA on the conformance family (a few training steps of a tiny surrogate).

Checks: the predictive mean is the eval-mode model(x) to 1e-6; the covariance is finite, symmetric and PSD; the
fitted state loads into a ScaLLA freshly built on the same model (it records the weights it was fitted at) and
predicts the same; where the user's steps differ from the plain flow (weights loaded after construction, train
mode), the predictive equals that of a ScaLLA fitted the plain way (eval-mode model built after loading).
"""

from __future__ import annotations

import copy

import pytest
import torch
from conformance.models import MODELS, Case, model_params
from conformance.references import (
    Expected,
    assert_close_relative,
    assert_finite_psd,
    assert_mean_is_eval_model,
    outcome,
)

from posthoc.scalla import ScaLLA

N_FEATURES = 4
SETTINGS = dict(n_features=N_FEATURES, steps=5, batch_size=16, n_target_points=32, directions="rademacher",
                checkpoint_every=1000, progress=False)
SURROGATES = ["default_surrogate", "own_surrogate"]

# none: the default surrogate of a model with neither .trunk nor nn.Sequential form is a copy of the model with
# its last nn.Linear on the output path replaced by an identity (posthoc.scalla.surrogate.ModelTrunk); before, the
# custom-forward models (head_first, tied_embedding, tied_head_first, two_holders, linear_twice, unused_frozen)
# raised a ValueError asking for surrogate=
EXPECTED_ERRORS: list[Expected] = []


def _scalla(case: Case, model, surrogate: str) -> ScaLLA:
    own = case.surrogate(N_FEATURES * case.n_outputs) if surrogate == "own_surrogate" else None
    return ScaLLA(model, case.likelihood, surrogate=own, **SETTINGS)


@pytest.mark.parametrize("surrogate", SURROGATES)
@pytest.mark.parametrize("model_name", model_params())
def test_scalla(model_name: str, surrogate: str) -> None:
    case = MODELS[model_name]()
    with outcome(EXPECTED_ERRORS, model_name, surrogate):
        s = _scalla(case, case.model, surrogate)
        case.after_build(case.model)
        s.fit(case.loader())
        case.before_predict(case.model)
        pred = s.predict(case.x_test)
        assert_mean_is_eval_model(pred.mean, case, case.x_test)
        assert_finite_psd(pred.cov, "ScaLLA predictive covariance")
        restored = _scalla(case, case.model, surrogate).load_state_dict(s.state_dict())
        case.before_predict(case.model)
        torch.testing.assert_close(restored.predict(case.x_test).cov, pred.cov, rtol=1e-10, atol=0)
        if case.has_user_steps:
            plain = _scalla(case, copy.deepcopy(case.reference), surrogate).fit(case.loader())
            assert_close_relative(pred.cov, plain.predict(case.x_test).cov, 1e-8,
                                  "ScaLLA covariance vs ScaLLA fitted on the eval-mode model")
            assert_close_relative(s.log_marginal_likelihood(), plain.log_marginal_likelihood(), 1e-8,
                                  "ScaLLA evidence vs ScaLLA fitted on the eval-mode model")
