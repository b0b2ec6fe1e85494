"""The floor under Streamlined's cost on an MLP: the same diagonal-mode arithmetic written out by hand (issue 16).

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/streamlined_floor.py

posthoc's ``MLP(784)`` (784-200-200-10, random init, seed 0, eval mode, float32) with a diagonal posterior over
every parameter (variance 1e-4; the values do not change the cost), batch ``--batch``, one thread. Three calls,
alternated in one process for ``--rounds`` rounds (a block of each per round, MAP first):

- MAP: ``model(x)`` under no_grad.
- by hand: the products and element-wise passes of Streamlined's diagonal mode for this network and nothing else
  (no graph walk, no checks, every weight-derived matrix built beforehand): first layer mean W x + b and variance
  S x² + s (its input is deterministic); each activation μ ← g(μ), σ² ← g'(μ)² σ²; each hidden Linear with a random
  input S (μ² + σ²) + s plus W̄² σ² (two products); the last layer's (B, C, C) covariance as one product with the
  (2K, C²) matrix that Streamlined builds once per posterior (``LinearStep._fused_cov``). The output is checked
  against Streamlined's before timing (same mean, covariance within float32 round-off).
- Streamlined: ``Streamlined(model, weight_var=...).predict(x)``.

x MAP is the median call time over the median MAP time of the same process; per round, each block's median over
the MAP block's. The gap between the by-hand and the Streamlined rows is the walk's cost (graph walk, rule lookup,
input and output checks, caches); the by-hand row is what any implementation of these rules pays in products and
element-wise passes. Writes benchmarks/results/streamlined_floor.{md,json} (machine and versions in meta).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from posthoc.bench.report import run_meta, write_json
from posthoc.models import MLP
from posthoc.streamlined import Streamlined
from posthoc.utils.io import atomic_write_text

sys.path.insert(0, str(Path(__file__).resolve().parent))
from streamlined_cost import time_calls  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
WEIGHT_VAR = 1e-4
GOAL_X_MAP = 3.0


def activation_and_slope(name: str) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """g(z) and g'(z) for the MLP's activation."""
    if name == "tanh":
        def tanh(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            t = torch.tanh(z)
            return t, 1 - t * t
        return tanh
    if name == "relu":
        def relu(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.relu(z), (z > 0).to(z.dtype)
        return relu
    raise ValueError(f"unknown activation {name!r}")


def by_hand(model: MLP, variances: dict[str, torch.Tensor], activation: str
            ) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The diagonal-mode propagation of ``model`` written out: x (B, 784) -> mean (B, C), covariance (B, C, C)."""
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    names = [n for n, m in model.named_children() if isinstance(m, torch.nn.Linear)]
    w = [m.weight.detach() for m in linears]
    b = [m.bias.detach() for m in linears]
    s_w = [variances[f"{n}.weight"] for n in names]
    s_b = [variances[f"{n}.bias"] for n in names]
    w_sq = [t.square() for t in w]
    g = activation_and_slope(activation)
    # the last layer's fused matrix: rows (c, d) = W̄_c ⊙ W̄_d + δ_cd S_c over [σ², μ²]
    wl, sl = w[-1], s_w[-1]
    c, k = wl.shape
    eye = torch.eye(c, dtype=wl.dtype)
    on_diagonal = (eye.unsqueeze(2) * sl.unsqueeze(1)).reshape(c * c, k)
    fused = torch.cat([(wl.unsqueeze(1) * wl.unsqueeze(0)).reshape(c * c, k) + on_diagonal, on_diagonal], dim=1)
    fused_bias = (eye * s_b[-1]).reshape(c * c)

    @torch.no_grad()
    def call(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = x.flatten(1)
        mu, var = F.linear(a, w[0], b[0]), F.linear(a.square(), s_w[0], s_b[0])
        for i in range(1, len(w) - 1):
            mu, slope = g(mu)
            var = var * slope * slope
            out = F.linear(torch.addcmul(var, mu, mu), s_w[i], s_b[i])
            out.addmm_(var, w_sq[i].T)
            mu, var = F.linear(mu, w[i], b[i]), out
        mu, slope = g(mu)
        var = var * slope * slope
        mean = F.linear(mu, w[-1], b[-1])
        cov = F.linear(torch.cat([var, mu.square()], dim=1), fused, fused_bias).view(-1, c, c)
        return mean, cov

    return call


def run(activation: str, batch: int, rounds: int, min_calls: int, block_seconds: float) -> dict[str, Any]:
    """One (activation, batch) case: medians, ratios and per-round ratios."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = MLP(784, (200, 200), 10, activation).eval()
    x = torch.rand(batch, 1, 28, 28)
    variances = {n: torch.full_like(p, WEIGHT_VAR) for n, p in model.named_parameters()}
    sp = Streamlined(model, weight_var=variances)
    hand = by_hand(model, variances, activation)
    pred = sp.predict(x)
    mean, cov = hand(x)
    with torch.no_grad():
        reference = model(x)
    if not torch.equal(mean, reference) or not torch.allclose(pred.mean, mean, rtol=1e-5, atol=1e-6):
        raise AssertionError("the by-hand mean differs from model(x) or from Streamlined's")
    cov_error = float((pred.cov - cov).abs().max() / cov.abs().max())
    if cov_error > 1e-4:
        raise AssertionError(f"the by-hand covariance differs from Streamlined's (relative {cov_error:.1e})")

    def map_call() -> None:
        with torch.no_grad():
            model(x)

    calls = {"map": map_call, "by_hand": lambda: hand(x), "streamlined": lambda: sp.predict(x)}
    for call in calls.values():  # warm-up
        time_calls(call, min_calls, block_seconds)
    times: dict[str, list[float]] = {name: [] for name in calls}
    per_round: dict[str, list[float]] = {"by_hand": [], "streamlined": []}
    for _ in range(rounds):
        block = {name: time_calls(call, min_calls, block_seconds) for name, call in calls.items()}
        for name, ts in block.items():
            times[name] += ts
        for name in per_round:
            per_round[name].append(statistics.median(block[name]) / statistics.median(block["map"]))
    med = {name: statistics.median(ts) for name, ts in times.items()}
    return {"activation": activation, "batch": batch, "rounds": rounds, "cov_relative_difference": cov_error,
            "seconds": med, "calls": {name: len(ts) for name, ts in times.items()},
            "x_map": {"by_hand": med["by_hand"] / med["map"], "streamlined": med["streamlined"] / med["map"]},
            "per_round_x_map": per_round,
            "walk_seconds": med["streamlined"] - med["by_hand"]}


def write_report(rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    lines = ["# Streamlined on an MLP against the same arithmetic written by hand (issue 16's cost floor)", "",
             f"Machine: {meta['machine']}; versions: {meta['versions']}; commit {meta['git_commit']}. "
             "Script: benchmarks/streamlined_floor.py (its docstring says what each call does). "
             f"posthoc MLP(784) 784-200-200-10, diagonal posterior over every parameter, float32, one thread. "
             f"Goal (issue 16): Streamlined <= {GOAL_X_MAP}x the MAP forward.", "",
             "| activation | batch | MAP µs | by hand µs | Streamlined µs | by hand x MAP | Streamlined x MAP | "
             "per-round x MAP, by hand (range) | per-round x MAP, Streamlined (range) | walk µs |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s, pr = r["seconds"], r["per_round_x_map"]
        lines.append(
            f"| {r['activation']} | {r['batch']} | {s['map'] * 1e6:.0f} | {s['by_hand'] * 1e6:.0f} | "
            f"{s['streamlined'] * 1e6:.0f} | {r['x_map']['by_hand']:.2f} | {r['x_map']['streamlined']:.2f} | "
            f"{statistics.median(pr['by_hand']):.2f} ({min(pr['by_hand']):.2f}-{max(pr['by_hand']):.2f}) | "
            f"{statistics.median(pr['streamlined']):.2f} ({min(pr['streamlined']):.2f}-"
            f"{max(pr['streamlined']):.2f}) | {r['walk_seconds'] * 1e6:.0f} |")
    lines += ["", meta.get("note", ""), ""]
    atomic_write_text(RESULTS / "streamlined_floor.md", "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--activations", nargs="+", default=["tanh", "relu"], choices=["tanh", "relu"])
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--min-calls", type=int, default=50)
    parser.add_argument("--block-seconds", type=float, default=0.3)
    parser.add_argument("--note", default="", help="a reading of the results, kept in the report")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the markdown from the JSON with this --note, measuring nothing")
    args = parser.parse_args()
    if args.report_only:
        payload = json.loads((RESULTS / "streamlined_floor.json").read_text())
        payload["meta"]["note"] = args.note
        write_json(RESULTS / "streamlined_floor.json", payload)
        write_report(payload["rows"], payload["meta"])
        return
    rows = [run(a, b, args.rounds, args.min_calls, args.block_seconds) for a in args.activations for b in args.batches]
    meta = {**run_meta(), "weight_var": WEIGHT_VAR, "note": args.note}
    write_json(RESULTS / "streamlined_floor.json", {"meta": meta, "rows": rows})
    write_report(rows, meta)
    for r in rows:
        print(r["activation"], r["batch"], {k: round(v, 2) for k, v in r["x_map"].items()},
              f"walk {r['walk_seconds'] * 1e6:.0f} us")


if __name__ == "__main__":
    main()
