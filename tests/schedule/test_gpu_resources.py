"""GPU resources on Dask, tested on CPU with workers that declare fake GPUs: jobs go only to
workers with the resource, each local worker sees only its GPUs (CUDA_VISIBLE_DEVICES), the
sharded profile's one worker holds them all, and a job no worker can hold fails at once."""

from __future__ import annotations

import io
import os
import time

import pytest
from distributed import Client, LocalCluster, get_task_stream

from mi_spec.errors import ExecutionError
from mi_spec.plan.ir import JobResult
from mi_spec.schedule import dask_runner
from mi_spec.schedule.dask_runner import open_client, run_dask
from mi_spec.schedule.dispatch import RunnerSession
from mi_spec.schedule.gpu_workers import gpu_worker_spec
from mi_spec.schedule.profiles import RunnerProfile, load_profile
from mi_spec.schedule.progress import Console, Progress
from mi_spec.schedule.worker_watch import NoWorkers, WorkerWatch

START_S = 180  # starting worker processes (each imports torch) on a loaded 2-core machine


def values(results: dict[str, JobResult]) -> dict[str, tuple]:
    return {k: (r.clean, r.source, r.variants) for k, r in results.items()}


def visible_gpus(client: Client) -> dict[str, str | None]:
    """Each worker's CUDA_VISIBLE_DEVICES, by worker address."""

    def read() -> str | None:  # local: shipped by value (workers cannot import this module)
        return os.environ.get("CUDA_VISIBLE_DEVICES")

    return client.run(read)


def declared(client: Client) -> dict[str, dict]:
    """Each worker's Dask resources, by worker address."""
    workers = client.scheduler_info(n_workers=-1)["workers"]
    return {address: w.get("resources", {}) for address, w in workers.items()}


@pytest.fixture(scope="module")
def mixed():
    """An existing scheduler with a worker declaring one (fake) GPU, device 7, and a plain one;
    yields the cluster, a client and the two workers' addresses."""
    with LocalCluster(
        n_workers=0, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=":0"
    ) as cluster:
        cluster.worker_spec["fake-gpu"] = gpu_worker_spec(cluster.new_spec, ["7"])
        cluster.worker_spec["plain"] = cluster.new_spec
        cluster.scale(2)
        with Client(cluster, set_as_default=False) as client:
            client.wait_for_workers(2, timeout=START_S)
            by_name = {w["name"]: a for a, w in client.scheduler_info()["workers"].items()}
            yield cluster, client, by_name["fake-gpu"], by_name["plain"]


def gpu_cluster_profile(address: str, **fields) -> RunnerProfile:
    return RunnerProfile(kind="cluster", address=address, dashboard=False, retries=0, **fields)


def test_gpu_jobs_land_only_on_the_worker_declaring_a_gpu(study, mixed):
    plan, expected = study
    cluster, client, gpu_worker, plain_worker = mixed
    assert declared(client) == {gpu_worker: {"GPU": 1}, plain_worker: {}}
    assert visible_gpus(client)[gpu_worker] == "7"  # set before the worker process started
    profile = gpu_cluster_profile(cluster.scheduler_address)  # gpu: auto, a worker has one
    with open_client(profile) as (_, resources):
        assert resources == {"GPU": 1}
    with get_task_stream(client) as stream:
        got = run_dask(plan, plan.jobs, None, Progress(4), profile)
    assert values(got) == values(expected)
    ran = {t["key"]: t["worker"] for t in stream.data if str(t["key"]).startswith("mi_spec-")}
    assert sorted(ran) == sorted(f"mi_spec-{j.id}" for j in plan.jobs)
    assert set(ran.values()) == {gpu_worker}  # the plain worker, idle, got none of the 4
    without = profile.model_copy(update={"gpu": False})
    with open_client(without) as (_, resources):
        assert resources is None  # gpu: false asks for nothing: any worker may run a job


