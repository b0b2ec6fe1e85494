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


@pytest.mark.skipif(bool(docs_extra_missing()), reason="the docs extra is not installed (pip install -e '.[docs]')")
def test_site_builds_strict(tmp_path):
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", "mkdocs.yml",
                             "-d", str(tmp_path / "site")], cwd=REPOSITORY, env=env, capture_output=True, text=True,
                            timeout=600, check=False)
    warnings = [line for line in result.stderr.splitlines() if "WARNING" in line or "ERROR" in line]
    assert result.returncode == 0, "mkdocs build --strict failed:\n" + "\n".join(warnings or [result.stderr[-4000:]])
    site = tmp_path / "site"
    for page in ("index.html", "laplace/index.html", "api/laplace/index.html", "tutorials/regression_1d/index.html",
                 "results/index.html", "results/fmnist/results/index.html", "measurements/core/index.html"):
        assert (site / page).is_file(), f"the site has no {page}"
    # the tutorials show the example's source and its figure
    tutorial = (site / "tutorials/regression_1d/index.html").read_text(encoding="utf-8")
    assert "gap_regression" in tutorial and "regression_1d.png" in tutorial
    assert (site / "assets/examples/regression_1d.png").is_file()
    # the API pages are rendered from the docstrings
    assert "optimize_prior_precision" in (site / "api/laplace/index.html").read_text(encoding="utf-8")
