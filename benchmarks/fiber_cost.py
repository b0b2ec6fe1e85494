"""Cost of fiber sampling: stage-2 vs stage-1 samples per second, and fit time vs LA kron.

    .venv/bin/python benchmarks/fiber_cost.py [--cases gap_mlp fmnist_lastlayer fmnist_all]

Stage 1 throughput: walked samples kept / walk wall time (the walk's cost per kept sample is
thin * (one projected Langevin step + pull-back) / n_particles). Stage 2 throughput: parameter vectors
from ``FiberSampler.sample(n)`` per second (n = 1,000; one flow evaluation and one (r x P) product
each). Fit time: ``FiberSampler.fit`` (walk + final check + flow + stage-2 check) vs ``Laplace`` KFAC fit
plus 100 marginal-likelihood steps, same model, same data. gap_mlp: the settings of benchmarks/fiber_toy.py.
FMNIST cases use the embedded suite's 4,000 training images, the MAP checkpoint ``--checkpoint`` (default: the
15-epoch FMNIST CNN of the training cache, from ``posthoc train``) and the bench settings of
posthoc.bench.fiber_methods. Writes benchmarks/results/fiber_cost.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from posthoc import Laplace
from posthoc.bench.checkpoints import find_map_checkpoint
from posthoc.bench.fiber_methods import fiber_settings, map_scaled_prior
from posthoc.bench.report import run_meta, write_json
from posthoc.data import get_suite
from posthoc.data.loaders import make_loader
from posthoc.data.toy import gap_regression
from posthoc.fiber import FiberSampler
from posthoc.models import MLP, build_model
from posthoc.models.training import load_map_weights
from posthoc.network.subset import ParameterSubset
from posthoc.utils.io import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"
FMNIST_CHECKPOINTS = ("fmnist_cnn-e15-*.pt",)  # globs in the training cache, when no --checkpoint is given


def gap_case(checkpoint: str | None = None):  # noqa: ARG001 - a toy MLP trained here
    torch.manual_seed(0)
    x, y = gap_regression(n=160, noise=0.1, seed=0)
    model = MLP(1, (50, 50), 1, "tanh", flatten=False)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(3000):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    model = model.eval()
    theta = ParameterSubset(model, "all").theta_map
    prior = map_scaled_prior(theta)  # the toy rule of benchmarks/fiber_toy.py
    settings = dict(n_particles=16, steps=400, burn_in=200, thin=10, step_size=0.03 / prior, deform="flow", latent_dim=16,
                    batch_size=32, subsample_size=160, cg_steps=10, pullback_steps=5, n_check=64,
                    prior_precision=prior, loss_tolerance=0.05)
    return model.eval(), "regression", "all", DataLoader(TensorDataset(x, y), batch_size=40), settings


def fmnist_case(subset: str, checkpoint: str | None = None):
    suite = get_suite("fmnist-embedded")
    model = build_model("fmnist_cnn")
    model.load_state_dict(load_map_weights(find_map_checkpoint(checkpoint, FMNIST_CHECKPOINTS)))
    loader = make_loader(suite.train, 64, shuffle=True, seed=0)
    model.eval()
    return model, "classification", subset, loader, fiber_settings(model, subset)


CASES = {"gap_mlp": gap_case, "fmnist_lastlayer": lambda checkpoint: fmnist_case("last_layer", checkpoint),
         "fmnist_all": lambda checkpoint: fmnist_case("all", checkpoint)}


def measure(name: str, checkpoint: str | None = None) -> dict:
    model, likelihood, subset, loader, settings = CASES[name](checkpoint)
    t0 = time.perf_counter()
    fs = FiberSampler(model, likelihood, subset_of_weights=subset, progress=False, **settings).fit(loader)
    fiber_fit = time.perf_counter() - t0
    info = fs.bench_info()
    stage1_rate = info["n_walked"] / info["walk_s"]
    fs.sample(10)  # warm-up
    t0 = time.perf_counter()
    n = 1000
    fs.sample(n, seed=1)
    stage2_rate = n / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    la = Laplace(model, likelihood, subset_of_weights=subset, hessian_structure="kron", progress=False)
    la.fit(loader)
    la.optimize_prior_precision(method="marglik", n_steps=100)
    la_fit = time.perf_counter() - t0
    return {"case": name, "subset": subset, "P": fs.n_params, "stage1_samples_per_s": stage1_rate,
            "stage2_samples_per_s": stage2_rate, "speedup": stage2_rate / stage1_rate, "fiber_fit_s": fiber_fit,
            "walk_s": info["walk_s"], "deform_s": info["deform_s"], "la_kron_fit_s": la_fit,
            "fit_ratio": fiber_fit / la_fit, "stage2_within_tol": info.get("stage2_within_tol"),
            "settings": {k: v for k, v in settings.items() if k != "prior_precision"},
            "prior_precision": settings["prior_precision"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--checkpoint", default=None, help="MAP weights of the FMNIST CNN (default: the cached "
                        "15-epoch checkpoint of the training cache; an error names the fix when there is none)")
    args = parser.parse_args()
    if any(name.startswith("fmnist") for name in args.cases):  # fail now, not after the toy case's minutes
        try:
            args.checkpoint = str(find_map_checkpoint(args.checkpoint, FMNIST_CHECKPOINTS))
        except FileNotFoundError as exc:
            parser.error(str(exc))
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.cases:
        row = measure(name, args.checkpoint)
        rows.append(row)
        print(json.dumps(row), flush=True)
    meta = run_meta()
    write_json(RESULTS / "fiber_cost.json", {"meta": meta, "rows": rows})
    lines = ["# Fiber sampling cost", "", __doc__.split("\n\n", 2)[1].strip(), "",
             "| case | P | stage-1 samples/s | stage-2 samples/s | stage 2 / stage 1 | fiber fit s | LA kron fit s | "
             "fiber / LA fit | stage-2 within tol |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['P']} | {r['stage1_samples_per_s']:.2f} | {r['stage2_samples_per_s']:.0f} | "
                     f"{r['speedup']:.0f}x | {r['fiber_fit_s']:.1f} | {r['la_kron_fit_s']:.1f} | {r['fit_ratio']:.1f} | "
                     f"{r['stage2_within_tol']} |")
    lines += ["", f"Threads {args.threads}. Date {meta['date']}; machine {json.dumps(meta['machine'])}; "
              f"versions {json.dumps(meta['versions'])}"]
    atomic_write_text(RESULTS / "fiber_cost.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
