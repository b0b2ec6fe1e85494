"""Stage 2 of fiber sampling as an open registry: the maps z -> theta by name (settings: config.DeformConfig).

A map is a :class:`DeformMethod` registered under a name with :func:`register_deform`; ``FiberSampler(...,
deform="name")`` or ``deform=DeformConfig(kind="name")`` chooses it. The built-in maps are "pullback" (the default,
:mod:`posthoc.fiber.pullback`, fitted without training through :meth:`DeformMethod.fit_untrained`) and "gaussian",
"flow", "variational", "anchored" (:mod:`posthoc.fiber.deform`). A method builds its (untrained) map,
its optimizer and its training step; the sampler runs the loop, the checkpoints and the all-data check, so
a registered map resumes exactly like the built-in ones (its training must draw its randomness from the
``generator`` it is given, whose state the checkpoints carry).

    class Shrunk(DeformMethod):          # the Gaussian map at half the walked samples' scale
        def sample(self, fs, module, n_samples, generator):
            return super().sample(fs, module, n_samples, generator) * 0.5 + 0.5 * fs.coords.mean
    register_deform("shrunk", Shrunk())
"""

from __future__ import annotations

import math
import time
import warnings
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from posthoc.fiber.deform import (
    AnchoredJitter,
    CouplingFlow,
    DeformKind,
    PrincipalCoordinates,
    anchored_training_step,
    flow_training_step,
    make_flow_optimizer,
    variational_training_step,
)
from posthoc.fiber.projection import outputs_many
from posthoc.fiber.walk import FiberProblem, full_data_nll, mean_nll
from posthoc.network.inputs import select
from posthoc.utils.registry import add_to_registry

if TYPE_CHECKING:  # the sampler imports this module
    from posthoc.fiber.sampler import FiberSampler

TrainingStep = Callable[[], float]


class DeformMethod:
    """A stage-2 map. The base class is the "gaussian" map: no trained module, theta = decode(z), z ~ N(0, I_r).

    Subclasses override what they change. ``fs`` is the fitting :class:`~posthoc.fiber.FiberSampler`; a method
    reads its ``coords`` (:class:`~posthoc.fiber.deform.PrincipalCoordinates` of the walked samples),
    ``deform_config`` (:class:`~posthoc.fiber.config.DeformConfig`), ``config`` (the walk's WalkConfig),
    ``subset``, ``particles``/``particle_nll``/``map_nll`` and ``seed``, and changes none of them.

    Attributes:
        uses_barrier: whether ``barrier_weight`` and ``variational_init_scale`` enter the settings (and the
            checkpoint fingerprint).
        default_barrier_weight, default_init_scale: their values when the config leaves them None.
        final_loss_key: the ``info`` key of the last training loss.
    """

    uses_barrier: bool = False
    default_barrier_weight: float = 100.0
    default_init_scale: float = 0.1
    final_loss_key: str = "flow_final_nll"

    def trains(self, fs: FiberSampler) -> bool:
        """Whether stage 2 builds and trains a module (else the sampler keeps ``flow = None``)."""
        return False

    def fit_untrained(self, fs: FiberSampler, problem: FiberProblem) -> nn.Module | None:
        """A map fitted without a training loop (from the walk and the data), or None to train (base class: None)."""
        return None

    def build(self, fs: FiberSampler) -> nn.Module:
        """The untrained map (also rebuilt, then loaded, by ``load_state_dict``)."""
        raise NotImplementedError(f"{type(self).__name__} trains no module")

    def optimizer(self, fs: FiberSampler, module: nn.Module) -> torch.optim.Optimizer:
        """The optimizer of the map's parameters (base class: Adam at ``flow_lr``)."""
        return torch.optim.Adam(module.parameters(), lr=fs.deform_config.flow_lr)

    def training_step(self, fs: FiberSampler, problem: FiberProblem, module: nn.Module,
                      optimizer: torch.optim.Optimizer, coords: torch.Tensor,
                      generator: torch.Generator) -> TrainingStep:
        """A function that takes one training step of ``module`` and returns its loss.

        ``coords`` (M, r) are the whitened principal coordinates of the walked samples stage 2 is fitted on; the step
        draws its randomness from ``generator``.
        """
        raise NotImplementedError(f"{type(self).__name__} trains no module")

    def sample(self, fs: FiberSampler, module: nn.Module | None, n_samples: int,
               generator: torch.Generator) -> torch.Tensor:
        """N parameter vectors (n, P), drawn with ``generator``; ``module`` is the trained map (None if none)."""
        coords, dtype, device = fitted_coords(fs), fs.subset.dtype, fs.subset.device
        z = torch.randn((n_samples, coords.rank), generator=generator, dtype=dtype).to(device)
        with torch.no_grad():
            return coords.decode(module(z) if module is not None else z)

    def settings(self, fs: FiberSampler) -> dict[str, Any]:
        """Entries added to the sampler's settings (the checkpoint fingerprint) for this map."""
        if self.uses_barrier:
            return {"variational": [fs.barrier_weight, fs.variational_init_scale]}
        return {}

    def diagnostics(self, fs: FiberSampler, n_samples: int, seed: int) -> dict[str, float]:
        """Extra ``info`` entries after the all-data check of stage-2 samples."""
        return {}


