"""Monte-Carlo references for the streamlined tests: weight samples pushed through the network,
vectorised with torch.func (functional_call + vmap), in float64."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

N_SAMPLES = 20_000
CHUNK = 2_000


@dataclass
class MCMoments:
    mean: torch.Tensor  # (B, C)
    var: torch.Tensor  # (B, C)
    var_se: torch.Tensor  # (B, C) standard error of var (from the sample fourth moment)
    total_var_se_rel: float  # relative standard error of var.sum()


def mc_moments(model: nn.Module, x: torch.Tensor, sample_params: Callable[[int, torch.Generator], dict],
               input_std: float = 0.0, n_samples: int = N_SAMPLES, seed: int = 0) -> MCMoments:
    """Moments of model(x + input noise; θ_s) over S posterior samples.

    ``sample_params(n, generator)`` returns a dict name -> (n, *shape) of parameter samples
    (names absent stay at the model's values). Statistics are accumulated chunk by chunk.
    """
    generator = torch.Generator().manual_seed(seed)
    buffers = dict(model.named_buffers())
    fixed = {n: p.detach() for n, p in model.named_parameters()}
    outputs = []
    for start in range(0, n_samples, CHUNK):
        n = min(CHUNK, n_samples - start)
        sampled = sample_params(n, generator)
        if x.is_floating_point():
            noise = torch.randn(n, *x.shape, generator=generator, dtype=x.dtype) * input_std
        else:  # integer ids (token models): no input noise
            noise = torch.zeros(n, dtype=torch.float64)

        def one(params, eps):
            return functional_call(model, {**fixed, **params, **buffers}, (x + eps if x.is_floating_point() else x,))

        outputs.append(vmap(one)(sampled, noise))
    out = torch.cat(outputs)  # (S, B, C)
    mean = out.mean(0)
    centred = out - mean
    sq = centred.square()
    var = sq.mean(0) * n_samples / (n_samples - 1)
    var_se = ((sq.square().mean(0) - var.square()).clamp_min(0) / n_samples).sqrt()
    total = sq.sum((1, 2))
    total_se_rel = float(total.std() / math.sqrt(n_samples) / total.mean())
    return MCMoments(mean, var, var_se, total_se_rel)


def laplace_sampler(la) -> Callable[[int, torch.Generator], dict]:
    """Samples θ ~ N(θ*, Λ⁻¹) of a Laplace over all weights, as parameter dicts."""
    def sample(n: int, generator: torch.Generator) -> dict:
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        thetas = la.sample(n, seed=seed)
        return {name: thetas[:, block.slice].reshape(n, *block.shape)
                for name, block in ((b.name, b) for b in la.subset.blocks)}
    return sample


def mean_field_sampler(model: nn.Module, variances: dict[str, torch.Tensor]) -> Callable:
    params = dict(model.named_parameters())

    def sample(n: int, generator: torch.Generator) -> dict:
        return {name: params[name].detach() + var.sqrt() * torch.randn(n, *var.shape, generator=generator,
                                                                       dtype=var.dtype)
                for name, var in variances.items()}
    return sample


def total_ratio(var: torch.Tensor, reference: MCMoments) -> float:
    """Σ var / Σ var_MC over all examples and outputs."""
    return float(var.sum() / reference.var.sum())


def assert_input_sandwich(pred, model: nn.Module, x: torch.Tensor, input_var: torch.Tensor, mode: str) -> None:
    """The propagated input noise equals the exact J diag(input_var) Jᵀ per example (its diagonal in "diagonal" mode),
    and the mean equals model(x)."""
    torch.testing.assert_close(pred.mean, model(x), rtol=0, atol=1e-12)
    for b in range(x.shape[0]):
        jac = jacrev(model)(x[b:b + 1]).reshape(pred.mean.shape[1], -1)
        expected = (jac * input_var[b].reshape(1, -1)) @ jac.T
        got = pred.cov[b] if mode == "full" else pred.var[b]
        torch.testing.assert_close(got, expected if mode == "full" else torch.diagonal(expected),
                                   rtol=1e-10, atol=1e-12)
