"""No source file of posthoc has more than 500 lines (issue 14: files small enough to read in one sitting;
a file that grows past the limit is split into cohesive modules, not trimmed)."""

from __future__ import annotations

from pathlib import Path

import posthoc

MAX_LINES = 500
ROOT = Path(posthoc.__file__).parent


def oversized_files(root: Path = ROOT, max_lines: int = MAX_LINES) -> list[str]:
    """'path: n lines' for every .py file under ``root`` with more than ``max_lines`` lines, longest first."""
    sizes = [(len(path.read_text(encoding="utf-8").splitlines()), path.relative_to(root.parent).as_posix())
             for path in root.rglob("*.py")]
    return [f"{name}: {n} lines" for n, name in sorted(sizes, reverse=True) if n > max_lines]


def test_no_source_file_over_500_lines():
    offenders = oversized_files()
    assert not offenders, f"source files over {MAX_LINES} lines (split them into cohesive modules):\n" + \
        "\n".join(offenders)


def test_the_check_counts_lines(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "small.py").write_text("x = 1\n" * MAX_LINES)
    (package / "big.py").write_text("x = 1\n" * (MAX_LINES + 1))
    assert oversized_files(package) == [f"pkg/big.py: {MAX_LINES + 1} lines"]
