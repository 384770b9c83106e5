"""Large short-lived blocks (what a pass's big tensors get from glibc) reuse memory instead of
faulting fresh pages on every allocation (Linux/glibc): measured in a subprocess, allocating in a
worker thread as on Dask."""

from __future__ import annotations

import json
import sys

import pytest
from procs import run

SCRIPT = """
import ctypes, json, resource, sys, threading
from mi_spec.execute.allocator import recycle_large_blocks
on = recycle_large_blocks() if sys.argv[1] == "on" else False
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
SIZE = 64_000_000  # above glibc's largest mmap threshold
faults = []

def block():
    p = libc.malloc(SIZE)
    ctypes.memset(p, 1, SIZE)  # touch every page, as a tensor's fill does
    libc.free(p)

def work():
    for _ in range(4):  # warm-up: the heap grows to its steady state
        block()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        block()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

thread = threading.Thread(target=work)
thread.start()
thread.join()
print(json.dumps({"on": on, "faults": faults[0]}))
"""


def _faults(mode: str, env: dict[str, str] | None = None) -> dict:
    out = run([sys.executable, "-c", SCRIPT, mode], timeout=120, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_large_blocks_are_recycled_in_worker_threads():
    import os

    dask = dict(os.environ, MALLOC_TRIM_THRESHOLD_="65536")  # what Dask's nanny gives workers
    off, on = _faults("off", dask), _faults("on", dask)
    assert on["on"] is True
    if off["faults"] < 50_000:  # e.g. transparent huge pages back every large mapping
        pytest.skip(f"10 fresh 64 MB mappings took only {off['faults']} faults here")
    # 10 x 64 MB fresh mappings: ~156k faults of 4 KiB pages; recycled: almost none
    assert on["faults"] < off["faults"] / 10, (on, off)


def test_the_users_allocator_settings_win(monkeypatch):
    import os

    env = dict(os.environ, MALLOC_ARENA_MAX="2")
    assert _faults("on", env)["on"] is False
    env = dict(os.environ, MI_SPEC_MALLOC="default")
    assert _faults("on", env)["on"] is False
