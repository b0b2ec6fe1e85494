"""Cost of streamlined prediction at full-size configs: ResNet-18, ViT-B/16 and BERT-base (issue 16's cost goal).

    OMP_NUM_THREADS=1 nice -n 5 .venv-vision/bin/python benchmarks/streamlined_cost_full.py --models resnet18,vit_b_16
    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/streamlined_cost_full.py --models bert_base
    .venv/bin/python benchmarks/streamlined_cost_full.py --report-only

(torchvision is in .venv-vision, transformers in .venv: each model runs where its library is.) Models, random init
(cost does not depend on training): torchvision ``resnet18`` (224x224 inputs, 1000 classes), torchvision
``vit_b_16`` (ViT-B/16's config: 12 layers, hidden 768, 12 heads, MLP 3072, 224x224, 1000 classes) and
transformers' ``BertForSequenceClassification`` at BERT-base's config (12 layers, hidden 768, 12 heads,
intermediate 3072, 2 classes) on 128 random token ids with an attention mask (rows padded from 64 to 128 tokens). Posterior: a diagonal one over every parameter (a variance per weight,
``Streamlined(model, weight_var=...)``, the documented mean-field form; its values do not change the cost).
Streamlined in its diagonal mode, float32, batch ``--batch``, for each of ``--threads``.

Each (model, threads) case runs in its own process: warm-up calls (the first walk traces or exports the graph and
checks the mean against model(x)), then ``--rounds`` alternating (MAP forward, streamlined) calls in the same process
(:func:`streamlined_cost.alternating_times`); x MAP = the ratio of the medians. MC-100: ``--mc-samples`` k sampled
forwards of the same posterior, weight sampling included (:func:`mc_forwards`), timed once between
two MAP forwards and extrapolated to 100 samples as 100/k times that. Peak memory: the rise of the process's peak RSS
(VmHWM, reset before each measured call) over its RSS before the call, and the process's peak RSS overall.
Per-rule costs: one more streamlined call with every registered rule timed (exclusive of the rules it calls) and one
more MAP forward with its leaf modules timed by hooks. The machine's load average is recorded around each case.
Resumable: each finished case is cached as JSON in ``--run-dir``; the report is rebuilt from all cached cases.
Writes benchmarks/results/streamlined_cost_full.{md,json} (batch 32, the goal's; other batch sizes:
streamlined_cost_full_b<batch>.{md,json}).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.func import functional_call

from posthoc.bench.processes import peak_rss_bytes, reset_peak_rss, run_limited
from posthoc.bench.report import run_meta, write_json
from posthoc.utils.io import atomic_write_text

sys.path.insert(0, str(Path(__file__).resolve().parent))
from streamlined_cost import _rss_bytes, alternating_times, time_calls  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MODELS = {
    "resnet18": "torchvision resnet18, 224x224, 1000 classes",
    "vit_b_16": "torchvision vit_b_16 (ViT-B/16 config), 224x224, 1000 classes",
    "bert_base": "BertForSequenceClassification, BERT-base config, 128 tokens with attention mask, 2 classes",
}
# The agreement table's models at their small configs (benchmarks/streamlined_agreement_cases.py), random init:
# 28x28 images (1 channel; torchvision's with 3), or 24 token ids of a 64-token vocabulary with an attention mask.
SMALL = "small:"
SMALL_CASES = ("mlp", "cnn", "small_resnet", "small_vit", "wrn", "bert", "gpt2", "tv_resnet18", "tv_vit")
MODELS.update({SMALL + case: f"the agreement table's {case} (small config)" for case in SMALL_CASES})
SMALL_SEQ_LEN = 24
# Parameters read by ops outside any module rule (ViT's class token and position embedding are added to the
# activations by plain tensor ops, which the traced walk only passes deterministic values through): kept at their
# means, 0.2 % of ViT-B's parameters; every other parameter has a variance.
DETERMINISTIC = {"vit_b_16": ("class_token", "encoder.pos_embedding"),
                 SMALL + "tv_vit": ("class_token", "encoder.pos_embedding")}
WEIGHT_VAR = 1e-4  # every parameter's posterior variance (the cost does not depend on it)
SEQ_LEN = 128
GOAL_X_MAP, GOAL_SPEEDUP, GOAL_BATCH = 3.0, 30.0, 32


def build(name: str, batch: int) -> tuple[nn.Module, Any]:
    """The model (eval mode, random init, seed 0) and one input batch: an image tensor or a token mapping."""
    torch.manual_seed(0)
    if name.startswith(SMALL):
        from streamlined_agreement_cases import CASES

        case = CASES[name[len(SMALL):]]
        model = case.build().eval()
        if case.task == "tokens":
            ids = torch.randint(1, 64, (batch, SMALL_SEQ_LEN))
            lengths = torch.linspace(SMALL_SEQ_LEN // 2, SMALL_SEQ_LEN, batch).long()
            mask = (torch.arange(SMALL_SEQ_LEN)[None, :] < lengths[:, None]).long()
            return model, {"input_ids": ids * mask, "attention_mask": mask}
        return model, torch.randn(batch, 3 if case.task == "fmnist3" else 1, 28, 28)
    if name in ("resnet18", "vit_b_16"):
        import torchvision

        model = getattr(torchvision.models, name)(weights=None).eval()
        return model, torch.randn(batch, 3, 224, 224)
    if name == "bert_base":
        import transformers

        config = transformers.BertConfig()  # defaults: hidden 768, 12 layers, 12 heads, intermediate 3072
        config.num_labels = 2
        net = transformers.BertForSequenceClassification(config).eval()
        ids = torch.randint(1, config.vocab_size, (batch, SEQ_LEN))
        lengths = torch.linspace(SEQ_LEN // 2, SEQ_LEN, batch).long()
        mask = (torch.arange(SEQ_LEN)[None, :] < lengths[:, None]).long()
        return net, {"input_ids": ids * mask, "attention_mask": mask}
    raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}")


def _forward(model: nn.Module, x: Any, state: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Logits (B, C) of the model, or of ``functional_call(model, state)`` with other weights."""
    args, kwargs = ((), x) if isinstance(x, dict) else ((x,), {})
    with torch.no_grad():
        out = model(*args, **kwargs) if state is None else functional_call(model, state, args, kwargs)
    return out if isinstance(out, torch.Tensor) else out.logits


