"""KFAC: Kronecker factors of the curvature of Linear, Conv1D and Conv2d layers, by hooks.

Convention (curvlinops' ``KFACLinearOperator`` with
``separate_weight_and_bias=True``, the one laplace-torch uses). For a layer
with weight W (D_out, D_in) (a Conv2d weight flattened to (C_out, C_in·kh·kw)
in PyTorch's row-major order) the curvature block of W is G ⊗ A (``torch.kron``
order, matching the row-major flattening), and the block of its bias is G:

- expand (default): A = 1/(N·L) Σ_n Σ_l a_nl a_nlᵀ,   G = Σ_n Σ_k Σ_l g_nkl g_nklᵀ;
- reduce:            A = 1/N Σ_n ā_n ā_nᵀ (ā_n = mean_l a_nl),
                     G = Σ_n Σ_k (Σ_l g_nkl)(Σ_l g_nkl)ᵀ.

a_nl are the layer inputs at weight-sharing position l (Conv2d: the unfolded
input patches, ``torch.nn.functional.unfold``; a Linear applied to (B, ..., D_in)
shares its weight over the middle dimensions; a plain Linear has L = 1), and
g_nkl the gradient of the output column S_n[:, k]ᵀ f(x_n) in the layer's output
at position l, with S from :class:`posthoc.curvature.OutputFactors`
(S_n S_nᵀ = Γ_n for the GGN). So the N sits in G and H_l ≈ G_l ⊗ A_l
approximates the *sum* over examples of the per-example curvature; for one
example and L = 1 it is exact.

Which layers get factors is :func:`posthoc.curvature.layers.layer_kind`, the
one decision the per-layer routes share: ``nn.Linear`` (peft LoRA's ``lora_A``
and ``lora_B`` are nn.Linear; with the base model frozen, ``requires_grad``
leaves only the adapters covered), transformers' ``Conv1D`` (GPT-2), a Linear
whose weight is stored (D_in, D_out), so the same factors with its block
A ⊗ G in storage order (:attr:`KronLayer.transposed`), and ``nn.Conv2d`` with
groups = 1, zero padding given as integers, "valid" or symmetric "same".

Agreement with curvlinops 3.0.1: A equals its input covariance for any loss
reduction; G equals its gradient covariance with ``fisher_type="type-2"`` for
``CrossEntropyLoss(reduction="sum")`` exactly, while for
``MSELoss(reduction="sum")`` its G is twice ours (its loss Σ(f−y)² is twice the
Gaussian negative log-likelihood at σ = 1 that our curvature is stored at).
Read its factors from ``op.state_dict()["input_covariances"]`` and
``["gradient_covariances"]`` after ``op.compute_kronecker_factors()``.

Covered parameters outside such a layer fall back to an exact diagonal
GGN block, diag(Σ_n Σ_k (J_nᵀ s_nk)²) restricted to those entries, from
per-example gradients of only those parameters (:mod:`posthoc.curvature.fallback`,
memory B·K·P_fb per chunk of examples, never B·K·P). This covers
BatchNorm/LayerNorm/GroupNorm affine parameters (their exact diagonal from the
layer's recorded input and output gradients in the same pass,
:mod:`posthoc.curvature.norm_affine`, where the layer is called once and
BatchNorm uses running statistics), ``nn.Embedding`` weights (their exact
diagonal from segment sums of the output gradients recorded in the same pass,
:mod:`posthoc.curvature.embedding`, O(B·L·D); a Kronecker block would need a
V × V input factor),
``nn.MultiheadAttention``'s ``in_proj_weight``/``in_proj_bias`` (raw Parameters
of the attention module, read functionally) and its ``out_proj`` (a Linear whose
weight is used without calling the module), and also layers KFAC cannot treat:
a Conv2d with groups > 1, another padding mode or asymmetric padding, any layer
not called exactly once through its own forward per model call (reused layers),
and any layer whose covered weight or bias is read more than once per model call
(a Parameter held by two modules, ``dec.weight = enc.weight``; a weight tied to
a functional use such as an output head that is also the embedding, or an
encoder weight reused transposed), found by one probe forward
(:func:`posthoc.curvature.jacobians.parameter_uses`). A shared parameter's
per-example gradient is the sum over its uses, which one layer's inputs and
output gradients cannot give; its diagonal block is exact.

Cost per batch of B examples with K output factor columns: one forward, K
backward passes to the layer outputs (no parameter gradients), and the factor
products O(B·L·(D_in² + K·D_out²)) per layer (a Conv2d's input factor about
kh times fewer, :func:`posthoc.utils.conv.conv_input_gram`). Inputs and output
gradients are kept channels first, (B, D, L), the layout unfold and Conv2d
produce, so the products need no transposed copies.
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable, Iterable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from posthoc.curvature.embedding import embedding_route_ok, embedding_squared_gradients
from posthoc.curvature.fallback import RestrictedSubset
from posthoc.curvature.jacobians import parameter_uses
from posthoc.curvature.layers import (
    LayerRecord,
    channels_first,
    input_gram,
    layer_kind,
    out_dim,
    patches,
    record_layers,
    weight_is_transposed,
)
from posthoc.curvature.layers import positions as layer_positions
from posthoc.curvature.norm_affine import norm_route_ok, norm_squared_gradients, normalised_input
from posthoc.curvature.output_factors import OutputFactors
from posthoc.distributed import sum_count, sum_over_ranks
from posthoc.network.inputs import ModelInputs, batch_size, take
from posthoc.network.subset import ParameterSubset
from posthoc.utils.linalg import gram


class KFACApproximation(str, Enum):
    """How weight sharing (Conv2d positions, Linear over sequences) enters the factors."""

    EXPAND = "expand"
    REDUCE = "reduce"


@dataclass(frozen=True)
class KronLayer:
    """A layer of ``subset.module`` whose covered weight/bias get Kronecker blocks (:func:`layer_kind`).

    ``weight``/``bias`` index ``subset.blocks`` (None when not covered).
    """

    name: str
    module: nn.Module
    weight: int | None
    bias: int | None

    @property
    def block_indices(self) -> list[int]:
        """The covered blocks of this layer: weight then bias, where covered."""
        return [b for b in (self.weight, self.bias) if b is not None]

    @property
    def transposed(self) -> bool:
        """Whether the weight is stored (D_in, D_out) (transformers' Conv1D), so its block is A ⊗ G in storage order."""
        return weight_is_transposed(self.module)


def _layers_with_weight_and_bias(subset: ParameterSubset, accepts: Callable[[nn.Module], bool]) -> list[KronLayer]:
    """The layers ``accepts`` admits that own a covered weight or bias, in block order (their block indices)."""
    layers: dict[str, dict[str, int]] = {}
    modules: dict[str, nn.Module] = {}
    for index, block in enumerate(subset.blocks):
        if block.kind in ("weight", "bias") and accepts(block.layer):
            layers.setdefault(block.layer_name, {})[block.kind] = index
            modules[block.layer_name] = block.layer
    return [KronLayer(name, modules[name], kinds.get("weight"), kinds.get("bias")) for name, kinds in layers.items()]


def candidate_layers(subset: ParameterSubset) -> list[KronLayer]:
    """Layers of a :class:`~posthoc.curvature.layers.LayerKind` with a covered weight or bias, in block order.

    No probing: :func:`probe_layers` decides which of them are called once. Cost: O(number of blocks).
    """
    return _layers_with_weight_and_bias(subset, lambda module: layer_kind(module) is not None)


def candidate_embeddings(subset: ParameterSubset) -> list[KronLayer]:
    """Embeddings with a covered weight for the segment-sum diagonal (:mod:`posthoc.curvature.embedding`)."""
    return [KronLayer(block.layer_name, block.layer, index, None) for index, block in enumerate(subset.blocks)
            if block.kind == "weight" and embedding_route_ok(block.layer)]


def candidate_norms(subset: ParameterSubset) -> list[KronLayer]:
    """Normalisation layers with a covered γ or β for the tapped diagonal (:mod:`posthoc.curvature.norm_affine`)."""
    return _layers_with_weight_and_bias(subset, norm_route_ok)


def layers_by_name(subset: ParameterSubset, names: Iterable[str], embeddings: bool = False,
                   norms: bool = False) -> list[KronLayer]:
    """The KronLayers (with ``embeddings`` the embedding layers, with ``norms`` the norm layers) of ``names``."""
    pool = candidate_embeddings(subset) if embeddings else candidate_norms(subset) if norms else \
        candidate_layers(subset)
    found = {layer.name: layer for layer in pool}
    missing = [n for n in names if n not in found]
    if missing:
        what = "nn.Embedding" if embeddings else "BatchNorm/LayerNorm/GroupNorm" if norms else "Linear/Conv1D/Conv2d"
        raise ValueError(f"layers {missing} are not covered {what} modules of this model")
    return [found[n] for n in names]


def fallback_blocks(subset: ParameterSubset, layers: list[KronLayer]) -> list[int]:
    """Indices of the covered blocks not in a Kronecker layer (diagonal fallback)."""
    in_kron = {b for layer in layers for b in layer.block_indices}
    return [i for i in range(len(subset.blocks)) if i not in in_kron]


@torch.no_grad()
def probe_layers(subset: ParameterSubset, inputs: ModelInputs, item_rows: bool = False
                 ) -> tuple[list[KronLayer], dict[str, int], list[KronLayer], list[KronLayer]]:
    """The candidate layers called exactly once per forward whose covered weight and bias are read only there.

    :func:`posthoc.curvature.jacobians.parameter_uses` counts the reads: a layer used twice, or whose Parameter
    is shared with another module or a functional use, is left to the generic exact diagonal fallback, and so
    is a layer whose output does not have one row per example (GPT-2's position embedding of (1, L) ids).

    With ``item_rows`` a Linear/Conv layer with m·B output rows (m ≥ 2) is kept too (:func:`kfac_factors`).

    Returns the kept Kronecker layers, the weight-sharing positions L of every kept layer, the kept
    embeddings (:func:`candidate_embeddings`) and the kept normalisation layers (:func:`candidate_norms`).
    Cost: one forward pass on ``inputs`` and one with a graph on its first example.
    """
    calls: dict[str, list[int]] = {}
    handles = []
    candidates = candidate_layers(subset)
    embeddings = candidate_embeddings(subset)
    norms = candidate_norms(subset)
    batch = batch_size(inputs)
    kron_names = {layer.name for layer in candidates}
    for layer in candidates + embeddings + norms:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor, name: str = layer.name) -> None:
            calls.setdefault(name, []).append(layer_positions(module, output))
            items = item_rows and _item_rows(output.shape[0], batch) and name in kron_names
            if output.shape[0] != batch and not items:  # not per example (e.g. broadcast): never "called once"
                calls[name].append(0)
        handles.append(layer.module.register_forward_hook(hook))
    try:
        subset.forward(inputs)
    finally:
        for h in handles:
            h.remove()
    uses = parameter_uses(subset, take(inputs, 0, 1))

    def once(layer: KronLayer) -> bool:
        """Called once, per example, and its covered parameters read only there."""
        return len(calls.get(layer.name, [])) == 1 and all(uses[b] == 1 for b in layer.block_indices)

    kept, kept_embeddings = [layer for layer in candidates if once(layer)], [e for e in embeddings if once(e)]
    kept_norms = [norm for norm in norms if once(norm)]
    _warn_not_per_example([model_layer_name(subset, layer.name) for layer in candidates
                           if 0 in calls.get(layer.name, [])])
    return (kept, {layer.name: calls[layer.name][0] for layer in kept + kept_embeddings + kept_norms},
            kept_embeddings, kept_norms)


