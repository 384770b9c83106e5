"""The ``attribution`` job op: attribution patching, then real patching of what it ranks highest.

Node level, for site ``s`` at role ``P`` (per example, gradient at the base input)::

    est(s@P) = sum_{p in P} (a_src(p') - a_base(p)) . dM/da(p)

the first-order Taylor estimate of activation patching's ``M(patched) - M(clean)`` (``p'`` is the
role's position in the source row). Edge level (EAP, Syed et al. 2023), sender ``u`` at ``P`` ->
receiver ``r``::

    est(u@P->r) = sum_{p in P} delta c_u(p) . dM/dx_r(p)

where ``x_r`` is the residual stream as read by ``r`` alone: ``dM/dx_r`` is the vector-Jacobian
product of ``dM/d(r's slice)`` from ``r``'s activation back to its residual point (resid_pre for
q/k/v, resid_mid for mlp_in, the last resid_post for logits), and ``delta c_u`` is the change of
``u``'s write to the residual stream (a head's through the output projection: a second vjp from
``attn_out`` back to its ``z`` columns). The residual identity ``resid = embed + sum attn_out +
sum mlp_out + (an input-independent term)`` that this needs is checked on the base rows.

Cost per chunk of at most ``max_batch_rows`` rows, whatever the number of sites: one source
forward (no grad), one base forward + one backward (plus, for edges, one cheap vjp per receiver
and per (receiver, head layer)). Then verification: the ``top_k`` (+ ``bottom``) items by
``|mean estimate|`` are re-run for real as an in-memory ``patch`` job (nodes) or ``path_patch``
job (edges) on the same rows and sources. Params (``experiments/attribution_patching.py``)::

    level: node | edge, items: [[site, pos]] | [[sender, pos, receiver]], top_k, bottom,
    edge only: points {receiver: residual site}, through {head sender: attn_out site},
               components [embed, L*.attn_out, L*.mlp_out], before {receiver: components
               written before it}, freeze [...]; level_rows, backward_rows (pass counts for ``mi-spec plan``)
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mi_spec.data.dataset import Dataset
from mi_spec.errors import ExecutionError
from mi_spec.execute.engine import Engine, assign
from mi_spec.execute.metrics import make_targets, picked_logits, score, scored_at
from mi_spec.execute.ops import op_for, register_op
from mi_spec.execute.run_job import Batch, make_batch, run_job, source_values
from mi_spec.plan.ir import Intervention, Job, JobResult, Plan, Variant
from mi_spec.sites.adapter import SiteBinding
from mi_spec.spec.sections import MetricSection

Act = tuple[str, str]  # (module, io)
Role = str | int


@dataclass(frozen=True)
class Item:
    """One estimate: a node ``site@pos``, or an edge ``site@pos->receiver``."""

    site: str
    pos: Role
    receiver: str | None = None

    @property
    def label(self) -> str:
        node = f"{self.site}@{self.pos}"
        return node if self.receiver is None else f"{node}->{self.receiver}"


def items_of(job: Job) -> list[Item]:
    """The job's items, in job order."""
    items = job.params.get("items")
    if not isinstance(items, list) or not items:
        raise ExecutionError(f"attribution job {job.id or '?'}: params.items is empty")
    return [Item(*it) for it in items]


@register_op("attribution")
def run_attribution(job: Job, plan: Plan, engine: Engine, data: Dataset) -> JobResult:
    """Estimates for every item (per row), then the true effect of the top-ranked ones."""
    t0 = time.perf_counter()
    items, p = items_of(job), job.params
    estimates, clean, source, identity = estimate_all(job, plan, engine, data)
    t1 = time.perf_counter()
    chosen = choose(estimates.mean(1), int(p["top_k"]), int(p.get("bottom", 0)))
    truth, patched, verify_clean = _verify(job, [items[i] for i in chosen], plan, engine, data)
    extra: dict[str, Any] = {
        "level": p["level"],
        "labels": [it.label for it in items],
        "estimates": estimates.tolist(),
        "verified": chosen,
        "truth": truth.tolist(),
        "verify_clean": verify_clean.tolist(),
        "seconds_estimate": t1 - t0,
        "seconds_verify": time.perf_counter() - t1,
    }
    if p["level"] == "edge":
        extra["identity_error"] = identity
    return JobResult(
        job_id=job.id,
        clean=tuple(clean.tolist()),
        source=None if source is None else tuple(source.tolist()),
        variants=tuple(tuple(v.tolist()) for v in patched),
        extra=extra,
        seconds=time.perf_counter() - t0,
    )


