"""MAP training checkpoints, issue 20: other data under the same key, damaged files, planted pickles, unwritable
folders and BatchNorm with a last batch of one are refused before (or instead of) a silently wrong model."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from posthoc.data.toy import blobs
from posthoc.models import MLP
from posthoc.models.training import TrainConfig, train_map
from posthoc.utils.checkpoint import read_checkpoint

CONFIG = TrainConfig(epochs=3, batch_size=32, lr=1e-2, gamma=0.9, seed=4)
QUIET = dict(progress=False, log=lambda message: None)


def _data(shift: float = 0.0) -> TensorDataset:
    x, y = blobs(n=120, n_classes=3, seed=1)
    return TensorDataset(x + shift, y)


def _model(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP(2, hidden=(16,), out_features=3, activation="tanh", flatten=False)


def test_a_checkpoint_of_other_data_or_initial_weights_is_refused(tmp_path):
    """On 83bdd0f the file under a key was reused whatever data it was trained on: the same key with other data
    of the same size returned the other data's model (weights 14% off a model trained on these data)."""
    train_map(_model(), _data(), CONFIG, tmp_path, "k", **QUIET)
    with pytest.raises(ValueError, match=rf"{tmp_path / 'k.pt'} was written with other settings, network or data "
                                         r"\(differs in \['data'\]\)"):
        train_map(_model(), _data(shift=1.0), CONFIG, tmp_path, "k", **QUIET)
    with pytest.raises(ValueError, match=r"differs in \['initial_weights'\]"):
        train_map(_model(seed=1), _data(), CONFIG, tmp_path, "k", **QUIET)
    assert train_map(_model(), _data(), CONFIG, tmp_path, "k", **QUIET).from_cache


def test_a_partial_checkpoint_of_other_data_is_refused(tmp_path):
    def interrupt_after_epoch_1(message: str) -> None:
        if message.startswith("MAP epoch 1/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_map(_model(), _data(), CONFIG, tmp_path, "k", progress=True, log=interrupt_after_epoch_1)
    assert read_checkpoint(tmp_path / "k.partial.pt", "partial MAP training").payload["epoch"] == 1
    labels = _data().tensors[1].clone()
    labels[[0, 2]] = labels[[2, 0]].clone()  # the same examples, two labels swapped
    assert not torch.equal(labels, _data().tensors[1])
    with pytest.raises(ValueError, match=rf"{tmp_path / 'k.partial.pt'} .*differs in \['data'\]"):
        train_map(_model(), TensorDataset(_data().tensors[0], labels), CONFIG, tmp_path, "k", **QUIET)


@pytest.mark.parametrize("damage", ["bit flip in a weight", "truncated"])
def test_a_damaged_checkpoint_is_refused_with_its_path(tmp_path, damage):
    """On 83bdd0f a flipped bit loaded as a model 3% off, a truncated file raised torch's zip error without the
    path."""
    result = train_map(_model(), _data(), CONFIG, tmp_path, "k", **QUIET)
    path = tmp_path / "k.pt"
    raw = bytearray(path.read_bytes())
    if damage == "truncated":
        raw = raw[:len(raw) // 2]
    else:
        weight = next(result.model.parameters()).detach().reshape(-1)[:2].numpy().tobytes()
        at = bytes(raw).find(weight)
        assert at > 0
        raw[at + 3] ^= 0x20
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=rf"{path} is damaged .*delete it"):
        train_map(_model(), _data(), CONFIG, tmp_path, "k", **QUIET)


class _Planted:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_planted_pickle_is_refused_and_never_runs(tmp_path):
    """Case 12: on 83bdd0f torch.load(weights_only=False) ran the file's code before failing."""
    marker = tmp_path / "pwned"
    torch.save({"model": _Planted(str(marker)), "history": [], "wall_time_s": 0.0}, tmp_path / "k.pt")
    with pytest.raises(ValueError, match=str(tmp_path / "k.pt")):
        train_map(_model(), _data(), CONFIG, tmp_path, "k", **QUIET)
    assert not marker.exists()
    pickle.loads(pickle.dumps(_Planted(str(marker))))  # the check above can fail
    assert marker.exists()


def test_an_unwritable_checkpoint_folder_fails_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    messages = []
    with pytest.raises(PermissionError, match=rf"MAP checkpoints into {blocker / 'sub'}"):
        train_map(_model(), _data(), CONFIG, blocker / "sub", "k", progress=True, log=messages.append)
    assert messages == []


def test_batch_norm_with_a_last_batch_of_one_raises_before_training_naming_drop_last():
    """On 83bdd0f: torch's 'Expected more than 1 value per channel when training' in the middle of the epoch."""
    x, y = blobs(n=97, n_classes=3, seed=1)  # 3 batches of 32 and one of 1

    def model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(2, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))

    untouched = model()
    with pytest.raises(ValueError, match=r"last batch of 1\. Pass TrainConfig\(drop_last=True\)"):
        train_map(untouched, TensorDataset(x, y), CONFIG, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(untouched.state_dict().values(), model().state_dict().values(), strict=True))
    config = TrainConfig(epochs=2, batch_size=32, lr=1e-2, seed=4, drop_last=True)
    result = train_map(model(), TensorDataset(x, y), config, progress=False)
    assert len(result.history) == 2 and torch.isfinite(torch.tensor(result.history[-1]["train_loss"]))
    train_map(model(), TensorDataset(x[:96], y[:96]), CONFIG, progress=False)  # no batch of one: trains
    with pytest.raises(ValueError, match="leaves no batch"):
        train_map(model(), TensorDataset(x[:20], y[:20]), config, progress=False)


def test_load_map_weights_reads_a_finished_checkpoint_and_refuses_a_planted_one(tmp_path):
    """The benchmarks' way to load a `posthoc train` result: the trained weights, never a pickle's code."""
    from posthoc.models.training import load_map_weights

    result = train_map(_model(), _data(), CONFIG, tmp_path, "k", **QUIET)
    weights = load_map_weights(tmp_path / "k.pt")
    assert weights.keys() == result.model.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in result.model.state_dict().items())
    marker = tmp_path / "pwned"
    torch.save({"model": _Planted(str(marker))}, tmp_path / "planted.pt")
    with pytest.raises(ValueError, match=str(tmp_path / "planted.pt")):
        load_map_weights(tmp_path / "planted.pt")
    assert not marker.exists()
