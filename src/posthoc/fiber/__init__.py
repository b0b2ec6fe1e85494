"""Fiber sampling: walk the low-loss set through theta*, then learn a one-step sampler.

Stage 2's maps form an open registry (:func:`register_deform`); the settings are :class:`WalkConfig` and
:class:`DeformConfig`.
"""

from posthoc.fiber.config import DeformConfig
from posthoc.fiber.deform import CouplingFlow, DeformKind, PrincipalCoordinates
from posthoc.fiber.projection import batched_cg, min_norm_step, project_null
from posthoc.fiber.pullback import PullbackMove, novelty
from posthoc.fiber.sampler import FiberSampler
from posthoc.fiber.stage2 import DEFORMS, DeformMethod, get_deform, register_deform
from posthoc.fiber.walk import FiberProblem, WalkConfig, WalkState, walk_step

__all__ = [
    "DEFORMS",
    "CouplingFlow",
    "DeformConfig",
    "DeformKind",
    "DeformMethod",
    "FiberProblem",
    "FiberSampler",
    "PrincipalCoordinates",
    "PullbackMove",
    "WalkConfig",
    "WalkState",
    "batched_cg",
    "get_deform",
    "min_norm_step",
    "novelty",
    "project_null",
    "register_deform",
    "walk_step",
]
