"""Failures of the issue on real data, each a located validate error or a fixed run."""

from __future__ import annotations

import json

import pytest
from conftest import GPT2

from mi_spec.api import compile_file
from mi_spec.errors import SpecError


def write(tmp_path, rows, body, data_extra=""):
    with open(tmp_path / "rows.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    path = tmp_path / "h.yaml"
    path.write_text(
        f"name: t\nmodel:\n  {GPT2}\ndata:\n  path: rows.jsonl\n{data_extra}"
        f"metric: {{kind: loss, at: 2}}\nexperiments:\n{body}"
    )
    return path


def test_zero_ablation_on_one_row(tmp_path):
    path = write(
        tmp_path,
        [{"tokens": [1, 2, 3, 4, 5]}],
        "  - {kind: ablation, sites: [L0.H1], method: zero}\n",
    )
    _, plan = compile_file(path)
    assert len(plan.jobs) == 1 and plan.jobs[0].source == "zero"


def test_token_ids_beyond_the_vocabulary_are_a_located_error(tmp_path):
    rows = [{"tokens": [1, 2, 3, 4]}, {"tokens": [1, 299, 3, 4]}]
    path = write(tmp_path, rows, "  - {kind: ablation, sites: [L0.H1], method: zero}\n")
    with pytest.raises(SpecError) as e:
        compile_file(path)
    assert "row 1: 299 at position 1" in str(e.value) and "h.yaml:" in str(e.value)


def test_all_positions_from_a_longer_source_names_the_row(tmp_path):
    rows = [
        {"tokens": [1, 2, 3, 4], "cf": [1, 2, 3, 4]},
        {"tokens": [1, 2, 3, 4], "cf": [5, 6, 7, 8, 9]},
    ]
    body = "  - {kind: activation_patching, sites: [L0.H1], source: {column: cf}}\n"
    with pytest.raises(SpecError) as e:
        compile_file(write(tmp_path, rows, body))
    assert "row 1: 4 tokens, its source 5" in str(e.value)


def test_column_role_without_counterfactual_position_names_the_row(tmp_path):
    rows = [{"tokens": [1, 2, 3, 4], "cf": [1, 2, 3, 4, 5], "s": 1}]
    body = "  - {kind: activation_patching, sites: [L0.H1], positions: [S], source: {column: cf}}\n"
    extra = "  positions: {S: {column: s}}\n"
    with pytest.raises(SpecError) as e:
        compile_file(write(tmp_path, rows, body, extra))
    assert "row 0" in str(e.value) and "counterfactual" in str(e.value)


def test_a_tokenizer_larger_than_the_model_is_a_located_error_per_row(tmp_path):
    """The issue's case: a 300-token tokenizer on a 256-token config. Text rows, a text
    counterfactual and a text target beyond the vocabulary each name their row (no IndexError)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[BOS]": 2, **{f"w{i}": i for i in range(3, 300)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")
    fast.save_pretrained(str(tmp_path / "tok"))
    assert len(fast) == 300
    rows = [
        {"text": "w3 w4 w5 w6", "cf": "w7 w8 w9", "t": "w10"},
        {"text": "w3 w299 w5 w6", "cf": "w7 w8 w9", "t": "w11"},
        {"text": "w3 w4 w5", "cf": "w7 w280 w9", "t": "w290"},
    ]
    with open(tmp_path / "rows.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    path = tmp_path / "h.yaml"
    path.write_text(
        "name: t\nmodel:\n  hf_config: {model_type: gpt2, n_layer: 1, n_embd: 8, n_head: 2, "
        "vocab_size: 256, n_positions: 32}\n"
        "data: {path: rows.jsonl, text: text, tokenizer: tok}\n"
        "metric: {kind: prob, at: -1, target: t}\n"
        "experiments:\n"
        "  - {kind: activation_patching, sites: [L0.H1], positions: [-1], source: {column: cf}}\n"
    )
    with pytest.raises(SpecError) as e:
        compile_file(path)
    lines = str(e.value).splitlines()
    assert lines[0] == "3 problems found:"
    base, cf, target = lines[1:]
    assert "h.yaml:4:" in base and "0..255" in base and "row 1: 299 at position 1" in base
    assert "h.yaml:7:" in cf and "source column 'cf'" in cf and "row 2: 280 at position 1" in cf
    assert "metric.target" in target and "row 2: 'w290' is outside the vocabulary" in target
