"""The models, data and one-case child process of benchmarks/model_zoo_cost.py.

Importable from both benchmark environments (posthoc's and laplace-torch's): it needs torch, and transformers and
peft for the GPT-2 models, nothing else at import. Run as ``python model_zoo_cost_cases.py SPEC.json``, it runs one
(model, method, library) case and writes the result JSON named in the spec.

Models (random initial weights, seeded: cost does not depend on the weights):

* ``resnet18``: the CIFAR variant of ResNet-18: a 3×3 stride-1 stem, no max-pool, BasicBlocks [2, 2, 2, 2] of
  64-512 channels with BatchNorm, global average pooling, 10 classes; 11,173,962 parameters, input (B, 3, 32, 32).
* ``wrn16_4``: the wide ResNet WRN-16-4 (pre-activation blocks, 2 per group, widths 64/128/256, no dropout),
  10 classes; 2,748,890 parameters, input (B, 3, 32, 32).
* ``gpt2``: ``GPT2ForSequenceClassification`` from ``GPT2Config()``'s defaults (124M parameters, 2 classes),
  peft LoRA r=8 (alpha 16) on every ``c_attn``: only the 294,912 adapter weights require grad. Input: token
  ids (B, 128) with right padding (pad id 50256) and attention masks.
* ``tiny_cnn`` and ``tiny_gpt2``: small versions for the tests.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from posthoc.bench.processes import peak_rss_bytes, reset_peak_rss
from posthoc.models.resnet import ResidualBlock

N_CLASSES = {"resnet18": 10, "wrn16_4": 10, "tiny_cnn": 10, "gpt2": 2, "tiny_gpt2": 2}
TOKEN_MODELS = ("gpt2", "tiny_gpt2")
SEQ_LEN = {"gpt2": 128, "tiny_gpt2": 16}
PAD_ID = {"gpt2": 50256, "tiny_gpt2": 0}
IMAGE_SHAPE = (3, 32, 32)


# --------------------------------------------------------------------------- vision models
class CifarResNet(nn.Module):
    """ResNet with a 3×3 stride-1 stem and no max-pool (the CIFAR variant); [2, 2, 2, 2] blocks is ResNet-18.

    Input (B, 3, 32, 32), logits (B, n_classes).
    """

    def __init__(self, blocks: tuple[int, ...] = (2, 2, 2, 2), widths: tuple[int, ...] = (64, 128, 256, 512),
                 n_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        layers, c_in = [], widths[0]
        for i, (n, width) in enumerate(zip(blocks, widths, strict=True)):
            for j in range(n):
                layers.append(ResidualBlock(c_in, width, 2 if (i > 0 and j == 0) else 1))
                c_in = width
        self.layers = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(c_in, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, n_classes) of images (B, 3, H, W)."""
        return self.fc(self.pool(self.layers(self.stem(x))))


class WideBlock(nn.Module):
    """Pre-activation wide-ResNet block: conv2(relu(bn2(conv1(relu(bn1(x)))))) + shortcut(x)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output (B, C_out, H/stride, W/stride)."""
        out = self.conv1(torch.relu(self.bn1(x)))
        return self.conv2(torch.relu(self.bn2(out))) + self.shortcut(x)


class WideResNet(nn.Module):
    """WRN-depth-k: a 3×3 conv to 16 channels, three groups of (depth - 4) / 6 WideBlocks of 16k, 32k, 64k channels.

    Input (B, 3, 32, 32), logits (B, n_classes). WRN-16-4: depth 16, k 4.
    """

    def __init__(self, depth: int = 16, widen: int = 4, n_classes: int = 10) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"a WRN depth must be 6n + 4, got {depth}")
        per_group, widths = (depth - 4) // 6, (16 * widen, 32 * widen, 64 * widen)
        self.stem = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        layers, c_in = [], 16
        for i, width in enumerate(widths):
            for j in range(per_group):
                layers.append(WideBlock(c_in, width, 2 if (i > 0 and j == 0) else 1))
                c_in = width
        self.layers = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.BatchNorm2d(c_in), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(c_in, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, n_classes) of images (B, 3, H, W)."""
        return self.fc(self.head(self.layers(self.stem(x))))


# --------------------------------------------------------------------------- GPT-2
def gpt2_lora(name: str) -> nn.Module:
    """GPT-2 sequence classifier with peft LoRA r=8 on ``c_attn``; only the adapters require grad.

    ``GPT2Config()``'s defaults for "gpt2" (124M parameters), 1 layer of width 32 for "tiny_gpt2". Eval mode,
    float32.
    """
    import peft
    import transformers

    small: dict[str, Any] = {} if name == "gpt2" else {"vocab_size": 100, "n_embd": 32, "n_layer": 1, "n_head": 2, "n_positions": 16,
                                        "bos_token_id": 1, "eos_token_id": 1}
    config = transformers.GPT2Config(pad_token_id=PAD_ID[name], **small)
    config.num_labels = N_CLASSES[name]
    model = transformers.GPT2ForSequenceClassification(config)
    lora = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"], lora_dropout=0.0, init_lora_weights=False,
                           fan_in_fan_out=True)  # GPT-2's Conv1D stores its weight (in, out)
    return peft.get_peft_model(model, lora).float().eval()


class DictInput(nn.Module):
    """laplace-torch's documented Hugging Face wrapper: forward(batch mapping) -> logits (B, C)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, data: dict) -> torch.Tensor:
        """Logits (B, C) for data["input_ids"] (B, L) and data["attention_mask"] (B, L)."""
        return self.inner(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits


def build_model(name: str, seed: int = 0) -> nn.Module:
    """The model ``name`` (see the module docstring) with seeded random weights, float32, eval mode."""
    torch.manual_seed(seed)
    if name in TOKEN_MODELS:
        return gpt2_lora(name)
    builders: dict[str, Callable[[], nn.Module]] = {
        "resnet18": CifarResNet,
        "wrn16_4": WideResNet,
        "tiny_cnn": lambda: CifarResNet(blocks=(1, 1), widths=(4, 8)),
    }
    if name not in builders:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(N_CLASSES)}")
    return builders[name]().float().eval()


