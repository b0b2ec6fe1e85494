"""Training the ScaLLA surrogate from JVPs only, with checkpoint and exact resume.

Two objectives (both keep the network fixed, in eval mode, and use forward-mode JVPs through
torch.func.functional_call; no Jacobian is ever stored):

- ``"probes"``, the paper's: each step draws ``batch_size`` training and as many context points and
  ``n_probes`` fresh Rademacher vectors v, computes u = J(X) v and fits the surrogate kernel to the noisy
  NTK estimate mean_s u_s u_s^T by the (K - Q)^2 loss (:func:`objectives.probe_kernel_loss`).
  Cost: 2 batch_size n_probes JVP evaluations per step.
- ``"directions"``, a deterministic target: h fixed directions V (Rademacher, or the top-h GGN eigenvectors
  found matrix-free by Lanczos) and ``n_target_points`` points (half training, half context) whose JVPs
  J(x) V are computed once (n_target_points h JVP evaluations), then plain regression of phi(x) onto them
  for ``steps`` minibatch steps (:func:`objectives.direction_regression_loss`). The targets are cached,
  so training steps spend no JVPs.

Biased variant (both objectives): the surrogate has h = :func:`n_context_features` (m) EXTRA features, m + h in
all; m (``n_features``) stays the rank the training points see. With "directions", training points regress onto
[J V / sqrt(m); 0_h] (their unbiased targets, the same m directions) and context points onto
[0_m; J W / sqrt(h)] along h Rademacher directions W (:func:`objectives.biased_direction_targets`): the
train x context kernel is exactly zero, the training block is the unbiased variant's kernel, and the context
block only carries the prior-level variance k(x, x), which Rademacher directions estimate without bias at any
rank (top-GGN eigenvectors of the training data would underestimate it away from the data). Cost: m JVP
evaluations per training target point, h per context point. With "probes", the (K - Q)^2 loss with the
train x context blocks of K zeroed is fitted by the m + h features (the paper's masked target; the extra h
give the context points room without taking rank from the training points). "directions" keeps the biased
variant's training-point variances closer to the unbiased ones than "probes", since nothing in the probe loss pins
which features the training points use (docs/measurements/methods.md).

A JVP evaluation is one point along one direction (a GGN product in Lanczos counts two per point: its
JVP and its VJP). Checkpoints (every ``checkpoint_every`` steps, atomic) hold the surrogate, optimizer,
scheduler and generator state, the history, and the cached targets, so a resumed run gives the same
result as an uninterrupted one. They are :mod:`posthoc.utils.checkpoint` files: one written with other settings,
another network (weights or buffers) or other training or context inputs is refused with the keys that differ, and
so is a damaged file.

Under torch.distributed every rank gets the same loaders (the pools hold all inputs) and the same seed, so
all ranks draw the same points, probes and directions; each rank computes its contiguous part of every
batch (:func:`posthoc.distributed.rank_slice`). "directions": the target JVPs are computed in parts and
gathered, each step's loss is the rank's share of the batch mean and the gradients are summed. "probes": the
pairwise loss couples all points, so the features are all-gathered with autograd and the JVPs gathered, every
rank evaluates the combined batch's loss and the gradients are averaged. Either way a step equals the
single-process step on the combined batch up to summation order. Rank 0 reads and writes checkpoints; a
checkpoint resumes on any number of ranks.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Callable, cast

import torch
from torch import nn
from tqdm.auto import tqdm

from posthoc.curvature.ggn_operator import streamed_ggn_eigenpairs
from posthoc.curvature.jacobians import jvp_many
from posthoc.curvature.output_factors import OutputFactors
from posthoc.distributed import collectives
from posthoc.likelihood import Likelihood
from posthoc.network.inputs import ModelInputs, batch_size, concat, select, take, tensor_leaves
from posthoc.network.positions import PositionFactors
from posthoc.network.subset import ParameterSubset
from posthoc.scalla import objectives
from posthoc.scalla.directions import (
    DirectionSet,
    EigenDirections,
    RademacherDirections,
    direction_chunks,
    n_chunks,
    rademacher,
)
from posthoc.scalla.pools import InputPool
from posthoc.scalla.positions import ggn_targets
from posthoc.utils.checkpoint import check_writable, data_fingerprint, load_checkpoint, module_digest, save_checkpoint
from posthoc.utils.checks import check_choice, check_positive_int

CHECKPOINT_FORMAT = 3  # 2: biased surrogates have m + h features (1 split m); 3: posthoc.utils.checkpoint files
CHECKPOINT_WHAT = "ScaLLA"
# Lanczos tolerance of the "eigen" directions: they only need to span the top GGN subspace roughly
# (its cost: docs/measurements/methods.md).
EIGEN_TOL = 1e-2
BIASED_CONTEXT_SHARE = 0.2  # h / m: the biased variant's extra context features


def n_context_features(n_features: int, biased: bool) -> int:
    """h, the extra features of the biased variant for m = ``n_features``: round(0.2 m), at least 1 (0 unbiased)."""
    return max(1, round(BIASED_CONTEXT_SHARE * n_features)) if biased else 0


class Objective(str, Enum):
    """The surrogate's training objective (module docstring)."""
    PROBES = "probes"  # the paper's (K - Q)^2 with fresh Rademacher probes
    DIRECTIONS = "directions"  # regression onto JVPs along fixed directions


