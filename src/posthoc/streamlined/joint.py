"""Full mode on a traced graph: the cross-covariances between activations that are alive at the same time.

A residual join a + b needs Cov(a, b). Both descend from a fork (the block input), so the walk keeps, for every
random activation n, its cross-covariance Cov(n, m) (B, D_n, D_m) with each earlier random activation m that is
still to be read after n (an *anchor*). A rule receives its input's cross-covariances with the anchors as
:attr:`Moments.crosses` (the mechanism posthoc's residual graphs use) and applies its Jacobian to them; weight
noise adds nothing to them (each layer's weights are independent of every other activation). A node whose inputs
are all deterministic is independent of every anchor. Cost: one (B, D_n, D_m) product per anchor and layer, so
memory O(B D²) per live pair: full mode is for small networks.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import fx

from posthoc.streamlined.moments import Moments
from posthoc.streamlined.rules.ops import UnsupportedOpError, is_random


class JointCovariances:
    """The cross-covariances between the live random activations of one full-mode walk over ``graph``."""

    def __init__(self, graph: fx.Graph, needed: set[fx.Node] | None = None) -> None:
        """``needed``: the nodes the walk computes (default all); readers outside it do not keep a node live."""
        self.order = {node: i for i, node in enumerate(graph.nodes)}
        self.last_use = {node: max((self.order[u] for u in node.users if needed is None or u in needed), default=-1)
                         for node in graph.nodes}
        self.crosses: dict[fx.Node, dict[fx.Node, torch.Tensor]] = {}
        self.live: list[fx.Node] = []

    def random_inputs(self, node: fx.Node, env: dict[fx.Node, object]) -> list[fx.Node]:
        """The input nodes of ``node`` whose values carry a covariance."""
        return [n for n in node.all_input_nodes if is_random(env[n])]

    def anchors(self, node: fx.Node) -> list[fx.Node]:
        """The random activations computed before ``node`` that are read after it."""
        return [m for m in self.live if self.last_use[m] > self.order[node]]

    def between(self, p: fx.Node, q: fx.Node, env: dict[fx.Node, object]) -> torch.Tensor | None:
        """Cov(p, q) (B, D_p, D_q); None when they are independent."""
        if p is q:
            value = env[p]
            assert isinstance(value, Moments)
            return value.cov
        if q in self.crosses.get(p, {}):
            return self.crosses[p][q]
        if p in self.crosses.get(q, {}):
            return self.crosses[q][p].transpose(1, 2)
        return None

    def with_crosses(self, node: fx.Node, anchors: list[fx.Node], env: dict[fx.Node, object]) -> Moments:
        """The value of ``node`` carrying its cross-covariances with ``anchors`` (zeros where independent)."""
        value = env[node]
        assert isinstance(value, Moments)
        crosses = []
        for m in anchors:
            cross = self.between(node, m, env)
            other = env[m]
            assert isinstance(other, Moments)
            crosses.append(cross if cross is not None else value.mean.new_zeros(value.mean.shape[0], value.dim,
                                                                                   other.dim))
        return Moments(value.mean, cov=value.cov, crosses=crosses)

    def record(self, node: fx.Node, result: object, anchors: list[fx.Node], had_random_input: bool) -> object:
        """Store the cross-covariances a rule returned for ``node``; return the value without them."""
        if not isinstance(result, Moments):
            return result
        if is_random(result):
            if had_random_input and len(result.crosses) != len(anchors):
                raise RuntimeError(f"the rule for node {node.name!r} returned {len(result.crosses)} cross-covariances "
                                   f"for {len(anchors)}: a full-mode rule must apply its Jacobian to state.crosses "
                                   "(use posthoc.streamlined.rules.advance)")
            self.crosses[node] = dict(zip(anchors, result.crosses, strict=False)) if had_random_input else {}
            self.live.append(node)
        return dataclasses.replace(result, crosses=[]) if result.crosses else result

    def release(self, node: fx.Node) -> None:
        """Forget the activations whose last reader is ``node``."""
        position = self.order[node]
        dead = {m for m in self.live if self.last_use[m] <= position}
        if not dead:
            return
        self.live = [m for m in self.live if m not in dead]
        for m in dead:
            self.crosses.pop(m, None)
        for table in self.crosses.values():
            for m in dead & table.keys():
                del table[m]


def join(a: Moments, b: Moments, cov_ab: torch.Tensor | None, mean: torch.Tensor, coefficient: float) -> Moments:
    """A + c·b of two jointly Gaussian activations (equal shapes): Σ_a + c² Σ_b + c (C_ab + C_abᵀ), crosses summed."""
    if a.mean.shape[1:] != b.mean.shape[1:] or mean.shape != (max(a.mean.shape[0], b.mean.shape[0]), *a.shape):
        raise ValueError(f"a full-mode join of random activations of shapes {tuple(a.mean.shape)} and "
                         f"{tuple(b.mean.shape)} (broadcasting other than of the batch axis) is not supported")
    a, b = _batch_expand(a, mean.shape[0]), _batch_expand(b, mean.shape[0])  # e.g. a position table's batch of 1
    if a.cov is None or b.cov is None:
        raise RuntimeError("a full-mode join of random activations needs both covariances")
    cov = a.cov + coefficient**2 * b.cov
    if cov_ab is not None:
        cov = cov + coefficient * (cov_ab + cov_ab.transpose(1, 2))
    crosses = [ca + coefficient * cb for ca, cb in zip(a.crosses, b.crosses, strict=True)]
    return Moments(mean, cov=0.5 * (cov + cov.transpose(1, 2)), crosses=crosses)


def _batch_expand(value: Moments, batch: int) -> Moments:
    """A batch-1 activation's covariance and crosses repeated for ``batch`` examples (broadcast in a join)."""
    if value.mean.shape[0] == batch or value.cov is None:
        return value
    return Moments(value.mean.expand(batch, *value.shape), cov=value.cov.expand(batch, -1, -1),
                   crosses=[c.expand(batch, -1, -1) for c in value.crosses])


