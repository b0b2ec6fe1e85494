"""Worker functions for the multi-process tests (spawned processes import them by name).

Each worker joins a gloo process group on 127.0.0.1, runs one scenario on its
shard and saves what it computed under ``out_dir/rank{r}.pt`` (or the error it
raised), so the parent test can compare with a single-process run.
"""

from __future__ import annotations

import contextlib
import datetime
import multiprocessing
import os
import socket
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from references import DTYPE, small_cnn, small_mlp
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

STRUCTURES = ("full", "diag", "kron", "ekfac", "lowrank")
WORLD = 2
DEADLINE_S = 240  # generous bound on the whole 2-process run; a hang fails the test instead of blocking CI


def run_processes(target, out_dir) -> list[int | None]:
    """Start WORLD spawned processes running ``target(rank, WORLD, port, out_dir)``; exit codes (None: killed)."""
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=target, args=(rank, WORLD, port, str(out_dir))) for rank in range(WORLD)]
    for p in procs:
        p.start()
    end = time.monotonic() + DEADLINE_S
    for p in procs:
        p.join(max(0.0, end - time.monotonic()))
    codes = []
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
            codes.append(None)
        else:
            codes.append(p.exitcode)
    return codes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def problems() -> dict[str, tuple[torch.nn.Module, TensorDataset, TensorDataset, str]]:
    """(model, train set, validation set, likelihood) per case; the same on every process."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(40, 3, generator=g, dtype=DTYPE)
    y_cls = (x[:, 0] + x[:, 1] ** 2 > 0.5).long() + (x[:, 2] > 0.8).long()
    y_reg = torch.sin(x[:, :1]) + 0.1 * torch.randn(40, 1, generator=g, dtype=DTYPE)
    images = torch.rand(24, 1, 6, 6, generator=g, dtype=DTYPE)
    labels = torch.randint(0, 3, (24,), generator=g)
    return {
        "mlp_classification": (small_mlp(seed=1), TensorDataset(x[:32], y_cls[:32]), TensorDataset(x[32:], y_cls[32:]),
                               "classification"),
        "mlp_regression": (small_mlp(n_out=1, seed=2), TensorDataset(x[:32], y_reg[:32]),
                           TensorDataset(x[32:], y_reg[32:]), "regression"),
        "cnn_classification": (small_cnn(seed=3), TensorDataset(images[:16], labels[:16]),
                               TensorDataset(images[16:], labels[16:]), "classification"),
    }


def fit_everything(loader_for, val_loader_for) -> dict[str, torch.Tensor]:
    """Every structure on every problem: dense precision, evidence, tuned priors. Flat dict of tensors."""
    from posthoc import Laplace

    out: dict[str, torch.Tensor] = {}
    for case, (model, train, val, likelihood) in problems().items():
        for structure in STRUCTURES:
            options = {"rank": 6} if structure == "lowrank" else {}
            la = Laplace(model, likelihood, subset_of_weights="all", hessian_structure=structure,
                         sigma_noise=0.3 if likelihood == "regression" else 1.0, progress=False,
                         structure_options=options)
            la.fit(loader_for(train))
            key = f"{case}/{structure}"
            out[f"{key}/n_data"] = torch.tensor(float(la.n_data))
            prior, scale = torch.tensor([0.7], dtype=DTYPE), la.factors.scale(la.sigma_noise)
            out[f"{key}/precision"] = la.structure.dense_precision(prior, scale)
            out[f"{key}/marglik"] = la.log_marginal_likelihood(prior_precision=0.7).detach()
            if structure in ("full", "kron"):
                la.optimize_prior_precision(method="marglik", n_steps=20)
                out[f"{key}/marglik_prior"] = la.prior_precision.clone()
                la.optimize_prior_precision(method="gridsearch", val_loader=val_loader_for(val),
                                            grid=torch.logspace(-2, 2, 9, dtype=DTYPE))
                out[f"{key}/gridsearch_prior"] = la.prior_precision.clone()
    return out


def sharded(dataset: TensorDataset, batch_size: int = 5) -> DataLoader:
    sampler = DistributedSampler(dataset, shuffle=False, drop_last=False)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler)


def _join(rank: int, world: int, port: int) -> None:
    import posthoc.distributed  # noqa: F401 - first, as a user's script would: see posthoc.distributed.collectives

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))


@contextlib.contextmanager
def _group(rank: int, world: int, port: int):
    """The process group for the worker's body, ended by posthoc.distributed.shutdown: after a body that
    succeeded every rank waits for the others (a barrier), then the group is destroyed. Gloo aborted a process
    at exit now and then ("terminate called without an active exception", exit code -6) when its threads
    outlived destroy_process_group: torch._dynamo, imported at a fit's first torch.func pullback, imports
    torch.distributed.nn.functional, whose defaults then hold the world group; posthoc.distributed imports it
    before any group exists."""
    from posthoc.distributed import shutdown

    _join(rank, world, port)
    ok = False
    try:
        yield
        ok = True
    finally:
        shutdown(wait=ok)


def laplace_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """Fit every structure on this rank's shard; save the results."""
    with _group(rank, world, port):
        torch.save(fit_everything(sharded, sharded), Path(out_dir) / f"rank{rank}.pt")


