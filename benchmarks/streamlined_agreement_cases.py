"""The models, data and covered weights of benchmarks/streamlined_agreement.py (issue 16's agreement protocol).

Every case names: the environment it needs (torchvision's models run in the vision environment, whose torch
loads torchvision; the rest in the main one), its builder (seeded random init, no downloads), its task, which
parameters the diagonal Laplace covers (the last two blocks and the head behind them) and, where the covered part
is a tail of the network, a split (trunk, tail) so that Monte Carlo re-runs only the tail per weight draw.

Images: Fashion-MNIST (``--data-dir`` or POSTHOC_DATA), 28x28 in [0, 1], channels replicated to 3 for the
torchvision models. Text: the generated sentiment task of examples/llm_lora.py (its ``make_sequences``: 8-24
tokens over a 64-token vocabulary, "not" flips the next word, 10 % label noise, right padding with an attention
mask).
"""

from __future__ import annotations

import importlib.util
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, cast

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
N_GROUP = 200  # in-distribution inputs, and as many shifted ones
ROTATIONS = (22.5, 45.0, 67.5, 90.0, 112.5, 135.0, 157.5, 180.0)  # shifted images: 25 per angle
TOKEN_SWAP = 0.3  # shifted text: this fraction of the non-pad tokens replaced by uniform random tokens
N_TEXT_TRAIN = 10_000


@dataclass
class Case:
    """One model of the table: how it is built, trained and which weights the posterior covers."""

    env: str  # "main" or "vision"
    build: Callable[[], nn.Module]
    task: str  # "fmnist" (1 channel), "fmnist3" (replicated to 3 channels) or "tokens"
    covered: tuple[str, ...]  # parameter-name prefixes of the last two blocks and the head
    epochs: int = 1
    has_layernorm: bool = False
    own_attention: bool = False  # an attention module rule (posthoc's block, nn.MultiheadAttention): "shared_value" applies
    attends: bool = False  # has attention: the full mode's attention="linearized" applies
    attention_rule: str = "—"  # the attention rule the graph meets, named in the table
    pools: bool = False  # an average pooling or mean over positions / tokens: pooling="correlated" applies
    split: Callable[[nn.Module], tuple[Callable, nn.Module]] | None = None
    notes: dict[str, Any] = field(default_factory=dict)


def _wide_basic() -> type:
    """WRN's pre-activation block, tests/streamlined/traced_models.py's WideBasic, loaded from its file.

    Functional relu and dropout, a ``torch.add`` join, a 1x1 conv shortcut when shapes change.
    """
    spec = importlib.util.spec_from_file_location("traced_models", ROOT / "tests" / "streamlined" / "traced_models.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.WideBasic


class WRN(nn.Module):
    """WRN-10-k style (one pre-activation block per group of widths 16k, 32k, 64k) for (B, 1, 28, 28) images."""

    def __init__(self, k: int = 1, n_classes: int = 10) -> None:
        super().__init__()
        WideBasic = _wide_basic()  # noqa: N806
        self.conv = nn.Conv2d(1, 16, 3, 1, 1, bias=False)
        self.block1, self.block2, self.block3 = WideBasic(16, 16 * k, 1), WideBasic(16 * k, 32 * k, 2), \
            WideBasic(32 * k, 64 * k, 2)
        self.bn = nn.BatchNorm2d(64 * k)
        self.fc = nn.Linear(64 * k, n_classes)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """The deterministic part: stem and first block, (B, 16k, 28, 28)."""
        return self.block1(self.conv(x))

    def tail(self, h: torch.Tensor) -> torch.Tensor:
        """The covered part: the last two blocks, the final BN and the head, logits (B, C)."""
        out = F.relu(self.bn(self.block3(self.block2(h))))
        out = F.avg_pool2d(out, out.shape[-1])
        return self.fc(out.view(out.size(0), -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, C) for images (B, 1, 28, 28)."""
        return self.tail(self.trunk(x))


class _Tail(nn.Module):
    """The covered tail of a model as a module whose parameter names are the model's (for functional_call)."""

    def __init__(self, model: nn.Module, names: tuple[str, ...], forward: Callable[[nn.Module, torch.Tensor],
                                                                                     torch.Tensor]) -> None:
        super().__init__()
        for name in names:
            self.add_module(name, getattr(model, name))
        self._forward = forward

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """The tail's output (logits) for the trunk's activations ``h``."""
        return self._forward(self, h)


def _wrn_split(model: nn.Module) -> tuple[Callable, nn.Module]:
    assert isinstance(model, WRN)
    return model.trunk, _Tail(model, ("block2", "block3", "bn", "fc"), cast(Any, WRN.tail))


def _resnet18_split(model: nn.Module) -> tuple[Callable, nn.Module]:
    def trunk(x: torch.Tensor) -> torch.Tensor:
        m: Any = model
        return m.layer3(m.layer2(m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x)))))))

    def tail(t: Any, h: torch.Tensor) -> torch.Tensor:
        return t.fc(torch.flatten(t.avgpool(t.layer4(h)), 1))
    return trunk, _Tail(model, ("layer4", "avgpool", "fc"), tail)


