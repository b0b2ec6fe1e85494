"""Which layers the per-layer curvature routes treat, and one recorder of their inputs and output gradients.

One decision for every path that reads a layer's inputs and output gradients instead of differentiating the
whole network (KFAC, the per-layer diagonal and glm routes of :mod:`posthoc.curvature.jacobians`, and
streamlined moment propagation's affine rule): :func:`layer_kind` says whether a module is an affine map
y_l = W a_l + b at positions l, and :func:`conv_padding` how a Conv2d's padding reads as integers. Each path
then treats the kinds it implements and sends everything else to its own exact fallback.

- ``nn.Linear`` (and subclasses: peft LoRA's ``lora_A``/``lora_B``, ``nn.MultiheadAttention``'s ``out_proj``,
  whose call pattern decides elsewhere) on inputs (B, ..., D_in): weight (D_out, D_in), positions = the middle
  dimensions.
- transformers' ``Conv1D`` (GPT-2): the same map with the weight stored transposed, (D_in, D_out).
- ``nn.Conv2d`` with groups = 1, ``padding_mode="zeros"`` and padding that is integers, ``"valid"``, or
  ``"same"`` where PyTorch pads symmetrically (stride 1 and dilation·(k − 1) even in both dimensions); its
  inputs are the unfolded patches (C_in·kh·kw per position). Grouped convolutions, other padding modes and
  asymmetric "same" padding are not affine maps of unfolded patches in this layout: no kind (each path's
  fallback).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from posthoc.curvature.norm_affine import NORM_LAYERS, norm_channels_first
from posthoc.utils.conv import conv_input_gram, unfold_patches
from posthoc.utils.linalg import gram


class LayerKind(str, Enum):
    """An affine layer the per-layer routes can read: y_l = W a_l + b at each weight-sharing position l."""

    LINEAR = "linear"
    CONV1D = "conv1d"  # transformers' Conv1D: weight stored (D_in, D_out)
    CONV2D = "conv2d"


def _is_hf_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (found by class name: transformers need not be installed)."""
    return any(cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers.")
               for cls in type(module).__mro__)


def conv_padding(module: nn.Conv2d) -> tuple[int, int] | None:
    """The zero padding (ph, pw) on each side that ``module`` applies, or None when it is not symmetric integers.

    Integers and tuples are returned as they are, ``"valid"`` as (0, 0), and ``"same"`` as dilation·(k − 1) / 2
    per dimension when that is an integer (PyTorch allows "same" only with stride 1 and pads the odd remainder
    on one side only, which is not a symmetric padding). ``padding_mode`` is not looked at
    (:func:`conv_support_problem` is). Cost: O(1).
    """
    padding = module.padding
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        out = []
        for k, d in zip(module.kernel_size, module.dilation, strict=True):
            total = d * (k - 1)
            if total % 2:
                return None
            out.append(total // 2)
        return (out[0], out[1])
    if isinstance(padding, str):
        return None
    return (int(padding[0]), int(padding[1]))


def conv_support_problem(module: nn.Conv2d) -> str | None:
    """Why the per-layer routes cannot read ``module`` as unfolded patches times its weight, or None if they can.

    Cost: O(1).
    """
    if module.groups != 1:
        return f"groups={module.groups} (supported: groups=1)"
    if module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r} (supported: 'zeros')"
    if conv_padding(module) is None:
        return (f"padding={module.padding!r} with kernel {module.kernel_size} and dilation {module.dilation} "
                "pads asymmetrically (supported: integer padding, 'valid', or 'same' with dilation*(k-1) even)")
    return None


def layer_kind(module: nn.Module) -> LayerKind | None:
    """The :class:`LayerKind` of ``module``, or None when no per-layer route can read it (see the module doc).

    Cost: O(1).
    """
    if isinstance(module, nn.Linear):
        return LayerKind.LINEAR
    if isinstance(module, nn.Conv2d):
        return LayerKind.CONV2D if conv_support_problem(module) is None else None
    if _is_hf_conv1d(module):
        return LayerKind.CONV1D
    return None


def weight_is_transposed(module: nn.Module) -> bool:
    """True when ``module``'s weight is stored (D_in, D_out) (transformers' Conv1D), not (D_out, D_in)."""
    return layer_kind(module) is LayerKind.CONV1D


def _is_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a BatchNorm, LayerNorm or GroupNorm (:mod:`posthoc.curvature.norm_affine`'s layout)."""
    return isinstance(module, NORM_LAYERS)


def out_dim(module: nn.Module) -> int:
    """D_out of a layer of any :class:`LayerKind`, or the entries of γ of a normalisation layer."""
    if _is_norm(module):
        weight = module.weight
        assert isinstance(weight, torch.Tensor)
        return weight.numel()
    if isinstance(module, nn.Conv2d):
        return module.out_channels
    if isinstance(module, nn.Linear):
        return module.out_features
    weight = module.weight  # Conv1D: (D_in, D_out)
    assert isinstance(weight, torch.Tensor)
    return int(weight.shape[1])


def _conv_geometry(module: nn.Conv2d) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int]]:
    """(kernel size, dilation, padding, stride) of a supported Conv2d as pairs (ValueError for an unsupported one)."""
    padding = conv_padding(module)
    problem = conv_support_problem(module)
    if problem is not None or padding is None:
        raise ValueError(f"Conv2d with {problem} cannot be read as unfolded patches")
    k, d, s = module.kernel_size, module.dilation, module.stride
    return (k[0], k[1]), (d[0], d[1]), padding, (s[0], s[1])


