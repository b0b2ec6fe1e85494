"""ScaLLA on a Hugging Face GPT-2 LM head (tiny config, random init, no download): per-token outputs (B, T, V).

Dict batches with attention masks, next-token labels with -100 on the right padding, the head tied to the token
embedding (GPT-2's default); the default surrogate is the model up to ``lm_head`` (every token's hidden state)
plus a per-token head. A few training steps: the conformance checks, not the quality.
"""

from __future__ import annotations

import pytest
import torch
from zoo.models import LM_SEQ, LM_VOCAB, lm_batches, tiny_gpt2_lm

from posthoc import ScaLLA

transformers = pytest.importorskip("transformers")

DTYPE = torch.float64
VOCAB, SEQ = LM_VOCAB, LM_SEQ


def test_scalla_on_the_gpt2_lm_head_gives_per_token_predictives():
    model = tiny_gpt2_lm()
    assert model.lm_head.weight is model.transformer.wte.weight
    weights = [p.detach().clone() for p in model.parameters()]
    data = lm_batches()
    s = ScaLLA(model, "classification", n_features=8, steps=20, batch_size=4, eigen_subsample=6,
               progress=False).fit(data)
    labels = torch.cat([b["labels"] for b in data])
    assert s.posterior.n_data == int((labels != -100).sum())
    x = {k: v for k, v in data[0].items() if k != "labels"}
    pred = s.predict(x)
    with torch.no_grad():
        logits = model(**x).logits
    torch.testing.assert_close(pred.mean, logits, rtol=0, atol=0)
    assert pred.cov.shape == (3, SEQ, VOCAB, VOCAB)
    assert bool((pred.var > 0).all()) and bool(torch.isfinite(pred.cov).all())
    assert s.features(x).shape == (3, SEQ, 8, VOCAB)
    probs = s(x)
    assert probs.shape == (3, SEQ, VOCAB)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, SEQ, dtype=DTYPE))
    assert torch.isfinite(s.log_marginal_likelihood())
    for before, after in zip(weights, model.parameters(), strict=True):  # the tied head is replaced in a copy only
        assert torch.equal(before, after)
