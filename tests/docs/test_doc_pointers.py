"""Every ``docs/<page>.md`` that a tracked file points to exists, so that no docstring or note points nowhere."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[2]
POINTER = re.compile(r"docs/[A-Za-z0-9_./-]+\.md")

pytestmark = pytest.mark.skipif(shutil.which("git") is None or not (REPOSITORY / ".git").exists(),
                                reason="needs git and a git checkout")


def pointers() -> dict[str, list[str]]:
    """docs page -> the tracked files (path:line) that name it."""
    result = subprocess.run(["git", "grep", "-n", "-I", "-o", "-E", POINTER.pattern], cwd=REPOSITORY,
                            capture_output=True, text=True, check=False)
    if result.returncode not in (0, 1):
        raise RuntimeError(f"git grep failed: {result.stderr}")
    found: dict[str, list[str]] = {}
    for line in result.stdout.splitlines():
        path, number, page = line.split(":", 2)
        found.setdefault(page, []).append(f"{path}:{number}")
    return found


def test_every_docs_pointer_names_an_existing_page():
    found = pointers()
    assert found, "no docs/ pointers found: is the pattern right?"
    missing = {page: where for page, where in found.items() if not (REPOSITORY / page).is_file()}
    assert not missing, "pointers to docs pages that do not exist:\n" + "\n".join(
        f"{page}: {', '.join(where[:5])}" for page, where in sorted(missing.items()))


def test_the_pattern_finds_pages_in_prose():
    assert POINTER.findall("see docs/scalla.md (prior precision) and docs/measurements/core.md.") == [
        "docs/scalla.md", "docs/measurements/core.md"]
