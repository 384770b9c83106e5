"""Circuit discovery (ACDC, EAP, EAP-IG; MIB circuit track): score every edge of the residual-stream
graph, evaluate circuits of increasing size by real runs, and write the chosen circuit as a
hypothesis file that causal scrubbing can test. Discovery proposes; scrubbing tests.

Graph: senders ``embed``, head outputs ``L{l}.H{h}``, ``L{l}.mlp_out``; receivers a head's
``:q``/``:k``/``:v`` (``split_qkv``, default) or the whole head, ``L{l}.mlp_in``, ``logits``; an
edge for every sender -> receiver pair the residual stream allows (the receiver reads after the
sender writes). Scores (``method``): ``eap``, ``eap_ig`` (``steps``), ``acdc`` (``threshold``); see
``execute/discovery_op.py``. Circuits = the top-n edges by |score| for n in ``sizes``; each is run
with every edge outside it ablated (``ablation``: resample from another row, or the mean; EAP-IG's
path then ends at that row's, or the mean, token embedding). The chosen circuit is the smallest
evaluated one reaching ``target`` (EAP, EAP-IG) or the edges ACDC kept; each of its edges is then
removed in turn (minimality).

Faithfulness of C = mean(M(C) - M(empty)) / mean(M(full) - M(empty)) (1 = the model, 0 = every
edge ablated); CPR = area under faithfulness vs fraction of edges, CMD = area between it and 1.
One ``discovery`` job holds all rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field

from mi_spec.analysis.report import ExperimentReport
from mi_spec.experiments.attribution_patching import NOT_DIFFERENTIABLE
from mi_spec.experiments.base import (
    CompileContext,
    ExperimentSpec,
    register,
    resample_sources,
    sample_rows,
)
from mi_spec.experiments.discovery_report import discovery_report, edge_key
from mi_spec.experiments.path_patching import receiver_stage, sender_stage
from mi_spec.plan.ir import Job, JobResult

MIB_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)


class CircuitDiscoverySpec(ExperimentSpec):
    """Score every edge, evaluate circuits of increasing size by real runs, write the circuit."""

    kind: Literal["circuit_discovery"]
    method: Literal["eap", "eap_ig", "acdc"] = Field(
        "eap_ig",
        description="eap: edge attribution patching (one forward + backward); eap_ig: EAP with "
        "integrated gradients along the input path (`steps`); acdc: greedy pruning by real runs",
    )
    steps: int = Field(8, ge=1, description="eap_ig: interpolation steps (1 = eap)")
    threshold: float = Field(
        0.01,
        ge=0,
        description="acdc: remove an edge whose removal costs less than this share of the metric",
    )
    split_qkv: bool = Field(True, description="Receivers are a head's q, k, v (else whole heads)")
    ablation: Literal["resample", "mean"] = Field(
        "resample",
        description="What an edge outside the circuit carries: another row's write, or the mean",
    )
    mean_samples: int = Field(128, ge=1, description="Rows averaged for mean ablation")
    sizes: list[int] | None = Field(
        None,
        description="Circuit sizes (top-n edges) evaluated by real runs (default: 0..24 and the "
        "MIB fractions 0.1%..50% of all edges, and all of them)",
    )
    target: float = Field(
        0.9,
        gt=0,
        description="eap/eap_ig: the chosen circuit is the smallest evaluated one reaching this "
        "faithfulness (acdc: the edges it kept)",
    )
    minimality: int = Field(
        64,
        ge=0,
        description="Remove each edge of the chosen circuit in turn (when it has at most N)",
    )
    reference_edges: list[str] = Field(
        default_factory=list,
        description="A known circuit ('L0.H2->L1.H1:k'): the report gives edge precision/recall",
    )

    kind_name = "circuit_discovery"


def build_graph(
    ctx: CompileContext, split_qkv: bool
) -> tuple[list[str], list[list[Any]], list[list[int]]]:
    """Senders, receivers ([label, sites, residual point]) and edges, in topological order."""
    have, n = set(ctx.vocabulary), ctx.dims.n_layers
    if ctx.dims.gqa:
        raise ValueError(
            "circuit_discovery: grouped-query attention models are not supported yet "
            "(keys and values belong to kv heads)"
        )
    senders = ["embed"] if "embed" in have else []
    receivers: list[list[Any]] = []
    for layer in range(n):
        heads = [f"L{layer}.H{h}" for h in range(ctx.dims.n_heads) if f"L{layer}.H{h}" in have]
        senders += heads
        if f"L{layer}.mlp_out" in have:
            senders.append(f"L{layer}.mlp_out")
        point = f"L{layer}.resid_pre"
        for head in heads:
            parts = [f"{head}:{p}" for p in "qkv" if f"{head}:{p}" in have]
            if split_qkv:
                receivers += [[s, [s], point] for s in parts]
            elif parts:
                receivers.append([head, parts, point])
        if f"L{layer}.mlp_in" in have:
            receivers.append([f"L{layer}.mlp_in", [f"L{layer}.mlp_in"], f"L{layer}.resid_mid"])
    receivers.append(["logits", ["logits"], f"L{n - 1}.resid_post"])
    for r in receivers:
        for site in [*r[1], r[2]]:
            if site not in have:
                raise ValueError(
                    f"circuit_discovery needs the site {site!r}, which this model lacks"
                )
    edges = [
        [u, r]
        for r, rec in enumerate(receivers)
        for u, s in enumerate(senders)
        if sender_stage(s) < receiver_stage(rec[1][0], n)
    ]
    return senders, receivers, edges


def default_sizes(n_edges: int) -> list[int]:
    sizes = set(range(min(n_edges, 24) + 1)) | {n_edges}
    sizes |= {max(1, round(f * n_edges)) for f in MIB_FRACTIONS}
    return sorted(s for s in sizes if 0 <= s <= n_edges)


class CircuitDiscovery:
    spec = CircuitDiscoverySpec

    def compile(self, spec: CircuitDiscoverySpec, ctx: CompileContext) -> list[Job]:
        if spec.method != "acdc" and ctx.metric.kind in NOT_DIFFERENTIABLE:
            raise ValueError(
                f"circuit_discovery method {spec.method} needs a differentiable metric (loss, "
                f"logit_diff, prob); {NOT_DIFFERENTIABLE[ctx.metric.kind]}. Use method: acdc."
            )
        senders, receivers, edges = build_graph(ctx, spec.split_qkv)
        n_edges = len(edges)
        sizes = sorted({0, n_edges, *(s for s in (spec.sizes or default_sizes(n_edges)))})
        if sizes[-1] > n_edges or sizes[0] < 0:
            raise ValueError(f"sizes must lie in 0..{n_edges} (the number of edges)")
        _check_reference(spec.reference_edges, senders, receivers, edges, spec.split_qkv)
        rows = sample_rows(len(ctx.data), spec.samples, spec.seed)
        if spec.ablation == "resample":
            sources, source = resample_sources(rows, len(ctx.data), spec.seed), "rows"
        else:
            sources = sample_rows(len(ctx.data), spec.mean_samples, spec.seed + 1)
            source = "mean"
        components = [
            c for c in ctx.vocabulary if c == "embed" or c.endswith(("attn_out", "mlp_out"))
        ]
        n_layers = ctx.dims.n_layers
        before = {
            r[0]: [c for c in components if sender_stage(c) < receiver_stage(r[1][0], n_layers)]
            for r in receivers
        }
        n = len(rows)
        steps = spec.steps if spec.method == "eap_ig" else 1
        level_rows = [len(sources), n, n]  # source, clean, source metric
        backward: list[int] = []
        if spec.method == "acdc":
            level_rows += [n] * (n_edges + 1)  # one real run per edge (+ the empty circuit)
        else:
            level_rows += [n] * steps  # a forward (+ backward) per step
            backward = [n] * steps
        level_rows += [len(sizes) * n, min(spec.minimality, n_edges) * n]
        params = {
            "method": spec.method,
            "steps": steps,
            "threshold": spec.threshold,
            "senders": senders,
            "receivers": receivers,
            "edges": edges,
            "sizes": sizes,
            "target": spec.target,
            "minimality": spec.minimality,
            "points": {r[0]: r[2] for r in receivers},
            "before": before,
            "components": components,
            "items": [f"{senders[u]}->{receivers[r][0]}" for u, r in edges],
            "level_rows": level_rows,
            "backward_rows": backward,
        }
        sites = set(senders) | set(components) | {s for r in receivers for s in [*r[1], r[2]]}
        for s in sorted(sites):
            ctx.bind(s)
        return [
            Job(
                experiment=spec.label,
                op="discovery",
                rows=tuple(rows),
                source=source,  # type: ignore[arg-type]
                source_rows=tuple(sources),
                params=params,
                extra_sites=tuple(sorted(sites)),
            )
        ]

    def analyse(
        self,
        spec: CircuitDiscoverySpec,
        ctx: CompileContext,
        jobs: Sequence[Job],
        results: Sequence[JobResult],
    ) -> ExperimentReport:
        return discovery_report(spec, ctx, jobs[0], results[0])


def _check_reference(
    named: list[str], senders: list[str], receivers: list[list[Any]], edges: list[list[int]],
    split_qkv: bool,
) -> None:  # fmt: skip
    known = {f"{senders[u]}->{receivers[r][0]}" for u, r in edges}
    bad = [e for e in named if "->" not in e or edge_key(e, split_qkv) not in known]
    if bad:
        raise ValueError(
            f"reference_edges: {bad} are not edges of this graph (sender->receiver, e.g. "
            "'L0.H2->L1.H1:k', the receiver downstream of the sender)"
        )


register(CircuitDiscovery())
