"""``attention="shared_value"`` on attention written with F.scaled_dot_product_attention (traced projections), float64.

The rule needs the value projection, which the traced graph gives only as a separate node: the walk attaches it to
each attention (rules/attention.py, attach_value_sources). References: the same weights in posthoc's own
MultiHeadSelfAttention (whose module rule has "shared_value") give the same moments to 1e-12, for a separate value
Linear, a fused QKV Linear split or sliced, and a fused transformers Conv1D (GPT-2's c_attn), on the fx and the
torch.export routes; with only the value projection random, its input fixed and everything after the attention
linear, diagonal mode drops no covariance under "shared_value", so the variances are diag(J Σ Jᵀ) (torch.func.jacrev)
while the independent-token rule is not; Hugging Face BERT and GPT-2 (tiny configs) give model(x) as the mean and,
with their value projections random, variances within the tolerance of the Monte Carlo comparison of
test_exported.py; a value that is no projection's output raises an error naming the fix.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev

from posthoc.models.vit import MultiHeadSelfAttention
from posthoc.streamlined import Streamlined, UnsupportedOpError
from posthoc.streamlined.moments import ActivationCovariance, Moments
from posthoc.streamlined.rules import AttentionRule, Context
from posthoc.streamlined.rules.attention import VALUE_SOURCE, attach_value_sources, attention_of_projection
from posthoc.streamlined.traced import propagate_traced, trace
from posthoc.streamlined.weight_posteriors import KronFactor, LayerPosterior, WeightPosterior

DTYPE = torch.float64
E, HEADS, C, L, B, D_IN = 6, 2, 3, 5, 3, 4
WAYS = ["separate", "fused_split", "fused_slice", "conv1d_fused"]


def _conv1d(nf: int, nx: int) -> nn.Module:
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    return pytorch_utils.Conv1D(nf, nx)


class SdpaNet(nn.Module):
    """tanh(embed(x)) -> h + out_proj(sdpa(Q, K, V)) -> head per token (``head=False``: no head); Q, K, V from
    the projections ``way``."""

    def __init__(self, way: str, causal: bool = False, head: bool = True) -> None:
        super().__init__()
        self.way, self.causal, self.with_head = way, causal, head
        self.embed = nn.Linear(D_IN, E)
        if way == "separate":
            self.q_proj, self.k_proj, self.v_proj = nn.Linear(E, E), nn.Linear(E, E), nn.Linear(E, E)
        elif way == "conv1d_fused":
            self.qkv = _conv1d(3 * E, E)
            nn.init.normal_(self.qkv.weight, std=0.4)
            nn.init.normal_(self.qkv.bias, std=0.1)
        else:
            self.qkv = nn.Linear(E, 3 * E)
        self.out_proj = nn.Linear(E, E)
        self.head = nn.Linear(E, C)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(t.shape[0], t.shape[1], HEADS, E // HEADS).transpose(1, 2)

    def attention(self, h: torch.Tensor) -> torch.Tensor:
        if self.way == "separate":
            q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        elif self.way == "fused_slice":
            qkv = self.qkv(h)
            q, k, v = qkv[..., :E], qkv[..., E:2 * E], qkv[..., 2 * E:]
        else:
            q, k, v = self.qkv(h).split(E, dim=2)
        out = F.scaled_dot_product_attention(self._heads(q), self._heads(k), self._heads(v), is_causal=self.causal)
        return self.out_proj(out.transpose(1, 2).reshape(h.shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.embed(x))
        out = h + self.attention(h)
        return (self.head(out) if self.with_head else out).flatten(1)


def _net(way: str, seed: int = 0, **kwargs) -> SdpaNet:
    torch.manual_seed(seed)
    return SdpaNet(way, **kwargs).to(DTYPE).eval()


def _inputs() -> torch.Tensor:
    return torch.randn(B, L, D_IN, dtype=DTYPE, generator=torch.Generator().manual_seed(1))


def _projections(model: SdpaNet) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(weight (E_out, E_in), bias) of q_proj, k_proj, v_proj in the Linear layout."""
    if model.way == "separate":
        return {n: (getattr(model, n).weight, getattr(model, n).bias) for n in ("q_proj", "k_proj", "v_proj")}
    weight = model.qkv.weight.T if model.way == "conv1d_fused" else model.qkv.weight
    return {n: (weight[i * E:(i + 1) * E], model.qkv.bias[i * E:(i + 1) * E])
            for i, n in enumerate(("q_proj", "k_proj", "v_proj"))}


