"""MAP training with checkpoints keyed by data, model and settings.

A finished run is saved as ``<checkpoint_dir>/<key>.pt`` and reused when the
same data, model and settings come again. While training, the full state
(model, optimizer, scheduler, RNG) is written atomically after every epoch to
``<key>.partial.pt``, so an interrupted run resumes from its last finished
epoch with the same result as an uninterrupted one.

Both are :mod:`posthoc.utils.checkpoint` files whose fingerprint holds the
settings, the model's class and initial weights (parameters and buffers) and a
digest of all the training data (every tensor of a ``TensorDataset``, else of
one ordered pass over the data set, much cheaper than one epoch; timings in
docs/measurements/core.md): a file with the same key written by
another computation is refused with the keys that differ, and so is a damaged
file; nothing is loaded that could run code. The checkpoint folder is checked
for writing before training starts.

Under torch.distributed (e.g. ``torchrun``) every rank draws the same seeded
minibatch and trains on its slice of it; the gradients are summed over ranks
with the loss normalised by the global batch size, so each step is the
single-process step on the whole minibatch (up to summation order; BatchNorm's
training statistics are per rank). Rank 0 reads and writes the checkpoints and
sends their contents to the other ranks.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sized
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from tqdm.auto import tqdm

from posthoc.data.loaders import make_loader
from posthoc.distributed import collectives
from posthoc.likelihood import Likelihood, check_supported
from posthoc.utils.checkpoint import (
    check_writable,
    data_fingerprint,
    fingerprint_digest,
    load_checkpoint,
    module_digest,
    read_checkpoint,
    save_checkpoint,
)
from posthoc.utils.checks import check_choice, check_finite, check_labels, check_positive_int
from posthoc.utils.modes import eval_mode

CHECKPOINT_FORMAT = 2  # 2: posthoc.utils.checkpoint files (fingerprint with data and initial weights); drop_last
FINAL, PARTIAL = "MAP model", "partial MAP training"


class LRSchedule(str, Enum):
    """The learning rate over MAP training."""

    STEP = "step"  # multiplied by TrainConfig.gamma after every epoch (StepLR)
    COSINE = "cosine"  # cosine-annealed from lr to 0 over all steps, updated every step (gamma unused)


@dataclass(frozen=True)
class TrainConfig:
    """MAP training settings (defaults: the FMNIST reference schedule; see docs/benchmarks.md).

    Adam(lr, weight_decay), ``epochs`` epochs of shuffled minibatches of ``batch_size``, seeded by ``seed``, the
    learning rate following ``schedule`` (:class:`LRSchedule`: ``"step"``, StepLR with ``gamma`` per epoch, or
    ``"cosine"``, annealed to 0 over every step). ``drop_last`` skips each epoch's incomplete last batch (needed
    with BatchNorm when the data leave a last batch of one example: :func:`train_map` raises then).
    """

    epochs: int = 40
    batch_size: int = 64
    lr: float = 1e-3
    gamma: float = 0.7
    weight_decay: float = 0.0
    seed: int = 0
    likelihood: str = Likelihood.CLASSIFICATION.value
    drop_last: bool = False
    schedule: str = LRSchedule.STEP.value

    def __post_init__(self) -> None:
        check_choice(self.schedule, LRSchedule, "schedule")
        check_supported(check_choice(self.likelihood, Likelihood, "likelihood"), (Likelihood.CLASSIFICATION, Likelihood.REGRESSION), "MAP training")
        check_positive_int(self.epochs, "epochs", "passes over the training set")
        check_positive_int(self.batch_size, "batch_size", "examples per optimizer step")
        if not self.lr > 0 or not 0 < self.gamma <= 1 or self.weight_decay < 0:
            raise ValueError("need lr > 0, 0 < gamma <= 1 and weight_decay >= 0")


def _config_record(config: TrainConfig) -> dict[str, Any]:
    """The settings as they enter checkpoint keys and fingerprints.

    The default schedule is left out, so the keys of checkpoints written before it was a setting stay valid.
    """
    record = asdict(config)
    if record["schedule"] == LRSchedule.STEP.value:
        del record["schedule"]
    return record


@dataclass
class TrainResult:
    """What :func:`train_map` returns: the trained model (eval mode) and its record."""

    model: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    from_cache: bool = False
    wall_time_s: float = 0.0
    checkpoint: Path | None = None


def checkpoint_key(data_fingerprint: str, model_name: str, model_kwargs: dict[str, Any], config: TrainConfig) -> str:
    """A readable, unique file stem for (data, model, settings).

    ``data_fingerprint`` identifies the training data exactly (e.g.
    ``ImageSuite.fingerprint``); everything else that changes the result goes
    into the hash.
    """
    kwargs = json.loads(json.dumps(model_kwargs, default=str))
    digest = fingerprint_digest({"data": data_fingerprint, "model": model_name, "model_kwargs": kwargs,
                                 "config": _config_record(config), "format": CHECKPOINT_FORMAT})[:12]
    return f"{model_name}-e{config.epochs}-s{config.seed}-{digest}"


def default_checkpoint_dir() -> Path:
    """``$POSTHOC_CACHE/checkpoints`` if set, else ``~/.cache/posthoc/checkpoints``."""
    root = os.environ.get("POSTHOC_CACHE")
    return Path(root) / "checkpoints" if root else Path.home() / ".cache" / "posthoc" / "checkpoints"


def _tensors_of(dataset: Dataset) -> Iterable[torch.Tensor]:
    """Every tensor of ``dataset`` in a fixed order: a TensorDataset's tensors, else one ordered pass over it."""
    if isinstance(dataset, TensorDataset):
        yield from dataset.tensors
        return
    for batch in DataLoader(dataset, batch_size=1024, shuffle=False):
        items = [batch[k] for k in sorted(batch)] if isinstance(batch, dict) else batch
        yield from (t for t in items if isinstance(t, torch.Tensor))


