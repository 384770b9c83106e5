"""Passes only where needed: ``Engine.run(logits=positions)`` unembeds the scored positions alone
and equals the full logits there (right and left padding, and a model without a known unembedding,
which picks after a full unembedding); ``logits=False`` stops after the last site and reads the
same values; and the ops feed the unembedding only the metric's positions."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import write_rows
from reference.models import TINY_MODELS

from mi_spec.api import compile_file
from mi_spec.execute.engine import Engine, Read, Write
from mi_spec.execute.ops import op_for
from mi_spec.execute.worker import loaded_for
from mi_spec.sites.adapter import SiteBinding


@pytest.fixture(scope="module")
def gpt2():
    cfg = transformers.GPT2Config(
        n_layer=3, n_embd=32, n_head=4, vocab_size=50, n_positions=16, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 50, (4, 12))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # one padded row
    return model, ids, mask


HEAD = SiteBinding(
    name="L1.H2", module="transformer.h.1.attn.c_proj", io="input", start=16, stop=24
)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("unembed", ["lm_head", None])
def test_logits_at_positions_equal_full_logits_there(gpt2, side, unembed):
    model, ids, mask = gpt2
    engine = Engine(model, ids[:1], side, unembed=unembed)
    pos = torch.tensor([[3, 5], [0, 8], [11, 2], [7, 7]])
    write = [Write(HEAD, slice(0, 2), None, torch.zeros(()))]
    full, _ = engine.run(ids, mask, writes=write)
    got, _ = engine.run(ids, mask, writes=write, logits=pos)
    rows = torch.arange(4)[:, None]
    assert got.shape == (4, 2, 50)
    torch.testing.assert_close(got, full[rows, pos], rtol=1e-5, atol=1e-5)


def test_no_logits_stops_after_the_last_site_with_the_same_reads(gpt2):
    model, ids, mask = gpt2
    engine = Engine(model, ids[:1], unembed="lm_head")
    ran: list[str] = []
    hooks = [
        model.transformer.h[2].register_forward_hook(lambda *_: ran.append("h2")),
        model.lm_head.register_forward_hook(lambda *_: ran.append("lm_head")),
    ]
    try:
        full, want = engine.run(ids, mask, reads=[Read("z", HEAD, None)])
        assert ran == ["h2", "lm_head"] and full.shape == (4, 12, 50)
        ran.clear()
        none, got = engine.run(ids, mask, reads=[Read("z", HEAD, None)], logits=False)
    finally:
        for h in hooks:
            h.remove()
    assert none is None and ran == []  # neither the last block nor the unembedding ran
    torch.testing.assert_close(got["z"], want["z"], rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["patching", "paths", "lens", "attribution"])
def test_ops_unembed_only_the_scored_positions(tmp_path, kind):
    write_rows(tmp_path / "rows.jsonl", n=6, length=10, seed=3)
    experiment = {
        "patching": '{kind: activation_patching, sites: ["L*.H*"], positions: [6]}',
        "paths": '{kind: path_patching, senders: ["L0.H*"], receivers: ["L1.H0:q"], '
        "positions: [6]}",
        "lens": "{kind: logit_lens}",
        "attribution": '{kind: attribution_patching, sites: ["L*.H*"], positions: [6]}',
    }[kind]
    (tmp_path / "h.yaml").write_text(f"""
name: scored
model:
  {TINY_MODELS["gpt2"]}
data: {{path: rows.jsonl, positions: {{two: {{start: 6, stop: 8}}}}}}
metric: {{kind: loss, at: two}}
experiments:
  - {experiment}
""")
    study, plan = compile_file(tmp_path / "h.yaml")
    state = loaded_for(plan, model=study.model)
    widths: list[int] = []
    head = state.engine.model.lm_head
    hook = head.register_forward_hook(lambda _m, _a, out: widths.append(out.shape[1]))
    try:
        results = [op_for(j.op)(j, plan, state.engine, state.data) for j in plan.jobs]
    finally:
        hook.remove()
    assert widths and set(widths) == {2}  # every pass: the 2 scored positions, never all 10
    assert all(len(r.clean) == len(j.rows) for r, j in zip(results, plan.jobs, strict=True))