def _value_variances(model: SdpaNet, scale: float = 1.0, seed: int = 2) -> dict[str, torch.Tensor]:
    """Variances on the value projection's weight and bias only (in the model's own parameter layout)."""
    g = torch.Generator().manual_seed(seed)
    if model.way == "separate":
        return {n: scale * (torch.rand(p.shape, generator=g, dtype=DTYPE) + 0.1)
                for n, p in model.v_proj.named_parameters(prefix="v_proj")}
    out = {n: torch.zeros_like(p) for n, p in model.qkv.named_parameters(prefix="qkv")}
    value_part = (slice(None), slice(2 * E, None)) if model.way == "conv1d_fused" else (slice(2 * E, None),)
    out["qkv.weight"][value_part] = scale * (torch.rand(out["qkv.weight"][value_part].shape, generator=g,
                                                        dtype=DTYPE) + 0.1)
    out["qkv.bias"][2 * E:] = scale * (torch.rand(E, generator=g, dtype=DTYPE) + 0.1)
    return out


class _Posthoc(nn.Module):
    """The same network with posthoc's MultiHeadSelfAttention (four Linear layers; its own "shared_value" rule)."""

    def __init__(self, source: SdpaNet) -> None:
        super().__init__()
        self.embed, self.head = source.embed, source.head
        self.attn = MultiHeadSelfAttention(E, HEADS).to(DTYPE)
        with torch.no_grad():
            for name, (weight, bias) in _projections(source).items():
                getattr(self.attn, name).weight.copy_(weight)
                getattr(self.attn, name).bias.copy_(bias)
            self.attn.out_proj.load_state_dict(source.out_proj.state_dict())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.embed(x))
        return self.head(h + self.attn(h)).flatten(1)