# --------------------------------------------------------------------------- data
def make_inputs(model_name: str, n: int, seed: int) -> dict[str, torch.Tensor]:
    """Seeded random inputs and labels for ``n`` examples.

    Images x (n, 3, 32, 32) ~ N(0, 1), or token ids and right-padded attention masks (n, L) (lengths uniform in
    [L/2, L]); labels y (n,) uniform over the classes.
    """
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, N_CLASSES[model_name], (n,), generator=gen)
    if model_name not in TOKEN_MODELS:
        return {"x": torch.randn(n, *IMAGE_SHAPE, generator=gen), "y": y}
    length = SEQ_LEN[model_name]
    vocab = PAD_ID[model_name] if model_name == "gpt2" else 100
    ids = torch.randint(1, vocab, (n, length), generator=gen)
    lengths = torch.randint(length // 2, length + 1, (n,), generator=gen)
    mask = (torch.arange(length) < lengths[:, None]).long()
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, PAD_ID[model_name]))
    return {"input_ids": ids, "attention_mask": mask, "y": y}


def batches(data: dict[str, torch.Tensor], batch_size: int) -> torch.utils.data.DataLoader:
    """A DataLoader (in order) of [x, y] image batches, or of {"input_ids", "attention_mask", "labels"} mappings.

    laplace-torch reads ``loader.dataset``; posthoc takes any iterable.
    """
    dataset: Any
    if "x" in data:
        dataset = torch.utils.data.TensorDataset(data["x"], data["y"])
    else:
        dataset = [{"input_ids": ids, "attention_mask": mask, "labels": y}
                   for ids, mask, y in zip(data["input_ids"], data["attention_mask"], data["y"], strict=True)]
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)


def inputs(data: dict[str, torch.Tensor], batch_size: int) -> list:
    """The inputs alone in batches: image tensors (B, 3, 32, 32), or {"input_ids", "attention_mask"} (B, L)."""
    n = len(data["y"])
    if "x" in data:
        return [data["x"][i:i + batch_size] for i in range(0, n, batch_size)]
    return [{k: data[k][i:i + batch_size] for k in ("input_ids", "attention_mask")} for i in range(0, n, batch_size)]


def logits_of(model: nn.Module, x: Any) -> torch.Tensor:
    """The model's logits (B, C) for a batch input (an image tensor or a token mapping without labels)."""
    if isinstance(x, torch.Tensor):
        return model(x)
    out = model(x) if isinstance(model, DictInput) else model(**x)
    return out if isinstance(out, torch.Tensor) else out.logits


