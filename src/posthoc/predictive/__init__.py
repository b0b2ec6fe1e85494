"""The predictive interface every method returns from ``.predict(x)``.

``GaussianPredictive(mean (B,C), cov (B,C,C) or var (B,C))`` and
``SamplePredictive(samples (S,B,C))``, both with ``.probs(link_approx=...)``
for classification and ``.with_noise(sigma)`` / ``.log_prob(y)`` for regression.
"""

from posthoc.predictive.base import Predictive, laplace_torch_outputs
from posthoc.predictive.batching import concat, predict_loader
from posthoc.predictive.gaussian import GaussianPredictive
from posthoc.predictive.links import LinkApprox, laplace_bridge, mc_probs, probit
from posthoc.predictive.samples import SamplePredictive

__all__ = [
    "Predictive",
    "laplace_torch_outputs",
    "GaussianPredictive",
    "SamplePredictive",
    "LinkApprox",
    "probit",
    "laplace_bridge",
    "mc_probs",
    "concat",
    "predict_loader",
]
