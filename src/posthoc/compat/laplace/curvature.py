"""``laplace.curvature``'s backend names as marker classes that choose posthoc's curvature.

posthoc computes its curvatures itself, so a backend class only says which one: a GGN backend means
``curvature="ggn"`` (``"ggn_mc"`` with ``backend_kwargs={"stochastic": True}``), an EF backend ``"ef"``;
a Hessian backend is refused (posthoc fits GGN and EF curvatures only). The classes cannot be instantiated.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "CurvatureInterface", "GGNInterface", "EFInterface", "BackPackInterface", "BackPackGGN", "BackPackEF",
    "AsdlInterface", "AsdlGGN", "AsdlEF", "AsdlHessian", "CurvlinopsInterface", "CurvlinopsGGN", "CurvlinopsEF",
    "CurvlinopsHessian", "AsdfghjklInterface", "AsdfghjklGGN", "AsdfghjklEF", "AsdfghjklHessian",
]


class CurvatureInterface:
    """Base of the backend markers; ``curvature_kind`` is "ggn", "ef", "hessian" or None (no curvature chosen)."""

    curvature_kind: ClassVar[str | None] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(f"{type(self).__name__} is a marker for posthoc.compat.laplace: pass the class itself as "
                        "Laplace(..., backend=...), posthoc computes the curvature")


class GGNInterface(CurvatureInterface):
    """Generalised Gauss-Newton backends: ``curvature="ggn"`` (``"ggn_mc"`` with ``stochastic=True``)."""

    curvature_kind = "ggn"


class EFInterface(CurvatureInterface):
    """Empirical Fisher backends: ``curvature="ef"``."""

    curvature_kind = "ef"


class _HessianInterface(CurvatureInterface):
    curvature_kind = "hessian"


class BackPackInterface(CurvatureInterface):
    """BackPACK's backends (the library is not needed)."""


class BackPackGGN(BackPackInterface, GGNInterface):
    """BackPACK's GGN: ``curvature="ggn"``."""


class BackPackEF(BackPackInterface, EFInterface):
    """BackPACK's empirical Fisher: ``curvature="ef"``."""


class AsdlInterface(CurvatureInterface):
    """ASDL's backends (the library is not needed)."""


class AsdlGGN(AsdlInterface, GGNInterface):
    """ASDL's GGN: ``curvature="ggn"``."""


class AsdlEF(AsdlInterface, EFInterface):
    """ASDL's empirical Fisher: ``curvature="ef"``."""


class AsdlHessian(AsdlInterface, _HessianInterface):
    """ASDL's Hessian: refused (posthoc fits GGN and EF curvatures)."""


class CurvlinopsInterface(CurvatureInterface):
    """curvlinops' backends (laplace-torch's default)."""


class CurvlinopsGGN(CurvlinopsInterface, GGNInterface):
    """curvlinops' GGN: ``curvature="ggn"``."""


class CurvlinopsEF(CurvlinopsInterface, EFInterface):
    """curvlinops' empirical Fisher: ``curvature="ef"``."""


class CurvlinopsHessian(CurvlinopsInterface, _HessianInterface):
    """curvlinops' Hessian: refused (posthoc fits GGN and EF curvatures)."""


class AsdfghjklInterface(CurvatureInterface):
    """The old asdfghjkl backends."""


class AsdfghjklGGN(AsdfghjklInterface, GGNInterface):
    """asdfghjkl's GGN: ``curvature="ggn"``."""


class AsdfghjklEF(AsdfghjklInterface, EFInterface):
    """asdfghjkl's empirical Fisher: ``curvature="ef"``."""


class AsdfghjklHessian(AsdfghjklInterface, _HessianInterface):
    """asdfghjkl's Hessian: refused (posthoc fits GGN and EF curvatures)."""


def backend_kind(backend: Any) -> str | None:
    """The curvature a backend class asks for: "ggn", "ef", "hessian" or None.

    A marker class above answers with its ``curvature_kind``; a class of laplace-torch itself (or any class named
    like one) by the end of its name (GGN, EF, Hessian).

    Raises:
        TypeError: ``backend`` is not a class.
    """
    if not isinstance(backend, type):
        raise TypeError(f"backend must be a backend class (e.g. CurvlinopsGGN), got {backend!r}")
    if issubclass(backend, CurvatureInterface):
        return backend.curvature_kind
    for suffix, kind in (("GGN", "ggn"), ("EF", "ef"), ("Hessian", "hessian")):
        if backend.__name__.endswith(suffix):
            return kind
    return None
