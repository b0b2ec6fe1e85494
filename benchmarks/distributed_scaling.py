"""Data-parallel fitting on this machine: 1 process vs 2 gloo processes, wall time and result difference.

Cases (each in fresh processes, started with torch.multiprocessing spawn on 127.0.0.1):
- ``kron``: Laplace kron fit (all weights, exact GGN) of the FMNIST CNN on the first ``--n-train``
  training images (full FMNIST under ``--data-dir`` or $POSTHOC_DATA, else the embedded suite), then marglik
  tuning.
  Difference: max relative difference of the KFAC eigenvalues, and of log p(D) at delta = 1.
- ``scalla_probes``: ScaLLA surrogate training, the paper's pairwise objective, ``--scalla-steps`` steps of
  ``--scalla-batch`` training + as many context points (each step split over the ranks, features all-gathered).
- ``scalla_directions``: the regression objective with ``--scalla-targets`` target points along 100 Rademacher
  directions (target JVPs split over the ranks), then ``--scalla-steps`` steps.
  Difference (both): max relative difference of the surrogate parameters and of the m x m posterior precision.

Both configurations get the same total threads (``--threads``, default 2): 1 process x 2 threads and
2 processes x 1 thread. Writes benchmarks/results/distributed_scaling.{md,json} with the machine and versions.

    .venv/bin/python benchmarks/distributed_scaling.py [--cases kron,scalla_probes,scalla_directions] [--n-train 10000]
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

RESULTS = Path(__file__).resolve().parent / "results"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def load_model_and_data(args: argparse.Namespace):
    from posthoc.data.suites import get_suite
    from posthoc.models import build_model
    from posthoc.models.training import load_map_weights

    model = build_model("fmnist_cnn")
    model.load_state_dict(load_map_weights(args.checkpoint))
    try:
        suite = get_suite("fmnist", data_dir=args.data_dir)
    except (FileNotFoundError, ValueError):  # no data folder given, or the full files are missing there
        suite = get_suite("fmnist-embedded")
    x, y = suite.train.tensors
    n = min(args.n_train, len(y))
    return model.eval(), torch.utils.data.TensorDataset(x[:n], y[:n]), suite


def kron_case(args, out: dict) -> None:
    from posthoc import Laplace
    from posthoc.data.loaders import make_loader, shard

    model, train, _ = load_model_and_data(args)
    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron", progress=False)
    loader = make_loader(shard(train), 128, shuffle=False)
    if dist.is_initialized():
        dist.barrier()
    t0 = time.perf_counter()
    la.fit(loader)
    out["fit_s"] = time.perf_counter() - t0
    out["n_data"] = la.n_data
    out["eigenvalues"] = torch.cat([blk.eigenvalues.reshape(-1) for blk in la.structure.blocks])
    out["marglik"] = float(la.log_marginal_likelihood(prior_precision=1.0))
    t0 = time.perf_counter()
    la.optimize_prior_precision(method="marglik", n_steps=100)
    out["tune_s"] = time.perf_counter() - t0
    out["prior_precision"] = float(la.prior_precision)


def scalla_case(args, out: dict, objective: str) -> None:
    from posthoc import ScaLLA
    from posthoc.data.loaders import make_loader

    model, train, suite = load_model_and_data(args)
    # every rank gets the same loaders and seed; ScaLLA splits each step (and the posterior pass) over the ranks
    s = ScaLLA(model, "classification", objective=objective, directions="rademacher", batch_size=args.scalla_batch,
               n_target_points=args.scalla_targets, steps=args.scalla_steps, lr=1e-4, seed=0, progress=False)
    loader = make_loader(train, 256, shuffle=False)
    context = make_loader(suite.context, 256, shuffle=False)
    if dist.is_initialized():
        dist.barrier()
    t0 = time.perf_counter()
    s.fit(loader, context_loader=context)
    out["fit_s"] = time.perf_counter() - t0
    out["jvp_evaluations"] = s.train_record["jvp_evaluations"]
    out["surrogate"] = torch.nn.utils.parameters_to_vector(s.surrogate.parameters()).detach()
    out["precision"] = s.posterior.precision.clone()


CASES = {"kron": kron_case,
         "scalla_probes": lambda args, out: scalla_case(args, out, "probes"),
         "scalla_directions": lambda args, out: scalla_case(args, out, "directions")}


def worker(rank: int, world: int, port: int, case: str, threads: int, args: argparse.Namespace, out_dir: str) -> None:
    torch.set_num_threads(threads)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=900))
    out: dict = {}
    try:
        CASES[case](args, out)
        if rank == 0:
            torch.save(out, Path(out_dir) / f"{case}-{world}.pt")
    finally:
        if world > 1:
            dist.destroy_process_group()


def run(case: str, world: int, threads: int, args: argparse.Namespace, out_dir: str) -> dict:
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, world, port, case, threads, args, out_dir)) for r in range(world)]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    wall = time.perf_counter() - t0
    if any(p.exitcode != 0 for p in procs):
        raise RuntimeError(f"{case} on {world} processes failed: exit codes {[p.exitcode for p in procs]}")
    result = torch.load(Path(out_dir) / f"{case}-{world}.pt", weights_only=True)
    result["process_wall_s"] = wall
    return result


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="kron,scalla_probes,scalla_directions")
    parser.add_argument("--data-dir", default=None, help="folder holding FashionMNIST/ (default: $POSTHOC_DATA; "
                        "without either, the embedded suite)")
    parser.add_argument("--checkpoint", default=None, help="MAP checkpoint of the FMNIST CNN (a posthoc train "
                        "result; default: the training cache's 40-epoch one, else any FMNIST CNN there)")
    parser.add_argument("--n-train", type=int, default=10_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scalla-steps", type=int, default=200)
    parser.add_argument("--scalla-batch", type=int, default=8)
    parser.add_argument("--scalla-targets", type=int, default=400)
    args = parser.parse_args()
    from posthoc.bench.checkpoints import find_map_checkpoint

    try:
        args.checkpoint = str(find_map_checkpoint(args.checkpoint, ["fmnist_cnn-e40-*.pt", "fmnist_cnn-*.pt"]))
    except FileNotFoundError as exc:
        parser.error(str(exc))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in [c.strip() for c in args.cases.split(",") if c.strip()]:
            one = run(case, 1, args.threads, args, tmp)
            two = run(case, 2, max(1, args.threads // 2), args, tmp)
            if case == "kron":
                diff = {"eigenvalues": rel(two["eigenvalues"], one["eigenvalues"]),
                        "marglik": abs(two["marglik"] - one["marglik"]) / abs(one["marglik"]),
                        "prior_precision": abs(two["prior_precision"] - one["prior_precision"]) / one["prior_precision"]}
            else:
                diff = {"surrogate_parameters": rel(two["surrogate"], one["surrogate"]),
                        "posterior_precision": rel(two["precision"], one["precision"])}
            row = {"case": case, "fit_s_1": one["fit_s"], "fit_s_2": two["fit_s"],
                   "speedup": one["fit_s"] / two["fit_s"], "process_wall_s_1": one["process_wall_s"],
                   "process_wall_s_2": two["process_wall_s"], "difference": diff}
            rows.append(row)
            print(json.dumps(row), flush=True)
    from posthoc.bench.report import run_meta, write_json

    run_info = run_meta()
    meta = {"created": run_info["date"], "machine": run_info["machine"], "versions": run_info["versions"],
            "git_commit": run_info["git_commit"], "args": vars(args)}
    lines = ["# Data-parallel fitting: 1 vs 2 gloo processes on this machine", "",
             f"{args.threads} threads in total in both configurations; N = {args.n_train} training images; "
             f"ScaLLA: {args.scalla_steps} steps; probes: {args.scalla_batch} train + {args.scalla_batch} context points a step; "
             f"directions: {args.scalla_targets} target points x 100 Rademacher directions, batches of "
             f"{args.scalla_batch}; both fit the posterior on the N training images.", "",
             "| case | 1 process (s) | 2 processes (s) | speedup | result difference (max relative) |",
             "|---|---|---|---|---|"]
    for r in rows:
        diff = ", ".join(f"{k} {v:.2e}" for k, v in r["difference"].items())
        lines.append(f"| {r['case']} | {r['fit_s_1']:.1f} | {r['fit_s_2']:.1f} | {r['speedup']:.2f}x | {diff} |")
    lines += ["", f"Machine: {json.dumps(meta['machine'])}; versions: {json.dumps(meta['versions'])}; {meta['created']}",
              ""]
    from posthoc.utils.io import atomic_write_text

    atomic_write_text(RESULTS / "distributed_scaling.md", "\n".join(lines))
    write_json(RESULTS / "distributed_scaling.json", {**meta, "rows": rows})
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
