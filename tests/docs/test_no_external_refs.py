"""No tracked file may point outside the repository: not to the old methods note, not to a machine's folders.

The documentation lives in docs/; data outside the repository is reached only through ``--data-dir`` or
``POSTHOC_DATA``. Exceptions, listed here and nowhere else:

- the ``data`` folder of the ``shared`` folder beside the repository, given as a ``--data-dir`` value or named as
  the documented default of one (``ALLOWED_RELATIVE``), the folder the README's full-data commands use;
- the same folder in the files of ``SHARED_DATA_DEFAULTS``: the default data folder of tests that skip when it is
  absent.

The patterns are spelled so that this file does not match them itself.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[2]
OLD_NOTE = "METHODS" + ".md"
# An absolute path into a home or work folder of some machine (a leading / after a start, space, quote, =, ( or `).
ABSOLUTE = re.compile(r"(?:^|[\s'\"=(`:])/(?:wor[k]|hom[e]|roo[t]|Use[r]s|mn[t]|tm[p])/")
RELATIVE_OUTSIDE = re.compile(r"\.\./share[d]/")
ALLOWED_RELATIVE = re.compile(r"(?:--data-dir[ =]|default: )\.\./share[d]/data\b")
SHARED_DATA_DEFAULTS = {"tests/data/conftest.py"}


def tracked_lines(pattern: str) -> list[tuple[str, str]]:
    """(path:line, text) of every line of a tracked text file that matches the extended regex ``pattern``."""
    result = subprocess.run(["git", "grep", "-n", "-I", "-E", pattern], cwd=REPOSITORY, capture_output=True,
                            text=True, check=False)
    if result.returncode not in (0, 1):  # 1: no match
        raise RuntimeError(f"git grep failed: {result.stderr}")
    lines = []
    for line in result.stdout.splitlines():
        path, number, text = line.split(":", 2)
        lines.append((f"{path}:{number}", text))
    return lines


def offenders() -> list[str]:
    """Every tracked line that names the old note, an absolute machine path, or the shared folder beside the repo.

    The shared folder is allowed as stated in the module docstring.
    """
    found = [f"{where}: {text.strip()[:160]}" for where, text in tracked_lines(re.escape(OLD_NOTE))]
    found += [f"{where}: {text.strip()[:160]}" for where, text in tracked_lines(r"/(wor[k]|hom[e]|roo[t]|Use[r]s|mn[t]|tm[p])/")
              if ABSOLUTE.search(text)]
    for where, text in tracked_lines(r"\.\./share[d]/"):
        if where.split(":")[0] in SHARED_DATA_DEFAULTS and "../" + "shared/data" in text:
            continue
        if len(RELATIVE_OUTSIDE.findall(text)) > len(ALLOWED_RELATIVE.findall(text)):
            found.append(f"{where}: {text.strip()[:160]}")
    return sorted(set(found))


pytestmark = pytest.mark.skipif(shutil.which("git") is None or not (REPOSITORY / ".git").exists(),
                                reason="needs git and a git checkout")


def test_no_tracked_file_points_outside_the_repository():
    found = offenders()
    assert not found, (f"{len(found)} tracked line(s) name {OLD_NOTE} or a path outside the repository; point to "
                       "docs/<page>.md or use --data-dir / POSTHOC_DATA instead:\n" + "\n".join(found))


def test_the_patterns_catch_what_they_are_for():
    assert ABSOLUTE.search("checkpoint '/" + "work/ckpt/x.pt'")
    assert ABSOLUTE.search("--data-dir /" + "home/me/data")
    assert not ABSOLUTE.search("<root>/UCI/<name>/data/")
    assert not ABSOLUTE.search("benchmarks/results/work/x")
    allowed = "posthoc bench --data-dir ../" + "shared/data"
    assert len(RELATIVE_OUTSIDE.findall(allowed)) == len(ALLOWED_RELATIVE.findall(allowed))
    outside = "weights in ../" + "shared/ckpt"
    assert len(RELATIVE_OUTSIDE.findall(outside)) > len(ALLOWED_RELATIVE.findall(outside))
