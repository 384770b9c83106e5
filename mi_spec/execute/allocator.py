"""Large short-lived tensors and the C allocator (CPU).

glibc serves every block above its mmap threshold (at most 32 MiB) with a fresh mapping and
unmaps it on free, so a pass over many packed rows faults its activations in page by page, on
every pass: a 13-variant sweep job on a 6-layer, 512-wide GPT-2 took 1.2 million minor faults
and 15-18 s; with the blocks recycled, ~0 faults and 10-13 s on the same loaded machine
(``tests/benchmarks/patching.py`` prints the faults per call).

``recycle_large_blocks`` raises the threshold so such blocks come from the heap and are reused,
keeps up to ``trim`` bytes of freed memory instead of returning it at once, and uses one arena, so
that Dask's worker threads (which would each get an arena of their own, mapped like the large
blocks) share the recycled memory. The cost: a process's resident set stays near its high-water
mark between passes. Linux with glibc only; a no-op elsewhere, where the user already tuned the
allocator (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_ARENA_MAX``), or with ``MI_SPEC_MALLOC=default``.
``MALLOC_TRIM_THRESHOLD_`` does not count: Dask sets it in every worker's environment.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
# the user's own tuning wins; MALLOC_TRIM_THRESHOLD_ is not taken as one: Dask's nanny sets it for
# every worker (distributed.nanny.pre-spawn-environ), and this module's trim setting replaces it
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_ARENA_MAX")
_done: bool | None = None


def recycle_large_blocks(threshold: int = 1 << 30, trim: int = 1 << 30) -> bool:
    """Make this process's allocator reuse blocks up to ``threshold`` bytes (once per process);
    True if the setting is in effect."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if not sys.platform.startswith("linux") or os.environ.get("MI_SPEC_MALLOC") == "default":
        return False
    if any(k in os.environ for k in _USER_SETTINGS):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = all(
        mallopt(param, value) == 1
        for param, value in (
            (_M_ARENA_MAX, 1),
            (_M_MMAP_THRESHOLD, threshold),
            (_M_TRIM_THRESHOLD, trim),
        )
    )
    return _done


def release_free_blocks() -> None:
    """Hand the heap's free memory back to the system (between jobs: a job's recycled blocks
    need not stay resident while the next one starts; within a job they are reused)."""
    if not _done:
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
