"""One rule for every registry of plug-ins (structures, bench methods, models, fiber stage-2 maps)."""

from __future__ import annotations

from typing import TypeVar

T = TypeVar("T")


def add_to_registry(registry: dict[str, T], name: str, entry: T, what: str, replace: bool = False) -> T:
    """Put ``entry`` under ``name`` in ``registry`` and return it.

    Raises ValueError for an empty name, or for a name already registered unless ``replace=True``; ``what``
    names the kind of entry in the message (e.g. "hessian_structure", "method").
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a {what} name must be a non-empty string, got {name!r}")
    if name in registry and not replace:
        raise ValueError(f"{what} {name!r} is already registered; pass replace=True to replace it")
    registry[name] = entry
    return entry
