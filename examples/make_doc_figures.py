"""Run every example in full mode with ``--out docs/assets/examples``: the figures and numbers the docs show.

    .venv/bin/python examples/make_doc_figures.py              # all examples, one after the other
    .venv/bin/python examples/make_doc_figures.py fiber_toy    # only the named ones

The PNGs and JSON files it writes are committed, so that ``make docs`` needs no training run.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

EXAMPLES_DIR = Path(__file__).resolve().parent
DOC_FIGURES = EXAMPLES_DIR.parent / "docs" / "assets" / "examples"
EXAMPLES = ("regression_1d", "classification_calibration", "scalla_context", "streamlined_pretrained", "fiber_toy",
            "continual_learning", "bayesopt", "llm_lora")


def main(names: list[str]) -> None:
    """Run the named examples (all by default) and stop at the first that fails."""
    unknown = sorted(set(names) - set(EXAMPLES))
    if unknown:
        raise SystemExit(f"unknown example(s) {unknown}; choose from {list(EXAMPLES)}")
    for name in names or EXAMPLES:
        start = time.perf_counter()
        subprocess.run([sys.executable, str(EXAMPLES_DIR / f"{name}.py"), "--out", str(DOC_FIGURES)], check=True)
        print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
