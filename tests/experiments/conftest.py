"""Every experiment test runs tiny models: one intra-op thread is fastest there, and immune to the
stalls a busy shared machine gives a thread pool (30x slower DAS steps were measured)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
