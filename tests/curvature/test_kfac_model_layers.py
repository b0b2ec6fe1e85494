"""KFAC on the layers Hugging Face / peft / torch models use, against dense float64 references.

- transformers' Conv1D (GPT-2, weight stored (D_in, D_out)): a Kronecker block like a Linear's, laid out in
  storage order (the same posterior as the equivalent nn.Linear model, transposed; exact on one example).
- peft LoRA adapters (nn.Linear inside a LoraLayer), base frozen: only the adapters are covered, every adapter
  gets a Kronecker block, exact on one example.
- nn.MultiheadAttention (in_proj_weight read functionally, out_proj used without being called) and nn.Embedding:
  the exact diagonal block.
"""

import pytest
import torch
from references import DTYPE, dense_ggn, dense_jacobians
from torch import nn

from posthoc.curvature.output_factors import OutputFactors
from posthoc.laplace.structures.kron import KronCurvature
from posthoc.network.subset import ParameterSubset

ONE = torch.tensor(1.0, dtype=DTYPE)


def _fit(subset, x, y, batch=4):
    def batches():
        for i in range(0, len(y), batch):
            yield x[i:i + batch], y[i:i + batch]
    return KronCurvature.fit(subset, batches, OutputFactors("classification"), progress=False)


def _assert_exact_blocks(curv, subset, x):
    kron = curv.dense_precision(torch.tensor([1.0], dtype=DTYPE), ONE) - torch.eye(subset.n_params, dtype=DTYPE)
    exact = dense_ggn(subset, x, "classification")
    for block in subset.blocks:
        torch.testing.assert_close(kron[block.slice, block.slice], exact[block.slice, block.slice],
                                   rtol=0, atol=1e-10)


def _assert_glm_matches_dense(curv, subset, x_test, prior=0.7):
    prior = torch.tensor([prior], dtype=DTYPE)
    precision = curv.dense_precision(prior, ONE)
    inverse = torch.linalg.inv(precision)
    jac = dense_jacobians(subset, x_test)
    expected = jac @ inverse @ jac.mT
    torch.testing.assert_close(curv.functional_covariance(x_test, prior, ONE), expected,
                               rtol=1e-7, atol=1e-10 * float(expected.abs().max()))
    torch.testing.assert_close(curv.posterior_variance(prior, ONE), torch.diagonal(inverse), rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(curv.logdet_precision(prior, ONE), torch.logdet(precision), rtol=1e-10, atol=1e-9)


# ----------------------------------------------------------------------------------- transformers' Conv1D

class _Conv1DNet(nn.Module):
    """Conv1D(3 -> 5) - Tanh - Conv1D(5 -> 3) over (B, T, 3), logits of the mean over positions."""

    def __init__(self) -> None:
        super().__init__()
        conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D
        torch.manual_seed(0)
        self.up, self.down = conv1d(5, 3), conv1d(3, 5)
        with torch.no_grad():
            for layer in (self.up, self.down):
                layer.weight.normal_()
                layer.bias.normal_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(x))).mean(1)


def _as_linear(net: _Conv1DNet) -> nn.Module:
    up, down = nn.Linear(3, 5), nn.Linear(5, 3)
    with torch.no_grad():
        for lin, conv in ((up, net.up), (down, net.down)):
            lin.weight.copy_(conv.weight.T)
            lin.bias.copy_(conv.bias)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up, self.down = up, down

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.down(torch.tanh(self.up(x))).mean(1)

    return Net().to(DTYPE)


def _to_linear_order(subset: ParameterSubset) -> torch.Tensor:
    """Permutation p with theta_linear = theta_conv1d[p] (each weight transposed)."""
    order = []
    for block in subset.blocks:
        idx = torch.arange(block.offset, block.offset + block.numel).view(block.shape)
        order.append((idx.T if block.kind == "weight" else idx).reshape(-1))
    return torch.cat(order)


