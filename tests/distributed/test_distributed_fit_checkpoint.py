"""Checkpointed Laplace fits under torch.distributed (2 gloo processes): rank 0 writes, an interrupted 2-rank fit
resumes to the uninterrupted one bitwise and to the single-process fit to round-off, and a 2-rank checkpoint is
refused by one process (its number of ranks differs)."""

from __future__ import annotations

import distributed_workers as workers
import pytest
import torch
from distributed_workers import DEADLINE_S, WORLD, run_processes
from torch.utils.data import DataLoader

from posthoc.utils.checkpoint import CheckpointError


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("fit_checkpoint")
    codes = run_processes(workers.checkpoint_worker, out)
    assert codes == [0] * WORLD, f"worker exit codes {codes} (None: killed after {DEADLINE_S} s)"
    return out, [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("structure", ["full", "ekfac"])
def test_interrupted_two_rank_fit_resumes_exactly(two_ranks, structure):
    out, (rank0, rank1) = two_ranks
    _, train, _, _ = workers.problems()["cnn_classification"]
    single = workers.checkpointed_fit(structure, DataLoader(train, batch_size=2), None)
    for key in ("precision", "evidence", "n_data"):
        resumed, whole = rank0[f"{structure}/resumed/{key}"], rank0[f"{structure}/whole/{key}"]
        assert torch.equal(resumed, whole), key
        assert torch.equal(resumed, rank1[f"{structure}/resumed/{key}"]), f"{key}: ranks disagree"
        torch.testing.assert_close(resumed, single[key], rtol=1e-10, atol=1e-12, msg=key)


def test_two_rank_checkpoint_is_refused_by_one_process(two_ranks):
    out, _ = two_ranks
    _, train, _, _ = workers.problems()["cnn_classification"]
    with pytest.raises(CheckpointError, match="world_size"):
        workers.checkpointed_fit("full", DataLoader(train, batch_size=2), out / "full.ckpt")
