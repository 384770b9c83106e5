"""Reference values for an activation-patching sweep, from the compiled plan's jobs (which rows, which
sources), computed with plain hooks: one forward per variant, positions written out by hand."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from reference.hooks import capture, metric_by_hand, patched_logits

Positions = Callable[[str | int | None, dict], list[int] | None]


def reference_job(model, plan, data, job, positions: Positions) -> tuple[list, list[list]]:
    """(clean per row, [variant][row]) loss values of one resampling job, with hooks only.

    ``positions(role, row)`` gives a role's token positions in a row by hand (None = all); rows
    and their sources must have the same length, so a role means the same positions in both.
    """
    assert job.source == "rows" and plan.metric["kind"] == "loss"
    rows = [data.row(r) for r in job.rows]
    sources = [data.row(r) for r in job.source_rows]
    assert all(len(a["tokens"]) == len(b["tokens"]) for a, b in zip(rows, sources, strict=True))
    ids, mask = (torch.tensor(x) for x in data.padded(list(job.rows)))
    s_ids, s_mask = (torch.tensor(x) for x in data.padded(list(job.source_rows)))
    names = {i.site for v in job.variants for i in v.interventions}
    source_acts = capture(model, s_ids, s_mask, [plan.sites[n] for n in names])
    m_pos = [positions(plan.metric["at"], r) for r in rows]
    targets = [[r["tokens"][p + 1] for p in ps] for r, ps in zip(rows, m_pos, strict=True)]
    clean = metric_by_hand("loss", patched_logits(model, ids, mask, []), m_pos, targets)
    out = []
    for variant in job.variants:
        edits = []
        for iv in variant.interventions:
            site = plan.sites[iv.site]
            where = None if iv.pos is None else [positions(iv.pos, r) for r in rows]

            def value(row, p, site=site):
                return source_acts[site.name][row, p, site.start : site.stop]

            edits.append((site, where, value))
        logits = patched_logits(model, ids, mask, edits)
        out.append(metric_by_hand("loss", logits, m_pos, targets))
    return clean, out


def reference_sweep(model, plan, data, experiment: str, positions: Positions):
    """(clean [N], {variant label: [N]}) over every job of ``experiment``, rows in job order."""
    clean: list[float] = []
    values: dict[str, list[float]] = {}
    for job in plan.jobs_for(experiment):
        c, per_variant = reference_job(model, plan, data, job, positions)
        clean += c
        for v, vals in zip(job.variants, per_variant, strict=True):
            values.setdefault(v.label, []).extend(vals)
    return clean, values


def assert_report_matches(report, clean: Sequence[float], values: dict, atol: float = 1e-5):
    """The report's clean metric and per-variant mean metric / effect equal the reference."""
    mean = sum(clean) / len(clean)
    assert abs(report.metrics["patch.metric.clean"] - mean) < atol
    table = {row["label"]: row for row in report.tables["effects.csv"]}
    assert set(table) == set(values)
    for label, vals in values.items():
        assert abs(table[label]["loss"] - sum(vals) / len(vals)) < atol, label
        effect = sum(v - c for v, c in zip(vals, clean, strict=True)) / len(vals)
        assert abs(table[label]["effect"] - effect) < atol, label
    return max(abs(row["effect"]) for row in table.values())
