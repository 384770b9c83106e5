"""``mi-spec compare``: three real studies (two versions of the patching hypothesis and the
causal scrubbing one) in one temporary store, listed as table, CSV and JSON, filtered by
hypothesis, kind and tag."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import sys

import procs
import pytest
from tracking.studies import HEADLINE, PATCHING, PATCHING_SMALL, SCRUB, run_small, variant

from mi_spec.cli.main import main

EXPERIMENTS = ["heads", "residual", "heads-mean-ablation"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """(uri, v2 path) of a store holding induction-patching, its v2, and induction-scrub."""
    tmp = tmp_path_factory.mktemp("compare")
    uri = f"sqlite:///{tmp}/mlflow.db"
    v2 = variant(tmp)
    run_small(PATCHING, uri)
    run_small(v2, uri, PATCHING_SMALL[1:])
    run_small(SCRUB, uri)
    return uri, v2


@pytest.fixture
def compare(store, capsys, monkeypatch):
    """Run ``mi-spec compare ARGS`` on the store; (exit code, stdout, stderr)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    def run(*args: str) -> tuple[int, str, str]:
        code = main(["compare", "--tracking-uri", store[0], *args])
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def num(x: float) -> str:
    return f"{x:#.4g}".rstrip(".")


def rows_of(compare, *args: str) -> list[dict]:
    code, out, _ = compare("--format", "json", *args)
    assert code == 0
    return json.loads(out)


def test_json_lists_every_experiment_run_with_headline_metrics_and_cis(compare):
    rows = rows_of(compare)
    names = [r["run"] for r in rows]
    assert sorted(names) == sorted(
        [f"{e}@{h}" for e in EXPERIMENTS for h in ("induction-patching", "induction-patching-v2")]
        + ["causal_scrubbing@induction-scrub"]
    )
    assert names[0] == "causal_scrubbing@induction-scrub"  # newest first
    starts = [r["start_time"] for r in rows]
    assert starts == sorted(starts, reverse=True)
    for row in rows:
        assert row["status"] == "FINISHED" and len(row["parent_run_id"]) == 32
        assert row["hypothesis"] == row["run"].split("@")[1]
        metrics = [k for k in row if k.startswith(("patch.", "ablation.", "scrub."))]
        expected = HEADLINE[row["kind"]]
        assert [k for k in metrics if not k.endswith(("ci_low", "ci_high"))] == expected
        for name in expected:
            if name != "scrub.control.random_mean":  # a mean over controls: no CI
                assert row[f"{name}.ci_low"] <= row[name] <= row[f"{name}.ci_high"]
    scrub = rows[0]
    assert scrub["scrub.loss_recovered"] > 0.9 > scrub["scrub.control.random_mean"]


def test_two_versions_of_a_hypothesis_line_up(compare):
    rows = rows_of(compare, "--kind", "activation_patching", "--hypothesis", "induction-patching*")
    heads = {r["hypothesis"]: r for r in rows if r["run"].startswith("heads@")}
    assert set(heads) == {"induction-patching", "induction-patching-v2"}
    v1, v2 = heads["induction-patching"], heads["induction-patching-v2"]
    assert v1["patch.max_effect"] != v2["patch.max_effect"]  # other data, other estimate
    assert v1["patch.max_effect"] > 0.9 and v2["patch.max_effect"] > 0.9  # same mechanism


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--hypothesis", "induction-scrub"], {"causal_scrubbing@induction-scrub"}),
        (
            ["--hypothesis", "induction-scrub", "--hypothesis", "induction-patching"],
            {"causal_scrubbing@induction-scrub"} | {f"{e}@induction-patching" for e in EXPERIMENTS},
        ),
        (
            ["--kind", "ablation"],
            {"heads-mean-ablation@induction-patching", "heads-mean-ablation@induction-patching-v2"},
        ),
        (
            ["--kind", "abl*", "--hypothesis", "*-v2"],
            {"heads-mean-ablation@induction-patching-v2"},
        ),
        (
            ["--kind", "ablation", "--kind", "causal_scrubbing"],
            {
                "heads-mean-ablation@induction-patching",
                "heads-mean-ablation@induction-patching-v2",
                "causal_scrubbing@induction-scrub",
            },
        ),
        (
            ["--tag", "mi_spec.hypothesis=induction-patching-v2", "--kind", "activation_patching"],
            {"heads@induction-patching-v2", "residual@induction-patching-v2"},
        ),
        (["--tag", "mi_spec.runner=synchronous", "--tag", "mi_spec.kind=das"], set()),
    ],
)
def test_filters(compare, args, expected):
    assert {r["run"] for r in rows_of(compare, *args)} == expected


