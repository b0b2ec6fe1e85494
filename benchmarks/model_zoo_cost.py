#!/usr/bin/env python
"""Cost of posthoc (and laplace-torch 0.3 beside it) on models people use: CIFAR ResNet-18, WRN-16-4, GPT-2 124M.

For each (model, method, library) case, in a fresh subprocess under an address-space cap (RLIMIT_AS; 8 GiB for
both libraries by default): the MAP forward+backward over the N training inputs (the denominator, measured in
the same process right before the case), the fit (data pass and factor eigendecompositions apart) with its peak
RSS, and the glm predictive (probit) per 100 new inputs with its own peak RSS (the peak is reset between the
phases through /proc/self/clear_refs). Methods: last-layer kron ("ll_kron"), all-weights kron and diag
(ResNet/WRN), LoRA kron (GPT-2), ScaLLA at a small stated budget (posthoc only; on GPT-2 over the LoRA
parameters, the only ones that require grad). Models and data: benchmarks/model_zoo_cost_cases.py (random
initial weights and random inputs: cost does not depend on either).

Resumable: each case's record is cached as JSON under --run-dir (default runs/model_zoo_cost/) and a rerun skips
finished cases; a case killed at its timeout is recorded "over budget" (rerun with a larger --case-timeout to
retry it), one that hits the cap "over memory", and every planned case not yet run appears as "not run".
``--time-budget`` bounds the seconds this invocation spends. Heavy cases take hours on two shared CPU cores:
run the cheap ones first at a smaller --n, then the rest. Run from the repository root:

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/model_zoo_cost.py --n 1000 --time-budget 3600

Results: benchmarks/results/model_zoo_cost.{md,json}, built from every cached case.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

if str(Path(__file__).resolve().parent) not in sys.path:  # the helper module beside this script
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from model_zoo_cost_cases import TOKEN_MODELS, write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CASES_SCRIPT = Path(__file__).resolve().parent / "model_zoo_cost_cases.py"
GIB = 1024**3
GOAL_PEAK_BYTES = 8 * GIB
GOAL_KRON_RATIO = 12.0
GOAL_DIAG_OVER_KRON = 2.0
FINAL = ("done", "error", "over memory")
# ScaLLA's small budget: m latent features, Adam steps of batch_size points, target points, Lanczos subsample
SCALLA_BUDGET = {
    "vision": {"n_features": 10, "steps": 50, "batch_size": 16, "n_target_points": 100, "eigen_subsample": 20},
    "tokens": {"n_features": 4, "steps": 10, "batch_size": 4, "n_target_points": 20, "eigen_subsample": 4},
    "tiny": {"n_features": 4, "steps": 3, "batch_size": 4, "n_target_points": 8, "eigen_subsample": 8},
}
FIT_BATCH = {"vision": 32, "tokens": 8, "tiny": 4}
PREDICT_BATCH = {"vision": 10, "tokens": 10, "tiny": 4}


def family(model: str) -> str:
    """"tokens" for the GPT-2 models, "vision" for the image models."""
    return "tokens" if model in TOKEN_MODELS else "vision"


def budget_key(model: str) -> str:
    """Which settings size the case: "tiny" for the test models, else the family."""
    return "tiny" if model.startswith("tiny") else family(model)


def planned_cases(models: list[str], libraries: list[str], n_images: int, n_tokens: int) -> list[dict[str, Any]]:
    """The cases in run order, each {"model", "method", "library", "n"}.

    Cheap first (last-layer kron, LoRA kron, ScaLLA), then diag and all-weights kron, WRN-16-4 before ResNet-18.
    """
    laplace = {"vision": ["ll_kron"], "tokens": ["lora_kron"]}
    heavy = {"vision": ["diag", "kron"], "tokens": []}
    order = sorted(models, key=lambda m: ["tiny_cnn", "tiny_gpt2", "wrn16_4", "gpt2", "resnet18"].index(m))
    cases = []
    for stage in ("cheap", "scalla", "heavy"):
        for model in order:
            n = n_tokens if model in TOKEN_MODELS else n_images
            fam = family(model)
            methods = laplace[fam] if stage == "cheap" else ["scalla"] if stage == "scalla" else heavy[fam]
            for method in methods:
                for lib in libraries:
                    if method != "scalla" or lib == "posthoc":
                        cases.append({"model": model, "method": method, "library": lib, "n": n})
    return cases


def case_id(case: dict[str, Any]) -> str:
    """The case's cache name, e.g. "wrn16_4-kron-posthoc-n1000"."""
    return f"{case['model']}-{case['method']}-{case['library']}-n{case['n']}"