def positions(module: nn.Module, output: torch.Tensor) -> int:
    """Weight-sharing positions L of one example from the layer's output (B, ..., D_out) or (B, C, H, W)."""
    if _is_norm(module):
        return output[0].numel() // out_dim(module)
    if isinstance(module, nn.Conv2d):
        return output.shape[-2] * output.shape[-1]
    return output[0].numel() // output.shape[-1]


def patches(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Layer inputs per weight-sharing position, channels first: (B, D_in, L).

    Conv2d: the unfolded input, channel-major like the flattened weight (a copy, kh·kw times x). Linear and
    Conv1D: a transposed view of x (B, ..., D_in).
    """
    if isinstance(module, nn.Conv2d):
        return unfold_patches(x, *_conv_geometry(module))
    return x.reshape(x.shape[0], -1, x.shape[-1]).mT


def channels_first(module: nn.Module, grad: torch.Tensor) -> torch.Tensor:
    """A gradient in the layer's output, (B, *output), as (B, D_out, L) (a view; normalisation layers: (B, D, L))."""
    if _is_norm(module):
        return norm_channels_first(module, grad)
    if isinstance(module, nn.Conv2d):
        return grad.flatten(2)
    return grad.reshape(grad.shape[0], -1, grad.shape[-1]).mT


def input_gram(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Σ over examples and positions of a aᵀ for the inputs a of ``module`` at its layer input x: (D_in, D_in).

    Conv2d: :func:`posthoc.utils.conv.conv_input_gram`, the patches' gram without unfolding them (about 3x
    fewer multiplications for a 3x3 convolution). Linear/Conv1D: the gram of the inputs, O(B·L·D_in²).
    """
    if isinstance(module, nn.Conv2d):
        return conv_input_gram(x, *_conv_geometry(module))
    return gram(patches(module, x))


@dataclass
class LayerRecord:
    """One forward pass with chosen layers' inputs and output handles recorded (:func:`record_layers`).

    ``outputs`` the model's outputs; ``inputs[name]`` a detached copy of the layer's input at its first call
    (layers named in ``copy_inputs`` only); ``leaves[name]`` a zero leaf z added to the layer's output at its
    first call, so ∂/∂z is the gradient in that output even if a later in-place operation overwrites it, and a
    backward to the leaves stops at the earliest layer; ``calls[name]`` how often the layer ran.
    """

    outputs: torch.Tensor
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    leaves: dict[str, torch.Tensor] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    def called_once(self) -> bool:
        """Whether every recorded layer ran exactly once."""
        return all(n == 1 for n in self.calls.values())

    def not_per_example(self, batch: int) -> list[str]:
        """The recorded layers whose output does not have ``batch`` rows (not per example).

        E.g. GPT-2's position embedding, applied to (1, L) position ids and broadcast over the batch: its inputs
        and output gradients are not per example, so no per-example route may read them.
        """
        return [name for name, leaf in self.leaves.items() if leaf.ndim == 0 or leaf.shape[0] != batch]


def record_layers(run: Callable[[], torch.Tensor], modules: Mapping[str, nn.Module], copy_inputs: Iterable[str],
                  refuse_reuse: bool) -> LayerRecord:
    """Run ``run()`` (a forward pass) with grad enabled, recording ``modules`` (name -> module) as in LayerRecord.

    With ``refuse_reuse`` a layer called a second time raises RuntimeError during the forward (a record keeps
    one call per layer, which would silently drop the others); otherwise the calls are only counted
    (:meth:`LayerRecord.called_once`). Cost: the forward pass, plus a copy of each recorded input and a zero
    tensor the size of each recorded output.
    """
    record = LayerRecord(outputs=torch.empty(0), calls={name: 0 for name in modules})
    copied = set(copy_inputs)
    handles = []
    for name, module in modules.items():
        def post(mod: nn.Module, args: tuple, output: torch.Tensor, name: str = name) -> torch.Tensor | None:
            record.calls[name] += 1
            if record.calls[name] > 1:
                if refuse_reuse:
                    raise RuntimeError(
                        f"layer {name!r} was called more than once in one forward pass, but its Kronecker block "
                        "was fitted for a layer called once (the call pattern changed with the inputs?); a reused "
                        "layer needs the diagonal block: fit again on inputs that call the layers as at prediction")
                return None
            if name in copied:
                # a copy: the model may overwrite its layer inputs in place later in the forward
                record.inputs[name] = args[0].detach().clone()
            leaf = torch.zeros_like(output, requires_grad=True)
            record.leaves[name] = leaf
            return output + leaf
        handles.append(module.register_forward_hook(post))
    try:
        with torch.enable_grad():  # callers may run under no_grad (prediction)
            record.outputs = run()
    finally:
        for handle in handles:
            handle.remove()
    return record
