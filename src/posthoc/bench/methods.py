"""The registry of methods ``posthoc bench`` can run.

A method is registered with a builder that takes a :class:`BenchContext`
(the trained MAP model and the data loaders) and returns a fitted object with
``predict(x) -> Predictive``. New approximations plug in with
:func:`register_method`; nothing else in the runner changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader

from posthoc.baselines import MAP, TemperatureScaling
from posthoc.data.suites import ImageSuite
from posthoc.laplace import Laplace
from posthoc.predictive import LinkApprox, Predictive
from posthoc.utils.registry import add_to_registry


class Predictor(Protocol):
    """What a builder returns: anything with ``predict``."""

    def predict(self, x: torch.Tensor) -> Predictive:
        """The predictive distribution for inputs x (B, ...)."""
        ...


@dataclass
class BenchContext:
    """What a method's builder gets: the MAP model and the suite's loaders.

    ``val_loader`` is the only data for tuning; ``context_loader`` holds the
    suite's context inputs (for methods that use them, e.g. ScaLLA).
    """

    model: nn.Module
    suite: ImageSuite
    train_loader: DataLoader
    val_loader: DataLoader
    context_loader: DataLoader
    seed: int
    progress: bool = True


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its builder, a one-line description and its link.

    ``shards_fit``: the builder fits and tunes correctly on this rank's shard
    of the training and validation data under torch.distributed (it
    all-reduces what it sums, as Laplace.fit and its gridsearch do); otherwise
    every rank gets all of both.
    """

    name: str
    build: Callable[[BenchContext], Predictor]
    description: str
    link_approx: LinkApprox = LinkApprox.PROBIT
    shards_fit: bool = False


METHODS: dict[str, MethodSpec] = {}


def register_method(
    name: str, build: Callable[[BenchContext], Predictor], description: str,
    link_approx: LinkApprox | str = LinkApprox.PROBIT, shards_fit: bool = False, replace: bool = False,
) -> MethodSpec:
    """Add a method to the registry under ``name`` (then ``posthoc bench --methods name`` runs it).

    Raises:
        ValueError: ``name`` is empty or already registered (pass ``replace=True`` to replace it), or
            ``link_approx`` is unknown.
        TypeError: ``build`` is not callable.
    """
    if not callable(build):
        raise TypeError(f"a method's builder must be callable, got {type(build).__name__}")
    return add_to_registry(METHODS, name, MethodSpec(name, build, description, LinkApprox(link_approx), shards_fit),
                           "method", replace)


def get_methods(names: list[str]) -> list[MethodSpec]:
    """Look up method names, failing on the first unknown one with the valid list."""
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(map(repr, unknown))}; available: {', '.join(METHODS)}")
    if not names:
        raise ValueError(f"no methods given; available: {', '.join(METHODS)}")
    return [METHODS[n] for n in names]


register_method("map", lambda ctx: MAP(ctx.model), "the trained network, no uncertainty")
register_method(
    "temperature",
    lambda ctx: TemperatureScaling(ctx.model).fit(ctx.val_loader),
    "MAP with a temperature fitted on validation NLL",
)


GRIDSEARCH_PRIORS = (1e-2, 1e-1, 1.0, 1e1, 1e2, 1e3, 1e4)
# The fitted Laplace of the last (builder settings, model, training loader, seed): rows that predict the same
# posterior differently (glm, nn, streamlined) share one fit within a run.
_FITTED: dict[tuple, Laplace] = {}


def laplace_builder(structure: str, subset: str, tuning: str = "marglik", marglik_steps: int = 100,
                    tuning_link: LinkApprox | str = LinkApprox.PROBIT,
                    **structure_options) -> Callable[[BenchContext], Predictor]:
    """A bench builder: fit a Laplace approximation on the training loader, then tune a scalar prior precision.

    ``tuning``: "marglik" (the evidence, ``marglik_steps`` Adam steps), "gridsearch" (validation NLL over
    GRIDSEARCH_PRIORS, the probabilities by ``tuning_link``: use the link the row predicts with) or "default"
    (``optimize_prior_precision(val_loader=..., link_approx=tuning_link)`` with every other argument at its
    default: Laplace's grid search over logspace(-4, 4, 21)). The row
    predicts with glm and its registered link. Rows with equal settings share one fit within a run.
    """
    tuning_link = LinkApprox(tuning_link)
    if tuning not in ("marglik", "gridsearch", "default"):
        raise ValueError(f"tuning must be 'marglik', 'gridsearch' or 'default', got {tuning!r}")
    settings = (structure, subset, tuning, marglik_steps, tuning_link.value if tuning != "marglik" else None,
                tuple(sorted(structure_options.items())))

    def build(ctx: BenchContext) -> Laplace:
        key = (settings, id(ctx.model), id(ctx.train_loader), ctx.seed)
        if key in _FITTED:
            return _FITTED[key]
        if any(k[1:] != key[1:] for k in _FITTED):  # another model or data: drop the old posteriors
            _FITTED.clear()
        la = Laplace(ctx.model, "classification", subset_of_weights=subset, hessian_structure=structure,
                     seed=ctx.seed, progress=ctx.progress, structure_options=structure_options)
        la.fit(ctx.train_loader)
        if tuning == "marglik":
            la.optimize_prior_precision(method="marglik", n_steps=marglik_steps)
        elif tuning == "default":
            la.optimize_prior_precision(val_loader=ctx.val_loader, link_approx=tuning_link)
        else:
            la.optimize_prior_precision(method="gridsearch", val_loader=ctx.val_loader,
                                        grid=torch.tensor(GRIDSEARCH_PRIORS), link_approx=tuning_link)
        _FITTED[key] = la
        return la

    return build


