"""Transformers' Conv1D (GPT-2's projections, W stored (D_in, D_out)) under diagonal, Kronecker and full layer
posteriors, float64.

References: a GPT-2-style MLP of Conv1D layers gives the same moments as its twin of nn.Linear layers holding the
transposed weights, under the same posterior read in the Linear layout (diagonal: the variances transposed;
Kronecker: the same factor, which the KFAC structure keeps in the (D_out, D_in) layout; full: the dense covariance
with the weight's rows and columns permuted), to 1e-12, in diagonal and full mode; where the output is linear in the
random weights (one random Conv1D, everything after it linear) the full mode equals the dense J Σ Jᵀ over the
layer's [W, b] in storage order (torch.func.jacrev); and KFAC and full Laplace posteriors fitted on both twins give
the same predictive.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from posthoc import Laplace, Streamlined
from posthoc.streamlined.moments import ActivationCovariance, Moments
from posthoc.streamlined.rules import Context
from posthoc.streamlined.traced import propagate_traced, trace
from posthoc.streamlined.weight_posteriors import KronFactor, LayerPosterior, WeightPosterior

pytorch_utils = pytest.importorskip("transformers.pytorch_utils")

DTYPE = torch.float64
B, T, D, HIDDEN, C = 3, 4, 3, 5, 2


def _gpt2_mlp(seed: int = 0) -> nn.Sequential:
    """c_fc -> tanh GELU -> c_proj per token (GPT-2's MLP), then a Conv1D head; the output (B, T·C) per token."""
    torch.manual_seed(seed)
    layers = [pytorch_utils.Conv1D(HIDDEN, D), nn.GELU(approximate="tanh"), pytorch_utils.Conv1D(D, HIDDEN),
              nn.Tanh(), pytorch_utils.Conv1D(C, D)]
    for layer in layers:
        if isinstance(layer, pytorch_utils.Conv1D):
            nn.init.normal_(layer.weight, std=0.5)
            nn.init.normal_(layer.bias, std=0.1)
    return nn.Sequential(*layers, nn.Flatten()).to(DTYPE).eval()


def _linear_twin(model: nn.Sequential) -> nn.Sequential:
    """The same network with nn.Linear layers holding the transposed Conv1D weights."""
    layers: list[nn.Module] = []
    for layer in model:
        if isinstance(layer, pytorch_utils.Conv1D):
            weight = layer.weight.detach()
            linear = nn.Linear(weight.shape[0], weight.shape[1]).to(DTYPE)
            with torch.no_grad():
                linear.weight.copy_(weight.T)
                linear.bias.copy_(layer.bias)
            layers.append(linear)
        else:
            layers.append(layer)
    return nn.Sequential(*layers).eval()


def _inputs() -> torch.Tensor:
    return torch.randn(B, T, D, dtype=DTYPE, generator=torch.Generator().manual_seed(1))


def _orthogonal(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DTYPE))[0]


def _posteriors(model: nn.Sequential, structure: str, seed: int = 2
                ) -> tuple[dict[str, LayerPosterior], dict[str, LayerPosterior]]:
    """Per Conv1D layer, a posterior in storage order and the same one in the Linear twin's layout."""
    g = torch.Generator().manual_seed(seed)
    conv1d, linear = {}, {}
    for name, layer in model.named_children():
        if not isinstance(layer, pytorch_utils.Conv1D):
            continue
        d_in, d_out = layer.weight.shape
        if structure == "diag":
            w_var = 0.05 * torch.rand(d_in, d_out, generator=g, dtype=DTYPE)
            b_var = 0.05 * torch.rand(d_out, generator=g, dtype=DTYPE)
            conv1d[name] = LayerPosterior(diag={"weight": w_var, "bias": b_var})
            linear[name] = LayerPosterior(diag={"weight": w_var.T, "bias": b_var})
        elif structure == "kron":
            factors = {"weight": KronFactor(_orthogonal(d_out, g), _orthogonal(d_in, g),
                                            0.05 * torch.rand(d_out, d_in, generator=g, dtype=DTYPE)),
                       "bias": KronFactor(_orthogonal(d_out, g), None,
                                          0.05 * torch.rand(d_out, generator=g, dtype=DTYPE))}
            conv1d[name] = LayerPosterior(kron=factors)
            linear[name] = LayerPosterior(kron=dict(factors))
        else:
            size = d_in * d_out + d_out
            root = torch.randn(size, size, generator=g, dtype=DTYPE) / size
            cov = 0.05 * (root @ root.T + 0.1 * torch.eye(size, dtype=DTYPE))  # over [vec W (D_in, D_out), b]
            order = torch.cat([torch.arange(d_in * d_out).reshape(d_in, d_out).T.reshape(-1),
                               torch.arange(d_in * d_out, size)])
            conv1d[name] = LayerPosterior(full=(["weight", "bias"], cov))
            linear[name] = LayerPosterior(full=(["weight", "bias"], cov[order][:, order]))
    return conv1d, linear