class Directions(str, Enum):
    """The fixed directions of the "directions" objective: Rademacher vectors or top GGN eigenvectors."""
    RADEMACHER = "rademacher"
    EIGEN = "eigen"  # top GGN eigenvectors (Lanczos on a subsample)


class LRSchedule(str, Enum):
    """The learning-rate schedule of the surrogate's Adam."""
    CONSTANT = "constant"
    COSINE = "cosine"  # cosine decay from lr to 0 over the run


@dataclass(frozen=True)
class TrainSettings:
    """How the surrogate is trained (defaults: ScaLLA's docstring; measurements: docs/measurements/methods.md).

    ``batch_size`` training points per step (plus as many context points for "probes"; for "directions" a
    step draws ``batch_size`` points of the cached target set, half of them from its training points and half
    from its context points whatever their counts, which keeps the biased variant's training-point variances
    closer to the unbiased ones than uniform draws). ``checkpoint_every`` does not change the result and is not
    part of a checkpoint's identity. Raises ValueError for an unknown objective, directions or lr_schedule, a
    non-positive int count or a non-positive ``lr``.
    """

    objective: str = Objective.DIRECTIONS.value
    steps: int = 3000
    batch_size: int = 64
    n_probes: int = 1
    lr: float = 1e-3
    lr_schedule: str = LRSchedule.COSINE.value
    n_target_points: int = 2000
    directions: str = Directions.EIGEN.value
    eigen_subsample: int = 200
    jvp_chunk: int = 16
    checkpoint_every: int = 500
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice(self.objective, Objective, "objective")
        check_choice(self.directions, Directions, "directions")
        check_choice(self.lr_schedule, LRSchedule, "lr_schedule")
        for name in ("steps", "batch_size", "n_probes", "n_target_points", "eigen_subsample", "jvp_chunk",
                     "checkpoint_every"):
            check_positive_int(getattr(self, name), name)
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


DEFAULT_LR = 1e-3
FILLED_TARGETS_LR = 3e-3  # ScaLLA's default lr when jittered training inputs fill the targets (fit_settings)


def fit_settings(settings: TrainSettings, steps: int | None, default_lr: bool,
                 context_pool: InputPool | None) -> TrainSettings:
    """The settings of one ``ScaLLA.fit``: ``settings`` with ``steps`` if given and the default lr resolved.

    With ``default_lr`` (the user gave no lr) and a context pool of jittered training inputs
    (:func:`posthoc.scalla.pools.jittered_pool`), lr is :data:`FILLED_TARGETS_LR`: on the four small tasks of
    benchmarks/scalla_defaults.py and the tests' MLP, 3e-3 lifted the worst Spearman with the exact LLA from 0.855
    to 0.903 (benchmarks/results/scalla_defaults.md); with real context or enough training points the lr stays at
    :data:`DEFAULT_LR`, the rate measured on the FMNIST CNN (docs/measurements/methods.md).
    """
    changes: dict[str, Any] = {} if steps is None else {"steps": steps}
    if default_lr and context_pool is not None and context_pool.name == "jittered":
        changes["lr"] = FILLED_TARGETS_LR
    return TrainSettings(**{**asdict(settings), **changes})