register_method("la_kron", laplace_builder("kron", "all"), "LA, all weights, KFAC, glm, marglik prior", shards_fit=True)
register_method("la_kron_gridsearch", laplace_builder("kron", "all", tuning="gridsearch"),
                "LA, all weights, KFAC, glm, prior by validation NLL", shards_fit=True)
register_method("la_diag", laplace_builder("diag", "all"), "LA, all weights, diagonal, glm, marglik prior",
                shards_fit=True)
register_method("la_lowrank", laplace_builder("lowrank", "all", rank=20, subsample=1000, basis="ggn"),
                "LA, all weights, top-20 GGN eigenpairs (Lanczos on a 1,000-example subsample), the uncovered "
                "directions left out (complement='omit'), glm, marglik prior", shards_fit=True)
register_method("la_lowrank_prior", laplace_builder("lowrank", "all", rank=20, subsample=1000, complement="prior"),
                "la_lowrank with the prior kept on the uncovered directions (laplace-torch's LowRankLaplace; "
                "posthoc's lowrank before issue 17)", shards_fit=True)
register_method("la_lastlayer_full", laplace_builder("full", "last_layer"),
                "LA, last layer, full GGN, glm, marglik prior", shards_fit=True)

# The recommended rows (issue 17): the same posteriors, class probabilities by Monte Carlo over the glm logit
# Gaussian (1,000 samples) instead of the probit link. Probit reads only the logit variances, and most of the
# variance of a marglik posterior sits in the direction that shifts all logits together (the prior's, which the
# softmax ignores: 2/3 of it on the embedded FMNIST CNN's last layer), so probit flattens every prediction;
# MC integrates the softmax itself. Fits are shared with the probit rows of the same settings.
register_method("la_lastlayer_full_mc", laplace_builder("full", "last_layer"),
                "LA, last layer, full GGN, marglik prior, glm with the MC link: calibrated probabilities at the "
                "cost of a last-layer fit", link_approx=LinkApprox.MC, shards_fit=True)
register_method("la_kron_mc", laplace_builder("kron", "all"),
                "LA, all weights, KFAC, marglik prior, glm with the MC link: all-weight uncertainty for OOD "
                "detection", link_approx=LinkApprox.MC, shards_fit=True)
register_method("la_lastlayer_full_gridsearch", laplace_builder("full", "last_layer", tuning="gridsearch"),
                "LA, last layer, full GGN, prior by validation NLL, glm, probit: the recommended recipe (issue 17: "
                "the marglik prior is 10-1000x below the validation optimum on every task measured)", shards_fit=True)
register_method("la_kron_gridsearch_mc", laplace_builder("kron", "all", tuning="gridsearch", tuning_link="mc"),
                "LA, all weights, KFAC, prior by validation NLL of the MC-link predictive, glm with the MC link",
                link_approx=LinkApprox.MC, shards_fit=True)
# The centred probit (issue 17): the probit link after projecting out the all-logits shift that softmax ignores
# (LinkApprox.PROBIT_CENTRED); the same posteriors and fits as the probit rows, O(BC^2) instead of MC's samples.
register_method("la_lastlayer_full_centred", laplace_builder("full", "last_layer"),
                "LA, last layer, full GGN, marglik prior, glm with the centred probit link",
                link_approx=LinkApprox.PROBIT_CENTRED, shards_fit=True)
register_method("la_kron_centred", laplace_builder("kron", "all"),
                "LA, all weights, KFAC, marglik prior, glm with the centred probit link",
                link_approx=LinkApprox.PROBIT_CENTRED, shards_fit=True)
register_method("la_kron_gridsearch_centred",
                laplace_builder("kron", "all", tuning="gridsearch", tuning_link=LinkApprox.PROBIT_CENTRED),
                "LA, all weights, KFAC, prior by validation NLL of the centred-probit predictive, glm with the "
                "centred probit link", link_approx=LinkApprox.PROBIT_CENTRED, shards_fit=True)
# Laplace's default recipe given a validation loader (issue 17): Laplace(model, "classification") (last layer,
# KFAC), optimize_prior_precision(val_loader=...) at its defaults (a grid search since issue 17), la(x)'s probit.
register_method("la_default", laplace_builder("kron", "last_layer", tuning="default"),
                "LA at Laplace's defaults (last layer, KFAC, optimize_prior_precision(val_loader=val): validation "
                "NLL over logspace(-4, 4, 21)) with laplace-torch's probit link for tuning and prediction",
                shards_fit=True)
register_method("la_default_centred", laplace_builder("kron", "last_layer", tuning="default",
                                                      tuning_link=LinkApprox.PROBIT_CENTRED),
                "LA at Laplace's defaults, la(x)'s default link included (the centred probit), given a val_loader",
                link_approx=LinkApprox.PROBIT_CENTRED, shards_fit=True)
