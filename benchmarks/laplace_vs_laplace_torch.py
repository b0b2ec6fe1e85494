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
``--child``) under ``RLIMIT_AS`` and a timeout; "out of memory" and "timeout"
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
import resource
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results"
RESULT_STEM = "laplace_vs_laplace_torch"
LIBRARIES = ("posthoc", "laplace-torch")
DEFAULT_CASES = "kron:fit,kron:glm@10,kron:glm@250,diag:fit,diag:glm@250"
# What laplace-torch 0.3 did on the same setting (issue 3), for the goals.
GOALS = {
    "fit_kron": "posthoc ≤ 0.5× laplace-torch's time",
    "glm": "posthoc ≥ 10× laplace-torch's throughput, peak memory < 4 GB at batch 250",
    "fit_diag": "posthoc under 60 s",
    "same": "same posterior (covariance difference small)",
}
# Result statuses of a case.
OK, OOM, TIMEOUT, ERROR, SKIPPED = "ok", "out of memory", "timeout", "error", "not run"


# --------------------------------------------------------------------------- cases
def parse_cases(text: str) -> list[dict[str, Any]]:
    """'kron:fit,kron:glm@10' -> [{'structure': 'kron', 'kind': 'fit', 'batch': None}, ...]."""
    cases = []
    for item in (s.strip() for s in text.split(",") if s.strip()):
        try:
            structure, what = item.split(":")
            kind, _, batch = what.partition("@")
            if kind not in ("fit", "glm") or (kind == "glm") != bool(batch):
                raise ValueError
            cases.append({"structure": structure, "kind": kind, "batch": int(batch) if batch else None})
        except ValueError:
            raise SystemExit(f"bad case {item!r}: use STRUCTURE:fit or STRUCTURE:glm@BATCH, e.g. kron:glm@10")
    return cases


def case_name(case: dict[str, Any]) -> str:
    return f"{case['structure']} fit" if case["kind"] == "fit" else f"{case['structure']} glm @ batch {case['batch']}"


def case_id(lib: str, case: dict[str, Any]) -> str:
    tail = "fit" if case["kind"] == "fit" else f"glm{case['batch']}"
    return f"{lib}-{case['structure']}-{tail}"


# --------------------------------------------------------------------------- child side
def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()
    return any(s in text for s in ("can't allocate memory", "cannot allocate memory", "not enough memory",
                                   "bad_alloc", "out of memory", "failed to allocate"))


def _write_json(path: str | os.PathLike, obj: dict[str, Any]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1, default=str)
    os.replace(tmp, path)


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes


class PosthocSide:
    """posthoc.Laplace."""

    def __init__(self, spec: dict[str, Any]) -> None:
        from posthoc import Laplace

        self.spec = spec
        self.Laplace = Laplace

    def make(self, model):
        return self.Laplace(model, "classification", subset_of_weights=self.spec["subset"],
                            hessian_structure=self.spec["structure"], prior_precision=1.0, progress=False)

    def fit(self, model, loader):
        return self.make(model).fit(loader)

    def save(self, la, path: str) -> None:
        import torch

        torch.save(la.state_dict(), path)

    def load(self, model, path: str):
        import torch

        return self.make(model).load_state_dict(torch.load(path, weights_only=True))

    def summary(self, la) -> dict[str, Any]:
        """Cheap read-outs of the posterior to compare: curvature spectra (kron), posterior variance (diag/full)."""
        out: dict[str, Any] = {}
        if self.spec["structure"] == "kron":
            out["kron_eigenvalues"] = [b.eigenvalues.detach().flatten().sort().values for b in la.curvature.blocks]
        if self.spec["structure"] in ("diag", "full"):
            out["posterior_variance"] = la.posterior_variance()
        return out

    def covariance(self, la, x):
        return la.predict(x, pred_type="glm").cov


