"""Checkpoint / exact resume and the clear errors on bad input."""

import copy

import pytest
import torch
from torch.utils.data import TensorDataset

from posthoc.data.loaders import make_loader
from posthoc.scalla import ScaLLA
from posthoc.utils.checkpoint import read_checkpoint

SMALL = dict(n_features=6, batch_size=8, n_target_points=40, checkpoint_every=5, directions="rademacher",
             progress=False)


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("objective,directions", [("probes", "rademacher"), ("directions", "rademacher"),
                                                  ("directions", "eigen")])
def test_resumed_run_equals_uninterrupted_run(mlp_problem, tmp_path, objective, directions):
    p = mlp_problem
    opts = {**SMALL, "directions": directions}
    whole = ScaLLA(p.model, "classification", objective=objective, steps=20, **opts)
    whole.fit(p.train_loader, p.context_loader, checkpoint=tmp_path / "whole.pt")

    def stop_at_13(step, evals):
        if step == 13:
            raise Interrupt

    path = tmp_path / "cut.pt"
    with pytest.raises(Interrupt):
        ScaLLA(p.model, "classification", objective=objective, steps=20, **opts).fit(
            p.train_loader, p.context_loader, checkpoint=path, callback=stop_at_13)
    assert read_checkpoint(path, "ScaLLA").payload["step"] == 10  # the last checkpoint before the interruption
    messages = []
    resumed = ScaLLA(p.model, "classification", objective=objective, steps=20, **opts)
    import posthoc.scalla.scalla as module

    original = module.SurrogateTrainer.__init__

    def capture_log(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.log = messages.append

    module.SurrogateTrainer.__init__ = capture_log
    try:
        resumed.fit(p.train_loader, p.context_loader, checkpoint=path)
    finally:
        module.SurrogateTrainer.__init__ = original
    assert any("resuming" in m and "step 10" in m for m in messages)
    for a, b in zip(whole.surrogate.state_dict().values(), resumed.surrogate.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert whole.train_record["jvp_evaluations"] == resumed.train_record["jvp_evaluations"]
    # the posterior pass reads the shuffled training loader in another order (it was iterated more often): the
    # m x m sums agree to round-off only
    torch.testing.assert_close(whole.predict(p.x_test).cov, resumed.predict(p.x_test).cov, rtol=1e-9, atol=1e-12)


def test_checkpoint_errors(mlp_problem, tmp_path):
    p = mlp_problem
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="unreadable"):
        ScaLLA(p.model, "classification", steps=5, **SMALL).fit(p.train_loader, p.context_loader, checkpoint=corrupt)
    other = tmp_path / "other.pt"
    ScaLLA(p.model, "classification", steps=5, **SMALL).fit(p.train_loader, p.context_loader, checkpoint=other)
    with pytest.raises(ValueError, match="other settings"):
        ScaLLA(p.model, "classification", steps=5, lr=0.5, **SMALL).fit(p.train_loader, p.context_loader,
                                                                         checkpoint=other)
    torch.save({"format": 1}, corrupt)
    with pytest.raises(ValueError, match="corrupt"):
        ScaLLA(p.model, "classification", steps=5, **SMALL).fit(p.train_loader, p.context_loader, checkpoint=corrupt)


def test_bad_input(mlp_problem):
    p = mlp_problem
    with pytest.raises(ValueError, match="n_features"):
        ScaLLA(p.model, "classification", n_features=0)
    with pytest.raises(ValueError, match="objective"):
        ScaLLA(p.model, "classification", objective="nope")
    with pytest.raises(ValueError, match="surrogate_hidden"):
        ScaLLA(p.model, "classification", surrogate_hidden=0)
    with pytest.raises(ValueError, match="surrogate_hidden"):
        ScaLLA(p.model, "classification", surrogate=torch.nn.Linear(4, 300), surrogate_hidden=500)
    s = ScaLLA(p.model, "classification", steps=3, **SMALL)
    with pytest.raises(RuntimeError, match="fit"):
        s.predict(p.x_test)
    with pytest.raises(RuntimeError, match="fit"):
        s.kernel(p.x_test, p.x_test)
    wrong = make_loader(TensorDataset(torch.rand(10, 5, dtype=torch.float64), torch.zeros(10)), 5, shuffle=False)
    with pytest.raises(ValueError, match="context inputs have shape"):
        s.fit(p.train_loader, wrong)
    with pytest.raises(ValueError, match="context"):
        ScaLLA(p.model, "classification", biased=True, **SMALL).fit(p.train_loader)
    s.fit(p.train_loader, p.context_loader)
    with pytest.raises(ValueError, match="shape"):
        s.predict(torch.rand(3, 5, dtype=torch.float64))
    bad = p.x_test[:3].clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        s.predict(bad)


def test_checkpoint_of_other_data_weights_or_damaged_is_refused(mlp_problem, tmp_path):
    """Issue 20 case 6: a checkpoint written on one data set resumed on another of the same size (on 83bdd0f:
    accepted, kernel 71% off the uninterrupted run's), or with a bit flipped in a tensor (accepted)."""
    p = mlp_problem
    path = tmp_path / "a.pt"
    ScaLLA(p.model, "classification", steps=5, **SMALL).fit(p.train_loader, p.context_loader, checkpoint=path)
    same_size = make_loader(TensorDataset(p.x + 0.5, p.y), 100, shuffle=False)
    with pytest.raises(ValueError, match=r"other settings, network or data \(differs in \['train_data'\]\)"):
        ScaLLA(p.model, "classification", steps=5, **SMALL).fit(same_size, p.context_loader, checkpoint=path)
    context = make_loader(TensorDataset(p.x_context.flip(0), torch.zeros(len(p.x_context))), 100, shuffle=False)
    with pytest.raises(ValueError, match=r"differs in \['context_data'\]"):
        ScaLLA(p.model, "classification", steps=5, **SMALL).fit(p.train_loader, context, checkpoint=path)
    model = copy.deepcopy(p.model)
    with torch.no_grad():
        model[0].bias[0] += 1e-6  # (the default surrogate's trunk starts from the network's weights too)
    with pytest.raises(ValueError, match=r"differs in \['network_weights', 'surrogate_init'\]"):
        ScaLLA(model, "classification", steps=5, **SMALL).fit(p.train_loader, p.context_loader, checkpoint=path)
    # one bit of one surrogate weight in the file
    weight = read_checkpoint(path, "ScaLLA").payload["surrogate"]
    raw = bytearray(path.read_bytes())
    at = bytes(raw).find(next(iter(weight.values())).reshape(-1)[:2].numpy().tobytes())
    assert at > 0
    raw[at + 6] ^= 0x40
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=rf"{path} is damaged"):
        ScaLLA(p.model, "classification", steps=5, **SMALL).fit(p.train_loader, p.context_loader, checkpoint=path)


