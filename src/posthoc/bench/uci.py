"""UCI regression benchmark pieces: the MAP recipe, original-unit metrics, per-cell result cache, mean ± SE.

Shared by benchmarks/uci_regression.py (the full protocol, all methods) and benchmarks/fiber_uci.py.
The cache keeps one small JSON per (dataset, split, method) and the MAP weights per (dataset, split)
under a run directory, so an interrupted run resumes where it stopped:

    <run_dir>/<dataset>/split_<i>/map_weights.pt
    <run_dir>/<dataset>/split_<i>/<method>.json
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn
from torch.utils.data import TensorDataset

from posthoc.bench.fiber_methods import map_scaled_prior
from posthoc.data.uci import UCISplit
from posthoc.fiber import FiberSampler
from posthoc.models import MLP
from posthoc.models.training import TrainConfig, train_map
from posthoc.predictive.base import Predictive
from posthoc.utils.checks import check_positive_int
from posthoc.utils.io import atomic_save_torch, atomic_write_text

__all__ = ["HIDDEN", "MAP_STEPS", "UCICellCache", "fiber_uci_sampler", "map_config", "mean_se", "original_units", "residual_sigma",
           "summarise", "train_uci_map", "uci_mlp"]

HIDDEN = 50  # the protocol's single hidden layer of 50 ReLU units
MAP_STEPS = 6000  # about this many Adam steps of batch 32 (at least 20 epochs)


def uci_mlp(n_features: int) -> nn.Module:
    """The protocol's network, an MLP ``n_features``-50-1 with ReLU (``(B, D) -> (B, 1)``)."""
    return MLP(n_features, (HIDDEN,), 1, "relu", flatten=False)


def map_config(n_train: int, seed: int) -> TrainConfig:
    """MAP recipe: Adam 1e-3, batch 32, weight decay 1e-4, ``max(20, ceil(6000 / batches per epoch))`` epochs."""
    check_positive_int(n_train, "n_train", "the number of training points")
    epochs = max(20, math.ceil(MAP_STEPS / math.ceil(n_train / 32)))
    return TrainConfig(epochs=epochs, batch_size=32, lr=1e-3, gamma=1.0, weight_decay=1e-4, seed=seed,
                       likelihood="regression")


def train_uci_map(split: UCISplit, seed: int) -> tuple[nn.Module, float]:
    """Train the d-50-1 MLP on the standardised training split; returns (model in eval mode, wall seconds).

    Cost: about ``max(6000, 20 epochs)`` Adam steps of 32 points.
    """
    torch.manual_seed(seed)
    model = uci_mlp(split.n_features)
    result = train_map(model, TensorDataset(split.x_train, split.y_train), map_config(split.x_train.shape[0], seed),
                       progress=False, log=lambda _: None)
    return result.model.eval(), float(result.wall_time_s)


