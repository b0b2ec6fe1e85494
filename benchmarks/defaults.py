#!/usr/bin/env python
"""Defaults on tasks nobody tuned them to (issue 17): every Laplace recipe at its defaults, worst case per method.

Tasks (none of them a test fixture):
    * four small classification tasks that differ in input size d, classes C, data size N, depth, width,
      activation and seed (two moons and Gaussian mixtures in 2, 10 and 20 dimensions), float64 MLPs trained
      here in seconds; OOD set: inputs drawn from a Gaussian four times wider than the data;
    * the embedded FMNIST CNN (``posthoc bench --suite fmnist-embedded``'s rows, its MAP checkpoint);
    * UCI regression sets (``--uci``, default yacht and energy) over three splits, when ``--data-dir`` holds them.

Methods: the default recipe ``Laplace(model, likelihood, subset, structure).fit(train)``,
``optimize_prior_precision()`` with its defaults (marglik, scalar prior; regression also tunes sigma), then the
glm predictive with a link (``probit``: the default of ``Laplace.__call__``, ``probit_centred``: probit after
removing the all-logits shift, ``mc``: 1,000 logit samples); rows ``[link,val]``: the prior by validation NLL
instead (``optimize_prior_precision(val_loader=...)``'s default since issue 17; ``[probit,val]`` is the default
recipe given a validation loader). On
the small tasks each weight-space posterior is also compared with the exact function-space LLA
(:func:`posthoc.laplace.function_space.exact_lla`) at the same prior precision: Spearman rank correlation and
relative error of the per-input summed logit variance over 200 test points.

Writes benchmarks/results/defaults.{json,md}. Usage:
    OMP_NUM_THREADS=1 python benchmarks/defaults.py [--data-dir ../shared/data] [--skip-fmnist] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from posthoc import metrics
from posthoc.baselines import TemperatureScaling
from posthoc.bench.report import run_meta, write_json, write_markdown_keeping_notes
from posthoc.data.toy import two_moons
from posthoc.laplace import Laplace
from posthoc.laplace.function_space import exact_lla
from posthoc.models.mlp import MLP
from posthoc.network.subset import ParameterSubset

RESULTS = Path(__file__).resolve().parent / "results"
CLOSING_NOTES = "## Closing note"  # hand-written sections of the results file start so; a rerun keeps them
DTYPE = torch.float64
N_AGREEMENT = 200  # test points of the exact-LLA comparison

# (row name, subset_of_weights, hessian_structure, structure options); "la_default" is Laplace's own default.
POSTERIORS: tuple[tuple[str, str, str, dict[str, Any]], ...] = (
    ("la_default", "last_layer", "kron", {}),
    ("la_lastlayer_full", "last_layer", "full", {}),
    ("la_kron", "all", "kron", {}),
    ("la_diag", "all", "diag", {}),
    ("la_full", "all", "full", {}),
    ("la_lowrank", "all", "lowrank", {}),
    ("la_lowrank_prior", "all", "lowrank", {"complement": "prior"}),
)
LINKS = ("probit", "probit_centred", "mc")
FMNIST_METHODS = ("map", "temperature", "la_lastlayer_full", "la_kron", "la_kron_gridsearch", "la_diag",
                  "la_lowrank", "la_lastlayer_full_mc", "la_kron_mc", "la_kron_gridsearch_mc",
                  "la_lastlayer_full_centred", "la_kron_centred", "la_kron_gridsearch_centred", "la_default",
                  "la_default_centred")

# FMNIST bench rows under the small tasks' names where the recipe is the same (marglik prior, that link);
# la_lowrank's bench row subsamples 1,000 examples for the Lanczos products. Other rows keep their bench names.
BENCH_ALIASES = {"la_lastlayer_full": "la_lastlayer_full[probit]", "la_lastlayer_full_mc": "la_lastlayer_full[mc]",
                 "la_kron": "la_kron[probit]", "la_kron_mc": "la_kron[mc]", "la_diag": "la_diag[probit]",
                 "la_lowrank": "la_lowrank[probit]", "la_lowrank_prior": "la_lowrank_prior[probit]",
                 "la_lastlayer_full_centred": "la_lastlayer_full[probit_centred]",
                 "la_kron_centred": "la_kron[probit_centred]", "la_default": "la_default[probit,val]",
                 "la_default_centred": "la_default[probit_centred,val]"}


@dataclass(frozen=True)
class ClassificationTask:
    """A small classification task: data generator, network shape and seed."""

    name: str
    kind: str  # "moons" or "mixture"
    d: int
    n_classes: int
    n_train: int
    hidden: tuple[int, ...]
    activation: str
    seed: int
    spread: float = 1.0  # the mixture's within-class standard deviation

    def sample(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """N points (n, d) float64 and labels (n,) from the task's distribution (fixed centres, fresh noise)."""
        if self.kind == "moons":
            x, y = two_moons(n, noise=0.15, seed=seed)
            return x.to(DTYPE), y
        centres = 2.0 * torch.randn(self.n_classes, self.d, generator=torch.Generator().manual_seed(self.seed),
                                    dtype=DTYPE)
        g = torch.Generator().manual_seed(seed)
        y = torch.randint(0, self.n_classes, (n,), generator=g)
        return centres[y] + self.spread * torch.randn(n, self.d, generator=g, dtype=DTYPE), y


