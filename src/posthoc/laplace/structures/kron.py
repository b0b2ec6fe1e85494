"""Kronecker-factored (KFAC) structure with the prior added exactly in the eigenbasis.

Each covered Linear/Conv1D/Conv2d weight W (D_out, D_in) (a Conv1D weight is
stored transposed, (D_in, D_out), and its block read in that order) gets the curvature block
G ⊗ A and its bias the block G (:mod:`posthoc.curvature.kfac` for the factors'
convention). With the eigendecompositions A = Q_A diag(λ_A) Q_Aᵀ and
G = Q_G diag(λ_G) Q_Gᵀ (computed once at fit), the posterior precision block is

    Λ_l = (Q_G ⊗ Q_A) diag(s·E_l + δ_l) (Q_G ⊗ Q_A)ᵀ,   E_l = λ_G λ_Aᵀ (D_out, D_in)

(bias: Q_G diag(s λ_G + δ_l) Q_Gᵀ), for a scalar or per-layer prior δ (a layer
is one parameter tensor, so a Linear's weight and bias are two) and curvature
scale s. A per-parameter prior has no such closed form and raises ValueError.
Parameters outside supported layers (BatchNorm, LayerNorm, embeddings,
``nn.MultiheadAttention``'s projections, ...) get an exact diagonal GGN block
s·h + δ (an nn.Embedding's from segment sums of its output gradients,
:mod:`posthoc.curvature.embedding`; BatchNorm (eval mode), LayerNorm and GroupNorm affine parameters from
their recorded inputs and output gradients, :mod:`posthoc.curvature.norm_affine`; the others from
per-example gradients of those parameters only, :mod:`posthoc.curvature.fallback`), and so does every
covered parameter of a Linear/Conv1D/Conv2d layer whose weight or bias is shared: a layer called more than
once per forward, or the layer a Parameter held by two modules (a weight tied to another use: an output head
that is also the embedding, an encoder weight reused transposed) is covered under; the other module holding
that Parameter keeps a Kronecker block (G only) for its own, unshared bias. A shared parameter's per-example
gradient sums its uses, so it has no
exact Kronecker block; its exact diagonal (all uses, all curvature types) is
used instead, and the glm predictive takes its whole Jacobian (every use).
Everything below only rotates
D_out × D_in matrices: memory O(P + Σ_l (D_out² + D_in²)), no P × P object
except in :meth:`dense_precision` (tests only).

:class:`posthoc.laplace.structures.ekfac.EKFACCurvature` reuses all of it with
corrected eigenvalues E_l.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from posthoc.curvature.embedding import embedding_grams
from posthoc.curvature.factor_eigh import factor_eigh
from posthoc.curvature.fallback import RestrictedSubset, chunks
from posthoc.curvature.jacobians import position_pairs_cheaper, weighted_gram_by_position_pairs
from posthoc.curvature.kfac import (
    KFACApproximation,
    KFACFactors,
    KronLayer,
    check_single_use,
    gradient_elements,
    kfac_factors,
    layers_by_name,
    rotated_weight_gradients,
    tapped_fallback_excluded,
    tapped_forward,
)
from posthoc.curvature.norm_affine import norm_grams, normalised_input
from posthoc.curvature.output_factors import OutputFactors
from posthoc.laplace.prior import per_block
from posthoc.laplace.structures.base import (
    Batches,
    CurvatureStructure,
    HessianStructure,
    check_curvature_finite,
    register_structure,
)
from posthoc.network.inputs import ModelInputs, batch_size, take
from posthoc.network.subset import ParameterSubset, SubsetOfWeights
from posthoc.utils.checks import check_choice


def check_kron_subset(subset: ParameterSubset, structure: str) -> None:
    """Raise ValueError for a subnetwork subset: the Kronecker blocks are whole parameter tensors.

    ``structure`` names the structure in the message ("kron", "ekfac").
    """
    if subset.kind is SubsetOfWeights.SUBNETWORK:
        raise ValueError(
            f"hessian_structure={structure!r} needs whole weight matrices and does not support "
            "subset_of_weights='subnetwork'; use 'full', 'diag' or 'lowrank' for a subnetwork"
        )


@dataclass
class KronBlock:
    """Eigenstructure of one Kronecker-covered parameter tensor.

    ``index`` in ``subset.blocks``; ``q_out`` (D_out, D_out) = Q_G; ``q_in``
    (D_in, D_in) = Q_A, None for a bias; ``eigenvalues`` E, (D_out, D_in) for a
    weight, (D_out,) for a bias (curvature eigenvalues at s = 1, no prior);
    ``transposed`` when the weight is stored (D_in, D_out) (transformers'
    Conv1D): the same block in the (D_out, D_in) layout, transposed to storage
    order wherever a result is laid out like the parameter.
    """

    index: int
    layer: str
    q_out: torch.Tensor
    q_in: torch.Tensor | None
    eigenvalues: torch.Tensor
    transposed: bool = False

    @property
    def is_weight(self) -> bool:
        """Whether this is a weight block (G ⊗ A), not a bias block (G)."""
        return self.q_in is not None

    def input_basis(self) -> torch.Tensor:
        """Q_A (D_in, D_in) of a weight block (ValueError for a bias block, which has none)."""
        if self.q_in is None:
            raise ValueError(f"the bias block {self.index} of layer {self.layer!r} has no input basis")
        return self.q_in

    def stored(self, matrix: torch.Tensor) -> torch.Tensor:
        """A (..., D_out, D_in) tensor in the parameter's storage layout (a transposed view for Conv1D)."""
        return matrix.mT if self.transposed else matrix


