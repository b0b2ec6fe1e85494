"""Input validation shared by every module.

Each check raises before any long work starts, with a message that names the
argument, what was wrong and how to fix it.
"""

from __future__ import annotations

from enum import Enum
from typing import Literal, TypeVar, overload

import torch

E = TypeVar("E", bound=Enum)


def check_choice(value: object, enum: type[E], name: str) -> E:
    """Convert ``value`` (an enum member or its string value) to ``enum``.

    Raises ``ValueError`` listing the valid options when ``value`` is unknown.
    """
    if isinstance(value, enum):
        return value
    for member in enum:
        if value == member.value:
            return member
    options = ", ".join(repr(m.value) for m in enum)
    raise ValueError(f"unknown {name} {value!r}; choose one of {options}")


def check_finite(x: torch.Tensor, name: str) -> torch.Tensor:
    """Raise ``ValueError`` if ``x`` holds NaN or Inf (cost: one reduction over ``x``, no copy).

    A finite sum proves every entry finite (a NaN or Inf entry makes the sum NaN or Inf); only a sum that is not
    finite (bad entries, or finite ones overflowing the dtype) takes the element-wise check.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if (x.is_floating_point() or x.is_complex()) and not bool(torch.isfinite(x.sum())):
        bad = ~torch.isfinite(x)
        if bool(bad.any()):
            n_bad = int(bad.sum())
            raise ValueError(
                f"{name} contains {n_bad} NaN/Inf value(s) out of {x.numel()}; "
                "clean or impute the inputs before calling"
            )
    return x


def check_ndim(x: torch.Tensor, ndim: int | tuple[int, ...], name: str, shape_doc: str) -> torch.Tensor:
    """Raise ``ValueError`` unless ``x.ndim`` is ``ndim`` (or one of them)."""
    allowed = (ndim,) if isinstance(ndim, int) else ndim
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape_doc}, got {type(x).__name__}")
    if x.ndim not in allowed:
        raise ValueError(f"{name} must have shape {shape_doc}, got {tuple(x.shape)}")
    return x


def check_integer_labels(y: torch.Tensor, name: str = "y") -> torch.Tensor:
    """Class labels of any shape as int64; float labels must be whole numbers (0.7 is an error, not class 0)."""
    if y.is_floating_point():
        if not bool(torch.all(y == y.round())):
            raise ValueError(f"{name} must hold integer class labels, got non-integer floats")
        y = y.long()
    return y


def check_labels(y: torch.Tensor, n_classes: int, name: str = "y") -> torch.Tensor:
    """Check integer class labels in ``[0, n_classes)``; returns ``y`` as int64."""
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integer class labels")
    y = check_integer_labels(y, name)
    if y.ndim != 1:
        raise ValueError(f"{name} must have shape (N,), got {tuple(y.shape)}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= n_classes):
        raise ValueError(
            f"{name} has labels in [{int(y.min())}, {int(y.max())}] but there are "
            f"{n_classes} classes; labels must lie in [0, {n_classes - 1}]"
        )
    return y.long()


def check_positive(value: float | torch.Tensor, name: str) -> None:
    """Raise ``ValueError`` unless every entry of ``value`` is finite and > 0.

    Works on tensors that require grad (nothing is differentiated). The message shows the offending value
    (a scalar) or the first offending entry and its position (a tensor).
    """
    t = torch.as_tensor(value).detach()
    bad = ~(torch.isfinite(t) & (t > 0))
    if bool(bad.any()):
        if t.numel() == 1:
            shown = f"{t.item()!r}"
        else:
            first = int(torch.nonzero(bad.reshape(-1))[0])
            shown = f"entry {first} = {t.reshape(-1)[first].item()!r} (of {t.numel()})"
        raise ValueError(f"{name} must be finite and > 0, got {shown}")


def batch_shape(example_shape: tuple[int, ...] | None) -> str:
    """"(B, d1, d2)" for the shape of one example, as error messages name a batch's shape."""
    return "(" + ", ".join(["B", *map(str, example_shape or ())]) + ")"


def check_int(value: object, name: str, hint: str = "") -> int:
    """Return ``value`` if it is an ``int`` of any sign (``bool`` refused); else raise TypeError naming ``name``.

    A float or a tensor where an int is meant (a class index such as ``ignore_index``) would compare unpredictably.
    Cost: O(1).
    """
    if isinstance(value, bool) or not isinstance(value, int):
        extra = f" ({hint})" if hint else ""
        raise TypeError(f"{name} must be an int{extra}, got {value!r}")
    return value


@overload
def check_positive_int(value: object, name: str, hint: str = "", *, allow_none: Literal[False] = False) -> int: ...


@overload
def check_positive_int(value: object, name: str, hint: str = "", *, allow_none: bool) -> int | None: ...


def check_positive_int(value: object, name: str, hint: str = "", *, allow_none: bool = False) -> int | None:
    """Return ``value`` if it is an ``int`` >= 1 (``bool`` refused); else raise.

    Typed to return ``int`` when ``allow_none`` is left ``False``, so callers need no cast. Cost: O(1).

    Args:
        value: The argument to check.
        name: The argument's name, used in the message.
        hint: Appended to the message (e.g. what the argument means or how to choose it).
        allow_none: Accept ``None`` (returned unchanged) for optional arguments.

    Raises:
        ValueError: When ``value`` is not a positive ``int`` (or ``None`` where allowed).
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        extra = f" ({hint})" if hint else ""
        none = " or None" if allow_none else ""
        raise ValueError(f"{name} must be a positive int{none}{extra}, got {value!r}")
    return value
