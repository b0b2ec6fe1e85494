"""Saving and restoring a fitted :class:`posthoc.laplace.Laplace`.

``la.state_dict()`` and ``la.load_state_dict(state)`` call these.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from posthoc.curvature.output_factors import many_classes_default

if TYPE_CHECKING:  # only for annotations: state.py is imported by laplace.py
    from posthoc.laplace.laplace import Laplace

STATE_VERSION = 1


def laplace_state_dict(la: "Laplace") -> dict[str, Any]:
    """Everything that restores the fitted approximation exactly (with the same model weights).

    Raises:
        RuntimeError: ``la`` is not fitted.
    """
    curvature = la._require_fit()
    return {
        "version": STATE_VERSION,
        "likelihood": la.likelihood.value,
        "hessian_structure": la.structure_name,
        "subset_of_weights": la.subset.kind.value,
        "subnetwork_indices": la.subset.indices,
        "curvature_type": la.factors.curvature.value,
        "theta_map": la.subset.theta_map,
        "prior_precision": la.prior_precision,
        "sigma_noise": la.sigma_noise,
        "n_data": la.n_data,
        "n_outputs": la.n_outputs,
        "position_dims": la.position_dims,  # outputs (B, ..., C): posthoc.network.positions
        "input_shape": la.input_shape,
        "last_layer": la.subset.last_layer_state(),
        "loglik_stat": la._loglik_stat,
        "curvature": curvature.state_dict(),
    }


def load_laplace_state(la: "Laplace", state: dict[str, Any]) -> "Laplace":
    """Restore a fitted state into ``la``; its settings and the model's current weights must match the fit's.

    theta* is re-read from the model now, so load the model's checkpoint first. Returns ``la``.

    Raises:
        ValueError: another version, other settings, another subnetwork or last layer, or other weights.
    """
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"unsupported Laplace state version {state.get('version')!r}")
    if la._curvature_default and state.get("n_outputs") is not None:  # the default the fit chose (many classes)
        la.factors = many_classes_default(la.factors, int(state["n_outputs"]))
    mine = {"likelihood": la.likelihood.value, "hessian_structure": la.structure_name,
            "subset_of_weights": la.subset.kind.value, "curvature_type": la.factors.curvature.value}
    for key, value in mine.items():
        if state[key] != value:
            raise ValueError(f"state has {key}={state[key]!r} but this Laplace has {value!r}")
    theirs, ours = state.get("subnetwork_indices"), la.subset.indices
    if ours is not None and (theirs is None or theirs.shape != ours.shape or not torch.equal(theirs.to(ours), ours)):
        raise ValueError("the state was fitted on another subnetwork (its subnetwork_indices differ from this "
                         "Laplace's); build the Laplace with the state's subnetwork_indices")
    if state.get("last_layer") is not None:
        la.subset.load_last_layer_state(state["last_layer"])
    la.subset.capture()  # theta* = the model's weights now
    theta = state["theta_map"].to(la.subset.theta_map)
    if theta.shape != la.subset.theta_map.shape or not torch.equal(theta, la.subset.theta_map):
        raise ValueError("the model's weights differ from those the state was fitted at; load the matching "
                         "model checkpoint first")
    la.input_shape = None if state.get("input_shape") is None else tuple(state["input_shape"])
    la.position_dims = int(state.get("position_dims", 0))
    la.subset.flatten_positions = la.position_dims > 0
    la.structure = la.structure_cls.from_state_dict(la.subset, state["curvature"])
    la.prior_precision = state["prior_precision"]
    la.sigma_noise = state["sigma_noise"]
    la.n_data, la.n_outputs, la._loglik_stat = state["n_data"], state["n_outputs"], state["loglik_stat"]
    return la
