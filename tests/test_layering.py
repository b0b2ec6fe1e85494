"""No module of posthoc imports a module of a higher layer (module-level or inside functions).

Layers, low to high: utils, distributed, likelihood, network; data, metrics, predictive, curvature; models,
plots; laplace, baselines; scalla, streamlined, fiber; bench; cli; compat. Imports within a layer are allowed. The
package's own ``__init__.py`` files that re-export public names (``posthoc/__init__.py``) and the deprecated
shims left at old paths are exempt.
"""

from __future__ import annotations

import ast
from pathlib import Path

import posthoc

LAYERS: list[set[str]] = [
    {"utils", "distributed", "likelihood", "network"},
    {"data", "metrics", "predictive", "curvature"},
    {"models", "plots"},
    {"laplace", "baselines"},
    {"scalla", "streamlined", "fiber"},
    {"bench"},
    {"cli"},
    {"compat"},
]
LEVEL = {package: level for level, packages in enumerate(LAYERS) for package in packages}

ROOT = Path(posthoc.__file__).parent
EXEMPT = {
    "posthoc/__init__.py",  # re-exports the estimators of every layer
    "posthoc/laplace/subset.py",  # deprecated shim of posthoc.network.subset
    "posthoc/laplace/batches.py",  # deprecated shim of posthoc.network.batches
}
# (importing module, imported module) pairs tolerated for now, each with the reason; keep it empty.
ALLOWED: set[tuple[str, str]] = set()


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported_modules(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``source`` (module-level or nested), relative ones resolved.

    ``module`` is the dotted name of the file; ``is_package`` says whether it is an ``__init__.py``.
    """
    package = module.split(".") if is_package else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
                found += [(node.lineno, base if node.module else f"{base}.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, node.module))
    return found


def _level(module: str) -> int | None:
    """The layer of ``posthoc.<package>...`` (None outside posthoc or for the top-level package)."""
    parts = module.split(".")
    if parts[0] != "posthoc" or len(parts) < 2:
        return None
    if parts[1] not in LEVEL:
        raise AssertionError(f"posthoc.{parts[1]} has no layer; add it to LAYERS in tests/test_layering.py")
    return LEVEL[parts[1]]


def upward_imports() -> list[str]:
    """Every import of a higher layer, as 'file:line: importer -> imported (layer a -> b)'."""
    violations = []
    for path in sorted(ROOT.rglob("*.py")):
        relative = path.relative_to(ROOT.parent).as_posix()
        if relative in EXEMPT:
            continue
        importer = _module_name(path)
        own = _level(importer)
        for line, imported in _imported_modules(path.read_text(), importer, path.name == "__init__.py"):
            target = _level(imported)
            if own is None or target is None or target <= own or (importer, imported) in ALLOWED:
                continue
            violations.append(f"{relative}:{line}: {importer} -> {imported} (layer {own} -> {target})")
    return violations


def test_every_package_has_a_layer():
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}
    packages |= {p.stem for p in ROOT.glob("*.py") if p.name != "__init__.py"}
    assert packages <= set(LEVEL), f"packages without a layer: {sorted(packages - set(LEVEL))}"


def test_no_module_imports_a_higher_layer():
    violations = upward_imports()
    assert not violations, "imports of a higher layer:\n" + "\n".join(violations)


def test_the_check_sees_nested_and_relative_imports():
    source = ("import torch\n"
              "from . import rules\n"
              "from ..laplace import Laplace\n"
              "def f():\n"
              "    from posthoc.cli.main import main\n"
              "    return main\n")
    found = _imported_modules(source, "posthoc.streamlined.walk", is_package=False)
    assert [name for _, name in found] == ["torch", "posthoc.streamlined.rules", "posthoc.laplace",
                                           "posthoc.cli.main"]
    assert [_level(name) for _, name in found] == [None, LEVEL["streamlined"], LEVEL["laplace"], LEVEL["cli"]]


def test_deprecated_paths_still_import_with_a_warning():
    import importlib
    import sys
    import warnings

    for old, new in (("posthoc.laplace.subset", "posthoc.network.subset"),
                     ("posthoc.laplace.batches", "posthoc.network.batches")):
        sys.modules.pop(old, None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            shim = importlib.import_module(old)
        assert any(issubclass(w.category, DeprecationWarning) and new in str(w.message) for w in caught)
        target = importlib.import_module(new)
        public = [n for n in dir(shim) if not n.startswith("_") and n != "warnings"]
        assert public and all(getattr(shim, n) is getattr(target, n) for n in public)
