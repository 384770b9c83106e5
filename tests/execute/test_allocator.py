"""Large short-lived tensors reuse memory instead of faulting fresh pages on every allocation
(Linux/glibc): measured in a subprocess, allocation in a worker thread as on Dask."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

SCRIPT = """
import json, resource, sys, threading
import torch
from mi_spec.execute.allocator import recycle_large_blocks
on = recycle_large_blocks() if sys.argv[1] == "on" else False
faults = []

def work():
    for _ in range(12):  # warm-up: the heap grows to its steady state (faults in either case)
        torch.ones(16_000_000)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        torch.ones(16_000_000)  # 64 MB, above glibc's largest mmap threshold
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

thread = threading.Thread(target=work)
thread.start()
thread.join()
print(json.dumps({"on": on, "faults": faults[0]}))
"""


def _faults(mode: str, env: dict[str, str] | None = None) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=120,
        env=env, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_large_blocks_are_recycled_in_worker_threads():
    off, on = _faults("off"), _faults("on")
    assert on["on"] is True
    # 10 x 64 MB fresh mappings: ~156k faults of 4 KiB pages; recycled: almost none
    assert off["faults"] > 50_000, off
    assert on["faults"] < off["faults"] / 10, (on, off)


def test_the_users_allocator_settings_win(monkeypatch):
    import os

    env = dict(os.environ, MALLOC_ARENA_MAX="2")
    assert _faults("on", env)["on"] is False
    env = dict(os.environ, MI_SPEC_MALLOC="default")
    assert _faults("on", env)["on"] is False
