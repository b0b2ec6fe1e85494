#!/usr/bin/env python
"""ScaLLA at its defaults on tasks nobody tuned them to (issue 17): variance agreement with the exact LLA.

Tasks: the four small classification tasks of ``benchmarks/defaults.py`` (the same data, MLPs and training, built
by its own functions) and the 1,315-parameter tanh MLP of tests/scalla (the fixture the defaults were first
measured on; its 3,000 box-uniform context points are used for it only where a variant asks for context).
Per task and variant: ``ScaLLA(model, "classification", **variant).fit(train)`` (no context loader unless the
variant says so), then at each prior precision delta the per-input summed logit variance of 200 in-distribution
test points against :func:`posthoc.laplace.function_space.exact_lla` at the same delta: Spearman rank correlation
and relative error ||v - v_exact|| / ||v_exact||, at delta = 1 (ScaLLA's default) and at the delta ScaLLA's own
``optimize_prior_precision("marglik")`` picks. Variants: ``defaults`` (the library's defaults when run), ``before``
(the defaults before issue 17: targets on the training points only, lr 1e-3), ``jitter_lr1e-3`` / ``jitter_lr3e-3``
(the jittered target fill at either lr) and single-setting changes (surrogate width, m, steps, lr, objective).

Writes benchmarks/results/<name>.{json,md} (default scalla_defaults). Usage:
    OMP_NUM_THREADS=1 python benchmarks/scalla_defaults.py [--variants defaults,...] [--seeds 0,1] [--tasks 0,2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from posthoc.bench.report import run_meta, write_json
from posthoc.laplace.function_space import exact_lla
from posthoc.models.mlp import MLP
from posthoc.network.subset import ParameterSubset
from posthoc.scalla import ScaLLA

sys.path.insert(0, str(Path(__file__).resolve().parent))
from defaults import DTYPE, SMALL_TASKS, ClassificationTask, spearman, train_mlp  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
N_TEST = 200
NOTE = """## What limits ScaLLA on these tasks (issue 17)

- The failing task, mix-d20 (P = 931, N = 150, C = 3), fails on generalisation, not capacity: its GGN is tiny (top
  eigenvalue 1.0), so the LLA variance there is nearly the prior's, the NTK diagonal; exact features along the top
  100 GGN eigenvectors give Spearman 0.999 (50: 0.996), but the learned surrogate's kernel error is 0.29 on the 150
  training points and 0.69 on test points. Capacity and budget do not help at seed 0 (Spearman at delta 1):
  surrogate_hidden 500 0.670, m 200 0.651, m 50 0.697, 6,000 steps 0.707, lr 3e-3 0.714, Rademacher directions
  0.710, fresh trunk 0.718, 1,000 steps 0.742, hidden 50 0.737 (defaults 0.703). More target inputs do: the task's
  wide context points 0.895, training inputs plus noise of 1x the feature std 0.896 (0.3x: 0.846, 2x: 0.859;
  mixup 0.840), and with lr 3e-3 0.918.