def child_spec(case: dict[str, Any], args: argparse.Namespace, result: Path) -> dict[str, Any]:
    """The spec a child process runs: the case plus batch sizes, the ScaLLA budget and the predict settings."""
    fam = budget_key(case["model"])
    return {**case, "result": str(result), "batch_size": FIT_BATCH[fam], "predict_batch": PREDICT_BATCH[fam],
            "n_predict": 8 if fam == "tiny" else args.n_predict, "predict_budget_s": args.predict_budget,
            "scalla": SCALLA_BUDGET[fam]}


def run_one(case: dict[str, Any], args: argparse.Namespace, timeout: float) -> dict[str, Any]:
    """Run ``case`` in a fresh process under the memory cap and ``timeout``; its record (status always set)."""
    from posthoc.bench.processes import run_limited

    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    result = run_dir / f"{case_id(case)}.partial.json"
    result.unlink(missing_ok=True)
    spec_path = run_dir / f"{case_id(case)}.spec.json"
    write_json(str(spec_path), child_spec(case, args, result))
    python = sys.executable if case["library"] == "posthoc" else args.bench_python
    cap = int((args.mem_limit_gb if case["library"] == "posthoc" else args.lt_mem_limit_gb) * GIB)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    outcome = run_limited([python, str(CASES_SCRIPT), str(spec_path)], mem_limit_bytes=cap, timeout=timeout, env=env)
    try:
        record = json.loads(result.read_text())
    except (OSError, json.JSONDecodeError):
        record = {"status": "running"}
    record.update(case, mem_cap_bytes=cap, timeout_s=timeout, process_wall_s=outcome.wall_s,
                  returncode=outcome.returncode)
    if outcome.timed_out:
        record["status"] = "over budget"
        record["message"] = f"killed at the {timeout:.0f} s timeout"
    elif record.get("status") == "running" and outcome.returncode == -9:  # not our cap: that raises in the child
        record["status"] = "killed"
        record["message"] = ("SIGKILL: on a shared machine, the kernel's OOM killer when the machine runs out of "
                             "memory (rerun to retry)")
    elif record.get("status") == "running":  # died without reporting: a signal, e.g. abort on bad_alloc
        low = outcome.stderr.lower()
        record["status"] = "over memory" if any(s in low for s in ("bad_alloc", "memory")) else "error"
        record["message"] = f"process ended with return code {outcome.returncode}: {outcome.stderr.strip()[-400:]}"
    result.unlink(missing_ok=True)
    spec_path.unlink(missing_ok=True)
    write_json(str(run_dir / f"{case_id(case)}.json"), record)
    return record


def needs_run(cached: dict[str, Any] | None, timeout: float, force: bool) -> bool:
    """Whether a case runs: not cached, forced, killed, or cached over budget with a smaller timeout than ``timeout``."""
    if cached is None or force or cached["status"] == "killed":
        return True
    return cached["status"] not in FINAL and cached.get("timeout_s", 0.0) < timeout


def run_all(args: argparse.Namespace, cases: list[dict[str, Any]]) -> None:
    """Run the cases that need it, in order, until ``--time-budget`` seconds are spent (one case at a time)."""
    import time

    start = time.perf_counter()
    for case in cases:
        path = Path(args.run_dir) / f"{case_id(case)}.json"
        cached = json.loads(path.read_text()) if path.exists() else None
        left = args.time_budget - (time.perf_counter() - start)
        timeout = min(args.case_timeout, left)
        if not needs_run(cached, args.case_timeout, args.force):
            continue
        if timeout < args.min_case_s:
            print(f"-- {case_id(case)}: not run ({left:.0f} s of the time budget left)", flush=True)
            continue
        print(f"-- {case_id(case)} (timeout {timeout:.0f} s, load {os.getloadavg()[0]:.2f})", flush=True)
        record = run_one(case, args, timeout)
        print(f"   {record['status']}: fit {record.get('fit_s', float('nan')):.1f} s, MAP fwd+bwd "
              f"{record.get('map_fwd_bwd_s', float('nan')):.1f} s {record.get('message', '')[:200]}", flush=True)