def _item_rows(rows: int, batch: int) -> bool:
    """Whether a layer output of ``rows`` rows for ``batch`` examples holds m ≥ 2 item rows per example."""
    return rows > batch and rows % batch == 0


def model_layer_name(subset: ParameterSubset, name: str) -> str:
    """A layer's name in the model, quoted, for messages: ``name`` is relative to ``subset.module``.

    A covered last layer is ``subset.module`` itself (``name`` is ""), so its name is ``subset.last_layer_name``.
    """
    full = ".".join(part for part in (subset.last_layer_name or "", name) if part)
    return repr(full) if full else "(the model itself)"


def _warn_not_per_example(names: list[str]) -> None:
    """Say that Kronecker-eligible layers got exact diagonal blocks because their outputs are not one row per example.

    E.g. reward modelling runs the network on the (2B, d) items of B pairs, or a position embedding of (1, L) ids
    broadcasts over the batch: "kron" is then the exact diagonal GGN for those layers, a coarser posterior than
    the user asked for, so it is said rather than left silent.
    """
    if names:
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        warnings.warn(f"hessian_structure 'kron' / 'ekfac': the layers {shown} have outputs that are not one row "
                      "per example (e.g. reward modelling's pairs, or a broadcast position embedding), so they get "
                      "their exact diagonal GGN block instead of Kronecker factors", UserWarning, stacklevel=3)


