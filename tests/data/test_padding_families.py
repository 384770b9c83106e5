"""Padding on GPT-2, GPT-NeoX and Llama configs (absolute positions and rotary ones).

Rows of different lengths, patched from counterfactuals of other lengths aligned by role: batched
results with left and with right padding equal plain hooks that run each row alone (no padding).
And the way nnsight's left-padding bug was found: one added pad token changes nothing.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from reference.hooks import capture, metric_by_hand, patched_logits
from transformers import AutoConfig, AutoModelForCausalLM

from mi_spec.api import compile_file
from mi_spec.execute.engine import Engine, Read, Write
from mi_spec.execute.ops import op_for
from mi_spec.execute.worker import loaded_for
from mi_spec.sites.adapter import adapter_for, bind_site

VOCAB = 50
SIZES = (
    "hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 4, intermediate_size: 64, "
    f"max_position_embeddings: 64, initializer_range: 0.2, vocab_size: {VOCAB}"
)
CONFIGS = {
    "gpt2": f"{{model_type: gpt2, n_layer: 2, n_embd: 32, n_head: 4, vocab_size: {VOCAB}, "
    "n_positions: 64}",
    "neox": f"{{model_type: gpt_neox, {SIZES}}}",
    "llama": f"{{model_type: llama, num_key_value_heads: 2, {SIZES}}}",
}
SITES = {
    "gpt2": ["L0.H1", "L1.H2:q", "L0.resid_post", "L1.mlp_out"],
    "neox": ["L0.H1", "L1.H2:q", "L0.resid_post", "L1.mlp_out", "L0.H3:k"],
    "llama": ["L0.H1", "L1.H2:q", "L0.resid_mid", "L1.mlp_out", "L1.KV0:k"],
}


def write_rows(path, n: int = 9, seed: int = 5) -> None:
    """Rows of 4-12 tokens, each with a counterfactual of another length and role ``X`` in both."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            n_base = 4 + (i * 5) % 9
            n_cf = n_base + rng.choice([-2, -1, 1, 3]) if n_base > 4 else n_base + 2
            f.write(
                json.dumps(
                    {
                        "tokens": [rng.randrange(VOCAB) for _ in range(n_base)],
                        "cf": [rng.randrange(VOCAB) for _ in range(n_cf)],
                        "x": rng.randrange(n_base - 1),
                        "cf_x": rng.randrange(n_cf - 1),
                        "t": rng.randrange(VOCAB),
                        "w": rng.randrange(VOCAB),
                    }
                )
                + "\n"
            )


def study(tmp_path, arch: str, padding: str) -> str:
    write_rows(tmp_path / "rows.jsonl")
    path = tmp_path / f"{arch}-{padding}.yaml"
    path.write_text(f"""
name: pad-{arch}-{padding}
model:
  hf_config: {CONFIGS[arch]}
data:
  path: rows.jsonl
  padding_side: {padding}
  positions:
    X: {{column: x, counterfactual: cf_x}}
    end: -1
metric: {{kind: logit_diff, at: end, target: t, wrong: w}}
experiments:
  - {{kind: activation_patching, name: act, sites: {SITES[arch]}, positions: [end, X],
      source: {{column: cf}}, batch_size: 5}}
""")
    return str(path)


