"""Small float64 problems and brute-force dense references for the Laplace tests.

The references avoid the library's own Jacobian code: J comes from
torch.autograd.functional.jacobian of the flat-parameter function, per example.
"""

from __future__ import annotations

import torch
from torch import nn

from posthoc.network.subset import ParameterSubset

DTYPE = torch.float64


def small_mlp(n_in: int = 3, n_hidden: int = 5, n_out: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n_in, n_hidden), nn.Tanh(), nn.Linear(n_hidden, n_hidden), nn.ReLU(),
                         nn.Linear(n_hidden, n_out)).to(DTYPE)


def mlp_data(likelihood: str, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(x (n, 3), y) for :func:`small_mlp`: 3 classes (n,), or regression targets sin(x) + 0.1 noise (n, 3)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=DTYPE)
    if likelihood == "classification":
        return x, torch.randint(0, 3, (n,), generator=g)
    return x, torch.sin(x[:, :3]) + 0.1 * torch.randn(n, 3, generator=g, dtype=DTYPE)


def small_cnn(n_out: int = 3, seed: int = 0) -> nn.Module:
    """Conv(1->2, 3x3, pad 1) - ReLU - MaxPool2 - Conv(2->3, 2x2) - Tanh - Flatten - Linear; inputs (B,1,6,6)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(2, 3, 2),
                         nn.Tanh(), nn.Flatten(), nn.Linear(12, n_out)).to(DTYPE)


def minibatches(subset: ParameterSubset, x: torch.Tensor, y: torch.Tensor, batch: int = 7):
    """The ``batches`` callable a structure's ``fit`` takes: (subset.inputs(x_b), y_b) for slices of ``batch`` rows."""
    def batches():
        for i in range(0, len(x), batch):
            yield subset.inputs(x[i:i + batch]), y[i:i + batch]
    return batches


def random_priors(subset: ParameterSubset) -> dict[str, torch.Tensor]:
    """One prior precision of each kind for ``subset``: "scalar" (1,), "layer" (n_blocks,), "parameter" (P,)."""
    g = torch.Generator().manual_seed(5)
    return {
        "scalar": torch.tensor([0.7], dtype=DTYPE),
        "layer": 0.3 + torch.rand(len(subset.blocks), generator=g, dtype=DTYPE),
        "parameter": 0.3 + torch.rand(subset.n_params, generator=g, dtype=DTYPE),
    }


def dense_jacobians(subset: ParameterSubset, inputs: torch.Tensor) -> torch.Tensor:
    """(B, C, P) by torch.autograd.functional.jacobian, one example at a time."""
    rows = []
    for i in range(inputs.shape[0]):
        rows.append(torch.autograd.functional.jacobian(lambda th, i=i: subset.forward(inputs[i:i + 1], th)[0],
                                                       subset.theta_map))
    return torch.stack(rows)