def _as_posthoc_variances(model: SdpaNet, variances: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {n: v for n, v in variances.items() if not n.startswith(("qkv.", "v_proj.", "out_proj."))}
    out.update({f"attn.{n}": v for n, v in variances.items() if n.startswith("out_proj.")})
    if model.way == "separate":
        out.update({f"attn.{n}": v for n, v in variances.items() if n.startswith("v_proj.")})
        return out
    weight = variances["qkv.weight"].T if model.way == "conv1d_fused" else variances["qkv.weight"]
    out["attn.v_proj.weight"], out["attn.v_proj.bias"] = weight[2 * E:], variances["qkv.bias"][2 * E:]
    return out


@pytest.mark.parametrize("graph", ["fx", "export"])
@pytest.mark.parametrize("way", WAYS)
def test_equals_posthocs_own_attention_rule(way: str, graph: str) -> None:
    """Every weight random (the query and key projections' variances unused by both rules), the input noisy too."""
    model = _net(way)
    ours = _Posthoc(model).eval()
    x = _inputs()
    g = torch.Generator().manual_seed(3)
    variances = {n: 1e-2 * torch.rand(p.shape, generator=g, dtype=DTYPE) for n, p in model.named_parameters()
                 if not n.startswith(("qkv.", "v_proj.", "q_proj.", "k_proj."))}
    variances.update(_value_variances(model, 1e-2))
    sdpa = Streamlined(model, weight_var=variances, attention="shared_value", graph=graph)
    pred = sdpa.predict(x, input_var=0.01)
    assert sdpa.graph_used is not None and sdpa.graph_used.value == graph
    own = Streamlined(ours, weight_var=_as_posthoc_variances(model, variances),
                      attention="shared_value").predict(x, input_var=0.01)
    torch.testing.assert_close(pred.mean, model(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(pred.mean, own.mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(pred.var, own.var, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("structure", ["kron", "full"])
def test_kron_and_full_value_posteriors_equal_posthocs_own_rule(structure: str) -> None:
    """A Kronecker factor or a dense covariance over [W_v, b_v] (the general weight-noise path, not the diagonal
    one): the same variances as posthoc's attention block given the same layer posterior."""
    model = _net("separate")
    ours = _Posthoc(model).eval()
    x = _inputs()
    g = torch.Generator().manual_seed(5)
    if structure == "kron":
        def orthogonal(n: int) -> torch.Tensor:
            return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DTYPE))[0]

        post = LayerPosterior(kron={"weight": KronFactor(orthogonal(E), orthogonal(E),
                                                         0.1 * torch.rand(E, E, generator=g, dtype=DTYPE)),
                                    "bias": KronFactor(orthogonal(E), None, 0.1 * torch.rand(E, generator=g,
                                                                                             dtype=DTYPE))})
    else:
        root = torch.randn(E * E + E, E * E + E, generator=g, dtype=DTYPE) / (E * E)
        post = LayerPosterior(full=(["weight", "bias"], root @ root.T + 0.01 * torch.eye(E * E + E, dtype=DTYPE)))
    state = Moments(x, var=torch.full_like(x, 0.01))
    outputs = []
    for net, name in ((model, "v_proj"), (ours, "attn.v_proj")):
        ctx = Context(ActivationCovariance.DIAGONAL, WeightPosterior(net, {name: post}, "test posterior"),
                      AttentionRule.SHARED_VALUE)
        graph_module = trace(net)
        attach_value_sources(graph_module, ctx)
        with torch.no_grad():
            outputs.append(propagate_traced(graph_module, state, ctx))
    torch.testing.assert_close(outputs[0].mean, outputs[1].mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(outputs[0].var, outputs[1].var, rtol=1e-12, atol=1e-15)


def _dense_output_cov(model: nn.Module, x: torch.Tensor, variances: dict[str, torch.Tensor]) -> torch.Tensor:
    """J diag(Σ) Jᵀ (B, D, D) over the named parameters."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    jac = jacrev(lambda ps: functional_call(model, {**params, **ps}, (x,)))({n: params[n] for n in variances})
    flat = torch.cat([jac[n].flatten(2) for n in variances], -1)  # (B, D, P)
    weights = torch.cat([variances[n].reshape(-1) for n in variances])
    return (flat * weights) @ flat.transpose(1, 2)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("way", WAYS)
def test_diagonal_mode_is_exact_with_only_the_value_projection_random(way: str, causal: bool) -> None:
    """The output h + out_proj(A V) read per token is linear in W_v and b_v (the attention weights and the
    embedding fixed), and out_proj sums value features that are independent (the rows of W_v are): "shared_value"
    keeps all of the covariance that matters (the cross-token one of the shared W_v), so diagonal mode is exact;
    the independent-token rule drops it. (A head after out_proj would mix outputs that share W_v's rows.)"""
    model = _net(way, causal=causal, head=False)
    x = _inputs()
    variances = _value_variances(model)
    expected = torch.diagonal(_dense_output_cov(model, x, variances), dim1=1, dim2=2)
    shared = Streamlined(model, weight_var=variances, attention="shared_value").predict(x)
    independent = Streamlined(model, weight_var=variances, attention="independent").predict(x)
    torch.testing.assert_close(shared.var, expected, rtol=1e-10, atol=1e-13)
    assert float((independent.var - expected).abs().max()) > 1e-3 * float(expected.abs().max())


@pytest.mark.parametrize("way", WAYS)
def test_the_prepared_graph_still_computes_the_model(way: str) -> None:
    """attach_value_sources inserts the index and source nodes and swaps in attention_of_projection: the graph's
    code, regenerated, is still the model's forward; a second call changes nothing (idempotent)."""
    model = _net(way)
    x = _inputs()
    graph_module = trace(model)
    ctx = Context(ActivationCovariance.DIAGONAL, WeightPosterior(model, {}, "none"), AttentionRule.SHARED_VALUE)
    attach_value_sources(graph_module, ctx)
    n_nodes = len(graph_module.graph.nodes)
    attach_value_sources(graph_module, ctx)
    assert len(graph_module.graph.nodes) == n_nodes
    assert any(node.target is attention_of_projection and VALUE_SOURCE in node.kwargs
               for node in graph_module.graph.nodes)
    graph_module.recompile()
    torch.testing.assert_close(graph_module(x), model(x), rtol=0, atol=1e-14)


def test_a_value_that_is_no_projection_output_names_the_fix() -> None:
    class Activated(SdpaNet):
        def attention(self, h: torch.Tensor) -> torch.Tensor:
            q, k, v = self.q_proj(h), self.k_proj(h), torch.tanh(self.v_proj(h))  # a nonlinearity on the values
            return F.scaled_dot_product_attention(self._heads(q), self._heads(k), self._heads(v)).transpose(
                1, 2).reshape(h.shape)

    torch.manual_seed(0)
    model = Activated("separate").to(DTYPE).eval()
    variances = _value_variances(model)
    with pytest.raises(UnsupportedOpError, match="attention='independent'"):
        Streamlined(model, weight_var=variances, attention="shared_value").predict(_inputs())
    Streamlined(model, weight_var=variances, attention="independent").predict(_inputs())  # the fix named works


@pytest.mark.usefixtures("float64_default")  # the models test_exported.py builds (initialised in float64)
@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_hugging_face_models_against_monte_carlo(name: str, record) -> None:
    """Tiny BERT and GPT-2 (export route; GPT-2's values are a slice of the fused Conv1D c_attn, read through an
    empty key/value cache's cat), only the value projections random: the mean is model(x). Against Monte Carlo
    (test_exported.py's 600 samples: about 6% standard error per output, 2% on the total) measured totals of 1.25
    (BERT, per output 1.01-1.56) and 1.08 (GPT-2, 0.73-1.92) with "shared_value", against 0.47 and 1.07 with the
    independent-token rule, which drops the cross-token covariance of the shared W_v (full mode, 2,000 samples:
    1.00 and 1.01). Diagonal mode still drops the covariances after the attention (the output projection mixing
    features that share W_v's rows, LayerNorm, the residual), hence bounds of [0.5, 2] per output and
    [0.8, 1.35] on the total."""
    from streamlined.test_exported import MC_SAMPLES, _batch, _build, _logits, _mc_variance

    model, inner, _ = _build(name, False)
    batch = _batch()
    g = torch.Generator().manual_seed(4)
    variances = {}
    for n, p in inner.named_parameters():
        if name == "bert" and ".attention.self.value." in n:
            variances[n] = 1e-3 * torch.rand(p.shape, generator=g, dtype=DTYPE)
        elif name == "gpt2" and ".attn.c_attn." in n:  # Conv1D (D, 3D) and bias (3D,): the value columns only
            variances[n] = 1e-3 * torch.rand(p.shape, generator=g, dtype=DTYPE)
            variances[n][..., :2 * (p.shape[-1] // 3)] = 0
    pred = Streamlined(model, weight_var=variances, graph="export", attention="shared_value").predict(batch)
    independent = Streamlined(model, weight_var=variances, graph="export").predict(batch)
    torch.testing.assert_close(pred.mean, _logits(inner, batch), rtol=1e-10, atol=1e-12)
    assert float((pred.var - independent.var).abs().max()) > 1e-3 * float(pred.var.max())  # the rule ran
    mc = _mc_variance(inner, batch, variances, MC_SAMPLES)
    ratio, total = pred.var / mc, float(pred.var.sum() / mc.sum())
    record(f"{name} shared_value / MC variance, value projections", total=total, lowest=float(ratio.min()),
           highest=float(ratio.max()), independent_total=float(independent.var.sum() / mc.sum()))
    assert bool(((ratio > 0.5) & (ratio < 2.0)).all()), ratio
    assert 0.8 < total < 1.35, total
