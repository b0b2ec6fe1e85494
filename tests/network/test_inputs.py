"""The batch and model-call adapter: mapping kinds, the signature decision and its override, output kinds,
pytree helpers, and clear errors for inputs posthoc cannot read.
"""

from __future__ import annotations

from collections import OrderedDict, UserDict

import pytest
import torch
from torch import nn

from posthoc.likelihood import Likelihood
from posthoc.network.batches import checked_batches, prediction_inputs, split_batch
from posthoc.network.inputs import (
    MappingCall,
    ModelCall,
    as_model_inputs,
    batch_size,
    check_finite_inputs,
    concat,
    input_spec,
    place,
    take,
)
from posthoc.network.probes import reads_tensor_values

IDS = torch.arange(12).reshape(3, 4)
MASK = torch.ones(3, 4, dtype=torch.long)
LABELS = torch.tensor([0, 1, 2])


class HFStyle(nn.Module):
    """Keyword parameters named like the batch's keys, as every Hugging Face model."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 3)

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        return {"logits": (self.emb(input_ids) * attention_mask[..., None]).sum(1)}


class OneArgument(nn.Module):
    """laplace-torch's documented wrapper: forward(self, data) reading data["input_ids"]."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = HFStyle()

    def forward(self, data):
        return self.inner(input_ids=data["input_ids"], attention_mask=data["attention_mask"])["logits"]


class TwoPositional(nn.Module):
    def forward(self, a, b):
        return a + b


class VarArgs(nn.Module):
    def forward(self, *args, **kwargs):
        return kwargs["input_ids"].double()


def _batch(kind):
    data = {"input_ids": IDS, "attention_mask": MASK, "labels": LABELS}
    if kind == "batchencoding":
        transformers = pytest.importorskip("transformers")
        return transformers.BatchEncoding(data)
    return {"dict": dict, "userdict": UserDict}[kind](data)


@pytest.mark.parametrize("kind", ["dict", "userdict", "batchencoding"])
def test_mapping_batches_split_into_every_entry_but_the_target(kind):
    x, y = split_batch(_batch(kind), "input_ids", "labels", mapping_inputs=True)
    assert type(x) is dict and sorted(x) == ["attention_mask", "input_ids"] and torch.equal(y, LABELS)
    (x2, y2), = checked_batches([_batch(kind)], Likelihood.CLASSIFICATION, 3, "input_ids", "labels",
                                torch.float64, torch.device("cpu"), mapping_inputs=True)
    assert x2["input_ids"].dtype == torch.long and torch.equal(x2["input_ids"], IDS) and torch.equal(y2, LABELS)
    x3, _ = split_batch(_batch(kind), "input_ids", "labels")  # estimators without mapping inputs: the entry
    assert x3 is IDS or torch.equal(x3, IDS)


def test_old_keys_keep_their_old_meaning_with_a_deprecation_warning():
    batch = {"input": torch.ones(3, 2), "target": LABELS}
    with pytest.warns(DeprecationWarning, match="dict_key_x='input_ids'"):
        x, y = split_batch(batch, "input_ids", "labels", True)  # the new defaults, on an old-style batch
    assert isinstance(x, torch.Tensor) and x.shape == (3, 2)
    with pytest.warns(DeprecationWarning):
        x, _ = split_batch(batch, "input", "target", True)
    assert isinstance(x, torch.Tensor)
    with pytest.raises(KeyError, match="dict_key_x"):
        split_batch({"pixels": torch.ones(3, 2)}, "pixels", "labels")
    with pytest.raises(TypeError, match="mapping"):
        split_batch(torch.ones(3), "input_ids", "labels")


def test_the_signature_decides_how_a_mapping_reaches_the_model():
    x = {"input_ids": IDS, "attention_mask": MASK}
    assert ModelCall(HFStyle()).mapping_route(list(x)) is MappingCall.KWARGS
    assert ModelCall(OneArgument()).mapping_route(list(x)) is MappingCall.ARGUMENT
    assert ModelCall(VarArgs()).mapping_route(list(x)) is MappingCall.KWARGS
    wrapper = OneArgument()
    torch.testing.assert_close(ModelCall(wrapper)(x), wrapper.inner(**x)["logits"])
    with pytest.raises(ValueError, match="mapping_call="):
        ModelCall(TwoPositional()).mapping_route(list(x))


