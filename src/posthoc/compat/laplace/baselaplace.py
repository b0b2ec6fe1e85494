"""laplace-torch's ``Laplace`` constructor and class names on posthoc's Laplace.

``Laplace(model, likelihood, subset_of_weights="last_layer", hessian_structure="kron", sigma_noise=1.0,
prior_precision=1.0, prior_mean=0.0, temperature=1.0, enable_backprop=False, dict_key_x="input_ids",
dict_key_y="labels", backend=None, backend_kwargs=None, asdl_fisher_kwargs=None, ...)`` takes laplace-torch's
arguments, in laplace-torch's positional order and with its defaults, and is a :class:`posthoc.Laplace` (with
:class:`posthoc.laplace.parity.LaplaceTorchAPI`), so ``la(x)``, ``fit``, ``optimize_prior_precision`` and the
posterior's properties behave as laplace-torch documents. posthoc's own keyword arguments (``curvature``,
``mc_samples``, ``seed``, ``progress``, ``structure_options``) are accepted too. Positional arguments follow
laplace-torch's ``ParametricLaplace`` order (sigma_noise, prior_precision, prior_mean, temperature,
enable_backprop, dict_key_x, dict_key_y, backend, backend_kwargs, asdl_fisher_kwargs); its last-layer and
subnetwork classes order some of them differently, so pass those by name.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Iterable

import torch
from torch import nn

from posthoc.compat.laplace.curvature import backend_kind
from posthoc.compat.laplace.feature_reduction import reduced_output_fn
from posthoc.curvature.output_factors import OutputFactors
from posthoc.laplace import checkpointing
from posthoc.laplace.functional import FunctionalLaplace as _FunctionalLaplace
from posthoc.laplace.laplace import Laplace as _PosthocLaplace
from posthoc.laplace.parity_tuning import gridsearch_with_loss, laplace_torch_grid
from posthoc.laplace.prior import per_parameter
from posthoc.network.batches import prediction_inputs

__all__ = [
    "Laplace", "BaseLaplace", "ParametricLaplace", "FullLaplace", "KronLaplace", "DiagLaplace", "LowRankLaplace",
    "FullLLLaplace", "KronLLLaplace", "DiagLLLaplace", "FullSubnetLaplace", "DiagSubnetLaplace", "FunctionalLaplace",
    "curvature_from_backend",
]


def curvature_from_backend(backend: type | None, backend_kwargs: dict[str, Any] | None,
                           curvature: str | None) -> tuple[str, list[str]]:
    """The ``curvature`` for laplace-torch's ``backend`` / ``backend_kwargs``, and the options it ignores.

    A GGN backend gives "ggn" ("ggn_mc" with ``stochastic=True``), an EF backend "ef"; no backend keeps
    ``curvature`` (default "ggn", laplace-torch's default CurvlinopsGGN). Other ``backend_kwargs`` cannot change
    posthoc's numbers: they are returned by name for one warning.

    Raises:
        ValueError: a Hessian backend, a backend of unknown kind, ``stochastic=True`` with an EF backend, or a
            backend that contradicts an explicit ``curvature``.
    """
    options = dict(backend_kwargs or {})
    stochastic = bool(options.pop("stochastic", False))
    if backend is None:
        if stochastic and curvature not in (None, "ggn_mc"):
            raise ValueError(f"backend_kwargs={{'stochastic': True}} asks for curvature='ggn_mc', but curvature="
                             f"{curvature!r} was given")
        chosen = "ggn_mc" if stochastic else (curvature or "ggn")
        return chosen, sorted(options)
    kind = backend_kind(backend)
    if kind == "hessian":
        raise ValueError(f"backend={backend.__name__}: posthoc fits GGN or empirical-Fisher curvatures, not the "
                         "Hessian; use a GGN backend (e.g. CurvlinopsGGN) or an EF one")
    if kind is None:
        raise ValueError(f"backend={backend.__name__} names no curvature; use a GGN or EF backend class from "
                         "posthoc.compat.laplace.curvature")
    if kind == "ef" and stochastic:
        raise ValueError("backend_kwargs={'stochastic': True} applies to GGN backends only (the empirical Fisher "
                         "uses the observed labels)")
    chosen = "ggn_mc" if stochastic else kind
    if curvature is not None and curvature != chosen:
        raise ValueError(f"backend={backend.__name__} (curvature {chosen!r}) contradicts curvature={curvature!r}; "
                         "give one of them")
    return chosen, sorted(options)


class _TemperedFactors(OutputFactors):
    """Output factors whose curvature scale is divided by the temperature T (laplace-torch's 1 / (sigma^2 T)).

    Wraps the Laplace's factors: everything but :meth:`scale` is theirs.
    """

    def __init__(self, factors: OutputFactors, temperature: float) -> None:  # noqa: D107
        self.factors, self.temperature = factors, temperature  # the wrapped factors' own attributes are read through

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.factors(outputs, targets)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.factors, name)

    def scale(self, sigma_noise: torch.Tensor) -> torch.Tensor:
        """The wrapped factors' scale divided by T."""
        return self.factors.scale(sigma_noise) / self.temperature


class Laplace(_PosthocLaplace):
    """A laplace-torch ``Laplace(...)``: posthoc's Laplace built from laplace-torch's arguments (module docstring).

    Args:
        model: the trained network.
        likelihood: "classification", "regression" or "reward_modeling" (laplace-torch's: fitted with the
            classification likelihood on pairs (B, 2, ...) whose two logits are the items' rewards, ``la(x)`` on
            single items (B, ...) returns the reward's ``(f_mu, f_var)`` as regression; ``fitting=True`` gives
            the pair's class probabilities; every ``subset_of_weights``, the last layer re-run for items, see
            :meth:`_rerun_tail_for_items`).
        subset_of_weights: "last_layer" (default), "all" or "subnetwork" (with ``subnetwork_indices``).
        hessian_structure: "kron" (default), "full", "diag" or "lowrank" (posthoc's top-k GGN eigenpairs:
            laplace-torch's uses the Hessian; with laplace-torch's prior variance outside them,
            ``structure_options={"complement": "prior"}``, unless given), or posthoc's "ekfac"; "gp" returns a
            :class:`FunctionalLaplace`. With reward modelling, "kron" reads the rows of a layer run on the (2B, d)
            items of B pairs as examples, as laplace-torch does (``structure_options={"item_rows": True}``, unless
            given); elsewhere such layers get their exact diagonal block, as in posthoc's own ``Laplace``.
        sigma_noise: the observation noise (regression).
        prior_precision: delta: a scalar, one per parameter tensor, or one per parameter.
        prior_mean: mu_0 of the prior N(mu_0, diag(delta)^-1): a scalar, or one value per covered parameter. It enters
            the evidence (``scatter``, ``log_marginal_likelihood``, marglik tuning); the posterior is centred at
            theta* whatever mu_0 is, as in laplace-torch.
        temperature: T > 0 tempers the likelihood as in laplace-torch: the curvature is scaled by 1 / T (so the
            posterior, predictive and samples), and the evidence's log-likelihood term becomes
            log p(D | theta*) / T (regression: the Gaussian normaliser stays untempered).
        enable_backprop: ``la(x)``'s "glm" outputs stay differentiable in x (e.g. for Bayesian optimisation;
            Jacobians by ``torch.func.jacrev``, the covariance by ``functional_variance``: O(P^3) for structures
            other than diag), also for "last_layer" (the features keep their graph in x).
        dict_key_x: the input's key in dict batches (laplace-torch's default "input_ids").
        dict_key_y: the target's key in dict batches (default "labels").
        backend: a backend class from :mod:`posthoc.compat.laplace.curvature` (or laplace-torch's): chooses
            ``curvature`` (see :func:`curvature_from_backend`).
        backend_kwargs: ``stochastic=True`` gives "ggn_mc"; other keys cannot change the numbers (one warning).
        asdl_fisher_kwargs: cannot change the numbers (one warning).
        subnetwork_indices: positions for "subnetwork" (e.g. a subnetwork mask's ``select()``).
        last_layer_name: for "last_layer", the nn.Linear to cover.
        feature_reduction: None, "pick_first", "pick_last" or "average" (or laplace-torch's enum): per-position
            outputs (B, ..., C) are reduced to (B, C) over their positions, laplace-torch's last-layer function; a
            model that already returns (B, C) keeps its own pooling, with one warning saying what laplace-torch
            would differentiate (:mod:`posthoc.compat.laplace.feature_reduction`). Other values: ValueError.
        damping: laplace-torch's KronLaplace option; False (its default) is posthoc's exact prior in the
            eigenbasis, True raises NotImplementedError.
        curvature: posthoc's curvature ("ggn", "ggn_mc", "ef"); contradicting ``backend`` is an error.
        **posthoc_kwargs: posthoc's other arguments (``mc_samples``, ``seed``, ``progress``,
            ``structure_options``, ``mapping_call``: default "argument", a dict batch reaches the model as one
            argument, ``model(batch)``, as in laplace-torch, also through a ``forward(*args, **kwargs)`` wrapper
            such as peft's).

    Raises:
        NotImplementedError: options posthoc does not provide yet (naming the issue).
        ValueError: contradicting or invalid options, as listed above and by posthoc's Laplace.
    """

    default_link_approx = "probit"  # laplace-torch's la(x) default (posthoc's Laplace: "probit_centred")

    def __new__(cls, model: nn.Module, likelihood: str, subset_of_weights: str = "last_layer",
                hessian_structure: str = "kron", *args: Any, **kwargs: Any) -> Any:
        """``hessian_structure="gp"`` gives a :class:`FunctionalLaplace` (as laplace-torch's ``Laplace``), else a Laplace.

        Raises:
            ValueError: "gp" with a subset of weights other than "all". TypeError: "gp" with positional options.
        """
        if getattr(hessian_structure, "value", hessian_structure) != "gp":
            return super().__new__(cls)
        if getattr(subset_of_weights, "value", subset_of_weights) != "all":
            raise ValueError("hessian_structure='gp' (FunctionalLaplace) covers all weights: subset_of_weights='all'")
        if args:
            raise TypeError("pass FunctionalLaplace's options (n_subset=, sigma_noise=, ...) by name")
        return FunctionalLaplace(model, likelihood, **kwargs)

    def __init__(
        self,
        model: nn.Module,
        likelihood: str,
        subset_of_weights: str = "last_layer",
        hessian_structure: str = "kron",
        sigma_noise: float | torch.Tensor = 1.0,
        prior_precision: float | torch.Tensor = 1.0,
        prior_mean: float | torch.Tensor = 0.0,
        temperature: float = 1.0,
        enable_backprop: bool = False,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        backend: type | None = None,
        backend_kwargs: dict[str, Any] | None = None,
        asdl_fisher_kwargs: dict[str, Any] | None = None,
        subnetwork_indices: torch.Tensor | None = None,
        last_layer_name: str | None = None,
        feature_reduction: str | None = None,
        damping: bool = False,
        curvature: str | None = None,
        **posthoc_kwargs: Any,
    ) -> None:
        likelihood = getattr(likelihood, "value", likelihood)
        hessian_structure = getattr(hessian_structure, "value", hessian_structure)
        self.reward_modeling = likelihood == "reward_modeling"
        if self.reward_modeling:
            likelihood = "classification"  # fitted as pairwise classification, predicted as regression
        if damping:
            raise NotImplementedError("damping=True (laplace-torch's KronLaplace option that adds sqrt(delta) to each "
                                      "Kronecker factor) is not provided: posthoc adds the prior exactly in the "
                                      "eigenbasis, laplace-torch's damping=False; leave damping=False")
        if not (isinstance(temperature, float | int) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        output_fn = reduced_output_fn(model, feature_reduction, posthoc_kwargs.pop("output_fn", None))
        if output_fn is not None:  # posthoc.compat.laplace.feature_reduction
            posthoc_kwargs["output_fn"] = output_fn
        if hessian_structure == "kron" and self.reward_modeling:  # laplace-torch's KFAC on the pairs' item rows;
            # predictions take single items, one row per input (a model whose layer always sees m·B rows keeps
            # posthoc's exact diagonal block there, which its glm predictive can evaluate)
            posthoc_kwargs["structure_options"] = {"item_rows": True, **(posthoc_kwargs.get("structure_options")
                                                                         or {})}
        if hessian_structure == "lowrank":  # laplace-torch's LowRankLaplace keeps the prior outside the top k
            posthoc_kwargs["structure_options"] = {"complement": "prior", **(posthoc_kwargs.get("structure_options")
                                                                            or {})}
        chosen, ignored = curvature_from_backend(backend, backend_kwargs, getattr(curvature, "value", curvature))
        ignored = [f"backend_kwargs[{name!r}]" for name in ignored]
        if asdl_fisher_kwargs:
            ignored.append("asdl_fisher_kwargs")
        if ignored:
            warnings.warn(f"{', '.join(ignored)} cannot change posthoc's numbers (posthoc computes the curvature "
                          "itself) and are ignored", UserWarning, stacklevel=2)
        super().__init__(model, likelihood, subset_of_weights=subset_of_weights, hessian_structure=hessian_structure,
                         prior_precision=prior_precision, sigma_noise=sigma_noise, curvature=chosen,
                         subnetwork_indices=subnetwork_indices, dict_key_x=dict_key_x, dict_key_y=dict_key_y,
                         last_layer_name=last_layer_name,
                         **{"progress": False, "mapping_call": "argument", **posthoc_kwargs})
        self.temperature = float(temperature)
        if self.temperature != 1.0:
            self.factors = _TemperedFactors(self.factors, self.temperature)
        self.enable_backprop = bool(enable_backprop)
        self.prior_mean = prior_mean

    def _model_inputs(self, x: Any) -> Any:
        """Prediction inputs; with reward modelling single items, shaped unlike the training pairs, are allowed."""
        if not self.reward_modeling:
            return super()._model_inputs(x)
        return prediction_inputs(x, None, self.dict_key_y, self.subset.device, self.subset.dtype)

    @property
    def n_layers(self) -> int:
        """The number of covered parameter tensors (laplace-torch's ``len(self.params)``), e.g. a layerwise prior's length."""
        return len(self.subset.blocks)

    @property
    def prior_mean(self) -> torch.Tensor:
        """mu_0: a 0-d tensor (one value for every parameter) or (P,)."""
        return self._prior_mean

    @prior_mean.setter
    def prior_mean(self, value: float | torch.Tensor) -> None:
        mean = torch.as_tensor(value, dtype=self.subset.dtype, device=self.subset.device).detach()
        if mean.ndim > 1 or (mean.ndim == 1 and mean.numel() not in (1, self.n_params)):
            raise ValueError(f"prior_mean must be a scalar or have one entry per covered parameter ({self.n_params}), "
                             f"got shape {tuple(mean.shape)}")
        if not bool(torch.isfinite(mean).all()):
            raise ValueError("prior_mean must be finite")
        self._prior_mean = mean.reshape(()) if mean.numel() == 1 else mean

    def fit(self, train_loader: Iterable, override: bool = True, progress_bar: bool = False, *,
            checkpoint: checkpointing.FilePath | None = None,
            checkpoint_every: int = checkpointing.DEFAULT_CHECKPOINT_EVERY) -> "Laplace":
        """Fit the curvature on ``train_loader`` (posthoc's ``fit``); ``progress_bar`` shows posthoc's bars.

        ``checkpoint`` / ``checkpoint_every``: posthoc's resumable fit (:meth:`posthoc.Laplace.fit`).

        ``override=False`` accumulates (continual learning, as in laplace-torch): this data's curvature, N and
        log-likelihood are added to the previous fit's and the posterior is centred at the weights now; set
        ``prior_mean`` to the previous theta* for the evidence of the sequential posterior.

        Raises:
            NotImplementedError: ``override=False`` with "ekfac" or "lowrank" (see
                :func:`posthoc.laplace.continual.check_accumulates`).
        """
        progress, self.progress = self.progress, bool(progress_bar)
        try:
            super().fit(train_loader, override=override, checkpoint=checkpoint, checkpoint_every=checkpoint_every)
        finally:
            self.progress = progress
        if self.reward_modeling:
            self._rerun_tail_for_items()
        return self

    def _rerun_tail_for_items(self) -> None:
        """Reward modelling's last layer: evaluate it by re-running the model, so that single items work too.

        The last layer is located, and what follows it (its tail) classified, on the training pairs (B, 2, ...).
        A tail read off the pairs as a fixed linear map (e.g. the pair axis squeezed away) is not the map that
        single items (B, ...) take, so predictions on items re-run the whole model with the layer's weights
        replaced (posthoc.network.subset's "rerun" tail): correct for pairs and items alike, one forward pass of
        the model per evaluation. Laplace-torch-style models that flatten the pairs into the batch are re-run
        anyway (their layer's rows are items, not examples); the curvature fitted on the pairs is the same.
        """
        state = self.subset.last_layer_state()
        if state is not None and state["tail"] != "rerun":
            self.subset.load_last_layer_state({**state, "tail": "rerun", "matrix": None})

    @property
    def posterior_variance(self) -> torch.Tensor:  # type: ignore[override]
        """diag(Lambda^-1) (P,), a property as in laplace-torch (posthoc's ``Laplace.posterior_variance()`` is a method)."""
        return _PosthocLaplace.posterior_variance(self)

    def log_marginal_likelihood(self, prior_precision: torch.Tensor | float | None = None,
                                sigma_noise: torch.Tensor | float | None = None) -> torch.Tensor:
        """The Laplace evidence, differentiable in the hyperparameters; as in laplace-torch, values passed are kept.

        ``prior_precision`` / ``sigma_noise`` given here become the Laplace's (detached copies), so the loop
        ``-la.log_marginal_likelihood(log_prior.exp(), log_sigma.exp())`` leaves ``la`` at the last values tried
        (posthoc's own ``Laplace.log_marginal_likelihood`` leaves its hyperparameters unchanged).

        Raises:
            ValueError: ``sigma_noise`` other than 1 for classification, invalid values.
        """
        evidence = super().log_marginal_likelihood(prior_precision, sigma_noise)
        if self.temperature != 1.0:
            evidence = evidence + self._tempering_correction(prior_precision, sigma_noise, evidence)
        if bool((self.prior_mean != 0).any()):
            # posthoc's evidence has the scatter theta*^T diag(delta) theta*; the prior mean makes it
            # (theta* - mu_0)^T diag(delta) (theta* - mu_0)
            prior = self.prior_precision if prior_precision is None else torch.as_tensor(
                prior_precision, dtype=self.subset.dtype, device=self.subset.device).reshape(-1)
            delta = per_parameter(prior, self.subset)
            theta = self.subset.theta_map
            evidence = evidence - 0.5 * (delta * ((theta - self.prior_mean) ** 2 - theta**2)).sum()
        if prior_precision is not None:
            self.prior_precision = torch.as_tensor(prior_precision).detach()
        if sigma_noise is not None:
            self.sigma_noise = torch.as_tensor(sigma_noise).detach().reshape(())
        return evidence

    def _tempering_correction(self, prior_precision: Any, sigma_noise: Any, evidence: torch.Tensor) -> torch.Tensor:
        """L_T - L, with L = log p(D | theta*) recovered from posthoc's (curvature-tempered) evidence.

        L = evidence + (scatter - log det diag(delta) + log det Lambda) / 2; classification L_T = L / T, regression
        L_T = (L + Z) / T - Z with Z = N C log(2 pi sigma^2) / 2. Differentiable in delta and sigma.
        """
        structure = self._require_fit()
        prior, sigma = self._hyper(prior_precision, sigma_noise)
        delta = per_parameter(prior, self.subset)
        logdet = structure.logdet_precision(prior, self.factors.scale(sigma))
        loglik = evidence + 0.5 * ((delta * self.subset.theta_map**2).sum() - delta.log().sum() + logdet)
        normaliser = torch.zeros((), dtype=loglik.dtype, device=loglik.device)
        if self.likelihood.value == "regression":
            normaliser = 0.5 * self.n_data * (self.n_outputs or 1) * torch.log(2 * math.pi * sigma**2)
        return (loglik + normaliser) / self.temperature - normaliser - loglik

    def optimize_prior_precision(  # type: ignore[override]
        self, pred_type: str = "glm", method: str = "marglik", n_steps: int = 100, lr: float = 0.1,
        init_prior_prec: float | torch.Tensor = 1.0, prior_structure: str = "scalar",
        val_loader: Iterable | None = None, loss: Callable[[Any, torch.Tensor], float | torch.Tensor] | None = None,
        log_prior_prec_min: float = -4, log_prior_prec_max: float = 4, grid_size: int = 100,
        link_approx: str = "probit", n_samples: int = 100, verbose: bool = False, progress_bar: bool = False,
        log_prior_prec_base: float = 10.0,
    ) -> torch.Tensor:
        """laplace-torch's ``optimize_prior_precision``, with its defaults (posthoc's method, see ``Laplace``).

        As in laplace-torch, "marglik" tunes the prior precision only (sigma_noise stays) from
        ``init_prior_prec`` (default 1), and "gridsearch" tries ``grid_size`` (default 100) values
        ``log_prior_prec_base ** linspace(log_prior_prec_min, log_prior_prec_max)``, scored with ``loss`` as
        laplace-torch does (a callable over the whole validation set: ``loss(probs, y)``, regression
        ``loss(f_mu, f_var, y)``; or a torchmetrics metric, reset for each value:
        :mod:`posthoc.laplace.parity_tuning`); without ``loss`` by posthoc's validation NLL (regression: of y,
        with sigma_noise^2; laplace-torch's default there, the MSE of f_mu, does not depend on delta). Returns delta.
        """
        if not math.isfinite(log_prior_prec_base) or log_prior_prec_base <= 0 or log_prior_prec_base == 1:
            raise ValueError(f"log_prior_prec_base must be a positive number other than 1, got {log_prior_prec_base}")
        to_base10 = math.log10(log_prior_prec_base)  # base ** e == 10 ** (e * log10(base)): posthoc's grid is base 10
        init = init_prior_prec if isinstance(init_prior_prec, float | int) else float(
            torch.as_tensor(init_prior_prec).mean())
        if getattr(method, "value", method) == "gridsearch" and loss is not None:
            return self._gridsearch_with_loss(pred_type, val_loader, loss, laplace_torch_grid(
                log_prior_prec_min, log_prior_prec_max, grid_size, log_prior_prec_base, self.subset.dtype),
                link_approx, n_samples, verbose, progress_bar)
        return super().optimize_prior_precision(
            getattr(pred_type, "value", pred_type), method=getattr(method, "value", method), n_steps=n_steps, lr=lr,
            init_prior_prec=init, prior_structure=getattr(prior_structure, "value", prior_structure),
            val_loader=val_loader, loss=loss, log_prior_prec_min=log_prior_prec_min * to_base10,
            log_prior_prec_max=log_prior_prec_max * to_base10, grid_size=grid_size,
            link_approx=getattr(link_approx, "value", link_approx), n_samples=n_samples, verbose=verbose,
            progress_bar=progress_bar, tune_sigma_noise=False)


    def _gridsearch_with_loss(self, pred_type: str, val_loader: Iterable | None, loss: Any, grid: torch.Tensor,
                              link_approx: str, n_samples: int, verbose: bool, progress_bar: bool) -> torch.Tensor:
        """laplace-torch's grid search scored by ``loss`` (:func:`posthoc.laplace.parity_tuning.gridsearch_with_loss`)."""
        if val_loader is None:
            raise ValueError("method='gridsearch' needs val_loader (held-out data, never the test set)")
        self._require_fit()

        def set_prior(delta: torch.Tensor) -> None:
            self.prior_precision = delta.reshape(1)

        def predict(x: Any) -> Any:
            return self(x, pred_type=pred_type, link_approx=link_approx, n_samples=n_samples, fitting=True)

        best = gridsearch_with_loss(set_prior, predict, list(self._batches(val_loader)), loss, grid, progress_bar)
        self.prior_precision = best.reshape(1)
        if verbose:
            print(f"Optimized prior precision is {self.prior_precision}.")
        return self.prior_precision


BaseLaplace = Laplace
ParametricLaplace = Laplace


def _fixed(subset: str, structure: str, name: str) -> type[Laplace]:
    """A laplace-torch class name: ``Laplace`` with ``subset_of_weights`` and ``hessian_structure`` fixed."""

    def __init__(self: Laplace, model: nn.Module, likelihood: str, *args: Any, **kwargs: Any) -> None:
        Laplace.__init__(self, model, likelihood, subset, structure, *args, **kwargs)

    doc = (f"laplace-torch's ``{name}``: ``Laplace(model, likelihood, {subset!r}, {structure!r}, ...)``; the "
           "other arguments as :class:`Laplace`.")
    return type(name, (Laplace,), {"__init__": __init__, "__doc__": doc, "__module__": __name__})


FullLaplace = _fixed("all", "full", "FullLaplace")
KronLaplace = _fixed("all", "kron", "KronLaplace")
DiagLaplace = _fixed("all", "diag", "DiagLaplace")
LowRankLaplace = _fixed("all", "lowrank", "LowRankLaplace")
FullLLLaplace = _fixed("last_layer", "full", "FullLLLaplace")
KronLLLaplace = _fixed("last_layer", "kron", "KronLLLaplace")
DiagLLLaplace = _fixed("last_layer", "diag", "DiagLLLaplace")


def _subnetwork(structure: str, name: str) -> type[Laplace]:
    """laplace-torch's subnetwork class names, whose third positional argument is ``subnetwork_indices``."""

    def __init__(self: Laplace, model: nn.Module, likelihood: str, subnetwork_indices: torch.Tensor, *args: Any,
                 **kwargs: Any) -> None:
        kwargs["subnetwork_indices"] = subnetwork_indices
        Laplace.__init__(self, model, likelihood, "subnetwork", structure, *args, **kwargs)

    doc = (f"laplace-torch's ``{name}(model, likelihood, subnetwork_indices, ...)``: ``Laplace(model, likelihood, "
           f"'subnetwork', {structure!r}, subnetwork_indices=...)``.")
    return type(name, (Laplace,), {"__init__": __init__, "__doc__": doc, "__module__": __name__})


FullSubnetLaplace = _subnetwork("full", "FullSubnetLaplace")
DiagSubnetLaplace = _subnetwork("diag", "DiagSubnetLaplace")


class FunctionalLaplace(_FunctionalLaplace):
    """laplace-torch's ``FunctionalLaplace(model, likelihood, n_subset, sigma_noise, prior_precision, prior_mean, ...)``.

    :class:`posthoc.laplace.functional.FunctionalLaplace` with laplace-torch's positional order; ``backend`` must be
    a GGN backend (or None), ``backend_kwargs`` cannot change the numbers.
    Mapping batches reach the model as one argument (``model(batch)``), as in laplace-torch, read with
    ``dict_key_x`` / ``dict_key_y``.

    Raises:
        ValueError: a backend that is not a GGN one.
    """

    def __init__(self, model: nn.Module, likelihood: str, n_subset: int, sigma_noise: float | torch.Tensor = 1.0,
                 prior_precision: float | torch.Tensor = 1.0, prior_mean: float | torch.Tensor = 0.0,
                 temperature: float = 1.0, enable_backprop: bool = False, dict_key_x: str = "input_ids",
                 dict_key_y: str = "labels", backend: type | None = None, backend_kwargs: dict[str, Any] | None = None,
                 independent_outputs: bool = False, seed: int = 0, output_hessian: str = "diag") -> None:
        if backend is not None and backend_kind(backend) != "ggn":
            raise ValueError(f"FunctionalLaplace needs a GGN backend (laplace-torch's assertion), got {backend.__name__}")
        if backend_kwargs:
            warnings.warn(f"backend_kwargs {sorted(backend_kwargs)} cannot change FunctionalLaplace's numbers and are "
                          "ignored", UserWarning, stacklevel=2)
        super().__init__(model, getattr(likelihood, "value", likelihood), n_subset, sigma_noise, prior_precision,
                         prior_mean, temperature, independent_outputs, seed, output_hessian, dict_key_x=dict_key_x,
                         dict_key_y=dict_key_y, mapping_call="argument", enable_backprop=enable_backprop)
