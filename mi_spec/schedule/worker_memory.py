"""How much memory one worker of a runner has: the profile's ``memory_limit`` or Slurm
``memory`` (read as Dask reads them), the machine (or its cgroup), or a GPU's free memory. What
``plan/memory.py`` fits a plan's rows per pass to."""

from __future__ import annotations

import os
from pathlib import Path

from mi_spec.errors import ExecutionError
from mi_spec.plan.memory import MemoryLimit
from mi_spec.schedule.profiles import RunnerProfile


def runner_limit(
    profile: RunnerProfile, device: str = "cpu", address: str | None = None
) -> MemoryLimit | None:
    """Memory per worker for jobs on ``device`` under runner ``profile`` (None: not known here).

    GPU jobs: the GPU's free memory now (plus what this process holds, when the jobs run in
    it); the GPUs of Slurm jobs or of an existing cluster are not visible here. CPU jobs:
    ``slurm.memory``; a local worker's ``memory_limit`` as Dask reads it (``auto``: the
    machine's memory x threads per worker / cores); the machine's memory for a synchronous
    run; an existing cluster: unknown.
    """
    kind = "cluster" if address else profile.kind
    if device.split(":")[0] == "cuda":
        if kind in ("slurm", "cluster"):
            return None  # the workers' GPUs are not visible from here
        return gpu_memory(device, in_process=kind == "synchronous")
    if kind == "slurm" and profile.slurm is not None:
        return MemoryLimit(
            _dask_bytes(profile.slurm.memory), f"slurm.memory {profile.slurm.memory}"
        )
    if kind == "synchronous":
        return MemoryLimit(system_memory(), "this machine's memory (synchronous runner)")
    if kind != "local":
        return None
    given = profile.memory_limit
    if given == "auto":
        share = min(1.0, profile.threads_per_worker / (os.cpu_count() or 1))
        return MemoryLimit(
            int(system_memory() * share),
            f"memory_limit auto: {profile.threads_per_worker} of {os.cpu_count()} cores' share",
        )
    try:
        fraction = float(given)
    except ValueError:
        return MemoryLimit(_dask_bytes(given), f"memory_limit {given}")
    if fraction <= 1:
        return MemoryLimit(int(fraction * system_memory()), f"memory_limit {given} of the machine")
    return MemoryLimit(int(fraction), f"memory_limit {given}")


def _dask_bytes(text: str) -> int:
    """A memory size as Dask reads it: ``'16GB'`` (10^9), ``'4GiB'`` (2^30), ``'512MB'``."""
    from dask.utils import parse_bytes

    try:
        return int(parse_bytes(text))
    except ValueError:
        raise ExecutionError(f"runner profile: not a memory size: {text!r} (e.g. '16GB')") from None


def system_memory() -> int:
    """The machine's memory, or its cgroup's limit when lower."""
    import psutil

    total = int(psutil.virtual_memory().total)
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def gpu_memory(device: str, in_process: bool = False) -> MemoryLimit:
    """The free memory of CUDA ``device``, plus this process's own reserve when ``in_process``
    (the jobs run here, where the model may already be loaded)."""
    import torch

    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    free, _ = torch.cuda.mem_get_info(index)
    own = torch.cuda.memory_reserved(index) if in_process else 0
    return MemoryLimit(int(free + own), f"free memory of cuda:{index}")
