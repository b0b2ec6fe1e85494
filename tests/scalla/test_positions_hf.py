"""ScaLLA on a Hugging Face GPT-2 LM head (tiny config, random init, no download): per-token outputs (B, T, V).

Dict batches with attention masks, next-token labels with -100 on the right padding, the head tied to the token
embedding (GPT-2's default); the default surrogate is the model up to ``lm_head`` (every token's hidden state)
plus a per-token head. A few training steps: the conformance checks, not the quality.
"""

from __future__ import annotations

import pytest
import torch

from posthoc import ScaLLA

transformers = pytest.importorskip("transformers")

DTYPE = torch.float64
VOCAB, SEQ = 7, 5


def tiny_lm() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=4, n_layer=1, n_head=2, n_positions=SEQ, n_inner=8,
                                     pad_token_id=0, bos_token_id=1, eos_token_id=1, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config).to(DTYPE).eval()


def batches() -> list[dict[str, torch.Tensor]]:
    """Two dict batches of 3 right-padded sequences; labels are the next tokens, -100 where there is none."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, VOCAB, (6, SEQ), generator=g)
    mask = (torch.arange(SEQ) < torch.tensor([5, 4, 3, 5, 2, 4])[:, None]).long()
    ids = ids * mask
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = torch.where(mask[:, 1:] == 1, ids[:, 1:], -100)
    return [{"input_ids": ids[i:i + 3], "attention_mask": mask[i:i + 3], "labels": labels[i:i + 3]}
            for i in (0, 3)]


def test_scalla_on_the_gpt2_lm_head_gives_per_token_predictives():
    model = tiny_lm()
    assert model.lm_head.weight is model.transformer.wte.weight
    weights = [p.detach().clone() for p in model.parameters()]
    data = batches()
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
