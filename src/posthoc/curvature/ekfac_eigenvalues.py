"""EKFAC's second data pass: the exact curvature's second moments in the KFAC eigenbasis.

Used by the "ekfac" structure (:mod:`posthoc.laplace.structures.ekfac`) and its resumable fit; the first pass
and the layer records are :mod:`posthoc.curvature.kfac`'s.
"""

from __future__ import annotations

from typing import Iterable

import torch
from tqdm.auto import tqdm

from posthoc.curvature.fallback import chunks
from posthoc.curvature.kfac import KronLayer, gradient_elements, rotated_weight_gradients, tapped_forward
from posthoc.curvature.output_factors import OutputFactors
from posthoc.distributed import sum_over_ranks
from posthoc.network.inputs import ModelInputs, batch_size
from posthoc.network.subset import ParameterSubset


def ekfac_eigenvalues(subset: ParameterSubset, layers: list[KronLayer], positions: dict[str, int],
                      bases: dict[str, tuple[torch.Tensor, torch.Tensor | None]],
                      batches: Iterable[tuple[ModelInputs, torch.Tensor]], factors: OutputFactors,
                      progress: bool = True, desc: str = "Laplace fit (ekfac, eigenvalues)") -> dict[int, torch.Tensor]:
    """EKFAC's corrected eigenvalues, a second data pass.

    For each block, Σ_n Σ_k (Q_Gᵀ ∇W_nk Q_A)² with ∇W_nk = Σ_l g_nkl a_nlᵀ the
    exact per-example weight gradient of column k (positions summed before
    squaring): (D_out, D_in) for a weight, Σ_n Σ_k (Q_Gᵀ Σ_l g_nkl)² (D_out,)
    for a bias. These are diag(Qᵀ H Q) of the exact curvature block H in the
    KFAC eigenbasis Q = Q_G ⊗ Q_A. ``bases[name]`` = (Q_G, Q_A or None).
    Returns a dict from block index to eigenvalues. Cost per batch: one forward,
    K backward passes, and O(B·K·L·D_out·D_in) per weight (O(B·K·D_out·D_in)
    when L = 1, where the square of the rank-one gradient factorises).
    """
    out: dict[int, torch.Tensor] = {}

    def add(index: int, term: torch.Tensor) -> None:
        out[index] = out[index] + term if index in out else term

    for inputs, targets in tqdm(batches, desc=desc, disable=not progress, leave=False):
        record = tapped_forward(subset, layers, inputs)
        s = factors(record.outputs.detach(), targets)
        n_cols = s.shape[2]
        for cols in chunks(n_cols, batch_size(inputs) * gradient_elements(layers, positions)):
            grads = record.output_gradients(s[:, :, cols], retain_graph=cols.stop < n_cols)
            for layer in layers:
                g, (q_out, q_in) = grads[layer.name], bases[layer.name]  # g (B, K, D_out, L)
                if layer.weight is not None:
                    assert q_in is not None  # a weight layer's basis pair has Q_A
                    a = record.patches(layer.name)  # (B, D_in, L)
                    if a.shape[-1] == 1:
                        add(layer.weight, (g[..., 0] @ q_out).square().sum(1).T @ (a[..., 0] @ q_in).square())
                    else:
                        per_example = g.shape[1] * g.shape[2] * a.shape[1]
                        for part in chunks(g.shape[0], per_example):
                            add(layer.weight, rotated_weight_gradients(g[part], a[part], q_out, q_in)
                                .square().sum((0, 1)))
                if layer.bias is not None:
                    add(layer.bias, (g.sum(-1) @ q_out).square().sum((0, 1)))
    indices = sorted(out)
    return dict(zip(indices, sum_over_ranks([out[i] for i in indices], "the EKFAC eigenvalues"), strict=True))
