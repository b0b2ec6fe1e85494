"""``posthoc train | demo | bench``: MAP training and benchmark runs from the shell."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from posthoc.utils.checks import check_positive_int

DEMO_OUT = Path("runs") / "demo"
# The demo's rows and what each is for: the fast methods, so `make run` takes minutes on 2 cores (`posthoc bench`
# runs them all). The Laplace rows are the recommended recipe: the prior chosen on validation NLL held on every task
# of benchmarks/results/defaults.md, the evidence-tuned prior did not.
DEMO_ROLES = {
    "map": "the trained network as it is: the reference no uncertainty row should lose to",
    "temperature": "one scalar fitted on validation NLL: calibration only, it cannot tell unfamiliar inputs "
                   "apart (variance AUROC 0.5)",
    "la_lastlayer_full_gridsearch": "Laplace on the last layer, prior on validation NLL: uncertainty in seconds, "
                                    "its variance flags out-of-distribution inputs",
    "la_kron_gridsearch_centred": "Laplace on all weights (KFAC), prior on validation NLL, centred probit: the "
                                  "recommended default, the best OOD scores at the MAP's NLL",
}
DEMO_METHODS = tuple(DEMO_ROLES)


def _positive_int(text: str) -> int:
    """Argparse type: an integer >= 1 (0 is an error, not "use the default")."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    try:
        return check_positive_int(value, "the value", ">= 1; leave the option out for the suite's default")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _folder(text: str) -> str:
    """Argparse type: a non-empty folder path (an empty string is an error, not "use the default")."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path; give a folder, or leave the option out for its default")
    return text


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default=None, type=_folder,
                        help="root of the full data sets (<root>/FashionMNIST/raw/...); default: $POSTHOC_DATA")
    parser.add_argument("--checkpoint-dir", default=None, type=_folder,
                        help="where MAP checkpoints are cached; default: $POSTHOC_CACHE/checkpoints "
                             "or ~/.cache/posthoc/checkpoints")
    parser.add_argument("--seed", type=int, default=0, help="seed for model init, data order and MC (default 0)")
    parser.add_argument("--epochs", type=_positive_int, default=None,
                        help="override the suite's MAP epochs (>= 1)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--distributed", action="store_true",
                        help="data-parallel over the processes started by torchrun (gloo on CPU, nccl on GPUs); "
                             "rank 0 prints and writes")


def build_parser() -> argparse.ArgumentParser:
    """The ``posthoc`` argument parser: subcommands ``train``, ``demo`` and ``bench`` with their options."""
    from posthoc.bench import BENCH_SUITES, METHODS

    parser = argparse.ArgumentParser(prog="posthoc", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train (or reuse) the MAP model of a suite and report test accuracy")
    train.add_argument("--suite", default="fmnist-embedded", choices=sorted(BENCH_SUITES))
    _add_common(train)

    demo = sub.add_parser("demo", help=f"the MAP CNN on the embedded FMNIST subset: {', '.join(DEMO_METHODS)}")
    demo.add_argument("--out", default=str(DEMO_OUT), type=_folder, help=f"results folder (default {DEMO_OUT})")
    _add_common(demo)

    bench = sub.add_parser("bench", help="run methods on a suite and write results tables and plots")
    bench.add_argument("--suite", default="fmnist-embedded", choices=sorted(BENCH_SUITES))
    bench.add_argument("--methods", default=None,
                       help=f"comma-separated, from: {', '.join(METHODS)} (default: the suite's list)")
    bench.add_argument("--out", default=None, type=_folder, help="results folder (default benchmarks/results/<suite>)")
    _add_common(bench)
    return parser


def _train(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from posthoc import metrics
    from posthoc.baselines import MAP
    from posthoc.bench.runner import EVAL_BATCH, train_suite_model
    from posthoc.bench.suites import get_bench_suite
    from posthoc.data.loaders import make_loader, shard
    from posthoc.data.suites import get_suite
    from posthoc.predictive import predict_loader
    from posthoc.predictive.batching import gather

    bench = get_bench_suite(args.suite)
    config = replace(bench.train, seed=args.seed, epochs=args.epochs if args.epochs is not None else bench.train.epochs)
    suite = get_suite(bench.data, data_dir=args.data_dir)
    result = train_suite_model(bench, suite, config, args.checkpoint_dir, not args.no_progress, _say)
    pred, _ = predict_loader(MAP(result.model).predict, make_loader(shard(suite.test), EVAL_BATCH, shuffle=False))
    acc = metrics.accuracy(gather(pred, "test predictions").probs(), suite.test.tensors[1])
    origin = "reused" if result.from_cache else "trained"
    _say(f"{origin} {bench.model} on {args.suite} ({config.epochs} epochs, {result.wall_time_s:.0f} s of training): "
          f"test accuracy {acc:.4f}; checkpoint {result.checkpoint}")
    return 0


def _bench(args: argparse.Namespace, suite: str, methods: list[str] | None, out: str) -> int:
    from posthoc.bench import run_bench

    report = run_bench(suite, methods=methods, data_dir=args.data_dir, out_dir=out,
                       checkpoint_dir=args.checkpoint_dir, seed=args.seed, epochs=args.epochs,
                       progress=not args.no_progress)
    _say("")
    _say(report.markdown())
    _say(f"results written to {Path(out).resolve()}/ (results.md, results.csv, results.json, plots)")
    return 0


def _methods(text: str | None) -> list[str] | None:
    """The --methods list: None (the option left out) means the suite's list; an empty list is an error."""
    if text is None:
        return None
    from posthoc.bench import METHODS
    from posthoc.bench.methods import get_methods

    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise ValueError(f"--methods {text!r} names no method; give a comma-separated list from: "
                         f"{', '.join(METHODS)} (or leave --methods out for the suite's list)")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"--methods names {', '.join(repeated)} more than once; each method is one row")
    get_methods(names)  # unknown names: an error listing the available ones
    return names


