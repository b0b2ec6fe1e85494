"""``posthoc.Streamlined``: sampling-free predictive by moment propagation (docs/streamlined.md).

la = posthoc.Laplace(model, "classification", subset_of_weights="all", hessian_structure="diag").fit(loader)
sp = posthoc.Streamlined(model, posterior=la)                 # diagonal activations (fast)
sp = posthoc.Streamlined(model, posterior=la, activation_covariance="full")
sp = posthoc.Streamlined(model, weight_var=variances)         # any mean-field posterior
pred = sp.predict(x)                                          # GaussianPredictive over logits
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Iterable, Mapping

import torch
from torch import fx, nn

from posthoc.laplace import Laplace
from posthoc.likelihood import Likelihood, check_supported
from posthoc.network.batches import checked_batches
from posthoc.network.inputs import (
    MappingCall,
    ModelCall,
    ModelInputs,
    as_model_inputs,
    batch_size,
    check_finite_inputs,
    place,
    take,
)
from posthoc.predictive import GaussianPredictive, LinkApprox, laplace_torch_outputs
from posthoc.predictive.scale import fit_variance_scale, scaled_gaussian
from posthoc.streamlined.exported import ExportedGraphs, GraphRoute
from posthoc.streamlined.moments import ActivationCovariance, Moments, joined
from posthoc.streamlined.rules import ActivationRule, AttentionRule, Context, LayerNormRule, PoolingRule, find_rule
from posthoc.streamlined.rules.attention import attach_value_sources
from posthoc.streamlined.traced import TracedInputs, propagate_traced, trace
from posthoc.streamlined.weight_posteriors import WeightPosterior, from_laplace, from_mean_field, load_means
from posthoc.utils.checks import check_choice, check_finite, check_positive, check_positive_int
from posthoc.utils.modes import eval_mode

_MISSING = object()


class ModelStructure:
    """What a traced or exported graph of a model bakes in besides its parameters and buffers, to compare later.

    Per module: its children (by identity) and its plain attributes (numbers, strings, None; tensors that are not
    parameters or buffers, by identity), e.g. a temperature or a flag its forward reads as a Python value. Built
    once per graph; :meth:`matches` costs one look-up per stored attribute (about 1 µs per module), not a walk of
    every attribute.
    """

    def __init__(self, model: nn.Module) -> None:
        self.entries = [(module, tuple(module._modules.values()),
                         tuple((key, value, isinstance(value, torch.Tensor)) for key, value in vars(module).items()
                               if value is None or isinstance(value, (bool, int, float, str, torch.Tensor))))
                        for module in model.modules()]

    def matches(self) -> bool:
        """Whether every module still has the children and plain attribute values it had."""
        for module, children, items in self.entries:
            if tuple(module._modules.values()) != children:
                return False
            attributes = module.__dict__
            for key, value, by_identity in items:
                now = attributes.get(key, _MISSING)
                if now is not value and (by_identity or now != value):
                    return False
        return True


def output_gaussian(out: Moments, scale: float) -> GaussianPredictive:
    """The predictive N(mean, κ Σ) of the network's output Moments (full, diagonal or factored Σ), κ = ``scale``."""
    if out.cov is not None:
        return scaled_gaussian(out.mean, out.cov, scale)
    var = out.var if out.var is not None else torch.zeros_like(out.mean)
    return scaled_gaussian(out.mean, var, scale, out.factor)


