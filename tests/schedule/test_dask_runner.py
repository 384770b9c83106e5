"""Dask execution: same results as synchronous (embedded cluster, existing scheduler, Slurm),
survives killed workers, resumes an interrupted study from the cache, reports a job failing every
retry."""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest
import torch
from conftest import GPT2
from distributed import LocalCluster

from mi_spec.api import compile_file
from mi_spec.errors import ExecutionError
from mi_spec.execute.cache import ResultCache
from mi_spec.plan.ir import JobResult
from mi_spec.schedule import dask_runner
from mi_spec.schedule.dask_runner import open_client, run_dask, with_torch_threads
from mi_spec.schedule.profiles import RunnerProfile, SlurmOptions
from mi_spec.schedule.progress import Progress
from mi_spec.schedule.synchronous import run_synchronous
from mi_spec.schedule.worker_watch import NoWorkers, WorkerWatch

# jobs slow enough (~0.1 s) for a worker to be busy when the first result arrives
WIDER = GPT2.replace("n_embd: 32", "n_embd: 192")


class CountingCache(ResultCache):
    """Counts puts; after ``stop_after`` puts the next one raises KeyboardInterrupt."""

    def __init__(self, root, stop_after: int | None = None):
        super().__init__(root)
        self.puts, self.stop_after = 0, stop_after

    def put(self, result: JobResult) -> None:
        if self.stop_after is not None and self.puts >= self.stop_after:
            raise KeyboardInterrupt
        super().put(result)
        self.puts += 1


class KillOnFirstResult(Progress):
    """After the first computed result, SIGKILL a worker process of ``clusters[-1]``, one that is
    running a job when there is one."""

    def __init__(self, total: int, clusters: list[LocalCluster]):
        super().__init__(total)
        self.clusters, self.killed = clusters, None

    def update(self, n: int = 1, cached: bool = False, what: str | None = None) -> None:
        super().update(n, cached, what)
        if self.killed is None and not cached:
            cluster = self.clusters[-1]
            busy = {w.address for w in list(cluster.scheduler.workers.values()) if w.processing}
            nannies = list(cluster.workers.values())
            nanny = next((n for n in nannies if n.worker_address in busy), nannies[0])
            self.killed = nanny.pid
            os.kill(nanny.pid, signal.SIGKILL)


def values(results: dict[str, JobResult]) -> dict[str, tuple]:
    """Per-row values of each job (not its timing)."""
    return {k: (r.clean, r.source, r.variants) for k, r in results.items()}


def cluster_profile(address: str, retries: int = 2, threads: int = 1) -> RunnerProfile:
    return RunnerProfile(
        kind="cluster",
        address=address,
        retries=retries,
        threads_per_worker=threads,
        dashboard=False,
    )


class RecordingCluster(LocalCluster):
    """The embedded LocalCluster, remembered so that a test can reach its workers."""

    made: list[LocalCluster] = []

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        RecordingCluster.made.append(self)


@pytest.fixture(scope="module")
def scheduler():
    """An existing scheduler with one worker, shared by this module's tests."""
    with LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=":0"
    ) as cluster:
        yield cluster


def test_local_cluster_matches_synchronous_despite_a_killed_worker(
    patching_file, monkeypatch, tmp_path
):
    _, plan = compile_file(patching_file(1, model=WIDER))  # 16 jobs
    expected = run_synchronous(plan, plan.jobs, None, Progress(16))
    RecordingCluster.made.clear()
    monkeypatch.setattr(dask_runner, "LocalCluster", RecordingCluster)
    cache, progress = (
        CountingCache(tmp_path / "cache"),
        KillOnFirstResult(16, RecordingCluster.made),
    )
    profile = RunnerProfile(kind="local", workers=2, threads_per_worker=1, dashboard=False)
    got = run_dask(plan, plan.jobs, cache, progress, profile)
    assert list(got) == [j.id for j in plan.jobs]
    assert values(got) == values(expected)
    assert cache.puts == 16 and all(cache.get(j.id) == got[j.id] for j in plan.jobs)
    (cluster,) = RecordingCluster.made
    assert progress.killed is not None and cluster.status.name == "closed"


def test_existing_scheduler_matches_synchronous(study, scheduler):
    plan, expected = study
    placeholder = cluster_profile("tcp://127.0.0.1:1")  # the address argument wins
    got = run_dask(plan, plan.jobs, None, Progress(4), placeholder, scheduler.scheduler_address)
    assert values(got) == values(expected)


