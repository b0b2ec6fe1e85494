"""OOD scores and AUROC: exact cases, scikit-learn agreement, input errors."""

import math

import pytest
import torch
from sklearn.metrics import roc_auc_score

from posthoc.metrics import auroc, entropy, half_logdet


def test_entropy_uniform_and_one_hot():
    for c in (2, 5, 10):
        probs = torch.full((3, c), 1.0 / c, dtype=torch.float64)
        assert torch.allclose(entropy(probs), torch.full((3,), math.log(c), dtype=torch.float64))
    # 0 log 0 = 0
    h = entropy(torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]], dtype=torch.float64))
    assert h[0] == 0.0
    assert h[1] == pytest.approx(math.log(2))
    assert entropy(torch.full((2, 4), 0.25)).dtype == torch.float32


def test_entropy_of_round_off_negatives_is_finite():
    """The probability check accepts entries down to -1e-6 (round-off); p log p must not turn them into NaN."""
    h = entropy(torch.tensor([[1 + 5e-7, -5e-7], [0.5, 0.5]], dtype=torch.float64))
    assert torch.isfinite(h).all() and h[0] == pytest.approx(0.0, abs=1e-5)


def test_entropy_rejects_logits():
    with pytest.raises(ValueError, match="not logits"):
        entropy(torch.tensor([[3.0, -1.0]]))


def test_half_logdet_known_matrices():
    cov = torch.tensor([[[2.0, 1.0], [1.0, 2.0]], [[4.0, 0.0], [0.0, 9.0]]], dtype=torch.float64)
    out = half_logdet(cov)
    assert out.shape == (2,)
    assert out[0] == pytest.approx(0.5 * math.log(3.0), abs=1e-12)
    assert out[1] == pytest.approx(0.5 * math.log(36.0), abs=1e-12)


def test_half_logdet_variances_match_diagonal_matrix():
    var = torch.tensor([[2.0, 8.0], [0.5, 0.5]], dtype=torch.float64)
    assert torch.allclose(half_logdet(var), torch.tensor([2 * math.log(2), math.log(0.5)], dtype=torch.float64))
    assert torch.allclose(half_logdet(var), half_logdet(torch.diag_embed(var)))


def test_half_logdet_random_spd_matches_slogdet():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 4, 4, generator=g, dtype=torch.float64)
    cov = a @ a.transpose(1, 2) + 0.1 * torch.eye(4, dtype=torch.float64)
    assert torch.allclose(half_logdet(cov), 0.5 * torch.linalg.slogdet(cov).logabsdet, atol=1e-10)


def test_half_logdet_not_pd_and_jitter():
    indefinite = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 2.0], [2.0, 1.0]]], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"not positive definite.*point 1.*jitter"):
        half_logdet(indefinite)
    singular = torch.ones(1, 2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="jitter"):
        half_logdet(singular)
    j = 1e-3
    # det([[1+j, 1], [1, 1+j]]) = 2j + j^2
    assert half_logdet(singular, jitter=j)[0] == pytest.approx(0.5 * math.log(2 * j + j * j), rel=1e-9)
    with pytest.raises(ValueError, match="jitter"):
        half_logdet(torch.tensor([[1.0, 0.0]]))
    assert half_logdet(torch.tensor([[1.0, 0.0]], dtype=torch.float64), jitter=1.0)[0] == pytest.approx(
        0.5 * math.log(2.0)
    )
    with pytest.raises(ValueError, match="jitter must be"):
        half_logdet(singular, jitter=-1.0)


def test_half_logdet_bad_shapes():
    with pytest.raises(ValueError, match="square"):
        half_logdet(torch.ones(2, 2, 3))
    with pytest.raises(ValueError, match=r"\(N, C, C\)"):
        half_logdet(torch.ones(3))
    with pytest.raises(ValueError, match="NaN"):
        half_logdet(torch.tensor([[1.0, float("nan")]]))


def test_auroc_exact_cases():
    assert auroc(torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.5, 0.9])) == 1.0
    assert auroc(torch.tensor([0.5, 0.9]), torch.tensor([0.1, 0.2, 0.3])) == 0.0
    assert auroc(torch.full((4,), 0.7), torch.full((3,), 0.7)) == 0.5
    # in {1, 2}, out {2, 3}: pairs (1,2)=1, (1,3)=1, (2,2)=.5, (2,3)=1 -> 3.5 / 4
    assert auroc(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 3.0])) == 0.875
    assert auroc(torch.tensor([0.0]), torch.tensor([float("inf")])) == 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_matches_sklearn_with_ties(seed):
    g = torch.Generator().manual_seed(seed)
    s_in = torch.randint(0, 20, (300,), generator=g).double()
    s_out = torch.randint(5, 25, (170,), generator=g).double()
    labels = [0] * 300 + [1] * 170
    ref = roc_auc_score(labels, torch.cat([s_in, s_out]).numpy())
    assert auroc(s_in, s_out) == pytest.approx(ref, abs=1e-12)
    cont_in, cont_out = torch.randn(200, generator=g), torch.randn(90, generator=g) + 0.5
    ref = roc_auc_score([0] * 200 + [1] * 90, torch.cat([cont_in, cont_out]).double().numpy())
    assert auroc(cont_in, cont_out) == pytest.approx(ref, abs=1e-6)


def test_auroc_bad_inputs():
    with pytest.raises(ValueError, match="empty"):
        auroc(torch.tensor([]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="empty"):
        auroc(torch.tensor([1.0]), torch.tensor([]))
    with pytest.raises(ValueError, match="NaN"):
        auroc(torch.tensor([1.0, float("nan")]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match=r"\(N,\)"):
        auroc(torch.ones(2, 2), torch.ones(2))
    with pytest.raises(TypeError):
        auroc([1.0, 2.0], torch.ones(2))
