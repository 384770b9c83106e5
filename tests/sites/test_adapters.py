"""GPT-NeoX/Pythia and Llama-family adapters, grouped-query attention, one hypothesis on three
architectures: every site against plain-PyTorch hooks or a hand-written attention reference."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from reference.hooks import capture, patched_logits
from reference.sweep import assert_report_matches, reference_sweep
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.gpt_neox import modeling_gpt_neox
from transformers.models.llama import modeling_llama

from mi_spec.api import compile_file, run
from mi_spec.errors import ResolveError, SpecError
from mi_spec.execute.engine import Engine, Read, Write
from mi_spec.execute.site_check import check_sites
from mi_spec.execute.worker import loaded_for
from mi_spec.models.identity import files_identity, hf_weight_files
from mi_spec.sites.adapter import adapter_for, bind_site
from mi_spec.sites.vocabulary import Site, SiteSyntaxError, expand_patterns, parse_site
from mi_spec.tracking.base import InMemoryTracker

ARCH = Path(__file__).resolve().parents[2] / "hypotheses" / "arch"
SIZES = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 50}
SIZES |= {"intermediate_size": 64, "max_position_embeddings": 64, "initializer_range": 0.2}
CONFIGS = {
    "neox": {"model_type": "gpt_neox"},
    "neox_sequential": {"model_type": "gpt_neox", "use_parallel_residual": False},
    "llama": {"model_type": "llama", "num_key_value_heads": 2},
    "llama_mha": {"model_type": "llama", "num_key_value_heads": 4},
    "mistral": {"model_type": "mistral", "num_key_value_heads": 2},
    "qwen2": {"model_type": "qwen2", "num_key_value_heads": 1},
}


def tiny(arch: str) -> torch.nn.Module:
    params = SIZES | CONFIGS[arch]
    config = AutoConfig.for_model(params.pop("model_type"), **params)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return model.eval()


def ids_pair(vocab: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (3, 9), generator=g), torch.randint(
        0, vocab, (3, 9), generator=g
    )


# --- 1. contracts --------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_every_vocabulary_site_passes_the_contract(arch):
    model = tiny(arch)
    adapter = adapter_for(model)
    assert adapter.name == ("gpt_neox" if arch.startswith("neox") else "llama")
    vocab = adapter.vocabulary(model)
    d = adapter.dims(model)
    assert ("L1.resid_mid" in vocab) == (arch != "neox")  # parallel residual: no resid_mid
    kv_named = any(".KV" in s for s in vocab)
    assert kv_named == d.gqa == (arch in ("llama", "mistral", "qwen2"))
    assert ("L0.H0:k" in vocab) == (not d.gqa)
    ids, _ = ids_pair()
    engine = Engine(model, ids[:1])

    def bind(s):
        return bind_site(adapter, model, s)

    check_sites(engine, [bind(s) for s in vocab], ids, torch.ones_like(ids), bind=bind, n_layers=2)


def test_parallel_residual_identity_catches_a_mis_map():
    """NeoX's promise is resid_post = resid_pre + attn_out + mlp_out: a wrong mlp_out breaks it."""
    model = tiny("neox")
    adapter = adapter_for(model)
    wrong = dataclasses.replace(
        adapter, table={**adapter.table, "mlp_out": adapter.table["mlp_in"]}
    )
    ids, _ = ids_pair()
    with pytest.raises(ResolveError, match=r"L0.resid_post != L0.resid_pre \+ L0.attn_out \+ L0"):
        check_sites(
            Engine(model, ids[:1]),
            [],
            ids,
            torch.ones_like(ids),
            bind=lambda s: bind_site(wrong, model, s),
            n_layers=2,
        )


