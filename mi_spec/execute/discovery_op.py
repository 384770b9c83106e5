"""The ``discovery`` job op: score every edge of the residual-stream graph, then evaluate circuits
of increasing size by real runs with every edge outside the circuit ablated.

Graph (built by ``experiments/circuit_discovery.py``): senders write the residual stream (``embed``,
head outputs ``L{l}.H{h}``, ``L{l}.mlp_out``); receivers read it (a head's ``:q``/``:k``/``:v``,
or the whole head when q/k/v are not split, ``L{l}.mlp_in``, ``logits``), each through its own
*read* of a residual point (``resid_pre``, ``resid_mid``, the last ``resid_post``).

Scores, per example, summed over positions (``c_u`` = the sender's write to the stream, ``x_r`` =
the residual stream as read by ``r`` alone)::

    eap     s(u->r) = (c_u(source) - c_u(base)) . dM/dx_r                 (at the base input)
    eap_ig  s(u->r) = (c_u(source) - c_u(base)) . mean_k dM/dx_r(k/N)     k = 0..N-1
            (the token embedding interpolated from base to source, or to the mean embedding
            with mean ablation; N = 1 is EAP exactly)
    acdc    s(u->r) = the drop in faithfulness when the edge is removed, greedily in reverse
            topological order; removed when the drop is below the threshold

A circuit C is run for real: every receiver r reads ``x_r = x_point - sum_{u->r not in C}
(c_u(this run) - c_u(source))``, i.e. the ablated edges carry the source's (or the mean's) write,
the kept ones this run's. A receiver with no ablated edge is left untouched, so the full circuit is
the clean model exactly; the empty circuit is the ablated model. How a receiver reads its point
(e.g. ``c_attn(ln_1(x))`` in GPT-2) is found by probing the model and checked on the clean run.

The op uses plain PyTorch hooks (installed per pass, removed in ``finally``): ablation values are
computed inside the forward from what earlier layers wrote in the same pass, which the engine's
fixed read/write passes do not express. Params: see ``experiments/circuit_discovery.py``.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch

from mi_spec.data.dataset import Dataset
from mi_spec.errors import ExecutionError
from mi_spec.execute.attribution_op import check_identity
from mi_spec.execute.discovery_wiring import Graph, Key, Wiring, first_tensor, hooked, probe_readers
from mi_spec.execute.engine import Engine
from mi_spec.execute.metrics import Targets, make_targets, picked_logits, score, scored_at
from mi_spec.execute.ops import register_op
from mi_spec.execute.run_job import Batch, make_batch
from mi_spec.plan.ir import Job, JobResult, Plan
from mi_spec.sites.adapter import SiteBinding
from mi_spec.spec.sections import MetricSection

# --- the op -----------------------------------------------------------------------------------


@register_op("discovery")
def run_discovery(job: Job, plan: Plan, engine: Engine, data: Dataset) -> JobResult:
    """Scores for every edge, the faithfulness curve and the chosen circuit's minimality."""
    t0 = time.perf_counter()
    run = Discovery.start(job, plan, engine, data)
    p = job.params
    if p["method"] == "acdc":
        scores, acdc_passes = run.acdc(float(p["threshold"]))
        per_row = None
    else:
        per_row = run.scores(int(p["steps"]) if p["method"] == "eap_ig" else 1)
        scores, acdc_passes = per_row.mean(1), 0
    t1 = time.perf_counter()
    order = torch.argsort(scores.abs(), descending=True, stable=True)
    if p["method"] == "acdc":  # kept edges first (ACDC's circuit), then by score
        kept = torch.tensor(run.kept, dtype=torch.bool)
        order = sorted(range(len(scores)), key=lambda e: (not kept[e], -abs(float(scores[e]))))
        order = torch.tensor(order, dtype=torch.long)
    sizes = [int(n) for n in p["sizes"]]
    keeps = torch.zeros(len(sizes), len(scores), dtype=torch.bool)
    for i, n in enumerate(sizes):
        keeps[i, order[:n]] = True
    curve = run.metric_of(keeps)  # [S, N]
    empty, full = curve[sizes.index(0)], curve[sizes.index(len(scores))]
    denom = float((full - empty).mean())
    faith = [(float((c - empty).mean()) / denom) if denom else float("nan") for c in curve]
    chosen = next(
        (n for n, f in zip(sizes, faith, strict=True) if f >= float(p["target"])), sizes[-1]
    )
    if p["method"] == "acdc":  # ACDC's circuit is what it kept (evaluated below if not yet)
        chosen = sum(run.kept)
        if chosen not in sizes:
            keep = torch.zeros(1, len(scores), dtype=torch.bool)
            keep[0, order[:chosen]] = True
            at = next(i for i, n in enumerate(sizes) if n > chosen)
            sizes.insert(at, chosen)
            curve = torch.cat([curve[:at], run.metric_of(keep), curve[at:]])
    drops: list[list[float]] = []
    chosen_edges = order[:chosen].tolist()
    if p.get("minimality", 0) and 0 < chosen <= int(p["minimality"]):
        base_keep = torch.zeros(len(scores), dtype=torch.bool)
        base_keep[chosen_edges] = True
        minus = base_keep.repeat(chosen, 1)
        minus[torch.arange(chosen), torch.tensor(chosen_edges)] = False
        drops = run.metric_of(minus).tolist()
    extra: dict[str, Any] = {
        "labels": Graph.of(job).labels,
        "scores": scores.tolist(),
        "score_std": [] if per_row is None else per_row.std(1).tolist(),
        "order": order.tolist(),
        "sizes": sizes,
        "curve": curve.tolist(),
        "chosen": chosen,
        "minimality": drops,
        "acdc_passes": acdc_passes,
        "identity_error": run.identity_error,
        "seconds_scores": t1 - t0,
        "seconds_curve": time.perf_counter() - t1,
        "study": {
            "model": plan.model.section,
            "data": plan.data.section,
            "base_dir": plan.model.base_dir,
            "max_batch_rows": plan.max_batch_rows,
        },
    }
    return JobResult(
        job_id=job.id,
        clean=tuple(run.clean.tolist()),
        source=None if run.source is None else tuple(run.source.tolist()),
        variants=(),
        extra=extra,
        seconds=time.perf_counter() - t0,
    )