def _sequential_split(first_covered: str) -> Callable[[nn.Module], tuple[Callable, nn.Module]]:
    """Split a Sequential before its child ``first_covered``: (the children before it, those from it on)."""
    def split(model: nn.Module) -> tuple[Callable, nn.Module]:
        children = list(model.named_children())
        k = [name for name, _ in children].index(first_covered)
        return nn.Sequential(OrderedDict(children[:k])), nn.Sequential(OrderedDict(children[k:]))
    return split


def _small_resnet_split(model: nn.Module) -> tuple[Callable, nn.Module]:
    def trunk(x: torch.Tensor) -> torch.Tensor:
        m: Any = model
        return m.blocks.block1(m.stem(x))

    def tail(t: Any, h: torch.Tensor) -> torch.Tensor:
        return t.fc(t.flatten(t.pool(t.blocks.block3(t.blocks.block2(h)))))
    return trunk, _Tail(model, ("blocks", "pool", "flatten", "fc"), tail)


def _resnet18() -> nn.Module:
    import torchvision
    return torchvision.models.resnet18(num_classes=10)


def _tv_vit() -> nn.Module:
    import torchvision
    return torchvision.models.VisionTransformer(image_size=28, patch_size=7, num_layers=3, num_heads=2, hidden_dim=32,
                                                mlp_dim=64, num_classes=10)


def _bert() -> nn.Module:
    import transformers
    labels: dict[str, Any] = {"num_labels": 2, "pad_token_id": 0}  # PretrainedConfig's keyword arguments
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=24, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0, **labels)
    return transformers.BertForSequenceClassification(config)


def _gpt2() -> nn.Module:
    import transformers
    labels: dict[str, Any] = {"num_labels": 2, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 1}
    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=3, n_head=2, n_positions=24, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0, **labels)
    return transformers.GPT2ForSequenceClassification(config)