class FlowMethod(DeformMethod):
    """"flow": a coupling flow trained by maximum likelihood on the walked samples plus the loss-aware term."""

    def trains(self, fs: FiberSampler) -> bool:
        """Train a flow when the principal subspace has r >= 2 dimensions and ``flow_steps`` > 0."""
        return fitted_coords(fs).rank >= 2 and fs.deform_config.flow_steps > 0

    def build(self, fs: FiberSampler) -> CouplingFlow:
        """A :class:`~posthoc.fiber.deform.CouplingFlow` on the r principal coordinates, the identity at start."""
        cfg = fs.deform_config
        return CouplingFlow(fitted_coords(fs).rank, cfg.flow_layers, cfg.flow_hidden, seed=fs.seed).to(
            dtype=fs.subset.dtype, device=fs.subset.device)

    def optimizer(self, fs: FiberSampler, module: nn.Module) -> torch.optim.Optimizer:
        """Adam with a small weight decay (:func:`~posthoc.fiber.deform.make_flow_optimizer`)."""
        return make_flow_optimizer(module, fs.deform_config.flow_lr)

    def training_step(self, fs, problem, module, optimizer, coords, generator) -> TrainingStep:
        """One full-batch maximum-likelihood step on the walked samples plus the loss-aware term."""
        penalty, weight = loss_penalty(fs, problem, generator), fs.deform_config.flow_loss_weight
        return lambda: flow_training_step(module, optimizer, coords, penalty, weight)


class VariationalMethod(FlowMethod):
    """"variational": the coupling flow as a variational approximation of the prior on the low-loss set."""

    uses_barrier = True
    final_loss_key = "flow_final_kl"

    def build(self, fs: FiberSampler) -> CouplingFlow:
        """The coupling flow, started narrow: its scales set to ``variational_init_scale``."""
        flow = super().build(fs)
        with torch.no_grad():
            flow.log_scale.fill_(math.log(fs.variational_init_scale))
        return flow

    def optimizer(self, fs: FiberSampler, module: nn.Module) -> torch.optim.Optimizer:
        """Adam at ``flow_lr`` without weight decay."""
        # no weight decay: it would pull the flow back to the identity, i.e. to the walked samples' scales
        return torch.optim.Adam(module.parameters(), lr=fs.deform_config.flow_lr)

    def training_step(self, fs, problem, module, optimizer, coords, generator) -> TrainingStep:
        """One reverse-KL step on ``flow_loss_samples`` base draws (one minibatch forward/backward each)."""
        energy, cfg = variational_energy(fs, problem, generator, decode=True), fs.deform_config
        dtype, device = fs.subset.dtype, fs.subset.device

        def step() -> float:
            z = torch.randn((cfg.flow_loss_samples, coords.shape[1]), generator=generator, dtype=dtype).to(device)
            return variational_training_step(module, optimizer, z, energy)

        return step


