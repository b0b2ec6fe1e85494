"""ScaLLA and FiberSampler on models users bring (issue 15): stock Hugging Face BERT and GPT-2 classifiers built
from configs (token ids and attention masks with padding, as dict batches), bare and behind laplace-torch's
one-argument dict wrapper, models returning a dict or (logits, aux), a model taking a tuple input, and a peft
LoRA model.

ScaLLA: the default surrogate (a copy of the model with its last nn.Linear replaced by an identity) trains a few
steps, the predictive mean is the model's output, the variances are finite and positive. FiberSampler: "all"
and "last_layer" walk and predict on the same inputs, Hugging Face models with their default attention ("sdpa":
the walk runs it on SDPA's math kernel, which has forward-mode derivatives and batching rules). The ScaLLA tests
run Hugging Face models with eager attention (ScaLLA's JVPs switch to SDPA's math kernel themselves;
test_scalla_on_sdpa_attention_equals_eager).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from zoo.models import DictWrapper, token_batches, vector_batches
from zoo.test_zoo import MODELS, _outputs, check_mean_and_cov

from posthoc import ScaLLA
from posthoc.fiber import FiberSampler
from posthoc.fiber.projection import outputs_many
from posthoc.scalla.surrogate import ModelTrunk, build_default_surrogate

SCALLA = dict(n_features=4, steps=5, n_target_points=12, eigen_subsample=12, batch_size=4, progress=False)
FIBER = dict(n_particles=2, steps=6, burn_in=2, thin=2, batch_size=6, subsample_size=12, cg_steps=2, n_check=2,
             progress=False)  # the default stage 2 ("pullback")


def _eager(name: str):
    """The zoo model ``name`` (eager attention for the Hugging Face ones), its batches and test inputs."""
    model, batches, x = MODELS[name]()
    inner = model.inner if isinstance(model, DictWrapper) else model
    if hasattr(inner, "set_attn_implementation"):
        inner.set_attn_implementation("eager")
    return model, batches, x


@pytest.mark.parametrize("objective", ["directions", "probes"])
@pytest.mark.parametrize("name", list(MODELS))
def test_scalla_on_the_model(name, objective):
    model, batches, x = _eager(name)
    head_before = [type(m) for m in model.modules()]
    s = ScaLLA(model, "classification", objective=objective, **SCALLA).fit(batches, context_loader=batches)
    assert isinstance(s.surrogate.trunk, ModelTrunk)
    assert [type(m) for m in model.modules()] == head_before  # the identity replaced the head in a copy only
    losses = [row["loss"] for row in s.train_record["history"]]
    assert s.train_record["steps"] == 5 and all(torch.isfinite(torch.tensor(losses)))
    expected = check_mean_and_cov(s.predict(x), model, x)
    probs = s(x)
    torch.testing.assert_close(probs.sum(-1), torch.ones(expected.shape[0], dtype=probs.dtype))


def _head_input(model: nn.Module, head: nn.Module, x) -> torch.Tensor:
    captured = []
    handle = head.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    with torch.no_grad():
        _outputs(model, x)
    handle.remove()
    return captured[0]


@pytest.mark.parametrize("name", ["bert", "gpt2", "dict_output"])
def test_the_default_trunk_gives_what_the_head_reads(name):
    """BERT: the pooled [CLS] state; GPT-2: the hidden state of the last non-pad token (the model pools its
    per-token head there); a dict-returning MLP: its features."""
    model, batches, x = _eager(name)
    s = ScaLLA(model, "classification", **SCALLA).fit(batches)
    head_name = s.surrogate.trunk.head_name
    assert head_name == {"bert": "classifier", "gpt2": "score", "dict_output": "head"}[name]
    seen = _head_input(model, model.get_submodule(head_name), x)
    if name == "gpt2":  # right padding: the last non-pad token sits at length - 1
        seen = seen[torch.arange(seen.shape[0]), x["attention_mask"].sum(-1) - 1]
    built = build_default_surrogate(model, x, n_features=4, n_outputs=3, call=s.call)  # at the trained weights
    with torch.no_grad():
        torch.testing.assert_close(built.trunk(x), seen, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["userdict", "batchencoding"])
def test_scalla_mapping_kinds_give_the_same_posterior(kind):
    reference, _ = token_batches("dict")
    batches, _ = token_batches(kind)
    a = ScaLLA(_eager("bert")[0], "classification", **SCALLA).fit(reference)
    b = ScaLLA(_eager("bert")[0], "classification", **SCALLA).fit(batches)
    torch.testing.assert_close(a.posterior.precision, b.posterior.precision, rtol=0, atol=0)


def test_scalla_old_input_target_keys_warn_and_read_the_input_alone():
    batches, x = vector_batches()
    model = MODELS["dict_output"]()[0]
    reference = ScaLLA(model, "classification", **SCALLA).fit(batches)
    keyed = [{"input": xb, "target": yb} for xb, yb in batches]
    with pytest.warns(DeprecationWarning, match="dict_key_x='input_ids'"):
        old = ScaLLA(model, "classification", **SCALLA).fit(keyed)
    torch.testing.assert_close(old.posterior.precision, reference.posterior.precision, rtol=0, atol=0)


def test_scalla_state_of_a_token_model_restores_the_predictive():
    """The state keeps one training input: the default surrogate of a model without .trunk is rebuilt from it."""
    model, batches, x = _eager("gpt2")
    s = ScaLLA(model, "classification", **SCALLA).fit(batches)
    restored = ScaLLA(model, "classification", **SCALLA).load_state_dict(s.state_dict())
    torch.testing.assert_close(restored.predict(x).cov, s.predict(x).cov, rtol=0, atol=0)
    with_labels = {**x, "labels": torch.zeros(4, dtype=torch.long)}
    torch.testing.assert_close(restored.predict(with_labels).cov, s.predict(x).cov, rtol=0, atol=0)


def test_scalla_on_sdpa_attention_equals_eager():
    """ScaLLA's JVPs run HF's default "sdpa" attention on SDPA's math kernel (CPU flash attention has no
    forward-mode derivative): the same posterior as eager attention."""
    model, batches, x = MODELS["bert"]()
    sdpa = ScaLLA(model, "classification", **SCALLA).fit(batches)
    model.set_attn_implementation("eager")
    eager = ScaLLA(model, "classification", **SCALLA).fit(batches)
    torch.testing.assert_close(sdpa.predict(x).cov, eager.predict(x).cov, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("subset", ["all", "last_layer"])
@pytest.mark.parametrize("name", ["bert", "gpt2", "gpt2_wrapped", "dict_output", "pair_input"])
def test_fiber_sampler_on_the_model(name, subset):
    model, batches, x = MODELS[name]()  # the default attention implementation
    fs = FiberSampler(model, "classification", subset_of_weights=subset, **FIBER).fit(batches)
    assert fs.info["stage1_within_tol"] > 0
    assert float((fs.particles - fs.subset.theta_map).abs().max()) > 0  # the walk moved
    samples = fs.predict(x, n_samples=4).samples
    with torch.no_grad():
        expected = _outputs(model, x)
    assert samples.shape == (4, *expected.shape) and torch.isfinite(samples).all()
    with torch.no_grad():  # at theta*, the walk's outputs (SDPA's math kernel) are the model's, up to round-off
        at_map = outputs_many(fs.subset, fs.subset.inputs(x), fs.subset.theta_map.expand(2, -1))
    torch.testing.assert_close(at_map, expected.expand(2, -1, -1), rtol=0, atol=1e-12)
    if isinstance(x, dict):  # the target entry of a mapping is dropped, as in Laplace
        with_labels = {**x, "labels": torch.zeros(4, dtype=torch.long)}
        torch.testing.assert_close(fs.predict(with_labels, n_samples=4).samples, samples, rtol=0, atol=0)


def test_fiber_old_input_target_keys_warn_and_read_the_input_alone():
    batches, _ = vector_batches()
    model = MODELS["dict_output"]()[0]
    reference = FiberSampler(model, "classification", **FIBER).fit(batches)
    keyed = [{"input": xb, "target": yb} for xb, yb in batches]
    with pytest.warns(DeprecationWarning, match="dict_key_x='input_ids'"):
        old = FiberSampler(model, "classification", **FIBER).fit(keyed)
    torch.testing.assert_close(old.particles, reference.particles, rtol=0, atol=0)


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body, self.act, self.head = nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.body(x)))


def _lora_mlp() -> nn.Module:
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["body", "head"], init_lora_weights=False)
    return peft.get_peft_model(_MLP().double(), config).double().eval()


def test_lora_adapters_only_through_requires_grad():
    """A peft model freezes all but its adapters: the fiber walk and ScaLLA cover those only, and ScaLLA's default
    surrogate replaces the adapted head as a whole (its last nn.Linear is the adapter's lora_B)."""
    model = _lora_mlp()
    n_adapter = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    batches, x = vector_batches()
    fs = FiberSampler(model, "classification", **FIBER).fit(batches)
    assert fs.n_params == n_adapter == (2 * 4 + 8 * 2) + (2 * 8 + 3 * 2)  # lora_A (r, in), lora_B (out, r)
    assert fs.info["stage1_within_tol"] > 0 and torch.isfinite(fs.predict(x, n_samples=4).samples).all()
    s = ScaLLA(model, "classification", **SCALLA).fit(batches)
    assert s.subset.n_params == n_adapter and s.surrogate.trunk.head_name == "base_model.model.head"
    pred = s.predict(x)
    with torch.no_grad():
        torch.testing.assert_close(pred.mean, model(x), rtol=0, atol=1e-12)
    assert (pred.cov.diagonal(dim1=1, dim2=2) > 0).all()
    for n, p in model.named_parameters():  # the frozen base weights were never touched
        if n in frozen:
            assert torch.equal(p, frozen[n])
