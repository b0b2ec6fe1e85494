"""Laplace on models users bring: stock Hugging Face BERT and GPT-2 (config-built, random init, attention masks
with padding), bare (keyword arguments) and behind laplace-torch's one-argument dict wrapper, and models
returning a dict or (logits, aux), and a model taking a tuple input.

For every model and structure: the glm mean is the model's output, the glm covariance is J Λ⁻¹ Jᵀ with
J a dense float64 jacrev over the covered parameters (torch.func.functional_call) and Λ the structure's own
dense precision, variances are finite and positive, weight samples are centred on the weights, and
marginal-likelihood prior tuning does not lower the evidence.
"""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, jacrev
from zoo.models import (
    DictOutput,
    DictWrapper,
    PairInput,
    TupleOutput,
    pair_batches,
    tiny_bert,
    tiny_gpt2,
    token_batches,
    vector_batches,
)

from posthoc import Laplace


def _bert():
    return tiny_bert(), *token_batches()


def _gpt2():
    return tiny_gpt2(), *token_batches()


def _bert_wrapped():
    return DictWrapper(tiny_bert()), *token_batches()


def _gpt2_wrapped():
    return DictWrapper(tiny_gpt2()), *token_batches()


def _dict_output():
    return DictOutput().double().eval(), *vector_batches()


def _tuple_output():
    return TupleOutput().double().eval(), *vector_batches()


def _pair_input():
    return PairInput().double().eval(), *pair_batches()


MODELS = {"bert": _bert, "gpt2": _gpt2, "bert_wrapped": _bert_wrapped, "gpt2_wrapped": _gpt2_wrapped,
          "dict_output": _dict_output, "tuple_output": _tuple_output, "pair_input": _pair_input}
STRUCTURES = [("last_layer", "kron"), ("last_layer", "full"), ("all", "diag"), ("all", "kron")]
# lowrank ("omit") has no dense precision to compare with; it runs on the HF models in its own test


def _outputs(model, x):
    """The model's output tensor on x, as a user reads it."""
    if isinstance(x, dict) and not isinstance(model, DictWrapper):
        return model(**x).logits
    out = model(x)
    return out["logits"] if isinstance(out, dict) else out[0] if isinstance(out, tuple) else out


def check_mean_and_cov(pred, model, x) -> torch.Tensor:
    """Assert pred's mean is the model's output on x (to 1e-10) and its covariance finite with variances > 0.

    Returns the model's output (B, C).
    """
    with torch.no_grad():
        expected = _outputs(model, x)
    torch.testing.assert_close(pred.mean, expected, rtol=0, atol=1e-10)
    variances = pred.cov.diagonal(dim1=1, dim2=2)
    assert torch.isfinite(pred.cov).all() and (variances > 0).all()
    return expected


def dense_glm_covariance(la: Laplace, x) -> torch.Tensor:
    """J Λ⁻¹ Jᵀ (B, C, C) from a dense float64 jacrev over the covered parameters and the dense precision."""
    model, subset = la.model, la.subset
    prefix = "" if subset.last_layer_name is None else subset.last_layer_name + "."
    names = [prefix + block.name for block in subset.blocks]
    constants = {n: p.detach() for n, p in model.named_parameters()}

    def f(theta):
        params = dict(constants)
        for name, block, part in zip(names, subset.blocks, torch.split(theta, [b.numel for b in subset.blocks]),
                                     strict=True):
            params[name] = part.view(block.shape)
        if isinstance(x, dict) and not isinstance(model, DictWrapper):
            return functional_call(model, params, (), x).logits
        out = functional_call(model, params, (x,))
        return out["logits"] if isinstance(out, dict) else out[0] if isinstance(out, tuple) else out

    with torch.no_grad():
        jac = jacrev(f)(subset.theta_map)  # (B, C, P)
    precision = la.structure.dense_precision(la.prior_precision, la.factors.scale(la.sigma_noise))
    cov = torch.linalg.inv(precision)
    return torch.einsum("bcp,pq,bdq->bcd", jac, cov, jac)


@pytest.mark.parametrize("subset,structure", STRUCTURES, ids=[f"{s}-{h}" for s, h in STRUCTURES])
@pytest.mark.parametrize("name", list(MODELS))
def test_laplace_on_the_model(name, subset, structure):
    model, batches, x = MODELS[name]()
    la = Laplace(model, "classification", subset, structure, prior_precision=0.5, progress=False).fit(batches)
    pred = la.predict(x)
    expected = check_mean_and_cov(pred, model, x)
    torch.testing.assert_close(pred.cov, dense_glm_covariance(la, x), rtol=1e-8, atol=1e-10)

    posterior_variance = la.posterior_variance()
    assert torch.isfinite(posterior_variance).all() and (posterior_variance > 0).all()
    thetas = la.sample(400, seed=1)
    z = (thetas.mean(0) - la.subset.theta_map) / (posterior_variance / thetas.shape[0]).sqrt()
    assert float(z.abs().max()) < 6  # centred on theta*: each z ~ N(0, 1)
    samples = la.predict(x, pred_type="nn", n_samples=8, seed=2).samples
    assert samples.shape == (8, *expected.shape) and torch.isfinite(samples).all()

    before = float(la.log_marginal_likelihood())
    la.optimize_prior_precision(method="marglik", n_steps=15, lr=0.3, progress_bar=False)
    assert float(la.log_marginal_likelihood()) >= before - 1e-9
    probs = la(x)
    torch.testing.assert_close(probs.sum(-1), torch.ones(expected.shape[0], dtype=probs.dtype))


