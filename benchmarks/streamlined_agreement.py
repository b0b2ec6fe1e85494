"""Streamlined's agreement with Monte Carlo of the same posterior, per model and option (issue 16's protocol).

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/streamlined_agreement.py --data-dir DATA
    OMP_NUM_THREADS=1 nice -n 5 .venv-vision/bin/python benchmarks/streamlined_agreement.py --data-dir DATA

Models (benchmarks/streamlined_agreement_cases.py): posthoc's MLP, FMNISTCNN, SmallResNet and SmallViT, a WRN-10-1
style network, torchvision's resnet18 and a small VisionTransformer (28x28 Fashion-MNIST, channels replicated),
and Hugging Face BERT and GPT-2 sequence classifiers from small configs (3 layers, width 32, attention masks) on
the generated token task of examples/llm_lora.py. Each is trained (Adam, batch 128, float32) for at least one
epoch, then evaluated in float64. Posterior: posthoc.laplace.Laplace, diagonal, over the last two blocks and the
head (the other weights frozen: ``requires_grad=False``), fitted on ``--n-fit`` training inputs, prior precision
by marglik. Inputs: 200 in-distribution and 200 shifted (rotated images, randomly replaced tokens). Per input, the
summed output (logit) variance of Streamlined and of Monte Carlo of the same posterior (weight draws until the
RMS standard error of the per-input variances is under 1/5 of their standard deviation across inputs); per option
(diagonal mode; full mode where widths allow, on the first ``--n-full`` of each group; attention and LayerNorm
rules named) the Spearman correlation and the total variance ratio. The goal: Spearman >= 0.9, total within 25 %.
The linearised (glm) predictive of the same Laplace against MC says whether a miss is Streamlined's or the
nonlinearity's; extra diagonal-mode options use posthoc's moment-matched activations ("quadrature" rows:
``Streamlined(activations="moment_matched")``) and LayerNorm "expected", and streamlined_agreement_nodes.py
finds the node where a missing row leaves MC. The propagated mean must equal model(x) to 1e-5 (asserted).

Resumable, and runs under either environment: each model's trained weights, posterior variances, MC draws (in
chunks), glm variances and each (model, option) result are cached under ``--run-dir`` (one ``<model>/nfit<N>/``
folder per posterior, its Laplace fit checkpointed, so an interrupted fit resumes); every run rewrites
benchmarks/results/streamlined_agreement.{md,json} from all cached results, so the two environments' runs fill one
table. The table says which environment and torch gave each row.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

if str(Path(__file__).resolve().parent) not in sys.path:  # the cases module beside this script, when imported
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from streamlined_agreement_cases import CASES, N_GROUP, Case, load_task  # noqa: E402
from streamlined_agreement_table import GOAL_SPEARMAN, GOAL_TOTAL, SE_FRACTION, verdict, write_tables  # noqa: E402,F401

from posthoc.bench.report import run_meta  # noqa: E402
from posthoc.utils.io import atomic_write_text  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MEAN_ATOL = 1e-5


def environment() -> str:
    """"vision" where torchvision imports (the vision environment), else "main"."""
    try:
        import torchvision  # noqa: F401
    except (ImportError, OSError, RuntimeError):
        return "main"
    return "vision"


def take(x: Any, idx: Any) -> Any:
    """Rows ``idx`` of a tensor or of every tensor of a dict."""
    return {k: v[idx] for k, v in x.items()} if isinstance(x, dict) else x[idx]


def logits(out: Any) -> torch.Tensor:
    """The logits of a model's output: a tensor, or a Hugging Face output's ``.logits``."""
    return out if isinstance(out, torch.Tensor) else out.logits


def call(model: nn.Module, x: Any) -> torch.Tensor:
    """model(x) logits; dict inputs as keyword arguments."""
    return logits(model(**x) if isinstance(x, dict) else model(x))


def to64(x: Any) -> Any:
    """Float tensors to float64 (token dicts unchanged)."""
    return x if isinstance(x, dict) else x.double()


def train(name: str, case: Case, data: tuple, run_dir: Path) -> tuple[nn.Module, dict]:
    """The trained model in float64 eval mode (cached weights) and its training record."""
    torch.manual_seed(0)
    model = case.build()
    xtr, ytr, x_eval, y_eval = data
    path, record_path = run_dir / "weights.pt", run_dir / "train.json"
    if path.exists():
        model.load_state_dict(torch.load(path))
        record = json.loads(record_path.read_text())
    else:
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(0)
        model.train()
        t0, losses = time.perf_counter(), []
        for _ in range(case.epochs):
            order = torch.randperm(len(ytr), generator=gen)
            for i in range(0, len(ytr), 128):
                idx = order[i:i + 128]
                loss = nn.functional.cross_entropy(call(model, take(xtr, idx)), ytr[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
        record = {"epochs": case.epochs, "n_train": len(ytr), "train_seconds": time.perf_counter() - t0,
                  "final_loss": sum(losses[-50:]) / len(losses[-50:])}
        run_dir.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
        atomic_write_text(record_path, json.dumps(record))
    model = model.double().eval()
    with torch.no_grad():
        pred = call(model, to64(x_eval)).argmax(1)
    record["acc_in"] = float((pred[:N_GROUP] == y_eval[:N_GROUP]).float().mean())
    record["acc_shift"] = float((pred[N_GROUP:] == y_eval[N_GROUP:]).float().mean())
    return model, record


def cover(model: nn.Module, case: Case) -> list[str]:
    """Freeze every parameter outside the case's covered prefixes; the covered names."""
    names = []
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(case.covered))
        if p.requires_grad:
            names.append(name)
    if not names:
        raise ValueError(f"no parameter starts with {case.covered}")
    return names


