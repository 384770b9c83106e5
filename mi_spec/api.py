"""The pipeline, driven in order: load -> resolve -> compile -> check -> execute -> analyse -> log.

Importing it is light: what only checking or running needs (torch, nnsight through the engine,
the Dask runners, the result cache) is imported by the function that needs it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import platform
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

from mi_spec.analysis.report import ExperimentReport, StudyRecord
from mi_spec.compile.data_check import check_data
from mi_spec.compile.planner import compile_context, compile_plan
from mi_spec.compile.resolve import Study, load_spec, resolve
from mi_spec.errors import SpecError, SpecIssue
from mi_spec.experiments.base import kinds
from mi_spec.plan.ir import Job, JobResult, Plan, content_hash
from mi_spec.plan.memory import Fit, fit_rows, model_size
from mi_spec.schedule.profiles import RunnerProfile, load_profile
from mi_spec.schedule.progress import Console, count
from mi_spec.schedule.worker_memory import runner_limit
from mi_spec.spec.load import dump_yaml
from mi_spec.tracking.base import Tracker, flatten_params, tracking
from mi_spec.tracking.provenance import dataset_identity, file_hash, git_info, model_name

if TYPE_CHECKING:
    from mi_spec.execute.cache import ResultCache
    from mi_spec.schedule.dispatch import RunnerSession
    from mi_spec.schedule.progress import Progress

DEFAULT_CACHE = ".mi_spec_cache"


@dataclass
class RunResult:
    plan: Plan
    reports: list[ExperimentReport] = field(default_factory=list)
    run_url: str | None = None  # where the tracker shows the study (see `Tracker`)
    summary: str = ""  # the study's summary line: time, jobs computed / from cache


def compile_file(
    path: str | Path,
    overrides: Sequence[str] = (),
    only: Sequence[str] | None = None,
    console: Console | None = None,
) -> tuple[Study, Plan]:
    """Load, validate, resolve and compile a hypothesis file (no forward passes).

    ``only``: the names (labels) of the experiments to keep; the whole file is still validated and
    compiled, so a selected experiment's jobs are the same (same ids, same cache entries) as in a
    run of the whole file. An unknown name is a `SpecError` listing the names there are.
    ``console`` hears the stages (loading model, compiling).
    """
    console = console or Console(verbosity="quiet")
    with console.stage("loading model") as stage:
        spec, doc = load_spec(path, overrides)
        study = resolve(spec, doc)
        stage.note = f"{model_name(spec.model.model_dump(mode='json'))}, {len(study.data)} rows"
    with console.stage("compiling") as stage:
        plan = compile_plan(study)
        issues = check_data(study, plan)
        if issues:
            raise SpecError(issues)
        if only is not None:
            study, plan = select_experiments(study, plan, only)
        stage.note = (
            f"{count(len(plan.jobs), 'job')} in {count(len(plan.experiments), 'experiment')}"
        )
    return study, plan


def select_experiments(study: Study, plan: Plan, names: Sequence[str]) -> tuple[Study, Plan]:
    """``study`` and ``plan`` with only the experiments named (by label), in file order."""
    labels = [e.label for e in study.spec.experiments]
    unknown = [n for n in names if n not in labels]
    if unknown or not names:
        what = f"no experiment named {', '.join(map(repr, unknown))}" if unknown else "no name"
        message = f"--only: {what}; the experiments of this file are: {', '.join(labels)}"
        raise SpecError([SpecIssue(message, file=str(study.doc.path))])
    keep = set(names)
    spec = study.spec.model_copy(
        update={"experiments": [e for e in study.spec.experiments if e.label in keep]}
    )
    jobs = tuple(j for j in plan.jobs if j.experiment in keep)
    used = {s for j in jobs for s in j.sites}
    plan = plan.model_copy(
        update={
            "experiments": tuple(e for e in plan.experiments if e.name in keep),
            "jobs": jobs,
            "sites": {k: v for k, v in plan.sites.items() if k in used},
        }
    )
    return dataclasses.replace(study, spec=spec), plan


def validate(path: str | Path, overrides: Sequence[str] = ()) -> Plan:
    """Everything short of running: the spec, the model, the data, every site's contract."""
    study, plan = compile_file(path, overrides)
    check_plan_sites(study, plan)
    return plan


def check_plan_sites(study: Study, plan: Plan) -> None:
    """Run the site contract checks on every site the plan touches (a few rows)."""
    if not study.spec.model.check_sites:
        return
    from mi_spec.execute.worker import check_sites_once, loaded_for

    check_sites_once(plan, loaded_for(plan, model=study.model), bind=study.bind)


def fit_memory(
    study: Study, plan: Plan, runner: RunnerProfile | str = "local", address: str | None = None
) -> tuple[Plan, Fit]:
    """``plan`` with its rows per pass lowered where its largest job's estimated peak
    (``plan/memory.py``) would not fit a worker of ``runner`` (``address``: an existing Dask
    scheduler), and the fit. A study that cannot fit even at one row a pass raises
    `MemoryLimitError` (the experiment, its estimate and the limit), before anything runs. A
    model sharded across GPUs (``device_map``) is not fitted: its rows stay as planned."""
    profile = load_profile(runner) if isinstance(runner, str) else runner
    device = study.model.device.type
    sharded = study.spec.model.device_map is not None
    limit = None if sharded else runner_limit(profile, device, address)
    fit = fit_rows(plan, limit, model_size(study.model.skeleton, plan), device)
    if fit.lowered:
        plan = plan.model_copy(update={"max_batch_rows": fit.rows})
    return plan, fit


