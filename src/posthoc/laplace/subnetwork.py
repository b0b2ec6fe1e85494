"""Choosing a subnetwork for ``subset_of_weights="subnetwork"``: laplace-torch's subnetwork masks.

Every mask's ``select(train_loader=None)`` returns a sorted LongTensor of positions in the
``parameters_to_vector`` order of the model's parameters that require grad (frozen ones are not counted), which
is what ``Laplace(..., subset_of_weights="subnetwork", subnetwork_indices=...)`` takes. (laplace-torch counts
frozen parameters too; the two orders agree when every parameter requires grad.)
"""

from __future__ import annotations

import copy
from typing import Any, Iterable

import torch
from torch import nn

from posthoc.likelihood import Likelihood, check_supported
from posthoc.network.subset import ParameterSubset
from posthoc.utils.checks import check_choice, check_positive_int
from posthoc.utils.modes import eval_mode


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, param) for name, param in model.named_parameters() if param.requires_grad]


class SubnetMask:
    """Base class: a choice of covered weights, made once by :meth:`select`.

    Subclasses implement :meth:`get_subnet_mask`. ``parameter_vector`` (P,) is a detached copy of the trainable
    weights in ``parameters_to_vector`` order.

    Args:
        model: the trained network.

    Raises:
        ValueError: the model has no parameter that requires grad.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        params = [param for _, param in _trainable(model)]
        if not params:
            raise ValueError("the model has no parameters that require grad")
        self.parameter_vector = torch.nn.utils.parameters_to_vector(params).detach().clone()
        self._n_params = self.parameter_vector.numel()
        self._indices: torch.Tensor | None = None

    @property
    def indices(self) -> torch.Tensor:
        """The selected positions (LongTensor). Raises AttributeError before :meth:`select`."""
        if self._indices is None:
            raise AttributeError("no subnetwork selected yet: call select(train_loader) first")
        return self._indices

    @property
    def n_params_subnet(self) -> int:
        """The number of selected weights. Raises AttributeError before :meth:`select`."""
        return self.indices.numel()

    def convert_subnet_mask_to_indices(self, subnet_mask: torch.Tensor) -> torch.Tensor:
        """Positions (LongTensor, sorted) of the ones of a 0/1 or boolean mask (P,).

        Raises:
            ValueError: not a 1-D integral or boolean tensor of length P with only 0s and 1s, or no 1 at all.
        """
        integral = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
        if not isinstance(subnet_mask, torch.Tensor) or subnet_mask.dtype not in integral or subnet_mask.ndim != 1:
            raise ValueError("the subnetwork mask must be a 1-D boolean or integer tensor")
        if subnet_mask.numel() != self._n_params or bool(((subnet_mask != 0) & (subnet_mask != 1)).any()):
            raise ValueError(f"the subnetwork mask must hold one 0/1 entry per trainable parameter ({self._n_params})")
        indices = torch.nonzero(subnet_mask).reshape(-1)
        if indices.numel() == 0:
            raise ValueError("the subnetwork mask selects no parameter")
        return indices

    def select(self, train_loader: Iterable | None = None) -> torch.Tensor:
        """Choose the subnetwork: sorted positions (LongTensor) for ``Laplace(subnetwork_indices=...)``.

        Raises:
            ValueError: already selected (make a new mask), or the mask's own errors.
        """
        if self._indices is not None:
            raise ValueError("this mask already selected its subnetwork; make a new mask to select again")
        self._indices = self.convert_subnet_mask_to_indices(self.get_subnet_mask(train_loader))
        return self._indices

    def get_subnet_mask(self, train_loader: Iterable | None) -> torch.Tensor:
        """A boolean mask (P,) of the chosen weights; subclasses implement it."""
        raise NotImplementedError


class ScoreBasedSubnetMask(SubnetMask):
    """The ``n_params_subnet`` weights of highest score (:meth:`compute_param_scores`).

    Raises:
        ValueError: ``n_params_subnet`` not in [1, P].
    """

    def __init__(self, model: nn.Module, n_params_subnet: int) -> None:
        super().__init__(model)
        check_positive_int(n_params_subnet, "n_params_subnet")
        if n_params_subnet > self._n_params:
            raise ValueError(f"n_params_subnet={n_params_subnet} exceeds the model's {self._n_params} trainable "
                             "parameters")
        self._n_subnet = n_params_subnet
        self._param_scores: torch.Tensor | None = None

    def compute_param_scores(self, train_loader: Iterable | None) -> torch.Tensor:
        """One score per trainable weight (P,); subclasses implement it."""
        raise NotImplementedError

    def get_subnet_mask(self, train_loader: Iterable | None) -> torch.Tensor:
        """The top-``n_params_subnet`` scores as a boolean mask (P,). Cost O(P log P)."""
        if self._param_scores is None:
            self._param_scores = self.compute_param_scores(train_loader)
        if self._param_scores.shape != self.parameter_vector.shape:
            raise ValueError(f"parameter scores must have shape {tuple(self.parameter_vector.shape)}, got "
                             f"{tuple(self._param_scores.shape)}")
        mask = torch.zeros(self._n_params, dtype=torch.bool, device=self.parameter_vector.device)
        mask[torch.topk(self._param_scores, self._n_subnet).indices] = True
        return mask


class RandomSubnetMask(ScoreBasedSubnetMask):
    """``n_params_subnet`` weights chosen uniformly at random (``generator``: a torch.Generator, else torch's)."""

    def __init__(self, model: nn.Module, n_params_subnet: int, generator: torch.Generator | None = None) -> None:
        super().__init__(model, n_params_subnet)
        self.generator = generator

    def compute_param_scores(self, train_loader: Iterable | None) -> torch.Tensor:
        """Uniform random scores (P,)."""
        return torch.rand(self._n_params, generator=self.generator, dtype=self.parameter_vector.dtype,
                          device=self.parameter_vector.device)


class LargestMagnitudeSubnetMask(ScoreBasedSubnetMask):
    """The ``n_params_subnet`` weights of largest |theta*|."""

    def compute_param_scores(self, train_loader: Iterable | None) -> torch.Tensor:
        """|theta*| (P,)."""
        return self.parameter_vector.abs()


class LargestVarianceDiagLaplaceSubnetMask(ScoreBasedSubnetMask):
    """The weights of largest marginal variance under a diagonal Laplace over all weights (Daxberger et al. 2021).

    Args:
        model: the trained network.
        n_params_subnet: how many weights to select.
        diag_laplace_model: an unfitted Laplace of ``model`` with ``subset_of_weights="all"``,
            ``hessian_structure="diag"``; :meth:`select` fits it on ``train_loader`` (one pass with per-example
            gradients).
    """

    def __init__(self, model: nn.Module, n_params_subnet: int, diag_laplace_model: Any) -> None:
        super().__init__(model, n_params_subnet)
        self.diag_laplace_model = diag_laplace_model

    def compute_param_scores(self, train_loader: Iterable | None) -> torch.Tensor:
        """diag(Lambda^-1) (P,) of the fitted diagonal Laplace. Raises ValueError without ``train_loader``."""
        if train_loader is None:
            raise ValueError("LargestVarianceDiagLaplaceSubnetMask.select needs train_loader (to fit the diagonal "
                             "Laplace)")
        self.diag_laplace_model.fit(train_loader)
        variance = self.diag_laplace_model.posterior_variance
        return variance() if callable(variance) else variance  # posthoc: a method; laplace-torch: a property


class LargestVarianceSWAGSubnetMask(ScoreBasedSubnetMask):
    """The weights of largest variance over SGD iterates (diagonal SWAG, Maddox et al. 2019).

    A copy of the model is trained further with SGD (momentum 0.9, weight decay 3e-4) at ``swag_lr`` from
    theta*, one snapshot of its weights every ``swag_snapshot_freq`` epochs, ``swag_n_snapshots`` in all; the
    score is each weight's variance over the snapshots. The model itself is not changed. Cost:
    ``swag_n_snapshots * swag_snapshot_freq`` training epochs.
    """

    def __init__(self, model: nn.Module, n_params_subnet: int, likelihood: Likelihood | str = "classification",
                 swag_n_snapshots: int = 40, swag_snapshot_freq: int = 1, swag_lr: float = 0.01) -> None:
        super().__init__(model, n_params_subnet)
        self.likelihood = check_supported(check_choice(likelihood, Likelihood, "likelihood"), (Likelihood.CLASSIFICATION, Likelihood.REGRESSION),
                                          "the subnetwork selection")
        check_positive_int(swag_n_snapshots, "swag_n_snapshots")
        check_positive_int(swag_snapshot_freq, "swag_snapshot_freq")
        if not swag_lr > 0:
            raise ValueError(f"swag_lr must be > 0, got {swag_lr}")
        self.swag_n_snapshots, self.swag_snapshot_freq, self.swag_lr = swag_n_snapshots, swag_snapshot_freq, swag_lr

    def compute_param_scores(self, train_loader: Iterable | None) -> torch.Tensor:
        """The variance (P,) of the trainable weights over the SGD snapshots."""
        if train_loader is None:
            raise ValueError("LargestVarianceSWAGSubnetMask.select needs train_loader (to run SGD)")
        model = copy.deepcopy(self.model).train()
        params = [param for _, param in _trainable(model)]
        optimizer = torch.optim.SGD(params, lr=self.swag_lr, momentum=0.9, weight_decay=3e-4)
        loss_fn = nn.CrossEntropyLoss() if self.likelihood is Likelihood.CLASSIFICATION else nn.MSELoss()
        first = torch.zeros_like(self.parameter_vector)
        second = torch.zeros_like(self.parameter_vector)
        for epoch in range(self.swag_n_snapshots * self.swag_snapshot_freq):
            for x, y in train_loader:
                optimizer.zero_grad()
                loss_fn(model(x), y).backward()
                optimizer.step()
            if (epoch + 1) % self.swag_snapshot_freq == 0:
                snapshot = torch.nn.utils.parameters_to_vector(params).detach()
                first += snapshot / self.swag_n_snapshots
                second += snapshot**2 / self.swag_n_snapshots
        return (second - first**2).clamp_min(0)


class ParamNameSubnetMask(SubnetMask):
    """The parameter tensors named in ``parameter_names`` (names as in ``model.named_parameters()``).

    Raises (at select): ValueError for an empty list, a name the model lacks, or a frozen parameter.
    """

    def __init__(self, model: nn.Module, parameter_names: list[str]) -> None:
        super().__init__(model)
        self.parameter_names = list(parameter_names)

    def get_subnet_mask(self, train_loader: Iterable | None) -> torch.Tensor:
        """True on every entry of the named tensors, (P,)."""
        if not self.parameter_names:
            raise ValueError("parameter_names is empty; name at least one parameter")
        trainable = dict(_trainable(self.model))
        frozen = [n for n, p in self.model.named_parameters() if not p.requires_grad and n in self.parameter_names]
        if frozen:
            raise ValueError(f"parameters {frozen} do not require grad, so no Laplace covers them")
        unknown = [n for n in self.parameter_names if n not in trainable]
        if unknown:
            raise ValueError(f"parameters {unknown} are not in the model; it has {list(trainable)}")
        return torch.cat([torch.full((p.numel(),), name in self.parameter_names, dtype=torch.bool,
                                     device=self.parameter_vector.device) for name, p in trainable.items()])


class ModuleNameSubnetMask(SubnetMask):
    """The trainable parameters of the leaf modules named in ``module_names`` (as in ``model.named_modules()``).

    Raises (at select): ValueError for an empty list, an unknown name, a module with children or without
    trainable parameters.
    """

    def __init__(self, model: nn.Module, module_names: list[str]) -> None:
        super().__init__(model)
        self.module_names = list(module_names)

    def get_subnet_mask(self, train_loader: Iterable | None) -> torch.Tensor:
        """True on every trainable entry of the named modules, (P,)."""
        if not self.module_names:
            raise ValueError("module_names is empty; name at least one module")
        modules = dict(self.model.named_modules())
        chosen: set[str] = set()
        for name in self.module_names:
            if name not in modules:
                raise ValueError(f"module {name!r} is not in the model")
            if any(True for _ in modules[name].children()):
                raise ValueError(f"module {name!r} has children; name its leaf modules")
            own = [f"{name}.{n}" if name else n for n, p in modules[name].named_parameters() if p.requires_grad]
            if not own:
                raise ValueError(f"module {name!r} has no parameters that require grad")
            chosen.update(own)
        return torch.cat([torch.full((p.numel(),), name in chosen, dtype=torch.bool,
                                     device=self.parameter_vector.device) for name, p in _trainable(self.model)])


class LastLayerSubnetMask(SubnetMask):
    """The weight and bias of the last nn.Linear on the path to the output (as ``subset_of_weights="last_layer"``).

    Args:
        model: the trained network.
        last_layer_name: the nn.Linear to take (a name from ``model.named_modules()``); default: the last one on
            the path to the output, located with one forward pass on the first batch of ``train_loader``.
        dict_key_x: the input's key when the loader yields dict batches.
    """

    def __init__(self, model: nn.Module, last_layer_name: str | None = None, dict_key_x: str = "input_ids") -> None:
        super().__init__(model)
        self.last_layer_name = last_layer_name
        self.dict_key_x = dict_key_x

    def get_subnet_mask(self, train_loader: Iterable | None) -> torch.Tensor:
        """True on the last layer's trainable entries, (P,). Cost: one forward pass on a few examples.

        Raises:
            ValueError: neither ``train_loader`` nor ``last_layer_name``, or the model has no such nn.Linear.
        """
        example = None
        if self.last_layer_name is None:
            if train_loader is None:
                raise ValueError("LastLayerSubnetMask.select needs train_loader (to find the last nn.Linear on the "
                                 "path to the output) or last_layer_name")
            batch = next(iter(train_loader))
            example = batch[self.dict_key_x] if isinstance(batch, dict) else batch[0]
        with eval_mode(self.model):
            subset = ParameterSubset(self.model, "last_layer", last_layer_name=self.last_layer_name,
                                     example_inputs=example)
        covered = {id(p) for p in subset.module.parameters() if p.requires_grad}
        return torch.cat([torch.full((p.numel(),), id(p) in covered, dtype=torch.bool,
                                     device=self.parameter_vector.device) for _, p in _trainable(self.model)])


def largest_variance_indices(model: nn.Module, train_loader: Iterable, likelihood: Likelihood | str,
                             n_params: int, prior_precision: float = 1.0, progress: bool = True,
                             **laplace_kwargs: Any) -> torch.Tensor:
    """Positions (n_params,) of the weights with the largest marginal posterior variance under a diagonal LA.

    The diagonal Laplace covers all weights (Daxberger et al. 2021). Cost: one diagonal-LA fit (a pass with
    per-example gradients). The indices are in parameters_to_vector order, ready for
    ``Laplace(..., subnetwork_indices=...)``; :class:`LargestVarianceDiagLaplaceSubnetMask` is the mask form.
    """
    from posthoc.laplace.laplace import Laplace

    diag = Laplace(model, likelihood, subset_of_weights="all", hessian_structure="diag",
                   prior_precision=prior_precision, progress=progress, **laplace_kwargs).fit(train_loader)
    if not 1 <= n_params <= diag.n_params:
        raise ValueError(f"n_params must lie in [1, {diag.n_params}], got {n_params}")
    return torch.topk(diag.posterior_variance(), n_params).indices.sort().values
