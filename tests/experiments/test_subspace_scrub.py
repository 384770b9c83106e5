"""Causal scrubbing with residual-point and subspace nodes: the batched engine against the slow
hook-based reference, and an exact planted truth (the hand-built induction model, whose residual
stream holds the token and the previous token in known one-hot blocks)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from reference.hooks import metric_by_hand
from reference.models import TINY_MODELS as MODELS
from reference.scrub import Reference, hyp_of

from mi_spec import api
from mi_spec.errors import SpecError
from mi_spec.execute.ops import op_for
from mi_spec.execute.worker import loaded_for
from mi_spec.tracking.base import InMemoryTracker

ROOT = Path(__file__).resolve().parents[2]


def orthonormal(d: int, k: int, seed: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))
    return q.float().numpy()


def write_study(tmp_path: Path, model: str, unnamed: str) -> Path:
    rng = random.Random(5)
    with open(tmp_path / "rows.jsonl", "w") as f:
        for _ in range(48):
            f.write(json.dumps({"tokens": [rng.randrange(40) for _ in range(8)]}) + "\n")
    np.save(tmp_path / "basis.npy", orthonormal(32, 8, 0))
    (tmp_path / "h.yaml").write_text(f"""
name: sub-{model}
model:
  {MODELS[model]}
data:
  path: rows.jsonl
  positions: {{tail: {{start: 4, stop: 7}}}}
metric: {{kind: loss, at: tail}}
subspaces:
  sub: {{basis: basis.npy, features: [0, 1, 2, 3]}}
  other: {{basis: basis.npy, features: [4, 5, 6, 7]}}
variables:
  tp: {{value: "tokens[pos] % 2", per_position: true}}
  pa: {{value: "tp[pos - 1] if pos > 0 else 0", per_position: true}}
  r: {{value: "pa[pos] + tp[pos]", per_position: true}}
  rr: {{value: "tp[1]"}}
  q: {{value: "r[pos]", per_position: true}}
  k: {{value: "r[pos] + rr", per_position: true}}
  o: {{value: "q[pos] + k[pos]", per_position: true}}
correspondence:
  tp: [embed]
  pa: [L0.H1]
  r: ["L1.resid_pre[sub]"]
  rr: ["L1.resid_pre[other]@tail"]
  q: ["L1.H2:q"]
  k: ["L1.H2:k"]
  o: [L1.H2]
max_batch_rows: 64
experiments:
  - kind: causal_scrubbing
    samples: 5
    unnamed: {unnamed}
    controls: {{n_random: 1, drop_one: true, min_agreeing: 2}}
""")
    return tmp_path / "h.yaml"


@pytest.mark.parametrize("model,unnamed", [("toy", "independent"), ("gpt2", "joint")])
def test_residual_cut_and_subspace_nodes_equal_recursive_reference(tmp_path, model, unnamed):
    study, plan = api.compile_file(write_study(tmp_path, model, unnamed))
    basis = torch.from_numpy(np.load(tmp_path / "basis.npy"))
    projectors = {
        "L1.resid_pre[sub]": basis[:, :4] @ basis[:, :4].T,
        "L1.resid_pre[other]": basis[:, 4:] @ basis[:, 4:].T,
    }
    state = loaded_for(plan, model=study.model)
    spaced = 0
    for job in plan.jobs:
        result = op_for(job.op)(job, plan, state.engine, state.data)
        positions = [[4, 5, 6]] * len(job.rows)
        targets = [[state.data.tokens[r][p + 1] for p in (4, 5, 6)] for r in job.rows]
        spaced += sum(len(e) > 3 for n in job.params["nodes"] for e in n[3])
        for variant, got in zip(job.params["variants"], result.variants, strict=True):
            hyp = hyp_of(study, variant)
            hyp.projectors = projectors
            ref = Reference(study.model.module, plan.sites, state.data, job.params, hyp)
            logits = torch.stack([ref.root_logits(k) for k in variant["roots"]])
            want = metric_by_hand("loss", logits, positions, targets)
            assert got == pytest.approx(want, abs=1e-5), variant["label"]
    assert spaced > 0  # subspace overrides were exercised


HANDBUILT = """
name: handbuilt-subspace-scrub
model:
  factory: mi_spec.zoo.handbuilt:induction_handbuilt
  kwargs: {d_vocab: 12, n_ctx: 16}
