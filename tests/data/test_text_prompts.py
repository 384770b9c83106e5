"""Real prompts: IOI-style text rows of different lengths, a text counterfactual of another
length aligned by role, left and right padding, metrics over every valid token.

Activation patching is checked against plain hooks that run each row alone (no padding at all);
path patching and attribution against the same ops run one row at a time, with either padding.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from reference.hooks import capture, metric_by_hand, patched_logits

from mi_spec.api import compile_file
from mi_spec.execute.ops import op_for
from mi_spec.execute.worker import loaded_for
from mi_spec.zoo import ioi

SITES = ["L0.H1", "L1.H2", "L0.resid_post", "L1.mlp_out"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return ioi.train_tokenizer(tmp_path_factory.mktemp("tok"))


def vocab_size(tokenizer) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True))


def ioi_study(tmp_path, tokenizer, padding: str, n: int = 10, extra: str = "") -> str:
    v = vocab_size(tokenizer)
    path = tmp_path / f"ioi-{padding}.yaml"
    path.write_text(f"""
name: ioi-{padding}
model:
  hf_config: {{model_type: gpt2, n_layer: 2, n_embd: 32, n_head: 4, vocab_size: {v}, n_positions: 40}}
data:
  generator: mi_spec.zoo.ioi:rows
  params: {{n: {n}, seed: 3}}
  text: text
  tokenizer: {tokenizer}
  padding_side: {padding}
  positions:
    S2: {{column: s2_pos, counterfactual: cf_s2_pos}}
    IO: {{column: io_pos, counterfactual: cf_io_pos}}
    end: -1
