"""More flows of benchmarks/laplace_torch_flows.py: the Kronecker posterior precision and the grid search with ``loss=``.

Same contract as benchmarks/laplace_torch_flows_cases.py (``flow(lib, data, record)``, nothing names a library):

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


EXTRA_FLOWS: dict[str, Callable[[Library, FlowData, Record], None]] = {
    "kron_posterior_precision": kron_posterior_precision, "gridsearch_loss": gridsearch_loss,
}