@register_structure
class KronCurvature(CurvatureStructure):
    """KFAC curvature; fit options: ``kfac_approx`` ("expand" default, or "reduce") for Conv2d weight sharing."""

    structure = HessianStructure.KRON
    supports_subnetwork = False
    supports_parameter_prior = False

    def __init__(self, subset: ParameterSubset, layer_names: list[str], blocks: list[KronBlock],
                 fallback: list[int], fallback_diag: torch.Tensor, positions: dict[str, int], n_outputs: int,
                 approximation: KFACApproximation, embedding_names: list[str] | None = None,
                 norm_names: list[str] | None = None) -> None:
        check_kron_subset(subset, self.structure.value)
        super().__init__(subset)
        self.layers: list[KronLayer] = layers_by_name(subset, layer_names)
        # fallback embeddings whose diagonal and glm term come from segment sums of their output gradients
        self.embeddings: list[KronLayer] = layers_by_name(subset, embedding_names or [], embeddings=True)
        # fallback normalisation layers whose diagonal and glm term come from their inputs and output gradients
        self.norms: list[KronLayer] = layers_by_name(subset, norm_names or [], norms=True)
        self.blocks = blocks
        self.fallback = fallback
        self.fallback_diag = fallback_diag  # (P_fb,) exact diagonal GGN of the fallback blocks
        self.positions = positions
        self.n_outputs = n_outputs
        self.approximation = approximation
        self._fallback_ids = torch.repeat_interleave(
            torch.tensor(fallback, dtype=torch.long, device=subset.device),
            torch.tensor([subset.blocks[i].numel for i in fallback], dtype=torch.long, device=subset.device))
        self._by_index = {blk.index: blk for blk in blocks}

    # ----------------------------------------------------------------- fitting

    @classmethod
    def fit(cls, subset: ParameterSubset, batches: Batches, factors: OutputFactors, progress: bool = True,
            **options: Any) -> "KronCurvature":
        """One data pass (:func:`posthoc.curvature.kfac.kfac_factors`), then eigendecompositions of A and G."""
        approximation = cls._parse_options(options)
        check_kron_subset(subset, cls.structure.value)
        result = kfac_factors(subset, batches(), factors, approximation, progress,
                              desc=f"Laplace fit ({cls.structure.value})", item_rows=cls.item_rows(options))
        return cls._from_factors(subset, result, approximation)

    @classmethod
    def _parse_options(cls, options: dict[str, Any]) -> KFACApproximation:
        allowed = {"kfac_approx", "item_rows"} if cls.structure is HessianStructure.KRON else {"kfac_approx"}
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise TypeError(f"hessian_structure={cls.structure.value!r} takes the options {sorted(allowed)} only, "
                            f"got {unknown}")
        return check_choice(options.get("kfac_approx", KFACApproximation.EXPAND), KFACApproximation, "kfac_approx")

    @classmethod
    def item_rows(cls, options: dict[str, Any]) -> bool:
        """The ``item_rows`` option (default False): see :func:`posthoc.curvature.kfac.kfac_factors`."""
        value = options.get("item_rows", False)
        if not isinstance(value, bool):
            raise TypeError(f"item_rows must be True or False, got {value!r}")
        return value

    @classmethod
    def _from_factors(cls, subset: ParameterSubset, result: KFACFactors,
                      approximation: KFACApproximation) -> "KronCurvature":
        blocks: list[KronBlock] = []
        named = {}
        for layer in result.layers:
            named[f"{layer.name} (output factor)"] = result.output_factors[layer.name]
            if layer.weight is not None:
                named[f"{layer.name} (input factor)"] = result.input_factors[layer.name]
        for name, factor in named.items():
            check_curvature_finite(factor, f"{cls.structure.value} (layer {name})")
        eigen = factor_eigh(named, f"{cls.structure.value} factors")
        for layer in result.layers:
            lam_g, q_g = eigen[f"{layer.name} (output factor)"]
            if layer.weight is not None:
                lam_a, q_a = eigen[f"{layer.name} (input factor)"]
                blocks.append(KronBlock(layer.weight, layer.name, q_g, q_a, torch.outer(lam_g, lam_a),
                                        layer.transposed))
            if layer.bias is not None:
                blocks.append(KronBlock(layer.bias, layer.name, q_g, None, lam_g))
        check_curvature_finite(result.fallback_diag, f"{cls.structure.value} (diagonal fallback)")
        return cls(subset, [layer.name for layer in result.layers], blocks, result.fallback, result.fallback_diag,
                   result.positions, result.n_outputs, approximation, [e.name for e in result.embeddings],
                   [norm.name for norm in result.norms])

    def largest_eigenvalue(self) -> torch.Tensor | None:
        """Largest Kronecker eigenvalue lambda_G * lambda_A, or None without Kronecker blocks.

        The float32 eigendecompositions of A and G are off by about eps times their largest eigenvalue, so
        s * E + delta loses small directions when delta is tiny (``Laplace`` warns). The diagonal fallback is
        exact, so it does not count.
        """
        if not self.blocks:
            return None
        return torch.stack([blk.eigenvalues.max() for blk in self.blocks]).max()

    def bases(self) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """(Q_G, Q_A or None) per Kronecker layer name."""
        out: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        for blk in self.blocks:
            q_out, q_in = out.get(blk.layer, (blk.q_out, None))
            out[blk.layer] = (q_out, blk.q_in if blk.q_in is not None else q_in)
        return out

    # ------------------------------------------------------- posterior algebra

    def _precision_eigenvalues(self, prior: torch.Tensor, scale: torch.Tensor
                               ) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """s·E + δ per Kronecker block, and s·h + δ (P_fb,) for the fallback entries."""
        delta = per_block(prior, self.subset, self.structure.value)
        kron = {blk.index: scale * blk.eigenvalues + delta[blk.index] for blk in self.blocks}
        return kron, scale * self.fallback_diag + delta[self._fallback_ids]

    def _per_block(self, kron: dict[int, torch.Tensor], fallback: torch.Tensor,
                   fallback_part: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
        """Per-block tensors in block (= theta) order: ``kron[i]``, or ``fallback_part`` of block i's entries."""
        fb = self._split_fallback(fallback)
        return [kron[i] if i in kron else fallback_part(fb[i]) for i in range(len(self.subset.blocks))]

    def _split_fallback(self, fallback: torch.Tensor) -> dict[int, torch.Tensor]:
        """(P_fb,) fallback entries split per block index."""
        return dict(zip(self.fallback, torch.split(fallback, [self.subset.blocks[i].numel for i in self.fallback]),
                        strict=True))

    def logdet_precision(self, prior: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Σ_blocks Σ log(s·E + δ) + Σ log(s·h + δ). Cost O(P)."""
        kron, fallback = self._precision_eigenvalues(prior, scale)
        total = torch.log(fallback).sum()
        for values in kron.values():
            total = total + torch.log(values).sum()
        return total

    def posterior_variance(self, prior: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """diag(Λ⁻¹) (P,): (Q_G∘Q_G) D (Q_A∘Q_A)ᵀ per weight, D = 1/(s·E + δ).

        Cost O(Σ_l D_out·D_in·(D_out + D_in)).
        """
        kron, fallback = self._precision_eigenvalues(prior, scale)
        parts = {}
        for blk in self.blocks:
            inv = 1.0 / kron[blk.index]
            q_out_sq = blk.q_out.square()
            parts[blk.index] = blk.stored(q_out_sq @ inv @ blk.input_basis().square().T).reshape(-1) if blk.is_weight \
                else q_out_sq @ inv
        return torch.cat(self._per_block(parts, 1.0 / fallback, lambda v: v))

    def sample(self, n_samples: int, prior: torch.Tensor, scale: torch.Tensor,
               generator: torch.Generator) -> torch.Tensor:
        """(n_samples, P): Q_G (ε ∘ (s·E + δ)^-1/2) Q_Aᵀ per weight, ε ~ N(0, I) drawn in block order.

        Cost O(n_samples · Σ_l D_out·D_in·(D_out + D_in)).
        """
        kron, fallback = self._precision_eigenvalues(prior, scale)
        fb = self._split_fallback(fallback)
        parts = []
        for index, block in enumerate(self.subset.blocks):
            values = kron[index] if index in kron else fb[index]
            eps = torch.randn(n_samples, *values.shape, generator=generator, dtype=values.dtype).to(values.device)
            white = eps * values.rsqrt()
            if index in self._by_index:
                blk = self._by_index[index]
                white = blk.stored(blk.q_out @ white @ blk.input_basis().T) if blk.is_weight else white @ blk.q_out.T
            parts.append(white.reshape(n_samples, block.numel))
        return torch.cat(parts, dim=1)

    def solve(self, rhs: torch.Tensor, prior: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Λ⁻¹ rhs for rhs (P, K) through the eigenbases: Q_G ((Q_Gᵀ V Q_A) / (s·E + δ)) Q_Aᵀ per weight.

        Cost O(K · Σ_l D_out·D_in·(D_out + D_in)); no P × P object.
        """
        kron, fallback = self._precision_eigenvalues(prior, scale)
        fb = self._split_fallback(fallback)
        parts = []
        for index, block in enumerate(self.subset.blocks):
            part = rhs[block.slice]  # (n, K)
            if index not in self._by_index:
                parts.append(part / fb[index].unsqueeze(-1))
                continue
            blk, values = self._by_index[index], kron[index]
            if blk.is_weight:  # (K, D_out, D_in) in the (D_out, D_in) layout, back to storage order at the end
                matrix = blk.stored(part.T.reshape(rhs.shape[1], *blk.stored(values).shape))
                rotated = blk.q_out.T @ matrix @ blk.input_basis() / values
                parts.append(blk.stored(blk.q_out @ rotated @ blk.input_basis().T).reshape(rhs.shape[1], -1).T)
            else:
                parts.append(blk.q_out @ ((blk.q_out.T @ part) / values.unsqueeze(-1)))
        return torch.cat(parts, dim=0)

    def dense_precision(self, prior: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The (P, P) block-diagonal Λ (tests and small nets only)."""
        kron, fallback = self._precision_eigenvalues(prior, scale)
        dense = {}
        for blk in self.blocks:
            if not blk.is_weight:
                basis, values = blk.q_out, kron[blk.index]
            elif blk.transposed:  # storage order (D_in, D_out): A ⊗ G
                basis, values = torch.kron(blk.input_basis(), blk.q_out), kron[blk.index].T
            else:
                basis, values = torch.kron(blk.q_out, blk.input_basis()), kron[blk.index]
            dense[blk.index] = (basis * values.reshape(-1)) @ basis.T
        return torch.block_diag(*self._per_block(dense, fallback, torch.diag))

    def functional_covariance(self, inputs: ModelInputs, prior: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """J Λ⁻¹ Jᵀ (B, C, C) by C backward passes per example chunk and small rotations.

        With b_c (B, L, D_out) the gradient of output c in a layer's output and
        a (B, L, D_in) its inputs, the rotated Jacobian of a weight is
        R_c = Q_Gᵀ (Σ_l b_cl a_lᵀ) Q_A and its contribution Σ_qp R_c R_c' / (s·E + δ);
        for L = 1 this factorises into (Q_Gᵀ b_c)_q (Q_Gᵀ b_c')_q Σ_p (Q_Aᵀ a)_p² / (s·E_qp + δ).
        Fallback entries add J_fb diag(1/(s·h + δ)) J_fbᵀ from per-example
        Jacobians of those entries only, or for an embedding from the segment
        sums of its output gradients (:mod:`posthoc.curvature.embedding`). Memory per chunk ≤ ~2^24 elements of
        rotated gradients (examples are chunked), never P × P or B × C × P.
        Raises ValueError if a Kronecker layer's weight or bias is read more than
        once per forward (:func:`posthoc.curvature.kfac.check_single_use`, one
        extra forward of one example), e.g. for a state dict fitted before shared
        parameters were detected.
        """
        recorded = self.layers + self.embeddings + self.norms
        check_single_use(self.subset, recorded, inputs)
        kron, fallback = self._precision_eigenvalues(prior, scale)
        inverse = {index: 1.0 / values for index, values in kron.items()}
        fallback_inverse = self._split_fallback(1.0 / fallback)
        inverse.update({emb.weight: fallback_inverse[emb.weight] for emb in self.embeddings if emb.weight is not None})
        inverse.update({i: fallback_inverse[i] for norm in self.norms for i in norm.block_indices})
        # per example: the stacked output gradients, and the rotated Jacobians of weights shared over positions
        per_example = self.n_outputs * (gradient_elements(recorded, self.positions) + sum(
            blk.eigenvalues.numel() for blk in self.blocks if blk.is_weight and self.positions[blk.layer] > 1))
        cov = torch.cat([self._kron_covariance(take(inputs, part.start, part.stop), inverse)
                         for part in chunks(batch_size(inputs), per_example)])
        generic = tapped_fallback_excluded(self.fallback, self.embeddings, self.norms)
        if generic:
            weights = torch.cat([fallback_inverse[i] for i in generic])
            cov = cov + RestrictedSubset(self.subset, generic).weighted_grams(inputs, weights)
        return cov

    def _kron_covariance(self, inputs: ModelInputs, inverse: dict[int, torch.Tensor]) -> torch.Tensor:
        record = tapped_forward(self.subset, self.layers + self.embeddings + self.norms, inputs)
        n, n_out = record.outputs.shape
        eye = torch.eye(n_out, dtype=record.outputs.dtype, device=record.outputs.device)
        grads = record.output_gradients(eye.expand(n, n_out, n_out), retain_graph=False)  # (B, C, D_out, L)
        cov = record.outputs.new_zeros(n, n_out, n_out)
        bases = self.bases()
        for layer in self.layers:
            g, (q_out, q_in) = grads[layer.name], bases[layer.name]
            if layer.weight is not None:
                assert q_in is not None  # a weight layer's basis pair has Q_A
                a, inv = record.patches(layer.name), inverse[layer.weight]
                if a.shape[-1] == 1:
                    # rank-one rows: Σ_p (Q_Aᵀa)_p² / (s·E_qp + δ) folds the input side into one weight per q
                    rows = g[..., 0] @ q_out  # (B, C, D_out)
                    cov = cov + (rows * ((a[..., 0] @ q_in).square() @ inv.T).unsqueeze(1)) @ rows.mT
                elif position_pairs_cheaper(a.shape[-1], n_out):  # few positions: no (B, C, D_out, D_in) rows
                    rotated_g = torch.matmul(q_out.T, g).permute(1, 0, 3, 2)  # (C, B, L, D_out)
                    rotated_a = torch.matmul(q_in.T, a).mT  # (B, L, D_in)
                    cov = cov + weighted_gram_by_position_pairs(rotated_g, rotated_a, inv.reshape(q_out.shape[0], -1))
                else:
                    rows = rotated_weight_gradients(g, a, q_out, q_in).reshape(n, n_out, -1)
                    cov = cov + (rows * inv.reshape(1, 1, -1)) @ rows.mT
            if layer.bias is not None:
                rows = g.sum(-1) @ q_out
                cov = cov + (rows * inverse[layer.bias]) @ rows.mT
        for emb in self.embeddings:
            assert emb.weight is not None and isinstance(emb.module, torch.nn.Embedding)
            cov = cov + embedding_grams(record.inputs[emb.name], grads[emb.name], emb.module, inverse[emb.weight])
        for norm in self.norms:
            x_hat = normalised_input(norm.module, record.inputs[norm.name])
            cov = cov + norm_grams(x_hat, grads[norm.name], inverse.get(norm.weight) if norm.weight is not None
                                   else None, inverse.get(norm.bias) if norm.bias is not None else None)
        return cov

    # -------------------------------------------------------------- state dict

    def state_dict(self) -> dict[str, Any]:
        """Factors' eigenbases and eigenvalues, Kronecker layer names, fallback diagonal (tensors and plain data)."""
        return {
            "approximation": self.approximation.value,
            "layers": [layer.name for layer in self.layers],
            "positions": dict(self.positions),
            "n_outputs": self.n_outputs,
            "blocks": [{"index": b.index, "layer": b.layer, "q_out": b.q_out, "q_in": b.q_in,
                        "eigenvalues": b.eigenvalues, "transposed": b.transposed} for b in self.blocks],
            "fallback": list(self.fallback),
            "fallback_diag": self.fallback_diag,
            "embeddings": [emb.name for emb in self.embeddings],
            "norms": [norm.name for norm in self.norms],
        }

    @classmethod
    def from_state_dict(cls, subset: ParameterSubset, state: dict[str, Any]) -> "KronCurvature":
        """Inverse of :meth:`state_dict` on ``subset`` (raises ValueError if a layer is not a Kronecker layer)."""
        def conv(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=subset.device, dtype=subset.dtype)

        blocks = [KronBlock(int(b["index"]), b["layer"], conv(b["q_out"]), None if b["q_in"] is None else conv(b["q_in"]),
                            conv(b["eigenvalues"]),
                            bool(b.get("transposed", False))) for b in state["blocks"]]
        return cls(subset, list(state["layers"]), blocks, [int(i) for i in state["fallback"]],
                   conv(state["fallback_diag"]), dict(state["positions"]), int(state["n_outputs"]),
                   KFACApproximation(state["approximation"]), list(state.get("embeddings", [])),
                   list(state.get("norms", [])))