class _DyingLoader:
    """Yields the shard's batches; on rank 1 the process exits hard after the first one (a crashed worker)."""

    def __init__(self, loader: DataLoader, rank: int) -> None:
        self.loader, self.rank = loader, rank

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if self.rank == 1 and i == 1:
                os._exit(7)
            yield batch


def dying_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """Rank 1 dies mid-fit; rank 0 records the error it gets and how long it took."""
    _join(rank, world, port)
    from posthoc import Laplace

    model, train, _, likelihood = problems()["mlp_classification"]
    la = Laplace(model, likelihood, subset_of_weights="all", hessian_structure="kron", progress=False)
    start = time.perf_counter()
    try:
        la.fit(_DyingLoader(sharded(train, batch_size=2), rank))
        outcome = "finished"
    except Exception as err:  # noqa: BLE001 - the test inspects what was raised
        outcome = f"{type(err).__name__}: {err}\n{traceback.format_exc()}"
    (Path(out_dir) / f"rank{rank}.txt").write_text(f"{time.perf_counter() - start:.2f}\n{outcome}")


def training_problem() -> tuple[torch.nn.Module, TensorDataset]:
    """A float64 MLP and 37 examples (batches of 8 leave an odd last batch, which ranks split unevenly)."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(37, 3, generator=g, dtype=DTYPE)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return small_mlp(seed=4), TensorDataset(x, y)


def train(checkpoint_dir: str) -> dict[str, torch.Tensor]:
    from posthoc.models.training import TrainConfig, train_map

    model, data = training_problem()
    result = train_map(model, data, TrainConfig(epochs=3, batch_size=8, lr=1e-2, gamma=0.9, weight_decay=1e-3),
                       checkpoint_dir=checkpoint_dir, key="mlp", progress=False, log=lambda s: None)
    return {"weights": torch.nn.utils.parameters_to_vector(result.model.parameters()).detach(),
            "losses": torch.tensor([h["train_loss"] for h in result.history]),
            "from_cache": torch.tensor(result.from_cache)}


def training_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """MAP training of the same model on 2 ranks (checkpoints in out_dir/ckpt), twice: the second run reuses."""
    with _group(rank, world, port):
        first = train(str(Path(out_dir) / "ckpt"))
        dist.barrier()
        second = train(str(Path(out_dir) / "ckpt"))
        torch.save({"first": first, "second": second}, Path(out_dir) / f"rank{rank}.pt")


def bench_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """``run_bench`` on the embedded suite (1 MAP epoch) on 2 ranks; rank 0 writes the results."""
    with _group(rank, world, port):
        from posthoc.bench import run_bench

        report = run_bench("fmnist-embedded", ["map", "la_kron"], out_dir=Path(out_dir) / "results",
                           checkpoint_dir=Path(out_dir) / "ckpt", epochs=1, progress=False, log=lambda s: None)
        torch.save(report.rows, Path(out_dir) / f"rank{rank}.pt")


class _Stop(Exception):
    """Raised by a training callback to interrupt a run (as a crash would)."""


def scalla_problem() -> tuple[torch.nn.Module, DataLoader, DataLoader]:
    """A float64 MLP, 40 training and 20 context points; every rank gets the same loaders (ScaLLA splits steps)."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(40, 3, generator=g, dtype=DTYPE)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.3).long()
    context = 2.5 * torch.randn(20, 3, generator=g, dtype=DTYPE)
    return (small_mlp(seed=6), DataLoader(TensorDataset(x, y), batch_size=10),
            DataLoader(TensorDataset(context, torch.zeros(20, dtype=torch.long)), batch_size=10))


