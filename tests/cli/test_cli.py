"""The CLI: exit codes, located errors without tracebacks, plan output, schema freshness."""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path

import procs
import pytest

from mi_spec.cli.main import main
from mi_spec.compile.schema import hypothesis_schema, render

ROOT = Path(__file__).resolve().parents[2]
SWEEP = "experiments:\n  - {kind: activation_patching, sites: ['L*.H*'], positions: [mid]}\n"

FIVE_MISTAKES = """\
name: broken
model:
  hf_config: {model_type: gpt2, n_layer: 1}
  dtype: int8
data:
  path: rows.jsonl
metric: {kind: perplexity}
experiments:
  - kind: activation_patching
    sites: []
    smaples: 10
  - kind: ablation
    sites: [L0.H0]
    method: erase
"""


def test_validate_ok(study_file, capsys):
    assert main(["validate", str(study_file(SWEEP))]) == 0
    assert "ok:" in capsys.readouterr().out


def test_validate_reports_every_mistake_located(tmp_path, capsys):
    f = tmp_path / "broken.yaml"
    f.write_text(FIVE_MISTAKES)
    assert main(["validate", str(f)]) == 2
    err = capsys.readouterr().err
    located = [line for line in err.splitlines() if line.startswith(f"{f}:")]
    assert len(located) == 5, err
    for where, needle in [
        (":4:", "dtype"),
        (":7:", "metric.kind"),
        (":10:", "experiments.0.sites"),
        (":11:", "smaples"),
        (":14:", "experiments.1.method"),
    ]:
        assert any(where in line and needle in line for line in located), (where, err)
    assert "did you mean 'samples'" in err


