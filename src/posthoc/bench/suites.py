"""Benchmark suites: which data, which model, which MAP training schedule."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from posthoc.models.training import TrainConfig


@dataclass(frozen=True)
class BenchSuite:
    """A benchmark: a data suite (``posthoc.data.get_suite`` name), a model and its MAP schedule."""

    name: str
    data: str
    model: str
    train: TrainConfig
    description: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    # the probit rows as before, then issue 17's MC-link rows (which reuse the probit rows' fits)
    default_methods: tuple[str, ...] = (
        "map", "temperature", "la_lastlayer_full", "la_kron", "la_kron_gridsearch", "la_diag", "la_lowrank",
        "la_lastlayer_full_mc", "la_kron_mc")


BENCH_SUITES: dict[str, BenchSuite] = {
    "fmnist": BenchSuite(
        "fmnist", "fmnist", "fmnist_cnn", TrainConfig(epochs=40, batch_size=64, lr=1e-3, gamma=0.7),
        "full FMNIST (55k train, 5k val, 10k test), MNIST context, KMNIST OOD; the ScaLLA paper's FMNIST CNN "
        "with its reference 40-epoch schedule",
    ),
    "fmnist-embedded": BenchSuite(
        "fmnist-embedded", "fmnist-embedded", "fmnist_cnn", TrainConfig(epochs=15, batch_size=64, lr=1e-3, gamma=0.85),
        "the subset shipped in the package (4k train, 1k val, 2k test, 1k MNIST context, 2k KMNIST OOD); "
        "same CNN, 15 epochs",
    ),
}


def get_bench_suite(name: str) -> BenchSuite:
    """The registered suite ``name``; ValueError listing the suites when unknown."""
    if name not in BENCH_SUITES:
        raise ValueError(f"unknown suite {name!r}; available: {', '.join(BENCH_SUITES)}")
    return BENCH_SUITES[name]