@torch.no_grad()
def residual_sigma(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """The MAP's noise: root mean squared training residual ``sqrt(mean((f(x) - y)^2))`` (standardised units)."""
    return float(((model(x) - y) ** 2).mean().sqrt())


def original_units(pred: Predictive, split: UCISplit) -> tuple[float, float]:
    """(test NLL, test RMSE) in original units from a predictive of standardised y (noise included).

    The NLL is the mean over test points of ``-log p(y)``; mapping y to original units multiplies
    densities by ``1 / y_std``, so it shifts by ``+log(y_std)``. The RMSE is that of the predictive mean
    times ``y_std``.
    """
    nll = -float(pred.log_prob(split.y_test).mean()) + math.log(float(split.y_std))
    rmse = float(((pred.mean - split.y_test) ** 2).mean().sqrt()) * float(split.y_std)
    return nll, rmse


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error ``std(ddof=1) / sqrt(n)`` of ``values``; the error is NaN for one value.

    Raises:
        ValueError: no values.
    """
    if len(values) == 0:
        raise ValueError("mean_se needs at least one value")
    t = torch.tensor(list(values), dtype=torch.float64)
    se = float(t.std() / math.sqrt(len(values))) if len(values) > 1 else float("nan")
    return float(t.mean()), se


def mean_se_or_none(values: Sequence[float]) -> tuple[float, float | None]:
    """:func:`mean_se` with the error None (JSON null) instead of NaN for one value."""
    mean, se = mean_se(values)
    return mean, None if math.isnan(se) else se


class UCICellCache:
    """One JSON result per (dataset, split, method) and the MAP weights per (dataset, split), under ``run_dir``.

    Writes are atomic (a killed run leaves either the old file or the new one), so a rerun skips every
    finished cell. Results are flat JSON dicts.
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)

    def split_dir(self, dataset: str, split: int) -> Path:
        """The folder of one (dataset, split)."""
        return self.run_dir / dataset / f"split_{int(split)}"

    def result_path(self, dataset: str, split: int, method: str) -> Path:
        """The JSON file of one cell."""
        return self.split_dir(dataset, split) / f"{method}.json"

    def has(self, dataset: str, split: int, method: str) -> bool:
        """Whether the cell is finished."""
        return self.result_path(dataset, split, method).is_file()

    def load(self, dataset: str, split: int, method: str) -> dict[str, Any]:
        """The stored result of one cell.

        Raises:
            FileNotFoundError: the cell has not been run.
            ValueError: the file is not a JSON object (delete it to rerun the cell).
        """
        path = self.result_path(dataset, split, method)
        row = json.loads(path.read_text())
        if not isinstance(row, dict):
            raise ValueError(f"{path} does not hold a JSON object; delete it to rerun the cell")
        return row

    def save(self, dataset: str, split: int, method: str, row: dict[str, Any]) -> Path:
        """Store one cell's result (atomically)."""
        path = self.result_path(dataset, split, method)
        path.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write_text(path, json.dumps(row, sort_keys=True) + "\n")

    def run(self, dataset: str, split: int, method: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """The cell's stored result, else ``compute()``, stored and returned (with dataset, split and method)."""
        if self.has(dataset, split, method):
            return self.load(dataset, split, method)
        row = {"dataset": dataset, "split": int(split), "method": method, **compute()}
        self.save(dataset, split, method, row)
        return row

    def import_rows(self, rows: Iterable[dict[str, Any]]) -> int:
        """Store every row (a cell's result with dataset, split and method) whose cell is not in the cache yet.

        This lets a fresh machine resume from a results file written earlier instead of rerunning its cells.
        Returns the number of cells imported.
        """
        imported = 0
        for row in rows:
            dataset, split, method = row["dataset"], int(row["split"]), row["method"]
            if not self.has(dataset, split, method):
                self.save(dataset, split, method, row)
                imported += 1
        return imported

    def map_model(self, split: UCISplit, seed: int | None = None) -> tuple[nn.Module, dict[str, Any]]:
        """The split's MAP network: loaded from the cache, else trained (seed: the split index) and stored.

        Returns (model in eval mode, info) where info holds ``map_train_s`` (0 when loaded) and ``n_train``.
        """
        path = self.split_dir(split.name, split.split) / "map_weights.pt"
        model = uci_mlp(split.n_features)
        if path.is_file():
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return model.eval(), {"map_train_s": 0.0, "n_train": int(split.x_train.shape[0])}
        model, seconds = train_uci_map(split, split.split if seed is None else seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_torch(model.state_dict(), path)
        return model, {"map_train_s": seconds, "n_train": int(split.x_train.shape[0])}

    def rows(self, datasets: Sequence[str], methods: Sequence[str]) -> list[dict[str, Any]]:
        """Every finished cell of ``datasets`` x ``methods``, any split, in dataset, method, split order."""
        out = []
        for dataset in datasets:
            for method in methods:
                paths = sorted(self.run_dir.glob(f"{dataset}/split_*/{method}.json"),
                               key=lambda p: int(p.parent.name.split("_")[1]))
                out += [self.load(dataset, int(p.parent.name.split("_")[1]), method) for p in paths]
        return out


def fiber_uci_sampler(model: nn.Module, n_train: int, seed: int, deform: str = "flow") -> FiberSampler:
    """benchmarks/fiber_uci.py's FiberSampler for a UCI MLP (unfitted; call ``fit`` on the training loader).

    All weights; prior precision delta = 0.1 P / ||theta*||^2 (posthoc.bench.fiber_methods.map_scaled_prior);
    noise: the MAP's training residual RMS (the sampler's default); 8 particles x 200 steps (burn-in 100,
    thin 5), step size 0.03 / delta, the loss check on all ``n_train`` training points, tolerance 0.05
    nats per example. Stage 2: ``deform="flow"`` (the UCI runs' setting since they began, kept so that their
    cells stay comparable): a coupling flow (latent 8, 200 steps); ``"pullback"``: the library's default map
    (posthoc.fiber.pullback, its default step scale). Cost: 25-50 s per split on one CPU thread for the small
    sets (benchmarks/results/fiber_uci.md), growing with ``n_train``.
    """
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    prior = map_scaled_prior(theta)
    if deform == "flow":
        stage2: dict[str, Any] = dict(deform="flow", latent_dim=8, flow_steps=200)
    elif deform == "pullback":
        stage2 = dict(deform="pullback")
    else:
        raise ValueError(f"deform must be 'flow' or 'pullback', got {deform!r}")
    return FiberSampler(model, "regression", n_particles=8, steps=200, burn_in=100, thin=5, step_size=0.03 / prior,
                        loss_tolerance=0.05, subset_of_weights="all", prior_precision=prior, batch_size=32,
                        subsample_size=n_train, cg_steps=8, n_check=32, progress=False, seed=seed, **stage2)


def summarise(rows: Sequence[dict[str, Any]], datasets: Sequence[str], methods: Sequence[str]) -> list[dict[str, Any]]:
    """Per (dataset, method) with at least one cell: ``n_splits`` done and NLL, RMSE mean and standard error.

    ``rows``: cell results with keys dataset, method, nll, rmse. Returns dicts with keys dataset, method,
    n_splits, nll, nll_se, rmse, rmse_se (the errors NaN for a single split), in datasets x methods order.
    """
    out = []
    for dataset in datasets:
        for method in methods:
            cell = [r for r in rows if r["dataset"] == dataset and r["method"] == method]
            if cell:
                (nll, nll_se), (rmse, rmse_se) = mean_se([r["nll"] for r in cell]), mean_se([r["rmse"] for r in cell])
                out.append({"dataset": dataset, "method": method, "n_splits": len(cell), "nll": nll, "nll_se": nll_se,
                            "rmse": rmse, "rmse_se": rmse_se,
                            "fit_s": sum(float(r.get("fit_s", 0.0)) for r in cell) / len(cell)})
    return out
