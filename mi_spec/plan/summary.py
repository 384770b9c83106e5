"""A readable summary of a Plan: per experiment, its jobs, forward passes, sites, examples, and
the estimated peak memory of its largest job (``plan/memory.py``), so a study that cannot fit
says so up front."""

from __future__ import annotations

from mi_spec.plan.ir import Job, Plan
from mi_spec.plan.memory import Fit, ModelSize, experiment_peaks


def summarize(
    plan: Plan, size: ModelSize | None = None, fit: Fit | None = None, device: str = "cpu"
) -> str:
    """The plan as ``mi-spec plan`` prints it. ``size``: the model's (default: guessed from its
    dims); ``fit``: the rows per pass chosen for the runner's memory (`memory.fit_rows`), which
    the pass counts and estimates then use; ``device``: where the jobs run (``cpu``, ``cuda``)."""
    rows = fit.rows if fit is not None else plan.max_batch_rows
    lines = [
        f"plan {plan.content_hash} for hypothesis {plan.hypothesis!r}",
        f"  model: {plan.model.section.get('factory') or plan.model.section.get('hf') or 'hf_config'}"
        f" (adapter {plan.model.adapter}, weights {plan.model.weights_hash})",
        f"  data: {plan.data.n_rows} rows (hash {plan.data.data_hash}); metric {plan.metric['kind']}"
        f" at {plan.metric['at']!r}",
        f"  {len(plan.jobs)} jobs, {sum(j.forward_passes(rows) for j in plan.jobs)}"
        f" forward passes, up to {rows} rows per pass",
    ]
    if fit is not None:
        lines.append(f"  {fit.describe()}")
    if plan.model.section.get("check_sites", True):
        from mi_spec.execute.site_check import site_check_cost

        lines.append(f"  before running: {site_check_cost(plan.sites.values()).describe()}")
    peaks = fit.peaks if fit is not None else experiment_peaks(plan, size, rows, device)
    for exp in plan.experiments:
        jobs = plan.jobs_for(exp.name)
        if not jobs:
            continue
        passes = sum(j.forward_passes(rows) for j in jobs)
        backward = sum(j.backward_passes(rows) for j in jobs)
        examples = sum(len(j.rows) for j in jobs)
        lines += [
            f"\n  {exp.name} ({exp.kind})",
            f"    {len(jobs)} jobs x {_units(jobs[0])} on {examples} examples;"
            f" source: {jobs[0].source}",
            f"    {passes} forward passes ({passes / max(1, len(jobs)):.1f} per job)"
            + (f", {backward} backward" if backward else ""),
            f"    {peaks[exp.name].describe()}",
        ]
        nodes = _tree_nodes(jobs)
        if nodes:
            lines.append(f"    {nodes}")
        lines.append(f"    sites: {', '.join(sorted({s for j in jobs for s in j.sites}))}")
    return "\n".join(lines)


def _units(job: Job) -> str:
    """What a job sweeps: its variants, or the items an op keeps in its params."""
    if not job.variants and "items" in job.params:
        return f"{len(job.params['items'])} items"
    if not job.variants and "variants" in job.params:
        return f"{len(job.params['variants'])} variants"
    return f"{len(job.variants)} variants"


def _tree_nodes(jobs: list[Job]) -> str:
    """``tree nodes: N (distinct D)`` for scrub jobs that count them, else empty."""
    counted = [j.params for j in jobs if "tree_nodes" in j.params]
    if not counted:
        return ""
    total = sum(int(p["tree_nodes"]) for p in counted)
    distinct = sum(int(p.get("distinct_nodes", p["tree_nodes"])) for p in counted)
    return f"tree nodes: {total} (distinct {distinct})"
