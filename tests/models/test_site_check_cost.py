"""Site checks cost what site_check_cost says: two passes for a whole model's sites."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from mi_spec.errors import ResolveError
from mi_spec.execute import site_check
from mi_spec.execute.engine import Engine
from mi_spec.execute.site_check import check_sites, site_check_cost
from mi_spec.sites.adapter import adapter_for, bind_site


def _setup():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=32, n_head=4, vocab_size=40)).eval()
    adapter = adapter_for(model)
    sites = [bind_site(adapter, model, s) for s in adapter.vocabulary(model)]
    ids = torch.randint(0, 40, (4, 12))
    return model, adapter, sites, ids


@pytest.mark.parametrize("max_rows", [64, 8])
def test_passes_are_counted_and_few(monkeypatch, max_rows):
    model, adapter, sites, ids = _setup()
    monkeypatch.setattr(site_check, "MAX_ROWS", max_rows)
    engine = Engine(model, ids[:1, :4])
    shapes = []
    run = engine.run
    monkeypatch.setattr(
        engine, "run", lambda i, *a, **k: shapes.append(tuple(i.shape)) or run(i, *a, **k)
    )
    check_sites(
        engine,
        sites,
        ids,
        torch.ones_like(ids),
        bind=lambda s: bind_site(adapter, model, s),
        n_layers=3,
    )
    cost = site_check_cost(sites)
    assert len(shapes) == cost.passes
    assert max(r for r, _ in shapes) == cost.rows and max(t for _, t in shapes) <= cost.tokens
    places = {(s.module, s.io) for s in sites}
    n_resid = sum(1 for s in sites if ".resid_" in s.name)
    assert n_resid == 9 and len(sites) > 60 and len(places) < len(sites) / 2
    blocks = len(places) + n_resid  # heads of one layer share a block; residual sites carry
    assert cost.rows == 2 * (1 + min(blocks, max_rows // 2 - 1))
    assert cost.passes == 1 + -(-blocks // (max_rows // 2 - 1)) < len(sites) / 4


def test_a_failing_self_patch_is_named(monkeypatch):
    """A site whose written value does not round-trip is named, after the all-sites block fails."""
    model, adapter, sites, ids = _setup()
    engine = Engine(model, ids[:1, :4])
    run = engine.run
    bad = next(s for s in sites if s.name == "L1.H2")

    def corrupt(i, mask, reads=(), writes=()):
        writes = [
            w if w.site != bad else type(w)(w.site, w.rows, w.pos, w.value + 1) for w in writes
        ]
        return run(i, mask, reads, writes)

    monkeypatch.setattr(engine, "run", corrupt)
    with pytest.raises(ResolveError, match=r"site 'L1.H2' .*writing its own clean value"):
        check_sites(engine, sites, ids, torch.ones_like(ids))
