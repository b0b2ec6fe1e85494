"""Exact diagonal curvature of the covered parameters outside the Kronecker layers, at O(P_fb) memory.

The Kronecker structures give every covered parameter that is not in a Kronecker layer (BatchNorm/LayerNorm
affine parameters, embeddings, ``nn.MultiheadAttention``'s ``in_proj_weight``, shared or reused layers) the
exact diagonal of its curvature, diag(Σ_n Σ_k (J_nᵀ s_nk)²) restricted to those entries, from per-example
gradients of only those parameters (torch.func). The rest of the network enters the forward pass as constants,
so per-example gradients cost B·K·P_fb, never B·K·P (a full-length parameter vector per example and column was
what made all-weights KFAC on ResNet-18 with BatchNorm run out of memory: 11M parameters times every example and
output column); examples are chunked to keep the per-example gradients under an element budget.
"""

from __future__ import annotations

from typing import Iterator

import torch

from posthoc.curvature.jacobians import per_example_factor_gradients, per_example_jacobians
from posthoc.network.inputs import ModelInputs, batch_size, take
from posthoc.network.subset import ParameterSubset

# Elements of stacked output gradients / per-example gradients held at once (about 64 MB in float32); larger
# work is chunked over examples or output columns.
ELEMENT_BUDGET = 1 << 24


def chunks(n: int, elements_per_item: int, budget: int = ELEMENT_BUDGET) -> Iterator[slice]:
    """Slices of range(n) with ≤ budget / elements_per_item items each (at least one)."""
    step = max(1, budget // max(1, elements_per_item))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def block_positions(subset: ParameterSubset, blocks: list[int]) -> torch.Tensor:
    """(P_fb,) positions in theta of whole parameter blocks ``blocks`` (indices into ``subset.blocks``)."""
    if not blocks:
        return torch.zeros(0, dtype=torch.long, device=subset.device)
    return torch.cat([torch.arange(subset.blocks[i].offset, subset.blocks[i].offset + subset.blocks[i].numel,
                                   device=subset.device) for i in blocks])


class RestrictedSubset:
    """A few whole parameter tensors of a subset as the only free parameters (the rest held at the MAP).

    Duck-types the part of :class:`ParameterSubset` that :mod:`posthoc.curvature.jacobians` uses
    (``theta_map``, ``forward``). The other covered parameters enter :meth:`forward` as constant views of
    theta*, so a per-example gradient has P_fb entries and no full-length vector is built per example.

    Args:
        subset: a subset covering whole parameter tensors (not a subnetwork).
        blocks: indices into ``subset.blocks`` of the free tensors, in theta order.
    """

    def __init__(self, subset: ParameterSubset, blocks: list[int]) -> None:
        if subset.indices is not None:
            raise ValueError("RestrictedSubset needs whole parameter tensors, not a subnetwork subset")
        self._subset = subset
        self._blocks = [subset.blocks[i] for i in blocks]
        self._constants = subset.unflatten(subset.theta_map)  # views of the detached theta*
        self.theta_map = subset.theta_map[block_positions(subset, blocks)]

    def forward(self, inputs: ModelInputs, theta: torch.Tensor | None = None) -> torch.Tensor:
        """The covered function with these tensors at ``theta`` (P_fb,) and the rest at the MAP: (B, C)."""
        if theta is None:
            return self._subset.forward(inputs)
        params = dict(self._constants)
        for block, part in zip(self._blocks, torch.split(theta, [b.numel for b in self._blocks]), strict=True):
            params[block.name] = part.view(block.shape)
        return self._subset.forward_with(params, inputs)

    def vmap_examples(self, inputs: torch.Tensor) -> bool:
        """Whether per-example Jacobians may vmap over examples: the full subset's answer."""
        return self._subset.vmap_examples(inputs)

    def factor_gradients(self, inputs: ModelInputs, s: torch.Tensor) -> torch.Tensor:
        """J_nᵀ s_nk restricted to these entries: (B, K, P_fb) for factors s (B, C, K). Memory B·K·P_fb."""
        return per_example_factor_gradients(self, inputs, s)  # type: ignore[arg-type]

    def squared_factor_gradients(self, inputs: ModelInputs, s: torch.Tensor) -> torch.Tensor:
        """Σ_n Σ_k (J_nᵀ s_nk)² on these entries: (P_fb,). Examples chunked to ≤ ELEMENT_BUDGET gradient entries."""
        total = torch.zeros_like(self.theta_map)
        for part in chunks(batch_size(inputs), s.shape[2] * self.theta_map.numel()):
            total += self.factor_gradients(take(inputs, part.start, part.stop), s[part]).square().sum((0, 1))
        return total

    def jacobians(self, inputs: ModelInputs) -> torch.Tensor:
        """J_n restricted to these entries: (B, C, P_fb). Memory B·C·P_fb."""
        return per_example_jacobians(self, inputs)  # type: ignore[arg-type]

    def weighted_grams(self, inputs: ModelInputs, weights: torch.Tensor) -> torch.Tensor:
        """J_n diag(weights) J_nᵀ on these entries: (B, C, C) for weights (P_fb,). Examples chunked by budget."""
        with torch.no_grad():
            n_out = self._subset.forward(take(inputs, 0, 1)).shape[-1]
        out = []
        for part in chunks(batch_size(inputs), n_out * self.theta_map.numel()):
            jac = self.jacobians(take(inputs, part.start, part.stop))
            out.append((jac * weights) @ jac.mT)
        return torch.cat(out)
