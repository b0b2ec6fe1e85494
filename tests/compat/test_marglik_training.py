"""marglik_training (online Laplace, Immer et al. 2021) on a small float64 regression task."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from posthoc.laplace.laplace import Laplace
from posthoc.laplace.marglik_training import marglik_training

DTYPE = torch.float64


def _sinusoid(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, generator=g, dtype=DTYPE) * 6 - 3
    return x, torch.sin(x) + 0.1 * torch.randn(n, 1, generator=g, dtype=DTYPE)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1)).to(DTYPE)


def test_marglik_training_tunes_prior_and_noise_while_training():
    x, y = _sinusoid()
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)
    model = _mlp()
    la, trained, margliks, losses = marglik_training(
        model, loader, "regression", hessian_structure="full", optimizer_kwargs={"lr": 0.02, "weight_decay": 1.0},
        n_epochs=40, n_hypersteps=10, marglik_frequency=5, lr_hyp=0.1, dict_key_x="input", dict_key_y="target")
    assert trained is model and len(losses) == 40 and len(margliks) == 8 * 10
    assert losses[-1] < 0.5 * losses[0]  # MAP training made progress
    assert la.prior_precision.shape == (4,)  # layerwise: one per parameter tensor
    assert not torch.allclose(la.prior_precision, torch.ones(4, dtype=DTYPE))  # the prior moved
    assert float(la.sigma_noise) < 0.5  # noise learnt towards the true 0.1 from 1
    # la is fitted at the returned weights, and its hyperparameters beat the initial ones on the evidence
    assert la.n_data == 48 and la.log_det_posterior_precision.isfinite()
    torch.testing.assert_close(la.subset.theta_map, torch.nn.utils.parameters_to_vector(model.parameters()).detach())
    start = Laplace(model, "regression", "all", "full", prior_precision=1.0, sigma_noise=1.0, progress=False).fit(loader)
    assert float(la.log_marginal_likelihood()) > float(start.log_marginal_likelihood())
    assert la.predict(x[:3]).cov.shape == (3, 1, 1)


def test_marglik_training_scalar_prior_classification_and_errors():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(30, 2, generator=g, dtype=DTYPE)
    y = (x[:, 0] > 0).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 2)).to(DTYPE)
    loader = DataLoader(TensorDataset(x, y), batch_size=10)
    la, _, margliks, losses = marglik_training(model, loader, "classification", "diag", prior_structure="scalar",
                                               n_epochs=4, n_hypersteps=3, marglik_frequency=2,
                                               optimizer_kwargs={"lr": 0.05})
    assert la.prior_precision.shape == (1,) and len(margliks) == 6 and len(losses) == 4
    assert float(la.prior_precision) != 1.0 and float(la.sigma_noise) == 1.0
    with pytest.raises(NotImplementedError, match="temperature"):
        marglik_training(model, loader, "classification", temperature=0.5)
    with pytest.raises(NotImplementedError, match="enable_backprop"):
        marglik_training(model, loader, "classification", enable_backprop=True)


class _Interrupting:
    """A loader that raises KeyboardInterrupt when its ``stop_at``-th batch (counted over every pass) is due."""

    def __init__(self, loader, stop_at=None):
        self.loader, self.dataset, self.stop_at, self.batches = loader, loader.dataset, stop_at, 0

    def __iter__(self):
        for batch in self.loader:
            self.batches += 1
            if self.stop_at is not None and self.batches == self.stop_at:
                raise KeyboardInterrupt
            yield batch


def _resumable_run(loader, checkpoint, seed=0):
    torch.manual_seed(123)  # the shuffling loader's orders come from the global generator
    return marglik_training(
        _mlp(seed), loader, "regression", hessian_structure="diag", optimizer_kwargs={"lr": 0.02},
        scheduler_cls=torch.optim.lr_scheduler.StepLR, scheduler_kwargs={"step_size": 5, "gamma": 0.7},
        n_epochs=6, n_hypersteps=3, marglik_frequency=2, n_epochs_burnin=1, checkpoint=checkpoint)


def _same_result(a, b):
    (la_a, model_a, margliks_a, losses_a), (la_b, model_b, margliks_b, losses_b) = a, b
    assert margliks_a == margliks_b and losses_a == losses_b
    for (name, p), q in zip(model_a.state_dict().items(), model_b.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    torch.testing.assert_close(la_a.prior_precision, la_b.prior_precision, rtol=0, atol=0)
    torch.testing.assert_close(la_a.sigma_noise, la_b.sigma_noise, rtol=0, atol=0)


def test_an_interrupted_run_resumes_to_the_uninterrupted_result_bitwise(tmp_path):
    x, y = _sinusoid()
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)  # 3 batches per epoch
    reference = _resumable_run(loader, None)
    path = tmp_path / "marglik.ckpt"
    finished = tmp_path / "finished.ckpt"
    _resumable_run(loader, finished)
    counting = _Interrupting(loader)
    _same_result(_resumable_run(counting, finished), reference)  # finished: the digest's pass and the final fit
    fit_reads = counting.batches - 3
    # batches read: 3 for the digest, 3 per epoch, fit_reads per Laplace fit (after epochs 2 and 4): stop in epoch 5
    with pytest.raises(KeyboardInterrupt):
        _resumable_run(_Interrupting(loader, stop_at=3 + 3 * 4 + 2 * fit_reads + 2), path)
    counting = _Interrupting(loader)
    _same_result(_resumable_run(counting, path), reference)
    assert counting.batches == 3 + 3 * 2 + 2 * fit_reads  # the digest, epochs 5 and 6, the fit after 6, the final


def test_a_checkpoint_of_another_computation_is_refused_naming_what_differs(tmp_path):
    from posthoc.utils.checkpoint import CheckpointError

    x, y = _sinusoid()
    path = tmp_path / "marglik.ckpt"
    _resumable_run(DataLoader(TensorDataset(x, y), batch_size=16), path)
    relabelled = DataLoader(TensorDataset(x, y.flip(0)), batch_size=16)  # same values, other pairs
    with pytest.raises(CheckpointError, match="train_data"):
        _resumable_run(relabelled, path)
    with pytest.raises(CheckpointError, match="initial_weights"):
        _resumable_run(DataLoader(TensorDataset(x, y), batch_size=16), path, seed=1)
    reordered = DataLoader(TensorDataset(x.flip(0), y.flip(0)), batch_size=8)  # the same examples: resumed
    _resumable_run(reordered, path)


def test_an_unwritable_checkpoint_folder_fails_before_training(tmp_path):
    x, y = _sinusoid()
    (tmp_path / "a_file").write_text("")
    with pytest.raises(PermissionError, match="marglik_training checkpoint"):
        _resumable_run(DataLoader(TensorDataset(x, y), batch_size=16), tmp_path / "a_file" / "marglik.ckpt")