def test_unwritable_checkpoint_location_fails_before_training(mlp_problem, tmp_path):
    p = mlp_problem
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    steps = []
    with pytest.raises(PermissionError, match=rf"ScaLLA checkpoint into {blocker}"):
        ScaLLA(p.model, "classification", steps=5, **SMALL).fit(
            p.train_loader, p.context_loader, checkpoint=blocker / "c.pt", callback=lambda s, e: steps.append(s))
    assert steps == []


class _TwoInputs(torch.nn.Module):
    """A classifier that takes a tuple (a, b) of two (B, 3) tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(3, 3).double(), torch.nn.Linear(3, 3).double()

    def forward(self, x):
        return self.a(x[0]) + self.b(x[1])


@pytest.mark.parametrize("objective", ["probes", "directions"])
def test_tuple_model_inputs_train_and_predict(objective):
    """Tuple model inputs (training and context) used to be refused with a TypeError; now ScaLLA pools them like
    tensors: the mean is the model's output and the variances are finite and positive."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, generator=gen, dtype=torch.float64)
    batches = [((x[i:i + 8], x[i:i + 8] + 1), torch.arange(8) % 3) for i in (0, 8)]
    xc = torch.randn(8, 3, generator=gen, dtype=torch.float64)
    context = [((xc, xc - 1), torch.zeros(8))]
    model = _TwoInputs()
    s = ScaLLA(model, "classification", steps=4, objective=objective, **SMALL).fit(batches, context_loader=context)
    pred = s.predict((x[:4], x[:4] + 1))
    with torch.no_grad():
        torch.testing.assert_close(pred.mean, model((x[:4], x[:4] + 1)), rtol=0, atol=0)
    variances = pred.cov.diagonal(dim1=1, dim2=2)
    assert torch.isfinite(variances).all() and (variances > 0).all()
    with pytest.raises(ValueError, match="structure of the inputs ScaLLA was fitted on"):
        s.predict(x[:4])


def test_pooled_inputs_of_different_shapes_name_the_padding_fix():
    from posthoc.scalla.training import InputPool

    batches = [({"input_ids": torch.ones(2, 5, dtype=torch.long)}, torch.zeros(2)),
               ({"input_ids": torch.ones(2, 4, dtype=torch.long)}, torch.zeros(2))]
    with pytest.raises(ValueError, match="pad token inputs to one length"):
        InputPool(batches, "training", torch.float64, torch.device("cpu"))