def scalla_run(objective: str, steps: int, checkpoint: str | None = None, stop_at: int | None = None
               ) -> dict[str, torch.Tensor]:
    """Train a ScaLLA surrogate (a small user-given MLP) for ``steps`` steps; its parameters, posterior and evidence."""
    from posthoc import ScaLLA

    model, train, context = scalla_problem()
    torch.manual_seed(0)
    surrogate = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4 * 3)).to(DTYPE)

    def stop(step: int, _: int) -> None:
        if stop_at is not None and step == stop_at:
            raise _Stop

    s = ScaLLA(model, "classification", n_features=4, surrogate=surrogate, objective=objective, steps=steps,
               batch_size=4, n_probes=2, n_target_points=16, lr=1e-2, checkpoint_every=2, seed=0, progress=False)
    try:
        s.fit(train, context_loader=context, checkpoint=checkpoint, callback=stop)
    except _Stop:
        return {}
    return {"surrogate": torch.nn.utils.parameters_to_vector(s.surrogate.parameters()).detach(),
            "precision": s.posterior.precision.clone(),
            "evidence": s.log_marginal_likelihood().detach().reshape(1),
            "jvp_evaluations": torch.tensor([float(s.train_record["jvp_evaluations"])])}


def scalla_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """Both objectives on 2 ranks; then a checkpointed run interrupted at step 3 (resumed by the parent)."""
    with _group(rank, world, port):
        results = {objective: scalla_run(objective, steps=5) for objective in ("probes", "directions")}
        scalla_run("probes", steps=6, checkpoint=str(Path(out_dir) / "scalla.pt"), stop_at=3)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")


def _outcome(fit) -> str:
    """'finished', or the exception a call raised as 'Type: message'."""
    try:
        fit()
        return "finished"
    except Exception as err:  # noqa: BLE001 - the test inspects what was raised
        return f"{type(err).__name__}: {err}"


def scalla_sharded_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """ScaLLA.fit given Laplace's convention (a shard per rank) in three forms; records what each raised."""
    from posthoc import ScaLLA

    with _group(rank, world, port):
        model, train, _ = scalla_problem()
        dataset = train.dataset
        torch.manual_seed(100 + rank)  # unseeded shuffling: each rank draws its own order
        loaders = {
            "distributed_sampler": sharded(dataset, batch_size=10),
            "index_shard": DataLoader(dataset, batch_size=10, sampler=list(range(rank, len(dataset), world))),
            "batch_list_shard": [batch for i, batch in enumerate(train) if i % world == rank],
            "unseeded_shuffle": DataLoader(dataset, batch_size=10, shuffle=True),
        }
        outcomes = {}
        for case, loader in loaders.items():
            s = ScaLLA(model, "classification", n_features=4, steps=2, n_target_points=16, eigen_subsample=10,
                       progress=False)
            outcomes[case] = _outcome(lambda s=s, loader=loader: s.fit(loader))
        torch.save(outcomes, Path(out_dir) / f"rank{rank}.pt")