def model_jacobians(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """J (B, ..., C, P) of ``model(inputs)`` in its trainable parameters (parameters_to_vector order), by
    torch.func.jacrev of the flat-parameter function over the whole batch: no library code involved."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    theta = torch.cat([p.detach().reshape(-1) for p in params.values()])

    def f(flat: torch.Tensor) -> torch.Tensor:
        chunks = dict(zip(params, torch.split(flat, [p.numel() for p in params.values()]), strict=True))
        return torch.func.functional_call(model, {n: c.view_as(params[n]) for n, c in chunks.items()}, (inputs,))

    return torch.func.jacrev(f)(theta)


def output_hessians(outputs: torch.Tensor, likelihood: str) -> torch.Tensor:
    """Gamma_n (B, C, C): softmax Hessian or identity (regression at sigma = 1)."""
    if likelihood == "classification":
        p = torch.softmax(outputs, -1)
        return torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    return torch.eye(outputs.shape[-1], dtype=outputs.dtype).expand(outputs.shape[0], -1, -1)


def dense_ggn(subset: ParameterSubset, inputs: torch.Tensor, likelihood: str) -> torch.Tensor:
    """sum_n J_n^T Gamma_n J_n, (P, P), at sigma = 1."""
    jac = dense_jacobians(subset, inputs)
    with torch.no_grad():
        gamma = output_hessians(subset.forward(inputs), likelihood)
    return torch.einsum("bcp,bcd,bdq->pq", jac, gamma, jac)


def dense_ef(subset: ParameterSubset, inputs: torch.Tensor, targets: torch.Tensor, likelihood: str) -> torch.Tensor:
    """sum_n g_n g_n^T with g_n the gradient of -log p(y_n | f) (regression at sigma = 1)."""
    grads = []
    for i in range(inputs.shape[0]):
        def loss(th: torch.Tensor, i: int = i) -> torch.Tensor:
            f = subset.forward(inputs[i:i + 1], th)
            if likelihood == "classification":
                return nn.functional.cross_entropy(f, targets[i:i + 1], reduction="sum")
            return 0.5 * ((f - targets[i:i + 1]) ** 2).sum()
        grads.append(torch.autograd.functional.jacobian(loss, subset.theta_map))
    g = torch.stack(grads)
    return g.T @ g


def check_logdet_gradient(curvature, prior: torch.Tensor, log_scale: float = 0.4, n_entries: int = 3) -> None:
    """Autograd gradient of curvature.logdet_precision in log prior (first n_entries) and log scale equals a
    five-point central difference (step 1e-4) to 1e-6 relative.

    The stencil's truncation error is h^4/30 f^(5) (~1e-18 here); its round-off is ~1.5 eps |f| / h, which the
    absolute tolerance allows 20x over (a two-point stencil at h = 1e-6 had a round-off floor of ~eps |f| / h = 2e-9
    for |f| ~ 10: tolerances below it passed or failed with the BLAS kernels of the machine).
    """
    log_prior = torch.log(prior).requires_grad_(True)
    log_s = torch.tensor(log_scale, dtype=prior.dtype, requires_grad=True)
    value = curvature.logdet_precision(log_prior.exp(), log_s.exp())
    g_prior, g_scale = torch.autograd.grad(value, (log_prior, log_s))
    h = 1e-4
    atol = 1e-9 + 30 * torch.finfo(prior.dtype).eps * abs(float(value.detach())) / h

    def derivative(f) -> torch.Tensor:
        return (-f(2 * h) + 8 * f(h) - 8 * f(-h) + f(-2 * h)) / (12 * h)

    with torch.no_grad():
        for i in range(min(n_entries, log_prior.numel())):
            step = torch.zeros_like(log_prior)
            step[i] = 1.0
            fd = derivative(lambda t, step=step: curvature.logdet_precision((log_prior + t * step).exp(), log_s.exp()))
            torch.testing.assert_close(g_prior[i], fd, rtol=1e-6, atol=atol)
        fd = derivative(lambda t: curvature.logdet_precision(log_prior.exp(), (log_s + t).exp()))
        torch.testing.assert_close(g_scale, fd, rtol=1e-6, atol=atol)


def linear_gaussian_fiber(n: int = 4, p: int = 10, delta: float = 2.0, sigma: float = 0.3):
    """A ridge-regression linear model f(x) = x^T theta (P > N) at its MAP, float64: the fiber is theta* + null(X).

    Returns (model, X (N, P), y (N, 1), theta* (P,), the projector onto null(X) (P, P)).
    """
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, p, generator=generator, dtype=DTYPE)
    y = torch.randn(n, 1, generator=generator, dtype=DTYPE)
    theta = torch.linalg.solve(x.T @ x / sigma**2 + delta * torch.eye(p, dtype=DTYPE), x.T @ y[:, 0] / sigma**2)
    model = torch.nn.Linear(p, 1, bias=False).to(DTYPE)
    with torch.no_grad():
        model.weight.copy_(theta.reshape(1, p))
    null = torch.eye(p, dtype=DTYPE) - torch.linalg.pinv(x) @ x
    return model, x, y, theta, null


class PairRewardNet(nn.Module):
    """One reward per item: pairs (B, 2, 3) run the net on the (2B, 3) items, logits (B, 2); items (B, 3) give (B, 1)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1)).to(DTYPE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            return self.net(x.reshape(-1, x.shape[-1])).reshape(x.shape[0], 2)
        return self.net(x)


def reward_pairs(n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` pairs (n, 2, 3) and which item is preferred (n,), seeded."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 2, 3, generator=g, dtype=DTYPE), torch.randint(0, 2, (n,), generator=g)