def test_bindings_follow_each_layout():
    neox, llama = tiny("neox"), tiny("llama")
    b = bind_site(adapter_for(neox), neox, "L1.H2:k")  # head by head: [q2 k2 v2] at 2 * 3 * 8
    assert (b.module, b.start, b.stop) == ("gpt_neox.layers.1.attention.query_key_value", 56, 64)
    kv = bind_site(adapter_for(llama), llama, "L0.KV1:v")
    assert (kv.module, kv.start, kv.stop) == ("model.layers.0.self_attn.v_proj", 8, 16)
    z = bind_site(adapter_for(llama), llama, "L0.H3")
    assert (z.module, z.io, z.start, z.stop) == ("model.layers.0.self_attn.o_proj", "input", 24, 32)


def test_gqa_per_query_head_kv_sites_are_errors_that_name_the_kv_site():
    model = tiny("llama")
    adapter = adapter_for(model)
    with pytest.raises(ResolveError) as err:
        bind_site(adapter, model, "L1.H3:k")
    text = str(err.value)
    assert "grouped-query attention" in text
    assert "4 query heads share 2 key/value heads (2 query heads per kv head)" in text
    assert "head 3's key is L1.KV1:k, shared by query heads 2..3" in text
    with pytest.raises(
        ResolveError, match="head 0's value is L0.KV0:v, shared by query heads 0..1"
    ):
        bind_site(adapter, model, "L0.H0:v")
    with pytest.raises(ResolveError, match="key/value heads 0..1 per layer"):
        bind_site(adapter, model, "L0.KV2:k")
    with pytest.raises(ResolveError, match="keys and values only"):
        bind_site(adapter, model, "L0.KV0:q")
    vocab = adapter.vocabulary(model)
    assert expand_patterns(["L1.KV*:*"], vocab) == ["L1.KV0:k", "L1.KV1:k", "L1.KV0:v", "L1.KV1:v"]
    assert expand_patterns(["L0.H*:*"], vocab) == [f"L0.H{h}:q" for h in range(4)]
    with pytest.raises(
        SiteSyntaxError, match=r"grouped-query attention: keys and values are per kv head"
    ):
        expand_patterns(["L*.H*:k"], vocab)
    assert parse_site("L1.KV0:v") == Site(kind="kv_head", layer=1, head=0, part="v")
    assert parse_site("L1.KV0:v").name == "L1.KV0:v"
    with pytest.raises(SiteSyntaxError, match="name L1.KV0:k or L1.KV0:v"):
        parse_site("L1.KV0")
    mha = tiny("llama_mha")  # without GQA, KV<g> is an alias of H<g>'s key/value
    same = [bind_site(adapter_for(mha), mha, s) for s in ("L1.KV2:k", "L1.H2:k")]
    assert (same[0].module, same[0].start) == (same[1].module, same[1].start)


def test_parallel_neox_resid_mid_says_why():
    model = tiny("neox")
    with pytest.raises(ResolveError, match="parallel residual") as err:
        bind_site(adapter_for(model), model, "L0.resid_mid")
    assert "resid_post = resid_pre + attn_out + mlp_out" in str(err.value)


# --- 2. engine == plain hooks --------------------------------------------------------------------

SITES = {
    "neox": ["embed", "L0.resid_pre", "L1.H2", "L0.H1:q", "L1.H3:k", "L0.H0:v", "L1.attn_out",
             "L0.mlp_in", "L1.mlp_out", "L0.resid_post"],
    "neox_sequential": ["L0.resid_mid", "L1.H1:k", "L1.mlp_out"],
    "llama": ["embed", "L1.resid_pre", "L0.resid_mid", "L1.H1", "L0.H3:q", "L1.KV0:k",
              "L0.KV1:v", "L0.attn_out", "L1.mlp_in", "L0.mlp_out", "L1.resid_post"],
}  # fmt: skip