data:
  generator: mi_spec.zoo.tasks:repeated_tokens
  params: {n: 400, seq_len: 15, seed: 1, d_vocab: 12}
  positions:
    repeat: {start: 8, stop: 14}
metric: {kind: loss, at: repeat}
subspaces:
  tok: {basis: blocks.npy, features: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]}
  prev: {basis: blocks.npy, features: [12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23]}
  junk: {basis: blocks.npy, features: [24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35]}
variables:
  tok:    {value: "tokens[pos]", per_position: true}
  prev:   {value: "tok[pos - 1] if pos > 0 else -1", per_position: true}
  ind_q:  {value: "tok[pos]", per_position: true}
  ind_k:  {value: "prev[pos]", per_position: true}
  ind_v:  {value: "tok[pos]", per_position: true}
  copied:
    fn: mi_spec.zoo.handbuilt:induction_target
    parents: [ind_q, ind_k, ind_v]
    per_position: true
correspondence:
  tok: [embed]
  prev: [L0.H0]
  ind_q: ["L1.resid_pre[tok]"]
  ind_k: ["L1.resid_pre[KSPACE]"]
  copied: [L1.H0]
max_batch_rows: 1024
experiments:
  - kind: causal_scrubbing
    samples: 32
    controls: {n_random: 2, drop_one: true, min_agreeing: 10}
"""


def handbuilt_blocks(tmp_path: Path) -> None:
    """One-hot columns of the hand-built model's TOK, PREV and JUNK blocks (V=12, T=16)."""
    v, t = 12, 16
    eye = np.eye(4 * v + t, dtype=np.float32)
    cols = list(range(v)) + list(range(v + t, 2 * v + t)) + list(range(3 * v + t, 4 * v + t))
    np.save(tmp_path / "blocks.npy", eye[:, cols])


def scrub_handbuilt(tmp_path: Path, kspace: str) -> dict[str, float]:
    handbuilt_blocks(tmp_path)
    path = tmp_path / f"{kspace}.yaml"
    path.write_text(HANDBUILT.replace("KSPACE", kspace))
    result = api.run(path, InMemoryTracker(), cache_dir=None, runner="synchronous")
    return result.reports[0].metrics


def test_planted_truth_token_and_previous_token_subspaces_recover_everything(tmp_path):
    """Through the residual stream after layer 0, only the TOK block (read by the induction
    head's query and value) and the PREV block (read by its key) need their values: everything
    else there (position, junk) is resampled, and the model still does all it did."""
    true = scrub_handbuilt(tmp_path, "prev")
    assert true["scrub.loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    wrong = scrub_handbuilt(tmp_path, "junk")  # the key's information claimed in the junk block
    assert wrong["scrub.loss_recovered"] < 0.5


def test_two_nodes_at_one_residual_point_and_bad_subspace_sites_are_refused(tmp_path):
    handbuilt_blocks(tmp_path)
    text = HANDBUILT.replace("KSPACE", "prev")
    bad = text.replace('ind_q: ["L1.resid_pre[tok]"]', 'ind_q: ["L0.resid_post[tok]"]')
    (tmp_path / "a.yaml").write_text(bad)
    with pytest.raises(SpecError, match="same residual point"):
        api.compile_file(tmp_path / "a.yaml")
    bad = text.replace('ind_q: ["L1.resid_pre[tok]"]', 'ind_q: ["L1.resid_pre[nope]"]')
    (tmp_path / "b.yaml").write_text(bad)
    with pytest.raises(SpecError, match="unknown subspace 'nope'; subspaces: junk, prev, tok"):
        api.compile_file(tmp_path / "b.yaml")
    bad = text.replace('ind_q: ["L1.resid_pre[tok]"]', 'ind_q: ["L1.H0[tok]"]')
    (tmp_path / "c.yaml").write_text(bad)
    with pytest.raises(SpecError, match="subspace 'tok' is 64 wide but L1.H0 has 16 columns"):
        api.compile_file(tmp_path / "c.yaml")