def _propagate(model: nn.Module, x: torch.Tensor, layers: dict[str, LayerPosterior], mode: str) -> Moments:
    ctx = Context(ActivationCovariance(mode), WeightPosterior(model, layers, "test posterior"))
    with torch.no_grad():
        return propagate_traced(trace(model), Moments(x), ctx)


@pytest.mark.parametrize("mode", ["diagonal", "full"])
@pytest.mark.parametrize("structure", ["diag", "kron", "full"])
def test_conv1d_layers_give_the_moments_of_their_linear_twins(structure: str, mode: str) -> None:
    model = _gpt2_mlp()
    twin = _linear_twin(model)
    x = _inputs()
    conv1d_posts, linear_posts = _posteriors(model, structure)
    got, expected = _propagate(model, x, conv1d_posts, mode), _propagate(twin, x, linear_posts, mode)
    torch.testing.assert_close(got.mean, model(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(got.mean, expected.mean, rtol=0, atol=1e-12)
    if mode == "full":
        assert got.cov is not None and expected.cov is not None
        torch.testing.assert_close(got.cov, expected.cov, rtol=1e-12, atol=1e-14)
    else:
        assert got.var is not None and expected.var is not None
        torch.testing.assert_close(got.var, expected.var, rtol=1e-12, atol=1e-14)


def _dense_weight_cov(post: LayerPosterior, layer: nn.Module) -> torch.Tensor:
    """The posterior's dense covariance over [vec W, b] in the Conv1D's storage order (W (D_in, D_out))."""
    if post.full is not None:
        return post.full[1]
    if post.diag:
        return torch.diag(torch.cat([post.diag["weight"].reshape(-1), post.diag["bias"]]))
    w, b = post.kron["weight"], post.kron["bias"]
    assert w.q_in is not None
    basis = torch.kron(w.q_out, w.q_in)  # vec over (D_out, D_in): the KFAC layout
    w_cov = (basis * w.inv.reshape(-1)) @ basis.T
    d_in, d_out = layer.weight.shape
    stored = torch.arange(d_in * d_out).reshape(d_in, d_out).T.reshape(-1)  # stored entry of each (o, i) position
    to_storage = torch.empty_like(stored)
    to_storage[stored] = torch.arange(d_in * d_out)
    return torch.block_diag(w_cov[to_storage][:, to_storage], b.dense_bias_cov())


@pytest.mark.parametrize("structure", ["diag", "kron", "full"])
def test_full_mode_is_the_jacobian_sandwich_of_one_random_conv1d(structure: str) -> None:
    """c_fc fixed, c_proj random and read per token: the output is linear in c_proj's [W, b], so full mode is exact,
    the cross-token terms of the shared W included."""
    model = nn.Sequential(*list(_gpt2_mlp())[:3], nn.Flatten()).eval()
    x = _inputs()
    conv1d_posts, _ = _posteriors(_gpt2_mlp(), structure)
    post, layer = conv1d_posts["2"], model[2]
    out = _propagate(model, x, {"2": post}, "full")
    params = {n: p.detach() for n, p in model.named_parameters()}

    def output(flat: torch.Tensor) -> torch.Tensor:
        n_w = layer.weight.numel()
        values = {**params, "2.weight": flat[:n_w].reshape(layer.weight.shape), "2.bias": flat[n_w:]}
        return functional_call(model, values, (x,))

    theta = torch.cat([layer.weight.detach().reshape(-1), layer.bias.detach()])
    jac = jacrev(output)(theta)  # (B, T·D, P_layer)
    expected = jac @ _dense_weight_cov(post, layer) @ jac.transpose(1, 2)
    torch.testing.assert_close(out.mean, model(x), rtol=0, atol=1e-12)
    assert out.cov is not None
    torch.testing.assert_close(out.cov, expected, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("structure", ["kron", "full"])
def test_laplace_posteriors_of_the_twins_give_the_same_predictive(structure: str) -> None:
    """A KFAC or full Laplace fitted on the Conv1D network and on its Linear twin: the same Streamlined moments."""
    model = _gpt2_mlp()
    twin = _linear_twin(model)
    x = _inputs()
    y = torch.arange(B * T * C).reshape(B, T * C)[:, 0] % (T * C)
    preds = []
    for net in (model, twin):
        la = Laplace(net, "classification", "all", structure, prior_precision=5.0, progress=False)
        la.fit([(x, y)])
        preds.append(Streamlined(net, posterior=la, activation_covariance="full").predict(x))
    torch.testing.assert_close(preds[0].mean, preds[1].mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(preds[0].cov, preds[1].cov, rtol=1e-9, atol=1e-12)