def test_filter_by_file_hash_of_an_extended_file(compare, store):
    _, v2 = store
    digest = hashlib.sha256(PATCHING.read_bytes() + v2.read_bytes()).hexdigest()
    rows = rows_of(compare, "--tag", f"mi_spec.file_hash={digest}")
    assert {r["hypothesis"] for r in rows} == {"induction-patching-v2"} and len(rows) == 3
    plain = hashlib.sha256(PATCHING.read_bytes()).hexdigest()
    assert {r["hypothesis"] for r in rows_of(compare, "--tag", f"mi_spec.file_hash={plain}")} == {
        "induction-patching"
    }


def test_csv_parses_back_to_the_json_rows(compare):
    code, out, _ = compare("--format", "csv")
    assert code == 0
    reader = csv.DictReader(io.StringIO(out))
    assert reader.fieldnames[:5] == ["run", "hypothesis", "kind", "status", "start_time"]
    assert reader.fieldnames[-2:] == ["run_id", "parent_run_id"]
    table = list(reader)
    rows = rows_of(compare)
    assert [r["run"] for r in table] == [r["run"] for r in rows]
    for got, want in zip(table, rows, strict=True):
        for key, value in want.items():
            assert (float(got[key]) if isinstance(value, float) else got[key]) == value
        assert all(got[k] == "" for k in got if k not in want)  # other kinds' metrics: empty


def test_metric_globs_and_all_metrics(compare):
    rows = rows_of(compare, "--kind", "causal_scrubbing", "--metric", "scrub.drop.*")
    (row,) = rows
    drops = [k for k in row if k.startswith("scrub.drop.") and not k.endswith(("low", "high"))]
    assert len(drops) == 6  # one per node of the hypothesis
    assert not any(k.startswith("scrub.loss") for k in row)
    assert all(row[f"{k}.ci_low"] <= row[k] <= row[f"{k}.ci_high"] for k in drops)
    (full,) = rows_of(compare, "--kind", "causal_scrubbing", "--all-metrics")
    assert {"scrub.loss_recovered", "scrub.power.min_agreeing"} <= set(full)
    assert set(row) < set(full)


