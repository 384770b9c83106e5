"""A readable summary of a Plan: per experiment, its jobs, forward passes, sites, examples, and an
estimate of peak activation memory per pass (so a study that cannot fit says so up front)."""

from __future__ import annotations

from mi_spec.plan.ir import Job, Plan

BYTES = 4  # fp32 activations


def pass_rows(job: Job, max_rows: int) -> int:
    """Rows in the largest forward pass of a job (variants are packed as extra rows)."""
    if "level_rows" in job.params:
        return min(max_rows, max(job.params["level_rows"]))
    per_pass = max(1, max_rows // max(1, len(job.rows)))
    return len(job.rows) * max(1, min(per_pass, len(job.variants)))


def peak_bytes(plan: Plan, job: Job, seq_len: int) -> int:
    """Rough peak of one pass: logits + a few residual-width tensors per layer, for every row."""
    d = plan.dims
    rows = pass_rows(job, plan.max_batch_rows)
    per_token = 2 * d["d_vocab"] + 6 * d["d_model"] + 4 * d["n_heads"] * seq_len
    return BYTES * rows * seq_len * per_token


def summarize(plan: Plan) -> str:
    seq = plan.data.max_len
    lines = [
        f"plan {plan.content_hash} for hypothesis {plan.hypothesis!r}",
        f"  model: {plan.model.section.get('factory') or plan.model.section.get('hf') or 'hf_config'}"
        f" (adapter {plan.model.adapter}, weights {plan.model.weights_hash})",
        f"  data: {plan.data.n_rows} rows (hash {plan.data.data_hash}); metric {plan.metric['kind']}"
        f" at {plan.metric['at']!r}",
        f"  {len(plan.jobs)} jobs, {sum(j.forward_passes(plan.max_batch_rows) for j in plan.jobs)}"
        f" forward passes, up to {plan.max_batch_rows} rows per pass",
    ]
    if plan.model.section.get("check_sites", True):
        from mi_spec.execute.site_check import site_check_cost

        lines.append(f"  before running: {site_check_cost(plan.sites.values()).describe()}")
    for exp in plan.experiments:
        jobs = plan.jobs_for(exp.name)
        if not jobs:
            continue
        passes = sum(j.forward_passes(plan.max_batch_rows) for j in jobs)
        backward = sum(j.backward_passes(plan.max_batch_rows) for j in jobs)
        rows = sum(len(j.rows) for j in jobs)
        peak = max(peak_bytes(plan, j, seq) for j in jobs)
        lines += [
            f"\n  {exp.name} ({exp.kind})",
            f"    {len(jobs)} jobs x {_units(jobs[0])} on {rows} examples;"
            f" source: {jobs[0].source}",
            f"    {passes} forward passes ({passes / max(1, len(jobs)):.1f} per job)"
            + (f", {backward} backward" if backward else "")
            + ";"
            f" est. peak activations {peak / 2**20:.1f} MiB per pass",
            f"    sites: {', '.join(sorted({s for j in jobs for s in j.sites}))}",
        ]
    return "\n".join(lines)


def _units(job: Job) -> str:
    """What a job sweeps: its variants, or the items an op keeps in its params."""
    if not job.variants and "items" in job.params:
        return f"{len(job.params['items'])} items"
    if not job.variants and "variants" in job.params:
        return f"{len(job.params['variants'])} variants"
    return f"{len(job.variants)} variants"