def test_a_job_needing_more_gpus_than_any_worker_has_fails_at_once(study, mixed):
    plan, _ = study
    cluster, _, gpu_worker, plain_worker = mixed
    profile = gpu_cluster_profile(cluster.scheduler_address, gpu=True, gpus_per_job=2)
    start = time.perf_counter()
    with pytest.raises(ExecutionError) as err:
        run_dask(plan, plan.jobs, None, Progress(4), profile)
    assert time.perf_counter() - start < 30  # not a wait for a worker that never comes
    message = str(err.value)
    assert message.startswith(
        "every job asks for the Dask resources GPU=2 (the runner profile's gpu and "
        f"gpus_per_job), but none of the 2 workers at {cluster.scheduler_address} has them ("
    ), message
    assert f"{gpu_worker}: GPU=1" in message and f"{plain_worker}: none" in message
    assert "--resources GPU=2`" in message


@pytest.mark.parametrize(
    ("name", "devices", "pinned", "per_worker"),
    [("gpu", ["0", "1"], {"0", "1"}, 1), ("gpu_sharded", ["0", "1", "2"], {"0,1,2"}, 3)],
)
def test_local_gpu_profiles_pin_workers_to_their_gpus(
    study, monkeypatch, name, devices, pinned, per_worker
):
    """One worker per GPU, or one worker holding every GPU (a sharded model); the fake device
    ids are only names here: torch in the workers sees no CUDA and runs on the CPU."""
    plan, expected = study
    monkeypatch.setattr(dask_runner, "cuda_devices", lambda: list(devices))
    profile = load_profile(name).model_copy(update={"dashboard": False})
    out = io.StringIO()
    with RunnerSession(profile, console=Console(out)) as session:
        got = session.run(plan, plan.jobs, None, Progress(4, console=Console(out)))
        assert session.dask is not None
        client = session.dask.client
        assert session.dask.resources == {"GPU": per_worker}
        assert set(visible_gpus(client).values()) == pinned
        assert list(declared(client).values()) == [{"GPU": per_worker}] * len(pinned)
    assert values(got) == values(expected)
    each = "1 GPU" if per_worker == 1 else f"{per_worker} GPUs"
    assert f"starting {len(pinned)} Dask worker{'s' if len(pinned) > 1 else ''} ({each} each)" in (
        out.getvalue()
    )


def test_gpu_profile_without_cuda_is_an_error(monkeypatch):
    monkeypatch.setattr(dask_runner, "cuda_devices", lambda: [])
    with (
        pytest.raises(ExecutionError, match="gpu: true, but CUDA is not available here"),
        open_client(load_profile("gpu")),
    ):
        pass


class FakeScheduler:
    """`WorkerWatch`'s view of a client: the workers (with resources) of each call in turn."""

    def __init__(self, states: list[dict]):
        self.states, self.scheduler = states, type("Rpc", (), {"address": "tcp://sched:8786"})()

    def scheduler_info(self, n_workers: int = -1) -> dict:
        workers = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        return {"n_workers": len(workers), "workers": workers}


def test_losing_every_gpu_worker_counts_as_losing_every_worker(capsys):
    gpu, cpu = {"resources": {"GPU": 1}}, {"resources": {}}
    now = [0.0]
    states = [{"a": gpu, "b": gpu, "c": cpu}, {"c": cpu}]  # both GPU workers die; "c" stays
    watch = WorkerWatch(FakeScheduler(states), 10, clock=lambda: now[0], need={"GPU": 1})
    now[0] = 2.0
    watch.check()
    assert "no Dask worker with GPU=1 left at tcp://sched:8786" in capsys.readouterr().err
    now[0] = 12.0
    with pytest.raises(NoWorkers) as err:
        watch.check()
    assert err.value.describe(1, 4, cached=True).startswith(
        "all 2 workers with GPU=1 left the Dask scheduler at tcp://sched:8786 and none joined "
        "within 10 s; 1 of 4 jobs finished and are cached, 3 did not."
    )
