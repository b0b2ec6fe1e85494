"""ScaLLA's directions handed out in chunks: Rademacher directions redrawn from saved generator states (the same
values and generator state as one dense draw), top-GGN eigenvectors rebuilt from the dual Lanczos run, and the
targets of a run equal to those of dense directions."""

import torch
from references import dense_ggn

from posthoc.curvature.ggn_operator import top_ggn_eigenpairs
from posthoc.curvature.jacobians import jvp_many
from posthoc.curvature.output_factors import OutputFactors
from posthoc.likelihood import Likelihood
from posthoc.network.subset import ParameterSubset
from posthoc.scalla import objectives, training
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


def _eigen_trainer(p, n_features, monkeypatch=None, tol=None, **settings):
    if monkeypatch is not None:
        monkeypatch.setattr(training, "EIGEN_TOL", tol)
    subset = ParameterSubset(p.model, "all")
    pool = InputPool(p.train_loader, "training", torch.float64, torch.device("cpu"))
    options = dict(steps=1, n_target_points=30, directions="eigen", eigen_subsample=50, seed=5) | settings
    surrogate = build_default_surrogate(p.model, p.x[:2], n_features=n_features, n_outputs=3)
    trainer = SurrogateTrainer(surrogate, subset, Likelihood.CLASSIFICATION, pool, None, TrainSettings(**options),
                               progress=False)
    return trainer.run(n_features), subset, pool


def _target_kernel(targets):
    """sum_k phi_k(x) phi_k(x')^T over the directions, (n C, n C): unchanged by each eigenvector's sign."""
    flat = targets.permute(0, 2, 1).reshape(-1, targets.shape[1])
    return flat @ flat.T


def test_eigen_direction_targets_are_the_dense_ggn_eigenvectors_jvps(mlp_problem, monkeypatch):
    """The streamed eigen directions (never stored) give the targets J(x) U of eigh's top eigenvectors U of the
    subsample's dense GGN, up to each eigenvector's sign."""
    trainer, subset, pool = _eigen_trainer(mlp_problem, 6, monkeypatch, tol=1e-12)
    generator = torch.Generator().manual_seed(5)
    subsample = torch.randperm(len(pool), generator=generator)[:50]
    index = torch.randperm(len(pool), generator=generator)[:30]
    _, vectors = torch.linalg.eigh(dense_ggn(subset, pool.take(subsample), "classification"))
    expected = objectives.direction_targets(jvp_many(subset, pool.take(index), vectors.flip(1)[:, :6].T), False)
    assert torch.equal(trainer.targets["train_index"], index)
    torch.testing.assert_close(_target_kernel(trainer.targets["values"]), _target_kernel(expected), rtol=0,
                               atol=1e-8 * float(_target_kernel(expected).abs().max()))
    # Lanczos products (two evaluations per point), the targets' JVPs, and one VJP per point and eigenvector rebuilt
    products = (trainer.jvp_evaluations - 30 * 6 - 50 * 6) / (2 * 50)
    assert products == int(products) and products >= 6


def test_eigen_directions_pad_with_zeros_past_the_ggn_rank(mlp_problem):
    """Past the subsample GGN's rank n_sub (C - 1) = 8 the directions are zero (no eigenvector to use)."""
    trainer, _, _ = _eigen_trainer(mlp_problem, 11, eigen_subsample=4)
    values = trainer.targets["values"]  # (n, m, C)
    assert values.shape == (30, 11, 3)
    assert bool(values[:, :8].abs().amax(dim=(0, 2)).gt(0).all()) and not bool(values[:, 8:].any())


def test_eigen_targets_equal_those_of_the_stored_primal_eigenvectors(mlp_problem):
    """The memory-bounded path against the one it replaced (Lanczos on the parameters, eigenvectors stored (P, h)),
    both at the default EIGEN_TOL: the target kernels agree to 1e-8 relative (seen 1e-14 with m = 20)."""
    trainer, subset, pool = _eigen_trainer(mlp_problem, 20)
    generator = torch.Generator().manual_seed(5)
    subsample = torch.randperm(len(pool), generator=generator)[:50]
    index = torch.randperm(len(pool), generator=generator)[:30]

    def batches():
        yield pool.take(subsample), torch.zeros(50, dtype=torch.long)

    stored = top_ggn_eigenpairs(subset, batches, OutputFactors("classification"), 20, seed=5, tol=training.EIGEN_TOL,
                                progress=False).eigenvectors  # (P, 20)
    expected = _target_kernel(objectives.direction_targets(jvp_many(subset, pool.take(index), stored.T), False))
    error = (_target_kernel(trainer.targets["values"]) - expected).norm() / expected.norm()
    assert float(error) < 1e-8
