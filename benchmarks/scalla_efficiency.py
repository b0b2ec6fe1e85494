"""ScaLLA surrogate training efficiency on the FMNIST CNN: held-out kernel error vs JVP evaluations spent.

Curves, in one run, on the trained 40-epoch MAP CNN (see docs/benchmarks.md), context = MNIST train:
- reference: the authors' recipe (probes objective, 5 train + 5 context points, one Rademacher probe per step,
  Adam 5e-5 constant), evaluated at increasing JVP budgets up to --ref-budget evaluations (its full run is 1e7);
- defaults: the "directions" objective (100 fixed Rademacher directions, --target-points points, half FMNIST
  train and half MNIST, JVPs computed once = target-points x 100 evaluations, then --steps Adam steps of 64
  points, cosine decay), for each learning rate in --lrs (the targets are shared between the learning rates);
- probes+: the paper's objective with more probes and points per step (32 + 32 points, 4 probes, Adam 1e-3,
  cosine), up to the same budget as the reference.
Kernel error = ||J J^T - Phi^T Phi||_F / ||J J^T||_F over the (nC x nC) Gram of held-out points (FMNIST test and
KMNIST test, never used in training), with the exact J by reverse mode. Also: predict cost of the trained default
ScaLLA (network + surrogate forward + covariance) vs the MAP forward pass on the same batch of 500 images.

Run: .venv/bin/python benchmarks/scalla_efficiency.py [--data-dir DATA] [--checkpoint PATH]
(data: --data-dir or $POSTHOC_DATA, holding FashionMNIST/, MNIST/ and KMNIST/; MAP weights: --checkpoint or the
40-epoch FMNIST CNN of the training cache, written by `posthoc train`).
Results: benchmarks/results/scalla_efficiency.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import TensorDataset

from posthoc.bench.checkpoints import find_map_checkpoint
from posthoc.bench.report import run_meta, write_json
from posthoc.curvature.jacobians import per_example_jacobians
from posthoc.data.loaders import make_loader
from posthoc.data.paths import resolve_data_dir
from posthoc.data.suites import get_suite
from posthoc.likelihood import Likelihood
from posthoc.models.cnn import FMNISTCNN
from posthoc.models.training import load_map_weights
from posthoc.network.subset import ParameterSubset
from posthoc.scalla import ScaLLA
from posthoc.scalla.objectives import relative_kernel_error
from posthoc.scalla.surrogate import build_default_surrogate
from posthoc.scalla.training import REFERENCE_RECIPE, InputPool, SurrogateTrainer, TrainSettings
from posthoc.utils.io import atomic_write_text

RESULTS = Path(__file__).parent / "results"


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=None, help="folder holding FashionMNIST/, MNIST/ and KMNIST/ "
                   "(default: $POSTHOC_DATA)")
    p.add_argument("--checkpoint", default=None, help="MAP weights of the FMNIST CNN (default: the 40-epoch "
                   "checkpoint of the training cache, from `posthoc train`)")
    p.add_argument("--ref-budget", type=int, default=100_000)
    p.add_argument("--target-points", type=int, default=2000)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--lrs", default="1e-3,3e-3")
    p.add_argument("--held-out", type=int, default=32, help="points from each of FMNIST test and KMNIST test")
    p.add_argument("--skip-probes-plus", action="store_true")
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--directions", default="eigen", choices=["eigen", "rademacher"])
    p.add_argument("--eigen-subsample", type=int, default=200)
    p.add_argument("--merge-from", default=None,
                   help="a previous results JSON of this script whose curves are kept (marked with their date)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    try:  # fail now, before minutes of training, when the data or the weights are missing
        args.data_dir = str(resolve_data_dir(args.data_dir))
        args.checkpoint = str(find_map_checkpoint(args.checkpoint, ["fmnist_cnn-e40-*.pt"]))
    except (ValueError, FileNotFoundError) as exc:
        p.error(str(exc))
    return args


def curve_recorder(name: str, marks: list[int], points: list[dict[str, float]], error: Callable[[], float],
                   start_s: float, t_run: float) -> Callable[[int, int], None]:
    """A training callback that appends a learning-curve point to ``points`` at each step in ``marks``.

    ``start_s`` (the target computation's time) plus the time since ``t_run`` is the point's wall time.
    """
    def callback(step: int, evals: int) -> None:
        if marks and step >= marks[0]:
            marks.pop(0)
            points.append({"jvp_evaluations": evals, "step": step, "kernel_error": error(),
                           "wall_s": start_s + time.perf_counter() - t_run})
            print(f"{name}: step {step}, kernel error {points[-1]['kernel_error']:.4f}", flush=True)

    return callback


def main() -> None:
    args = parse()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    suite = get_suite("fmnist", data_dir=args.data_dir)
    model = FMNISTCNN()
    model.load_state_dict(load_map_weights(args.checkpoint))
    model.eval()
    subset = ParameterSubset(model, "all")
    held = torch.cat([suite.test.tensors[0][:args.held_out], suite.ood.tensors[0][:args.held_out]]).float()
    t0 = time.perf_counter()
    jac = per_example_jacobians(subset, held, chunk_size=8).detach()
    print(f"exact Jacobians of {len(held)} held-out points: {time.perf_counter() - t0:.1f}s", flush=True)
    train_pool = InputPool(make_loader(suite.train, 64, shuffle=False), "training", torch.float32, subset.device)
    context_pool = InputPool(make_loader(suite.context, 64, shuffle=False), "context", torch.float32, subset.device)
    example = held[:1]

    def new_surrogate(seed=0):
        return build_default_surrogate(model, example, 100, 10, init="model", seed=seed)

    def kernel_error(surrogate) -> float:
        surrogate.eval()
        with torch.no_grad():
            err = relative_kernel_error(surrogate(held), jac)
        surrogate.train()
        return err

    curves: dict[str, list[dict]] = {}

    def probes_curve(name: str, settings: TrainSettings, budget: int) -> None:
        surrogate = new_surrogate()
        steps = budget // (2 * settings.batch_size * settings.n_probes)
        spent = steps * 2 * settings.batch_size * settings.n_probes
        marks = sorted({b for b in (spent // 20, spent // 10, spent // 5, spent // 2, spent) if b > 0})
        points = [{"jvp_evaluations": 0, "step": 0, "kernel_error": kernel_error(surrogate), "wall_s": 0.0}]
        t_run = time.perf_counter()
        eval_time = [0.0]

        def callback(step: int, evals: int) -> None:
            if marks and evals >= marks[0]:
                marks.pop(0)
                te = time.perf_counter()
                points.append({"jvp_evaluations": evals, "step": step, "kernel_error": kernel_error(surrogate),
                               "wall_s": te - t_run - eval_time[0]})
                eval_time[0] += time.perf_counter() - te
                print(f"{name}: {evals} JVP evals, step {step}, kernel error {points[-1]['kernel_error']:.4f}, "
                      f"{points[-1]['wall_s']:.0f}s", flush=True)

        settings = TrainSettings(**{**settings.__dict__, "steps": steps})
        SurrogateTrainer(surrogate, subset, Likelihood.CLASSIFICATION, train_pool, context_pool, settings,
                         progress=False, callback=callback).run(100)
        curves[name] = points

    if not args.skip_reference:
        probes_curve("reference (probes, 5+5 points, 1 probe, Adam 5e-5)", REFERENCE_RECIPE, args.ref_budget)
    if not args.skip_probes_plus:
        probes_curve("probes+ (32+32 points, 4 probes, Adam 1e-3 cosine)",
                     TrainSettings(objective="probes", batch_size=32, n_probes=4, lr=1e-3, lr_schedule="cosine"),
                     args.ref_budget)

    shared_targets, shared_target_s = None, 0.0
    trained = {}
    for lr in [float(v) for v in args.lrs.split(",")]:
        kind = ("Rademacher" if args.directions == "rademacher"
                else f"top GGN eigvecs (Lanczos, {args.eigen_subsample} pts)")
        name = f"directions ({args.target_points} points x 100 {kind}, {args.steps} steps of 64, Adam {lr:g} cosine)"
        surrogate = new_surrogate()
        settings = TrainSettings(objective="directions", steps=args.steps, batch_size=64, lr=lr,
                                 n_target_points=args.target_points, directions=args.directions,
                                 eigen_subsample=args.eigen_subsample)
        trainer = SurrogateTrainer(surrogate, subset, Likelihood.CLASSIFICATION, train_pool, context_pool, settings,
                                   progress=False)
        t_run = time.perf_counter()
        target_s = 0.0
        if shared_targets is not None:
            trainer.targets, trainer.jvp_evaluations = shared_targets
            target_s = shared_target_s
        if shared_targets is None:
            tt = time.perf_counter()
            trainer.n_features = 100
            trainer._compute_targets()
            shared_target_s = time.perf_counter() - tt
            target_s = shared_target_s
            shared_targets = (trainer.targets, trainer.jvp_evaluations)
            print(f"targets: {trainer.jvp_evaluations} JVP evals in {shared_target_s:.0f}s", flush=True)
            t_run = time.perf_counter()
        points: list[dict[str, float]] = []
        marks = sorted({args.steps // 10, args.steps // 3, args.steps})
        trainer.callback = curve_recorder(name, marks, points, lambda s=surrogate: kernel_error(s),
                                          target_s, t_run)
        trainer.run(100)
        curves[name] = points
        trained[lr] = (surrogate, points[-1]["kernel_error"])

    # predict cost: the default ScaLLA (best lr above) vs the MAP forward, batch of 500
    best_lr = min(trained, key=lambda k: trained[k][1])
    scalla = ScaLLA(model, "classification", progress=False)
    scalla.surrogate, scalla.n_outputs, scalla.input_shape = trained[best_lr][0].eval(), 10, (1, 28, 28)
    scalla.fit_posterior(make_loader(TensorDataset(suite.train.tensors[0][:5000], suite.train.tensors[1][:5000]),
                                     500, shuffle=False))
    batch = suite.test.tensors[0][:500].float()

    def timed(fn, repeats=7):
        fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    with torch.no_grad():
        t_map = timed(lambda: model(batch))
    t_scalla = timed(lambda: scalla.predict(batch))
    ratio = t_scalla / t_map
    print(f"predict on 500 images: MAP {t_map * 1e3:.1f} ms, ScaLLA {t_scalla * 1e3:.1f} ms, ratio {ratio:.2f}")

    merged_note = ""
    if args.merge_from:
        old = json.loads(Path(args.merge_from).read_text())
        for name, points in old["curves"].items():
            if name not in curves:
                curves[f"{name} [run of {old['date']}]"] = points
        merged_note = f"Rows marked [run of ...] come from the earlier run of this script on {old['date']}. "
    run = run_meta()
    record = {
        "date": run["date"],
        "machine": {**run["machine"], "torch_threads": args.threads,
                    "note": "2 cores shared with other jobs; wall times are noisy"},
        "python": run["versions"]["python"], "torch": run["versions"]["torch"], "run": run,
        "model": args.checkpoint, "held_out": f"{args.held_out} FMNIST test + {args.held_out} KMNIST test",
        "curves": curves, "best_directions_lr": best_lr,
        "predict_ms": {"map": t_map * 1e3, "scalla": t_scalla * 1e3, "ratio": ratio, "batch": 500},
        "total_wall_s": time.perf_counter() - t_start,
    }
    write_json(RESULTS / "scalla_efficiency.json", record)
    lines = ["# ScaLLA surrogate training: held-out kernel error vs JVP evaluations (FMNIST CNN)", "",
             f"{record['date']}, {record['machine']['platform']}, {record['machine']['cpu_count']} CPUs "
             f"(shared), torch {record['torch']}, {args.threads} thread(s). Held-out: {record['held_out']}. "
             "Reference recipe total: 1e7 JVP evaluations; target for the defaults: <= 5e5. " + merged_note, "",
             "| run | JVP evaluations | steps | kernel error | wall s |", "|---|---|---|---|---|"]
    for name, points in curves.items():
        for pt in points:
            lines.append(f"| {name} | {pt['jvp_evaluations']:,} | {pt['step']:,} | {pt['kernel_error']:.4f} | "
                         f"{pt['wall_s']:.0f} |")
    lines += ["", f"Predict on a batch of 500 (median of 7): MAP forward {t_map * 1e3:.1f} ms, ScaLLA predict "
              f"{t_scalla * 1e3:.1f} ms: ratio {ratio:.2f}.", ""]
    atomic_write_text(RESULTS / "scalla_efficiency.md", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
