"""Streamlined against the exact linearised predictive where linearisation is exact: a narrow posterior.

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/streamlined_agreement_linear.py --data-dir DATA
    OMP_NUM_THREADS=1 nice -n 5 .venv-vision/bin/python benchmarks/streamlined_agreement_linear.py --data-dir DATA

benchmarks/streamlined_agreement.py compares Streamlined with Monte Carlo of each model's diagonal Laplace. Where a
row misses, two things are mixed: the rules' approximations (which covariances the diagonal mode drops, the
frozen LayerNorm, Q and K at their means) and the posterior's width (MC samples the network far from the MAP,
where no local approximation holds; glm misses MC there too). This script separates them. It takes the same cached
trained models and posterior variances v (runs/streamlined_agreement/<model>/nfit<N>/posterior.pt, the largest fit)
and propagates s v with s = ``--scale`` (1e-6): as s -> 0 the weight noise's effect on the outputs is linear in it,
Monte Carlo of s v tends to s times the linearised (glm) covariance J diag(v) J^T, and every rule that is exact to
first order gives s times glm as well. So per option: Spearman and total of Streamlined(s v) / s against the cached
glm per-input summed variances (400 inputs; the full mode on the first 50 of each group, on the covered tail) are
the rules' own error in the linear regime, with an exact, noise-free reference; beside them, the same option
against MC at s = 1 (the agreement table's row) and glm against MC at s = 1 (the posterior's nonlinearity).

In the linear regime the full mode (every cross-covariance carried, linearised activations, linearised
LayerNorm) must give glm up to O(s): a check of the rules on real trained networks. The diagonal mode drops the
covariances between units (the authors' approximation) and "frozen" LayerNorm drops the normaliser's dependence
on its input: their rows say what that costs before any nonlinearity.

Writes benchmarks/results/streamlined_agreement_linear.{md,json} (rows of both environments kept: each run
replaces only the models it ran).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from streamlined_agreement import (  # noqa: E402
    CASES,
    common_arguments,
    cover,
    environment,
    fit_dirs,
    logits,
    option_key,
    options,
    streamlined_row,
    take,
    to64,
    train,
)
from streamlined_agreement_cases import load_task  # noqa: E402
from streamlined_agreement_table import option_label  # noqa: E402

from posthoc.bench.report import run_meta, write_json  # noqa: E402
from posthoc.utils.io import atomic_write_text  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
NAME = "streamlined_agreement_linear"


def exact_linearised_variance(model: torch.nn.Module, variances: dict[str, torch.Tensor], x: Any,
                              chunk: int = 10) -> torch.Tensor:
    """Per-input summed output variance (B,) of the linearised model under a diagonal posterior: Σ_p v_p J_p².

    Per-example Jacobians by torch.func.jacrev over the parameters with a nonzero variance, ``chunk`` inputs at a
    time (chunk x C x P floats); x a tensor or a dict of token tensors (keyword arguments). The reference for
    masked posteriors, which the cached glm does not cover.
    """
    from torch.func import functional_call, jacrev
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    names = [n for n, v in variances.items() if bool((v != 0).any())]
    n_inputs = len(x["input_ids"]) if isinstance(x, dict) else len(x)
    out = []
    for start in range(0, n_inputs, chunk):
        xb = take(x, slice(start, start + chunk))

        def f(sub: dict[str, torch.Tensor], xb: Any = xb) -> torch.Tensor:
            state = {**params, **buffers, **sub}
            return logits(functional_call(model, state, (), xb) if isinstance(xb, dict)
                          else functional_call(model, state, (xb,)))

        jac = jacrev(f)({n: params[n] for n in names})  # name -> (b, C, *shape)
        var = sum((jac[n].square() * variances[n]).flatten(2).sum(-1) for n in names)  # (b, C)
        out.append(var.sum(-1))
    return torch.cat(out)


def masked(variances: dict[str, torch.Tensor], keep: list[str], zero: list[str]) -> dict[str, torch.Tensor]:
    """The variances, those of parameters outside ``keep`` or matching ``zero`` set to 0 (deterministic weights).

    Kept: names starting with one of ``keep`` (every name if empty) and containing none of ``zero``.
    """
    def kept(name: str) -> bool:
        return (not keep or name.startswith(tuple(keep))) and not any(z in name for z in zero)
    return {n: v if kept(n) else torch.zeros_like(v) for n, v in variances.items()}


def model_rows(name: str, args: Any) -> dict:
    """Every option of one model in the linear regime, beside its cached rows against MC (s = 1).

    With ``args.keep`` / ``args.zero`` the posterior is masked (see :func:`masked`) and the reference is
    :func:`exact_linearised_variance` of the masked posterior (tensor-input models only).
    """
    case = CASES[name]
    run_dir = Path(args.run_dir) / name
    dirs = [d for d in fit_dirs(run_dir) if (d / "posterior.pt").exists() and (d / "model.json").exists()
            and not d.name.endswith("-layerwise")]
    if not dirs:
        raise FileNotFoundError(f"{name}: no cached posterior under {run_dir}; run streamlined_agreement.py first")
    fit_dir = dirs[0]
    if not (run_dir / "weights.pt").exists():
        raise FileNotFoundError(f"{name}: no cached weights under {run_dir}")
    data = load_task(case.task, args.data_dir)
    model, _ = train(name, case, data, run_dir)  # the cached weights
    cover(model, case)
    saved = torch.load(fit_dir / "posterior.pt")
    record = json.loads((fit_dir / "model.json").read_text())
    glm = saved["glm"]
    variances = saved["variances"]
    x = to64(data[2])
    mask = ""
    if args.keep or args.zero:
        variances = masked(variances, args.keep, args.zero)
        mask = f"variance kept on {', '.join(args.keep) or 'every covered tensor'}" + (
            f" except {', '.join(args.zero)}" if args.zero else "")
        t0 = time.perf_counter()
        glm = exact_linearised_variance(model, variances, x)
        print(f"  {name}: exact linearised reference of the masked posterior in {time.perf_counter() - t0:.0f} s",
              flush=True)
    reference_check = None
    if not mask and args.check_reference:
        exact = exact_linearised_variance(model, variances, x)
        reference_check = float(((exact - glm) / glm).abs().max())
        print(f"  {name}: exact linearised variance against the cached glm: max rel. diff {reference_check:.2e}",
              flush=True)
    scaled = {k: v * args.scale for k, v in variances.items()}
    out = {"model": name, "fit": fit_dir.name, "env": environment(), "torch": torch.__version__,
           "prior_precision": record["prior_precision"], "n_mc": record["n_mc"],
           "glm_vs_mc": record["glm"] if not mask else None, "mask": mask, "rows": [],
           "glm_vs_jacrev_max_rel_diff": reference_check}
    key = name if not mask else f"{name} [{mask}]"
    previous = {r["label"]: r for r in args.previous.get(key, {}).get("rows", [])}
    for option in options(case):
        label = option_label(option)
        if (args.modes and option["mode"] not in args.modes) or \
                (args.attentions and option["attention"] not in args.attentions):
            if label in previous:  # kept from an earlier run of the other mode
                out["rows"].append(previous[label])
            continue
        t0 = time.perf_counter()
        row = streamlined_row(model, case, scaled, x, {"var": glm * args.scale}, option, args.n_full,
                              args.max_full_dim, args.full_batch_size)
        row["label"] = label
        cached = fit_dir / "rows" / f"{option_key(option)}.json"
        row["vs_mc_at_1"] = ({k: v for k, v in json.loads(cached.read_text()).items() if k in ("spearman", "total",
                                                                                           "error")}
                             if cached.exists() and not mask else None)
        row["wall_s"] = time.perf_counter() - t0
        print(f"  {name} {row['label']}: {json.dumps({k: row.get(k) for k in ('spearman', 'total', 'error')})}",
              flush=True)
        out["rows"].append(row)
    return out


def _cell(d: dict | None) -> str:
    if d is None:
        return "—"
    if d.get("error"):
        return "not run: " + d["error"][:160].replace("|", "/")
    return f"{d['spearman']:.3f} / {d['total']:.3f}"


def markdown(payload: dict) -> str:
    """The table: per model and option, linear regime vs glm, and s = 1 vs MC."""
    meta = payload["meta"]
    lines = [
        "# Streamlined in the linear regime: against the exact linearised predictive",
        "",
        f"Each model's cached diagonal Laplace (benchmarks/streamlined_agreement.py, the largest fit, scalar "
        f"marglik prior) with its weight variances multiplied by s = {meta['scale']:g}: Streamlined's per-input "
        "summed output variance divided by s against the glm predictive's J diag(v) Jᵀ (exact there, no sampling "
        "noise), Spearman / total ratio over 400 inputs (200 in-distribution, 200 shifted; the full mode: the "
        "first 50 of each, on the covered tail). Beside it the same option against Monte Carlo at s = 1 (the "
        "agreement table's row) and glm against MC at s = 1. Goal of the agreement table: Spearman >= 0.9 and "
        "total within 25 %. Generated by benchmarks/streamlined_agreement_linear.py.",
        ""]
    for m in payload["models"].values():
        title = m["model"] + (f" [{m['mask']}]" if m.get("mask") else "")
        checked = m.get("glm_vs_jacrev_max_rel_diff")
        reference = (f"glm against MC at s = 1 ({m['n_mc']} draws): {_cell(m['glm_vs_mc'])}"
                     + (f"; the cached glm against Σ_p v_p J_p² by jacrev: max relative difference {checked:.1e}"
                        if checked is not None else "") if not m.get("mask") else
                     "Masked posterior (the other covered weights deterministic): the reference is the exact "
                     "linearised variance Σ_p v_p J_p² by torch.func.jacrev; no MC row.")
        lines += [f"## {title} ({m['fit']}, δ {m['prior_precision']:.3g}, {m['env']}, torch {m['torch']})", "",
                  reference, "",
                  "| option | linear regime vs glm: ρ / total | s = 1 vs MC: ρ / total | mean max abs err | inputs |",
                  "|---|---|---|---|---|"]
        for r in m["rows"]:
            lines.append(f"| {r['label']} | {_cell(r)} | {_cell(r['vs_mc_at_1'])} | "
                         f"{r.get('mean_max_abs_err', float('nan')):.1e} | {r['n_inputs']} |")
        lines.append("")
    lines += ["Commands (in order; each replaced the rows of the models it ran): "
              + "; ".join(f"`{c}`" for c in meta.get("commands", [meta["command"]])) + ".", "",
              f"Last run: {meta['date']}; commit {meta['git_commit']}; "
              f"machine: {meta['machine']}; versions: {meta['versions']}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    """Run the models this environment can, keep the others' cached results, write the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    env = common_arguments(parser)
    parser.add_argument("--scale", type=float, default=1e-6, help="s: the weight variances' factor")
    parser.add_argument("--n-full", type=int, default=50, help="inputs per group in the full mode")
    parser.add_argument("--keep", nargs="*", default=[], help="keep the variance only on these name prefixes")
    parser.add_argument("--zero", nargs="*", default=[], help="zero the variance of names containing these")
    parser.add_argument("--check-reference", action="store_true",
                        help="compare the cached glm variances with the jacrev reference (tensor inputs)")
    parser.add_argument("--max-full-dim", type=int, default=4096, help="Streamlined's full-mode width limit")
    parser.add_argument("--full-batch-size", type=int, default=5, help="inputs at once in the full mode")
    parser.add_argument("--modes", nargs="*", choices=("diagonal", "full"), default=[],
                        help="run only these modes (the other mode's rows kept from the last run); default both")
    parser.add_argument("--attentions", nargs="*", choices=("independent", "shared_value", "linearized"), default=[],
                        help="run only the options with these attention rules (the other rows kept from the last "
                             "run); default all")
    args = parser.parse_args()
    torch.set_num_threads(1)
    path = RESULTS / f"{NAME}.json"
    payload = json.loads(path.read_text()) if path.exists() else {"models": {}}
    commands = payload.get("meta", {}).get("commands", [])
    payload["meta"] = {**run_meta(), "scale": args.scale}
    payload["meta"]["commands"] = [*commands, payload["meta"]["command"]]
    args.previous = dict(payload["models"])
    for name in args.models.split(","):
        if CASES[name].env != env:
            raise SystemExit(f"{name} needs the {CASES[name].env} environment, this is {env}")
        try:
            result = model_rows(name, args)
            payload["models"][name if not result["mask"] else f"{name} [{result['mask']}]"] = result
        except FileNotFoundError as err:
            print(f"{name}: skipped ({err})", flush=True)
            continue
        write_json(path, payload)
        atomic_write_text(RESULTS / f"{NAME}.md", markdown(payload))
    write_json(path, payload)
    atomic_write_text(RESULTS / f"{NAME}.md", markdown(payload))


if __name__ == "__main__":
    main()
