"""Site names: parsing, TransformerLens aliases, wildcards, binding on both adapters."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mi_spec.errors import ResolveError
from mi_spec.sites.adapter import adapter_for, bind_site
from mi_spec.sites.vocabulary import (
    SiteSyntaxError,
    expand_patterns,
    parse_site,
    split_position,
)
from mi_spec.zoo import attn_only


@pytest.mark.parametrize(
    "text, canonical",
    [
        ("L1.H3", "L1.H3"),
        ("L1.H3:q", "L1.H3:q"),
        ("L0.resid_post", "L0.resid_post"),
        ("blocks.2.hook_resid_pre", "L2.resid_pre"),
        ("blocks.0.hook_mlp_out", "L0.mlp_out"),
        ("hook_embed", "embed"),
        ("path:transformer.h.0.ln_1", "path:transformer.h.0.ln_1"),
        ("path:transformer.h.0.ln_1.input", "path:transformer.h.0.ln_1.input"),
    ],
)
def test_parse_canonical(text, canonical):
    assert parse_site(text).name == canonical


@pytest.mark.parametrize("bad", ["L1.H3:z", "L1.resid", "layer1", "path:", "L.H1"])
def test_parse_rejects(bad):
    with pytest.raises(SiteSyntaxError):
        parse_site(bad)


@given(st.integers(0, 99), st.integers(0, 99), st.sampled_from(["", ":q", ":k", ":v"]))
def test_parse_roundtrip(layer, head, part):
    name = f"L{layer}.H{head}{part}"
    assert parse_site(parse_site(name).name).name == name


def test_split_position():
    assert split_position("L1.H2@last") == ("L1.H2", "last")
    assert split_position("L1.H2@-1") == ("L1.H2", -1)
    assert split_position("embed") == ("embed", None)


def test_expand_patterns_within_segments():
    vocab = ["L0.H0", "L0.H1", "L0.H0:q", "L1.H0", "L1.resid_pre"]
    assert expand_patterns(["L*.H*"], vocab) == ["L0.H0", "L0.H1", "L1.H0"]
    assert expand_patterns(["L*.H0:*", "L1.*"], vocab) == ["L0.H0:q", "L1.H0", "L1.resid_pre"]
    with pytest.raises(SiteSyntaxError):
        expand_patterns(["L9.*"], vocab)


def test_bind_head_columns_toy_and_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    toy = attn_only(d_model=32, d_head=8)
    a = adapter_for(toy)
    b = bind_site(a, toy, "L1.H2:k")
    assert (b.module, b.io, b.start, b.stop) == ("blocks.1.attn.k_proj", "output", 16, 24)
    gpt = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=40))
    g = adapter_for(gpt)
    v = bind_site(g, gpt, "L0.H1:v")
    assert (v.module, v.start, v.stop) == ("transformer.h.0.attn.c_attn", 72, 80)
    z = bind_site(g, gpt, "L0.H3")
    assert (z.module, z.io, z.start, z.stop) == ("transformer.h.0.attn.c_proj", "input", 24, 32)


def test_bind_errors_name_valid_sites():
    toy = attn_only(d_model=32, d_head=8)
    a = adapter_for(toy)
    with pytest.raises(ResolveError, match="layers 0..1"):
        bind_site(a, toy, "L5.resid_pre")
    with pytest.raises(ResolveError, match="no 'mlp_out' sites"):
        bind_site(a, toy, "L0.mlp_out")
    with pytest.raises(ResolveError, match="close: blocks.0.attn"):
        bind_site(a, toy, "path:blocks.0.atn")