@pytest.mark.parametrize("arch", list(SITES))
def test_engine_patch_equals_hooks(arch):
    """Each site patched from another input at two positions per row, engine vs plain hooks."""
    model = tiny(arch)
    adapter = adapter_for(model)
    base, source = ids_pair()
    mask = torch.ones_like(base)
    engine = Engine(model, base[:1])
    pos = torch.tensor([[2, 7], [0, 8], [5, 6]])
    clean = patched_logits(model, base, mask, [])
    for name in SITES[arch]:
        site = bind_site(adapter, model, name)
        src = capture(model, source, mask, [site])[site.name]
        _, got = engine.run(source, mask, reads=[Read("v", site, pos)])
        patched, _ = engine.run(base, mask, writes=[Write(site, slice(None), pos, got["v"])])
        want = patched_logits(
            model,
            base,
            mask,
            [(site, pos.tolist(), lambda r, p, s=site, src=src: src[r, p, s.start : s.stop])],
        )
        assert (want - clean).abs().max() > 1e-3, f"{name}: patch changed nothing"
        torch.testing.assert_close(patched, want, atol=1e-5, rtol=0, msg=name)


# --- 3. head sites mean their names: a hand-written attention ----------------------------------


class ManualAttention:
    """Replaces the eager attention function: repeats k/v over their groups by hand, then records
    (per layer) or overwrites chosen query heads' q, k or v at chosen positions."""

    def __init__(self):
        self.seen: dict[int, dict[str, torch.Tensor]] = {}
        self.patch: tuple[int, str, list[int], list[int], torch.Tensor] | None = None

    def __call__(self, module, query, key, value, attention_mask, scaling, dropout=0.0, **_):
        group = query.shape[1] // key.shape[1]
        qkv = {
            "q": query.clone(),
            "k": key.repeat_interleave(group, dim=1),
            "v": value.repeat_interleave(group, dim=1),
        }
        self.seen[module.layer_idx] = {k: t.clone() for k, t in qkv.items()}
        if self.patch is not None and self.patch[0] == module.layer_idx:
            _, part, heads, positions, src = self.patch
            for h in heads:
                qkv[part][:, h, positions] = src[part][:, h, positions]
        scores = qkv["q"] @ qkv["k"].transpose(2, 3) * scaling
        if attention_mask is not None:
            scores = scores + attention_mask[:, :, :, : scores.shape[-1]]
        weights = scores.softmax(-1)
        return (weights @ qkv["v"]).transpose(1, 2).contiguous(), weights


@pytest.mark.parametrize(
    "arch, site, heads",
    [
        ("llama", "L1.KV1:k", [2, 3]),  # one kv head = the same key for query heads 2 and 3
        ("llama", "L0.KV0:v", [0, 1]),
        ("llama", "L1.H2:q", [2]),
        ("llama_mha", "L0.H1:k", [1]),
        ("neox", "L1.H2:k", [2]),
        ("neox", "L0.H3:v", [3]),
        ("neox", "L1.H0:q", [0]),
    ],
)
def test_head_site_patch_equals_manual_attention_reference(monkeypatch, arch, site, heads):
    """Patching a q/k/v site through the engine equals overwriting that head's (for a kv head:
    every query head of its group's) query/key/value inside a hand-written attention. Rotary
    embeddings act per position, so pre-rotary (site) and post-rotary (reference) patches at the
    same positions agree."""
    model = tiny(arch)
    manual = ManualAttention()
    family = modeling_gpt_neox if arch.startswith("neox") else modeling_llama
    base, source = ids_pair()
    mask = torch.ones_like(base)
    engine = Engine(model, base[:1])
    binding = bind_site(adapter_for(model), model, site)
    positions = [3, 4, 8]
    pos = torch.tensor([positions] * 3)
    _, got = engine.run(source, mask, reads=[Read("v", binding, pos)])
    patched, _ = engine.run(base, mask, writes=[Write(binding, slice(None), pos, got["v"])])
    clean, _ = engine.run(base, mask)

    monkeypatch.setattr(family, "eager_attention_forward", manual)
    with torch.no_grad():
        torch.testing.assert_close(model(base).logits, clean, atol=1e-5, rtol=0)  # same model
        model(source)
        layer, part = int(site[1]), site[-1] if ":" in site else "z"
        manual.patch = (layer, part, heads, positions, manual.seen[layer])
        want = model(base).logits
    assert (want - clean).abs().max() > 1e-3
    torch.testing.assert_close(patched, want, atol=1e-5, rtol=0)


