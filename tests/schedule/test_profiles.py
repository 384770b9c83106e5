"""Runner profiles: bundled files, schema, validation errors located at file:line:col, dispatch."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

import mi_spec
from mi_spec.errors import ExecutionError, MiSpecError, SpecError
from mi_spec.schedule import dispatch
from mi_spec.schedule.profiles import (
    BUNDLED,
    BUNDLED_DIR,
    RunnerProfile,
    load_profile,
    profile_schema,
)
from mi_spec.schedule.progress import Progress

REPO = Path(mi_spec.__file__).parents[1]
KIND = {"gpu": "local", "gpu_sharded": "local"}  # bundled profiles not named after their kind


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "runner.yaml"
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def issues(path: Path) -> list[str]:
    with pytest.raises(SpecError) as err:
        load_profile(path)
    return [str(i) for i in err.value.issues]


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_profiles_load_and_repo_copies_are_identical(name):
    profile = load_profile(name)
    assert profile.kind == KIND.get(name, name)
    shipped = (BUNDLED_DIR / f"{name}.yaml").read_text()
    assert (REPO / "runners" / f"{name}.yaml").read_text() == shipped
    assert shipped.startswith("# yaml-language-server: $schema=../schemas/runner.schema.json\n")


def test_no_stray_runner_files():
    assert sorted(p.name for p in (REPO / "runners").glob("*.yaml")) == sorted(
        p.name for p in BUNDLED_DIR.glob("*.yaml")
    )


def test_committed_schema_is_current():
    committed = json.loads((REPO / "schemas" / "runner.schema.json").read_text())
    assert committed == profile_schema()


def test_path_wins_and_defaults(tmp_path):
    path = write(tmp_path, "kind: local\nworkers: 3\n")
    profile = load_profile(str(path))
    assert (profile.workers, profile.threads_per_worker, profile.retries) == (3, 1, 2)
    assert profile.gpu == "auto" and profile.memory_limit == "auto" and profile.dashboard


def test_slurm_profile_is_validated():
    slurm = load_profile("slurm").slurm
    assert slurm is not None and slurm.cores == 4 and slurm.jobs == 4
    assert slurm.extra["local_directory"] == "/tmp"


def test_no_worker_timeout(tmp_path):
    assert load_profile("cluster").no_worker_timeout == 60 == RunnerProfile().no_worker_timeout
    assert load_profile(write(tmp_path, "no_worker_timeout: null\n")).no_worker_timeout is None
    assert load_profile(write(tmp_path, "no_worker_timeout: 2.5\n")).no_worker_timeout == 2.5
    path = write(tmp_path, "kind: local\nno_worker_timeout: 0\n")
    assert issues(path)[0].startswith(f"{path}:2:20: no_worker_timeout: ")


def test_unknown_name_lists_the_bundled_ones():
    with pytest.raises(SpecError, match="local, synchronous|synchronous, local"):
        load_profile("nope")


def test_unknown_field_is_located_with_a_suggestion(tmp_path):
    path = write(tmp_path, "kind: local\nworker: 2\n")
    assert issues(path) == [f"{path}:2:1: worker: unknown field 'worker'; did you mean 'workers'?"]


def test_bad_values_are_all_located(tmp_path):
    path = write(
        tmp_path,
        """
        kind: local
        workers: 0
        gpu: sometimes
        """,
    )
    found = issues(path)
    assert len(found) == 2
    assert found[0].startswith(f"{path}:2:10: workers: ")
    assert found[1].startswith(f"{path}:3:6: gpu: ")


def test_unknown_kind_is_located(tmp_path):
    path = write(tmp_path, "kind: kubernetes\n")
    (found,) = issues(path)
    assert found.startswith(f"{path}:1:7: kind: expected ")


def test_cluster_without_address_is_located_at_kind(tmp_path):
    path = write(tmp_path, "retries: 1\nkind: cluster\n")
    assert issues(path) == [
        f"{path}:2:1: kind: kind: cluster needs an `address`, e.g. tcp://host:8786"
    ]


def test_address_and_slurm_only_with_their_kind(tmp_path):
    path = write(tmp_path, "kind: local\naddress: tcp://h:1\n")
    assert issues(path)[0].startswith(f"{path}:2:1: address: `address` is only used by")
    path = write(tmp_path, "kind: local\nslurm: {cores: 1, memory: 1GB}\n")
    assert issues(path)[0].startswith(f"{path}:2:1: slurm: `slurm` is only used by")


def test_slurm_fields_are_located(tmp_path):
    path = write(
        tmp_path,
        """
        kind: slurm
        slurm:
          cores: 4
          memroy: 8GB
        """,
    )
    found = issues(path)
    assert f"{path}:4:3: slurm.memroy: unknown field 'memroy'; did you mean 'memory'?" in found
    assert any(f.startswith(f"{path}:2:1: slurm.memory: required") for f in found)


def test_slurm_extra_cannot_repeat_a_named_field(tmp_path):
    path = write(
        tmp_path,
        """
        kind: slurm
        slurm:
          cores: 4
          memory: 8GB
          extra: {cores: 8, job_extra_directives: []}
        """,
    )
    assert issues(path) == [f"{path}:5:3: slurm.extra: set cores as slurm fields, not under extra"]


def test_python_construction_checks_the_same_rules():
    with pytest.raises(ValueError, match="needs an `address`"):
        RunnerProfile(kind="cluster")
    assert RunnerProfile(kind="cluster", address="tcp://127.0.0.1:8786").address


def test_default_local_workers(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert RunnerProfile(threads_per_worker=2).local_workers(gpus=0) == 4
    assert RunnerProfile(threads_per_worker=16).local_workers(gpus=0) == 1
    assert RunnerProfile().local_workers(gpus=2) == 2
    assert RunnerProfile(workers=3).local_workers(gpus=2) == 3


def test_gpu_profiles():
    per_gpu, sharded = load_profile("gpu"), load_profile("gpu_sharded")
    assert (per_gpu.gpu, per_gpu.gpus_per_worker, sharded.gpus_per_worker) == (True, 1, "all")
    devices = ["0", "1", "2", "3", "4"]
    assert per_gpu.gpu_groups(devices) == [("0",), ("1",), ("2",), ("3",), ("4",)]
    assert sharded.gpu_groups(devices) == [tuple(devices)]
    assert (per_gpu.local_workers(gpus=5), sharded.local_workers(gpus=5)) == (5, 1)
    assert (per_gpu.job_gpus(1), sharded.job_gpus(5)) == (1, 5)
    pairs = RunnerProfile(gpu=True, gpus_per_worker=2)  # the fifth GPU is left unused
    assert pairs.gpu_groups(devices) == [("0", "1"), ("2", "3")] and pairs.local_workers(5) == 2
    assert RunnerProfile(gpus_per_worker=2, gpus_per_job=1).job_gpus() == 1
    assert RunnerProfile(kind="cluster", address="tcp://h:1", gpus_per_job=4).job_gpus() == 4
    assert RunnerProfile(kind="cluster", address="tcp://h:1").job_gpus() == 1
    with pytest.raises(ExecutionError, match="each worker 2 GPUs .* but 1 is visible here"):
        pairs.gpu_groups(["0"])


def test_gpu_fields_are_checked_and_located(tmp_path):
    path = write(tmp_path, "kind: local\ngpus_per_worker: 2\ngpus_per_job: 3\n")
    assert issues(path) == [
        f"{path}:3:1: gpus_per_job: gpus_per_job: 3 is more than a worker has (gpus_per_worker: 2)"
    ]
    path = write(tmp_path, "kind: local\ngpus_per_worker: 0\ngpus_per_job: 0\n")
    found = issues(path)
    assert found[0].startswith(f"{path}:2:18: gpus_per_worker: ")
    assert found[-1].startswith(f"{path}:3:15: gpus_per_job: ")
    path = write(tmp_path, "kind: local\ngpus_per_worker: some\n")
    assert issues(path)[0].startswith(f"{path}:2:18: gpus_per_worker: ")
    path = write(tmp_path, "kind: cluster\naddress: tcp://h:1\ngpus_per_worker: 2\n")
    assert issues(path) == [
        f"{path}:3:1: gpus_per_worker: kind: cluster uses the workers you started: give them "
        "`--resources GPU=n` and set gpus_per_job"
    ]
    path = write(
        tmp_path, "kind: slurm\ngpu: true\ngpus_per_worker: all\nslurm: {cores: 1, memory: 1GB}\n"
    )
    assert issues(path) == [
        f"{path}:3:1: gpus_per_worker: gpus_per_worker: all needs kind: local (this is slurm)"
    ]
    path = write(tmp_path, "gpu: false\ngpus_per_job: 1\n")
    assert issues(path) == [
        f"{path}:2:1: gpus_per_job: `gpus_per_job` is only used on Dask with gpu: true (or "
        "auto, except on Slurm)"
    ]
    path = write(tmp_path, "kind: slurm\ngpus_per_worker: 2\nslurm: {cores: 1, memory: 1GB}\n")
    assert issues(path)[0].startswith(f"{path}:2:1: gpus_per_worker: `gpus_per_worker` is only")


def test_slurm_without_dask_jobqueue_says_how_to_install(monkeypatch):
    from mi_spec.schedule.dask_runner import open_client

    monkeypatch.setitem(__import__("sys").modules, "dask_jobqueue", None)
    with (
        pytest.raises(MiSpecError, match="pip install dask-jobqueue"),
        open_client(load_profile("slurm")),
    ):
        pass


def test_dispatch_picks_the_runner(monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(dispatch, "run_synchronous", lambda *a: calls.append("sync") or {})
    monkeypatch.setattr(
        "mi_spec.schedule.dask_runner.run_dask",
        lambda *a, address=None, session=None: calls.append(f"dask:{address}") or {},
    )
    args = (None, [], None, Progress(0))
    dispatch.run_plan(*args, RunnerProfile(kind="synchronous"))
    dispatch.run_plan(*args, RunnerProfile(kind="local"))
    dispatch.run_plan(*args, RunnerProfile(kind="synchronous"), address="tcp://h:1")
    assert calls == ["sync", "dask:None", "dask:tcp://h:1"]
