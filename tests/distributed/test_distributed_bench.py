"""``run_bench`` on 2 ranks: data-parallel MAP, sharded Laplace fit and evaluation, results written once."""

from __future__ import annotations

import json

import distributed_workers as workers
import torch
from distributed_workers import WORLD, run_processes

from posthoc.bench import run_bench
from posthoc.cli.main import main


def test_two_rank_bench_matches_one_process(tmp_path):
    codes = run_processes(workers.bench_worker, tmp_path)
    assert codes == [0] * WORLD, codes
    rows = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    single = run_bench("fmnist-embedded", ["map", "la_kron"], checkpoint_dir=tmp_path / "single", epochs=1,
                       progress=False, log=lambda s: None).rows
    for got, expected in zip(rows[0], single, strict=True):
        # float32 CNN: 2-rank gradient sums and curvature sums differ from one process in summation order only
        for key in ("accuracy", "nll", "ece", "auroc_variance"):
            assert abs(got[key] - expected[key]) < 2e-3, (got["method"], key, got[key], expected[key])
    for r0, r1 in zip(*rows, strict=True):  # every rank computed the metrics from the same gathered predictions
        assert all(r0[k] == r1[k] for k in ("accuracy", "nll", "ece", "auroc_variance")), r0["method"]
    written = json.loads((tmp_path / "results" / "results.json").read_text())
    assert written["processes"] == WORLD and [r["method"] for r in written["rows"]] == ["map", "la_kron"]


def test_distributed_flag_needs_torchrun(monkeypatch, capsys):
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert main(["bench", "--methods", "map", "--distributed"]) == 2
    assert "--distributed needs the environment torchrun sets" in capsys.readouterr().err