def check_single_use(subset: ParameterSubset, layers: list[KronLayer], inputs: ModelInputs) -> None:
    """Raise ValueError if a Kronecker layer's covered weight or bias is read more than once per forward.

    Reads are counted on ``inputs`` (e.g. a state dict fitted before shared parameters were detected, or a model
    changed since). Cost: one forward pass with a graph on the first example.
    """
    uses = parameter_uses(subset, take(inputs, 0, 1))
    shared = {subset.blocks[b].name: uses[b] for layer in layers for b in layer.block_indices if uses[b] != 1}
    if shared:
        raise ValueError(
            f"parameters with Kronecker blocks are not read exactly once per forward pass (name: reads) {shared} "
            "(shared or tied weights, or a changed model), so their blocks miss part of the curvature and the "
            "predictive misses part of the Jacobian; fit again on this model, which gives a shared parameter its "
            "exact diagonal block")


@dataclass
class TappedForward:
    """Outputs of one forward pass with the Kronecker layers' inputs and output handles recorded.

    A :class:`posthoc.curvature.layers.LayerRecord` (inputs of weight layers only) with the per-layer views
    KFAC, EKFAC and the Kronecker glm predictive read.
    """

    record: LayerRecord
    layers: dict[str, KronLayer]
    _patches: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def outputs(self) -> torch.Tensor:
        """The model's outputs (B, C), with a graph to the recorded layer outputs."""
        return self.record.outputs

    @property
    def inputs(self) -> dict[str, torch.Tensor]:
        """Detached copies of the weight layers' inputs, by layer name."""
        return self.record.inputs

    def patches(self, name: str) -> torch.Tensor:
        """The layer's inputs per weight-sharing position, (B, D_in, L), unfolded once on first use."""
        if name not in self._patches:
            self._patches[name] = patches(self.layers[name].module, self.inputs[name])
        return self._patches[name]

    def input_gram(self, name: str) -> torch.Tensor:
        """Σ over examples and positions of a aᵀ for the layer's inputs a: (D_in, D_in) (:func:`input_gram`)."""
        return input_gram(self.layers[name].module, self.inputs[name])

    def column_gradients(self, cotangents: torch.Tensor, retain_graph: bool) -> Iterator[dict[str, torch.Tensor]]:
        """For each column k of ``cotangents`` (B, C, K): g (B, D_out, L) per layer (views).

        g is the gradient of Σ_n cotangents[n, :, k]ᵀ f(x_n) in the layer outputs. One backward pass per column,
        to the layer outputs only; the graph is kept after the last one if ``retain_graph``.
        """
        names = list(self.record.leaves)
        n_cols = cotangents.shape[2]
        for k in range(n_cols if names else 0):
            grads = torch.autograd.grad(self.outputs, [self.record.leaves[n] for n in names],
                                        grad_outputs=cotangents[:, :, k], retain_graph=retain_graph or k < n_cols - 1,
                                        allow_unused=True, materialize_grads=True)
            yield {name: channels_first(self.layers[name].module, g) for name, g in zip(names, grads, strict=True)}

    def output_gradients(self, cotangents: torch.Tensor, retain_graph: bool) -> dict[str, torch.Tensor]:
        """:meth:`column_gradients` stacked: g (B, K, D_out, L) per layer (contiguous)."""
        out: dict[str, torch.Tensor] = {}
        n_cols = cotangents.shape[2]
        for k, grads in enumerate(self.column_gradients(cotangents, retain_graph)):
            for name, g in grads.items():
                if name not in out:
                    out[name] = g.new_empty(g.shape[0], n_cols, *g.shape[1:])
                out[name][:, k] = g
        return out


