"""Every method on torchvision models (issues 15 and 16): the ResNet class with BasicBlock [1, 1, 1, 1] (BatchNorm,
downsampling shortcuts; 4.9 M weights) at 16x16 inputs, and a small VisionTransformer (class token, position
embedding, nn.MultiheadAttention; 3.6 k weights). Both are built with random init (no downloads), trained a few
Adam steps on synthetic images in train mode, and left in train mode as a user would leave them: every estimator
must predict with the eval-mode network (BatchNorm on its running statistics) and leave the flags as found.

Checks, those of tests/zoo/test_zoo.py: the glm mean is the eval-mode model(x), variances finite and positive, nn
weight samples centred on the weights; on the small ViT the glm covariance equals the dense float64 J Λ⁻¹ Jᵀ and
the weight samples match Λ⁻¹ (tests/conformance/references.py). ScaLLA and the fiber walk run a few steps.
Streamlined (diagonal mode, diag Laplace): the propagated mean is model(x) and its summed variance lies in a band
around Monte Carlo of the same posterior (see test_streamlined_diag_against_monte_carlo).

torchvision's wheel needs the CUDA build of torch (it runs on CPU), which the CPU torch of the main environment
cannot load: these tests run in `make test-vision`'s .venv-vision and are skipped elsewhere.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from conformance.conftest import one_thread  # noqa: F401  (autouse: one intra-op thread, ScaLLA's ViT fit 22 s -> 2 s)
from conformance.references import Covered, assert_samples_match, covariance
from streamlined.mc import laplace_sampler, mc_moments, total_ratio
from torch import nn
from zoo.test_scalla_fiber import FIBER, SCALLA
from zoo.test_zoo import check_mean_and_cov, dense_glm_covariance

from posthoc import Laplace, ScaLLA
from posthoc.fiber import FiberSampler
from posthoc.streamlined import Streamlined, UnsupportedLayerError
from posthoc.utils.modes import eval_mode

try:
    import torchvision
except (ImportError, OSError, RuntimeError) as error:  # a CPU torch wheel fails at torchvision's operator setup
    pytest.skip(f"torchvision is not importable here ({type(error).__name__}: {error}); `make test-vision` runs "
                "these tests in .venv-vision (torch 2.14 with torchvision)", allow_module_level=True)

N_CLASSES, SIDE, N_TRAIN, N_TEST = 10, 16, 16, 6
# All-weights kron on the 4.9 M-weight ResNet: about a minute on a 2-core CPU (measured 55 s of a 57 s fit in the
# float64 eigendecompositions of its Kronecker factors, layer4's input factor 4608 x 4608): marked slow, skipped
# unless selected with `-m slow`.
SLOW = pytest.mark.slow
CASES = [pytest.param(name, subset, structure, id=f"{name}-{subset}-{structure}",
                      marks=[SLOW] if (name, subset, structure) == ("resnet", "all", "kron") else [])
         for name in ("resnet", "vit") for subset, structure in (("last_layer", "kron"), ("all", "diag"),
                                                                   ("all", "kron"))]


@pytest.fixture(autouse=True)
def _skip_slow_unless_selected(request):
    if request.node.get_closest_marker("slow") and "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("slow torchvision case (minutes on a 2-core CPU): select it with -m slow")


def _images(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training images (N_TRAIN, 3, 16, 16) float64, labels from their mean colour (a learnable rule), test images."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N_TRAIN + N_TEST, 3, SIDE, SIDE, generator=gen, dtype=torch.float64)
    y = (x.mean((2, 3)) @ torch.tensor([7.0, -5.0, 3.0], dtype=torch.float64) * 4).long().clamp(-5, 4) + 5
    return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:]


def _resnet() -> nn.Module:
    from torchvision.models.resnet import BasicBlock, ResNet

    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=N_CLASSES)


def _vit() -> nn.Module:
    return torchvision.models.VisionTransformer(image_size=SIDE, patch_size=4, num_layers=1, num_heads=2,
                                                hidden_dim=16, mlp_dim=32, num_classes=N_CLASSES)


BUILDERS = {"resnet": _resnet, "vit": _vit}
SMALL = {"vit"}  # the dense float64 J Λ⁻¹ Jᵀ (P x P inverse, ~10 s at P = 3.5 k) only where P is small
MAX_DENSE_SAMPLES_CHECK = 1000  # weight samples against the dense Λ⁻¹ (eigh, solve) up to this P; else z-scores


@functools.cache
def _trained(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The model trained 8 full-batch Adam steps in train mode (BatchNorm's running statistics move), in float64."""
    torch.manual_seed(0)
    model = BUILDERS[name]().double().train()
    x, y, x_test = _images(0)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(8):
        optimiser.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimiser.step()
    return model, x, y, x_test


