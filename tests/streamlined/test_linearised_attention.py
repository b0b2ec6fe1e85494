"""``attention="linearized"``: full-mode attention linearised in Q, K and V, against the exact linearised variance.

With every rule linearised (LayerNorm, activations, attention) the full mode is the first-order propagation of the
weight noise, so for a posterior s·v its output covariance / s tends to J diag(v) Jᵀ (J the Jacobian of the outputs
in the weights, torch.func.jacrev, float64) as s -> 0; the second-order terms the rules keep (Var(δW)·Σ_x) are
O(s). At s = 1e-7 the difference is ~1e-6 relative, so 1e-4 is the band. The paper's rule (Q and K from the means,
``attention="independent"``) misses the variance that reaches the output through Q and K: on each model below it
is checked to fail the same comparison, so the reference tells the two apart at this tolerance.

Paths covered: F.scaled_dot_product_attention with a padding mask (traced op), the same attention written as
matmul / masked_fill / softmax / matmul, posthoc's MultiHeadSelfAttention (module rule, three projections
stacked), nn.MultiheadAttention (fused in_proj, batch_first True and folded False), and Hugging Face BERT and GPT-2
through torch.export.
"""

from __future__ import annotations

import pytest
import torch
from streamlined.test_traced import DTYPE
from streamlined.test_traced_attention import TinyEncoder
from torch import nn
from torch.func import functional_call, jacrev

from posthoc.models import SmallViT
from posthoc.streamlined import Streamlined, UnsupportedOpError

SCALE = 1e-7
RTOL = 1e-4


def _variances(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, dtype=p.dtype, generator=g) + 0.5 for n, p in model.named_parameters()}


def _linearised_cov(model: nn.Module, x, variances: dict[str, torch.Tensor], batch: int) -> torch.Tensor:
    """(B, C, C) Σ_p J_p diag(v_p) J_pᵀ, the Jacobians by jacrev per example; ``x`` a tensor or a dict batch."""
    fixed = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    covs = []
    for b in range(batch):
        one = {k: v[b:b + 1] for k, v in x.items()} if isinstance(x, dict) else x[b:b + 1]

        def out(params, one=one):
            return functional_call(model, {**fixed, **params, **buffers}, (one,)).reshape(-1)

        jac = jacrev(out)({n: fixed[n] for n in variances})
        covs.append(sum((jac[n].reshape(jac[n].shape[0], -1) * variances[n].reshape(1, -1)) @
                        jac[n].reshape(jac[n].shape[0], -1).T for n in variances))
    return torch.stack(covs)


def _check(model: nn.Module, x, batch: int, logits) -> None:
    variances = _variances(model)
    scaled = {n: SCALE * v for n, v in variances.items()}
    reference = _linearised_cov(model, x, variances, batch)
    linearised = Streamlined(model, weight_var=scaled, activation_covariance="full", attention="linearized").predict(x)
    torch.testing.assert_close(linearised.mean, logits, rtol=0, atol=1e-10)
    atol = RTOL * float(reference.abs().max())
    torch.testing.assert_close(linearised.cov / SCALE, reference, rtol=RTOL, atol=atol)
    independent = Streamlined(model, weight_var=scaled, activation_covariance="full").predict(x)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(independent.cov / SCALE, reference, rtol=RTOL, atol=atol)


@pytest.mark.parametrize("eager", [False, True], ids=["sdpa", "matmul_softmax"])
def test_traced_attention_ops_are_exact_to_first_order(eager: bool) -> None:
    torch.manual_seed(0)
    model = TinyEncoder(eager=eager).to(DTYPE).eval()
    ids = torch.randint(1, 11, (3, 5), generator=torch.Generator().manual_seed(1))
    ids[1, 3:] = 0  # padding, masked out as keys
    _check(model, ids, 3, model(ids))


