"""Streamlined prediction against MC and glm predictives of one all-weights diagonal Laplace, MNIST MLP 784-128-64-10.

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/streamlined_mnist_mlp.py --data-dir DIR \
        [--seeds 0 1 2] [--epochs 10] [--mc-samples 100] [--run-dir runs/streamlined_mnist]

The setting of the Streamlining paper's MNIST MLP experiment: an MLP 784-128-64-10 with ReLU (posthoc.models.MLP),
MAP by Adam (``--epochs`` epochs of 128, lr 1e-3, no weight decay) on the 60,000 MNIST training images, an
all-weights diagonal Laplace (GGN) with a scalar prior precision by marginal likelihood. Four predictives of that
ONE posterior, evaluated on the MNIST test set (in-distribution) and on the Fashion-MNIST and KMNIST test sets (OOD):

- ``streamlined_diag`` / ``streamlined_full``: posthoc.Streamlined with diagonal / full activation covariance;
- ``mc``: the sampled predictive, f(x; theta_s) for ``--mc-samples`` weight samples, softmax averaged ("nn");
- ``glm``: the linearised predictive J Sigma J^T;
- ``map`` for reference.

Gaussian predictives use the probit link (the paper's). Metrics: accuracy, NLL, ECE (15 bins), Brier, OOD AUROC
of the predictive entropy and of the variance score 1/2 log det Sigma(x) (the logit covariance; for ``mc`` the
samples' covariance; undefined for the MAP), per OOD set and averaged, and time per input: wall time of
predict + probabilities over the MNIST test set divided by its size, and the fastest of a few timed calls on one
chunk of it (single thread; the machine is shared with other jobs, so times are indicative). Every MAP and every finished (seed, method) result is cached under
``--run-dir``, so a rerun only computes what is missing. Writes benchmarks/results/streamlined_mnist_mlp.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, TensorDataset

from posthoc.bench.report import recorded_path, run_meta, write_json
from posthoc.data.vision import load_images
from posthoc.laplace import Laplace
from posthoc.metrics import accuracy, auroc, brier, ece, entropy, half_logdet, nll
from posthoc.models import MLP
from posthoc.models.training import TrainConfig, train_map
from posthoc.predictive import Predictive
from posthoc.streamlined import Streamlined
from posthoc.utils.io import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DEFAULT_RUN_DIR = REPO / "runs" / "streamlined_mnist"
HIDDEN = (128, 64)
OOD_SETS = ("FashionMNIST", "KMNIST")
METHODS = ("map", "streamlined_diag", "streamlined_full", "mc", "glm")
METRICS = ("accuracy", "nll", "ece", "brier", "auroc_entropy", "auroc_variance", "time_per_input_ms",
           "time_per_input_best_ms")
PREDICT_CHUNK = 1000  # inputs per predict call (bounds the memory of the glm Jacobians and of the MC samples)
TIMING_REPEATS = 3  # timed calls of one chunk per method (best_time_per_input)
VARIANCE_JITTER = 1e-12  # added to the logit covariance's diagonal before its Cholesky (variance score only)

Predict = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


def build_model(seed: int) -> MLP:
    """The MLP 784-128-64-10 with ReLU, initialised from ``seed`` (109,386 parameters)."""
    torch.manual_seed(seed)
    return MLP(784, HIDDEN, 10, "relu")


def train_mlp(train: TensorDataset, seed: int, epochs: int, run_dir: Path, progress: bool = False) -> MLP:
    """The MAP MLP of ``seed``, trained on ``train`` or loaded from ``run_dir`` (train_map's cache and resume).

    Cost: ``epochs`` passes over ``train`` the first time, one file read afterwards.
    """
    config = TrainConfig(epochs=epochs, batch_size=128, lr=1e-3, gamma=1.0, seed=seed)
    model = build_model(seed)
    key = f"mnist_mlp{'-'.join(map(str, HIDDEN))}-n{len(train)}-e{epochs}-s{seed}"
    return train_map(model, train, config, checkpoint_dir=run_dir, key=key, progress=progress,
                     log=lambda _: None).model


def fit_laplace(model: MLP, train: TensorDataset, progress: bool = False) -> Laplace:
    """All-weights diagonal GGN Laplace, scalar prior precision by marginal likelihood. Cost: one pass over ``train``."""
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="diag", progress=progress)
    la.fit(DataLoader(train, batch_size=256))
    la.optimize_prior_precision(method="marglik")
    return la


def gaussian_outputs(predictive: Predictive) -> tuple[torch.Tensor, torch.Tensor]:
    """(probit probabilities (B, C), logit covariance (B, C, C) or variances (B, C)) of a Gaussian predictive."""
    return predictive.probs("probit"), predictive.cov if predictive.has_full_cov else predictive.var


def predictors(model: MLP, la: Laplace, mc_samples: int, seed: int) -> dict[str, Predict]:
    """Each method as a function of inputs (B, 1, 28, 28) -> (probabilities (B, C), logit covariance or None)."""
    diag = Streamlined(model, posterior=la)
    full = Streamlined(model, posterior=la, activation_covariance="full")

    def map_(x: torch.Tensor) -> tuple[torch.Tensor, None]:
        with torch.no_grad():
            return torch.softmax(model.eval()(x), dim=-1), None

    def mc(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        predictive = la.predict(x, pred_type="nn", n_samples=mc_samples, seed=seed)
        # the samples' covariance has rank <= S - 1: singular (no variance score) unless S > C
        return predictive.probs("mc"), predictive.cov if mc_samples > predictive.n_outputs else None

    return {"map": map_, "streamlined_diag": lambda x: gaussian_outputs(diag.predict(x)),
            "streamlined_full": lambda x: gaussian_outputs(full.predict(x)), "mc": mc,
            "glm": lambda x: gaussian_outputs(la.predict(x, pred_type="glm"))}


def run_chunks(predict: Predict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """``predict`` over ``x`` in chunks of PREDICT_CHUNK: (probabilities, covariances or None, wall seconds)."""
    probs, covs = [], []
    start = time.perf_counter()
    for begin in range(0, len(x), PREDICT_CHUNK):
        p, c = predict(x[begin:begin + PREDICT_CHUNK])
        probs.append(p.detach())
        if c is not None:
            covs.append(c.detach())
    seconds = time.perf_counter() - start
    return torch.cat(probs), (torch.cat(covs) if covs else None), seconds


def best_time_per_input(predict: Predict, x: torch.Tensor, repeats: int = TIMING_REPEATS) -> float:
    """Milliseconds per input: the fastest of ``repeats`` calls of ``predict`` on the first PREDICT_CHUNK inputs.

    One untimed call first (tracing, allocation). The minimum is the figure least disturbed by other jobs on a
    shared machine. Cost: ``repeats + 1`` calls.
    """
    chunk = x[:PREDICT_CHUNK]
    predict(chunk)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        predict(chunk)
        best = min(best, time.perf_counter() - start)
    return 1e3 * best / len(chunk)


def variance_score(cov: torch.Tensor | None) -> torch.Tensor | None:
    """1/2 log det of the logit covariance per input (N,), or None without one."""
    return None if cov is None else half_logdet(cov.double(), jitter=VARIANCE_JITTER)


def method_metrics(probs_in: torch.Tensor, y_in: torch.Tensor, cov_in: torch.Tensor | None,
                   ood: dict[str, tuple[torch.Tensor, torch.Tensor | None]]) -> dict[str, Any]:
    """In-distribution metrics and OOD AUROCs (entropy, variance score), per OOD set and averaged over them.

    Args:
        probs_in: (N, C) probabilities on the in-distribution test set.
        y_in: (N,) labels.
        cov_in: (N, C, C) logit covariances or (N, C) variances, or None (no variance score).
        ood: per OOD set, its (M, C) probabilities and covariances (or None).

    Returns:
        accuracy, nll, ece (15 bins), brier, auroc_entropy and auroc_variance (None without covariances, means over
        the OOD sets) and ``per_ood_set`` {name: {auroc_entropy, auroc_variance}}. Cost: O((N + M) C^3).
    """
    row: dict[str, Any] = {"accuracy": accuracy(probs_in, y_in), "nll": nll(probs_in, y_in),
                           "ece": ece(probs_in, y_in), "brier": brier(probs_in, y_in), "per_ood_set": {}}
    score_in = variance_score(cov_in)
    for name, (probs_out, cov_out) in ood.items():
        score_out = variance_score(cov_out)
        row["per_ood_set"][name] = {
            "auroc_entropy": auroc(entropy(probs_in), entropy(probs_out)),
            "auroc_variance": None if score_in is None or score_out is None else auroc(score_in, score_out)}
    for key in ("auroc_entropy", "auroc_variance"):
        values = [v[key] for v in row["per_ood_set"].values()]
        row[key] = None if any(v is None for v in values) else sum(values) / len(values)
    return row


def run_seed(seed: int, data: dict[str, TensorDataset], epochs: int, mc_samples: int, run_dir: Path,
             methods: tuple[str, ...] = METHODS, progress: bool = False) -> dict[str, dict[str, Any]]:
    """Every method's metrics for one seed, each read from ``run_dir`` if cached, else computed and cached.

    ``data``: "train", "test" and the OOD sets, TensorDatasets of (N, 1, 28, 28) images and labels. A cached
    result counts only if it was made with the same epochs and sample count. Cost: the MAP training and the
    Laplace fit (each only when some method is missing), then each missing method's predictions on all test sets.
    """
    results: dict[str, dict[str, Any]] = {}
    missing, untimed = [], []
    for method in methods:
        path = run_dir / f"result-s{seed}-{method}.json"
        cached = json.loads(path.read_text()) if path.is_file() else None
        if cached is not None and cached.get("settings") == {"epochs": epochs, "mc_samples": mc_samples}:
            results[method] = cached
            if cached.get("time_per_input_best_ms") is None:
                untimed.append(method)
        else:
            missing.append(method)
    if not missing and not untimed:
        return results
    model = train_mlp(data["train"], seed, epochs, run_dir, progress)
    la = fit_laplace(model, data["train"], progress)
    predict = predictors(model, la, mc_samples, seed)
    x_in, y_in = data["test"].tensors
    for method in missing:
        probs_in, cov_in, seconds = run_chunks(predict[method], x_in)
        ood = {name: run_chunks(predict[method], data[name].tensors[0])[:2] for name in OOD_SETS}
        row = method_metrics(probs_in, y_in, cov_in, ood)
        row.update(method=method, seed=seed, time_per_input_ms=1e3 * seconds / len(x_in),
                   prior_precision=float(la.prior_precision.reshape(-1)[0]),
                   settings={"epochs": epochs, "mc_samples": mc_samples})
        results[method] = row
    for method in missing + untimed:
        results[method]["time_per_input_best_ms"] = best_time_per_input(predict[method], x_in)
        write_json(run_dir / f"result-s{seed}-{method}.json", results[method])
    return results


def summarise(per_seed: list[dict[str, dict[str, Any]]], methods: tuple[str, ...] = METHODS) -> list[dict[str, Any]]:
    """One row per method: mean and standard error over seeds of every metric (``<metric>_se``), and n_seeds.

    A metric that is None for a method (the MAP's variance score) stays None; the standard error of one seed is
    None.
    """
    rows = []
    for method in methods:
        runs = [seed_results[method] for seed_results in per_seed if method in seed_results]
        row: dict[str, Any] = {"method": method, "n_seeds": len(runs), "seeds": [r["seed"] for r in runs]}
        keys = [*METRICS] + [f"{k}_{name}" for name in OOD_SETS for k in ("auroc_entropy", "auroc_variance")]
        for key in keys:
            kind, _, ood_name = key.rpartition("_") if key.endswith(OOD_SETS) else (key, "", "")
            values = [r["per_ood_set"][ood_name][kind] if ood_name else r.get(key) for r in runs]
            numbers = [float(v) for v in values if v is not None]
            if not numbers or len(numbers) < len(values):
                row[key], row[f"{key}_se"] = None, None
                continue
            row[key] = statistics.fmean(numbers)
            row[f"{key}_se"] = statistics.stdev(numbers) / math.sqrt(len(numbers)) if len(numbers) > 1 else None
        row["prior_precision"] = [r["prior_precision"] for r in runs]
        rows.append(row)
    return rows


def _cell(row: dict[str, Any], key: str, digits: int) -> str:
    value, se = row.get(key), row.get(f"{key}_se")
    if value is None:
        return "—"
    return f"{value:.{digits}f}" + ("" if se is None else f" ± {se:.{digits}f}")


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The results table (mean ± standard error over seeds) with the settings and the machine."""
    header = ("| method | n_seeds | ACC | NLL | ECE | Brier | AUROC entropy (FMNIST / KMNIST / mean) | "
              "AUROC variance (FMNIST / KMNIST / mean) | ms per input (whole pass / best chunk) |")
    lines = [f"# Streamlined vs MC and glm: MNIST MLP 784-{'-'.join(map(str, HIDDEN))}-10, all-weights diagonal LA",
             "", header, "|" + "---|" * 9]
    for row in rows:
        entropy_cells = " / ".join(_cell(row, k, 3) for k in ("auroc_entropy_FashionMNIST", "auroc_entropy_KMNIST",
                                                                "auroc_entropy"))
        variance_cells = " / ".join(_cell(row, k, 3) for k in ("auroc_variance_FashionMNIST", "auroc_variance_KMNIST",
                                                                 "auroc_variance"))
        lines.append(f"| {row['method']} | {row['n_seeds']} | {_cell(row, 'accuracy', 4)} | {_cell(row, 'nll', 4)} | "
                     f"{_cell(row, 'ece', 4)} | {_cell(row, 'brier', 4)} | {entropy_cells} | {variance_cells} | "
                     f"{_cell(row, 'time_per_input_ms', 3)} / {_cell(row, 'time_per_input_best_ms', 3)} |")
    settings = meta["settings"]
    lines += ["", f"MAP: Adam lr 1e-3, batch 128, {settings['epochs']} epochs on {settings['n_train']:,} MNIST training images. "
              "Posterior: all weights, diagonal GGN, scalar prior precision by marginal likelihood "
              f"(per seed: {', '.join(f'{p:.3g}' for p in rows[0]['prior_precision'])}). "
              f"mc: {settings['mc_samples']} weight samples, softmax averaged; Gaussian rows: probit link. ECE: 15 bins. "
              "Variance score: 1/2 log det of the logit covariance (mc: the samples' covariance, defined for more samples than classes). Time per input: "
              f"predict + probabilities over the {settings['n_test']:,} MNIST test images in chunks "
              f"of {PREDICT_CHUNK}, one thread; best chunk: the fastest of {TIMING_REPEATS} timed calls on one chunk after a warm-up call. The "
              "machine was shared with other jobs: times are indicative.",
              f"Seeds asked: {settings['seeds']}; mean ± standard error over the seeds done (n_seeds).",
              "", f"Machine: {json.dumps(meta['machine'])}; versions: {json.dumps(meta['versions'])}; "
              f"{meta['date']}; commit {meta['git_commit']}.", ""]
    return "\n".join(lines)


def load_data(data_dir: str | None, limit: int | None) -> dict[str, TensorDataset]:
    """MNIST train and test, Fashion-MNIST and KMNIST test (each cut to its first ``limit`` images if given)."""
    sets = {"train": load_images("MNIST", "train", data_dir), "test": load_images("MNIST", "test", data_dir)}
    sets.update({name: load_images(name, "test", data_dir) for name in OOD_SETS})
    return {name: TensorDataset(*(t[:limit] for t in pair)) for name, pair in sets.items()}


def main(argv: list[str] | None = None) -> None:
    """Run the seeds (skipping what is cached) and write the results json and markdown."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None, help="root of MNIST/FashionMNIST/KMNIST; default $POSTHOC_DATA")
    parser.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR, help="cache of MAPs and results")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the results files")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--mc-samples", type=int, default=100)
    parser.add_argument("--limit", type=int, default=None, help="use only the first N images of each set (smoke runs)")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)
    data = load_data(args.data_dir, args.limit)
    args.run_dir.mkdir(parents=True, exist_ok=True)
    per_seed = []
    for seed in args.seeds:
        per_seed.append(run_seed(seed, data, args.epochs, args.mc_samples, args.run_dir, progress=args.progress))
        rows = summarise(per_seed)
        meta = {**run_meta(), "settings": {"seeds": args.seeds, "epochs": args.epochs, "mc_samples": args.mc_samples,
                                            "limit": args.limit, "n_train": len(data["train"]),
                                            "n_test": len(data["test"]), "hidden": list(HIDDEN), "predict_chunk": PREDICT_CHUNK,
                                            "run_dir": recorded_path(args.run_dir, "<run-dir>")},
                "note": "machine shared with other jobs: times are indicative"}
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(args.out / "streamlined_mnist_mlp.json", {"meta": meta, "rows": rows})
        atomic_write_text(args.out / "streamlined_mnist_mlp.md", markdown(rows, meta))
        print(markdown(rows, meta), flush=True)


if __name__ == "__main__":
    main()
