"""The cost-saving paths of the diagonal mode give the numbers of the paths they replace (float64).

Mean-only nodes: scaled_dot_product_attention reads its query and key as means, so the nodes that feed only those
(the Q and K projections and their reshapes) run on the means with the weights at their means; the predictive must
equal the walk that propagates their variances too (:data:`posthoc.streamlined.traced.MEAN_ONLY_ARGUMENTS` empty).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from posthoc.streamlined import Streamlined, traced
from posthoc.streamlined.rules.affine import LinearStep

DTYPE = torch.float64


class TinyAttention(nn.Module):
    """Embedding-free self-attention classifier: separate Q, K, V projections into F.scaled_dot_product_attention."""

    def __init__(self, width: int = 8, heads: int = 2, classes: int = 3) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(width, width) for _ in range(3))
        self.out_proj = nn.Linear(width, width)
        self.head = nn.Linear(width, classes)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, d = t.shape
        return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.q_proj(x)), self._split(self.k_proj(x)), self._split(self.v_proj(x))
        mixed = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        h = x + self.out_proj(mixed.transpose(1, 2).reshape(x.shape))
        return self.head(torch.tanh(h).mean(1))


def _model_and_inputs() -> tuple[nn.Module, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = TinyAttention().to(DTYPE).eval()
    gen = torch.Generator().manual_seed(1)
    variances = {name: 0.05 * torch.rand(p.shape, generator=gen, dtype=DTYPE) for name, p in model.named_parameters()}
    x = torch.randn(3, 5, 8, dtype=DTYPE)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1, 3:] = False
    return model, variances, {"x": x, "mask": mask}


@pytest.mark.parametrize("graph", ["fx", "export"])
def test_mean_only_query_and_key_give_the_predictive_of_the_full_variance_walk(graph: str, monkeypatch) -> None:
    model, variances, inputs = _model_and_inputs()
    fast = Streamlined(model, weight_var=variances, graph=graph).predict(inputs)
    monkeypatch.setattr(traced, "MEAN_ONLY_ARGUMENTS", {})
    reference = Streamlined(model, weight_var=variances, graph=graph).predict(inputs)
    torch.testing.assert_close(fast.mean, reference.mean, rtol=0, atol=0)
    torch.testing.assert_close(fast.cov, reference.cov, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(fast.mean, model(**inputs), rtol=1e-12, atol=1e-12)
    assert float(fast.var.min()) > 0


def test_the_query_and_key_projections_skip_their_variance_pass(monkeypatch) -> None:
    model, variances, inputs = _model_and_inputs()
    with_variance: list[torch.Tensor] = []
    original = LinearStep.var

    def spy(step: LinearStep, var_in: torch.Tensor | None) -> torch.Tensor | None:
        out = original(step, var_in)
        if out is not None:
            with_variance.append(step.module.weight)
        return out

    monkeypatch.setattr(LinearStep, "var", spy)
    Streamlined(model, weight_var=variances, graph="fx").predict(inputs)
    computed = {id(w) for w in with_variance}
    assert id(model.v_proj.weight) in computed and id(model.out_proj.weight) in computed
    assert id(model.q_proj.weight) not in computed and id(model.k_proj.weight) not in computed


def test_variance_needed_drops_only_the_nodes_read_as_means() -> None:
    model, _, _ = _model_and_inputs()
    graph_module = traced.trace(model)
    output = next(n for n in graph_module.graph.nodes if n.op == "output")
    needed = {n.name for n in traced.variance_needed(output.args[0])}
    assert {"v_proj", "out_proj", "head", "scaled_dot_product_attention"} <= needed
    assert not {"q_proj", "k_proj"} & needed


def test_hf_bert_query_and_key_projections_run_on_the_means_with_the_same_predictive(monkeypatch) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                                     vocab_size=50, max_position_embeddings=16, num_labels=3)
    net = transformers.BertForSequenceClassification(config).to(DTYPE).eval()
    ids = torch.randint(1, 50, (3, 8))
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[1, 5:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    gen = torch.Generator().manual_seed(2)
    variances = {name: 1e-3 * torch.rand(p.shape, generator=gen, dtype=DTYPE) for name, p in net.named_parameters()}
    names = {id(m.weight): name for name, m in net.named_modules() if isinstance(m, nn.Linear)}
    with_variance: set[str] = set()
    original = LinearStep.var

    def spy(step: LinearStep, var_in: torch.Tensor | None) -> torch.Tensor | None:
        out = original(step, var_in)
        if out is not None:
            with_variance.add(names[id(step.module.weight)])
        return out

    monkeypatch.setattr(LinearStep, "var", spy)
    fast = Streamlined(net, weight_var=variances, graph="export").predict(inputs)
    assert {f"bert.encoder.layer.{i}.attention.self.value" for i in range(2)} <= with_variance
    assert not any(name.endswith(("self.query", "self.key")) for name in with_variance)
    monkeypatch.setattr(traced, "MEAN_ONLY_ARGUMENTS", {})
    reference = Streamlined(net, weight_var=variances, graph="export").predict(inputs)
    torch.testing.assert_close(fast.mean, reference.mean, rtol=0, atol=0)
    torch.testing.assert_close(fast.cov, reference.cov, rtol=1e-13, atol=1e-15)