def fit_laplace(model: nn.Module, case: Case, data: tuple, n_fit: int, checkpoint: Path | None = None,
                prior_structure: str = "scalar") -> Any:
    """Diagonal Laplace over the covered weights on the first ``n_fit`` training inputs, prior by marglik.

    ``checkpoint``: the fit's resumable state (saved every 40 batches of 50), so an interrupted fit goes on.
    ``prior_structure``: marglik's prior, "scalar" (one δ) or "layerwise" (one δ per parameter tensor).
    """
    from posthoc.laplace import Laplace
    xtr, ytr = data[0], data[1]
    if isinstance(xtr, dict):
        batches: list = [{**take(xtr, slice(i, i + 50)), "labels": ytr[i:i + 50]} for i in range(0, n_fit, 50)]
    else:
        batches = [(xtr[i:i + 50].double(), ytr[i:i + 50]) for i in range(0, n_fit, 50)]
    la = Laplace(model, "classification", "all", "diag", prior_precision=1.0, progress=False)
    if checkpoint is not None:
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
    la.fit(batches, checkpoint=checkpoint, checkpoint_every=40)
    la.optimize_prior_precision(method="marglik", prior_structure=prior_structure, progress_bar=False)
    return la


def glm_variance(la: Any, x: Any, n_outputs: int) -> torch.Tensor:
    """Per-input summed variance (B,) of the Laplace's linearised predictive J Λ⁻¹ Jᵀ.

    In chunks of inputs small enough that one chunk's Jacobian (chunk x C x P, float64) stays under about 400 MB.
    """
    n = len(x["input_ids"]) if isinstance(x, dict) else len(x)
    chunk = max(1, int(5e7 // (n_outputs * la.n_params)))
    out = [torch.diagonal(la.predict(take(x, slice(i, i + chunk))).cov, dim1=-2, dim2=-1).sum(-1)
           for i in range(0, n, chunk)]
    return torch.cat(out).detach()


def posterior(model: nn.Module, case: Case, data: tuple, n_fit: int, fit_dir: Path, n_outputs: int,
              prior_structure: str = "scalar") -> tuple[dict[str, torch.Tensor], dict, torch.Tensor]:
    """The Laplace's weight variances by name, its record and the glm per-input variances (all cached)."""
    path = fit_dir / "posterior.pt"
    if path.exists():
        saved = torch.load(path)
        return saved["variances"], saved["record"], saved["glm"]
    t0 = time.perf_counter()
    checkpoint = fit_dir / "fit-checkpoint.pt"
    scalar_checkpoint = fit_dir.parent / f"nfit{n_fit}" / "fit-checkpoint.pt"
    if not checkpoint.exists() and scalar_checkpoint.exists():  # the same curvature: a finished fit is not redone
        fit_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(scalar_checkpoint, checkpoint)
    la = fit_laplace(model, case, data, n_fit, checkpoint, prior_structure)
    var = la.posterior_variance().detach()
    variances = {b.name: var[b.slice].reshape(b.shape) for b in la.subset.blocks}
    delta = la.prior_precision.detach().reshape(-1)
    record = {"prior_precision": float(delta.mean()), "prior_structure": prior_structure,
              "prior_precision_range": [float(delta.min()), float(delta.max())], "n_fit": n_fit, "n_covered": la.n_params,
              "laplace_seconds": time.perf_counter() - t0}
    t0 = time.perf_counter()
    glm = glm_variance(la, to64(data[2]), n_outputs)
    record["glm_seconds"] = time.perf_counter() - t0
    fit_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"variances": variances, "record": record, "glm": glm}, path)
    return variances, record, glm