class LaplaceTorchSide:
    """laplace-torch (``from laplace import Laplace``) with its default GGN backend, CurvlinopsGGN."""

    def __init__(self, spec: dict[str, Any]) -> None:
        from laplace import Laplace
        from laplace.curvature import CurvlinopsGGN

        self.spec = spec
        self.Laplace = Laplace
        self.backend = CurvlinopsGGN

    def make(self, model):
        return self.Laplace(model, "classification", subset_of_weights=self.spec["subset"],
                            hessian_structure=self.spec["structure"], prior_precision=1.0, backend=self.backend)

    def fit(self, model, loader):
        la = self.make(model)
        la.fit(loader)
        return la

    def save(self, la, path: str) -> None:
        import torch

        torch.save(la.state_dict(), path)

    def load(self, model, path: str):
        import torch

        la = self.make(model)
        # laplace-torch's state holds its own classes (e.g. Kron); the file is this run's own, written just before
        la.load_state_dict(torch.load(path, weights_only=False))
        return la

    def summary(self, la) -> dict[str, Any]:
        import torch

        out: dict[str, Any] = {}
        if self.spec["structure"] == "kron":
            eigs = []
            for factors in la.H_facs.kfacs:  # [G, A] for a weight, [G] for a bias (laplace-torch's order)
                values = [torch.linalg.eigvalsh(f.double()).clamp_min(0) for f in factors]
                e = values[0] if len(values) == 1 else torch.outer(values[0], values[1])
                eigs.append(e.flatten().sort().values.float())
            out["kron_eigenvalues"] = eigs
        if self.spec["structure"] == "diag":
            out["posterior_variance"] = la.posterior_variance
        if self.spec["structure"] == "full":
            out["posterior_variance"] = la.posterior_covariance.diagonal()
        return out

    def covariance(self, la, x):
        # _glm_predictive_distribution returns (f_mu (B, C), f_var (B, C, C)): the functional covariance.
        return la._glm_predictive_distribution(x)[1]


def child_main(spec: dict[str, Any]) -> None:
    """Run one case of one library; write its result (and progress) to spec['result']."""
    result: dict[str, Any] = {"status": "running", "points_done": 0, "seconds": 0.0,
                              "loadavg_start": os.getloadavg()[0]}
    _write_json(spec["result"], result)
    try:
        import torch
        from torch.utils.data import DataLoader, TensorDataset

        torch.set_num_threads(spec["threads"])
        torch.manual_seed(0)
        from posthoc.models import FMNISTCNN

        dtype = getattr(torch, spec["dtype"])
        data = {k: (v.to(dtype) if v.is_floating_point() else v)
                for k, v in torch.load(spec["data"], weights_only=True).items()}
        model = FMNISTCNN()
        model.load_state_dict(torch.load(spec["model"], weights_only=True))
        model = model.to(dtype).eval()
        result["baseline_rss_bytes"] = _maxrss_bytes()
        if spec["lib"] == "map":
            x = data["x_test"]
            t0 = time.perf_counter()
            with torch.no_grad():
                for i in range(0, len(x), spec["batch"]):
                    model(x[i:i + spec["batch"]])
            result.update(seconds=time.perf_counter() - t0, points_done=len(x), status=OK)
            return
        side = PosthocSide(spec) if spec["lib"] == "posthoc" else LaplaceTorchSide(spec)
        result["phase"] = "fit"
        if spec["kind"] == "fit":
            loader = DataLoader(TensorDataset(data["x_train"], data["y_train"]), batch_size=spec["fit_batch"],
                                shuffle=False)
            t0 = time.perf_counter()
            la = side.fit(model, loader)
            result["seconds"] = time.perf_counter() - t0
            result["points_done"] = len(data["x_train"])
            result["rss_after_fit_bytes"] = _maxrss_bytes()
            side.save(la, spec["state"])
            torch.save(side.summary(la), spec["summary"])
            result["status"] = OK
            return
        # glm predictive
        if spec.get("state_available"):
            result["phase"] = "load"
            la = side.load(model, spec["state"])
        else:  # the fit case did not finish: fit on a small subset (small batches) to time the predictive anyway
            n = spec["fallback_fit_n"]
            loader = DataLoader(TensorDataset(data["x_train"][:n], data["y_train"][:n]),
                                batch_size=spec["fallback_fit_batch"], shuffle=False)
            t0 = time.perf_counter()
            la = side.fit(model, loader)
            result["fallback_fit"] = {"n": n, "seconds": time.perf_counter() - t0}
        result["rss_before_predict_bytes"] = _maxrss_bytes()
        result["phase"] = "predict"
        x = data["x_test"][: spec.get("n_points")]
        keep, saved = spec["n_compare"], []
        t0 = time.perf_counter()
        for i in range(0, len(x), spec["batch"]):
            cov = side.covariance(la, x[i:i + spec["batch"]])
            if i < keep:
                saved.append(cov.detach()[: keep - i].clone())
            result["points_done"] = min(i + spec["batch"], len(x))
            result["seconds"] = time.perf_counter() - t0
            _write_json(spec["result"], {**result, "peak_rss_bytes": _maxrss_bytes()})
            if result["seconds"] > spec["budget"] and result["points_done"] < len(x):
                result["extrapolated"] = True
                break
        if saved:
            torch.save(torch.cat(saved), spec["cov"])
        result["status"] = OK
    except BaseException as exc:  # noqa: BLE001 - the parent needs to know whatever happened
        result["status"] = OOM if _is_oom(exc) else ERROR
        result["message"] = f"{type(exc).__name__}: {str(exc)[:500]}"
        if result["status"] == ERROR:
            import traceback

            result["traceback"] = traceback.format_exc()[-3000:]
    finally:
        result["peak_rss_bytes"] = _maxrss_bytes()
        result["loadavg_end"] = os.getloadavg()[0]
        _write_json(spec["result"], result)


