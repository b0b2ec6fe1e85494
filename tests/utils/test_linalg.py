"""Cholesky with jitter: retries, warns once, fails clearly."""

import warnings

import pytest
import torch

from posthoc.utils import linalg


def test_singular_matrix_is_factorised_with_jitter_and_warns_once():
    v = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    singular = v.T @ v  # rank 1
    linalg._warned.discard("test matrix")
    with pytest.warns(RuntimeWarning, match="test matrix failed; succeeded after adding"):
        chol = linalg.cholesky_with_jitter(singular, "test matrix")
    torch.testing.assert_close(chol @ chol.T, singular, atol=1e-6, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second failure of the same matrix kind says nothing
        linalg.cholesky_with_jitter(singular, "test matrix")


def test_indefinite_matrix_raises():
    with pytest.raises(torch.linalg.LinAlgError, match="not positive definite"):
        linalg.cholesky_with_jitter(-torch.eye(3, dtype=torch.float64), "negative matrix")