def estimate_all(
    job: Job, plan: Plan, engine: Engine, data: Dataset
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]:
    """Per-item per-row estimates [items, N], the clean and source metric [N] and the residual
    identity's largest relative error (edges), in chunks of ``max_batch_rows`` rows."""
    items = items_of(job)
    metric = MetricSection.model_validate(plan.metric)
    if metric.kind in ("accuracy", "kl"):
        raise ExecutionError(f"attribution: metric {metric.kind!r} has no useful gradient")
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
    identity = 0.0
    for sub in _chunks(job, plan.max_batch_rows):
        est, clean, source, err = _estimate(sub, items, plan, engine, data, metric.kind)
        parts.append((est, clean, source))
        identity = max(identity, err)
    estimates = torch.cat([e for e, _, _ in parts], dim=1)
    clean = torch.cat([c for _, c, _ in parts])
    sources = [s for _, _, s in parts]
    source = None if any(s is None for s in sources) else torch.cat(sources)  # type: ignore[misc]
    return estimates, clean, source, identity


def choose(mean: torch.Tensor, top_k: int, bottom: int) -> list[int]:
    """Indices of the ``top_k`` largest ``|mean|`` (largest first), then the ``bottom`` smallest."""
    order = torch.argsort(mean.abs(), descending=True, stable=True).tolist()
    top = order[:top_k]
    rest = order[top_k:]
    return top + (rest[len(rest) - bottom :] if bottom else [])


def _chunks(job: Job, size: int) -> list[Job]:
    """The job split into row chunks of at most ``size`` (sources split alongside)."""
    out = []
    for i in range(0, len(job.rows), size):
        src = job.source_rows[i : i + size] if job.source == "rows" else job.source_rows
        out.append(job.model_copy(update={"rows": job.rows[i : i + size], "source_rows": src}))
    return out


# --- estimates --------------------------------------------------------------------------------


def _estimate(
    job: Job, items: list[Item], plan: Plan, engine: Engine, data: Dataset, kind: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]:
    """Per-item per-row estimates [items, B] of one chunk, its clean and source metric, and the
    residual identity's error (edges)."""
    rows, table, p = list(job.rows), plan.position_table(), job.params
    base = make_batch(data, rows, engine.device)
    targets = make_targets(MetricSection.model_validate(plan.metric), data, rows, table)
    keys = sorted({(it.site, it.pos) for it in items}, key=str)
    values, source_run = source_values(job, plan, table, engine, data, base, keys)
    roles = {pos: base.role(table, pos) for pos in {it.pos for it in items}}
    edge = p["level"] == "edge"
    names = {it.site for it in items}
    if edge:
        names |= {it.receiver for it in items} | set(p["points"].values())
        names |= set(p["through"].values()) | set(p["components"])
    sites = {s: plan.sites[s] for s in names}
    acts, logits = grad_pass(engine, base, list(sites.values()), scored_at(targets))
    clean = score(kind, logits, targets, picked=True)
    clean_logp = torch.log_softmax(picked_logits(logits, targets, picked=True), -1).detach()
    source = None
    if source_run is not None:  # scored where the metric's role is in the source
        source = source_run.score(kind, clean_logp)
    if not edge:
        return (
            _node_estimates(items, acts, sites, clean, values, roles),
            clean.detach(),
            source,
            0.0,
        )
    error = check_identity(job, acts, sites, base)
    est = _edge_estimates(job, items, acts, sites, clean, values, roles)
    return est, clean.detach(), source, error


