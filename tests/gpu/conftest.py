"""GPU-only tests: every test here is skipped on a machine without CUDA.

Run them on a GPU machine with ``python -m pytest tests/gpu -q``; digests go to a per-test folder.
"""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (GPU-only test)")
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def digest_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MI_SPEC_DIGEST_CACHE", str(tmp_path / "digests"))
