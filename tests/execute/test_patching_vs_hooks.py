"""Every patch, ablation and metric the engine runs equals plain-PyTorch hooks to 1e-5, on whole
sites and on subspace sites (a basis of the residual stream, a non-orthonormal basis of one head's
output, features of an SAE), whose reference is written out here: ``x + D^T (c_new - c(x))``."""

from __future__ import annotations

import json
import random

import pytest
import torch
from reference.hooks import capture, metric_by_hand, patched_logits
from reference.models import TINY_MODELS
from reference.subspaces import SUBSPACES, in_subspace, space_of, write_subspaces

from mi_spec.api import compile_file
from mi_spec.execute.run_job import run_job
from mi_spec.execute.worker import loaded_for

MODELS = TINY_MODELS
SITES = {
    "gpt2": [
        "L0.H1",
        "L1.H3:q",
        "L0.H2:k",
        "L1.H0:v",
        "L0.resid_mid",
        "L1.mlp_out",
        "embed",
        "L1.attn_out",
        "L1.resid_post",
        "path:transformer.h.1.ln_1",
        "L1.resid_post[dirs]",
        "L0.H1[hd]",
        "L1.resid_post[sae]",
    ],
    "toy": [
        "L0.H1",
        "L1.H3:q",
        "L0.H2:k",
        "L1.H0:v",
        "L1.attn_out",
        "L0.resid_pre",
        "embed",
        "L1.resid_post",
        "L0.resid_pre[dirs]",
        "L0.H1[hd]",
        "L1.resid_post[sae:4]",
    ],
}


def write_study(tmp_path, model: str, metric: str, lengths: list[int]) -> str:
    rng = random.Random(1)
    with open(tmp_path / "rows.jsonl", "w") as f:
        for n in lengths:
            toks = [rng.randrange(40) for _ in range(n)]
            cf = [rng.randrange(40) for _ in range(n)]
            f.write(
                json.dumps(
                    {
                        "tokens": toks,
                        "cf": cf,
                        "subj": rng.randrange(1, n - 1),
                        "tgt": rng.randrange(40),
                        "wrong": rng.randrange(40),
                    }
                )
                + "\n"
            )
    sites = json.dumps(SITES[model])
    # every position from a resampled row of another length is a validate error (no silent shift)
    resample_pos = "[all, mid, subj, tail]" if len(set(lengths)) == 1 else "[mid, subj, tail]"
    metric_line = {
        "loss": "{kind: loss, at: mid}",
        "kl": "{kind: kl, at: mid}",
        "logit_diff": "{kind: logit_diff, at: last, target: tgt, wrong: wrong}",
        "prob": "{kind: prob, at: subj, target: tgt}",
        "accuracy": "{kind: accuracy, at: mid}",
    }[metric]
    (tmp_path / "h.yaml").write_text(f"""{SUBSPACES}
name: ref-{model}
model:
  {MODELS[model]}
data:
  path: rows.jsonl
  positions: {{mid: 3, subj: {{column: subj}}, tail: {{start: -3, stop: -1}}}}
metric: {metric_line}
max_batch_rows: 20
experiments:
  - {{kind: activation_patching, name: resample, sites: {sites}, positions: {resample_pos}, batch_size: 6}}
  - {{kind: activation_patching, name: column, sites: {sites}, positions: [last, subj], source: {{column: cf}}, batch_size: 5}}
  - {{kind: ablation, name: zero, sites: {sites}, method: zero, positions: [all, tail], batch_size: 7}}
  - {{kind: ablation, name: mean, sites: {sites}, method: mean, positions: [all, subj], batch_size: 8, mean_samples: 9}}
  - {{kind: ablation, name: joint, sites: {sites}, method: resample, jointly: true, positions: [mid]}}
""")
    return str(tmp_path / "h.yaml")


def role_positions(role, row: dict, n: int):
    if role is None:
        return None
    return {"mid": [3], "last": [n - 1], "subj": [row["subj"]], "tail": [n - 3, n - 2]}[role]


