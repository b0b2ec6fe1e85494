"""MAP training with checkpoints keyed by data, model and settings.

A finished run is saved as ``<checkpoint_dir>/<key>.pt`` and reused when the
same data, model and settings come again. While training, the full state
(model, optimizer, scheduler, RNG) is written atomically after every epoch to
``<key>.partial.pt``, so an interrupted run resumes from its last finished
epoch with the same result as an uninterrupted one.

Under torch.distributed (e.g. ``torchrun``) every rank draws the same seeded
minibatch and trains on its slice of it; the gradients are summed over ranks
with the loss normalised by the global batch size, so each step is the
single-process step on the whole minibatch (up to summation order; BatchNorm's
training statistics are per rank). Rank 0 reads and writes the checkpoints and
sends their contents to the other ranks.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from posthoc.data.loaders import make_loader
from posthoc.distributed import collectives
from posthoc.likelihood import Likelihood
from posthoc.utils.checks import check_choice, check_finite, check_labels
from posthoc.utils.io import atomic_save_torch

CHECKPOINT_FORMAT = 1


@dataclass(frozen=True)
class TrainConfig:
    """MAP training settings (defaults: the FMNIST reference schedule of METHODS.md §6).

    Adam(lr, weight_decay), StepLR(step 1 epoch, gamma), ``epochs`` epochs of
    shuffled minibatches of ``batch_size``, seeded by ``seed``.
    """

    epochs: int = 40
    batch_size: int = 64
    lr: float = 1e-3
    gamma: float = 0.7
    weight_decay: float = 0.0
    seed: int = 0
    likelihood: str = Likelihood.CLASSIFICATION.value

    def __post_init__(self) -> None:
        check_choice(self.likelihood, Likelihood, "likelihood")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs} and {self.batch_size}")
        if not self.lr > 0 or not 0 < self.gamma <= 1 or self.weight_decay < 0:
            raise ValueError("need lr > 0, 0 < gamma <= 1 and weight_decay >= 0")


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
    payload = json.dumps(
        {"data": data_fingerprint, "model": model_name, "model_kwargs": model_kwargs, "config": asdict(config),
         "format": CHECKPOINT_FORMAT},
        sort_keys=True,
        default=str,
    )
    digest = hashlib.sha1(payload.encode()).hexdigest()[:12]
    return f"{model_name}-e{config.epochs}-s{config.seed}-{digest}"


def default_checkpoint_dir() -> Path:
    """``$POSTHOC_CACHE/checkpoints`` if set, else ``~/.cache/posthoc/checkpoints``."""
    root = os.environ.get("POSTHOC_CACHE")
    return Path(root) / "checkpoints" if root else Path.home() / ".cache" / "posthoc" / "checkpoints"


def _check_dataset(dataset: Dataset, model: nn.Module, likelihood: Likelihood) -> None:
    """Validate inputs/targets before training starts (all of a TensorDataset, else one batch)."""
    tensors = getattr(dataset, "tensors", None)
    if tensors is None:
        x, y = next(iter(DataLoader(dataset, batch_size=min(len(dataset), 256))))
    else:
        x, y = tensors[0], tensors[1]
    if len(dataset) == 0:
        raise ValueError("the training set is empty")
    check_finite(x, "training inputs")
    with torch.no_grad():
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
    return make_loader(dataset, config.batch_size, shuffle=True, seed=config.seed * 1_000_003 + epoch)


def _load_if_exists(path: Path) -> dict[str, Any] | None:
    return torch.load(path, map_location="cpu", weights_only=False) if path.exists() else None


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
    """
    likelihood = check_choice(config.likelihood, Likelihood, "likelihood")
    if (checkpoint_dir is None) != (key is None):
        raise ValueError("give both checkpoint_dir and key to checkpoint, or neither")
    final_path = partial_path = None
    writer = collectives.is_main_process()
    if checkpoint_dir is not None:
        final_path = Path(checkpoint_dir) / f"{key}.pt"
        partial_path = Path(checkpoint_dir) / f"{key}.partial.pt"
        state = collectives.broadcast_object(_load_if_exists(final_path) if writer else None, "the MAP checkpoint")
        if state is not None:
            model.load_state_dict(state["model"])
            log(f"reusing MAP checkpoint {final_path}")
            return TrainResult(model.eval(), state["history"], True, state["wall_time_s"], final_path)
    _check_dataset(train_set, model, likelihood)

    torch.manual_seed(config.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=config.gamma)
    history: list[dict[str, float]] = []
    start_epoch, elapsed = 0, 0.0
    state = None
    if partial_path is not None:
        state = collectives.broadcast_object(_load_if_exists(partial_path) if writer else None,
                                             "the partial MAP checkpoint")
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
            total += loss.item() * (batch if world > 1 else len(x))
            count += batch if world > 1 else len(x)
            bar.set_postfix(loss=f"{total / count:.4f}")
        scheduler.step()
        if world > 1:  # the epoch's loss: each rank summed its slices' shares of the batch means
            total = float(collectives.sum_over_ranks([torch.tensor([total], dtype=torch.float64)],
                                                     "the epoch's training loss")[0])
        history.append({"epoch": epoch + 1, "train_loss": total / count})
        if partial_path is not None and writer:
            atomic_save_torch(
                {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state(),
                 "history": history, "epoch": epoch + 1, "wall_time_s": time.perf_counter() - t0},
                partial_path,
            )
        if progress:
            log(f"MAP epoch {epoch + 1}/{config.epochs}: train loss {total / count:.4f}")
    wall = time.perf_counter() - t0
    model.eval()
    if final_path is not None and partial_path is not None and writer:
        atomic_save_torch(
            {"model": model.state_dict(), "history": history, "wall_time_s": wall, "config": asdict(config)},
            final_path,
        )
        partial_path.unlink(missing_ok=True)
    return TrainResult(model, history, False, wall, final_path)
