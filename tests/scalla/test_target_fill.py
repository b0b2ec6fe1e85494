"""The default target fill: jittered training inputs when there is no context loader (posthoc.scalla.pools)."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from posthoc.scalla import ScaLLA
from posthoc.scalla.pools import InputPool, jittered_pool
from posthoc.scalla.training import FILLED_TARGETS_LR, TrainSettings, fit_settings

DTYPE = torch.float64


def _pool(x: torch.Tensor) -> InputPool:
    return InputPool.of_tensor(x, "training", DTYPE, torch.device("cpu"))


def test_jittered_pool_draws_training_inputs_plus_scaled_noise():
    x = torch.randn(30, 3, generator=torch.Generator().manual_seed(0), dtype=DTYPE) * torch.tensor([1.0, 10.0, 0.1],
                                                                                                  dtype=DTYPE)
    pool = jittered_pool(_pool(x), 20_000, 0.5, seed=3)
    assert pool is not None and pool.inputs.shape == (20_000, 3) and pool.name == "jittered"
    # each point is a training input plus independent noise of 0.5 x the feature's std: per feature the variance
    # is the training inputs' (population) variance times 1 + 0.5^2
    expected = (x.var(0, unbiased=False) + 0.25 * x.var(0)).sqrt()
    torch.testing.assert_close(pool.inputs.std(0) / expected, torch.ones(3, dtype=DTYPE), atol=0.03, rtol=0)
    index = torch.randint(30, (20_000,), generator=torch.Generator().manual_seed(3))
    assert ((pool.inputs - x[index]) / x.std(0)).std(0).sub(0.5).abs().max() < 0.02  # the draws, seeded by seed
    again = jittered_pool(_pool(x), 20_000, 0.5, seed=3)
    assert again is not None and torch.equal(again.inputs, pool.inputs)
    other = jittered_pool(_pool(x), 20_000, 0.5, seed=4)
    assert other is not None and not torch.equal(other.inputs, pool.inputs)


@pytest.mark.parametrize("case", ["no_points", "no_scale", "integer_inputs", "one_input"])
def test_jittered_pool_is_none_where_noise_has_no_meaning(case):
    x = torch.randn(10, 2, dtype=DTYPE)
    n, scale = (0 if case == "no_points" else 5), (0.0 if case == "no_scale" else 1.0)
    if case == "integer_inputs":
        x = torch.randint(0, 9, (10, 4))
    if case == "one_input":
        x = x[:1]
    assert jittered_pool(_pool(x), n, scale, seed=0) is None


def _fit(target_jitter: float, context: bool = False) -> ScaLLA:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 2, generator=g, dtype=DTYPE)
    y = (x[:, 0] > 0).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2)).to(DTYPE)
    context_loader = DataLoader(TensorDataset(3 * torch.randn(200, 2, generator=g, dtype=DTYPE)), batch_size=50)
    s = ScaLLA(model, "classification", n_features=4, steps=3, batch_size=8, n_target_points=100,
               directions="rademacher", target_jitter=target_jitter, progress=False)
    return s.fit(DataLoader(TensorDataset(x, y), batch_size=20), context_loader=context_loader if context else None)


def test_fit_without_context_fills_the_targets_with_jittered_inputs():
    # rademacher directions: the JVP evaluations are (target points) x m; 40 training points, 100 targets wanted:
    # the fill adds min(100 // 2, 60) = 50 jittered points, as a context pool of 50 would
    assert _fit(1.0).train_record["jvp_evaluations"] == (40 + 50) * 4
    assert _fit(0.0).train_record["jvp_evaluations"] == 40 * 4
    # a context loader is used as given, whatever target_jitter
    assert _fit(1.0, context=True).train_record["jvp_evaluations"] == _fit(0.0, context=True).train_record[
        "jvp_evaluations"] == (40 + 50) * 4


def test_negative_target_jitter_is_refused():
    with pytest.raises(ValueError, match="target_jitter must be >= 0"):
        ScaLLA(nn.Linear(2, 2), "classification", target_jitter=-0.1)


def test_default_lr_is_3e_3_with_jittered_targets_only():
    x = torch.randn(10, 2, dtype=DTYPE)
    settings = TrainSettings()
    jittered = jittered_pool(_pool(x), 5, 1.0, seed=0)
    assert fit_settings(settings, None, True, jittered).lr == FILLED_TARGETS_LR == 3e-3
    assert fit_settings(settings, None, True, None).lr == 1e-3
    assert fit_settings(settings, None, True, InputPool.of_tensor(x, "context", DTYPE, torch.device("cpu"))).lr == 1e-3
    assert fit_settings(settings, 7, False, jittered).lr == 1e-3 and fit_settings(settings, 7, False, None).steps == 7
    assert ScaLLA(nn.Linear(2, 2), "classification", lr=2e-2).default_lr is False
