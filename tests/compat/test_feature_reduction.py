"""laplace-torch's ``feature_reduction`` in posthoc.compat.laplace, against a dense float64 reference.

A per-token model (head on every position, outputs (B, T, C)) with one label per sequence: the covered function is
reduce_t(logits) (laplace-torch's last-layer function W reduce(phi) + b, the head being affine), its GGN and glm
predictive computed densely with torch.func. A model that pools itself keeps its own pooling, with the warning.
(laplace-torch itself is compared in benchmarks/feature_reduction_parity.py; CI has no laplace-torch.)
"""

from __future__ import annotations

from enum import Enum

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from posthoc.compat.laplace import Laplace
from posthoc.compat.laplace.feature_reduction import FeatureReduction, reduce_positions

DTYPE = torch.float64
VOCAB, DIM, CLASSES, SEQ = 9, 4, 3, 5


class TokenNet(nn.Module):
    """Embedding, a causal running mean (positions see each other), a head on every position: (B, T, C)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.mix = nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.embed(x))
        running = h.cumsum(1) / torch.arange(1, x.shape[1] + 1, dtype=h.dtype)[:, None]
        return self.head(torch.tanh(self.mix(running)))


class LaplaceTorchFeatureReduction(str, Enum):
    """An enum like laplace-torch's laplace.utils.enums.FeatureReduction (read through .value)."""

    PICK_FIRST = "pick_first"
    PICK_LAST = "pick_last"
    AVERAGE = "average"


def setup(seed: int = 0):
    torch.manual_seed(seed)
    model = TokenNet().to(DTYPE).eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (16, SEQ), generator=g)
    y = torch.randint(0, CLASSES, (16,), generator=g)
    return model, [(x[i:i + 8], y[i:i + 8]) for i in (0, 8)], x, y


def dense_reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor, points: torch.Tensor, names: list[str],
                    reduction: str, prior: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(GGN + prior I, glm mean, glm covariance) of reduce_t(model(x)_t) over the parameters ``names``."""
    params = dict(model.named_parameters())
    theta = torch.cat([params[n].detach().reshape(-1) for n in names])
    sizes = [params[n].numel() for n in names]

    def f(th: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        pieces = {n: p.view_as(params[n]) for n, p in zip(names, th.split(sizes), strict=True)}
        logits = functional_call(model, pieces, (inputs,))  # (B, T, C)
        return {"pick_first": logits[:, 0], "pick_last": logits[:, -1], "average": logits.mean(1)}[reduction]

    jac = jacrev(f)(theta, x)  # (N, C, P)
    p = torch.softmax(f(theta, x), -1).detach()
    gamma = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    precision = torch.einsum("ncp,ncd,ndq->pq", jac, gamma, jac) + prior * torch.eye(len(theta), dtype=DTYPE)
    jac_points = jacrev(f)(theta, points)
    cov = jac_points @ torch.linalg.inv(precision) @ jac_points.transpose(1, 2)
    return precision, f(theta, points).detach(), cov


@pytest.mark.parametrize("reduction", ["pick_first", "pick_last", "average"])
@pytest.mark.parametrize("subset", ["last_layer", "all"])
def test_reduction_of_per_token_outputs_matches_the_dense_reference(reduction, subset):
    model, batches, x, y = setup()
    la = Laplace(model, "classification", subset_of_weights=subset, hessian_structure="full", prior_precision=2.0,
                 feature_reduction=reduction)
    la.fit(batches)
    names = ["head.weight", "head.bias"] if subset == "last_layer" else [n for n, _ in model.named_parameters()]
    precision, mean, cov = dense_reference(model, x, y, x[:5], names, reduction, 2.0)
    assert la.n_data == 16
    torch.testing.assert_close(la.posterior_precision, precision, rtol=1e-8, atol=1e-10)
    pred = la.predict(x[:5])  # the glm predictive of f: laplace-torch's (f_mu, f_var)
    torch.testing.assert_close(pred.mean, mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(pred.cov, cov, rtol=1e-7, atol=1e-10)
    assert la(x[:5]).shape == (5, CLASSES)


def test_laplace_torch_enum_values_are_accepted():
    model, batches, x, _ = setup()
    by_enum = Laplace(model, "classification", hessian_structure="full",
                      feature_reduction=LaplaceTorchFeatureReduction.AVERAGE)
    by_enum.fit(batches)
    by_value = Laplace(model, "classification", hessian_structure="full", feature_reduction="average")
    by_value.fit(batches)
    torch.testing.assert_close(by_enum(x[:3]), by_value(x[:3]))


def test_unknown_reduction_is_refused_with_the_choices():
    model, _, _, _ = setup()
    with pytest.raises(ValueError, match="feature_reduction 'max'.*'pick_first', 'pick_last', 'average'"):
        Laplace(model, "classification", feature_reduction="max")


def test_reduce_positions_reads_every_middle_dimension():
    out = torch.arange(2 * 3 * 4 * 5, dtype=DTYPE).reshape(2, 3, 4, 5)
    torch.testing.assert_close(reduce_positions(out, FeatureReduction.PICK_FIRST), out[:, 0, 0])
    torch.testing.assert_close(reduce_positions(out, FeatureReduction.PICK_LAST), out[:, -1, -1])
    torch.testing.assert_close(reduce_positions(out, FeatureReduction.AVERAGE), out.mean((1, 2)))
    pooled = out[:, 0, 0]
    assert reduce_positions(pooled, FeatureReduction.AVERAGE) is pooled  # (B, C): nothing to reduce


class PoolsItself(TokenNet):
    """Pools its head's per-token logits at the last non-pad token (pad id 0, right padding), as GPT-2 does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = (x != 0).sum(1) - 1
        return super().forward(x)[torch.arange(len(x)), last]


def test_a_model_that_pools_itself_keeps_its_pooling_and_says_what_laplace_torch_would_do():
    torch.manual_seed(0)
    model = PoolsItself().to(DTYPE).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, VOCAB, (16, SEQ), generator=g) * (torch.arange(SEQ) < 3 + torch.arange(16)[:, None] % 3)
    batches = [(x[i:i + 8], torch.randint(0, CLASSES, (8,), generator=g)) for i in (0, 8)]
    la = Laplace(model, "classification", hessian_structure="full", feature_reduction="pick_last")
    with pytest.warns(UserWarning, match=r"keeps the model's own pooling.*position -1, which in right-padded batches is a pad token"):
        la.fit(batches)
    plain = Laplace(model, "classification", hessian_structure="full")
    plain.fit(batches)
    torch.testing.assert_close(la.posterior_precision, plain.posterior_precision)
    torch.testing.assert_close(la(x[:4]), plain(x[:4]))


def test_gpt2_sequence_classifier_keeps_its_last_non_pad_token():
    pytest.importorskip("transformers")
    from zoo.models import DictWrapper, tiny_gpt2, token_batches

    model = DictWrapper(tiny_gpt2())
    batches, x = token_batches()
    la = Laplace(model, "classification", feature_reduction="pick_last", prior_precision=2.0)
    with pytest.warns(UserWarning, match="position -1, which in right-padded batches is a pad token"):
        la.fit(batches)
    plain = Laplace(model, "classification", prior_precision=2.0)
    plain.fit(batches)
    torch.testing.assert_close(la(x), plain(x))
