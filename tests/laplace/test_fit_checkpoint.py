"""Resumable Laplace fits (``fit(..., checkpoint=, checkpoint_every=)``): interrupted and resumed = uninterrupted.

Interruptions are a loader that raises KeyboardInterrupt after k batches; the resumed fit must give the same
posterior (dense precision, evidence, N, glm covariance) as an uninterrupted checkpointed fit, bitwise, and the
plain fit's to float64 round-off. A checkpoint of another run (settings, weights, data) is refused.
"""

from __future__ import annotations

import pytest
import torch
from references import DTYPE, mlp_data, small_cnn, small_mlp
from torch.utils.data import DataLoader, TensorDataset

from posthoc import Laplace
from posthoc.utils.checkpoint import CheckpointError

BATCH = 4


class Interrupting:
    """A loader over fixed batches that raises KeyboardInterrupt at batch ``stop_at`` of its ``on_pass``-th pass."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, stop_at: int | None = None, on_pass: int = 1) -> None:
        self.batches = list(zip(x.split(BATCH), y.split(BATCH), strict=True))
        self.stop_at, self.on_pass, self.passes = stop_at, on_pass, 0

    def __iter__(self):
        self.passes += 1
        for index, batch in enumerate(self.batches):
            if self.passes == self.on_pass and index == self.stop_at:
                raise KeyboardInterrupt
            yield batch


def _laplace(model: torch.nn.Module, structure: str, likelihood: str = "classification", **kwargs) -> Laplace:
    return Laplace(model, likelihood, subset_of_weights="all", hessian_structure=structure, progress=False, **kwargs)


def _posterior(la: Laplace, x: torch.Tensor) -> dict[str, torch.Tensor]:
    prior = torch.tensor([0.7], dtype=DTYPE)
    return {"precision": la._require_fit().dense_precision(prior, torch.ones((), dtype=DTYPE)),
            "evidence": la.log_marginal_likelihood(prior).detach(),
            "covariance": la.predict(x[:5]).cov, "n_data": torch.tensor(la.n_data)}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], exact: bool) -> None:
    for key in a:
        if exact:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], rtol=1e-10, atol=1e-12, msg=key)


def _problem(structure: str):
    if structure in ("kron", "ekfac"):  # Conv2d and Linear Kronecker blocks
        g = torch.Generator().manual_seed(2)
        x = torch.rand(26, 1, 6, 6, generator=g, dtype=DTYPE)
        return small_cnn(seed=1), x, torch.randint(0, 3, (26,), generator=g)
    x, y = mlp_data("classification", 26, seed=3)
    return small_mlp(seed=1), x, y


@pytest.mark.parametrize("structure,stop_at,on_pass", [
    ("full", 3, 2), ("diag", 5, 2), ("kron", 4, 2),
    ("ekfac", 4, 2),  # interrupted in the factor pass
    ("ekfac", 2, 3),  # interrupted in the eigenvalue pass (pass 1 is the first batch's probe)
])
def test_interrupted_fit_resumes_to_the_uninterrupted_posterior(tmp_path, structure, stop_at, on_pass):
    model, x, y = _problem(structure)
    path = tmp_path / "fit.ckpt"
    loader = Interrupting(x, y, stop_at=stop_at, on_pass=on_pass)
    with pytest.raises(KeyboardInterrupt):
        _laplace(model, structure).fit(loader, checkpoint=path, checkpoint_every=2)
    assert path.exists()
    resumed = _laplace(model, structure).fit(Interrupting(x, y), checkpoint=path, checkpoint_every=2)
    uninterrupted = _laplace(model, structure).fit(Interrupting(x, y), checkpoint=tmp_path / "other.ckpt",
                                                   checkpoint_every=2)
    plain = _laplace(model, structure).fit(Interrupting(x, y))
    _assert_same(_posterior(resumed, x), _posterior(uninterrupted, x), exact=True)
    _assert_same(_posterior(resumed, x), _posterior(plain, x), exact=False)
    assert resumed.n_data == len(x)


def test_resume_skips_the_checkpointed_batches(tmp_path):
    """The resumed fit evaluates only the batches after the checkpoint (counted through the output factors)."""
    model, x, y = _problem("diag")
    path = tmp_path / "fit.ckpt"
    with pytest.raises(KeyboardInterrupt):
        _laplace(model, "diag").fit(Interrupting(x, y, stop_at=5, on_pass=2), checkpoint=path, checkpoint_every=2)
    la = _laplace(model, "diag")
    seen = []

    class Counting(type(la.factors)):
        def __call__(self, outputs, targets):
            seen.append(outputs.shape[0])
            return super().__call__(outputs, targets)

    la.factors.__class__ = Counting
    la.fit(Interrupting(x, y), checkpoint=path, checkpoint_every=2)
    assert sum(seen) == len(x) - 4 * BATCH  # batches 0-3 were in the two checkpointed segments


def test_ggn_mc_resumes_the_label_sampler(tmp_path):
    model, x, y = _problem("full")
    path = tmp_path / "fit.ckpt"
    with pytest.raises(KeyboardInterrupt):
        _laplace(model, "full", curvature="ggn_mc", seed=4).fit(Interrupting(x, y, stop_at=5, on_pass=2),
                                                                 checkpoint=path, checkpoint_every=2)
    resumed = _laplace(model, "full", curvature="ggn_mc", seed=4).fit(Interrupting(x, y), checkpoint=path,
                                                                      checkpoint_every=2)
    whole = _laplace(model, "full", curvature="ggn_mc", seed=4).fit(Interrupting(x, y),
                                                                    checkpoint=tmp_path / "b.ckpt", checkpoint_every=2)
    _assert_same(_posterior(resumed, x), _posterior(whole, x), exact=True)


def test_regression_and_last_layer(tmp_path):
    x, y = mlp_data("regression", 22, seed=5)
    model = small_mlp(seed=2)
    path = tmp_path / "fit.ckpt"

    def make():
        return Laplace(model, "regression", subset_of_weights="last_layer", hessian_structure="kron", progress=False,
                       sigma_noise=0.3)

    with pytest.raises(KeyboardInterrupt):
        make().fit(Interrupting(x, y, stop_at=4, on_pass=2), checkpoint=path, checkpoint_every=3)
    resumed, plain = make().fit(Interrupting(x, y), checkpoint=path, checkpoint_every=3), make().fit(Interrupting(x, y))
    torch.testing.assert_close(resumed.log_marginal_likelihood(), plain.log_marginal_likelihood(), rtol=1e-12, atol=0)
    torch.testing.assert_close(resumed.posterior_variance(), plain.posterior_variance(), rtol=1e-10, atol=0)


def test_finished_checkpoint_is_reused_without_curvature_work(tmp_path):
    model, x, y = _problem("full")
    path = tmp_path / "fit.ckpt"
    first = _laplace(model, "full").fit(Interrupting(x, y), checkpoint=path, checkpoint_every=3)
    again = _laplace(model, "full")
    again.factors.__class__ = type("Refusing", (type(again.factors),), {
        "__call__": lambda self, o, t: pytest.fail("a finished checkpoint must not be refitted")})
    again.fit(Interrupting(x, y), checkpoint=path, checkpoint_every=3)
    _assert_same(_posterior(first, x), _posterior(again, x), exact=True)


@pytest.mark.parametrize("change", ["weights", "settings", "every", "data", "more_data"])
def test_checkpoint_of_another_run_is_refused(tmp_path, change):
    model, x, y = _problem("diag")
    path = tmp_path / "fit.ckpt"
    _laplace(model, "diag").fit(Interrupting(x, y), checkpoint=path, checkpoint_every=2)
    la, every, loader = _laplace(model, "diag"), 2, Interrupting(x, y)
    if change == "weights":
        with torch.no_grad():
            model[0].bias.add_(1e-3)
        la = _laplace(model, "diag")
    elif change == "settings":
        la = _laplace(model, "diag", curvature="ef")
    elif change == "every":
        every = 3
    elif change == "data":
        loader = Interrupting(x.flip(0), y.flip(0))
    else:  # a longer loader past the checkpoint is summed, as an uninterrupted fit on it would
        loader.batches.append((x[:3], y[:3]))
        la.fit(loader, checkpoint=path, checkpoint_every=every)
        assert la.n_data == len(x) + 3
        return
    with pytest.raises(CheckpointError, match="delete|Delete"):
        la.fit(loader, checkpoint=path, checkpoint_every=every)


def test_refusals_before_any_pass(tmp_path):
    model, x, y = _problem("full")
    shuffled = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="shuffle=False"):
        _laplace(model, "full").fit(shuffled, checkpoint=tmp_path / "a.ckpt")
    with pytest.raises(NotImplementedError, match="lowrank"):
        _laplace(model, "lowrank").fit(Interrupting(x, y), checkpoint=tmp_path / "a.ckpt")
    with pytest.raises(ValueError, match="checkpoint_every"):
        _laplace(model, "full").fit(Interrupting(x, y), checkpoint=tmp_path / "a.ckpt", checkpoint_every=0)
    assert not (tmp_path / "a.ckpt").exists()
    # an unshuffled DataLoader is fine
    la = _laplace(model, "full").fit(DataLoader(TensorDataset(x, y), batch_size=4), checkpoint=tmp_path / "b.ckpt")
    assert la.n_data == len(x)


class _Tokens(torch.nn.Module):
    """Embedding -> tanh -> Linear per token: outputs (B, T, 3), one likelihood output per position."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.emb, self.head = torch.nn.Embedding(7, 4), torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(x)))


@pytest.mark.parametrize("structure", ["diag", "kron"])
def test_outputs_with_positions_resume(tmp_path, structure):
    """Token outputs with ignored (-100) positions: N counts kept positions, resumed as in a plain fit."""
    g = torch.Generator().manual_seed(6)
    x, y = torch.randint(0, 7, (18, 5), generator=g), torch.randint(0, 3, (18, 5), generator=g)
    y[::4, -2:] = -100
    model = _Tokens().to(DTYPE)
    path = tmp_path / "fit.ckpt"
    with pytest.raises(KeyboardInterrupt):
        _laplace(model, structure).fit(Interrupting(x, y, stop_at=3, on_pass=2), checkpoint=path, checkpoint_every=2)
    resumed = _laplace(model, structure).fit(Interrupting(x, y), checkpoint=path, checkpoint_every=2)
    plain = _laplace(model, structure).fit(Interrupting(x, y))
    assert resumed.n_data == plain.n_data == int((y != -100).sum())
    torch.testing.assert_close(resumed.log_marginal_likelihood(), plain.log_marginal_likelihood(), rtol=1e-12, atol=0)
    torch.testing.assert_close(resumed.posterior_variance(), plain.posterior_variance(), rtol=1e-10, atol=0)
