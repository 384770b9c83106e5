"""Causal scrubbing on a bidirectional model: the attention probe, treeification over the whole
row against a slow hook-based reference, a hand-built model whose (future-reading) mechanism is
known exactly, and the refusal of a model the trees cannot model."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from reference.bidirectional import BidirectionalReference, query_shift, read_ahead
from reference.hooks import metric_by_hand
from reference.scrub import hyp_of

from mi_spec import api
from mi_spec.errors import SpecError
from mi_spec.execute.ops import op_for
from mi_spec.execute.worker import loaded_for
from mi_spec.experiments import causal_scrubbing
from mi_spec.models.attention_probe import attention_pattern, probe
from mi_spec.sites.adapter import adapter_for
from mi_spec.tracking.base import InMemoryTracker
from mi_spec.zoo import attn_only

V, T = 6, 7


def pattern_of(model: torch.nn.Module):
    adapter = adapter_for(model, None)
    return probe(model, adapter, adapter.dims(model))


def test_probe_tells_causal_from_bidirectional_and_refuses_mixing():
    ahead = pattern_of(read_ahead())
    assert ahead.kind == "bidirectional" and ahead.layers[0] == "bidirectional"
    assert pattern_of(read_ahead(causal=True)).kind == "causal"
    assert pattern_of(attn_only()).kind == "causal"
    mixing = pattern_of(query_shift())
    assert mixing.kind == "other" and mixing.layers == ("bidirectional", "other")
    assert "L1.H0:q at position 0 reads position" in mixing.detail


def write_study(tmp_path: Path, factory: str = "read_ahead", samples: int = 40) -> Path:
    rng = random.Random(0)
    with open(tmp_path / "rows.jsonl", "w") as f:
        for _ in range(240):
            f.write(json.dumps({"tokens": [rng.randrange(V) for _ in range(T)]}) + "\n")
    (tmp_path / "h.yaml").write_text(f"""
name: read-ahead
model:
  factory: reference.bidirectional:{factory}
data:
  path: rows.jsonl
  positions: {{mid: {{start: 1, stop: 6}}}}
metric: {{kind: loss, at: mid}}
variables:
  tok: {{value: "tokens[pos]", per_position: true}}
  ahead: {{value: "tok[pos + 2] if pos + 2 < len(tok) else -1", per_position: true}}
  copied: {{value: "ahead[pos - 1] if pos > 0 else -1", per_position: true}}
correspondence:
  tok: [embed]
  ahead: [L0.H0]
  copied: [L1.H0]
max_batch_rows: 512
experiments:
  - kind: causal_scrubbing
    samples: {samples}
    controls: {{n_random: 2, drop_one: false, min_agreeing: 5}}
""")
    return tmp_path / "h.yaml"


def scrub(path: Path, overrides: list[str] | None = None):
    result = api.run(path, InMemoryTracker(), overrides or [], cache_dir=None, runner="synchronous")
    return result.reports[0]


def test_true_hypothesis_recovers_all_wrong_ones_do_not(tmp_path, monkeypatch):
    path = write_study(tmp_path)
    true = scrub(path)
    m = true.metrics
    print(f"true: {m['scrub.loss_recovered']:.4f} [{m['scrub.loss_recovered.ci_low']:.4f}]")
    assert true.params["attention"] == "bidirectional"
    assert m["scrub.loss_recovered.ci_low"] >= 0.99
    assert m["scrub.loss_random"] > 1.0 > 0.01 > m["scrub.loss_model"]
    wrong = {
        "L0.H0 reads one ahead": [
            "variables.ahead.value=tok[pos + 1] if pos + 1 < len(tok) else -1"
        ],
        "L0.H0 reads the past": ["variables.ahead.value=tok[pos - 1] if pos > 0 else -1"],
        "L1.H0 copies from the right": ["variables.copied.value=ahead[pos + 1] if pos < 6 else -1"],
    }
    for name, change in wrong.items():
        got = scrub(path, change).metrics
        print(f"{name}: {got['scrub.loss_recovered']:.4f}")
        assert got["scrub.loss_recovered.ci_high"] < m["scrub.loss_recovered.ci_low"] - 0.3, name
    # the old, causal-only treeification gets the true hypothesis wrong on this model
    monkeypatch.setattr(causal_scrubbing, "attention_of", lambda ctx: "causal")
    causal = scrub(path).metrics["scrub.loss_recovered"]
    print(f"true, treeified as if causal: {causal:.4f}")
    assert causal < 0.5


def test_batched_engine_equals_bidirectional_reference(tmp_path):
    study, plan = api.compile_file(write_study(tmp_path, samples=4))
    _, main = api.compile_file(tmp_path / "h.yaml", ["experiments.0.controls.n_random=0"])
    state = loaded_for(plan, model=study.model)
    checked = 0
    for job in plan.jobs:
        result = op_for(job.op)(job, plan, state.engine, state.data)
        positions = [list(range(1, 6))] * len(job.rows)
        targets = [[state.data.tokens[r][p + 1] for p in range(1, 6)] for r in job.rows]
        for variant, got in zip(job.params["variants"], result.variants, strict=True):
            hyp = hyp_of(study, variant)
            ref = BidirectionalReference(
                study.model.module, plan.sites, state.data, job.params, hyp
            )
            logits = torch.stack([ref.root_logits(k) for k in variant["roots"]])
            want = metric_by_hand("loss", logits, positions, targets)
            assert got == pytest.approx(want, abs=1e-5), variant["label"]
            checked += 1
    for job in main.jobs:  # the hypothesis and the random baseline only
        heads = [n for n in job.params["nodes"] if plan_site(job, n) == "L0.H0"]
        assert {n[2][0] for n in heads} == set(range(T))  # L1.H0 reads all of L0.H0's row
        for _, row, need, (edge,) in heads:  # L0.H0 at p reads the token at p + 2 (the future)
            if need[0] + 2 >= T:
                continue
            src = dict(edge[2]).get(need[0] + 2, edge[1])
            tokens = state.data.tokens
            assert src != row and tokens[src][need[0] + 2] == tokens[row][need[0] + 2]
    assert checked >= 4


def plan_site(job, node) -> str:
    return job.params["sites"][node[0]]


def test_model_mixing_positions_outside_attention_is_refused(tmp_path):
    with pytest.raises(SpecError, match=r"experiments\.0.*positions mix outside attention"):
        api.compile_file(write_study(tmp_path, factory="query_shift"))


def test_probe_is_cached_per_model_identity(tmp_path):
    study, _ = api.compile_file(write_study(tmp_path, samples=2))
    first = attention_pattern(study.model, study.dims)
    assert first is study.attention() and first.kind == "bidirectional"