def reference_job(model, plan, data, job, metric, spaces):
    """Per-variant per-row metric values computed with hooks, one variant at a time."""
    rows = list(job.rows)
    ids, mask = (torch.tensor(x) for x in data.padded(rows))
    base_rows = [data.row(r) for r in rows]
    pos_of = {
        "mid": lambda r: [3],
        "last": lambda r: [len(r["tokens"]) - 1],
        "subj": lambda r: [r["subj"]],
    }
    m_pos = [pos_of[metric["at"]](r) for r in base_rows]
    if metric["target"]:
        targets = [[r[metric["target"]]] for r in base_rows]
    else:
        targets = [[r["tokens"][p + 1] for p in ps] for r, ps in zip(base_rows, m_pos, strict=True)]
    wrong = [[r[metric["wrong"]]] for r in base_rows] if metric["wrong"] else None
    sites = [plan.sites[s] for s in job.sites]
    if job.source == "rows":
        src_rows = [data.row(r) for r in job.source_rows]
        s_ids, s_mask = (torch.tensor(x) for x in data.padded(list(job.source_rows)))
        src_acts = capture(model, s_ids, s_mask, sites)
    elif job.source == "column":
        src_rows = [{**r, "tokens": r["cf"]} for r in base_rows]
        width = max(len(r["cf"]) for r in base_rows)
        s_ids = torch.tensor([r["cf"] + [0] * (width - len(r["cf"])) for r in base_rows])
        s_mask = torch.tensor(
            [[1] * len(r["cf"]) + [0] * (width - len(r["cf"])) for r in base_rows]
        )
        src_acts = capture(model, s_ids, s_mask, sites)
    elif job.source == "mean":
        ref_rows = [data.row(r) for r in job.source_rows]
        r_ids, r_mask = (torch.tensor(x) for x in data.padded(list(job.source_rows)))
        ref_acts = capture(model, r_ids, r_mask, sites)
    clean = patched_logits(model, ids, mask, [])
    out = []
    for variant in job.variants:
        edits = []
        for iv in variant.interventions:
            site = plan.sites[iv.site]
            a, b = site.start, site.stop
            base_pos = [role_positions(iv.pos, r, len(r["tokens"])) for r in base_rows]

            def value_fn(row, p, iv=iv, site=site, a=a, b=b, base_pos=base_pos):
                if job.source == "zero":
                    return 0.0
                j = None if base_pos[row] is None else base_pos[row].index(p)
                if job.source == "mean":
                    vals = []
                    for k, rr in enumerate(ref_rows):
                        rp = role_positions(iv.pos, rr, len(rr["tokens"]))
                        vals.append(ref_acts[site.name][k, p if rp is None else rp[j], a:b])
                    if site.subspace is not None:  # the mean of the coordinates
                        coords = space_of(spaces, site)[0]
                        return torch.stack([coords(v) for v in vals]).double().mean(0).float()
                    return torch.stack(vals).double().mean(0).float()
                sr = src_rows[row]
                sp = role_positions(iv.pos, sr, len(sr["tokens"]))
                return src_acts[site.name][row, p if sp is None else sp[j], a:b]

            if site.subspace is not None:
                value_fn = in_subspace(value_fn, *space_of(spaces, site))
            edits.append((site, base_pos if iv.pos is not None else None, value_fn))
        logits = patched_logits(model, ids, mask, edits)
        out.append(metric_by_hand(metric["kind"], logits, m_pos, targets, wrong, clean))
    return metric_by_hand(metric["kind"], clean, m_pos, targets, wrong, clean), out


@pytest.mark.parametrize("model", ["gpt2", "toy"])
@pytest.mark.parametrize("metric", ["loss", "kl", "logit_diff", "prob", "accuracy"])
def test_engine_equals_hooks(tmp_path, model, metric):
    lengths = (
        [10] * 14 if metric in ("loss", "kl") else [10, 8, 12, 9, 10, 11, 8, 12, 10, 9, 11, 12]
    )
    spaces = write_subspaces(tmp_path)
    study, plan = compile_file(write_study(tmp_path, model, metric, lengths))
    assert any("orthonormalised" in w for w in study.warnings)
    state = loaded_for(plan, model=study.model)
    checked = subspaces = 0
    for job in plan.jobs:
        if (
            job.source in ("rows",)
            and len(set(lengths)) > 1
            and any(i.pos is None for v in job.variants for i in v.interventions)
        ):
            continue  # "all" positions across different lengths is an error by design
        got = run_job(job, plan, state.engine, state.data)
        clean, want = reference_job(study.model.module, plan, state.data, job, plan.metric, spaces)
        assert got.clean == pytest.approx(clean, abs=1e-5)
        for label, g, w in zip([v.label for v in job.variants], got.variants, want, strict=True):
            assert g == pytest.approx(w, abs=1e-5), f"{job.experiment} {label}"
        checked += len(job.variants)
        subspaces += sum("[" in i.site for v in job.variants for i in v.interventions)
    assert checked > 50 and subspaces >= 15