def cat_parts(parts: list[object], nodes: list[object], dim: int, joint: JointCovariances,
              env: dict[fx.Node, object], mean: torch.Tensor) -> Moments:
    """torch.cat of jointly Gaussian parts along feature axis ``dim``: the stacked covariance, re-indexed.

    ``parts``: the values (Moments carrying their crosses with the walk's anchors, or fixed tensors); ``nodes``: the
    node each came from (None for a constant). Cost: one (B, D, D) gather of the stacked covariance.
    """
    shapes = [tuple(_tensor(p).shape[1:]) for p in parts]
    sizes = [int(torch.Size(shape).numel()) for shape in shapes]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    device = mean.device
    index = torch.cat([(offset + torch.arange(size, device=device)).reshape(1, *shape)
                       for offset, size, shape in zip(offsets, sizes, shapes, strict=True)], dim).reshape(-1)
    batch, total = mean.shape[0], sum(sizes)
    stacked = mean.new_zeros(batch, total, total)
    for i, (node_i, part_i) in enumerate(zip(nodes, parts, strict=True)):
        if not is_random(part_i):
            continue
        for j, node_j in enumerate(nodes):
            if isinstance(node_i, fx.Node) and isinstance(node_j, fx.Node) and is_random(parts[j]):
                block = joint.between(node_i, node_j, env)
                if block is not None:
                    stacked[:, offsets[i]:offsets[i] + sizes[i], offsets[j]:offsets[j] + sizes[j]] = block
    n_anchors = max(len(p.crosses) if isinstance(p, Moments) else 0 for p in parts)
    crosses = []
    for k in range(n_anchors):
        found = [p.crosses[k] if isinstance(p, Moments) and p.crosses else None for p in parts]
        width = next(r.shape[2] for r in found if r is not None)
        rows = [r if r is not None else mean.new_zeros(batch, size, width) for r, size in zip(found, sizes, strict=True)]
        crosses.append(torch.cat(rows, 1)[:, index])
    return Moments(mean, cov=stacked[:, index][:, :, index], crosses=crosses)


def stack_operands(values: list[object], nodes: list[object], joint: JointCovariances, env: dict[fx.Node, object]
                   ) -> tuple[Moments, list[tuple[int, ...]]]:
    """The joint moments of an op's operands stacked flat per example (B, Σ D_i), and each operand's feature shape.

    ``values``: Moments carrying their crosses with the walk's anchors, or fixed tensors; ``nodes``: the node each
    came from. Raises UnsupportedOpError for operands of different batch sizes. Cost: :func:`cat_parts`'.
    """
    means = [_tensor(v) for v in values]
    batch = means[0].shape[0]
    if any(m.shape[0] != batch for m in means):
        raise UnsupportedOpError("operands of different batch sizes (one broadcast over the batch) in a joint "
                                 "linearisation; expand it to the batch first")
    flat: list[object] = [Moments(v.mean.reshape(batch, -1), cov=v.cov, crosses=v.crosses)
                          if isinstance(v, Moments) and is_random(v) else m.reshape(batch, -1)
                          for v, m in zip(values, means, strict=True)]
    stacked = cat_parts(flat, nodes, 1, joint, env, torch.cat([m.reshape(batch, -1) for m in means], 1))
    return stacked, [tuple(m.shape[1:]) for m in means]


def _tensor(value: object) -> torch.Tensor:
    if isinstance(value, Moments):
        return value.mean
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"cat of a {type(value).__name__}")
    return value