# --------------------------------------------------------------------------- report
def ratio(value: Any, base: Any) -> float | None:
    """The ratio value / base, or None when either is missing."""
    return None if value is None or not base else value / base


def report_row(record: dict[str, Any]) -> dict[str, Any]:
    """One table row of a cached case record.

    Times come as ratios to the MAP forward+backward too (the predict time per 100 inputs against the MAP
    forward+backward per 100 training inputs).
    """
    measured = [record[k] for k in ("map_fwd_bwd_s", "map_fwd_bwd_after_s") if record.get(k) is not None]
    map_s = sum(measured) / len(measured) if measured else None
    map_per_100 = None if map_s is None else map_s * 100.0 / record["n"]
    peaks = [record.get(k) for k in ("fit_peak_bytes", "predict_peak_bytes", "child_maxrss_bytes")]
    return {
        "model": record["model"], "method": record["method"], "library": record["library"], "n": record["n"],
        "status": record["status"], "message": record.get("message", ""), "map_fwd_bwd_s": map_s,
        "map_fwd_bwd_runs_s": measured,
        "data_pass_s": record.get("data_pass_s"), "data_pass_ratio": ratio(record.get("data_pass_s"), map_s),
        "eig_s": record.get("eig_s"), "scalla_training_s": record.get("scalla_training_s"),
        "fit_s": record.get("fit_s"), "fit_ratio": ratio(record.get("fit_s"), map_s),
        "fit_peak_bytes": record.get("fit_peak_bytes"),
        "predict_s_per_100": record.get("predict_s_per_100"), "predict_points": record.get("predict_points"),
        "predict_ratio": ratio(record.get("predict_s_per_100"), map_per_100),
        "predict_peak_bytes": record.get("predict_peak_bytes"),
        "max_peak_bytes": max((p for p in peaks if p is not None), default=None),
        "mem_cap_bytes": record.get("mem_cap_bytes"), "n_params": record.get("n_params"),
        "n_params_grad": record.get("n_params_grad"), "load_average": record.get("load_average"),
        "versions": record.get("versions", {}),
    }