class AnchoredMethod(DeformMethod):
    """"anchored": walked samples within the tolerance plus a learned Gaussian jitter (built even untrained)."""

    uses_barrier = True
    # the jitter starts from plain resampling of the walk (0.01) and needs the stiffer barrier to keep most samples
    # within the tolerance (docs/measurements/methods.md)
    default_barrier_weight = 300.0
    default_init_scale = 0.01
    final_loss_key = "flow_final_kl"

    def trains(self, fs: FiberSampler) -> bool:
        """Always: the map is built (and its jitter trained when ``flow_steps`` > 0)."""
        return True

    def build(self, fs: FiberSampler) -> AnchoredJitter:
        """An :class:`~posthoc.fiber.deform.AnchoredJitter` on the walked samples within the tolerance.

        Raises ValueError when none is within the tolerance (no anchors).
        """
        tol, (particles, particle_nll, map_nll), coords = fs.config.loss_tolerance, walked(fs), fitted_coords(fs)
        within = particle_nll <= map_nll + tol
        if not bool(within.any()):
            raise ValueError("no walked sample is within the loss tolerance, so deform='anchored' has no anchors; "
                             "lower step_size or raise final_rounds / loss_tolerance")
        room = ((map_nll + tol - particle_nll[within]).clamp_min(0) / tol).sqrt()
        return AnchoredJitter(particles[within], room.to(particles.dtype), coords.basis, coords.scales,
                              fs.variational_init_scale)

    def training_step(self, fs, problem, module, optimizer, coords, generator) -> TrainingStep:
        """One reverse-KL step of the jitter scale on ``flow_loss_samples`` latent draws."""
        energy, n_draws = variational_energy(fs, problem, generator, decode=False), fs.deform_config.flow_loss_samples

        def step() -> float:
            index, u = module.draw(n_draws, generator)
            return anchored_training_step(module, optimizer, index, u, energy)

        return step

    def sample(self, fs, module, n_samples, generator) -> torch.Tensor:
        """N parameter vectors (n, P): an anchor drawn uniformly plus its jitter; cost one (r x P) product each."""
        if not isinstance(module, AnchoredJitter):
            return super().sample(fs, module, n_samples, generator)
        index, u = module.draw(n_samples, generator)
        with torch.no_grad():
            return module(index, u)

    def diagnostics(self, fs: FiberSampler, n_samples: int, seed: int) -> dict[str, float]:
        """How much diversity the jitter adds beyond resampling the walk, from ``n_samples`` seeded draws.

        ``anchored_jitter_over_anchor_spread``: the mean distance of the samples from their anchors over the mean
        distance of the anchors from the anchors' mean; ``anchored_sigma_mean``: sigma's mean.
        """
        jitter = fs.flow
        if not isinstance(jitter, AnchoredJitter):
            raise RuntimeError("the anchored map's diagnostics need its trained AnchoredJitter (FiberSampler.fit)")
        index, u = jitter.draw(n_samples, torch.Generator().manual_seed(seed))
        with torch.no_grad():
            moved = (jitter(index, u) - jitter.anchors[index]).norm(dim=-1).mean()
            spread = (jitter.anchors - jitter.anchors.mean(0)).norm(dim=-1).mean()
        return {"anchored_jitter_over_anchor_spread": float(moved / spread) if float(spread) > 0 else 0.0,
                "anchored_sigma_mean": float(torch.exp(jitter.log_sigma).mean())}


DEFORMS: dict[str, DeformMethod] = {}


def walked(fs: FiberSampler) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The walked samples (M, P), their all-data mean NLL (M,) and the MAP's; RuntimeError before the walk."""
    if fs.particles is None or fs.particle_nll is None or fs.map_nll is None:
        raise RuntimeError("the FiberSampler has not walked yet: call walk(train_loader) or fit(train_loader) first")
    return fs.particles, fs.particle_nll, fs.map_nll


def fitted_coords(fs: FiberSampler) -> PrincipalCoordinates:
    """The principal coordinates of the walked samples; RuntimeError before stage 2 fitted them."""
    if fs.coords is None:
        raise RuntimeError("call fit(train_loader) first: the FiberSampler has no principal coordinates")
    return fs.coords


def stage2_samples(fs: FiberSampler) -> torch.Tensor:
    """The walked samples (M', P) stage 2 is fitted on: those within the tolerance, or all when fewer than 2 are."""
    particles, nll, map_nll = walked(fs)
    within = nll <= map_nll + fs.config.loss_tolerance
    return particles[within] if int(within.sum()) >= 2 else particles


def register_deform(name: str, method: DeformMethod, replace: bool = False) -> DeformMethod:
    """Register a stage-2 map under ``name``; then ``FiberSampler(..., deform=name)`` uses it.

    Returns ``method``. Raises ValueError for a name already registered unless ``replace=True``, TypeError if
    ``method`` is not a DeformMethod.
    """
    if not isinstance(method, DeformMethod):
        raise TypeError(f"register a DeformMethod instance, got {type(method).__name__}")
    return add_to_registry(DEFORMS, name, method, "deform", replace)


def get_deform(name: str) -> DeformMethod:
    """The map registered under ``name``; ValueError listing the registered names otherwise."""
    key = name.value if isinstance(name, DeformKind) else name
    if not isinstance(key, str) or key not in DEFORMS:
        raise ValueError(f"unknown deform {name!r}; choose one of {', '.join(map(repr, DEFORMS))} "
                         "(or register one with posthoc.fiber.register_deform)")
    return DEFORMS[key]


for _kind, _method in ((DeformKind.GAUSSIAN, DeformMethod()), (DeformKind.FLOW, FlowMethod()),
                       (DeformKind.VARIATIONAL, VariationalMethod()), (DeformKind.ANCHORED, AnchoredMethod())):
    register_deform(_kind.value, _method)


