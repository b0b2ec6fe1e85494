#!/usr/bin/env python
"""posthoc vs laplace-torch on the FMNIST CNN: same model, same data, same structure.

Measures, for both libraries, with all weights, the exact GGN, a scalar prior
precision 1.0 and the classification likelihood:

* kron fit, kron glm predictive at batch 10 and at batch 250,
* diag fit, diag glm predictive at batch 250,

recording wall time (fit), throughput (test points / s, glm predictive), the
peak resident memory of the process (``ru_maxrss``), and where both finished
the difference between the two libraries' predictive covariances J Λ⁻¹ Jᵀ on the
same test points (and, for the fits, between the curvature spectra / posterior
variances).

Every case of every library runs in a fresh subprocess (this script with
``--child``, which runs laplace_vs_laplace_torch_child.py's ``child_main``) under ``RLIMIT_AS`` and a timeout; "out of memory" and "timeout"
are recorded instead of taking the machine down. A predictive case loads the
state its fit case saved, so its peak memory is the predictive's own. It runs
over the test points until ``--predict-budget`` seconds are spent and the
throughput is extrapolated from the points done (said in the notes).

laplace-torch is an optional extra (see benchmarks/README.md for installing it
beside the CPU torch). Run from the repository root:

    .venv-bench/bin/python benchmarks/laplace_vs_laplace_torch.py

Results: benchmarks/results/laplace_vs_laplace_torch.{md,json} (atomic writes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

if str(Path(__file__).resolve().parent) not in sys.path:  # the two modules beside this script, when imported
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from laplace_vs_laplace_torch_child import ERROR, OK, OOM, TIMEOUT, child_main, write_child_json  # noqa: E402
from laplace_vs_laplace_torch_report import (  # noqa: E402
    GOALS,
    case_id,
    case_name,
    compare_summaries,
    compare_tensors,
    fmt_bytes,
    parse_cases,
    render_markdown,
    report_rows,
    result_cell,
    results_table,
    throughput,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results"
RESULT_STEM = "laplace_vs_laplace_torch"
LIBRARIES = ("posthoc", "laplace-torch")
DEFAULT_CASES = "kron:fit,kron:glm@10,kron:glm@250,diag:fit,diag:glm@250"


# --------------------------------------------------------------------------- parent side
def run_child(spec: dict[str, Any], timeout: float, mem_limit: int) -> dict[str, Any]:
    """Run this script with --child SPEC in a fresh process under RLIMIT_AS and a timeout."""
    from posthoc.bench.processes import run_limited

    spec_path = Path(spec["result"]).with_suffix(".spec.json")
    write_child_json(spec_path, spec)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(spec_path)]
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "PYTHONWARNINGS": "ignore"}
    outcome = run_limited(cmd, mem_limit_bytes=mem_limit, timeout=timeout, env=env)
    timed_out, rc, stderr, wall = outcome.timed_out, outcome.returncode, outcome.stderr, outcome.wall_s
    try:
        result = json.loads(Path(spec["result"]).read_text())
    except (OSError, json.JSONDecodeError):
        result = {"status": "running", "points_done": 0, "seconds": 0.0}
    result["process_wall_s"] = wall
    result["returncode"] = rc
    if timed_out:
        result["status"] = TIMEOUT
        result["timeout_s"] = timeout
    elif result.get("status") == "running":  # died without reporting: a signal (e.g. abort on bad_alloc)
        low = stderr.lower()
        result["status"] = OOM if any(s in low for s in ("bad_alloc", "memory")) else ERROR
        result["message"] = f"process ended with return code {rc}: {stderr.strip()[-500:]}"
    if result["status"] == ERROR and stderr:
        result.setdefault("stderr_tail", stderr.strip()[-2000:])
    return result


def load_data(args) -> tuple[dict[str, Any], dict[str, Any]]:
    """The first N training images of the full FMNIST train set and the first n test images (or the embedded suite)."""
    from posthoc.bench.report import recorded_path
    from posthoc.data import get_suite
    from posthoc.data.paths import resolve_data_dir

    info: dict[str, Any] = {}
    try:
        suite = get_suite("fmnist", data_dir=args.data_dir)
        data_dir = recorded_path(resolve_data_dir(args.data_dir), "<data-dir>", keep_name=False)
        info["suite"] = f"fmnist (full files under {data_dir})"
    except (FileNotFoundError, ValueError, OSError) as exc:
        print(f"!! the full FMNIST files are not usable ({exc}); falling back to the embedded suite "
              f"(4,000 training images): N below is what was used", file=sys.stderr)
        suite = get_suite("fmnist-embedded")
        info["suite"] = "fmnist-embedded (fallback: full files missing)"
    x_tr, y_tr = suite.train.tensors
    x_te, y_te = suite.test.tensors
    n, n_test = min(args.n_train, len(x_tr)), min(args.n_test, len(x_te))
    info.update(n_train=n, n_test=n_test, train_order="the suite's train split in file order (validation split "
                "removed), first N", test="FMNIST test, first n")
    data = {"x_train": x_tr[:n].contiguous(), "y_train": y_tr[:n].contiguous(), "x_test": x_te[:n_test].contiguous()}
    return data, info


def prepare_model(args, path: Path) -> dict[str, Any]:
    import torch

    from posthoc.bench.report import recorded_path
    from posthoc.data import get_suite
    from posthoc.models import FMNISTCNN, count_parameters
    from posthoc.models.training import TrainConfig, load_map_weights, train_map

    model = FMNISTCNN()
    if args.checkpoint:
        model.load_state_dict(load_map_weights(args.checkpoint))
        info = {"weights": f"checkpoint {recorded_path(args.checkpoint, '<checkpoint-dir>')}"}
    else:
        torch.manual_seed(0)
        suite = get_suite("fmnist-embedded")
        result = train_map(model, suite.train, TrainConfig(epochs=args.epochs), progress=False, log=lambda s: None)
        info = {"weights": f"MAP trained here: {args.epochs} epochs (TrainConfig defaults otherwise) on the embedded "
                           f"suite's {len(suite.train)} training images, {result.wall_time_s:.1f} s"}
    model = model.float().eval()
    torch.save(model.state_dict(), path)
    info["n_params"] = count_parameters(model)
    return info


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (``argv``; None: sys.argv). Exits with a usage error for --repeats < 1."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", default=None, help="folder holding FashionMNIST/ (default: $POSTHOC_DATA; falls "
                   "back to the embedded suite's 4,000 training images if neither is given or the files are missing)")
    p.add_argument("--n-train", type=int, default=10_000, help="training points the curvature is fitted on")
    p.add_argument("--n-test", type=int, default=1_000, help="test points of the glm predictive")
    p.add_argument("--checkpoint", default=None, help="MAP weights (a state_dict, or a train_map checkpoint with "
                   "'model'); default: train 2 epochs on the embedded data")
    p.add_argument("--epochs", type=int, default=2, help="MAP epochs when no --checkpoint is given")
    p.add_argument("--cases", default=DEFAULT_CASES, help="comma-separated STRUCTURE:fit / STRUCTURE:glm@BATCH")
    p.add_argument("--libraries", default=",".join(LIBRARIES), help="which sides to run")
    p.add_argument("--subset", default="all", choices=("all", "last_layer"), help="subset_of_weights")
    p.add_argument("--fit-batch-size", type=int, default=100, help="batch size of the training loader (both sides)")
    p.add_argument("--repeats", type=int, default=1, help="run each fit case this many times, alternating the "
                   "libraries (posthoc, laplace-torch, posthoc, ...), and report the median of the paired ratios: "
                   "on a shared machine the speed drifts between runs")
    p.add_argument("--fit-timeout", type=float, default=600.0, help="seconds before a fit is recorded as a timeout")
    p.add_argument("--predict-budget", type=float, default=300.0, help="seconds of glm prediction after which the "
                   "throughput is extrapolated from the points done")
    p.add_argument("--mem-limit-gb", type=float, default=20.0, help="RLIMIT_AS of each case's process (GiB)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads per case")
    p.add_argument("--n-compare", type=int, default=100, help="test points whose covariances are compared")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"),
                   help="model and data dtype (float64: to check that both sides agree beyond float32 rounding)")
    p.add_argument("--no-reference", action="store_true", help="skip the float64 posthoc reference covariances "
                   "that both sides' float32 covariances are compared with")
    p.add_argument("--fallback-fit-n", type=int, default=100, help="if a side's fit did not finish, its predictive "
                   "is timed after a fit on this many points (no comparison then)")
    p.add_argument("--out-dir", default=str(DEFAULT_OUT), help="where the .md and .json go")
    p.add_argument("--name", default=RESULT_STEM, help="file stem of the results (the benchmark keeps one results file, earlier runs are in git history: another stem is for a scratch run only)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    from posthoc.utils.checks import check_positive_int

    try:
        check_positive_int(args.repeats, "--repeats", "runs of each fit case")
    except ValueError as err:
        p.error(str(err))
    return args


def library_versions(libs: list[str]) -> dict[str, str]:
    """Posthoc's versions, plus laplace-torch's and its backends' when laplace-torch is among ``libs``.

    Raises SystemExit for an unknown library name, or when laplace-torch is asked for and not installed.
    """
    from posthoc.bench.report import versions

    for lib in libs:
        if lib not in LIBRARIES:
            raise SystemExit(f"unknown library {lib!r}; choose from {', '.join(LIBRARIES)}")
    lib_versions = dict(versions())
    if "laplace-torch" in libs:
        from importlib.metadata import PackageNotFoundError, version

        for pkg in ("laplace-torch", "curvlinops-for-pytorch", "backpack-for-pytorch", "asdfghjkl", "scipy"):
            try:
                lib_versions[pkg] = version(pkg)
            except PackageNotFoundError:
                if pkg == "laplace-torch":
                    raise SystemExit(
                        "laplace-torch is not installed in this environment; see benchmarks/README.md") from None
    return lib_versions


def case_spec(args: argparse.Namespace, tmp: Path, lib: str, case: dict[str, Any]) -> dict[str, Any]:
    """What the child process of ``lib`` on ``case`` reads.

    Its settings and the files under ``tmp`` it reads and writes (a predictive case reads the state and summary
    its fit case wrote).
    """
    cid = case_id(lib, case)
    fit_id = case_id(lib, {**case, "kind": "fit"})
    return {"lib": lib, "structure": case["structure"], "kind": case["kind"], "batch": case["batch"],
            "subset": args.subset, "threads": args.threads, "fit_batch": args.fit_batch_size,
            "data": str(tmp / "data.pt"), "model": str(tmp / "model.pt"),
            "result": str(tmp / f"{cid}.result.json"), "state": str(tmp / f"{fit_id}.state.pt"),
            "summary": str(tmp / f"{fit_id}.summary.pt"), "cov": str(tmp / f"{cid}.cov.pt"),
            "budget": args.predict_budget, "n_compare": args.n_compare,
            "fallback_fit_n": args.fallback_fit_n, "fallback_fit_batch": min(10, args.fit_batch_size),
            "dtype": args.dtype}


def run_map_forward(args: argparse.Namespace, tmp: Path, mem_limit: int) -> tuple[dict[str, Any], float | None]:
    """Reference: the MAP forward pass at batch 250 (and the memory floor of a case process).

    The floor holds torch, the model and the data. Returns its child result and its throughput (test points / s;
    None if it did not run).
    """
    base = run_child({**case_spec(args, tmp, "map", {"structure": "map", "kind": "glm", "batch": 250}),
                      "lib": "map"}, timeout=300, mem_limit=mem_limit)
    map_thr = throughput(base)
    print(f"  MAP forward: {map_thr or float('nan'):.4g} pts/s at batch 250; process floor "
          f"{fmt_bytes(base.get('peak_rss_bytes'))}", flush=True)
    return base, map_thr


def run_cases(args: argparse.Namespace, tmp: Path, cases: list[dict[str, Any]], libs: list[str],
              data_info: dict[str, Any], mem_limit: int) -> dict[str, dict[str, Any]]:
    """Every case of every library, each in its own process; returns the results by case_id.

    Fits run first (each --repeats times, libraries alternating), so each predictive loads the state its fit
    saved.
    """
    n_test = data_info["n_test"]
    results: dict[str, dict[str, Any]] = {}
    fit_ok: dict[tuple[str, str], bool] = {}
    ordered = [c for c in cases if c["kind"] == "fit"] + [c for c in cases if c["kind"] == "glm"]
    runs = [(case, lib) for case in ordered
            for _ in range(args.repeats if case["kind"] == "fit" else 1) for lib in libs]
    repeat_seconds: dict[str, list[float]] = {}
    for case, lib in runs:
        cid = case_id(lib, case)
        spec = case_spec(args, tmp, lib, case)
        key = (lib, case["structure"])
        if case["kind"] == "fit":
            timeout = args.fit_timeout
        else:
            if key not in fit_ok:  # no fit case asked for: the predictive fits itself first
                spec["state_available"] = False
                spec["fallback_fit_n"] = data_info["n_train"]
                spec["fallback_fit_batch"] = args.fit_batch_size
                timeout = args.fit_timeout + args.predict_budget + 300
            else:
                spec["state_available"] = fit_ok[key]
                timeout = args.predict_budget + 300 + (0 if fit_ok[key] else args.fit_timeout)
        print(f"- {lib:13s} {case_name(case):24s} ...", end=" ", flush=True)
        res = run_child(spec, timeout=timeout, mem_limit=mem_limit)
        if case["kind"] == "glm" and not spec["state_available"] and key in fit_ok:
            res["note"] = (f"its fit did not finish; predictive timed after a fit on the first "
                           f"{spec['fallback_fit_n']} points at batch {spec['fallback_fit_batch']} "
                           "(covariance not compared)")
        if case["kind"] == "fit":
            fit_ok[key] = res["status"] == OK
        res["spec"] = {k: spec[k] for k in ("lib", "structure", "kind", "batch", "subset", "fit_batch",
                                            "threads")}
        if case["kind"] == "fit" and args.repeats > 1:  # every repetition, None where it did not finish
            repeat_seconds.setdefault(cid, []).append(res["seconds"] if res["status"] == OK else None)
            res["repeat_seconds"] = list(repeat_seconds[cid])
        results[cid] = res
        print(result_cell(res, case["kind"], n_test), flush=True)
    return results


def run_references(args: argparse.Namespace, tmp: Path, cases: list[dict[str, Any]], data_info: dict[str, Any],
                   mem_limit: int) -> dict[str, Any]:
    """float64 reference (posthoc, fitted on the same data) of each predictive's structure.

    On the first n_compare test points; none for --no-reference or a float64 run. Returns
    {structure: {result, cov}}.
    """
    references: dict[str, Any] = {}
    if args.no_reference or args.dtype != "float32":
        return references
    for structure in dict.fromkeys(c["structure"] for c in cases if c["kind"] == "glm"):
        case = {"structure": structure, "kind": "glm", "batch": min(args.n_compare, 50)}
        spec = {**case_spec(args, tmp, "posthoc", case), "dtype": "float64", "state_available": False,
                "fallback_fit_n": data_info["n_train"], "fallback_fit_batch": args.fit_batch_size,
                "n_points": args.n_compare, "budget": 1e9,
                "result": str(tmp / f"ref-{structure}.result.json"), "cov": str(tmp / f"ref-{structure}.cov.pt")}
        print(f"- float64 reference (posthoc) {structure} ...", end=" ", flush=True)
        res = run_child(spec, timeout=args.fit_timeout + args.predict_budget + 300, mem_limit=mem_limit)
        print(res["status"], flush=True)
        references[structure] = {"result": res, "cov": spec["cov"] if res["status"] == OK else None}
    return references


def compare_results(args: argparse.Namespace, tmp: Path, cases: list[dict[str, Any]],
                    results: dict[str, dict[str, Any]], references: dict[str, Any]) -> dict[str, Any]:
    """Posthoc vs laplace-torch on the same test points / the same fit, keyed by case_name.

    Also each side's float32 covariances against the float64 reference.
    """
    import torch

    comparisons: dict[str, Any] = {}
    for case in cases:
        a, b = case_id("posthoc", case), case_id("laplace-torch", case)
        if a not in results or b not in results:
            continue
        ra, rb = results[a], results[b]
        if ra["status"] != OK or rb["status"] != OK:
            continue
        if case["kind"] == "fit":
            sa = case_spec(args, tmp, "posthoc", case)["summary"]
            sb = case_spec(args, tmp, "laplace-torch", case)["summary"]
            if Path(sa).exists() and Path(sb).exists():
                comparisons[case_name(case)] = compare_summaries(Path(sa), Path(sb))
        elif not rb.get("fallback_fit") and not ra.get("fallback_fit"):
            ca, cb = case_spec(args, tmp, "posthoc", case)["cov"], case_spec(args, tmp, "laplace-torch", case)["cov"]
            if Path(ca).exists() and Path(cb).exists():
                ta, tb = torch.load(ca), torch.load(cb)
                m = min(len(ta), len(tb))
                comparisons[case_name(case)] = {"n_points": m, **compare_tensors(ta[:m], tb[:m])}
    for case in cases:  # each side's float32 covariances against the float64 reference
        for lib in ("posthoc", "laplace-torch"):
            ref = references.get(case["structure"], {}).get("cov")
            cov_path = case_spec(args, tmp, lib, case)["cov"]
            r = results.get(case_id(lib, case))
            if (case["kind"] == "glm" and ref and r and r["status"] == OK and not r.get("fallback_fit")
                    and Path(cov_path).exists()):
                ta, tr = torch.load(cov_path), torch.load(ref)
                m = min(len(ta), len(tr))
                comparisons.setdefault(case_name(case), {})[f"{lib}_vs_float64"] = {
                    "n_points": m, **compare_tensors(ta[:m], tr[:m])}
    return comparisons


def recorded_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The command-line settings for the results file, its folders and checkpoint as ``recorded_path`` names them."""
    from posthoc.bench.report import recorded_path

    placeholders = {"data_dir": "<data-dir>", "checkpoint": "<checkpoint-dir>", "out_dir": "<out-dir>"}
    settings = {k: v for k, v in vars(args).items() if k != "child"}
    for key, placeholder in placeholders.items():
        if settings.get(key):
            settings[key] = recorded_path(settings[key], placeholder, keep_name=key == "checkpoint")
    return settings


