"""The fiber walk on stock Hugging Face models with their default attention ("sdpa") and attention masks.

The projection's JVPs and VJPs at several particles equal a dense float64 jacrev of the model; a GPT-2 LM head
walks on its per-token outputs with -100 labels. And the particle route: the covered function is vmapped over
particles unless its forward pass reads values computed from the weights (posthoc.fiber.particles), which
Hugging Face's mask code does not (it reads the attention mask, an input).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev
from zoo.models import N_CLASSES, lm_batches, tiny_bert, tiny_gpt2, tiny_gpt2_lm, token_batches

from posthoc.fiber import FiberSampler
from posthoc.fiber.particles import map_particles
from posthoc.fiber.projection import jvp_at, outputs_many, vjp_at
from posthoc.network.probes import reads_values_computed_from
from posthoc.network.subset import ParameterSubset

DTYPE = torch.float64
FIBER = dict(n_particles=2, steps=4, burn_in=2, thin=1, batch_size=6, subsample_size=12, cg_steps=2, n_check=2,
             progress=False)


def _hf_jacobian(model: nn.Module, names: list[str], x: dict, theta: torch.Tensor) -> torch.Tensor:
    """d logits / d theta over the named parameters (flattened in that order) by jacrev: (B, ..., C, P)."""
    params = dict(model.named_parameters())
    sizes = [params[n].numel() for n in names]

    def logits(th: torch.Tensor) -> torch.Tensor:
        parts = {n: p.view_as(params[n]) for n, p in zip(names, torch.split(th, sizes), strict=True)}
        return functional_call(model, parts, (), x).logits

    return jacrev(logits)(theta)


@pytest.mark.parametrize("build", [tiny_bert, tiny_gpt2], ids=["bert", "gpt2"])
def test_projection_products_on_default_attention_match_a_dense_jacrev(build):
    pytest.importorskip("transformers")
    model = build()
    assert model.config._attn_implementation == "sdpa"  # the default, not eager
    _, x = token_batches()
    assert bool((x["attention_mask"] == 0).any())  # padded: the masks matter
    subset = ParameterSubset(model, "all")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert subset.n_params == sum(dict(model.named_parameters())[n].numel() for n in names)
    gen = torch.Generator().manual_seed(0)
    thetas = torch.stack([subset.theta_map,
                          subset.theta_map + 0.05 * torch.randn(subset.n_params, generator=gen, dtype=DTYPE)])
    v = torch.randn(2, subset.n_params, generator=gen, dtype=DTYPE)
    u = torch.randn(2, 4, N_CLASSES, generator=gen, dtype=DTYPE)
    jv, ju = jvp_at(subset, x, thetas, v), vjp_at(subset, x, thetas, u)
    for k in range(2):
        jac = _hf_jacobian(model, names, x, thetas[k])  # (B, C, P)
        torch.testing.assert_close(jv[k], torch.einsum("bcp,p->bc", jac, v[k]), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(ju[k], torch.einsum("bcp,bc->p", jac, u[k]), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("subset,tie", [("all", True), ("last_layer", False)])
def test_gpt2_lm_head_walks_on_its_token_outputs(subset, tie):
    model = tiny_gpt2_lm(tie)
    data = lm_batches()
    fs = FiberSampler(model, "classification", subset_of_weights=subset, **FIBER).fit(data)
    labels = torch.cat([b["labels"] for b in data])
    with torch.no_grad():
        logits = torch.cat([model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits for b in data])
    expected_nll = nn.functional.cross_entropy(logits.reshape(-1, 7), labels.reshape(-1), ignore_index=-100)
    assert fs.map_nll == pytest.approx(float(expected_nll), rel=1e-10)  # per kept position
    assert fs.info["stage1_within_tol"] > 0 and float((fs.particles - fs.subset.theta_map).abs().max()) > 0
    x = {k: v for k, v in data[0].items() if k != "labels"}
    pred = fs.predict(x, n_samples=4)
    assert pred.mean.shape == (3, 5, 7) and pred.sample(4).shape == (4, 3, 5, 7)
    assert torch.isfinite(pred.sample(4)).all()


def test_gpt2_lm_head_tied_to_the_embedding_is_refused_under_last_layer():
    with pytest.raises(ValueError, match="tied weights"):
        FiberSampler(tiny_gpt2_lm(tie=True), "classification", subset_of_weights="last_layer",
                     **FIBER).fit(lm_batches())


class _Branching(nn.Module):
    """Python control flow on a value computed from the weights: no vmap over weight vectors."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body, self.head = nn.Linear(3, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.body(x))
        if h.mean() > 0:  # reads a weight-dependent value into Python
            h = 2 * h
        return self.head(h)


class _MaskRead(nn.Module):
    """Reads a value of its input only, as Hugging Face's mask code does: vmaps over weight vectors."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        return out if bool((x > -100).all()) else -out


def test_reads_values_computed_from_tells_weight_reads_from_input_reads():
    x = torch.randn(4, 3, dtype=DTYPE)
    for model, expected in ((_Branching(), True), (_MaskRead(), False)):
        subset = ParameterSubset(model.to(DTYPE).eval(), "all")
        assert reads_values_computed_from(lambda th, s=subset: s.forward(x, th), subset.theta_map) is expected
    theta = torch.randn(5, dtype=DTYPE)
    assert reads_values_computed_from(lambda th: th[th > 0].sum(), theta)  # a shape that depends on the values
    assert not reads_values_computed_from(lambda th: th[th.argmax(0, keepdim=True)], theta)  # integer indices batch
    assert reads_values_computed_from(lambda th: th * float(th.sum()), theta)


def test_a_model_branching_on_its_weights_walks_by_a_loop_over_particles():
    model = _Branching().to(DTYPE).eval()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(12, 3, generator=gen, dtype=DTYPE)
    y = torch.randint(0, 3, (12,), generator=gen)
    fs = FiberSampler(model, "classification", **{**FIBER, "batch_size": 12}).fit([(x, y)])
    assert fs.vectorises(x) is False and fs.info["stage1_within_tol"] > 0
    thetas = fs.sample(3)
    looped = outputs_many(fs.subset, x, thetas, vectorise=False)
    one_by_one = torch.stack([fs.subset.forward(x, th) for th in thetas])
    torch.testing.assert_close(looped, one_by_one, rtol=0, atol=0)
    torch.testing.assert_close(fs.predict(x, n_samples=3).samples, looped, rtol=0, atol=1e-12)
    with pytest.raises(RuntimeError):  # what the probe avoids: vmap over the particles
        outputs_many(fs.subset, x, thetas, vectorise=True)


def test_map_particles_loop_equals_vmap():
    thetas = torch.randn(3, 4, dtype=DTYPE)
    scale = torch.randn(3, 4, dtype=DTYPE)

    def fn(theta: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return torch.sin(theta) * s + math.pi

    torch.testing.assert_close(map_particles(fn, (thetas, scale), vectorise=False),
                               map_particles(fn, (thetas, scale), vectorise=True), rtol=0, atol=0)
