"""Hessian structures; importing this package registers the built-in ones."""

from posthoc.laplace.structures.base import (
    STRUCTURES,
    CurvatureStructure,
    HessianStructure,
    get_structure,
    register_structure,
    structure_name,
)
from posthoc.laplace.structures.diag import DiagCurvature
from posthoc.laplace.structures.ekfac import EKFACCurvature
from posthoc.laplace.structures.full import FullCurvature
from posthoc.laplace.structures.kron import KronCurvature
from posthoc.laplace.structures.lowrank import LowRankCurvature

__all__ = [
    "STRUCTURES",
    "CurvatureStructure",
    "DiagCurvature",
    "EKFACCurvature",
    "FullCurvature",
    "HessianStructure",
    "KronCurvature",
    "LowRankCurvature",
    "get_structure",
    "register_structure",
    "structure_name",
]
