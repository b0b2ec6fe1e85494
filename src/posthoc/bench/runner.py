"""``posthoc bench``: train or reuse the MAP model, run methods, write a results table."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from posthoc import metrics
from posthoc.bench.methods import BenchContext, MethodSpec, get_methods
from posthoc.bench.report import format_markdown, recorded_path, write_results
from posthoc.bench.suites import BenchSuite, get_bench_suite
from posthoc.data.loaders import make_loader, shard
from posthoc.data.suites import get_suite
from posthoc.distributed import is_distributed, is_main_process, world_size
from posthoc.models.registry import build_model
from posthoc.models.training import TrainConfig, TrainResult, checkpoint_key, default_checkpoint_dir, train_map
from posthoc.plots import ood_histograms, reliability_diagram, save_figure
from posthoc.predictive import GaussianPredictive, Predictive, predict_loader
from posthoc.predictive.batching import gather
from posthoc.utils.checkpoint import check_writable

EVAL_BATCH = 500


@dataclass
class BenchReport:
    """What a run produced: rows of metrics per method and the files written."""

    suite: str
    rows: list[dict[str, Any]]
    files: dict[str, Path] = field(default_factory=dict)
    map_result: TrainResult | None = None

    def markdown(self) -> str:
        """The rows as a markdown table (see :func:`format_markdown`)."""
        return format_markdown(self.rows)


def variance_score(pred: Predictive) -> torch.Tensor:
    """The logit-variance OOD score 1/2 log det Sigma(x) (N,).

    A predictive with no variance at all (MAP, temperature scaling) has no
    such score: it returns a constant, so its AUROC is 0.5 by construction, as
    in the reference table.
    """
    if isinstance(pred, GaussianPredictive) and not bool((pred.var > 0).any()):
        return torch.zeros(len(pred), dtype=pred.mean.dtype)
    return metrics.half_logdet(pred.cov if isinstance(pred, GaussianPredictive) and pred.has_full_cov else pred.var)


def _mean_or_none(value) -> float | None:
    return None if value is None else float(torch.as_tensor(value).float().mean())


def train_suite_model(bench: BenchSuite, suite, config: TrainConfig, checkpoint_dir: str | os.PathLike | None,
                      progress: bool, log: Callable[[str], None]) -> TrainResult:
    """Build the suite's model (seeded) and train or reuse its MAP checkpoint."""
    torch.manual_seed(config.seed)
    model = build_model(bench.model, **bench.model_kwargs)
    key = checkpoint_key(suite.fingerprint, bench.model, bench.model_kwargs, config)
    directory = Path(checkpoint_dir) if checkpoint_dir is not None else default_checkpoint_dir()
    return train_map(model, suite.train, config, checkpoint_dir=directory, key=key, progress=progress, log=log)


def evaluate_method(spec: MethodSpec, ctx: BenchContext, suite, out_dir: Path | None,
                    log: Callable[[str], None]) -> tuple[dict[str, Any], metrics.CalibrationBins]:
    """Fit one method, predict on test and OOD, and compute the metrics row."""
    t0 = time.perf_counter()
    predictor = spec.build(ctx)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    # under torch.distributed each rank predicts its contiguous part; gathered in rank order = dataset order
    test_pred, test_y = predict_loader(predictor.predict, make_loader(shard(suite.test), EVAL_BATCH, shuffle=False))
    ood_pred, _ = predict_loader(predictor.predict, make_loader(shard(suite.ood), EVAL_BATCH, shuffle=False))
    test_pred, ood_pred = gather(test_pred, "test predictions"), gather(ood_pred, "OOD predictions")
    test_y = suite.test.tensors[1] if is_distributed() else test_y
    predict_s = time.perf_counter() - t0
    probs = test_pred.probs(spec.link_approx)
    ood_probs = ood_pred.probs(spec.link_approx)
    bins = metrics.calibration_bins(probs, test_y)
    ent_in, ent_out = metrics.entropy(probs), metrics.entropy(ood_probs)
    row = {
        "method": spec.name,
        "accuracy": metrics.accuracy(probs, test_y),
        "nll": metrics.nll(probs, test_y),
        "ece": bins.ece,
        "brier": metrics.brier(probs, test_y),
        "auroc_entropy": metrics.auroc(ent_in, ent_out),
        "auroc_variance": metrics.auroc(variance_score(test_pred), variance_score(ood_pred)),
        "fit_s": fit_s,
        "predict_s": predict_s,
        "link_approx": spec.link_approx.value,
        # what the method tuned, for the record (JSON only)
        "prior_precision": _mean_or_none(getattr(predictor, "prior_precision", None)),
        "temperature": getattr(predictor, "temperature", None),
        # method-specific figures (e.g. JVP evaluations spent, samples within a loss tolerance)
        "info": dict(bench_info()) if callable(bench_info := getattr(predictor, "bench_info", None)) else {},
    }
    if out_dir is not None and is_main_process():
        save_figure(ood_histograms(ent_in, ent_out, score_name="predictive entropy",
                                   labels=(f"{suite.name} test", "OOD"), title=spec.name),
                    out_dir / f"ood_entropy_{spec.name}.png")
    log(f"{spec.name}: ACC {row['accuracy']:.4f}  NLL {row['nll']:.4f}  ECE {row['ece']:.4f}  "
        f"fit {fit_s:.1f}s  predict {predict_s:.1f}s")
    return row, bins


