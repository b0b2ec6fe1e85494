"""MAP training: caching by key, exact resume after an interruption, bad input."""

import math

import pytest
import torch
from torch.utils.data import TensorDataset

from posthoc.data.toy import blobs
from posthoc.models import MLP
from posthoc.models.training import TrainConfig, checkpoint_key, train_map

CONFIG = TrainConfig(epochs=3, batch_size=32, lr=1e-2, gamma=0.9, seed=4)


def _data() -> TensorDataset:
    x, y = blobs(n=120, n_classes=3, seed=1)
    return TensorDataset(x, y)


def _model() -> MLP:
    torch.manual_seed(0)
    return MLP(2, hidden=(16,), out_features=3, activation="tanh", flatten=False)


def _weights(model) -> torch.Tensor:
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach()


def test_training_lowers_loss_and_caches(tmp_path):
    result = train_map(_model(), _data(), CONFIG, tmp_path, "k", progress=False)
    assert not result.from_cache
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert (tmp_path / "k.pt").exists() and not (tmp_path / "k.partial.pt").exists()
    again = train_map(_model(), _data(), CONFIG, tmp_path, "k", progress=False, log=lambda s: None)
    assert again.from_cache
    torch.testing.assert_close(_weights(again.model), _weights(result.model), rtol=0, atol=0)


COSINE = TrainConfig(epochs=3, batch_size=32, lr=1e-2, seed=4, schedule="cosine")
OLD_DIGEST = "93ad5908d5ef"  # checkpoint_key of CONFIG before `schedule` was a setting


@pytest.mark.parametrize("config", [CONFIG, COSINE], ids=["step", "cosine"])
def test_interrupted_run_resumes_to_the_same_result(tmp_path, config):
    reference = train_map(_model(), _data(), config, tmp_path / "a", "k", progress=False)

    def interrupt_after_epoch_2(message: str) -> None:
        if message.startswith("MAP epoch 2/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_map(_model(), _data(), config, tmp_path / "b", "k", progress=True, log=interrupt_after_epoch_2)
    assert (tmp_path / "b" / "k.partial.pt").exists() and not (tmp_path / "b" / "k.pt").exists()
    messages = []
    resumed = train_map(_model(), _data(), config, tmp_path / "b", "k", progress=False, log=messages.append)
    assert any("resuming MAP training from epoch 2" in m for m in messages)
    torch.testing.assert_close(_weights(resumed.model), _weights(reference.model), rtol=0, atol=0)
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in reference.history]


def test_cosine_schedule_anneals_every_step_to_zero(monkeypatch):
    seen = []
    step = torch.optim.Adam.step

    def record(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", record)
    train_map(_model(), _data(), COSINE, progress=False)
    total = 3 * 4  # 120 examples in batches of 32: 4 steps per epoch
    expected = [0.5 * 1e-2 * (1 + math.cos(math.pi * t / total)) for t in range(total)]
    assert seen == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_default_schedule_keeps_the_keys_written_before_it_was_a_setting():
    # the key of TrainConfig(epochs=3, batch_size=32, lr=1e-2, gamma=0.9, seed=4) before `schedule` existed
    assert checkpoint_key("data1", "mlp", {}, CONFIG) == "mlp-e3-s4-" + OLD_DIGEST
    assert checkpoint_key("data1", "mlp", {}, COSINE) != checkpoint_key("data1", "mlp", {}, TrainConfig(
        epochs=3, batch_size=32, lr=1e-2, seed=4))
    with pytest.raises(ValueError, match="unknown schedule 'linear'"):
        TrainConfig(schedule="linear")


def test_key_depends_on_data_model_and_settings():
    base = checkpoint_key("data1", "mlp", {}, CONFIG)
    assert base != checkpoint_key("data2", "mlp", {}, CONFIG)
    assert base != checkpoint_key("data1", "mlp", {"hidden": 3}, CONFIG)
    assert base != checkpoint_key("data1", "mlp", {}, TrainConfig(epochs=3, batch_size=32, lr=1e-2, gamma=0.9, seed=5))
    assert base == checkpoint_key("data1", "mlp", {}, CONFIG)


def test_bad_input_is_rejected_before_training(tmp_path):
    x, y = blobs(n=30, n_classes=3, seed=1)
    bad_x = x.clone()
    bad_x[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        train_map(_model(), TensorDataset(bad_x, y), CONFIG, progress=False)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\]"):
        train_map(_model(), TensorDataset(x, y + 1), CONFIG, progress=False)
    with pytest.raises(ValueError, match="both checkpoint_dir and key"):
        train_map(_model(), TensorDataset(x, y), CONFIG, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="'classification', 'regression'"):
        TrainConfig(likelihood="poisson")
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)


def test_regression_training():
    x = torch.linspace(-1, 1, 64).unsqueeze(-1)
    y = torch.sin(3 * x)
    torch.manual_seed(0)
    model = MLP(1, hidden=(32,), out_features=1, activation="tanh", flatten=False)
    config = TrainConfig(epochs=100, batch_size=16, lr=1e-2, gamma=1.0, likelihood="regression")
    result = train_map(model, TensorDataset(x, y), config, progress=False)
    # var(sin(3x)) on [-1, 1] is about 0.5; a fitted net gets the MSE below 0.02 (0.0095 seen)
    assert result.history[-1]["train_loss"] < 0.02


def test_unsized_dataset_and_bad_batch_size_are_refused():
    x, y = blobs(n=30, n_classes=3, seed=1)

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(zip(x, y, strict=True))

    with pytest.raises(TypeError, match="must have a length"):
        train_map(_model(), Stream(), CONFIG, progress=False)
    with pytest.raises(ValueError, match=r"batch_size must be a positive int .*got True"):
        TrainConfig(batch_size=True)
