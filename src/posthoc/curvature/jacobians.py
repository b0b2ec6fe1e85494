"""Jacobian products of a ParameterSubset's outputs in theta, via torch.func.

J(x) is the (C, P) Jacobian of the covered module's outputs in theta at the MAP. Inputs are any
:data:`posthoc.network.inputs.ModelInputs` (tensors, tuples, mappings). Per-example Jacobians vmap over the
examples, or loop over them when the forward pass reads tensor values into Python (Hugging Face's
attention masks; :meth:`ParameterSubset.vmap_examples`): the loop costs B forward passes of one example
instead of one vectorised call, the same backward work.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch.func import jacrev, jvp, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_map

from posthoc.curvature.layers import LayerKind, channels_first, layer_kind, patches, record_layers
from posthoc.curvature.norm_affine import norm_route_ok, normalised_input
from posthoc.network.inputs import ModelInputs, batch_size, take
from posthoc.network.subset import ParameterSubset


def _one_example(x: ModelInputs) -> ModelInputs:
    """Inside vmap: one example (no batch dimension) given back its batch dimension of 1."""
    return tree_map(lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t, x)


def per_example_jacobians(subset: ParameterSubset, inputs: ModelInputs, theta: torch.Tensor | None = None,
                          chunk_size: int | None = None) -> torch.Tensor:
    """J for each input: (B, C, P). Memory B*C*P: use for small P or small batches.

    Computed as a vmap over examples (or a loop, see the module docstring) of reverse-mode jacrev
    (C backward passes each).
    """
    theta = subset.theta_map if theta is None else theta
    if not subset.vmap_examples(inputs):
        return torch.stack([jacrev(lambda th, n=n: subset.forward(take(inputs, n, n + 1), th)[0])(theta)
                            for n in range(batch_size(inputs))])

    def single(x: ModelInputs) -> torch.Tensor:
        return jacrev(lambda th: subset.forward(_one_example(x), th).squeeze(0))(theta)

    return vmap(single, chunk_size=chunk_size)(inputs)


@contextmanager
def forward_mode_attention() -> Iterator[None]:
    """Within the block, attention runs on kernels that have forward-mode derivatives; restored on exit.

    nn.MultiheadAttention's eval-mode fast path (``aten::_native_multi_head_attention``; torchvision's
    VisionTransformer) and the fused kernels of ``scaled_dot_product_attention`` (CPU flash attention; Hugging
    Face's default "sdpa" attention) have none: the fast path is switched off and SDPA restricted to its math
    kernel, which compute the same attention up to round-off (at the math kernel's O(L²) memory per head).
    """
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def jvp_many(subset: ParameterSubset, inputs: ModelInputs, directions: torch.Tensor) -> torch.Tensor:
    """J(x) V for K directions V (K, P): returns (K, B, C). Cost: K forward-mode passes (vmapped).

    Attention runs on kernels with forward-mode derivatives (:func:`forward_mode_attention`).

    Raises:
        NotImplementedError: another operation of the model has no forward-mode derivative, naming the fixes.
    """

    def one(v: torch.Tensor) -> torch.Tensor:
        return jvp(lambda th: subset.forward(inputs, th), (subset.theta_map,), (v,))[1]

    try:
        with forward_mode_attention():
            return vmap(one)(directions)
    except NotImplementedError as err:
        if "forward AD" not in str(err):
            raise
        raise NotImplementedError(
            f"the model uses an operation without a forward-mode derivative in this PyTorch ({err}); structures "
            "built on JVPs (lowrank, ScaLLA) need one: replace that operation (e.g. by plain tensor ops), or use "
            "hessian_structure 'full', 'diag' or 'kron'") from err


def vjp_sum(subset: ParameterSubset, inputs: ModelInputs, cotangents: torch.Tensor) -> torch.Tensor:
    """sum_n J(x_n)^T u_n for cotangents U (B, C): returns (P,). Cost: one backward pass."""
    pullback = vjp(lambda th: subset.forward(inputs, th), subset.theta_map)[1]
    return pullback(cotangents)[0]


def per_example_factor_gradients(subset: ParameterSubset, inputs: ModelInputs, factors: torch.Tensor,
                                 chunk_size: int | None = None) -> torch.Tensor:
    """J_n^T S_n for every example: (B, K, P) from factors S (B, C, K).

    A vmap over examples (or a loop, see the module docstring) and the K columns of S of one VJP each;
    memory B*K*P.
    """

    def pulled(x: ModelInputs, s: torch.Tensor) -> torch.Tensor:
        pullback = vjp(lambda th: subset.forward(x, th).squeeze(0), subset.theta_map)[1]
        return vmap(lambda col: pullback(col)[0])(s.T)

    if not subset.vmap_examples(inputs):
        return torch.stack([pulled(take(inputs, n, n + 1), factors[n]) for n in range(batch_size(inputs))])
    return vmap(lambda x, s: pulled(_one_example(x), s), chunk_size=chunk_size)(inputs, factors)


def parameter_uses(subset: ParameterSubset, inputs: ModelInputs) -> list[int]:
    """How many operations of one forward pass on ``inputs`` read each covered parameter tensor, in block order.

    A parameter read more than once (a layer called twice, two modules holding the same Parameter, a weight tied
    to another use such as an embedding reused as the output head, ``F.linear(h, emb.weight)``) has a per-example
    gradient summed over its uses, so routes that read one layer input and one layer output per parameter miss
    part of it. Counted as the edges into each parameter's gradient accumulator in the autograd graph of one
    forward pass at the MAP on fresh leaves (no gradient is computed; tied names share one leaf, as in
    :meth:`ParameterSubset.forward`). Cost: one forward pass with a graph; pass one example.
    """
    leaves = {name: p.detach().clone().requires_grad_(True)
              for name, p in subset.unflatten(subset.theta_map).items()}
    position = {id(leaf): k for k, leaf in enumerate(leaves.values())}
    uses = [0] * len(leaves)
    with torch.enable_grad():  # callers may run under no_grad (prediction)
        outputs = subset.forward_with(leaves, inputs)
    stack, seen = [outputs.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))  # the graph is alive while `outputs` is, so node ids are not reused
        for child, _ in node.next_functions:
            variable = getattr(child, "variable", None)  # set on the gradient accumulator of a leaf
            if variable is not None:
                if id(variable) in position:
                    uses[position[id(variable)]] += 1
            elif child is not None:
                stack.append(child)
    return uses


# --- Per-example squared gradients without a (B, K, P) tensor where the layers allow ---------------------------
#
# For a Linear or Conv2d layer the per-example gradient of J_n^T s is sum_l g_l (x) a_l over positions l (output-side
# gradient (x) layer input, the input unfolded for Conv2d). The two helpers below reduce these per-example gradients
# layer by layer: a Linear layer on 2-D inputs (one position) never materialises them (closed forms in g^2 and a^2), a
# layer with several positions materialises one layer's (K, b, O, I) block per chunk of b examples, or, when it has
# few positions (late conv stages), sums over position pairs instead (position_pairs_cheaper). A normalisation layer's
# γ has the per-example gradient sum_l g_l * x̂_l (elementwise, with x̂ its normalised input:
# posthoc.curvature.norm_affine), its β sum_l g_l, so BatchNorm (eval mode), LayerNorm and GroupNorm ride along with
# the same signals. Covered parameters outside these layers, and networks where a covered parameter is read more than
# once per forward (a layer called twice, a Parameter shared by two modules or tied to a functional use:
# parameter_uses), fall back to per-example VJPs of the whole network (per_example_factor_gradients), whose gradients
# sum every use: the result stays the exact diagonal.

DEFAULT_CHUNK_BYTES = 2**29  # working-memory budget of one chunk of examples (512 MiB)


def _covered_layers(subset: ParameterSubset) -> list[torch.nn.Module] | None:
    """The distinct layers owning the covered parameters, or None if one is not a Linear/Conv2d or norm layer.

    Linear/Conv2d: :func:`layer_kind`; normalisation layers: :func:`norm_route_ok`.
    """
    layers: list[torch.nn.Module] = []
    for block in subset.blocks:
        layer = block.layer
        readable = layer_kind(layer) in (LayerKind.LINEAR, LayerKind.CONV2D) or norm_route_ok(layer)
        if block.kind not in ("weight", "bias") or not readable:
            return None
        if not any(layer is seen for seen in layers):
            layers.append(layer)
    return layers


def _layer_signals(subset: ParameterSubset, inputs: ModelInputs, cotangents: torch.Tensor,
                   layers: list[torch.nn.Module]) -> dict[int, tuple[torch.Tensor, torch.Tensor]] | None:
    """For each layer, inputs a (b, L, I) and output gradients g (K, b, L, O) of the K columns of S (b, C, K).

    For a normalisation layer a is its normalised input x̂ (b, L, D), which γ multiplies elementwise (I = O = D).

    One forward pass and one backward pass vectorised over the K cotangents. Returns None when a layer is not
    called exactly once (weight sharing), which the callers handle by the generic route.
    """
    named = {str(k): layer for k, layer in enumerate(layers)}
    record = record_layers(lambda: subset.forward(inputs), named, named, refuse_reuse=False)
    if not record.called_once() or record.not_per_example(batch_size(inputs)):
        return None
    with torch.enable_grad():
        grads = torch.autograd.grad(record.outputs, [record.leaves[n] for n in named],
                                    grad_outputs=cotangents.permute(2, 0, 1).contiguous(), is_grads_batched=True)
    signals = {}
    for (name, layer), z_grad in zip(named.items(), grads, strict=True):
        n_cot, batch = z_grad.shape[:2]
        x = record.inputs[name]
        a = (normalised_input(layer, x) if norm_route_ok(layer) else patches(layer, x)).mT  # (b, L, I) row-major
        g = channels_first(layer, z_grad.flatten(0, 1)).mT  # (K·b, L, O)
        signals[id(layer)] = (a, g.reshape(n_cot, batch, *g.shape[1:]).detach())
    return signals


def _plan(subset: ParameterSubset, inputs: ModelInputs, n_cot: int,
          chunk_bytes: int) -> tuple[list[torch.nn.Module] | None, int]:
    """The layers of the fast route (None: generic route) and the examples per chunk within ``chunk_bytes``.

    The fast route needs every covered parameter in a supported Linear/Conv2d read exactly once per forward
    (:func:`parameter_uses`, probed on one example, like the layer signals). Memory of the fast route, per
    example: K * (inputs and outputs of all layers + the largest per-example block), probed on one example.
    Generic route: 2 K P (the per-example gradients and one elementwise product of them).
    """
    itemsize = subset.theta_map.element_size()
    layers = _covered_layers(subset)
    first = take(inputs, 0, 1)
    if layers is not None and any(n != 1 for n in parameter_uses(subset, first)):
        layers = None  # a shared parameter: its gradient sums uses the per-layer signals do not separate
    probe = None
    if layers is not None:
        with torch.no_grad():
            n_out = subset.forward(first).shape[-1]
        pair = take(inputs, 0, 2)  # two examples, so that a layer broadcast over the batch shows up
        zero = torch.zeros(batch_size(pair), n_out, 1, dtype=subset.dtype, device=subset.device)
        probe = _layer_signals(subset, pair, zero, layers)
    if probe is None:
        return None, max(1, chunk_bytes // (2 * n_cot * subset.n_params * itemsize))
    sizes = sum(g[0, 0].numel() + a[0].numel() for a, g in probe.values())
    largest = max(_block_numel(a.shape[1], g.shape[-1], a.shape[-1], n_cot) / n_cot
                  if a.shape[1] > 1 and layer_kind(layer) is not None else 0
                  for layer, (a, g) in zip(layers or [], probe.values(), strict=True))
    return layers, max(1, int(chunk_bytes // (n_cot * (sizes + largest) * itemsize)))


def position_pairs_cheaper(n_positions: int, n_cot: int) -> bool:
    """Whether a layer with L > 1 positions takes the position-pair route (:func:`squares_by_position_pairs`).

    Both routes give the same sums (up to round-off). The direct route forms the (K, b, O, I) per-example
    gradients, K L O I multiply-adds whose output writes bound it; the pair route costs about L² / 2 · O I in one
    large matmul. Measured on one core (float32): the pair route is faster while L (L + 1) < 2 K (L + 64), e.g.
    8.6× (squares) and 11× (glm grams) on a 4×4 map with 512 channels and K = 10, 0.35× and 0.5× on 8×8 with 256.
    """
    return n_positions * (n_positions + 1) < 2 * n_cot * (n_positions + 64)


def _block_numel(n_positions: int, n_out: int, n_in: int, n_cot: int) -> int:
    """Elements per example of the largest temporary of a layer's per-example block, by its route."""
    if position_pairs_cheaper(n_positions, n_cot):
        return n_positions * n_positions * (n_out + n_in) + n_cot * n_positions * n_out
    return n_cot * n_out * n_in


def squares_by_position_pairs(g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """sum_{k,n} (sum_l g_knlo a_nli)^2 for g (K, b, L, O), a (b, L, I): (O, I), without per-example gradients.

    The square of a sum over positions is a sum over position pairs (l, m): sum_{l,m} (sum_k g_klo g_kmo)
    (a_li a_mi). The pairs l <= m (off-diagonal ones twice) of every example stack into one (b M, O)^T (b M, I)
    matmul, M = L (L + 1) / 2.
    """
    n_positions = a.shape[1]
    first, second = torch.triu_indices(n_positions, n_positions, device=a.device)
    twice = torch.where(first == second, 1.0, 2.0).to(g.dtype)
    out_pairs = torch.einsum("knlo,knmo->nlmo", g, g)[:, first, second] * twice[:, None]  # (b, M, O)
    in_pairs = a[:, first] * a[:, second]  # (b, M, I)
    return out_pairs.flatten(0, 1).T @ in_pairs.flatten(0, 1)


def weighted_gram_by_position_pairs(g: torch.Tensor, a: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_{o,i} w_oi J_koi J_loi per example, J_koi = sum_l g_klo a_li: (b, K, K), without J.

    For g (K, b, L, O), a (b, L, I), weights (O, I): W_n[l, m, o] = sum_i w_oi a_nli a_nmi (one (b L², I) by
    (I, O) matmul), then sum over l, m, o of g_klo g_kmo W_n[l, m, o]. Differentiable in ``weights``.
    """
    n_positions = a.shape[1]
    in_pairs = (a[:, :, None, :] * a[:, None, :, :]).flatten(1, 2)  # (b, L², I)
    weighted = (in_pairs @ weights.T).unflatten(1, (n_positions, n_positions))  # (b, L, L, O)
    half = torch.einsum("knlo,nlmo->knmo", g, weighted)  # (K, b, L, O)
    return torch.einsum("knmo,jnmo->nkj", half, g)


def _full_size(subset: ParameterSubset) -> int:
    return sum(block.numel for block in subset.blocks)


def factor_gradient_squares(subset: ParameterSubset, inputs: ModelInputs, factors: torch.Tensor,
                            chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> torch.Tensor:
    """sum_n sum_k (J_n^T s_nk)^2 elementwise: (P,), for factors S (B, C, K).

    This is diag(sum_n J_n^T S_n S_n^T J_n). Linear/Conv2d networks: one forward and one K-batched backward per chunk
    plus, per layer with several positions, a (K, b, O, I) per-example gradient block (for Conv2d the cost of K
    weight-gradient passes) or, with few positions, one (O, b L²/2) by (b L²/2, I) matmul; a Linear layer on 2-D
    inputs costs an (O, I) matmul. Other networks: per-example VJPs of the whole network, (b, K, P) per chunk. Chunks
    of b examples keep the working memory under about ``chunk_bytes``.
    """
    layers, step = _plan(subset, inputs, factors.shape[-1], chunk_bytes)
    if layers is None:
        total = torch.zeros(subset.n_params, dtype=subset.dtype, device=subset.device)
        for start in range(0, batch_size(inputs), step):
            grads = per_example_factor_gradients(subset, take(inputs, start, start + step),
                                                 factors[start:start + step])
            total += grads.square_().sum((0, 1))  # grads is (b, K, P)
        return total
    full = torch.zeros(_full_size(subset), dtype=subset.dtype, device=subset.device)
    for start in range(0, batch_size(inputs), step):
        signals = _layer_signals(subset, take(inputs, start, start + step), factors[start:start + step], layers)
        assert signals is not None  # the call pattern of the layers does not depend on the inputs
        for block in subset.blocks:
            a, g = signals[id(block.layer)]
            if block.kind == "bias":
                part = g.sum(2).square().sum((0, 1))
            elif layer_kind(block.layer) is None:  # a normalisation layer's γ: elementwise, (K, b, D)
                part = (g * a).sum(2).square().sum((0, 1))
            elif a.shape[1] == 1:
                part = torch.einsum("kbo,bi->oi", g[:, :, 0].square(), a[:, 0].square())
            elif position_pairs_cheaper(a.shape[1], g.shape[0]):
                part = squares_by_position_pairs(g, a)
            else:
                part = torch.einsum("kblo,bli->kboi", g, a).square_().sum((0, 1))
            full[block.slice] += part.reshape(-1)
    return full if subset.indices is None else full[subset.indices]


def per_example_weighted_grams(subset: ParameterSubset, inputs: ModelInputs, weights: torch.Tensor,
                               chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> torch.Tensor:
    """J(x_n) diag(w) J(x_n)^T for each input: (B, C, C), differentiable in ``weights`` (P,).

    The glm covariance of a diagonal Gaussian. Linear layers on 2-D inputs need no per-example Jacobian
    (sum_{o,i} g_co g_do a_i^2 w_oi: one matmul); layers with several positions (Conv2d) materialise one
    layer's per-example Jacobian block (C, b, O, I) per chunk; other networks use per-example Jacobians of the
    whole network, (b, C, P) per chunk. Chunks of b examples keep the working memory under about ``chunk_bytes``.
    """
    with torch.no_grad():
        n_out = subset.forward(take(inputs, 0, 1)).shape[-1]
    layers, step = _plan(subset, inputs, n_out, chunk_bytes)
    if layers is not None and subset.indices is not None:
        full_w = torch.zeros(_full_size(subset), dtype=weights.dtype, device=weights.device)
        full_w = full_w.index_put((subset.indices,), weights)  # entries outside the subnetwork weigh 0
    else:
        full_w = weights
    eye = torch.eye(n_out, dtype=subset.dtype, device=subset.device)
    out = []
    for start in range(0, batch_size(inputs), step):
        x = take(inputs, start, start + step)
        b = batch_size(x)
        signals = None if layers is None else _layer_signals(subset, x, eye.expand(b, n_out, n_out), layers)
        if signals is None:
            jac = per_example_jacobians(subset, x)  # (b, C, P)
            out.append((jac * weights) @ jac.transpose(1, 2))
            continue
        gram = torch.zeros(b, n_out, n_out, dtype=torch.result_type(eye, weights), device=subset.device)
        for block in subset.blocks:
            a, g = signals[id(block.layer)]
            w = full_w[block.slice]
            if block.kind == "bias":
                gb = g.sum(2)
                gram = gram + torch.einsum("kbo,lbo->bkl", gb * w, gb)  # two operands: no (b, C, C, O) temporary
            elif layer_kind(block.layer) is None:  # a normalisation layer's γ
                gw = (g * a).sum(2)
                gram = gram + torch.einsum("kbo,lbo->bkl", gw * w, gw)
            elif a.shape[1] == 1:
                t = a[:, 0].square() @ w.reshape(g.shape[-1], -1).T  # (b, O)
                gram = gram + torch.einsum("kbo,lbo->bkl", g[:, :, 0] * t, g[:, :, 0])
            elif position_pairs_cheaper(a.shape[1], g.shape[0]):
                gram = gram + weighted_gram_by_position_pairs(g, a, w.reshape(g.shape[-1], a.shape[-1]))
            else:
                jb = torch.einsum("kblo,bli->kboi", g, a).flatten(2)  # (C, b, O*I)
                gram = gram + torch.einsum("kbp,lbp->bkl", jb * w, jb)
        out.append(gram)
    return torch.cat(out)