def test_worker_setup_sets_torch_threads_and_quiets_transformers(scheduler):
    def probe() -> tuple[int, str | None]:
        return torch.get_num_threads(), os.environ.get("TRANSFORMERS_VERBOSITY")

    for threads in (2, 1):
        with open_client(cluster_profile(scheduler.scheduler_address, threads=threads)) as (
            client,
            gpu,
        ):
            task = client.submit(with_torch_threads, threads, probe, pure=False)
            assert task.result() == (threads, "error")
            assert gpu is None  # no worker advertises a GPU: jobs ask for no resources


def test_worker_setup_plugin(monkeypatch):
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "info")
    threads = torch.get_num_threads()
    try:
        worker = type("FakeWorker", (), {"name": 3})()  # LocalCluster names workers 0, 1, ...
        dask_runner.WorkerSetup(3).setup(worker)
        assert torch.get_num_threads() == 3
        assert os.environ["TRANSFORMERS_VERBOSITY"] == "error"
    finally:
        torch.set_num_threads(threads)


def test_interrupted_study_resumes_with_only_the_missing_jobs(study, scheduler, tmp_path):
    plan, expected = study
    profile = cluster_profile(scheduler.scheduler_address)
    first = CountingCache(tmp_path / "cache", stop_after=2)
    with pytest.raises(KeyboardInterrupt):
        run_dask(plan, plan.jobs, first, Progress(4), profile)
    assert first.puts == 2
    again, progress = CountingCache(tmp_path / "cache"), Progress(4)
    got = run_dask(plan, plan.jobs, again, progress, profile)
    assert (progress.cached, again.puts) == (2, 2)  # exactly the missing jobs were computed
    assert values(got) == values(expected)
    progress = Progress(4)  # everything cached: no scheduler is even contacted
    got = run_dask(plan, plan.jobs, again, progress, cluster_profile("tcp://127.0.0.1:1"))
    assert values(got) == values(expected) and progress.cached == 4


def test_job_failing_every_retry_is_reported_after_earlier_results_are_cached(
    study, scheduler, tmp_path
):
    plan, _ = study
    bad = plan.jobs[-1].model_copy(update={"id": "feedfacefeedface", "rows": (999,)})
    jobs = [*plan.jobs[:3], bad]  # one worker thread, plan order: the good jobs run first
    cache = CountingCache(tmp_path / "cache")
    profile = cluster_profile(scheduler.scheduler_address, retries=1)
    with pytest.raises(ExecutionError) as err:
        run_dask(plan, jobs, cache, Progress(4), profile)
    message = str(err.value)
    assert "feedfacefeedface" in message and "'activation_patching'" in message
    assert "2 attempts" in message and err.value.__cause__ is not None
    assert cache.puts == 3 and all(cache.get(j.id) for j in plan.jobs[:3])


def test_unreachable_scheduler_is_an_execution_error(study, monkeypatch):
    plan, _ = study
    monkeypatch.setattr(dask_runner, "CONNECT_TIMEOUT", "1s")
    start = time.perf_counter()
    with pytest.raises(
        ExecutionError, match="cannot reach the Dask scheduler at tcp://127.0.0.1:9"
    ):
        run_dask(plan, plan.jobs, None, Progress(4), cluster_profile("tcp://127.0.0.1:9"))
    assert time.perf_counter() - start < 10


def test_study_survives_losing_its_only_worker(patching_file, scheduler):
    """The plan's only copy dies with the worker: it is sent again and the jobs resubmitted.
    (The last test using the module's scheduler: its worker is replaced.)"""
    _, plan = compile_file(patching_file(2, model=WIDER))  # 8 jobs
    expected = run_synchronous(plan, plan.jobs, None, Progress(8))
    progress = KillOnFirstResult(8, [scheduler])
    profile = cluster_profile(scheduler.scheduler_address)
    assert values(run_dask(plan, plan.jobs, None, progress, profile)) == values(expected)
    assert progress.killed not in {nanny.pid for nanny in scheduler.workers.values()}


class FakeSLURMCluster(LocalCluster):
    """Stands in for dask_jobqueue.SLURMCluster: records its arguments, runs thread workers."""

    seen: dict = {}

    def __init__(self, **kwargs):
        FakeSLURMCluster.seen = dict(kwargs)
        super().__init__(n_workers=0, processes=False, threads_per_worker=1, dashboard_address=":0")

    def scale(self, n: int = 0, jobs: int = 0, **kwargs) -> None:
        FakeSLURMCluster.seen.setdefault("scaled", []).append(jobs)
        super().scale(jobs)