REFERENCE_RECIPE = TrainSettings(objective="probes", steps=1_000_000, batch_size=5, n_probes=1, lr=5e-5,
                                 lr_schedule="constant")
"""The authors' FMNIST recipe (docs/scalla.md): 5 train + 5 context points, one probe, Adam 5e-5, 1M steps."""


def _fingerprint(subset: ParameterSubset, surrogate: nn.Module, settings: TrainSettings, biased: bool,
                 train_pool: InputPool, context_pool: InputPool | None) -> dict[str, Any]:
    """What a training run's result depends on, as the checkpoint fingerprint.

    The settings (not ``checkpoint_every``), the network's weights and buffers, the surrogate's architecture and
    initial weights, and all the training and context inputs the run draws from (hashed in full, one pass over
    them; timing in docs/measurements/methods.md).
    """
    identity = {k: v for k, v in asdict(settings).items() if k != "checkpoint_every"}
    return {"format": CHECKPOINT_FORMAT, "settings": identity, "biased": biased,
            "network_weights": module_digest(subset.model),
            "surrogate": [[name, list(t.shape)] for name, t in surrogate.state_dict().items()],
            "surrogate_init": module_digest(surrogate),
            "train_data": data_fingerprint(tensor_leaves(train_pool.inputs)),
            "context_data": None if context_pool is None else data_fingerprint(tensor_leaves(context_pool.inputs))}


