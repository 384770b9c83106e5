"""Model loading: factories + checkpoints, local HF directories (offline), HF configs; clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from mi_spec.api import compile_file
from mi_spec.errors import ResolveError, SpecError
from mi_spec.models.load import load_model
from mi_spec.spec.sections import ModelSection


def test_factory_with_checkpoint_roundtrip(tmp_path):
    from mi_spec.zoo import attn_only

    model = attn_only(d_model=32, d_head=8, d_vocab=40, seed=3)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    section = ModelSection(
        factory="mi_spec.zoo:attn_only",
        kwargs={"d_model": 32, "d_head": 8, "d_vocab": 40, "seed": 9},
        checkpoint="w.pt",
    )
    loaded = load_model(section, tmp_path)
    assert torch.equal(loaded.module.embed.weight, model.embed.weight)
    assert loaded.adapter.name == "attn_only"


def test_checkpoint_that_does_not_fit(tmp_path):
    torch.save({"nope": torch.zeros(1)}, tmp_path / "w.pt")
    section = ModelSection(factory="mi_spec.zoo:attn_only", checkpoint="w.pt")
    with pytest.raises(ResolveError, match="does not fit"):
        load_model(section, tmp_path)


def test_unimportable_factory(tmp_path):
    with pytest.raises(ResolveError, match="no_such_pkg"):
        load_model(ModelSection(factory="no_such_pkg.mod:fn"), tmp_path)


def _save_tiny_gpt2_with_tokenizer(directory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = ["<pad>", "the", "cat", "dog", "sat", "ran", "on", "mat", "a", "log", "."]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=len(words), n_positions=16)
    )
    model.save_pretrained(directory)
    fast.save_pretrained(directory)
    return model


def test_local_hf_dir_and_text_dataset(tmp_path):
    original = _save_tiny_gpt2_with_tokenizer(tmp_path / "tiny-gpt2")
    with open(tmp_path / "text.jsonl", "w") as f:
        for s in ["the cat sat on the mat .", "a dog ran on a log .", "the dog sat ."]:
            f.write(json.dumps({"text": s}) + "\n")
    (tmp_path / "h.yaml").write_text(
        "name: hf-local\nmodel: {hf: tiny-gpt2}\n"
        "data: {path: text.jsonl, text: text}\nmetric: {kind: loss, at: 1}\n"
        "experiments:\n  - {kind: ablation, sites: ['L0.H*'], method: zero, positions: [last]}\n"
    )
    study, plan = compile_file(tmp_path / "h.yaml")
    assert study.model.adapter.name == "gpt2"
    assert study.data.lengths == [7, 7, 4]  # right-padded rows of different lengths
    for (_, a), (_, b) in zip(
        original.state_dict().items(), study.model.module.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b)


def test_missing_hf_dir_is_located(tmp_path):
    (tmp_path / "rows.jsonl").write_text('{"tokens": [1, 2, 3]}\n')
    (tmp_path / "h.yaml").write_text("name: x\nmodel:\n  hf: nowhere\ndata: {path: rows.jsonl}\n")
    with pytest.raises(SpecError) as e:
        compile_file(tmp_path / "h.yaml")
    assert "h.yaml:3:" in str(e.value) and "nowhere" in str(e.value)


def test_hf_models_build_no_kv_cache(tmp_path):
    """Every pass is one full forward: the KV cache HF builds by default is never read, so it is
    off (no past_key_values come back), for hf_config models and hf folders alike."""
    config = {"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 4, "vocab_size": 40}
    built = load_model(ModelSection(hf_config=config), tmp_path)
    assert built.module.config.use_cache is False
    out = built.module(torch.tensor([[1, 2, 3]]))
    assert out.past_key_values is None
    _save_tiny_gpt2_with_tokenizer(tmp_path / "tiny-gpt2")
    folder = load_model(ModelSection(hf="tiny-gpt2"), tmp_path, lazy=True)
    assert folder.module.config.use_cache is False