def test_conv1d_is_a_transposed_linear():
    net = _Conv1DNet().to(DTYPE)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(10, 4, 3, generator=g, dtype=DTYPE), torch.randint(0, 3, (10,), generator=g)
    subset = ParameterSubset(net, "all")
    curv = _fit(subset, x, y)
    assert [layer.name for layer in curv.layers] == ["up", "down"] and not curv.fallback
    linear = ParameterSubset(_as_linear(net), "all")
    ref = _fit(linear, x, y)
    perm = _to_linear_order(subset)
    prior = torch.tensor([0.7], dtype=DTYPE)
    torch.testing.assert_close(curv.dense_precision(prior, ONE)[perm][:, perm], ref.dense_precision(prior, ONE),
                               rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(curv.sample(3, prior, ONE, torch.Generator().manual_seed(0))[:, perm],
                               ref.sample(3, prior, ONE, torch.Generator().manual_seed(0)), rtol=1e-10, atol=1e-12)
    _assert_glm_matches_dense(curv, subset, x[:3])
    restored = KronCurvature.from_state_dict(subset, curv.state_dict())
    torch.testing.assert_close(restored.posterior_variance(prior, ONE), curv.posterior_variance(prior, ONE))


def test_conv1d_one_example_is_the_exact_ggn():
    net = _Conv1DNet().to(DTYPE)
    x = torch.randn(1, 1, 3, generator=torch.Generator().manual_seed(2), dtype=DTYPE)
    subset = ParameterSubset(net, "all")
    _assert_exact_blocks(_fit(subset, x, torch.tensor([1])), subset, x)


# ----------------------------------------------------------------------------------------- peft LoRA

def _lora_mlp() -> nn.Module:
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DTYPE)
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"]))
    with torch.no_grad():  # lora_B starts at zero, which would make lora_A's curvature vanish
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    return model.to(DTYPE).eval()


def test_lora_adapters_only_each_a_kronecker_block():
    model = _lora_mlp()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(9, 4, generator=g, dtype=DTYPE), torch.randint(0, 3, (9,), generator=g)
    subset = ParameterSubset(model, "all")
    assert all("lora_A" in b.name or "lora_B" in b.name for b in subset.blocks) and len(subset.blocks) == 4
    curv = _fit(subset, x, y)
    assert len(curv.layers) == 4 and not curv.fallback
    _assert_glm_matches_dense(curv, subset, x[:3])
    _assert_exact_blocks(_fit(subset, x[:1], y[:1]), subset, x[:1])


# ------------------------------------------------------------------ attention and embeddings: exact diagonal

class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))


class _Embedding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(7, 3, padding_idx=0)
        self.head = nn.Linear(3, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(tokens)).mean(1))


@pytest.mark.parametrize("case", ["attention", "embedding"])
def test_attention_and_embedding_get_the_exact_diagonal(case):
    g = torch.Generator().manual_seed(4)
    if case == "attention":
        model, x = _Attention().to(DTYPE).eval(), torch.randn(8, 3, 4, generator=g, dtype=DTYPE)
        diagonal = ["attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias"]
    else:
        model, x = _Embedding().to(DTYPE).eval(), torch.randint(0, 7, (8, 5), generator=g)
        diagonal = ["emb.weight"]
    y = torch.randint(0, 3, (8,), generator=g)
    subset = ParameterSubset(model, "all")
    curv = _fit(subset, x, y)
    assert [subset.blocks[i].name for i in curv.fallback] == diagonal
    assert [layer.name for layer in curv.layers] == ["head"]
    exact = torch.diagonal(dense_ggn(subset, x, "classification"))
    positions = torch.cat([torch.arange(subset.blocks[i].offset, subset.blocks[i].offset + subset.blocks[i].numel)
                           for i in curv.fallback])
    torch.testing.assert_close(curv.fallback_diag, exact[positions], rtol=1e-10, atol=1e-14)
    _assert_glm_matches_dense(curv, subset, x[:3])


# ------------------------------------------------------------------------------- a GPT-2 from a config

def test_gpt2_conv1d_kronecker_embeddings_and_layernorms_exact_diagonal():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=20, n_positions=8, num_labels=3,
                                     pad_token_id=0, bos_token_id=1, eos_token_id=1)
    gpt2 = transformers.GPT2ForSequenceClassification(config).to(DTYPE).eval()

    class Logits(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gpt2 = gpt2

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.gpt2(input_ids=input_ids).logits

    g = torch.Generator().manual_seed(5)
    ids, y = torch.randint(1, 20, (5, 6), generator=g), torch.randint(0, 3, (5,), generator=g)
    subset = ParameterSubset(Logits(), "all")
    curv = _fit(subset, ids, y, batch=3)
    conv1d = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    assert [layer.name for layer in curv.layers] == [f"gpt2.transformer.h.0.{n}" for n in conv1d] + ["gpt2.score"]
    # wpe embeds (1, L) position ids broadcast over the batch: not per example, so the generic diagonal
    assert [emb.name for emb in curv.embeddings] == ["gpt2.transformer.wte"]
    jac = dense_jacobians(subset, ids)
    with torch.no_grad():
        p = torch.softmax(subset.forward(ids), -1)
    gamma = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    exact = torch.einsum("bcp,bcd,bdp->p", jac, gamma, jac)
    positions = torch.cat([torch.arange(subset.blocks[i].offset, subset.blocks[i].offset + subset.blocks[i].numel)
                           for i in curv.fallback])
    torch.testing.assert_close(curv.fallback_diag, exact[positions], rtol=1e-9, atol=1e-14)
