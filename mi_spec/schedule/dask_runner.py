"""Run a plan's jobs on Dask: an embedded LocalCluster, an existing scheduler, or Slurm workers.

Same contract as `run_synchronous`: cached results are reused without submitting, and every new
result is cached the moment it arrives, so an interrupted study resumes where it stopped. Workers
receive the plan once (scattered to all of them) and keep the model in their process-level cache
(`mi_spec.execute.worker`); jobs carry a reference to the model, never the model. GPUs as a Dask
resource live in `gpu_workers`, the watch for lost workers in `worker_watch`.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import CancelledError
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from distributed import Client, Future, LocalCluster, WorkerPlugin, as_completed
from distributed.scheduler import KilledWorker

from mi_spec.errors import ExecutionError, MiSpecError
from mi_spec.execute.cache import ResultCache
from mi_spec.execute.worker import execute_job
from mi_spec.plan.ir import Job, JobResult, Plan
from mi_spec.schedule.gpu_workers import (
    GPU,
    check_resources,
    cuda_devices,
    gpu_worker_spec,
    has_gpu_workers,
)
from mi_spec.schedule.profiles import RunnerProfile, SlurmOptions
from mi_spec.schedule.progress import Console, Progress, count
from mi_spec.schedule.worker_watch import NoWorkers, WorkerWatch

if TYPE_CHECKING:
    from mi_spec.schedule.dispatch import RunnerSession

CONNECT_TIMEOUT = "30s"  # how long to try reaching an existing scheduler
WAIT_POLL_S = 0.05  # how often the wait for results wakes up (to check the workers)
T = TypeVar("T")


class WorkerSetup(WorkerPlugin):
    """Per worker process: quiet transformers, set torch's threads."""

    name = "mi_spec-setup"

    def __init__(self, threads: int):
        self.threads = threads

    def setup(self, worker: Any) -> None:
        os.environ["TRANSFORMERS_VERBOSITY"] = "error"
        if "transformers" in sys.modules:
            sys.modules["transformers"].logging.set_verbosity_error()
        import torch

        torch.set_num_threads(self.threads)