SMALL_TASKS = (
    ClassificationTask("moons-d2-C2-N300-tanh2x50", "moons", 2, 2, 300, (50, 50), "tanh", 0),
    ClassificationTask("mix-d2-C4-N500-relu1x32", "mixture", 2, 4, 500, (32,), "relu", 1, spread=1.0),
    ClassificationTask("mix-d10-C5-N600-gelu2x32", "mixture", 10, 5, 600, (32, 32), "gelu", 2, spread=1.6),
    ClassificationTask("mix-d20-C3-N150-tanh3x16", "mixture", 20, 3, 150, (16, 16, 16), "tanh", 3, spread=2.2),
)


def train_mlp(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: nn.Module, steps: int = 1500,
              weight_decay: float = 1e-4) -> nn.Module:
    """Full-batch Adam (lr 1e-2, the given weight decay) for ``steps`` steps; returns the model in eval mode."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=weight_decay)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    return model.eval()


def _loader(x: torch.Tensor, y: torch.Tensor, batch: int = 128) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)


def _summed_variance(cov: torch.Tensor) -> torch.Tensor:
    return torch.diagonal(cov, dim1=-2, dim2=-1).sum(-1)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two (n,) vectors (ties broken by order; O(n log n))."""
    ra, rb = a.argsort().argsort().to(DTYPE), b.argsort().argsort().to(DTYPE)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def classification_row(name: str, probs: torch.Tensor, y: torch.Tensor, probs_ood: torch.Tensor | None,
                       extra: dict[str, Any]) -> dict[str, Any]:
    """Accuracy, NLL, ECE (15 bins) and entropy OOD AUROC of class probabilities (N, C), plus ``extra``."""
    row = {"method": name, "accuracy": metrics.accuracy(probs, y), "nll": metrics.nll(probs, y),
           "ece": metrics.calibration_bins(probs, y).ece}
    if probs_ood is not None:
        row["auroc_entropy"] = metrics.auroc(metrics.entropy(probs), metrics.entropy(probs_ood))
    return {**row, **extra}


