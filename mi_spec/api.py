"""The pipeline, driven in order: load -> resolve -> compile -> check -> execute -> analyse -> log."""

from __future__ import annotations

import platform
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from mi_spec.analysis.report import ExperimentReport, StudyRecord
from mi_spec.compile.data_check import check_data
from mi_spec.compile.planner import compile_context, compile_plan
from mi_spec.compile.resolve import Study, load_spec, resolve
from mi_spec.errors import SpecError
from mi_spec.execute.cache import ResultCache
from mi_spec.execute.site_check import check_sites
from mi_spec.execute.worker import loaded_for
from mi_spec.experiments.base import kinds
from mi_spec.plan.ir import Plan, content_hash
from mi_spec.schedule.dispatch import run_plan
from mi_spec.schedule.profiles import RunnerProfile, load_profile
from mi_spec.schedule.progress import Progress
from mi_spec.spec.load import dump_yaml
from mi_spec.tracking.base import Tracker, flatten_params, tracking
from mi_spec.tracking.provenance import dataset_identity, file_hash, git_info, model_name

DEFAULT_CACHE = ".mi_spec_cache"


@dataclass
class RunResult:
    plan: Plan
    reports: list[ExperimentReport] = field(default_factory=list)
    run_url: str | None = None


def compile_file(path: str | Path, overrides: Sequence[str] = ()) -> tuple[Study, Plan]:
    """Load, validate, resolve and compile a hypothesis file (no forward passes)."""
    spec, doc = load_spec(path, overrides)
    study = resolve(spec, doc)
    plan = compile_plan(study)
    issues = check_data(study, plan)
    if issues:
        raise SpecError(issues)
    return study, plan


def validate(path: str | Path, overrides: Sequence[str] = ()) -> Plan:
    """Everything short of running: the spec, the model, the data, every site's contract."""
    study, plan = compile_file(path, overrides)
    check_plan_sites(study, plan)
    return plan


def check_plan_sites(study: Study, plan: Plan) -> None:
    """Run the site contract checks on every site the plan touches (a few rows)."""
    if not study.spec.model.check_sites:
        return
    state = loaded_for(plan, model=study.model)
    rows = list(range(min(4, len(state.data))))
    ids, mask = state.data.padded(rows)
    device = state.model.device
    check_sites(
        state.engine,
        plan.sites.values(),
        torch.tensor(ids, device=device),
        torch.tensor(mask, device=device),
        bind=study.bind,
        n_layers=study.dims.n_layers,
    )


def run(
    path: str | Path,
    tracker: Tracker,
    overrides: Sequence[str] = (),
    cache_dir: str | Path | None = DEFAULT_CACHE,
    runner: RunnerProfile | str = "local",
    scheduler: str | None = None,
) -> RunResult:
    """Run every experiment in the file and log the study to ``tracker``.

    ``runner`` is a profile (or its name/path: synchronous, local, cluster, slurm); ``scheduler``
    (``tcp://host:8786``) sends the same plan to an existing Dask cluster instead. An unreachable
    tracking store fails here, before the model is loaded or any job runs.
    """
    profile = load_profile(runner) if isinstance(runner, str) else runner
    tracker.check()
    study, plan = compile_file(path, overrides)
    result = RunResult(plan)
    where = "cluster" if scheduler else profile.kind
    with tracking(tracker, study_record(study, plan, where)):
        check_plan_sites(study, plan)
        cache = ResultCache(cache_dir, plan) if cache_dir else None
        progress = Progress(len(plan.jobs))
        results = run_plan(plan, plan.jobs, cache, progress, profile, address=scheduler)
        progress.close()
        ctx = compile_context(study)
        table = kinds()
        for exp in study.spec.experiments:
            jobs = plan.jobs_for(exp.label)
            report = table[exp.kind].analyse(exp, ctx, jobs, [results[j.id] for j in jobs])
            tracker.log_experiment(report)
            result.reports.append(report)
    result.run_url = getattr(tracker, "run_url", lambda: None)()
    return result


def study_record(study: Study, plan: Plan, runner: str = "synchronous") -> StudyRecord:
    """Params (resolved spec with defaults, hashes, versions), tags and text artifacts."""
    resolved = study.spec.model_dump(mode="json")
    params = flatten_params(resolved) | {
        "model.weights_hash": study.model.weights_hash,
        "model.adapter": study.model.adapter.name,
        "model.attn_implementation": str(
            getattr(getattr(study.model.module, "config", None), "_attn_implementation", "eager")
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