@dataclass
class Discovery:
    """One job's state: the graph, the wiring, the base rows and the source's writes."""

    job: Job
    plan: Plan
    graph: Graph
    wiring: Wiring
    base: Batch
    kind: str
    targets: Targets
    src_writes: dict[str, torch.Tensor]  # sender -> [B, T, D] (or [1, T, D] for a mean)
    src_embed: torch.Tensor  # the embed site on the source rows, or its mean (EAP-IG's end)
    clean: torch.Tensor
    clean_logp: torch.Tensor
    source: torch.Tensor | None
    identity_error: float = 0.0
    kept: list[bool] = field(default_factory=list)

    @classmethod
    def start(cls, job: Job, plan: Plan, engine: Engine, data: Dataset) -> Discovery:
        graph = Graph.of(job)
        metric = MetricSection.model_validate(plan.metric)
        rows = list(job.rows)
        lengths = {data.lengths[r] for r in [*rows, *job.source_rows]}
        if len(lengths) != 1:
            raise ExecutionError(
                f"discovery job {job.id}: base and source rows must share one length "
                f"(found {sorted(lengths)}); every edge is scored at every position"
            )
        base = make_batch(data, rows, engine.device)
        table = plan.position_table()
        targets = make_targets(metric, data, rows, table)
        names = set(graph.senders) | {s for _, ss, p in graph.receivers for s in [*ss, p]}
        names |= set(job.params.get("components", [])) | {"embed"}
        wiring = Wiring(engine.model, {s: plan.sites[s] for s in names if s in plan.sites})
        probe_readers(wiring, graph, base.ids[: min(4, len(rows))])
        src_acts = _no_grad_acts(wiring, graph, job, data, engine, plan)
        src_writes = {u: wiring.write(u, src_acts[u]) for u in graph.senders}
        if job.source == "mean":
            src_writes = {
                u: v.double().mean(0, keepdim=True).to(v.dtype) for u, v in src_writes.items()
            }
        logits = _chunked_logits(engine, base, targets, plan.max_batch_rows)
        clean_logp = torch.log_softmax(picked_logits(logits, targets, picked=True), -1)
        clean = score(metric.kind, logits, targets, clean_logp, picked=True)
        source = None
        if job.source == "rows":
            src_ids = make_batch(data, list(job.source_rows), engine.device).ids
            src = Batch(src_ids, base.mask, data, rows)
            got = _chunked_logits(engine, src, targets, plan.max_batch_rows)
            source = score(metric.kind, got, targets, clean_logp, picked=True)
        src_embed = src_acts["embed"]  # the input end of EAP-IG's path: the source, or the mean
        if job.source == "mean":
            src_embed = src_embed.double().mean(0, keepdim=True).to(src_embed.dtype)
        return cls(
            job, plan, graph, wiring, base, metric.kind, targets, src_writes, src_embed,
            clean.detach().double(), clean_logp, None if source is None else source.double(),
        )  # fmt: skip

    # --- scores ---------------------------------------------------------------------------

    def scores(self, steps: int) -> torch.Tensor:
        """EAP (``steps == 1``) or EAP-IG scores per edge and row: [E, N]."""
        parts = []
        r = self.plan.max_batch_rows
        for a in range(0, len(self.job.rows), r):
            parts.append(self._chunk_scores(a, min(len(self.job.rows), a + r), steps))
        return torch.cat(parts, dim=1)

    def _chunk_scores(self, a: int, z: int, steps: int) -> torch.Tensor:
        g, w = self.graph, self.wiring
        ids = self.base.ids[a:z]
        targets = _rows_of(self.targets, torch.arange(a, z))
        grads: dict[int, torch.Tensor] = {}
        base_writes: dict[str, torch.Tensor] = {}
        b = z - a
        per_pass = max(1, self.plan.max_batch_rows // b)  # interpolation steps packed as blocks
        for k0 in range(0, steps, per_pass):
            alphas = [k / steps for k in range(k0, min(steps, k0 + per_pass))]
            acts, logits = self._grad_pass(ids.repeat(len(alphas), 1), a, z, alphas)
            if k0 == 0:  # block 0 is the base input itself
                base_writes = {u: w.write(u, acts[w.key(u)][:b].detach()) for u in g.senders}
                self._check_identity(acts, ids.repeat(len(alphas), 1))
            metric = score(self.kind, logits, targets, self.clean_logp[a:z]).sum()
            for r, g_r in self._receiver_grads(acts, metric).items():
                g_r = g_r.view(len(alphas), b, *g_r.shape[1:]).sum(0) / steps
                grads[r] = g_r if r not in grads else grads[r] + g_r
        deltas = []
        for u in g.senders:
            src = self.src_writes[u]
            deltas.append((src if src.shape[0] == 1 else src[a:z]) - base_writes[u])
        delta = torch.stack(deltas, 1).flatten(2)  # [B, U, T*D]
        out = torch.zeros(len(g.edges), z - a, dtype=torch.float64)
        into: dict[int, list[int]] = defaultdict(list)
        for e, (_, r) in enumerate(g.edges):
            into[r].append(e)
        blocks: dict[int, list[int]] = defaultdict(list)  # receivers by their last sender
        for r in sorted(grads):
            if into[r]:
                blocks[max(g.edges[e][0] for e in into[r])].append(r)
        for last, rs in blocks.items():  # every (upstream sender, receiver) pair at once
            stacked = torch.stack([grads[r] for r in rs], 1).flatten(2)  # [B, R, T*D]
            per = torch.bmm(delta[:, : last + 1], stacked.transpose(1, 2)).double()
            for j, r in enumerate(rs):
                es = into[r]
                out[es] = per[:, [g.edges[e][0] for e in es], j].T
        return out

    def _grad_pass(
        self, ids: torch.Tensor, a: int, z: int, alphas: list[float]
    ) -> tuple[dict[Key, torch.Tensor], torch.Tensor]:
        """One forward with autograd on: senders', points' and receivers' activations, in the
        graph (module inputs become copies only that module reads); ``ids`` holds one block of
        rows [a, z) per alpha, its embedding interpolated ``alpha`` of the way to the source's."""
        g, w = self.graph, self.wiring
        keys = {w.key(p) for _, _, p in g.receivers}
        keys |= {w.key(s) for _, ss, _ in g.receivers for s in ss}
        if alphas[0] == 0:  # the base run: senders' writes and the residual identity's parts
            keys |= {w.key(u) for u in g.senders}
            keys |= {w.key(c) for c in self.job.params.get("components", [])}
        keys |= {(m, "input") for m in w.linear}  # where a linear reader's gradient is pulled to
        acts: dict[Key, torch.Tensor] = {}
        handlers: dict[Key, list] = defaultdict(list)
        embed = w.key("embed")

        def lead(v: torch.Tensor) -> torch.Tensor:
            base = v.detach()
            if any(alphas):
                end = self.src_embed if self.src_embed.shape[0] == 1 else self.src_embed[a:z]
                end = end.to(base).repeat(len(alphas) if end.shape[0] > 1 else 1, 1, 1)
                at = torch.tensor(alphas, dtype=base.dtype, device=base.device)
                at = at.repeat_interleave(z - a)[:, None, None]
                base = base + at * (end - base)
            return base.requires_grad_(True)

        handlers[embed].append(lead)
        for key in keys:

            def keep(v: torch.Tensor, key: Key = key) -> torch.Tensor:
                v = v.clone() if key[1] == "input" else v
                acts[key] = v
                return v

            handlers[key].append(keep)
        with torch.enable_grad(), hooked(w.model, handlers):
            logits = _logits(w.model, ids)
        return acts, logits

    def _receiver_grads(
        self, acts: dict[Key, torch.Tensor], metric: torch.Tensor
    ) -> dict[int, torch.Tensor]:
        """dM/dx_r per receiver: one backward to the receivers' activations, then per (module,
        point) one batched vector-Jacobian product back to the point through the reader only."""
        g, w = self.graph, self.wiring
        act_keys = list(dict.fromkeys(w.key(s) for _, ss, _ in g.receivers for s in ss))
        got = torch.autograd.grad(
            metric, [acts[k] for k in act_keys], retain_graph=True, allow_unused=True
        )
        d_act = {
            k: (torch.zeros_like(acts[k]) if d is None else d)
            for k, d in zip(act_keys, got, strict=True)
        }
        groups: dict[tuple[Key, Key], list[tuple[int, SiteBinding]]] = defaultdict(list)
        for r, (_, sites, point) in enumerate(g.receivers):
            for s in sites:
                groups[(w.key(s), w.key(point))].append((r, w.sites[s]))
        out: dict[int, torch.Tensor] = {}
        for (act_key, point_key), members in groups.items():
            d = d_act[act_key]
            jac = w.linear.get(act_key[0]) if act_key[1] == "output" else None
            if jac is not None:  # per member: its columns' gradient through the weight block
                idx = torch.stack([torch.arange(b.start, b.stop) for _, b in members])  # type: ignore[arg-type]
                pulled = torch.einsum("btnw,nwi->nbti", d[..., idx], jac.to(d)[idx])
                vjp = _batched_vjp(acts[(act_key[0], "input")], acts[point_key], pulled)
            else:
                stacked = torch.zeros((len(members), *d.shape), dtype=d.dtype, device=d.device)
                for i, (_, b) in enumerate(members):
                    cols = slice(b.start, b.stop)
                    stacked[i, ..., cols] = d[..., cols]
                vjp = _batched_vjp(acts[act_key], acts[point_key], stacked)
            for i, (r, _) in enumerate(members):
                out[r] = vjp[i] if r not in out else out[r] + vjp[i]
        return out

    def _check_identity(self, acts: dict[Key, torch.Tensor], ids: torch.Tensor) -> None:
        p = self.job.params
        if "before" not in p:
            return
        one: dict[tuple[str, tuple[str, ...]], str] = {}  # one receiver per (point, writers)
        for r, point in p["points"].items():
            one.setdefault((point, tuple(p["before"][r])), r)
        job = self.job.model_copy(
            update={"params": {**p, "points": {r: k[0] for k, r in one.items()}}}
        )
        batch = Batch(ids, torch.ones_like(ids), self.base.data, self.base.rows)
        err = check_identity(job, acts, dict(self.wiring.sites), batch)
        self.identity_error = max(self.identity_error, err)

    # --- real runs ----------------------------------------------------------------------------

    def metric_of(self, keeps: torch.Tensor) -> torch.Tensor:
        """Metric per circuit (kept-edge masks [G, E]) and row: [G, N], by real runs, packed as
        blocks of rows (at most ``max_batch_rows`` rows a pass)."""
        n, r = len(self.job.rows), self.plan.max_batch_rows
        out = torch.zeros(keeps.shape[0], n, dtype=torch.float64)
        if n > r:  # chunk the rows; one circuit per pass
            for a in range(0, n, r):
                for i in range(keeps.shape[0]):
                    out[i, a : min(n, a + r)] = self._ablated(keeps[i : i + 1], a, min(n, a + r))[0]
            return out
        per = max(1, r // n)
        for i in range(0, keeps.shape[0], per):
            out[i : i + per] = self._ablated(keeps[i : i + per], 0, n)
        return out

    def _ablated(self, keeps: torch.Tensor, a: int, z: int) -> torch.Tensor:
        """One forward of len(keeps) blocks of rows [a, z), block g with circuit keeps[g]."""
        g, w = self.graph, self.wiring
        blocks, b = keeps.shape[0], z - a
        coef = g.ablation_matrix(keeps)  # [G, R, U]
        ids = self.base.ids[a:z].repeat(blocks, 1)
        needed = [u for u in range(len(g.senders)) if coef[:, :, u].any()]
        deltas: dict[int, torch.Tensor] = {}
        points: dict[str, torch.Tensor] = {}
        handlers: dict[Key, list] = defaultdict(list)
        for u in needed:
            site = g.senders[u]

            def sender(v: torch.Tensor, u: int = u, site: str = site) -> None:
                src = self.src_writes[site]
                src = src if src.shape[0] == 1 else src[a:z].repeat(blocks, 1, 1)
                deltas[u] = w.write(site, v) - src.to(v)

            handlers[w.key(site)].append(sender)
        for point in {p for _, _, p in g.receivers}:

            def capture(v: torch.Tensor, point: str = point) -> None:
                points[point] = v

            handlers[w.key(point)].append(capture)
        by_key: dict[Key, list[tuple[int, str]]] = defaultdict(list)
        for r, (_, sites, _) in enumerate(g.receivers):
            if coef[:, r].any():
                for s in sites:
                    by_key[w.key(s)].append((r, s))
        for key, members in by_key.items():

            def receive(v: torch.Tensor, members=members) -> torch.Tensor:
                new = v.clone()
                for r, s in members:
                    point = points[g.receivers[r][2]]
                    us = coef[:, r].any(0).nonzero().flatten().tolist()
                    c = coef[:, r][:, us].to(point).repeat_interleave(b, dim=0)  # [GB, u]
                    shift = torch.einsum("nu,unti->nti", c, torch.stack([deltas[u] for u in us]))
                    rows = coef[:, r].any(1).repeat_interleave(b).to(point.device)
                    val = w.read(s, point - shift)
                    bind = w.sites[s]
                    cols = slice(bind.start, bind.stop)
                    new[rows, ..., cols] = val[rows].to(new)
                return new

            handlers[key].append(receive)
        with torch.no_grad(), hooked(w.model, handlers):
            logits = _logits(w.model, ids)
        targets = _rows_of(self.targets, torch.arange(a, z))
        vals = score(self.kind, logits, targets, self.clean_logp[a:z])
        return vals.double().view(blocks, b)

    # --- ACDC ---------------------------------------------------------------------------------

    def acdc(self, threshold: float) -> tuple[torch.Tensor, int]:
        """Greedy pruning by real runs in reverse topological order (receivers from the logits
        down; senders latest first): an edge whose removal costs less than ``threshold`` of the
        normalised metric is removed for good. Returns each edge's drop and the passes run."""
        e = len(self.graph.edges)
        keep = torch.ones(1, e, dtype=torch.bool)
        empty = self.metric_of(torch.zeros(1, e, dtype=torch.bool))[0].mean()
        full = self.clean.mean()
        scale = float(full - empty) or 1.0
        current = float(full)
        drops = torch.zeros(e, dtype=torch.float64)
        order = sorted(range(e), key=lambda i: (-self.graph.edges[i][1], -self.graph.edges[i][0]))
        passes = 1
        for i in order:
            trial = keep.clone()
            trial[0, i] = False
            value = float(self.metric_of(trial)[0].mean())
            passes += 1
            drop = (current - value) / scale  # faithfulness lost by removing the edge
            drops[i] = drop
            if drop < threshold:
                keep, current = trial, value
        self.kept = keep[0].tolist()
        return drops, passes


def _batched_vjp(out: torch.Tensor, point: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """``grads[i] . d out / d point`` for every i; zeros where ``out`` does not depend on it."""
    try:
        got = torch.autograd.grad(
            out, point, grad_outputs=grads, retain_graph=True, is_grads_batched=True,
            allow_unused=True,
        )[0]  # fmt: skip
    except RuntimeError:  # an op without a batching rule: one at a time
        parts = [
            torch.autograd.grad(out, point, grad_outputs=g, retain_graph=True, allow_unused=True)[0]
            for g in grads
        ]
        if any(x is None for x in parts):
            return torch.zeros((len(grads), *point.shape), dtype=point.dtype, device=point.device)
        return torch.stack(parts)  # type: ignore[arg-type]
    if got is None:
        return torch.zeros((len(grads), *point.shape), dtype=point.dtype, device=point.device)
    return got


def _no_grad_acts(
    wiring: Wiring, graph: Graph, job: Job, data: Dataset, engine: Engine, plan: Plan
) -> dict[str, torch.Tensor]:
    """Every sender's activation (and the embed site) on the source rows (or the mean's rows)."""
    rows = list(job.source_rows)
    want = list(dict.fromkeys([*graph.senders, "embed"]))
    out: dict[str, list[torch.Tensor]] = defaultdict(list)
    for a in range(0, len(rows), plan.max_batch_rows):
        ids = make_batch(data, rows[a : a + plan.max_batch_rows], engine.device).ids
        got: dict[Key, torch.Tensor] = {}
        handlers: dict[Key, list] = defaultdict(list)
        for key in {wiring.key(s) for s in want}:

            def keep(v: torch.Tensor, key: Key = key, got: dict = got) -> None:
                got[key] = v.detach().clone()

            handlers[key].append(keep)
        with torch.no_grad(), hooked(wiring.model, handlers):
            wiring.model(ids)
        for s in want:
            out[s].append(got[wiring.key(s)])
    return {s: torch.cat(v) for s, v in out.items()}


def _chunked_logits(engine: Engine, base: Batch, targets: Targets, size: int) -> torch.Tensor:
    """The logits of ``base``'s rows at their scored positions, [B, P, V]."""
    parts = []
    for a in range(0, base.ids.shape[0], size):
        ids = base.ids[a : a + size]
        at = scored_at(_rows_of(targets, torch.arange(a, a + len(ids))))
        parts.append(engine.run(ids, torch.ones_like(ids), logits=at)[0])
    return torch.cat(parts)


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The logits of a forward (an HF output object or a plain tensor)."""
    out = model(ids)
    return out.logits if hasattr(out, "logits") else first_tensor(out)


def _rows_of(t: Targets, idx: torch.Tensor) -> Targets:
    return t.rows(idx)