# --------------------------------------------------------------------------- parent side
def run_child(spec: dict[str, Any], timeout: float, mem_limit: int) -> dict[str, Any]:
    """Run this script with --child SPEC in a fresh process under RLIMIT_AS and a timeout."""
    from posthoc.bench.processes import run_limited

    spec_path = Path(spec["result"]).with_suffix(".spec.json")
    _write_json(spec_path, spec)
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
    from posthoc.data import get_suite
    from posthoc.data.paths import resolve_data_dir

    info: dict[str, Any] = {}
    try:
        suite = get_suite("fmnist", data_dir=args.data_dir)
        info["suite"] = f"fmnist (full files under {resolve_data_dir(args.data_dir)})"
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

    from posthoc.data import get_suite
    from posthoc.models import FMNISTCNN, count_parameters
    from posthoc.models.training import TrainConfig, load_map_weights, train_map

    model = FMNISTCNN()
    if args.checkpoint:
        model.load_state_dict(load_map_weights(args.checkpoint))
        info = {"weights": f"checkpoint {args.checkpoint}"}
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


def _fmt_bytes(b: float | None) -> str:
    return "—" if b is None else f"{b / 2**30:.2f} GB"


def _cell(res: dict[str, Any] | None, kind: str, n_test: int) -> str:
    if res is None:
        return "—"
    status = res["status"]
    mem = _fmt_bytes(res.get("peak_rss_bytes"))
    if status == OK and kind == "fit":
        runs = res.get("repeat_seconds", [])
        if len(runs) > 1:
            done = [t for t in runs if t is not None]
            listed = ", ".join("failed" if t is None else f"{t:.1f}" for t in runs)
            return f"median {statistics.median(done):.1f} s (runs {listed}), peak {mem}"
        return f"{res['seconds']:.1f} s, peak {mem}"
    if kind == "glm" and res.get("points_done", 0) > 0 and res.get("seconds", 0) > 0:
        thr = res["points_done"] / res["seconds"]
        extra = ""
        if res["points_done"] < n_test:
            extra = f" (extrapolated from {res['points_done']} points)"
        head = f"{thr:.3g} pts/s = {n_test / thr:.1f} s per {n_test}{extra}, peak {mem}"
        return head if status == OK else f"{head}; then {status}"
    where = f" in its {res['phase']}" if kind == "glm" and res.get("phase") not in (None, "predict") else ""
    if status == TIMEOUT:
        return f"timeout{where} ({res.get('timeout_s', 0):.0f} s), peak ≥ {mem}"
    if status == OOM:
        return f"out of memory{where} (RLIMIT_AS), peak {mem}"
    if status == SKIPPED:
        return f"not run: {res.get('message', '')}"
    return f"error: {res.get('message', '')[:120]}"


