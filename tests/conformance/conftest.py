"""The conformance family's settings: one intra-op thread, and the ``slow`` marker.

Cases marked ``@pytest.mark.slow`` are skipped unless the marker expression names them: run them with
``pytest tests/conformance -m slow`` (only those) or ``-m "slow or not slow"`` (everything).
"""

from __future__ import annotations

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: a longer conformance case, skipped unless selected with -m slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "slow" in (config.getoption("markexpr", "") or ""):
        return
    skip = pytest.mark.skip(reason="slow conformance case: select it with -m slow or -m 'slow or not slow'")
    for item in items:
        if "slow" in item.keywords and "conformance" in item.path.parts:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def one_thread():
    """Many tiny ops: on a shared 2-core machine extra intra-op threads only contend. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
