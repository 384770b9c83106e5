"""Path patching: the batched op against the textbook three-pass hook reference (toy attention-only
and GPT-2 with MLPs), identities, the induction model's known mechanism, compile errors, pass
counts and the report."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from reference.hooks import metric_by_hand
from reference.paths import path_patched_logits

from mi_spec import api
from mi_spec.errors import SpecError
from mi_spec.execute.engine import Engine
from mi_spec.execute.path_op import run_path_patch
from mi_spec.execute.run_job import run_job
from mi_spec.execute.worker import loaded_for
from mi_spec.plan.summary import summarize
from mi_spec.tracking.base import InMemoryTracker

ROOT = Path(__file__).resolve().parents[2]
INDUCTION = ROOT / "hypotheses" / "induction_paths.yaml"
MODELS = {
    "gpt2": "hf_config: {model_type: gpt2, n_layer: 3, n_embd: 32, n_head: 4, vocab_size: 40, "
    "n_positions: 32}",
    "toy": "factory: mi_spec.zoo:attn_only\n  kwargs: {n_layers: 3, n_heads: 4, d_model: 32, "
    "d_head: 8, n_ctx: 32, d_vocab: 40}",
}
EXPERIMENTS = {
    "gpt2": """
  - {kind: path_patching, name: mixed, senders: [embed, L0.H1, L0.mlp_out, L1.attn_out],
     receivers: [L2.H3:q, L2.H0:k, L2.H1:v, L1.mlp_in, logits], positions: [all, subj],
     samples: 12, batch_size: 6}
  - {kind: path_patching, name: column, senders: ["L0.H*"], receivers: [L1.H0:q, L0.H2:k, L2.mlp_in],
     positions: [subj], receiver_positions: [last, all], source: {column: cf}, samples: 6}
  - {kind: path_patching, name: joint, senders: [L0.H2, L1.mlp_out], jointly_receivers: true,
     receivers: [L2.H0:q, L2.H1:q, L2.H2:k, logits], positions: [mid], receiver_positions: [tail],
     samples: 6}
""",
    "toy": """
  - {kind: path_patching, name: heads, senders: ["L0.H*"],
     receivers: [L2.H1:q, L2.H1:k, L2.H1:v, L1.H0:k, logits], positions: [all, subj],
     samples: 12, batch_size: 6}
  - {kind: path_patching, name: logits, senders: ["L*.H*"], receivers: [logits],
     receiver_positions: [all, mid, pre], source: {column: cf}, samples: 6}
  - {kind: path_patching, name: joint, senders: [L0.H1, L1.H2], jointly_receivers: true,
     receivers: [L2.H0:q, L2.H3:v], positions: [mid], samples: 6}
""",
}


def write_study(tmp_path: Path, model: str, metric: str, experiments: str, rows: int = 24) -> Path:
    rng = random.Random(2)
    with open(tmp_path / "rows.jsonl", "w") as f:
        for _ in range(rows):
            toks = [rng.randrange(40) for _ in range(10)]
            cf = [rng.randrange(40) for _ in range(10)]
            f.write(
                json.dumps({"tokens": toks, "cf": cf, "same": toks, "subj": rng.randrange(1, 9)})
            )
            f.write("\n")
    path = tmp_path / "h.yaml"
    path.write_text(f"""
name: paths-{model}
model:
  {MODELS[model]}
data:
  path: rows.jsonl
  positions: {{mid: 3, pre: -2, subj: {{column: subj}}, tail: {{start: -3, stop: -1}}}}
