"""DESIGN's correctness invariants for the engine: no silent no-ops, order independence, no
aliasing, hooks gone after errors, self-patch is identity, residual identities, mis-maps caught."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mi_spec.errors import ExecutionError, ResolveError
from mi_spec.execute.engine import Engine, Read, Write
from mi_spec.execute.site_check import check_sites
from mi_spec.sites.adapter import SiteBinding, adapter_for, bind_site
from mi_spec.zoo import attn_only


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=40)).eval()


@pytest.fixture(params=["gpt2", "toy"])
def setup(request):
    model = _gpt2() if request.param == "gpt2" else attn_only(d_model=32, d_head=8, d_vocab=40)
    ids = torch.randint(0, 40, (3, 9), generator=torch.Generator().manual_seed(0))
    engine = Engine(model, ids[:1])
    adapter = adapter_for(model)
    return model, engine, ids, torch.ones_like(ids), lambda s: bind_site(adapter, model, s)


def test_every_vocabulary_site_passes_the_contract(setup):
    model, engine, ids, mask, bind = setup
    adapter = adapter_for(model)
    sites = [bind(s) for s in adapter.vocabulary(model)]
    check_sites(engine, sites, ids, mask, bind=bind, n_layers=adapter.dims(model).n_layers)


def test_declaration_order_does_not_change_results(setup):
    _, engine, ids, mask, bind = setup
    a, b = bind("L1.H0"), bind("L0.resid_post")
    va, vb = torch.randn(3, 9, 8), torch.randn(3, 9, 32)
    w1 = [Write(a, slice(None), None, va), Write(b, slice(None), None, vb)]
    l1, _ = engine.run(ids, mask, writes=w1)
    l2, _ = engine.run(ids, mask, writes=w1[::-1])
    assert torch.equal(l1, l2)


def test_reads_are_not_aliased_by_later_writes(setup):
    _, engine, ids, mask, bind = setup
    site = bind("L0.resid_post")
    _, got = engine.run(ids, mask, reads=[Read("x", site, None)])
    before = got["x"].clone()
    engine.run(ids, mask, writes=[Write(site, slice(None), None, torch.zeros(()))])
    assert torch.equal(got["x"], before)
    _, both = engine.run(
        ids,
        mask,
        reads=[Read("x", site, None)],
        writes=[Write(bind("L0.H1"), slice(None), None, torch.zeros(()))],
    )
    assert torch.equal(both["x"], before) is False  # read after an upstream write sees it


def test_hooks_are_gone_after_a_failing_step(setup):
    model, engine, ids, mask, bind = setup
    site = bind("L1.resid_post")
    bad = Write(site, slice(None), None, torch.zeros(5, 5, 5))  # wrong shape: fails mid-pass
    with pytest.raises(ExecutionError, match="L1.resid_post"):
        engine.run(ids, mask, writes=[bad])
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    clean = model(ids)
    clean = clean.logits if hasattr(clean, "logits") else clean
    again, _ = engine.run(ids, mask)
    assert torch.allclose(again, clean, atol=1e-6)


def test_site_never_reached_or_run_twice_is_an_error():
    from reference.models import quirky

    model = quirky()
    engine = Engine(model, torch.zeros(1, 4, dtype=torch.long))
    never = SiteBinding(name="path:unused", module="unused", io="output")
    twice = SiteBinding(name="path:shared", module="shared", io="output")
    with pytest.raises(ResolveError, match="never runs"):
        engine.check_binding(never)
    with pytest.raises(ResolveError, match="runs 2 times"):
        engine.check_binding(twice)


def test_mis_mapped_adapter_is_caught_by_name():
    model = _gpt2()
    adapter = adapter_for(model)
    wrong = dataclasses.replace(
        adapter, table={**adapter.table, "resid_mid": adapter.table["resid_pre"]}
    )
    ids = torch.randint(0, 40, (2, 6))
    engine = Engine(model, ids[:1])
    with pytest.raises(ResolveError, match=r"L0.resid_mid != L0.resid_pre \+ L0.attn_out"):
        check_sites(
            engine,
            [],
            ids,
            torch.ones_like(ids),
            bind=lambda s: bind_site(wrong, model, s),
            n_layers=2,
        )


def test_zero_ablating_a_site_that_writes_nothing_has_zero_effect():
    """A head whose output projection columns are zero writes nothing: ablating it is exact 0."""
    model = attn_only(d_model=32, d_head=8, d_vocab=40)
    with torch.no_grad():
        model.blocks[0].attn.o_proj.weight[:, 8:16] = 0
    ids = torch.randint(0, 40, (2, 7))
    engine = Engine(model, ids[:1])
    site = bind_site(adapter_for(model), model, "L0.H1")
    clean, _ = engine.run(ids, torch.ones_like(ids))
    ablated, _ = engine.run(
        ids, torch.ones_like(ids), writes=[Write(site, slice(None), None, torch.zeros(()))]
    )
    assert torch.equal(clean, ablated)


def test_residual_site_shared_with_a_skip_must_be_written_in_place():
    """GPT-2's ``ln_2`` input is also the MLP's skip: replacing only ln_2's argument would patch
    half of ``resid_mid``. The adapter writes it in place; the contract check catches a mapping
    that does not."""
    model = _gpt2()
    ids = torch.randint(0, 40, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    engine = Engine(model, ids[:1])
    site = bind_site(adapter_for(model), model, "L0.resid_mid")
    assert site.in_place
    check_sites(engine, [site], ids, mask)
    # patched everywhere with row 0's values, row 1 computes row 0's logits
    clean, got = engine.run(ids, mask, reads=[Read("x", site, None)])
    value = got["x"][[0, 0, 0]]
    patched, _ = engine.run(ids, mask, writes=[Write(site, slice(None), None, value)])
    assert torch.allclose(patched[1], clean[0], atol=1e-5)
    half = site.model_copy(update={"in_place": False})
    with pytest.raises(ResolveError, match="did not carry it forward"):
        check_sites(engine, [half], ids, mask)