def mc_draws(model: nn.Module, case: Case, x: Any, variances: dict[str, torch.Tensor], n: int, seed: int
             ) -> torch.Tensor:
    """Logits (n, B, C) of n weight draws θ* + sqrt(v) ε, one forward of all B inputs per draw.

    Where the case splits the network, only the tail runs per draw, on the trunk's activations computed once.
    """
    function: nn.Module = model
    inputs = x
    if case.split is not None:
        trunk, function = case.split(model)
        with torch.no_grad():
            inputs = trunk(x)
            torch.testing.assert_close(call(function, inputs), call(model, x), rtol=0, atol=1e-10)
    params = {n_: p.detach() for n_, p in function.named_parameters()}
    buffers = dict(function.named_buffers())
    gen = torch.Generator().manual_seed(seed)
    outs = []
    with torch.no_grad():
        for _ in range(n):
            sampled = {k: params[k] + v.sqrt() * torch.randn(v.shape, generator=gen, dtype=v.dtype)
                       for k, v in variances.items()}
            state = {**params, **buffers, **sampled}
            out = (functional_call(function, state, (), inputs) if isinstance(inputs, dict)
                   else functional_call(function, state, (inputs,)))
            outs.append(logits(out))
    return torch.stack(outs)


def mc_summary(outs: torch.Tensor) -> dict:
    """Per-input summed variance (B,), its standard error (B,), and the SE criterion against the spread."""
    s = outs.shape[0]
    per_draw = (outs - outs.mean(0)).square().sum(-1)  # (S, B)
    var = per_draw.mean(0) * s / (s - 1)
    se = per_draw.std(0) / math.sqrt(s)
    rms_se, spread = float(se.square().mean().sqrt()), float(var.std())
    return {"var": var, "se": se, "n_mc": s, "rms_se": rms_se, "spread": spread, "se_over_spread": rms_se / spread}


