"""Streamlined on the inputs and outputs users' models have: dict batches (one argument or keyword arguments, as
Hugging Face models take them), tuples, integer token ids and masks, and (logits, aux) or {"logits": ...} outputs.

With only the head random, the propagated variance is exact: Var f_c = Σ_i S_ci h_i² + s_c for deterministic
features h, which is the reference here; the mean must equal the model's own output.
"""

import pytest
import torch
from torch import nn

import posthoc

pytestmark = pytest.mark.usefixtures("float64_default")

VOCAB, DIM, CLASSES = 11, 6, 3


class TokenClassifier(nn.Module):
    """Embedding, masked mean over tokens, Linear head; forward(input_ids, attention_mask) like an HF model."""

    def __init__(self, output: str = "tensor") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, DIM)
        self.head = nn.Linear(DIM, CLASSES)
        self.output = output

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(input_ids)
        mask = attention_mask.unsqueeze(-1).to(tokens.dtype)  # the dtype of an activation, as HF models do
        return torch.tanh((tokens * mask).sum(1) / mask.sum(1))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        logits = self.head(self.features(input_ids, attention_mask))
        if self.output == "tuple":
            return logits, logits.sum()
        if self.output == "dict":
            return {"loss": logits.sum(), "logits": logits}
        return logits


class DictArgument(nn.Module):
    """laplace-torch's documented wrapper: forward(batch) reading batch["input_ids"]."""

    def __init__(self, inner: TokenClassifier) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, batch):
        return self.inner(batch["input_ids"], batch["attention_mask"])


def _batch(n: int = 5, length: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[:, -1] = torch.randint(0, 2, (n,), generator=g)
    return {"input_ids": torch.randint(0, VOCAB, (n, length), generator=g), "attention_mask": mask}


def _head_only_variances(model: nn.Module, head: nn.Linear) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    prefix = next(name for name, m in model.named_modules() if m is head)
    return {f"{prefix}.weight": torch.rand(head.weight.shape, generator=g, dtype=torch.float64),
            f"{prefix}.bias": torch.rand(head.bias.shape, generator=g, dtype=torch.float64)}


def _reference(inner: TokenClassifier, batch, weight_var) -> torch.Tensor:
    h = inner.features(batch["input_ids"], batch["attention_mask"])
    (w_var, b_var) = [v for k, v in weight_var.items()]
    return h.pow(2) @ w_var.T + b_var


@pytest.mark.parametrize("output", ["tensor", "tuple", "dict"])
@pytest.mark.parametrize("mode", ["diagonal", "full"])
def test_keyword_dict_inputs_and_output_kinds(output, mode):
    model = TokenClassifier(output).double().eval()
    batch = _batch()
    weight_var = _head_only_variances(model, model.head)
    sp = posthoc.Streamlined(model, weight_var=weight_var, activation_covariance=mode)
    pred = sp.predict(batch)
    torch.testing.assert_close(pred.mean, model.head(model.features(**batch)))
    torch.testing.assert_close(pred.var, _reference(model, batch, weight_var), rtol=1e-10, atol=1e-12)


def test_one_argument_dict_and_batching():
    inner = TokenClassifier().double().eval()
    model = DictArgument(inner)
    batch = _batch(7)
    weight_var = _head_only_variances(model, inner.head)
    whole = posthoc.Streamlined(model, weight_var=weight_var).predict(batch)
    chunked = posthoc.Streamlined(model, weight_var=weight_var, batch_size=3).predict(batch)
    torch.testing.assert_close(whole.mean, inner(**batch))
    torch.testing.assert_close(whole.var, _reference(inner, batch, weight_var), rtol=1e-10, atol=1e-12)
    # the same arithmetic per input; BLAS kernels may block a batch of 3 and of 7 differently (a few ulp, seen on AVX512)
    torch.testing.assert_close(chunked.var, whole.var, rtol=1e-13, atol=0)


def test_from_a_laplace_fitted_on_dict_batches():
    model = TokenClassifier().double().eval()
    batches = [{**_batch(8), "labels": torch.arange(8) % CLASSES} for _ in range(2)]
    la = posthoc.Laplace(model, "classification", subset_of_weights="all", hessian_structure="diag")
    la.fit(batches)
    pred = posthoc.Streamlined(model, posterior=la).predict(_batch())
    torch.testing.assert_close(pred.mean, model(**_batch()))
    assert bool(torch.isfinite(pred.var).all()) and bool((pred.var > 0).all())


def test_input_noise_and_missing_inputs_are_clear_errors():
    model = TokenClassifier().double().eval()
    sp = posthoc.Streamlined(model, weight_var=_head_only_variances(model, model.head))
    with pytest.raises(ValueError, match="input_var .* needs x as one tensor"):
        sp.predict(_batch(), input_var=0.1)
    with pytest.raises(ValueError, match="needs the input 'attention_mask'"):
        sp.predict({"input_ids": _batch()["input_ids"]})
    with pytest.raises(ValueError, match="batched tensor"):
        sp.predict(torch.zeros(3))
