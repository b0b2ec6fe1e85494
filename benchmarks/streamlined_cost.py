"""Cost of streamlined prediction vs the MAP forward pass, MC with 100 weight samples and glm.

    .venv/bin/python benchmarks/streamlined_cost.py [--batch 100] [--repeats 5] [--min-seconds 3] [--note TEXT]

Models: the FMNIST CNN (``--checkpoint``, else the cached 15-epoch MAP checkpoint of the training cache
if present, else fresh weights) and
SmallViT (fresh weights): cost does not depend on training. Inputs: the embedded FMNIST test
images. Posteriors: Laplace diag and kron over all weights, fitted on 64 training images (the
fit is not timed; its values do not change the cost). Each case runs in its own subprocess
so its peak memory is measured as the rise of the peak resident set (ru_maxrss) over the
resident set just before the timed calls. Time: median of at least ``--repeats`` calls and
``--min-seconds`` of calls, after one warm-up call, for one batch, in 3 blocks alternating with
blocks of the MAP forward on the same inputs in the same process (the × MAP column is that ratio). Writes benchmarks/results/streamlined_cost.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from posthoc.bench.checkpoints import find_map_checkpoint
from posthoc.bench.processes import run_limited
from posthoc.bench.report import run_meta, write_json
from posthoc.models.training import load_map_weights
from posthoc.utils.io import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"
CASES = {
    # name: (needs structure, description)
    "map": (None, "MAP forward pass"),
    "streamlined_diag": ("diag", "streamlined, diag posterior, diagonal mode"),
    "streamlined_kron": ("kron", "streamlined, KFAC posterior, diagonal mode"),
    "streamlined_diag_full": ("diag", "streamlined, diag posterior, full mode"),
    "streamlined_kron_full": ("kron", "streamlined, KFAC posterior, full mode"),
    "mc100_diag": ("diag", "MC, 100 weight samples, diag posterior"),
    "mc100_kron": ("kron", "MC, 100 weight samples, KFAC posterior"),
    "glm_diag": ("diag", "glm (linearised), diag posterior"),
    "glm_kron": ("kron", "glm (linearised), KFAC posterior"),
}
ROUNDS = 3  # blocks of MAP and case calls, alternating
FULL_BATCH = 8  # full mode: per-example D x D covariances; timed on this many inputs and scaled


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def time_calls(fn: Callable[[], object], min_calls: int, min_seconds: float) -> list[float]:
    """Wall times (s) of calls of ``fn``: at least ``min_calls`` calls and ``min_seconds`` of calls."""
    out: list[float] = []
    while len(out) < min_calls or sum(out) < min_seconds:
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def alternating_times(map_call: Callable[[], object], call: Callable[[], object], rounds: int, min_calls: int,
                      min_seconds: float) -> tuple[list[float], list[float]]:
    """(MAP times, case times): ``rounds`` blocks of each, alternating, MAP first and last, in this process.

    Each case block holds at least ``min_calls`` calls and ``min_seconds / rounds`` s, each MAP block at least
    ``min_calls`` calls and half that time; the x MAP ratio of their medians then does not carry the swings
    between processes and over time of a shared machine.
    """
    map_times: list[float] = []
    times: list[float] = []
    for _ in range(rounds):
        map_times += time_calls(map_call, min_calls, min_seconds / (2 * rounds))
        times += time_calls(call, min_calls, min_seconds / rounds)
    map_times += time_calls(map_call, min_calls, min_seconds / (2 * rounds))
    return map_times, times


def _model(name: str, checkpoint: str | None = None) -> torch.nn.Module:
    from posthoc.models import FMNISTCNN, SmallViT

    torch.manual_seed(0)
    if name == "fmnist_cnn":
        model = FMNISTCNN()
        try:
            model.load_state_dict(load_map_weights(find_map_checkpoint(checkpoint, ["fmnist_cnn-e15-*.pt"])))
        except Exception:  # noqa: BLE001 - fresh weights are as good for timing
            if checkpoint is not None:  # a checkpoint asked for by name must load
                raise
        return model.eval()
    return SmallViT().eval()


def run_case(model_name: str, case: str, batch: int, repeats: int, min_seconds: float,
             checkpoint: str | None = None) -> dict:
    from posthoc.data import get_suite
    from posthoc.laplace import Laplace
    from posthoc.streamlined import Streamlined

    suite = get_suite("fmnist-embedded")
    model = _model(model_name, checkpoint)
    x = suite.test.tensors[0][:batch].float()
    structure, _ = CASES[case]
    la = None
    if structure is not None:
        xt, yt = suite.train.tensors[0][:64].float(), suite.train.tensors[1][:64]
        la = Laplace(model, "classification", "all", structure, prior_precision=10.0, progress=False)
        la.fit([(xt[i:i + 32], yt[i:i + 32]) for i in range(0, 64, 32)])
    n_inputs = batch
    if case == "map":
        def call():
            with torch.no_grad():
                model(x)
    elif case.startswith("streamlined"):
        full = case.endswith("_full")
        sp = Streamlined(model, posterior=la, activation_covariance="full" if full else "diagonal",
                         max_full_dim=4096, batch_size=FULL_BATCH if full else None)
        if full:
            n_inputs = FULL_BATCH
        xs = x[:n_inputs]

        def call():
            sp.predict(xs)
    elif case.startswith("mc100"):
        def call():
            la.predict(x, pred_type="nn", n_samples=100, seed=0)
    else:
        def call():
            la.predict(x, pred_type="glm")
    rss0 = _rss_bytes()
    try:
        call()  # warm-up, and the peak memory of one call
    except MemoryError as err:
        return {"model": model_name, "case": case, "error": str(err)}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
    xm = x[:n_inputs]

    def map_call():
        with torch.no_grad():
            model(xm)

    # The MAP forward on the same inputs is timed in the same process, in blocks alternating with the case's: the
    # x MAP ratio then does not carry the 10-30 % swings between processes and over time seen here (a batch of 50
    # takes ~10 ms). (Alternating call by call let the memory-heavy cases slow the MAP call after each of them.)
    map_call()
    map_times, times = alternating_times(map_call, call, ROUNDS, max(1, repeats // ROUNDS), min_seconds)
    seconds, map_seconds = statistics.median(times), statistics.median(map_times)
    return {"model": model_name, "case": case, "inputs": n_inputs, "seconds": seconds, "calls": len(times),
            "ms_per_input": 1e3 * seconds / n_inputs, "map_ms_per_input": 1e3 * map_seconds / n_inputs,
            "x_map": seconds / map_seconds, "peak_mb": max(peak, 0) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5, help="at least this many timed calls")
    parser.add_argument("--note", default="", help="how quiet the machine was, written with the table")
    parser.add_argument("--min-seconds", type=float, default=3.0, help="and at least this much timed time")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "CASE"), help=argparse.SUPPRESS)
    parser.add_argument("--models", default="fmnist_cnn,vit")
    parser.add_argument("--checkpoint", default=None, help="MAP weights of the FMNIST CNN (default: the cached "
                        "15-epoch checkpoint of the training cache if present, else fresh weights: the cost does "
                        "not depend on them)")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_case(args.one[0], args.one[1], args.batch, args.repeats, args.min_seconds,
                                  args.checkpoint)))
        return
    rows = []
    for model_name in args.models.split(","):
        for case in CASES:
            proc = run_limited([sys.executable, __file__, "--one", model_name, case, "--batch", str(args.batch),
                                "--repeats", str(args.repeats), "--min-seconds", str(args.min_seconds)]
                               + (["--checkpoint", args.checkpoint] if args.checkpoint else []))
            if proc.returncode != 0:
                tail = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
                row = {"model": model_name, "case": case, "error": tail}
            else:
                row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(row, flush=True)
    for model_name in args.models.split(","):
        for structure in ("diag", "kron"):
            mc = next((r for r in rows if r["model"] == model_name and r["case"] == f"mc100_{structure}"
                       and "ms_per_input" in r), None)
            for r in rows:
                if r["model"] == model_name and r["case"].startswith(f"streamlined_{structure}") and mc \
                        and "ms_per_input" in r:
                    # both in units of their own process's MAP forward (the full mode runs on fewer inputs)
                    r["speedup_vs_mc100"] = mc["x_map"] / r["x_map"]
    run = run_meta()
    meta = {"date": run["date"], "platform": run["machine"]["platform"], "cpu_count": run["machine"]["cpu_count"],
            "python": run["versions"]["python"], "torch": run["versions"]["torch"],
            "threads": run["machine"]["torch_threads"], "run": run, "batch": args.batch, "full_mode_batch": FULL_BATCH,
            "repeats": args.repeats, "min_seconds": args.min_seconds, "dtype": "float32",
            "note": args.note}
    write_json(RESULTS / "streamlined_cost.json", {"meta": meta, "rows": rows})
    lines = ["# Streamlined prediction: cost", "",
             f"{meta['date']}, {meta['platform']}, {meta['cpu_count']} CPUs (shared), Python {meta['python']}, "
             f"torch {meta['torch']}, float32. Batch {args.batch} embedded FMNIST test images "
             f"(full mode: {FULL_BATCH}); median of at least {args.repeats} calls and {args.min_seconds:g} s after a "
             "warm-up; x MAP = median time over the median time of the MAP forward on the same inputs, timed "
             "in blocks alternating with the case's in the same process; speed-up vs MC-100 = the two cases' x MAP ratios; peak = rise of the "
             "peak RSS during the calls." + (f" {args.note}" if args.note else ""), "",
             "| model | method | ms / input | × MAP | speed-up vs MC-100 (same posterior) | peak MB |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        desc = CASES[r["case"]][1]
        if "error" in r:
            lines.append(f"| {r['model']} | {desc} | not run: {r['error'][:160]} | | | |")
            continue
        speed = f"{r['speedup_vs_mc100']:.1f}×" if "speedup_vs_mc100" in r else ""
        lines.append(f"| {r['model']} | {desc} | {r['ms_per_input']:.3f} | {r.get('x_map', float('nan')):.2f} | "
                     f"{speed} | {r['peak_mb']:.0f} |")
    atomic_write_text(RESULTS / "streamlined_cost.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