def _case(name: str) -> tuple[nn.Module, nn.Module, list, torch.Tensor]:
    """A fresh copy of the trained model left in train mode, its eval-mode reference, training batches, test inputs."""
    model, x, y, x_test = _trained(name)
    model = copy.deepcopy(model).train()
    batches = [(x[i:i + 8], y[i:i + 8]) for i in range(0, N_TRAIN, 8)]
    return model, copy.deepcopy(model).eval(), batches, x_test


def _assert_train_mode_kept(model: nn.Module) -> None:
    assert all(m.training for m in model.modules()), "the estimator left the model's train/eval flags changed"


def _assert_centred(la: Laplace, n_samples: int) -> None:
    """Weight samples centred on the model's weights: z = (sample mean - θ*) / sqrt(var / S) is N(0, 1) per entry
    (at most 6 in absolute value) and its mean square over all P entries is 1 (±0.2; a mis-scaled sampler fails)."""
    variance = la.posterior_variance()
    assert torch.isfinite(variance).all() and (variance > 0).all()
    thetas = la.sample(n_samples, seed=1)
    z = (thetas.mean(0) - la.subset.theta_map) / (variance / n_samples).sqrt()
    assert float(z.abs().max()) < 6
    assert 0.8 < float(z.square().mean()) < 1.2


@pytest.mark.parametrize("name,subset,structure", CASES)
def test_laplace_on_the_model(name, subset, structure):
    model, reference, batches, x = _case(name)
    la = Laplace(model, "classification", subset, structure, prior_precision=0.5, progress=False).fit(batches)
    pred = la.predict(x)
    expected = check_mean_and_cov(pred, reference, x)
    if name in SMALL:
        with eval_mode(model):
            torch.testing.assert_close(pred.cov, dense_glm_covariance(la, x), rtol=1e-8, atol=1e-10)
    if la.n_params <= MAX_DENSE_SAMPLES_CHECK:
        precision = la.structure.dense_precision(la.prior_precision, la.factors.scale(la.sigma_noise)).detach()
        covered = Covered(reference, [n for n, p in reference.named_parameters()
                                      if subset == "all" or n.startswith(la.subset.last_layer_name + ".")], None)
        assert_samples_match(la.sample(4000, seed=1), covered.theta(), covariance(precision),
                             covered.block_sizes())
    else:
        _assert_centred(la, n_samples=16)
    samples = la.predict(x, pred_type="nn", n_samples=4, seed=2).samples
    assert samples.shape == (4, *expected.shape) and torch.isfinite(samples).all()

    before = float(la.log_marginal_likelihood())
    la.optimize_prior_precision(method="marglik", n_steps=10, lr=0.3, progress_bar=False)
    assert float(la.log_marginal_likelihood()) >= before - 1e-9
    probs = la(x)
    torch.testing.assert_close(probs.sum(-1), torch.ones(expected.shape[0], dtype=probs.dtype))
    _assert_train_mode_kept(model)




# ScaLLA's default "eigen" directions start with a Lanczos run of GGN products; on the ResNet that is most of the
# fit (measured 22 s, loaded machine), which Rademacher directions skip.
SCALLA_DIRECTIONS = {"resnet": "rademacher", "vit": "eigen"}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_scalla_on_the_model(name):
    model, reference, batches, x = _case(name)
    s = ScaLLA(model, "classification", **{**SCALLA, "directions": SCALLA_DIRECTIONS[name]}
               ).fit(batches, context_loader=batches)
    losses = torch.tensor([row["loss"] for row in s.train_record["history"]])
    assert s.train_record["steps"] == SCALLA["steps"] and torch.isfinite(losses).all()
    check_mean_and_cov(s.predict(x), reference, x)
    _assert_train_mode_kept(model)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_fiber_sampler_last_layer(name):
    model, reference, batches, x = _case(name)
    fs = FiberSampler(model, "classification", subset_of_weights="last_layer", **{**FIBER, "batch_size": 8,
                                                                                   "subsample_size": N_TRAIN}
                      ).fit(batches)
    assert fs.info["stage1_within_tol"] > 0
    assert float((fs.particles - fs.subset.theta_map).abs().max()) > 0  # the walk moved
    samples = fs.predict(x, n_samples=4).samples
    assert samples.shape == (4, x.shape[0], N_CLASSES) and torch.isfinite(samples).all()
    _assert_train_mode_kept(model)


