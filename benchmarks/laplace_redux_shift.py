"""Laplace Redux dataset shift: rotated MNIST, 0..180 degrees in 15 degree steps (the paper's Figure 5, MNIST).

    .venv/bin/python benchmarks/laplace_redux_shift.py [--cache-dir runs/laplace_redux] [--epochs 10]
    .venv/bin/python benchmarks/laplace_redux_shift.py --epochs 100 --schedule cosine \
        --out laplace_redux_shift_e100_cosine

Reads the per-angle results that benchmarks/laplace_redux_mnist.py caches for every (method, seed) (it rotates
the 8,000 test images by posthoc.data.shift.rotate_images, bilinear, zero fill, and evaluates every predictive
on each angle; the recipe is in that script's docstring) and writes benchmarks/results/
laplace_redux_shift.{json,md,png} (``--out``: another stem): accuracy, NLL and ECE (15 and 100 bins) per angle
for MAP, LA, LA* and DE, mean and standard error over the seeds found. Nothing is trained or evaluated here.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from laplace_redux_mnist import schedule_tag  # noqa: E402  (result file names: the script that writes them)

from posthoc.bench.report import recorded_path, run_meta, write_json  # noqa: E402
from posthoc.bench.uci import mean_se_or_none  # noqa: E402
from posthoc.plots.figures import save_figure  # noqa: E402
from posthoc.utils.io import atomic_write_text  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
METHODS = ("map", "la", "la_star", "de")
LABELS = {"map": "MAP", "la": "LA (LL, KFAC GGN)", "la_star": "LA* (LL, full EF)", "de": "DE (5 nets)"}
METRICS = ("accuracy", "nll", "ece_15", "ece_100")


def load_results(cache_dir: Path, method: str, epochs: int, schedule: str) -> list[dict[str, Any]]:
    """Every cached (method, seed) result of this MAP schedule (``g<gamma>`` or ``cosine``), in seed order."""
    paths = sorted((cache_dir / "results").glob(f"{method}-s*-e{epochs}-{schedule}.json"),
                   key=lambda p: int(p.name.split("-s")[1].split("-")[0]))
    return [json.loads(p.read_text()) for p in paths]


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per angle, each metric's mean and standard error over the seeds."""
    angles = list(results[0]["rotated"])
    per_angle: dict[str, dict[str, float | None]] = {}
    for angle in angles:
        per_angle[angle] = {}
        for key in METRICS:
            mean, se = mean_se_or_none([r["rotated"][angle][key] for r in results])
            per_angle[angle][key], per_angle[angle][f"{key}_se"] = mean, se
    return {"n_seeds": len(results), "seeds": [r["seed"] for r in results], "per_angle": per_angle}


def markdown(summary: dict[str, dict[str, Any]], meta: dict[str, Any]) -> str:
    """One table per metric: angles down, methods across."""
    methods = list(summary)
    counts = ", ".join(f"{m} {summary[m]['n_seeds']}" for m in methods)
    lines = ["# Laplace Redux, rotated MNIST", "",
             "Test images rotated counter-clockwise (bilinear, zero fill); mean ± standard error over seeds "
             f"(n_seeds: {counts}). Recipe: {meta['recipe']}", ""]
    for key, title, scale, digits in (("accuracy", "Accuracy (%)", 100, 1), ("nll", "NLL", 1, 3),
                                      ("ece_15", "ECE, 15 bins (%)", 100, 1), ("ece_100", "ECE, 100 bins (%)", 100, 1)):
        lines += [f"## {title}", "", "| angle | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
        for angle in summary[methods[0]]["per_angle"]:
            cells = []
            for m in methods:
                cell = summary[m]["per_angle"][angle]
                se = cell[f"{key}_se"]
                text = f"{scale * cell[key]:.{digits}f}"
                cells.append(text if se is None else f"{text} ± {scale * se:.{digits}f}")
            lines.append(f"| {angle} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [f"Machine: {json.dumps(meta['machine'])}; versions: {json.dumps(meta['versions'])}; "
              f"commit {meta['git_commit']}; {meta['date']}.", ""]
    return "\n".join(lines)


def plot(summary: dict[str, dict[str, Any]], path: Path) -> Path:
    """Accuracy, NLL and ECE (15 bins) against the angle, one line per method with a standard-error band."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    panels = (("accuracy", "accuracy (%)", 100), ("nll", "NLL", 1), ("ece_15", "ECE, 15 bins (%)", 100))
    for ax, (key, title, scale) in zip(axes, panels, strict=True):
        for method, s in summary.items():
            angles = [int(a) for a in s["per_angle"]]
            mean = [scale * s["per_angle"][a][key] for a in s["per_angle"]]
            se = [scale * (s["per_angle"][a][f"{key}_se"] or 0.0) for a in s["per_angle"]]
            ax.plot(angles, mean, marker="o", markersize=3, label=f"{LABELS.get(method, method)} (n={s['n_seeds']})")
            lower = [m - e for m, e in zip(mean, se, strict=True)]
            upper = [m + e for m, e in zip(mean, se, strict=True)]
            ax.fill_between(angles, lower, upper, alpha=0.2)
        ax.set_xlabel("rotation (degrees)")
        ax.set_title(title)
        ax.set_xticks(range(0, 181, 30))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Rotated MNIST, LeNet-5")
    fig.tight_layout()
    saved = save_figure(fig, path)
    plt.close(fig)
    return saved


def main(argv: list[str] | None = None) -> None:
    """Summarise the cached per-angle results and write the shift results files."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache-dir", default=str(ROOT / "runs" / "laplace_redux"))
    parser.add_argument("--epochs", type=int, default=10, help="the MAP schedule's epochs (results are keyed by it)")
    parser.add_argument("--gamma", type=float, default=0.8, help="the MAP schedule's learning-rate factor per epoch")
    parser.add_argument("--schedule", choices=["step", "cosine"], default="step",
                        help="the MAP schedule (laplace_redux_mnist.py --schedule); gamma applies to step only")
    parser.add_argument("--out", default="laplace_redux_shift", help="stem of the results files in benchmarks/results")
    args = parser.parse_args(argv)
    cache_dir = Path(args.cache_dir)
    summary = {}
    for method in METHODS:
        results = load_results(cache_dir, method, args.epochs, schedule_tag(args.schedule, args.gamma))
        if results:
            summary[method] = summarise(results)
    if not summary:
        raise SystemExit(f"no cached results under {cache_dir / 'results'}: run benchmarks/laplace_redux_mnist.py first")
    meta = {**run_meta(), "cache_dir": recorded_path(cache_dir, "<cache-dir>"), "angles": list(range(0, 181, 15)),
            "recipe": (f"LeNet-5, MAP {args.epochs} epochs, "
                       + ("Adam lr 1e-3 cosine-annealed per step (the paper's)" if args.schedule == "cosine" else
                          f"lr x {args.gamma} per epoch") + " (see laplace_redux_mnist.py); 8,000 MNIST test images")}
    write_json(RESULTS / f"{args.out}.json", {"meta": meta, "methods": summary})
    atomic_write_text(RESULTS / f"{args.out}.md", markdown(summary, meta))
    plot(summary, RESULTS / f"{args.out}.png")


if __name__ == "__main__":
    main()
