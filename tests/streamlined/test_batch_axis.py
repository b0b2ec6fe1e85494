"""Ops that mix the batch axis are refused, whichever check decides it (a probe, a cached probe, the op's shapes).

The traced walk keeps examples independent, so an op that moves values between examples (a reshape across the
batch, a product with a (B, B) matrix, a softmax over the batch, an index computed from the data) must raise, on
every call. The shape rules that skip the probe (element-wise ops, matrix products on trailing axes) must never
say "kept" where the probe finds mixing: checked against the probe over every pairing of small shapes.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from posthoc.streamlined import Streamlined
from posthoc.streamlined.moments import Moments
from posthoc.streamlined.rules.ops import (
    UnsupportedOpError,
    _check_keeps_batch,
    elementwise_keeps_batch,
    matmul_keeps_batch,
)

BATCH = FEATURES = 4


class OpAfterLinear(nn.Module):
    """Linear, then ``op`` on its (random) output, then a Linear head on whatever comes out."""

    def __init__(self, op) -> None:
        super().__init__()
        self.op = op
        self.body = nn.Linear(FEATURES, FEATURES)
        self.head = nn.Linear(FEATURES, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.op(self.body(x)))


def _streamlined(model: nn.Module) -> Streamlined:
    variances = {name: torch.full_like(p, 0.01) for name, p in model.named_parameters()}
    return Streamlined(model.double(), weight_var=variances)


MIXING = {
    "reshape across the batch": lambda h: h.reshape(BATCH // 2, -1),
    "transpose with the batch": lambda h: h.transpose(0, 1),  # square (B = features): only the probe sees it
    "product with a (B, B) matrix": lambda h: h.new_ones(h.shape[0], h.shape[0]) @ h,
    "softmax over the batch": lambda h: torch.softmax(h, 0),
    "mean over the batch, broadcast back": lambda h: h.mean(0, keepdim=True).expand_as(h),
    "scaled by a tensor with a new leading axis": lambda h: (h * h.new_ones(2, 1, 1))[1],
    "a permutation that keeps example 0": lambda h: h[[0, 2, 1, 3]],  # the example-0-only probe passed it
    "rows minus permuted rows": lambda h: h - h[[0, 2, 1, 3]],  # diagonal mode gave examples 0 and 3 a variance
}


@pytest.mark.parametrize("name", sorted(MIXING))
def test_an_op_mixing_the_batch_raises_on_every_call(name: str) -> None:
    streamlined = _streamlined(OpAfterLinear(MIXING[name]))
    x = torch.randn(BATCH, FEATURES, dtype=torch.float64)
    for _ in range(2):  # a failed check is never cached as passed
        with pytest.raises(UnsupportedOpError, match="batch axis"):
            streamlined.predict(x)


class PermutedRows(nn.Module):
    """Indexes its activation with a permutation held in a buffer: the identity keeps the batch, any other mixes."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(FEATURES, FEATURES), nn.Linear(FEATURES, 2)
        self.register_buffer("order", torch.arange(BATCH))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x)[self.order])


def test_an_index_from_data_is_probed_on_every_call() -> None:
    """A tensor index may change between calls (here: the identity, then a swap): no cached answer is reused."""
    model = PermutedRows()
    streamlined = _streamlined(model)
    x = torch.randn(BATCH, FEATURES, dtype=torch.float64)
    pred = streamlined.predict(x)
    torch.testing.assert_close(pred.mean, model(x), rtol=1e-12, atol=1e-12)
    model.order.copy_(torch.tensor([1, 0, 2, 3]))
    with pytest.raises(UnsupportedOpError, match="batch axis"):
        streamlined.predict(x)


def test_a_cached_reshape_is_probed_again_for_another_shape() -> None:
    """view(2, -1) keeps a batch of 2 apart and mixes one of 4: the cache is keyed by the input's shape."""
    model = OpAfterLinear(lambda h: h.view(2, -1))
    streamlined = _streamlined(model)
    streamlined.predict(torch.randn(2, FEATURES, dtype=torch.float64))
    with pytest.raises(UnsupportedOpError, match="batch axis"):
        streamlined.predict(torch.randn(BATCH, FEATURES, dtype=torch.float64))


def _shapes(max_ndim: int, batch: int) -> list[tuple[int, ...]]:
    sizes = (1, 2, batch)
    return [s for n in range(1, max_ndim + 1) for s in itertools.product(sizes, repeat=n)]


def _probe_passes(fn, shape: tuple[int, ...]) -> bool:
    try:
        _check_keeps_batch(fn, Moments(torch.zeros(shape, dtype=torch.float64)), "op")
    except UnsupportedOpError:
        return False
    return True


@pytest.mark.parametrize("random_left", [True, False], ids=["random @ fixed", "fixed @ random"])
def test_the_matmul_shape_rule_never_keeps_what_the_probe_finds_mixed(random_left: bool) -> None:
    batch, checked, kept = 3, 0, 0
    for random_shape, fixed_shape in itertools.product(_shapes(4, batch), repeat=2):
        if random_shape[0] != batch:
            continue
        fixed = torch.rand(fixed_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 0.5

        def fn(t: torch.Tensor, fixed: torch.Tensor = fixed) -> torch.Tensor:
            return t @ fixed if random_left else fixed @ t

        try:
            fn(torch.zeros(random_shape, dtype=torch.float64))
        except RuntimeError:
            continue  # the shapes do not multiply
        checked += 1
        if matmul_keeps_batch(torch.Size(random_shape), fixed.shape, random_left):
            kept += 1
            assert _probe_passes(fn, random_shape), (random_shape, fixed_shape)
    assert checked > 100 and kept > 30  # the rule is exercised, not vacuous


def test_the_elementwise_shape_rule_never_keeps_what_the_probe_finds_mixed() -> None:
    batch, kept = 3, 0
    for random_shape, other_shape in itertools.product(_shapes(3, batch), _shapes(4, batch)):
        if random_shape[0] != batch:
            continue
        other = torch.rand(other_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 0.5
        try:
            torch.zeros(random_shape) * torch.zeros(other_shape)
        except RuntimeError:
            continue
        if elementwise_keeps_batch(torch.Size(random_shape), other):
            kept += 1
            assert _probe_passes(lambda t, other=other: t * other, random_shape), (random_shape, other_shape)
    assert kept > 30
    assert elementwise_keeps_batch(torch.Size((batch, 2)), 2.5)
