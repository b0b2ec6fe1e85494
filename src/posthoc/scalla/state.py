"""ScaLLA's saved state: what :meth:`ScaLLA.state_dict` writes and :meth:`ScaLLA.load_state_dict` restores.

The state holds the surrogate's weights, the latent posterior, the hyperparameters, a check of theta* and one
training input (the default surrogate of a model without ``.trunk`` is rebuilt from it: it locates the last layer).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from posthoc.network.inputs import place
from posthoc.network.subset import ParameterSubset
from posthoc.scalla.posterior import LatentPosterior
from posthoc.scalla.surrogate import HIDDEN

if TYPE_CHECKING:
    from posthoc.scalla.scalla import ScaLLA

STATE_VERSION = 2  # 2: biased states have m + h latent features


def weight_sums(theta: torch.Tensor) -> tuple[float, float]:
    """(sum, sum of squares) of flat weights theta (P,) in float64: what a state records to recognise theta*."""
    theta = theta.detach().double()
    return float(theta.sum()), float(theta.square().sum())


def scalla_state(scalla: ScaLLA) -> dict[str, Any]:
    """The state of a fitted ScaLLA (see :meth:`ScaLLA.state_dict`). Raises RuntimeError before fit."""
    posterior = scalla._require_fit()
    return {
        "version": STATE_VERSION, "likelihood": scalla.likelihood.value, "n_features": scalla.n_features,
        "biased": scalla.biased, "surrogate_hidden": scalla.surrogate_hidden, "input_shape": scalla.input_shape,
        "input_dtype": str(scalla.input_dtype).removeprefix("torch."),
        "n_outputs": scalla.n_outputs, "example_input": scalla.example_input,
        "position_dims": scalla.position_dims,  # outputs (B, ..., C): posthoc.scalla.positions
        "theta_check": weight_sums(scalla.subset.theta_map),
        "surrogate": scalla._require_surrogate().state_dict(), "posterior": posterior.state_dict(),
        "prior_precision": scalla.prior_precision, "sigma_noise": scalla.sigma_noise,
        "train_record": scalla.train_record,
    }


def check_state(scalla: ScaLLA, state: dict[str, Any]) -> None:
    """Raise ValueError unless ``state`` is a ScaLLA state that ``scalla`` can load; changes nothing.

    The state must be of this version, with ``scalla``'s settings, fitted at the model's current weights.
    """
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        version = state.get("version") if isinstance(state, dict) else None
        raise ValueError(f"not a ScaLLA state (version {version!r}, expected {STATE_VERSION})")
    checks = [("likelihood", scalla.likelihood.value), ("n_features", scalla.n_features), ("biased", scalla.biased)]
    if scalla._user_surrogate is None:  # the default surrogate's width (states without it used the default)
        checks.append(("surrogate_hidden", scalla.surrogate_hidden))
    for key, mine in checks:
        theirs = state.get(key, HIDDEN) if key == "surrogate_hidden" else state[key]
        if theirs != mine:
            raise ValueError(f"the state has {key}={theirs!r} but this ScaLLA has {mine!r}")
    if not torch.allclose(torch.tensor(state["theta_check"], dtype=torch.float64),
                          torch.tensor(weight_sums(ParameterSubset(scalla.model, "all").theta_map),  # now, not at fit
                                       dtype=torch.float64),
                          rtol=1e-9, atol=0.0):
        raise ValueError("the model's weights differ from those the state was fitted at; load the matching "
                         "model checkpoint first")


def restore_scalla_state(scalla: ScaLLA, state: dict[str, Any]) -> None:
    """Check ``state`` (:func:`check_state`), then restore it into ``scalla``.

    A ValueError from the check leaves ``scalla`` as it was. theta* is captured from the model's current weights
    and the surrogate rebuilt and loaded.
    """
    check_state(scalla, state)
    scalla.subset.capture()
    spec = state["input_shape"]
    scalla.input_shape = tuple(spec) if isinstance(spec, (tuple, list)) and all(isinstance(d, int) for d in spec) \
        else spec
    scalla.n_outputs = state["n_outputs"]
    scalla.position_dims = int(state.get("position_dims", 0))  # states before positions: outputs (B, C)
    scalla.subset.flatten_positions = scalla.position_dims > 0
    scalla.input_dtype = getattr(torch, state["input_dtype"]) if "input_dtype" in state else scalla.subset.dtype
    example = state.get("example_input")  # one training input (states before it: zeros of the input shape)
    if example is None:
        example = torch.zeros(1, *scalla.input_shape, dtype=scalla.input_dtype)
    scalla.example_input = place(example, scalla.subset.device, scalla.subset.dtype)
    scalla.surrogate = scalla._build_surrogate(scalla.example_input)
    scalla.surrogate.load_state_dict(state["surrogate"])
    scalla.surrogate.eval()
    scalla.posterior = LatentPosterior.from_state_dict(state["posterior"])
    scalla.prior_precision, scalla.sigma_noise = state["prior_precision"], state["sigma_noise"]
    scalla.train_record = state.get("train_record", {})
