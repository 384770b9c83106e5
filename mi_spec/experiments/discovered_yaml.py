"""The chosen circuit as a hypothesis file (``discovered.yaml``) that ``mi-spec run`` takes as written.

It keeps the study's model, data and metric; names every node of the circuit in ``correspondence``
(head inputs q/k/v where the edges say so); gives each node a placeholder variable whose parents
are the circuit's edges (the causal-graph skeleton); and adds a ``causal_scrubbing`` experiment and
``path_patching`` experiments over the circuit's edges. The placeholders claim only that a node
depends on what its in-circuit parents compute at the same position; the researcher names each
variable and writes what it computes, then scrubbing tests the claim.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from mi_spec.experiments.base import CompileContext

_HEAD_PART = re.compile(r"^(L\d+\.H\d+):[qkv]$")


def _node_of_receiver(receiver: str) -> str:
    """The scrubbing node that reads for a graph receiver (an MLP is one node, ``mlp_out``)."""
    return receiver.replace(".mlp_in", ".mlp_out")


def _var(site: str) -> str:
    return "tok" if site == "embed" else re.sub(r"[^A-Za-z0-9]", "_", site)


def _live(edges: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Drop edges into nodes whose output reaches nothing (until none is left)."""
    while True:
        writers = {u for u, _ in edges}
        keep = []
        for u, r in edges:
            node = _node_of_receiver(r)
            head = _HEAD_PART.match(node)
            out = head[1] if head else node
            if r == "logits" or out in writers:
                keep.append((u, r))
        if len(keep) == len(edges):
            return keep
        edges = keep


def _clean(section: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in section.items() if v is not None and v != {} and v != []}


def discovered_yaml(
    spec: Any,
    ctx: CompileContext,
    study: dict[str, Any],
    circuit: Sequence[str],
    faithfulness: float,
    ci: tuple[float, float],
) -> str:
    """The hypothesis text for ``circuit`` (edge labels ``sender->receiver``)."""
    edges = _live([tuple(e.split("->")) for e in circuit])  # type: ignore[misc]
    dropped = len(circuit) - len(edges)
    parents: dict[str, list[str]] = defaultdict(list)
    nodes: list[str] = []
    for u, r in edges:
        nodes.append(u)
        if r != "logits":
            node = _node_of_receiver(r)
            nodes.append(node)
            parents[node].append(u)
            head = _HEAD_PART.match(node)
            if head:  # a split head: its output reads its inputs
                nodes.append(head[1])
                parents[head[1]].append(node)
    nodes = list(dict.fromkeys(nodes))
    order = sorted(nodes, key=_depth)
    variables: dict[str, Any] = {}
    for n in order:
        ps = sorted(dict.fromkeys(parents.get(n, [])), key=_depth)
        if n == "embed":
            value = "tokens[pos]"
        elif not ps:
            value = "0"  # no parent in the circuit: claimed independent of the input
        elif len(ps) == 1:
            value = f"{_var(ps[0])}[pos]"
        else:
            value = "(" + ", ".join(f"{_var(q)}[pos]" for q in ps) + ")"
        variables[_var(n)] = {"value": value, "per_position": True}
    output = list(dict.fromkeys(_var(u) for u, r in edges if r == "logits"))
    by_receiver: dict[str, list[str]] = defaultdict(list)
    for u, r in edges:
        by_receiver[r].append(u)
    groups: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for r, us in by_receiver.items():
        groups[tuple(dict.fromkeys(us))].append(r)
    paths = [
        {
            "kind": "path_patching",
            "name": "paths-into-" + "-".join(rs)[:60].replace(":", "."),
            "senders": list(us),
            "receivers": rs,
            "source": {"resample": True},
            "samples": min(128, len(ctx.data)),
        }
        for us, rs in groups.items()
    ]
    doc: dict[str, Any] = {
        "name": f"{ctx.hypothesis}-discovered",
        "description": (
            f"Circuit found by circuit_discovery ({spec.method}) in {ctx.hypothesis}: "
            f"{len(circuit)} edges, faithfulness {faithfulness:.3f}"
        ),
        "model": _clean(dict(study["model"])),
        "data": _clean(dict(study["data"])),
        "metric": _clean(ctx.metric.model_dump(mode="json")),
        "variables": variables,
        "correspondence": {_var(n): [n] for n in order},
        "max_batch_rows": int(study.get("max_batch_rows", 64)),
        "experiments": [
            {
                "kind": "causal_scrubbing",
                "samples": 32,
                "output": output,
                "controls": {"n_random": 4, "drop_one": True, "min_agreeing": 4},
            },
            *paths,
        ],
    }
    header = [
        "# yaml-language-server: $schema=../schemas/hypothesis.schema.json",
        f"# Written by mi_spec circuit_discovery (method {spec.method}, ablation {spec.ablation}).",
        f"# Circuit: {len(circuit)} edges, faithfulness {faithfulness:.3f} "
        f"[{ci[0]:.3f}, {ci[1]:.3f}] (real runs, every other edge ablated).",
        "# Edges: " + ", ".join(f"{u}->{r}" for u, r in edges),
        "# Variables are PLACEHOLDERS, one per node: each claims only that its node depends on",
        "# what its parents in the circuit compute at the same position (embed: the token).",
        "# Name each variable and write what it computes, then run this file: causal scrubbing",
        "# tests the claim, path patching measures each edge.",
        f"# Relative paths (data, checkpoints) are relative to {study.get('base_dir', '.')}.",
    ]
    if dropped:
        header.append(f"# {dropped} edge(s) into nodes whose output reaches nothing were left out.")
    return "\n".join(header) + "\n" + yaml.safe_dump(doc, sort_keys=False, width=100)


def emit_beside(source: str | Path, reports: Iterable[Any]) -> list[str]:
    """``--emit``: write each report's ``discovered.yaml`` beside the hypothesis file ``source`` as
    ``<stem>.<experiment>.discovered.yaml`` (same folder, so its relative paths still hold).

    A file already there with other content (a copy the researcher has been naming) is kept, and
    the new circuit goes to ``….discovered.new.yaml``. Returns one line per file for the terminal.
    """
    source = Path(source)
    lines = []
    for report in reports:
        text = report.files.get("discovered.yaml")
        if text is None:
            continue
        slug = re.sub(r"[^A-Za-z0-9_.-]", "_", report.name.split("@")[0])
        out = source.with_name(f"{source.stem}.{slug}.discovered.yaml")
        if out.exists() and out.read_bytes() != text:
            kept = out
            out = out.with_name(out.name.removesuffix(".yaml") + ".new.yaml")
            lines.append(f"kept {kept} (it differs from this run's circuit)")
        out.write_bytes(text)
        lines.append(f"wrote {out}")
    return lines


def _depth(site: str) -> tuple[int, int, int, int]:
    """Forward order: embed; per layer the heads' inputs (q, k, v), the heads, the MLP."""
    if site == "embed":
        return (-1, 0, 0, 0)
    m = re.match(r"^L(\d+)\.(?:H(\d+)(?::([qkv]))?|(mlp_out))$", site)
    if m is None:
        return (10**6, 0, 0, 0)
    if m[4]:
        return (int(m[1]), 2, 0, 0)
    return (int(m[1]), 0 if m[3] else 1, int(m[2]), "qkv".index(m[3]) if m[3] else 0)
