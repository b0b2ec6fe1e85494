#!/usr/bin/env python
"""Peak memory of ScaLLA.fit with its default "eigen" directions, before and after the dual Lanczos (issue 15).

Before: Lanczos (ARPACK) on the parameters, whose float64 basis holds about 2h + 1 P-vectors, and the h = 100
eigenvectors kept as a (h, P) tensor. After: Lanczos on the Gram matrix of the eigen subsample (n_sub K, with
K = C - 1 factor columns), eigenvectors rebuilt a chunk of 8 at a time (posthoc.curvature.ggn_operator).

Each (code version, model) runs in a fresh child process (``--child``), so its peak resident set size
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) is the fit's alone. The child records the RSS before ``fit`` and the
peak after each phase: the eigen directions (Lanczos; the "before" code also holds the eigenvectors), the targets
(the JVPs along every direction), and the whole fit (surrogate steps and the posterior pass). Extra memory is
reported in float32 P-vectors (4 P bytes). The "before" code is the ``--before-commit`` tree's ``src`` (exported
by ``git archive`` under the run dir and put first on PYTHONPATH); "after" is this checkout's.

Models: MLPs 784 -> w1 -> w2 -> 10 (float32, random init, seeded) at two sizes, P ~ 1.1 M and 2.1 M; data: 4,000
generated Gaussian inputs with the model's own argmax labels (memory does not depend on the values). ScaLLA runs
at its defaults (m = 100 eigen directions from Lanczos on 200 training points, tol 1e-2, the default surrogate)
except ``steps`` and ``n_target_points`` (default 20 and 200 here, to spare the CPU): the steps allocate nothing
that grows with them, and the targets take n_target_points * m * C floats (2000 * 100 * 10 * 4 B = 8 MB at the
defaults). The children also save the target kernels sum_k phi_k(x) phi_k(x')^T, whose before/after relative
difference shows that the two paths find the same directions (up to sign and the Lanczos tolerance).

Results are cached per (version, model) under the run dir (default runs/scalla_memory), so a rerun skips finished
children. Writes benchmarks/results/scalla_memory.{json,md}. Usage:
    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/scalla_memory.py [--before-commit adfe1a8] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any
from unittest.mock import patch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MODELS = {"mlp-1.1M": (1024, 256), "mlp-2.1M": (2048, 256)}  # hidden widths w1, w2 of 784 -> w1 -> w2 -> 10
N_TRAIN, N_CLASSES, N_INPUTS = 4000, 10, 784


def rss_mb() -> float:
    """The current resident set size in MB (from /proc/self/status)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_mb() -> float:
    """The process's peak resident set size so far in MB (Linux reports ru_maxrss in kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(model_name: str, steps: int, n_target_points: int, eigen_subsample: int, out: Path) -> None:
    """Fit ScaLLA once on ``model_name`` and write its memory record (and target kernel) to ``out``.json/.pt."""
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    import posthoc
    from posthoc.scalla import ScaLLA
    from posthoc.scalla.training import SurrogateTrainer

    torch.set_num_threads(1)
    w1, w2 = MODELS[model_name]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(N_INPUTS, w1), nn.ReLU(), nn.Linear(w1, w2), nn.ReLU(), nn.Linear(w2, N_CLASSES))
    x = torch.randn(N_TRAIN, N_INPUTS, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(-1)
    loader = DataLoader(TensorDataset(x, y), batch_size=256)
    n_params = sum(p.numel() for p in model.parameters())
    phases: dict[str, float] = {}
    captured: dict[str, Any] = {}
    original_directions, original_targets = SurrogateTrainer._directions, SurrogateTrainer._compute_targets

    def directions(self, n_dirs):
        result = original_directions(self, n_dirs)
        phases["after_eigen_directions"] = peak_mb()
        return result

    def targets(self):
        original_targets(self)
        phases["after_targets"] = peak_mb()
        captured["targets"] = self.targets["values"].detach().clone()

    scalla = ScaLLA(model, "classification", steps=steps, n_target_points=n_target_points,
                    eigen_subsample=eigen_subsample, progress=False)
    baseline = rss_mb()
    phases["before_fit"] = peak_mb()
    start = time.perf_counter()
    with patch.object(SurrogateTrainer, "_directions", directions), \
            patch.object(SurrogateTrainer, "_compute_targets", targets):
        scalla.fit(loader)
    wall = time.perf_counter() - start
    phases["after_fit"] = peak_mb()
    p_vector_mb = 4 * n_params / 2**20
    flat = captured["targets"].permute(0, 2, 1).reshape(-1, captured["targets"].shape[1]).double()
    torch.save({"target_kernel": flat @ flat.T}, out.parent / f"{out.name}.pt")
    record = {"model": model_name, "P": n_params, "posthoc_version": posthoc.__version__,
              "rss_before_fit_mb": round(baseline, 1), "peak_mb": {k: round(v, 1) for k, v in phases.items()},
              "fit_extra_peak_mb": round(phases["after_fit"] - baseline, 1),
              "fit_extra_peak_p_vectors": round((phases["after_fit"] - baseline) / p_vector_mb, 1),
              "lanczos_extra_peak_p_vectors": round((phases["after_eigen_directions"] - baseline) / p_vector_mb, 1),
              "fit_wall_s": round(wall, 1), "jvp_evaluations": scalla.train_record["jvp_evaluations"],
              "steps": steps, "n_target_points": n_target_points, "eigen_subsample": eigen_subsample}
    (out.parent / f"{out.name}.json").write_text(json.dumps(record, indent=2))


def source_tree(commit: str, run_dir: Path) -> Path:
    """``src`` of ``commit``, exported once by ``git archive`` under ``run_dir``."""
    target = run_dir / f"src-{commit}"
    if not (target / "src" / "posthoc").is_dir():
        target.mkdir(parents=True, exist_ok=True)
        archive = target / "src.tar"
        subprocess.run(["git", "archive", "-o", str(archive), commit, "src"], cwd=ROOT, check=True)
        with tarfile.open(archive) as tar:
            tar.extractall(target, filter="data")
        archive.unlink()
    return target / "src"


def settings_tag(args: argparse.Namespace) -> str:
    """The settings part of a cached record's name."""
    tag = f"steps{args.steps}-targets{args.n_target_points}"
    return tag if args.eigen_subsample == 200 else f"{tag}-sub{args.eigen_subsample}"


