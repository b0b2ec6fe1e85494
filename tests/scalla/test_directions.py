"""ScaLLA's directions handed out in chunks: Rademacher directions redrawn from saved generator states (the same
values and generator state as one dense draw), and the targets of a run equal to those of dense directions."""

import torch

from posthoc.curvature.jacobians import jvp_many
from posthoc.likelihood import Likelihood
from posthoc.network.subset import ParameterSubset
from posthoc.scalla import objectives
from posthoc.scalla.directions import RademacherDirections, direction_chunks, n_chunks, rademacher
from posthoc.scalla.pools import InputPool
from posthoc.scalla.surrogate import build_default_surrogate
from posthoc.scalla.training import SurrogateTrainer, TrainSettings


def test_chunked_rademacher_directions_are_the_dense_draw():
    dense_generator, chunked_generator = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    dense = rademacher(13, 50, dense_generator, torch.float64)
    chunked = RademacherDirections(13, 50, chunked_generator, torch.float64, chunk=4)
    assert len(chunked) == 13 and n_chunks(chunked, 4) == 4
    assert [len(c) for c in direction_chunks(chunked)] == [4, 4, 4, 1]
    assert torch.equal(chunked.dense(), dense) and set(dense.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(chunked_generator.get_state(), dense_generator.get_state())  # later draws unchanged
    assert torch.equal(torch.cat(list(direction_chunks(dense, 5))), dense)


def test_targets_from_chunked_directions_equal_the_dense_jvps(mlp_problem):
    p = mlp_problem
    subset = ParameterSubset(p.model, "all")
    pool = InputPool(p.train_loader, "training", torch.float64, torch.device("cpu"))
    settings = TrainSettings(steps=1, n_target_points=30, directions="rademacher", jvp_chunk=7, seed=3)
    surrogate = build_default_surrogate(p.model, p.x[:2], n_features=11, n_outputs=3)
    trainer = SurrogateTrainer(surrogate, subset, Likelihood.CLASSIFICATION, pool, None, settings, progress=False)
    trainer.run(11)
    generator = torch.Generator().manual_seed(3)
    directions = rademacher(11, subset.n_params, generator, torch.float64)
    index = torch.randperm(len(pool), generator=generator)[:30]
    expected = objectives.direction_targets(jvp_many(subset, pool.take(index), directions), True)
    assert torch.equal(trainer.targets["train_index"], index)
    torch.testing.assert_close(trainer.targets["values"], expected, rtol=1e-12, atol=1e-14)
    assert trainer.jvp_evaluations == 30 * 11
