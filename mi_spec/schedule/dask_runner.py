"""Run a plan's jobs on Dask: an embedded LocalCluster, an existing scheduler, or Slurm workers.

Same contract as `run_synchronous`: cached results are reused without submitting, and every new
result is cached the moment it arrives, so an interrupted study resumes where it stopped. Workers
receive the plan once (scattered to all of them) and keep the model in their process-level cache
(`mi_spec.execute.worker`); jobs carry a reference to the model, never the model.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from distributed import Client, Future, LocalCluster, WorkerPlugin, as_completed

from mi_spec.errors import ExecutionError, MiSpecError
from mi_spec.execute.cache import ResultCache
from mi_spec.execute.worker import execute_job
from mi_spec.plan.ir import Job, JobResult, Plan
from mi_spec.schedule.profiles import RunnerProfile, SlurmOptions
from mi_spec.schedule.progress import Progress

CONNECT_TIMEOUT = "30s"  # how long to try reaching an existing scheduler
GPU = {"GPU": 1}
T = TypeVar("T")


class WorkerSetup(WorkerPlugin):
    """Per worker process: quiet transformers, set torch's threads, pin a local worker's GPU."""

    name = "mi_spec-setup"

    def __init__(self, threads: int, gpus: Sequence[str] = ()):
        self.threads, self.gpus = threads, tuple(gpus)  # gpus: device ids to spread workers over

    def setup(self, worker: Any) -> None:
        os.environ["TRANSFORMERS_VERBOSITY"] = "error"
        if "transformers" in sys.modules:
            sys.modules["transformers"].logging.set_verbosity_error()
        import torch

        if self.gpus and isinstance(worker.name, int):
            index = worker.name % len(self.gpus)
            if torch.cuda.is_initialized():
                torch.cuda.set_device(index)
            else:  # read when CUDA initialises: this worker sees one GPU, as cuda:0
                os.environ["CUDA_VISIBLE_DEVICES"] = self.gpus[index]
        torch.set_num_threads(self.threads)


def with_torch_threads(threads: int, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` with torch's intra-op threads set in this (Dask executor) thread: a setting
    made elsewhere does not reach a thread whose thread pool already started."""
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return fn(*args)


def _cuda_devices() -> list[str]:
    """The ids of the GPUs this process may use (as CUDA_VISIBLE_DEVICES names them)."""
    import torch

    if not torch.cuda.is_available():
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [d.strip() for d in visible.split(",")] if visible else []
    return ids[: torch.cuda.device_count()] or [str(i) for i in range(torch.cuda.device_count())]


def _say(message: str) -> None:
    print(f"mi_spec: {message}", file=sys.stderr, flush=True)


# --- clients ----------------------------------------------------------------------------------


@contextmanager
def open_client(
    profile: RunnerProfile, address: str | None = None, max_workers: int | None = None
) -> Iterator[tuple[Client, bool]]:
    """A client for ``profile`` (or the scheduler at ``address``) and whether jobs ask for a GPU.

    Clusters started here are closed on exit; an existing scheduler is only disconnected from.
    """
    address = address or (profile.address if profile.kind == "cluster" else None)
    if address:
        with _remote(address, profile) as pair:
            yield pair
    elif profile.kind == "slurm":
        assert profile.slurm is not None
        with _slurm(profile, profile.slurm) as pair:
            yield pair
    else:
        with _local(profile, max_workers) as pair:
            yield pair


@contextmanager
def _local(profile: RunnerProfile, max_workers: int | None) -> Iterator[tuple[Client, bool]]:
    gpus = _cuda_devices() if profile.gpu is not False else []
    if profile.gpu is True and not gpus:
        raise ExecutionError("runner profile asks for gpu: true, but CUDA is not available here")
    n = profile.local_workers(len(gpus))
    n = min(n, max_workers) if max_workers else n
    threads = str(profile.threads_per_worker)
    env = {
        "TRANSFORMERS_VERBOSITY": "error",
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
    }
    dashboard = profile.dashboard and importlib.util.find_spec("bokeh") is not None
    cluster = LocalCluster(
        n_workers=n,
        threads_per_worker=profile.threads_per_worker,
        processes=True,
        host="127.0.0.1",
        memory_limit=profile.memory_limit,
        dashboard_address=":0",  # a free port (its HTTP server runs even without bokeh)
        resources=GPU if gpus else None,
        env=env,
    )
    try:
        client = Client(cluster, set_as_default=False)
        try:
            _setup(client, profile, gpus, dashboard)
            yield client, bool(gpus)
        finally:
            client.close()
    finally:
        cluster.close()


@contextmanager
def _remote(address: str, profile: RunnerProfile) -> Iterator[tuple[Client, bool]]:
    try:
        client = Client(address, timeout=CONNECT_TIMEOUT, set_as_default=False)
    except (OSError, TimeoutError) as e:
        raise ExecutionError(
            f"cannot reach the Dask scheduler at {address}: {e}. Start one with `dask scheduler` "
            "and `dask worker ADDRESS`, or check the address"
        ) from e
    try:
        advertised = _gpu_workers(client)
        if profile.gpu is True and not advertised:
            _say(
                "gpu: true, but no connected worker advertises a GPU resource (start workers "
                "with `--resources GPU=1`); jobs wait for one"
            )
        _setup(client, profile, [], profile.dashboard)
        yield client, profile.gpu is True or (profile.gpu == "auto" and advertised)
    finally:
        client.close()