def tapped_forward(subset: ParameterSubset, layers: list[KronLayer], inputs: ModelInputs,
                   item_rows: bool = False) -> TappedForward:
    """Forward pass at the MAP recording what KFAC, EKFAC and the Kronecker glm predictive need.

    ``layers`` must each be called once per forward (see :func:`probe_layers`); a second call raises
    RuntimeError. Outputs must have one row per example, or with ``item_rows`` (KFAC's factor pass only) a
    multiple of the batch. Cost: one forward pass, a copy of each weight layer's input (:func:`record_layers`).
    """
    by_name = {layer.name: layer for layer in layers}
    record = record_layers(lambda: subset.forward(inputs), {n: layer.module for n, layer in by_name.items()},
                           [n for n, layer in by_name.items() if layer.weight is not None or norm_route_ok(layer.module)],
                           refuse_reuse=True)
    batch = batch_size(inputs)
    broadcast = record.not_per_example(batch)
    items = [name for name in broadcast if record.leaves[name].ndim > 0
             and _item_rows(record.leaves[name].shape[0], batch)]
    if items and not item_rows:
        raise ValueError(f"layers {items} have {record.leaves[items[0]].shape[0]} output rows for {batch} inputs "
                         "here; their Kronecker blocks were fitted with their rows read as examples (e.g. reward "
                         "modelling's pairs), and the glm predictive needs one row per input: predict on single items")
    broadcast = [name for name in broadcast if not (item_rows and name in items)]
    if broadcast:
        raise RuntimeError(
            f"layers {broadcast} have outputs that are not per example in this forward pass (broadcast over the "
            "batch), but their Kronecker or embedding blocks were fitted as per-example layers (on a first batch "
            "of one example?); fit again on batches of at least two examples, which sends them to the exact "
            "diagonal fallback")
    return TappedForward(record, by_name)


