"""The likelihoods posthoc supports, as an enum shared by every method."""

from __future__ import annotations

from enum import Enum
from typing import Iterable


class Likelihood(str, Enum):
    """Observation model of the network's outputs.

    CLASSIFICATION: outputs are logits (B, C), y ~ Categorical(softmax(f)), targets class indices (B,).
    REGRESSION: outputs are means, y ~ N(f, sigma_noise^2 I).
    BINARY: outputs are logits (B, K), each an independent Bernoulli, y_k ~ Bernoulli(sigmoid(f_k)), targets
        (B, K) in {0, 1}: a binary classifier with one logit (K = 1, a (B,) target accepted) or a multi-label
        classifier (K > 1; Hugging Face's ``problem_type="multi_label_classification"``, trained with
        ``BCEWithLogitsLoss``). See :func:`from_problem_type`.
    """

    CLASSIFICATION = "classification"
    REGRESSION = "regression"
    BINARY = "binary"


# Hugging Face's config.problem_type values and the likelihood each means
HF_PROBLEM_TYPES = {
    "single_label_classification": Likelihood.CLASSIFICATION,
    "multi_label_classification": Likelihood.BINARY,
    "regression": Likelihood.REGRESSION,
}


def from_problem_type(problem_type: str) -> Likelihood:
    """The likelihood of a Hugging Face ``config.problem_type``, for a user who passes it explicitly.

    ``"multi_label_classification"`` -> BINARY, ``"single_label_classification"`` -> CLASSIFICATION,
    ``"regression"`` -> REGRESSION. posthoc never reads a model's config by itself: call
    ``Laplace(model, from_problem_type(model.config.problem_type))`` to follow it.

    Raises:
        ValueError: another value (e.g. None, an unset problem_type), listing the known ones.
    """
    if problem_type not in HF_PROBLEM_TYPES:
        raise ValueError(f"unknown problem_type {problem_type!r}: expected one of {sorted(HF_PROBLEM_TYPES)} "
                         "(an unset problem_type, None, means the model guesses it from num_labels and the labels' "
                         "dtype: pass the likelihood yourself)")
    return HF_PROBLEM_TYPES[problem_type]


def check_supported(likelihood: Likelihood, supported: Iterable[Likelihood], who: str) -> Likelihood:
    """Return ``likelihood`` if ``who`` supports it, else raise NotImplementedError naming what it supports.

    Raises:
        NotImplementedError: ``likelihood`` is not in ``supported``.
    """
    allowed = tuple(supported)
    if likelihood not in allowed:
        names = " or ".join(repr(item.value) for item in allowed)
        raise NotImplementedError(f"{who} supports likelihood {names}, not {likelihood.value!r}"
                                  + (" (independent Bernoulli outputs: use posthoc.Laplace)"
                                     if likelihood is Likelihood.BINARY else ""))
    return likelihood