def test_slurm_profile_drives_a_slurm_cluster(study, monkeypatch):
    plan, expected = study
    fake = type(sys)("dask_jobqueue")
    fake.SLURMCluster = FakeSLURMCluster
    monkeypatch.setitem(sys.modules, "dask_jobqueue", fake)
    slurm = SlurmOptions(cores=2, memory="1GB", jobs=1, extra={"job_extra_directives": ["-x"]})
    profile = RunnerProfile(kind="slurm", slurm=slurm, dashboard=False)
    got = run_dask(plan, plan.jobs, None, Progress(4), profile)
    assert values(got) == values(expected)
    seen = FakeSLURMCluster.seen
    assert (seen["cores"], seen["memory"], seen["processes"], seen["scaled"][0]) == (2, "1GB", 1, 1)
    assert seen["job_extra_directives"] == ["-x"]
    with open_client(profile.model_copy(update={"gpu": True})) as (_, gpu):
        assert gpu == {"GPU": 1}
    assert FakeSLURMCluster.seen["job_extra_directives"] == ["-x", "--gres=gpu:1"]
    assert FakeSLURMCluster.seen["worker_extra_args"] == ["--resources", "GPU=1"]
    two = RunnerProfile(kind="slurm", slurm=slurm, gpu=True, gpus_per_worker=2, dashboard=False)
    with open_client(two) as (_, gpu):
        assert gpu == {"GPU": 2}  # a job holds both GPUs of its Slurm job
    assert FakeSLURMCluster.seen["job_extra_directives"] == ["-x", "--gres=gpu:2"]
    assert FakeSLURMCluster.seen["worker_extra_args"] == ["--resources", "GPU=2"]


# --- losing workers ---------------------------------------------------------------------------


class FakeScheduler:
    """`WorkerWatch`'s view of a client: scheduler_info's worker counts, one per call."""

    def __init__(self, counts: list[int]):
        self.counts, self.scheduler = counts, type("Rpc", (), {"address": "tcp://sched:8786"})()

    def scheduler_info(self, n_workers: int = -1) -> dict:
        return {"n_workers": self.counts.pop(0) if len(self.counts) > 1 else self.counts[0]}


def test_worker_watch_fails_after_the_timeout_without_workers(capsys):
    now = [0.0]
    watch = WorkerWatch(FakeScheduler([2, 0, 0, 1, 0]), 10, clock=lambda: now[0])
    for t in (2.0, 4.0, 13.9):  # 0 workers since t=2 (reported once), then one joins at 13.9
        now[0] = t
        watch.check()
    assert capsys.readouterr().err.count("no Dask worker left at tcp://sched:8786") == 1
    for t in (16.0, 25.9, 26.5):  # none again since 16; asked at most once a second
        now[0] = t
        watch.check()
    now[0] = 27.0
    with pytest.raises(NoWorkers) as err:
        watch.check()
    assert err.value.describe(3, 8, cached=True) == (
        "all 2 workers left the Dask scheduler at tcp://sched:8786 and none joined within 10 s; "
        "3 of 8 jobs finished and are cached, 5 did not. Start workers (or raise "
        "no_worker_timeout in the runner profile) and run the study again"
    )
    forever = WorkerWatch(FakeScheduler([1, 0]), None, clock=lambda: now[0])
    for t in (100.0, 1e6):
        now[0] = t
        forever.check()  # null: waits for workers forever


class ScaleToZeroOnFirstResult(Progress):
    """After the first computed result, close every worker of ``cluster`` (for good)."""

    def __init__(self, total: int, cluster: LocalCluster):
        super().__init__(total)
        self.cluster, self.closed = cluster, False

    def update(self, n: int = 1, cached: bool = False, what: str | None = None) -> None:
        super().update(n, cached, what)
        if not self.closed and not cached:
            self.closed = True
            self.cluster.scale(0)  # asynchronous: the workers close while the study goes on


def test_losing_every_worker_fails_after_the_timeout_with_finished_jobs_cached(
    patching_file, tmp_path
):
    _, plan = compile_file(patching_file(2, model=WIDER))  # 8 jobs of ~0.1 s
    with LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=":0"
    ) as cluster:
        address = cluster.scheduler_address
        profile = cluster_profile(address).model_copy(update={"no_worker_timeout": 5})
        cache = CountingCache(tmp_path / "cache")
        start = time.perf_counter()
        with pytest.raises(ExecutionError) as err:
            run_dask(plan, plan.jobs, cache, ScaleToZeroOnFirstResult(8, cluster), profile)
        elapsed = time.perf_counter() - start
    message = str(err.value)
    head = f"the only worker left the Dask scheduler at {address} and none joined within 5 s; "
    assert message.startswith(head), message
    done = int(message[len(head) :].split(" of 8 jobs finished and are cached")[0])
    assert 1 <= done < 8 and cache.puts == done
    assert sum(cache.get(j.id) is not None for j in plan.jobs) == done
    assert elapsed < 120


