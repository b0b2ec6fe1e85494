"""``posthoc.FiberSampler``: posterior samples from walking the low-loss set, then a one-step sampler.

    fs = FiberSampler(model, "classification", subset_of_weights="last_layer", prior_precision=1.0)
    fs.fit(train_loader, checkpoint="fiber.pt")   # stage 1 (walk) then stage 2 (deform)
    thetas = fs.sample(100)                       # (100, P), drawn in one pass each (no chain)
    pred = fs.predict(x)                          # SamplePredictive over outputs

Stage 1 (:mod:`posthoc.fiber.walk`) runs projected Langevin dynamics on the fiber through theta*, targeting the prior
N(0, delta^-1 I) restricted to the low-loss set; stage 2 (:mod:`posthoc.fiber.deform`) fits a map z -> theta on the
walked samples; see docs/fiber.md.

Checkpoints: with ``checkpoint=path`` the state is written atomically every ``checkpoint_every`` walk steps and flow
steps, after the walk's final check, and when done; a rerun with the same path, settings, model weights and data
resumes where it stopped and gives the same result as an uninterrupted run. They are :mod:`posthoc.utils.checkpoint`
files: one written with other settings, other weights or buffers anywhere in the model, or other training data (all of
it is hashed, in the walk's canonical order) is refused with the keys that differ, and so is a damaged file.

theta* is the model's weights when ``walk``/``fit`` starts; ``sample``, ``predict`` and ``state_dict`` raise if the
model's weights or buffers changed since.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from posthoc.fiber.config import DeformConfig, deform_setting, stage_configs
from posthoc.fiber.data import is_tensor_spec, prediction_model_inputs, training_problem
from posthoc.fiber.deform import DeformKind, PrincipalCoordinates
from posthoc.fiber.particles import vectorises_over_particles
from posthoc.fiber.projection import outputs_many
from posthoc.fiber.stage2 import DeformMethod, fitted_coords, stage2_check, stage2_samples, walked
from posthoc.fiber.walk import (
    FiberProblem,
    WalkConfig,
    WalkState,
    finalize,
    full_data_nll,
    init_walk,
    walk_step,
    walk_summary,
)
from posthoc.laplace.predict import PositionPredictive
from posthoc.likelihood import Likelihood, check_supported
from posthoc.network.batches import DEFAULT_KEYS
from posthoc.network.inputs import InputSpec, MappingCall, ModelCall, ModelInputs, tensor_leaves
from posthoc.network.positions import IGNORE_INDEX
from posthoc.network.subset import ParameterSubset, SubsetOfWeights
from posthoc.predictive import LinkApprox, Predictive, SamplePredictive
from posthoc.predictive.base import check_n_samples, laplace_torch_outputs
from posthoc.utils.checkpoint import check_writable, data_fingerprint, load_checkpoint, module_digest, save_checkpoint
from posthoc.utils.checks import check_choice, check_int, check_positive, check_positive_int
from posthoc.utils.modes import eval_mode

STATE_VERSION = 2  # 2: weights identified by a digest of the whole model; input shape; posthoc.utils.checkpoint files
CHECKPOINT_WHAT = "FiberSampler"


class FiberSampler:
    """Fiber sampling (Reichlin, Vasco, Kragic 2025) behind the Laplace-style API.

    The settings of the two stages come either as a :class:`~posthoc.fiber.WalkConfig` (``walk=``) and a
    :class:`~posthoc.fiber.DeformConfig` (``deform=``), whose docstrings describe each setting, or as flat keywords
    named like their fields (``FiberSampler(model, "classification", steps=400, deform="anchored", flow_steps=500)``;
    without a WalkConfig, ``burn_in`` defaults to steps // 2). Both forms give the same sampler. Giving one stage's
    settings both ways raises ValueError; an unknown keyword raises TypeError.

    Args:
        model: the trained network (its weights are theta*); put in eval mode.
        likelihood: "classification" (logits) or "regression" (Gaussian, noise ``sigma_noise``).
        subset_of_weights: "all" or "last_layer".
        prior_precision: delta of the prior N(0, delta^-1 I): a scalar or one value per parameter.
        sigma_noise: regression noise; None estimates it as the MAP's training residual RMS.
        walk: stage 1's settings, or None for the keywords (n_particles, steps, loss_tolerance, burn_in, thin,
            step_size, batch_size, subsample_size, cg_steps, damping, pullback_steps, adapt_factor, final_rounds).
        deform: stage 2's settings, or the name of a registered map ("pullback", the default when None; "flow",
            the default until issue 17; "variational", "anchored", "gaussian" or one added with
            :func:`posthoc.fiber.register_deform`) for the keywords (step_scale, latent_dim,
            flow_layers, flow_hidden, flow_steps, flow_lr, flow_loss_weight, flow_loss_batch, flow_loss_samples,
            barrier_weight, variational_init_scale, n_check).
        seed: seeds the walk, the flow and the default sampling seed.
        checkpoint_every: walk / flow steps between checkpoints.
        progress: show progress bars.
        dict_key_x: for mapping batches (dict, UserDict, HF BatchEncoding), Laplace's (and laplace-torch's)
            meaning: the entry that gives the batch size (default "input_ids").
        dict_key_y: the target entry of mapping batches (default "labels"); the model gets every other entry (:func:`posthoc.network.batches.split_batch`;
            batches keyed "input"/"target", the old defaults, keep their old meaning with a DeprecationWarning).
            Token inputs of every batch must have one length (the walk pools all training inputs).
        mapping_call: how a mapping input reaches the model, "auto", "kwargs" or "argument" (as in Laplace).
        output_fn: maps the model's raw output to the output tensor (B, C); default: a tensor, the first element
            of a tuple/list, or ``"logits"`` of a mapping or HF ``ModelOutput``.
        ignore_index: the class target of skipped positions in outputs (B, ..., C) (default -100, PyTorch's).

    The covered weights are those that require grad: freezing all but some (e.g. a peft model's LoRA adapters) samples
    those only. The walk's JVPs need forward-mode derivatives of every operation of the model; attention runs on
    kernels that have them (Hugging Face's default "sdpa" attention on SDPA's math kernel). The particles are vmapped
    unless the forward pass reads values computed from the weights (:mod:`posthoc.fiber.particles`). Outputs (B, ...,
    C) (per-token or per-pixel heads) are one observation per position; positions whose class target is
    ``ignore_index`` are skipped (:mod:`posthoc.fiber.walk`).

    ``config`` (WalkConfig) and ``deform_config`` (DeformConfig) hold the settings. The stage-2 fields are also
    attributes (``fs.flow_steps``; ``fs.barrier_weight`` with its default resolved; ``fs.deform`` the map's name, a
    DeformKind for the built-in maps); setting one replaces ``deform_config`` (validated again).
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: Likelihood | str,
        *,
        subset_of_weights: SubsetOfWeights | str = SubsetOfWeights.ALL,
        prior_precision: float | torch.Tensor = 1.0,
        sigma_noise: float | None = None,
        walk: WalkConfig | None = None,
        deform: DeformConfig | DeformKind | str | None = None,
        seed: int = 0,
        checkpoint_every: int = 10,
        progress: bool = True,
        dict_key_x: str = DEFAULT_KEYS[0],
        dict_key_y: str = DEFAULT_KEYS[1],
        mapping_call: MappingCall | str = MappingCall.AUTO,
        output_fn: Callable[[Any], torch.Tensor] | None = None,
        ignore_index: int = IGNORE_INDEX,
        **settings: Any,
    ) -> None:
        self.model = model
        self.likelihood = check_supported(check_choice(likelihood, Likelihood, "likelihood"), (Likelihood.CLASSIFICATION, Likelihood.REGRESSION),
                                          "FiberSampler")
        self.call = ModelCall(model, mapping_call, output_fn)
        self.subset = ParameterSubset(model, subset_of_weights, model_call=self.call)
        if self.subset.kind is SubsetOfWeights.SUBNETWORK:
            raise ValueError("FiberSampler supports subset_of_weights='all' or 'last_layer'")
        self.config, self.deform_config = stage_configs(walk, deform, settings)
        if self.config.n_particles * self.config.n_kept_per_particle < 2:
            raise ValueError("the walk keeps fewer than 2 samples: raise n_particles or steps, or lower burn_in/thin")
        prior = torch.as_tensor(prior_precision, dtype=self.subset.dtype, device=self.subset.device).detach()
        if prior.numel() not in (1, self.subset.n_params):
            raise ValueError(f"prior_precision must be a scalar or have one entry per parameter ({self.subset.n_params}), "
                             f"got {prior.numel()} entries")
        check_positive(prior, "prior_precision")
        self.prior_precision = prior.reshape(-1) if prior.numel() > 1 else prior.reshape(())
        if sigma_noise is not None:
            check_positive(sigma_noise, "sigma_noise")
            if self.likelihood is Likelihood.CLASSIFICATION and float(sigma_noise) != 1.0:
                raise ValueError("sigma_noise is for regression; leave it unset for classification")
        self._sigma_given = None if sigma_noise is None else float(sigma_noise)
        self.sigma_noise = torch.as_tensor(1.0 if sigma_noise is None else float(sigma_noise), dtype=self.subset.dtype,
                                           device=self.subset.device)
        check_positive_int(checkpoint_every, "checkpoint_every", "walk / flow steps between checkpoints")
        self.seed, self.checkpoint_every, self.progress = seed, checkpoint_every, progress
        self.dict_key_x, self.dict_key_y, self.ignore_index = dict_key_x, dict_key_y, check_int(ignore_index, "ignore_index")
        # fitted state
        self.particles: torch.Tensor | None = None
        self.particle_nll: torch.Tensor | None = None  # the particles' all-data mean NLL (M,)
        self.map_nll: float | None = None
        self.coords: PrincipalCoordinates | None = None
        self.flow: nn.Module | None = None  # the trained stage-2 map (None: the Gaussian map)
        self.info: dict[str, float] = {}
        self._cache: tuple[tuple[int, int], torch.Tensor] | None = None
        self._problem_cache: FiberProblem | None = None
        self._vectorise: bool | None = None  # whether the covered function vmaps over particles (vectorises)
        self.input_shape: InputSpec | None = None  # of one model input (input_spec for a tuple/mapping), by walk/fit
        self._fingerprint: dict[str, Any] = {}  # of the fit in progress (checkpoints)
        self._callback: Callable[[str, int], None] | None = None

    # ----------------------------------------------------------------- settings
    @property
    def deform(self) -> DeformKind | str:
        """The stage-2 map's name (a DeformKind for the built-in maps); setting it replaces ``deform_config``."""
        kind = self.deform_config.name
        return DeformKind(kind) if kind in DeformKind._value2member_map_ else kind

    @deform.setter
    def deform(self, kind: DeformKind | str) -> None:
        self.deform_config = replace(self.deform_config, kind=kind)

    latent_dim = deform_setting("latent_dim")
    flow_layers = deform_setting("flow_layers")
    flow_hidden = deform_setting("flow_hidden")
    flow_steps = deform_setting("flow_steps")
    flow_lr = deform_setting("flow_lr")
    flow_loss_weight = deform_setting("flow_loss_weight")
    flow_loss_batch = deform_setting("flow_loss_batch")
    flow_loss_samples = deform_setting("flow_loss_samples")
    barrier_weight = deform_setting("barrier_weight", resolved=True)
    variational_init_scale = deform_setting("variational_init_scale", resolved=True)
    n_check = deform_setting("n_check")

    @property
    def _method(self) -> DeformMethod:
        return self.deform_config.method

    @property
    def n_params(self) -> int:
        """P, the number of sampled parameters (all weights or the last layer's)."""
        return self.subset.n_params

    # ----------------------------------------------------------------- data
    def _settings(self) -> dict[str, Any]:
        return {"likelihood": self.likelihood.value, "subset_of_weights": self.subset.kind.value,
                "walk": self.config.to_dict(), "latent_dim": self.latent_dim, "deform": self.deform_config.kind,
                "flow": [self.flow_layers, self.flow_hidden, self.flow_steps, self.flow_lr, self.flow_loss_weight,
                         self.flow_loss_batch, self.flow_loss_samples],
                "sigma_given": self._sigma_given, "seed": self.seed, "n_check": self.n_check,
                # a map's own entries (the barrier's; none for other maps, so their older checkpoints still load)
                **self._method.settings(self)}

    def vectorises(self, inputs: ModelInputs) -> bool:
        """Whether the covered function vmaps over particles (:mod:`posthoc.fiber.particles`; probed once, cached)."""
        self._vectorise = vectorises_over_particles(self.subset, inputs) if self._vectorise is None else self._vectorise
        return self._vectorise

    def _start(self, train_loader: Iterable, checkpoint: str | os.PathLike | None,
               callback: Callable[[str, int], None] | None) -> tuple[FiberProblem, Path | None, dict[str, Any] | None]:
        """Forget any fit, check the checkpoint folder, read theta* and the data, load the checkpoint (or None)."""
        self.particles = self.particle_nll = self.map_nll = self.coords = self.flow = None
        self.info, self._cache, self._callback = {}, None, callback
        if (path := Path(checkpoint) if checkpoint is not None else None) is not None:
            check_writable(path.parent, "FiberSampler checkpoint")
        problem, self.input_shape = training_problem(self.subset, self.call, train_loader, self.likelihood,
                                                     (self.dict_key_x, self.dict_key_y), self.prior_precision,
                                                     self._sigma_given, self.ignore_index)
        self.sigma_noise, self._vectorise, self._problem_cache = problem.sigma_noise, problem.vectorise, problem
        # everything the result depends on; the data as the walk reads them (canonical order, covered module's inputs)
        self._fingerprint = {"version": STATE_VERSION, "settings": self._settings(),
                             "network_weights": module_digest(self.model),
                             "data": data_fingerprint([*tensor_leaves(problem.inputs), problem.targets])}
        saved = None
        if path is not None and path.exists():
            saved = load_checkpoint(path, self._fingerprint, CHECKPOINT_WHAT, map_location=self.subset.device)
        return problem, path, saved

    def _save(self, path: Path | None, stage: str, **payload: Any) -> None:
        if path is not None:
            save_checkpoint(path, {"stage": stage, "sigma_noise": self.sigma_noise, **payload}, self._fingerprint,
                            CHECKPOINT_WHAT)

    # ----------------------------------------------------------------- stage 1
    def walk(self, train_loader: Iterable, checkpoint: str | os.PathLike | None = None,
             callback: Callable[[str, int], None] | None = None) -> torch.Tensor:
        """Stage 1: walk the particles, check the kept samples on all data; returns them (M, P).

        M = n_particles * ((steps - burn_in) // thin). Also sets ``particle_nll`` (M,) (all-data mean NLL)
        and ``map_nll``. theta* is read from the model's weights now. ``callback("walk", step)`` runs after every
        walk step (after its checkpoint, if one is due); it may raise to stop the run, which then resumes from
        the checkpoint. Cost per step: see :func:`posthoc.fiber.walk.walk_step`; the final check costs M
        forward passes over the data per round. Raises PermissionError (before any work) if the checkpoint's
        folder is not writable, ValueError for a checkpoint of another run or a damaged one.
        """
        with eval_mode(self.model):
            problem, path, saved = self._start(train_loader, checkpoint, callback)
            self._walk(problem, path, saved)
        return walked(self)[0]

    def _walk(self, problem: FiberProblem, path: Path | None, saved: dict[str, Any] | None) -> None:
        if saved is not None and saved["stage"] != "walk":
            self.particles, self.particle_nll = saved["particles"], saved["particle_nll"]
            self.map_nll, self.info = saved["map_nll"], dict(saved["info"])
            return
        cfg = self.config
        state = WalkState.from_state_dict(saved["walk"]) if saved is not None else init_walk(problem, cfg, self.seed)
        bar = tqdm(total=cfg.steps, initial=state.step, desc="fiber walk", disable=not self.progress, leave=False)
        while state.step < cfg.steps:
            t0 = time.perf_counter()
            state = walk_step(problem, cfg, state)
            state.stats["walk_seconds"] += time.perf_counter() - t0
            bar.update(1)
            bar.set_postfix(eta=f"{state.step_size:.2e}", kept=state.samples.shape[0])
            if state.step % self.checkpoint_every == 0 or state.step == cfg.steps:
                self._save(path, "walk", walk=state.state_dict())
            if self._callback is not None:
                self._callback("walk", state.step)
        bar.close()
        t0 = time.perf_counter()
        map_nll = float(full_data_nll(problem, self.subset.theta_map.unsqueeze(0))[0])
        particles, nll = finalize(problem, cfg, state.samples, map_nll, self.seed + 1)
        self.particles, self.particle_nll, self.map_nll = particles, nll, map_nll
        self.info = walk_summary(problem, cfg, state, particles, nll, map_nll, time.perf_counter() - t0)
        self._save(path, "walked", particles=particles, particle_nll=nll, map_nll=map_nll, info=self.info)

    # ----------------------------------------------------------------- stage 2
    def fit(self, train_loader: Iterable, checkpoint: str | os.PathLike | None = None,
            callback: Callable[[str, int], None] | None = None) -> "FiberSampler":
        """Fit both stages on the training data: the walk, then the stage-2 map; returns self.

        Stage 1 (:meth:`walk`), then stage 2 (principal coordinates + map z -> theta), then the all-data check of
        ``n_check`` stage-2 samples (``info["stage2_within_tol"]``).

        theta* is read from the model's weights now. ``callback(stage, step)`` runs after every walk step
        ("walk") and stage-2 training step ("deform"), after the step's checkpoint if one is due; it may raise to
        stop the run, which then resumes from the checkpoint. Raises as :meth:`walk`.
        """
        with eval_mode(self.model):
            return self._fit(train_loader, checkpoint, callback)

    def _fit(self, train_loader: Iterable, checkpoint: str | os.PathLike | None,
             callback: Callable[[str, int], None] | None) -> "FiberSampler":
        problem, path, saved = self._start(train_loader, checkpoint, callback)
        if saved is not None and saved["stage"] == "done":
            self.load_state_dict(saved["state"])
            return self
        self._walk(problem, path, saved)
        t0 = time.perf_counter()
        self.coords = PrincipalCoordinates.fit(stage2_samples(self), self.latent_dim, centre=self.subset.theta_map)
        self.info["explained_variance"] = self.coords.explained
        self.info["latent_dim"] = float(self.coords.rank)
        # "pullback" is fitted without training; the anchored map is built even untrained (flow_steps 0: jitter at
        # its starting scale); the flows need r >= 2
        self.flow = self._method.fit_untrained(self, problem)
        if self.flow is None and self._method.trains(self):
            self._train_flow(problem, path, saved if saved is not None and saved["stage"] == "deform" else None)
        self.info["deform_s"] = self.info.get("deform_s", 0.0) + time.perf_counter() - t0
        self._cache = None
        if self.n_check > 0:
            self.info.update(stage2_check(self, problem))
            self.info.update(self._method.diagnostics(self, self.n_check, self.seed + 7))
        self._save(path, "done", state=self.state_dict())
        return self

    def _train_flow(self, problem: FiberProblem, path: Path | None, saved: dict[str, Any] | None) -> None:
        """Build and train the stage-2 map (resumed from ``saved``, a "deform" checkpoint payload, if given)."""
        method = self._method
        torch.manual_seed(self.seed)  # the map's initialisation (the flow's hidden layers) draws from it
        flow = method.build(self)
        optimizer = method.optimizer(self, flow)
        start, losses = 0, []
        generator = torch.Generator().manual_seed(self.seed + 2)
        if saved is not None:
            flow.load_state_dict(saved["flow"])
            optimizer.load_state_dict(saved["optimizer"])
            start, losses = saved["flow_step"], list(saved["losses"])
            generator.set_state(saved["flow_rng"])
            self.info["deform_s"] = saved["deform_s"]
        coords = fitted_coords(self).encode(stage2_samples(self))
        flow.train()
        t0 = time.perf_counter()
        threads = torch.get_num_threads()
        # the flow is tiny (r <= latent_dim inputs, M samples): extra threads only add synchronisation cost,
        # which on a busy machine made full-batch steps far slower (docs/measurements/methods.md)
        torch.set_num_threads(1)
        try:
            step = method.training_step(self, problem, flow, optimizer, coords, generator)
            losses = self._flow_loop(path, flow, optimizer, step, start, losses, t0, generator)
        finally:
            torch.set_num_threads(threads)
        flow.eval()
        for p in flow.parameters():
            p.requires_grad_(False)
        self.flow = flow
        # the final objective: e.g. the negative log-likelihood of the walked samples ("flow") or the KL up to a
        # constant ("variational", "anchored")
        self.info[method.final_loss_key] = losses[-1] if losses else float("nan")

    def _flow_loop(self, path: Path | None, flow: nn.Module, optimizer: torch.optim.Optimizer,
                   step: Callable[[], float], start: int, losses: list[float], t0: float,
                   generator: torch.Generator) -> list[float]:
        for at in tqdm(range(start, self.flow_steps), desc="fiber flow", disable=not self.progress, leave=False):
            losses.append(step())
            done = at + 1
            if done % self.checkpoint_every == 0 and done < self.flow_steps:
                self._save(path, "deform", particles=self.particles, particle_nll=self.particle_nll,
                           map_nll=self.map_nll, info=self.info, flow=flow.state_dict(),
                           optimizer=optimizer.state_dict(), flow_step=done, losses=losses,
                           flow_rng=generator.get_state(),
                           deform_s=self.info.get("deform_s", 0.0) + time.perf_counter() - t0)
            if self._callback is not None:
                self._callback("deform", done)
        return losses

    # ----------------------------------------------------------------- sampling and prediction
    def _require_fit(self, action: str) -> PrincipalCoordinates:
        """The fitted coordinates; RuntimeError before fit or if the weights or buffers changed since (theta*)."""
        if self.coords is None:
            raise RuntimeError("call fit(train_loader) first: the FiberSampler has no stage-2 map")
        self.subset.check_current(action)
        return self.coords

    def sample(self, n_samples: int = 100, seed: int | None = None) -> torch.Tensor:
        """Stage 2: n parameter samples (n, P) from the map, seeded by ``seed`` (default: the sampler's).

        Decoded from z ~ N(0, I) ("anchored": an anchor index and a jitter draw). Cost: one map evaluation each (the
        flow plus an (r x P) product), no iteration; "pullback": one projection and at most ``pullback_steps``
        Gauss-Newton steps on ``subsample_size`` examples each (:mod:`posthoc.fiber.pullback`). Raises RuntimeError before fit or if the model's weights changed
        since, ValueError for a non-positive ``n_samples``.
        """
        self._require_fit("sample")
        check_n_samples(n_samples)
        generator = torch.Generator().manual_seed(self.seed if seed is None else seed)
        return self._method.sample(self, self.flow, n_samples, generator)

    def predict(self, x: ModelInputs, n_samples: int = 100, seed: int | None = None,
                chunk_size: int = 25) -> Predictive:
        """The sample predictive (n_samples, B, C) of f(x; theta_s) for stage-2 samples theta_s.

        Outputs with positions: a :class:`~posthoc.laplace.predict.PositionPredictive` of samples (n_samples, B, ...,
        C): mean, probs (the mixture over the samples) (B, ..., C). The samples are the same for every call with the
        same n_samples and seed; inputs x have the training inputs' shape (B, ...). The network runs in eval mode.
        Regression: the predictive of f; use ``.with_noise(fs.sigma_noise)`` or ``fs(x)`` for y.
        Cost: n_samples forward passes (vmapped in chunks of ``chunk_size``). Raises RuntimeError before fit or if the
        model's weights changed since; ValueError for inputs of another shape or with NaN/Inf, n_samples < 2 or a
        non-positive chunk_size; TypeError if x is not a tensor (or a tuple/mapping where the training inputs were).
        x is what the training batches' x was: a tensor, tuple or mapping (a mapping's ``dict_key_y`` entry, if
        present, is dropped).
        """
        self._require_fit("predict")
        check_n_samples(n_samples)
        check_positive_int(chunk_size, "chunk_size", "samples per vmapped forward pass")
        if n_samples < 2:
            raise ValueError("predict needs n_samples >= 2 (a sample predictive)")
        x = prediction_model_inputs(x, self.input_shape, self.dict_key_y, self.subset.device, self.subset.dtype)
        key = (n_samples, self.seed if seed is None else seed)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self.sample(n_samples, seed=key[1]))
        thetas = self._cache[1]
        with eval_mode(self.model), torch.no_grad():
            inputs = self.subset.inputs(x)
            outputs = torch.cat([outputs_many(self.subset, inputs, thetas[i:i + chunk_size], self.vectorises(inputs),
                                              randomness="different") for i in range(0, n_samples, chunk_size)])
        if outputs.ndim == 3:
            return SamplePredictive(outputs)
        return PositionPredictive(SamplePredictive(outputs.reshape(n_samples, -1, outputs.shape[-1])),
                                  tuple(outputs.shape[1:]))

    def __call__(self, x: ModelInputs, n_samples: int = 100,
                 seed: int | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """laplace-torch's ``la(x)`` convention over ``n_samples`` fiber samples (:meth:`predict` gives the Predictive).

        Classification: MC class probabilities (B, C). Regression: ``(f_mu (B, C), f_var (B, C, C))``, the sample
        mean and covariance of f WITHOUT noise (``predict(x).with_noise(sigma_noise)`` gives y's); with positions,
        (B, ..., C) probabilities, or f_mu (B, ..., C) and f_var (B, ..., C, C) per position.
        """
        pred = self.predict(x, n_samples=n_samples, seed=seed)
        return laplace_torch_outputs(pred, self.likelihood is Likelihood.REGRESSION, LinkApprox.MC)

    def bench_info(self) -> dict[str, float]:
        """Diagnostics stored with a bench row (within-tolerance fractions, step size, timings)."""
        return {k: float(v) for k, v in self.info.items()}

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything that restores the fitted sampler exactly, as a dict of tensors and plain values.

        The state identifies the model's weights and buffers by a digest; loading needs the same ones. Raises
        RuntimeError before fit or if the model's weights changed since.
        """
        coords = self._require_fit("save the state")
        return {"version": STATE_VERSION, "settings": self._settings(), "network_weights": module_digest(self.model),
                "input_shape": list(self.input_shape or ()) if is_tensor_spec(self.input_shape) else self.input_shape,
                "prior_precision": self.prior_precision,
                "sigma_noise": self.sigma_noise,
                "particles": self.particles, "particle_nll": self.particle_nll, "map_nll": self.map_nll,
                "coords": coords.state_dict(), "flow": None if self.flow is None else self.flow.state_dict(),
                "info": dict(self.info), "last_layer": self.subset.last_layer_state()}

    def load_state_dict(self, state: dict[str, Any]) -> "FiberSampler":
        """Restore a fitted state from :meth:`state_dict`; returns self.

        The settings must match, and the model's current weights and buffers must be those it was fitted at (they
        become theta*). Raises ValueError otherwise (nothing is changed then).
        """
        version = state.get("version") if isinstance(state, dict) else None
        if version != STATE_VERSION:
            raise ValueError(f"unsupported FiberSampler state (version {version!r}, expected {STATE_VERSION}); "
                             "fit the sampler again")
        if state["settings"] != self._settings():
            raise ValueError("the state was fitted with other settings; construct the FiberSampler with the same ones")
        if state["network_weights"] != module_digest(self.model):
            raise ValueError("the model's weights or buffers differ from those the state was fitted at; load the "
                             "matching model checkpoint first")
        if state.get("last_layer") is not None:
            self.subset.load_last_layer_state(state["last_layer"])
        self.subset.capture()
        spec = state["input_shape"]
        self.input_shape = tuple(spec) if isinstance(spec, list) and all(isinstance(d, int) for d in spec) else spec
        self.prior_precision = state["prior_precision"]
        self.sigma_noise = state["sigma_noise"]
        self.particles, self.particle_nll, self.map_nll = state["particles"], state["particle_nll"], state["map_nll"]
        self.coords = PrincipalCoordinates.from_state_dict(state["coords"])
        self.flow = None
        if state["flow"] is not None:
            flow = self._method.build(self)
            flow.load_state_dict(state["flow"])
            flow.eval()
            for p in flow.parameters():
                p.requires_grad_(False)
            self.flow = flow
        self.info = dict(state["info"])
        self._cache, self._vectorise = None, None
        return self
