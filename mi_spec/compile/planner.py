"""Resolved study -> Plan, by asking each experiment's kind to compile itself. Never branches on kind.

Pure: no forward passes. Every problem any experiment raises is reported together, located at the
experiment in the hypothesis file.
"""

from __future__ import annotations

import dataclasses

from mi_spec.causal.values import ExpressionError
from mi_spec.errors import MiSpecError, SpecError
from mi_spec.experiments.base import CompileContext, kinds
from mi_spec.plan.ir import DataRef, ExperimentEntry, ModelRef, Plan, seal_job
from mi_spec.sites.vocabulary import SiteSyntaxError
from mi_spec.spec.locate import issue_at

from .resolve import Study


def compile_context(study: Study) -> CompileContext:
    return CompileContext(
        hypothesis=study.spec.name,
        data=study.data,
        positions=study.positions,
        vocabulary=study.vocabulary,
        bind=study.bind,
        metric=study.spec.metric,
        dims=study.dims,
        causal=study.causal,
        correspondence=dict(study.spec.correspondence),
        base_dir=str(study.base_dir),
        attention=study.attention,
    )


def compile_plan(study: Study) -> Plan:
    """Compile every experiment into sealed, content-hashed jobs."""
    ctx = compile_context(study)
    table = kinds()
    jobs, issues, entries = [], [], []
    for i, exp in enumerate(study.spec.experiments):
        try:
            jobs += table[exp.kind].compile(exp, ctx)
        except ExpressionError as e:  # a variable that fails on a row: located at the variable
            issues.append(issue_at(study.doc, ("variables", *e.field), str(e)))
        except (MiSpecError, SiteSyntaxError, ValueError) as e:
            issues.append(issue_at(study.doc, ("experiments", i), str(e)))
        entries.append(
            ExperimentEntry(name=exp.label, kind=exp.kind, spec=exp.model_dump(mode="json"))
        )
    if issues:
        raise SpecError(issues)
    model_ref = ModelRef(
        section=study.spec.model.model_dump(mode="json"),
        base_dir=str(study.base_dir.resolve()),
        weights_hash=study.model.weights_hash,
        adapter=study.model.adapter.name,
    )
    data_ref = DataRef(
        section=study.spec.data.model_dump(mode="json"),
        base_dir=str(study.base_dir.resolve()),
        model_dir=study.model.hf_dir,
        data_hash=study.data.content_hash(),
        n_rows=len(study.data),
        max_len=study.data.max_len,
    )
    sites = {s: study.bind(s) for s in sorted({s for j in jobs for s in j.sites})}
    positions = {
        k: (v if isinstance(v, int) else v.model_dump()) for k, v in study.positions.items()
    }
    metric = study.spec.metric.model_dump(mode="json")
    bound = {k: v.model_dump() for k, v in sites.items()}
    context = {  # + each job's own sites: editing one experiment leaves the others' ids alone
        "model": model_ref.weights_hash,
        "data": data_ref.data_hash,
        "metric": metric,
        "positions": positions,
        "max_batch_rows": study.spec.max_batch_rows,
    }
    return Plan(
        hypothesis=study.spec.name,
        model=model_ref,
        data=data_ref,
        dims=dataclasses.asdict(study.dims),
        metric=metric,
        positions=positions,
        sites=sites,
        experiments=tuple(entries),
        jobs=tuple(seal_job(j, {**context, "sites": {s: bound[s] for s in j.sites}}) for j in jobs),
        max_batch_rows=study.spec.max_batch_rows,
    )
