"""The diagonal fallback's memory and factor eigendecompositions that survive failures.

Memory: the fallback's per-example gradients used to be taken through a full-length theta, so every example and
output column held a P-vector (B·K·P: what killed all-weights KFAC on ResNet-18 with BatchNorm). A tensor-creation
probe (TorchDispatchMode) checks that no tensor of B·P elements is made while the fallback of a network with a
large Linear and a small LayerNorm is fitted, and that the result is still the exact diagonal.
"""

import warnings

import pytest
import torch
from references import DTYPE, dense_jacobians, output_hessians
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from posthoc.curvature.factor_eigh import factor_eigh
from posthoc.curvature.kfac import kfac_factors
from posthoc.curvature.output_factors import OutputFactors
from posthoc.laplace.structures.kron import KronCurvature
from posthoc.network.subset import ParameterSubset


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operation returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.largest = max(self.largest, leaf.numel())
        return out


def test_fallback_memory_is_proportional_to_the_fallback_parameters():
    torch.manual_seed(0)
    width = 120
    model = nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width), nn.Tanh(), nn.Linear(width, 3)).to(DTYPE)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, width, generator=g, dtype=DTYPE), torch.randint(0, 3, (16,), generator=g)
    subset = ParameterSubset(model, "all")
    with _LargestTensor() as probe:
        result = kfac_factors(subset, [(x, y)], OutputFactors("classification"), progress=False)
    assert [subset.blocks[i].name for i in result.fallback] == ["1.weight", "1.bias"]
    # B·P = 16 · 14,883: a per-example full-length vector; the largest legitimate tensor is the 120 x 120 weight
    assert probe.largest < x.shape[0] * subset.n_params // 4
    jac = dense_jacobians(subset, x)
    exact = torch.einsum("bcp,bcd,bdp->p", jac, output_hessians(model(x).detach(), "classification"), jac)
    start = subset.blocks[result.fallback[0]].offset
    torch.testing.assert_close(result.fallback_diag, exact[start:start + 2 * width], rtol=1e-10, atol=1e-14)


class _Tokens(nn.Module):
    def __init__(self, vocabulary: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocabulary, 8, padding_idx=1)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(tokens)).mean(1))


def test_embedding_diagonal_from_segment_sums_without_dense_per_example_gradients():
    """An embedding's exact diagonal and glm term never build a (V, D) gradient per example (B·K·V·D)."""
    vocabulary = 200
    model = _Tokens(vocabulary).to(DTYPE).eval()
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 12, (8, 6), generator=g)  # repeated tokens within examples, padding among them
    y = torch.randint(0, 3, (8,), generator=g)
    subset = ParameterSubset(model, "all")

    def batches():
        yield tokens, y

    with _LargestTensor() as probe:
        curv = KronCurvature.fit(subset, batches, OutputFactors("classification"), progress=False)
    assert [emb.name for emb in curv.embeddings] == ["emb"]
    assert probe.largest < 2 * vocabulary * 8  # the (V, D) diagonal itself, not B·K of them
    jac = dense_jacobians(subset, tokens)
    exact = torch.einsum("bcp,bcd,bdp->p", jac, output_hessians(model(tokens).detach(), "classification"), jac)
    torch.testing.assert_close(curv.fallback_diag, exact[:vocabulary * 8], rtol=1e-10, atol=1e-14)
    prior, scale = torch.tensor([0.9], dtype=DTYPE), torch.tensor(1.0, dtype=DTYPE)
    expected = jac[:3] @ torch.linalg.inv(curv.dense_precision(prior, scale)) @ jac[:3].mT
    torch.testing.assert_close(curv.functional_covariance(tokens[:3], prior, scale), expected, rtol=1e-8, atol=1e-12)


def _failing_in_float32(monkeypatch):
    original = torch.linalg.eigh

    def eigh(matrix, *args, **kwargs):
        if matrix.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.eigh: the algorithm failed to converge (simulated)")
        return original(matrix, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", eigh)


def test_failed_float32_eigh_is_redone_in_float64_with_one_warning(monkeypatch):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 6, generator=g, dtype=DTYPE)
    x = torch.cat([x, x], dim=1)  # duplicated features: a rank-3 (12, 12) factor
    factors = {"a": (x.T @ x).float(), "b": torch.eye(4) * 2.0}
    _failing_in_float32(monkeypatch)
    with pytest.warns(RuntimeWarning, match="2 .*float64") as record:
        out = factor_eigh(factors)
    assert len(record) == 1
    for name, matrix in factors.items():
        evals, evecs = out[name]
        assert evals.dtype == evecs.dtype == torch.float32 and bool((evals >= 0).all())
        torch.testing.assert_close((evecs * evals) @ evecs.T, matrix, rtol=1e-5, atol=1e-5 * float(matrix.max()))


def test_float64_failure_raises(monkeypatch):
    original = torch.linalg.eigh

    def eigh(matrix, *args, **kwargs):
        raise torch.linalg.LinAlgError("simulated")

    monkeypatch.setattr(torch.linalg, "eigh", eigh)
    with pytest.raises(torch.linalg.LinAlgError, match="float64"):
        factor_eigh({"a": torch.eye(3, dtype=DTYPE)})
    assert original is not torch.linalg.eigh


def test_kron_fit_survives_failing_float32_eigh(monkeypatch):
    """A float32 fit whose eigendecompositions fail (zero inputs to one layer: a zero input factor) completes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    with torch.no_grad():
        model[0].bias.fill_(-100.0)  # every ReLU dead: the second layer's inputs are all zero
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    subset = ParameterSubset(model, "all")
    _failing_in_float32(monkeypatch)

    def batches():
        yield x, y

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        curv = KronCurvature.fit(subset, batches, OutputFactors("classification"), progress=False)
    assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1
    prior = torch.tensor([1.0])
    assert bool(torch.isfinite(curv.logdet_precision(prior, torch.tensor(1.0))))
    assert bool((curv.posterior_variance(prior, torch.tensor(1.0)) > 0).all())