def run_bench(
    suite_name: str,
    methods: list[str] | None = None,
    data_dir: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    seed: int = 0,
    epochs: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> BenchReport:
    """Run ``methods`` on a benchmark suite and write results and plots to ``out_dir``.

    Every name is checked before data is loaded or a model trained. The MAP
    model is trained with the suite's schedule (``epochs`` overrides its length)
    or reused from ``checkpoint_dir``. Results: ``results.{md,csv,json}``, a
    reliability diagram of all methods, and an OOD entropy histogram per method.
    ``out_dir`` is created and checked to be writable before anything else
    (PermissionError naming it), not after the work.

    Under torch.distributed (``posthoc bench --distributed`` via torchrun) the
    MAP is trained data-parallel, methods registered with ``shards_fit`` fit on
    each rank's shard of the training data (the others on all of it),
    predictions are sharded and gathered, and rank 0 alone logs and writes.
    """
    if not is_main_process():
        log, progress = (lambda message: None), False
    bench = get_bench_suite(suite_name)
    specs = get_methods(list(methods) if methods is not None else list(bench.default_methods))
    config = replace(bench.train, seed=seed, epochs=epochs if epochs is not None else bench.train.epochs)
    if out_dir is not None and is_main_process():
        check_writable(out_dir, "benchmark results (out_dir, --out)")
    suite = get_suite(bench.data, data_dir=data_dir)
    log(f"suite {suite_name}: {len(suite.train)} train, {len(suite.val)} val, {len(suite.test)} test, "
        f"{len(suite.ood)} OOD")
    result = train_suite_model(bench, suite, config, checkpoint_dir, progress, log)
    model = result.model.eval()
    train_all = make_loader(suite.train, config.batch_size, shuffle=True, seed=seed)
    train_shard = make_loader(shard(suite.train), config.batch_size, shuffle=True, seed=seed) \
        if is_distributed() else train_all
    val_all = make_loader(suite.val, EVAL_BATCH, shuffle=False)
    val_shard = make_loader(shard(suite.val), EVAL_BATCH, shuffle=False) if is_distributed() else val_all
    ctx = BenchContext(
        model=model,
        suite=suite,
        train_loader=train_all,
        val_loader=val_all,
        context_loader=make_loader(suite.context, config.batch_size, shuffle=True, seed=seed + 1),
        seed=seed,
        progress=progress,
    )
    out = Path(out_dir) if out_dir is not None else None
    meta = {
        "suite": suite_name,
        "suite_description": bench.description,
        "seed": seed,
        "processes": world_size(),
        "map": {"model": bench.model, "epochs": config.epochs, "train_wall_s": round(result.wall_time_s, 1),
                "from_cache": result.from_cache, "checkpoint": None if result.checkpoint is None else recorded_path(result.checkpoint, "<checkpoint-dir>")},
    }
    report = BenchReport(suite_name, [], map_result=result)
    all_bins = {}
    for spec in specs:
        torch.manual_seed(seed)
        sharded = replace(ctx, train_loader=train_shard, val_loader=val_shard)
        row, bins = evaluate_method(spec, sharded if spec.shards_fit else ctx, suite, out, log)
        report.rows.append(row)
        all_bins[spec.name] = bins
        if out is not None and is_main_process():  # rewritten after every method, so an interrupted run keeps what it finished
            report.files = write_results(out, {**meta, "methods_requested": [s.name for s in specs]}, report.rows)
            report.files["reliability"] = save_figure(
                reliability_diagram(all_bins, title=f"{suite_name} test"), out / "reliability.png")
    return report