@contextmanager
def _slurm(profile: RunnerProfile, opts: SlurmOptions) -> Iterator[tuple[Client, bool]]:
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise MiSpecError("kind: slurm needs dask-jobqueue: pip install dask-jobqueue") from None
    kwargs: dict[str, Any] = {"processes": 1, **opts.extra}
    kwargs["scheduler_options"] = {"dashboard_address": ":0", **kwargs.get("scheduler_options", {})}
    if profile.gpu is True:
        kwargs["worker_extra_args"] = [*kwargs.get("worker_extra_args", []), "--resources", "GPU=1"]
        kwargs["job_extra_directives"] = [*kwargs.get("job_extra_directives", []), "--gres=gpu:1"]
    cluster = SLURMCluster(
        queue=opts.queue,
        account=opts.account,
        cores=opts.cores,
        memory=opts.memory,
        walltime=opts.walltime,
        **kwargs,
    )
    try:
        cluster.scale(jobs=opts.jobs)
        client = Client(cluster, set_as_default=False)
        try:
            _setup(client, profile, [], profile.dashboard)
            yield client, profile.gpu is True
        finally:
            client.close()
    finally:
        cluster.close()


def _gpu_workers(client: Client) -> bool:
    workers = client.scheduler_info().get("workers", {})
    return any(w.get("resources", {}).get("GPU", 0) >= 1 for w in workers.values())


def _setup(client: Client, profile: RunnerProfile, gpus: list[str], dashboard: bool) -> None:
    client.register_plugin(WorkerSetup(profile.threads_per_worker, gpus))
    if dashboard and "dashboard" in client.scheduler_info().get("services", {}):
        _say(f"Dask dashboard: {client.dashboard_link}")


# --- running ----------------------------------------------------------------------------------


def run_dask(
    plan: Plan,
    jobs: Sequence[Job],
    cache: ResultCache | None,
    progress: Progress,
    profile: RunnerProfile,
    address: str | None = None,
) -> dict[str, JobResult]:
    """Results by job id, computed on Dask as ``profile`` says (``address``: an existing scheduler).

    A job failing every retry raises `ExecutionError` once the results already finished are cached.
    """
    results: dict[str, JobResult] = {}
    todo: dict[str, Job] = {}
    for job in jobs:
        if job.id in results or job.id in todo:
            continue
        hit = cache.get(job.id) if cache else None
        if hit is None:
            todo[job.id] = job
        else:
            results[job.id] = hit
            progress.update(cached=True)
    if todo:
        with open_client(profile, address, max_workers=len(todo)) as (client, gpu):
            _compute(client, plan, list(todo.values()), cache, progress, profile, gpu, results)
    return {job.id: results[job.id] for job in jobs}


def _compute(
    client: Client,
    plan: Plan,
    jobs: list[Job],
    cache: ResultCache | None,
    progress: Progress,
    profile: RunnerProfile,
    gpu: bool,
    results: dict[str, JobResult],
) -> None:
    """Submit ``jobs`` and store each result as it arrives; resubmit cancelled jobs (a plan lost
    with the workers holding it)."""
    if not client.scheduler_info().get("workers"):
        _say("waiting for a Dask worker to connect")
        client.wait_for_workers(1)
    shipped = plan.model_copy(update={"jobs": ()})  # workers never read plan.jobs
    plan_future = client.scatter(shipped, broadcast=True, hash=False)
    resources = GPU if gpu else None
    cancelled: dict[str, int] = {}

    order = {job.id: len(jobs) - i for i, job in enumerate(jobs)}  # plan order: earlier first

    def submit(job: Job) -> Future:
        n = cancelled.get(job.id, 0)
        return client.submit(
            with_torch_threads,
            profile.threads_per_worker,
            execute_job,
            plan_future,
            job,
            key=f"mi_spec-{job.id}" + (f"-{n}" if n else ""),  # a fresh key after a cancel
            retries=profile.retries,
            pure=False,
            resources=resources,
            priority=order[job.id],
        )

    pending = {submit(job): job for job in jobs}
    queue = as_completed(list(pending), loop=client.loop)
    try:
        for future in queue:
            job = pending.pop(future)
            if future.status == "finished":
                _store(future.result(), cache, progress, results)
                continue
            if future.status == "error":
                _finish_done(pending, cache, progress, results)
                raise _failure(job, future.exception(), profile.retries)
            # cancelled or lost, e.g. every worker holding the plan died: submit again
            cancelled[job.id] = cancelled.get(job.id, 0) + 1
            if cancelled[job.id] > profile.retries + 1:
                _finish_done(pending, cache, progress, results)
                raise ExecutionError(
                    f"job {job.id} (experiment {job.experiment!r}) was {future.status} "
                    f"{cancelled[job.id]} times (workers lost?)"
                )
            if plan_future.status != "finished":
                client.wait_for_workers(1)  # a replacement worker may take a while
                plan_future = client.scatter(shipped, broadcast=True, hash=False)
            new = submit(job)
            pending[new] = job
            queue.add(new)
    finally:
        if pending:
            client.cancel(list(pending))


def _store(
    result: JobResult,
    cache: ResultCache | None,
    progress: Progress,
    results: dict[str, JobResult],
) -> None:
    if cache is not None:
        cache.put(result)
    results[result.job_id] = result
    progress.update()


def _finish_done(
    pending: dict[Future, Job],
    cache: ResultCache | None,
    progress: Progress,
    results: dict[str, JobResult],
) -> None:
    """Cache the results that finished but were not collected yet (before raising)."""
    for future in [f for f in pending if f.status == "finished"]:
        pending.pop(future)
        _store(future.result(), cache, progress, results)


def _failure(job: Job, cause: BaseException | None, retries: int) -> ExecutionError:
    detail = f"{type(cause).__name__}: {cause}" if cause is not None else "unknown error"
    attempts = f"{retries + 1} attempt{'s' if retries else ''}"
    error = ExecutionError(
        f"job {job.id} (experiment {job.experiment!r}) failed after {attempts}: {detail}"
    )
    error.__cause__ = cause
    return error
