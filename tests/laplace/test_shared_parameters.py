"""Shared parameters (weight tying) in the diag, kron and ekfac structures, against a dense reference (float64).

A parameter read more than once per forward pass has a per-example gradient summed over its uses. The networks
share one in each way it happens in practice: (a) one module called twice, (b) two modules holding the same
Parameter, (c) an embedding tied to the output head, both with the head as ``F.linear(h, emb.weight)`` and as an
``nn.Linear`` registered before the embedding, (d) an encoder weight reused transposed by the decoder. diag must
be the exact GGN diagonal; kron/ekfac give a shared layer the exact diagonal block, and every glm covariance must
use the whole Jacobian (all uses), J Lambda^-1 J^T.

The reference Jacobian is torch.func.jacrev of the network in the flat parameter vector, with every holder of a
shared Parameter given the same slice explicitly (independent of the library's forward).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev, vmap

import posthoc
from posthoc.curvature import jacobians, kfac
from posthoc.curvature.kfac import candidate_layers, tapped_forward
from posthoc.curvature.output_factors import OutputFactors
from posthoc.laplace.structures.diag import DiagCurvature
from posthoc.laplace.structures.ekfac import EKFACCurvature
from posthoc.laplace.structures.kron import KronCurvature
from posthoc.network.subset import ParameterSubset

DTYPE = torch.float64
VOCAB, WIDTH = 7, 4


class Reused(nn.Module):
    """(a) ``hid`` is called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.hid, self.out = nn.Linear(3, 5), nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        return self.out(torch.tanh(self.hid(torch.tanh(self.hid(h)))))


class TwoHolders(nn.Module):
    """(b) ``l1`` and ``l2`` hold the same weight Parameter (their biases are their own)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.l1, self.l2, self.out = nn.Linear(3, 5), nn.Linear(5, 5), nn.Linear(5, 5), nn.Linear(5, 3)
        self.l2.weight = self.l1.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        return self.out(torch.tanh(self.l2(torch.tanh(self.l1(h)))))


class TiedHead(nn.Module):
    """(c) token embedding reused as the output head, ``F.linear(h, emb.weight)``; inputs (B, 3) token ids."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, WIDTH)
        self.mix = nn.Linear(WIDTH, WIDTH)
        self.head_bias = nn.Parameter(torch.zeros(VOCAB))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.mix(self.emb(tokens).mean(1)))
        return F.linear(h, self.emb.weight, self.head_bias)