def _throughput(res: dict[str, Any] | None) -> float | None:
    if res and res.get("points_done", 0) > 0 and res.get("seconds", 0) > 0:
        return res["points_done"] / res["seconds"]
    return None


def compare_tensors(a, b) -> dict[str, float]:
    """Max abs difference, and relative: normwise (max |a-b| / max |b|) and elementwise on the diagonal."""
    a, b = a.double(), b.double()
    diff = (a - b).abs()
    out = {"max_abs": float(diff.max()), "max_abs_ref": float(b.abs().max()),
           "max_rel_normwise": float(diff.max() / b.abs().max().clamp_min(1e-300))}
    if a.ndim == 3:  # (B, C, C) covariances: the variances elementwise
        da, db = a.diagonal(dim1=-2, dim2=-1), b.diagonal(dim1=-2, dim2=-1)
        out["max_rel_variance"] = float(((da - db).abs() / db.abs().clamp_min(1e-300)).max())
    else:
        out["max_rel_elementwise"] = float((diff / b.abs().clamp_min(1e-300)).max())
    return out


def compare_summaries(pa: Path, pb: Path) -> dict[str, Any]:
    import torch

    a, b = torch.load(pa, weights_only=True), torch.load(pb, weights_only=True)
    out: dict[str, Any] = {}
    if "kron_eigenvalues" in a and "kron_eigenvalues" in b:
        ea, eb = a["kron_eigenvalues"], b["kron_eigenvalues"]
        if len(ea) != len(eb) or any(x.shape != y.shape for x, y in zip(ea, eb)):
            out["kron_eigenvalues"] = "block shapes differ: " + str([tuple(x.shape) for x in ea]) + " vs " + \
                str([tuple(y.shape) for y in eb])
        else:
            per_block = [float((x.double() - y.double()).abs().max() / y.double().abs().max().clamp_min(1e-300))
                         for x, y in zip(ea, eb)]
            out["kron_eigenvalues_max_rel_normwise_per_block"] = per_block
    if "posterior_variance" in a and "posterior_variance" in b:
        out["posterior_variance"] = compare_tensors(a["posterior_variance"], b["posterior_variance"])
    return out


def fit_ratios(ph: dict[str, Any], lt: dict[str, Any]) -> list[float]:
    """posthoc / laplace-torch fit time of each interleaved pair of runs where both finished (one pair without
    --repeats; a repetition that failed is None in ``repeat_seconds`` and drops its pair)."""
    a, b = ph.get("repeat_seconds", [ph["seconds"]]), lt.get("repeat_seconds", [lt["seconds"]])
    return [x / y for x, y in zip(a, b) if x is not None and y is not None]


