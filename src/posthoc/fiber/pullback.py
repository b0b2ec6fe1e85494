"""Stage 2's ``pullback`` map: one long move of the walk's own dynamics from a walked sample, pulled back.

A sample is drawn in one pass, without a chain:

    m ~ uniform over the walked samples within the tolerance (the anchors), xi ~ N(0, I_P),
    theta = theta_m + P_m[ -(tau / 2) delta theta_m + sqrt(tau) xi ],
    theta <- Gauss-Newton pull-back of theta onto the low-loss set (at most ``pullback_steps`` steps),

P_m the projection onto null(J(theta_m)) on the pull-back set (``subsample_size`` training examples, the walk's own
NLL-check subsample) and the pull-back the walk's (:func:`posthoc.fiber.walk.pull_back`: minimum-norm steps towards
the MAP's outputs on that set, stopped once the mean NLL there is within half the tolerance of the MAP's). This is
one step of the walk's projected Langevin dynamics with a step tau far longer than the walk's: tau is set so the
move's norm is about ``step_scale`` times the median distance between a walked sample and its nearest other walked
sample (tau = (step_scale d_nn)^2 / P), so a sample lies that far from every walked sample -- new, not a resampled
one -- while the anchors carry stage 1's spread. A move the pull-back cannot bring back within half the tolerance
is rejected, as in the walk: the sample is its anchor (the fraction accepted is reported at fit,
``info["pullback_accepted"]``).

Cost per sample: one projection (``cg_steps + 1`` Gram products and one JVP and VJP on the pull-back set) plus up
to ``pullback_steps`` Gauss-Newton steps (a forward pass and ``cg_steps`` Gram products each), i.e. about
(pullback_steps + 1) (cg_steps + 1) forward-and-backward passes over ``subsample_size`` examples, vectorised over
the samples; memory: the anchors (M, P) and the pull-back set. The measurements behind the default
``step_scale`` are in benchmarks/results/fiber_toy.md.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from posthoc.fiber.deform import DeformKind
from posthoc.fiber.projection import project_null
from posthoc.fiber.stage2 import DeformMethod, register_deform, stage2_samples, walked
from posthoc.fiber.walk import FiberProblem, kept_outputs, mean_nll, pull_back
from posthoc.network.inputs import ModelInputs, select

if TYPE_CHECKING:  # the sampler imports this module through config.py
    from posthoc.fiber.sampler import FiberSampler

PULLBACK_MARGIN = 0.5  # a move is pulled back until its NLL on the pull-back set is within this share of eps
CHUNK = 64  # samples vectorised together (memory: CHUNK x subsample_size outputs per pass)
EXACT = "donot_use_mm_for_euclid_dist"  # cdist by differences: a walked sample is at distance 0 from itself, exactly


def nearest_neighbour_distances(points: torch.Tensor) -> torch.Tensor:
    """Distance (M,) of each of M points (M, P) to its nearest other point; M >= 2. Cost O(M^2 P)."""
    if points.ndim != 2 or points.shape[0] < 2:
        raise ValueError(f"need at least 2 points (M, P), got {tuple(points.shape)}")
    distances = torch.cdist(points, points, compute_mode=EXACT)
    distances.fill_diagonal_(math.inf)
    return distances.min(1).values


def novelty(samples: torch.Tensor, walked_samples: torch.Tensor) -> float:
    """How new samples (S, P) are: median distance to the nearest walked sample over the walked samples' median NN distance.

    The walked samples (M, P), M >= 2. Medians are torch's (the lower middle value for an even count). Resampling
    the walk gives 0; issue 17's goal is >= 0.5. Cost O((S + M) M P).
    """
    to_walk = torch.cdist(samples, walked_samples, compute_mode=EXACT).min(1).values.median()
    return float(to_walk / nearest_neighbour_distances(walked_samples).median())


class PullbackMove(nn.Module):
    """The ``pullback`` map's data (module doc): the anchors, the pull-back set and the move's step tau.

    Args:
        anchors: (M, P) the walked samples within the tolerance (all of them when fewer than 2 are), M >= 2 (not
            in the state dict: the sampler keeps them as its particles).
        step_scale: the move's norm in units of the anchors' median nearest-neighbour distance.

    Raises ValueError when the anchors' median nearest-neighbour distance is 0 (most of them repeat another one).

    The pull-back set -- inputs (S, ...) of the covered module, targets, the MAP's outputs (S, ..., C) on it and the NLL
    threshold -- is set by :meth:`set_pullback_set` and saved in the state dict (``get_extra_state``), so a loaded
    sampler draws without the training data.
    """

    anchors: torch.Tensor

    def __init__(self, anchors: torch.Tensor, step_scale: float) -> None:
        super().__init__()
        self.register_buffer("anchors", anchors, persistent=False)
        self.step_scale = float(step_scale)
        self.nn_distance = float(nearest_neighbour_distances(anchors).median())
        if not self.nn_distance > 0:
            raise ValueError("most walked samples repeat another one (median nearest-neighbour distance 0), so the "
                             "pullback map has no move scale; raise thin or lower step_size (fewer rejected moves)")
        # E||sqrt(tau) xi||^2 = tau P: the move before the projection has norm ~ step_scale * nn_distance
        self.tau = (self.step_scale * self.nn_distance) ** 2 / anchors.shape[1]
        self.pullback_set: dict[str, Any] | None = None

    def set_pullback_set(self, inputs: ModelInputs, targets: torch.Tensor, reference: torch.Tensor,
                         threshold: float) -> None:
        """The examples the pull-back fits: inputs (S, ...), targets, MAP outputs (S, ..., C), NLL threshold."""
        stored = dict(inputs) if isinstance(inputs, Mapping) else inputs
        self.pullback_set = {"inputs": stored, "targets": targets, "reference": reference, "threshold": float(threshold)}

    def get_extra_state(self) -> dict[str, Any]:
        """The pull-back set, for the state dict (RuntimeError before :meth:`set_pullback_set`)."""
        if self.pullback_set is None:
            raise RuntimeError("the pullback map has no pull-back set yet (FiberSampler.fit sets it)")
        return self.pullback_set

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore the pull-back set saved by :meth:`get_extra_state`."""
        self.pullback_set = dict(state)

    def draw(self, fs: FiberSampler, n_samples: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor,
                                                                                            torch.Tensor]:
        """N samples (n, P), whether each move was accepted (n,) and its anchor's index (n,).

        Randomness from ``generator`` (anchor indices, then the Gaussian move); cost in the module doc.
        """
        if self.pullback_set is None:
            raise RuntimeError("the pullback map has no pull-back set yet (FiberSampler.fit sets it)")
        data = self.pullback_set
        problem = FiberProblem(fs.subset, data["inputs"], data["targets"], fs.likelihood, fs.prior_precision,
                               fs.sigma_noise, vectorise=fs.vectorises(data["inputs"]))
        kept = kept_outputs(data["targets"], fs.likelihood)
        config = fs.config
        index = torch.randint(self.anchors.shape[0], (n_samples,), generator=generator).to(self.anchors.device)
        noise = torch.randn((n_samples, self.anchors.shape[1]), generator=generator, dtype=self.anchors.dtype)
        noise = noise.to(self.anchors.device)
        thetas, accepted = [], []
        for start in range(0, n_samples, CHUNK):
            anchors = self.anchors[index[start:start + CHUNK]]
            move = -0.5 * self.tau * fs.prior_precision * anchors + math.sqrt(self.tau) * noise[start:start + CHUNK]
            with torch.no_grad():
                move = project_null(fs.subset, data["inputs"], anchors, move, config.cg_steps, config.damping, kept,
                                    problem.vectorise)
            moved, _, ok = pull_back(problem, anchors + move, data["inputs"], data["targets"], data["reference"],
                                     data["threshold"], config)
            thetas.append(torch.where(ok.unsqueeze(-1), moved, anchors))
            accepted.append(ok)
        return torch.cat(thetas), torch.cat(accepted), index


