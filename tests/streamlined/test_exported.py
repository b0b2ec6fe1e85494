"""Streamlined through torch.export (graph="export", and "auto" when torch.fx cannot trace): Hugging Face BERT and
GPT-2 classifiers from tiny configs (random init, no hub), with padded rows, called with a keyword dict and behind
laplace-torch's one-argument dict wrapper.

References: the mean must equal the model's logits; with only the classifier head random the variance is exact,
Var f_c = Σ_i S_ci h_i² + s_c for the head's deterministic input h; with every weight random the variances are
compared with Monte Carlo over weight samples from the same diagonal posterior (per output within [0.5, 2]: the
method linearises GELU and LayerNorm, freezes the attention weights at the mean and drops covariances in diagonal
mode, so it is approximate), and their total within [0.8, 1.25]. posthoc's own
models must give the same numbers through torch.export as through torch.fx (the module rules are the same).
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import posthoc
from posthoc.models.vit import SmallViT
from posthoc.streamlined import UnsupportedLayerError

transformers = pytest.importorskip("transformers")

pytestmark = [pytest.mark.usefixtures("float64_default"), pytest.mark.filterwarnings("ignore::UserWarning")]

VOCAB, CLASSES, PAD = 40, 3, 0


def _bert() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=CLASSES)
    return transformers.BertForSequenceClassification(config).double().eval()


def _gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=16,
                                     num_labels=CLASSES, pad_token_id=PAD, bos_token_id=1, eos_token_id=1)
    return transformers.GPT2ForSequenceClassification(config).double().eval()


MODELS = {"bert": (_bert, "classifier"), "gpt2": (_gpt2, "score")}


class DictArgument(nn.Module):
    """laplace-torch's documented wrapper: forward(batch) reading batch["input_ids"] and batch["attention_mask"]."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, batch):
        return self.inner(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _batch(n: int = 4, length: int = 6, seed: int = 1) -> dict[str, torch.Tensor]:
    """Token ids with right padding: row 1 ends two tokens early, row 2 three."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[1 % n, length - 2:] = 0
    mask[2 % n, length - 3:] = 0
    ids = torch.randint(1, VOCAB, (n, length), generator=g) * mask + PAD * (1 - mask)
    return {"input_ids": ids, "attention_mask": mask}


def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).logits


def _build(name: str, wrapped: bool) -> tuple[nn.Module, nn.Module, nn.Linear]:
    make, head_name = MODELS[name]
    inner = make()
    return (DictArgument(inner) if wrapped else inner), inner, inner.get_submodule(head_name)


def _head_variances(model: nn.Module, head: nn.Linear) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    prefix = next(name for name, m in model.named_modules() if m is head)
    return {f"{prefix}.{attr}": torch.rand(p.shape, generator=g, dtype=torch.float64)
            for attr, p in head.named_parameters()}


def _head_reference(inner: nn.Module, head: nn.Linear, batch, weight_var) -> torch.Tensor:
    """Σ_i S_ci h_i² + s_c at the head's input h, read by a hook; GPT-2 reads its last non-pad token, as HF does."""
    seen = []
    handle = head.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    inner(**batch)
    handle.remove()
    variances = list(weight_var.values())
    var = seen[0].square() @ variances[0].T + (variances[1] if len(variances) > 1 else 0)
    if var.ndim == 3:  # GPT-2: (B, T, C) at every token; the last non-pad token's row is the output
        last = (torch.arange(var.shape[1]) * (batch["input_ids"] != PAD).int()).argmax(-1)
        var = var[torch.arange(var.shape[0]), last]
    return var


@pytest.mark.parametrize("name", ["bert", "gpt2"])
@pytest.mark.parametrize("wrapped", [False, True], ids=["keywords", "dict_wrapper"])
@pytest.mark.parametrize("mode", ["diagonal", "full"])
def test_mean_and_exact_head_only_variance(name, wrapped, mode):
    model, inner, head = _build(name, wrapped)
    batch = _batch()
    weight_var = _head_variances(model, head)
    sp = posthoc.Streamlined(model, weight_var=weight_var, activation_covariance=mode, graph="export")
    pred = sp.predict(batch)
    assert sp.graph_used is posthoc.streamlined.exported.GraphRoute.EXPORT
    torch.testing.assert_close(pred.mean, _logits(inner, batch), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(pred.var, _head_reference(inner, head, batch, weight_var), rtol=1e-10, atol=1e-12)


def test_auto_uses_export_with_one_warning_when_fx_cannot_trace():
    model = _bert()
    weight_var = _head_variances(model, model.classifier)
    with pytest.raises(ValueError, match="torch.fx could not trace BertForSequenceClassification"):
        posthoc.Streamlined(model, weight_var=weight_var, graph="fx").predict(_batch())
    sp = posthoc.Streamlined(model, weight_var=weight_var)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = sp.predict(_batch())
        second = sp.predict(_batch())
    messages = [str(w.message) for w in caught if "torch.export" in str(w.message)]
    assert len(messages) == 1 and "torch.fx could not trace" in messages[0] and "graph='export'" in messages[0]
    assert sp.graph_used.value == "export" and sp.bench_info()["graph"] == "export"
    torch.testing.assert_close(first.var, second.var, rtol=0, atol=0)
    with pytest.raises(ValueError, match="graph"):
        posthoc.Streamlined(model, weight_var=weight_var, graph="onnx")


def test_exports_are_cached_by_shape_with_a_dynamic_batch():
    model, inner, head = _build("bert", False)
    weight_var = _head_variances(model, head)
    whole = posthoc.Streamlined(model, weight_var=weight_var, graph="export")
    reference = whole.predict(_batch(7))
    assert whole._exported.exports == 1
    whole.predict(_batch(5, seed=3))  # another batch size, same length: the dynamic batch axis serves it
    assert whole._exported.exports == 1
    whole.predict(_batch(5, length=5))  # another sequence length: exported again
    assert whole._exported.exports == 2
    chunked = posthoc.Streamlined(model, weight_var=weight_var, graph="export", batch_size=3)
    pred = chunked.predict(_batch(7))  # chunks of 3, 3 and 1 (a batch of 1 is exported on its own)
    torch.testing.assert_close(pred.mean, reference.mean, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(pred.var, reference.var, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_diag_laplace_on_all_weights_gives_finite_positive_variances(name):
    model, inner, _ = _build(name, True)
    batches = [{**_batch(seed=s), "labels": torch.arange(4) % CLASSES} for s in range(2)]
    la = posthoc.Laplace(model, "classification", subset_of_weights="all", hessian_structure="diag")
    la.fit(batches)
    pred = posthoc.Streamlined(model, posterior=la, graph="export").predict(_batch(seed=5))
    torch.testing.assert_close(pred.mean, _logits(inner, _batch(seed=5)), rtol=1e-10, atol=1e-12)
    assert bool(torch.isfinite(pred.var).all()) and bool((pred.var > 0).all())


def _mc_variance(inner: nn.Module, batch, weight_var: dict[str, torch.Tensor], n_samples: int) -> torch.Tensor:
    """Output variances over weight samples θ ~ N(θ̄, diag(weight_var)), one forward per sample."""
    g = torch.Generator().manual_seed(3)
    means = {name: p.detach() for name, p in inner.named_parameters()}
    outputs = []
    with torch.no_grad():
        for _ in range(n_samples):
            params = {name: means[name] + var.sqrt() * torch.randn(var.shape, generator=g, dtype=var.dtype)
                      for name, var in weight_var.items()}
            outputs.append(functional_call(inner, {**means, **params}, (), dict(batch)).logits)
    return torch.stack(outputs).var(0)


# Weight variances 1e-5·U(0, 1) against init weights of scale 0.02: the near-linear regime the method is built for
# (at 1e-3 the weight noise is as large as the weights and the linearisation overestimates MC by 1.2-6x). 600
# samples: a standard error of about 6% per output variance, 2% on the total.
MC_SAMPLES = 600


@pytest.mark.parametrize("name, mode", [("bert", "diagonal"), ("gpt2", "diagonal"), ("bert", "full"), ("gpt2", "full")])
def test_agrees_with_monte_carlo_on_all_weights(name, mode, record):
    """Full mode joins the word embeddings (B, T, D) with the position table's batch of one (broadcast); on GPT-2 it
    reads Q, K and V of the fused projection as slices (the export walk rewrites the split)."""
    model, inner, _ = _build(name, False)
    batch = _batch()
    g = torch.Generator().manual_seed(4)
    weight_var = {n: 1e-5 * torch.rand(p.shape, generator=g, dtype=torch.float64)
                  for n, p in inner.named_parameters()}
    pred = posthoc.Streamlined(model, weight_var=weight_var, graph="export", activation_covariance=mode).predict(batch)
    torch.testing.assert_close(pred.mean, _logits(inner, batch), rtol=1e-10, atol=1e-12)
    mc = _mc_variance(inner, batch, weight_var, MC_SAMPLES)
    ratio = pred.var / mc
    total = float(pred.var.sum() / mc.sum())
    record(f"{name} {mode} / MC variance, all weights", median=float(ratio.median()), lowest=float(ratio.min()),
           highest=float(ratio.max()), total=total)
    assert bool(((ratio > 0.5) & (ratio < 2.0)).all()), ratio
    assert 0.8 < total < 1.25, total


class FunctionalHead(nn.Module):
    """A module without a rule reading its own weight with F.linear: a random weight there is refused."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(CLASSES, 4))

    def forward(self, x):
        return F.linear(torch.tanh(x), self.weight)


def test_a_random_parameter_read_outside_a_module_rule_is_refused():
    model = nn.Sequential(nn.Linear(3, 4), FunctionalHead()).double().eval()
    x = torch.randn(5, 3)
    fixed = posthoc.Streamlined(model, weight_var={"0.weight": torch.full((4, 3), 0.1)}, graph="export")
    torch.testing.assert_close(fixed.predict(x).mean, model(x))  # a fixed weight through aten.linear: the Linear rule
    sp = posthoc.Streamlined(model, weight_var={"1.weight": torch.full((CLASSES, 4), 0.1)}, graph="export")
    with pytest.raises(UnsupportedLayerError, match="random parameter 1.weight is read by an op outside"):
        sp.predict(x)


def _small_vit() -> nn.Module:
    torch.manual_seed(0)
    return SmallViT(image_size=8, patch_size=4, dim=8, depth=1, n_heads=2, n_classes=CLASSES).double().eval()


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.LayerNorm(8), nn.Linear(8, CLASSES)).double().eval()


@pytest.mark.parametrize("make, shape", [(_small_vit, (5, 1, 8, 8)), (_mlp, (5, 6))], ids=["small_vit", "mlp"])
@pytest.mark.parametrize("mode", ["diagonal", "full"])
def test_posthoc_models_give_the_same_numbers_through_export_and_fx(make, shape, mode):
    model = make()
    x = torch.randn(*shape)
    g = torch.Generator().manual_seed(5)
    weight_var = {n: 1e-2 * torch.rand(p.shape, generator=g, dtype=torch.float64) for n, p in model.named_parameters()}
    via_fx = posthoc.Streamlined(model, weight_var=weight_var, activation_covariance=mode, graph="fx")
    via_export = posthoc.Streamlined(model, weight_var=weight_var, activation_covariance=mode, graph="export")
    a, b = via_fx.predict(x, input_var=0.01), via_export.predict(x, input_var=0.01)
    assert via_fx.graph_used.value == "fx" and via_export.graph_used.value == "export"
    torch.testing.assert_close(b.mean, a.mean, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(b.cov, a.cov, rtol=1e-10, atol=1e-14)


def _op_cases() -> dict[str, tuple]:
    from streamlined.test_traced import OPS, Op
    from streamlined.test_traced_attention import DIAGONAL_ONLY_OPS, EXACT_OPS
    return {name: (Op, fn) for name, fn in {**OPS, **EXACT_OPS, **DIAGONAL_ONLY_OPS}.items()}


OP_NAMES = sorted(_op_cases())


@pytest.mark.parametrize("mode", ["diagonal", "full"])
@pytest.mark.parametrize("name", OP_NAMES)
def test_every_op_rule_gives_the_same_numbers_through_its_aten_form(name, mode):
    """The aten adapters against the op rules on fx: each op of the traced-path tests, input noise through it."""
    from streamlined.test_traced_attention import DIAGONAL_ONLY_OPS
    if mode == "full" and name in DIAGONAL_ONLY_OPS:
        pytest.skip("split / chunk / unbind of a random activation: diagonal mode only on both paths")
    make, fn = _op_cases()[name]
    model = make(fn)
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    input_var = torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) + 0.1
    via_fx = posthoc.Streamlined(model, weight_var={}, activation_covariance=mode, graph="fx")
    via_export = posthoc.Streamlined(model, weight_var={}, activation_covariance=mode, graph="export")
    a, b = via_fx.input_sensitivity(x, input_var), via_export.input_sensitivity(x, input_var)
    assert via_export.graph_used.value == "export"
    torch.testing.assert_close(b.mean, a.mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(b.cov, a.cov, rtol=1e-10, atol=1e-12)


def _traced_model(name: str) -> tuple[nn.Module, torch.Tensor]:
    from streamlined.test_traced_attention import TinyEncoder
    from streamlined.traced_models import TinyResNet, TinyWRN, randomise_bn
    torch.manual_seed(0)
    if name in ("resnet", "wrn"):
        model = randomise_bn((TinyResNet if name == "resnet" else TinyWRN)().double()).eval()
        return model, torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(2))
    model = TinyEncoder(eager=name == "encoder_eager").double().eval()
    ids = torch.randint(1, 11, (3, 5), generator=torch.Generator().manual_seed(1))
    ids[1, 2:] = 0
    return model, ids


@pytest.mark.parametrize("mode", ["diagonal", "full"])
@pytest.mark.parametrize("name", ["resnet", "wrn", "encoder_sdpa", "encoder_eager"])
def test_traced_path_models_give_the_same_numbers_through_export(name, mode):
    """torchvision-style ResNet and WRN blocks (in-place adds, functional relu/dropout/pooling) and a token encoder."""
    model, x = _traced_model(name)
    g = torch.Generator().manual_seed(6)
    weight_var = {n: 1e-3 * torch.rand(p.shape, generator=g, dtype=torch.float64) for n, p in model.named_parameters()}
    via_fx = posthoc.Streamlined(model, weight_var=weight_var, activation_covariance=mode, graph="fx").predict(x)
    via_export = posthoc.Streamlined(model, weight_var=weight_var, activation_covariance=mode, graph="export")
    pred = via_export.predict(x)
    torch.testing.assert_close(pred.mean, via_fx.mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(pred.cov, via_fx.cov, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("name", ["chunk", "split"])
def test_split_read_by_index_is_exact_in_full_mode_through_export(name):
    """The export walk reads the parts of a split as slices, which the full mode tracks: J diag(v) Jᵀ exactly."""
    from streamlined.test_traced import Op
    from streamlined.test_traced_attention import DIAGONAL_ONLY_OPS, _jacobian_sandwich
    model = Op(DIAGONAL_ONLY_OPS[name])
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    input_var = torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) + 0.1
    sp = posthoc.Streamlined(model, weight_var={}, activation_covariance="full", graph="export")
    pred = sp.input_sensitivity(x, input_var)
    for b in range(x.shape[0]):
        torch.testing.assert_close(pred.cov[b], _jacobian_sandwich(model, x, input_var, b), rtol=1e-10, atol=1e-12)


class _EncoderClassifier(nn.Module):
    """torch's own TransformerEncoderLayer (no rule of its own; its forward branches on its inputs) inside a model."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(16, 3)  # registered before the trunk
        self.embed = nn.Linear(5, 16)
        self.encoder = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.1, activation="gelu", batch_first=True,
                                                  norm_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(1))


def test_a_torch_composite_module_without_a_rule_is_traced_into_not_refused():
    # fx keeps torch.nn modules as leaves by default; a composite one without a rule must not stop the walk at "no
    # rule" but be traced into, and here (its forward branches on its inputs) go to the export graph under "auto"
    torch.manual_seed(0)
    model = _EncoderClassifier().double().eval()
    x = torch.randn(4, 7, 5, dtype=torch.float64)
    weight_var = {name: torch.full_like(p, 1e-3) for name, p in model.named_parameters()}
    with pytest.raises(ValueError, match="torch.fx could not trace _EncoderClassifier"):
        posthoc.Streamlined(model, weight_var=weight_var, graph="fx").predict(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        auto = posthoc.Streamlined(model, weight_var=weight_var).predict(x)
    assert any("torch.export" in str(w.message) for w in caught)
    exported = posthoc.Streamlined(model, weight_var=weight_var, graph="export").predict(x)
    torch.testing.assert_close(auto.mean, model(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(auto.cov, exported.cov, rtol=0, atol=0)
    # a childless torch.nn layer without a rule still stops the walk with the layer's name
    with pytest.raises(UnsupportedLayerError, match="Softplus"):
        posthoc.Streamlined(nn.Sequential(nn.Linear(3, 4), nn.Softplus(), nn.Linear(4, 2)).double(),
                            weight_var={"0.weight": torch.full((4, 3), 1e-3, dtype=torch.float64)},
                            graph="fx").predict(torch.randn(2, 3, dtype=torch.float64))
