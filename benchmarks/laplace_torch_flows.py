#!/usr/bin/env python
"""laplace-torch's documented flows, run on laplace-torch 0.3 and on posthoc with only the import changed.

Each flow of laplace-torch's docs and examples (regression with the marglik hyperparameter loop, marglik
training, calibration, reward modelling, Bayesian optimisation, continual learning, subnetworks, Hugging Face
with LoRA, the function-space LA) is written once in benchmarks/laplace_torch_flows_cases.py as
``flow(lib, data, record)``, re-created on local data (the sinusoid, the FMNIST CNN on posthoc's embedded data,
a config-built GPT-2; benchmarks/laplace_torch_flows_extra.py adds reward modelling (all weights and the last
layer), the Kronecker ``posterior_precision`` and the grid search with a ``loss``). It runs twice: with ``lib`` holding ``laplace``, ``laplace.utils``, ``laplace.curvature``,
and with ``lib`` holding ``posthoc.compat.laplace`` and its ``utils`` / ``curvature``; same weights, data and
seeds. Deterministic quantities are compared by their largest relative difference, Monte Carlo ones (draws)
by the z-score of their sample means and variances; integer ones (subnetwork positions) must be equal. A flow
that fails on one side is a row with its error.

Needs both libraries: run it with the .venv-bench environment of benchmarks/README.md, from the repository root:

    OMP_NUM_THREADS=1 nice -n 5 .venv-bench/bin/python benchmarks/laplace_torch_flows.py   # a few minutes

Each (flow, library) result is cached under runs/laplace_torch_flows/ (``--force`` recomputes), as is the FMNIST
CNN's MAP. Results: benchmarks/results/laplace_torch_flows.{json,md}.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from laplace_torch_flows_cases import FLOWS, Library, Record, build_data, build_hf  # noqa: E402
from laplace_torch_flows_extra import EXTRA_FLOWS  # noqa: E402

FLOWS = {**FLOWS, **EXTRA_FLOWS}

REPO = Path(__file__).resolve().parents[1]
LIBRARIES = ("laplace-torch", "posthoc")
DET_RTOL = 1e-4        # deterministic quantities: |a - b| <= DET_RTOL * max(|a|, |b|, FLOOR * max|a|)
LOOP_RTOL = 1e-3       # the same after a long optimisation loop (marglik training: 300 epochs of Adam in float32)
LOOP_FLOWS = ("marglik_training",)
FLOAT32_ONLY = ("huggingface_lora",)   # the GPT-2 flow runs as documented, in float32 only
FLOOR = 1e-3
MC_LEVEL = 0.0027      # two-sided level of "3 standard errors", Bonferroni-corrected over the D compared entries
# Differences traced to their cause (see the notes of the results page): (flow, quantity prefix) -> note.
EXPLAINED = {
    ("regression_marglik", "kron:"): "laplace-torch bug [1]",
}
NOTES = (
    "[1] laplace-torch 0.3's KronDecomposed.__mul__ (laplace/utils/matrix.py) scales the eigenvalues by "
    "math.pow(1/sigma^2, 1/2) (`from math import pow`), which turns the tensor into a Python float: the log "
    "determinant of the Kronecker posterior precision carries no gradient to sigma_noise. Its autograd "
    "d logZ/d sigma misses that term (the 'd logZ / d sigma (autograd)' row; laplace-torch's own central finite "
    "difference agrees with posthoc's autograd value), so the documented Adam loop on (log delta, log sigma) "
    "walks elsewhere and the tuned hyperparameters, marglik and variances differ. At the same (delta, sigma) the "
    "two libraries' kron marglik agree: its finite differences in delta and sigma and its autograd gradient in "
    "delta are equal (rows above).",
    "[2] The reward network here runs on the (2B, d) items of B pairs. laplace-torch's KFAC (curvlinops, "
    "expand) takes the 2B item rows as the layer's batch: G = sum over pairs n and items i of Lambda_n[i, i] "
    "(Lambda_n = diag p_n - p_n p_n^T), A = (sum over the 2N item rows of a a^T) / N with N the number of pairs, "
    "which is exactly 2 x the A of the same weights written with the pair axis kept ('pair axis' rows: KFAC-expand "
    "over the pair's two items, A / 2N, in both libraries). posthoc.compat.laplace's 'kron' reads such rows as "
    "laplace-torch does (structure_options={'item_rows': True}), so the 'kron' rows agree; posthoc's own Laplace "
    "gives a layer whose output is not one row per example its exact diagonal GGN block instead, with a warning "
    "naming the layer (posthoc.curvature.kfac).",
    "[3] laplace-torch 0.3 fails on a reward model's last layer where the rows say 'missing on laplace-torch' and "
    "the 'fails' rows give its error: hessian_structure='diag' and la(pairs, fitting=True), on both ways of "
    "writing the network (its last-layer Jacobians are taken on the last layer's own output, 2B item rows or "
    "(B, 2, 1), not on the model's (B, 2) pair logits). posthoc's values there are checked in float64 against "
    "torch.func.jacrev references in tests/compat/test_reward_last_layer.py.",
)
SETUP_HINT = ("laplace-torch is not importable: run this script with the .venv-bench environment whose setup "
              "benchmarks/README.md gives (under laplace_vs_laplace_torch.py; add `pip install transformers peft` "
              "for the Hugging Face flow), e.g. .venv-bench/bin/python benchmarks/laplace_torch_flows.py")


def load_library(name: str) -> Library:
    """The modules ported code imports: laplace-torch's ``laplace`` or posthoc's mirror ``posthoc.compat.laplace``.

    Raises:
        SystemExit: laplace-torch is not importable (naming the .venv-bench setup).
    """
    if name == "laplace-torch":
        try:
            import laplace
            import laplace.curvature
            import laplace.utils
        except ImportError as error:
            raise SystemExit(f"{SETUP_HINT} ({error})") from error
        return Library(name, laplace, laplace.utils, laplace.curvature)
    import posthoc.compat.laplace
    import posthoc.compat.laplace.curvature
    import posthoc.compat.laplace.utils
    return Library(name, posthoc.compat.laplace, posthoc.compat.laplace.utils, posthoc.compat.laplace.curvature)


# --------------------------------------------------------------------------- comparison
def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """max_i |a_i - b_i| / max(|a_i|, |b_i|, FLOOR * max|a|): relative per entry, absolute near zero. O(D)."""
    scale = FLOOR * float(torch.maximum(a.abs().max(), b.abs().max()))
    denominator = torch.maximum(torch.maximum(a.abs(), b.abs()), torch.full_like(a, max(scale, 1e-300)))
    return float(((a - b).abs() / denominator).max())


def mc_threshold(n_entries: int) -> float:
    """The z beyond which one of ``n_entries`` independent entries lies with probability MC_LEVEL (3 for one)."""
    tail = MC_LEVEL / 2 / max(n_entries, 1)
    return float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(1 - tail, dtype=torch.float64)))


def mc_z_scores(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Largest z-scores between two sets of draws (S_a, D), (S_b, D): of the means and of the variances.

    The standard error of a mean is std / sqrt(S); of a variance, std((x - mean)^2) / sqrt(S) (no Gaussian
    assumption). Entries with no spread on both sides count as z = 0 when equal. O(S D).
    """
    def z(stat_a: torch.Tensor, se_a: torch.Tensor, stat_b: torch.Tensor, se_b: torch.Tensor) -> float:
        se = (se_a.square() + se_b.square()).sqrt()
        gap = (stat_a - stat_b).abs()
        scores = torch.where(se > 0, gap / se.clamp_min(1e-300), torch.where(gap > 0, math.inf, 0.0))
        return float(scores.max())

    def moments(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n = x.shape[0]
        mean = x.mean(0)
        centred_sq = (x - mean).square()
        return mean, x.std(0) / math.sqrt(n), centred_sq.mean(0), centred_sq.std(0) / math.sqrt(n)

    mean_a, se_mean_a, var_a, se_var_a = moments(a)
    mean_b, se_mean_b, var_b, se_var_b = moments(b)
    return {"mean": z(mean_a, se_mean_a, mean_b, se_mean_b), "variance": z(var_a, se_var_a, var_b, se_var_b)}


def summary(value: torch.Tensor) -> str:
    """A cell: the value of a scalar, else the mean and size of a vector."""
    if value.numel() == 1:
        return f"{float(value):.6g}"
    return f"mean {float(value.double().mean()):.6g} (n={value.numel()})"


def float32_noise_explains(a: torch.Tensor, b: torch.Tensor, a64: torch.Tensor, b64: torch.Tensor,
                           rtol: float) -> bool:
    """Whether the float32 gap |a - b| is float32 noise (each library's own float32 error explains it).

    Per entry, |a - b| must be at most twice the larger of the two libraries' distances to their float64 results
    (plus rtol), and the float64 results must agree within rtol. O(D).
    """
    if relative_difference(a64, b64) > rtol:
        return False
    own_error = torch.maximum((a - a64).abs(), (b - b64).abs())
    scale = FLOOR * float(torch.maximum(a.abs().max(), b.abs().max()))
    slack = rtol * torch.maximum(torch.maximum(a.abs(), b.abs()), torch.full_like(a, max(scale, 1e-300)))
    return bool(((a - b).abs() <= 2 * own_error + slack).all())


def compare_flow(flow: str, results: dict[str, dict[str, Any]],
                 results64: dict[str, dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The table rows of one flow from both libraries' float32 results and, where run, their float64 twins.

    Each result holds det, mc, exact, notes, error and seconds (see :func:`run_one`).
    """
    ref, ours = results["laplace-torch"], results["posthoc"]
    ref64, ours64 = (results64["laplace-torch"], results64["posthoc"]) if results64 else ({}, {})
    rows: list[dict[str, Any]] = []

    def row(quantity: str, left: str, right: str, diff: str, diff64: str, verdict: str) -> None:
        rows.append({"flow": flow, "quantity": quantity, "laplace-torch": left, "posthoc": right, "diff": diff,
                     "diff_float64": diff64, "verdict": verdict})

    for precision, pair in (("float32", (ref, ours)), ("float64", (ref64, ours64))):
        for side, result in zip(LIBRARIES, pair, strict=True):
            if result.get("error"):
                row(f"error ({precision})", result["error"] if side == "laplace-torch" else "",
                    result["error"] if side == "posthoc" else "", "", "", f"{side} fails")
    rtol = LOOP_RTOL if flow in LOOP_FLOWS else DET_RTOL
    names = list(dict.fromkeys([*ref["det"], *ours["det"]]))
    def explained(name: str, verdict: str) -> str:
        for (known_flow, prefix), note in EXPLAINED.items():
            if flow == known_flow and name.startswith(prefix) and verdict.startswith("DIFFERS"):
                return f"{verdict}: {note}"
        return verdict

    for name in names:
        a, b = ref["det"].get(name), ours["det"].get(name)
        if a is None or b is None:
            row(name, summary(a) if a is not None else "—", summary(b) if b is not None else "—", "", "",
                f"missing on {'laplace-torch' if a is None else 'posthoc'}")
            continue
        if a.shape != b.shape:
            row(name, summary(a), summary(b), "", "", f"shape {tuple(a.shape)} vs {tuple(b.shape)}")
            continue
        rel = relative_difference(a, b)
        a64, b64 = ref64.get("det", {}).get(name), ours64.get("det", {}).get(name)
        have64 = a64 is not None and b64 is not None and a64.shape == a.shape == b64.shape
        rel64 = relative_difference(a64, b64) if have64 else None
        if rel <= rtol:
            verdict = "equal"
        elif have64 and float32_noise_explains(a, b, a64, b64, rtol):
            verdict = "equal in float64; float32 gap = float32 noise"
        else:
            verdict = f"DIFFERS (> {rtol:g})"
        row(name, summary(a), summary(b), f"rel {rel:.1e}", "—" if rel64 is None else f"rel {rel64:.1e}",
            explained(name, verdict))
    for name in ref["mc"]:
        if name not in ours["mc"]:
            row(name, "drawn", "—", "", "", "missing on posthoc")
            continue
        a, b = ref["mc"][name], ours["mc"][name]
        if a.shape[1:] != b.shape[1:]:
            row(name, str(tuple(a.shape)), str(tuple(b.shape)), "", "", "shape differs")
            continue
        scores, limit = mc_z_scores(a, b), mc_threshold(a.shape[1])
        a64, b64 = ref64.get("mc", {}).get(name), ours64.get("mc", {}).get(name)
        scores64 = mc_z_scores(a64, b64) if a64 is not None and b64 is not None else None
        for stat, score in scores.items():
            row(f"{name} [{stat}]", summary(a.mean(0) if stat == "mean" else a.var(0)),
                summary(b.mean(0) if stat == "mean" else b.var(0)), f"max z {score:.2f} (limit {limit:.2f})",
                "—" if scores64 is None else f"max z {scores64[stat]:.2f}",
                "equal (MC)" if score <= limit else
                "equal in float64 (MC); float32 gap = float32 noise of the posterior"
                if scores64 is not None and scores64[stat] <= limit else "DIFFERS (MC)")
    for name in ref["exact"]:
        a, b = ref["exact"][name], ours["exact"].get(name)
        equal = b is not None and a.shape == b.shape and bool((a == b).all())
        row(name, f"{a.numel()} positions", "—" if b is None else f"{b.numel()} positions", "", "",
            "identical" if equal else "DIFFERS")
    for name in sorted(set(ref["notes"]) | set(ours["notes"])):
        row(name, ref["notes"].get(name, "—"), ours["notes"].get(name, "—"), "", "", "info")
    return rows


# --------------------------------------------------------------------------- running
def fmnist_cnn(run_dir: Path, epochs: int) -> tuple[torch.nn.Module, Any, Any]:
    """The FMNIST CNN's MAP on the embedded suite (``epochs`` of Adam, cached in ``run_dir``), its train and test sets."""
    from torch.utils.data import DataLoader

    from posthoc.data import get_suite
    from posthoc.models.cnn import FMNISTCNN

    suite = get_suite("fmnist-embedded")
    torch.manual_seed(0)
    model = FMNISTCNN()
    path = run_dir / f"fmnist_cnn_{epochs}ep.pt"
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        loader = DataLoader(suite.train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
        for _ in range(epochs):
            for x, y in loader:
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()
        run_dir.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return model.eval(), suite.train, suite.test


def run_one(flow: str, lib: Library, data: Any, dtype: torch.dtype) -> dict[str, Any]:
    """One flow on one library, seeded, with ``dtype`` as torch's default; an exception becomes ``error``."""
    record = Record()
    torch.manual_seed(1234)
    start = time.perf_counter()
    error = None
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        FLOWS[flow](lib, data, record)
    except Exception as exc:  # a failing flow is a row of the table, not the end of the run
        first = str(exc).splitlines()[0] if str(exc) else ""
        error = f"{type(exc).__name__}: {first}"
        traceback.print_exc()
    finally:
        torch.set_default_dtype(default)
    return {"det": record.det, "mc": record.mc, "exact": record.exact, "notes": record.notes, "error": error,
            "seconds": time.perf_counter() - start}


def render_markdown(meta: dict[str, Any], rows: list[dict[str, Any]], seconds: dict[str, dict[str, float]]) -> str:
    """The results page: how the numbers were compared, then one table row per compared quantity."""
    lines = [
        "# laplace-torch's documented flows: laplace-torch 0.3 vs posthoc.compat.laplace (the import switched)",
        "",
        f"Run {meta['date']}, posthoc {meta['versions']['posthoc']}, torch {meta['versions']['torch']}, commit "
        f"{meta['git_commit']}; `{meta['command']}`.",
        "",
        "Each flow is one function run twice, with laplace-torch's modules and with posthoc's; same weights, data "
        "and seeds, in float32 as documented and again in float64 on the same weights ('difference in float64'; "
        "not the GPT-2 flow). A float32 gap is called float32 noise when the float64 results agree and each "
        "library's own float32-to-float64 distance explains it (per entry, gap <= 2 x the larger). Deterministic quantities: |a - b| <= rtol max(|a|, |b|, 1e-3 max|a|) per entry, rtol = "
        f"{DET_RTOL:g} ({LOOP_RTOL:g} after the {', '.join(LOOP_FLOWS)} loop). Monte Carlo draws: z-scores of the "
        "per-entry sample means and variances, limit 3 standard errors Bonferroni-corrected over the entries "
        "(two-sided level 0.0027 for the whole quantity). Positions (subnetwork masks) must be identical.",
        "",
        "| flow | quantity | laplace-torch | posthoc | difference | difference in float64 | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [r["flow"], r["quantity"], r["laplace-torch"], r["posthoc"], r["diff"], r["diff_float64"],
                 r["verdict"]]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    lines += ["", "Notes:", ""] + [f"- {note}" for note in NOTES]
    lines += ["", "Seconds per flow (laplace-torch / posthoc), one CPU thread:", ""]
    lines += [f"- {flow}: {t['laplace-torch']:.1f} / {t['posthoc']:.1f}" for flow, t in seconds.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Run the chosen flows on both libraries (cached per flow and library) and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flows", default=",".join(FLOWS), help="comma-separated, of: " + ", ".join(FLOWS))
    parser.add_argument("--run-dir", type=Path, default=REPO / "runs" / "laplace_torch_flows")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--cnn-epochs", type=int, default=2)
    parser.add_argument("--force", action="store_true", help="recompute cached (flow, library) results")
    args = parser.parse_args(argv)
    flows = [name.strip() for name in args.flows.split(",") if name.strip()]
    unknown = sorted(set(flows) - set(FLOWS))
    if unknown:
        parser.error(f"unknown flows {unknown}; choose from {', '.join(FLOWS)}")
    libraries = {name: load_library(name) for name in LIBRARIES}   # exits first when laplace-torch is missing
    torch.set_num_threads(1)
    from posthoc.bench.report import run_meta, write_json

    cache = args.run_dir / "results"
    cache.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {}
    all_rows, seconds = [], {}
    for flow in flows:
        results: dict[str, dict[str, Any]] = {"float32": {}, "float64": {}}
        for precision in ("float32",) if flow in FLOAT32_ONLY else ("float32", "float64"):
            for name, lib in libraries.items():
                path = cache / f"{flow}__{name}__{precision}.pt"
                if path.exists() and not args.force:
                    results[precision][name] = torch.load(path, weights_only=False)
                    continue
                if not data:
                    data["float32"] = build_data(*fmnist_cnn(args.run_dir, args.cnn_epochs),
                                                 hf=build_hf() if "huggingface_lora" in flows else None)
                    data["float64"] = data["float32"].to(torch.float64)
                print(f"[{flow}] {name} {precision} ...", flush=True)
                results[precision][name] = run_one(flow, lib, data[precision], getattr(torch, precision))
                torch.save(results[precision][name], path)
        seconds[flow] = {name: results["float32"][name]["seconds"] for name in LIBRARIES}
        rows = compare_flow(flow, results["float32"], results["float64"] or None)
        all_rows += rows
        for r in rows:
            print(f"  {r['quantity']}: {r['diff']} / {r['diff_float64']} {r['verdict']}", flush=True)
    meta = run_meta()
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "laplace_torch_flows.json", {"meta": meta, "det_rtol": DET_RTOL, "loop_rtol": LOOP_RTOL,
                                                        "mc_level": MC_LEVEL, "rows": all_rows, "notes": NOTES,
                                                        "seconds": seconds})
    (args.out / "laplace_torch_flows.md").write_text(render_markdown(meta, all_rows, seconds))


if __name__ == "__main__":
    main()
