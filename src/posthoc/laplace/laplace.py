"""``posthoc.Laplace``: the Laplace Redux family behind laplace-torch's API.

    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron")
    la.fit(train_loader)
    la.optimize_prior_precision(method="marglik")
    probs = la(x, pred_type="glm", link_approx="probit")

The curvature is fitted once; the posterior precision Lambda = s(sigma) H +
diag(delta) is a function of the prior precision delta and the noise sigma, so
marginal-likelihood tuning and grid search never refit.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Iterable, cast

import torch
from torch import nn

from posthoc.curvature.output_factors import (
    CurvatureType,
    OutputFactors,
    RecordingFactors,
    log_likelihood,
    log_likelihood_terms,
    many_classes_default,
)
from posthoc.distributed import check_same_on_all_ranks, sum_count, sum_over_ranks
from posthoc.laplace import checkpointing
from posthoc.laplace.continual import accumulating, fit_structure
from posthoc.laplace.parity import LaplaceTorchAPI
from posthoc.laplace.predict import PredType, for_likelihood, glm_predictive, likelihood_link, nn_predictive
from posthoc.laplace.prior import PriorKind, as_prior_tensor, per_parameter, prior_kind
from posthoc.laplace.roundoff import warn_roundoff
from posthoc.laplace.state import STATE_VERSION, laplace_state_dict, load_laplace_state  # noqa: F401 (re-exported)
from posthoc.laplace.structures import CurvatureStructure, HessianStructure, get_structure
from posthoc.likelihood import Likelihood
from posthoc.network.batches import DEFAULT_KEYS, checked_batches, prediction_inputs
from posthoc.network.inputs import (
    InputSpec,
    MappingCall,
    ModelCall,
    ModelInputs,
    batch_size,
    input_spec,
    naming_input_shape,
)
from posthoc.network.positions import IGNORE_INDEX, PositionFactors, as_rows, first_batch_layout, observations
from posthoc.network.probes import ExampleRoute
from posthoc.network.subset import ParameterSubset, SubsetOfWeights
from posthoc.predictive import LinkApprox, Predictive
from posthoc.predictive.tuning import (
    PriorOptimization,
    PriorStructure,
    checked_grid,
    checked_prior_precision,
    checked_sigma_noise,
    default_grid,
    grid_search,
    log_prior_start,
    maximise_evidence,
    method_choice,
    prior_structure_choice,
    tune_sigma_noise_choice,
    validation_nll_sum,
)
from posthoc.utils.checks import check_choice, check_int
from posthoc.utils.modes import eval_mode

_LOW_PRECISION = (torch.float16, torch.bfloat16)


class Laplace(LaplaceTorchAPI):
    """Laplace approximation N(theta*, Lambda^-1) of a trained network's posterior.

    The posterior is centred at the model's weights when ``fit`` runs (theta*); predicting, sampling or
    reading the posterior after the weights or buffers changed raises (fit again). Every forward pass runs
    the model in eval mode (:func:`posthoc.utils.modes.eval_mode`) and leaves its train/eval flags as found.

    Args:
        model: the trained network, float32 or float64 (float16/bfloat16: "diag" only).
        likelihood: "classification" (outputs are logits), "regression" or "binary" (independent Bernoulli logits).
        subset_of_weights: "all", "last_layer" or "subnetwork" (with
            ``subnetwork_indices``, positions in the parameters_to_vector order of the parameters that
            require grad (frozen ones are not counted), or a boolean mask of that length;
            see :func:`posthoc.laplace.subnetwork.largest_variance_indices`). "last_layer" covers the
            last nn.Linear on the path to the output, located on the first training batch (see
            :class:`posthoc.network.subset.ParameterSubset`), or ``last_layer_name``.
        hessian_structure: "full", "diag", "kron", "ekfac", "lowrank" (or a HessianStructure member), or the
            name of a structure added with :func:`posthoc.laplace.register_structure`.
        prior_precision: delta: a scalar, one value per parameter tensor, or one per parameter.
        sigma_noise: observation noise (regression; must stay 1 for classification).
        curvature: "ggn" (exact), "ggn_mc" (sampled labels) or "ef"; default None: "ggn", "ggn_mc" above 1,000 classes.
        mc_samples: labels sampled per example for "ggn_mc".
        seed: seeds label sampling, posterior samples and MC links.
        dict_key_x: for mapping batches (dict, UserDict, HF BatchEncoding), laplace-torch's meaning: the entry
            that gives the batch size (default "input_ids").
        dict_key_y: the target entry of mapping batches (default "labels"); the model
            gets every entry but the target (:func:`posthoc.network.batches.split_batch`; the old keys
            "input"/"target" keep their old meaning, deprecated).
        mapping_call: how a mapping input reaches the model: "auto" (from ``inspect.signature(model.forward)``:
            keyword arguments when its parameters name every key, as in every Hugging Face model, else one
            argument, laplace-torch's ``forward(self, data)`` wrapper), "kwargs" or "argument".
        output_fn: maps the model's raw output to the output tensor (B, C); default: a tensor, the first
            element of a tuple/list, or ``"logits"`` of a mapping or HF ``ModelOutput``.
        per_example: per-example Jacobians by "vmap" over examples, a "loop", or "auto": vmap unless one
            forward pass reads tensor values into Python (HF attention masks; :mod:`posthoc.network.probes`).
        progress: show progress bars.
        structure_options: passed to the structure's fit (e.g. lowrank
            ``{"rank": 20, "subsample": 1000}``, kron/ekfac ``{"kfac_approx": "reduce"}``).
        last_layer_name: for "last_layer", the nn.Linear to cover (a name from ``model.named_modules()``).
        ignore_index: the class target of positions to skip in outputs (B, ..., C) (:mod:`posthoc.network.positions`).

    Raises:
        ValueError: unknown options (an unknown hessian_structure lists the registered ones), a model on the
            meta device, invalid prior_precision/sigma_noise.
        TypeError: a float16/bfloat16 model with a structure other than "diag" (one without
            ``supports_low_precision``).
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: Likelihood | str,
        subset_of_weights: SubsetOfWeights | str = SubsetOfWeights.LAST_LAYER,
        hessian_structure: HessianStructure | str = HessianStructure.KRON,
        prior_precision: float | torch.Tensor = 1.0,
        sigma_noise: float | torch.Tensor = 1.0,
        curvature: CurvatureType | str | None = None,
        subnetwork_indices: torch.Tensor | None = None,
        mc_samples: int = 1,
        seed: int = 0,
        dict_key_x: str = DEFAULT_KEYS[0],
        dict_key_y: str = DEFAULT_KEYS[1],
        progress: bool = True,
        structure_options: dict[str, Any] | None = None,
        last_layer_name: str | None = None,
        mapping_call: MappingCall | str = MappingCall.AUTO,
        output_fn: Callable[[Any], torch.Tensor] | None = None,
        per_example: ExampleRoute | str = ExampleRoute.AUTO,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        self.model = model
        self.likelihood = check_choice(likelihood, Likelihood, "likelihood")
        self.structure_name, self.structure_cls = get_structure(hessian_structure)  # a registered name or member
        self.call = ModelCall(model, mapping_call, output_fn)
        self.subset = ParameterSubset(model, subset_of_weights, subnetwork_indices, last_layer_name=last_layer_name,
                                      model_call=self.call, per_example=per_example)
        if self.subset.dtype in _LOW_PRECISION and not self.structure_cls.supports_low_precision:
            raise TypeError(f"hessian_structure={self.structure_name!r} needs a float32 or float64 model (its "
                            f"eigen/Cholesky factorisations have no {self.subset.dtype} kernels and would lose the "
                            "variances to round-off); convert with model.float() or model.double(), or use "
                            "hessian_structure='diag'")
        if self.subset.kind is SubsetOfWeights.SUBNETWORK and not self.structure_cls.supports_subnetwork:
            raise ValueError(f"hessian_structure={self.structure_name!r} does not support subset_of_weights="
                             "'subnetwork'; use 'full', 'diag' or 'lowrank'")
        self.factors = OutputFactors(self.likelihood, curvature or CurvatureType.GGN, mc_samples=mc_samples, seed=seed)
        self._curvature_default, self.position_dims = curvature is None, 0
        self.ignore_index = check_int(ignore_index, "ignore_index")
        self.prior_precision, self.sigma_noise = prior_precision, sigma_noise
        self.seed, self.default_link_approx = seed, likelihood_link(self.likelihood, self.default_link_approx)
        self.dict_key_x, self.dict_key_y = dict_key_x, dict_key_y
        self.progress = progress
        self.structure_options = dict(structure_options or {})
        self.structure: CurvatureStructure | None = None  # the fitted posterior structure
        self.n_data = 0
        self.n_outputs: int | None = None
        self.input_shape: InputSpec | None = None  # one training input's shape (input_spec), from the first batch
        self._loglik_stat: torch.Tensor | None = None
        self._roundoff_quiet = False  # set while optimize_prior_precision tries hyperparameters

    # ----------------------------------------------------------------- hyperparameters
    @property
    def prior_precision(self) -> torch.Tensor:
        """Delta as a 1-D tensor: (1,), (n_tensors,) or (P,)."""
        return self._prior_precision

    @prior_precision.setter
    def prior_precision(self, value: float | torch.Tensor) -> None:
        self._prior_precision = self._checked_prior(self._as_tensor(value).detach())

    def _checked_prior(self, value: torch.Tensor) -> torch.Tensor:
        """The one validation of a prior precision (setter and explicit arguments).

        A 1-D tensor, entries finite and > 0, of a length the covered parameters and the structure accept.

        Before the last layer is located (at fit) its size is provisional: only the values are checked then,
        and the length again at fit.
        """
        value = checked_prior_precision(value)
        if self.subset.kind is SubsetOfWeights.LAST_LAYER and not self.subset.last_layer_located:
            return value
        prior = as_prior_tensor(value, self.subset)
        if not self.structure_cls.supports_parameter_prior and prior_kind(prior, self.subset) is PriorKind.PARAMETER:
            raise ValueError(f"hessian_structure={self.structure_name!r} supports a scalar or "
                             "per-layer prior precision only, not a per-parameter one")
        return prior

    @property
    def sigma_noise(self) -> torch.Tensor:
        """Observation noise sigma, a scalar tensor (1 for classification)."""
        return self._sigma_noise

    @sigma_noise.setter
    def sigma_noise(self, value: float | torch.Tensor) -> None:
        self._sigma_noise = self._checked_sigma(self._as_tensor(value).detach())

    def _as_tensor(self, value: float | torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(value, dtype=self.subset.dtype, device=self.subset.device)

    def _checked_sigma(self, value: torch.Tensor) -> torch.Tensor:
        """The one validation of sigma_noise (setter and explicit arguments); see :mod:`posthoc.predictive.tuning`.

        A finite scalar > 0, and 1 for classification (differentiable: ``value`` is not detached).
        """
        return checked_sigma_noise(value, self.likelihood)

    @property
    def n_params(self) -> int:
        """P, the number of covered parameters."""
        return self.subset.n_params

    @property
    def curvature(self) -> CurvatureStructure | None:
        """Deprecated name of :attr:`structure` (it clashed with the ``curvature=`` argument)."""
        warnings.warn("la.curvature is deprecated (it is not the curvature= argument): use la.structure, the fitted "
                      "posterior structure", DeprecationWarning, stacklevel=2)
        return self.structure

    # ----------------------------------------------------------------- fitting
    def _batches(self, loader: Iterable) -> Iterable[tuple[ModelInputs, torch.Tensor]]:
        return checked_batches(loader, self.likelihood, self.n_outputs, self.dict_key_x, self.dict_key_y,
                               self.subset.dtype, self.subset.device, input_shape=self.input_shape, mapping_inputs=True,
                               position_dims=self.position_dims, ignore_index=self.ignore_index)

    def fit(self, train_loader: Iterable, override: bool = True, *, checkpoint: checkpointing.FilePath | None = None,
            checkpoint_every: int = checkpointing.DEFAULT_CHECKPOINT_EVERY) -> "Laplace":
        """Fit the curvature: one data pass for full/diag/kron, two for ekfac, one per Lanczos product for lowrank.

        ``train_loader`` yields (x, y) tuples (x a tensor, tuple or mapping) or mappings (read with
        ``dict_key_x`` and ``dict_key_y``).
        theta* is the model's weights now (also for "last_layer", located on the first batch). The model
        runs in eval mode; its train/eval flags are restored afterwards. Refitting replaces the previous
        curvature. Under torch.distributed, give each rank its shard (e.g. a DistributedSampler): the
        curvature sums, N and log p(D | theta*) are all-reduced, so every rank ends with the posterior of
        the whole data; the MAP weights must agree across ranks.
        ``override=False`` (continual learning) adds this data's curvature, N and log-likelihood to the previous
        fit's, centred at the weights now (:func:`posthoc.laplace.continual.accumulated`; "full", "diag", "kron").
        ``checkpoint`` (a path): resumable, its state saved every ``checkpoint_every`` batches (:mod:`~.checkpointing`).

        Raises:
            ValueError: an empty loader; inputs of varying shape; labels that are not class indices
                (B,) in range; regression targets whose width differs from the model's outputs.
            NotImplementedError: ``override=False`` with a structure that does not accumulate.
            CheckpointError: another run's checkpoint (refusals before any pass: :func:`~.checkpoint_plan`).
        """
        with accumulating(self, override), eval_mode(self.model):
            self._fit(train_loader, checkpointing.checkpoint_plan(self, train_loader, checkpoint, checkpoint_every))
        return self

    def _fit(self, train_loader: Iterable, plan: checkpointing.CheckpointPlan | None = None) -> "Laplace":
        self.structure, self.input_shape = None, None
        x0, self.n_outputs, self.position_dims = first_batch_layout(
            train_loader, self.call, self.likelihood, self.dict_key_x, self.dict_key_y, self.subset.dtype,
            self.subset.device, mapping_inputs=True, ignore_index=self.ignore_index)
        self.subset.flatten_positions = self.position_dims > 0
        self.subset.capture(x0)
        self.input_shape = input_spec(x0)
        self.prior_precision = self._prior_precision  # its length is checked against the located subset
        check_same_on_all_ranks(self.subset.theta_map, "the MAP weights")
        self.factors = many_classes_default(self.factors, self.n_outputs) if self._curvature_default else self.factors
        recorder = RecordingFactors(self.factors, self.likelihood)
        factors = recorder if not self.position_dims else PositionFactors(
            recorder, self.n_outputs, self.likelihood, self.ignore_index, self.factors.curvature is CurvatureType.GGN_MC)
        if plan is not None:  # in checkpointed segments (posthoc.laplace.checkpointing)
            return checkpointing.resumable_fit(self, train_loader, plan, recorder, cast(OutputFactors, factors))
        totals: dict[str, int] = {}

        def batches():
            # N is counted on the first complete pass; the recorder sums log p(y | f) over what the
            # structure evaluates during that pass.
            first_pass, n_data = not totals, 0
            recorder.active = first_pass
            for x, y in self._batches(train_loader):
                n_data += observations(batch_size(x, self.dict_key_x), y, self.likelihood, self.ignore_index,
                                       self.position_dims)
                yield self.subset.inputs(x), y
            recorder.active = False
            totals.setdefault("n_data", n_data)

        # the recorder duck-types OutputFactors (it calls them and sums log p(y | f) on the way)
        self.structure = fit_structure(self.structure_cls, self.subset, batches, cast(OutputFactors, factors),
                                       self.progress, **self.structure_options)
        if not totals:  # the structure stopped before the end of the data (e.g. a subsample)
            for _ in batches():
                pass
        if recorder.n_seen == totals["n_data"]:
            stat = recorder.stat
        else:  # the structure did not evaluate every example exactly once: one more forward pass
            stat = sum(
                (log_likelihood_terms(*as_rows(self.subset.forward(self.subset.inputs(x)).detach(), y, self.n_outputs,
                                              self.likelihood, self.ignore_index, self.position_dims), self.likelihood)
                 for x, y in self._batches(train_loader)),
                torch.zeros((), dtype=self.subset.dtype, device=self.subset.device),
            )
        self.n_data = sum_count(totals["n_data"], "the number of training examples")
        (self._loglik_stat,) = sum_over_ranks([stat.detach().to(self.subset.dtype)], "log p(D | theta*)")
        return self

    def _require_fit(self) -> CurvatureStructure:
        if self.structure is None:
            raise RuntimeError("call fit(train_loader) first: the Laplace approximation is not fitted")
        return self.structure

    # ----------------------------------------------------------------- evidence
    def _hyper(self, prior_precision, sigma_noise) -> tuple[torch.Tensor, torch.Tensor]:
        """Explicit (differentiable) or stored hyperparameters, validated like the setters."""
        prior = self.prior_precision if prior_precision is None else self._checked_prior(
            self._as_tensor(prior_precision))
        sigma = self.sigma_noise if sigma_noise is None else self._checked_sigma(self._as_tensor(sigma_noise))
        return prior, sigma

    def _warn_roundoff(self, structure: CurvatureStructure, prior: torch.Tensor, scale: torch.Tensor) -> None:
        """The float32 round-off warning (:func:`posthoc.laplace.roundoff.warn_roundoff`), unless tuning."""
        if not self._roundoff_quiet:
            warn_roundoff(structure, self.subset.dtype, prior, scale, self.structure_name)

    def log_marginal_likelihood(self, prior_precision: torch.Tensor | float | None = None,
                                sigma_noise: torch.Tensor | float | None = None) -> torch.Tensor:
        """Laplace evidence log p(D | delta, sigma), differentiable in both.

        log p(D | theta*) - 1/2 sum_p delta_p theta*_p^2 + 1/2 sum_p log delta_p - 1/2 log det Lambda.

        Defaults to the stored hyperparameters. No refit: cost is the structure's log-determinant.
        """
        curvature = self._require_fit()
        assert self._loglik_stat is not None and self.n_outputs is not None  # set by fit with the structure
        prior, sigma = self._hyper(prior_precision, sigma_noise)
        self._warn_roundoff(curvature, prior, self.factors.scale(sigma))
        delta = per_parameter(prior, self.subset)
        scatter = (delta * self.subset.theta_map**2).sum()
        loglik = log_likelihood(self._loglik_stat, self.n_data * self.n_outputs, self.likelihood, sigma)
        logdet = curvature.logdet_precision(prior, self.factors.scale(sigma))
        return loglik - 0.5 * scatter + 0.5 * torch.log(delta).sum() - 0.5 * logdet

    def optimize_prior_precision(
        self, pred_type: PredType | str = PredType.GLM, method: PriorOptimization | str | None = None,
        n_steps: int = 100, lr: float = 0.1, init_prior_prec: float | None = None,
        prior_structure: PriorStructure | str = PriorStructure.SCALAR, val_loader: Iterable | None = None,
        loss: Callable[[Any, torch.Tensor], float | torch.Tensor] | None = None, log_prior_prec_min: float = -4,
        log_prior_prec_max: float = 4, grid_size: int = 21, link_approx: LinkApprox | str | None = None,
        n_samples: int = 100, verbose: bool = False, progress_bar: bool | None = None, *,
        tune_sigma_noise: bool | None = None, grid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Tune the prior precision (and sigma_noise for regression) without refitting; laplace-torch's signature.

        ``method`` default None: "gridsearch" when ``val_loader`` is given, else "marglik" (laplace-torch: always
        "marglik"; pass ``method="marglik"`` for that). The evidence's prior was 10-1000x below the validation
        optimum on every classification task of benchmarks/defaults.py (issue 17; docs/choosing.md).
        ``link_approx`` default None: la(x)'s default link (``default_link_approx``, "probit_centred").
        "marglik": Adam on log delta (and log sigma if ``tune_sigma_noise``, default: regression only) maximising
        the evidence for ``n_steps`` steps from ``init_prior_prec`` (default: the mean current delta);
        ``prior_structure`` "scalar", "layerwise" (one per parameter tensor) or "diag" (one per parameter).
        "gridsearch": the scalar delta in ``grid`` (default logspace(log_prior_prec_min, log_prior_prec_max,
        grid_size) = logspace(-4, 4, 21)) with the lowest loss of the ``pred_type`` predictive on ``val_loader``
        (summed over ranks' shards): the NLL, or ``loss(outputs, y)``, a batch's mean loss, where outputs are
        ``la(x, pred_type=, link_approx=, n_samples=)`` (class probabilities; regression: ``(f_mu, f_var)``).
        ``n_samples``: weight samples of pred_type "nn". Both go through :mod:`posthoc.predictive.tuning`.
        ``progress_bar``: None follows ``progress``; ``verbose`` prints the result. Returns the new delta.
        Deprecated (DeprecationWarning): a method as the first argument (pass ``method=``); prior_structure
        "layer" / "parameter" (now "layerwise" / "diag"). The float32 round-off warning is given once, for the
        chosen hyperparameters, not for every value tried.

        Raises:
            RuntimeError: not fitted. ValueError: unknown options, gridsearch without val_loader, invalid
            values. FloatingPointError: the evidence became non-finite, or no grid value has a finite loss.
        """
        curvature = self._require_fit()
        link_approx = self.default_link_approx if link_approx is None else link_approx
        pred_type, how = method_choice(pred_type, method, val_loader is not None)
        kind = PredType.GLM if pred_type is None else check_choice(pred_type, PredType, "pred_type")
        progress = self.progress if progress_bar is None else bool(progress_bar)
        self._roundoff_quiet = True
        try:
            if how is PriorOptimization.GRIDSEARCH:
                if grid is None:
                    grid = default_grid(log_prior_prec_min, log_prior_prec_max, grid_size, self.subset.dtype)
                self._gridsearch(val_loader, grid, kind, link_approx, loss, n_samples, progress)
            else:
                tune_sigma = tune_sigma_noise_choice(tune_sigma_noise, self.likelihood)
                size = {PriorStructure.SCALAR: 1, PriorStructure.LAYERWISE: len(self.subset.blocks),
                        PriorStructure.DIAG: self.n_params}[prior_structure_choice(prior_structure)]
                prior, sigma = maximise_evidence(self.log_marginal_likelihood,
                                                 log_prior_start(init_prior_prec, self.prior_precision, size),
                                                 self.sigma_noise, tune_sigma, n_steps, lr, "marginal likelihood",
                                                 progress)
                self.prior_precision = prior
                if sigma is not None:
                    self.sigma_noise = sigma
        finally:
            self._roundoff_quiet = False
        self._warn_roundoff(curvature, self.prior_precision, self.factors.scale(self.sigma_noise))
        if verbose:
            print(f"Optimized prior precision is {self.prior_precision}.")
        return self.prior_precision

    def _gridsearch(self, val_loader, grid, pred_type, link_approx, loss, n_samples, progress) -> None:
        if val_loader is None:
            raise ValueError("method='gridsearch' needs val_loader (held-out data, never the test set)")
        grid = checked_grid(grid, self.subset.dtype)
        val = list(self._batches(val_loader))
        if not val:
            raise ValueError("val_loader yielded no batches")

        def validation_loss(delta: torch.Tensor) -> float:
            self.prior_precision = delta.reshape(1)
            total = 0.0
            for x, y in val:
                if loss is not None:
                    total += float(loss(self(x, pred_type=pred_type, link_approx=link_approx,
                                                n_samples=n_samples, seed=self.seed), y)) * len(y)
                    continue
                pred = self.predict(x, pred_type=pred_type, n_samples=n_samples, seed=self.seed)
                total += validation_nll_sum(pred, y, self.likelihood, self.sigma_noise, link_approx, self.seed)
            return total

        # a sharded val_loader under torch.distributed: the sums of all ranks (first minimum wins)
        what = "validation NLL" if loss is None else "validation loss"
        self.prior_precision = grid_search(validation_loss, grid, sum_ranks=True, what=what,
                                           progress=progress).reshape(1)

    # ----------------------------------------------------------------- prediction
    def _fitted_posterior(self, action: str) -> CurvatureStructure:
        """The fitted curvature, after checking the model still has the weights it was fitted at."""
        curvature = self._require_fit()
        self.subset.check_current(action)
        return curvature

    def _model_inputs(self, x: Any) -> ModelInputs:
        """X (tensor, tuple or mapping) on the model's device and dtype, finite, shaped like the training inputs."""
        return prediction_inputs(x, self.input_shape, self.dict_key_y, self.subset.device, self.subset.dtype)

    def _naming_input_shape(self, x: ModelInputs) -> Any:
        """Turn a failure of the model on x shaped unlike the training inputs into an error that says so."""
        return naming_input_shape(x, self.input_shape)

    def predict(self, x: ModelInputs, pred_type: PredType | str = PredType.GLM, n_samples: int = 100,
                seed: int | None = None) -> Predictive:
        """Predictive over outputs for inputs x (B, ...) shaped like the training inputs.

        x is what the training loader's x was: a tensor, tuple or mapping (a mapping's ``dict_key_y`` entry,
        if present, is dropped).

        "glm": GaussianPredictive(f(x; theta*), J Lambda^-1 J^T) with full (B, C, C) covariance; ``probs()``
        defaults to la(x)'s ``default_link_approx`` (was "probit"; a FutureWarning says so without a link).
        "nn": SamplePredictive of f(x; theta_s) for n_samples weight samples (seeded).
        Neither includes observation noise (nor does ``la(x)``): use ``.with_noise(la.sigma_noise)``.
        The model runs in eval mode (its train/eval flags are restored afterwards).

        Raises:
            RuntimeError: not fitted, or the model's weights/buffers changed since fit.
            ValueError: x not finite or not shaped like the training inputs.
        """
        curvature = self._fitted_posterior("predict")
        kind = check_choice(pred_type, PredType, "pred_type")
        x = self._model_inputs(x)
        scale = self.factors.scale(self.sigma_noise)
        self._warn_roundoff(curvature, self.prior_precision, scale)
        with eval_mode(self.model), self._naming_input_shape(x):
            inputs = self.subset.inputs(x)
            prior, link = self.prior_precision, self.default_link_approx
            pred = (glm_predictive(curvature, self.subset, inputs, prior, scale, link) if kind is PredType.GLM
                    else nn_predictive(self.subset, inputs, self.sample(n_samples, seed=seed)))
            return for_likelihood(pred, self.likelihood)

    def posterior_variance(self) -> torch.Tensor:
        """diag(Lambda^-1), (P,). Raises RuntimeError if not fitted or if the weights changed since fit."""
        curvature = self._fitted_posterior("read the posterior variance")
        scale = self.factors.scale(self.sigma_noise)
        self._warn_roundoff(curvature, self.prior_precision, scale)
        return curvature.posterior_variance(self.prior_precision, scale).detach()

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything that restores the fitted approximation exactly (with the same model weights).

        See :func:`posthoc.laplace.state.laplace_state_dict`. Raises RuntimeError if not fitted.
        """
        return laplace_state_dict(self)

    def load_state_dict(self, state: dict[str, Any]) -> "Laplace":
        """Restore a fitted state; the settings and the model's current weights must match those of the fit.

        theta* is re-read from the model now, so load the model's checkpoint first.

        Raises:
            ValueError: another version, other settings, another subnetwork or last layer, or other weights.
        """
        return load_laplace_state(self, state)