def _kill_the_worker_on(bad_id: str):
    """execute_job, except that job ``bad_id`` kills the worker process running it, after a
    moment: the jobs before it finish, and their results reach this process, before it dies."""
    from mi_spec.execute.worker import execute_job

    def run(plan, job):
        if job.id == bad_id:
            time.sleep(2)
            os._exit(3)
        return execute_job(plan, job)

    return run


def test_a_job_killing_its_worker_is_an_execution_error_naming_it(study, monkeypatch, tmp_path):
    import cloudpickle
    import dask

    plan, _ = study
    bad = plan.jobs[-1]  # one worker thread, plan order: the good jobs run first
    module = sys.modules[_kill_the_worker_on.__module__]
    cloudpickle.register_pickle_by_value(module)  # workers cannot import this test module
    monkeypatch.setattr(dask_runner, "execute_job", _kill_the_worker_on(bad.id))
    try:
        with (
            dask.config.set({"distributed.scheduler.allowed-failures": 0}),
            LocalCluster(
                n_workers=1,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                dashboard_address=":0",
            ) as cluster,
        ):
            cache = CountingCache(tmp_path / "cache")
            profile = cluster_profile(cluster.scheduler_address)
            with pytest.raises(ExecutionError) as err:
                run_dask(plan, plan.jobs, cache, Progress(4), profile)
    finally:
        cloudpickle.unregister_pickle_by_value(module)
    message = str(err.value)
    assert message.startswith(
        f"the Dask worker running job {bad.id} (experiment 'activation_patching') died, 1 time "
    ), message
    assert "out of memory" in message and type(err.value.__cause__).__name__ == "KilledWorker"
    assert cache.puts == 3 and all(cache.get(j.id) for j in plan.jobs[:3])


def test_dashboard_link_only_when_it_can_be_served(monkeypatch):
    """A scheduler started here serves the dashboard only with bokeh: the link, or how to get it."""
    import io
    from types import SimpleNamespace

    from mi_spec.schedule.progress import Console

    def said(available: bool, here: bool, services: dict, dashboard: bool = True) -> str:
        monkeypatch.setattr(dask_runner, "dashboard_available", lambda: available)
        client = SimpleNamespace(
            cluster=object() if here else None,
            register_plugin=lambda plugin: None,
            scheduler_info=lambda: {"services": services},
            dashboard_link="http://127.0.0.1:8787/status",
        )
        out = io.StringIO()
        profile = RunnerProfile(dashboard=dashboard)
        dask_runner._setup(client, profile, Console(out))
        return out.getvalue()

    link = "  Dask dashboard: http://127.0.0.1:8787/status\n"
    assert said(True, True, {"dashboard": 8787}) == link
    assert said(False, True, {"dashboard": 8787}) == (
        "  Dask dashboard unavailable: pip install bokeh\n"
    )
    assert said(False, False, {"dashboard": 8787}) == link  # served by the existing scheduler
    assert said(True, False, {}) == ""  # an existing scheduler without one
    assert said(True, True, {"dashboard": 8787}, dashboard=False) == ""


def test_hf_weights_load_on_the_workers_only_and_the_sites_are_checked_there(
    tmp_path, scheduler, monkeypatch
):
    """`run` on workers never reads an hf checkpoint in the driver (it plans on the meta device):
    the site checks run on the worker, before its first job."""
    import transformers
    from conftest import write_rows

    from mi_spec.api import run
    from mi_spec.tracking.base import InMemoryTracker

    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=4, vocab_size=40, n_positions=32, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "m")
    write_rows(tmp_path / "rows.jsonl")
    (tmp_path / "h.yaml").write_text(
        "name: lazy\nmodel: {hf: m, device: cpu}\ndata:\n  path: rows.jsonl\n"
        "  positions: {mid: 4}\nmetric: {kind: loss, at: mid}\nexperiments:\n"
        "  - {kind: activation_patching, sites: [L0.H0, L1.H1], positions: [mid]}\n"
    )
    loads = []
    auto = transformers.AutoModelForCausalLM
    original = auto.from_pretrained.__func__
    monkeypatch.setattr(
        auto,
        "from_pretrained",
        classmethod(lambda c, *a, **k: loads.append(a) or original(c, *a, **k)),
    )
    tracker = InMemoryTracker()
    result = run(
        tmp_path / "h.yaml", tracker, cache_dir=None, scheduler=scheduler.scheduler_address
    )
    assert loads == []  # the driver read no weights; the worker did (and checked the sites)
    assert result.reports and tracker.status == "FINISHED"