def _posthoc(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from posthoc import models
        return {"mlp": lambda: models.MLP(784), "cnn": models.FMNISTCNN, "small_resnet": models.SmallResNet,
                "small_vit": models.SmallViT}[name]()
    return build


SDPA = "independent (HF sdpa op rule: Q, K at the mean, V random)"
CASES: dict[str, Case] = {
    "mlp": Case("main", _posthoc("mlp"), "fmnist", ("fc2.", "fc3."), split=_sequential_split("fc2")),
    "cnn": Case("main", _posthoc("cnn"), "fmnist", ("fc1.", "fc2."), split=_sequential_split("fc1")),
    "small_resnet": Case("main", _posthoc("small_resnet"), "fmnist", ("blocks.block2.", "blocks.block3.", "fc."),
                         split=_small_resnet_split, pools=True),
    "small_vit": Case("main", _posthoc("small_vit"), "fmnist", ("blocks.block1.", "blocks.block2.", "norm.", "head."),
                      has_layernorm=True, own_attention=True, attends=True, pools=True),
    "wrn": Case("main", lambda: WRN(k=1), "fmnist", ("block2.", "block3.", "bn.", "fc."), split=_wrn_split,
                pools=True),
    "bert": Case("main", _bert, "tokens", ("bert.encoder.layer.1.", "bert.encoder.layer.2.", "bert.pooler.",
                                           "classifier."), epochs=3, has_layernorm=True, attends=True, attention_rule=SDPA),
    "gpt2": Case("main", _gpt2, "tokens", ("transformer.h.1.", "transformer.h.2.", "transformer.ln_f.", "score."),
                 epochs=3, has_layernorm=True, attends=True, attention_rule=SDPA),
    "tv_resnet18": Case("vision", _resnet18, "fmnist3", ("layer4.", "fc."), split=_resnet18_split,
                        pools=True),
    "tv_vit": Case("vision", _tv_vit, "fmnist3", ("encoder.layers.encoder_layer_1.", "encoder.layers.encoder_layer_2.",
                                                   "encoder.ln.", "heads."), has_layernorm=True, own_attention=True, attends=True,
                   attention_rule="nn.MultiheadAttention module rule"),
}


def _llm_lora() -> Any:
    """examples/llm_lora.py as a module (its token task); the examples folder joins sys.path for example_io."""
    examples = ROOT / "examples"
    if str(examples) not in sys.path:
        sys.path.insert(0, str(examples))
    spec = importlib.util.spec_from_file_location("llm_lora_example", examples / "llm_lora.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _swap_tokens(data: dict[str, torch.Tensor], fraction: float, vocab: int, seed: int) -> dict[str, torch.Tensor]:
    """The sequences with ``fraction`` of their non-pad tokens replaced by uniform tokens in [1, vocab)."""
    gen = torch.Generator().manual_seed(seed)
    ids, mask = data["input_ids"], data["attention_mask"]
    swap = (torch.rand(ids.shape, generator=gen) < fraction) & (mask == 1)
    return {**data, "input_ids": torch.where(swap, torch.randint(1, vocab, ids.shape, generator=gen), ids)}


def load_task(task: str, data_dir: str | None) -> tuple[Any, torch.Tensor, Any, torch.Tensor]:
    """(x_train, y_train, x_eval, y_eval): x_eval holds N_GROUP in-distribution then N_GROUP shifted inputs.

    Images: the Fashion-MNIST train split (60,000) and the first 2 * N_GROUP test images, the second half rotated
    (25 per angle of ROTATIONS). Tokens: N_TEXT_TRAIN generated sequences, then N_GROUP held-out ones and N_GROUP
    more with TOKEN_SWAP of their tokens replaced. x is a float tensor (B, C, 28, 28) or a dict of (B, 24) tensors.
    """
    x_eval: Any
    if task == "tokens":
        lora = _llm_lora()
        gen = torch.Generator().manual_seed(0)
        train = lora.make_sequences(N_TEXT_TRAIN, gen)
        held_out = lora.make_sequences(2 * N_GROUP, gen)
        shifted = _swap_tokens({k: v[N_GROUP:] for k, v in held_out.items()}, TOKEN_SWAP, lora.VOCAB, seed=1)
        x_eval = {k: torch.cat([held_out[k][:N_GROUP], shifted[k]]) for k in ("input_ids", "attention_mask")}
        return ({k: train[k] for k in ("input_ids", "attention_mask")}, train["labels"], x_eval,
                held_out["labels"])
    from posthoc.data.shift import rotate_images
    from posthoc.data.vision import load_images
    xtr: Any
    xtr, ytr = load_images("FashionMNIST", "train", data_dir)
    xte, yte = load_images("FashionMNIST", "test", data_dir)
    xte, yte = xte[:2 * N_GROUP], yte[:2 * N_GROUP]
    per_angle = N_GROUP // len(ROTATIONS)
    rotated = [rotate_images(xte[N_GROUP + i * per_angle:N_GROUP + (i + 1) * per_angle], angle)
               for i, angle in enumerate(ROTATIONS)]
    x_eval = torch.cat([xte[:N_GROUP], *rotated])
    if task == "fmnist3":
        xtr, x_eval = xtr.expand(-1, 3, -1, -1), x_eval.expand(-1, 3, -1, -1).contiguous()
    return xtr, ytr, x_eval, yte
