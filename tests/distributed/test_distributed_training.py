"""MAP training under torch.distributed: each rank a slice of the common minibatch, gradients summed."""

from __future__ import annotations

import distributed_workers as workers
import torch
from distributed_workers import WORLD, run_processes


def test_two_rank_training_equals_one_process(tmp_path):
    codes = run_processes(workers.training_worker, tmp_path)
    assert codes == [0] * WORLD, codes
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    single = workers.train(str(tmp_path / "single"))
    for result in ranks:
        # the same steps up to summation order of the gradient (float64: ~1e-15 per step, 15 Adam steps)
        torch.testing.assert_close(result["first"]["weights"], single["weights"], rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(result["first"]["losses"], single["losses"], rtol=1e-9, atol=0)
        assert not bool(result["first"]["from_cache"]) and bool(result["second"]["from_cache"])
        assert torch.equal(result["second"]["weights"], ranks[0]["first"]["weights"])
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["mlp.pt"]  # written once, partial removed