# --------------------------------------------------------------------------- measuring
def map_forward_backward(model: nn.Module, loader: Iterable) -> float:
    """Seconds of one MAP forward+backward pass (summed cross-entropy) over ``loader``.

    Gradients of the parameters that require grad; the model stays in eval mode (as the fits run it).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    start = time.perf_counter()
    for batch in loader:
        x, y = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) else (
            {k: v for k, v in batch.items() if k != "labels"}, batch["labels"])
        loss = nn.functional.cross_entropy(logits_of(model, x), y, reduction="sum")
        torch.autograd.grad(loss, params)
    return time.perf_counter() - start


class EigTimer:
    """Times the factor eigendecompositions.

    ``with timer.patching(owner, name):`` times every call of ``owner.name`` into ``timer.seconds`` and restores
    the attribute afterwards.
    """

    def __init__(self) -> None:
        self.seconds = 0.0

    @contextmanager
    def patching(self, owner: Any, name: str) -> Iterator[None]:
        """Replace ``owner.name`` by a timed version of itself while the block runs."""
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        setattr(owner, name, timed)
        try:
            yield
        finally:
            setattr(owner, name, original)


def eig_function(library: str) -> tuple[Any, str]:
    """(owner, attribute) of the function that eigendecomposes the Kronecker factors in ``library``."""
    if library == "posthoc":
        import posthoc.laplace.structures.kron as kron_module

        return kron_module, "factor_eigh"
    from laplace.utils import matrix

    return matrix.Kron, "decompose"


def posthoc_method(spec: dict[str, Any], model: nn.Module):
    """A posthoc Laplace or ScaLLA object for the case (token models get their mapping batches as keywords)."""
    from posthoc import Laplace, ScaLLA

    call = {"mapping_call": "kwargs"} if spec["model"] in TOKEN_MODELS else {}
    if spec["method"] == "scalla":
        return ScaLLA(model, "classification", progress=False, **spec["scalla"], **call)
    subset, structure = METHODS[spec["method"]]
    return Laplace(model, "classification", subset_of_weights=subset, hessian_structure=structure, progress=False,
                   **call)


def laplace_torch_method(spec: dict[str, Any], model: nn.Module):
    """A laplace-torch 0.3 Laplace object for the case (its default backend)."""
    import laplace

    subset, structure = METHODS[spec["method"]]
    return laplace.Laplace(model, "classification", subset_of_weights=subset, hessian_structure=structure)


METHODS = {"ll_kron": ("last_layer", "kron"), "kron": ("all", "kron"), "diag": ("all", "diag"),
           "lora_kron": ("all", "kron")}


def library_version(library: str) -> str:
    """The version string of the library that runs the case."""
    from importlib.metadata import version

    return version("posthoc" if library == "posthoc" else "laplace-torch")


def run_case(spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Run one case, yielding the result record after every phase (so a killed case keeps what it measured).

    Phases: MAP forward+backward over the N training inputs; fit (data pass and eigendecompositions apart; peak
    RSS); the MAP forward+backward again (a shared machine's speed drifts); glm predictive (probit) on up to ``n_predict`` new inputs in batches of ``predict_batch`` until
    ``predict_budget_s`` is spent (peak RSS).
    """
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    record: dict[str, Any] = {"status": "running", "versions": {"torch": torch.__version__,
                              spec["library"]: library_version(spec["library"])},
                              "load_average": list(os.getloadavg())}
    model = build_model(spec["model"])
    record["n_params"] = sum(p.numel() for p in model.parameters())
    record["n_params_grad"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    data = make_inputs(spec["model"], spec["n"], seed=1)
    loader = batches(data, spec["batch_size"])
    if spec["library"] == "laplace-torch" and spec["model"] in TOKEN_MODELS:
        model = DictInput(model).eval()
    record["map_fwd_bwd_s"] = map_forward_backward(model, loader)
    yield record
    timer = EigTimer()
    method = (posthoc_method if spec["library"] == "posthoc" else laplace_torch_method)(spec, model)
    gc.collect()
    record["peak_reset"] = reset_peak_rss()
    with timer.patching(*eig_function(spec["library"])):
        start = time.perf_counter()
        method.fit(loader)
        record["fit_s"] = time.perf_counter() - start
    record["eig_s"] = timer.seconds
    if spec["method"] == "scalla":
        record["scalla_training_s"] = method.train_record["wall_time_s"]
        record["data_pass_s"] = record["fit_s"] - record["scalla_training_s"]
    else:
        record["data_pass_s"] = record["fit_s"] - timer.seconds
    record["fit_peak_bytes"] = peak_rss_bytes()
    yield record
    record["map_fwd_bwd_after_s"] = map_forward_backward(model, loader)  # again: the machine's speed drifts
    yield record
    test = inputs(make_inputs(spec["model"], spec["n_predict"], seed=2), spec["predict_batch"])
    del loader, data
    gc.collect()
    reset_peak_rss()
    done, start = 0, time.perf_counter()
    with torch.no_grad() if spec["method"] == "scalla" else torch.enable_grad():
        for x in test:
            probs = method(x) if spec["method"] == "scalla" else method(x, pred_type="glm", link_approx="probit")
            if not bool(torch.isfinite(probs).all()):
                raise FloatingPointError("non-finite predictive probabilities")
            done += len(probs)
            if time.perf_counter() - start > spec["predict_budget_s"]:
                break
    elapsed = time.perf_counter() - start
    record.update(predict_points=done, predict_s=elapsed, predict_s_per_100=100.0 * elapsed / done,
                  predict_peak_bytes=peak_rss_bytes(), status="done")
    yield record


def write_json(path: str, obj: dict[str, Any]) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (a temporary file beside it, then a rename)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1)
    os.replace(tmp, path)


def child_main(spec_path: str) -> int:
    """Run the case of the spec at ``spec_path``, writing its record after every phase; 0 on success, 1 on error."""
    with open(spec_path) as fh:
        spec = json.load(fh)
    record: dict[str, Any] = {"status": "running"}
    try:
        for record in run_case(spec):
            record["child_maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            write_json(spec["result"], record)
    except MemoryError:
        record.update(status="over memory", message="MemoryError (the address-space cap)")
    except Exception as exc:  # noqa: BLE001 -- every failure becomes the case's recorded result
        text = f"{type(exc).__name__}: {exc}"
        oom = any(s in text.lower() for s in ("bad_alloc", "not enough memory", "can't allocate", "out of memory"))
        record.update(status="over memory" if oom else "error", message=text[:500],
                      traceback=traceback.format_exc()[-3000:])
    else:
        return 0
    record["child_maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    write_json(spec["result"], record)
    return 1


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1]))