def goal_checks(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's goals for posthoc, per (model, N), each met "yes", "no" or "n/a" (a case it needs not done).

    Every case under 8 GB; all-weights kron data pass <= 12x MAP forward+backward; diag fit <= 2x kron fit.
    """
    checks = []
    posthoc = [r for r in rows if r["library"] == "posthoc"]
    for model, n in sorted({(r["model"], r["n"]) for r in posthoc}):
        mine = {r["method"]: r for r in posthoc if r["model"] == model and r["n"] == n}
        done = {m: r for m, r in mine.items() if r["status"] == "done"}
        peak = max((r["max_peak_bytes"] or 0 for r in done.values()), default=0)
        over = [m for m, r in mine.items() if r["status"] == "over memory"]
        mem = "no" if over or peak >= GOAL_PEAK_BYTES else "yes" if done else "n/a"
        checks.append({"model": model, "n": n, "goal": "every case under 8 GB", "met": mem,
                       "detail": f"largest peak {peak / GIB:.2f} GiB over {len(done)} done cases"
                                 + (f"; over memory: {', '.join(over)}" if over else "")})
        if family(model) == "tokens":
            continue
        kron = done.get("kron")
        kron_ratio = None if kron is None else kron["data_pass_ratio"]
        checks.append({"model": model, "n": n, "goal": "all-weights kron data pass <= 12x MAP fwd+bwd",
                       "met": "n/a" if kron_ratio is None else "yes" if kron_ratio <= GOAL_KRON_RATIO else "no",
                       "detail": "kron not done" if kron_ratio is None else f"{kron_ratio:.1f}x"})
        diag = done.get("diag")
        over_kron = None if kron is None or diag is None else diag["fit_s"] / kron["fit_s"]
        checks.append({"model": model, "n": n, "goal": "diag fit <= 2x kron fit",
                       "met": "n/a" if over_kron is None else "yes" if over_kron <= GOAL_DIAG_OVER_KRON else "no",
                       "detail": "diag or kron not done" if over_kron is None else f"{over_kron:.2f}x"})
    return checks


def _num(value: Any, fmt: str = "{:.1f}") -> str:
    return "–" if value is None else fmt.format(value)


def _gib(value: Any) -> str:
    return "–" if value is None else f"{value / GIB:.2f}"


def render_markdown(meta: dict[str, Any], rows: list[dict[str, Any]], checks: list[dict[str, Any]]) -> str:
    """The results table as markdown: settings, one row per case, the goal checks, and the notes."""
    lines = ["# Model-zoo cost: CIFAR ResNet-18, WRN-16-4, GPT-2 124M (posthoc and laplace-torch 0.3)", "",
             f"Machine: {meta['machine']}. Versions: {meta['versions']}.", "",
             "Random initial weights and random inputs (cost does not depend on them); float32; one thread per "
             f"case (OMP_NUM_THREADS=1) on a shared CPU: the load average at each case's start is given, and the "
             "ratios to the MAP forward+backward over the same data (measured in the same process right before) "
             "are what compare across cases (the MAP pass is timed before and after the fit; the table gives the mean, "
             "the JSON both). Address-space cap (RLIMIT_AS) per case: "
             f"{meta['mem_cap_gib']} GiB posthoc, {meta['lt_mem_cap_gib']} GiB laplace-torch. Fit batch size "
             f"{FIT_BATCH['vision']} (images) / {FIT_BATCH['tokens']} (sequences of 128 tokens); glm predictive "
             f"(probit) in batches of {PREDICT_BATCH['vision']} on up to 100 new inputs, stopped after "
             f"{meta['predict_budget_s']:.0f} s and extrapolated to 100. ScaLLA's budget: {SCALLA_BUDGET['vision']} "
             f"(images), {SCALLA_BUDGET['tokens']} (GPT-2; over the LoRA parameters); its \"data pass\" is the "
             "posterior pass after the surrogate training (its Lanczos directions, targets and steps, reported "
             "in the notes).", "",
             "| model | N | method | library | status | MAP fwd+bwd s | data pass s (×MAP) | eigh s | fit s (×MAP) | "
             "fit peak GiB | glm s / 100 (×MAP/100) | predict peak GiB | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        status = r["status"] if r["status"] in ("done", "not run") else f"{r['status']}: {r['message'][:120]}"
        load = "–" if not r["load_average"] else f"{r['load_average'][0]:.1f}"
        lines.append(
            f"| {r['model']} | {r['n']} | {r['method']} | {r['library']} | {status} | {_num(r['map_fwd_bwd_s'])} | "
            f"{_num(r['data_pass_s'])} ({_num(r['data_pass_ratio'])}) | {_num(r['eig_s'])} | {_num(r['fit_s'])} "
            f"({_num(r['fit_ratio'])}) | {_gib(r['fit_peak_bytes'])} | {_num(r['predict_s_per_100'], '{:.2f}')} "
            f"({_num(r['predict_ratio'])}) | {_gib(r['predict_peak_bytes'])} | {load} |")
    lines += ["", "## Goals (posthoc)", "", "| model | N | goal | met | detail |", "|---|---|---|---|---|"]
    lines += [f"| {c['model']} | {c['n']} | {c['goal']} | {c['met']} | {c['detail']} |" for c in checks]
    notes = [f"- {r['model']} ScaLLA N={r['n']}: surrogate training {_num(r['scalla_training_s'])} s of the fit"
             for r in rows if r["method"] == "scalla" and r["scalla_training_s"] is not None]
    done_n = sorted({(r["model"], r["n"]) for r in rows if r["status"] == "done"})
    not_run = [r for r in rows if r["status"] == "not run"]
    notes.insert(0, "- Done so far at " + ", ".join(f"{m} N={n}" for m, n in done_n) + "; the issue asks for 10,000 "
                 "images and 200 sequences: " + (f"{len(not_run)} \"not run\" rows are left for a later run "
                                                 "(`--n 10000`)." if not_run else "every planned case has a record."))
    lines += ["", "## Notes", "", *notes,
              "- Peak memory is the process's peak resident set (VmHWM), reset between the MAP pass, the fit and "
              "the predictive; it includes the model, the data and (when predicting) the fitted posterior.",
              "- \"not run\": a planned case this table has no record of yet (rerun the script to continue); "
              "\"over budget\": killed at the case timeout.", ""]
    return "\n".join(lines)


def build_report(args: argparse.Namespace, cases: list[dict[str, Any]]) -> dict[str, Any]:
    """Collect every cached record under --run-dir (plus the planned cases not yet run) and write the table."""
    from posthoc.bench.report import atomic_write_text

    records = {case_id(c): {**c, "status": "not run"} for c in cases}
    for path in sorted(Path(args.run_dir).glob("*.json")):
        if not path.name.endswith((".partial.json", ".spec.json")):
            record = json.loads(path.read_text())
            records[case_id(record)] = record
    rows = [report_row(r) for r in records.values()]
    rows.sort(key=lambda r: (r["model"], r["n"], r["method"], r["library"]))
    versions: dict[str, str] = {}
    for r in rows:
        versions.update(r["versions"])
    meta = {"machine": f"{platform.platform()}, {os.cpu_count()} CPUs (shared)", "versions": versions,
            "mem_cap_gib": args.mem_limit_gb, "lt_mem_cap_gib": args.lt_mem_limit_gb,
            "predict_budget_s": args.predict_budget, "scalla_budget": SCALLA_BUDGET, "fit_batch": FIT_BATCH,
            "weights_and_inputs": "random (seeded)"}
    checks = goal_checks(rows)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"{args.name}.md", render_markdown(meta, rows, checks))
    atomic_write_text(out / f"{args.name}.json", json.dumps({"meta": meta, "rows": rows, "goals": checks}, indent=1))
    return {"meta": meta, "rows": rows, "goals": checks}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (``argv``; None: sys.argv)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", default="wrn16_4,gpt2,resnet18", help="comma-separated: wrn16_4, gpt2, resnet18 "
                   "(tiny_cnn, tiny_gpt2: the test models)")
    p.add_argument("--libraries", default="posthoc,laplace-torch", help="posthoc and/or laplace-torch")
    p.add_argument("--methods", default=None, help="only these methods (ll_kron, lora_kron, scalla, diag, kron)")
    p.add_argument("--n", type=int, default=10_000, help="training images of the ResNet/WRN cases")
    p.add_argument("--n-tokens", type=int, default=200, help="training sequences of the GPT-2 cases")
    p.add_argument("--n-predict", type=int, default=100, help="new inputs of the glm predictive")
    p.add_argument("--predict-budget", type=float, default=300.0, help="seconds of prediction per case, after "
                   "which the time per 100 inputs is extrapolated from the inputs done")
    p.add_argument("--time-budget", type=float, default=3600.0, help="seconds this invocation may spend")
    p.add_argument("--case-timeout", type=float, default=3 * 3600.0, help="seconds per case")
    p.add_argument("--min-case-s", type=float, default=120.0, help="no case starts with less budget left")
    p.add_argument("--mem-limit-gb", type=float, default=8.0, help="RLIMIT_AS of a posthoc case (GiB)")
    p.add_argument("--lt-mem-limit-gb", type=float, default=8.0, help="RLIMIT_AS of a laplace-torch case (GiB)")
    p.add_argument("--bench-python", default=str(REPO / ".venv-bench" / "bin" / "python"),
                   help="the Python of the environment with laplace-torch")
    p.add_argument("--run-dir", default=str(REPO / "runs" / "model_zoo_cost"), help="the per-case cache")
    p.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"), help="where the .md and .json go")
    p.add_argument("--name", default="model_zoo_cost", help="file stem of the results")
    p.add_argument("--force", action="store_true", help="rerun cached cases")
    p.add_argument("--report-only", action="store_true", help="only rebuild the table from the cache")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the planned cases that need it within the time budget, then write the table; returns the report."""
    args = parse_args(argv)
    models, libraries = args.models.split(","), args.libraries.split(",")
    cases = planned_cases(models, libraries, args.n, args.n_tokens)
    if args.methods:
        cases = [c for c in cases if c["method"] in args.methods.split(",")]
    if not args.report_only:
        print(f"load average {os.getloadavg()}", flush=True)
        run_all(args, cases)
    return build_report(args, cases)


if __name__ == "__main__":
    main()