class SurrogateTrainer:
    """Runs one training of ``surrogate`` (see the module docstring). Use :meth:`run`.

    Args:
        surrogate: maps inputs (B, ...) to features (B, m, C); trained in place.
        subset: the network's parameters (all weights) as a ParameterSubset.
        likelihood: for the GGN of the "eigen" directions.
        train_pool / context_pool: the inputs (context may be None unless ``biased``).
        biased: zero the train x context kernel (docs/scalla.md).
        callback: called as callback(step, jvp_evaluations) after every step (for learning curves); it may
            raise to interrupt a run (a checkpointed run then resumes from its last checkpoint).
        position_outputs: C when the network's outputs have positions (B, ..., C) (the subset flattens them to
            (B, L·C) and the surrogate gives (B, m, L·C), posthoc.scalla.positions); 0 for outputs (B, C).
    """

    def __init__(self, surrogate: nn.Module, subset: ParameterSubset, likelihood: Likelihood,
                 train_pool: InputPool, context_pool: InputPool | None, settings: TrainSettings,
                 biased: bool = False, checkpoint: str | os.PathLike | None = None, progress: bool = True,
                 log: Callable[[str], None] = print,
                 callback: Callable[[int, int], None] | None = None, position_outputs: int = 0) -> None:
        if biased and context_pool is None:
            raise ValueError("the biased variant needs context points: pass context_loader")
        self.surrogate, self.subset, self.likelihood = surrogate, subset, likelihood
        self.train_pool, self.context_pool, self.settings, self.biased = train_pool, context_pool, settings, biased
        self.checkpoint = None if checkpoint is None else Path(checkpoint)
        self.progress, self.log, self.callback = progress, log, callback
        self.position_outputs = position_outputs
        self.objective = check_choice(settings.objective, Objective, "objective")
        self.n_features, self.n_context_features = 0, 0  # set by run
        self.generator = torch.Generator().manual_seed(settings.seed)
        self.optimizer = torch.optim.Adam(surrogate.parameters(), lr=settings.lr)
        total = settings.steps
        cosine = check_choice(settings.lr_schedule, LRSchedule, "lr_schedule") is LRSchedule.COSINE
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, (lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total))) if cosine else
            (lambda s: 1.0))
        self.step, self.jvp_evaluations = 0, 0
        self.history: list[dict[str, float]] = []
        self.running_loss: float | None = None
        self.targets: dict[str, torch.Tensor] | None = None
        self.wall_time_s = 0.0
        self.fingerprint = _fingerprint(subset, surrogate, settings, biased, train_pool, context_pool)

    # ------------------------------------------------------------------ checkpoints
    def _save(self) -> None:
        if self.checkpoint is None or not collectives.is_main_process():
            return
        save_checkpoint(self.checkpoint, {
            "step": self.step, "surrogate": self.surrogate.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "generator": self.generator.get_state(),
            "jvp_evaluations": self.jvp_evaluations, "history": self.history, "targets": self.targets,
            "wall_time_s": self.wall_time_s, "running_loss": self.running_loss,
        }, self.fingerprint, CHECKPOINT_WHAT)

    def _resume(self) -> None:
        """Check that the checkpoint's folder is writable, then load the checkpoint if there is one.

        Rank 0 reads it and sends it to the other ranks; every rank raises the same error.
        """
        if self.checkpoint is None:
            return
        state, error = None, None
        if collectives.is_main_process():
            try:
                check_writable(self.checkpoint.parent, "ScaLLA checkpoint")
                if self.checkpoint.exists():
                    state = load_checkpoint(self.checkpoint, self.fingerprint, CHECKPOINT_WHAT)
            except (ValueError, PermissionError) as err:  # raised on every rank below, not only here
                error = (type(err).__name__, str(err))
        state, error = collectives.broadcast_object((state, error), "the ScaLLA checkpoint")
        if error is not None:
            raise (PermissionError if error[0] == "PermissionError" else ValueError)(error[1])
        if state is None:
            return
        self.surrogate.load_state_dict(state["surrogate"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        self.step, self.jvp_evaluations = state["step"], state["jvp_evaluations"]
        self.history, self.targets = state["history"], state["targets"]
        self.wall_time_s, self.running_loss = state["wall_time_s"], state["running_loss"]
        self.log(f"resuming ScaLLA surrogate training from step {self.step} ({self.checkpoint})")

    # ------------------------------------------------------------------ deterministic targets
    def _directions(self, n_dirs: int) -> tuple[DirectionSet, bool]:
        """(h, P) directions and whether targets are divided by sqrt(h)."""
        how = check_choice(self.settings.directions, Directions, "directions")
        if how is Directions.RADEMACHER:
            return RademacherDirections(n_dirs, self.subset.n_params, self.generator, self.subset.dtype), True
        n_sub = min(self.settings.eigen_subsample, len(self.train_pool))
        index = torch.randperm(len(self.train_pool), generator=self.generator)[:n_sub]
        chunk = max(1, self.settings.jvp_chunk * 8)

        mine = index[collectives.rank_slice(n_sub)]  # the GGN products are summed over ranks
        factors, n_out = OutputFactors(self.likelihood), self.position_outputs
        if n_out:  # the GGN over every position of the subsample (posthoc.scalla.positions)
            with torch.no_grad():
                n_positions = self.subset.forward(self.train_pool.take(index[:1])).shape[-1] // n_out
            factors = cast(OutputFactors, PositionFactors(factors, n_out, self.likelihood))

        def batches():
            for start in range(0, len(mine), chunk):
                x = self.train_pool.take(mine[start:start + chunk])
                # the GGN factors ignore the labels
                yield x, (ggn_targets(batch_size(x), n_positions, n_out, self.likelihood, self.subset.dtype,
                                      self.subset.device) if n_out else torch.zeros(batch_size(x), dtype=torch.long))

        pairs = streamed_ggn_eigenpairs(self.subset, batches, factors,
                                        min(n_dirs, self.subset.n_params), seed=self.settings.seed, tol=EIGEN_TOL,
                                        progress=self.progress, desc="ScaLLA eigen directions: GGN products")
        self.jvp_evaluations += 2 * int(pairs.info["products"]) * n_sub
        return EigenDirections(pairs, n_dirs), False  # zero directions after the k <= h eigenvectors found

    def _compute_targets(self) -> None:
        s = self.settings
        m, h = self.n_features, self.n_context_features
        directions, normalise = self._directions(m)
        context_directions = (RademacherDirections(h, self.subset.n_params, self.generator, self.subset.dtype)
                              if self.biased else directions)
        context_pool = self.context_pool
        n_ctx = 0 if context_pool is None else min(s.n_target_points // 2, len(context_pool))
        n_train = min(s.n_target_points - n_ctx, len(self.train_pool))
        idx_train = torch.randperm(len(self.train_pool), generator=self.generator)[:n_train]
        idx_ctx = (torch.randperm(len(context_pool), generator=self.generator)[:n_ctx]
                   if context_pool is not None and n_ctx else torch.zeros(0, dtype=torch.long))
        bar = tqdm(total=n_train * n_chunks(directions) + n_ctx * n_chunks(context_directions),
                   desc="ScaLLA targets (JVPs)", disable=not self.progress, leave=False)
        with torch.no_grad():
            n_outputs = self.subset.forward(self.train_pool.take(idx_train[:1])).shape[-1]

        def jvps_of(points: list[tuple[InputPool | None, torch.Tensor]], along: DirectionSet) -> list[torch.Tensor]:
            """J(x) V (h, n_i, C) for each set (pool, index) of points, a chunk of directions (built once) at a time."""
            points = [(pool, index) for pool, index in points if pool is not None and len(index)]
            blocks: list[list[torch.Tensor]] = [[] for _ in points]
            for block in direction_chunks(along) if points else ():
                vectors = block.to(self.subset.device)
                for (pool, index), done in zip(points, blocks, strict=True):
                    assert pool is not None
                    mine = index[collectives.rank_slice(len(index))]  # all of it in one process
                    parts = [vectors.new_zeros(len(vectors), 0, n_outputs)]
                    for start in range(0, len(mine), s.jvp_chunk):
                        x = pool.take(mine[start:start + s.jvp_chunk])
                        with torch.no_grad():
                            parts.append(jvp_many(self.subset, x, vectors).detach())  # (k, b, C)
                        bar.update(batch_size(x))
                    local = torch.cat(parts, dim=1).transpose(0, 1).contiguous()
                    done.append(collectives.gather_rows(local, "the ScaLLA targets").transpose(0, 1))
                del block, vectors  # freed before the next chunk is built: one chunk of P-vectors alive, not two
            # the whole sets, whichever rank computed them
            self.jvp_evaluations += sum(len(index) for _, index in points) * len(along)
            return [torch.cat(done) for done in blocks]

        if self.biased:  # n_ctx >= 1: the biased variant has a non-empty context pool
            targets = objectives.biased_direction_targets(
                torch.cat(jvps_of([(self.train_pool, idx_train)], directions), dim=1),
                torch.cat(jvps_of([(context_pool, idx_ctx)], context_directions), dim=1), normalise)
        else:
            targets = objectives.direction_targets(
                torch.cat(jvps_of([(self.train_pool, idx_train), (context_pool, idx_ctx)], directions), dim=1),
                normalise)
        bar.close()
        if isinstance(directions, EigenDirections):
            self.jvp_evaluations += directions.vjp_evaluations
        self.targets = {"values": targets, "train_index": idx_train, "context_index": idx_ctx}

    def _target_batch(self, index: torch.Tensor) -> tuple[ModelInputs, torch.Tensor]:
        assert self.targets is not None
        n_train = len(self.targets["train_index"])
        is_ctx = index >= n_train
        parts = [self.train_pool.take(self.targets["train_index"][index[~is_ctx]])]
        if bool(is_ctx.any()):
            assert self.context_pool is not None
            parts.append(self.context_pool.take(self.targets["context_index"][index[is_ctx] - n_train]))
        # back in the order of index: training rows first in the concatenation, then context rows
        position = torch.cat([torch.nonzero(~is_ctx).reshape(-1), torch.nonzero(is_ctx).reshape(-1)])
        x = select(concat(parts), torch.argsort(position))
        return x, self.targets["values"][index].to(device=self.subset.device)

    # ------------------------------------------------------------------ one step
    def _loss(self) -> tuple[torch.Tensor, float]:
        """This rank's loss for one step and the factor its gradients get before they are summed over ranks."""
        s = self.settings
        if self.objective is Objective.DIRECTIONS:
            assert self.targets is not None
            n_train, n_all = len(self.targets["train_index"]), len(self.targets["values"])
            if n_all == n_train:
                index = torch.randint(n_all, (s.batch_size,), generator=self.generator)
            else:  # half training, half context targets, as the paper's B + B batches (see TrainSettings)
                n_ctx = s.batch_size // 2
                index = torch.cat([torch.randint(n_train, (s.batch_size - n_ctx,), generator=self.generator),
                                   n_train + torch.randint(n_all - n_train, (n_ctx,), generator=self.generator)])
            part = collectives.rank_slice(len(index))
            x, targets = self._target_batch(index[part])
            share = (part.stop - part.start) / len(index)  # the rank's share of the batch mean
            return objectives.direction_regression_loss(self.surrogate(x), targets) * share, 1.0
        x = self.train_pool.take(torch.randint(len(self.train_pool), (s.batch_size,), generator=self.generator))
        is_context = torch.zeros(s.batch_size, dtype=torch.bool)
        if self.context_pool is not None:
            xc = self.context_pool.take(torch.randint(len(self.context_pool), (s.batch_size,),
                                                      generator=self.generator))
            x = concat([x, xc])
            is_context = torch.cat([is_context, torch.ones(s.batch_size, dtype=torch.bool)])
        probes = rademacher(s.n_probes, self.subset.n_params, self.generator, self.subset.dtype)
        world = collectives.world_size()
        n_points = batch_size(x)
        if n_points % world:
            raise ValueError(f"the probe objective splits each step's {n_points} points over {world} processes: "
                             "choose batch_size so that they divide evenly")
        part = collectives.rank_slice(n_points)
        mine = take(x, part.start, part.stop)
        with torch.no_grad():
            jvps = jvp_many(self.subset, mine, probes.to(self.subset.device))  # (S, n / world, C)
        self.jvp_evaluations += s.n_probes * n_points
        # every rank evaluates the combined batch's loss; the backward of the gather sums the ranks' copies
        features = collectives.gather_with_grad(self.surrogate(mine), "the surrogate features")
        jvps = collectives.gather_rows(jvps.transpose(0, 1).contiguous(), "the probe JVPs").transpose(0, 1)
        loss = objectives.probe_kernel_loss(features, jvps, is_context.to(features.device), self.biased)
        return loss, 1.0 / world

    # ------------------------------------------------------------------ the loop
    def run(self, n_features: int, n_context_features: int = 0) -> "SurrogateTrainer":
        """Train to ``settings.steps`` steps (resuming from the checkpoint if there is one).

        ``n_features`` m; ``n_context_features`` h, the biased variant's extra features (the surrogate then
        outputs (m + h, C); :func:`n_context_features` gives the default), 0 when unbiased.
        """
        if (n_context_features > 0) != self.biased:
            raise ValueError(f"n_context_features={n_context_features}: the biased variant needs >= 1 extra context "
                             "features and the unbiased one none")
        self.n_features, self.n_context_features = n_features, n_context_features
        self.fingerprint.update(n_features=n_features, n_context_features=n_context_features)
        self.subset.model.eval()
        collectives.check_same_on_all_ranks(nn.utils.parameters_to_vector(self.surrogate.parameters()),
                                            "the initial surrogate weights (seed every rank alike)")
        self._resume()
        t0 = time.perf_counter() - self.wall_time_s
        if self.objective is Objective.DIRECTIONS and self.targets is None:
            self._compute_targets()
            self.wall_time_s = time.perf_counter() - t0
            self._save()
        total = self.settings.steps
        if self.step > total:
            raise ValueError(f"the checkpoint is at step {self.step}, beyond steps={total}")
        self.surrogate.train()
        bar = tqdm(range(self.step, total), initial=self.step, total=total, desc="ScaLLA surrogate",
                   disable=not self.progress, leave=False)
        for _ in bar:
            self.optimizer.zero_grad(set_to_none=True)
            loss, grad_scale = self._loss()
            if self.objective is Objective.DIRECTIONS:  # the batch's loss is the sum of the ranks' shares
                (total_loss,) = collectives.sum_over_ranks([loss.detach().reshape(1)], "the ScaLLA loss")
            else:
                total_loss = loss.detach()
            if not torch.isfinite(total_loss).all():
                raise FloatingPointError(f"the ScaLLA loss became {float(total_loss)} at step {self.step + 1}; "
                                         "lower lr")
            loss.backward()
            collectives.sum_gradients(list(self.surrogate.parameters()), "the surrogate gradients", grad_scale)
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            value = float(total_loss)
            running = value if self.running_loss is None else 0.98 * self.running_loss + 0.02 * value
            self.running_loss = running
            if self.step % 10 == 0 or self.step == total:
                bar.set_postfix(loss=f"{running:.4g}")
                self.history.append({"step": self.step, "jvp_evaluations": self.jvp_evaluations, "loss": running})
            if self.step % self.settings.checkpoint_every == 0 or self.step == total:
                self.wall_time_s = time.perf_counter() - t0
                self._save()
            if self.callback is not None:
                self.callback(self.step, self.jvp_evaluations)
        bar.close()
        self.wall_time_s = time.perf_counter() - t0
        self.surrogate.eval()
        return self
