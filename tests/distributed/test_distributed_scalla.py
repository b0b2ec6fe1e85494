"""ScaLLA under torch.distributed: each step's combined batch split over 2 gloo ranks (features gathered with
autograd for the pairwise objective), the m x m posterior all-reduced, checkpoints by rank 0, resumable anywhere."""

from __future__ import annotations

import pytest
import torch

import distributed_workers as workers
from distributed_workers import WORLD, run_processes


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("scalla")
    codes = run_processes(workers.scalla_worker, out)
    assert codes == [0] * WORLD, codes
    return out, [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def test_two_ranks_follow_one_process_with_the_combined_batch(two_ranks):
    _, ranks = two_ranks
    for objective in ("probes", "directions"):
        single = workers.scalla_run(objective, steps=5)
        for result in ranks:
            got = result[objective]
            # the same points, probes and directions on every rank: only the summation order of the loss and
            # gradients differs (float64 round-off ~1e-16, amplified a little by 5 Adam steps)
            for key in ("surrogate", "precision", "evidence"):
                torch.testing.assert_close(got[key], single[key], rtol=1e-8, atol=1e-10, msg=f"{objective} {key}")
            assert torch.equal(got["jvp_evaluations"], single["jvp_evaluations"])  # counts the whole batch
        assert torch.equal(ranks[0][objective]["surrogate"], ranks[1][objective]["surrogate"])


def test_checkpoint_from_two_ranks_resumes_in_one_process(two_ranks):
    out, _ = two_ranks
    assert (out / "scalla.pt").exists()  # written by rank 0 at step 2 (checkpoint_every=2), before the stop
    resumed = workers.scalla_run("probes", steps=6, checkpoint=str(out / "scalla.pt"))
    uninterrupted = workers.scalla_run("probes", steps=6)
    torch.testing.assert_close(resumed["surrogate"], uninterrupted["surrogate"], rtol=1e-8, atol=1e-10)