def gradient_elements(layers: list[KronLayer], positions: dict[str, int]) -> int:
    """Elements of one example's output gradients over all layers, Σ_l D_out·L (for memory budgets)."""
    return sum(out_dim(layer.module) * positions[layer.name] for layer in layers)


def rotated_weight_gradients(g: torch.Tensor, a: torch.Tensor, q_out: torch.Tensor, q_in: torch.Tensor) -> torch.Tensor:
    """Per-example weight gradients in the eigenbasis, Q_Gᵀ (Σ_l g_l a_lᵀ) Q_A: (B, K, D_out, D_in).

    g (B, K, D_out, L) contiguous, a (B, D_in, L). Rotates the factors first
    (cost B·L·(K·D_out² + D_in²)) or the products (B·K·D_out·D_in·(D_out + D_in)),
    whichever is cheaper, plus the products themselves, B·K·L·D_out·D_in.
    """
    n, k, d_out, n_pos = g.shape
    d_in = a.shape[1]
    if n_pos * (k * d_out**2 + d_in**2) <= k * d_out * d_in * (d_out + d_in):
        g = torch.matmul(q_out.T, g)
        a = torch.matmul(q_in.T, a)
        return torch.bmm(g.reshape(n, k * d_out, n_pos), a.mT).view(n, k, d_out, d_in)
    prod = torch.bmm(g.reshape(n, k * d_out, n_pos), a.mT) @ q_in
    return torch.matmul(q_out.T, prod.view(n, k, d_out, d_in))


@dataclass
class KFACFactors:
    """Result of one KFAC pass.

    ``input_factors[name]`` A (D_in, D_in) for layers with a covered weight;
    ``output_factors[name]`` G (D_out, D_out) for every layer; ``fallback_diag``
    (P_fb,) the exact diagonal GGN of ``fallback`` blocks (in their theta order);
    ``positions[name]`` L (Kronecker layers and embeddings); ``n_outputs`` C;
    ``embeddings`` the fallback embeddings whose diagonal came from segment sums; ``norms`` the fallback
    normalisation layers whose diagonal came from their recorded inputs and output gradients.
    """

    layers: list[KronLayer]
    input_factors: dict[str, torch.Tensor]
    output_factors: dict[str, torch.Tensor]
    fallback: list[int]
    fallback_diag: torch.Tensor
    positions: dict[str, int]
    n_data: int
    n_outputs: int
    embeddings: list[KronLayer] = field(default_factory=list)
    norms: list[KronLayer] = field(default_factory=list)


def _first_and_rest(batches: Iterable[tuple[ModelInputs, torch.Tensor]]
                    ) -> tuple[tuple[ModelInputs, torch.Tensor], Iterator[tuple[ModelInputs, torch.Tensor]]]:
    it = iter(batches)
    try:
        first = next(it)
    except StopIteration:
        raise ValueError("cannot fit the curvature on an empty data loader") from None
    return first, itertools.chain([first], it)


