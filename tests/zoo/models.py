"""Tiny models a user brings (Hugging Face from configs with random init, no downloads; dict and tuple outputs).

Each builder returns (model, batches, x): a float64 model in eval mode, a list of training batches in the form
the model's users feed it, and the inputs to predict on (what a batch's x is).
"""

from __future__ import annotations

from collections import UserDict

import pytest
import torch
from torch import nn

N_CLASSES = 3
VOCAB = 30
SEQ = 6
N_TRAIN = 12


def _tokens(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids (n, SEQ), attention masks with right padding of varying length, labels (n,)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, SEQ), generator=gen)
    lengths = SEQ - torch.arange(n) % 3  # 6, 5, 4, ...: padding varies between neighbouring examples
    mask = (torch.arange(SEQ) < lengths[:, None]).long()
    ids = ids * mask  # pad token 0
    return ids, mask, torch.randint(0, N_CLASSES, (n,), generator=gen)


def token_batches(kind: str = "dict", seed: int = 0) -> tuple[list, dict[str, torch.Tensor]]:
    """Training batches as mappings of ``kind`` ("dict", "userdict", "batchencoding") and test inputs."""
    ids, mask, labels = _tokens(N_TRAIN + 4, seed)
    wrap = {"dict": dict, "userdict": UserDict, "batchencoding": _batch_encoding}[kind]
    batches = [wrap({"input_ids": ids[i:i + 6], "attention_mask": mask[i:i + 6], "labels": labels[i:i + 6]})
               for i in range(0, N_TRAIN, 6)]
    return batches, {"input_ids": ids[N_TRAIN:], "attention_mask": mask[N_TRAIN:]}


def _batch_encoding(data: dict) -> object:
    transformers = pytest.importorskip("transformers")
    return transformers.BatchEncoding(data)


def tiny_bert() -> nn.Module:
    """BertForSequenceClassification, 1 layer, hidden 8, its default attention implementation."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=16, max_position_embeddings=SEQ, num_labels=N_CLASSES,
                                     pad_token_id=0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(config).double().eval()


def tiny_gpt2() -> nn.Module:
    """GPT2ForSequenceClassification (pools the last non-pad token), 1 layer, hidden 8."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=8, n_layer=1, n_head=2, n_positions=SEQ,
                                     num_labels=N_CLASSES, pad_token_id=0, bos_token_id=1, eos_token_id=1,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2ForSequenceClassification(config).double().eval()


LM_VOCAB, LM_SEQ = 7, 5  # the tiny GPT-2 LM head of the token-level tests


def tiny_gpt2_lm(tie: bool = True) -> nn.Module:
    """A 1-layer GPT-2 LM head (vocabulary 7, 5 positions, width 4), float64, eval mode.

    ``tie``: the head shares the token embedding's weight (GPT-2's default).
    """
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=LM_VOCAB, n_embd=4, n_layer=1, n_head=2, n_positions=LM_SEQ,
                                     n_inner=8, pad_token_id=0, bos_token_id=1, eos_token_id=1, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=tie)
    return transformers.GPT2LMHeadModel(config).double().eval()


def lm_batches() -> list[dict[str, torch.Tensor]]:
    """Two dict batches of 3 right-padded sequences; labels are the next tokens, -100 where there is none."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, LM_VOCAB, (6, LM_SEQ), generator=g)
    mask = (torch.arange(LM_SEQ) < torch.tensor([5, 4, 3, 5, 2, 4])[:, None]).long()
    ids = ids * mask
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = torch.where(mask[:, 1:] == 1, ids[:, 1:], -100)
    return [{"input_ids": ids[i:i + 3], "attention_mask": mask[i:i + 3], "labels": labels[i:i + 3]}
            for i in (0, 3)]


class DictWrapper(nn.Module):
    """laplace-torch's documented Hugging Face wrapper: one argument, the batch mapping."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, data: dict) -> torch.Tensor:
        return self.inner(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits


class DictOutput(nn.Module):
    """A small MLP returning {"logits": ..., "features": ...}."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(4, 6), nn.Tanh())
        self.head = nn.Linear(6, N_CLASSES)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.body(x)
        return {"logits": self.head(features), "features": features}


class TupleOutput(DictOutput):
    """A small MLP returning (logits, aux)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        out = super().forward(x)
        return out["logits"], out["features"].sum(-1)


def vector_batches(seed: int = 0) -> tuple[list, torch.Tensor]:
    """(x, y) tuple batches of 4-vectors and test inputs."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N_TRAIN + 4, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, N_CLASSES, (N_TRAIN + 4,), generator=gen)
    return [(x[i:i + 6], y[i:i + 6]) for i in range(0, N_TRAIN, 6)], x[N_TRAIN:]


class PairInput(nn.Module):
    """A model whose input is a pair (x_a (B, 4), x_b (B, 2)), passed as one tuple argument."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(4, 6)
        self.side = nn.Linear(2, 6)
        self.head = nn.Linear(6, N_CLASSES)

    def forward(self, pair: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        a, b = pair
        return self.head(torch.tanh(self.body(a) + self.side(b)))


def pair_batches(seed: int = 0) -> tuple[list, tuple[torch.Tensor, torch.Tensor]]:
    """((x_a, x_b), y) batches and test inputs (x_a, x_b)."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(N_TRAIN + 4, 4, generator=gen, dtype=torch.float64)
    b = torch.randn(N_TRAIN + 4, 2, generator=gen, dtype=torch.float64)
    y = torch.randint(0, N_CLASSES, (N_TRAIN + 4,), generator=gen)
    return [((a[i:i + 6], b[i:i + 6]), y[i:i + 6]) for i in range(0, N_TRAIN, 6)], (a[N_TRAIN:], b[N_TRAIN:])