def loss_penalty(fs: FiberSampler, problem: FiberProblem,
                 generator: torch.Generator) -> Callable[[CouplingFlow], torch.Tensor]:
    """The loss-aware term of the "flow" map, as a function of the flow.

    For ``flow_loss_samples`` decoded samples and a random minibatch of ``flow_loss_batch`` training examples, the
    mean hinge max(0, excess - 0.8 eps) / eps of their NLL over the MAP's on that minibatch (0.8: a margin for the
    minibatch noise). Cost: one forward and backward pass per decoded sample on the minibatch.
    """
    coords, tol, cfg = fitted_coords(fs), fs.config.loss_tolerance, fs.deform_config

    def penalty(flow: CouplingFlow) -> torch.Tensor:
        index = torch.randint(problem.n_data, (min(cfg.flow_loss_batch, problem.n_data),), generator=generator)
        z = torch.randn((cfg.flow_loss_samples, coords.rank), generator=generator, dtype=fs.subset.dtype)
        x, y = select(problem.inputs, index), problem.targets[index]
        thetas = coords.decode(flow(z.to(fs.subset.device)))
        nll = mean_nll(outputs_many(fs.subset, x, thetas, problem.vectorise), y, fs.likelihood, fs.sigma_noise)
        with torch.no_grad():
            ref = mean_nll(fs.subset.forward(x).unsqueeze(0), y, fs.likelihood, fs.sigma_noise)
        return torch.relu(nll - ref - 0.8 * tol).mean() / tol

    return penalty


def variational_energy(fs: FiberSampler, problem: FiberProblem, generator: torch.Generator,
                       decode: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """Minus the log target of the "variational" and "anchored" maps, per sample, as a function.

    delta/2 ||theta||^2 (the prior, up to a constant) plus barrier_weight * max(0, excess - eps/2) / eps, the
    excess of its mean NLL over the MAP's on a random minibatch of ``flow_loss_batch`` examples (eps/2: a margin
    for the minibatch noise). Takes whitened coordinates (S, r) (``decode``) or parameter vectors (S, P); returns
    (S,). Cost: one forward and backward pass per sample on the minibatch.
    """
    tol, batch, barrier = fs.config.loss_tolerance, fs.deform_config.flow_loss_batch, fs.barrier_weight
    principal = fitted_coords(fs)

    def energy(coords: torch.Tensor) -> torch.Tensor:
        index = torch.randint(problem.n_data, (min(batch, problem.n_data),), generator=generator)
        x, y = select(problem.inputs, index), problem.targets[index]
        thetas = principal.decode(coords) if decode else coords
        nll = mean_nll(outputs_many(fs.subset, x, thetas, problem.vectorise), y, fs.likelihood, fs.sigma_noise)
        with torch.no_grad():
            ref = mean_nll(fs.subset.forward(x).unsqueeze(0), y, fs.likelihood, fs.sigma_noise)
        neg_log_prior = 0.5 * (fs.prior_precision * thetas**2).sum(-1)
        return neg_log_prior + barrier * torch.relu(nll - ref - 0.5 * tol) / tol

    return energy


# FiberSampler.fit warns when fewer of the checked stage-2 samples than this are within the loss tolerance
MIN_STAGE2_WITHIN_TOL = 0.5


def stage2_check(fs: FiberSampler, problem: FiberProblem) -> dict[str, float]:
    """The all-data check of ``fs.n_check`` stage-2 samples, as ``info`` entries.

    The fraction within the loss tolerance of the MAP's NLL, the mean NLL excess and the seconds taken; warns when
    most samples are off the set (:func:`warn_if_off_the_set`). Cost: ``n_check`` forward passes over the data.
    """
    t0 = time.perf_counter()
    nll, map_nll = full_data_nll(problem, fs.sample(fs.n_check, seed=fs.seed + 7)), walked(fs)[2]
    within = float((nll <= map_nll + fs.config.loss_tolerance).double().mean())
    warn_if_off_the_set(within, fs.n_check, fs.config.loss_tolerance, str(fs.deform_config.name))
    return {"stage2_within_tol": within, "stage2_nll_excess_mean": float((nll - map_nll).mean()),
            "stage2_check_s": time.perf_counter() - t0}


def warn_if_off_the_set(within: float, n_check: int, tolerance: float, deform: str) -> None:
    """Warn when too few stage-2 samples are inside the loss tolerance: the predictive's map left the low-loss set.

    ``within``: the fraction of ``n_check`` samples within the tolerance on all training data; the threshold is
    MIN_STAGE2_WITHIN_TOL.
    """
    if within < MIN_STAGE2_WITHIN_TOL:
        warnings.warn(f"only {within:.0%} of {n_check} stage-2 samples are within loss_tolerance={tolerance:g} of the "
                      f"MAP's NLL on all training data: the predictive draws from a {deform!r} map that leaves the "
                      "low-loss set. Use deform='pullback' (the default: its samples are pulled back onto the set), "
                      "train the map longer (flow_steps), or check the walk (bench_info()['stage1_within_tol'])",
                      UserWarning, stacklevel=5)
