"""Which weights a Laplace approximation covers, and the network as a function of them.

The posterior is over a flat vector theta of P entries, in PyTorch's row-major
``parameters_to_vector`` order of the covered tensors (METHODS.md notation):

- ``all``: every parameter of the model that requires grad;
- ``last_layer``: the weight and bias of the model's last ``nn.Linear``; its
  inputs (the penultimate features) are computed once per batch by the model's
  own forward pass, captured with a forward hook;
- ``subnetwork``: chosen entries of the full vector (the rest stay at the MAP).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import Enum

import torch
from torch import nn
from torch.func import functional_call, vmap

from posthoc.utils.checks import check_choice


class SubsetOfWeights(str, Enum):
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
        return slice(self.offset, self.offset + self.numel)


def _last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ValueError("subset_of_weights='last_layer' needs an nn.Linear output layer; the model has none")
    return found[-1]


class ParameterSubset:
    """The covered parameters and a pure function ``forward(inputs, theta)``.

    Attributes:
        module: the module whose parameters are covered (the whole model, or
            its last nn.Linear for ``last_layer``).
        blocks: covered parameter tensors of ``module`` in vector order.
        theta_map: (P,) MAP values of the covered entries (detached copy).
        indices: (P,) positions of theta in the module's flat vector
            (``subnetwork`` only, else None).
    """

    def __init__(
        self,
        model: nn.Module,
        subset_of_weights: SubsetOfWeights | str = SubsetOfWeights.ALL,
        subnetwork_indices: torch.Tensor | None = None,
    ) -> None:
        self.model = model
        self.kind = check_choice(subset_of_weights, SubsetOfWeights, "subset_of_weights")
        if self.kind is SubsetOfWeights.LAST_LAYER:
            layer_name, self.module = _last_linear(model)
            self._feature_layer_name = layer_name
        else:
            self.module = model
        named = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no parameters that require grad")
        modules = dict(self.module.named_modules())
        blocks, offset = [], 0
        for name, param in named:
            layer_name, _, attr = name.rpartition(".")
            blocks.append(ParamBlock(name, layer_name, modules[layer_name], attr, tuple(param.shape), offset,
                                     param.numel()))
            offset += param.numel()
        self.blocks: list[ParamBlock] = blocks
        self._names = [n for n, _ in named]
        self._n_full = offset
        if self.kind is SubsetOfWeights.SUBNETWORK:
            if subnetwork_indices is None:
                raise ValueError("subset_of_weights='subnetwork' needs subnetwork_indices (a LongTensor of positions)")
            idx = torch.as_tensor(subnetwork_indices).long().reshape(-1)
            if idx.numel() == 0 or int(idx.min()) < 0 or int(idx.max()) >= offset:
                raise ValueError(f"subnetwork_indices must be non-empty positions in [0, {offset - 1}]")
            if torch.unique(idx).numel() != idx.numel():
                raise ValueError("subnetwork_indices contains duplicates")
            self.indices: torch.Tensor | None = torch.sort(idx).values
        else:
            if subnetwork_indices is not None:
                raise ValueError("subnetwork_indices is only used with subset_of_weights='subnetwork'")
            self.indices = None
        self.capture()

    # ----------------------------------------------------------------- theta* and its staleness check
    def _model_tensors(self) -> list[torch.Tensor]:
        """Every parameter and buffer of the whole model: what the covered function's outputs depend on."""
        return [t for t in (*self.model.parameters(), *self.model.buffers()) if t is not None]

    def _tokens(self) -> list[tuple[int, int, tuple[int, ...]]]:
        return [(t.data_ptr(), t._version, tuple(t.shape)) for t in self._model_tensors()]

    def _digest(self) -> str:
        """blake2b of every parameter and buffer's bytes, in registration order (cost: one pass over them)."""
        h = hashlib.blake2b(digest_size=16)
        for t in self._model_tensors():
            h.update(str((tuple(t.shape), t.dtype)).encode())
            h.update(t.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes())
        return h.hexdigest()

    def capture(self) -> None:
        """Read theta* from the model's current weights (the MAP is the weights at ``fit``, not at construction).

        Also records the model's state (every parameter and buffer) so that :meth:`check_current` can tell when
        the weights changed afterwards. Cost: one copy of the covered entries and one hash of the model's state.
        """
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
        self._state_digest = self._digest()

    def check_current(self, action: str = "predict") -> None:
        """Raise RuntimeError if the model's weights or buffers changed since :meth:`capture` (i.e. since fit).

        Fast path (no copy) when no tensor was written in place or replaced since; otherwise one hash of the
        model's state, so writing back identical values (e.g. ``load_state_dict`` of the same checkpoint) passes.
        """
        tokens = self._tokens()
        if tokens == self._state_tokens:
            return
        if len(tokens) == len(self._state_tokens) and self._digest() == self._state_digest:
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
        return self.theta_map.dtype

    @property
    def device(self) -> torch.device:
        return self.theta_map.device

    @torch.no_grad()
    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """The covered module's inputs for model inputs ``x``: ``x``, or the penultimate features (B, D)."""
        if self.kind is not SubsetOfWeights.LAST_LAYER:
            return x
        captured: list[torch.Tensor] = []
        handle = self.module.register_forward_pre_hook(lambda mod, args: captured.append(args[0].detach()))
        try:
            self.model(x)
        finally:
            handle.remove()
        return captured[-1]

    def _full_vector(self, theta: torch.Tensor) -> torch.Tensor:
        if self.indices is None:
            return theta
        return self._full_map.index_put((self.indices,), theta)

    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """Parameter dict of the covered module for a theta (P,) (views, differentiable)."""
        full = self._full_vector(theta)
        return {b.name: full[b.slice].view(b.shape) for b in self.blocks}

    def forward(self, inputs: torch.Tensor, theta: torch.Tensor | None = None) -> torch.Tensor:
        """Outputs (B, C) of the covered module at parameters theta (default: MAP).

        Differentiable in theta (torch.func transforms apply). Cost: one forward pass.
        """
        if theta is None:
            theta = self.theta_map
        return functional_call(self.module, self.unflatten(theta), (inputs,))

    def forward_many(self, inputs: torch.Tensor, thetas: torch.Tensor) -> torch.Tensor:
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
