"""The docs tests' ``slow`` marker: the strict site build (about 10-15 s) is skipped unless selected.

Run it with ``pytest tests/docs -m slow`` or ``-m "slow or not slow"``; ``make docs`` runs the same build.
"""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: a longer case, skipped unless selected with -m slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "slow" in (config.getoption("markexpr", "") or ""):
        return
    skip = pytest.mark.skip(reason="slow docs case: select it with -m slow or -m 'slow or not slow'")
    for item in items:
        if "slow" in item.keywords and "docs" in item.path.parts:
            item.add_marker(skip)