def run_small_task(task: ClassificationTask, links: tuple[str, ...], val_recipe: bool,
                   posteriors: tuple[tuple[str, str, str, dict[str, Any]], ...] = POSTERIORS) -> list[dict[str, Any]]:
    """Train the task's MLP, then MAP, temperature and each of ``posteriors`` x link at its defaults.

    ``val_recipe``: also each posterior x link with the prior tuned by validation NLL (Laplace's default grid,
    logspace(-4, 4, 21)), rows named ``name[link,val]``.
    """
    torch.manual_seed(task.seed)
    x, y = task.sample(task.n_train, task.seed + 100)
    x_val, y_val = task.sample(300, task.seed + 200)
    x_test, y_test = task.sample(1000, task.seed + 300)
    gen = torch.Generator().manual_seed(task.seed + 400)
    x_ood = x.mean(0) + 4 * x.std(0) * torch.randn(1000, task.d, generator=gen, dtype=DTYPE)
    model = MLP(task.d, task.hidden, task.n_classes, activation=task.activation).to(DTYPE)
    train_mlp(model, x, y, nn.CrossEntropyLoss())
    rows = []
    with torch.no_grad():
        logits, logits_ood = model(x_test), model(x_ood)
    rows.append(classification_row("map", logits.softmax(-1), y_test, logits_ood.softmax(-1), {}))
    temp = TemperatureScaling(model).fit(_loader(x_val, y_val))
    with torch.no_grad():
        rows.append(classification_row("temperature", temp.predict(x_test).probs(), y_test,
                                       temp.predict(x_ood).probs(), {"temperature": temp.temperature}))
    for name, subset, structure, options in posteriors:
        t0 = time.perf_counter()
        la = Laplace(model, "classification", subset, structure, progress=False, structure_options=options)
        la.fit(_loader(x, y))
        la.optimize_prior_precision()
        pred, pred_ood = la.predict(x_test), la.predict(x_ood)
        fit_s = time.perf_counter() - t0
        exact = exact_lla(ParameterSubset(model, subset), x, x_test[:N_AGREEMENT], "classification",
                          la.prior_precision)
        v_ex, v = _summed_variance(exact.cov), _summed_variance(pred.cov[:N_AGREEMENT])
        agreement = {"spearman_exact_lla": spearman(v, v_ex),
                     "rel_err_exact_lla": float((v - v_ex).norm() / v_ex.norm()),
                     "prior_precision": float(la.prior_precision.mean()), "fit_predict_s": fit_s}
        for link in links:
            rows.append(classification_row(f"{name}[{link}]", pred.probs(link), y_test, pred_ood.probs(link),
                                           agreement))
        if not val_recipe:
            continue
        for link in links:  # the validation recipe: the prior by validation NLL of this link's probabilities
            la.optimize_prior_precision(method="gridsearch", val_loader=_loader(x_val, y_val), link_approx=link)
            tuned, tuned_ood = la.predict(x_test), la.predict(x_ood)
            rows.append(classification_row(f"{name}[{link},val]", tuned.probs(link), y_test, tuned_ood.probs(link),
                                           {"prior_precision": float(la.prior_precision.mean())}))
    return rows


def run_uci(name: str, split: int, data_dir: str,
            posteriors: tuple[tuple[str, str, str, dict[str, Any]], ...] = POSTERIORS) -> list[dict[str, Any]]:
    """One UCI split: a 1 x 50 tanh MLP (seeded), MAP with the training residuals' noise, each of ``posteriors``."""
    from posthoc.data.uci import load_uci

    data = load_uci(name, split, data_dir=data_dir)
    x, y = data.x_train.to(DTYPE), data.y_train.to(DTYPE)
    x_test, y_test = data.x_test.to(DTYPE), data.y_test.to(DTYPE)
    torch.manual_seed(split)
    model = MLP(data.n_features, (50,), 1, activation="tanh").to(DTYPE)
    train_mlp(model, x, y, nn.MSELoss(), steps=3000)
    with torch.no_grad():
        mean = model(x_test)
        sigma2 = float((model(x) - y).square().mean())
    y_scale = float(data.y_std)
    rows = [{"method": "map", "nll": metrics.gaussian_nll(mean, torch.full_like(mean, sigma2), y_test, y_scale),
             "sigma_noise": math.sqrt(sigma2)}]
    for row_name, subset, structure, options in posteriors:
        la = Laplace(model, "regression", subset, structure, progress=False, structure_options=options)
        la.fit(_loader(x, y))
        la.optimize_prior_precision()
        pred = la.predict(x_test)
        var = pred.var.reshape(mean.shape) + la.sigma_noise.square()
        rows.append({"method": row_name, "nll": metrics.gaussian_nll(pred.mean.reshape(mean.shape), var, y_test,
                                                                      y_scale),
                     "sigma_noise": float(la.sigma_noise), "prior_precision": float(la.prior_precision.mean())})
    return rows


def fmnist_rows(methods: tuple[str, ...]) -> list[dict[str, Any]]:
    """The embedded FMNIST CNN's bench rows (its cached MAP, or trained once: about two minutes)."""
    from posthoc.bench.runner import run_bench

    return run_bench("fmnist-embedded", list(methods), progress=False, log=lambda message: None).rows


def _worst(entries: list[dict[str, Any]], key: str, largest: bool) -> tuple[float | None, str | None]:
    have = [e for e in entries if key in e]
    if not have:
        return None, None
    pick = (max if largest else min)(have, key=lambda e: e[key])
    return pick[key], pick["task"]