def with_torch_threads(threads: int, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` with torch's intra-op threads set in this (Dask executor) thread: a setting
    made elsewhere does not reach a thread whose thread pool already started."""
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return fn(*args)


# --- sessions and clients ---------------------------------------------------------------------

SHUTDOWN_TIMEOUT_S = 20  # closing an embedded cluster: how long its workers may take to stop


@dataclass
class DaskSession:
    """A connected client, the Dask resources each job asks for (``{"GPU": n}`` on GPUs, else
    none), and (for an embedded cluster) the cluster, which `grow` scales up to the profile's
    size as later plans need more workers, each new worker on its GPUs of ``gpu_groups``."""

    client: Client
    resources: dict[str, float] | None
    console: Console
    cluster: LocalCluster | None = None
    most: int = 0  # an embedded cluster's largest size (the profile's)
    gpu_groups: Sequence[tuple[str, ...]] = ()

    @property
    def gpu(self) -> bool:
        """Whether jobs ask for GPUs."""
        return bool(self.resources and self.resources.get(GPU))

    def grow(self, workers: int) -> None:
        """At least ``workers`` workers (at most `most`), on an embedded cluster."""
        if self.cluster is None:
            return
        want, have = min(workers, self.most), len(self.cluster.workers)
        if want > have:
            with self.console.stage(f"starting {count(want - have, 'more Dask worker')}"):
                _start_workers(self.cluster, self.client, want, self.gpu_groups)


@contextmanager
def open_session(
    profile: RunnerProfile,
    address: str | None = None,
    max_workers: int | None = None,
    console: Console | None = None,
) -> Iterator[DaskSession]:
    """A `DaskSession` for ``profile`` (or the scheduler at ``address``).

    Clusters started here are closed on exit (client first, then the cluster, its workers given
    `SHUTDOWN_TIMEOUT_S` to stop); an existing scheduler is only disconnected from.
    """
    console = console or Console()
    address = address or (profile.address if profile.kind == "cluster" else None)
    if address:
        with _remote(address, profile, console) as session:
            yield session
    elif profile.kind == "slurm":
        assert profile.slurm is not None
        with _slurm(profile, profile.slurm, console) as session:
            yield session
    else:
        with _local(profile, max_workers, console) as session:
            yield session


@contextmanager
def open_client(
    profile: RunnerProfile, address: str | None = None, max_workers: int | None = None
) -> Iterator[tuple[Client, dict[str, float] | None]]:
    """`open_session`'s client and the resources each job asks for (None: any worker)."""
    with open_session(profile, address, max_workers) as session:
        yield session.client, session.resources


@contextmanager
def _local(
    profile: RunnerProfile, max_workers: int | None, console: Console
) -> Iterator[DaskSession]:
    gpus = cuda_devices() if profile.gpu is not False else []
    if profile.gpu is True and not gpus:
        raise ExecutionError("runner profile asks for gpu: true, but CUDA is not available here")
    groups = profile.gpu_groups(gpus) if gpus else []
    most = profile.local_workers(len(gpus))
    n = min(most, max_workers) if max_workers else most
    threads = str(profile.threads_per_worker)
    env = {
        "TRANSFORMERS_VERBOSITY": "error",
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
    }
    each = f" ({count(len(groups[0]), 'GPU')} each)" if groups else ""
    stage = console.begin(f"starting {count(n, 'Dask worker')}{each}")
    # The scheduler only (quick); the workers start inside the try below, so that Ctrl-C or
    # SIGTERM while they start (seconds) still closes them: an interrupted LocalCluster(...)
    # would leave a half-started cluster to an atexit hook that fails with a traceback.
    cluster = LocalCluster(
        n_workers=0,
        threads_per_worker=profile.threads_per_worker,
        processes=True,
        host="127.0.0.1",
        memory_limit=profile.memory_limit,
        dashboard_address=":0",  # a free port (its HTTP server runs even without bokeh)
        env=env,
    )
    try:
        client = Client(cluster, set_as_default=False)
        try:
            _start_workers(cluster, client, n, groups)
            _setup(client, profile, console)
            console.end(stage)
            resources = {GPU: profile.job_gpus(len(groups[0]))} if groups else None
            yield DaskSession(client, resources, console, cluster, most, groups)
        finally:
            client.close()
    except KeyboardInterrupt:  # Ctrl-C, SIGTERM: a busy worker would finish its job first
        _stop_workers_now(cluster)
        raise
    else:  # done: the client is closed, the workers are idle and exit in their own time
        with console.stage("stopping Dask workers"):
            _close_workers(cluster, SHUTDOWN_TIMEOUT_S)
    finally:
        cluster.close()


def _start_workers(
    cluster: LocalCluster, client: Client, n: int, gpu_groups: Sequence[tuple[str, ...]] = ()
) -> None:
    """Start ``n`` workers and wait for them; a worker failing to start raises, as it would in
    ``LocalCluster(n_workers=n)``. With ``gpu_groups``, worker i sees only the GPUs of group
    i (modulo their number) and declares them as its resource GPU."""
    for name in range(n) if gpu_groups else ():
        if name not in cluster.worker_spec:
            cluster.worker_spec[name] = gpu_worker_spec(
                cluster.new_spec, gpu_groups[name % len(gpu_groups)]
            )
    cluster.scale(n)
    correct_state = getattr(cluster, "_correct_state", None)  # raises a worker's start error

    async def started() -> None:  # shielded: an interrupted wait must not cancel the start,
        await asyncio.shield(correct_state())  # which cluster.close() then waits for

    if correct_state is not None:
        cluster.sync(started)
    client.wait_for_workers(n)


def _close_workers(cluster: LocalCluster, timeout: float) -> None:
    """Ask each of ``cluster``'s worker processes to stop, and kill one still running after
    ``timeout`` seconds (``cluster.close`` would give each only 4 s, and warn as it kills:
    a worker process that has loaded torch can take longer than that to exit on a busy machine)."""

    async def close_nannies() -> None:
        nannies = list(cluster.workers.values())
        await asyncio.gather(*(n.close(timeout=timeout) for n in nannies), return_exceptions=True)

    with contextlib.suppress(Exception):
        cluster.sync(close_nannies, callback_timeout=timeout + 10)


def _stop_workers_now(cluster: LocalCluster) -> None:
    """Stop ``cluster``'s worker processes now: ask each to stop and kill it after a moment,
    rather than wait (seconds) for the job it is running, whose result nobody will collect."""
    nanny_log = logging.getLogger("distributed.nanny")
    level = nanny_log.level
    nanny_log.setLevel(logging.ERROR)  # not "Worker process still alive ..., killing": we know
    try:
        _close_workers(cluster, timeout=1)
    finally:
        nanny_log.setLevel(level)


@contextmanager
def _remote(address: str, profile: RunnerProfile, console: Console) -> Iterator[DaskSession]:
    stage = console.begin(f"connecting to {address}")
    try:
        client = Client(address, timeout=CONNECT_TIMEOUT, set_as_default=False)
    except (OSError, TimeoutError) as e:
        raise ExecutionError(
            f"cannot reach the Dask scheduler at {address}: {e}. Start one with `dask scheduler` "
            "and `dask worker ADDRESS`, or check the address"
        ) from e
    try:
        gpu = profile.gpu is True or (profile.gpu == "auto" and has_gpu_workers(client))
        _setup(client, profile, console)
        console.end(stage)
        yield DaskSession(client, {GPU: profile.job_gpus()} if gpu else None, console)
    finally:
        client.close()


@contextmanager
def _slurm(profile: RunnerProfile, opts: SlurmOptions, console: Console) -> Iterator[DaskSession]:
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise MiSpecError("kind: slurm needs dask-jobqueue: pip install dask-jobqueue") from None
    kwargs: dict[str, Any] = {"processes": 1, **opts.extra}
    kwargs["scheduler_options"] = {"dashboard_address": ":0", **kwargs.get("scheduler_options", {})}
    if profile.gpu is True:
        n = profile.gpus_per_worker if isinstance(profile.gpus_per_worker, int) else 1
        kwargs["worker_extra_args"] = [
            *kwargs.get("worker_extra_args", []),
            "--resources",
            f"GPU={n}",
        ]
        kwargs["job_extra_directives"] = [
            *kwargs.get("job_extra_directives", []),
            f"--gres=gpu:{n}",
        ]
    stage = console.begin(f"submitting {opts.jobs} Slurm worker jobs")
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
            _setup(client, profile, console)
            console.end(stage)
            yield DaskSession(
                client, {GPU: profile.job_gpus()} if profile.gpu is True else None, console
            )
        finally:
            client.close()
    finally:
        cluster.close()


def dashboard_available() -> bool:
    """Whether this process can serve Dask's dashboard (it needs bokeh)."""
    return importlib.util.find_spec("bokeh") is not None


def _setup(client: Client, profile: RunnerProfile, console: Console) -> None:
    """Register the worker setup; print the dashboard link, or why there is none.

    A scheduler started here (local, slurm) serves the dashboard only with bokeh installed
    here; an existing scheduler lists it among its services when it serves one.
    """
    client.register_plugin(WorkerSetup(profile.threads_per_worker))
    if not profile.dashboard:
        return
    started_here = client.cluster is not None
    if started_here and not dashboard_available():
        console.say("  Dask dashboard unavailable: pip install bokeh")
    elif "dashboard" in client.scheduler_info().get("services", {}):
        console.say(f"  Dask dashboard: {client.dashboard_link}")


# --- running ----------------------------------------------------------------------------------


def run_dask(
    plan: Plan,
    jobs: Sequence[Job],
    cache: ResultCache | None,
    progress: Progress,
    profile: RunnerProfile,
    address: str | None = None,
    session: RunnerSession | None = None,
) -> dict[str, JobResult]:
    """Results by job id, computed on Dask as ``profile`` says (``address``: an existing scheduler).

    ``session`` (a command's `RunnerSession`) supplies the cluster, started on its first use and
    kept for later plans; without one, a cluster is opened for these jobs and closed after them.
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
            progress.update(cached=True, what=_job_name(job))
    console = progress.console
    if todo and session is not None:
        dask = session.dask_session(len(todo), console)
        _compute_stage(dask, plan, list(todo.values()), cache, progress, profile, results)
    elif todo:
        with open_session(profile, address, len(todo), console) as dask:
            _compute_stage(dask, plan, list(todo.values()), cache, progress, profile, results)
    return {job.id: results[job.id] for job in jobs}


def _job_name(job: Job, seconds: float | None = None) -> str:
    took = f" {seconds:.2f}s" if seconds is not None else ""
    return f"job {job.id[:12]} ({job.experiment}, {len(job.rows)} rows){took}"


def _compute_stage(
    dask: DaskSession,
    plan: Plan,
    jobs: list[Job],
    cache: ResultCache | None,
    progress: Progress,
    profile: RunnerProfile,
    results: dict[str, JobResult],
) -> None:
    with progress.console.stage(f"running {count(len(jobs), 'job')}") as stage:
        progress.restart()
        _compute(dask.client, plan, jobs, cache, progress, profile, dask.resources, results)
        stage.note = progress.summary


def _compute(
    client: Client,
    plan: Plan,
    jobs: list[Job],
    cache: ResultCache | None,
    progress: Progress,
    profile: RunnerProfile,
    resources: dict[str, float] | None,
    results: dict[str, JobResult],
) -> None:
    """Submit ``jobs`` (each asking for ``resources``) and store each result as it arrives;
    resubmit cancelled jobs (a plan lost with the workers holding it). Fails at once when no
    connected worker has ``resources``, and once the scheduler has had no such worker for
    ``profile.no_worker_timeout`` seconds."""
    if not client.scheduler_info(n_workers=0).get("n_workers"):
        progress.say("  waiting for a Dask worker to connect")
        client.wait_for_workers(1)
    if resources:
        check_resources(client, resources)
    watch = WorkerWatch(client, profile.no_worker_timeout, say=progress.say, need=resources)
    total = len(results) + len(jobs)
    shipped = plan.model_copy(update={"jobs": ()})  # workers never read plan.jobs
    plan_future = client.scatter(shipped, broadcast=True, hash=False)
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
        while (future := _next_done(queue, watch)) is not None:
            job, status = pending.pop(future), future.status
            if status == "finished":
                try:
                    result = future.result()
                except CancelledError:  # its result died with its worker before we got it
                    status = "lost"
                else:
                    _store(job, result, cache, progress, results)
                    continue
            if status == "error":
                _finish_done(pending, cache, progress, results)
                raise _failure(job, future.exception(), profile.retries)
            # cancelled or lost, e.g. every worker holding the plan died: submit again
            cancelled[job.id] = cancelled.get(job.id, 0) + 1
            if cancelled[job.id] > profile.retries + 1:
                _finish_done(pending, cache, progress, results)
                raise ExecutionError(
                    f"job {job.id} (experiment {job.experiment!r}) was {status} "
                    f"{cancelled[job.id]} times: each time, the workers holding the plan died or "
                    "left (out of memory? a job crashing its worker? see the workers' logs)"
                )
            if plan_future.status != "finished":
                watch.wait_for_workers()  # a replacement worker may take a while
                plan_future = client.scatter(shipped, broadcast=True, hash=False)
            new = submit(job)
            pending[new] = job
            queue.add(new)
    except NoWorkers as e:
        _finish_done(pending, cache, progress, results)
        raise ExecutionError(e.describe(len(results), total, cache is not None)) from None
    except KeyboardInterrupt:  # Ctrl-C, SIGTERM: keep what already finished
        with contextlib.suppress(Exception):
            _finish_done(pending, cache, progress, results)
        raise
    finally:
        if pending:
            with contextlib.suppress(Exception):  # never mask the error that got us here
                client.cancel(list(pending))


def _next_done(queue: as_completed, watch: WorkerWatch) -> Future | None:
    """The next future to finish (or fail, or be cancelled), None when none is left; checks the
    scheduler's workers while waiting (`NoWorkers`)."""
    while not queue.has_ready():
        if queue.is_empty():
            return None
        watch.check()
        time.sleep(WAIT_POLL_S)
    return next(queue)


def _store(
    job: Job,
    result: JobResult,
    cache: ResultCache | None,
    progress: Progress,
    results: dict[str, JobResult],
) -> None:
    if cache is not None:
        cache.put(result)
    results[result.job_id] = result
    progress.update(what=_job_name(job, result.seconds))


def _finish_done(
    pending: dict[Future, Job],
    cache: ResultCache | None,
    progress: Progress,
    results: dict[str, JobResult],
) -> None:
    """Cache the results that finished but were not collected yet (before raising)."""
    for future in [f for f in pending if f.status == "finished"]:
        job = pending.pop(future)
        try:
            result = future.result()
        except CancelledError:  # lost with its worker meanwhile
            continue
        _store(job, result, cache, progress, results)


def _failure(job: Job, cause: BaseException | None, retries: int) -> ExecutionError:
    name = f"job {job.id} (experiment {job.experiment!r})"
    if isinstance(cause, KilledWorker):  # the scheduler's allowed-failures, not our retries
        deaths = cause.allowed_failures + 1
        last = getattr(cause.last_worker, "address", cause.last_worker)
        error = ExecutionError(
            f"the Dask worker running {name} died, {deaths} time{'s' if deaths != 1 else ''} "
            f"(the last: {last}): out of memory, a crash in native code, or a killed process? "
            "The workers' logs say which"
        )
        error.__cause__ = cause
        return error
    detail = f"{type(cause).__name__}: {cause}" if cause is not None else "unknown error"
    attempts = f"{retries + 1} attempt{'s' if retries else ''}"
    error = ExecutionError(f"{name} failed after {attempts}: {detail}")
    error.__cause__ = cause
    return error
