"""Shared fixtures: tiny config-built models, small studies written to tmp dirs, a temp MLflow store.

Tests never touch the user's MLflow store or the network.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

GPT2 = (
    "hf_config: {model_type: gpt2, n_layer: 2, n_embd: 32, n_head: 4, vocab_size: 40, "
    "n_positions: 32}"
)
TOY = (
    "factory: mi_spec.zoo:attn_only\n  kwargs: {n_layers: 2, n_heads: 4, d_model: 32, d_head: 8, "
    "n_ctx: 32, d_vocab: 40}"
)


def write_rows(path: Path, n: int = 16, length: int = 10, vocab: int = 40, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            f.write(json.dumps({"tokens": [rng.randrange(vocab) for _ in range(length)]}) + "\n")


@pytest.fixture
def study_file(tmp_path):
    """Write a small hypothesis (+ rows.jsonl) and return its path; ``model`` picks gpt2 or toy."""

    def make(body: str = "", model: str = GPT2, name: str = "tiny") -> Path:
        write_rows(tmp_path / "rows.jsonl")
        path = tmp_path / f"{name}.yaml"
        path.write_text(
            f"name: {name}\nmodel:\n  {model}\ndata:\n  path: rows.jsonl\n"
            f"  positions: {{mid: 4}}\nmetric: {{kind: loss, at: mid}}\n{body}"
        )
        return path

    return make


@pytest.fixture
def tracking_uri(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    return uri
