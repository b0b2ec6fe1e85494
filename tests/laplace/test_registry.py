"""The structure registry is open and keyed by name: a user plug-in registered under a new name is chosen by
Laplace(hessian_structure=name) and runs fit, evidence, predict, sample and a state round trip end to end."""

import pytest
import torch
from references import small_mlp
from torch.utils.data import DataLoader, TensorDataset

from posthoc import Laplace
from posthoc.laplace import STRUCTURES, HessianStructure, get_structure, register_structure
from posthoc.laplace.structures import CurvatureStructure, DiagCurvature

PLUGIN = "diag_plugin_test"


class CountingDiag(DiagCurvature):
    """The diag structure, counting its fits (a stand-in for a user's own structure)."""

    fits = 0

    @classmethod
    def fit(cls, *args, **kwargs):
        cls.fits += 1
        return super().fit(*args, **kwargs)


@pytest.fixture
def plugin():
    register_structure(PLUGIN, CountingDiag)
    try:
        yield CountingDiag
    finally:
        STRUCTURES.pop(PLUGIN, None)


def _loader(x, y, batch=8):
    return DataLoader(TensorDataset(x, y), batch_size=batch)


def test_registry_is_keyed_by_name_and_accepts_enum_members():
    assert all(isinstance(name, str) for name in STRUCTURES)
    assert get_structure(HessianStructure.KRON) == ("kron", STRUCTURES["kron"])
    assert get_structure("diag") == ("diag", DiagCurvature)


def test_user_structure_fits_and_predicts_like_the_one_it_extends(plugin, classification_data):
    x, y = classification_data
    model = small_mlp()
    before = plugin.fits
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure=PLUGIN,
                 prior_precision=0.5, progress=False).fit(_loader(x, y))
    assert plugin.fits == before + 1
    assert type(la.structure) is plugin and la.structure_name == PLUGIN
    ref = Laplace(model, "classification", subset_of_weights="all", hessian_structure="diag",
                  prior_precision=0.5, progress=False).fit(_loader(x, y))
    torch.testing.assert_close(la.predict(x[:5]).cov, ref.predict(x[:5]).cov)
    torch.testing.assert_close(la.log_marginal_likelihood(), ref.log_marginal_likelihood())
    la.optimize_prior_precision(method="marglik", n_steps=5)
    assert la(x[:5]).shape == (5, 3)
    assert la.sample(4, seed=1).shape == (4, la.n_params)
    state = la.state_dict()
    assert state["hessian_structure"] == PLUGIN
    again = Laplace(model, "classification", subset_of_weights="all", hessian_structure=PLUGIN,
                    progress=False).load_state_dict(state)
    torch.testing.assert_close(again.posterior_variance(), la.posterior_variance())
    with pytest.raises(ValueError, match="hessian_structure="):  # a diag state does not load into the plug-in
        Laplace(model, "classification", subset_of_weights="all", hessian_structure="diag",
                progress=False).load_state_dict(state)


def test_duplicate_names_are_refused_unless_replace(plugin):
    with pytest.raises(ValueError, match="already registered"):
        register_structure(PLUGIN, DiagCurvature)
    with pytest.raises(ValueError, match="already registered"):
        register_structure(DiagCurvature)  # the decorator form names it "diag"
    assert STRUCTURES[PLUGIN] is plugin
    register_structure(PLUGIN, DiagCurvature, replace=True)
    assert STRUCTURES[PLUGIN] is DiagCurvature


def test_bad_registrations_and_unknown_names_fail_clearly():
    with pytest.raises(TypeError, match="CurvatureStructure subclass"):
        register_structure("not_a_structure", dict)
    with pytest.raises(ValueError, match="non-empty string"):
        register_structure("", DiagCurvature)
    assert "not_a_structure" not in STRUCTURES and "" not in STRUCTURES
    with pytest.raises(ValueError, match="unknown hessian_structure 'nope'; choose one of .*'kron'"):
        Laplace(small_mlp(), "classification", hessian_structure="nope")
    assert issubclass(STRUCTURES["full"], CurvatureStructure)
