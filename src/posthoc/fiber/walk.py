"""Stage 1 of fiber sampling: projected Langevin dynamics on the low-loss set (docs/fiber.md).

Pure functions over an explicit :class:`WalkState`, so a walk can be checkpointed after any step
and resumed exactly (the state carries the random generator's state).

One step for K particles thetas (K, P), on a minibatch X_b drawn with replacement (all the data when
``batch_size >= N``):

    theta <- theta + P_b[ (eta / 2) (-delta theta) + sqrt(eta) xi ],   xi ~ N(0, I),

P_b the projection onto null(J(X_b)) (``projection.project_null``: CG on the (B*C)-dimensional
system, JVP/VJP products, no stored Jacobian). Then the pull-back: while a particle's mean
NLL per observation on a fixed training subsample exceeds the MAP's (on the same subsample) by more
than ``loss_tolerance``, take a Gauss-Newton step that moves its subsample outputs back to the
MAP's outputs along the minimum-norm direction (``projection.min_norm_step``), at most
``pullback_steps`` times per walk step. The fiber is {theta : f(X; theta) = f(X; theta*)}, so this is
a Newton-type projection back onto it, stopped as soon as the loss criterion holds. A particle still
above the tolerance after that keeps its previous state (the move is rejected; counted in
``failed_pullbacks``).

Samples: after ``burn_in`` steps, every ``thin``-th state of every particle. During burn-in only,
the step size shrinks by ``adapt_factor`` after every step in which more than a quarter of the
particles (``MAX_REJECTED_FRACTION``; any, with fewer than 4 particles) could not be pulled back
within ``pullback_steps`` (it never grows); after burn-in it is fixed, so the kept part of the chain
is a fixed-step Markov chain. Rejected moves keep the chain in the low-loss set, so an occasional
rejection needs no smaller step; shrinking on every single one froze the walk on the UCI networks
(docs/measurements/methods.md).

Observations. Outputs (B, C) have one observation per example. Outputs with positions, (B, ..., C)
(:mod:`posthoc.network.positions`: per-token or per-pixel heads), have one per position, and a classification
position whose target is the ignore index (-100) is no observation: it adds nothing to the loss, the projection
drops its outputs' Jacobian rows (:mod:`posthoc.fiber.projection`) and the pull-back does not move them. Every
loss here is the mean NLL per kept observation (summed over the examples' kept positions, divided by their
number), so ``loss_tolerance`` is in nats per kept position; for (B, C) outputs that is nats per example.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from posthoc.fiber.projection import min_norm_step, outputs_many, project_null
from posthoc.likelihood import Likelihood
from posthoc.network.inputs import ModelInputs, batch_size, select, take
from posthoc.network.positions import IGNORE_INDEX, kept_positions
from posthoc.network.subset import ParameterSubset
from posthoc.utils.checks import check_positive_int

MAX_REJECTED_FRACTION = 0.25  # burn-in shrinks the step after a walk step that rejected more particles than this


def check_non_negative_int(value: object, name: str) -> int:
    """Return ``value`` if it is an ``int`` >= 0 (``bool`` refused); else raise ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return value