# --- 4. one hypothesis file, three architectures -----------------------------------------------

ROLES = {"repeat": list(range(7, 12)), "first": list(range(1, 6))}


def positions_of(role, row):
    return [role] if isinstance(role, int) else ROLES[role]


@pytest.mark.parametrize(
    "arch, adapter", [("gpt2", "gpt2"), ("neox", "gpt_neox"), ("llama", "llama")]
)
def test_same_hypothesis_runs_on_three_architectures(arch, adapter):
    tracker = InMemoryTracker()
    result = run(ARCH / f"{arch}.yaml", tracker, runner="synchronous", cache_dir=None)
    plan = result.plan
    assert plan.model.adapter == adapter and tracker.params["model.adapter"] == adapter
    state = loaded_for(plan)
    assert all(len(state.data.row(i)["tokens"]) == 13 for i in range(len(state.data)))
    biggest = 0.0
    for report, experiment in zip(result.reports, ("heads", "residual"), strict=True):
        clean, values = reference_sweep(
            state.model.module, plan, state.data, experiment, positions_of
        )
        biggest = max(biggest, assert_report_matches(report, clean, values))
    assert biggest > 0.05  # the comparisons are about real effects, not noise around zero
    heads = {row["label"] for row in result.reports[0].tables["effects.csv"]}
    assert ("L1.H3:k@repeat" in heads) == (arch != "llama")  # llama: GQA, keys are per kv head
    assert "L1.H3:q@repeat" in heads


# --- 5. from_pretrained on a local directory ---------------------------------------------------


def test_local_hf_directory_loads_and_patches_like_hooks(tmp_path):
    model = tiny("llama")
    model.save_pretrained(tmp_path / "llama")
    (tmp_path / "h.yaml").write_text(
        "extends: " + str(ARCH / "common" / "patching.yaml") + "\n"
        "name: local-llama\n"
        "model: {hf: llama}\n"
        "data: {params: {d_vocab: 50}}\n"
        "experiments:\n"
        "  - {kind: activation_patching, name: kv, sites: ['L*.KV*:*', 'L1.H0'],\n"
        "     positions: [repeat, 6], source: {resample: true}, samples: 6, batch_size: 4}\n"
    )
    result = run(tmp_path / "h.yaml", InMemoryTracker(), runner="synchronous", cache_dir=None)
    plan, state = result.plan, loaded_for(result.plan)
    assert type(state.model.module).__name__ == "LlamaForCausalLM"
    assert state.model.adapter.name == "llama" and state.model.hf_dir == str(tmp_path / "llama")
    assert plan.model.weights_hash == files_identity(hf_weight_files(tmp_path / "llama"))
    assert plan.dims["n_kv_heads"] == 2 and plan.dims["n_heads"] == 4
    clean, values = reference_sweep(state.model.module, plan, state.data, "kv", positions_of)
    assert len(values) == 18
    assert assert_report_matches(result.reports[0], clean, values) > 0.01


def test_unknown_gqa_site_in_a_hypothesis_is_located(tmp_path):
    (tmp_path / "h.yaml").write_text(
        "extends: " + str(ARCH / "llama.yaml") + "\n"
        "correspondence: {x: ['L1.H1:v@repeat']}\n"
        "variables: {x: {column: half}}\n"
    )
    with pytest.raises(SpecError, match=r"h.yaml:2:\d+: correspondence.x.0: .*L1.KV0:v"):
        compile_file(tmp_path / "h.yaml")
