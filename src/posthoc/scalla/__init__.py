"""ScaLLA: a learned surrogate of the linearised-Laplace kernel, trained from JVPs only (docs/scalla.md)."""

from posthoc.scalla.scalla import ScaLLA
from posthoc.scalla.surrogate import FeatureSurrogate, SurrogateInit, build_default_surrogate
from posthoc.scalla.training import REFERENCE_RECIPE, Objective, SurrogateTrainer, TrainSettings

__all__ = ["FeatureSurrogate", "Objective", "REFERENCE_RECIPE", "ScaLLA", "SurrogateInit", "SurrogateTrainer",
           "TrainSettings", "build_default_surrogate"]
