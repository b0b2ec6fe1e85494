"""Laplace on the LoRA adapters of a small GPT-2-style classifier: NLL and ECE before and after, held-out data.

    .venv/bin/python examples/llm_lora.py            # a few minutes on 2 CPU cores
    .venv/bin/python examples/llm_lora.py --quick    # seconds (few sequences, one epoch)

The task is generated here, no download: sentiment-like token rules over a 64-token vocabulary. A sequence of
8-24 tokens mixes neutral words with "positive" (tokens 2-11) and "negative" (12-21) words; token 22 ("not")
flips the sentiment of the word after it. The label is 1 when the signed count is positive, 0 when negative
(ties are redrawn), and 10% of labels are flipped, so a calibrated model cannot be certain. Sequences are
right-padded with token 0 and carry an attention mask.

The model is ``GPT2ForSequenceClassification`` built from a ``transformers.GPT2Config`` (2 layers, width 64,
random init, eager attention, float64). It is first trained in full on the rule without "not" (a stand-in for
pre-training); peft then adds rank-8 LoRA adapters to the attention and MLP projections, and the adapters and
the classification head are fine-tuned on the rule with "not". The head is then frozen, so the Laplace
approximation (``posthoc.Laplace``, all trainable weights, KFAC) covers the adapters only: it takes the
parameters that require grad. The batches are dicts (``input_ids``, ``attention_mask``, ``labels``), passed to
the model as keyword arguments without the labels. The prior precision is chosen by validation NLL (grid search).
"""

from __future__ import annotations

from typing import Any

import peft
import torch
import transformers
from example_io import parse_args, write_metrics

import posthoc
from posthoc import metrics
from posthoc.plots import reliability_diagram, save_figure

VOCAB, PAD, NOT = 64, 0, 22
POSITIVE, NEGATIVE = range(2, 12), range(12, 22)
LABEL_NOISE = 0.1


def make_sequences(n: int, generator: torch.Generator, negation: bool = True) -> dict[str, torch.Tensor]:
    """The n sequences of the token rules (with "not" if ``negation``): ``input_ids``, ``attention_mask`` (n, 24), ``labels`` (n,)."""
    max_len = 24
    input_ids = torch.full((n, max_len), PAD, dtype=torch.long)
    attention_mask = torch.zeros((n, max_len), dtype=torch.long)
    labels = torch.empty(n, dtype=torch.long)
    row = 0
    while row < n:
        length = int(torch.randint(8, max_len + 1, (1,), generator=generator))
        tokens = torch.randint(23, VOCAB, (length,), generator=generator)          # neutral words
        kinds = torch.rand(length, generator=generator)
        sentiment = torch.randint(2, 22, (length,), generator=generator)
        tokens = torch.where(kinds < 0.3, sentiment, tokens)
        if negation:
            tokens = torch.where((kinds >= 0.3) & (kinds < 0.4), torch.full_like(tokens, NOT), tokens)
        score = 0
        for position in range(length):
            token = int(tokens[position])
            sign = 1 if token in POSITIVE else -1 if token in NEGATIVE else 0
            if position > 0 and int(tokens[position - 1]) == NOT:
                sign = -sign
            score += sign
        if score == 0:
            continue
        input_ids[row, :length], attention_mask[row, :length] = tokens, 1
        label = int(score > 0)
        labels[row] = 1 - label if float(torch.rand((), generator=generator)) < LABEL_NOISE else label
        row += 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def batches(data: dict[str, torch.Tensor], batch_size: int, shuffle: bool = False,
            generator: torch.Generator | None = None) -> list[dict[str, torch.Tensor]]:
    """``data`` cut into a list of dict batches (shuffled with ``generator`` when ``shuffle``)."""
    n = len(data["input_ids"])
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    return [{key: value[order[i:i + batch_size]] for key, value in data.items()} for i in range(0, n, batch_size)]


