"""Real checkpoints: single-file and sharded safetensors, saved here and loaded offline; the model
identity from the files (never from hashing every tensor), stable across processes and changed by
any weight; device_map reaches from_pretrained; half-precision models patch like fp32 ones."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from procs import run as run_process
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from mi_spec.api import compile_file, validate
from mi_spec.errors import ResolveError, SpecError
from mi_spec.execute.worker import execute_job, loaded_for
from mi_spec.models import identity
from mi_spec.models.load import load_model
from mi_spec.spec.sections import ModelSection


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=40, n_positions=32)
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=50,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def never_hash_tensors(monkeypatch) -> None:
    def refuse(module):
        raise AssertionError("a checkpoint's identity must come from its files")

    monkeypatch.setattr("mi_spec.models.load.tensor_identity", refuse)


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_sharded_hf_checkpoint_loads_offline_and_is_identified_by_its_files(
    tmp_path, monkeypatch, make
):
    model = make()
    model.save_pretrained(tmp_path / "m", max_shard_size="20KB")
    shards = sorted(p.name for p in (tmp_path / "m").glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3 and (tmp_path / "m" / "model.safetensors.index.json").exists()
    never_hash_tensors(monkeypatch)
    loaded = load_model(ModelSection(hf="m", device="cpu"), tmp_path)
    assert_same_weights(model, loaded.module)
    files = identity.hf_weight_files(tmp_path / "m")
    assert {p.name for p in files} >= {*shards, "model.safetensors.index.json", "config.json"}
    assert loaded.weights_hash == identity.files_identity(files)
    ids = torch.randint(0, 40, (2, 7))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, loaded.module(ids).logits, atol=1e-6)


def test_single_file_hf_checkpoint(tmp_path, monkeypatch):
    model = tiny_gpt2()
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").exists()
    never_hash_tensors(monkeypatch)
    loaded = load_model(ModelSection(hf="m", device="cpu"), tmp_path)
    assert_same_weights(model, loaded.module)


def test_changing_one_weight_changes_the_identity(tmp_path):
    model = tiny_gpt2()
    model.save_pretrained(tmp_path / "m", max_shard_size="20KB")
    section = ModelSection(hf="m", device="cpu")
    first = load_model(section, tmp_path).weights_hash
    assert load_model(section, tmp_path).weights_hash == first  # same files, same identity
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight[3, 5] += 1e-3
    model.save_pretrained(tmp_path / "m", max_shard_size="20KB")
    changed = load_model(section, tmp_path).weights_hash
    assert changed != first
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight[3, 5] -= 1e-3
    model.save_pretrained(tmp_path / "m", max_shard_size="20KB")
    assert load_model(section, tmp_path).weights_hash == first  # the content, not the save time


def test_a_digest_is_never_reused_for_rewritten_bytes(tmp_path, digest_cache):
    """Same size, mtime put back: the change time still moves, so the sidecar is not trusted."""
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.zeros(64)}, str(path))
    before = identity.file_digest(path)
    assert len(list(digest_cache.iterdir())) == 1  # remembered for the next process
    st = path.stat()
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01  # one bit of one weight
    path.write_bytes(bytes(raw))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    identity._MEMO.clear()
    assert identity.file_digest(path) != before


def test_identity_is_the_same_in_a_fresh_process(tmp_path):
    """What a worker computes from the same files equals what the driver put in the plan."""
    tiny_llama().save_pretrained(tmp_path / "m", max_shard_size="20KB")
    driver = load_model(ModelSection(hf="m", device="cpu"), tmp_path).weights_hash
    code = (
        "from pathlib import Path; from mi_spec.models.load import load_model; "
        "from mi_spec.spec.sections import ModelSection; "
        f"print(load_model(ModelSection(hf='m', device='cpu'), Path({str(tmp_path)!r})).weights_hash)"
    )
    for cache in ("worker-digests", "digests"):  # computed afresh, then read from the sidecar
        env = {**os.environ, "MI_SPEC_DIGEST_CACHE": str(tmp_path / cache)}
        done = run_process([sys.executable, "-c", code], env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip().splitlines()[-1] == driver


def test_factory_checkpoint_as_single_and_sharded_safetensors(tmp_path, monkeypatch):
    from mi_spec.zoo import attn_only

    model = attn_only(d_model=32, d_head=8, d_vocab=40, seed=3)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    names = sorted(state)
    half = len(names) // 2
    parts = {
        "w-00001-of-00002.safetensors": names[:half],
        "w-00002-of-00002.safetensors": names[half:],
    }
    for shard, keys in parts.items():
        save_file({k: state[k] for k in keys}, str(tmp_path / shard))
    index = {"metadata": {}, "weight_map": {k: s for s, keys in parts.items() for k in keys}}
    (tmp_path / "w.safetensors.index.json").write_text(json.dumps(index))
    never_hash_tensors(monkeypatch)
    kwargs = {"d_model": 32, "d_head": 8, "d_vocab": 40, "seed": 9}
    hashes = []
    for checkpoint in ("w.safetensors", "w.safetensors.index.json"):
        section = ModelSection(
            factory="mi_spec.zoo:attn_only", kwargs=kwargs, checkpoint=checkpoint
        )
        loaded = load_model(section, tmp_path)
        assert_same_weights(model, loaded.module)
        hashes.append(loaded.weights_hash)
    assert hashes[0] != hashes[1]  # different files; each identity covers its own
    shard_files = identity.checkpoint_files(tmp_path / "w.safetensors.index.json")
    assert hashes[1] == identity.files_identity(shard_files) and len(shard_files) == 3


def test_models_built_in_memory_hash_their_tensors(tmp_path):
    a = load_model(ModelSection(factory="mi_spec.zoo:attn_only", kwargs={"seed": 1}), tmp_path)
    b = load_model(ModelSection(factory="mi_spec.zoo:attn_only", kwargs={"seed": 2}), tmp_path)
    again = load_model(ModelSection(factory="mi_spec.zoo:attn_only", kwargs={"seed": 1}), tmp_path)
    assert a.weights_hash == again.weights_hash != b.weights_hash


def test_explicit_device_map_reaches_from_pretrained(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    model = tiny_gpt2()
    model.save_pretrained(tmp_path / "m", max_shard_size="20KB")
    seen = {}
    original = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.update(kwargs)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    device_map = {k: "cpu" for k in ("transformer.wte", "transformer.wpe", "transformer.drop")}
    device_map |= {"transformer.h": "cpu", "transformer.ln_f": "cpu", "lm_head": "cpu"}
    section = ModelSection(hf="m", device_map=device_map, dtype="bfloat16")
    loaded = load_model(section, tmp_path)
    assert seen["device_map"] == device_map and seen["local_files_only"] is True
    assert loaded.device == torch.device("cpu")
    assert {p.dtype for p in loaded.module.parameters()} == {torch.bfloat16}
    ids = torch.randint(0, 40, (2, 7))
    with torch.no_grad():
        want = model.to(torch.bfloat16)(ids).logits
        assert torch.equal(loaded.module(ids).logits, want)


def test_device_map_needs_an_hf_folder(tmp_path):
    with pytest.raises(ResolveError, match="device_map places a checkpoint") as err:
        load_model(ModelSection(factory="mi_spec.zoo:attn_only", device_map="auto"), tmp_path)
    assert err.value.field == ("device_map",)


PATCHING = (
    "experiments:\n  - {kind: activation_patching, name: heads, sites: ['L*.H*', 'L1.resid_pre'],"
    " positions: [mid], samples: 8, batch_size: 8}\n"
)


def _job_values(path, overrides=()):
    validate(path, overrides)  # site checks in this dtype too
    study, plan = compile_file(path, overrides)
    state = loaded_for(plan)
    results = [execute_job(plan, job) for job in plan.jobs]
    dtype = next(state.model.module.parameters()).dtype
    clean = torch.tensor([v for r in results for v in r.clean], dtype=torch.float64)
    variants = torch.tensor([v for r in results for row in r.variants for v in row])
    return dtype, clean, variants


# Stated tolerances on the loss (near ln(40) = 3.7) and on patching effects (up to ~0.12 here):
# bf16 keeps 8 mantissa bits (relative rounding 2^-9), fp16 11; measured on this 2-layer model:
# bf16 1.1e-3 (clean) / 1.5e-3 (effects), fp16 2.4e-4 / 2.5e-4. The bounds leave ~7x headroom.
BF16_LOSS_ATOL = 0.01
FP16_LOSS_ATOL = 0.002


@pytest.mark.parametrize(
    ("dtype", "atol"), [("bfloat16", BF16_LOSS_ATOL), ("float16", FP16_LOSS_ATOL)]
)
def test_half_precision_patching_is_within_tolerance_of_fp32(study_file, dtype, atol):
    path = study_file(PATCHING)
    got32, clean32, var32 = _job_values(path, ["model.device=cpu"])
    got, clean, var = _job_values(path, ["model.device=cpu", f"model.dtype={dtype}"])
    assert got32 == torch.float32 and got == getattr(torch, dtype)
    assert var.shape == var32.shape and var.numel() == 9 * 8
    assert (clean - clean32).abs().max() < atol
    assert (var - var32).abs().max() < atol
    effect32 = var32.reshape(9, 8) - clean32
    effect = var.reshape(9, 8) - clean
    assert (effect - effect32).abs().max() < 2 * atol
    assert effect32.abs().max() > 0  # the patches do something


def test_float64_model(study_file):
    path = study_file(PATCHING)
    dtype, clean, _ = _job_values(path, ["model.device=cpu", "model.dtype=float64"])
    _, clean32, _ = _job_values(path, ["model.device=cpu"])
    assert dtype == torch.float64
    assert (clean - clean32).abs().max() < 1e-4


def test_bad_dtype_is_located(study_file):
    with pytest.raises(SpecError, match="dtype"):
        compile_file(study_file(PATCHING), ["model.dtype=int8"])


def _hf_study(tmp_path, body: str = PATCHING):
    from conftest import write_rows

    write_rows(tmp_path / "rows.jsonl")
    path = tmp_path / "h.yaml"
    path.write_text(
        "name: lazy\nmodel: {hf: m, device: cpu}\ndata:\n  path: rows.jsonl\n"
        f"  positions: {{mid: 4}}\nmetric: {{kind: loss, at: mid}}\n{body}"
    )
    return path


def test_driver_plans_an_hf_model_without_loading_its_weights(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    model = tiny_gpt2()
    model.save_pretrained(tmp_path / "m", max_shard_size="20KB")
    path = _hf_study(tmp_path)
    loads = []
    original = AutoModelForCausalLM.from_pretrained.__func__
    monkeypatch.setattr(
        AutoModelForCausalLM,
        "from_pretrained",
        classmethod(lambda cls, *a, **k: loads.append(a) or original(cls, *a, **k)),
    )
    study, plan = compile_file(path)
    assert not loads and not study.model.loaded
    assert {p.device.type for p in study.model.skeleton.parameters()} == {"meta"}
    assert plan.model.weights_hash == identity.files_identity(
        identity.hf_weight_files(tmp_path / "m")
    )
    assert len(plan.sites) == 9 and study.dims.n_layers == 2
    validate(path)  # the site checks run the model: now it loads, once
    assert len(loads) == 1 and study.model.loaded is False  # validate resolved its own study
    assert_same_weights(model, study.model.module)  # first use loads it
    assert study.model.loaded and len(loads) == 2


def test_truncated_shard_is_a_located_error(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path / "m", max_shard_size="20KB")
    shard = sorted((tmp_path / "m").glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ResolveError, match="cannot load a model from"):
        load_model(ModelSection(hf="m", device="cpu"), tmp_path, lazy=True)
    with pytest.raises(SpecError, match=r"h\.yaml:2:\d+: model.hf"):
        compile_file(_hf_study(tmp_path))
