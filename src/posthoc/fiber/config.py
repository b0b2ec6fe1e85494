"""The settings of fiber sampling: :class:`WalkConfig` (stage 1) and :class:`DeformConfig` (stage 2).

``FiberSampler`` takes them as ``walk=WalkConfig(...)`` and ``deform=DeformConfig(...)``, or as flat keywords
named like their fields (:func:`stage_configs` turns those into the configs; both forms give the same sampler).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import posthoc.fiber.pullback  # noqa: F401 - registers the default map, "pullback"
from posthoc.fiber.deform import DeformKind
from posthoc.fiber.stage2 import DeformMethod, get_deform
from posthoc.fiber.walk import WalkConfig, check_non_negative_int
from posthoc.utils.checks import check_positive, check_positive_int

__all__ = ["DEFAULT_DEFORM", "DeformConfig", "WalkConfig", "stage_configs"]

# The default stage 2 (was "flow" until issue 17: its samples left the low-loss set or stayed near the data, and
# the flow, "variational" and "anchored" maps draw few new samples; benchmarks/results/fiber_toy.md)
DEFAULT_DEFORM = DeformKind.PULLBACK.value
# settings the old default ("flow") used and "pullback" does not: given without a ``kind`` they now change meaning
FLOW_SETTINGS = ("latent_dim", "flow_layers", "flow_hidden", "flow_steps", "flow_lr", "flow_loss_weight",
                 "flow_loss_batch", "flow_loss_samples", "barrier_weight", "variational_init_scale")


@dataclass(frozen=True)
class DeformConfig:
    """Settings of stage 2. Raises ValueError for an unknown ``kind`` or an invalid value.

    Attributes:
        kind: the registered map (:func:`posthoc.fiber.register_deform`; a name or a DeformKind); None (the default)
            is "pullback" (:mod:`posthoc.fiber.pullback`: a walked sample within the tolerance plus one long
            projected Langevin move, pulled back onto the low-loss set by the walk's Gauss-Newton steps; new samples,
            not resampled walked ones, at a cost of a few Gauss-Newton steps each; docs/fiber.md). Until issue 17
            the default was "flow": flow settings given without a kind raise a FutureWarning, since "pullback"
            ignores them (pass ``kind="flow"`` for the old map). The others: "flow" (coupling
            flow on principal coordinates, maximum likelihood on the walked samples plus the loss-aware term),
            "variational" (the same flow trained as a variational approximation of the prior restricted to the
            low-loss set, see deform.py; it keeps the tolerance but not stage 1's spread away from the data),
            "anchored" (a mixture on the fiber: a walked sample within the tolerance, uniformly drawn, plus a
            learned Gaussian jitter in the principal directions, trained with the "variational" objective; it
            keeps stage 1's spread because the walked samples carry it, see deform.py and
            benchmarks/results/fiber_toy.md), "gaussian", or a user's map. The sampler's keyword is ``deform``.
        latent_dim: dimension of stage 2's latent (at most the rank of the walked samples).
        flow_layers, flow_hidden, flow_steps, flow_lr: the flow and its Adam training.
        flow_loss_weight, flow_loss_batch, flow_loss_samples: the loss-aware term of the "flow" objective
            (decoded samples whose minibatch NLL exceeds the MAP's by more than 0.8 eps are penalised; 0 turns
            it off, leaving plain maximum likelihood on the walked samples). flow_loss_batch and
            flow_loss_samples are also the minibatch and the draws per step of the "variational" and "anchored"
            objectives.
        barrier_weight: "variational" and "anchored": weight of the hinge max(0, excess - eps / 2) / eps on a
            decoded sample's minibatch NLL excess over the MAP's, in nats of the KL objective (None: the map's
            default, 100; "anchored": 300).
        variational_init_scale: "variational": the flow starts as N(0, scale^2 I) in the whitened principal
            coordinates (scale 1: the walked samples' spread), small enough to start in the low-loss set (None:
            0.1); "anchored": the jitter's starting sigma, same units (None: 0.01, close to plain resampling of
            the walk, which is within the tolerance).
        step_scale: "pullback": the move's norm in units of the walked samples' median nearest-neighbour distance
            (0.7: novelty ~0.7, above issue 17's 0.5 with a margin, on every measured problem, with fewer rejected
            moves than 1.0; 0.35 misses the novelty goal; benchmarks/results/fiber_toy.md).
        n_check: stage-2 samples whose all-data NLL is checked after fitting (0: no check).
    """

    kind: str | None = None
    latent_dim: int = 8
    flow_layers: int = 4
    flow_hidden: int = 64
    flow_steps: int = 300
    flow_lr: float = 5e-3
    flow_loss_weight: float = 10.0
    flow_loss_batch: int = 128
    flow_loss_samples: int = 8
    barrier_weight: float | None = None
    variational_init_scale: float | None = None
    step_scale: float = 0.7
    n_check: int = 32

    def __post_init__(self) -> None:
        defaulted = self.kind is None
        get_deform(self.name)
        object.__setattr__(self, "kind", self.name)
        check_positive_int(self.latent_dim, "latent_dim")
        check_positive_int(self.flow_hidden, "flow_hidden")
        for name in ("flow_layers", "flow_steps", "n_check"):
            check_non_negative_int(getattr(self, name), name)
        check_positive(self.flow_lr, "flow_lr")
        if not self.flow_loss_weight >= 0:
            raise ValueError(f"flow_loss_weight must be >= 0, got {self.flow_loss_weight!r}")
        check_positive_int(self.flow_loss_batch, "flow_loss_batch")
        check_positive_int(self.flow_loss_samples, "flow_loss_samples")
        for name in ("barrier_weight", "variational_init_scale"):
            if getattr(self, name) is not None:
                check_positive(getattr(self, name), name)
        check_positive(self.step_scale, "step_scale")
        if defaulted:
            self._warn_flow_settings()

    def _warn_flow_settings(self) -> None:
        """FutureWarning when the old default's flow settings are given without a kind (they no longer apply)."""
        given = [f.name for f in fields(self) if f.name in FLOW_SETTINGS and getattr(self, f.name) != f.default]
        if given:
            warnings.warn(f"FiberSampler's default stage 2 is now deform='{DEFAULT_DEFORM}' (it was 'flow'), which "
                          f"does not use {', '.join(given)}; pass deform='flow' to keep the coupling flow, or drop "
                          f"these settings", FutureWarning, stacklevel=6)

    @property
    def name(self) -> str:
        """``kind`` as a str (None, before ``__post_init__`` resolved it, is :data:`DEFAULT_DEFORM`)."""
        kind = DEFAULT_DEFORM if self.kind is None else self.kind
        return kind.value if isinstance(kind, DeformKind) else kind

    @property
    def method(self) -> DeformMethod:
        """The registered map of ``kind``."""
        return get_deform(self.name)

    def resolved(self, name: str) -> float:
        """``barrier_weight`` or ``variational_init_scale`` as a float, the map's default when None."""
        value = getattr(self, name)
        if value is None:
            value = getattr(self.method, {"barrier_weight": "default_barrier_weight",
                                          "variational_init_scale": "default_init_scale"}[name])
        return float(value)

    def to_dict(self) -> dict[str, Any]:
        """The settings as a plain dict (field name -> value), as the checkpoint fingerprint stores them."""
        return asdict(self)