metric: {{kind: logit_diff, at: end, target: io, wrong: s}}
max_batch_rows: 16
experiments:
  - {{kind: activation_patching, name: act, sites: {SITES}, positions: [end, S2, IO], source: {{column: cf_text}}, batch_size: 4}}
  - {{kind: path_patching, name: path, senders: [L0.H1, L0.H3], receivers: [L1.H2:q, logits], positions: [end, S2], source: {{column: cf_text}}, batch_size: 4}}
  - {{kind: attribution_patching, name: attr, sites: [L0.H1, L1.H0, L0.mlp_out], positions: [end, S2], source: {{column: cf_text}}, batch_size: 4}}
{extra}""")
    return str(path)


def run_all(path: str):
    study, plan = compile_file(path)
    state = loaded_for(plan, model=study.model)
    return (
        study,
        plan,
        state,
        {job.id: op_for(job.op)(job, plan, state.engine, state.data) for job in plan.jobs},
    )


def hook_reference(model, plan, data, job):
    """Per variant, per row: the row alone (no padding), patched from its counterfactual alone."""
    clean_out, source_out, variants = [], [], [[] for _ in job.variants]
    for r in job.rows:
        row = data.row(r)
        ids = torch.tensor([row["tokens"]])
        cf = data.token_rows("cf_text", [r])[0]
        cf_ids = torch.tensor([cf])
        one = torch.ones_like(ids)
        tok = lambda name: data.token_id(name, "")  # noqa: E731
        m_pos, targets, wrong = [[len(row["tokens"]) - 1]], [[tok(row["io"])]], [[tok(row["s"])]]
        base_pos = {"end": len(row["tokens"]) - 1, "S2": row["s2_pos"], "IO": row["io_pos"]}
        cf_pos = {"end": len(cf) - 1, "S2": row["cf_s2_pos"], "IO": row["cf_io_pos"]}
        sites = [plan.sites[s] for s in job.sites]
        src = capture(model, cf_ids, torch.ones_like(cf_ids), sites)
        clean = patched_logits(model, ids, one, [])
        clean_out += metric_by_hand("logit_diff", clean, m_pos, targets, wrong)
        cf_logits = patched_logits(model, cf_ids, torch.ones_like(cf_ids), [])
        source_out += metric_by_hand("logit_diff", cf_logits, [[len(cf) - 1]], targets, wrong)
        for k, variant in enumerate(job.variants):
            (iv,) = variant.interventions
            site = plan.sites[iv.site]
            value = src[site.name][0, cf_pos[iv.pos], site.start : site.stop]
            edit = (site, [[base_pos[iv.pos]]], lambda row_, p, v=value: v)
            logits = patched_logits(model, ids, one, [edit])
            variants[k] += metric_by_hand("logit_diff", logits, m_pos, targets, wrong)
    return clean_out, source_out, variants


def test_prompts_differ_in_length(tokenizer):
    rows = ioi.rows(n=10, seed=3)
    assert len({len(r["text"].split()) for r in rows}) > 2
    assert any(len(r["text"].split()) != len(r["cf_text"].split()) for r in rows)


@pytest.mark.parametrize("padding", ["right", "left"])
def test_ioi_text_study_equals_per_row_reference(tmp_path, tokenizer, padding):
    study, plan, state, results = run_all(ioi_study(tmp_path, tokenizer, padding))
    assert state.engine.padding_side == padding
    lengths = state.data.lengths
    assert len(set(lengths)) > 2
    model = study.model.module
    checked = 0
    for job in plan.jobs_for("act"):
        got = results[job.id]
        clean, source, want = hook_reference(model, plan, state.data, job)
        assert got.clean == pytest.approx(clean, abs=1e-5)
        assert got.source == pytest.approx(source, abs=1e-5)  # logged across lengths
        for g, w in zip(got.variants, want, strict=True):
            assert g == pytest.approx(w, abs=1e-5)
            checked += len(w)
    assert checked >= 10 * 12
    # path patching and attribution: each row alone (a one-row job has no padding) equals batched
    for name in ("path", "attr"):
        for job in plan.jobs_for(name):
            got = results[job.id]
            for i, r in enumerate(job.rows):
                alone = op_for(job.op)(
                    job.model_copy(update={"rows": (r,)}), plan, state.engine, state.data
                )
                assert got.clean[i] == pytest.approx(alone.clean[0], abs=1e-5)
                assert got.source[i] == pytest.approx(alone.source[0], abs=1e-5)
                if name == "path":
                    for g, a in zip(got.variants, alone.variants, strict=True):
                        assert g[i] == pytest.approx(a[0], abs=1e-5)
                else:  # gradient estimates per item (its real patches verify a per-job top-k)
                    assert got.extra["labels"] == alone.extra["labels"]
                    for g, a in zip(got.extra["estimates"], alone.extra["estimates"], strict=True):
                        assert g[i] == pytest.approx(a[0], abs=1e-5)


def test_left_equals_right_padding(tmp_path, tokenizer):
    outs = {}
    for padding in ("right", "left"):
        _, plan, _, results = run_all(ioi_study(tmp_path, tokenizer, padding))
        outs[padding] = [results[j.id] for j in plan.jobs]
    for a, b in zip(outs["right"], outs["left"], strict=True):
        assert a.clean == pytest.approx(b.clean, abs=1e-5)
        assert a.source == pytest.approx(b.source, abs=1e-5)
        for x, y in zip(a.variants, b.variants, strict=True):
            assert x == pytest.approx(y, abs=1e-5)


@pytest.mark.parametrize("padding", ["right", "left"])
def test_loss_at_all_is_the_per_row_mean(tmp_path, tokenizer, padding):
    path = ioi_study(tmp_path, tokenizer, padding)
    text = Path(path).read_text()
    old = "metric: {kind: logit_diff, at: end, target: io, wrong: s}"
    Path(path).write_text(text.replace(old, "metric: {kind: loss, at: all}"))
    study, plan, state, results = run_all(path)
    model = study.model.module
    for job in plan.jobs_for("act"):
        got = results[job.id]
        for i, r in enumerate(job.rows):
            toks = list(state.data.tokens[r])
            with torch.no_grad():
                logits = model(torch.tensor([toks])).logits[0].double()
            losses = [
                torch.logsumexp(logits[p], -1).item() - logits[p, toks[p + 1]].item()
                for p in range(len(toks) - 1)
            ]
            assert got.clean[i] == pytest.approx(sum(losses) / len(losses), abs=1e-5)
            cf = state.data.token_rows("cf_text", [r])[0]
            with torch.no_grad():
                cf_logits = model(torch.tensor([cf])).logits[0].double()
            if len(cf) == len(toks):  # scored on the base's next tokens at the same positions
                want = [toks[p + 1] for p in range(len(cf) - 1)]
            else:  # `all` over a prompt of another length: the source's own next tokens
                want = [cf[p + 1] for p in range(len(cf) - 1)]
            cf_loss = [
                torch.logsumexp(cf_logits[p], -1).item() - cf_logits[p, want[p]].item()
                for p in range(len(cf) - 1)
            ]
            assert got.source[i] == pytest.approx(sum(cf_loss) / len(cf_loss), abs=1e-5)
            assert not math.isnan(got.clean[i])
