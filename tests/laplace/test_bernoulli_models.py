"""Likelihood "binary" on the models people bring: a Hugging Face multi-label head on dict batches, and the
methods that do not support independent Bernoulli outputs refusing them by name."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from posthoc import Laplace
from posthoc.likelihood import from_problem_type

DTYPE = torch.float64
VOCAB, SEQ, LABELS = 30, 6, 3


def tiny_multilabel_bert() -> nn.Module:
    """BertForSequenceClassification with problem_type="multi_label_classification" (BCE-with-logits), 1 layer."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=16, max_position_embeddings=SEQ, num_labels=LABELS,
                                     pad_token_id=0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                     problem_type="multi_label_classification")
    return transformers.BertForSequenceClassification(config).to(DTYPE).eval()


def multilabel_batches(n: int = 12, seed: int = 0) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """Dict batches (input_ids, attention_mask with right padding, labels (B, 3) floats in {0, 1}) and test inputs."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n + 4, SEQ), generator=g)
    mask = (torch.arange(SEQ) < (SEQ - torch.arange(n + 4) % 3)[:, None]).long()
    labels = (torch.rand(n + 4, LABELS, generator=g) < 0.5).float()  # HF's multi-label labels are floats
    batches = [{"input_ids": (ids * mask)[i:i + 6], "attention_mask": mask[i:i + 6], "labels": labels[i:i + 6]}
               for i in range(0, n, 6)]
    return batches, {"input_ids": (ids * mask)[n:], "attention_mask": mask[n:]}


def test_hf_multilabel_head_on_dict_batches():
    model = tiny_multilabel_bert()
    batches, x_test = multilabel_batches()
    likelihood = from_problem_type(model.config.problem_type)  # the user's explicit choice, from the config
    la = Laplace(model, likelihood, "last_layer", "full", prior_precision=0.5, progress=False).fit(batches)
    assert la.n_outputs == LABELS and la.subset.last_layer_name == "classifier"
    # the evidence's data term is the model's own loss (HF: mean BCE-with-logits over B * K labels), summed
    with torch.no_grad():
        hf_loss = sum(model(**{k: v for k, v in b.items()}).loss * b["labels"].numel() for b in batches)
    torch.testing.assert_close(la.log_likelihood, -hf_loss.to(DTYPE))
    # glm covariance of the head = J Lambda^-1 J^T with J = I_K (x) [features, 1] (dense, by hand)
    with torch.no_grad():
        outputs = model(**x_test, output_hidden_states=True)
        features = model.bert.pooler(outputs.hidden_states[-1])
    phi = torch.cat([features, torch.ones(len(features), 1, dtype=DTYPE)], 1)  # (B, D + 1)
    dim = features.shape[1]
    jac = torch.zeros(len(phi), LABELS, LABELS * (dim + 1), dtype=DTYPE)
    for k in range(LABELS):  # parameters_to_vector order: weight (K, D) row-major, then bias (K,)
        jac[:, k, k * dim:(k + 1) * dim] = features
        jac[:, k, LABELS * dim + k] = 1.0
    posterior = torch.linalg.inv(la.structure.hessian + 0.5 * torch.eye(jac.shape[-1], dtype=DTYPE))
    pred = la.predict(x_test)
    torch.testing.assert_close(pred.mean, outputs.logits)
    torch.testing.assert_close(pred.cov, torch.einsum("bkp,pq,blq->bkl", jac, posterior, jac), rtol=1e-8, atol=1e-12)
    probs = la(x_test)
    assert probs.shape == (4, LABELS) and bool(((probs > 0) & (probs < 1)).all())


def test_single_logit_binary_model_with_dict_outputs():
    class Scorer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.head = nn.Sequential(nn.Linear(4, 6), nn.Tanh()), nn.Linear(6, 1)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"logits": self.head(self.body(x))}

    torch.manual_seed(0)
    model = Scorer().to(DTYPE)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 4, generator=g, dtype=DTYPE)
    y = (torch.rand(12, generator=g) < 0.5).long()  # (B,) integer labels of a single logit
    la = Laplace(model, "binary", "all", "kron", progress=False).fit([(x[:6], y[:6]), (x[6:], y[6:])])
    la.optimize_prior_precision(method="marglik", n_steps=10)
    probs = la(x[:3])
    assert probs.shape == (3, 1) and bool(((probs > 0) & (probs < 1)).all())


def test_methods_without_bernoulli_outputs_refuse_them():
    from posthoc.fiber import FiberSampler
    from posthoc.laplace.functional import FunctionalLaplace
    from posthoc.scalla import ScaLLA
    from posthoc.streamlined import Streamlined

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DTYPE)
    with pytest.raises(NotImplementedError, match="ScaLLA supports likelihood 'classification' or 'regression'"):
        ScaLLA(model, "binary")
    with pytest.raises(NotImplementedError, match="FiberSampler supports"):
        FiberSampler(model, "binary")
    with pytest.raises(NotImplementedError, match="FunctionalLaplace supports"):
        FunctionalLaplace(model, "binary", n_subset=2)
    x = torch.randn(6, 4, dtype=DTYPE)
    la = Laplace(model, "binary", "all", "diag", progress=False).fit([(x, torch.ones(6, 3, dtype=DTYPE))])
    with pytest.raises(NotImplementedError, match="Streamlined supports"):
        Streamlined(model, posterior=la)


def test_outputs_with_positions_are_refused():
    model = nn.Sequential(nn.Embedding(VOCAB, 4), nn.Linear(4, LABELS)).to(DTYPE)
    x = torch.randint(0, VOCAB, (4, SEQ))
    with pytest.raises(NotImplementedError, match=r"needs outputs \(B, K\)"):
        Laplace(model, "binary", "all", "diag", progress=False).fit([(x, torch.ones(4, SEQ, LABELS))])
