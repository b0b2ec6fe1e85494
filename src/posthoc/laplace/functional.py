"""The function-space (GP) linearised Laplace on a data subset: laplace-torch's ``FunctionalLaplace``.

The linearised network f(x; theta) ~ f(x; theta*) + J(x) (theta - theta*) with the prior N(mu_0, delta^-1 I) is
a GP with the kernel k(x, x') = J(x) J(x')^T / delta (the empirical NTK). On M training points chosen at random
(laplace-torch's subset of data, ``n_subset``: numpy ``default_rng(seed).choice(N, M, replace=False)``) the
kernel's prior variance is (M / N) / delta, and with the output Hessians Lambda_m of -log p(y_m | f) (times
1 / (sigma^2 T)) the predictive covariance at test inputs is

    Sigma(x*) = K** - K*M (K_MM + Lambda^-1)^-1 KM*,

laplace-torch's form, in which Lambda keeps only its diagonal ("diag", the default; a zero entry becomes the
noise variance 10, as there). ``output_hessian="full"`` keeps every Lambda_m (C, C) through its factor S S^T
= Lambda (Sigma = K** - K*M S (I + S^T K_MM S)^-1 S^T KM*): with M = N this is exactly
:func:`posthoc.laplace.exact_lla` and the weight-space glm predictive of the full-GGN Laplace. For regression
Lambda = I / sigma^2 and both forms coincide. ``independent_outputs`` keeps the kernel's diagonal over outputs
(one M x M GP per output). Everything is recomputed from the stored Jacobians J_M (M, C, P) for the current
hyperparameters: O((MC)^3) per call, so M of a few hundred to a few thousand. Batches and inputs may be
tensors, tuples or mappings (Hugging Face style, read with ``dict_key_x`` / ``dict_key_y`` as in
:class:`posthoc.Laplace`). The prior precision is tuned by the evidence or by laplace-torch's grid search on
validation data (:mod:`posthoc.laplace.parity_tuning`). See docs/laplace.md.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn
from torch.func import jacrev
from torch.utils.data import default_collate

from posthoc.curvature.jacobians import per_example_jacobians
from posthoc.curvature.output_factors import CurvatureType, OutputFactors
from posthoc.laplace.parity import LINK_APPROXES, _choice, bridge_probs
from posthoc.laplace.parity_tuning import gridsearch_with_loss, laplace_torch_grid, validation_nll
from posthoc.likelihood import Likelihood, check_supported
from posthoc.network.batches import prediction_inputs, split_batch
from posthoc.network.inputs import MappingCall, ModelCall, ModelInputs, as_model_inputs, place
from posthoc.network.subset import ParameterSubset
from posthoc.predictive import GaussianPredictive, links
from posthoc.predictive.tuning import PriorOptimization, maximise_evidence
from posthoc.utils.checks import check_choice, check_positive_int
from posthoc.utils.modes import eval_mode

OUTPUT_HESSIANS = ("diag", "full")
_SCATTER_EPS = 1e-5  # laplace-torch's jitter of the classification scatter term


class FunctionalLaplace:
    """The GP form of the linearised Laplace on ``n_subset`` training points (laplace-torch's arguments).

    Args:
        model: the trained network (all its trainable parameters are covered), tensor inputs.
        likelihood: "classification" or "regression".
        n_subset: M, the number of training points of the GP (at most N).
        sigma_noise: the observation noise (regression).
        prior_precision: delta, a scalar (the GP needs an isotropic prior).
        prior_mean: mu_0, a scalar or one value per parameter (enters the scatter's mean, fixed at fit).
        temperature: T > 0; the output Hessians are divided by T.
        independent_outputs: one GP per output (the kernel's diagonal over outputs).
        seed: seeds the choice of the subset.
        output_hessian: "diag" (laplace-torch) or "full" (the exact softmax Hessian; see the module docstring).
        dict_key_x: in mapping batches, the entry that gives the batch size (laplace-torch's default "input_ids").
        dict_key_y: in mapping batches, the target (default "labels"); the model gets the other entries.
        mapping_call: how a mapping input reaches the model: "auto" (from ``model.forward``'s signature),
            "kwargs" (``model(**x)``) or "argument" (``model(x)``, laplace-torch's).
        enable_backprop: the predictive's mean and covariance stay differentiable in x (Bayesian optimisation).

    Raises:
        ValueError: invalid options, a non-scalar prior precision.
    """

    def __init__(self, model: nn.Module, likelihood: Likelihood | str, n_subset: int,
                 sigma_noise: float | torch.Tensor = 1.0, prior_precision: float | torch.Tensor = 1.0,
                 prior_mean: float | torch.Tensor = 0.0, temperature: float = 1.0,
                 independent_outputs: bool = False, seed: int = 0, output_hessian: str = "diag", *,
                 dict_key_x: str = "input_ids", dict_key_y: str = "labels",
                 mapping_call: MappingCall | str = MappingCall.AUTO, enable_backprop: bool = False) -> None:
        self.model, self.enable_backprop = model, bool(enable_backprop)
        self.dict_key_x, self.dict_key_y = dict_key_x, dict_key_y
        self.call = ModelCall(model, mapping_call)
        self.likelihood = check_supported(check_choice(likelihood, Likelihood, "likelihood"), (Likelihood.CLASSIFICATION, Likelihood.REGRESSION),
                                          "FunctionalLaplace")
        self.n_subset = check_positive_int(n_subset, "n_subset")
        self.subset = ParameterSubset(model, "all", model_call=self.call)
        self.dtype, self.device = self.subset.dtype, self.subset.device
        if not (isinstance(temperature, float | int) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        self.temperature = float(temperature)
        self.independent_outputs = bool(independent_outputs)
        self.output_hessian = _choice(output_hessian, OUTPUT_HESSIANS, "output_hessian")
        if self.independent_outputs and self.output_hessian == "full":
            raise ValueError("independent_outputs=True keeps the diagonal over outputs: use output_hessian='diag'")
        self.seed = int(seed)
        self.sigma_noise = sigma_noise
        self.prior_precision = prior_precision
        mean = torch.as_tensor(prior_mean, dtype=self.dtype, device=self.device).detach()
        if mean.numel() not in (1, self.subset.n_params):
            raise ValueError(f"prior_mean must be a scalar or have one entry per parameter ({self.subset.n_params})")
        self.prior_mean = mean.reshape(()) if mean.numel() == 1 else mean.reshape(-1)
        self.n_data = 0
        self.n_outputs: int | None = None
        self.indices: torch.Tensor | None = None  # the subset's positions in train_loader.dataset, (M,)
        self._jac: torch.Tensor | None = None  # J_M (M, C, P)

    # ----------------------------------------------------------------- hyperparameters
    @property
    def prior_precision(self) -> torch.Tensor:
        """Delta, (1,)."""
        return self._prior_precision

    @prior_precision.setter
    def prior_precision(self, value: float | torch.Tensor) -> None:
        value = torch.as_tensor(value, dtype=self.dtype, device=self.device)
        if value.numel() != 1 or not bool(torch.isfinite(value).all()) or float(value) <= 0:
            raise ValueError("FunctionalLaplace needs one finite prior precision > 0 (an isotropic prior), got "
                             f"shape {tuple(value.shape)}")
        self._prior_precision = value.reshape(1)

    @property
    def sigma_noise(self) -> torch.Tensor:
        """Sigma, 0-d (1 for classification)."""
        return self._sigma_noise

    @sigma_noise.setter
    def sigma_noise(self, value: float | torch.Tensor) -> None:
        value = torch.as_tensor(value, dtype=self.dtype, device=self.device).reshape(())
        if not bool(torch.isfinite(value)) or float(value) <= 0:
            raise ValueError(f"sigma_noise must be a finite number > 0, got {float(value)}")
        if self.likelihood is Likelihood.CLASSIFICATION and float(value) != 1.0:
            raise ValueError("sigma_noise must be 1 for classification")
        self._sigma_noise = value

    @property
    def gp_kernel_prior_variance(self) -> torch.Tensor:
        """(M / N) / delta, (1,): the prior variance of the subset's kernel."""
        return (self.n_subset / max(self.n_data, 1)) / self.prior_precision

    @property
    def _h_factor(self) -> torch.Tensor:
        return 1.0 / (self.sigma_noise**2 * self.temperature)

    # ----------------------------------------------------------------- fitting
    def fit(self, train_loader: Iterable, progress_bar: bool = False) -> "FunctionalLaplace":
        """Choose M of the N points of ``train_loader.dataset`` and store their Jacobians, outputs and scatter mean.

        The M items ``dataset[i]`` ((x, y) pairs or mappings) are batched by the loader's ``collate_fn``. Cost: M
        per-example Jacobians (C backward passes each), memory M C P.

        Raises:
            ValueError: a loader without a sized ``dataset``, n_subset > N, bad targets.
        """
        dataset = getattr(train_loader, "dataset", None)
        if dataset is None or not hasattr(dataset, "__len__"):
            raise ValueError("FunctionalLaplace.fit needs train_loader.dataset (a sized dataset of (x, y) pairs), "
                             "as in laplace-torch, to choose its subset")
        n_data = len(dataset)
        if self.n_subset > n_data:
            raise ValueError(f"n_subset={self.n_subset} exceeds the {n_data} training points")
        chosen = np.random.default_rng(self.seed).choice(n_data, self.n_subset, replace=False)
        collate = getattr(train_loader, "collate_fn", None)
        if collate is None or getattr(train_loader, "batch_size", 1) is None:  # batch_size=None: no collation
            collate = default_collate
        x, y = self._batch(collate([dataset[int(i)] for i in chosen]))
        self.subset.capture()
        with eval_mode(self.model):
            jac = per_example_jacobians(self.subset, x).detach()  # (M, C, P)
            with torch.no_grad():
                f = self.subset.forward(x)
        if self.likelihood is Likelihood.REGRESSION:
            y = y.to(self.dtype)
            if y.shape != f.shape:
                raise ValueError(f"regression targets must have the model's output shape {tuple(f.shape[1:])} "
                                 f"per example, got {tuple(y.shape[1:])}")
            loss = 0.5 * ((f - y) ** 2).sum()
            mu = y - (f + jac @ (self.prior_mean - self.subset.theta_map).expand(self.subset.n_params))
        else:
            y = y.long()
            loss = torch.nn.functional.cross_entropy(f, y, reduction="sum")
            mu = -(jac @ (self.prior_mean - self.subset.theta_map).expand(self.subset.n_params))
        self.indices, self.n_data, self.n_outputs = torch.as_tensor(chosen), n_data, f.shape[-1]
        self._jac, self._f, self._mu, self._loss = jac, f, mu, loss
        return self

    def _require_fit(self) -> torch.Tensor:
        if self._jac is None:
            raise RuntimeError("call fit(train_loader) first: the FunctionalLaplace is not fitted")
        return self._jac

    def _output_hessian_factors(self) -> torch.Tensor:
        """S (M, C, K) with S S^T = Lambda / (sigma^2 T): "diag" K = C (diagonal), "full" the exact factor."""
        factors = OutputFactors(self.likelihood, CurvatureType.GGN)
        s = factors(self._f, torch.zeros(self._f.shape[0], dtype=torch.long, device=self.device))
        if self.output_hessian == "diag":
            s = torch.diag_embed((s**2).sum(-1).sqrt())
        return s * self._h_factor.sqrt()

    def _batch(self, batch: Any) -> tuple[ModelInputs, torch.Tensor]:
        """(x, y) of a collated batch (a pair or a mapping), x placed on the model's device and dtype."""
        x, y = split_batch(batch, self.dict_key_x, self.dict_key_y, mapping_inputs=True)
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"batch targets must be a tensor, got {type(y).__name__}")
        return place(as_model_inputs(x, "inputs"), self.device, self.dtype), y.to(self.device)

    # ----------------------------------------------------------------- predictive
    def _jacobians(self, x: ModelInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """J (B, C, P) and f (B, C) at theta* for test inputs x (B, ...) (a mapping's target entry is dropped).

        Both stay differentiable in x with ``enable_backprop``, else they are detached.
        """
        self._require_fit()
        x = prediction_inputs(x, None, self.dict_key_y, self.device, self.dtype)
        with eval_mode(self.model), torch.enable_grad():
            jac = jacrev(lambda th: self.subset.forward(x, th))(self.subset.theta_map)
            if self.enable_backprop:
                return jac, self.subset.forward(x)
            with torch.no_grad():
                f = self.subset.forward(x)
        return jac.detach(), f.detach()

    def functional_samples(self, x: ModelInputs, pred_type: str = "gp", n_samples: int = 100,
                           diagonal_output: bool = False, generator: torch.Generator | None = None,
                           joint: bool = False) -> torch.Tensor:
        """Draws of f(x) from the GP posterior N(f(x; theta*), Sigma(x)): (n_samples, B, C), without noise.

        ``diagonal_output`` drops the covariance between outputs; ``joint`` keeps the one between inputs (the
        (B*C, B*C) :meth:`functional_covariance`). ``pred_type`` "gp", "glm" or "nn" all draw from the GP (as in
        laplace-torch). Without ``generator`` the ``seed`` seeds them. Cost: the predictive, plus O(n B C^2)
        (joint: O((BC)^3 + n (BC)^2)).

        Raises:
            ValueError: another pred_type, n_samples < 1.
        """
        _choice(pred_type, ("gp", "glm", "nn"), "pred_type")
        check_positive_int(n_samples, "n_samples")
        generator = generator if generator is not None else links.make_generator(self.seed, self.device)
        js, f = self._jacobians(x)
        if not joint:
            cov = self.functional_variance(js)
            return links.sample_gaussian(f, cov.diagonal(dim1=-2, dim2=-1) if diagonal_output else cov, n_samples,
                                         generator)
        cov = self.functional_covariance(js)
        if diagonal_output:  # keep the covariance of equal outputs only (rows are input-major)
            outputs = torch.arange(cov.shape[0], device=self.device) % f.shape[-1]
            cov = cov * (outputs[:, None] == outputs[None, :])
        return links.sample_gaussian(f.reshape(1, -1), cov.unsqueeze(0), n_samples, generator).reshape(
            n_samples, *f.shape)

    def predictive_samples(self, x: ModelInputs, pred_type: str = "gp", n_samples: int = 100,
                           diagonal_output: bool = False, generator: torch.Generator | None = None,
                           fitting: bool = False, joint: bool = False) -> torch.Tensor:
        """:meth:`functional_samples` through softmax for classification (regression: f itself), (n_samples, B, C).

        ``fitting`` is accepted for laplace-torch's signature (it matters for reward modelling only).
        """
        samples = self.functional_samples(x, pred_type, n_samples, diagonal_output, generator, joint)
        return samples.softmax(-1) if self.likelihood is Likelihood.CLASSIFICATION else samples

    def _posterior_reduction(self, js: torch.Tensor) -> torch.Tensor:
        """V^T V with V = whitened K_M* for test Jacobians js (B, C, P): (C, B, B) if independent, else (BC, BC)."""
        jac_m = self._require_fit()
        pv = self.gp_kernel_prior_variance
        if self.independent_outputs:
            lam = self._output_hessian_factors().diagonal(dim1=-2, dim2=-1) ** 2  # (M, C)
            noise = torch.nan_to_num(1.0 / lam, posinf=10.0)
            out = []
            for c in range(js.shape[1]):
                gram = pv * jac_m[:, c] @ jac_m[:, c].T + torch.diag(noise[:, c])
                white = torch.linalg.solve_triangular(torch.linalg.cholesky(gram), pv * jac_m[:, c] @ js[:, c].T,
                                                      upper=False)
                out.append(white.T @ white)
            return torch.stack(out)
        flat_m, flat_s = jac_m.reshape(-1, jac_m.shape[-1]), js.reshape(-1, js.shape[-1])
        if self.output_hessian == "diag":
            lam = self._output_hessian_factors().diagonal(dim1=-2, dim2=-1).reshape(-1) ** 2
            gram = pv * flat_m @ flat_m.T + torch.diag(torch.nan_to_num(1.0 / lam, posinf=10.0))
            cross = pv * flat_m @ flat_s.T
        else:
            s = self._output_hessian_factors()
            st_j = torch.einsum("mck,mcp->mkp", s, jac_m).reshape(-1, jac_m.shape[-1])  # (MK, P)
            gram = torch.eye(st_j.shape[0], dtype=self.dtype, device=self.device) + pv * st_j @ st_j.T
            cross = pv * st_j @ flat_s.T
        white = torch.linalg.solve_triangular(torch.linalg.cholesky(gram), cross, upper=False)
        return white.T @ white

    def functional_covariance(self, Js: torch.Tensor) -> torch.Tensor:  # noqa: N803 (laplace-torch's name)
        """The joint posterior covariance over a batch: Js (B, C, P) -> (B*C, B*C), rows input-major. O((MC)^3)."""
        pv = self.gp_kernel_prior_variance
        batch, n_out, _ = Js.shape
        if self.independent_outputs:
            per_output = torch.einsum("bcp,dcp->cbd", Js, Js) * pv - self._posterior_reduction(Js)  # (C, B, B)
            return torch.einsum("cbd,ce->bcde", per_output, torch.eye(n_out, dtype=self.dtype,
                                                                      device=self.device)).reshape(batch * n_out, -1)
        flat = Js.reshape(-1, Js.shape[-1])
        return pv * flat @ flat.T - self._posterior_reduction(Js)

    def functional_variance(self, Js: torch.Tensor) -> torch.Tensor:  # noqa: N803
        """The posterior covariance per input: Js (B, C, P) -> (B, C, C) (diagonal if independent). O((MC)^3)."""
        batch, n_out, _ = Js.shape
        joint = self.functional_covariance(Js).reshape(batch, n_out, batch, n_out)
        return joint.diagonal(dim1=0, dim2=2).permute(2, 0, 1)

    def predict(self, x: ModelInputs) -> GaussianPredictive:
        """The GP predictive N(f(x; theta*), Sigma(x)) with full (B, C, C) covariance, without observation noise."""
        js, f = self._jacobians(x)
        cov = self.functional_variance(js)
        return GaussianPredictive(f, cov=0.5 * (cov + cov.transpose(1, 2)))

    def __call__(self, x: ModelInputs, pred_type: str = "gp", joint: bool = False, link_approx: str = "probit",
                 n_samples: int = 100, diagonal_output: bool = False, generator: torch.Generator | None = None,
                 fitting: bool = False, **model_kwargs: Any) -> Any:
        """laplace-torch's ``la(x)``: class probabilities (B, C), or regression ``(f_mu, f_var)`` (no noise).

        ``joint=True`` (regression): ``(f_mu (B*C,), f_cov (B*C, B*C))``. ``pred_type`` must be "gp" ("glm" is
        accepted as the same linearised predictive).

        Raises:
            ValueError: another pred_type or link_approx. TypeError: model keyword arguments.
        """
        if getattr(pred_type, "value", pred_type) not in ("gp", "glm"):
            raise ValueError("FunctionalLaplace supports pred_type='gp' only")
        link = _choice(link_approx, LINK_APPROXES, "link_approx")
        if model_kwargs:
            raise TypeError(f"model keyword arguments {sorted(model_kwargs)} are not supported")
        js, f = self._jacobians(x)
        if self.likelihood is Likelihood.REGRESSION and joint:
            return f.reshape(-1), self.functional_covariance(js)
        cov = self.functional_variance(js)
        if self.likelihood is Likelihood.REGRESSION:
            return f, (cov.diagonal(dim1=-2, dim2=-1) if diagonal_output else cov)
        if link == "probit":
            return links.probit(f, cov)
        if link in ("bridge", "bridge_norm"):
            return bridge_probs(f, cov, normalized=link == "bridge_norm")
        generator = generator if generator is not None else links.make_generator(self.seed, self.device)
        return links.mc_probs(f, cov.diagonal(dim1=-2, dim2=-1) if diagonal_output else cov, n_samples, generator)

    # ----------------------------------------------------------------- evidence (laplace-torch's terms)
    def _kernels(self) -> list[torch.Tensor]:
        """The subset's prior kernel matrices: [(MC, MC)], or one (M, M) per output if independent."""
        jac_m, pv = self._require_fit(), self.gp_kernel_prior_variance
        if self.independent_outputs:
            return [pv * jac_m[:, c] @ jac_m[:, c].T for c in range(jac_m.shape[1])]
        flat = jac_m.reshape(-1, jac_m.shape[-1])
        return [pv * flat @ flat.T]

    def _per_kernel(self, values: torch.Tensor) -> list[torch.Tensor]:
        """(M, C) values laid out like :meth:`_kernels`: [(MC,)] or one (M,) per output."""
        if self.independent_outputs:
            return [values[:, c] for c in range(values.shape[1])]
        return [values.reshape(-1)]

    @property
    def log_likelihood(self) -> torch.Tensor:
        """-loss_M / (sigma^2 T) (regression: minus N C log(sigma sqrt(2 pi))), laplace-torch's term, 0-d."""
        self._require_fit()
        value = -self._h_factor * self._loss
        if self.likelihood is Likelihood.REGRESSION:
            value = value - self.n_data * (self.n_outputs or 1) * torch.log(self.sigma_noise * math.sqrt(2 * math.pi))
        return value

    @property
    def log_det_ratio(self) -> torch.Tensor:
        """Regression: log det(K + sigma^2 I); classification: log det(I + W K W), W^2 = diag(Lambda). 0-d."""
        kernels = self._kernels()
        if self.likelihood is Likelihood.REGRESSION:
            return torch.stack([torch.logdet(k + self.sigma_noise**2 * torch.eye(k.shape[0], dtype=self.dtype,
                                                                                  device=self.device))
                                for k in kernels]).sum()
        lam = self._output_hessian_factors().diagonal(dim1=-2, dim2=-1) ** 2
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        for k, w2 in zip(kernels, self._per_kernel(lam), strict=True):
            w = w2.sqrt()
            total = total + torch.logdet(w[:, None] * k * w + torch.eye(k.shape[0], dtype=self.dtype,
                                                                         device=self.device))
        return total

    @property
    def scatter(self) -> torch.Tensor:
        """Mu^T (K + s I)^-1 mu, s = sigma^2 (regression) or 1e-5; mu = y - f - J (mu_0 - theta*) or -J (mu_0 - theta*)."""
        noise = self.sigma_noise**2 if self.likelihood is Likelihood.REGRESSION else _SCATTER_EPS
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        for k, mu in zip(self._kernels(), self._per_kernel(self._mu), strict=True):
            chol = torch.linalg.cholesky(k + noise * torch.eye(k.shape[0], dtype=self.dtype, device=self.device))
            white = torch.linalg.solve_triangular(chol, mu.unsqueeze(-1), upper=False)
            total = total + (white**2).sum()
        return total

    def log_marginal_likelihood(self, prior_precision: torch.Tensor | float | None = None,
                                sigma_noise: torch.Tensor | float | None = None) -> torch.Tensor:
        """laplace-torch's evidence log_likelihood - (log_det_ratio + scatter) / 2; values passed are kept.

        Differentiable in the hyperparameters passed (they become the Laplace's, as in laplace-torch).
        """
        if prior_precision is not None:
            value = torch.as_tensor(prior_precision, dtype=self.dtype, device=self.device)
            self.prior_precision = value.detach()
            self._prior_precision = value.reshape(1)
        if sigma_noise is not None:
            value = torch.as_tensor(sigma_noise, dtype=self.dtype, device=self.device)
            self.sigma_noise = value.detach()
            self._sigma_noise = value.reshape(())
        return self.log_likelihood - 0.5 * (self.log_det_ratio + self.scatter)

    def optimize_prior_precision(
        self, pred_type: str = "gp", method: str = "marglik", n_steps: int = 100, lr: float = 0.1,
        init_prior_prec: float | torch.Tensor = 1.0, prior_structure: str = "scalar",
        val_loader: Iterable | None = None, loss: Callable[..., Any] | Any | None = None,
        log_prior_prec_min: float = -4, log_prior_prec_max: float = 4, grid_size: int = 100,
        link_approx: str = "probit", n_samples: int = 100, verbose: bool = False, progress_bar: bool = False,
        log_prior_prec_base: float = 10.0,
    ) -> torch.Tensor:
        """Tune the scalar prior precision delta; laplace-torch's signature and defaults. Returns delta (1,).

        "marglik": ``n_steps`` Adam steps (rate ``lr``) on log delta from ``init_prior_prec`` maximising the evidence
        (a ``val_loader`` is ignored with a warning). "gridsearch": :mod:`posthoc.laplace.parity_tuning` on
        ``val_loader`` for the predictive ``la(x, link_approx=, n_samples=)``, scored by ``loss`` or else the NLL
        (regression: of y). Cost: n_steps evidence evaluations or grid_size validation passes, O((MC)^3) each.

        Raises:
            ValueError: another pred_type, prior_structure or method, gridsearch without val_loader, a bad grid.
            FloatingPointError: no grid value has a finite loss.
        """
        how = _choice(method, tuple(m.value for m in PriorOptimization), "method")
        if getattr(pred_type, "value", pred_type) != "gp" or getattr(prior_structure, "value",
                                                                       prior_structure) != "scalar":
            raise ValueError("FunctionalLaplace tunes a scalar prior with pred_type='gp'")
        self._require_fit()
        if how == PriorOptimization.GRIDSEARCH.value:
            self._gridsearch(val_loader, loss, laplace_torch_grid(log_prior_prec_min, log_prior_prec_max, grid_size,
                                                                 log_prior_prec_base, self.dtype),
                             _choice(link_approx, LINK_APPROXES, "link_approx"), n_samples, bool(progress_bar))
        else:
            if val_loader is not None:
                warnings.warn("val_loader is ignored with method='marglik'; pass method='gridsearch' to use it",
                              UserWarning, stacklevel=2)
            start = torch.as_tensor(init_prior_prec, dtype=self.dtype, device=self.device).reshape(-1)
            if start.numel() != 1 or not bool(start > 0):
                raise ValueError(f"init_prior_prec must be one number > 0, got {init_prior_prec!r}")
            self.prior_precision, _ = maximise_evidence(
                lambda delta, _: self.log_marginal_likelihood(delta), start.log(), self.sigma_noise, False,
                check_positive_int(n_steps, "n_steps"), lr, "marginal likelihood", bool(progress_bar))
        if verbose:
            print(f"Optimized prior precision is {self.prior_precision}.")
        return self.prior_precision

    def _gridsearch(self, val_loader: Iterable | None, loss: Any, grid: torch.Tensor, link_approx: str,
                    n_samples: int, progress: bool) -> None:
        if val_loader is None:
            raise ValueError("method='gridsearch' needs val_loader (held-out data, never the test set)")
        batches = []
        for batch in val_loader:
            x, y = self._batch(batch)
            batches.append((x, y.long() if self.likelihood is Likelihood.CLASSIFICATION else y.to(self.dtype)))
        self.prior_precision = gridsearch_with_loss(
            lambda delta: setattr(self, "prior_precision", delta), lambda x: self(x, link_approx=link_approx, n_samples=n_samples), batches,
            validation_nll(self.likelihood, self.sigma_noise) if loss is None else loss, grid, progress)

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The fitted subset (its positions, Jacobians J_M, outputs, scatter mean, loss), theta* and the settings.

        Raises:
            RuntimeError: not fitted.
        """
        self._require_fit()
        return {"theta": self.subset.theta_map, "indices": self.indices, "n_data": self.n_data,
                "n_outputs": self.n_outputs, "jacobians": self._jac, "outputs": self._f, "scatter_mean": self._mu,
                "loss": self._loss, "prior_precision": self.prior_precision, "sigma_noise": self.sigma_noise,
                "settings": self._settings()}

    def _settings(self) -> dict[str, Any]:
        return {"likelihood": self.likelihood.value, "n_subset": self.n_subset, "seed": self.seed,
                "temperature": self.temperature, "independent_outputs": self.independent_outputs,
                "output_hessian": self.output_hessian}

    def load_state_dict(self, state: dict[str, Any]) -> "FunctionalLaplace":
        """Restore :meth:`state_dict` on a FunctionalLaplace of the same model (weights as at fit) and settings.

        Raises:
            ValueError: other settings, another number of parameters, or the model's weights changed.
        """
        if state["settings"] != self._settings():
            raise ValueError(f"the state was fitted with {state['settings']}, this FunctionalLaplace has "
                             f"{self._settings()}; construct it with the same settings")
        self.subset.capture()
        theta = state["theta"].to(device=self.device, dtype=self.dtype)
        if theta.shape != self.subset.theta_map.shape or not torch.equal(theta, self.subset.theta_map):
            raise ValueError("the model's weights differ from those the state was fitted at; load them first")
        self.indices, self.n_data, self.n_outputs = state["indices"], int(state["n_data"]), int(state["n_outputs"])
        self._jac, self._f, self._mu, self._loss = (state[k].to(self.device) for k in ("jacobians", "outputs",
                                                                                      "scatter_mean", "loss"))
        self.prior_precision, self.sigma_noise = state["prior_precision"], state["sigma_noise"]
        return self
