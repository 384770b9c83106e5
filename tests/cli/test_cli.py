"""The CLI: exit codes, located errors without tracebacks, plan output, schema freshness."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import procs

from mi_spec.cli.main import main
from mi_spec.compile.schema import hypothesis_schema, render

ROOT = Path(__file__).resolve().parents[2]
SWEEP = "experiments:\n  - {kind: activation_patching, sites: ['L*.H*'], positions: [mid]}\n"

FIVE_MISTAKES = """\
name: broken
model:
  hf_config: {model_type: gpt2, n_layer: 1}
  dtype: float64
data:
  path: rows.jsonl
metric: {kind: perplexity}
experiments:
  - kind: activation_patching
    sites: []
    smaples: 10
  - kind: ablation
    sites: [L0.H0]
    method: erase
"""


def test_validate_ok(study_file, capsys):
    assert main(["validate", str(study_file(SWEEP))]) == 0
    assert "ok:" in capsys.readouterr().out


def test_validate_reports_every_mistake_located(tmp_path, capsys):
    f = tmp_path / "broken.yaml"
    f.write_text(FIVE_MISTAKES)
    assert main(["validate", str(f)]) == 2
    err = capsys.readouterr().err
    located = [line for line in err.splitlines() if line.startswith(f"{f}:")]
    assert len(located) == 5, err
    for where, needle in [
        (":4:", "dtype"),
        (":7:", "metric.kind"),
        (":10:", "experiments.0.sites"),
        (":11:", "smaples"),
        (":14:", "experiments.1.method"),
    ]:
        assert any(where in line and needle in line for line in located), (where, err)
    assert "did you mean 'samples'" in err


def test_no_traceback_on_bad_input(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text(FIVE_MISTAKES)
    proc = procs.run(
        [sys.executable, "-m", "mi_spec.cli.main", "validate", str(f)],
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "broken.yaml:4:" in proc.stderr


def test_unknown_site_lists_nearby(study_file, capsys):
    body = "experiments:\n  - {kind: ablation, sites: [L1.H9], method: zero}\n"
    assert main(["validate", str(study_file(body))]) == 2
    err = capsys.readouterr().err
    assert "head 9 out of range" in err and "L1.H3" in err and "experiments.0" in err


def test_plan_summary_and_json(study_file, capsys):
    path = study_file(SWEEP)
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert "1 jobs" in out and "8 variants" in out and "forward passes" in out
    assert main(["plan", str(path), "--json", "--set", "experiments.0.batch_size=4"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert len(plan["jobs"]) == 4 and all(len(j["rows"]) == 4 for j in plan["jobs"])


def test_committed_schema_is_current():
    committed = (ROOT / "schemas" / "hypothesis.schema.json").read_text()
    assert committed == render(hypothesis_schema()), "run `mi-spec schema` and commit the result"
