"""ScaLLA on the full FMNIST suite at the authors' settings, resumable across runs, beside posthoc's defaults.

    OMP_NUM_THREADS=1 nohup nice -n 19 .venv/bin/python benchmarks/scalla_authors.py --data-dir DIR \
        --max-minutes 60 &

The authors' recipe (the ScaLLA paper's FMNIST example): m = 100, the paper's probe objective with 5 training
(FMNIST) + 5 context (MNIST train) points and one Rademacher probe per step, Adam lr 5e-5 constant, 1,000,000 steps
(1e7 JVP evaluations), a freshly initialised surrogate trunk (``surrogate_init="fresh"``) and delta = 1 fixed, no
tuning; the unbiased and the biased variant. posthoc's defaults differ: the "directions" objective (3,000 Adam steps
of 64 points on cached JVPs along the top-100 GGN eigenvectors), the surrogate trunk initialised from the trained MAP
network (``surrogate_init="model"``) and delta by validation NLL (the bench rows ``scalla_defaults`` and
``scalla_biased_defaults``, computed here on the same MAP with ``--defaults``).

A full run is about 6 h per variant on one CPU thread, so training resumes from its checkpoint under ``--run-dir``
(``scalla-<variant>.pt``, exact resume: posthoc.scalla.training) and stops cleanly at a checkpoint once this
invocation's ``--max-minutes`` are spent (shared between the variants still training; 0: train only to the next
checkpoint). Every invocation then evaluates each variant's current checkpoint (the posterior pass over the 55,000
training images, test and OOD predictions; cached per step reached) and rewrites benchmarks/results/scalla_authors.
{json,md} with "steps reached / 1,000,000" per row and the authors' figures beside. The MAP is the suite's 40-epoch
reference schedule, read from ``--run-dir``; train it there first with
``posthoc train --suite fmnist --checkpoint-dir <run-dir>``. ``--table-only`` rewrites the table from the cached
evaluations alone (safe while another invocation trains).

Across machines: each invocation that stops a variant short of the full run copies its checkpoint and the MAP to
``--resume-dir`` (benchmarks/checkpoints/scalla_authors, tracked in git; about 5 MB per variant) and a fresh clone
copies them back into ``--run-dir`` first; our rows already in the results file are imported into the evaluation
cache, so a variant finished elsewhere keeps its row, and a row from further along stays until the run passes it.
The folder empties once every variant has finished.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterable

from torch import nn

from posthoc.bench.methods import BenchContext, MethodSpec, get_methods
from posthoc.bench.report import recorded_path, run_meta, write_json
from posthoc.bench.runner import EVAL_BATCH, evaluate_method, train_suite_model
from posthoc.bench.scalla_methods import DEFAULTS, scalla_builder
from posthoc.bench.suites import get_bench_suite
from posthoc.data.loaders import make_loader
from posthoc.data.suites import get_suite
from posthoc.models.training import checkpoint_key
from posthoc.predictive import GaussianPredictive, predict_loader
from posthoc.scalla import ScaLLA
from posthoc.scalla.training import REFERENCE_RECIPE
from posthoc.utils.io import atomic_copy, atomic_write_text, copy_missing

if str(Path(__file__).resolve().parent) not in sys.path:  # the helper module beside this script
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from scalla_authors_metrics import BATCH as AUTHORS_BATCH  # noqa: E402
from scalla_authors_metrics import authors_code_metrics  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DEFAULT_RUN_DIR = REPO / "runs" / "scalla_authors"
DEFAULT_RESUME_DIR = REPO / "benchmarks" / "checkpoints" / "scalla_authors"
VARIANTS = {"unbiased": False, "biased": True}
AUTHOR_STEPS = REFERENCE_RECIPE.steps
CHECKPOINT_EVERY = 2000
AUTHORS_OPTIONS: dict[str, Any] = dict(
    n_features=100, prior_precision=1.0, surrogate_init="fresh", objective=REFERENCE_RECIPE.objective,
    batch_size=REFERENCE_RECIPE.batch_size, n_probes=REFERENCE_RECIPE.n_probes, lr=REFERENCE_RECIPE.lr,
    lr_schedule=REFERENCE_RECIPE.lr_schedule)
# the paper's table (single seed): ACC, NLL, ECE, Brier, OOD AUROC of the variance score
PAPER = {"unbiased": {"accuracy": 0.9103, "nll": 0.2528, "ece": 0.0078, "brier": 0.1311, "auroc_variance": 0.785},
         "biased": {"accuracy": 0.9099, "nll": 0.2530, "ece": 0.0084, "brier": 0.1311, "auroc_variance": 0.983},
         "map": {"accuracy": 0.9101, "nll": 0.2539, "ece": 0.0102, "brier": 0.1313, "auroc_variance": 0.500}}


class StopAtCheckpoint(Exception):
    """Raised by the training callback right after a checkpoint once the time budget is spent."""


def train_variant(model: nn.Module, train_loader: Iterable, context_loader: Iterable, biased: bool, checkpoint: Path,
                  max_seconds: float, steps: int = AUTHOR_STEPS, checkpoint_every: int = CHECKPOINT_EVERY,
                  seed: int = 0, progress: bool = False) -> tuple[ScaLLA, int, bool]:
    """Train one variant at the authors' settings from ``checkpoint`` on, until ``steps`` or the budget.

    Training resumes from ``checkpoint`` if it exists and stops at the first checkpoint (every ``checkpoint_every``
    steps) reached after ``max_seconds`` of this call, so the checkpoint on disk is the surrogate returned.

    Returns:
        (the ScaLLA with its surrogate as of the last checkpoint; its posterior fitted only when finished, else
        None, see :func:`posterior_fitted`), the step reached, whether all ``steps`` are done. Cost: about 20 ms per
        step on one thread for the FMNIST CNN (10 JVP evaluations), plus one pass over the training data to finish.
    """
    s = ScaLLA(model, "classification", biased=biased, steps=steps, checkpoint_every=checkpoint_every, seed=seed,
               progress=progress, **AUTHORS_OPTIONS)
    start, reached = time.perf_counter(), [0]

    def stop_when_spent(step: int, jvp_evaluations: int) -> None:
        reached[0] = step
        if step % checkpoint_every == 0 and step < steps and time.perf_counter() - start >= max_seconds:
            raise StopAtCheckpoint

    try:
        s.fit(train_loader, context_loader=context_loader, checkpoint=checkpoint, callback=stop_when_spent)
    except StopAtCheckpoint:
        return s, reached[0], False
    return s, s.train_record["steps"], True


def posterior_fitted(s: ScaLLA, train_loader: Iterable) -> ScaLLA:
    """``s`` with its posterior: fitted by one pass over ``train_loader`` if training stopped before it."""
    return s if s.posterior is not None else s.fit_posterior(train_loader)


def with_posterior(s: ScaLLA) -> Callable[[BenchContext], ScaLLA]:
    """A bench builder returning ``s`` with its posterior (:func:`posterior_fitted` on the context's training data)."""
    return lambda ctx: posterior_fitted(s, ctx.train_loader)


def evaluate(spec: MethodSpec, ctx: BenchContext) -> dict[str, Any]:
    """The bench's metrics row of ``spec`` (posthoc.bench.runner.evaluate_method: test and OOD predictions)."""
    row, _ = evaluate_method(spec, ctx, ctx.suite, None, log=print)
    return row


def authors_code_row(s: ScaLLA, ctx: BenchContext) -> dict[str, Any]:
    """ACC, NLL, ECE and Brier on the test set as the authors' metric code computes them (scalla_authors_metrics).

    Their table's rows come from that code, whose samples have covariance L^T L instead of the predictive's
    Sigma = L L^T; ours (the other columns) use the probit link of Sigma. Cost: the test predictions again and
    2,048 samples per input.
    """
    s = posterior_fitted(s, ctx.train_loader)
    pred, labels = predict_loader(s.predict, make_loader(ctx.suite.test, AUTHORS_BATCH, shuffle=False))
    assert isinstance(pred, GaussianPredictive)
    return authors_code_metrics(pred, labels)


def spec_of(name: str, build: Callable[[BenchContext], Any]) -> MethodSpec:
    """A bench method (probit link, as every Gaussian row of the bench) from a builder."""
    return MethodSpec(name, build, name)


def cached_row(path: Path, step: int | None = None) -> dict[str, Any] | None:
    """The row stored at ``path`` (if ``step`` is given, only when it was evaluated at that step), else None."""
    if not path.is_file():
        return None
    row = json.loads(path.read_text())
    return row if step is None or row.get("steps_reached") == step else None


def _fmt(value: Any, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The table: our rows with steps reached, each followed by the paper's figures."""
    lines = ["# ScaLLA at the authors' settings on full FMNIST (context MNIST train, OOD KMNIST test)", "",
             f"| row | steps reached / {meta['steps_total']:,} | ACC | NLL | ECE | Brier | OOD AUROC (variance) | "
             "OOD AUROC (entropy) | delta |", "|" + "---|" * 9]
    for row in rows:
        steps = row.get("steps_reached")
        lines.append(f"| {row['label']} | {'—' if steps is None else f'{steps:,}'} | {_fmt(row.get('accuracy'), 4)} | "
                     f"{_fmt(row.get('nll'), 4)} | {_fmt(row.get('ece'), 4)} | {_fmt(row.get('brier'), 4)} | "
                     f"{_fmt(row.get('auroc_variance'), 3)} | {_fmt(row.get('auroc_entropy'), 3)} | "
                     f"{_fmt(row.get('prior_precision'), 3)} |")
    lines += ["", "Authors' settings: m = 100, probe objective, 5 FMNIST train + 5 MNIST context points and one "
              "Rademacher probe per step, Adam 5e-5 constant, freshly initialised surrogate trunk, delta = 1 fixed. "
              "posthoc defaults: directions objective (3,000 steps of 64 on JVPs along the top-100 GGN "
              "eigenvectors), trunk initialised from the MAP, delta by validation NLL over a grid. Our rows: probit "
              "link, ECE 15 bins, variance score 1/2 log det of the logit covariance; rows 'through the authors' "
              "metric code': the same predictive scored as their code scores it (2,048 samples whose covariance "
              "is L^T L, L the Cholesky factor of the logit covariance; benchmarks/scalla_authors_metrics.py); "
              "paper rows: single seed, their table, from that code. A row short of 1,000,000 steps is a checkpoint "
              "on the way, not the recipe's result.",
              f"MAP: {json.dumps(meta['map'])}. Seed {meta['seed']}. Machine shared with other jobs.",
              f"Machine: {json.dumps(meta['machine'])}; versions: {json.dumps(meta['versions'])}; {meta['date']}; "
              f"commit {meta['git_commit']}.", ""]
    return "\n".join(lines)


NAMES = {"unbiased": "ScaLLA", "biased": "ScaLLA-biased"}
# the label of each of our rows and the cached evaluation it shows (the results file's rows carry the label)
EVAL_KEYS = {"MAP (ours)": "eval-map",
             **{f"{NAMES[v]}, authors' settings (ours)": f"eval-{v}" for v in VARIANTS},
             **{f"{NAMES[v]}, posthoc defaults (ours)": f"eval-defaults-{v}" for v in VARIANTS}}
LABELS = {key: label for label, key in EVAL_KEYS.items()}


def import_results(results: Path, run_dir: Path) -> list[str]:
    """Write each of our rows in ``results`` (scalla_authors.json) into ``run_dir``'s evaluation cache if missing.

    A fresh machine then keeps the rows of earlier runs (the unbiased variant's finished row, the defaults) instead
    of dropping them from the table. Returns the cache keys imported.
    """
    if not results.is_file():
        return []
    imported = []
    for row in json.loads(results.read_text())["rows"]:
        key = EVAL_KEYS.get(row["label"])
        path = run_dir / f"{key}.json"
        if key is not None and "method" in row and not path.is_file():
            write_json(path, {k: v for k, v in row.items() if k != "label"})
            imported.append(key)
    return imported


def keep_resumable(resume_dir: Path, run_dir: Path, map_path: Path, finished: list[str],
                   unfinished: list[str]) -> None:
    """Mirror into ``resume_dir`` what a later machine needs: each unfinished surrogate's checkpoint and the MAP.

    A finished variant's checkpoint is removed from it (its row is in the results file), and the MAP too once no
    surrogate checkpoint is left, so the folder empties when the runs are done. Variants in neither list are left
    as they are.
    """
    for variant in finished:
        (resume_dir / f"scalla-{variant}.pt").unlink(missing_ok=True)
    for variant in unfinished:
        atomic_copy(run_dir / f"scalla-{variant}.pt", resume_dir / f"scalla-{variant}.pt")
    if resume_dir.is_dir() and any(resume_dir.glob("scalla-*.pt")):
        if not (resume_dir / map_path.name).is_file():
            atomic_copy(map_path, resume_dir / map_path.name)
    else:
        (resume_dir / map_path.name).unlink(missing_ok=True)


def table_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The cached rows in table order: per variant ours (authors' settings), posthoc defaults, the paper's."""
    rows = []
    rows.append({"label": LABELS["eval-map"], **(cached_row(run_dir / "eval-map.json") or {})})
    rows.append({"label": "MAP (paper)", **PAPER["map"]})
    for variant in VARIANTS:
        ours = cached_row(run_dir / f"eval-{variant}.json")
        rows.append({"label": LABELS[f"eval-{variant}"], **(ours or {})})
        if ours is not None and "authors_code" in ours:
            rows.append({"label": f"{LABELS[f'eval-{variant}']}, through the authors' metric code",
                         **ours["authors_code"], "steps_reached": ours.get("steps_reached"),
                         "prior_precision": ours.get("prior_precision")})
        defaults = cached_row(run_dir / f"eval-defaults-{variant}.json")
        if defaults is not None:
            rows.append({"label": LABELS[f"eval-defaults-{variant}"], **defaults})
        rows.append({"label": f"{NAMES[variant]} (paper)", **PAPER[variant], "steps_reached": AUTHOR_STEPS,
                     "prior_precision": 1.0})
    return rows


def main(argv: list[str] | None = None) -> None:
    """Train each variant for its share of --max-minutes, evaluate the checkpoints, write the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None, help="root of FashionMNIST/MNIST/KMNIST; default $POSTHOC_DATA")
    parser.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR,
                        help="MAP checkpoint, surrogate checkpoints and evaluation cache")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of scalla_authors.{json,md}")
    parser.add_argument("--resume-dir", type=Path, default=DEFAULT_RESUME_DIR,
                        help="where the MAP and the unfinished surrogates' checkpoints are kept for another machine "
                        "(tracked in git, so a fresh clone resumes)")
    parser.add_argument("--max-minutes", type=float, default=60.0,
                        help="training time of this invocation (evaluations not counted), shared by the variants "
                        "still training")
    parser.add_argument("--steps", type=int, default=AUTHOR_STEPS, help="steps of the full run (the authors': 1e6)")
    parser.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--defaults", action="store_true", help="also compute posthoc's default rows (once)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=None,
                        help="MAP epochs (default: the suite's 40; fewer only for smoke runs)")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--table-only", action="store_true",
                        help="only rewrite the table from the cached evaluations (safe while a run is training)")
    args = parser.parse_args(argv)
    if args.max_minutes < 0:
        raise ValueError(f"--max-minutes must be >= 0, got {args.max_minutes}")
    bench = get_bench_suite("fmnist")
    suite = get_suite(bench.data, data_dir=args.data_dir)
    config = replace(bench.train, seed=args.seed, epochs=args.epochs or bench.train.epochs)
    map_path = args.run_dir / f"{checkpoint_key(suite.fingerprint, bench.model, bench.model_kwargs, config)}.pt"
    for name in copy_missing(args.resume_dir, args.run_dir, "*.pt"):
        print(f"restored {name} from {args.resume_dir}")
    for key in import_results(args.out / "scalla_authors.json", args.run_dir):
        print(f"imported {key} from {args.out / 'scalla_authors.json'}")
    if not map_path.is_file():
        raise FileNotFoundError(f"no MAP checkpoint {map_path}: train it first with `posthoc train --suite fmnist "
                                f"--checkpoint-dir {args.run_dir} --seed {args.seed} --epochs {config.epochs}` (40 "
                                "epochs: about 25 minutes)")
    meta = {**run_meta(), "seed": args.seed, "steps_total": args.steps,
            "map": {"model": bench.model, "epochs": config.epochs, "checkpoint": recorded_path(map_path, "<run-dir>")},
            "authors_options": AUTHORS_OPTIONS, "checkpoint_every": CHECKPOINT_EVERY}
    if args.table_only:
        write_table(args.run_dir, args.out, meta)
        return
    model = train_suite_model(bench, suite, config, args.run_dir, False, print).model.eval()
    ctx = BenchContext(model=model, suite=suite, train_loader=make_loader(suite.train, EVAL_BATCH, shuffle=False),
                       val_loader=make_loader(suite.val, EVAL_BATCH, shuffle=False),
                       context_loader=make_loader(suite.context, EVAL_BATCH, shuffle=False), seed=args.seed,
                       progress=args.progress)
    if cached_row(args.run_dir / "eval-map.json") is None:
        write_json(args.run_dir / "eval-map.json", evaluate(get_methods(["map"])[0], ctx))
    pending = list(args.variants)
    budget, trained = 60.0 * args.max_minutes, 0.0  # training seconds only: evaluations do not count
    for variant in args.variants:
        path, checkpoint = args.run_dir / f"eval-{variant}.json", args.run_dir / f"scalla-{variant}.pt"
        cached = cached_row(path)
        if cached is not None and cached.get("finished") and not checkpoint.is_file():
            print(f"{variant}: finished on an earlier machine (its row is kept; no checkpoint to go on from)")
            pending.remove(variant)
            continue
        share = max(0.0, budget - trained) / len(pending)
        t0 = time.perf_counter()
        s, step, done = train_variant(model, ctx.train_loader, ctx.context_loader, VARIANTS[variant], checkpoint,
                                      share, steps=args.steps, seed=args.seed, progress=args.progress)
        trained += time.perf_counter() - t0
        print(f"{variant}: step {step:,} / {args.steps:,} ({'finished' if done else 'stopped at a checkpoint'}; "
              f"{time.perf_counter() - t0:.0f} s this run)", flush=True)
        pending.remove(variant)
        keep_resumable(args.resume_dir, args.run_dir, map_path, [variant] if done else [], [] if done else [variant])
        # a row from further along (an earlier machine's run of the same seeded recipe) stays until this run passes it
        if cached is None or cached.get("steps_reached", -1) < step:
            row = evaluate(spec_of(f"scalla_{variant}_authors", with_posterior(s)), ctx)
            write_json(path, {**row, "steps_reached": step, "steps_total": args.steps, "finished": done,
                              "authors_code": authors_code_row(s, ctx)})
    write_table(args.run_dir, args.out, meta)
    if args.defaults:  # after the table is written, so that these fits cannot cost the authors' rows
        for variant in args.variants:
            path = args.run_dir / f"eval-defaults-{variant}.json"
            if cached_row(path) is None:
                name = "scalla_defaults" if variant == "unbiased" else "scalla_biased_defaults"
                row = evaluate(spec_of(name, scalla_builder(biased=VARIANTS[variant], **DEFAULTS)), ctx)
                write_json(path, {**row, "steps_reached": None})
                write_table(args.run_dir, args.out, meta)


def write_table(run_dir: Path, out: Path, meta: dict[str, Any]) -> None:
    """Write ``out``/scalla_authors.{json,md} from the rows cached in ``run_dir`` (and print the markdown)."""
    rows = table_rows(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "scalla_authors.json", {"meta": meta, "rows": rows})
    atomic_write_text(out / "scalla_authors.md", markdown(rows, meta))
    print(markdown(rows, meta), flush=True)

if __name__ == "__main__":
    main()