def kfac_factors(subset: ParameterSubset, batches: Iterable[tuple[ModelInputs, torch.Tensor]],
                 factors: OutputFactors, approximation: KFACApproximation = KFACApproximation.EXPAND,
                 progress: bool = True, desc: str = "Laplace fit (kron)", item_rows: bool = False) -> KFACFactors:
    """Accumulate the KFAC factors and the diagonal fallback over one pass of ``batches``.

    ``batches`` yields (inputs of ``subset.module``, targets). Run with the
    model in eval mode (the per-example curvature assumes examples do not
    interact, as in BatchNorm's training mode they would).

    ``item_rows``: a layer with m·B output rows for B examples (e.g. reward modelling's pairs flattened to (2B, d))
    gets A = Σ_rows a aᵀ / N and G = Σ_rows Σ_k g gᵀ, laplace-torch 0.3's factors (curvlinops divides by the N of
    the data set); without it, its exact diagonal block. Expand only (reduce needs each example's rows).
    """
    if item_rows and approximation is KFACApproximation.REDUCE:
        raise ValueError("item_rows=True reads a layer's rows as examples, which the 'reduce' approximation cannot "
                         "(it averages the positions of one example): use kfac_approx='expand'")
    first, stream = _first_and_rest(batches)
    layers, positions, embeddings, norms = probe_layers(subset, first[0], item_rows)
    fallback = fallback_blocks(subset, layers)
    by_segments = {e.name: (e.weight, e.module) for e in embeddings if e.weight is not None
                   and isinstance(e.module, nn.Embedding)}
    by_norm = {norm.name: norm for norm in norms}
    generic = tapped_fallback_excluded(fallback, embeddings, norms)
    restricted = RestrictedSubset(subset, generic) if generic else None
    a_sum: dict[str, torch.Tensor] = {}
    g_sum: dict[str, torch.Tensor] = {}
    diags = {i: torch.zeros(subset.blocks[i].numel, dtype=subset.dtype, device=subset.device) for i in fallback}
    n_data, n_outputs = 0, 0
    reduce = approximation is KFACApproximation.REDUCE
    for inputs, targets in tqdm(stream, desc=desc, disable=not progress, leave=False):
        record = tapped_forward(subset, layers + embeddings + norms, inputs, item_rows)
        s = factors(record.outputs.detach(), targets)  # (B, C, K)
        x_hats = {norm.name: normalised_input(norm.module, record.inputs[norm.name]) for norm in norms}
        n_data += batch_size(inputs)
        n_outputs = record.outputs.shape[1]
        for name in (layer.name for layer in layers if layer.weight is not None):
            if reduce:
                term = gram(record.patches(name).mean(-1, keepdim=True))
            else:
                term = record.input_gram(name) / positions[name]
            a_sum[name] = a_sum[name] + term if name in a_sum else term
        for grads in record.column_gradients(s, retain_graph=False):
            for name, g in grads.items():  # (B, D_out, L)
                if name in by_segments:
                    index, module = by_segments[name]
                    diags[index] += embedding_squared_gradients(record.inputs[name], g, module)
                    continue
                if name in by_norm:
                    norm = by_norm[name]
                    for block, term in zip((norm.weight, norm.bias), norm_squared_gradients(x_hats[name], g),
                                           strict=True):
                        if block is not None:
                            diags[block] += term
                    continue
                term = gram(g.sum(-1, keepdim=True)) if reduce else gram(g)
                g_sum[name] = g_sum[name] + term if name in g_sum else term
        del record
        if restricted is not None:
            parts = torch.split(restricted.squared_factor_gradients(inputs, s), [subset.blocks[i].numel for i in generic])
            for index, part in zip(generic, parts, strict=True):
                diags[index] += part
    diag = torch.cat([diags[i] for i in fallback]) if fallback else torch.zeros(0, dtype=subset.dtype,
                                                                                device=subset.device)
    a_sum, g_sum, diag, n_data = _sum_factors_over_ranks(a_sum, g_sum, diag, n_data)
    a_factors = {name: a / n_data for name, a in a_sum.items()}
    return KFACFactors(layers, a_factors, g_sum, fallback, diag, positions, n_data, n_outputs, embeddings, norms)


def tapped_fallback_excluded(fallback: list[int], embeddings: list[KronLayer], norms: list[KronLayer]) -> list[int]:
    """The fallback blocks left to the generic per-example route: not an embedding's or a norm layer's."""
    tapped = {e.weight for e in embeddings} | {i for norm in norms for i in norm.block_indices}
    return [i for i in fallback if i not in tapped]


def _sum_factors_over_ranks(a_sum: dict[str, torch.Tensor], g_sum: dict[str, torch.Tensor], diag: torch.Tensor,
                            n_data: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor, int]:
    """Under torch.distributed, the factor sums and the example count over all ranks (one all-reduce)."""
    names_a, names_g = list(a_sum), list(g_sum)
    summed = sum_over_ranks([a_sum[n] for n in names_a] + [g_sum[n] for n in names_g] + [diag], "the KFAC factors")
    n_total = sum_count(n_data, "the number of training examples")
    return (dict(zip(names_a, summed[:len(names_a)], strict=True)),
            dict(zip(names_g, summed[len(names_a):-1], strict=True)), summed[-1], n_total)