def test_table_has_a_section_per_kind_and_fits_the_terminal(compare, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    code, out, _ = compare()
    assert code == 0
    assert max(len(line) for line in out.splitlines()) <= 100
    for header in ("activation_patching (4 runs)", "ablation (2 runs)", "causal_scrubbing (1 run)"):
        assert header in out
    rows = rows_of(compare, "--hypothesis", "induction-scrub")
    value = rows[0]["scrub.loss_recovered"]
    low, high = rows[0]["scrub.loss_recovered.ci_low"], rows[0]["scrub.loss_recovered.ci_high"]
    assert f"{num(value)} [{num(low)}, {num(high)}]" in out
    assert "heads-mean-ablation  induction-patching-v2" in out  # experiment, then hypothesis
    monkeypatch.setenv("COLUMNS", "250")
    _, wide, _ = compare("--kind", "ablation")
    lines = wide.splitlines()
    assert lines[2].split() == [
        "experiment", "hypothesis", "status", "started", "parent",
        "ablation.metric.clean", "ablation.max_effect",
    ]  # fmt: skip
    assert len([line for line in lines if line.startswith("heads-mean-ablation")]) == 2


def test_no_runs_is_a_message_and_exit_0(compare):
    code, out, err = compare("--hypothesis", "nope")
    assert code == 0 and out == "" and "no experiment runs" in err and "--hypothesis nope" in err
    code, out, err = compare("--experiment", "elsewhere", "--format", "json")
    assert code == 0 and json.loads(out) == [] and "'elsewhere'" in err


def test_bad_tag_argument(compare):
    code, _, err = compare("--tag", "no-equals-sign")
    assert code == 1 and "KEY=VALUE" in err


def test_missing_or_unreachable_store_is_an_error_without_traceback(tmp_path):
    missing = f"sqlite:///{tmp_path}/none.db"
    proc = procs.run(  # its own process group, ended whatever happens; a generous limit
        [sys.executable, "-m", "mi_spec.cli.main", "compare", "--tracking-uri", missing]
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "no MLflow store at" in proc.stderr
    assert not (tmp_path / "none.db").exists()  # looking never creates a store


def test_unreachable_server(capsys, monkeypatch):
    import socket

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["compare", "--tracking-uri", f"http://127.0.0.1:{port}"]) == 1
    assert "cannot reach MLflow tracking server" in capsys.readouterr().err


def test_continuation_panels_lead_with_experiment_and_hypothesis(compare, monkeypatch):
    """With every metric of v1 and v2 the table needs several panels; each starts with the
    experiment and the hypothesis, so every row says whose it is."""
    monkeypatch.setenv("COLUMNS", "120")
    code, out, _ = compare("--kind", "activation_patching", "--all-metrics")
    assert code == 0
    panels = out.split("\n\n")[1:]  # after the "activation_patching (4 runs)" line
    assert len(panels) > 2
    want = {
        (e, h)
        for e in ("heads", "residual")
        for h in ("induction-patching", "induction-patching-v2")
    }
    for panel in panels:
        header, rule, *lines = panel.splitlines()
        assert header.split()[:2] == ["experiment", "hypothesis"], header
        assert {tuple(line.split()[:2]) for line in lines} == want
        assert max(len(line) for line in panel.splitlines()) <= 120


@pytest.fixture
def quoted_store(tmp_path, monkeypatch):
    """Two studies whose ``mi_spec.author`` tags differ only by quotes (synthetic reports)."""
    from mi_spec.analysis.report import ExperimentReport, StudyRecord
    from mi_spec.tracking.base import tracking
    from mi_spec.tracking.mlflow_tracker import MlflowTracker

    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    uri = f"sqlite:///{tmp_path}/quoted.db"
    for name, author in (("a", "O'Neil"), ("b", "ONeil"), ("c", 'say "hi"'), ("d", 'it\'s "x"')):
        tracker = MlflowTracker(uri)
        study = StudyRecord(name, {}, {"mi_spec.hypothesis": name, "mi_spec.author": author}, {})
        with tracking(tracker, study):
            tracker.log_experiment(ExperimentReport(f"heads@{name}", "activation_patching"))
    return uri


@pytest.mark.parametrize(
    ("tag", "expected"),
    [
        ("O'Neil", {"heads@a"}),
        ("ONeil", {"heads@b"}),
        ('say "hi"', {"heads@c"}),
        ("nobody's", set()),
    ],
)
def test_tag_values_with_quotes_filter_exactly(quoted_store, capsys, tag, expected):
    code = main(
        [
            "compare",
            "--tracking-uri",
            quoted_store,
            "--format",
            "json",
            "--tag",
            f"mi_spec.author={tag}",
        ]
    )
    out = capsys.readouterr()
    assert code == 0
    assert {r["run"] for r in json.loads(out.out)} == expected


def test_a_tag_value_with_both_quotes_is_refused(quoted_store, capsys):
    code = main(["compare", "--tracking-uri", quoted_store, "--tag", 'mi_spec.author=it\'s "x"'])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert '--tag mi_spec.author=it\'s "x"' in err and "cannot quote" in err


def test_experiment_name_from_the_environment(quoted_store, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "elsewhere")
    assert main(["compare", "--tracking-uri", quoted_store]) == 0
    assert "no experiment runs in experiment 'elsewhere'" in capsys.readouterr().err
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "mi_spec")
    assert main(["compare", "--tracking-uri", quoted_store, "--format", "json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 4