def _fingerprint(model: nn.Module, dataset: Dataset, config: TrainConfig) -> dict[str, Any]:
    """What the trained weights depend on: the settings, the model's class and initial weights, all the data."""
    return {"format": CHECKPOINT_FORMAT, "config": _config_record(config), "model": type(model).__qualname__,
            "initial_weights": module_digest(model), "data": data_fingerprint(_tensors_of(dataset))}


def _check_batch_norm(model: nn.Module, n: int, config: TrainConfig) -> None:
    """Raise if some rank's part of a training batch would hold one example and the model has BatchNorm layers.

    In training mode BatchNorm cannot normalise one example: torch raises mid-training, or for a 2-d BatchNorm
    the statistics of one image are used. Raising, not skipping, is the default so no data are silently left out.
    """
    norms = [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if config.drop_last:
        if n < config.batch_size:
            raise ValueError(f"drop_last=True with batch_size={config.batch_size} leaves no batch of the {n} "
                             "training examples; lower batch_size")
        return
    if not norms:
        return
    world = collectives.world_size()
    last = n % config.batch_size
    for size in {min(n, config.batch_size), last} - {0}:
        parts = [(r + 1) * size // world - r * size // world for r in range(world)]
        if 1 in parts:
            where = "" if world == 1 else f" (one process's part of a batch of {size} split over {world})"
            raise ValueError(
                f"training batches of one example{where} would reach the BatchNorm layer(s) {norms[:3]}: the "
                f"{n} training examples in batches of {config.batch_size} leave a last batch of {last or size}. "
                "Pass TrainConfig(drop_last=True) to skip the incomplete last batch, or choose a batch_size that "
                "leaves more than one example")


def _check_dataset(dataset: Dataset, model: nn.Module, likelihood: Likelihood, config: TrainConfig) -> None:
    """Validate inputs/targets before training starts, and the batch sizes BatchNorm layers would see.

    Checks all of a TensorDataset, else one batch.
    """
    if not isinstance(dataset, Sized):
        raise TypeError(f"the training set must have a length (a map-style Dataset), got {type(dataset).__name__}")
    tensors = getattr(dataset, "tensors", None)
    if tensors is None:
        x, y = next(iter(DataLoader(dataset, batch_size=min(len(dataset), 256))))
    else:
        x, y = tensors[0], tensors[1]
    if len(dataset) == 0:
        raise ValueError("the training set is empty")
    _check_batch_norm(model, len(dataset), config)
    check_finite(x, "training inputs")
    with torch.no_grad(), eval_mode(model):  # a probe: BatchNorm's running statistics must not move
        out = model(x[:2])
    if out.ndim != 2:
        raise ValueError(f"the model must return (B, C) outputs, got shape {tuple(out.shape)}")
    if likelihood is Likelihood.CLASSIFICATION:
        check_labels(y, out.shape[-1], "training labels")
    else:
        check_finite(y, "training targets")
        if y.reshape(len(y), -1).shape[-1] != out.shape[-1]:
            raise ValueError(f"targets have {y.reshape(len(y), -1).shape[-1]} outputs, the model {out.shape[-1]}")


def _epoch_loader(dataset: Dataset, config: TrainConfig, epoch: int) -> DataLoader:
    # One generator per epoch, seeded from (seed, epoch): a resumed run sees the same batches.
    return make_loader(dataset, config.batch_size, shuffle=True, seed=config.seed * 1_000_003 + epoch,
                       drop_last=config.drop_last)


def load_map_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model ``state_dict`` of a finished MAP checkpoint written by :func:`train_map` (e.g. by ``posthoc train``).

    For ``model.load_state_dict``. Read with ``torch.load(weights_only=True)`` after its checksum is verified.

    Raises:
        ValueError: Naming the path, for a missing, damaged or other kind of file.
    """
    return read_checkpoint(path, FINAL).payload["model"]


def _load_on_main(path: Path, fingerprint: dict[str, Any], what: str) -> dict[str, Any] | None:
    """The checkpoint's payload (None if there is none), read on rank 0 and sent to every rank.

    Every rank raises the same ValueError for a damaged file or one of another computation.
    """
    state, error = None, None
    if collectives.is_main_process() and path.exists():
        try:
            state = load_checkpoint(path, fingerprint, what)
        except ValueError as err:
            error = str(err)
    state, error = collectives.broadcast_object((state, error), f"the {what} checkpoint")
    if error is not None:
        raise ValueError(error)
    return state


def train_map(
    model: nn.Module,
    train_set: Dataset,
    config: TrainConfig = TrainConfig(),
    checkpoint_dir: str | os.PathLike | None = None,
    key: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train ``model`` to its MAP estimate (in place) and return it in eval mode.

    Loss: mean cross-entropy (classification) or mean squared error
    (regression, i.e. the Gaussian NLL up to a constant at fixed noise); Adam
    with ``weight_decay`` as the prior's L2 term. Cost: ``epochs`` passes over
    ``train_set``. With ``checkpoint_dir`` and ``key`` the result is cached and
    every epoch is checkpointed (see the module docstring).

    Raises ValueError before training for bad data (NaN/Inf, labels out of
    range), a last batch of one example with BatchNorm layers (fix:
    ``TrainConfig(drop_last=True)``), or a checkpoint under ``key`` that is
    damaged or was written by another computation; PermissionError before
    training if ``checkpoint_dir`` is not writable.
    """
    likelihood = check_choice(config.likelihood, Likelihood, "likelihood")
    if (checkpoint_dir is None) != (key is None):
        raise ValueError("give both checkpoint_dir and key to checkpoint, or neither")
    final_path: Path | None = None
    partial_path: Path | None = None
    fingerprint: dict[str, Any] | None = None
    writer = collectives.is_main_process()
    if checkpoint_dir is not None:
        final_path = Path(checkpoint_dir) / f"{key}.pt"
        partial_path = Path(checkpoint_dir) / f"{key}.partial.pt"
        if writer:
            check_writable(checkpoint_dir, "MAP checkpoints")
        fingerprint = _fingerprint(model, train_set, config)
        state = _load_on_main(final_path, fingerprint, FINAL)
        if state is not None:
            model.load_state_dict(state["model"])
            log(f"reusing MAP checkpoint {final_path}")
            return TrainResult(model.eval(), state["history"], True, state["wall_time_s"], final_path)
    _check_dataset(train_set, model, likelihood, config)

    torch.manual_seed(config.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    per_step = check_choice(config.schedule, LRSchedule, "schedule") is LRSchedule.COSINE
    if per_step:
        total_steps = config.epochs * len(_epoch_loader(train_set, config, 0))
        scheduler: torch.optim.lr_scheduler.LRScheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=total_steps)
    else:
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=config.gamma)
    history: list[dict[str, float]] = []
    start_epoch, elapsed = 0, 0.0
    state = None
    if partial_path is not None and fingerprint is not None:
        state = _load_on_main(partial_path, fingerprint, PARTIAL)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        history, start_epoch, elapsed = state["history"], state["epoch"], state["wall_time_s"]
        log(f"resuming MAP training from epoch {start_epoch} ({partial_path})")
    collectives.check_same_on_all_ranks(nn.utils.parameters_to_vector(model.parameters()),
                                        "the initial model weights (seed every rank alike)")
    world = collectives.world_size()
    reduction = "mean" if world == 1 else "sum"

    loss_fn = nn.CrossEntropyLoss(reduction=reduction) if likelihood is Likelihood.CLASSIFICATION \
        else nn.MSELoss(reduction=reduction)
    t0 = time.perf_counter() - elapsed
    for epoch in range(start_epoch, config.epochs):
        model.train()
        total, count = 0.0, 0
        bar = tqdm(_epoch_loader(train_set, config, epoch), desc=f"MAP epoch {epoch + 1}/{config.epochs}",
                   disable=not progress, leave=False)
        for x, y in bar:
            batch = len(x)
            if world > 1:  # this rank's slice of the common minibatch
                part = collectives.rank_slice(batch)
                x, y = x[part], y[part]
            optimizer.zero_grad(set_to_none=True)
            out = model(x)
            target = y if likelihood is Likelihood.CLASSIFICATION else y.reshape(out.shape).to(out.dtype)
            loss = loss_fn(out, target)
            if world > 1:  # sum over the slice / global batch: the ranks' gradients add up to the batch mean
                loss = loss / (batch * (target[0].numel() if likelihood is Likelihood.REGRESSION else 1))
            if not torch.isfinite(loss.detach()):
                raise FloatingPointError(f"training loss became {loss.item()} at epoch {epoch + 1}; lower lr")
            loss.backward()
            collectives.sum_gradients(list(model.parameters()))
            optimizer.step()
            if per_step:
                scheduler.step()
            total += loss.item() * (batch if world > 1 else len(x))
            count += batch if world > 1 else len(x)
            bar.set_postfix(loss=f"{total / count:.4f}")
        if not per_step:
            scheduler.step()
        if world > 1:  # the epoch's loss: each rank summed its slices' shares of the batch means
            total = float(collectives.sum_over_ranks([torch.tensor([total], dtype=torch.float64)],
                                                     "the epoch's training loss")[0])
        history.append({"epoch": epoch + 1, "train_loss": total / count})
        if partial_path is not None and fingerprint is not None and writer:
            save_checkpoint(
                partial_path,
                {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state(),
                 "history": history, "epoch": epoch + 1, "wall_time_s": time.perf_counter() - t0},
                fingerprint, PARTIAL,
            )
        if progress:
            log(f"MAP epoch {epoch + 1}/{config.epochs}: train loss {total / count:.4f}")
    wall = time.perf_counter() - t0
    model.eval()
    if final_path is not None and partial_path is not None and fingerprint is not None and writer:
        save_checkpoint(final_path, {"model": model.state_dict(), "history": history, "wall_time_s": wall},
                        fingerprint, FINAL)
        partial_path.unlink(missing_ok=True)
    return TrainResult(model, history, False, wall, final_path)
