"""Laplace.fit under torch.distributed (2 gloo processes on 127.0.0.1) equals the single-process fit."""

from __future__ import annotations

import distributed_workers as workers
import pytest
import torch
from distributed_workers import DEADLINE_S, WORLD, run_processes
from torch.utils.data import DataLoader

from posthoc.distributed import gather_rows, is_distributed, sum_count, sum_over_ranks


def test_single_process_makes_no_collective_calls():
    assert not is_distributed()
    x = torch.ones(3)
    assert sum_over_ranks([x], "x")[0] is x
    assert sum_count(4, "n") == 4
    assert gather_rows(x, "x") is x


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    codes = run_processes(workers.laplace_worker, out)
    assert codes == [0] * WORLD, f"worker exit codes {codes} (None: killed after {DEADLINE_S} s)"
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def test_distributed_fit_equals_single_process(two_process_results):
    """Full, diag, kron, ekfac and lowrank posteriors, the evidence and the tuned priors of a 2-rank fit
    (each rank half the data) match one process on all the data to 1e-6 relative in float64 (the only
    difference is the summation order of the curvature, ~1e-15)."""
    single = workers.fit_everything(lambda ds: DataLoader(ds, batch_size=5), lambda ds: DataLoader(ds, batch_size=5))
    rank0, rank1 = two_process_results
    assert set(rank0) == set(single)
    for key, expected in single.items():
        # lowrank: Lanczos on the same (summed) operator, so the eigenpairs agree to its tolerance (1e-10)
        torch.testing.assert_close(rank0[key], expected, rtol=1e-6, atol=1e-9, msg=key)
        assert torch.equal(rank0[key], rank1[key]), f"{key}: ranks disagree"
    assert float(single["mlp_classification/kron/n_data"]) == 32


def test_dead_rank_makes_the_other_fail_fast(tmp_path):
    """Rank 1 exits mid-fit; rank 0 must raise a clear PeerFailure well within its 30 s timeout."""
    codes = run_processes(workers.dying_worker, tmp_path)
    assert codes[1] == 7
    assert codes[0] == 0, f"rank 0 exit code {codes[0]} (None: it hung and was killed)"
    seconds, outcome = (tmp_path / "rank0.txt").read_text().split("\n", 1)
    assert outcome.startswith("PeerFailure: rank 0 of 2"), outcome
    assert "another rank exited, crashed or timed out" in outcome
    assert float(seconds) < 30.0
