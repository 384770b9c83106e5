"""GPUs as a Dask resource: which GPUs this process sees, the spec of a worker pinned to some of
them, and whether a scheduler's workers have the resources jobs ask for (``{"GPU": n}``).

`mi_spec.schedule.dask_runner` starts and connects to the workers; this module only describes them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from distributed import Client

from mi_spec.errors import ExecutionError
from mi_spec.schedule.progress import count

GPU = "GPU"  # the Dask resource GPU workers declare and GPU jobs ask for


def cuda_devices() -> list[str]:
    """The ids of the GPUs this process may use (as CUDA_VISIBLE_DEVICES names them)."""
    import torch

    if not torch.cuda.is_available():
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [d.strip() for d in visible.split(",")] if visible else []
    return ids[: torch.cuda.device_count()] or [str(i) for i in range(torch.cuda.device_count())]


def gpu_worker_spec(template: dict[str, Any], gpus: Sequence[str]) -> dict[str, Any]:
    """A SpecCluster worker spec like ``template`` (a LocalCluster's `new_spec`), whose process
    sees only ``gpus`` (its CUDA_VISIBLE_DEVICES, set before the worker process starts: they
    are its cuda:0, cuda:1, ...) and declares them as its Dask resource GPU."""
    options = dict(template.get("options", {}))
    options["env"] = {**(options.get("env") or {}), "CUDA_VISIBLE_DEVICES": ",".join(gpus)}
    options["resources"] = {**(options.get("resources") or {}), GPU: len(gpus)}
    return {**template, "options": options}


def has_gpu_workers(client: Client) -> bool:
    """Whether any worker of ``client``'s scheduler declares at least one GPU."""
    workers = client.scheduler_info(n_workers=-1).get("workers", {})
    return any(w.get("resources", {}).get(GPU, 0) >= 1 for w in workers.values())


def fits(worker: dict[str, Any], need: dict[str, float] | None) -> bool:
    """Whether a worker (as `scheduler_info` describes it) has the resources ``need``."""
    have = worker.get("resources") or {}
    return all(have.get(name, 0) >= amount for name, amount in (need or {}).items())


def resource_text(resources: dict[str, float] | None) -> str:
    """``resources`` as ``GPU=1, X=2`` (sorted by name), or ``none``."""
    return ", ".join(f"{k}={v:g}" for k, v in sorted((resources or {}).items())) or "none"


def check_resources(client: Client, need: dict[str, float]) -> None:
    """Raise `ExecutionError` when no connected worker has the resources ``need`` (jobs asking
    for them would wait forever), naming what the workers have."""
    workers = client.scheduler_info(n_workers=-1).get("workers", {})
    if any(fits(w, need) for w in workers.values()):
        return
    address = getattr(client.scheduler, "address", None) or "?"
    shown = sorted(workers.items())[:4]
    offers = "; ".join(f"{a}: {resource_text(w.get('resources'))}" for a, w in shown)
    more = f"; and {len(workers) - len(shown)} more" if len(workers) > len(shown) else ""
    wanted = resource_text(need)
    raise ExecutionError(
        f"every job asks for the Dask resources {wanted} (the runner profile's gpu and "
        f"gpus_per_job), but none of the {count(len(workers), 'worker')} at {address} has them "
        f"({offers}{more}). Start workers with `dask worker {address} --resources "
        f"{wanted.replace(', ', ',')}`, or lower gpus_per_job (gpu: false runs on any worker)"
    )
