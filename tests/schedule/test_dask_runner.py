"""Dask execution: same results as synchronous (embedded cluster, existing scheduler), survives a
killed worker, resumes an interrupted study from the cache, reports a job failing every retry."""

from __future__ import annotations

import os
import signal
import time

import pytest
from distributed import LocalCluster

from mi_spec.api import compile_file
from mi_spec.errors import ExecutionError
from mi_spec.execute.cache import ResultCache
from mi_spec.plan.ir import JobResult, Plan
from mi_spec.schedule import dask_runner
from mi_spec.schedule.dask_runner import run_dask
from mi_spec.schedule.profiles import RunnerProfile
from mi_spec.schedule.progress import Progress
from mi_spec.schedule.synchronous import run_synchronous

BODY = "experiments:\n  - {kind: activation_patching, sites: ['L*.H*'], batch_size: %d}\n"


class CountingCache(ResultCache):
    """Counts puts; ``stop_after`` puts, the next one raises KeyboardInterrupt (an interrupt)."""

    def __init__(self, root, stop_after: int | None = None):
        super().__init__(root)
        self.puts, self.stop_after = 0, stop_after

    def put(self, result: JobResult) -> None:
        if self.stop_after is not None and self.puts >= self.stop_after:
            raise KeyboardInterrupt
        super().put(result)
        self.puts += 1


def values(results: dict[str, JobResult]) -> dict[str, tuple]:
    """Per-row values of each job (not its timing)."""
    return {k: (r.clean, r.source, r.variants) for k, r in results.items()}


def cluster_profile(address: str, retries: int = 2) -> RunnerProfile:
    return RunnerProfile(kind="cluster", address=address, retries=retries, dashboard=False)


@pytest.fixture
def study(study_file) -> tuple[Plan, dict[str, JobResult]]:
    """A 4-job plan (16 rows, 4 a job) and its synchronous results."""
    _, plan = compile_file(study_file(BODY % 4))
    assert len(plan.jobs) == 4
    return plan, run_synchronous(plan, plan.jobs, None, Progress(4))


@pytest.fixture(scope="module")
def scheduler():
    """An existing scheduler on loopback with one worker process (one thread)."""
    with LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
    ) as cluster:
        yield cluster.scheduler_address


def test_local_cluster_matches_synchronous(study, tmp_path):
    plan, expected = study
    cache = CountingCache(tmp_path / "cache")
    profile = RunnerProfile(kind="local", workers=2, threads_per_worker=1, dashboard=False)
    got = run_dask(plan, plan.jobs, cache, Progress(4), profile)
    assert list(got) == [j.id for j in plan.jobs]
    assert values(got) == values(expected)
    assert cache.puts == 4 and all(cache.get(j.id) == got[j.id] for j in plan.jobs)


def test_existing_scheduler_matches_synchronous(study, scheduler):
    plan, expected = study
    got = run_dask(
        plan, plan.jobs, None, Progress(4), cluster_profile("tcp://127.0.0.1:1"), scheduler
    )
    assert values(got) == values(expected)


def test_interrupted_study_resumes_with_only_the_missing_jobs(study, scheduler, tmp_path):
    plan, expected = study
    profile = cluster_profile(scheduler)
    first = CountingCache(tmp_path / "cache", stop_after=2)
    with pytest.raises(KeyboardInterrupt):
        run_dask(plan, plan.jobs, first, Progress(4), profile)
    assert first.puts == 2
    again, progress = CountingCache(tmp_path / "cache"), Progress(4)
    got = run_dask(plan, plan.jobs, again, progress, profile)
    assert (progress.cached, again.puts) == (2, 2)  # exactly the missing jobs were computed
    assert values(got) == values(expected)
    progress = Progress(4)  # all cached now: no cluster is even contacted
    assert values(run_dask(plan, plan.jobs, again, progress, cluster_profile("tcp://h:1"))) == (
        values(expected)
    )
    assert progress.cached == 4


def test_job_failing_every_retry_is_reported_after_earlier_results_are_cached(
    study, scheduler, tmp_path
):
    plan, _ = study
    bad = plan.jobs[-1].model_copy(update={"id": "feedfacefeedface", "rows": (999,)})
    jobs = [*plan.jobs[:3], bad]  # one worker thread: the good jobs run first
    cache = CountingCache(tmp_path / "cache")
    with pytest.raises(ExecutionError) as err:
        run_dask(plan, jobs, cache, Progress(4), cluster_profile(scheduler, retries=1))
    message = str(err.value)
    assert "feedfacefeedface" in message and "'activation_patching'" in message
    assert "2 attempts" in message and err.value.__cause__ is not None
    assert cache.puts == 3 and all(cache.get(j.id) for j in plan.jobs[:3])


class KillOnFirstResult(Progress):
    """After the first computed result, SIGKILL a worker process that is running a job."""

    def __init__(self, total: int, cluster: LocalCluster):
        super().__init__(total)
        self.cluster, self.killed = cluster, None

    def update(self, n: int = 1, cached: bool = False) -> None:
        super().update(n, cached)
        if self.killed is None and not cached:
            state = self.cluster.scheduler
            busy = [w.address for w in state.workers.values() if w.processing]
            nanny = next(n for n in self.cluster.workers.values() if n.worker_address in busy)
            self.killed = nanny.pid
            os.kill(nanny.pid, signal.SIGKILL)


def test_study_survives_a_killed_worker(study_file):
    _, plan = compile_file(study_file(BODY % 1))  # 16 jobs
    expected = run_synchronous(plan, plan.jobs, None, Progress(16))
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
    ) as cluster:
        progress = KillOnFirstResult(16, cluster)
        got = run_dask(plan, plan.jobs, None, progress, cluster_profile(cluster.scheduler_address))
        assert progress.killed is not None
        with pytest.raises(ProcessLookupError):
            os.kill(progress.killed, 0)
    assert values(got) == values(expected)


def test_unreachable_scheduler_is_an_execution_error(study, monkeypatch):
    plan, _ = study
    monkeypatch.setattr(dask_runner, "CONNECT_TIMEOUT", "1s")
    start = time.perf_counter()
    with pytest.raises(
        ExecutionError, match="cannot reach the Dask scheduler at tcp://127.0.0.1:9"
    ):
        run_dask(plan, plan.jobs, None, Progress(4), cluster_profile("tcp://127.0.0.1:9"))
    assert time.perf_counter() - start < 10
