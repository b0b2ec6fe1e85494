"""A Hugging Face GPT-2 LM head (tiny config, random init, no download): token-level Laplace.

Outputs (B, T, V), next-token labels with -100 on the right padding, dict batches with an attention mask, the
head tied to the token embedding (``lm_head.weight is transformer.wte.weight``, GPT-2's default).
"""

from __future__ import annotations

import pytest
import torch
from torch.autograd.functional import jacobian
from torch.func import functional_call
from zoo.models import LM_SEQ, LM_VOCAB, lm_batches, tiny_gpt2_lm

from posthoc import Laplace

transformers = pytest.importorskip("transformers")

DTYPE = torch.float64
VOCAB, SEQ = LM_VOCAB, LM_SEQ


def test_gpt2_lm_head_all_weights_diag_matches_dense_reference():
    model = tiny_gpt2_lm()
    assert model.lm_head.weight is model.transformer.wte.weight
    data = lm_batches()
    la = Laplace(model, "classification", "all", "diag", prior_precision=2.0, progress=False).fit(data)
    labels = torch.cat([b["labels"] for b in data])
    assert la.n_data == int((labels != -100).sum())
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    theta = torch.cat([params[n].detach().reshape(-1) for n in names])

    def logits(th: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        chunks, start = {}, 0
        for n in names:
            chunks[n] = th[start:start + params[n].numel()].view_as(params[n])
            start += params[n].numel()
        return functional_call(model, chunks, (), {"input_ids": batch["input_ids"],
                                                  "attention_mask": batch["attention_mask"]}).logits

    diag, jacobians = torch.zeros_like(theta), []
    for batch in data:
        jac = jacobian(lambda th, b=batch: logits(th, b), theta)  # (B, T, V, P), one backward pass per output
        jacobians.append(jac)
        with torch.no_grad():
            p = torch.softmax(logits(theta, batch), -1)
        gamma = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
        gamma = gamma * (batch["labels"] != -100).to(DTYPE)[..., None, None]
        diag += torch.einsum("btcp,btcd,btdp->p", jac, gamma, jac)
    torch.testing.assert_close(la.structure.diagonal, diag, rtol=1e-8, atol=1e-10)
    x = {k: v for k, v in data[0].items() if k != "labels"}
    jac = jacobians[0]
    expected = torch.einsum("btcp,p,btdp->btcd", jac, 1 / (diag + 2.0), jac)
    pred = la.predict(x)
    assert pred.cov.shape == (3, SEQ, VOCAB, VOCAB)
    torch.testing.assert_close(pred.cov, expected, rtol=1e-7, atol=1e-10)
    probs = la(x)
    assert probs.shape == (3, SEQ, VOCAB)
    assert torch.isfinite(la.log_marginal_likelihood())


def test_gpt2_lm_head_kron_fits_and_predicts_per_token():
    la = Laplace(tiny_gpt2_lm(), "classification", "all", "kron", progress=False).fit(lm_batches())
    x = {k: v for k, v in lm_batches()[0].items() if k != "labels"}
    pred = la.predict(x)
    assert pred.cov.shape == (3, SEQ, VOCAB, VOCAB)
    assert bool((pred.var > 0).all()) and torch.isfinite(la.log_marginal_likelihood())


def test_gpt2_tied_lm_head_under_last_layer_is_refused():
    la = Laplace(tiny_gpt2_lm(), "classification", "last_layer", "kron", progress=False)
    with pytest.raises(ValueError, match="tied weights.*subset_of_weights='all'"):
        la.fit(lm_batches())
