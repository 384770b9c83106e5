"""Bad input found by trying mi_spec as a new user would: each case exits 2 with a located message
(`file:line:col: field.path: ...`), never a traceback; `validate` catches everything `run` would
hit because of the input (every row checked against every role, column and the vocabulary)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import procs
import pytest
import torch
from conftest import TOY, write_rows

from mi_spec.cli.main import main

SWEEP = """experiments:
  - kind: activation_patching
    sites: ["L0.H0"]
    positions: [mid]
    samples: 4
"""


def study(
    tmp_path: Path, model: str = TOY, data: str = "path: rows.jsonl", metric: str = ""
) -> Path:
    """A small hypothesis on the toy model (vocabulary 40, context 32) and 16 rows of 10 tokens."""
    if not (tmp_path / "rows.jsonl").exists():
        write_rows(tmp_path / "rows.jsonl")
    path = tmp_path / "study.yaml"
    path.write_text(
        f"name: bad\nmodel:\n  {model}\ndata:\n  {data}\n  positions: {{mid: 4}}\n"
        f"metric: {metric or '{kind: loss, at: mid}'}\n{SWEEP}"
    )
    return path


def validate(path: Path, capsys, *overrides: str) -> tuple[int, str]:
    args = ["validate", str(path)] + [a for o in overrides for a in ("--set", o)]
    code = main(args)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def located(err: str, path: Path, line: int, field: str) -> bool:
    return any(ln.startswith(f"{path}:{line}:") and f" {field}: " in ln for ln in err.splitlines())


def write_module(folder: Path, name: str, body: str) -> None:
    (folder / f"{name}.py").write_text(body)


# --- code the file names raises ----------------------------------------------------------------


def test_factory_that_raises_is_located_at_the_reference(tmp_path, capsys):
    write_module(tmp_path, "broken_model", "def build():\n    raise RuntimeError('no weights')\n")
    path = study(tmp_path, model="factory: broken_model:build")
    code, err = validate(path, capsys)
    assert code == 2
    assert located(err, path, 3, "model.factory"), err
    assert "broken_model:build raised RuntimeError: no weights" in err


def test_generator_that_raises_names_the_exception(tmp_path, capsys):
    write_module(tmp_path, "rows_gen", "def make(n):\n    return {}['split'] if n else []\n")
    path = study(tmp_path, data="generator: rows_gen:make\n  params: {n: 3}")
    code, err = validate(path, capsys)
    assert code == 2 and located(err, path, 6, "data.generator"), err
    assert "raised KeyError: 'split'" in err


def test_wrong_arguments_are_located_at_the_arguments(tmp_path, capsys):
    write_module(tmp_path, "rows_gen_args", "def make(n):\n    return []\n")
    path = study(tmp_path, data="generator: rows_gen_args:make\n  params: {m: 3}")
    code, err = validate(path, capsys)
    assert code == 2 and located(err, path, 7, "data.params"), err
    assert "rows_gen_args:make(n): missing a required argument: 'n'; given ['m']" in err


def test_module_beside_the_hypothesis_is_importable(tmp_path, capsys):
    """`factory: my_model:build` finds my_model.py next to the YAML file without PYTHONPATH."""
    write_module(
        tmp_path,
        "my_local_model",
        "from mi_spec.zoo import attn_only\n\ndef build():\n"
        "    return attn_only(n_layers=2, n_heads=4, d_model=32, d_head=8, n_ctx=32, d_vocab=40)\n",
    )
    path = study(tmp_path, model="factory: my_local_model:build")
    code, err = validate(path, capsys, "model.check_sites=false")
    assert code == 0, err


def test_missing_module_says_how_to_make_it_importable(tmp_path, capsys):
    path = study(tmp_path, model="factory: no_such_module_here:build")
    code, err = validate(path, capsys)
    assert code == 2 and located(err, path, 3, "model.factory"), err
    assert "beside the hypothesis file" in err and "PYTHONPATH" in err


# --- files ---------------------------------------------------------------------------------------


def test_malformed_jsonl_line_names_file_and_line(tmp_path, capsys):
    write_rows(tmp_path / "rows.jsonl", n=4)
    with (tmp_path / "rows.jsonl").open("a") as f:
        f.write('{"tokens": [1, 2, 3\n')
    path = study(tmp_path)
    code, err = validate(path, capsys)
    assert code == 2 and located(err, path, 6, "data.path"), err
    assert "rows.jsonl:5:" in err and "invalid JSON" in err


def test_data_path_that_is_a_directory(tmp_path, capsys):
    (tmp_path / "rows.jsonl").mkdir()
    path = study(tmp_path)
    code, err = validate(path, capsys)
    assert code == 2 and "is a directory" in err and located(err, path, 6, "data.path"), err


def test_checkpoint_holding_a_bare_tensor(tmp_path, capsys):
    torch.save(torch.zeros(3), tmp_path / "bare.pt")
    path = study(tmp_path, model=TOY + "\n  checkpoint: bare.pt")
    code, err = validate(path, capsys)
    assert code == 2 and located(err, path, 5, "model.checkpoint"), err
    assert "holds Tensor, expected a state_dict" in err


def test_safetensors_checkpoint_loads(tmp_path, capsys):
    from safetensors.torch import save_file

    from mi_spec.zoo import attn_only

    model = attn_only(n_layers=2, n_heads=4, d_model=32, d_head=8, n_ctx=32, d_vocab=40)
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    path = study(tmp_path, model=TOY + "\n  checkpoint: model.safetensors")
    code, err = validate(path, capsys, "model.check_sites=false")
    assert code == 0, err


# --- validate checks every row ------------------------------------------------------------------


def test_rows_longer_than_the_context(tmp_path, capsys):
    write_rows(tmp_path / "rows.jsonl", length=40)  # the toy model's context is 32
    path = study(tmp_path)
    code, err = validate(path, capsys)
    assert code == 2 and located(err, path, 6, "data.path"), err
    assert "longer than the model's context of 32 tokens" in err and "(16 of 16 rows)" in err


def test_token_id_beyond_the_vocabulary_in_row_20(tmp_path, capsys):
    write_rows(tmp_path / "rows.jsonl", n=30)
    rows = (tmp_path / "rows.jsonl").read_text().splitlines()
    bad = json.loads(rows[20])
    bad["tokens"][3] = 40
    rows[20] = json.dumps(bad)
    (tmp_path / "rows.jsonl").write_text("\n".join(rows) + "\n")
    path = study(tmp_path)
    code, err = validate(path, capsys)
    assert code == 2 and located(err, path, 6, "data.path"), err
    assert "0..39" in err and "row 20: 40 at position 3" in err


def test_metric_column_that_does_not_exist(tmp_path, capsys):
    path = study(tmp_path, metric="{kind: logit_diff, at: mid, target: tgt, wrong: wrong}")
    code, err = validate(path, capsys)
    assert code == 2, err
    assert located(err, path, 8, "metric.target") and located(err, path, 8, "metric.wrong"), err
    assert "no column 'tgt'" in err


def test_unknown_metric_role(tmp_path, capsys):
    path = study(tmp_path, metric="{kind: loss, at: answer}")
    code, err = validate(path, capsys)
    assert code == 2 and located(err, path, 8, "metric.at"), err
    assert "unknown position 'answer'" in err and "mid" in err


def test_position_out_of_range_in_rows_a_job_would_not_sample(tmp_path, capsys):
    """Row 13 is short; the study samples 4 rows, but validate checks all of them."""
    write_rows(tmp_path / "rows.jsonl")
    rows = (tmp_path / "rows.jsonl").read_text().splitlines()
    rows[13] = json.dumps({"tokens": [1, 2, 3]})
    (tmp_path / "rows.jsonl").write_text("\n".join(rows) + "\n")
    path = study(tmp_path, metric="{kind: loss, at: 1}")
    code, err = validate(path, capsys)
    assert code == 2, err
    assert located(err, path, 12, "experiments.0.positions.0"), err
    assert "row 13" in err and "outside its 3 tokens" in err


def test_metric_needs_a_next_token_in_every_row(tmp_path, capsys):
    path = study(tmp_path, metric="{kind: loss, at: last}")
    code, err = validate(path, capsys)
    assert code == 2 and located(err, path, 8, "metric.at"), err
    assert "no token after position 9" in err


@pytest.mark.slow
def test_no_traceback_from_a_real_process(tmp_path):
    """The installed entry point, as a user runs it: exit 2, located, no traceback."""
    write_module(tmp_path, "broken_model_proc", "def build():\n    raise ValueError('bad')\n")
    path = study(tmp_path, model="factory: broken_model_proc:build")
    proc = procs.run(
        [sys.executable, "-m", "mi_spec.cli.main", "validate", str(path)],
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"{path}:3:"), proc.stderr


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("model.device=banana", "unknown device 'banana'"),
        ("model.adapter=gpt2", "the gpt2 adapter does not fit this AttnOnlyTransformer"),
    ],
)
def test_model_section_mistakes_are_located(tmp_path, capsys, override, needle):
    code, err = validate(study(tmp_path), capsys, override)
    assert code == 2 and needle in err and err.startswith(f"--set {override}:"), err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a CPU-only machine")
def test_cuda_device_without_cuda(tmp_path, capsys):
    code, err = validate(study(tmp_path), capsys, "model.device=cuda")
    assert code == 2 and "CUDA is not available here" in err, err
