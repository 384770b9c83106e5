"""Run a plan's jobs on Dask: an embedded LocalCluster, an existing scheduler, or Slurm workers.

Same contract as `run_synchronous`: cached results are reused without submitting, and every new
result is cached the moment it arrives, so an interrupted study resumes where it stopped. Workers
receive the plan once (scattered to all of them) and keep the model in their process-level cache
(`mi_spec.execute.worker`); jobs carry a reference to the model, never the model.
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
from typing import Any, TypeVar

from distributed import Client, Future, LocalCluster, WorkerPlugin, as_completed
from distributed.scheduler import KilledWorker

from mi_spec.errors import ExecutionError, MiSpecError
from mi_spec.execute.cache import ResultCache
from mi_spec.execute.worker import execute_job
from mi_spec.plan.ir import Job, JobResult, Plan
from mi_spec.schedule.profiles import RunnerProfile, SlurmOptions
from mi_spec.schedule.progress import Progress

CONNECT_TIMEOUT = "30s"  # how long to try reaching an existing scheduler
WAIT_POLL_S = 0.05  # how often the wait for results wakes up (to check the workers)
WORKER_CHECK_S = 1.0  # how often (at most) the scheduler is asked how many workers it has
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
        resources=GPU if gpus else None,
        env=env,
    )
    try:
        client = Client(cluster, set_as_default=False)
        try:
            _start_workers(cluster, client, n)
            _setup(client, profile, gpus, dashboard)
            yield client, bool(gpus)
        finally:
            client.close()
    except KeyboardInterrupt:  # Ctrl-C, SIGTERM: a busy worker would finish its job first
        _stop_workers_now(cluster)
        raise
    finally:
        cluster.close()


def _start_workers(cluster: LocalCluster, client: Client, n: int) -> None:
    """Start ``n`` workers and wait for them; a worker failing to start raises, as it would in
    ``LocalCluster(n_workers=n)``."""
    cluster.scale(n)
    correct_state = getattr(cluster, "_correct_state", None)  # raises a worker's start error

    async def started() -> None:  # shielded: an interrupted wait must not cancel the start,
        await asyncio.shield(correct_state())  # which cluster.close() then waits for

    if correct_state is not None:
        cluster.sync(started)
    client.wait_for_workers(n)


def _stop_workers_now(cluster: LocalCluster) -> None:
    """Stop ``cluster``'s worker processes now: ask each to stop and kill it after a moment,
    rather than wait (seconds) for the job it is running, whose result nobody will collect."""

    async def close_nannies() -> None:
        nannies = list(cluster.workers.values())
        await asyncio.gather(*(n.close(timeout=1) for n in nannies), return_exceptions=True)

    nanny_log = logging.getLogger("distributed.nanny")
    level = nanny_log.level
    nanny_log.setLevel(logging.ERROR)  # not "Worker process still alive ..., killing": we know
    try:
        with contextlib.suppress(Exception):
            cluster.sync(close_nannies, callback_timeout=10)
    finally:
        nanny_log.setLevel(level)


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
    with the workers holding it). Fails once the scheduler has had no worker for
    ``profile.no_worker_timeout`` seconds."""
    if not client.scheduler_info(n_workers=0).get("n_workers"):
        _say("waiting for a Dask worker to connect")
        client.wait_for_workers(1)
    watch = WorkerWatch(client, profile.no_worker_timeout)
    total = len(results) + len(jobs)
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
        while (future := _next_done(queue, watch)) is not None:
            job, status = pending.pop(future), future.status
            if status == "finished":
                try:
                    result = future.result()
                except CancelledError:  # its result died with its worker before we got it
                    status = "lost"
                else:
                    _store(result, cache, progress, results)
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


class NoWorkers(Exception):
    """The scheduler has had no worker for longer than the profile allows."""

    def __init__(self, address: str, lost: int, waited: float):
        super().__init__(address, lost, waited)
        self.address, self.lost, self.waited = address, lost, waited

    def describe(self, done: int, total: int, cached: bool) -> str:
        who = "the only worker" if self.lost == 1 else f"all {self.lost} workers"
        kept = "finished and are cached" if cached else "finished (not cached: the cache is off)"
        return (
            f"{who} left the Dask scheduler at {self.address} and none joined within "
            f"{self.waited:g} s; {done} of {total} jobs {kept}, {total - done} did not. Start "
            "workers (or raise no_worker_timeout in the runner profile) and run the study again"
        )


class WorkerWatch:
    """Watches the scheduler's worker count (asking at most once every `WORKER_CHECK_S` seconds)
    and raises `NoWorkers` once it has been zero for ``timeout`` seconds (None: never)."""

    def __init__(
        self, client: Client, timeout: float | None, clock: Callable[[], float] | None = None
    ):
        self.client, self.timeout = client, timeout
        self.clock = clock or time.monotonic
        self.address = str(getattr(client.scheduler, "address", None) or "?")
        self.most = 0  # the most workers seen at once
        self.since: float | None = None  # since when the scheduler has had no worker
        self.every = WORKER_CHECK_S if timeout is None else min(WORKER_CHECK_S, timeout / 5)
        self.next_check = 0.0
        self._count()

    def check(self) -> None:
        """Raise `NoWorkers` when the scheduler has had no worker for too long."""
        if self.clock() >= self.next_check:
            self._count()

    def wait_for_workers(self) -> None:
        """Return once the scheduler has a worker; `NoWorkers` after ``timeout`` without one."""
        while not self._count():
            time.sleep(self.every)

    def _count(self) -> int:
        now = self.clock()
        self.next_check = now + self.every
        try:
            info = self.client.scheduler_info(n_workers=0)
        except OSError as e:  # the scheduler itself is gone
            raise ExecutionError(
                f"lost the connection to the Dask scheduler at {self.address}: {e}"
            ) from e
        n = int(info.get("n_workers", len(info.get("workers", {}))))
        self.most = max(self.most, n)
        if n:
            self.since = None
        elif self.since is None:
            self.since = now
            limit = f"up to {self.timeout:g} s " if self.timeout is not None else ""
            _say(f"no Dask worker left at {self.address}; waiting {limit}for one to join")
        elif self.timeout is not None and now - self.since >= self.timeout:
            raise NoWorkers(self.address, max(self.most, 1), self.timeout)
        return n


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
        try:
            result = future.result()
        except CancelledError:  # lost with its worker meanwhile
            continue
        _store(result, cache, progress, results)


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
