"""Cases and the results page of benchmarks/laplace_vs_laplace_torch.py (not a script).

Case names, the table cells, ratios against laplace-torch, the goals and the markdown page.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from laplace_vs_laplace_torch_child import OK, OOM, SKIPPED, TIMEOUT

# What laplace-torch 0.3 did on the same setting (issue 3), for the goals.
GOALS = {
    "fit_kron": "posthoc ≤ 0.5× laplace-torch's time",
    "glm": "posthoc ≥ 10× laplace-torch's throughput, peak memory < 4 GB at batch 250",
    "fit_diag": "posthoc under 60 s",
    "same": "same posterior (covariance difference small)",
}


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
            raise SystemExit(f"bad case {item!r}: use STRUCTURE:fit or STRUCTURE:glm@BATCH, e.g. kron:glm@10") from None
    return cases


def case_name(case: dict[str, Any]) -> str:
    return f"{case['structure']} fit" if case["kind"] == "fit" else f"{case['structure']} glm @ batch {case['batch']}"


def case_id(lib: str, case: dict[str, Any]) -> str:
    tail = "fit" if case["kind"] == "fit" else f"glm{case['batch']}"
    return f"{lib}-{case['structure']}-{tail}"


# --------------------------------------------------------------------------- report
def fmt_bytes(b: float | None) -> str:
    """Bytes as GB with two decimals; "—" for None."""
    return "—" if b is None else f"{b / 2**30:.2f} GB"


def result_cell(res: dict[str, Any] | None, kind: str, n_test: int) -> str:
    """The table cell of one side's result: time or throughput and peak memory, or how it failed."""
    if res is None:
        return "—"
    status = res["status"]
    mem = fmt_bytes(res.get("peak_rss_bytes"))
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


def throughput(res: dict[str, Any] | None) -> float | None:
    """Test points per second of a result; None when it did no points."""
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
        if len(ea) != len(eb) or any(x.shape != y.shape for x, y in zip(ea, eb, strict=True)):
            out["kron_eigenvalues"] = "block shapes differ: " + str([tuple(x.shape) for x in ea]) + " vs " + \
                str([tuple(y.shape) for y in eb])
        else:
            per_block = [float((x.double() - y.double()).abs().max() / y.double().abs().max().clamp_min(1e-300))
                         for x, y in zip(ea, eb, strict=True)]
            out["kron_eigenvalues_max_rel_normwise_per_block"] = per_block
    if "posterior_variance" in a and "posterior_variance" in b:
        out["posterior_variance"] = compare_tensors(a["posterior_variance"], b["posterior_variance"])
    return out


def fit_ratios(ph: dict[str, Any], lt: dict[str, Any]) -> list[float]:
    """Posthoc / laplace-torch fit time of each interleaved pair of runs where both finished.

    One pair without --repeats; a repetition that failed is None in ``repeat_seconds`` and drops its pair.
    """
    a, b = ph.get("repeat_seconds", [ph["seconds"]]), lt.get("repeat_seconds", [lt["seconds"]])
    return [x / y for x, y in zip(a, b, strict=True) if x is not None and y is not None]


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
    tp, tl = throughput(ph), throughput(lt)
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
        tp, tl = throughput(ph), throughput(lt)
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
        if case["kind"] == "glm" and map_thr and ph and throughput(ph):
            notes.append(f"posthoc = {map_thr / throughput(ph):.3g}× the MAP forward time")
        rows.append({"case": case_name(case), "posthoc": result_cell(ph, case["kind"], n_test),
                     "laplace-torch": result_cell(lt, case["kind"], n_test), "ratio": ratio_cell(case, ph, lt),
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
        f"the floor of torch + model + data ({fmt_bytes(base.get('peak_rss_bytes'))} for the MAP forward "
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