def build_model() -> torch.nn.Module:
    """A random-init GPT-2 classifier from a config (about 0.1M weights)."""
    torch.manual_seed(0)
    settings: dict[str, Any] = {"num_labels": 2, "pad_token_id": PAD, "bos_token_id": 1, "eos_token_id": 1,
                "attn_implementation": "eager"}     # PretrainedConfig's keyword arguments
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=64, n_layer=2, n_head=4,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **settings)
    return transformers.GPT2ForSequenceClassification(config)


def add_adapters(base: torch.nn.Module) -> torch.nn.Module:
    """Rank-8 LoRA adapters (peft) on the attention and MLP projections; adapters and head train, the rest is frozen."""
    lora = peft.LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.0,
                           target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    return peft.get_peft_model(base, lora)


def train(model: torch.nn.Module, data: dict[str, torch.Tensor], epochs: int, lr: float) -> None:
    """AdamW on the cross-entropy of the parameters that require grad, batches of 32."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(1)
    model.train()
    for epoch in range(epochs):
        total = 0.0
        for batch in batches(data, 32, shuffle=True, generator=generator):
            optimizer.zero_grad()
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(batch["labels"])
        print(f"epoch {epoch + 1}: train loss {total / len(data['labels']):.4f}", flush=True)
    model.eval()


def predict(model_or_laplace: torch.nn.Module | posthoc.Laplace, data: dict[str, torch.Tensor]) -> torch.Tensor:
    """Class probabilities (n, 2): the network's softmax for a model, ``la(x)`` for a Laplace."""
    parts = []
    for batch in batches({key: value for key, value in data.items() if key != "labels"}, 100):
        if isinstance(model_or_laplace, posthoc.Laplace):
            parts.append(model_or_laplace(batch))
        else:
            with torch.no_grad():
                parts.append(model_or_laplace(**batch).logits.softmax(-1))
    return torch.cat(parts)


def main() -> None:
    """Train the adapters, fit and tune Laplace on them, and compare MAP and Laplace on held-out sequences."""
    args = parse_args(__doc__.splitlines()[0])
    torch.set_default_dtype(torch.float64)    # a small model: float64 resolves any prior precision of the grid
    generator = torch.Generator().manual_seed(0)
    n_train, n_val, n_test, epochs = (128, 64, 128, 1) if args.quick else (4000, 500, 2000, 6)
    pretrain_data = make_sequences(n_train, generator, negation=False)
    train_data, val_data, test_data = (make_sequences(n, generator) for n in (n_train, n_val, n_test))
    base = build_model()
    train(base, pretrain_data, epochs, lr=1e-3)
    model = add_adapters(base)
    train(model, train_data, epochs, lr=2e-3)
    for name, parameter in model.named_parameters():
        if "lora_" not in name:
            parameter.requires_grad_(False)        # Laplace covers what requires grad: the adapters only
    n_adapter = sum(p.numel() for p in model.parameters() if p.requires_grad)

    la = posthoc.Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron", progress=False)
    la.fit(batches(train_data, 64))
    la.optimize_prior_precision(method="gridsearch", val_loader=batches(val_data, 100),
                                grid_size=5 if args.quick else 21)

    labels = test_data["labels"]
    results: dict[str, float] = {"adapter_parameters": float(n_adapter)}
    bins = {}
    for key, method in (("map", model), ("laplace", la)):
        probs = predict(method, test_data)
        results[f"{key}_accuracy"] = metrics.accuracy(probs, labels)
        results[f"{key}_nll"] = metrics.nll(probs, labels)
        results[f"{key}_ece"] = metrics.ece(probs, labels)
        bins["MAP (LoRA)" if key == "map" else "Laplace on the adapters"] = metrics.calibration_bins(probs, labels)
    results["prior_precision"] = float(la.prior_precision.mean())
    save_figure(reliability_diagram(bins, title="GPT-2 + LoRA, synthetic sentiment, held-out"),
                args.out / "llm_lora_reliability.png")
    write_metrics(args.out, "llm_lora", results)


if __name__ == "__main__":
    main()
