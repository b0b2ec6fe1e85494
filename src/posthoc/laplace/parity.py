"""laplace-torch 0.3's method and property names on top of ``posthoc.Laplace``.

:class:`LaplaceTorchAPI` is a mixin placed before :class:`posthoc.laplace.laplace.Laplace` in the bases. It
adds what ported laplace-torch code calls: ``la(x)`` with laplace-torch's return types (classification: class
probabilities (B, C); regression: the tuple ``(f_mu (B, C), f_var (B, C, C))`` of the function, without
observation noise), ``functional_variance(Js)``, ``functional_samples``, ``predictive_samples``, the posterior's
``posterior_precision`` / ``posterior_covariance`` / ``posterior_scale`` in laplace-torch's per-structure
forms (kron: :class:`posthoc.laplace.kron_decomposed.KronDecomposed`), ``log_prob``, ``sample(n, generator=)`` and the evidence terms (``scatter``, ``log_det_*``).
posthoc's own ``predict(x)`` keeps returning :class:`posthoc.predictive.Predictive` objects.

Everything reads the fitted posterior Lambda = s(sigma) H + diag(delta) of the structure (no copy of it is kept),
so changing ``prior_precision`` or ``sigma_noise`` is seen at once, as in laplace-torch.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.func import jacrev
from torch.utils._pytree import tree_map

from posthoc.laplace.kron_decomposed import KronDecomposed
from posthoc.laplace.predict import PositionPredictive
from posthoc.laplace.prior import per_parameter
from posthoc.laplace.structures.diag import DiagCurvature
from posthoc.laplace.structures.full import FullCurvature
from posthoc.laplace.structures.kron import KronCurvature
from posthoc.laplace.structures.lowrank import LowRankCurvature
from posthoc.likelihood import Likelihood
from posthoc.network.inputs import ModelInputs
from posthoc.network.positions import unflattened_shape
from posthoc.network.subset import SubsetOfWeights, Tail
from posthoc.predictive import links
from posthoc.predictive.base import check_n_samples
from posthoc.predictive.bernoulli import sigmoid_mc, sigmoid_probit
from posthoc.utils.modes import eval_mode

# the pred_type and link_approx values laplace-torch accepts in la(x); "bridge_norm" is its normalised bridge
PRED_TYPES = ("glm", "nn")
LINK_APPROXES = ("probit", "bridge", "mc", "bridge_norm", "probit_centred")


def _choice(value: Any, allowed: tuple[str, ...], name: str) -> str:
    """The string value of an option (a str or a str-valued enum member), or ValueError listing the choices."""
    text = getattr(value, "value", value)
    if not isinstance(text, str) or text not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    return text


def _check_generator(generator: torch.Generator | None, device: torch.device) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if torch.device(generator.device).type != torch.device(device).type:
        raise ValueError(f"generator is on {generator.device}, the posterior on {device}; make it with "
                         f"torch.Generator(device={str(device)!r})")


def conditioned_on_zero_sum(mean: torch.Tensor, cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gaussian N(mean, cov) over logits conditioned on the logits summing to zero.

    With s = cov 1 and t = 1^T cov 1: mean - s (1^T mean) / t and cov - s s^T / t. This is the zero-mean
    correction laplace-torch applies before its Laplace bridge. Args: mean (B, C), cov (B, C, C) (symmetric).
    Returns: (B, C) and (B, C, C). Cost O(B C^2).
    """
    row_sums = cov.sum(-1)  # (B, C)
    total = row_sums.sum(-1, keepdim=True)  # (B, 1)
    mean = mean - row_sums * mean.sum(-1, keepdim=True) / total
    cov = cov - row_sums.unsqueeze(-1) * row_sums.unsqueeze(-2) / total.unsqueeze(-1)
    return mean, cov


