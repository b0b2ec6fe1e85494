"""``posthoc.ScaLLA``: the linearised Laplace predictive through a learned surrogate kernel (docs/scalla.md).

    s = ScaLLA(model, "classification", n_features=100, biased=True)
    s.fit(train_loader, context_loader=context_loader, checkpoint="scalla.pt")
    s.optimize_prior_precision(method="gridsearch", val_loader=val_loader)
    pred = s.predict(x)          # GaussianPredictive(f(x; theta*), phi(x)^T Sigma_w phi(x))

A surrogate phi(x) (m, C) is trained from JVPs of the fixed network so that phi(x)^T phi(x') approximates the
NTK J(x) J(x')^T; the posterior is Gaussian over m latent weights; prediction costs one network forward and one
surrogate forward, no Jacobian.
"""

from __future__ import annotations

import os
import warnings
from enum import Enum
from typing import Any, Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from posthoc.curvature.output_factors import CurvatureType, OutputFactors, log_likelihood, log_likelihood_terms
from posthoc.distributed import check_same_on_all_ranks, is_distributed, rank_slice, sum_count, sum_over_ranks
from posthoc.laplace.predict import PositionPredictive
from posthoc.likelihood import Likelihood, check_supported
from posthoc.network.batches import DEFAULT_KEYS, checked_batches, prediction_inputs
from posthoc.network.inputs import (
    InputSpec,
    MappingCall,
    ModelCall,
    ModelInputs,
    batch_size,
    check_like,
    input_spec,
    take,
)
from posthoc.network.positions import IGNORE_INDEX, first_batch_layout, observations
from posthoc.network.subset import ParameterSubset
from posthoc.predictive import GaussianPredictive, LinkApprox, laplace_torch_outputs
from posthoc.predictive.tuning import (
    PriorOptimization,
    checked_prior_precision,
    checked_sigma_noise,
    maximise_evidence,
    tune_sigma_noise_choice,
)
from posthoc.scalla import objectives
from posthoc.scalla.pools import context_pool_of
from posthoc.scalla.positions import FlatPositions, feature_rows, kept_rows, position_kernel
from posthoc.scalla.posterior import LatentPosterior, batch_precision
from posthoc.scalla.rank_checks import SAME_LOADERS, check_not_sharded, input_digest
from posthoc.scalla.state import restore_scalla_state, scalla_state
from posthoc.scalla.surrogate import HIDDEN, FeatureMap, SurrogateInit, build_default_surrogate
from posthoc.scalla.training import InputPool, SurrogateTrainer, TrainSettings, fit_settings, n_context_features
from posthoc.scalla.tuning import gridsearch_prior
from posthoc.utils.checks import check_choice, check_int, check_positive_int
from posthoc.utils.modes import eval_mode


class EvidenceKind(str, Enum):
    """The marginal-likelihood objective tuned by ScaLLA: the authors' "hybrid" or the "latent" model's."""
    HYBRID = "hybrid"
    LATENT = "latent"


