"""Streamlined through torch's nn.MultiheadAttention (rules/multihead.py), float64.

References: the propagated mean is model(x) (batch_first True and False, with and without a key_padding_mask,
cross-attention with kdim/vdim); where the propagation is exact (a posterior only on the value rows of in_proj_weight
/ in_proj_bias or only on out_proj, every other weight fixed, so the output is linear in the random weights), the
output covariance equals the dense J Σ Jᵀ over those weights (torch.func.jacrev), in full mode for diagonal,
Kronecker and full layer posteriors and in diagonal mode where the dropped covariances are zero; the same numbers as
posthoc's own MultiHeadSelfAttention rule on the same weights; Monte Carlo of a small diagonal posterior.
"""

from __future__ import annotations

import pytest
import torch
from streamlined.mc import mc_moments, mean_field_sampler, total_ratio
from torch import nn
from torch.func import functional_call, jacrev

from posthoc.models.vit import MultiHeadSelfAttention
from posthoc.streamlined import Streamlined, UnsupportedLayerError, UnsupportedOpError
from posthoc.streamlined.moments import ActivationCovariance, Moments
from posthoc.streamlined.rules import AttentionRule, Context
from posthoc.streamlined.traced import propagate_traced, trace
from posthoc.streamlined.weight_posteriors import KronFactor, LayerPosterior, WeightPosterior

DTYPE = torch.float64
E, HEADS, C, L, B, D_IN = 6, 2, 3, 5, 3, 4


class AttentionNet(nn.Module):
    """tanh(embed(x)) -> h + attention(h) -> head, read per token (flattened) or averaged over tokens; with
    ``pool="attention"`` the output is h + attention(h) per token (no head)."""

    def __init__(self, batch_first: bool = True, pool: str = "flatten", **attention_kwargs) -> None:
        super().__init__()
        self.embed = nn.Linear(D_IN, E)
        self.attn = nn.MultiheadAttention(E, HEADS, batch_first=batch_first, **attention_kwargs)
        self.head = nn.Linear(E, C)
        self.batch_first, self.pool = batch_first, pool

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = torch.tanh(self.embed(x))
        if self.batch_first:
            out, _ = self.attn(h, h, h, key_padding_mask=key_padding_mask, need_weights=False)
        else:  # the (L, N, E) layout: the traced walk folds these transposes into the call
            t = h.transpose(0, 1)
            out = self.attn(t, t, t, key_padding_mask=key_padding_mask, need_weights=False)[0].transpose(0, 1)
        if self.pool == "attention":
            return (h + out).flatten(1)
        y = self.head(h + out)
        return y.flatten(1) if self.pool == "flatten" else y.mean(1)


def _net(seed: int = 0, **kwargs) -> AttentionNet:
    torch.manual_seed(seed)
    return AttentionNet(**kwargs).to(DTYPE).eval()