- Rule (the library's defaults since this run): with the "directions" objective, no context loader and fewer than
  n_target_points training inputs, the target set is filled with jittered training inputs (target_jitter = 1.0)
  and the default lr is 3e-3; otherwise nothing changes (lr 1e-3, the FMNIST-measured rate; the FMNIST rows were not
  rerun: its 4,000+ training images and MNIST context never trigger the fill).
- Remaining: mix-d20's margin is small (0.901 / 0.908 at delta 1 for seeds 0 / 1; 0.907 / 0.903 when this rule was
  set, before later changes to the surrogate's training), relative errors stay 0.4-0.85 (ranks agree,
  magnitudes do not: mix-d2's 0.85 at delta 1), and the "probes" objective and the biased variant keep their old
  targets (not measured here)."""

# Variants: ScaLLA keyword arguments ({} = today's defaults); "context": fit with the task's context points.
VARIANTS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "before": {"target_jitter": 0.0},  # the defaults before issue 17: targets on the training points only
    "jitter_lr1e-3": {"lr": 1e-3},
    "jitter_lr3e-3": {"lr": 3e-3},
    "context": {"context": True},
    "h500": {"surrogate_hidden": 500},
    "h1000": {"surrogate_hidden": 1000},
    "m50": {"n_features": 50},
    "m200": {"n_features": 200},
    "steps6000": {"steps": 6000},
    "lr3e-3": {"lr": 3e-3},
    "rademacher": {"directions": "rademacher"},
    "probes": {"objective": "probes", "batch_size": 32, "n_probes": 4, "lr": 3e-3},
}


@dataclass
class Problem:
    """A trained classifier with its training inputs, loaders and 200 in-distribution test inputs."""

    name: str
    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    x_test: torch.Tensor
    x_context: torch.Tensor

    @property
    def n_params(self) -> int:
        """P, the network's parameter count."""
        return sum(p.numel() for p in self.model.parameters())


def small_task(task: ClassificationTask) -> Problem:
    """The task's MLP trained exactly as ``benchmarks/defaults.py`` trains it (same seeds, same order of draws)."""
    torch.manual_seed(task.seed)
    x, y = task.sample(task.n_train, task.seed + 100)
    task.sample(300, task.seed + 200)  # the validation draw: keeps nothing, as in defaults.py
    x_test, _ = task.sample(1000, task.seed + 300)
    gen = torch.Generator().manual_seed(task.seed + 400)
    x_ood = x.mean(0) + 4 * x.std(0) * torch.randn(1000, task.d, generator=gen, dtype=DTYPE)
    model = MLP(task.d, task.hidden, task.n_classes, activation=task.activation).to(DTYPE)
    train_mlp(model, x, y, nn.CrossEntropyLoss())
    return Problem(task.name, model, x, y, x_test[:N_TEST], x_ood)


def test_mlp() -> Problem:
    """The tests/scalla fixture (4 inputs, 3 classes, 400 points, 4-32-32-3 tanh), 200 fresh test points."""
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 4, generator=g, dtype=DTYPE) * 2
    y = torch.arange(400) % 3
    x = centers[y] + torch.randn(400, 4, generator=g, dtype=DTYPE)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3)).to(DTYPE)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    g_test = torch.Generator().manual_seed(1000)
    x_test = centers[torch.arange(N_TEST) % 3] + torch.randn(N_TEST, 4, generator=g_test, dtype=DTYPE)
    x_context = torch.rand(3000, 4, generator=g_test, dtype=DTYPE) * 16 - 8
    return Problem("test-mlp-d4-C3-N400-tanh2x32", model, x, y, x_test, x_context)


PROBLEMS: tuple[Callable[[], Problem], ...] = (*(lambda t=t: small_task(t) for t in SMALL_TASKS), test_mlp)


def _loader(x: torch.Tensor, y: torch.Tensor) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=128, shuffle=False)


def _summed_variance(cov: torch.Tensor) -> torch.Tensor:
    return torch.diagonal(cov, dim1=-2, dim2=-1).sum(-1)


def agreement(problem: Problem, scalla: ScaLLA, delta: float) -> dict[str, float]:
    """Spearman and relative error of ScaLLA's per-input summed variance against the exact LLA's at ``delta``."""
    exact = _summed_variance(exact_lla(ParameterSubset(problem.model, "all"), problem.x, problem.x_test,
                                       "classification", delta).cov)
    saved = scalla.prior_precision
    scalla.prior_precision = delta
    approx = _summed_variance(scalla.predict(problem.x_test).cov)
    scalla.prior_precision = saved
    return {"spearman": spearman(approx, exact), "rel_err": float((approx - exact).norm() / exact.norm())}


def run(problem: Problem, variant: str, seed: int) -> dict[str, Any]:
    """Fit ScaLLA with the variant's settings and measure its agreement at delta = 1 and at its marglik delta."""
    options = dict(VARIANTS[variant])
    context = options.pop("context", False)
    t0 = time.perf_counter()
    scalla = ScaLLA(problem.model, "classification", seed=seed, progress=False, **options)
    context_loader = (_loader(problem.x_context, torch.zeros(len(problem.x_context), dtype=torch.long))
                      if context else None)
    scalla.fit(_loader(problem.x, problem.y), context_loader=context_loader)
    fit_s = time.perf_counter() - t0
    at_one = agreement(problem, scalla, 1.0)
    marglik = float(scalla.optimize_prior_precision("marglik"))
    at_marglik = agreement(problem, scalla, marglik)
    return {"task": problem.name, "variant": variant, "seed": seed, "n_params": problem.n_params,
            "n_train": len(problem.x), "n_outputs": int(problem.model(problem.x[:1]).shape[-1]),
            "n_latent": scalla.n_latent, "surrogate_hidden": scalla.surrogate_hidden,
            "spearman_delta1": at_one["spearman"], "rel_err_delta1": at_one["rel_err"],
            "delta_marglik": marglik, "spearman_marglik": at_marglik["spearman"],
            "rel_err_marglik": at_marglik["rel_err"], "fit_s": fit_s}