def monte_carlo(model: nn.Module, case: Case, x: Any, variances: dict, args: Any, run_dir: Path) -> dict:
    """MC summary (see mc_summary) of as many weight draws as the standard-error criterion needs.

    Chunks of ``--mc-chunk`` draws (each cached as run_dir/mc/chunk<k>.pt, seeded by k) are added until the RMS
    standard error of the per-input variances is under SE_FRACTION of their spread across inputs, with at least
    ``--min-mc`` and at most ``--max-mc`` draws.
    """
    chunks: list[torch.Tensor] = []
    k = 0
    while True:
        path = run_dir / "mc" / f"chunk{k}.pt"
        if path.exists():
            chunks.append(torch.load(path))
        else:
            n_have = sum(len(c) for c in chunks)
            if n_have >= args.min_mc and mc_summary(torch.cat(chunks))["se_over_spread"] < SE_FRACTION:
                break
            if n_have >= args.max_mc:
                break
            t0 = time.perf_counter()
            chunks.append(mc_draws(model, case, x, variances, args.mc_chunk, seed=k))
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(chunks[-1], path)
            summary = mc_summary(torch.cat(chunks))
            print(f"  MC {summary['n_mc']} draws ({time.perf_counter() - t0:.0f} s for this chunk): RMS SE / spread "
                  f"= {summary['se_over_spread']:.3f}", flush=True)
        k += 1
    return mc_summary(torch.cat(chunks))


def options(case: Case) -> list[dict]:
    """The Streamlined option combinations that apply to the case's model."""
    lns = ("frozen", "linearized") if case.has_layernorm else (None,)
    out = [{"mode": "diagonal", "attention": a, "layernorm": ln}
           for a in (("independent", "shared_value") if case.own_attention else ("independent",)) for ln in lns]
    lns_expected = (*lns, "expected") if case.has_layernorm else lns
    out += [{"mode": "diagonal", "attention": "independent", "layernorm": ln, "activations": "quadrature"}
            for ln in lns_expected]
    if case.pools:  # the pooled entries' variances combined as perfectly correlated, both activation rules
        out += [{"mode": "diagonal", "attention": "independent", "layernorm": ln, "pooling": "correlated", **act}
                for ln in lns_expected for act in ({}, {"activations": "quadrature"})]
    out += [{"mode": "full", "attention": "independent", "layernorm": ln} for ln in lns]
    if case.attends:  # the attention weights linearised in Q and K too (with every rule linearised: first order)
        out.append({"mode": "full", "attention": "linearized", "layernorm": "linearized"})
    return out