@dataclass(frozen=True)
class WalkConfig:
    """Settings of stage 1 (the module docstring describes the walk). Raises ValueError for an invalid value.

    Attributes:
        n_particles: K independent walkers, vectorised with vmap.
        steps: walk steps per particle, burn-in included.
        burn_in: steps discarded before keeping samples (FiberSampler's keywords: default steps // 2).
        thin: keep every thin-th state after burn-in.
        step_size: eta of the Langevin step (shrunk during burn-in only).
        loss_tolerance: epsilon, nats per observation (an example; a kept position for outputs with positions):
            samples keep the mean training NLL per observation within epsilon of the MAP's.
        batch_size: examples whose outputs one projection keeps.
        subsample_size: the fixed training subsample of the NLL check during the walk.
        cg_steps, damping: CG iterations and damping of the (B*C)-dimensional solves.
        pullback_steps: at most this many Gauss-Newton steps back to the low-loss set per walk step.
        adapt_factor: the burn-in's step-size shrink factor.
        final_rounds: correction rounds of the final all-data check.
    """

    n_particles: int = 8
    steps: int = 200
    burn_in: int = 100
    thin: int = 5
    step_size: float = 1e-4
    loss_tolerance: float = 0.05
    batch_size: int = 64
    subsample_size: int = 256
    cg_steps: int = 5
    damping: float = 1e-6
    pullback_steps: int = 5
    adapt_factor: float = 0.8
    final_rounds: int = 3

    def __post_init__(self) -> None:
        for name in ("n_particles", "steps", "thin", "batch_size", "subsample_size", "cg_steps"):
            check_positive_int(getattr(self, name), name)
        for name in ("burn_in", "pullback_steps", "final_rounds"):
            check_non_negative_int(getattr(self, name), name)
        if self.burn_in >= self.steps:
            raise ValueError(f"burn_in ({self.burn_in}) must be smaller than steps ({self.steps}) to keep samples")
        if not (self.step_size > 0 and math.isfinite(self.step_size)):
            raise ValueError(f"step_size must be positive, got {self.step_size!r}")
        if not (self.loss_tolerance > 0 and math.isfinite(self.loss_tolerance)):
            raise ValueError(f"loss_tolerance must be positive (nats per example), got {self.loss_tolerance!r}")
        if not self.damping >= 0:
            raise ValueError(f"damping must be >= 0, got {self.damping!r}")
        if not 0 < self.adapt_factor <= 1:
            raise ValueError(f"adapt_factor must be in (0, 1], got {self.adapt_factor!r}")

    @property
    def n_kept_per_particle(self) -> int:
        """Samples kept per particle: (steps - burn_in) // thin."""
        return (self.steps - self.burn_in) // self.thin

    def to_dict(self) -> dict[str, Any]:
        """The settings as a plain dict (field name -> value), as the checkpoint fingerprint stores them."""
        return asdict(self)


@dataclass
class FiberProblem:
    """What the walk needs about the model and data.

    inputs (N, ...): the covered module's inputs (images, or last-layer features; for "all", or a last layer
    whose tail re-runs the model, the model's inputs: a tensor, or a tuple/mapping of them such as token ids and
    attention masks); targets (N,) labels or (N, C) values (outputs with positions: (N, ...) labels, the ignore
    index at skipped positions, or (N, ..., C) values); prior_precision: scalar () or per-parameter (P,);
    sigma_noise: the regression noise (1 for classification); vectorise: whether the covered function may be
    vmapped over particles (:func:`posthoc.fiber.particles.vectorises_over_particles`; else a loop).
    """

    subset: ParameterSubset
    inputs: ModelInputs
    targets: torch.Tensor
    likelihood: Likelihood
    prior_precision: torch.Tensor
    sigma_noise: torch.Tensor
    vectorise: bool = True

    @property
    def n_data(self) -> int:
        """N, the number of training examples."""
        return batch_size(self.inputs)


@dataclass
class WalkState:
    """Everything that determines the rest of a walk.

    thetas (K, P): current particles; samples (M, P): kept states so far; sub_index (S,): the fixed
    NLL-check subsample; map_nll_sub: the MAP's mean NLL on it; rng: the generator state.
    """

    thetas: torch.Tensor
    samples: torch.Tensor
    sub_index: torch.Tensor
    map_nll_sub: float
    step_size: float
    rng: torch.Tensor
    step: int = 0
    stats: dict[str, float] = field(default_factory=lambda: {"pullback_steps": 0.0, "failed_pullbacks": 0.0,
                                                              "walk_seconds": 0.0})

    def state_dict(self) -> dict[str, Any]:
        """The state as a dict of tensors and numbers (for checkpoints; :meth:`from_state_dict` restores it)."""
        return {"thetas": self.thetas, "samples": self.samples, "sub_index": self.sub_index,
                "map_nll_sub": self.map_nll_sub, "step_size": self.step_size, "rng": self.rng, "step": self.step,
                "stats": dict(self.stats)}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "WalkState":
        """Rebuild the state saved by :meth:`state_dict`."""
        return cls(state["thetas"], state["samples"], state["sub_index"], float(state["map_nll_sub"]),
                   float(state["step_size"]), state["rng"], int(state["step"]), dict(state["stats"]))


