"""Run a method's ``predict`` over a DataLoader and join the batches."""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from posthoc.distributed import gather_rows, is_distributed
from posthoc.predictive.base import Predictive
from posthoc.predictive.bernoulli import BernoulliPredictive
from posthoc.predictive.gaussian import GaussianPredictive
from posthoc.predictive.samples import SamplePredictive


def concat(predictives: list[Predictive]) -> Predictive:
    """Join per-batch predictives of one kind along the batch dimension (Gaussians keep their default link)."""
    if not predictives:
        raise ValueError("nothing to concatenate: the loader yielded no batches")
    if all(isinstance(p, BernoulliPredictive) for p in predictives):  # likelihood "binary": join their logits
        return BernoulliPredictive(concat([p.logits for p in predictives if isinstance(p, BernoulliPredictive)]))
    gaussians = [p for p in predictives if isinstance(p, GaussianPredictive)]
    if len(gaussians) == len(predictives):
        links = {p.link_approx for p in gaussians}
        if len(links) > 1:
            raise ValueError(f"cannot concatenate Gaussian predictives with different default links "
                             f"{sorted(link.value for link in links)}: their probs() would differ")
        link = links.pop()  # the joined predictive's probs() is that of its parts (e.g. a Laplace's probit_centred)
        mean = torch.cat([p.mean for p in gaussians])
        factored = [(p.cov_diag, p.cov_factor) for p in gaussians if p.cov_factor is not None and p.cov_diag is not None]
        if len(factored) == len(gaussians) and len({f.shape[-1] for _, f in factored}) == 1:  # F Fᵀ + diag(d) kept
            return GaussianPredictive(mean, var=torch.cat([d for d, _ in factored]),
                                      cov_factor=torch.cat([f for _, f in factored]), link_approx=link)
        if all(p.has_full_cov for p in gaussians):
            return GaussianPredictive(mean, cov=torch.cat([p.cov for p in gaussians]), link_approx=link)
        return GaussianPredictive(mean, var=torch.cat([p.var for p in gaussians]), link_approx=link)
    sampled = [p for p in predictives if isinstance(p, SamplePredictive)]
    if len(sampled) == len(predictives):
        return SamplePredictive(torch.cat([p.samples for p in sampled], dim=1), sigma_noise=sampled[0].sigma_noise)
    raise TypeError("cannot concatenate predictives of different kinds")


def gather(pred: Predictive, what: str = "predictions") -> Predictive:
    """Under torch.distributed, join every rank's predictive along the batch, in rank order (all ranks get it).

    Single process: ``pred`` unchanged. Every rank must hold the same kind of predictive.
    """
    if not is_distributed():
        return pred
    if isinstance(pred, BernoulliPredictive):
        return BernoulliPredictive(gather(pred.logits, what))
    if isinstance(pred, GaussianPredictive):
        mean, link = gather_rows(pred.mean, f"{what} (means)"), pred.link_approx
        if pred.cov_factor is not None and pred.cov_diag is not None:  # every rank's factor has the model's rank R
            return GaussianPredictive(mean, var=gather_rows(pred.cov_diag, f"{what} (variances)"),
                                      cov_factor=gather_rows(pred.cov_factor, f"{what} (covariance factors)"),
                                      link_approx=link)
        if pred.has_full_cov:
            return GaussianPredictive(mean, cov=gather_rows(pred.cov, f"{what} (covariances)"), link_approx=link)
        return GaussianPredictive(mean, var=gather_rows(pred.var, f"{what} (variances)"), link_approx=link)
    if isinstance(pred, SamplePredictive):
        samples = gather_rows(pred.samples.transpose(0, 1).contiguous(), f"{what} (samples)").transpose(0, 1)
        return SamplePredictive(samples, sigma_noise=pred.sigma_noise)
    raise TypeError(f"cannot gather a {type(pred).__name__}")


@torch.no_grad()
def predict_loader(predict: Callable[[torch.Tensor], Predictive], batches: Iterable) -> tuple[Predictive, torch.Tensor]:
    """Apply ``predict`` to the inputs of every (x, y) batch.

    Returns the joined predictive and the concatenated targets. Memory: the
    whole predictive (B, C) or (B, C, C) for all inputs.
    """
    outputs, targets = [], []
    for x, y in batches:
        outputs.append(predict(x))
        targets.append(y)
    return concat(outputs), torch.cat(targets)