def _node_estimates(
    items: list[Item],
    acts: dict[Act, torch.Tensor],
    sites: dict[str, SiteBinding],
    metric: torch.Tensor,
    values: dict[tuple[str, Role], torch.Tensor],
    roles: dict[Role, torch.Tensor],
) -> torch.Tensor:
    """(source - base) . dM/da per item and row: one backward for every site at once."""
    wanted = list({_act_key(sites[it.site]): None for it in items})
    grad = dict(
        zip(wanted, _grads(metric.sum(), [acts[a] for a in wanted], retain=False), strict=True)
    )
    est = []
    for it in items:
        site = sites[it.site]
        key = _act_key(site)
        est.append(_dot(values[(it.site, it.pos)], acts[key], grad[key], site, roles[it.pos]))
    return torch.stack(est).detach()


def _edge_estimates(
    job: Job,
    items: list[Item],
    acts: dict[Act, torch.Tensor],
    sites: dict[str, SiteBinding],
    metric: torch.Tensor,
    values: dict[tuple[str, Role], torch.Tensor],
    roles: dict[Role, torch.Tensor],
) -> torch.Tensor:
    """EAP: per receiver, dM/dx_r by a vjp from the receiver's slice to its residual point; per
    head sender's layer, a second vjp through the output projection onto its z columns."""
    p, on = job.params, _act_key
    receivers = list(dict.fromkeys(it.receiver for it in items if it.receiver))
    wanted = list({on(sites[r]): None for r in receivers})
    grad = dict(zip(wanted, _grads(metric.sum(), [acts[a] for a in wanted]), strict=True))
    out: dict[Item, torch.Tensor] = {}
    for r in receivers:
        b = sites[r]
        g_slice = torch.zeros_like(acts[on(b)])
        g_slice[..., b.start : b.stop] = grad[on(b)][..., b.start : b.stop]
        point = acts[on(sites[p["points"][r]])]
        g_x = _grads(acts[on(b)], [point], outputs=g_slice)[0]  # [B, T, D]
        through: dict[str, torch.Tensor] = {}  # attn_out site -> dM/dz of its heads, via x_r
        for it in (it for it in items if it.receiver == r):
            u = sites[it.site]
            a_u = acts[on(u)]
            if it.site in p["through"]:
                via = p["through"][it.site]
                if via not in through:
                    through[via] = _grads(acts[on(sites[via])], [a_u], outputs=g_x)[0]
                g_u = through[via]
            else:
                if a_u.shape[-1] != g_x.shape[-1]:
                    raise ExecutionError(
                        f"attribution: sender {it.site!r} is {a_u.shape[-1]} wide but the "
                        f"residual stream is {g_x.shape[-1]}: it must write the stream directly"
                    )
                g_u = g_x
            out[it] = _dot(values[(it.site, it.pos)], a_u, g_u, u, roles[it.pos])
    return torch.stack([out[it] for it in items]).detach()


def _dot(
    src: torch.Tensor, act: torch.Tensor, grad: torch.Tensor, site: SiteBinding, pos: torch.Tensor
) -> torch.Tensor:
    """Per row: sum over the role's positions of (source - base) . grad on the site's columns
    (for a subspace site, ``source - base`` is the change that writing its coordinates makes)."""
    rows = torch.arange(act.shape[0], device=act.device)[:, None]
    at = (rows, pos.to(act.device), slice(site.start, site.stop))
    wide = torch.promote_types(act.dtype, torch.float32)  # a bf16 model's estimates in fp32
    here = act.detach()[at].to(wide)
    # a subspace site's change is what writing the source's coordinates does to the columns
    delta = assign(here, site, src.to(wide)) - here
    return (delta * grad[at].to(wide)).sum((-1, -2))


def _grads(
    out: torch.Tensor,
    inputs: Sequence[torch.Tensor],
    outputs: torch.Tensor | None = None,
    retain: bool = True,
) -> list[torch.Tensor]:
    """``d out / d inputs`` (a vjp with ``outputs``); zeros for inputs ``out`` does not reach."""
    got = torch.autograd.grad(
        out, list(inputs), grad_outputs=outputs, retain_graph=retain, allow_unused=True
    )
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, got, strict=True)]