def test_no_traceback_on_bad_input(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text(FIVE_MISTAKES)
    proc = procs.run(
        [sys.executable, "-m", "mi_spec.cli.main", "validate", str(f)],
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "broken.yaml:4:" in proc.stderr


def test_unknown_site_lists_nearby(study_file, capsys):
    body = "experiments:\n  - {kind: ablation, sites: [L1.H9], method: zero}\n"
    assert main(["validate", str(study_file(body))]) == 2
    err = capsys.readouterr().err
    assert "head 9 out of range" in err and "L1.H3" in err and "experiments.0" in err


def test_plan_summary_and_json(study_file, capsys):
    path = study_file(SWEEP)
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert "1 jobs" in out and "8 variants" in out and "forward passes" in out
    assert main(["plan", str(path), "--json", "--set", "experiments.0.batch_size=4"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert len(plan["jobs"]) == 4 and all(len(j["rows"]) == 4 for j in plan["jobs"])


def test_committed_schema_is_current():
    committed = (ROOT / "schemas" / "hypothesis.schema.json").read_text()
    assert committed == render(hypothesis_schema()), "run `mi-spec schema` and commit the result"


# --- `mi-spec run`: what it says on stderr, --quiet, --only, one cluster for several files -------

TWO = (
    "experiments:\n"
    "  - {kind: activation_patching, name: heads, sites: ['L*.H*'], positions: [mid],"
    " batch_size: 8}\n"
    "  - {kind: ablation, name: zero-L1, sites: ['L1.H*'], method: zero, batch_size: 8}\n"
)
ONE_JOB = "experiments:\n  - {kind: ablation, sites: ['L1.H*'], method: zero, batch_size: 16}\n"
STAGES = [
    "opening MLflow store",
    "loading model",
    "compiling",
    "checking sites",
    "starting MLflow run",
    "running 4 jobs",
    "analysing",
    "logging to MLflow",
]


def run_cli(*args: str) -> int:
    return main(["run", *args, "--runner", "synchronous"])


def stage_times(err: str) -> dict[str, float]:
    """Each stage's reported seconds, in the order the stages ended."""
    found = re.findall(r"^  (\S.*?) +(\d+\.\d)s(?:  .*)?$", err, flags=re.M)
    return {name: float(seconds) for name, seconds in found}


def summary(err: str) -> tuple[int, int]:
    """(computed, from cache) from the study's summary line."""
    line = next(x for x in err.splitlines() if x.startswith("done: "))
    if m := re.search(r"cached re-run: (\d+) of (\d+) jobs from cache", line):
        return 0, int(m.group(1))
    m = re.search(r"(\d+) jobs? computed, (\d+) from cache", line)
    assert m, line
    return int(m.group(1)), int(m.group(2))


def test_run_says_each_stage_in_order_with_times_then_a_cached_rerun(
    study_file, tracking_uri, capsys
):
    path = study_file(TWO)
    assert run_cli(str(path)) == 0
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert lines[0] == "mi-spec run: 1 file, runner synchronous"
    assert lines.index(f"run {path}") < lines.index("  loading model …")
    times = stage_times(err)
    assert [s for s in times if s in STAGES] == STAGES, err
    assert all(t >= 0 for t in times.values())
    for stage in STAGES:  # announced (log line) before its time is given
        start = lines.index(f"  {stage} …")
        assert start < next(
            i for i, x in enumerate(lines) if x.startswith(f"  {stage} ") and "…" not in x
        )
    assert "\r" not in err  # not a terminal: plain log lines
    assert summary(err) == (4, 0)
    assert re.search(r"^done: tiny in \d+\.\ds", err, flags=re.M)
    assert "MLflow: " in out and "/runs/" in out  # the parent run's own page

    assert run_cli(str(path)) == 0
    err = capsys.readouterr().err
    assert summary(err) == (0, 4) and "cached re-run: 4 of 4 jobs from cache" in err


def test_mlflow_line_links_the_parent_run_just_made(study_file, tracking_uri, capsys):
    from mlflow.tracking import MlflowClient

    assert run_cli(str(study_file(TWO)), "--no-cache") == 0
    out = capsys.readouterr().out
    (run,) = MlflowClient(tracking_uri).search_runs(
        [MlflowClient(tracking_uri).get_experiment_by_name("mi_spec").experiment_id],
        "tags.mlflow.parentRunId IS NULL",
    )
    link = next(x for x in out.splitlines() if x.startswith("MLflow: "))
    assert link.endswith(f"#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}")


def test_quiet_prints_only_the_summary(study_file, tracking_uri, capsys):
    assert run_cli(str(study_file(TWO)), "--no-cache", "--quiet") == 0
    out, err = capsys.readouterr()
    assert len(err.splitlines()) == 1 and err.startswith("done: tiny in "), err
    assert len(out.splitlines()) == 1 and out.startswith("MLflow: "), out


def test_verbose_prints_a_line_per_job(study_file, tracking_uri, capsys):
    assert run_cli(str(study_file(TWO)), "--no-cache", "-v") == 0
    err = capsys.readouterr().err
    jobs = re.findall(r"^    job [0-9a-f]{12} \((heads|zero-L1)\) \d+\.\d\ds$", err, flags=re.M)
    assert sorted(jobs) == ["heads", "heads", "zero-L1", "zero-L1"]


def test_only_runs_the_named_experiments(study_file, tracking_uri, capsys):
    path = study_file(TWO)
    assert run_cli(str(path), "--only", "zero-L1", "--cache-dir", "c") == 0
    out, err = capsys.readouterr()
    assert "== zero-L1@tiny" in out and "== heads@tiny" not in out
    assert summary(err) == (2, 0)
    # the whole file then computes only the other experiment's jobs: same job ids
    assert run_cli(str(path), "--cache-dir", "c") == 0
    assert summary(capsys.readouterr().err) == (2, 2)

    assert run_cli(str(path), "--only", "heads,nope", "--only", "also-not") == 2
    err = capsys.readouterr().err
    assert "no experiment named 'nope', 'also-not'" in err
    assert "the experiments of this file are: heads, zero-L1" in err and str(path) in err


def test_editing_one_experiment_recomputes_only_its_jobs(study_file, tracking_uri, capsys):
    from mi_spec.api import compile_file

    path = study_file(TWO)
    assert run_cli(str(path), "--cache-dir", "c") == 0
    assert summary(capsys.readouterr().err) == (4, 0)
    # a new site set for `heads` (2 jobs) leaves `zero-L1` (2 jobs) as it was
    edit = ["--set", "experiments.0.sites=[L0.H1, L1.resid_pre]"]
    assert run_cli(str(path), "--cache-dir", "c", *edit) == 0
    assert summary(capsys.readouterr().err) == (2, 2)
    before, after = compile_file(path)[1], compile_file(path, edit[1:])[1]
    same = {j.id for j in before.jobs} & {j.id for j in after.jobs}
    assert same == {j.id for j in after.jobs if j.experiment == "zero-L1"} and len(same) == 2
    # and a different sample count for `zero-L1` leaves `heads`
    assert run_cli(str(path), "--cache-dir", "c", "--set", "experiments.1.samples=8") == 0
    assert summary(capsys.readouterr().err) == (1, 2)


@pytest.fixture
def restore_dask_logging(monkeypatch):
    """`mi-spec run` sets Dask's log level (environment and, once imported, its logger)."""
    monkeypatch.delenv("DASK_LOGGING__DISTRIBUTED", raising=False)
    logger = logging.getLogger("distributed")
    level = logger.level
    yield
    logger.setLevel(level)


@pytest.mark.slow
def test_two_files_share_one_local_cluster_closed_without_warnings(
    study_file, tracking_uri, tmp_path, monkeypatch, capfd, restore_dask_logging
):
    from distributed import LocalCluster

    from mi_spec.schedule import dask_runner

    made: list[LocalCluster] = []

    class Recording(LocalCluster):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            made.append(self)

    monkeypatch.setattr(dask_runner, "LocalCluster", Recording)
    one = study_file(ONE_JOB, name="one")
    two = study_file(TWO.replace("batch_size: 8", "batch_size: 16"), name="two")  # 2 jobs
    profile = tmp_path / "local.yaml"
    profile.write_text("kind: local\nworkers: 2\nthreads_per_worker: 1\ndashboard: true\n")
    args = ["run", str(one), str(two), "--runner", str(profile), "--no-cache"]
    assert main(args) == 0
    out, err = capfd.readouterr()  # the file descriptors: Dask's loggers write there too
    assert len(made) == 1 and made[0].status.name == "closed", err
    lines = err.splitlines()
    assert lines[0] == "mi-spec run: 2 files, runner " + str(profile)
    assert f"run {one} (file 1 of 2)" in lines and f"run {two} (file 2 of 2)" in lines
    # a worker for the first file's job, one more for the second's 2 jobs (the profile's 2)
    started = [
        x.split("  ")[1]
        for x in lines
        if x.startswith("  starting") and "Dask" in x and "…" not in x
    ]
    assert started == ["starting 1 Dask worker", "starting 1 more Dask worker"], err
    assert lines.index("  starting 1 more Dask worker …") > lines.index(f"run {two} (file 2 of 2)")
    assert any(x.startswith("  Dask dashboard: http://127.0.0.1:") for x in lines), err
    assert lines[-2].startswith("  stopping Dask workers ")
    assert lines[-1].startswith("all 2 studies done in ")
    assert "still alive" not in err and "distributed." not in err and "Traceback" not in err
    assert out.count("MLflow: ") == 2