# The weights the diag posterior covers, as in issue 16's protocol of a posterior over the last blocks. ResNet: layer4
# and the head (3.7 M weights; the layers before it run once per input in the MC reference, not once per weight
# sample). ViT: all but the class token and the position embedding, parameters read by ops outside any module
# with a rule, which Streamlined refuses to treat as random (see the last test).
STREAMLINED_COVERED = {
    "resnet": lambda name: name.startswith(("layer4.", "fc.")),
    "vit": lambda name: name not in ("class_token", "encoder.pos_embedding"),
}
N_MC = {"resnet": 32, "vit": 400}
# Σ var_streamlined / Σ var_MC in diagonal mode. It drops the covariances between units (by design), which this
# band does not judge: it catches gross errors (a variance term lost or counted twice, a wrong scale), as
# tests/conformance/test_streamlined.py's (0.5, 2) does; wider here for the MC error of few samples and the
# attention and BatchNorm approximations. The measured ratios are printed.
DIAGONAL_MODE_BAND = (0.25, 4.0)
# The prior precision of the MC comparison, None: the marglik one. The ViT's marglik prior (about 0.7; 16 images, 8
# steps) leaves its posterior at the prior, a weight std of 1.2, ten times the scale of its weights: its LayerNorms'
# statistics then move by more than their own values, which no rule that freezes or linearises them follows
# (Σ var / MC measured 3.3e9 at marglik, 5e3 at prior precision 10, 12 at 100, 1.6 at 1000 with frozen LayerNorm; with
# a 1e-5 weight variance, Q and K rows fixed: diagonal mode 1.00, full mode with linearised LayerNorm 1.01). The ViT's
# mean and finite variances are checked at marglik, its variance against MC at 1000 (weight std 0.03).
MC_PRIOR_PRECISION = {"resnet": None, "vit": 1000.0}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_streamlined_diag_against_monte_carlo(name, capsys):
    model, reference, batches, x = _case(name)
    for parameter_name, parameter in model.named_parameters():
        parameter.requires_grad_(STREAMLINED_COVERED[name](parameter_name))
    la = Laplace(model, "classification", "all", "diag", prior_precision=0.5, progress=False).fit(batches)
    la.optimize_prior_precision(method="marglik", n_steps=10, lr=0.3, progress_bar=False)
    pred = Streamlined(model, posterior=la).predict(x)
    with torch.no_grad():
        torch.testing.assert_close(pred.mean, reference(x), rtol=0, atol=1e-5)
    assert torch.isfinite(pred.var).all() and (pred.var > 0).all()
    if MC_PRIOR_PRECISION[name] is not None:
        la.prior_precision = MC_PRIOR_PRECISION[name]  # Streamlined reads the posterior live at each prediction
        pred = Streamlined(model, posterior=la).predict(x)
    mc = mc_moments(reference, x, laplace_sampler(la), n_samples=N_MC[name])
    ratio = total_ratio(pred.var, mc)
    with capsys.disabled():
        print(f"\n{name}: streamlined diagonal / MC summed output variance = {ratio:.3f} at prior precision "
              f"{float(la.prior_precision.mean()):.3g} (MC: {N_MC[name]} samples, relative standard error "
              f"{mc.total_var_se_rel:.3f})")
    assert DIAGONAL_MODE_BAND[0] <= ratio <= DIAGONAL_MODE_BAND[1]
    _assert_train_mode_kept(model)


def test_streamlined_names_a_random_parameter_outside_modules():
    """The ViT's class token is an nn.Parameter read by torch.cat, outside any module: a posterior over it is refused
    with an error naming it and register_rule (not propagated as if fixed)."""
    model, _, batches, x = _case("vit")
    la = Laplace(model, "classification", "all", "diag", progress=False).fit(batches)
    with pytest.raises(UnsupportedLayerError, match="class_token.*register_rule"):
        Streamlined(model, posterior=la).predict(x)