def _act_key(site: SiteBinding) -> Act:
    return (site.module, site.io)


def grad_pass(
    engine: Engine, base: Batch, sites: Sequence[SiteBinding], at: torch.Tensor
) -> tuple[dict[Act, torch.Tensor], torch.Tensor]:
    """One forward of the base rows with autograd on (``Engine.run_with_grad``): every site's
    whole activation, in the graph, and the logits at the scored positions ``at`` [B, P]."""
    acts, logits = engine.run_with_grad(base.ids, base.mask, sites, logits=at)
    if not logits.requires_grad:
        raise ExecutionError("attribution: the logits do not depend on any site (no gradient)")
    return acts, logits


def check_identity(
    job: Job, acts: dict[Act, torch.Tensor], sites: dict[str, SiteBinding], base: Batch
) -> float:
    """Check ``x_r - sum(components written before r)`` is the same in every base row (what is
    left is input-independent: position embeddings, biases); return the largest relative error.

    EAP needs it: a sender's change reaches the residual point as exactly its own write.
    """
    p = job.params
    if base.ids.shape[0] < 2:
        return 0.0
    t = int(base.mask.sum(1).min())
    worst = 0.0
    for r, point in sorted(set(p["points"].items())):
        x = acts[_act_key(sites[point])].detach()[:, :t]
        before = p["before"][r]
        rest = x.clone()
        for c in before:
            rest = rest - acts[_act_key(sites[c])].detach()[:, :t]
        scale = float(x.abs().max()) or 1.0
        err = float((rest - rest[:1]).abs().max()) / scale
        tol = 64 * torch.finfo(x.dtype).eps * max(1, len(before))
        if err > tol:
            raise ExecutionError(
                f"attribution (edge level): the residual identity {point} = "
                + " + ".join(before)
                + " + (an input-independent term) does not hold for this model "
                f"(relative error {err:.2e} > {tol:.1e}), so a sender's change is not its write "
                f"to what {r} reads; use level: node (or path_patching) for this architecture"
            )
        worst = max(worst, err)
    return worst


# --- verification -----------------------------------------------------------------------------


def _verify(
    job: Job, chosen: list[Item], plan: Plan, engine: Engine, data: Dataset
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """True effects [k, N] of ``chosen`` (patched - clean, per row), the patched metric per item
    and the verification's clean metric, by real patching (nodes) or path patching (edges)."""
    edge = job.params["level"] == "edge"
    op = op_for("path_patch") if edge else run_job
    patched: list[list[torch.Tensor]] = [[] for _ in chosen]
    cleans = []
    for sub in _chunks(job, plan.max_batch_rows):
        vjob = verification_job(sub, chosen)
        res = op(vjob, plan, engine, data)
        cleans.append(torch.tensor(res.clean, dtype=torch.float64))
        for i, v in enumerate(res.variants):
            patched[i].append(torch.tensor(v, dtype=torch.float64))
    clean = torch.cat(cleans)
    values = [torch.cat(v) for v in patched]
    truth = torch.stack([v - clean for v in values]) if values else torch.zeros(0, len(clean))
    return truth, values, clean


def verification_job(job: Job, chosen: list[Item]) -> Job:
    """The in-memory ``patch`` (nodes) or ``path_patch`` (edges) job for ``chosen`` items."""
    variants = tuple(
        Variant(label=it.label, interventions=(Intervention(site=it.site, pos=it.pos),))
        for it in chosen
    )
    common = {
        "experiment": job.experiment,
        "rows": job.rows,
        "source": job.source,
        "source_rows": job.source_rows,
        "source_column": job.source_column,
        "variants": variants,
    }
    if job.params["level"] == "node":
        return Job(id=f"{job.id}:verify", op="patch", **common)
    freeze = list(job.params["freeze"])
    return Job(
        id=f"{job.id}:verify",
        op="path_patch",
        params={
            "receivers": [[it.receiver] for it in chosen],
            "receiver_pos": [None for _ in chosen],
            "freeze": freeze,
        },
        extra_sites=tuple(sorted({str(it.receiver) for it in chosen} | set(freeze))),
        **common,
    )