def per_row_reference(model, plan, data, job):
    """Each row alone (no padding), patched from its counterfactual alone, by plain hooks."""
    clean, source, variants = [], [], [[] for _ in job.variants]
    for r in job.rows:
        row = data.row(r)
        ids, cf = torch.tensor([row["tokens"]]), torch.tensor([row["cf"]])
        end, cf_end = ids.shape[1] - 1, cf.shape[1] - 1
        targets, wrong = [[row["t"]]], [[row["w"]]]
        src = capture(model, cf, torch.ones_like(cf), [plan.sites[s] for s in job.sites])
        clean += metric_by_hand(
            "logit_diff",
            patched_logits(model, ids, torch.ones_like(ids), []),
            [[end]],
            targets,
            wrong,
        )
        source += metric_by_hand(
            "logit_diff",
            patched_logits(model, cf, torch.ones_like(cf), []),
            [[cf_end]],
            targets,
            wrong,
        )
        base_pos, cf_pos = {"end": end, "X": row["x"]}, {"end": cf_end, "X": row["cf_x"]}
        for k, variant in enumerate(job.variants):
            (iv,) = variant.interventions
            site = plan.sites[iv.site]
            value = src[site.name][0, cf_pos[iv.pos], site.start : site.stop]
            edit = (site, [[base_pos[iv.pos]]], lambda _r, _p, v=value: v)
            logits = patched_logits(model, ids, torch.ones_like(ids), [edit])
            variants[k] += metric_by_hand("logit_diff", logits, [[end]], targets, wrong)
    return clean, source, variants


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("arch", ["neox", "llama", "gpt2"])
def test_batched_equals_each_row_alone(tmp_path, arch, padding):
    study_, plan = compile_file(study(tmp_path, arch, padding))
    state = loaded_for(plan, model=study_.model)
    assert state.engine.padding_side == padding and state.engine.pass_positions
    assert len(set(state.data.lengths)) > 4
    model = study_.model.module
    checked, spread = 0, []
    for job in plan.jobs_for("act"):
        assert len(job.rows) > 1  # batched: rows of different lengths share a forward
        got = op_for(job.op)(job, plan, state.engine, state.data)
        clean, source, want = per_row_reference(model, plan, state.data, job)
        assert got.clean == pytest.approx(clean, abs=1e-5)
        assert got.source == pytest.approx(source, abs=1e-5)
        for g, w, c in zip(got.variants, want, [clean] * len(want), strict=True):
            assert g == pytest.approx(w, abs=1e-5)
            spread += [abs(a - b) for a, b in zip(w, c, strict=True)]
            checked += len(w)
    assert checked == 9 * 2 * len(SITES[arch])
    print(f"\n{arch} {padding}: {checked} patched values equal per-row hooks; "
          f"max |patched - clean| {max(spread):.3f}")  # fmt: skip
    assert max(spread) > 1e-2  # the patches do something the comparison can see


def tiny(arch: str) -> torch.nn.Module:
    import yaml

    params = yaml.safe_load(CONFIGS[arch])
    config = AutoConfig.for_model(params.pop("model_type"), **params)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("arch", ["neox", "llama", "gpt2"])
def test_one_added_pad_token_changes_nothing(arch, padding):
    """The same rows with and without one pad token: logits, reads and patched logits agree."""
    model = tiny(arch)
    site = bind_site(adapter_for(model), model, SITES[arch][0])
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (3, 8), generator=g)
    mask = torch.ones_like(ids)
    pos = torch.tensor([[1, 7], [0, 5], [3, 6]])
    engine = Engine(model, ids[:1], padding_side=padding)
    value = torch.randn(3, 2, site.stop - site.start, generator=g)
    padded_ids = torch.cat([ids, torch.full((3, 1), 7)], 1)  # callers pass right-padded batches
    padded_mask = torch.cat([mask, torch.zeros(3, 1, dtype=mask.dtype)], 1)
    outs = []
    for i, m in ((ids, mask), (padded_ids, padded_mask)):
        logits, reads = engine.run(i, m, reads=[Read("r", site, pos), Read("all", site, None)])
        patched, _ = engine.run(i, m, writes=[Write(site, slice(None), pos, value)])
        outs.append((logits[:, :8], reads["r"], reads["all"][:, :8], patched[:, :8]))
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    alone = patched_logits(model, ids, mask, [])
    torch.testing.assert_close(outs[1][0], alone, atol=1e-5, rtol=0)
    assert (outs[0][3] - outs[0][0]).abs().max() > 1e-3  # the write changed the logits
