"""Fiber sampling (METHODS.md §5): walk the low-loss set through theta*, then learn a one-step sampler."""

from posthoc.fiber.deform import CouplingFlow, DeformKind, PrincipalCoordinates
from posthoc.fiber.projection import batched_cg, min_norm_step, project_null
from posthoc.fiber.sampler import FiberSampler
from posthoc.fiber.walk import FiberProblem, WalkConfig, WalkState, walk_step

__all__ = [
    "CouplingFlow",
    "DeformKind",
    "FiberProblem",
    "FiberSampler",
    "PrincipalCoordinates",
    "WalkConfig",
    "WalkState",
    "batched_cg",
    "min_norm_step",
    "project_null",
    "walk_step",
]
