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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from distributed import Client, Future, LocalCluster, WorkerPlugin, as_completed
from distributed.scheduler import KilledWorker

from mi_spec.errors import ExecutionError, MiSpecError
from mi_spec.execute.cache import ResultCache
from mi_spec.execute.worker import execute_job
from mi_spec.plan.ir import Job, JobResult, Plan
from mi_spec.schedule.profiles import RunnerProfile, SlurmOptions
from mi_spec.schedule.progress import Console, Progress, count

if TYPE_CHECKING:
    from mi_spec.schedule.dispatch import RunnerSession

CONNECT_TIMEOUT = "30s"  # how long to try reaching an existing scheduler
WAIT_POLL_S = 0.05  # how often the wait for results wakes up (to check the workers)
WORKER_CHECK_S = 1.0  # how often (at most) the scheduler is asked how many workers it has
GPU = "GPU"  # the Dask resource GPU workers declare and GPU jobs ask for
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


def _cuda_devices() -> list[str]:
    """The ids of the GPUs this process may use (as CUDA_VISIBLE_DEVICES names them)."""
    import torch

    if not torch.cuda.is_available():
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [d.strip() for d in visible.split(",")] if visible else []
    return ids[: torch.cuda.device_count()] or [str(i) for i in range(torch.cuda.device_count())]


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
    gpus = _cuda_devices() if profile.gpu is not False else []
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


def gpu_worker_spec(template: dict[str, Any], gpus: Sequence[str]) -> dict[str, Any]:
    """A SpecCluster worker spec like ``template`` (a LocalCluster's `new_spec`), whose process
    sees only ``gpus`` (its CUDA_VISIBLE_DEVICES, set before the worker process starts: they
    are its cuda:0, cuda:1, ...) and declares them as its Dask resource GPU."""
    options = dict(template.get("options", {}))
    options["env"] = {**(options.get("env") or {}), "CUDA_VISIBLE_DEVICES": ",".join(gpus)}
    options["resources"] = {**(options.get("resources") or {}), GPU: len(gpus)}
    return {**template, "options": options}


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
        gpu = profile.gpu is True or (profile.gpu == "auto" and _gpu_workers(client))
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


def _gpu_workers(client: Client) -> bool:
    workers = client.scheduler_info(n_workers=-1).get("workers", {})
    return any(w.get("resources", {}).get(GPU, 0) >= 1 for w in workers.values())


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
        _check_resources(client, resources)
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


def _fits(worker: dict[str, Any], need: dict[str, float] | None) -> bool:
    """Whether a worker (as `scheduler_info` describes it) has the resources ``need``."""
    have = worker.get("resources") or {}
    return all(have.get(name, 0) >= amount for name, amount in (need or {}).items())


def _resource_text(resources: dict[str, float] | None) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in sorted((resources or {}).items())) or "none"


def _check_resources(client: Client, need: dict[str, float]) -> None:
    """Raise `ExecutionError` when no connected worker has the resources ``need`` (jobs asking
    for them would wait forever), naming what the workers have."""
    workers = client.scheduler_info(n_workers=-1).get("workers", {})
    if any(_fits(w, need) for w in workers.values()):
        return
    address = getattr(client.scheduler, "address", None) or "?"
    shown = sorted(workers.items())[:4]
    offers = "; ".join(f"{a}: {_resource_text(w.get('resources'))}" for a, w in shown)
    more = f"; and {len(workers) - len(shown)} more" if len(workers) > len(shown) else ""
    wanted = _resource_text(need)
    raise ExecutionError(
        f"every job asks for the Dask resources {wanted} (the runner profile's gpu and "
        f"gpus_per_job), but none of the {count(len(workers), 'worker')} at {address} has them "
        f"({offers}{more}). Start workers with `dask worker {address} --resources "
        f"{wanted.replace(', ', ',')}`, or lower gpus_per_job (gpu: false runs on any worker)"
    )


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

    def __init__(self, address: str, lost: int, waited: float, what: str = ""):
        super().__init__(address, lost, waited, what)
        self.address, self.lost, self.waited = address, lost, waited
        self.what = what  # which workers count, e.g. " with GPU=1"

    def describe(self, done: int, total: int, cached: bool) -> str:
        who = "the only worker" if self.lost == 1 else f"all {self.lost} workers"
        who += self.what
        kept = "finished and are cached" if cached else "finished (not cached: the cache is off)"
        return (
            f"{who} left the Dask scheduler at {self.address} and none joined within "
            f"{self.waited:g} s; {done} of {total} jobs {kept}, {total - done} did not. Start "
            "workers (or raise no_worker_timeout in the runner profile) and run the study again"
        )


class WorkerWatch:
    """Watches the scheduler's worker count (asking at most once every `WORKER_CHECK_S` seconds)
    and raises `NoWorkers` once it has been zero for ``timeout`` seconds (None: never). With
    ``need`` (e.g. ``{"GPU": 1}``), only workers with those resources count: jobs that need a GPU
    cannot go on with CPU workers alone."""

    def __init__(
        self,
        client: Client,
        timeout: float | None,
        clock: Callable[[], float] | None = None,
        say: Callable[[str], None] | None = None,
        need: dict[str, float] | None = None,
    ):
        self.client, self.timeout, self.need = client, timeout, need
        self.what = f" with {_resource_text(need)}" if need else ""
        self.clock = clock or time.monotonic
        self.say = say or Console().say
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
            info = self.client.scheduler_info(n_workers=-1 if self.need else 0)
        except OSError as e:  # the scheduler itself is gone
            raise ExecutionError(
                f"lost the connection to the Dask scheduler at {self.address}: {e}"
            ) from e
        if self.need:
            n = sum(_fits(w, self.need) for w in info.get("workers", {}).values())
        else:
            n = int(info.get("n_workers", len(info.get("workers", {}))))
        self.most = max(self.most, n)
        if n:
            self.since = None
        elif self.since is None:
            self.since = now
            limit = f"up to {self.timeout:g} s " if self.timeout is not None else ""
            self.say(
                f"  no Dask worker{self.what} left at {self.address}; waiting {limit}"
                "for one to join"
            )
        elif self.timeout is not None and now - self.since >= self.timeout:
            raise NoWorkers(self.address, max(self.most, 1), self.timeout, self.what)
        return n


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
