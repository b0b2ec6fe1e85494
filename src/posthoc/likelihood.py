"""The likelihoods posthoc supports, as an enum shared by every method."""

from __future__ import annotations

from enum import Enum


class Likelihood(str, Enum):
    """Observation model of the network's outputs.

    CLASSIFICATION: outputs are logits, y ~ Categorical(softmax(f)).
    REGRESSION: outputs are means, y ~ N(f, sigma_noise^2 I).
    """

    CLASSIFICATION = "classification"
    REGRESSION = "regression"