def ratio_cell(case: dict[str, Any], ph: dict[str, Any] | None, lt: dict[str, Any] | None) -> str:
    if ph is None or lt is None:
        return "—"
    if case["kind"] == "fit":
        if ph["status"] != OK:
            return "—"
        if lt["status"] == OK:
            ratios = fit_ratios(ph, lt)
            if len(ratios) == 1:
                return f"{ratios[0]:.3g}× the time"
            return (f"{statistics.median(ratios):.3g}× the time (median of {len(ratios)} interleaved pairs; "
                    f"pairs {', '.join(f'{r:.3g}' for r in ratios)})")
        if lt["status"] == TIMEOUT:
            return f"< {ph['seconds'] / lt['timeout_s']:.3g}× the time"
        return "—"
    tp, tl = _throughput(ph), _throughput(lt)
    if tp is None:
        return "—"
    if tl is not None:
        return f"{tp / tl:.3g}× the throughput"
    if lt["status"] in (OOM, TIMEOUT):
        return f"∞ (laplace-torch: {lt['status']})"
    return "—"


def goal_note(case: dict[str, Any], ph, lt, n_test: int) -> str:
    if ph is None or ph["status"] not in (OK,):
        return ""
    s, kind = case["structure"], case["kind"]
    if kind == "fit" and s == "kron":
        if lt and lt["status"] == OK:
            ratios = fit_ratios(ph, lt)
            r = statistics.median(ratios)
            if len(ratios) == 1:
                return f"goal ≤ 0.5×: {'met' if r <= 0.5 else 'not met'}"
            return (f"goal ≤ 0.5×: median {'met' if r <= 0.5 else 'not met'}, "
                    f"{sum(x <= 0.5 for x in ratios)} of {len(ratios)} pairs ≤ 0.5×")
        if lt and lt["status"] == TIMEOUT:
            return "goal ≤ 0.5×: met"
    if kind == "fit" and s == "diag":
        return f"goal < 60 s: {'met' if ph['seconds'] < 60 else 'not met'}"
    if kind == "glm":
        notes = []
        tp, tl = _throughput(ph), _throughput(lt)
        if tp is not None and tl is not None:
            notes.append(f"goal ≥ 10×: {'met' if tp / tl >= 10 else 'not met'}")
        elif tp is not None and lt and lt["status"] in (OOM, TIMEOUT):
            notes.append("goal ≥ 10×: met (laplace-torch did not finish)")
        if case["batch"] >= 250:
            peak = ph.get("peak_rss_bytes") or 0
            notes.append(f"posthoc peak {'<' if peak < 4 * 2**30 else '≥'} 4 GB: "
                         f"{'met' if peak < 4 * 2**30 else 'not met'}")
        return "; ".join(notes)
    return ""


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
    p.add_argument("--name", default=RESULT_STEM, help="file stem of the results")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def library_versions(libs: list[str]) -> dict[str, str]:
    """posthoc's versions, plus laplace-torch's and its backends' when laplace-torch is among ``libs``.

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
                    raise SystemExit("laplace-torch is not installed in this environment; see benchmarks/README.md")
    return lib_versions


def case_spec(args: argparse.Namespace, tmp: Path, lib: str, case: dict[str, Any]) -> dict[str, Any]:
    """What the child process of ``lib`` on ``case`` reads: settings and the files under ``tmp`` it reads and
    writes (a predictive case reads the state and summary its fit case wrote)."""
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
    """Reference: the MAP forward pass at batch 250 (and the memory floor of a case process: torch, model,
    data). Returns its child result and its throughput (test points / s; None if it did not run)."""
    base = run_child({**case_spec(args, tmp, "map", {"structure": "map", "kind": "glm", "batch": 250}),
                      "lib": "map"}, timeout=300, mem_limit=mem_limit)
    map_thr = _throughput(base)
    print(f"  MAP forward: {map_thr or float('nan'):.4g} pts/s at batch 250; process floor "
          f"{_fmt_bytes(base.get('peak_rss_bytes'))}", flush=True)
    return base, map_thr


def run_cases(args: argparse.Namespace, tmp: Path, cases: list[dict[str, Any]], libs: list[str],
              data_info: dict[str, Any], mem_limit: int) -> dict[str, dict[str, Any]]:
    """Every case of every library, each in its own process: fits first (each --repeats times, libraries
    alternating), so each predictive loads the state its fit saved. Returns the results by case_id."""
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
        print(_cell(res, case["kind"], n_test), flush=True)
    return results


def run_references(args: argparse.Namespace, tmp: Path, cases: list[dict[str, Any]], data_info: dict[str, Any],
                   mem_limit: int) -> dict[str, Any]:
    """float64 reference (posthoc, fitted on the same data) of each predictive's structure for the first
    n_compare test points; none for --no-reference or a float64 run. Returns {structure: {result, cov}}."""
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
    """posthoc vs laplace-torch on the same test points / the same fit, and each side's float32 covariances
    against the float64 reference; keyed by case_name."""
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


def report_rows(cases: list[dict[str, Any]], results: dict[str, dict[str, Any]], comparisons: dict[str, Any],
                map_thr: float | None, n_test: int) -> list[dict[str, str]]:
    """One table row per case: both sides' cells, their ratio, and the notes (goals, differences)."""
    rows = []
    for case in cases:
        ph = results.get(case_id("posthoc", case))
        lt = results.get(case_id("laplace-torch", case))
        notes = [goal_note(case, ph, lt, n_test)]
        cmp = comparisons.get(case_name(case))
        if cmp and "max_abs" in cmp:
            notes.append(f"cov diff on {cmp['n_points']} pts: max abs {cmp['max_abs']:.2e}, rel "
                         f"{cmp['max_rel_normwise']:.2e} (variances {cmp['max_rel_variance']:.2e})")
        for lib in ("posthoc", "laplace-torch"):
            ref = (cmp or {}).get(f"{lib}_vs_float64")
            if ref:
                notes.append(f"{lib} vs float64 reference: rel {ref['max_rel_normwise']:.2e} "
                             f"(variances {ref['max_rel_variance']:.2e})")
        if cmp and "kron_eigenvalues_max_rel_normwise_per_block" in cmp:
            notes.append(f"KFAC spectra max rel diff {max(cmp['kron_eigenvalues_max_rel_normwise_per_block']):.2e}")
        elif cmp and isinstance(cmp.get("kron_eigenvalues"), str):
            notes.append("KFAC block shapes differ")
        if cmp and "posterior_variance" in cmp:
            notes.append(f"posterior variance max rel diff {cmp['posterior_variance']['max_rel_elementwise']:.2e}")
        for lib, r in (("posthoc", ph), ("laplace-torch", lt)):
            if r and r.get("note"):
                notes.append(f"{lib}: {r['note']}")
        if case["kind"] == "glm" and map_thr and ph and _throughput(ph):
            notes.append(f"posthoc = {map_thr / _throughput(ph):.3g}× the MAP forward time")
        rows.append({"case": case_name(case), "posthoc": _cell(ph, case["kind"], n_test),
                     "laplace-torch": _cell(lt, case["kind"], n_test), "ratio": ratio_cell(case, ph, lt),
                     "notes": "; ".join(n for n in notes if n)})
    return rows