def option_key(option: dict) -> str:
    """A file-name key for an option combination (linearised activations, the default, unnamed)."""
    suffix = "-quadrature" if option.get("activations") == "quadrature" else ""
    suffix += "-correlated-pooling" if option.get("pooling") == "correlated" else ""
    return f"{option['mode']}-{option['attention']}-{option['layernorm'] or 'none'}{suffix}"


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two (N,) tensors (ties broken by order; the variances are continuous)."""
    ra, rb = (t.argsort().argsort().double() for t in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def compare(var: torch.Tensor, reference: torch.Tensor, n_in: int) -> dict:
    """Spearman and total ratio of per-input variances (N,) against the reference, overall and per group.

    The first ``n_in`` inputs are the in-distribution group, the rest the shifted one.
    """
    return {"spearman": spearman(var, reference), "total": float(var.sum() / reference.sum()),
            "spearman_in": spearman(var[:n_in], reference[:n_in]),
            "spearman_shift": spearman(var[n_in:], reference[n_in:]),
            "total_in": float(var[:n_in].sum() / reference[:n_in].sum()),
            "total_shift": float(var[n_in:].sum() / reference[n_in:].sum())}


def streamlined_row(model: nn.Module, case: Case, variances: dict, x: Any, mc: dict, option: dict, n_full: int,
                    max_full_dim: int = 4096, full_batch_size: int = 5) -> dict:
    """One option: Streamlined's per-input summed variances against MC's.

    Full mode runs on the first ``n_full`` inputs of each group and, where the case splits the network, on the
    covered tail with the trunk's (deterministic) activations as its input: the same propagation, without the
    full-width check on layers that carry no variance. Raises AssertionError when the propagated mean is not
    model(x) to MEAN_ATOL. ``max_full_dim``: Streamlined's limit on the full mode's layer widths;
    ``full_batch_size``: inputs propagated at once in the full mode.
    """
    from posthoc.streamlined import Streamlined
    idx = torch.arange(2 * N_GROUP)
    if option["mode"] == "full":
        idx = torch.cat([torch.arange(n_full), N_GROUP + torch.arange(n_full)])
    x = take(x, idx)
    kwargs = {"activation_covariance": option["mode"], "attention": option["attention"]}
    if option["layernorm"] is not None:
        kwargs["layernorm"] = option["layernorm"]
    if option.get("activations") == "quadrature":
        kwargs["activations"] = "moment_matched"
    if option.get("pooling") is not None:
        kwargs["pooling"] = option["pooling"]
    row: dict = {**option, "n_inputs": len(idx)}
    network, inputs = model, x
    if option["mode"] == "full" and case.split is not None:
        trunk, network = case.split(model)
        with torch.no_grad():
            inputs = trunk(x)
        row["on"] = "tail"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # full mode: a few inputs at a time (per-example D x D covariances; 50 at once took 8.5 GB on SmallViT)
            sp = Streamlined(network, weight_var=variances, batch_size=50 if option["mode"] == "diagonal" else full_batch_size,
                             max_full_dim=max_full_dim, **kwargs)
            t0 = time.perf_counter()
            pred = sp.predict(inputs)
            row["seconds"] = time.perf_counter() - t0
    except (MemoryError, ValueError, RuntimeError) as err:  # full mode above max_full_dim: reported, not hidden
        row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
        return row
    with torch.no_grad():
        expected = call(model, x)
    row["mean_max_abs_err"] = float((pred.mean - expected).abs().max())
    assert row["mean_max_abs_err"] <= MEAN_ATOL, f"propagated mean differs from model(x) by {row['mean_max_abs_err']}"
    row.update(compare(pred.var.sum(-1).detach(), mc["var"][idx], len(idx) // 2))
    row["graph"] = str(getattr(sp, "graph_used", "") or "")
    return row


def fit_dirs(model_dir: Path) -> list[Path]:
    """The model's per-posterior cache folders ``nfit<N>[-layerwise]``, the largest n_fit first (scalar prior first)."""
    return sorted(model_dir.glob("nfit*"), key=lambda p: (-fit_size(p), p.name))


def fit_size(fit_dir: Path) -> int:
    """N of a fit folder ``nfit<N>`` or ``nfit<N>-<prior structure>``."""
    return int(fit_dir.name[4:].split("-")[0])


def evaluate(name: str, args: Any) -> None:
    """Train, fit, sample and compare one model; every stage cached under ``--run-dir/<name>/``.

    The trained weights sit in ``<name>/``; the posterior, MC chunks, model record and option rows of one fit in
    ``<name>/nfit<N>/`` (N: the training inputs the Laplace saw), so fits on different amounts of data coexist.
    """
    case = CASES[name]
    run_dir = Path(args.run_dir) / name
    print(f"== {name}", flush=True)
    data = load_task(case.task, args.data_dir)
    if args.n_train:
        data = (take(data[0], slice(0, args.n_train)), data[1][:args.n_train], *data[2:])
    model, train_record = train(name, case, data, run_dir)
    covered = cover(model, case)
    n_outputs = int(call(model, take(to64(data[2]), slice(0, 1))).shape[-1])
    n_fit = len(data[1]) if args.n_fit == 0 else min(args.n_fit, len(data[1]))
    fit_dir = run_dir / (f"nfit{n_fit}" + ("" if args.prior_structure == "scalar" else f"-{args.prior_structure}"))
    variances, laplace_record, glm = posterior(model, case, data, n_fit, fit_dir, n_outputs, args.prior_structure)
    x = to64(data[2])
    t0 = time.perf_counter()
    mc = monte_carlo(model, case, x, variances, args, fit_dir)
    meta = run_meta()
    record = {"model": name, "env": environment(), "torch": torch.__version__, "date": meta["date"],
              "n_params": sum(p.numel() for p in model.parameters()), "covered": list(case.covered),
              "n_covered_tensors": len(covered), **train_record, **laplace_record,
              "mc_seconds_this_run": time.perf_counter() - t0,
              **{k: v for k, v in mc.items() if k not in ("var", "se")},
              "mc_total_in": float(mc["var"][:N_GROUP].sum()), "mc_total_shift": float(mc["var"][N_GROUP:].sum()),
              "glm": compare(glm, mc["var"], N_GROUP), "attention_rule": case.attention_rule}
    print(f"  MC: {mc['n_mc']} draws, RMS SE {mc['rms_se']:.3g} / spread {mc['spread']:.3g} = "
          f"{mc['se_over_spread']:.3f} (< {SE_FRACTION} required); glm vs MC {record['glm']}", flush=True)
    atomic_write_text(fit_dir / "model.json", json.dumps(record, indent=1))
    for option in options(case):
        if option["mode"] == "full" and args.skip_full:
            continue
        path = fit_dir / "rows" / f"{option_key(option)}.json"
        if path.exists():
            continue
        row = streamlined_row(model, case, variances, x, mc, option, args.n_full)
        print("  ", json.dumps(row), flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(row, indent=1))