def worst_cases(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per variant: the smallest Spearman (either delta) over tasks and seeds, where it was, and the largest fit time."""
    out = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == variant]
        worst = min(mine, key=lambda r: min(r["spearman_delta1"], r["spearman_marglik"]))
        out.append({"variant": variant, "runs": len(mine),
                    "worst_spearman_delta1": min(r["spearman_delta1"] for r in mine),
                    "worst_spearman_marglik": min(r["spearman_marglik"] for r in mine),
                    "worst_task": worst["task"], "worst_seed": worst["seed"],
                    "max_rel_err_delta1": max(r["rel_err_delta1"] for r in mine),
                    "max_fit_s": max(r["fit_s"] for r in mine)})
    return out


def markdown(payload: dict[str, Any]) -> str:
    """The report: worst case per variant, then every run."""
    lines = ["# ScaLLA defaults on untuned tasks (issue 17)", "",
             "Spearman / relative error: ScaLLA's per-input summed logit variance against the exact LLA's at the "
             f"same prior precision delta, {N_TEST} in-distribution test points; delta = 1 (ScaLLA's default) and "
             "the delta of ScaLLA's `optimize_prior_precision(\"marglik\")`. Goal: Spearman >= 0.9 on every task.",
             "", "| variant | runs | worst Spearman (delta 1) | worst Spearman (marglik delta) | on (seed) "
             "| max rel. error (delta 1) | max fit s |", "|---|---|---|---|---|---|---|"]
    for s in payload["worst_case"]:
        lines.append(f"| {s['variant']} | {s['runs']} | {s['worst_spearman_delta1']:.3f} | "
                     f"{s['worst_spearman_marglik']:.3f} | {s['worst_task']} ({s['worst_seed']}) | "
                     f"{s['max_rel_err_delta1']:.3f} | {s['max_fit_s']:.1f} |")
    keys = ("task", "variant", "seed", "n_params", "n_train", "n_outputs", "n_latent", "surrogate_hidden",
            "spearman_delta1", "rel_err_delta1", "delta_marglik", "spearman_marglik", "rel_err_marglik", "fit_s")
    lines += ["", "## Runs", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in payload["rows"]:
        lines.append("| " + " | ".join(format(r[k], ".4g") if isinstance(r[k], float) else str(r[k]) for k in keys)
                     + " |")
    lines += ["", NOTE]
    meta = payload["meta"]
    lines += [f"\nRows merged from the run `{command}`." for command in meta.get("rows_from", [])]
    lines += ["", f"Command: `{meta['command']}`; {meta['date']}; commit {meta['git_commit']}; machine: "
              f"{meta['machine']}; versions: {meta['versions']}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    """Run the chosen variants on the chosen tasks and seeds; write benchmarks/results/<name>.{json,md}."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="defaults", help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--tasks", default=None, help="indices (0-3 the small tasks, 4 the test MLP; default all)")
    parser.add_argument("--seeds", default="0", help="ScaLLA seeds, comma-separated (default 0)")
    parser.add_argument("--name", default="scalla_defaults", help="results file stem")
    parser.add_argument("--rows-from", nargs="*", default=(), metavar="JSON",
                        help="start from these earlier runs' rows (to merge runs made in parallel); their commands "
                             "are recorded")
    args = parser.parse_args()
    torch.set_num_threads(1)
    chosen = range(len(PROBLEMS)) if args.tasks is None else [int(i) for i in args.tasks.split(",") if i.strip()]
    earlier = [json.loads(Path(path).read_text()) for path in args.rows_from]
    rows: list[dict[str, Any]] = [row for run in earlier for row in run["rows"]]
    payload: dict[str, Any] = {"meta": {**run_meta(), "rows_from": [run["meta"]["command"] for run in earlier]},
                               "rows": rows, "worst_case": worst_cases(rows) if rows else []}
    for index in chosen:
        problem = PROBLEMS[index]()
        for variant in args.variants.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                rows.append(run(problem, variant, seed))
                r = rows[-1]
                print(f"{r['task']} {variant} seed {seed}: rho {r['spearman_delta1']:.3f} / "
                      f"{r['spearman_marglik']:.3f} (delta {r['delta_marglik']:.3g}), rel err "
                      f"{r['rel_err_delta1']:.3f}, {r['fit_s']:.1f} s", flush=True)
                payload.update(rows=rows, worst_case=worst_cases(rows))
                write_json(RESULTS / f"{args.name}.json", payload)
                (RESULTS / f"{args.name}.md").write_text(markdown(payload))
    write_json(RESULTS / f"{args.name}.json", payload)
    (RESULTS / f"{args.name}.md").write_text(markdown(payload))
    print(markdown(payload))


if __name__ == "__main__":
    main()
