"""`mi-spec validate --static`: a file is reviewed without running any of its code."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import GPT2, TOY, write_rows
from torch import nn

from mi_spec.cli.main import main
from mi_spec.compile.static import _parameters_on_meta
from mi_spec.zoo import attn_only

EVIL = """import pathlib
pathlib.Path(__file__).with_name("IMPORTED").write_text("module ran")

def build():
    pathlib.Path(__file__).with_name("CALLED").write_text("factory ran")
"""


def study(tmp_path: Path, model: str, body: str = "", variables: str = "") -> Path:
    write_rows(tmp_path / "rows.jsonl")
    path = tmp_path / "study.yaml"
    path.write_text(
        f"name: s\nmodel:\n  {model}\ndata:\n  path: rows.jsonl\n  positions: {{mid: 4}}\n"
        f"metric: {{kind: loss, at: mid}}\n{variables}experiments:\n"
        f"  - {{kind: activation_patching, sites: [{body or 'L0.H0'}], positions: [mid]}}\n"
    )
    return path


def test_static_runs_none_of_the_files_code(tmp_path, capsys):
    (tmp_path / "evil_factory.py").write_text(EVIL)
    path = study(tmp_path, "factory: evil_factory:build")
    assert main(["validate", "--static", str(path)]) == 0
    out = capsys.readouterr().out
    assert not (tmp_path / "IMPORTED").exists() and not (tmp_path / "CALLED").exists()
    assert "model.factory = evil_factory:build" in out and "evil_factory.py" in out
    assert "sites not checked: the model comes from user code" in out


def test_static_reports_a_misspelt_reference_without_importing(tmp_path, capsys):
    (tmp_path / "evil_factory.py").write_text(EVIL)
    path = study(tmp_path, "factory: evil_factory:biuld")
    assert main(["validate", "--static", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:3:" in err and "defines no top-level name 'biuld'" in err
    assert not (tmp_path / "IMPORTED").exists()


def test_static_checks_sites_on_a_meta_model(tmp_path, capsys):
    """hf_config and mi_spec factories: sites bound against the structure, no weights."""
    for model in (GPT2, TOY):
        path = study(tmp_path, model, body="L0.H0, L5.H0, L0.H9")
        assert main(["validate", "--static", str(path)]) == 2
        err = capsys.readouterr().err
        assert "experiments.0.sites.1" in err and "layer 5 out of range" in err, err
        assert "experiments.0.sites.2" in err and "head 9 out of range" in err, err
        path = study(tmp_path, model, body="'L*.H*'")
        assert main(["validate", "--static", str(path)]) == 0
        assert "8 sites checked" in capsys.readouterr().out


def test_static_parses_expressions_and_finds_cycles(tmp_path, capsys):
    variables = (
        "variables:\n  a: {value: 'b + 1'}\n  b: {value: 'a * 2'}\n"
        "  c: {value: 'tokens.__class__'}\n"
    )
    path = study(tmp_path, TOY, variables=variables)
    assert main(["validate", "--static", str(path)]) == 2
    err = capsys.readouterr().err
    assert "variables.c.value" in err and "not allowed" in err
    assert "variables form a cycle" in err


def test_static_reports_missing_files(tmp_path, capsys):
    path = study(tmp_path, TOY + "\n  checkpoint: nowhere.pt")
    assert main(["validate", "--static", str(path)]) == 2
    assert "model.checkpoint: file not found" in capsys.readouterr().err


def test_meta_build_skips_initialisation_and_restores_torch():
    """Parameters land on meta with the real model's names and shapes and no initialiser runs on
    them; buffers stay real; torch is as before once the block is left, error or not."""
    register = nn.Module.register_parameter
    kwargs = {"n_layers": 2, "n_heads": 4, "d_model": 32, "d_head": 8, "n_ctx": 16, "d_vocab": 40}
    with _parameters_on_meta():
        meta = attn_only(**kwargs)
        ones = nn.init.ones_(torch.empty(3))  # a real tensor is still initialised
    real = attn_only(**kwargs)
    shapes = {n: (tuple(p.shape), p.requires_grad) for n, p in real.named_parameters()}
    assert {n: (tuple(p.shape), p.requires_grad) for n, p in meta.named_parameters()} == shapes
    assert {p.device.type for p in meta.parameters()} == {"meta"}
    assert torch.equal(ones, torch.ones(3))
    mask = dict(meta.named_buffers())["blocks.1.attn.causal_mask"]
    assert mask.device.type == "cpu" and torch.equal(mask, torch.ones(16, 16).tril().bool())
    assert nn.Module.register_parameter is register
    with pytest.raises(RuntimeError), _parameters_on_meta():
        raise RuntimeError("factory failed")
    assert nn.Module.register_parameter is register
    fresh = nn.Linear(8, 8)
    assert fresh.weight.device.type == "cpu" and fresh.weight.std() > 0.01  # initialised again