class ScaLLA:
    """Scalable linearised Laplace with a surrogate kernel.

    Args:
        model: the trained network (its weights at ``fit`` are theta*; never changed). Every forward pass runs it in
            eval mode (posthoc.utils.modes.eval_mode) and leaves its train/eval flags as found. Changing
            the weights or buffers after ``fit`` makes predict, features, kernel and the evidence raise until
            ``fit`` is called again.
        likelihood: "classification" (logits) or "regression".
        n_features: m, the number of latent features the training points see (phi(x) is m x C). The biased
            variant adds h = round(0.2 m) context features (``n_latent`` = m + h; phi(x) is (m + h) x C, see
            posthoc.scalla.training), so that its training-point kernel keeps the unbiased variant's rank.
        surrogate: an nn.Module mapping inputs to (B, n_latent C) or (B, n_latent, C) features, trained in place; None
            builds the default from the model (posthoc.scalla.surrogate: trunk + FC 200 + FC m C, scaled by
            sqrt(P / m); the trunk is ``model.trunk``, an nn.Sequential's layers before its last nn.Linear, or
            for any other model a copy of it with its last nn.Linear on the path to the output replaced by an
            identity; ``surrogate_init`` "model" starts the trunk at the trained weights, "fresh" re-draws it
            seeded by ``seed``). A surrogate gets the model's inputs as they are (a tensor, tuple or mapping).
        surrogate_hidden: the width of the default surrogate's hidden FC layer; None keeps the authors' 200.
            Wider heads fit the small-eigenvalue directions (which set in-distribution variances) better, at more
            time per step (docs/measurements/methods.md). Only for the default surrogate (an error with
            ``surrogate``).
        target_jitter: with "directions", no context loader and fewer than ``n_target_points`` (floating) training
            inputs, the targets are topped up with training inputs plus Gaussian noise of ``target_jitter`` times
            each feature's training std (posthoc.scalla.pools.jittered_pool; 0: off). With its 150 training points
            alone the surrogate missed the kernel between them (benchmarks/results/scalla_defaults.md).
        prior_precision: delta (scalar); sigma_noise: observation noise (regression only).
        biased: zero the train x context kernel while training (needs a context loader at fit): training-point
            variances stay close to the unbiased variant's, context-like points get larger ones
            (docs/measurements/methods.md).
        objective: "directions" (regression onto JVPs along fixed directions, the default) or "probes" (the
            paper's (K - Q)^2 with fresh Rademacher probes); see posthoc.scalla.training.
        steps: training steps; this and batch_size, n_probes, lr, lr_schedule, n_target_points, directions,
            eigen_subsample and checkpoint_every are the training settings (posthoc.scalla.training.TrainSettings).
            lr None: 3e-3 when jittered inputs fill the targets, else 1e-3 (posthoc.scalla.training.fit_settings).
        seed: seeds everything random in training (init, batches, probes, directions).
        dict_key_x: for mapping batches (dict, UserDict, HF BatchEncoding), Laplace's (and laplace-torch's)
            meaning: the entry that gives the batch size (default "input_ids").
        dict_key_y: the target entry of mapping batches (default "labels"); the model gets every other entry (:func:`posthoc.network.batches.split_batch`;
            batches keyed "input"/"target", ScaLLA's old defaults, keep their old meaning with a DeprecationWarning).
            Inputs of every training (and context) batch must have the same shapes: pad token inputs to one length.
        mapping_call: how a mapping input reaches the model, "auto", "kwargs" or "argument" (as in Laplace).
        output_fn: maps the model's raw output to the output tensor (B, C) or (B, ..., C); default: a tensor, the
            first element of a tuple/list, or ``"logits"`` of a mapping or HF ``ModelOutput``.
        progress: progress bars.
        ignore_index: outputs with positions (B, ..., C) (per token or pixel, posthoc.scalla.positions): the
            classification target of positions that count nowhere (PyTorch's -100). Features, kernel and
            predictive are then per position, (B, ..., m, C), (B, ..., C) and (B, ..., C, C).

    Under torch.distributed give every rank the same loaders and seed: each training step and the posterior
    pass are split over the ranks (the combined batch is the single-process batch), unlike Laplace.fit, which
    takes each rank's shard. ``fit`` compares the model's weights and a digest of the training and context
    inputs (count, sums, order) across ranks and raises ValueError on every rank if they differ (e.g. sharded
    loaders), naming the fix. Rank 0 writes the checkpoint; it resumes on any number of ranks.

    The surrogate is a deterministic feature map, trained in eval mode (posthoc.scalla.surrogate): the same
    ``seed`` gives the same kernel bit for bit, whatever the global RNG.

    Defaults: "directions" with the top 100 GGN eigenvectors (Lanczos on 200 training points), 2,000 target points
    (half train, half context; without context points jittered training inputs, ``target_jitter``), 3,000 Adam steps
    of 64 points (half train, half context targets), lr 1e-3 (3e-3 with jittered targets) with cosine decay, trunk
    initialised from the model, a 200-unit hidden layer. Cost ("directions"): a Lanczos run of GGN products on
    ``eigen_subsample`` points (two JVP evaluations per point per product, then one VJP per point and eigenvector to
    rebuild them; ``directions="rademacher"`` skips both), then one JVP evaluation per target point and direction.
    Memory beyond the network and data: about 20 float32 P-vectors whatever m (posthoc.scalla.directions). Rademacher
    directions are redrawn per chunk; "eigen" runs Lanczos on the subsample's Gram matrix (basis (n_sub (C - 1),
    2m + 1), not (P, 2m + 1) float64) and rebuilds its eigenvectors per chunk: fit peak 110 MB + 19 P-vectors on
    1.1M- and 2.1M-parameter MLPs, m = 100 (before: 800 P-vectors; benchmarks/results/scalla_memory.md).
    The measurements that chose these defaults (variance rank correlation with the exact LLA, kernel error,
    FMNIST NLL/ECE/AUROC against the paper's recipe) are in docs/measurements/methods.md.
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: Likelihood | str,
        n_features: int = 100,
        surrogate: nn.Module | None = None,
        prior_precision: float = 1.0,
        biased: bool = False,
        sigma_noise: float = 1.0,
        objective: str = "directions",
        steps: int = 3000,
        batch_size: int = 64,
        n_probes: int = 1,
        lr: float | None = None,
        lr_schedule: str = "cosine",
        n_target_points: int = 2000,
        directions: str = "eigen",
        eigen_subsample: int = 200,
        surrogate_init: SurrogateInit | str = SurrogateInit.MODEL,
        surrogate_hidden: int | None = None,
        target_jitter: float = 1.0,
        checkpoint_every: int = 500,
        seed: int = 0,
        dict_key_x: str = DEFAULT_KEYS[0],
        dict_key_y: str = DEFAULT_KEYS[1],
        progress: bool = True,
        mapping_call: MappingCall | str = MappingCall.AUTO,
        output_fn: Callable[[Any], torch.Tensor] | None = None,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        check_positive_int(n_features, "n_features", "the number of latent features m")
        if surrogate is not None and not isinstance(surrogate, nn.Module):
            raise TypeError(f"surrogate must be an nn.Module or None, got {type(surrogate).__name__}")
        self.model = model
        self.likelihood = check_supported(check_choice(likelihood, Likelihood, "likelihood"), (Likelihood.CLASSIFICATION, Likelihood.REGRESSION), "ScaLLA")
        self.n_features, self.biased, self.seed = n_features, bool(biased), seed
        self.n_context_features = n_context_features(n_features, self.biased)
        self.surrogate_init = check_choice(surrogate_init, SurrogateInit, "surrogate_init")
        if surrogate_hidden is not None:
            check_positive_int(surrogate_hidden, "surrogate_hidden", "the default surrogate's hidden width")
            if surrogate is not None:
                raise ValueError("surrogate_hidden sizes the default surrogate; it cannot apply to a surrogate you "
                                 "pass (leave it None)")
        self.surrogate_hidden = HIDDEN if surrogate_hidden is None else surrogate_hidden
        if not target_jitter >= 0:
            raise ValueError(f"target_jitter must be >= 0 (0 turns the filling off), got {target_jitter}")
        self.target_jitter, self.default_lr = float(target_jitter), lr is None
        self._user_surrogate = surrogate
        self.surrogate: nn.Module | None = None
        self.call = ModelCall(model, mapping_call, output_fn)
        self.subset = ParameterSubset(model, "all", model_call=self.call)
        self.settings = TrainSettings(objective=objective, steps=steps, batch_size=batch_size, n_probes=n_probes,
                                      lr=TrainSettings.lr if lr is None else lr, lr_schedule=lr_schedule,
                                      n_target_points=n_target_points, directions=directions,
                                      eigen_subsample=eigen_subsample, checkpoint_every=checkpoint_every, seed=seed)
        self.factors = OutputFactors(self.likelihood, CurvatureType.GGN)
        self.dict_key_x, self.dict_key_y, self.progress = dict_key_x, dict_key_y, progress
        self.prior_precision = prior_precision
        self.sigma_noise = sigma_noise
        self.posterior: LatentPosterior | None = None
        self.input_shape: InputSpec | None = None  # input_spec of the training inputs: (shape of one example) for tensors
        self.input_dtype: torch.dtype | None = None  # the subset's dtype for floating inputs; integer ids keep theirs
        self.example_input: ModelInputs | None = None  # one training input, which builds the default surrogate
        self.n_outputs: int | None = None
        self.ignore_index, self.position_dims = check_int(ignore_index, "ignore_index"), 0  # outputs (B, ..., C): position_dims > 0
        self.train_record: dict[str, Any] = {}

    @property
    def n_latent(self) -> int:
        """M + h: the surrogate's feature count and the latent dimension (h = 0 unless biased)."""
        return self.n_features + self.n_context_features

    # ----------------------------------------------------------------- hyperparameters
    @property
    def prior_precision(self) -> torch.Tensor:
        """delta, a scalar tensor."""
        return self._prior_precision

    @prior_precision.setter
    def prior_precision(self, value: float | torch.Tensor) -> None:
        prior = torch.as_tensor(value, dtype=self.subset.dtype).detach()
        if prior.numel() != 1:
            raise ValueError(f"ScaLLA takes a scalar prior precision, got shape {tuple(prior.shape)}")
        self._prior_precision = checked_prior_precision(prior).reshape(()).to(self.subset.device)

    @property
    def sigma_noise(self) -> torch.Tensor:
        """The observation noise (a 0-d tensor); set it to a positive float or tensor (ValueError otherwise)."""
        return self._sigma_noise

    @sigma_noise.setter
    def sigma_noise(self, value: float | torch.Tensor) -> None:
        sigma = torch.as_tensor(value, dtype=self.subset.dtype).detach()
        self._sigma_noise = checked_sigma_noise(sigma, self.likelihood).to(self.subset.device)

    # ----------------------------------------------------------------- fitting
    def _batches(self, loader: Iterable):
        return checked_batches(loader, self.likelihood, self.n_outputs, self.dict_key_x, self.dict_key_y,
                               self.subset.dtype, self.subset.device, mapping_inputs=True,
                               position_dims=self.position_dims, ignore_index=self.ignore_index)

    def _build_surrogate(self, example: ModelInputs) -> nn.Module:
        assert self.n_outputs is not None
        if self._user_surrogate is not None:
            surrogate: nn.Module = FeatureMap(self._user_surrogate, self.n_latent, self.n_outputs, self.position_dims)
            with torch.no_grad():
                surrogate.eval()(take(example, 0, 1))  # fails now, with the shape message, if the output is wrong
            return surrogate
        with warnings.catch_warnings():  # a deep copy of a model can warn (e.g. HF's attention-implementation notes)
            return build_default_surrogate(self.model, example, self.n_latent, self.n_outputs,
                                           init=self.surrogate_init, seed=self.seed, hidden=self.surrogate_hidden,
                                           call=self.call, position_dims=self.position_dims)

    def fit(self, train_loader: Iterable, context_loader: Iterable | None = None, steps: int | None = None,
            checkpoint: str | os.PathLike | None = None,
            callback: Callable[[int, int], None] | None = None) -> "ScaLLA":
        """Train the surrogate, then fit the n_latent x n_latent posterior by one pass over ``train_loader``.

        Training resumes from ``checkpoint`` if it exists. ``context_loader`` yields context inputs (tuples/dicts like
        the training loader, or bare model inputs) of the training inputs' shape; the biased variant needs it. ``steps``
        overrides the constructor's. ``callback(step, jvp_evaluations)`` runs after every training step.

        theta* is read here, from the model's current weights (as is the default surrogate's trunk); a previous
        fit is dropped first, so a fit that fails or is interrupted leaves nothing to predict with. Raises
        ValueError under torch.distributed when the ranks' weights or inputs differ (see the class docstring), or
        for batches whose inputs differ in shape (token inputs padded to different lengths); TypeError for model
        inputs that are not tensors or tuples/mappings of tensors.
        """
        for loader in (train_loader, context_loader):
            check_not_sharded(loader)
        self.surrogate, self.posterior = None, None
        with eval_mode(self.model):
            self.subset.capture()
            check_same_on_all_ranks(self.subset.theta_map, "the MAP weights")
            x0, self.n_outputs, self.position_dims = first_batch_layout(
                train_loader, self.call, self.likelihood, self.dict_key_x, self.dict_key_y, self.subset.dtype,
                self.subset.device, mapping_inputs=True, ignore_index=self.ignore_index)
            self.subset.flatten_positions = self.position_dims > 0  # JVP targets of vec(outputs), (B, L·C)
            self.input_shape = input_spec(x0)
            self.input_dtype = x0.dtype if isinstance(x0, torch.Tensor) else self.subset.dtype
            self.example_input = take(x0, 0, min(2, batch_size(x0, self.dict_key_x)))
            if self.biased and context_loader is None:
                raise ValueError("biased=True needs context points: pass context_loader (inputs resembling OOD "
                                 "data)")
            train_pool = InputPool(train_loader, "training", self.subset.dtype, self.subset.device,
                                   self.dict_key_x, self.dict_key_y)
            jitter = self.target_jitter if not self.biased and self.settings.objective == "directions" else 0.0
            context_pool = context_pool_of(context_loader, train_pool, self.settings.n_target_points, jitter,
                                           self.seed, self.dict_key_x, self.dict_key_y)
            if is_distributed():
                for pool in (train_pool, context_pool):
                    if pool is not None:
                        check_same_on_all_ranks(input_digest(pool.inputs), f"the {pool.name} inputs",
                                                fix=SAME_LOADERS)
            settings = fit_settings(self.settings, steps, self.default_lr, context_pool)
            self.surrogate = self._build_surrogate(self.example_input)
            trained = FlatPositions(self.surrogate) if self.position_dims else self.surrogate
            trainer = SurrogateTrainer(trained, self.subset, self.likelihood, train_pool, context_pool,
                                       settings, biased=self.biased, checkpoint=checkpoint, progress=self.progress,
                                       callback=callback, position_outputs=self.n_outputs if self.position_dims else 0
                                       ).run(self.n_features, self.n_context_features)
            self.train_record = {"steps": trainer.step, "jvp_evaluations": trainer.jvp_evaluations,
                                 "history": trainer.history, "wall_time_s": trainer.wall_time_s}
            self.fit_posterior(train_loader)
        return self

    @torch.no_grad()
    def fit_posterior(self, train_loader: Iterable) -> "ScaLLA":
        """H = sum_n phi(x_n) Gamma_n phi(x_n)^T by one pass over the data (the surrogate stays as it is).

        Outputs with positions: the sum runs over the kept positions, N counts them (posthoc.scalla.positions).

        Under torch.distributed every rank reads the same loader and takes its part of each batch; H, N and
        log p(D | theta*) are all-reduced. Raises ValueError (on every rank) if the ranks' loaders yield
        different inputs, e.g. DistributedSampler shards: each rank would sum part of its shard. Raises
        RuntimeError if the model's weights changed since ``fit``, ValueError for inputs of another shape.
        """
        surrogate = self._require_surrogate()
        self.subset.check_current("fit the ScaLLA posterior")
        check_not_sharded(train_loader)
        surrogate.eval()
        precision = torch.zeros(self.n_latent, self.n_latent, dtype=torch.float64, device=self.subset.device)
        stat = precision.new_zeros(())  # both float64 (posterior.py), the log-likelihood cast back below
        n_data, n_seen, digest = 0, 0, torch.zeros(4, dtype=torch.float64)
        for x, y in tqdm(self._batches(train_loader), desc="ScaLLA posterior", disable=not self.progress, leave=False):
            self._check_shape(x, "training inputs")
            size = batch_size(x, self.dict_key_x)
            if is_distributed():
                digest += input_digest(x, n_seen)
                n_seen += size
            part = rank_slice(size)
            x, y = take(x, part.start, part.stop), y[part]
            with eval_mode(self.model):
                outputs = self.call(x)
            features = surrogate(x)
            n_data += observations(part.stop - part.start, y, self.likelihood, self.ignore_index, self.position_dims)
            if self.position_dims:
                features, outputs, y = kept_rows(features, outputs, y, self.likelihood, self.ignore_index)
            precision += batch_precision(features, self.factors(outputs, y))
            stat += log_likelihood_terms(outputs, y, self.likelihood)
        check_same_on_all_ranks(digest, "the training inputs of the posterior pass", fix=SAME_LOADERS)
        precision, stat = sum_over_ranks([precision, stat], "the ScaLLA posterior")
        n_data = sum_count(n_data, "the number of training examples")
        theta, n_outputs = self.subset.theta_map, self.n_outputs
        if n_outputs is None:  # set by fit and load_state_dict, like the surrogate
            raise RuntimeError("call fit(train_loader) first: ScaLLA has no trained surrogate")
        self.posterior = LatentPosterior(precision, stat.to(theta.dtype), n_data, n_outputs, theta.square().sum(),
                                         self.subset.n_params)
        return self

    def _require_surrogate(self) -> nn.Module:
        if self.surrogate is None:
            raise RuntimeError("call fit(train_loader) first: ScaLLA has no trained surrogate")
        return self.surrogate

    def _require_fit(self, action: str | None = None) -> LatentPosterior:
        """The posterior; with ``action``, also check that the model still has the weights it was fitted at."""
        if self.posterior is None:
            raise RuntimeError("call fit(train_loader) first: ScaLLA is not fitted (or its last fit did not finish)")
        if action is not None:
            self.subset.check_current(action)
        return self.posterior

    def _check_shape(self, x: ModelInputs, name: str) -> None:
        if self.input_shape is not None:
            check_like(x, self.input_shape, name, fitted=True, estimator="ScaLLA")

    def _inputs(self, x: Any, name: str) -> ModelInputs:
        """The inputs x (tensor, tuple or mapping; a mapping's target entry dropped) placed, checked and shaped."""
        x = prediction_inputs(x, None, self.dict_key_y, self.subset.device, self.subset.dtype)
        self._check_shape(x, name)
        return x

    @torch.no_grad()
    def features(self, x: ModelInputs) -> torch.Tensor:
        """phi(x): (B, n_latent, C) (n_latent = m, or m + h for the biased variant); positions: (B, ..., n_latent, C).

        Raises RuntimeError before fit or if the model's weights changed since; ValueError for another input shape.
        """
        self._require_fit("compute ScaLLA features")
        surrogate = self._require_surrogate()
        return surrogate.eval()(self._inputs(x, "x"))

    @torch.no_grad()
    def predict(self, x: ModelInputs) -> GaussianPredictive | PositionPredictive:
        """N(f(x; theta*), phi(x)^T Sigma_w phi(x)) with full (B, C, C) covariance, no observation noise.

        Outputs with positions: mean (B, ..., C) and per-position covariances (B, ..., C, C), a
        :class:`posthoc.laplace.predict.PositionPredictive`. Cost: one forward pass of the network and one of the
        surrogate. Raises RuntimeError before fit or if the model's weights changed since (theta* is the weights at
        fit); ValueError for another input shape.
        """
        posterior = self._require_fit("predict")
        x = self._inputs(x, "x")
        with eval_mode(self.model):
            mean = self.call(x)
        features = self._require_surrogate()(x)
        scale = self.factors.scale(self.sigma_noise)
        if not self.position_dims:
            return GaussianPredictive(mean, cov=posterior.covariance(features, self.prior_precision, scale))
        cov = posterior.covariance(feature_rows(features), self.prior_precision, scale)
        return PositionPredictive(GaussianPredictive(mean.reshape(-1, mean.shape[-1]), cov=cov), tuple(mean.shape))

    def __call__(self, x: ModelInputs, link_approx: LinkApprox | str = LinkApprox.PROBIT):
        """laplace-torch's ``la(x)``: class probabilities (B, C); regression ``(f_mu (B, C), f_var (B, C, C))``, no noise."""
        return laplace_torch_outputs(self.predict(x), self.likelihood is Likelihood.REGRESSION, link_approx,
                                     seed=self.seed)

    @torch.no_grad()
    def kernel(self, x1: ModelInputs, x2: ModelInputs) -> torch.Tensor:
        """The surrogate kernel phi(x1)^T phi(x2), (B1, B2, C, C), for inputs x1 (B1, ...) and x2 (B2, ...).

        The approximation of the NTK J(x1) J(x2)^T (not divided by the prior precision). Cost: two surrogate forward
        passes and an O(B1 B2 m C^2) contraction. Outputs with positions: between every position of both,
        (B1, ..., B2, ..., C, C). Raises like :meth:`features`.
        """
        self._require_fit("compute the ScaLLA kernel")
        surrogate = self._require_surrogate().eval()
        features_1, features_2 = surrogate(self._inputs(x1, "x1")), surrogate(self._inputs(x2, "x2"))
        if self.position_dims:
            return position_kernel(features_1, features_2)
        return objectives.surrogate_kernel(features_1, features_2)

    # ----------------------------------------------------------------- evidence and tuning
    def log_marginal_likelihood(self, prior_precision: float | torch.Tensor | None = None,
                                sigma_noise: float | torch.Tensor | None = None,
                                kind: EvidenceKind | str = EvidenceKind.HYBRID) -> torch.Tensor:
        """The evidence used to tune delta (and sigma), differentiable in both.

        "hybrid" (default, the authors'): log p(D | theta*) - 1/2 delta ||theta*||^2 + 1/2 P log delta
        - 1/2 log det(s H + delta I_m). "latent": log p(D | theta*) - 1/2 log det(I + s H / delta), the evidence
        of the m-dimensional latent model, which grows without bound in delta (no interior optimum).
        Raises RuntimeError if the model's weights changed since fit.
        """
        posterior = self._require_fit("compute the evidence")
        delta = self.prior_precision if prior_precision is None else torch.as_tensor(
            prior_precision, dtype=self.subset.dtype, device=self.subset.device).reshape(())
        sigma = self.sigma_noise if sigma_noise is None else torch.as_tensor(
            sigma_noise, dtype=self.subset.dtype, device=self.subset.device).reshape(())
        if self.likelihood is Likelihood.CLASSIFICATION and sigma_noise is not None and float(sigma) != 1.0:
            raise ValueError("sigma_noise is for regression; classification has no noise")
        loglik = log_likelihood(posterior.loglik_stat, posterior.n_data * posterior.n_outputs, self.likelihood, sigma)
        scale = self.factors.scale(sigma)
        if check_choice(kind, EvidenceKind, "kind") is EvidenceKind.LATENT:
            return loglik + posterior.latent_evidence_term(delta, scale)
        return posterior.hybrid_evidence(loglik, delta, scale)

    def optimize_prior_precision(self, method: PriorOptimization | str = PriorOptimization.GRIDSEARCH,
                                 val_loader: Iterable | None = None, grid: torch.Tensor | None = None,
                                 n_steps: int = 200, lr: float = 0.1, tune_sigma_noise: bool | None = None,
                                 link_approx: LinkApprox | str = LinkApprox.PROBIT) -> torch.Tensor:
        """Tune delta without refitting (the posterior is reused), through :mod:`posthoc.predictive.tuning`.

        "gridsearch": the delta in ``grid`` (default logspace(-4, 4, 33)) with the lowest NLL on ``val_loader``
        (features computed once; every rank reads the same loader, so nothing is summed over ranks). "marglik":
        Adam on log delta (and log sigma for regression) maximising the hybrid evidence
        (:meth:`LatentPosterior.hybrid_evidence`). Returns the new delta.

        Raises:
            RuntimeError: not fitted, or the model's weights changed since fit.
            ValueError: unknown method, gridsearch without val_loader, invalid grid.
            FloatingPointError: the evidence became non-finite, or no grid value has a finite NLL.
        """
        self._require_fit()
        how = check_choice(method, PriorOptimization, "method")
        if how is PriorOptimization.GRIDSEARCH:
            self.prior_precision = gridsearch_prior(self, val_loader, grid, link_approx)
            return self.prior_precision
        tune_sigma = tune_sigma_noise_choice(tune_sigma_noise, self.likelihood)
        prior, sigma = maximise_evidence(self.log_marginal_likelihood, self.prior_precision.log(), self.sigma_noise,
                                         tune_sigma, n_steps, lr, "evidence", self.progress)
        self.prior_precision = prior
        if sigma is not None:
            self.sigma_noise = sigma
        return self.prior_precision

    def bench_info(self) -> dict[str, Any]:
        """What a bench row records: training budget and wall time, objective, prior precision."""
        info: dict[str, Any] = {"objective": self.settings.objective, "n_latent": self.n_latent,
                                "prior_precision": float(torch.as_tensor(self.prior_precision).reshape(-1)[0])}
        info.update({key: value for key, value in self.train_record.items() if key != "history"})
        return info

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything that restores the fitted ScaLLA (with the same network weights), as a dict.

        See :mod:`posthoc.scalla.state`. Raises RuntimeError before fit.
        """
        return scalla_state(self)

    def load_state_dict(self, state: dict[str, Any]) -> "ScaLLA":
        """Restore a fitted state into this (unfitted or fitted) ScaLLA built with the same settings and model.

        The state is checked against the model's current weights (which become theta*); raises ValueError if they
        differ from the weights it was fitted at, or for another version or settings (this ScaLLA is then left as
        it was).
        """
        restore_scalla_state(self, state)
        return self