def test_posthoc_self_attention_block_is_exact_to_first_order() -> None:
    torch.manual_seed(0)
    model = SmallViT(image_size=8, patch_size=4, dim=8, depth=2, n_heads=2, mlp_ratio=2, n_classes=3).to(DTYPE).eval()
    x = torch.randn(2, 1, 8, 8, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    _check(model, x, 2, model(x))


class TorchAttentionNet(nn.Module):
    """Tokens -> LayerNorm -> nn.MultiheadAttention (self) + residual -> mean pool -> head."""

    def __init__(self, batch_first: bool, dim: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.embed, self.norm = nn.Linear(3, dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=batch_first)
        self.head, self.batch_first = nn.Linear(dim, 3), batch_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.embed(x))
        if self.batch_first:
            a = self.attn(h, h, h, need_weights=False)[0]
        else:
            t = h.transpose(0, 1)
            a = self.attn(t, t, t, need_weights=False)[0].transpose(0, 1)
        return self.head((h + a).mean(1))


@pytest.mark.parametrize("batch_first", [True, False])
def test_torch_multihead_attention_is_exact_to_first_order(batch_first: bool) -> None:
    torch.manual_seed(0)
    model = TorchAttentionNet(batch_first).to(DTYPE).eval()
    x = torch.randn(2, 4, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    _check(model, x, 2, model(x))


class MaskedTorchAttention(nn.Module):
    """nn.MultiheadAttention self-attention with a key padding mask and a causal attn_mask (torch's semantics)."""

    def __init__(self, dim: int = 8, heads: int = 2, length: int = 5) -> None:
        super().__init__()
        self.embed, self.attn, self.head = nn.Linear(3, dim), nn.MultiheadAttention(dim, heads, batch_first=True), \
            nn.Linear(dim, 3)
        self.register_buffer("causal", torch.ones(length, length, dtype=torch.bool).triu(1))  # True: not allowed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.embed(x))
        padding = x[..., 0] > 1.0  # True: a key to ignore
        return self.head(self.attn(h, h, h, key_padding_mask=padding, attn_mask=self.causal)[0].mean(1))


def test_torch_multihead_attention_with_masks_is_exact_to_first_order() -> None:
    """Traced with torch.fx (a warning would mean the export route): the masks reach the module's own call."""
    torch.manual_seed(0)
    model = MaskedTorchAttention().to(DTYPE).eval()
    x = torch.randn(3, 5, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(2))
    x[:, 0, 0] = 0.0  # the first key is never padding, so no row is fully masked
    assert bool((x[..., 0] > 1.0).any())
    _check(model, x, 3, model(x))


def test_torch_cross_attention_names_the_fix() -> None:
    model = TorchAttentionNet(True).to(DTYPE).eval()

    class Cross(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.inner.norm(self.inner.embed(x))
            return self.inner.attn(h, torch.tanh(h), h)[0].mean(1)

    x = torch.randn(2, 4, 3, dtype=DTYPE)
    with pytest.raises(UnsupportedOpError, match="attention='independent'"):
        Streamlined(Cross(), weight_var=_variances(Cross()), activation_covariance="full",
                    attention="linearized").predict(x)


def test_linearized_attention_in_diagonal_mode_names_the_fix() -> None:
    model = TinyEncoder().to(DTYPE).eval()
    with pytest.raises(ValueError, match="activation_covariance='full'"):
        Streamlined(model, weight_var=_variances(model), attention="linearized")


def _hf(name: str) -> nn.Module:
    """One layer, width 8; weights drawn wider than HF's 0.02 so that the attention weights depend on Q and K."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if name == "bert":
        config = transformers.BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=16, max_position_embeddings=8, num_labels=3,
                                         initializer_range=0.5)
        return transformers.BertForSequenceClassification(config).to(DTYPE).eval()
    config = transformers.GPT2Config(vocab_size=20, n_embd=8, n_layer=1, n_head=2, n_positions=8, num_labels=3,
                                     pad_token_id=0, bos_token_id=1, eos_token_id=1, initializer_range=0.5)
    return transformers.GPT2ForSequenceClassification(config).to(DTYPE).eval()


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_hugging_face_attention_is_exact_to_first_order(name: str) -> None:
    inner = _hf(name)
    from streamlined.test_exported import DictArgument  # laplace-torch's documented dict wrapper

    model = DictArgument(inner)
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0
    ids = torch.randint(1, 20, (2, 5), generator=torch.Generator().manual_seed(1)) * mask
    batch = {"input_ids": ids, "attention_mask": mask}
    _check(model, batch, 2, model(batch))