WALK_KEYWORDS = frozenset(f.name for f in fields(WalkConfig))
DEFORM_KEYWORDS = frozenset(f.name for f in fields(DeformConfig)) - {"kind"}


def stage_configs(walk: WalkConfig | None, deform: DeformConfig | DeformKind | str | None,
                  keywords: dict[str, Any]) -> tuple[WalkConfig, DeformConfig]:
    """Build the two stages' configs from config objects and/or flat keywords named like their fields.

    Without a WalkConfig, ``burn_in`` defaults to steps // 2; ``deform`` may be a map's name or None (the default
    map, :data:`DEFAULT_DEFORM`), then the stage-2 keywords apply.

    Raises:
        ValueError: when one stage's settings are given both ways (a config object and keywords), or a value is
            invalid (see the configs).
        TypeError: for a keyword that is no field of either config, or a ``walk`` that is not a WalkConfig.
    """
    unknown = sorted(set(keywords) - WALK_KEYWORDS - DEFORM_KEYWORDS)
    if unknown:
        raise TypeError(f"FiberSampler got unexpected keyword argument(s) {', '.join(unknown)}; the settings are "
                        "the fields of WalkConfig and DeformConfig")
    walk_keywords = {k: v for k, v in keywords.items() if k in WALK_KEYWORDS}
    deform_keywords = {k: v for k, v in keywords.items() if k in DEFORM_KEYWORDS}
    if walk is not None:
        if not isinstance(walk, WalkConfig):
            raise TypeError(f"walk must be a WalkConfig, got {type(walk).__name__}")
        if walk_keywords:
            raise ValueError(f"the walk settings were given twice: walk=WalkConfig(...) and the keyword(s) "
                             f"{', '.join(sorted(walk_keywords))}; put them in the WalkConfig")
    else:
        if walk_keywords.get("burn_in") is None:  # default: half the steps
            walk_keywords["burn_in"] = walk_keywords.get("steps", WalkConfig.steps) // 2
        walk = WalkConfig(**walk_keywords)
    if isinstance(deform, DeformConfig):
        if deform_keywords:
            raise ValueError(f"the stage-2 settings were given twice: deform=DeformConfig(...) and the keyword(s) "
                             f"{', '.join(sorted(deform_keywords))}; put them in the DeformConfig")
    else:
        deform = DeformConfig(kind=deform, **deform_keywords)
    return walk, deform


def deform_setting(name: str, resolved: bool = False) -> property:
    """A sampler attribute for one DeformConfig field of ``self.deform_config``.

    Reading gives the field (``resolved``: with the map's default for None, see :meth:`DeformConfig.resolved`);
    setting replaces the config with one that has the new value (validated again, ValueError if invalid).
    """
    def get(self: Any) -> Any:
        return self.deform_config.resolved(name) if resolved else getattr(self.deform_config, name)

    def set_(self: Any, value: Any) -> None:
        self.deform_config = replace(self.deform_config, **{name: value})

    return property(get, set_, doc=f"DeformConfig.{name}{' (the default resolved)' if resolved else ''}; setting "
                                   "it replaces ``deform_config``.")
