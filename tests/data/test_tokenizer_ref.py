"""``data.tokenizer`` may name code (``pkg.mod:fn`` returning a tokenizer) instead of a folder."""

from __future__ import annotations

import pytest

from mi_spec.api import compile_file
from mi_spec.compile.static import check_static
from mi_spec.data.dataset import load_dataset
from mi_spec.errors import SpecError
from mi_spec.spec.sections import DataSection
from mi_spec.zoo import ioi


def section(tokenizer: str) -> DataSection:
    return DataSection(
        generator="mi_spec.zoo.ioi:rows",
        params={"n": 6, "seed": 4},
        text="text",
        tokenizer=tokenizer,
    )


def test_a_tokenizer_ref_equals_its_saved_folder(tmp_path):
    folder = ioi.train_tokenizer(tmp_path / "tok")
    by_ref = load_dataset(section("mi_spec.zoo.ioi:tokenizer"), tmp_path)
    by_folder = load_dataset(section(str(folder)), tmp_path)
    assert by_ref.tokens == by_folder.tokens and by_ref.pad_id == by_folder.pad_id == 0
    assert by_ref.content_hash() == by_folder.content_hash()
    assert by_ref.token_rows("cf_text", [3]) == by_folder.token_rows("cf_text", [3])


def write(tmp_path, tokenizer: str):
    (tmp_path / "tok_code.py").write_text("def not_a_tokenizer():\n    return 42\n")
    path = tmp_path / "h.yaml"
    path.write_text(
        "name: t\nmodel:\n  hf_config: {model_type: gpt2, n_layer: 1, n_embd: 16, n_head: 2, "
        "vocab_size: 80, n_positions: 40}\n"
        "data:\n  generator: mi_spec.zoo.ioi:rows\n  params: {n: 4}\n  text: text\n"
        f"  tokenizer: {tokenizer}\n  positions: {{end: -1}}\n"
        "metric: {kind: logit_diff, at: end, target: io, wrong: s}\n"
        "experiments:\n  - {kind: activation_patching, sites: [L0.H1], positions: [end], "
        "source: {column: cf_text}}\n"
    )
    return path


def test_a_ref_that_returns_no_tokenizer_is_located(tmp_path):
    with pytest.raises(SpecError) as e:
        compile_file(write(tmp_path, "tok_code:not_a_tokenizer"))
    msg = str(e.value)
    assert "h.yaml:8:14: data.tokenizer:" in msg and "must return a Hugging Face tokenizer" in msg


def test_static_review_checks_the_ref_without_running_it(tmp_path):
    report = check_static(write(tmp_path, "tok_code:not_a_tokenizer"))
    assert any(r.startswith("data.tokenizer = tok_code:not_a_tokenizer") for r in report.references)
    with pytest.raises(SpecError) as e:
        check_static(write(tmp_path, "tok_code:missing"))
    assert "data.tokenizer" in str(e.value) and "missing" in str(e.value)
