"""FiberSampler, issue 20: theta* read at fit, stale weights refused, checkpoints of other runs or damaged ones
refused, planted pickles never run, eval-mode prediction, clear errors for wrong input shapes."""

from __future__ import annotations

import copy
import os
import pickle

import pytest
import torch
from fiber.common import (
    SMALL_SETTINGS,
    Interrupted,
    shuffled_loader,
    stop_after,
)
from references import DTYPE
from torch import nn

from posthoc.fiber import FiberSampler
from posthoc.utils.checkpoint import read_checkpoint

SETTINGS = SMALL_SETTINGS


def _perturbed(model: nn.Module, scale: float = 0.05) -> nn.Module:
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=torch.Generator().manual_seed(3), dtype=p.dtype))
    return other


def test_theta_star_is_read_at_fit_and_stale_weights_are_refused(problem):
    """Case 1: on 83bdd0f theta* was read at construction, so weights loaded between construction and fit were
    ignored: the walk started from the old weights (samples off by the whole weight change)."""
    model, x, y = problem
    target = _perturbed(model)
    reference = FiberSampler(target, "classification", **SETTINGS).fit(shuffled_loader(x, y, 0))
    live = copy.deepcopy(model)
    fs = FiberSampler(live, "classification", **SETTINGS)
    live.load_state_dict(target.state_dict())  # e.g. the trained weights loaded after building the sampler
    fs.fit(shuffled_loader(x, y, 0))
    torch.testing.assert_close(fs.sample(4), reference.sample(4), rtol=0, atol=0)
    torch.testing.assert_close(fs.predict(x[:5], n_samples=4).samples, reference.predict(x[:5], n_samples=4).samples,
                               rtol=0, atol=0)
    with torch.no_grad():
        live[0].weight[0, 0] += 1e-3
    for call in (lambda: fs.predict(x[:5], n_samples=4), lambda: fs.sample(3), fs.state_dict):
        with pytest.raises(RuntimeError, match="changed since fit"):
            call()


def test_load_state_dict_compares_with_the_current_weights_of_the_whole_model(problem):
    """On 83bdd0f the state's theta* was compared with the weights at construction, and for last_layer only the
    last layer's: a changed body gave predictions from other features without a word."""
    model, x, y = problem
    settings = {**SETTINGS, "subset_of_weights": "last_layer"}
    fitted = FiberSampler(model, "classification", **settings).fit(shuffled_loader(x, y, 0))
    state = fitted.state_dict()
    live = copy.deepcopy(model)
    fs = FiberSampler(live, "classification", **settings)
    with torch.no_grad():
        live[0].weight[0, 0] += 1e-3  # the body, outside the covered last layer
    with pytest.raises(ValueError, match="weights or buffers differ"):
        fs.load_state_dict(state)
    with pytest.raises(RuntimeError, match="call fit"):  # nothing was loaded
        fs.predict(x[:2])
    later = FiberSampler(_perturbed(model), "classification", **settings)
    later.model.load_state_dict(model.state_dict())  # the right weights, restored after construction
    later.load_state_dict(state)
    torch.testing.assert_close(later.predict(x[:5], n_samples=4).samples, fitted.predict(x[:5], n_samples=4).samples,
                               rtol=0, atol=0)


def test_checkpoint_of_other_data_of_the_same_size_is_refused(problem, tmp_path):
    """Case 6: on 83bdd0f the data fingerprint was (n, sum of inputs, sum of labels): two input entries swapped
    kept it, and the walk resumed on the other data (particles 3% off the uninterrupted run's)."""
    model, x, y = problem
    x = (x * 8).round() / 8  # multiples of 1/8, like 8-bit pixel values: their sums are exact in any order
    path = tmp_path / "fiber.pt"
    with pytest.raises(Interrupted):
        FiberSampler(model, "classification", **SETTINGS).fit(shuffled_loader(x, y, 0), checkpoint=path,
                                                               callback=stop_after("walk", 8))
    swapped = x.clone()
    swapped[0, 0], swapped[5, 1] = x[5, 1], x[0, 0]
    with pytest.raises(ValueError, match=r"other settings, network or data \(differs in \['data'\]\)"):
        FiberSampler(model, "classification", **SETTINGS).fit(shuffled_loader(swapped, y, 0), checkpoint=path)
    with pytest.raises(ValueError, match=r"differs in \['network_weights'\]"):
        FiberSampler(_perturbed(model, 1e-6), "classification", **SETTINGS).fit(shuffled_loader(x, y, 0),
                                                                               checkpoint=path)
    with pytest.raises(ValueError, match=r"differs in \['settings'\]"):
        FiberSampler(model, "classification", **{**SETTINGS, "seed": 1}).fit(shuffled_loader(x, y, 0),
                                                                             checkpoint=path)


def test_a_bit_flip_in_a_checkpoint_tensor_is_refused(problem, tmp_path):
    model, x, y = problem
    path = tmp_path / "fiber.pt"
    with pytest.raises(Interrupted):
        FiberSampler(model, "classification", **SETTINGS).fit(shuffled_loader(x, y, 0), checkpoint=path,
                                                               callback=stop_after("walk", 8))
    thetas = read_checkpoint(path, "FiberSampler").payload["walk"]["thetas"]
    raw = bytearray(path.read_bytes())
    at = bytes(raw).find(thetas[1, :2].numpy().tobytes())
    assert at > 0
    raw[at + 6] ^= 0x08  # a plausible value: on 83bdd0f the walk resumed from it (particles 0.5% off)
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=rf"{path} is damaged"):
        FiberSampler(model, "classification", **SETTINGS).fit(shuffled_loader(x, y, 0), checkpoint=path)