def _check_checkpoint_dir(args: argparse.Namespace) -> None:
    """Before any work: the MAP checkpoint folder must be writable (else PermissionError naming it).

    The results folder (--out) is checked by run_bench, also before any work.
    """
    from posthoc.models.training import default_checkpoint_dir
    from posthoc.utils.checkpoint import check_writable

    folder = args.checkpoint_dir if args.checkpoint_dir is not None else default_checkpoint_dir()
    check_writable(folder, "MAP checkpoints (--checkpoint-dir)")


def _say(message: str) -> None:
    from posthoc.distributed import is_main_process

    if is_main_process():
        print(message)


def main(argv: list[str] | None = None) -> int:
    """Run ``posthoc`` on ``argv`` (None: ``sys.argv[1:]``) and return the exit code.

    0 on success, 2 for bad input (a bad option, missing data, an unwritable folder: the message goes to
    stderr); other errors propagate. With ``--distributed`` the process group torchrun describes is
    joined first and shut down at the end.
    """
    args = build_parser().parse_args(argv)
    if getattr(args, "distributed", False):
        from posthoc.distributed import init_from_env

        if not init_from_env():
            print(f"posthoc {args.command}: error: --distributed needs the environment torchrun sets (RANK, "
                  "WORLD_SIZE, MASTER_ADDR, MASTER_PORT); start with e.g. `torchrun --nproc-per-node 2 -m "
                  f"posthoc.cli.main {args.command} --distributed ...`", file=sys.stderr)
            return 2
    if not getattr(args, "distributed", False):
        return _command(args)
    code = 1
    try:
        code = _command(args)
    finally:
        from posthoc.distributed import shutdown

        shutdown(wait=code == 0)  # the torchrun job ends cleanly: every rank done, then the group destroyed
    return code


def _command(args: argparse.Namespace) -> int:
    try:
        methods = _methods(args.methods) if args.command == "bench" else None
        _check_checkpoint_dir(args)
        from posthoc.bench.suites import get_bench_suite

        suite = get_bench_suite("fmnist-embedded" if args.command == "demo" else args.suite)
        if args.data_dir is not None and suite.data == "fmnist-embedded":
            _say(f"posthoc {args.command}: note: --data-dir is not read: the fmnist-embedded suite's data ship with "
                 "the package (--suite fmnist reads the full files there)")
        if args.command == "train":
            return _train(args)
        if args.command == "demo":
            status = _bench(args, "fmnist-embedded", list(DEMO_METHODS), args.out)
            _say("What each row is for:\n" + "\n".join(f"- {name}: {role}" for name, role in DEMO_ROLES.items()))
            return status
        out = args.out if args.out is not None else str(Path("benchmarks") / "results" / args.suite)
        return _bench(args, args.suite, methods, out)
    except (ValueError, FileNotFoundError, PermissionError) as err:
        print(f"posthoc {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
