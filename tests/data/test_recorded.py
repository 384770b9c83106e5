"""The tokenizer flags and the padding side are recorded in the run's params (the resolved data
section, defaults filled in), and the flags do what they say."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from mi_spec import api
from mi_spec.tracking.base import InMemoryTracker
from mi_spec.zoo import ioi


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return ioi.train_tokenizer(tmp_path_factory.mktemp("tok"))


def run_text_study(tmp_path, tokenizer, data_extra: str) -> InMemoryTracker:
    with open(tmp_path / "rows.jsonl", "w") as f:
        f.writelines(json.dumps({"text": r["text"]}) + "\n" for r in ioi.rows(n=4, seed=1))
    path = tmp_path / "h.yaml"
    path.write_text(
        "name: recorded\nmodel:\n  hf_config: {model_type: gpt2, n_layer: 1, n_embd: 16, "
        "n_head: 2, vocab_size: 80, n_positions: 40}\n"
        f"data:\n  path: rows.jsonl\n  text: text\n  tokenizer: {tokenizer}\n{data_extra}"
        "metric: {kind: loss, at: all}\n"
        "experiments:\n  - {kind: ablation, name: abl, sites: [L0.H1], method: zero}\n"
    )
    tracker = InMemoryTracker()
    api.run(path, tracker, cache_dir=tmp_path / "cache", runner="synchronous")
    return tracker


def test_flags_and_padding_side_are_logged(tmp_path, tokenizer):
    extra = "  padding_side: left\n  prepend_bos: true\n  add_special_tokens: false\n"
    params = run_text_study(tmp_path, tokenizer, extra).params
    assert params["data.padding_side"] == "left"
    assert params["data.prepend_bos"] == "True"
    assert params["data.add_special_tokens"] == "False"
    assert params["data.tokenizer"] == str(tokenizer)


def test_defaults_are_logged_too(tmp_path, tokenizer):
    params = run_text_study(tmp_path, tokenizer, "").params
    assert params["data.padding_side"] == "right"
    assert params["data.prepend_bos"] == "False"
    assert params["data.add_special_tokens"] == "True"


def test_prepend_bos_starts_every_row_and_counterfactual_with_it_once(tmp_path, tokenizer):
    """With ``bos: true`` the IOI roles count the BOS token: each still points at its name."""
    from mi_spec.data.dataset import load_dataset
    from mi_spec.spec.sections import DataSection

    section = DataSection(
        generator="mi_spec.zoo.ioi:rows",
        params={"n": 5, "seed": 2, "bos": True},
        text="text",
        tokenizer=str(tokenizer),
        prepend_bos=True,
    )
    data = load_dataset(section, tmp_path)
    tok = AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
    for r in range(len(data)):
        row = data.row(r)
        want = [tok.bos_token_id, *tok(row["text"], add_special_tokens=False)["input_ids"]]
        assert list(data.tokens[r]) == want
        (cf,) = data.token_rows("cf_text", [r])
        assert cf[0] == tok.bos_token_id and cf.count(tok.bos_token_id) == 1
        name = lambda ids, p: tok.decode([ids[p]])  # noqa: E731
        assert name(data.tokens[r], row["io_pos"]) == row["io"]
        assert (
            name(data.tokens[r], row["s1_pos"]) == name(data.tokens[r], row["s2_pos"]) == row["s"]
        )
        assert name(cf, row["cf_s2_pos"]) not in (
            name(cf, row["cf_io_pos"]),
            name(cf, row["cf_s1_pos"]),
        )