class Streamlined:
    """Push a Gaussian through the network once: the predictive without sampling or Jacobians.

    Args:
        model: the trained network (the posterior mean). Predictions are those of the eval-mode
            network (Dropout off, BatchNorm on its running statistics) whatever mode the model is
            in; its train/eval flags are left as found. The forward is traced with torch.fx
            (:mod:`posthoc.streamlined.traced`): layers with rules (Linear, Conv1d, Conv2d,
            transformers' Conv1D, Embedding, ReLU/GELU/Tanh/Sigmoid/SiLU, MaxPool2d, AvgPool2d,
            AdaptiveAvgPool2d, Flatten, Dropout, BatchNorm (eval), LayerNorm, GroupNorm, posthoc's
            residual and attention blocks) stay leaves; the ops between them take op rules (residual
            adds, scaling by fixed values, reshapes, cat, split, mean/sum, functional activations,
            pooling, dropout, layer_norm/group_norm; :mod:`.rules.ops`; matmul, softmax and
            scaled_dot_product_attention with Q and K from the means: :mod:`.rules.attention`). Any other
            layer or op raises an error naming it and register_rule. Full mode keeps the
            branch/skip covariance at every residual join (:mod:`posthoc.streamlined.joint`).
        posterior: a fitted :class:`~posthoc.laplace.Laplace` with a diag, kron, ekfac or full
            structure (full: P <= 20,000, cross-layer covariances dropped), read through its
            per-layer covariance view (:mod:`posthoc.laplace.layer_covariance`) and read again at
            the next prediction whenever it is refitted or its prior precision or sigma_noise
            change (so ``optimize_prior_precision`` after building this object takes effect);
            predictions raise RuntimeError if the model's weights changed since the Laplace's fit,
            or if the posterior changed after :meth:`fit_variance_scale` fitted a scale to it. Or give
        weight_mean: with ``weight_var``, a mean-field posterior: dicts by parameter name or (P,)
            vectors in ``parameters_to_vector`` order; a missing ``weight_mean`` means the
            model's weights.
        weight_var: the posterior variances, same forms; a parameter missing from ``weight_var`` is deterministic.
        activation_covariance: "diagonal" (units independent, O(D) per layer, the authors'
            rule) or "full" (per-example D x D covariance carried through every layer; memory
            O(B D²), for small networks or narrow random tails; a layer whose output carries a covariance
            wider than ``max_full_dim`` raises MemoryError, deterministic layers before it do not).
        attention: "independent" (authors': the attention weights from the means of Q and K, V random;
            diagonal mode treats tokens as independent), "shared_value" (diagonal mode: keeps the
            cross-token covariance of the shared random W_v; full mode carries it anyway) or "linearized"
            (full mode only: the attention weights linearised in Q and K as well, so the variance of Q and K
            reaches the output: exact to first order, where "independent" loses it).
        layernorm: "frozen" (authors': statistics of the mean input), "linearized" (the
            LayerNorm Jacobian at the mean) or "expected" (frozen, scaled by the expected spread of the
            random input, so input noise above the mean's spread is not amplified; see
            docs/streamlined.md for where it matters); default frozen in diagonal mode, linearized in full.
        activations: "linearized" (authors': g'(μ)² σ²) or "moment_matched" (diagonal mode: Var g(z) for
            z ~ N(μ, σ²), ReLU in closed form, smooth activations by 32-node quadrature; the mean stays
            model(x)).
        pooling: diagonal mode, how average pooling and mean/sum reductions combine the variances of the
            entries they pool: "independent" (authors': Σ a_i² σ_i², which under-counts a pool over positions
            that share random weights by up to the pool's size) or "correlated" ((Σ a_i σ_i)², the upper bound;
            see docs/streamlined.md for the measured effect on pooled CNNs and ViTs). Full mode needs neither.
        likelihood: "classification" or "regression" (default: the Laplace object's, else
            classification); ``sigma_noise``: regression noise (default the Laplace's, else 1).
        batch_size: inputs propagated at once (default: all in diagonal mode, 32 in full mode).
        mapping_call: how a mapping input reaches ``model.forward``: "auto" (from its signature: keyword
            arguments when every key names a parameter, e.g. Hugging Face models, else one argument),
            "kwargs" or "argument" (:class:`posthoc.network.inputs.ModelCall`).
        graph: which graph is walked for a model without a rule of its own: "fx" (torch.fx), "export"
            (torch.export's aten graph, :mod:`posthoc.streamlined.exported`: exported at the first prediction,
            batch axis dynamic, re-exported per other input shape) or "auto" (fx, and torch.export with one
            warning giving the fx error when fx cannot trace the forward, e.g. Hugging Face models).
            :attr:`graph_used` says which one ran. The mean check against model(x) applies to both.

    Inputs ``x``: a tensor (B, ...), or a tuple/list (one argument) or mapping of tensors batched alike; integer
    leaves (token ids, masks, positions) pass through deterministically, and floating ones are deterministic
    too (``input_var`` needs a tensor x). The model's output: a tensor, a tuple/list's first element or a
    mapping's ``"logits"``.

    Output covariance of :meth:`predict`: full mode, full (B, C, C). Diagonal mode: full
    (B, C, C) when the network ends in an nn.Linear on 2-D features (that layer's cross-class
    terms, its input units independent), else diagonal (B, C). Weights of different layers
    are independent and each layer's weights independent of its input, so single Linear
    layers are exact; the approximations are the linearisation at the mean of activations,
    max pooling (argmax of the mean), LayerNorm and attention weights, and in diagonal mode
    the dropped covariances, which :meth:`fit_variance_scale` can correct with one scalar.
    """

    def __init__(
        self,
        model: nn.Module,
        posterior: Laplace | None = None,
        weight_mean: Mapping[str, torch.Tensor] | torch.Tensor | None = None,
        weight_var: Mapping[str, torch.Tensor] | torch.Tensor | None = None,
        activation_covariance: ActivationCovariance | str = ActivationCovariance.DIAGONAL,
        attention: AttentionRule | str = AttentionRule.INDEPENDENT,
        layernorm: LayerNormRule | str | None = None,
        activations: ActivationRule | str = ActivationRule.LINEARIZED,
        pooling: PoolingRule | str = PoolingRule.INDEPENDENT,
        likelihood: Likelihood | str | None = None,
        sigma_noise: float | None = None,
        max_full_dim: int = 4096,
        batch_size: int | None = None,
        mapping_call: MappingCall | str = MappingCall.AUTO,
        graph: GraphRoute | str = GraphRoute.AUTO,
    ) -> None:
        self.mode = check_choice(activation_covariance, ActivationCovariance, "activation_covariance")
        if posterior is not None:
            if weight_mean is not None or weight_var is not None:
                raise ValueError("give either posterior=<fitted Laplace> or weight_mean/weight_var, not both")
            self.model = model
            posterior.subset.check_current("build a Streamlined predictive from this Laplace")
            self._posterior: WeightPosterior = from_laplace(model, posterior)
            default_likelihood, default_sigma = posterior.likelihood, float(posterior.sigma_noise)
        else:
            if weight_var is None:
                raise ValueError("give posterior=<fitted Laplace>, or weight_var (and optionally weight_mean) "
                                 "for a mean-field posterior")
            self.model = model
            if weight_mean is not None:
                self.model = copy.deepcopy(model)
                load_means(self.model, weight_mean)
            self._posterior = from_mean_field(self.model, weight_var)
            default_likelihood, default_sigma = Likelihood.CLASSIFICATION, 1.0
        self._laplace = posterior
        # what the weight posterior was read from: compared at every prediction (see _current_posterior)
        self._laplace_state = None if posterior is None else self._laplace_snapshot(posterior)
        self._sigma_from_laplace = posterior is not None and sigma_noise is None
        self.likelihood = check_supported(check_choice(likelihood if likelihood is not None else default_likelihood,
                                                       Likelihood, "likelihood"),
                                          (Likelihood.CLASSIFICATION, Likelihood.REGRESSION), "Streamlined")
        self.sigma_noise = float(sigma_noise) if sigma_noise is not None else default_sigma
        check_positive(self.sigma_noise, "sigma_noise")
        self.attention = check_choice(attention, AttentionRule, "attention")
        if self.attention is AttentionRule.LINEARIZED and self.mode is not ActivationCovariance.FULL:
            raise ValueError("attention='linearized' needs the cross-covariances of Q, K and V, which the diagonal "
                             "mode does not carry: use activation_covariance='full', or attention='independent' "
                             "/ 'shared_value' in the diagonal mode")
        if layernorm is None:
            layernorm = LayerNormRule.LINEARIZED if self.mode is ActivationCovariance.FULL else LayerNormRule.FROZEN
        self.layernorm = check_choice(layernorm, LayerNormRule, "layernorm")
        self.activations = check_choice(activations, ActivationRule, "activations")
        if self.activations is ActivationRule.MOMENT_MATCHED and self.mode is ActivationCovariance.FULL:
            raise ValueError("activations='moment_matched' is diagonal-mode only; use "
                             "activation_covariance='diagonal' or activations='linearized'")
        self.pooling = check_choice(pooling, PoolingRule, "pooling")
        check_positive_int(max_full_dim, "max_full_dim", "the largest layer width given a full covariance")
        self.max_full_dim = max_full_dim
        check_positive_int(batch_size, "batch_size", "examples per propagated chunk", allow_none=True)
        self.batch_size = batch_size if batch_size is not None else (
            32 if self.mode is ActivationCovariance.FULL else None)
        self.variance_scale = 1.0
        self._checked = False
        self._call = ModelCall(self.model, mapping_call)
        self._traced: fx.GraphModule | None = None  # the model's torch.fx graph, traced at the first prediction
        self.graph = check_choice(graph, GraphRoute, "graph")
        self.graph_used: GraphRoute | None = None  # FX or EXPORT once a prediction walked a graph
        self._exported = ExportedGraphs(self.model)
        self._structure: ModelStructure | None = None  # the model as its graph was built
        first = next(iter(self.model.parameters()), None)
        self._dtype = first.dtype if first is not None else torch.get_default_dtype()
        self._device = first.device if first is not None else torch.device("cpu")
        # inputs are cast to the weights' dtype; a model without weights (input noise only) keeps the inputs'
        self._casts_inputs = first is not None

    # ----------------------------------------------------------------- staleness
    @staticmethod
    def _laplace_snapshot(la: Laplace) -> tuple:
        return la.structure, la.prior_precision.detach().clone(), la.sigma_noise.detach().clone()

    @property
    def posterior(self) -> WeightPosterior:
        """The weight posterior propagated: a Laplace's is read again when its fit, prior or noise changed."""
        return self._current_posterior("read the posterior")

    def _current_posterior(self, action: str) -> WeightPosterior:
        """The weight posterior to propagate now, re-read from the Laplace if it changed since the last read.

        A Laplace refitted, or its prior precision or sigma_noise changed (e.g. by optimize_prior_precision),
        is read again through its per-layer covariance view, so tuning after building this object takes effect;
        a ``sigma_noise`` not given to the constructor follows the Laplace's. Cost when nothing changed: the
        subset's check (version counters, a hash of the weights only if some were written) and a comparison
        of the hyperparameters.

        Raises:
            RuntimeError: the model's weights (the posterior mean) are no longer those of the Laplace's fit, or
                the posterior changed after :meth:`fit_variance_scale` fitted a scale to the old one.
        """
        la, snapshot = self._laplace, self._laplace_state
        if la is None or snapshot is None:
            return self._posterior
        la.subset.check_current(action)
        curvature, prior, sigma = snapshot
        same_prior = la.prior_precision.shape == prior.shape and torch.equal(la.prior_precision, prior)
        if la.structure is curvature and same_prior and torch.equal(la.sigma_noise, sigma):
            return self._posterior
        if self.variance_scale != 1.0:
            raise RuntimeError(
                f"cannot {action}: the Laplace posterior changed (refitted, or prior_precision / sigma_noise "
                f"changed) after fit_variance_scale fitted variance_scale={self.variance_scale:.4g} to the old one; "
                "call fit_variance_scale(val_loader) again, or set variance_scale = 1.0")
        self._posterior = from_laplace(self.model, la)
        self._laplace_state = self._laplace_snapshot(la)
        if self._sigma_from_laplace:
            self.sigma_noise = float(la.sigma_noise)
        return self._posterior

    # ----------------------------------------------------------------- propagation
    def _context(self, posterior: WeightPosterior) -> Context:
        return Context(self.mode, posterior, self.attention, self.layernorm, self.max_full_dim, self.activations,
                       self.pooling)

    def _input_state(self, x: torch.Tensor, input_var: float | torch.Tensor | None) -> Moments:
        if input_var is None:
            return Moments(x)
        var = torch.as_tensor(input_var, dtype=x.dtype, device=x.device)
        check_finite(var, "input_var")
        if bool((var < 0).any()):
            raise ValueError("input_var must be >= 0")
        try:
            var = var.expand_as(x).contiguous()
        except RuntimeError:
            raise ValueError(f"input_var of shape {tuple(var.shape)} does not broadcast to x {tuple(x.shape)}; "
                             "give a scalar, a per-feature tensor or one of x's shape (diagonal input noise)") from None
        if self.mode is ActivationCovariance.FULL:
            return Moments(x, cov=torch.diag_embed(var.reshape(x.shape[0], -1)))
        return Moments(x, var=var)

    def _check_x(self, x: object) -> ModelInputs:
        """A batched tensor (B, ...), or a tuple/list/mapping of them (token ids, masks: see network.inputs)."""
        if isinstance(x, torch.Tensor):
            if x.ndim < 2:
                raise ValueError(f"x must be a batched tensor (B, ...), got shape {tuple(x.shape)}")
            cast = x.is_floating_point() and self._casts_inputs
            x = x.to(device=self._device, dtype=self._dtype if cast else x.dtype)
            return check_finite(x, "x")
        inputs = as_model_inputs(x)
        inputs = place(inputs, self._device, self._dtype) if self._casts_inputs else inputs
        batch_size(inputs)  # every leaf batched alike, else a ValueError naming the shapes
        return check_finite_inputs(inputs, "x")

    @torch.no_grad()
    def _propagate(self, x: object, input_var, deterministic: bool = False,
                   action: str = "predict") -> Moments:
        """The eval-mode network's output Moments, without the variance scale (see :func:`output_gaussian`).

        Mean (B, C) with cov (B, C, C), var (B, C), or var and factor (F Fᵀ + diag(var)).

        ``deterministic``: the weights at their means (input noise only).
        """
        posterior = self._current_posterior(action)
        if deterministic:
            posterior = posterior.deterministic()
        x = self._check_x(x)
        with eval_mode(self.model):
            return self._propagate_eval(x, input_var, posterior)

    def _propagate_eval(self, x: ModelInputs, input_var, posterior: WeightPosterior) -> Moments:
        """The propagation itself, the model in eval mode; the first batch ever is checked against model(x)."""
        ctx = self._context(posterior)
        if not isinstance(x, torch.Tensor) and input_var is not None:
            raise ValueError("input_var (input noise) needs x as one tensor; with tuple or mapping inputs the "
                             "inputs are deterministic")
        n = batch_size(x)
        if n == 0:
            raise ValueError("x holds no examples (batch size 0)")
        step = n if self.batch_size is None else self.batch_size
        outs = []
        for start in range(0, n, step):
            xb = x if step >= n else take(x, start, start + step)
            state: Moments | TracedInputs
            if isinstance(x, torch.Tensor) and isinstance(xb, torch.Tensor):
                state = self._input_state(xb, self._slice_var(input_var, x, start, step))
            else:
                state = self._call.arguments(xb)
            out = self._propagate_state(state, ctx)
            if out.mean.ndim != 2:
                raise ValueError(f"the model must return (B, C) outputs, got {tuple(out.mean.shape)}")
            if not self._checked:
                reference = self._call(xb)
                if not torch.allclose(out.mean, reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max()) + 1e-6):
                    raise ValueError("the propagated mean differs from model(x): a rule does not reproduce its "
                                     "module's or op's forward (e.g. a module rule registered for a subclass with "
                                     "another forward, or an in-place op whose input is read again); register a "
                                     "rule for the module that contains it (posthoc.streamlined.register_rule)")
                self._checked = True
            outs.append(out)
        return joined(outs)

    def _propagate_state(self, state: Moments | TracedInputs, ctx: Context) -> Moments:
        """The walk: a model with a rule of its own takes it; any other, its torch.fx graph (traced once)."""
        rule = find_rule(type(self.model))
        if rule is not None:
            if not isinstance(state, Moments):
                raise ValueError(f"{type(self.model).__name__} has a module rule, which takes one input tensor; "
                                 "give x as a tensor")
            return rule(self.model, state, ctx, True)
        if self.graph_used is not None and (self._structure is None or not self._structure.matches()):
            # a module replaced, or a plain attribute the forward reads (a temperature), since the graph was built:
            # the graph holds the old ones, so it is built again and its first batch checked against model(x)
            self._traced, self.graph_used, self._checked = None, None, False
            self._exported = ExportedGraphs(self.model)
        if self.graph_used is None:
            self._structure = ModelStructure(self.model)
        if self.graph_used is None and self.graph is not GraphRoute.EXPORT:
            try:
                self._traced = trace(self.model)
                self.graph_used = GraphRoute.FX
            except ValueError as err:
                if self.graph is GraphRoute.FX:
                    raise
                warnings.warn(f"{err}; Streamlined walks the model's torch.export graph instead (graph='auto'; "
                              "pass graph='export' to choose it and silence this warning)", stacklevel=2)
        if self._traced is not None:
            attach_value_sources(self._traced, ctx)  # attention="shared_value": each attention's value projection
            return propagate_traced(self._traced, state, ctx)
        self.graph_used = GraphRoute.EXPORT
        out, exported = self._exported.propagate(state, ctx)
        if exported:
            self._checked = False  # every new export's first batch is checked against model(x)
        return out

    @staticmethod
    def _slice_var(input_var, x: torch.Tensor, start: int, step: int):
        if isinstance(input_var, torch.Tensor) and input_var.ndim == x.ndim and input_var.shape[0] == x.shape[0] \
                and x.shape[0] > 1:
            return input_var[start:start + step]
        return input_var

    def predict(self, x: ModelInputs, input_var: float | torch.Tensor | None = None) -> GaussianPredictive:
        """Predictive over outputs for inputs x (B, ...; or a tuple/mapping), weight posterior and optional input noise.

        ``input_var``: independent Gaussian input noise, a scalar or a tensor broadcastable to
        x. The output covariance (see the class docstring) is multiplied by
        ``variance_scale`` (1 unless :meth:`fit_variance_scale` ran). No observation noise:
        use ``.with_noise(sp.sigma_noise)`` for regression. Cost: diagonal mode with a
        diagonal posterior about 2-3 forward passes; full mode O(D²) per layer and example.
        """
        return output_gaussian(self._propagate(x, input_var), self.variance_scale)

    def __call__(self, x: ModelInputs, link_approx: LinkApprox | str = LinkApprox.PROBIT, n_samples: int = 1000,
                 seed: int = 0, input_var: float | torch.Tensor | None = None,
                 ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """laplace-torch's ``la(x)`` convention (:meth:`predict` gives the Predictive); one propagation.

        Classification: class probabilities (B, C) by ``link_approx`` (default "probit", the link
        :meth:`fit_variance_scale` fits with; ``n_samples`` and ``seed`` for "mc" only). Regression:
        ``(f_mu (B, C), f_var (B, C, C))`` WITHOUT observation noise (add ``sigma_noise**2`` for y).
        """
        return laplace_torch_outputs(self.predict(x, input_var), self.likelihood is Likelihood.REGRESSION,
                                     link_approx, n_samples, seed)

    def input_sensitivity(self, x: torch.Tensor, input_var: float | torch.Tensor) -> GaussianPredictive:
        """The output covariance due to input noise alone (weights at their means), unscaled."""
        if input_var is None:
            raise ValueError("input_sensitivity needs input_var")
        return output_gaussian(self._propagate(x, input_var, True, "compute input_sensitivity"), 1.0)

    def fit_variance_scale(self, val_loader: Iterable, bounds: tuple[float, float] = (1e-3, 1e3),
                           dict_key_x: str = "input", dict_key_y: str = "target") -> float:
        """Fit the single output-variance scale κ on validation data (never the test set).

        Minimises the validation NLL (classification: probit link; regression: Gaussian with
        ``sigma_noise``) over log κ in ``bounds`` with :func:`posthoc.predictive.scale.fit_variance_scale`.
        The network is propagated once; κ only rescales the output covariance.
        ``val_loader`` yields (x, y) tuples or dicts read with ``dict_key_x`` / ``dict_key_y``.
        Sets and returns ``variance_scale``.

        Raises ValueError for an empty loader, non-finite inputs or targets, labels out of range
        (classification) or targets of another width than the outputs (regression), and
        RuntimeError if the model's weights changed since the Laplace's fit (see the class docstring).
        """
        outs, targets = [], []
        batches = checked_batches(val_loader, self.likelihood, None, dict_key_x, dict_key_y, self._dtype, self._device)
        for x, y in batches:
            out = self._propagate(x, None, False, "fit_variance_scale")
            # the targets checked again now that the number of outputs C is known (labels in [0, C), width C)
            _, y = next(checked_batches([(x, y)], self.likelihood, out.mean.shape[-1], dict_key_x, dict_key_y,
                                        self._dtype, self._device))
            outs.append(out)
            targets.append(y)
        if not outs:
            raise ValueError("val_loader yielded no batches")
        pred = output_gaussian(joined(outs), 1.0)
        self.variance_scale = fit_variance_scale(pred, torch.cat(targets), self.likelihood, self.sigma_noise, bounds)
        return self.variance_scale

    def bench_info(self) -> dict[str, Any]:
        """The settings stored with a bench row: variance scale, modes and the posterior's description."""
        return {"variance_scale": self.variance_scale, "activation_covariance": self.mode.value,
                "attention": self.attention.value, "layernorm": self.layernorm.value,
                "activations": self.activations.value, "pooling": self.pooling.value,
                "graph": None if self.graph_used is None else self.graph_used.value,
                "posterior": self._posterior.description}