def _inputs(masked: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    x = torch.randn(B, L, D_IN, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    if not masked:
        return x, None
    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[0, 3:], mask[2, 1] = True, True  # padded keys; every query keeps at least one key
    return x, mask


def _batch(x: torch.Tensor, mask: torch.Tensor | None) -> object:
    return x if mask is None else {"x": x, "key_padding_mask": mask}


def _value_rows() -> slice:
    return slice(2 * E, 3 * E)


def _random_variances(model: nn.Module, names: list[str], scale: float = 1.0, seed: int = 2
                      ) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    return {n: scale * (torch.rand(params[n].shape, generator=g, dtype=DTYPE) + 0.1) for n in names}


def _value_only(variances: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Zero the query and key rows of in_proj_weight / in_proj_bias (the rule takes Q and K from the mean)."""
    out = dict(variances)
    for name in ("attn.in_proj_weight", "attn.in_proj_bias"):
        if name in out:
            out[name] = out[name].clone()
            out[name][:2 * E] = 0
    return out


def _dense_output_cov(model: nn.Module, inputs: tuple, covariances: dict[str, torch.Tensor],
                      joint: list[str] | None = None) -> torch.Tensor:
    """J Σ Jᵀ (B, D, D) over the named parameters' flattened entries; ``covariances`` name -> (P_n, P_n) blocks, or
    one (ΣP, ΣP) matrix under the key "joint" over the parameters ``joint`` in order."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    names = joint if joint is not None else list(covariances)

    def output(flat: dict[str, torch.Tensor]) -> torch.Tensor:
        values = {**params, **{n: flat[n].reshape(params[n].shape) for n in names}}
        return functional_call(model, values, inputs)

    jac = jacrev(output)({n: params[n].reshape(-1) for n in names})
    jac_all = torch.cat([jac[n] for n in names], dim=-1)  # (B, D, ΣP)
    if joint is not None:
        cov = covariances["joint"]
    else:
        cov = torch.block_diag(*(covariances[n] for n in names))
    return torch.einsum("bip,pq,bjq->bij", jac_all, cov, jac_all)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("mode", ["diagonal", "full"])
def test_mean_is_the_model_output(batch_first: bool, masked: bool, mode: str) -> None:
    model = _net(batch_first=batch_first)
    x, mask = _inputs(masked)
    variances = _random_variances(model, [n for n, _ in model.named_parameters()], scale=1e-3)
    pred = Streamlined(model, weight_var=variances, activation_covariance=mode).predict(_batch(x, mask))
    torch.testing.assert_close(pred.mean, model(x, mask), rtol=0, atol=1e-10)
    assert torch.isfinite(pred.var).all() and (pred.var > 0).all()


def test_cross_attention_with_other_key_and_value_widths() -> None:
    """kdim/vdim differ from E (separate q/k/v_proj_weight): the value projection is v_proj_weight."""

    class Cross(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.query, self.memory = nn.Linear(D_IN, E), nn.Linear(D_IN, 5)
            self.attn = nn.MultiheadAttention(E, HEADS, batch_first=True, kdim=5, vdim=5)

            self.residual = False

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            memory, query = torch.tanh(self.memory(x)), self.query(x)
            out = self.attn(query, memory, memory, need_weights=False)[0]
            return (out + query if self.residual else out).flatten(1)

    torch.manual_seed(0)
    model = Cross().to(DTYPE).eval()
    x, _ = _inputs(False)
    variances = _random_variances(model, ["attn.v_proj_weight", "attn.in_proj_bias"])
    variances["attn.in_proj_bias"][:2 * E] = 0
    pred = Streamlined(model, weight_var=variances, activation_covariance="full").predict(x)
    torch.testing.assert_close(pred.mean, model(x), rtol=0, atol=1e-10)
    expected = _dense_output_cov(model, (x,), {n: torch.diag(v.reshape(-1)) for n, v in variances.items()})
    torch.testing.assert_close(pred.cov, expected, rtol=1e-10, atol=1e-13)
    # a random query (taken from its mean) and a fixed memory: the same (diagonal mode exact with "shared_value")
    with_query = {**variances, **_random_variances(model, ["query.weight"], seed=3)}
    for mode in ("diagonal", "full"):
        pred = Streamlined(model, weight_var=with_query, activation_covariance=mode,
                           attention="shared_value" if mode == "diagonal" else "independent").predict(x)
        torch.testing.assert_close(pred.cov if mode == "full" else pred.var,
                                   expected if mode == "full" else torch.diagonal(expected, dim1=1, dim2=2),
                                   rtol=1e-10, atol=1e-13)
    # full mode, the random query also read after the call (a residual): the output of a fixed value is independent
    # of it, so the covariances add
    model.residual = True
    query_only = {"query.weight": with_query["query.weight"]}
    joint, parts = (Streamlined(model, weight_var=v, activation_covariance="full").predict(x).cov
                    for v in (with_query, query_only))
    torch.testing.assert_close(joint, parts + expected, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("random_part", ["value_rows", "out_proj"])
def test_full_mode_is_the_jacobian_sandwich_of_a_diagonal_posterior(batch_first: bool, masked: bool,
                                                                     random_part: str) -> None:
    """Only the value rows or only out_proj random: the output is linear in them, full mode is exact."""
    model = _net(batch_first=batch_first)
    x, mask = _inputs(masked)
    names = ["attn.in_proj_weight", "attn.in_proj_bias"] if random_part == "value_rows" else \
        ["attn.out_proj.weight", "attn.out_proj.bias"]
    variances = _value_only(_random_variances(model, names))
    pred = Streamlined(model, weight_var=variances, activation_covariance="full").predict(_batch(x, mask))
    expected = _dense_output_cov(model, (x, mask), {n: torch.diag(v.reshape(-1)) for n, v in variances.items()})
    torch.testing.assert_close(pred.cov, expected, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("random_part,attention", [("value_rows", "shared_value"), ("out_proj", "independent")])
def test_diagonal_mode_is_exact_where_no_covariance_is_dropped(random_part: str, attention: str) -> None:
    """Diagonal mode, the attention output read per token: the value rows with ``attention="shared_value"`` (the
    cross-token covariance of the shared W_v kept; rows of W_v independent) and out_proj alone with the authors'
    rule (its rows independent, the mixing before it fixed) drop no covariance: the variances are diag(J Σ Jᵀ)."""
    model = _net(pool="attention")
    x, mask = _inputs(True)
    names = ["attn.in_proj_weight", "attn.in_proj_bias"] if random_part == "value_rows" else \
        ["attn.out_proj.weight", "attn.out_proj.bias"]
    variances = _value_only(_random_variances(model, names))
    pred = Streamlined(model, weight_var=variances, attention=attention).predict(_batch(x, mask))
    expected = _dense_output_cov(model, (x, mask), {n: torch.diag(v.reshape(-1)) for n, v in variances.items()})
    torch.testing.assert_close(pred.var, torch.diagonal(expected, dim1=1, dim2=2), rtol=1e-10, atol=1e-13)


def _kron_factor(n_out: int, n_in: int | None, seed: int) -> KronFactor:
    g = torch.Generator().manual_seed(seed)
    q_out = torch.linalg.qr(torch.randn(n_out, n_out, generator=g, dtype=DTYPE))[0]
    q_in = None if n_in is None else torch.linalg.qr(torch.randn(n_in, n_in, generator=g, dtype=DTYPE))[0]
    inv = torch.rand(n_out, *(() if n_in is None else (n_in,)), generator=g, dtype=DTYPE) + 0.1
    return KronFactor(q_out, q_in, inv)


def _kron_cov(factor: KronFactor) -> torch.Tensor:
    if factor.q_in is None:
        return factor.dense_bias_cov()
    basis = torch.kron(factor.q_out, factor.q_in)
    return (basis * factor.inv.reshape(-1)) @ basis.T


def _propagate(model: nn.Module, x: torch.Tensor, mask: torch.Tensor | None, layers: dict[str, LayerPosterior],
               mode: ActivationCovariance) -> Moments:
    ctx = Context(mode, WeightPosterior(model, layers, "test posterior"), AttentionRule.INDEPENDENT)
    inputs = ((Moments(x),), {} if mask is None else {"key_padding_mask": mask})
    with torch.no_grad():
        return propagate_traced(trace(model), inputs, ctx)


@pytest.mark.parametrize("structure", ["kron", "full"])
@pytest.mark.parametrize("layer", ["attn", "attn.out_proj"])
def test_kron_and_full_layer_posteriors_are_the_jacobian_sandwich(structure: str, layer: str) -> None:
    """A Kronecker factor over the whole (3E, E) in_proj_weight (its value rows: rows of the output basis) or a
    dense covariance over [in_proj_weight, in_proj_bias] (its value block), and the same forms on out_proj."""
    model = _net()
    x, mask = _inputs(True)
    attrs = ["in_proj_weight", "in_proj_bias"] if layer == "attn" else ["weight", "bias"]
    names = [f"{layer}.{a}" for a in attrs]
    params = dict(model.named_parameters())
    rows = _value_rows() if layer == "attn" else slice(None)
    keep = []  # the entries of each parameter the rule propagates (the value rows of in_proj)
    for n in names:
        positions = torch.arange(params[n].numel()).reshape(params[n].shape)
        keep.append(positions[rows].reshape(-1))
    if structure == "kron":
        n_out, n_in = params[names[0]].shape
        factors = {attrs[0]: _kron_factor(n_out, n_in, 3), attrs[1]: _kron_factor(n_out, None, 4)}
        post = LayerPosterior(kron=factors)
        blocks = [_kron_cov(factors[a]) for a in attrs]
        cov = torch.block_diag(*blocks)
    else:
        size = sum(params[n].numel() for n in names)
        root = torch.randn(size, size, dtype=DTYPE, generator=torch.Generator().manual_seed(5)) / size
        cov = root @ root.T + 0.05 * torch.eye(size, dtype=DTYPE)
        post = LayerPosterior(full=(attrs, cov))
    offsets = [0, params[names[0]].numel()]
    index = torch.cat([offset + k for offset, k in zip(offsets, keep, strict=True)])
    dropped = torch.ones(cov.shape[0], dtype=torch.bool)
    dropped[index] = False
    reference_cov = cov.clone()
    reference_cov[dropped] = 0
    reference_cov[:, dropped] = 0  # the query and key rows are taken from the mean
    out = _propagate(model, x, mask, {layer: post}, ActivationCovariance.FULL)
    expected = _dense_output_cov(model, (x, mask), {"joint": reference_cov}, joint=names)
    torch.testing.assert_close(out.mean, model(x, mask), rtol=0, atol=1e-10)
    torch.testing.assert_close(out.cov, expected, rtol=1e-10, atol=1e-13)


class _PosthocAttentionNet(nn.Module):
    def __init__(self, source: AttentionNet) -> None:
        super().__init__()
        self.embed, self.head = source.embed, source.head
        self.attn = MultiHeadSelfAttention(E, HEADS).to(DTYPE)
        weight, bias = source.attn.in_proj_weight.detach(), source.attn.in_proj_bias.detach()
        with torch.no_grad():
            for i, proj in enumerate((self.attn.q_proj, self.attn.k_proj, self.attn.v_proj)):
                proj.weight.copy_(weight[i * E:(i + 1) * E])
                proj.bias.copy_(bias[i * E:(i + 1) * E])
            self.attn.out_proj.load_state_dict(source.attn.out_proj.state_dict())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.embed(x))
        return self.head(h + self.attn(h)).flatten(1)


@pytest.mark.parametrize("mode,attention", [("diagonal", "independent"), ("diagonal", "shared_value"),
                                            ("full", "independent")])
def test_equals_posthocs_own_attention_rule(mode: str, attention: str) -> None:
    """The same weights and variances in posthoc's MultiHeadSelfAttention (four Linear layers): the same moments."""
    model = _net()
    ours = _PosthocAttentionNet(model).eval()
    x, _ = _inputs(False)
    variances = _random_variances(model, [n for n, _ in model.named_parameters()], scale=1e-2)
    mapped = {n: v for n, v in variances.items() if not n.startswith("attn.")}
    for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
        mapped[f"attn.{proj}.weight"] = variances["attn.in_proj_weight"][i * E:(i + 1) * E]
        mapped[f"attn.{proj}.bias"] = variances["attn.in_proj_bias"][i * E:(i + 1) * E]
    mapped["attn.out_proj.weight"] = variances["attn.out_proj.weight"]
    mapped["attn.out_proj.bias"] = variances["attn.out_proj.bias"]
    torch_pred = Streamlined(model, weight_var=variances, activation_covariance=mode, attention=attention).predict(x)
    own_pred = Streamlined(ours, weight_var=mapped, activation_covariance=mode, attention=attention).predict(x)
    torch.testing.assert_close(torch_pred.mean, own_pred.mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(torch_pred.cov, own_pred.cov, rtol=1e-10, atol=1e-14)


def test_laplace_posteriors_on_the_model() -> None:
    """A diag, KFAC and full Laplace over all weights: posthoc's per-layer view of MHA's parameters is read (the
    KFAC Laplace gives them diagonal blocks: torch's MHA calls its projections functionally)."""
    from posthoc import Laplace

    model = _net(pool="mean")
    x, mask = _inputs(False)
    y = torch.arange(B) % C
    for structure in ("diag", "kron", "full"):
        la = Laplace(model, "classification", "all", structure, prior_precision=10.0, progress=False)
        la.fit([(x, y)])
        pred = Streamlined(model, posterior=la).predict(x)
        torch.testing.assert_close(pred.mean, model(x), rtol=0, atol=1e-10)
        assert torch.isfinite(pred.var).all() and (pred.var > 0).all()
        if structure == "diag":  # the view's (3E, E) in_proj_weight and out_proj blocks, read as the named variances
            variance = la.posterior_variance()
            named = {block.name: variance[block.slice].reshape(block.shape) for block in la.subset.blocks}
            assert {"attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight"} <= set(named)
            by_name = Streamlined(model, weight_var=named).predict(x)
            torch.testing.assert_close(pred.cov, by_name.cov, rtol=1e-12, atol=0)


def test_diagonal_mode_against_monte_carlo(record) -> None:
    """A small diagonal posterior on every weight but the query and key rows (which the rule takes from the mean),
    outputs read per token: full mode is Monte Carlo to first order in the variances (the attention weights'
    dependence on the random embedding is the only linearisation; measured 0.999, MC standard error 0.4%); diagonal
    mode drops the covariance between the units the head mixes and the residual's branch/skip covariance (measured
    0.986 with the authors' rule, 1.017 with "shared_value"): within 10%. (Averaged over tokens instead, diagonal
    mode also drops the cross-token covariance of the shared weights before the mean: 0.32 measured, the pooling
    rule's gap, not attention's.)"""
    model = _net(pool="flatten")
    x, _ = _inputs(False)
    variances = _value_only(_random_variances(model, [n for n, _ in model.named_parameters()], scale=1e-4))
    mc = mc_moments(model, x, mean_field_sampler(model, variances), n_samples=20_000)
    ratios = {}
    for mode in ("diagonal", "full"):
        for attention in ("independent", "shared_value") if mode == "diagonal" else ("independent",):
            pred = Streamlined(model, weight_var=variances, activation_covariance=mode,
                               attention=attention).predict(x)
            ratios[f"{mode}_{attention}"] = total_ratio(pred.var, mc)
    record("nn.MultiheadAttention: streamlined / MC summed variance", mc_rel_se=mc.total_var_se_rel, **ratios)
    assert abs(ratios["full_independent"] - 1) < 4 * mc.total_var_se_rel + 0.01
    assert 0.9 < ratios["diagonal_independent"] < 1.1
    assert 0.9 < ratios["diagonal_shared_value"] < 1.1


def test_unsupported_options_are_named() -> None:
    x, _ = _inputs(False)
    for option in ({"add_bias_kv": True}, {"add_zero_attn": True}):
        model = _net(**option)
        with pytest.raises(UnsupportedLayerError, match=next(iter(option))):
            Streamlined(model, weight_var={}).predict(x)

    class ReadsWeights(AttentionNet):
        def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
            h = torch.tanh(self.embed(x))
            out, weights = self.attn(h, h, h)
            return self.head(out).flatten(1) + weights.sum()

    class NoTranspose(AttentionNet):
        def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
            h = torch.tanh(self.embed(x))
            return self.head(self.attn(h, h, h)[0]).flatten(1)

    class RandomMask(AttentionNet):
        def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
            h = torch.tanh(self.embed(x))
            return self.head(self.attn(h, h, h, key_padding_mask=h[..., 0])[0]).flatten(1)

    torch.manual_seed(0)
    cases = [(ReadsWeights(), "attention weights"), (NoTranspose(batch_first=False), "batch_first=False"),
             (RandomMask(), "random key_padding_mask")]
    for model, message in cases:
        model = model.to(DTYPE).eval()
        variances = _random_variances(model, ["embed.weight"])
        with pytest.raises(UnsupportedOpError, match=message):
            Streamlined(model, weight_var=variances).predict(x)


class MaskedAttentionNet(AttentionNet):
    """AttentionNet whose call also takes an attn_mask: ``"causal"`` a boolean (L, L) mask made in the forward (True
    blocks), ``"additive"`` a float (L, L) buffer added to the scores; with ``cross`` a key/value other than the
    query (a second embedding of x)."""

    def __init__(self, attn_mask: str | None, cross: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.memory = nn.Linear(D_IN, E) if cross else None
        self.attn_mask_kind = attn_mask
        self.register_buffer("additive", torch.randn(L, L, generator=torch.Generator().manual_seed(7)))

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = torch.tanh(self.embed(x))
        memory = h if self.memory is None else torch.tanh(self.memory(x))
        attn_mask = None
        if self.attn_mask_kind == "causal":
            attn_mask = torch.ones(L, L, dtype=torch.bool, device=x.device).triu(1)
        elif self.attn_mask_kind == "additive":
            attn_mask = self.additive
        if self.batch_first:
            out = self.attn(h, memory, memory, key_padding_mask=key_padding_mask, attn_mask=attn_mask)[0]
        else:
            t, m = h.transpose(0, 1), memory.transpose(0, 1)
            out = self.attn(t, m, m, key_padding_mask=key_padding_mask, attn_mask=attn_mask)[0].transpose(0, 1)
        return self.head(h + out).flatten(1)


@pytest.mark.parametrize("batch_first,padding,attn_mask,cross,mode", [
    (True, True, None, False, "diagonal"), (False, True, None, False, "full"),
    (True, False, "additive", False, "full"), (False, False, "additive", True, "diagonal"),
    (True, True, "causal", False, "diagonal"), (True, True, "causal", True, "full"),
    (False, True, "causal", True, "full"), (False, True, "causal", False, "diagonal")])
def test_export_route_equals_fx_with_masks(batch_first: bool, padding: bool, attn_mask: str | None, cross: bool,
                                           mode: str) -> None:
    """torch.export keeps nn.MultiheadAttention's call signature, so its call is folded whole (query, key, value,
    key_padding_mask, attn_mask; batch_first=False: the transposes around it too): the numbers of the fx route."""
    torch.manual_seed(0)
    model = MaskedAttentionNet(attn_mask, cross=cross, batch_first=batch_first).to(DTYPE).eval()
    x, mask = _inputs(padding)
    names = [n for n, _ in model.named_parameters()]
    variances = _random_variances(model, names, scale=1e-3)
    fx_pred = Streamlined(model, weight_var=variances, graph="fx", activation_covariance=mode).predict(_batch(x, mask))
    export_sp = Streamlined(model, weight_var=variances, graph="export", activation_covariance=mode)
    export_pred = export_sp.predict(_batch(x, mask))
    assert export_sp.graph_used is not None and export_sp.graph_used.value == "export"
    torch.testing.assert_close(export_pred.mean, model(x, mask), rtol=0, atol=1e-10)
    torch.testing.assert_close(export_pred.mean, fx_pred.mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(export_pred.cov, fx_pred.cov, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("batch_first", [True, False])
def test_export_route_takes_self_attention(batch_first: bool) -> None:
    """Without masks, and the attention weights read after the call refused as on the fx route."""
    model = _net(batch_first=batch_first)
    x, _ = _inputs(False)
    variances = _random_variances(model, [n for n, _ in model.named_parameters()], scale=1e-3)
    fx_pred = Streamlined(model, weight_var=variances, graph="fx").predict(x)
    export_pred = Streamlined(model, weight_var=variances, graph="export").predict(x)
    torch.testing.assert_close(export_pred.mean, fx_pred.mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(export_pred.var, fx_pred.var, rtol=1e-10, atol=1e-14)

    class ReadsWeights(AttentionNet):
        def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
            h = torch.tanh(self.embed(x))
            out, weights = self.attn(h, h, h)
            return self.head(out).flatten(1) + weights.sum((1, 2)).unsqueeze(1)

    torch.manual_seed(0)
    reads = ReadsWeights().to(DTYPE).eval()
    with pytest.raises(UnsupportedOpError, match="attention weights"):
        Streamlined(reads, weight_var=_random_variances(reads, ["embed.weight"]), graph="export").predict(x)


@pytest.mark.parametrize("options,cross", [({}, False), ({}, True), ({"bias": False}, False),
                                           ({"kdim": 5, "vdim": 7}, True)])
@pytest.mark.parametrize("batch_first", [True, False])
def test_unmasked_attention_weights_are_the_modules(options: dict, cross: bool, batch_first: bool) -> None:
    # without masks the rule computes the weights from the query and key projections alone: they must be the
    # module's own (float64), whatever its layout, bias and projection weights (fused or separate)
    from posthoc.streamlined.rules.multihead import _unmasked_weights

    torch.manual_seed(0)
    module = nn.MultiheadAttention(12, 3, batch_first=batch_first, **options).double().eval()
    query = torch.randn(4, 6, 12, dtype=torch.float64)
    key = torch.randn(4, 9, options.get("kdim", 12), dtype=torch.float64) if cross else query
    value = torch.randn(4, 9, options.get("vdim", 12), dtype=torch.float64) if cross else query
    inputs = (query, key, value) if batch_first else tuple(t.transpose(0, 1) for t in (query, key, value))
    _, expected = module(*inputs, need_weights=True, average_attn_weights=False)
    torch.testing.assert_close(_unmasked_weights(module, query, key), expected, rtol=1e-14, atol=1e-14)