@pytest.mark.parametrize("kind", ["dict", "userdict", "batchencoding"])
def test_mapping_kinds_give_the_same_posterior(kind):
    reference_batches, x = token_batches("dict")
    batches, _ = token_batches(kind)
    a = Laplace(tiny_bert(), "classification", "all", "diag", progress=False).fit(reference_batches)
    b = Laplace(tiny_bert(), "classification", "all", "diag", progress=False).fit(batches)
    torch.testing.assert_close(a.structure.diagonal, b.structure.diagonal, rtol=0, atol=0)
    assert a.n_data == b.n_data == 12


def test_hf_models_take_the_per_example_loop_and_match_vmap_without_masks():
    """With masks HF reads `padding_mask.all()` (the loop route); without masks vmap runs and agrees."""
    batches, x = token_batches()
    la = Laplace(tiny_bert(), "classification", "all", "diag", progress=False).fit(batches)
    assert la.subset.vmap_examples(x) is False
    unmasked = [{"input_ids": b["input_ids"], "labels": b["labels"]} for b in batches]
    loop = Laplace(tiny_bert(), "classification", "all", "diag", progress=False, per_example="loop").fit(unmasked)
    vmapped = Laplace(tiny_bert(), "classification", "all", "diag", progress=False, per_example="vmap").fit(unmasked)
    torch.testing.assert_close(loop.structure.diagonal, vmapped.structure.diagonal, rtol=1e-10, atol=1e-12)


def test_predict_drops_the_target_entry_and_takes_the_same_kinds_as_the_loader():
    batches, x = token_batches()
    la = Laplace(tiny_bert(), "classification", "last_layer", "kron", progress=False).fit(batches)
    with_labels = {**x, "labels": torch.zeros(4, dtype=torch.long)}
    torch.testing.assert_close(la(with_labels), la(x))
    with pytest.raises(ValueError, match="structure of the training inputs"):
        la.predict({"input_ids": x["input_ids"]})


@pytest.mark.parametrize("name", ["bert", "gpt2_wrapped"])
def test_lowrank_runs_on_hf_models_with_eager_attention(name):
    model, batches, x = MODELS[name]()
    (model.inner if isinstance(model, DictWrapper) else model).set_attn_implementation("eager")
    la = Laplace(model, "classification", "all", "lowrank", progress=False,
                 structure_options={"rank": 5, "complement": "prior"}).fit(batches)
    pred = la.predict(x)
    with torch.no_grad():
        torch.testing.assert_close(pred.mean, _outputs(model, x), rtol=0, atol=1e-10)
    variances = pred.cov.diagonal(dim1=1, dim2=2)
    assert torch.isfinite(variances).all() and (variances > 0).all()
    la.optimize_prior_precision(method="marglik", n_steps=5, progress_bar=False)
    assert torch.isfinite(la.log_marginal_likelihood())


def test_lowrank_on_sdpa_attention_equals_eager():
    """CPU flash attention (HF's default "sdpa") has no forward-mode derivative: Lanczos' JVPs run attention on
    SDPA's math kernel (posthoc.curvature.jacobians.forward_mode_attention), the same posterior as eager attention."""
    model, batches, x = MODELS["bert"]()
    options = {"rank": 5, "complement": "prior"}
    sdpa = Laplace(model, "classification", "all", "lowrank", progress=False, structure_options=options).fit(batches)
    model.set_attn_implementation("eager")
    eager = Laplace(model, "classification", "all", "lowrank", progress=False, structure_options=options).fit(batches)
    torch.testing.assert_close(sdpa.predict(x).cov, eager.predict(x).cov, rtol=1e-8, atol=1e-12)


def test_gpt2_last_layer_pooling_follows_the_padding_of_every_batch():
    """GPT-2 pools its per-token head at the last non-pad token: with token inputs the tail is re-run, so a first
    batch whose examples share one padding length does not fix the pooled position for later batches."""
    model, batches, x = MODELS["gpt2"]()
    same_padding = {k: v[:1].expand(6, -1) for k, v in batches[0].items() if k != "labels"}
    first = {**same_padding, "labels": batches[0]["labels"]}
    la = Laplace(model, "classification", "last_layer", "kron", progress=False).fit([first, batches[1]])
    assert la.subset.tail.value == "rerun"
    with torch.no_grad():
        torch.testing.assert_close(la.predict(x).mean, _outputs(model, x), rtol=0, atol=1e-10)