metric: {metric}
max_batch_rows: 20
experiments:{experiments}""")
    return path


def role_positions(role, row: dict, n: int) -> list[int] | None:
    if role is None:
        return None
    named = {"mid": [3], "pre": [n - 2], "last": [n - 1], "tail": [n - 3, n - 2]}
    return [row["subj"]] if role == "subj" else named[role]


def reference_job(model, plan, data, job, vocabulary) -> tuple[list[float], list[list[float]]]:
    """Clean and per-pair metrics by the textbook procedure: every pair's passes from scratch,
    every other head output and MLP output (not only the op's reduced set) frozen."""
    rows = list(job.rows)
    base_rows = [data.row(r) for r in rows]
    base = tuple(torch.tensor(x) for x in data.padded(rows))
    if job.source == "rows":
        src_rows = [data.row(r) for r in job.source_rows]
        source = tuple(torch.tensor(x) for x in data.padded(list(job.source_rows)))
    else:
        src_rows = [{**r, "tokens": r[job.source_column]} for r in base_rows]
        source = (torch.tensor([r["tokens"] for r in src_rows]), torch.ones_like(base[0]))
    metric = plan.metric
    m_pos = [role_positions(metric["at"], r, len(r["tokens"])) for r in base_rows]
    targets = [[r["tokens"][p + 1] for p in ps] for r, ps in zip(base_rows, m_pos, strict=True)]
    parts = [plan.sites.get(s) for s in vocabulary]
    every = [s for s, name in zip(parts, vocabulary, strict=True) if s and _part(name)]
    with torch.no_grad():
        clean = model(base[0], attention_mask=base[1])
    clean = clean.logits if hasattr(clean, "logits") else clean
    out = []
    for i, variant in enumerate(job.variants):
        iv = variant.interventions[0]
        sender = plan.sites[iv.site]
        spos = None
        if iv.pos is not None:
            spos = (
                [role_positions(iv.pos, r, len(r["tokens"])) for r in base_rows],
                [role_positions(iv.pos, r, len(r["tokens"])) for r in src_rows],
            )
        rp = job.params["receiver_pos"][i]
        rpos = None if rp is None else [role_positions(rp, r, len(r["tokens"])) for r in base_rows]
        logits = path_patched_logits(
            model,
            base,
            source,
            sender,
            spos,
            [plan.sites[r] for r in job.params["receivers"][i]],
            rpos,
            [f for f in every if f.name != sender.name],
        )
        out.append(metric_by_hand(metric["kind"], logits, m_pos, targets, clean_logits=clean))
    return metric_by_hand(metric["kind"], clean, m_pos, targets, clean_logits=clean), out


def _part(name: str) -> bool:
    """Head outputs and MLP outputs: what the textbook procedure freezes."""
    return name.endswith(".mlp_out") or (".H" in name and ":" not in name)


def bind_all(study, plan):
    """The plan with every head output and MLP output bound (for the reference's freeze set)."""
    extra = {s: study.bind(s) for s in study.vocabulary if _part(s) and s not in plan.sites}
    return plan.model_copy(update={"sites": {**plan.sites, **extra}})


def counted(engine: Engine) -> list[int]:
    """Count the engine's forward passes from now on (instance attribute shadows the method)."""
    calls = [0]
    run = engine.run

    def wrapper(*args, **kwargs):
        calls[0] += 1
        return run(*args, **kwargs)

    engine.run = wrapper  # type: ignore[method-assign]
    return calls


@pytest.mark.parametrize(("model", "metric"), [("gpt2", "loss"), ("toy", "kl")])
def test_engine_equals_textbook_reference(tmp_path, model, metric):
    path = write_study(tmp_path, model, f"{{kind: {metric}, at: tail}}", EXPERIMENTS[model])
    study, plan = api.compile_file(path)
    state = loaded_for(plan, model=study.model)
    ref_plan = bind_all(study, plan)
    calls = counted(state.engine)
    checked, passes = 0, 0
    try:
        for job in plan.jobs:
            before = calls[0]
            got = run_path_patch(job, plan, state.engine, state.data)
            assert (
                calls[0] - before == job.forward_passes(plan.max_batch_rows) == got.extra["passes"]
            )
            passes += calls[0] - before
            clean, want = reference_job(
                study.model.module, ref_plan, state.data, job, study.vocabulary
            )
            assert got.clean == pytest.approx(clean, abs=1e-5)
            for v, g, w in zip(job.variants, got.variants, want, strict=True):
                assert g == pytest.approx(w, abs=1e-5), f"{job.experiment} {v.label}"
            checked += len(job.variants)
    finally:
        del state.engine.run
    assert checked > 60
    assert f"{passes} forward passes" in summarize(plan)  # what `mi-spec plan` prints
    # the reduced freeze set: nothing before the first sender or after the last receiver
    joint = plan.jobs_for("joint")[0]
    if model == "toy":
        assert joint.params["freeze"] == [f"L1.H{h}" for h in range(4)]
        heads = plan.jobs_for("heads")[0]  # receivers up to the logits
        assert heads.params["freeze"] == [f"L{layer}.H{h}" for layer in (1, 2) for h in range(4)]
    else:
        assert joint.params["receiver_pos"] == ["tail"] * 2
        assert sorted(plan.jobs_for("mixed")[0].params["freeze"]) == sorted(  # from embed
            [f"L{layer}.H{h}" for layer in range(3) for h in range(4)]
            + [f"L{layer}.mlp_out" for layer in range(3)]
        )
        assert sorted(joint.params["freeze"]) == sorted(  # after L0.H2, before logits
            [f"L{layer}.H{h}" for layer in (1, 2) for h in range(4)]
            + [f"L{layer}.mlp_out" for layer in range(3)]
        )
        column = plan.jobs_for("column")[0]  # L0.H* into L1.H0:q and L2.mlp_in
        assert sorted(column.params["freeze"]) == sorted(
            ["L0.mlp_out", "L1.mlp_out"] + [f"L{layer}.H{h}" for layer in (1, 2) for h in range(4)]
        )


def test_packing_does_not_change_results(tmp_path):
    """Blocks straddling passes, and passes smaller than one block, give the same numbers."""
    path = write_study(tmp_path, "gpt2", "{kind: loss, at: tail}", EXPERIMENTS["gpt2"])
    study, plan = api.compile_file(path)
    state = loaded_for(plan, model=study.model)
    calls = counted(state.engine)
    try:
        for job in plan.jobs_for("mixed")[:1] + plan.jobs_for("joint"):
            want = run_path_patch(job, plan, state.engine, state.data)
            for rows in (4, 7, 200):
                small = plan.model_copy(update={"max_batch_rows": rows})
                before = calls[0]
                got = run_path_patch(job, small, state.engine, state.data)
                assert calls[0] - before == job.forward_passes(rows)
                np.testing.assert_allclose(got.variants, want.variants, atol=1e-5)
    finally:
        del state.engine.run


def test_last_layer_into_logits_is_activation_patching(tmp_path):
    """Nothing follows the last layer's heads in an attention-only model: path patching one into
    the logits is activation patching it."""
    experiments = """
  - {kind: path_patching, name: paths, senders: ["L2.H*"], receivers: [logits],
     positions: [all, subj], samples: 8}
  - {kind: activation_patching, name: patch, sites: ["L2.H*"], positions: [all, subj], samples: 8}
"""
    path = write_study(tmp_path, "toy", "{kind: loss, at: tail}", experiments)
    study, plan = api.compile_file(path)
    state = loaded_for(plan, model=study.model)
    paths = run_path_patch(plan.jobs_for("paths")[0], plan, state.engine, state.data)
    patch = run_job(plan.jobs_for("patch")[0], plan, state.engine, state.data)
    assert paths.clean == pytest.approx(patch.clean, abs=1e-6)
    assert paths.source == pytest.approx(patch.source, abs=1e-6)
    np.testing.assert_allclose(paths.variants, patch.variants, atol=1e-5)
    assert np.ptp(np.asarray(paths.variants)) > 0.1  # the heads do matter


@pytest.mark.parametrize(
    ("model", "senders", "receivers"),
    [
        ("toy", '["L*.H*", embed]', "[logits, L2.H0:k, L1.H3:v]"),
        ("gpt2", '[embed, "L*.H*", L0.mlp_out, L1.attn_out]', "[logits, L2.mlp_in, L2.H1:q]"),
    ],
)
def test_source_equal_to_base_changes_nothing(tmp_path, model, senders, receivers):
    experiments = f"""
  - {{kind: path_patching, senders: {senders}, receivers: {receivers}, positions: [all, mid],
     receiver_positions: [all, tail], source: {{column: same}}, samples: 8}}
"""
    study, plan = api.compile_file(
        write_study(tmp_path, model, "{kind: kl, at: tail}", experiments)
    )
    state = loaded_for(plan, model=study.model)
    got = run_path_patch(plan.jobs[0], plan, state.engine, state.data)
    assert got.source == got.clean
    assert len(got.variants) > 60
    assert all(v == got.clean for v in got.variants)  # exactly: every write puts back its value


@pytest.mark.parametrize(
    ("experiment", "message"),
    [
        ("senders: [L1.H0], receivers: [L0.H2:k]", "L1.H0 -> L0.H2:k"),
        ("senders: [L1.H0, L1.mlp_out], receivers: [L1.H2:q, L1.mlp_in]", "L1.H0 -> L1.H2:q"),
        ("senders: [L1.mlp_out], receivers: [L1.mlp_in]", "L1.mlp_out -> L1.mlp_in"),
        ("senders: [L0.resid_pre], receivers: [logits]", "sender 'L0.resid_pre'"),
        ("senders: [L0.H0], receivers: [L1.mlp_out]", "receiver 'L1.mlp_out'"),
        ("senders: [L0.H9], receivers: [logits]", "head 9 out of range"),
        ("senders: ['L2.H*'], receivers: ['L1.H*:q']", "no receiver is downstream"),
    ],
)
def test_compile_errors(tmp_path, experiment, message):
    exp = f"\n  - {{kind: path_patching, {experiment}}}\n"
    with pytest.raises(SpecError, match="experiments.0") as err:
        api.compile_file(write_study(tmp_path, "gpt2", "{kind: loss, at: tail}", exp))
    assert message in str(err.value)


def test_patterns_skip_pairs_that_are_not_downstream(tmp_path):
    exp = """
  - {kind: path_patching, senders: ["L*.H*"], receivers: [L1.H0:k, L2.mlp_in], positions: [all, mid]}
"""
    study, plan = api.compile_file(write_study(tmp_path, "gpt2", "{kind: loss, at: tail}", exp))
    labels = [v.label for v in plan.jobs[0].variants]
    assert "L0.H3@mid->L1.H0:k" in labels and "L2.H3@all->L2.mlp_in" in labels
    assert not any(x.startswith("L1.") and x.endswith("L1.H0:k") for x in labels)
    assert len(labels) == 12 * 2 + 4 * 2  # every head into mlp_in of L2; only L0 into L1.H0:k


def test_induction_paths_mechanism_end_to_end():
    """L0.H2 (previous-token head) reaches the induction head L1.H1 through its key only."""
    result = api.run(
        INDUCTION,
        InMemoryTracker(),
        overrides=["experiments.0.samples=48", "experiments.1.samples=48"],
        cache_dir=None,
        runner="synchronous",
    )
    heads, logits = result.reports
    m = heads.metrics
    assert heads.params["top_path"] == "L0.H2@all->L1.H1:k"
    assert heads.params["n_pairs"] == 24 and heads.params["n_examples"] == 48

    def norm(sender, pos, part):
        return m[f"path.effect_norm.{sender}.{pos}.to.L1.H1.{part}"]

    for pos in ("all", "first"):
        into_k = sorted((abs(norm(f"L0.H{h}", pos, "k")), h) for h in range(4))
        assert into_k[-1][1] == 2 and into_k[-1][0] > 0.4
        assert into_k[-1][0] >= 3 * into_k[-2][0]
        assert m[f"path.effect_norm.L0.H2.{pos}.to.L1.H1.k.ci_low"] > 0.3
        for part in ("q", "v"):  # no layer-0 head matters into the query or the value
            assert max(abs(norm(f"L0.H{h}", pos, part)) for h in range(4)) < 0.01
            assert abs(norm("L0.H2", pos, part)) < 0.01 * norm("L0.H2", pos, "k")
    assert m["path.metric.source"] > 5 > 0.1 > m["path.metric.clean"]
    assert heads.headline["path.max_effect"] == pytest.approx(norm("L0.H2", "all", "k"))
    table = heads.tables["paths.csv"]
    assert len(table) == 24
    assert set(table[0]) >= {"sender", "sender_position", "receiver", "receiver_position"}
    assert {"loss", "effect", "effect_ci_low", "effect_norm", "effect_norm_ci_high"} <= set(
        table[0]
    )
    for report in (heads, logits):
        png = report.figures["path_heatmap.png"]
        assert png.startswith(b"\x89PNG") and len(png) > 5000
    assert logits.params["top_path"] == "L1.H1@all->logits"
    assert logits.metrics["path.effect_norm.L1.H1.all.to.logits"] > 0.9
    others = [
        v
        for k, v in logits.metrics.items()
        if k.startswith("path.effect_norm.") and "L1.H1" not in k
    ]
    assert len(others) == 7 * 3 and max(abs(v) for v in others) < 0.05  # with CI bounds