def kept_outputs(targets: torch.Tensor, likelihood: Likelihood) -> torch.Tensor | None:
    """The (B, ...) mask of the positions whose outputs count (targets not the ignore index), None if all do.

    Cost: one comparison of the targets.
    """
    if likelihood is not Likelihood.CLASSIFICATION:
        return None
    kept = kept_positions(targets, likelihood, IGNORE_INDEX)
    return None if bool(kept.all()) else kept


def n_observations(targets: torch.Tensor, likelihood: Likelihood) -> int:
    """The observations among targets (B, ...) or (B, ..., C): the examples, or their kept positions."""
    return int(kept_positions(targets, likelihood, IGNORE_INDEX).sum())


def mean_nll(outputs: torch.Tensor, targets: torch.Tensor, likelihood: Likelihood,
             sigma_noise: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood per observation for outputs (K, B, C) or (K, B, ..., C): (K,).

    Classification: cross-entropy of the logits, over the kept positions (targets (B, ...) not the ignore index;
    0 if none is kept). Regression: Gaussian NLL with noise sigma, summed over the C outputs, averaged over the
    examples and positions.
    """
    if likelihood is Likelihood.CLASSIFICATION:
        kept = targets != IGNORE_INDEX  # (B, ...)
        index = torch.where(kept, targets.long(), 0).unsqueeze(-1).expand(outputs.shape[0], *kept.shape, 1)
        nll = -torch.log_softmax(outputs, -1).gather(-1, index).squeeze(-1)  # (K, B, ...)
        return (nll * kept).flatten(1).sum(-1) / kept.sum().clamp_min(1)
    resid = targets.reshape(outputs.shape[1:]).to(outputs.dtype) - outputs
    var = sigma_noise.to(outputs.dtype) ** 2
    return (0.5 * resid**2 / var + 0.5 * torch.log(2 * math.pi * var)).sum(-1).flatten(1).mean(-1)


def _generator(state: torch.Tensor) -> torch.Generator:
    generator = torch.Generator()
    generator.set_state(state)
    return generator


def init_walk(problem: FiberProblem, config: WalkConfig, seed: int) -> WalkState:
    """All particles at theta*, a fixed NLL subsample drawn without replacement. Cost: one forward pass on it."""
    generator = torch.Generator().manual_seed(seed)
    n_sub = min(config.subsample_size, problem.n_data)
    sub_index = torch.randperm(problem.n_data, generator=generator)[:n_sub]
    subset = problem.subset
    theta0 = subset.theta_map
    with torch.no_grad():
        out = subset.forward(select(problem.inputs, sub_index), theta0).unsqueeze(0)
        map_nll = float(mean_nll(out, problem.targets[sub_index], problem.likelihood, problem.sigma_noise)[0])
    thetas = theta0.unsqueeze(0).repeat(config.n_particles, 1)
    samples = theta0.new_zeros((0, subset.n_params))
    return WalkState(thetas, samples, sub_index, map_nll, config.step_size, generator.get_state())


def pull_back(problem: FiberProblem, thetas: torch.Tensor, inputs: ModelInputs, targets: torch.Tensor,
              reference: torch.Tensor, threshold: float, config: WalkConfig) -> tuple[torch.Tensor, int, torch.Tensor]:
    """Gauss-Newton steps towards the reference outputs (B, ..., C) for the particles above ``threshold``.

    A particle is corrected while its mean NLL on (inputs, targets) exceeds ``threshold``, until none does or
    ``config.pullback_steps`` were taken; the steps move the kept positions' outputs only (:func:`kept_outputs`).

    Returns the new thetas (K, P), the number of steps taken and the final within-threshold mask (K,).
    Cost per step: one forward pass per particle plus ``cg_steps`` Gram products per corrected particle.
    """
    subset, kept = problem.subset, kept_outputs(targets, problem.likelihood)
    taken = 0
    while True:
        with torch.no_grad():
            out = outputs_many(subset, inputs, thetas, problem.vectorise)
            ok = mean_nll(out, targets, problem.likelihood, problem.sigma_noise) <= threshold
        if bool(ok.all()) or taken == config.pullback_steps:
            return thetas, taken, ok
        bad = torch.nonzero(~ok).reshape(-1)
        change = reference.unsqueeze(0) - out[bad]
        with torch.no_grad():
            delta = min_norm_step(subset, inputs, thetas[bad], change, config.cg_steps, config.damping, kept,
                                  problem.vectorise)
        thetas = thetas.clone()
        thetas[bad] = thetas[bad] + delta
        taken += 1


def walk_step(problem: FiberProblem, config: WalkConfig, state: WalkState) -> WalkState:
    """One projected Langevin step plus pull-back for all particles; returns the next state.

    Cost: (cg_steps + 2) JVP/VJP pairs on ``batch_size`` examples per particle, plus per pull-back
    step a forward pass and ``cg_steps`` Gram products on the subsample.
    """
    subset = problem.subset
    generator = _generator(state.rng)
    thetas = state.thetas
    k, p = thetas.shape
    if config.batch_size >= problem.n_data:  # full batch: the projection keeps every training output
        batch = torch.arange(problem.n_data)
    else:
        batch = torch.randint(problem.n_data, (config.batch_size,), generator=generator)
    noise = torch.randn((k, p), generator=generator, dtype=thetas.dtype).to(thetas.device)
    eta = state.step_size
    move = 0.5 * eta * (-problem.prior_precision * thetas) + math.sqrt(eta) * noise
    with torch.no_grad():
        thetas = thetas + project_null(subset, select(problem.inputs, batch), thetas, move, config.cg_steps,
                                       config.damping, kept_outputs(problem.targets[batch], problem.likelihood),
                                       problem.vectorise)
        sub_x, sub_y = select(problem.inputs, state.sub_index), problem.targets[state.sub_index]
        reference = subset.forward(sub_x, subset.theta_map)
    thetas, taken, ok = pull_back(problem, thetas, sub_x, sub_y, reference,
                                  state.map_nll_sub + config.loss_tolerance, config)
    # a particle whose pull-back failed stays where it was: a move that leaves the low-loss set is rejected, so
    # a too-large step cannot strand a particle off the fiber (where later, smaller steps would never find it)
    thetas = torch.where(ok.unsqueeze(-1), thetas, state.thetas)
    step = state.step + 1
    stats = dict(state.stats)
    stats["pullback_steps"] += taken
    stats["failed_pullbacks"] += float((~ok).sum())
    step_size = eta
    if step <= config.burn_in and float((~ok).double().mean()) > MAX_REJECTED_FRACTION:
        step_size = eta * config.adapt_factor
    samples = state.samples
    if step > config.burn_in and (step - config.burn_in) % config.thin == 0:
        samples = torch.cat([samples, thetas.detach()])
    if not bool(torch.isfinite(thetas).all()):
        raise FloatingPointError(f"the walk produced non-finite parameters at step {step}; lower step_size")
    return WalkState(thetas.detach(), samples, state.sub_index, state.map_nll_sub, step_size,
                     generator.get_state(), step, stats)


def full_data_nll(problem: FiberProblem, thetas: torch.Tensor, chunk_examples: int = 512,
                  chunk_particles: int = 8) -> torch.Tensor:
    """Mean NLL per observation on all N training examples for each of M parameter vectors: (M,).

    Observations: the examples, or their kept positions (module docstring). Cost: M forward passes over the
    data, in chunks of ``chunk_particles`` x ``chunk_examples``.
    """
    out = []
    n_total = n_observations(problem.targets, problem.likelihood)
    with torch.no_grad():
        for i in range(0, thetas.shape[0], chunk_particles):
            th = thetas[i:i + chunk_particles]
            total = torch.zeros(th.shape[0], dtype=th.dtype, device=th.device)
            for j in range(0, problem.n_data, chunk_examples):
                x, y = take(problem.inputs, j, j + chunk_examples), problem.targets[j:j + chunk_examples]
                nll = mean_nll(outputs_many(problem.subset, x, th, problem.vectorise), y, problem.likelihood,
                               problem.sigma_noise)
                total += nll * n_observations(y, problem.likelihood)
            out.append(total / n_total)
    return torch.cat(out)


def finalize(problem: FiberProblem, config: WalkConfig, samples: torch.Tensor, map_nll_full: float,
             seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Check the kept samples on all training data; correct those above tolerance.

    Up to ``final_rounds`` rounds: evaluate the full-data mean NLL of every sample; each sample above
    ``map_nll_full + loss_tolerance`` gets one Gauss-Newton step towards the MAP outputs on a fresh
    random subsample of ``subsample_size`` examples. Returns (samples (M, P), full-data NLL (M,)).
    """
    generator = torch.Generator().manual_seed(seed)
    threshold = map_nll_full + config.loss_tolerance
    nll = full_data_nll(problem, samples)
    for _ in range(config.final_rounds):
        bad = torch.nonzero(nll > threshold).reshape(-1)
        if bad.numel() == 0:
            break
        index = torch.randperm(problem.n_data, generator=generator)[:config.subsample_size]
        x, y = select(problem.inputs, index), problem.targets[index]
        with torch.no_grad():
            reference = problem.subset.forward(x, problem.subset.theta_map)
        one_step = replace(config, pullback_steps=1)
        fixed, _, _ = pull_back(problem, samples[bad], x, y, reference, -math.inf, one_step)
        samples = samples.clone()
        samples[bad] = fixed
        nll = nll.clone()
        nll[bad] = full_data_nll(problem, fixed)
    return samples, nll


def walk_summary(problem: FiberProblem, config: WalkConfig, state: WalkState, particles: torch.Tensor,
                 nll: torch.Tensor, map_nll: float, final_check_s: float) -> dict[str, float]:
    """The walk's diagnostics for ``FiberSampler.info``, from the final state and the all-data check.

    Args:
        problem: the walk's problem (its prior precision, noise and parameter count).
        config: the walk's settings.
        state: the state after the last walk step (timings, step size, pull-back counts).
        particles: (M, P) the kept samples after the all-data check (:func:`finalize`).
        nll: (M,) their all-data mean NLL.
        map_nll: the MAP's all-data mean NLL.
        final_check_s: seconds the all-data check took.

    Returns:
        Timings, step size, pull-back counts, the fraction of samples within the tolerance and two mixing
        diagnostics: the prior drift relaxes a particle's offset along the fiber by a factor (1 - eta delta / 2)
        per step, so ``eta_delta_kept_steps`` >~ 5 means the kept part of the chain has forgotten theta*;
        ``particle_norm_ratio`` compares the particles' mean norm with the prior's sqrt(sum 1/delta) (about 1 at
        stationarity when the fiber's minimum-norm point is short). Cost: O(M P).
    """
    within = nll <= map_nll + config.loss_tolerance
    prior = problem.prior_precision
    return {
        "walk_s": state.stats["walk_seconds"], "final_check_s": final_check_s, "step_size_final": state.step_size,
        "pullback_steps_per_step": state.stats["pullback_steps"] / max(config.steps, 1),
        "failed_pullbacks": state.stats["failed_pullbacks"], "n_walked": float(particles.shape[0]),
        "stage1_within_tol": float(within.double().mean()), "map_train_nll": map_nll,
        "sigma_noise": float(problem.sigma_noise),
        "eta_delta_kept_steps": state.step_size * float(prior.mean()) * (config.steps - config.burn_in),
        "particle_norm_ratio": float(particles.norm(dim=1).mean()) / math.sqrt(
            float((1.0 / prior).expand(problem.subset.n_params).sum())),
    }