class TiedLinearHead(nn.Module):
    """(c') the head is an ``nn.Linear`` registered first, so the shared weight's block belongs to it."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(WIDTH, VOCAB)
        self.mix = nn.Linear(WIDTH, WIDTH)
        self.emb = nn.Embedding(VOCAB, WIDTH)
        self.emb.weight = self.head.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.emb(tokens).mean(1))))


class TiedAutoencoder(nn.Module):
    """(d) the decoder reuses the encoder weight transposed, ``F.linear(h, enc.weight.T)``."""

    def __init__(self) -> None:
        super().__init__()
        self.enc, self.out = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.enc(x))
        return self.out(torch.tanh(F.linear(h, self.enc.weight.T)))


# model, input kind, the layers that read a covered parameter more than once (kron's expected diagonal blocks)
MODELS = {
    "called_twice": (Reused, "features", ["hid.weight", "hid.bias"]),
    "two_holders": (TwoHolders, "features", ["l1.weight", "l1.bias"]),
    "tied_head": (TiedHead, "tokens", ["head_bias", "emb.weight"]),  # no supported layer: diagonal anyway
    "tied_linear_head": (TiedLinearHead, "tokens", ["head.weight", "head.bias"]),
    "tied_transposed": (TiedAutoencoder, "features", ["enc.weight", "enc.bias"]),
}
SHARED_USES = {  # parameter -> reads per forward, the rest are read once
    "called_twice": {"hid.weight": 2, "hid.bias": 2},
    "two_holders": {"l1.weight": 2},
    "tied_head": {"emb.weight": 2},
    "tied_linear_head": {"head.weight": 2},
    "tied_transposed": {"enc.weight": 2},
}
CURVATURES = ["ggn", "ef", "ggn_mc"]


def _problem(name: str, n: int = 12) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    cls, inputs, _ = MODELS[name]
    torch.manual_seed(0)
    model = cls().to(DTYPE)
    with torch.no_grad():  # away from the zero-bias initialisation, so every entry has curvature
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    if inputs == "tokens":
        x = torch.randint(0, VOCAB, (n, 3), generator=g)
    else:
        x = torch.randn(n, model.inp.in_features if hasattr(model, "inp") else 4, generator=g, dtype=DTYPE)
    with torch.no_grad():
        n_out = model(x[:1]).shape[-1]
    return model, x, torch.randint(0, n_out, (n,), generator=g)


def _batches(x: torch.Tensor, y: torch.Tensor, batch: int = 7):
    return lambda: iter([(x[i:i + batch], y[i:i + batch]) for i in range(0, len(x), batch)])


def _reference_jacobians(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, C, P) by jacrev in the flat vector of the distinct parameters, each holder given its slice."""
    distinct = list(model.parameters())
    holders = list(model.named_parameters(remove_duplicate=False))

    def f(theta: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
        views, offset = [], 0
        for p in distinct:
            views.append(theta[offset:offset + p.numel()].view(p.shape))
            offset += p.numel()
        params = {name: views[next(k for k, q in enumerate(distinct) if q is p)] for name, p in holders}
        return functional_call(model, params, (xi.unsqueeze(0),), tie_weights=False).squeeze(0)

    theta = torch.cat([p.detach().reshape(-1) for p in distinct])
    return vmap(jacrev(f), in_dims=(None, 0))(theta, x)


def _reference_curvature(model: nn.Module, x: torch.Tensor, y: torch.Tensor, curvature: str) -> torch.Tensor:
    """Dense sum_n J_n^T H_n J_n (P, P): the softmax Hessian for ggn; for ef and ggn_mc the factors S_n S_n^T of a
    fresh OutputFactors with the library's default seed, drawn over the same batches in the same order."""
    jac = _reference_jacobians(model, x)
    with torch.no_grad():
        logits = model(x)
    if curvature == "ggn":
        p = torch.softmax(logits, -1)
        hess = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    else:
        factors = OutputFactors("classification", curvature)
        s = torch.cat([factors(logits[i:i + 7], y[i:i + 7]) for i in range(0, len(x), 7)])
        hess = s @ s.mT
    return torch.einsum("bcp,bcd,bdq->pq", jac, hess, jac)


def _positions(subset: ParameterSubset, blocks: list[int]) -> torch.Tensor:
    return torch.cat([torch.arange(subset.blocks[i].offset, subset.blocks[i].offset + subset.blocks[i].numel)
                      for i in blocks])


@pytest.mark.parametrize("name", MODELS)
def test_parameter_uses_counts_every_read(name):
    model, x, _ = _problem(name)
    subset = ParameterSubset(model, "all")
    expected = [SHARED_USES[name].get(block.name, 1) for block in subset.blocks]
    assert jacobians.parameter_uses(subset, x[:1]) == expected


@pytest.mark.parametrize("curvature", CURVATURES)
@pytest.mark.parametrize("name", MODELS)
def test_diag_is_the_exact_diagonal(name, curvature):
    model, x, y = _problem(name)
    subset = ParameterSubset(model, "all")
    reference = _reference_curvature(model, x, y, curvature)
    # the reference vector is the subset's theta (same parameters, same order)
    torch.testing.assert_close(subset.theta_map, torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    fitted = DiagCurvature.fit(subset, _batches(x, y), OutputFactors("classification", curvature), progress=False)
    torch.testing.assert_close(fitted.diagonal, torch.diagonal(reference), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", MODELS)
def test_diag_glm_covariance_uses_every_use(name):
    model, x, y = _problem(name)
    subset = ParameterSubset(model, "all")
    fitted = DiagCurvature.fit(subset, _batches(x, y), OutputFactors("classification"), progress=False)
    prior = 0.3 + torch.rand(subset.n_params, generator=torch.Generator().manual_seed(5), dtype=DTYPE)
    scale = torch.tensor(1.3, dtype=DTYPE)
    jac = _reference_jacobians(model, x[:5])
    h = torch.diagonal(_reference_curvature(model, x, y, "ggn"))
    expected = (jac / (scale * h + prior)) @ jac.mT
    torch.testing.assert_close(fitted.functional_covariance(x[:5], prior, scale), expected, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("curvature", CURVATURES)
@pytest.mark.parametrize("cls", [KronCurvature, EKFACCurvature])
@pytest.mark.parametrize("name", MODELS)
def test_kron_gives_shared_layers_the_exact_diagonal(name, cls, curvature):
    model, x, y = _problem(name)
    subset = ParameterSubset(model, "all")
    fitted = cls.fit(subset, _batches(x, y), OutputFactors("classification", curvature), progress=False)
    assert [subset.blocks[i].name for i in fitted.fallback] == MODELS[name][2]
    positions = _positions(subset, fitted.fallback)
    reference = _reference_curvature(model, x, y, curvature)
    torch.testing.assert_close(fitted.fallback_diag, torch.diagonal(reference)[positions], rtol=1e-10, atol=1e-12)

    prior = torch.linspace(0.4, 1.5, len(subset.blocks), dtype=DTYPE)
    scale = torch.tensor(1.3, dtype=DTYPE)
    precision = fitted.dense_precision(prior, scale)
    block_prior = prior[torch.repeat_interleave(torch.arange(len(subset.blocks)),
                                                torch.tensor([b.numel for b in subset.blocks]))]
    rows = precision[positions]
    torch.testing.assert_close(rows, torch.diag(scale * torch.diagonal(reference) + block_prior)[positions],
                               rtol=1e-10, atol=1e-12)
    # the glm covariance sees every use of a shared parameter: J Lambda^-1 J^T with the reference J
    jac = _reference_jacobians(model, x[:5])
    expected = jac @ torch.linalg.solve(precision, jac.mT)
    torch.testing.assert_close(fitted.functional_covariance(x[:5], prior, scale), expected,
                               rtol=1e-8, atol=1e-12 * float(expected.abs().max()))


def test_tapped_forward_refuses_a_layer_called_twice():
    model, x, _ = _problem("called_twice")
    subset = ParameterSubset(model, "all")
    reused = [layer for layer in candidate_layers(subset) if layer.name == "hid"]
    with pytest.raises(RuntimeError, match="'hid' was called more than once"):
        tapped_forward(subset, reused, x)


@pytest.mark.parametrize("structure", ["diag", "kron"])
def test_laplace_glm_variance_with_tied_weights(structure):
    """End to end: the glm predictive variance of Laplace on a transposed tied weight equals the dense reference."""
    model, x, y = _problem("tied_transposed")
    la = posthoc.Laplace(model, "classification", subset_of_weights="all", hessian_structure=structure,
                         prior_precision=0.5)  # exact in float32 too
    la.fit([(x[i:i + 7], y[i:i + 7]) for i in range(0, len(x), 7)])
    jac = _reference_jacobians(model, x[:5])
    if structure == "diag":
        precision = torch.diag(torch.diagonal(_reference_curvature(model, x, y, "ggn")) + 0.5)
    else:
        precision = la.structure.dense_precision(la.prior_precision, torch.tensor(1.0, dtype=DTYPE))
    expected = torch.diagonal(jac @ torch.linalg.solve(precision, jac.mT), dim1=1, dim2=2)
    pred = la.predict(x[:5], pred_type="glm")
    torch.testing.assert_close(torch.diagonal(pred.cov, dim1=1, dim2=2), expected, rtol=1e-8, atol=1e-14)


def test_kron_predictive_refuses_a_kronecker_block_of_a_shared_weight(monkeypatch):
    """A kron fit that treated a shared weight as one use (as before shared parameters were detected, e.g. from an
    old state dict) is refused at prediction instead of returning a variance that misses part of the Jacobian."""
    model, x, y = _problem("two_holders")
    subset = ParameterSubset(model, "all")
    with monkeypatch.context() as patch:
        patch.setattr(kfac, "parameter_uses", lambda subset, inputs: [1] * len(subset.blocks))
        fitted = KronCurvature.fit(subset, _batches(x, y), OutputFactors("classification"), progress=False)
    assert fitted.fallback == []
    restored = KronCurvature.from_state_dict(subset, fitted.state_dict())
    with pytest.raises(ValueError, match=r"'l1.weight': 2"):
        restored.functional_covariance(x[:3], torch.tensor([1.0], dtype=DTYPE), torch.tensor(1.0, dtype=DTYPE))