def run_plan(
    plan: Plan,
    jobs: Sequence[Job],
    cache: ResultCache | None,
    progress: Progress,
    profile: RunnerProfile,
    address: str | None = None,
    session: RunnerSession | None = None,
) -> dict[str, JobResult]:
    """`mi_spec.schedule.dispatch.run_plan`, imported when first called (it brings the engine)."""
    from mi_spec.schedule import dispatch

    return dispatch.run_plan(plan, jobs, cache, progress, profile, address, session)


def run(
    path: str | Path,
    tracker: Tracker,
    overrides: Sequence[str] = (),
    cache_dir: str | Path | None = DEFAULT_CACHE,
    runner: RunnerProfile | str = "local",
    scheduler: str | None = None,
    *,
    session: RunnerSession | None = None,
    console: Console | None = None,
    only: Sequence[str] | None = None,
) -> RunResult:
    """Run the experiments of the file (all, or those named in ``only``) and log the study to
    ``tracker``.

    ``runner`` is a profile (or its name/path: synchronous, local, cluster, slurm); ``scheduler``
    (``tcp://host:8786``) sends the same plan to an existing Dask cluster instead. ``session``
    (a `RunnerSession`, which then wins over both) runs several files on one cluster, started
    once. ``console`` tells the stages and their times on stderr (default: a `Console` at
    normal verbosity). An unreachable tracking store fails here, before the model is loaded or
    any job runs.
    """
    from mi_spec.execute.cache import ResultCache
    from mi_spec.schedule.dispatch import RunnerSession

    console = console or Console()
    console.begin_study(str(path))
    with console.stage("opening MLflow store"):
        tracker.check()
    own = session is None
    session = session or RunnerSession(runner, scheduler)
    try:
        study, plan = compile_file(path, overrides, only, console)
        plan, fit = fit_memory(study, plan, session.profile, session.address)
        if fit.lowered:  # job ids stay: the same results, in smaller passes
            console.say(f"  {fit.describe()}")
        result = RunResult(plan)
        record = study_record(study, plan, session.kind)
        if only is not None:
            record.tags["mi_spec.only"] = ",".join(e.name for e in plan.experiments)
        with contextlib.ExitStack() as logged:
            with console.stage("checking sites") as stage:
                if session.kind != "synchronous" and not study.model.loaded:
                    # the driver never loads these weights: each worker checks before its
                    # first job on them (execute_job)
                    stage.note = f"{count(len(plan.sites), 'site')}, on the workers"
                else:
                    check_plan_sites(study, plan)
                    stage.note = count(len(plan.sites), "site")
            with console.stage("starting MLflow run"):
                logged.enter_context(tracking(tracker, record))
            cache = ResultCache(cache_dir, plan) if cache_dir else None
            progress = console.progress(len(plan.jobs))
            results = run_plan(plan, plan.jobs, cache, progress, session.profile, session=session)
            progress.close()
            with console.stage("analysing") as stage:
                ctx = compile_context(study)
                table = kinds()
                analysed = []
                for exp in study.spec.experiments:
                    jobs = plan.jobs_for(exp.label)
                    job_results = [results[j.id] for j in jobs]
                    report = table[exp.kind].analyse(exp, ctx, jobs, job_results)
                    analysed.append((report, sum(r.seconds for r in job_results)))
                stage.note = count(len(analysed), "experiment")
            with console.stage("logging to MLflow"):
                for report, seconds in analysed:
                    tracker.log_experiment(report, compute_s=seconds)
                    result.reports.append(report)
                logged.close()  # the tracker finishes the study's runs
        result.run_url = getattr(tracker, "run_url", lambda: None)()
        result.summary = console.end_study(study.spec.name)
        return result
    finally:
        if own:
            session.close()


def study_record(study: Study, plan: Plan, runner: str = "synchronous") -> StudyRecord:
    """Params (resolved spec with defaults, hashes, versions), tags and text artifacts."""
    resolved = study.spec.model_dump(mode="json")
    params = flatten_params(resolved) | {
        "model.weights_hash": study.model.weights_hash,
        "model.adapter": study.model.adapter.name,
        "model.attn_implementation": str(
            getattr(getattr(study.model.skeleton, "config", None), "_attn_implementation", "eager")
        ),
        "data.hash": plan.data.data_hash,
        "data.rows": str(plan.data.n_rows),
        "plan.hash": plan.content_hash,
        "plan.jobs": str(len(plan.jobs)),
        **{f"version.{p}": _version(p) for p in ("mi_spec", "torch", "nnsight", "transformers")},
        "version.python": platform.python_version(),
    }
    doc = study.doc
    tags = {
        "mi_spec.hypothesis": study.spec.name,
        **({"mlflow.note.content": study.spec.description} if study.spec.description else {}),
        "mi_spec.file": str(doc.path),
        "mi_spec.file_hash": file_hash(doc.files),
        "mi_spec.spec_hash": content_hash(resolved),
        "mi_spec.model": study.model.weights_hash,
        "mi_spec.model_name": model_name(resolved["model"]),
        "mi_spec.runner": runner,
        **{f"mi_spec.git_{k}": v for k, v in git_info(doc.files).items()},
    }
    if len(doc.files) > 1:
        tags["mi_spec.extends"] = ", ".join(str(f) for f in doc.files[:-1])
    if doc.overrides:
        tags["mi_spec.overrides"] = " ".join(doc.overrides)
    dataset = dataset_identity(
        resolved["data"], study.base_dir, plan.data.data_hash, plan.data.n_rows, study.data.row(0)
    )
    artifacts = {
        "resolved.yaml": dump_yaml(resolved),
        "hypothesis.yaml": dump_yaml(study.doc.data),
        "plan.json": plan.to_json(indent=None),
    }
    return StudyRecord(
        name=study.spec.name, params=params, tags=tags, artifacts=artifacts, dataset=dataset
    )


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"