def mismatched_model_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """Rank 1 holds a wider network than rank 0 (a different parameter count): Laplace and ScaLLA must raise a
    clear error on every rank, not abort inside gloo."""
    from posthoc import Laplace, ScaLLA

    with _group(rank, world, port):
        model = small_mlp(n_hidden=5 + 2 * rank, seed=6)
        _, train, _ = scalla_problem()
        outcomes = {
            "laplace": _outcome(lambda: Laplace(model, "classification", subset_of_weights="all",
                                                hessian_structure="kron", progress=False).fit(train)),
            "scalla": _outcome(lambda: ScaLLA(model, "classification", n_features=4, steps=2,
                                              progress=False).fit(train)),
        }
        torch.save(outcomes, Path(out_dir) / f"rank{rank}.pt")


def _native_threads() -> list[str]:
    """The names of this process's threads (Linux: /proc/self/task)."""
    names = []
    for task in sorted(os.listdir("/proc/self/task")):
        with contextlib.suppress(OSError):
            names.append(Path(f"/proc/self/task/{task}/comm").read_text().strip())
    return names


def teardown_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """A ScaLLA fit (whose first torch.func pullback imports torch._dynamo after the group exists), then
    shutdown; records the threads left."""
    with _group(rank, world, port):
        during = _native_threads()
        scalla_run("directions", steps=2)
    torch.save({"during": during, "after": _native_threads()}, Path(out_dir) / f"rank{rank}.pt")


class _StopOnPass:
    """A loader that raises KeyboardInterrupt at batch ``stop_at`` of its second pass (the fit's; the first is
    Laplace's look at the first batch), on every rank alike: an interrupted checkpointed fit."""

    def __init__(self, loader: DataLoader, stop_at: int) -> None:
        self.loader, self.stop_at, self.passes = loader, stop_at, 0

    def __iter__(self):
        self.passes += 1
        for i, batch in enumerate(self.loader):
            if self.passes == 2 and i == self.stop_at:
                raise KeyboardInterrupt
            yield batch


def checkpointed_fit(structure: str, loader, checkpoint: Path | None) -> dict[str, torch.Tensor]:
    """A checkpointed (or plain) fit of the CNN problem: dense precision, evidence and N at delta 0.7."""
    from posthoc import Laplace

    model, _, _, likelihood = problems()["cnn_classification"]
    la = Laplace(model, likelihood, subset_of_weights="all", hessian_structure=structure, progress=False)
    la.fit(loader, checkpoint=checkpoint, checkpoint_every=2) if checkpoint is not None else la.fit(loader)
    prior = torch.tensor([0.7], dtype=DTYPE)
    return {"precision": la._require_fit().dense_precision(prior, torch.ones((), dtype=DTYPE)),
            "evidence": la.log_marginal_likelihood(prior).detach(), "n_data": torch.tensor(la.n_data)}


def checkpoint_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """Per structure: a checkpointed fit interrupted in its second segment on both ranks, resumed, and an
    uninterrupted checkpointed fit (rank 0 writes both checkpoints); saves both results."""
    _, train, _, _ = problems()["cnn_classification"]
    out: dict[str, torch.Tensor] = {}
    with _group(rank, world, port):
        for structure in ("full", "ekfac"):
            path = Path(out_dir) / f"{structure}.ckpt"
            with contextlib.suppress(KeyboardInterrupt):
                checkpointed_fit(structure, _StopOnPass(sharded(train, batch_size=2), stop_at=3), path)
            resumed = checkpointed_fit(structure, sharded(train, batch_size=2), path)
            whole = checkpointed_fit(structure, sharded(train, batch_size=2), Path(out_dir) / f"{structure}_whole.ckpt")
            out.update({f"{structure}/resumed/{k}": v for k, v in resumed.items()})
            out.update({f"{structure}/whole/{k}": v for k, v in whole.items()})
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")