def test_an_explicit_mapping_call_overrides_the_signature():
    class Both(nn.Module):  # one argument named like a key: auto would pass it as a keyword
        def forward(self, input_ids, **kwargs):
            return input_ids["input_ids"].double() if isinstance(input_ids, dict) else input_ids.double() + 100

    x = {"input_ids": IDS}
    assert ModelCall(Both()).mapping_route(["input_ids"]) is MappingCall.KWARGS
    torch.testing.assert_close(ModelCall(Both())(x), IDS.double() + 100)
    torch.testing.assert_close(ModelCall(Both(), mapping_call="argument")(x), IDS.double())
    assert ModelCall(OneArgument(), "kwargs").arguments(x) == ((), x)
    with pytest.raises(ValueError, match="'auto', 'kwargs', 'argument'"):
        ModelCall(Both(), mapping_call="positional")


def test_output_kinds():
    call = ModelCall(nn.Identity())
    t = torch.ones(2, 3)
    assert call.output(t) is t
    assert call.output((t, "aux")) is t and call.output([t]) is t
    assert call.output({"logits": t, "loss": None}) is t and call.output(OrderedDict(logits=t)) is t
    transformers = pytest.importorskip("transformers")
    assert call.output(transformers.modeling_outputs.SequenceClassifierOutput(logits=t)) is t
    with pytest.raises(ValueError, match="output_fn="):
        call.output({"scores": t})
    with pytest.raises(TypeError, match="output_fn="):
        call.output("logits")
    assert ModelCall(nn.Identity(), output_fn=lambda out: out["scores"]).output({"scores": t}) is t
    with pytest.raises(TypeError, match="must return the output tensor"):
        ModelCall(nn.Identity(), output_fn=lambda out: 3.0).output(t)
    with pytest.raises(TypeError, match="callable"):
        ModelCall(nn.Identity(), output_fn="logits")


def test_pytree_helpers():
    x = {"ids": IDS, "pair": (torch.zeros(3, 2), None)}
    assert batch_size(x) == 3
    part = take(x, 1, 3)
    assert part["ids"].shape == (2, 4) and part["pair"][0].shape == (2, 2) and part["pair"][1] is None
    joined = concat([take(x, 0, 1), take(x, 1, 3)])
    assert torch.equal(joined["ids"], IDS) and joined["pair"][1] is None
    placed = place(x, torch.device("cpu"), torch.float64)
    assert placed["ids"].dtype == torch.long and placed["pair"][0].dtype == torch.float64
    assert input_spec(torch.zeros(3, 5, 2)) == (5, 2)
    assert input_spec(x) == {"ids": ("ndim", 2), "pair": (("ndim", 2), None)}
    with pytest.raises(ValueError, match="NaN/Inf"):
        check_finite_inputs({"a": torch.tensor([[float("nan")]])}, "inputs")
    with pytest.raises(ValueError, match="different structures"):
        concat([{"a": IDS}, {"b": IDS}])


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(TypeError, match="tuple/list/mapping of tensors"):
        as_model_inputs({"text": "a sentence"})
    with pytest.raises(TypeError, match="holds no tensor"):
        as_model_inputs({"mask": None})
    with pytest.raises(TypeError, match="string keys"):
        as_model_inputs({1: IDS})
    with pytest.raises(ValueError, match="batch size 3 first"):
        batch_size({"a": IDS, "b": torch.zeros(2, 4)})
    with pytest.raises(ValueError, match="scalar"):
        batch_size(torch.tensor(1.0))
    loader = [({"input_ids": IDS}, LABELS[:2])]
    with pytest.raises(ValueError, match="one target per input"):
        list(checked_batches(loader, Likelihood.CLASSIFICATION, None, "input_ids", "labels", torch.float64,
                             torch.device("cpu")))
    spec = input_spec({"input_ids": IDS, "attention_mask": MASK})
    with pytest.raises(ValueError, match="structure of the training inputs"):
        prediction_inputs({"input_ids": IDS}, spec, "labels", torch.device("cpu"), torch.float64)
    with pytest.raises(TypeError, match=r"torch.Tensor of shape \(B, 4\)"):
        prediction_inputs({"input_ids": IDS}, (4,), "labels", torch.device("cpu"), torch.float64)


def test_reads_tensor_values_sees_python_control_flow_on_tensors():
    t = torch.randn(3)
    assert reads_tensor_values(lambda: t.sum().item())
    assert reads_tensor_values(lambda: bool((t > 0).all()))
    assert not reads_tensor_values(lambda: torch.where(t > 0, t, -t).sum())
