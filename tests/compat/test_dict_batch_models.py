"""posthoc.compat.laplace on laplace-torch's Hugging Face flow: dict batches reach the model as one argument
(``model(batch)``), also through a ``forward(*args, **kwargs)`` wrapper such as peft's, and last-layer
``feature_reduction="pick_last"`` on a sequence model that reads its last position (GPT-2 without padding)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import jacrev

from posthoc.compat.laplace import Laplace

DTYPE = torch.float64


class _DictWrapper(nn.Module):
    """laplace-torch's documented wrapper: forward(data) reads data["input_ids"]; a (B, T, D) sequence in."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, data):
        return self.net(data["input_ids"])


class _Delegating(nn.Module):
    """Like peft's PeftModel: forward(*args, **kwargs) hands everything to the wrapped model."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


class _LastPosition(nn.Module):
    """A sequence classifier: tanh features (B, T, H), a head on every position (B, T, C), read at the last one."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3, 5)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))[:, -1, :]


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 4, 3, generator=g, dtype=DTYPE)
    y = (x[:, -1, 0] > 0).long()
    batches = [{"input_ids": x[i:i + 8], "labels": y[i:i + 8]} for i in range(0, 24, 8)]
    torch.manual_seed(0)
    return _LastPosition().to(DTYPE), batches, x


def test_a_delegating_forward_gets_the_dict_batch_as_one_argument():
    net, batches, x = _data()
    direct = Laplace(_DictWrapper(net), "classification", subset_of_weights="all", hessian_structure="full")
    direct.fit(batches)
    wrapped = Laplace(_Delegating(_DictWrapper(net)), "classification", subset_of_weights="all",
                      hessian_structure="full")
    wrapped.fit(batches)   # with keyword arguments, forward(input_ids=..., labels=...) would fail
    test = {"input_ids": x[:5]}
    torch.testing.assert_close(wrapped(test), direct(test), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(wrapped.log_marginal_likelihood(), direct.log_marginal_likelihood())


def test_pick_last_warns_and_gives_the_last_position_posterior():
    net, batches, x = _data()
    la = Laplace(_DictWrapper(net), "classification", subset_of_weights="last_layer", hessian_structure="full",
                 feature_reduction="pick_last", prior_precision=2.0)
    with pytest.warns(UserWarning, match="pick_last"):  # the model pools itself: said when its output is read
        la.fit(batches)
    # brute force: GGN of the head's (weight, bias) on the last position's features, softmax Hessian, + prior
    features = torch.tanh(net.body(x))[:, -1, :].detach()
    theta = torch.cat([net.head.weight.detach().reshape(-1), net.head.bias.detach()])

    def logits(t):
        return features @ t[:10].reshape(2, 5).T + t[10:]

    jac = jacrev(logits)(theta)                                  # (N, 2, 12)
    p = logits(theta).softmax(-1)
    hess = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]   # (N, 2, 2)
    precision = torch.einsum("nkp,nkl,nlq->pq", jac, hess, jac) + 2.0 * torch.eye(12, dtype=DTYPE)
    torch.testing.assert_close(la.posterior_precision, precision, rtol=1e-8, atol=1e-10)


def test_unknown_feature_reductions_raise():
    net, _, _ = _data()
    with pytest.raises(ValueError, match="feature_reduction"):
        Laplace(_DictWrapper(net), "classification", feature_reduction="max")
