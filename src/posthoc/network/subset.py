"""Which weights an estimator covers, and the network as a function of them.

The posterior is over a flat vector theta of P entries, in PyTorch's row-major
``parameters_to_vector`` order of the covered tensors (the notation of docs/laplace.md):

- ``all``: every parameter of the model that requires grad;
- ``last_layer``: the weight and bias of the model's last ``nn.Linear``: the
  last one *on the path to the output* in a forward pass (found with forward
  hooks on an example input, see :meth:`ParameterSubset.capture`),
  or the one named by ``last_layer_name``. Its inputs (the penultimate
  features) are computed once per batch by the model's own forward pass,
  captured with a forward pre-hook. Parameter-free operations after the layer
  belong to the covered function, so its outputs at theta* equal ``model(x)``;
  how they are evaluated (the "tail") is decided once, when the layer is
  located (:mod:`posthoc.network.last_layer`):

  * identity: the model returns the layer's output (the usual case): one Linear;
  * linear: a fixed per-example linear map of the layer's output (scaling,
    indexing or pooling over positions, reshapes), verified on the example and
    stored as a (C, numel of one example's layer output) matrix: one Linear
    and one small matmul. Only for floating-point inputs: integer inputs (token
    ids, masks) can choose the map without a gradient showing it (GPT-2 pools
    the last non-pad token), so such a tail is re-run;
  * rerun: anything else that depends only on the layer's output and the input
    (a softmax, a parameter-free skip connection, frozen layers): the covered
    function re-runs the whole model with the layer's weights replaced, so
    every evaluation costs one forward pass of the full network (the body is
    not differentiated, but it is recomputed).

  A layer whose weights require grad and that acts after the last Linear (or a
  path around it) is not parameter-free: it raises, naming the parameters and
  the fixes. Frozen parameters (``requires_grad=False``) count as constants;
- ``subnetwork``: chosen entries of the full vector (the rest stay at the MAP);
  positions, or a boolean mask with one entry per parameter.

Every forward pass of the model made here runs it in eval mode
(:func:`posthoc.utils.modes.eval_mode`), whatever mode the caller left it in.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch
from torch import nn
from torch.func import functional_call, vmap

from posthoc.network.inputs import ModelCall, ModelInputs, batch_size, concat, take
from posthoc.network.last_layer import Tail, classify_tail, last_linear_on_path, named_linears
from posthoc.network.probes import ExampleRoute, reads_tensor_values
from posthoc.utils.checkpoint import module_digest, module_tensors
from posthoc.utils.checks import check_choice
from posthoc.utils.modes import eval_mode


class SubsetOfWeights(str, Enum):
    """Which weights an estimator covers (see the module docstring)."""

    ALL = "all"
    LAST_LAYER = "last_layer"
    SUBNETWORK = "subnetwork"


@dataclass(frozen=True)
class ParamBlock:
    """One covered parameter tensor of ``ParameterSubset.module``.

    ``offset``/``numel`` locate it in the module's flat parameter vector (for
    ``subnetwork`` that is the full vector, not theta). ``kind`` is the
    attribute name on its layer ("weight", "bias", ...).
    """

    name: str
    layer_name: str
    layer: nn.Module
    kind: str
    shape: tuple[int, ...]
    offset: int
    numel: int

    @property
    def slice(self) -> slice:
        """The block's positions in the module's flat parameter vector."""
        return slice(self.offset, self.offset + self.numel)


def check_materialised(model: nn.Module) -> None:
    """Raise ValueError if a parameter or buffer of ``model`` is on the meta device (it has no values)."""
    meta = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t is not None and t.is_meta]
    if meta:
        raise ValueError(
            f"the model's {meta[0]!r} (and {len(meta) - 1} more) is on the meta device and holds no values; "
            "materialise and load the trained weights first (e.g. model.to_empty(device='cpu') then "
            "model.load_state_dict(checkpoint))"
        )


def _subnetwork_positions(indices: torch.Tensor, n_full: int) -> torch.Tensor:
    """Sorted positions (P,) from a LongTensor of positions or a boolean mask of length ``n_full``."""
    idx = torch.as_tensor(indices)
    if idx.dtype == torch.bool:
        if idx.numel() != n_full:
            raise ValueError(f"a boolean subnetwork_indices mask needs one entry per parameter ({n_full}), "
                             f"got {idx.numel()}")
        idx = torch.nonzero(idx.reshape(-1)).reshape(-1)
    elif idx.is_floating_point() or idx.is_complex():
        raise TypeError("subnetwork_indices must be integer positions (a LongTensor) or a boolean mask, "
                        f"got dtype {idx.dtype}")
    idx = idx.long().reshape(-1)
    if idx.numel() == 0 or int(idx.min()) < 0 or int(idx.max()) >= n_full:
        raise ValueError(f"subnetwork_indices must be non-empty positions in [0, {n_full - 1}]")
    if torch.unique(idx).numel() != idx.numel():
        raise ValueError("subnetwork_indices contains duplicate positions; give each position once")
    return torch.sort(idx).values


class ParameterSubset:
    """The covered parameters and a pure function ``forward(inputs, theta)``.

    Args:
        model: the trained network.
        subset_of_weights: "all", "last_layer" or "subnetwork".
        subnetwork_indices: for "subnetwork": positions in ``parameters_to_vector`` order (LongTensor), or a
            boolean mask with one entry per parameter.
        last_layer_name: for "last_layer": the name (as in ``model.named_modules()``) of the nn.Linear to
            cover; default: the last nn.Linear on the path to the output.
        example_inputs: for "last_layer": a batch of model inputs on which to locate the last layer now.
            Without it, the last registered nn.Linear (or ``last_layer_name``) is a provisional choice until
            ``capture(example_inputs)`` runs, as estimators do at ``fit``.
        model_call: how the model takes its inputs and gives its output (:class:`ModelCall`); default
            ``ModelCall(model)``: tensors, tuples and mappings in, tensor/tuple/mapping outputs read.
        per_example: how per-example Jacobians are taken (:mod:`posthoc.network.probes`): "auto" (vmap over
            examples unless one forward pass reads tensor values into Python), "vmap" or "loop".

    Attributes:
        module: the module whose parameters are covered (the whole model, or
            its last nn.Linear for ``last_layer``).
        blocks: covered parameter tensors of ``module`` in vector order.
        theta_map: (P,) MAP values of the covered entries (detached copy).
        indices: (P,) positions of theta in the module's flat vector
            (``subnetwork`` only, else None).
        last_layer_name: the covered nn.Linear's name (``last_layer`` only, else None).
        last_layer_located: False while the last layer is the provisional choice (``last_layer`` only).
        tail: how the covered function continues after the last Linear (``last_layer`` only).

    Raises:
        ValueError: a model on the meta device, no parameter that requires grad, bad subnetwork indices, no
            nn.Linear for ``last_layer``, or (when locating) a last layer followed by parameters.
    """

    def __init__(
        self,
        model: nn.Module,
        subset_of_weights: SubsetOfWeights | str = SubsetOfWeights.ALL,
        subnetwork_indices: torch.Tensor | None = None,
        last_layer_name: str | None = None,
        example_inputs: ModelInputs | None = None,
        model_call: ModelCall | None = None,
        per_example: ExampleRoute | str = ExampleRoute.AUTO,
    ) -> None:
        self.model = model
        self.call = ModelCall(model) if model_call is None else model_call
        if self.call.model is not model:
            raise ValueError("model_call must call the same model as the subset covers")
        self.per_example = check_choice(per_example, ExampleRoute, "per_example")
        self._vmap_examples: bool | None = None  # decided on first use when per_example is "auto"
        # outputs (B, ..., C) flattened to (B, L*C) for the curvature code (posthoc.network.positions)
        self.flatten_positions = False
        self.kind = check_choice(subset_of_weights, SubsetOfWeights, "subset_of_weights")
        check_materialised(model)
        is_last = self.kind is SubsetOfWeights.LAST_LAYER
        if not is_last and (last_layer_name is not None or example_inputs is not None):
            raise ValueError("last_layer_name and example_inputs are only used with subset_of_weights='last_layer'")
        self._requested_last_layer = last_layer_name
        self.last_layer_name: str | None = None
        self.last_layer_located = not is_last
        self.tail = Tail.IDENTITY
        self._tail_matrix: torch.Tensor | None = None
        if is_last:
            linears = named_linears(model)
            if not linears:
                raise ValueError("subset_of_weights='last_layer' needs an nn.Linear output layer; the model has none")
            if last_layer_name is not None and last_layer_name not in linears:
                raise ValueError(f"last_layer_name={last_layer_name!r} is not an nn.Linear of the model; "
                                 f"its nn.Linear layers are {', '.join(repr(n) for n in linears)}")
            # provisional until located by a forward pass: the last registered Linear that has trainable
            # parameters (a frozen one registered after the head must not fail the construction)
            trainable = [n for n, m in linears.items() if any(p.requires_grad for p in m.parameters())]
            provisional = (trainable or list(linears))[-1]
            self._set_module(last_layer_name if last_layer_name is not None else provisional)
        else:
            self._set_module(None)
        if self.kind is SubsetOfWeights.SUBNETWORK:
            if subnetwork_indices is None:
                raise ValueError("subset_of_weights='subnetwork' needs subnetwork_indices (a LongTensor of positions "
                                 "or a boolean mask)")
            self.indices: torch.Tensor | None = _subnetwork_positions(subnetwork_indices, self._n_full)
        else:
            if subnetwork_indices is not None:
                raise ValueError("subnetwork_indices is only used with subset_of_weights='subnetwork'")
            self.indices = None
        self.capture(example_inputs)

    def _set_module(self, layer_name: str | None) -> None:
        """Cover the whole model (None) or the nn.Linear ``layer_name``: sets module, blocks and the name map."""
        self.module = self.model if layer_name is None else dict(self.model.named_modules())[layer_name]
        self.last_layer_name = layer_name
        self._prefix = "" if not layer_name else layer_name + "."
        named = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        if not named:
            what = "the model" if layer_name is None else f"the last layer {layer_name!r}"
            raise ValueError(f"{what} has no parameters that require grad")
        modules = dict(self.module.named_modules())
        blocks, offset = [], 0
        for name, param in named:
            owner, _, attr = name.rpartition(".")
            blocks.append(ParamBlock(name, owner, modules[owner], attr, tuple(param.shape), offset, param.numel()))
            offset += param.numel()
        self.blocks: list[ParamBlock] = blocks
        self._names = [n for n, _ in named]
        self._n_full = offset

    # ----------------------------------------------------------------- locating the last layer
    def _locate_last_layer(self, example_inputs: ModelInputs) -> None:
        """Find the last layer and its tail from one forward pass of the model on ``example_inputs`` (B, ...).

        The last layer is the last nn.Linear, in call order, whose output the model's output depends on
        (forward hooks replace each Linear's output by a leaf tensor; autograd says which leaves the output
        reaches). So a head registered before the body, or an unused Linear registered last, is handled, and
        a Linear that does not run (e.g. an nn.MultiheadAttention's out_proj, read functionally) is never it.
        With ``last_layer_name`` that layer is checked instead. Then the tail is classified (identity, linear,
        rerun; see the module docstring). Called by :meth:`capture` when given inputs, which then reads theta*
        of the located layer. Cost: three or four forward passes and a few backward passes on up to 4 examples.

        Raises:
            ValueError: no nn.Linear feeds the output; the layer runs more than once per forward pass; the
                output depends on parameters that require grad other than through the layer.
        """
        x = take(example_inputs, 0, 4)
        if batch_size(x) == 1:  # two rows, so that a tail mixing examples shows up
            x = concat([x, x])
        with eval_mode(self.model), torch.enable_grad():
            name = self._requested_last_layer or last_linear_on_path(self.model, x, self.call)
            if name != self.last_layer_name:
                self._set_module(name)
            self.tail, self._tail_matrix = classify_tail(self.model, name, self.module, x, self.call)
        self.last_layer_located = True

    def last_layer_state(self) -> dict[str, object] | None:
        """The located last layer (name, tail, tail matrix) for a state dict; None unless ``last_layer``."""
        if self.kind is not SubsetOfWeights.LAST_LAYER:
            return None
        return {"name": self.last_layer_name, "located": self.last_layer_located, "tail": self.tail.value,
                "matrix": self._tail_matrix}

    def load_last_layer_state(self, state: dict[str, object]) -> None:
        """Inverse of :meth:`last_layer_state` (raises ValueError if the model has no such nn.Linear)."""
        name = state["name"]
        if name not in named_linears(self.model):
            raise ValueError(f"the state covers the last layer {name!r}, which is not an nn.Linear of this model")
        if name != self.last_layer_name:
            self._set_module(name)
        self.tail = Tail(state["tail"])
        self._vmap_examples = None  # whether vmap over examples is safe depends on the tail: decided again
        matrix = state["matrix"]
        self._tail_matrix = None if matrix is None else torch.as_tensor(matrix).to(device=self.theta_map.device,
                                                                                   dtype=self.theta_map.dtype)
        self.last_layer_located = bool(state["located"])

    # ----------------------------------------------------------------- theta* and its staleness check
    def _tokens(self) -> list[tuple[int, int, tuple[int, ...]]]:
        """Where and how often each parameter and buffer of the whole model was written (no copy)."""
        return [(t.data_ptr(), t._version, tuple(t.shape)) for t in module_tensors(self.model)]

    def capture(self, example_inputs: ModelInputs | None = None) -> None:
        """Read theta* from the model's current weights (the MAP is the weights at ``fit``, not at construction).

        Also records the model's state (every parameter and buffer) so that :meth:`check_current` can tell when
        the weights changed afterwards. Cost: one copy of the covered entries and one hash of the model's state.
        For ``last_layer``, ``example_inputs`` (a batch of model inputs, e.g. the first training batch) first
        locates the last layer (:meth:`_locate_last_layer`); estimators pass it at the start of ``fit``.
        """
        check_materialised(self.model)
        if example_inputs is not None and self.kind is SubsetOfWeights.LAST_LAYER:
            self._locate_last_layer(example_inputs)
        named = dict(self.module.named_parameters())
        missing = [n for n in self._names if n not in named]
        if missing or [tuple(named[n].shape) for n in self._names] != [b.shape for b in self.blocks]:
            raise RuntimeError("the model's parameters changed shape or names since this object was built; "
                               "build it again for the new model")
        full = torch.cat([named[n].detach().reshape(-1) for n in self._names]).clone()
        self._full_map = full
        if self.indices is not None:
            self.indices = self.indices.to(full.device)
            self.theta_map = full[self.indices].clone()
        else:
            self.theta_map = full
        self._state_tokens = self._tokens()
        self._state_digest = module_digest(self.model)

    def check_current(self, action: str = "predict") -> None:
        """Raise RuntimeError if the model's weights or buffers changed since :meth:`capture` (i.e. since fit).

        Fast path (no copy) when no tensor was written in place or replaced since; otherwise one hash of the
        model's state, so writing back identical values (e.g. ``load_state_dict`` of the same checkpoint) passes.
        """
        tokens = self._tokens()
        if tokens == self._state_tokens:
            return
        if len(tokens) == len(self._state_tokens) and module_digest(self.model) == self._state_digest:
            self._state_tokens = tokens
            return
        raise RuntimeError(
            f"cannot {action}: the model's weights or buffers changed since fit() (theta* is the weights at fit). "
            "Call fit() again for the new weights, or restore the weights the posterior was fitted at"
        )

    @property
    def n_params(self) -> int:
        """P, the dimension of the posterior."""
        return self.theta_map.numel()

    @property
    def dtype(self) -> torch.dtype:
        """The covered parameters' dtype."""
        return self.theta_map.dtype

    @property
    def device(self) -> torch.device:
        """The covered parameters' device."""
        return self.theta_map.device

    def vmap_examples(self, inputs: ModelInputs) -> bool:
        """Whether per-example Jacobians may vmap over the examples of the covered function's ``inputs``.

        "auto" decides once, on first use, by :func:`posthoc.network.probes.reads_tensor_values` on one example
        (a forward pass that reads tensor values into Python, e.g. Hugging Face's attention-mask shortcut
        ``if mask.all()``, cannot run under vmap); a last layer without the rerun tail is one nn.Linear, which
        never does. Cost: one forward pass of one example, once.
        """
        if self.per_example is not ExampleRoute.AUTO:
            return self.per_example is ExampleRoute.VMAP
        if self._vmap_examples is None:
            if self.module is not self.model and self.tail is not Tail.RERUN:
                self._vmap_examples = True
            else:
                with torch.no_grad():
                    self._vmap_examples = not reads_tensor_values(lambda: self.forward(take(inputs, 0, 1)))
        return self._vmap_examples

    @torch.no_grad()
    def inputs(self, x: ModelInputs) -> ModelInputs:
        """The covered function's inputs for model inputs ``x``: ``x``, or the last layer's inputs (B, ..., D).

        ``last_layer`` with the rerun tail takes ``x`` itself. The model runs in eval mode.
        """
        if self.kind is not SubsetOfWeights.LAST_LAYER or self.tail is Tail.RERUN:
            return x
        captured: list[torch.Tensor] = []
        handle = self.module.register_forward_pre_hook(lambda mod, args: captured.append(args[0].detach()))
        try:
            with eval_mode(self.model):
                out = self.call(x)
        finally:
            handle.remove()
        if len(captured) != 1:
            raise RuntimeError(f"the last layer {self.last_layer_name!r} ran {len(captured)} times in this forward "
                               "pass; the last-layer Laplace needs a layer applied once")
        self._check_tail(captured[0], out)
        return captured[0]

    def _check_tail(self, features: torch.Tensor, out: object) -> None:
        """Raise ValueError unless the covered function at theta* reproduces the model's output on this batch.

        The tail after the last layer was classified on the first batch; an operation whose map depends on the
        input (e.g. pooling the last non-pad token, so the position moves with the padding) can agree there and
        differ later. Cost: one Linear (and the tail's matmul) per batch.
        """
        if not self.last_layer_located or not isinstance(out, torch.Tensor):
            return
        out = out.flatten(1) if self.flatten_positions else out
        with torch.no_grad():
            mine = self.forward(features)
        scale = 1.0 + float(out.detach().abs().max()) if out.numel() else 1.0
        if mine.shape != out.shape or float((mine - out).abs().max()) > 1e3 * torch.finfo(mine.dtype).eps * scale:
            raise ValueError(
                f"what follows the last layer {self.last_layer_name!r} maps its output differently for these inputs "
                "than for the training batch it was located on (e.g. pooling at a position that moves with the "
                "padding), so the last-layer function would not be the model: wrap the model so that the last "
                "nn.Linear's output is the model's output (apply the head after the pooling), or use "
                "subset_of_weights='all'")

    def _full_vector(self, theta: torch.Tensor) -> torch.Tensor:
        if self.indices is None:
            return theta
        return self._full_map.index_put((self.indices,), theta)

    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """Parameter dict of the covered module for a theta (P,) (views, differentiable).

        One torch.split, not a slice per block: a slice's backward writes its gradient into a zero (P,) vector,
        so per-block slicing costs (number of blocks) x P per backward (x K under vmap: 36 s per example for the
        per-example VJPs of a 4.9 M-weight ResNet, 1 s with the split), the split's backward one concatenation.
        """
        pieces = torch.split(self._full_vector(theta), [b.numel for b in self.blocks])
        return {b.name: piece.view(b.shape) for b, piece in zip(self.blocks, pieces, strict=True)}

    def forward(self, inputs: ModelInputs, theta: torch.Tensor | None = None) -> torch.Tensor:
        """Outputs (B, C) of the covered function at parameters theta (default: MAP), in eval mode.

        ``inputs`` come from :meth:`inputs`. Differentiable in theta (torch.func transforms apply). Cost: one
        forward pass of the covered module (``last_layer``: one Linear, plus a (C, Z) matmul for a linear tail,
        or a forward pass of the whole model for the rerun tail).
        """
        if theta is None:
            theta = self.theta_map
        return self.forward_with(self.unflatten(theta), inputs)

    def forward_with(self, params: dict[str, torch.Tensor], inputs: ModelInputs) -> torch.Tensor:
        """The covered function with the covered parameters given by name (as in :meth:`unflatten`).

        E.g. fresh leaves for autograd-graph inspection; :meth:`forward` is this at ``unflatten(theta)``.
        The whole model runs through :attr:`call` (its inputs and output kinds); a last layer is one nn.Linear.
        With :attr:`flatten_positions`, outputs (B, ..., C) come back as (B, L*C), C fastest.
        """
        out = self._forward_with(params, inputs)
        return out.flatten(1) if self.flatten_positions else out

    def _forward_with(self, params: dict[str, torch.Tensor], inputs: ModelInputs) -> torch.Tensor:
        if self.module is self.model:
            with eval_mode(self.model):
                return self.call.functional(params, inputs)
        if self.tail is Tail.RERUN:
            # the layers before the last one are constants of the covered function: detached, so that no
            # result (a curvature, a Jacobian) keeps an autograd graph to the model's own parameters
            constants = {n: p.detach() for n, p in self.model.named_parameters()}
            with eval_mode(self.model):
                return self.call.functional({**constants, **{self._prefix + n: t for n, t in params.items()}}, inputs)
        with eval_mode(self.module):
            out = functional_call(self.module, params, (inputs,))
        if self.tail is Tail.LINEAR:
            assert self._tail_matrix is not None  # classify_tail gives a linear tail its matrix
            return out.reshape(out.shape[0], -1) @ self._tail_matrix.T
        return out

    def forward_many(self, inputs: ModelInputs, thetas: torch.Tensor) -> torch.Tensor:
        """Outputs (S, B, C) for S parameter vectors thetas (S, P), vectorised with vmap."""
        return vmap(lambda th: self.forward(inputs, th), randomness="different")(thetas)

    def block_slices_in_theta(self) -> list[tuple[ParamBlock, torch.Tensor]]:
        """For each block, the positions in theta it covers (all of it unless subnetwork)."""
        if self.indices is None:
            return [(b, torch.arange(b.offset, b.offset + b.numel, device=self.device)) for b in self.blocks]
        out = []
        for b in self.blocks:
            mask = (self.indices >= b.offset) & (self.indices < b.offset + b.numel)
            out.append((b, torch.nonzero(mask).reshape(-1)))
        return out

    def block_ids(self) -> torch.Tensor:
        """(P,) index of the block (parameter tensor) each entry of theta belongs to."""
        ids = torch.empty(self.n_params, dtype=torch.long, device=self.device)
        for k, (_, pos) in enumerate(self.block_slices_in_theta()):
            ids[pos] = k
        return ids
