"""Fiber sampling vs Laplace (KFAC, marginal-likelihood prior and noise) on UCI regression.

    .venv/bin/python benchmarks/fiber_uci.py [--datasets bostonHousing concrete yacht] [--splits 3]

MLP d-50-1 ReLU trained on the standardised training split (Adam 1e-3, batch 32, weight decay 1e-4,
epochs so that about 6,000 steps are taken); the same MAP is used by both methods. Test NLL and RMSE in
the original units (mean and standard error over splits). Writes benchmarks/results/fiber_uci.{md,json}.

Laplace: all weights, KFAC, prior precision and noise by 100 steps of marginal-likelihood ascent, glm
predictive plus noise. Fiber: all weights, prior precision delta = 0.1 P / ||theta*||^2 (the toy rule, see
benchmarks/fiber_toy.py), noise = the MAP's training residual RMS, 8 particles x 200 steps (burn-in 100, thin 5:
160 walked samples), step size 0.03 / delta (shrunk only during burn-in, see posthoc.fiber.walk), the NLL check on
all training points (with fewer points than parameters a subsample leaves the other outputs free), tolerance
0.05 nats per example, coupling flow with the loss-aware term, 200 MC samples, mixture predictive with noise.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from posthoc import Laplace
from posthoc.bench.report import run_meta, write_json
from posthoc.bench.uci import fiber_uci_sampler, original_units, train_uci_map
from posthoc.bench.uci import mean_se as uci_mean_se
from posthoc.data.paths import resolve_data_dir
from posthoc.data.uci import load_uci
from posthoc.utils.io import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"


def run_split(name: str, index: int, data_dir: str | None = None) -> dict:
    split = load_uci(name, index, data_dir=data_dir)
    n = split.x_train.shape[0]
    model, map_train_s = train_uci_map(split, index)
    loader = DataLoader(TensorDataset(split.x_train, split.y_train), batch_size=256, shuffle=False)
    row = {"dataset": name, "split": index, "n_train": n, "map_train_s": map_train_s}

    t0 = time.perf_counter()
    la = Laplace(model, "regression", subset_of_weights="all", hessian_structure="kron", progress=False)
    la.fit(loader)
    la.optimize_prior_precision(method="marglik", n_steps=100)
    row["la_fit_s"] = time.perf_counter() - t0
    with torch.no_grad():
        row["la_nll"], row["la_rmse"] = original_units(la.predict(split.x_test).with_noise(la.sigma_noise), split)
    row["la_prior_precision"], row["la_sigma"] = float(la.prior_precision.mean()), float(la.sigma_noise)

    t0 = time.perf_counter()
    fs = fiber_uci_sampler(model, n, index)
    prior = float(fs.prior_precision)
    fs.fit(loader)
    row["fiber_fit_s"] = time.perf_counter() - t0
    pred = fs.predict(split.x_test, n_samples=200).with_noise(fs.sigma_noise)
    row["fiber_nll"], row["fiber_rmse"] = original_units(pred, split)
    row["fiber_sigma"], row["fiber_prior_precision"] = float(fs.sigma_noise), prior
    row.update({f"fiber_{k}": v for k, v in fs.bench_info().items() if k in (
        "stage1_within_tol", "stage2_within_tol", "step_size_final", "explained_variance", "eta_delta_kept_steps",
        "particle_norm_ratio")})
    with torch.no_grad():
        map_pred = model(split.x_test)
    row["map_rmse"] = float(((map_pred - split.y_test) ** 2).mean().sqrt()) * float(split.y_std)
    return row


def mean_se(values: list[float]) -> str:
    mean, se = uci_mean_se(values)
    return f"{mean:.3f} ± {se:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["bostonHousing", "concrete", "yacht"])
    parser.add_argument("--splits", type=int, default=3)
    parser.add_argument("--data-dir", default=None, help="folder holding UCI/ (default: $POSTHOC_DATA)")
    args = parser.parse_args()
    try:
        args.data_dir = str(resolve_data_dir(args.data_dir))
    except ValueError as exc:
        parser.error(str(exc))
    torch.set_num_threads(1)  # small networks: one thread avoids contention on the shared machine
    rows = []
    for name in args.datasets:
        for index in range(args.splits):
            row = run_split(name, index, args.data_dir)
            rows.append(row)
            print(json.dumps(row), flush=True)
    meta = run_meta()
    write_json(RESULTS / "fiber_uci.json", {"meta": meta, "rows": rows})
    lines = ["# Fiber sampling vs LA kron (marglik) on UCI regression", "", __doc__.split("\n\n", 2)[2].strip(), "",
             f"Splits 0..{args.splits - 1} of each data set; mean ± standard error over splits; original units.", "",
             "| dataset | LA kron NLL | fiber NLL | LA kron RMSE | fiber RMSE | MAP RMSE | stage-2 within tol | "
             "fit s LA / fiber | delta LA / fiber | eta delta x kept steps |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name in args.datasets:
        rs = [r for r in rows if r["dataset"] == name]
        lines.append(
            f"| {name} | {mean_se([r['la_nll'] for r in rs])} | {mean_se([r['fiber_nll'] for r in rs])} | "
            f"{mean_se([r['la_rmse'] for r in rs])} | {mean_se([r['fiber_rmse'] for r in rs])} | "
            f"{mean_se([r['map_rmse'] for r in rs])} | {mean_se([r['fiber_stage2_within_tol'] for r in rs])} | "
            f"{sum(r['la_fit_s'] for r in rs) / len(rs):.1f} / {sum(r['fiber_fit_s'] for r in rs) / len(rs):.1f} | "
            f"{sum(r['la_prior_precision'] for r in rs) / len(rs):.2f} / "
            f"{sum(r['fiber_prior_precision'] for r in rs) / len(rs):.2f} | "
            f"{sum(r['fiber_eta_delta_kept_steps'] for r in rs) / len(rs):.4f} |")
    lines += ["", f"Date {meta['date']}; machine {json.dumps(meta['machine'])}; versions {json.dumps(meta['versions'])}"]
    atomic_write_text(RESULTS / "fiber_uci.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