def results_table(rows: list[dict[str, str]]) -> list[str]:
    """The markdown table of the rows, one line each (header and rule first)."""
    header = "| case | posthoc | laplace-torch | ratio (posthoc / laplace-torch) | notes |"
    table = [header, "|---|---|---|---|---|"]
    table += [f"| {r['case']} | {r['posthoc']} | {r['laplace-torch']} | {r['ratio']} | {r['notes']} |" for r in rows]
    return table


def render_markdown(args: argparse.Namespace, table: list[str], model_info: dict[str, Any],
                    data_info: dict[str, Any], base: dict[str, Any], map_thr: float | None,
                    results: dict[str, dict[str, Any]], machine: dict[str, Any], lib_versions: dict[str, str],
                    cmd: str, started: str) -> str:
    """The results page: setup, table, how each case ran, load average, goals, command, machine, versions."""
    n_test = data_info["n_test"]
    loads = [r[k] for r in results.values() for k in ("loadavg_start", "loadavg_end") if k in r]
    load_line = (f"1-minute load average at the starts and ends of the case processes: {min(loads):.2f} to "
                 f"{max(loads):.2f} on {machine['cpu_count']} cores (above the core count, other processes "
                 "were competing for the CPU and the timings are slower than on an idle machine)."
                 if loads else "")
    md = [
        "# posthoc vs laplace-torch on the FMNIST CNN",
        "",
        f"Model: FMNISTCNN, {model_info['n_params']:,} parameters, {args.dtype}; {model_info['weights']}. "
        f"Curvature data: N = {data_info['n_train']:,} ({data_info['suite']}; {data_info['train_order']}), "
        f"loader batch {args.fit_batch_size}. Predictive: the first {n_test} FMNIST test images. "
        f"Both sides: subset_of_weights={args.subset!r}, exact GGN, prior precision 1.0 (scalar), classification. "
        "laplace-torch: `Laplace(model, 'classification', subset_of_weights=..., hessian_structure=..., "
        "backend=CurvlinopsGGN)` (its default backend; KFAC through curvlinops' KFACLinearOperator, "
        "kfac_approx 'expand'), covariance from `la._glm_predictive_distribution(x)[1]` (B, C, C). "
        "posthoc: `posthoc.Laplace(..., prior_precision=1.0)`, covariance `la.predict(x, pred_type='glm').cov` "
        "(kron: kfac_approx 'expand', its default).",
        "",
        "\n".join(table),
        "",
        f"Each case ran in a fresh process (RLIMIT_AS {args.mem_limit_gb:g} GiB, fits timed out after "
        f"{args.fit_timeout:g} s, {args.threads} torch threads). Peak = ru_maxrss of that process, which includes "
        f"the floor of torch + model + data ({_fmt_bytes(base.get('peak_rss_bytes'))} for the MAP forward "
        "process). A glm case loads the state saved by its fit case, so its peak is the predictive's own; it "
        f"predicts until {args.predict_budget:g} s are spent and the throughput is then extrapolated from the "
        f"points done (said in the cell). MAP forward pass: {map_thr or float('nan'):.4g} test points / s at batch "
        "250. Covariance differences: max |posthoc − laplace-torch| over the first "
        f"{args.n_compare} test points' (C, C) covariances; 'rel' divides by the largest |entry| of laplace-torch's; "
        "'variances' is the largest elementwise relative difference of the diagonals."
        + (f" Each fit case ran {args.repeats} times, the libraries alternating (posthoc, laplace-torch, posthoc, "
           "...); its ratio is the median of the ratios of the adjacent pairs, so that a drift of the machine's "
           "speed during the run affects both sides of a pair alike." if args.repeats > 1 else ""),
        "",
        load_line,
        "",
        "Goals (issue 3): " + "; ".join(GOALS.values()) + ".",
        "",
        f"Command: `{cmd}`. Started {started}.",
        "",
        f"Machine: {json.dumps(machine)}.",
        "",
        f"Versions: {json.dumps(lib_versions)}.",
        "",
    ]
    return "\n".join(md)


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

    from posthoc.bench.report import machine_info

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
    cmd = ("python benchmarks/laplace_vs_laplace_torch.py " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    text = render_markdown(args, table, model_info, data_info, base, map_thr, results, machine, lib_versions, cmd,
                           started)
    print()
    print("\n".join(table))
    payload = {"created": started, "command": cmd, "machine": machine, "versions": lib_versions,
               "model": model_info, "data": data_info, "settings": {k: v for k, v in vars(args).items()
                                                                     if k != "child"},
               "map_forward": base, "results": results, "comparisons": comparisons,
               "float64_reference": {k: v["result"] for k, v in references.items()}, "rows": rows,
               "goals": GOALS}
    write_outputs(args.out_dir, args.name, text, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