def read_bench_rows(paths: list[str]) -> list[dict[str, Any]]:
    """The rows of ``posthoc bench`` results.json files, one per method (a later file's row wins), MAP first.

    Raises ValueError when the files come from different MAP checkpoints or hold no MAP row.
    """
    rows: dict[str, dict[str, Any]] = {}
    checkpoints = set()
    for path in paths:
        payload = json.loads(Path(path).read_text())
        checkpoints.add(payload["map"]["checkpoint"].rsplit("/", 1)[-1])
        rows.update({BENCH_ALIASES.get(row["method"], row["method"]): {
            **row, "method": BENCH_ALIASES.get(row["method"], row["method"]), "bench_row": row["method"],
            "source": Path(path).name} for row in payload["rows"]})
    if len(checkpoints) != 1 or "map" not in rows:
        raise ValueError(f"--fmnist-results need one MAP checkpoint and a 'map' row; got checkpoints {checkpoints} "
                         f"and methods {sorted(rows)}")
    return [rows.pop("map"), *rows.values()]


def merge_fmnist(earlier: list[dict[str, Any]], new_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The FMNIST rows of earlier runs (``--tasks-from``) with ``new_rows`` added (a new row wins per method).

    Raises ValueError when the new MAP row's NLL differs from the earlier one's (another MAP).
    """
    rows: dict[str, dict[str, Any]] = {}
    for run in earlier:
        rows.update({r["method"]: r for r in run["tasks"].get("fmnist-embedded-cnn", [])})
    if "map" in rows and not math.isclose(rows["map"]["nll"], new_rows[0]["nll"], rel_tol=1e-6):
        raise ValueError(f"the new FMNIST rows come from another MAP (NLL {new_rows[0]['nll']} against "
                         f"{rows['map']['nll']})")
    rows.update({r["method"]: r for r in new_rows})
    return list(rows.values())


def merge_rows(earlier: list[dict[str, Any]], new_rows: list[dict[str, Any]], task: str) -> list[dict[str, Any]]:
    """A task's earlier rows with ``new_rows`` joined per method: a new row replaces the earlier one in place.

    The earlier ``map`` and ``temperature`` rows are kept (their numbers do not change).

    Raises:
        ValueError: both have a MAP row and their NLLs differ (another MAP: the rows would not compare).
    """
    rows = {r["method"]: r for r in earlier}
    new = {r["method"]: r for r in new_rows}
    if "map" in rows and "map" in new and not math.isclose(rows["map"]["nll"], new["map"]["nll"], rel_tol=1e-6):
        raise ValueError(f"{task}: the new rows come from another MAP (NLL {new['map']['nll']} against "
                         f"{rows['map']['nll']})")
    rows.update({m: r for m, r in new.items() if m not in rows or m not in ("map", "temperature")})
    return list(rows.values())


def worst_cases(tasks: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per method over the classification tasks: its worst figure of each kind and the task it came from.

    The largest NLL excess over MAP (relative), the largest ECE excess over MAP, the smallest entropy-AUROC gain
    over MAP, the smallest Spearman with the exact LLA.
    """
    by_method: dict[str, list[dict[str, Any]]] = {}
    for task, rows in tasks.items():
        base = next(r for r in rows if r["method"] == "map")
        for row in rows:
            if "ece" not in row or row["method"] == "map":
                continue
            entry = {"task": task, "nll_excess": row["nll"] / base["nll"] - 1, "ece_excess": row["ece"] - base["ece"]}
            if row.get("auroc_entropy") is not None and base.get("auroc_entropy") is not None:
                entry["auroc_gain"] = row["auroc_entropy"] - base["auroc_entropy"]
            if row.get("spearman_exact_lla") is not None:
                entry["spearman"] = row["spearman_exact_lla"]
            by_method.setdefault(row["method"], []).append(entry)
    summary = []
    for method, entries in by_method.items():
        nll, nll_task = _worst(entries, "nll_excess", True)
        ece, ece_task = _worst(entries, "ece_excess", True)
        auroc, _ = _worst(entries, "auroc_gain", False)
        rho, _ = _worst(entries, "spearman", False)
        summary.append({"method": method, "tasks": len(entries), "worst_nll_excess": nll, "worst_nll_task": nll_task,
                        "worst_ece_excess": ece, "worst_ece_task": ece_task, "worst_auroc_gain": auroc,
                        "worst_spearman": rho})
    return summary


def regression_worst_cases(tasks: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per method over the UCI splits: the largest test NLL minus the MAP's (nats; NLLs can be negative)."""
    worst: dict[str, tuple[float, str]] = {}
    for task, rows in tasks.items():
        base = next(r for r in rows if r["method"] == "map")["nll"]
        for row in rows:
            if row["method"] != "map" and (row["method"] not in worst or row["nll"] - base > worst[row["method"]][0]):
                worst[row["method"]] = (row["nll"] - base, task)
    return [{"method": m, "worst_nll_minus_map": v, "worst_task": t} for m, (v, t) in worst.items()]


def _fmt(value: Any, spec: str = ".4f") -> str:
    return "—" if value is None else format(value, spec)


def markdown(payload: dict[str, Any]) -> str:
    """The report: the worst-case table, then each task's rows."""
    lines = ["# Defaults on untuned tasks (issue 17)", "",
             "Worst case per method over the classification tasks (NLL excess: NLL / MAP's NLL - 1; ECE excess: "
             "ECE - MAP's ECE; AUROC gain: entropy OOD AUROC - MAP's; Spearman: per-input summed variance vs the "
             "exact LLA at the same prior precision, small tasks only). Goals: NLL excess <= 0.5%, ECE excess "
             "<= 0.01, AUROC gain > 0.", "",
             "| method | tasks | worst NLL excess | on | worst ECE excess | on | worst AUROC gain | worst Spearman |",
             "|---|---|---|---|---|---|---|---|"]
    for s in payload["worst_case"]:
        lines.append(f"| {s['method']} | {s['tasks']} | {_fmt(s['worst_nll_excess'], '+.2%')} | {s['worst_nll_task']} "
                     f"| {_fmt(s['worst_ece_excess'], '+.4f')} | {s['worst_ece_task']} "
                     f"| {_fmt(s['worst_auroc_gain'], '+.3f')} | {_fmt(s['worst_spearman'], '.3f')} |")
    if payload.get("regression_worst_case"):
        lines += ["", "UCI regression, worst case per method over the splits: test Gaussian NLL minus the MAP's "
                  "(the MAP's noise: the training residuals' RMS).", "",
                  "| method | worst NLL - MAP's NLL | on |", "|---|---|---|"]
        lines += [f"| {r['method']} | {r['worst_nll_minus_map']:+.3f} | {r['worst_task']} |"
                  for r in payload["regression_worst_case"]]
    for task, rows in payload["tasks"].items():
        lines += ["", f"## {task}", ""]
        keys = [k for k in ("accuracy", "nll", "ece", "auroc_entropy", "spearman_exact_lla", "rel_err_exact_lla",
                            "prior_precision", "sigma_noise") if any(k in r for r in rows)]
        lines += ["| method | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for r in rows:
            lines.append(f"| {r['method']} | " + " | ".join(_fmt(r.get(k), ".4g") for k in keys) + " |")
    meta = payload["meta"]
    for run in meta.get("tasks_from", []):
        lines += ["", f"Rows of the small and UCI tasks from {run['file']}: `{run['command']}`, {run['date']}."]
    if meta.get("merge_from"):
        lines += ["", f"Rows joined per method from {', '.join(meta['merge_from'])} (benchmarks/defaults_large.py)."]
    lines += ["", f"Command: `{meta['command']}`; {meta['date']}; commit {meta['git_commit']}; machine: "
              f"{meta['machine']}; versions: {meta['versions']}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    """Run the suite and write benchmarks/results/defaults.{json,md}."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None, help="folder with UCI/ (UCI rows skipped without it)")
    parser.add_argument("--uci", default="yacht,energy", help="UCI sets, comma-separated (default yacht,energy)")
    parser.add_argument("--splits", type=int, default=3, help="UCI splits per set (default 3)")
    parser.add_argument("--skip-fmnist", action="store_true", help="leave out the embedded FMNIST CNN")
    parser.add_argument("--fmnist-results", nargs="*", default=(), metavar="RESULTS_JSON",
                        help="take the FMNIST rows from these `posthoc bench --suite fmnist-embedded` results.json "
                             "files (on the same MAP checkpoint; later files win per method) instead of running them")
    parser.add_argument("--quick", action="store_true", help="the first two small tasks only, probit link only")
    parser.add_argument("--name", default="defaults", help="results file stem (default defaults)")
    parser.add_argument("--tasks-from", nargs="*", default=(), metavar="DEFAULTS_JSON",
                        help="take the small and UCI tasks' rows from earlier runs' JSON instead of running them "
                             "(to merge runs and add FMNIST rows); recorded in the output's meta")
    parser.add_argument("--small", default=None, help="indices of the small tasks to run, comma-separated "
                        "(default all; '' for none)")
    parser.add_argument("--methods", default=None, help="posterior rows to run, comma-separated (default all: "
                        f"{','.join(p[0] for p in POSTERIORS)}); with --tasks-from, a rerun task's new rows replace "
                        "those methods' rows and keep the others (same MAP, checked); with --data-dir the UCI splits "
                        "are rerun for them too")
    parser.add_argument("--merge-from", nargs="*", default=(), metavar="ROWS_JSON",
                        help="join these files' rows ({'tasks': {task: rows}}, e.g. benchmarks/defaults_large.py's) "
                        "per task and method (a new row replaces an earlier one; the MAP rows must agree)")
    args = parser.parse_args()
    posteriors = POSTERIORS
    if args.methods is not None:
        names = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = sorted(set(names) - {p[0] for p in POSTERIORS})
        if unknown:
            raise SystemExit(f"--methods: unknown {unknown}; choose from {[p[0] for p in POSTERIORS]}")
        posteriors = tuple(p for p in POSTERIORS if p[0] in names)
    torch.set_num_threads(1)
    tasks: dict[str, list[dict[str, Any]]] = {}
    regression: dict[str, list[dict[str, Any]]] = {}
    earlier = [json.loads(Path(path).read_text()) for path in args.tasks_from]
    chosen: tuple[ClassificationTask, ...] = SMALL_TASKS[:2] if args.quick else SMALL_TASKS
    if args.small is not None:
        chosen = tuple(SMALL_TASKS[int(i)] for i in args.small.split(",") if i.strip())
    for run in earlier:
        for name, rows in run["tasks"].items():
            if not name.startswith("fmnist") and name not in {t.name for t in chosen if args.small is not None}:
                (regression if name.startswith("uci-") else tasks)[name] = rows
    # file names only: the results are tracked and name no folder of this machine
    meta = {**run_meta(), "command": " ".join(Path(a).name if a.startswith("/") else a for a in sys.argv),
            "tasks_from": list({json.dumps(entry, sort_keys=True): entry for entry in (  # each earlier run once
                *(nested for run in earlier for nested in run["meta"].get("tasks_from", [])),
                *({"file": Path(path).name, "date": run["meta"]["date"], "command": run["meta"]["command"]}
                  for path, run in zip(args.tasks_from, earlier, strict=True)))}.values()),
            "fmnist_results": [Path(p).name for p in args.fmnist_results], "methods": args.methods,
            "merge_from": [Path(p).name for p in args.merge_from]}

    def write() -> dict[str, Any]:  # after every task, so an interrupted run keeps what it finished
        payload = {"meta": meta, "tasks": {**tasks, **regression}, "worst_case": worst_cases(tasks),
                   "regression_worst_case": regression_worst_cases(regression)}
        write_json(RESULTS / f"{args.name}.json", payload)
        write_markdown_keeping_notes(RESULTS / f"{args.name}.md", markdown(payload), CLOSING_NOTES)
        return payload

    for task in chosen if args.small is not None or not earlier else ():
        print(f"task {task.name}", flush=True)
        rows = run_small_task(task, ("probit",) if args.quick else LINKS, not args.quick, posteriors)
        previous = [r for run in earlier for r in run["tasks"].get(task.name, [])]
        tasks[task.name] = merge_rows(previous, rows, task.name) if args.methods is not None else rows
        write()
    if args.fmnist_results:
        tasks["fmnist-embedded-cnn"] = merge_fmnist(earlier, read_bench_rows(args.fmnist_results))
    elif earlier:  # the earlier runs' FMNIST rows, joined per method
        fmnist = [r for run in earlier for r in run["tasks"].get("fmnist-embedded-cnn", [])]
        if fmnist:
            tasks["fmnist-embedded-cnn"] = merge_rows([], fmnist, "fmnist-embedded-cnn")
    elif not args.skip_fmnist:
        print("task fmnist-embedded", flush=True)
        tasks["fmnist-embedded-cnn"] = fmnist_rows(FMNIST_METHODS)
    if (not earlier or args.methods is not None) and args.data_dir is not None and Path(args.data_dir, "UCI").is_dir():
        for name in args.uci.split(","):
            for split in range(args.splits):
                print(f"task uci {name} split {split}", flush=True)
                key = f"uci-{name}-split{split}"
                regression[key] = merge_rows(regression.get(key, []), run_uci(name, split, args.data_dir, posteriors),
                                             key)
                write()
    for path in args.merge_from:
        for name, rows in json.loads(Path(path).read_text())["tasks"].items():
            tasks[name] = merge_rows(tasks.get(name, []), rows, name)
    print(markdown(write()))


if __name__ == "__main__":
    main()