def run_child(version: str, src: Path, model: str, args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    """The cached record of (version, model), running the child first if it is missing."""
    out = run_dir / f"{version}-{model}-{settings_tag(args)}"
    if not (out.parent / f"{out.name}.json").exists():
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(src))
        subprocess.run([sys.executable, __file__, "--child", model, "--steps", str(args.steps), "--n-target-points",
                        str(args.n_target_points), "--eigen-subsample", str(args.eigen_subsample), "--out", str(out)],
                       env=env, check=True)
    record = json.loads((out.parent / f"{out.name}.json").read_text())
    record["version"] = version
    return record


def kernel_difference(run_dir: Path, stem: str) -> float:
    """||K_after - K_before|| / ||K_before|| for the target kernels of the runs "before-<stem>" and "after-<stem>"."""
    import torch

    k_before = torch.load(run_dir / f"before-{stem}.pt")["target_kernel"]
    k_after = torch.load(run_dir / f"after-{stem}.pt")["target_kernel"]
    return float((k_after - k_before).norm() / k_before.norm())


def finished_rows(run_dir: Path) -> list[dict[str, Any]]:
    """Every cached (before, after) pair in ``run_dir``, the after row with the pair's kernel difference."""
    rows = []
    for after in sorted(run_dir.glob("after-*.json"), key=lambda path: json.loads(path.read_text())["P"]):
        stem = after.stem.removeprefix("after-")
        before = run_dir / f"before-{stem}.json"
        if not before.exists():
            continue
        pair = [json.loads(before.read_text()) | {"version": "before"}, json.loads(after.read_text()) | {"version": "after"}]
        pair[1]["kernel_diff"] = round(kernel_difference(run_dir, stem), 6)
        rows += pair
    return rows


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any], before_commit: str) -> str:
    """The results table with its settings."""
    lines = ["# ScaLLA.fit peak memory: Lanczos on the parameters (before) vs the dual Lanczos (after)", "",
             f"Run {meta['date']} on {meta['machine']}; versions {meta['versions']}; after = commit "
             f"{meta['git_commit']} (this checkout), before = commit {before_commit}. Command: `{meta['command']}`.",
             "",
             "ScaLLA defaults (m = 100 eigen directions, Lanczos at tol 1e-2, the default surrogate) except the "
             "columns steps, targets (n_target_points) and n_sub (eigen_subsample, default 200), cut to spare the "
             "shared CPU: neither path's P-sized memory depends on them (the before path's basis is (P, 201) float64 "
             "whatever n_sub; the after path's is (9 n_sub, 201)). MLP 784 -> w1 -> w2 -> 10, float32, random "
             "init, 4,000 generated inputs. Peak RSS from getrusage in a fresh process per row; 'extra' = peak "
             "minus the RSS before fit, also in float32 P-vectors (4 P bytes). Kernel diff: relative Frobenius "
             "difference of the target kernels sum_k phi_k phi_k^T of the two versions (same points).", "",
             "| model | P | n_sub | steps | targets | version | RSS before fit (MB) | peak after Lanczos (MB) | "
             "peak after targets (MB) | peak of fit (MB) | fit extra (MB) | fit extra (P-vectors) | fit wall (s) | "
             "JVP evaluations | kernel diff |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        peak = r["peak_mb"]
        lines.append(f"| {r['model']} | {r['P']:,} | {r.get('eigen_subsample', 200)} | {r['steps']} | "
                     f"{r['n_target_points']} | {r['version']} | {r['rss_before_fit_mb']} | "
                     f"{peak['after_eigen_directions']} | {peak['after_targets']} | {peak['after_fit']} | "
                     f"{r['fit_extra_peak_mb']} | {r['fit_extra_peak_p_vectors']} | {r['fit_wall_s']} | "
                     f"{r['jvp_evaluations']:,} | {r.get('kernel_diff', '')} |")
    lines += ["", "Each pair reruns with `OMP_NUM_THREADS=1 python benchmarks/scalla_memory.py --models <model> --steps "
              "<steps> --n-target-points <targets> --eigen-subsample <n_sub>`. Wall times are on a machine shared "
              "with other jobs (load varied): compare them within a pair only roughly.", "",
              "Quality: `benchmarks/scalla_defaults.py --variants defaults --seeds 0,1 --name scalla_memory_quality` "
              "reruns ScaLLA's variance agreement with the exact LLA on the small tasks with the dual path "
              "(scalla_memory_quality.md), to compare with the rows 'defaults' of scalla_defaults.md (Lanczos on the "
              "parameters).", "", *scaling(rows)]
    return "\n".join(lines) + "\n"


def scaling(rows: list[dict[str, Any]]) -> list[str]:
    """Per version, the least-squares line fit extra (MB) = a + b * (one float32 P-vector in MB) over the rows."""
    lines = ["## How the fit's extra peak scales with P", "",
             "A line through each version's rows (whose n_sub and targets may differ: neither changes the P-sized "
             "memory); the intercept is memory that does not grow with P (libraries loaded on first use, the "
             "subsample and target inputs).", ""]
    for version in ("before", "after"):
        points = [(4 * r["P"] / 2**20, r["fit_extra_peak_mb"]) for r in rows if r["version"] == version]
        if len({size for size, _ in points}) < 2:
            continue
        mean_size = sum(size for size, _ in points) / len(points)
        mean_extra = sum(extra for _, extra in points) / len(points)
        slope = (sum((size - mean_size) * (extra - mean_extra) for size, extra in points)
                 / sum((size - mean_size) ** 2 for size, _ in points))
        lines.append(f"- {version}: {mean_extra - slope * mean_size:.0f} MB + {slope:.1f} float32 P-vectors "
                     f"(from {len(points)} rows)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--before-commit", default="adfe1a8", help="the commit whose src is 'before'")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {list(MODELS)}")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--n-target-points", type=int, default=200)
    parser.add_argument("--eigen-subsample", type=int, default=200, help="ScaLLA's eigen_subsample (its default 200)")
    parser.add_argument("--run-dir", default=str(ROOT / "runs" / "scalla_memory"))
    parser.add_argument("--name", default="scalla_memory")
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.steps, args.n_target_points, args.eigen_subsample, Path(args.out))
        return
    from posthoc.bench.report import run_meta, write_json

    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    sources = {"before": source_tree(args.before_commit, run_dir), "after": ROOT / "src"}
    for model in filter(None, args.models.split(",")):  # --models "": only rewrite the results from the cache
        for version, src in sources.items():
            print(json.dumps(run_child(version, src, model, args, run_dir)), flush=True)
    rows = finished_rows(run_dir)  # this run's and earlier runs' pairs (other settings included), by P
    meta = run_meta()
    RESULTS.mkdir(exist_ok=True)
    write_json(RESULTS / f"{args.name}.json", {"meta": meta, "before_commit": args.before_commit, "rows": rows})
    (RESULTS / f"{args.name}.md").write_text(markdown(rows, meta, args.before_commit))


if __name__ == "__main__":
    main()