def write_outputs(out_dir: str | os.PathLike, name: str, text: str, payload: dict[str, Any]) -> None:
    """``name``.md (the page) and ``name``.json (every measurement) in ``out_dir``, each written atomically."""
    from posthoc.bench.report import write_json
    from posthoc.utils.io import atomic_write_text

    out = Path(out_dir)
    atomic_write_text(out / f"{name}.md", text)
    write_json(out / f"{name}.json", payload)
    print(f"\nwrote {out / (name + '.md')} and {out / (name + '.json')}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child_main(json.loads(Path(args.child).read_text()))
        return 0

    import torch

    from posthoc.bench.report import machine_info, recorded_command

    torch.set_num_threads(args.threads)
    cases = parse_cases(args.cases)
    libs = [s.strip() for s in args.libraries.split(",") if s.strip()]
    lib_versions = library_versions(libs)
    mem_limit = int(args.mem_limit_gb * 2**30)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")

    with tempfile.TemporaryDirectory(prefix="posthoc-vs-lt-") as tmp_str:
        tmp = Path(tmp_str)
        print("preparing the model and data ...", flush=True)
        model_info = prepare_model(args, tmp / "model.pt")
        data, data_info = load_data(args)
        torch.save(data, tmp / "data.pt")
        print(f"  {model_info['weights']}; {model_info['n_params']:,} parameters; "
              f"N = {data_info['n_train']:,} ({data_info['suite']}); {data_info['n_test']} test points", flush=True)
        base, map_thr = run_map_forward(args, tmp, mem_limit)
        results = run_cases(args, tmp, cases, libs, data_info, mem_limit)
        references = run_references(args, tmp, cases, data_info, mem_limit)
        comparisons = compare_results(args, tmp, cases, results, references)

    rows = report_rows(cases, results, comparisons, map_thr, data_info["n_test"])
    table = results_table(rows)
    machine = machine_info()
    cmd = ("python benchmarks/laplace_vs_laplace_torch.py "
           + recorded_command(sys.argv[1:] if argv is None else argv)).strip()
    text = render_markdown(args, table, model_info, data_info, base, map_thr, results, machine, lib_versions, cmd,
                           started)
    print()
    print("\n".join(table))
    payload = {"created": started, "command": cmd, "machine": machine, "versions": lib_versions,
               "model": model_info, "data": data_info, "settings": recorded_settings(args),
               "map_forward": base, "results": results, "comparisons": comparisons,
               "float64_reference": {k: v["result"] for k, v in references.items()}, "rows": rows,
               "goals": GOALS}
    write_outputs(args.out_dir, args.name, text, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
