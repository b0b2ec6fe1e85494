"""Every script in examples/ runs in its --quick mode and writes its figures and finite numbers.

Each runs in its own process (as a user would run it) with one intra-op thread, into a temporary --out folder.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
# script -> the figures it must write
FIGURES = {
    "regression_1d": ["regression_1d.png"],
    "classification_calibration": ["classification_reliability.png", "classification_ood_map.png",
                                   "classification_ood_laplace.png"],
    "scalla_context": ["scalla_context.png"],
    "streamlined_pretrained": ["streamlined_reliability.png"],
    "fiber_toy": ["fiber_toy.png"],
    "continual_learning": ["continual_learning.png"],
    "bayesopt": ["bayesopt.png"],
    "llm_lora": ["llm_lora_reliability.png"],
}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_quick(name: str, out: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    return subprocess.run([sys.executable, str(EXAMPLES / f"{name}.py"), "--quick", "--out", str(out)],
                          cwd=EXAMPLES.parent, env=env, capture_output=True, text=True, timeout=600, check=False)


def test_every_example_is_tested_and_listed_for_the_docs():
    scripts = {path.stem for path in EXAMPLES.glob("*.py")} - {"example_io", "make_doc_figures"}
    assert scripts == set(FIGURES)
    sys.path.insert(0, str(EXAMPLES))
    try:
        import make_doc_figures
    finally:
        sys.path.remove(str(EXAMPLES))
    assert set(make_doc_figures.EXAMPLES) == set(FIGURES)


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_example_quick_run(name, tmp_path):
    result = run_quick(name, tmp_path)
    assert result.returncode == 0, f"{name} --quick failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    for figure in FIGURES[name]:
        path = tmp_path / figure
        assert path.is_file(), f"{name} did not write {figure}"
        assert path.read_bytes()[:8] == PNG_SIGNATURE, f"{figure} is not a PNG"
    numbers = json.loads((tmp_path / f"{name}.json").read_text())
    assert numbers, f"{name} reported no numbers"
    assert all(math.isfinite(value) for value in numbers.values()), numbers


def test_example_io_refuses_non_finite_numbers(tmp_path):
    sys.path.insert(0, str(EXAMPLES))
    try:
        from example_io import write_metrics
    finally:
        sys.path.remove(str(EXAMPLES))
    with pytest.raises(ValueError, match="non-finite"):
        write_metrics(tmp_path, "bad", {"nll": float("nan")})
    assert not (tmp_path / "bad.json").exists()
    written = write_metrics(tmp_path, "good", {"nll": 0.5})
    assert json.loads(written.read_text()) == {"nll": 0.5}
