"""More flows of benchmarks/laplace_torch_flows.py: reward modelling, the Kronecker posterior precision, ``loss=``.

Same contract as benchmarks/laplace_torch_flows_cases.py (``flow(lib, data, record)``, nothing names a library):

- ``reward_modeling``: ``likelihood="reward_modeling"`` on Bradley-Terry pairs, all weights and the last layer,
  kron / full / diag, on the reward network written two ways (the pairs flattened into (2B, d) items, or the pair
  axis kept); see :func:`reward_modeling`.

- ``kron_posterior_precision``: ``la.posterior_precision`` of ``hessian_structure="kron"`` (laplace-torch's
  ``KronDecomposed``) on the sinusoid's 1-50-1 network (regression) and the three-class 2-20-20-3 network
  (classification, one prior per parameter tensor): deltas, ``logdet()``, ``to_matrix()``, ``diag(-1)``,
  ``bmm(W, -1)``, ``bmm(W, -0.5)``, ``inv_square_form``, ``* scalar``, ``+ deltas``, the sorted eigenvalue products
  per tensor, ``square_norm`` / ``log_prob``.
- ``gridsearch_loss``: ``optimize_prior_precision(method="gridsearch", val_loader=, loss=, grid_size=)`` with a
  callable loss as laplace-torch documents it (classification ``loss(probs, y)``, regression
  ``loss(f_mu, f_var, y)``), on the full Laplace and on ``hessian_structure="gp"``; then the GP's
  ``functional_samples``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from laplace_torch_flows_cases import FlowData, Library, Record


def _fitted(lib: Library, model: torch.nn.Module, likelihood: str, loader: Any, structure: str, **kwargs: Any) -> Any:
    la = lib.laplace.Laplace(model, likelihood, subset_of_weights="all", hessian_structure=structure, **kwargs)
    la.fit(loader)   # laplace-torch's fit returns None
    return la


def kron_posterior_precision(lib: Library, data: FlowData, record: Record) -> None:
    """laplace-torch's KronDecomposed surface on both libraries' fitted KFAC posteriors (see the module docstring)."""
    cases = (("regression", _fitted(lib, data.model("sin_model"), "regression", data["sin_loader"], "kron",
                                    sigma_noise=0.4, prior_precision=0.7)),
             ("classification", _fitted(lib, data.model("subnet_model"), "classification", data["subnet_loader"],
                                        "kron", prior_precision=torch.tensor([0.5, 1.0, 1.5, 2.0, 2.5, 3.0]))))
    for label, la in cases:
        precision = la.posterior_precision
        w = torch.randn(2, 3, la.n_params, generator=torch.Generator().manual_seed(5))
        record.deterministic(f"{label}: deltas", precision.deltas)
        record.deterministic(f"{label}: logdet()", precision.logdet())
        record.deterministic(f"{label}: to_matrix() ({la.n_params}^2)", precision.to_matrix())
        record.deterministic(f"{label}: diag(-1)", precision.diag(-1))
        record.deterministic(f"{label}: bmm(W) (2x3xP)", precision.bmm(w))
        record.deterministic(f"{label}: bmm(W, -0.5)", precision.bmm(w, exponent=-0.5))
        record.deterministic(f"{label}: inv_square_form(W)", precision.inv_square_form(w))
        record.deterministic(f"{label}: (P * 3).logdet()", (precision * 3.0).logdet())
        record.deterministic(f"{label}: (P + 0.5).logdet()", (precision + torch.tensor(0.5)).logdet())
        products = [torch.outer(*values).flatten() if len(values) == 2 else values[0]
                    for values in precision.eigenvalues]
        record.deterministic(f"{label}: eigenvalue products (sorted per tensor)",
                             torch.cat([p.sort().values for p in products]))
        value = la.mean + 0.05 * w[0, 0]
        record.deterministic(f"{label}: square_norm", la.square_norm(value))
        record.deterministic(f"{label}: log_prob", la.log_prob(value))


def _class_nll(probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return -probs.gather(-1, y.reshape(-1, 1)).log().mean()


def _gaussian_nll(sigma2: float) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    def loss(f_mu: torch.Tensor, f_var: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        var = f_var.reshape(y.shape) + sigma2
        return (0.5 * var.log() + 0.5 * (y - f_mu) ** 2 / var).mean()
    return loss


def gridsearch_loss(lib: Library, data: FlowData, record: Record) -> None:
    """Grid search scored by a callable ``loss`` (laplace-torch's offline form), full and gp; gp samples."""
    la = _fitted(lib, data.model("subnet_model"), "classification", data["subnet_loader"], "full")
    la.optimize_prior_precision(method="gridsearch", val_loader=data["subnet_loader"], loss=_class_nll, grid_size=21)
    record.deterministic("full classification: prior precision", la.prior_precision)
    record.deterministic("full classification: probs (20 x 3)", la(data["subnet_test"]))
    la = _fitted(lib, data.model("sin_model"), "regression", data["sin_loader"], "full", sigma_noise=0.3)
    la.optimize_prior_precision(method="gridsearch", val_loader=data["sin_loader"], loss=_gaussian_nll(0.09),
                                grid_size=21)
    record.deterministic("full regression: prior precision", la.prior_precision)
    gp = lib.laplace.Laplace(data.model("sin_model"), "regression", subset_of_weights="all", hessian_structure="gp",
                             n_subset=60, sigma_noise=0.3, prior_precision=1.0)
    gp.fit(data["sin_loader"])
    gp.optimize_prior_precision(method="gridsearch", pred_type="gp", val_loader=data["sin_loader"],
                                loss=_gaussian_nll(0.09), grid_size=21)
    record.deterministic("gp regression: prior precision", gp.prior_precision)
    f_mu, f_var = gp(data["sin_test"][::50])
    record.deterministic("gp regression: f_var (10)", f_var)
    record.samples("gp: functional_samples (4000 x 10)",
                   gp.functional_samples(data["sin_test"][::50], n_samples=4000,
                                         generator=torch.Generator().manual_seed(2)))


def _first_line(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def _reward_structure(lib: Library, data: FlowData, record: Record, model_key: str, subset: str, name: str) -> Any:
    """One reward Laplace's rows: evidence at delta = 1, tuned prior, ``la(x)`` on items; a failure is a note."""
    structure = name.rsplit(" ", 1)[-1]
    try:
        la = lib.laplace.Laplace(data.model(model_key), likelihood="reward_modeling", subset_of_weights=subset,
                                 hessian_structure=structure)
        la.fit(data["reward_loader"])
        record.deterministic(f"{name}: log marglik at delta=1", la.log_marginal_likelihood())
        la.optimize_prior_precision()
        record.deterministic(f"{name}: prior precision", la.prior_precision)
        mean, var = la(data["reward_test"])
        record.deterministic(f"{name}: reward mean (5)", mean)
        record.deterministic(f"{name}: reward var (5)", var)
        return la
    except Exception as error:  # one structure's failure is its row, the others still run
        record.notes[f"{name}: fails"] = _first_line(error)
        return None


def reward_modeling(lib: Library, data: FlowData, record: Record) -> None:
    """Bradley-Terry pairs: fit, tuned prior, ``la(x)`` on single items (the reward's mean and variance).

    All weights (the documented default structure, kron, then "full" and "diag") and the last layer, on the reward
    network that runs on the (2B, d) items of B pairs (laplace-torch's tests' model), then on the same weights
    written with the pair axis kept ("pair axis": the network on (B, 2, d)). Last layer "full" also gives its
    "nn" reward samples and the pair probabilities ``la(x, fitting=True)``.
    """
    pairs = next(iter(data["reward_loader"]))[0][:5]
    for model_key, label in (("reward_model", ""), ("reward_model_pair_axis", "pair axis ")):
        for subset in ("all", "last_layer"):
            for structure in ("kron", "full", "diag"):
                scope = "" if subset == "all" else "last_layer "
                la = _reward_structure(lib, data, record, model_key, subset, f"{label}{scope}{structure}")
                if la is None or subset == "all" or structure != "full":
                    continue
                record.samples(f"{label}last_layer full: nn reward samples (4000 x 5)",
                               la.predictive_samples(data["reward_test"], pred_type="nn", n_samples=4000,
                                                     generator=torch.Generator().manual_seed(4)))
                try:
                    record.deterministic(f"{label}last_layer full: pair probs fitting=True (5 x 2)",
                                         la(pairs, fitting=True))
                except Exception as error:
                    record.notes[f"{label}last_layer full: la(pairs, fitting=True) fails"] = _first_line(error)


EXTRA_FLOWS: dict[str, Callable[[Library, FlowData, Record], None]] = {
    "reward_modeling": reward_modeling, "kron_posterior_precision": kron_posterior_precision,
    "gridsearch_loss": gridsearch_loss,
}
