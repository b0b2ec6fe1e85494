"""posthoc: calibrated predictive uncertainty for trained PyTorch networks, after the fact.

Every method returns a :class:`~posthoc.predictive.GaussianPredictive` or
:class:`~posthoc.predictive.SamplePredictive` from ``.predict(x)``.
"""

__version__ = "0.1.0"

from posthoc import metrics
from posthoc.baselines import MAP, TemperatureScaling
from posthoc.fiber import FiberSampler
from posthoc.laplace import Laplace
from posthoc.likelihood import Likelihood
from posthoc.predictive import GaussianPredictive, LinkApprox, Predictive, SamplePredictive
from posthoc.scalla import ScaLLA
from posthoc.streamlined import Streamlined

__all__ = [
    "__version__",
    "FiberSampler",
    "GaussianPredictive",
    "Laplace",
    "Likelihood",
    "LinkApprox",
    "MAP",
    "Predictive",
    "SamplePredictive",
    "ScaLLA",
    "Streamlined",
    "TemperatureScaling",
    "metrics",
]