def collect(run_dir: Path) -> list[dict]:
    """Every cached model record with its option rows, in CASES order."""
    out = []
    for name in CASES:
        for fit_dir in fit_dirs(run_dir / name):
            path = fit_dir / "model.json"
            if path.exists():
                record = json.loads(path.read_text())
                record["rows"] = [json.loads((fit_dir / "rows" / f"{option_key(o)}.json").read_text())
                                  for o in options(CASES[name])
                                  if (fit_dir / "rows" / f"{option_key(o)}.json").exists()]
                out.append(record)
    return out


def common_arguments(parser: argparse.ArgumentParser) -> str:
    """The options every agreement script takes (models, data, run folder); returns this environment's name."""
    env = environment()
    parser.add_argument("--models", default=",".join(n for n, c in CASES.items() if c.env == env))
    parser.add_argument("--data-dir", default=None, help="folder holding FashionMNIST/ (default: $POSTHOC_DATA)")
    parser.add_argument("--run-dir", default=str(ROOT / "runs" / "streamlined_agreement"))
    return env


def main() -> None:
    """Command line: evaluate the models this environment can run, then rewrite the tables from every cache."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    env = common_arguments(parser)
    parser.add_argument("--n-fit", type=int, default=0,
                        help="training inputs the Laplace is fitted on (the first N; 0: all of them)")
    parser.add_argument("--prior-structure", default="scalar", choices=("scalar", "layerwise"),
                        help="marglik's prior precision: one δ, or one per parameter tensor (own nfit<N>-layerwise)")
    parser.add_argument("--skip-full", action="store_true", help="leave the full-mode rows for a later run")
    parser.add_argument("--n-train", type=int, default=0, help="train on the first N training inputs (0: all)")
    parser.add_argument("--min-mc", type=int, default=200)
    parser.add_argument("--max-mc", type=int, default=4000)
    parser.add_argument("--mc-chunk", type=int, default=100)
    parser.add_argument("--n-full", type=int, default=50, help="inputs per group in the full mode")
    parser.add_argument("--cached-only", action="store_true", help="rewrite the tables from the caches only")
    parser.add_argument("--not-run", default="", help="NAME=REASON;... for models without a full-data fit")
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.missing_reason = dict(item.split("=", 1) for item in args.not_run.split(";") if item)
    if not args.cached_only:
        for name in args.models.split(","):
            if CASES[name].env != env:
                raise SystemExit(f"{name} needs the {CASES[name].env} environment, this is {env}")
            evaluate(name, args)
    write_tables(collect(Path(args.run_dir)), args.missing_reason, RESULTS)


if __name__ == "__main__":
    main()
