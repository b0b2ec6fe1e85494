"""The documentation site builds in MkDocs' strict mode (every warning an error) into a temporary folder.

A build takes 2-6 s on two cores (about 12 s when other jobs load them). Skipped when the docs extra (mkdocs,
mkdocs-material, mkdocstrings) is not installed: ``make docs`` installs it.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[2]
# Docstring warnings known at the time this test was written, in files the docs do not own: each names several
# parameters on one Google-style line (or continues a Raises entry without indenting it), which griffe cannot
# parse. They make the test xfail, naming them, until the docstrings are split; any other warning fails it.
KNOWN_DOCSTRING_WARNINGS = (
    "'dict_key_x, dict_key_y'",  # fiber/sampler.py, laplace/laplace.py, scalla/scalla.py
    "'steps, batch_size, n_probes, lr, lr_schedule, n_target_points",  # scalla/scalla.py ScaLLA Args
    "'no grid value has a finite NLL.'",  # scalla/scalla.py optimize_prior_precision Raises
    "'weight_mean / weight_var'",  # streamlined/streamlined.py Streamlined Args
)
DOCS_EXTRA = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")


def docs_extra_missing() -> list[str]:
    missing = []
    for name in DOCS_EXTRA:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # a missing parent package
            found = False
        if not found:
            missing.append(name)
    return missing


def build(site: Path, strict: bool) -> subprocess.CompletedProcess:
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", *(["--strict"] if strict else []), "-f",
                           "mkdocs.yml", "-d", str(site)], cwd=REPOSITORY, env=env, capture_output=True, text=True,
                          timeout=600, check=False)


@pytest.mark.skipif(bool(docs_extra_missing()), reason="the docs extra is not installed (pip install -e '.[docs]')")
def test_site_builds_strict(tmp_path):
    site = tmp_path / "site"
    result = build(site, strict=True)
    warnings = [line for line in result.stderr.splitlines() if "WARNING" in line or "ERROR" in line]
    only_known = result.returncode != 0 and bool(warnings) and all(
        "griffe:" in line and any(known in line for known in KNOWN_DOCSTRING_WARNINGS) for line in warnings)
    if only_known:  # check the pages all the same, from a build that lets those warnings pass
        assert build(site, strict=False).returncode == 0
    else:
        assert result.returncode == 0, "mkdocs build --strict failed:\n" + "\n".join(
            warnings or [result.stderr[-4000:]])
    for page in ("index.html", "laplace/index.html", "api/laplace/index.html", "tutorials/regression_1d/index.html",
                 "results/index.html", "results/fmnist/results/index.html", "measurements/core/index.html"):
        assert (site / page).is_file(), f"the site has no {page}"
    # the tutorials show the example's source and its figure
    tutorial = (site / "tutorials/regression_1d/index.html").read_text(encoding="utf-8")
    assert "gap_regression" in tutorial and "regression_1d.png" in tutorial
    assert (site / "assets/examples/regression_1d.png").is_file()
    # the API pages are rendered from the docstrings
    assert "optimize_prior_precision" in (site / "api/laplace/index.html").read_text(encoding="utf-8")
    # Sphinx cross-references in docstrings render as code names (docs/hooks.py), not as ":class:" or "~a.b.C"
    fiber_api = (site / "api/fiber/index.html").read_text(encoding="utf-8")
    assert "<code>WalkConfig</code>" in fiber_api and "<code>~" not in fiber_api and ":class:<code>" not in fiber_api
    if only_known:
        pytest.xfail("only the known docstring warnings of other modules remain:\n" + "\n".join(warnings))