def bridge_probs(mean: torch.Tensor, cov: torch.Tensor, normalized: bool) -> torch.Tensor:
    """Class probabilities (B, C) of laplace-torch's Laplace bridge ("bridge") or its normalised form.

    The Gaussian over logits is first conditioned on a zero logit sum (:func:`conditioned_on_zero_sum`).
    ``normalized`` ("bridge_norm") then rescales it so that the mean variance is sqrt(C / 2): mean divided by
    sqrt(m), variances by m, with m = mean(diag(cov)) / sqrt(C / 2). The bridge itself is
    :func:`posthoc.predictive.links.laplace_bridge` without its own projection (computed in log space).
    Args: mean (B, C), cov (B, C, C). Cost O(B C^2).
    """
    mean, cov = conditioned_on_zero_sum(mean, cov)
    var = torch.diagonal(cov, dim1=-2, dim2=-1)
    if normalized:
        n_classes = mean.shape[-1]
        level = var.mean(-1, keepdim=True) / math.sqrt(n_classes / 2)
        mean, var = mean / level.sqrt(), var / level
    return links.laplace_bridge(mean, var, correction=False)


class LaplaceTorchAPI:
    """laplace-torch 0.3's names on a posthoc Laplace: mix in before ``Laplace`` (``class L(LaplaceTorchAPI, Laplace)``).

    Reads the host's ``subset``, ``likelihood``, ``prior_precision``, ``sigma_noise``, ``factors``, ``seed``,
    ``predict``, ``_fitted_posterior``, ``_model_inputs`` and ``_naming_input_shape``. Costs below are for P
    covered parameters, B inputs and C outputs.
    """

    subset: Any
    likelihood: Likelihood
    # la(x)'s link when none is given: posthoc's centred probit (issue 17, benchmarks/results/defaults.md);
    # posthoc.compat.laplace sets laplace-torch's "probit"
    default_link_approx: str = "probit_centred"
    factors: Any
    seed: int
    structure_name: str
    prior_precision: torch.Tensor
    sigma_noise: torch.Tensor

    # ----------------------------------------------------------------- the posterior's parts
    def _parts(self, action: str) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """(fitted structure, prior delta, curvature scale s), after checking the weights did not change."""
        curvature = self._fitted_posterior(action)  # type: ignore[attr-defined]
        return curvature, self.prior_precision, self.factors.scale(self.sigma_noise)

    def _unsupported(self, name: str, structures: str) -> NotImplementedError:
        return NotImplementedError(
            f"{name} is not available for hessian_structure={self.structure_name!r} (laplace-torch defines it for "
            f"{structures}); use predict(x), posterior_variance() or the fitted structure's dense_precision(prior, "
            "scale)")

    @property
    def mean(self) -> torch.Tensor:
        """theta* (P,), the posterior mean: the covered weights at ``fit``."""
        return self.subset.theta_map

    @property
    def prior_mean(self) -> torch.Tensor:
        """The prior mean, 0 (a 0-d tensor): posthoc's prior is N(0, diag(delta)^-1)."""
        return torch.zeros((), dtype=self.subset.dtype, device=self.subset.device)

    @property
    def prior_precision_diag(self) -> torch.Tensor:
        """Delta expanded to one value per covered parameter, (P,)."""
        return per_parameter(self.prior_precision, self.subset)

    @property
    def scatter(self) -> torch.Tensor:
        """(theta* - mu_0)^T diag(delta) (theta* - mu_0), 0-d (mu_0 = 0). Cost O(P)."""
        centred = self.mean - self.prior_mean
        return (centred * self.prior_precision_diag * centred).sum()

    @property
    def log_det_prior_precision(self) -> torch.Tensor:
        """Log det diag(delta) = sum_p log delta_p, 0-d. Cost O(P)."""
        return self.prior_precision_diag.log().sum()

    @property
    def log_det_posterior_precision(self) -> torch.Tensor:
        """Log det Lambda, 0-d, the structure's own log-determinant (no dense matrix for diag/kron/lowrank).

        Low rank with ``complement="omit"``: log det of the precision on the kept span only (the left-out directions
        are held at theta*), the term its evidence uses; ``complement="prior"`` gives laplace-torch's log det.
        """
        curvature, prior, scale = self._parts("read the posterior")
        return curvature.logdet_precision(prior, scale)

    @property
    def log_det_ratio(self) -> torch.Tensor:
        """Log det Lambda - log det diag(delta), 0-d."""
        return self.log_det_posterior_precision - self.log_det_prior_precision

    @property
    def log_likelihood(self) -> torch.Tensor:
        """Log p(D | theta*) at the current sigma_noise, 0-d: the evidence plus its Occam terms (no refit)."""
        return self.log_marginal_likelihood() + 0.5 * (self.log_det_ratio + self.scatter)  # type: ignore[attr-defined]

    @property
    def posterior_precision(self) -> Any:
        """Lambda in laplace-torch's form for the structure.

        full: the dense (P, P) matrix; diag: its diagonal (P,); lowrank: ((U (P, k), s * lam (k,)), delta (P,))
        with Lambda = U diag(s lam) U^T + diag(delta); kron/ekfac: a :class:`KronDecomposed` (laplace-torch's
        surface: eigenvectors, eigenvalues, deltas, logdet, bmm, diag, to_matrix) on the fitted structure, O(1).

        Raises:
            NotImplementedError: plug-in structures.
        """
        curvature, prior, scale = self._parts("read the posterior precision")
        if isinstance(curvature, KronCurvature):
            return KronDecomposed.from_structure(curvature, prior, scale)
        if isinstance(curvature, FullCurvature):
            return curvature.dense_precision(prior, scale)
        if isinstance(curvature, DiagCurvature):
            return scale * curvature.diagonal + per_parameter(prior, self.subset)
        if isinstance(curvature, LowRankCurvature):
            return (curvature.eigenvectors, scale * curvature.eigenvalues), per_parameter(prior, self.subset)
        raise self._unsupported("posterior_precision", "'full', 'diag', 'kron' and 'lowrank'")

    @property
    def posterior_scale(self) -> torch.Tensor:
        """A square root of Lambda^-1: full: the lower-triangular L (P, P) with L L^T = Lambda^-1; diag: (P,).

        Cost: full O(P^3) (two Cholesky factorisations); diag O(P).

        Raises:
            NotImplementedError: other structures.
        """
        curvature, prior, scale = self._parts("read the posterior scale")
        if isinstance(curvature, FullCurvature):
            return torch.linalg.cholesky(self.posterior_covariance)
        if isinstance(curvature, DiagCurvature):
            return torch.rsqrt(self.posterior_precision)
        raise self._unsupported("posterior_scale", "'full' and 'diag'")

    @property
    def posterior_covariance(self) -> torch.Tensor:
        """Lambda^-1 (P, P), full structure only (diag: ``posterior_variance()``). Cost O(P^3).

        Raises:
            NotImplementedError: other structures.
        """
        curvature, prior, scale = self._parts("read the posterior covariance")
        if not isinstance(curvature, FullCurvature):
            raise self._unsupported("posterior_covariance", "'full'")
        return torch.cholesky_inverse(torch.linalg.cholesky(curvature.dense_precision(prior, scale)))

    def _solve(self, rhs: torch.Tensor) -> torch.Tensor:
        """Lambda^-1 rhs for rhs (P, K). diag: O(PK); kron/ekfac through the eigenbases; full/lowrank: O(P^3)."""
        curvature, prior, scale = self._parts("read the posterior")
        return curvature.solve(rhs, prior, scale)

    def _check_jacobians(self, Js: torch.Tensor) -> None:  # noqa: N803 (laplace-torch's argument name)
        if not isinstance(Js, torch.Tensor) or Js.ndim != 3 or Js.shape[-1] != self.subset.n_params:
            shape = tuple(Js.shape) if isinstance(Js, torch.Tensor) else type(Js).__name__
            raise ValueError(f"Js must be Jacobians of shape (B, C, {self.subset.n_params}) (outputs by the covered "
                             f"parameters), got {shape}")

    def functional_variance(self, Js: torch.Tensor) -> torch.Tensor:  # noqa: N803
        """J Lambda^-1 J^T per input: Js (B, C, P) -> (B, C, C).

        Cost: diag O(B C^2 P); kron/ekfac O(B C Σ_l D_out D_in (D_out + D_in)); full/lowrank O(P^3 + B C P^2).
        """
        self._check_jacobians(Js)
        batch, n_out, n_params = Js.shape
        solved = self._solve(Js.reshape(batch * n_out, n_params).T).T.reshape(batch, n_out, n_params)
        return torch.einsum("bcp,bkp->bck", Js, solved)

    def functional_covariance(self, Js: torch.Tensor) -> torch.Tensor:  # noqa: N803
        """The joint J Lambda^-1 J^T over the batch: Js (B, C, P) -> (B*C, B*C), rows input-major. Cost as above."""
        self._check_jacobians(Js)
        flat = Js.reshape(-1, Js.shape[-1])
        return flat @ self._solve(flat.T)

    def square_norm(self, value: torch.Tensor) -> torch.Tensor:
        """(value - theta*)^T Lambda (value - theta*) for value (P,) -> 0-d or (N, P) -> (N,).

        Cost: diag O(NP); lowrank O(NPk); kron/ekfac O(N Σ_l D_out D_in (D_out + D_in)); full O(P^2) memory.
        """
        curvature, prior, scale = self._parts("evaluate the posterior density")
        if not isinstance(value, torch.Tensor) or value.shape[-1] != self.subset.n_params or value.ndim > 2:
            raise ValueError(f"value must be a parameter vector ({self.subset.n_params},) or a batch of them "
                             f"(N, {self.subset.n_params})")
        delta = value.to(self.subset.dtype) - self.mean
        if isinstance(curvature, DiagCurvature):
            return (delta**2 * self.posterior_precision).sum(-1)
        if isinstance(curvature, LowRankCurvature):
            projected = delta @ curvature.eigenvectors
            return (projected**2 * scale * curvature.eigenvalues).sum(-1) + (delta**2 * self.prior_precision_diag).sum(-1)
        if isinstance(curvature, KronCurvature):
            return (delta * KronDecomposed.from_structure(curvature, prior, scale).bmm(delta, exponent=1)).sum(-1)
        return ((delta @ curvature.dense_precision(prior, scale)) * delta).sum(-1)

    def log_prob(self, value: torch.Tensor, normalized: bool = True) -> torch.Tensor:
        """Log N(value; theta*, Lambda^-1) for value (P,) -> 0-d or (N, P) -> (N,).

        ``normalized=False`` gives only the term that depends on value, -square_norm / 2.
        """
        quadratic = -0.5 * self.square_norm(value)
        if not normalized:
            return quadratic
        return quadratic - 0.5 * self.subset.n_params * math.log(2 * math.pi) + 0.5 * self.log_det_posterior_precision

    # ----------------------------------------------------------------- sampling
    def sample(self, n_samples: int = 100, generator: torch.Generator | None = None,
               seed: int | None = None) -> torch.Tensor:
        """Parameter samples theta ~ N(theta*, Lambda^-1): (n_samples, P).

        ``generator`` (laplace-torch) draws from the given torch.Generator; otherwise ``seed`` (posthoc) or the
        Laplace's ``seed`` seeds a fresh one, so repeated calls give the same samples. Cost: the structure's
        sampler (full: O(P^3 + n P^2) per call; diag: O(n P)).

        Raises:
            RuntimeError: not fitted, or the weights changed since fit. ValueError: both generator and seed.
        """
        if generator is not None and seed is not None:
            raise ValueError("give generator= or seed=, not both")
        _check_generator(generator, self.subset.device)
        check_n_samples(n_samples)
        curvature, prior, scale = self._parts("sample")
        self._warn_roundoff(curvature, prior, scale)  # type: ignore[attr-defined]
        if generator is None:
            generator = torch.Generator().manual_seed(self.seed if seed is None else seed)
        offsets = curvature.sample(n_samples, prior, scale, generator)
        return self.subset.theta_map + offsets.detach()

    def _generator(self, generator: torch.Generator | None) -> torch.Generator:
        _check_generator(generator, self.subset.device)
        return generator if generator is not None else links.make_generator(self.seed, self.subset.device)

    def _jacobians(self, x: ModelInputs, differentiable: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Js (B, C, P) of the covered function at theta* and its outputs f (B, C). Cost: C backward passes per input.

        ``differentiable``: both stay differentiable in x (``enable_backprop``), else they are detached.
        """
        self._fitted_posterior("predict")  # type: ignore[attr-defined]
        x = self._model_inputs(x)  # type: ignore[attr-defined]
        with eval_mode(self.subset.model), self._naming_input_shape(x), torch.enable_grad():  # type: ignore[attr-defined]
            inputs = self._differentiable_inputs(x) if differentiable else self.subset.inputs(x)
            theta = self.subset.theta_map
            jac = jacrev(lambda th: self.subset.forward(inputs, th))(theta)
            if differentiable:
                return jac, self.subset.forward(inputs, theta)
            with torch.no_grad():
                outputs = self.subset.forward(inputs, theta)
        return jac.detach(), outputs.detach()

    def _differentiable_inputs(self, x: ModelInputs) -> ModelInputs:
        """The covered function's inputs, differentiable in x: a last layer's features keep their graph.

        (``subset.inputs`` detaches them.) Cost: one forward pass.

        Raises:
            RuntimeError: the last layer ran other than once.
        """
        subset = self.subset
        if subset.kind is not SubsetOfWeights.LAST_LAYER or subset.tail is Tail.RERUN:
            return subset.inputs(x)
        captured: list[torch.Tensor] = []
        handle = subset.module.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
        try:
            subset.call(x)
        finally:
            handle.remove()
        if len(captured) != 1:
            raise RuntimeError(f"the last layer ran {len(captured)} times in this forward pass; the last-layer "
                               "Laplace needs a layer applied once")
        return captured[0]

    def _nn_functional_samples(self, x: ModelInputs, n_samples: int,
                               generator: torch.Generator | None) -> torch.Tensor:
        """f(x; theta_s) for weight samples theta_s: (n_samples, B, C)."""
        thetas = self.sample(n_samples, generator=self._generator(generator))
        x = self._model_inputs(x)  # type: ignore[attr-defined]
        with eval_mode(self.subset.model), self._naming_input_shape(x), torch.no_grad():  # type: ignore[attr-defined]
            inputs = self.subset.inputs(x)
            samples = torch.stack([self.subset.forward(inputs, theta) for theta in thetas])
            if self.subset.flatten_positions:  # outputs with positions: (n_samples, B, ..., C)
                return samples.reshape(n_samples, *unflattened_shape(self.subset, inputs))
            return samples

    def functional_samples(self, x: ModelInputs, pred_type: str = "glm", n_samples: int = 100,
                           diagonal_output: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """Samples of the function f(x): (n_samples, B, C).

        "glm": from N(f(x; theta*), J Lambda^-1 J^T) (the output covariance, or its diagonal with
        ``diagonal_output``); "nn": f(x; theta_s) with theta_s from the posterior. Without ``generator`` the
        Laplace's ``seed`` seeds them. Cost: glm one predict and O(n B C^2); nn n forward passes.
        """
        kind = _choice(pred_type, PRED_TYPES, "pred_type")
        if kind == "nn":
            return self._nn_functional_samples(x, n_samples, generator)
        pred = self.predict(x, pred_type="glm")  # type: ignore[attr-defined]
        rows = pred.rows if isinstance(pred, PositionPredictive) else pred  # positions: sampled as (B·L, C) rows
        cov = rows.var if diagonal_output else rows.cov
        samples = links.sample_gaussian(rows.mean, cov, n_samples, self._generator(generator))
        return samples.reshape(n_samples, *pred.mean.shape)

    def predictive_samples(self, x: ModelInputs, pred_type: str = "glm", n_samples: int = 100,
                           diagonal_output: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """:meth:`functional_samples` through the inverse link: softmax (binary: sigmoid), (n_samples, B, C)."""
        samples = self.functional_samples(x, pred_type, n_samples, diagonal_output, generator)
        if self.likelihood is Likelihood.BINARY:
            return torch.sigmoid(samples)
        return samples if self._regression_outputs(fitting=False) else torch.softmax(samples, dim=-1)

    def _regression_outputs(self, fitting: bool) -> bool:
        """Whether ``la(x)`` gives ``(f_mu, f_var)``: regression, or reward modelling (``reward_modeling``) unless fitting.

        laplace-torch's "reward_modeling" fits with the classification likelihood (pairs of items give two logits)
        and predicts the reward of single items as a regression output.
        """
        if getattr(self, "reward_modeling", False):
            return not fitting
        return self.likelihood is Likelihood.REGRESSION

    # ----------------------------------------------------------------- la(x)
    def __call__(self, x: ModelInputs, pred_type: str = "glm", joint: bool = False, link_approx: str | None = None,
                 n_samples: int = 100, diagonal_output: bool = False, generator: torch.Generator | None = None,
                 fitting: bool = False, *, seed: int | None = None, **model_kwargs: Any) -> Any:
        """The predictive for inputs x (B, ...) (the training loader's kind of x) with laplace-torch's return types.

        Classification: class probabilities (B, C). "glm" with ``link_approx`` (default None:
        ``default_link_approx``, "probit_centred" on posthoc's Laplace, laplace-torch's "probit" on
        :mod:`posthoc.compat.laplace`'s), "probit_centred", "probit", "bridge", "bridge_norm"
        (laplace-torch's Laplace bridge, without and with its normalisation) or "mc" (``n_samples`` draws of
        the logits, their diagonal with ``diagonal_output``); "nn" needs "mc" and averages softmax over
        ``n_samples`` weight samples. Regression: "glm": ``(f_mu (B, C), f_var (B, C, C))`` (f_var (B, C) with
        ``diagonal_output``), the distribution of the function WITHOUT observation noise (add
        ``la.sigma_noise**2`` for y); ``joint=True``: ``(f_mu (B*C,), f_cov (B*C, B*C))`` over the whole batch;
        "nn": the sample mean and variance (B, C) of f(x; theta_s). Sampling uses ``generator``, else ``seed``,
        else the Laplace's seed. ``fitting``: with reward modelling, the classification outputs of fitting instead of
        the regression ones (see :meth:`_regression_outputs`). posthoc's ``predict(x)`` returns the Predictive objects instead. With ``enable_backprop`` (an attribute,
        see :class:`posthoc.compat.laplace.Laplace`) the "glm" outputs stay differentiable in x (Jacobians by
        ``torch.func.jacrev``; the covariance by :meth:`functional_variance`), for Bayesian optimisation.

        Raises:
            ValueError: unknown options, "nn" with a link other than "mc", ``generator`` and ``seed`` together.
            TypeError: ``joint`` or ``diagonal_output`` not a bool (e.g. positional arguments in the old order
                ``la(x, pred_type, link_approx, ...)``: pass them by name); model keyword arguments.
        """
        kind = _choice(pred_type, PRED_TYPES, "pred_type")
        link = _choice(self.default_link_approx if link_approx is None else link_approx, LINK_APPROXES, "link_approx")
        for name, flag in (("joint", joint), ("diagonal_output", diagonal_output), ("fitting", fitting)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {flag!r}; la(x, pred_type, joint, link_approx, ...) "
                                "follows laplace-torch's argument order: pass the options by name")
        if model_kwargs:
            raise TypeError(f"model keyword arguments {sorted(model_kwargs)} are not supported: the covered "
                            "function is called with x only")
        if kind == "nn" and link != "mc":
            raise ValueError("pred_type='nn' supports link_approx='mc' only (as in laplace-torch)")
        if generator is not None and seed is not None:
            raise ValueError("give generator= or seed=, not both")
        if seed is not None:
            generator = links.make_generator(seed, self.subset.device)
        regression = self._regression_outputs(fitting)
        if kind == "nn":
            samples = self._nn_functional_samples(x, n_samples, generator)
            if regression:
                return samples.mean(0), samples.var(0)
            if self.likelihood is Likelihood.BINARY:
                return torch.sigmoid(samples).mean(0)
            return torch.softmax(samples, dim=-1).mean(0)
        backprop = bool(getattr(self, "enable_backprop", False))
        if backprop and self.subset.flatten_positions:
            raise NotImplementedError("enable_backprop with outputs with positions (B, ..., C) is not supported; "
                                      "set la.enable_backprop = False")
        if regression and joint:
            js, f_mu = self._jacobians(x, differentiable=backprop)
            return f_mu.reshape(-1), self.functional_covariance(js)
        if backprop:  # J Lambda^-1 J^T from Jacobians that stay differentiable in x
            js, mean = self._jacobians(x, differentiable=True)
            cov = self.functional_variance(js)
        else:
            pred = self.predict(x, pred_type="glm")  # type: ignore[attr-defined]
            mean, cov = pred.mean, pred.cov
            if isinstance(pred, PositionPredictive):  # outputs (B, ..., C): the links see the (B·L, C) positions
                rows = self._glm_outputs(pred.rows.mean, pred.rows.cov, regression, link, diagonal_output, n_samples,
                                         generator)
                return tree_map(lambda t: t.reshape(*pred.shape[:-1], *t.shape[1:]), rows)
        return self._glm_outputs(mean, cov, regression, link, diagonal_output, n_samples, generator)

    def _glm_outputs(self, mean: torch.Tensor, cov: torch.Tensor, regression: bool, link: str, diagonal_output: bool,
                     n_samples: int, generator: torch.Generator | None) -> Any:
        """la(x)'s glm result from mean (B, C) and cov (B, C, C): (mean, cov or var) for regression, else probs."""
        if regression:
            return mean, (torch.diagonal(cov, dim1=-2, dim2=-1) if diagonal_output else cov)
        if self.likelihood is Likelihood.BINARY:  # P(y_k = 1) per output (posthoc.predictive.bernoulli)
            if link not in ("probit", "mc"):
                raise ValueError(f"link_approx={link!r} is a softmax link; likelihood='binary' supports 'probit' "
                                 "(MacKay's sigmoid approximation, the default) or 'mc'")
            if link == "probit":
                return sigmoid_probit(mean, cov)
            return sigmoid_mc(mean, torch.diagonal(cov, dim1=-2, dim2=-1) if diagonal_output else cov, n_samples,
                              self._generator(generator))
        if link == "probit":
            return links.probit(mean, cov)
        if link == "probit_centred":  # posthoc's: probit after removing the all-logits shift (see links)
            return links.probit_centred(mean, cov)
        if link in ("bridge", "bridge_norm"):
            return bridge_probs(mean, cov, normalized=link == "bridge_norm")
        cov_or_var = torch.diagonal(cov, dim1=-2, dim2=-1) if diagonal_output else cov
        return links.mc_probs(mean, cov_or_var, n_samples, self._generator(generator))

    def predictive(self, x: ModelInputs, pred_type: str = "glm", link_approx: str | None = None,
                   n_samples: int = 100) -> Any:
        """laplace-torch's alias of ``la(x, pred_type=..., link_approx=..., n_samples=...)``."""
        return self(x, pred_type=pred_type, link_approx=link_approx, n_samples=n_samples)