class _Planted:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_planted_pickle_is_refused_and_never_runs(problem, tmp_path):
    """Case 12: on 83bdd0f the checkpoint was read with torch.load(weights_only=False): the file's code ran."""
    model, x, y = problem
    marker, path = tmp_path / "pwned", tmp_path / "fiber.pt"
    torch.save({"version": 1, "stage": "walk", "x": _Planted(str(marker))}, path)
    with pytest.raises(ValueError, match=str(path)):
        FiberSampler(model, "classification", **SETTINGS).fit(shuffled_loader(x, y, 0), checkpoint=path)
    assert not marker.exists()
    pickle.loads(pickle.dumps(_Planted(str(marker))))  # the check above can fail
    assert marker.exists()


def test_unwritable_checkpoint_location_fails_before_the_walk(problem, tmp_path):
    model, x, y = problem
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    steps = []
    with pytest.raises(PermissionError, match=rf"FiberSampler checkpoint into {blocker}"):
        FiberSampler(model, "classification", **SETTINGS).fit(shuffled_loader(x, y, 0), checkpoint=blocker / "f.pt",
                                                               callback=lambda stage, step: steps.append(step))
    assert steps == []


def test_predict_input_shape_and_eval_mode():
    """Wrong shapes gave raw torch errors; a model left in train mode (Dropout, BatchNorm) gave random
    predictions that also overwrote BatchNorm's running statistics."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3)).to(DTYPE)
    x = torch.randn(40, 3, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 1).long()
    model.eval()
    with torch.no_grad():
        model[1].running_mean.copy_(0.1 * torch.arange(8, dtype=DTYPE))
    fs = FiberSampler(model, "classification", **{**SETTINGS, "subset_of_weights": "last_layer"})
    fs.fit(shuffled_loader(x, y, 0))
    expected = fs.predict(x[:6], n_samples=4).samples
    buffers = [b.clone() for b in model.buffers()]
    model.train()
    got = fs.predict(x[:6], n_samples=4).samples
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert model.training and model[3].training  # the caller's modes are given back
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers(), strict=True))
    model.eval()
    for bad, note in ((x[:2, :2], ""), (x[0], "batch dimension"), (x[:2, :, None], "")):
        with pytest.raises(ValueError, match=rf"x must have shape \(B, 3\) like the training inputs.*{note}"):
            fs.predict(bad, n_samples=4)
    with pytest.raises(ValueError, match="chunk_size"):  # was a bare "range() arg 3 must not be zero"
        fs.predict(x[:2], n_samples=4, chunk_size=0)
    loaded = FiberSampler(model, "classification", **{**SETTINGS, "subset_of_weights": "last_layer"})
    loaded.load_state_dict(fs.state_dict())
    with pytest.raises(ValueError, match=r"\(B, 3\)"):
        loaded.predict(x[:2, :2], n_samples=4)


class _HeadFirst(nn.Module):
    """The head is registered before the body and a scale follows it: the last registered Linear is not the head."""

    def __init__(self, body: nn.Sequential) -> None:
        super().__init__()
        self.head = body[-1]
        self.body = body[:-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.5 * self.head(self.body(x))


def test_last_layer_is_located_on_the_path_to_the_output_and_restored_with_the_state(problem):
    """On 83bdd0f FiberSampler's last layer was the last registered nn.Linear (here a hidden layer), so samples
    covered the wrong weights and the scale after the head was ignored: the predictive was not the model's."""
    model, x, y = problem
    wrapped = _HeadFirst(copy.deepcopy(model))
    fs = FiberSampler(wrapped, "classification", subset_of_weights="last_layer", **SETTINGS)
    fs.fit(shuffled_loader(x, y, 0))
    assert fs.subset.last_layer_name == "head"
    head_params = sum(p.numel() for p in wrapped.head.parameters())
    assert fs.sample(2).shape == (2, head_params)
    # the sampler's function at theta* is the model's own output, scale included
    with torch.no_grad():
        torch.testing.assert_close(fs.subset.forward(fs.subset.inputs(x[:5])), wrapped(x[:5]), rtol=1e-10, atol=1e-10)
    restored = FiberSampler(wrapped, "classification", subset_of_weights="last_layer", **SETTINGS)
    restored.load_state_dict(fs.state_dict())
    assert restored.subset.last_layer_name == "head"
    torch.testing.assert_close(restored.predict(x[:5], n_samples=4).samples, fs.predict(x[:5], n_samples=4).samples,
                               rtol=0, atol=0)


class _TwoInputs(nn.Module):
    """A classifier that takes a tuple (a, b) of two (B, 3) tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 3).double(), nn.Linear(3, 3).double()

    def forward(self, x: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self.a(x[0]) + self.b(x[1])


def test_tuple_model_inputs_are_walked_and_predicted():
    """Tuple model inputs used to be refused with a TypeError (the walk pooled one tensor); now they are pooled,
    ordered and indexed like tensors: samples keep the training loss within tolerance and predict takes the
    same kind of input."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, generator=gen, dtype=DTYPE)
    loader = [((x, x + 1), torch.arange(8) % 3)]
    fs = FiberSampler(_TwoInputs(), "classification", **SETTINGS).fit(loader)
    assert fs.info["stage1_within_tol"] > 0
    samples = fs.predict((x[:4], x[:4] + 1), n_samples=4).samples
    assert samples.shape == (4, 4, 3) and torch.isfinite(samples).all()
    with pytest.raises(ValueError, match="structure of the training inputs"):
        fs.predict(x[:4], n_samples=4)