def mc_forwards(model: nn.Module, x: Any, variances: dict[str, torch.Tensor], n_samples: int) -> torch.Tensor:
    """Logits (S, B, C) of S weight draws θ + sqrt(v) ε of the diagonal posterior, the sampling included."""
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    std = {name: v.sqrt() for name, v in variances.items()}
    outs = []
    for _ in range(n_samples):
        with torch.no_grad():
            draw = {name: torch.addcmul(state[name], s, torch.randn_like(s)) for name, s in std.items()}
        outs.append(_forward(model, x, {**state, **draw}))
    return torch.stack(outs)


def _reset_peak() -> None:
    """Reset this process's peak RSS to its current RSS; the peak columns need it (Linux only)."""
    if not reset_peak_rss():
        raise OSError("cannot reset the peak RSS (/proc/self/clear_refs): peak memory needs Linux")


def _peak_rise_mb(call: Callable[[], object]) -> float:
    """MB the peak RSS rises over the RSS before one call of ``call``."""
    _reset_peak()
    before = _rss_bytes()
    call()
    return max(peak_rss_bytes() - before, 0) / 2**20


@contextmanager
def rule_timers(totals: dict[str, list[float]]) -> Iterator[None]:
    """Time every registered moment-propagation rule while inside: totals[key] = [exclusive seconds, calls]."""
    from posthoc.streamlined.rules import RULES

    saved = dict(RULES)
    child_time: list[float] = []  # per active rule call: the time spent in rules it called

    def timed(key: str, rule: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            child_time.append(0.0)
            start = time.perf_counter()
            try:
                return rule(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                entry = totals.setdefault(key, [0.0, 0])
                entry[0] += elapsed - child_time.pop()
                entry[1] += 1
                if child_time:
                    child_time[-1] += elapsed
        return call

    RULES.update({key: timed(key, rule) for key, rule in saved.items()})
    try:
        yield
    finally:
        RULES.update(saved)


def module_times(model: nn.Module, x: Any) -> tuple[dict[str, list[float]], float]:
    """One MAP forward with its leaf modules timed by hooks: ({type name: [seconds, calls]}, total seconds)."""
    totals: dict[str, list[float]] = {}
    starts: dict[int, float] = {}
    handles = []
    for module in model.modules():
        if next(module.children(), None) is None:
            def pre(m: nn.Module, _args: Any) -> None:
                starts[id(m)] = time.perf_counter()

            def post(m: nn.Module, _args: Any, _out: Any) -> None:
                entry = totals.setdefault(type(m).__name__, [0.0, 0])
                entry[0] += time.perf_counter() - starts.pop(id(m))
                entry[1] += 1
            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        start = time.perf_counter()
        _forward(model, x)
        total = time.perf_counter() - start
    finally:
        for handle in handles:
            handle.remove()
    return totals, total


def _top_ops(call: Callable[[], object], n: int = 12) -> list[dict[str, Any]]:
    """The ``n`` aten ops of one call with the most self CPU time (torch.profiler): name, ms, calls."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        call()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:n]
    return [{"op": e.key, "ms": e.self_cpu_time_total / 1e3, "calls": e.count} for e in events]


def _cpu_model() -> str:
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


def run_case(name: str, threads: int, batch: int, rounds: int, mc_samples: int, profile_budget: float
             ) -> dict[str, Any]:
    """One (model, threads) case in this process; the row of the results table (see the module docstring).

    The per-rule profile runs only if the case took less than ``profile_budget`` seconds before it (0: never).
    """
    from posthoc.streamlined import Streamlined

    case_start = time.perf_counter()
    torch.set_num_threads(threads)
    load_before = os.getloadavg()
    model, x = build(name, batch)
    variances = {n: torch.full_like(p, WEIGHT_VAR) for n, p in model.named_parameters()
                 if n not in DETERMINISTIC.get(name, ())}
    row: dict[str, Any] = {"model": name, "threads": threads, "batch": batch,
                           "parameters": sum(p.numel() for p in model.parameters()),
                           "random_parameters": sum(v.numel() for v in variances.values()),
                           "deterministic": list(DETERMINISTIC.get(name, ()))}
    sp = Streamlined(model, weight_var=variances, graph="export" if isinstance(x, dict) else "fx")

    def map_call() -> None:
        _forward(model, x)

    def streamlined_call() -> None:
        sp.predict(x)

    def mc_call() -> None:
        mc_forwards(model, x, variances, mc_samples)

    start = time.perf_counter()
    try:
        streamlined_call()  # traces or exports the graph and checks the propagated mean against model(x)
    except Exception as err:  # noqa: BLE001 - a model the rules do not cover yet is a row, not a crash
        return {**row, "error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"}
    row["first_call_s"] = time.perf_counter() - start
    row["graph"] = str(sp.graph_used.value if sp.graph_used is not None else "")
    map_call()
    row["map_peak_mb"] = _peak_rise_mb(map_call)
    row["streamlined_peak_mb"] = _peak_rise_mb(streamlined_call)
    map_times, times = alternating_times(map_call, streamlined_call, rounds, 1, 0.0)
    map_s, streamlined_s = statistics.median(map_times), statistics.median(times)
    row.update(map_times=map_times, streamlined_times=times, map_s=map_s, streamlined_s=streamlined_s,
               x_map=streamlined_s / map_s,
               round_ratios=[t / statistics.mean(map_times[i:i + 2]) for i, t in enumerate(times)])
    _reset_peak()
    before = _rss_bytes()
    mc_map_before = time_calls(map_call, 1, 0.0)[0]
    mc_s = time_calls(mc_call, 1, 0.0)[0]
    mc_map_after = time_calls(map_call, 1, 0.0)[0]
    row["mc_peak_mb"] = max(peak_rss_bytes() - before, 0) / 2**20
    mc_map = 0.5 * (mc_map_before + mc_map_after)
    row.update(mc_samples=mc_samples, mc_k_s=mc_s, mc_map_s=mc_map, mc100_s=100 / mc_samples * mc_s,
               mc100_x_map=100 / mc_samples * mc_s / mc_map)
    row["speedup_vs_mc100"] = row["mc100_x_map"] / row["x_map"]
    if time.perf_counter() - case_start < profile_budget:
        rules: dict[str, list[float]] = {}
        with rule_timers(rules):
            start = time.perf_counter()
            streamlined_call()
            row["profiled_streamlined_s"] = time.perf_counter() - start
        row["rule_costs"] = {key: {"s": s, "calls": c} for key, (s, c) in sorted(rules.items(), key=lambda kv: -kv[1][0])}
        modules, row["profiled_map_s"] = module_times(model, x)
        row["map_module_costs"] = {key: {"s": s, "calls": c}
                                   for key, (s, c) in sorted(modules.items(), key=lambda kv: -kv[1][0])}
        row["streamlined_top_ops"] = _top_ops(streamlined_call)
        row["map_top_ops"] = _top_ops(map_call)
    row["process_peak_mb"] = peak_rss_bytes() / 2**20  # since the last reset (before MC), not the model build
    row["load_before"], row["load_after"] = list(load_before), list(os.getloadavg())
    row["versions"] = _versions()
    row["cpu"] = f"{_cpu_model()}, {os.cpu_count()} CPUs"
    return row


def _versions() -> dict[str, str]:
    out = {"torch": str(torch.__version__)}
    for library in ("torchvision", "transformers"):
        try:
            out[library] = __import__(library).__version__
        except ImportError:
            pass
    return out


def _case_path(run_dir: Path, tag: str, name: str, threads: int, batch: int) -> Path:
    return run_dir / f"{tag}-{name}-t{threads}-b{batch}.json"


def restore_cases(run_dir: Path, results: Path) -> int:
    """Write each row of the results file whose case file ``run_dir`` lacks (a fresh machine, another machine's run).

    The table is rebuilt from the case files, so without this a run on a machine that lacks earlier cases would
    drop their rows. Never overwrites a case file. Returns the number restored.
    """
    if not results.is_file():
        return 0
    restored = 0
    for row in json.loads(results.read_text())["rows"]:
        path = _case_path(run_dir, row.get("tag", ""), row["model"], row["threads"], row["batch"])
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(row, indent=1))
            restored += 1
    return restored


def results_stem(batch: int) -> str:
    """streamlined_cost_full for the goal's batch (32), streamlined_cost_full_b<batch> for any other."""
    return "streamlined_cost_full" if batch == GOAL_BATCH else f"streamlined_cost_full_b{batch}"


def write_report(run_dir: Path, batch: int, note: str) -> None:
    """Rebuild benchmarks/results/<results_stem(batch)>.{md,json} from every cached case of this batch size."""
    stem = results_stem(batch)
    rows = [json.loads(p.read_text()) for p in sorted(run_dir.glob(f"*-b{batch}.json"))]
    order = list(MODELS)
    rows.sort(key=lambda r: (r.get("tag", ""), order.index(r["model"]) if r["model"] in order else 99,
                             r["threads"]))
    run = run_meta()
    meta = {"date": run["date"], "machine": run["machine"], "run": run, "batch": batch, "dtype": "float32",
            "weight_var": WEIGHT_VAR, "note": note}
    write_json(RESULTS / f"{stem}.json", {"meta": meta, "rows": rows})
    machines = sorted({(r.get("tag", ""), r.get("cpu", ""), ", ".join(f"{k} {v}" for k, v in r["versions"].items()))
                       for r in rows if "versions" in r})
    lines = ["# Streamlined prediction at full-size configs: cost", "",
             "Machines (column 'on'): " + "; ".join(f"{tag}: {cpu} ({versions})" for tag, cpu, versions in machines)
             + f". float32, batch {batch}, random init, a diagonal "
             "posterior over every parameter (a variance per weight; ViT-B/16's class token and position embedding, "
             "added by plain tensor ops, at their means), Streamlined's diagonal mode. x MAP: median "
             "streamlined time over median MAP forward time of the same process, from alternating (MAP, "
             "streamlined) calls after warm-up (n = calls of each); per round: each streamlined call over the mean of "
             "the MAP calls just before and after it, robust to a load that changes during the case. MC-100: k "
             "sampled forwards (weight sampling "
             "included) timed once and extrapolated as 100/k times that, over the mean of the MAP forwards just "
             "before and after it. Peak: rise of the peak RSS over the RSS before one call; process peak: the peak "
             "RSS of the case's process from the MC timing on (model, posterior, graph and activations). "
             f"Goal (issue 16): x MAP <= {GOAL_X_MAP:g} and >= {GOAL_SPEEDUP:g}x faster than MC-100."
             + (f" {note}" if note else ""), "",
             "| on | model | threads | MAP s / batch | streamlined s / batch | × MAP (n) | per-round × MAP median (range) | "
             "MC-100 s / batch (k) | MC-100 × MAP | speed-up vs MC-100 | peak MB MAP / streamlined / MC | "
             "process peak MB | load avg before → after | goal (× MAP / per-round median) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r.get('tag', '')} | {r['model']} | {r['threads']} | not run: {r['error'][:200]} |" + " |" * 10)
            continue
        ratios = r["round_ratios"]
        met = [x <= GOAL_X_MAP and r["mc100_x_map"] / x >= GOAL_SPEEDUP
               for x in (r["x_map"], statistics.median(ratios))]
        lines.append(
            f"| {r.get('tag', '')} | {r['model']} | {r['threads']} | {r['map_s']:.3f} | {r['streamlined_s']:.3f} | "
            f"{r['x_map']:.2f} ({len(r['streamlined_times'])}) | {statistics.median(ratios):.2f} "
            f"({min(ratios):.2f}-{max(ratios):.2f}) | "
            f"{r['mc100_s']:.1f} ({r['mc_samples']}) | {r['mc100_x_map']:.0f} | {r['speedup_vs_mc100']:.0f}× | "
            f"{r['map_peak_mb']:.0f} / {r['streamlined_peak_mb']:.0f} / {r['mc_peak_mb']:.0f} | "
            f"{r['process_peak_mb']:.0f} | {r['load_before'][0]:.1f} → {r['load_after'][0]:.1f} | "
            f"{' / '.join('met' if m else 'not met' for m in met)} |")
    for r in rows:
        if "rule_costs" not in r:
            continue
        lines += ["", f"## Per-rule cost: {r['model']}, {r['threads']} thread(s), on {r.get('tag', '')}", "",
                  f"One profiled streamlined call ({r['profiled_streamlined_s']:.3f} s; rule times exclusive of "
                  f"the rules they call, the rest is the graph walk and the ops on deterministic values) and one MAP "
                  f"forward ({r['profiled_map_s']:.3f} s) with its leaf modules timed by hooks.", "",
                  "| streamlined rule | s | calls | | MAP leaf module | s | calls |", "|---|---|---|---|---|---|---|"]
        rule_items = list(r["rule_costs"].items())[:12]
        module_items = list(r["map_module_costs"].items())[:12]
        for i in range(max(len(rule_items), len(module_items))):
            left = (f"{rule_items[i][0]} | {rule_items[i][1]['s']:.3f} | {rule_items[i][1]['calls']}"
                    if i < len(rule_items) else " | | ")
            right = (f"{module_items[i][0]} | {module_items[i][1]['s']:.3f} | {module_items[i][1]['calls']}"
                     if i < len(module_items) else " | | ")
            lines.append(f"| {left} | | {right} |")
    atomic_write_text(RESULTS / f"{stem}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,vit_b_16,bert_base")
    parser.add_argument("--threads", default="1,2", help="torch threads, one case each")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7, help="alternating (MAP, streamlined) calls")
    parser.add_argument("--mc-samples", type=int, default=5, help="k sampled forwards, extrapolated to 100")
    parser.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "streamlined_cost_full")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per case")
    parser.add_argument("--force", action="store_true", help="rerun cached cases")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--note", default="", help="how quiet the machine was, written with the table")
    parser.add_argument("--tag", default="here", help="names the machine in the cached case files and the table")
    parser.add_argument("--profile-threads", default="1", help="thread counts whose cases get the per-rule profile")
    parser.add_argument("--profile-budget", type=float, default=1e9,
                        help="profile only if the case took less than this many seconds before it")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "THREADS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        threads = int(args.one[1])
        budget = args.profile_budget if threads in [int(t) for t in args.profile_threads.split(",") if t] else 0.0
        row = run_case(args.one[0], threads, args.batch, args.rounds, args.mc_samples, budget)
        print(json.dumps({**row, "tag": args.tag}))
        return
    args.run_dir.mkdir(parents=True, exist_ok=True)
    restored = restore_cases(args.run_dir, RESULTS / f"{results_stem(args.batch)}.json")
    print(f"{restored} cases restored from the results file")
    for name in [] if args.report_only else args.models.split(","):
        for threads in (int(t) for t in args.threads.split(",")):
            path = _case_path(args.run_dir, args.tag, name, threads, args.batch)
            if path.exists() and not args.force:
                print(f"{path.name}: cached", flush=True)
                continue
            proc = run_limited([sys.executable, __file__, "--one", name, str(threads), "--batch", str(args.batch),
                                "--rounds", str(args.rounds), "--mc-samples", str(args.mc_samples),
                                "--tag", args.tag, "--profile-threads", args.profile_threads,
                                "--profile-budget", str(args.profile_budget)],
                               timeout=args.timeout, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
            if proc.returncode != 0:
                tail = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else (
                    "timeout" if proc.timed_out else f"exit {proc.returncode} (a negative exit: killed by that signal, "
                    "e.g. -9 by the out-of-memory killer)")
                print(f"{name} threads={threads}: failed: {tail}", flush=True)
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            atomic_write_text(path, json.dumps(row, indent=1))
            print({k: v for k, v in row.items() if not isinstance(v, (list, dict))}, flush=True)
    write_report(args.run_dir, args.batch, args.note)


if __name__ == "__main__":
    main()