class PullbackMethod(DeformMethod):
    """"pullback": a walked sample plus one long projected Langevin move, pulled back (module doc); no training."""

    def trains(self, fs: FiberSampler) -> bool:
        """Never: the map is fitted without a training loop (:meth:`fit_untrained`)."""
        return False

    def build(self, fs: FiberSampler) -> PullbackMove:
        """A :class:`PullbackMove` on the walked samples within the tolerance (its pull-back set still unset).

        With fewer than 2 of them within the tolerance, all walked samples are the anchors (the rule of every map,
        :func:`~posthoc.fiber.stage2.stage2_samples`) and a UserWarning says so: the samples then need not be
        within the tolerance.
        """
        particles, particle_nll, map_nll = walked(fs)
        n_within = int((particle_nll <= map_nll + fs.config.loss_tolerance).sum())
        if n_within < 2:
            warnings.warn(f"{n_within} walked sample(s) within the loss tolerance: deform='pullback' anchors its moves "
                          "at all walked samples, so its samples need not be within the tolerance; lower step_size or "
                          "raise final_rounds / loss_tolerance", UserWarning, stacklevel=2)
        return PullbackMove(stage2_samples(fs), fs.deform_config.step_scale)

    def fit_untrained(self, fs: FiberSampler, problem: FiberProblem) -> PullbackMove:
        """The map with its pull-back set: the walk's NLL-check subsample (the same seeded draw as the walk's).

        Cost: the anchors' pairwise distances, O(M^2 P), and one forward pass on the subsample.
        """
        move = self.build(fs)
        n_sub = min(fs.config.subsample_size, problem.n_data)
        index = torch.randperm(problem.n_data, generator=torch.Generator().manual_seed(fs.seed))[:n_sub]
        inputs, targets = select(problem.inputs, index), problem.targets[index]
        with torch.no_grad():
            reference = fs.subset.forward(inputs, fs.subset.theta_map)
            map_nll = float(mean_nll(reference.unsqueeze(0), targets, fs.likelihood, fs.sigma_noise)[0])
        move.set_pullback_set(inputs, targets, reference, map_nll + PULLBACK_MARGIN * fs.config.loss_tolerance)
        return move

    def sample(self, fs: FiberSampler, module: nn.Module | None, n_samples: int,
               generator: torch.Generator) -> torch.Tensor:
        """N parameter vectors (n, P) (module doc); RuntimeError without the fitted :class:`PullbackMove`."""
        return self._move(module).draw(fs, n_samples, generator)[0]

    def settings(self, fs: FiberSampler) -> dict[str, Any]:
        """The move's scale (the checkpoint fingerprint); the pull-back uses the walk's settings, already there."""
        return {"pullback": [fs.deform_config.step_scale]}

    def diagnostics(self, fs: FiberSampler, n_samples: int, seed: int) -> dict[str, float]:
        """``n_samples`` seeded draws: the accepted fraction, their novelty (:func:`novelty`) and the move's tau.

        Cost: ``n_samples`` draws (module doc).
        """
        move = self._move(fs.flow)
        thetas, accepted, _ = move.draw(fs, n_samples, torch.Generator().manual_seed(seed))
        return {"pullback_accepted": float(accepted.double().mean()), "pullback_novelty": novelty(thetas, move.anchors),
                "pullback_nn_distance": move.nn_distance, "pullback_tau": move.tau}

    @staticmethod
    def _move(module: nn.Module | None) -> PullbackMove:
        if not isinstance(module, PullbackMove):
            raise RuntimeError("the pullback map needs its fitted PullbackMove (FiberSampler.fit)")
        return module


register_deform(DeformKind.PULLBACK.value, PullbackMethod())
__all__ = ["PullbackMethod", "PullbackMove", "nearest_neighbour_distances", "novelty"]
