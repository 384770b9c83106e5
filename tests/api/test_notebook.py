"""``mi_spec.notebook``: the README's notebook example, run as written (a copy of the bundled
patching hypothesis, 64 rows, synchronous runner, a temporary MLflow store), and its tables,
figures and run ids checked against what MLflow stored (read back through the MLflow client)."""

from __future__ import annotations

import csv
import io
import math
import re
import shutil
import struct
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from mi_spec import notebook
from mi_spec.errors import SpecError

ROOT = Path(__file__).resolve().parents[2]


def readme_example() -> str:
    """The first python block of the README's "Notebooks" section."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("\n## Notebooks\n") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """The README example's namespace after running it in a fresh folder, and the store's URI."""
    tmp = tmp_path_factory.mktemp("notebook")
    (tmp / "hypotheses").mkdir()
    shutil.copy(ROOT / "hypotheses" / "induction_patching.yaml", tmp / "hypotheses")
    uri = f"sqlite:///{tmp}/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
        namespace: dict = {}
        exec(compile(readme_example(), "README.md:Notebooks", "exec"), namespace)
    assert not list(tmp.glob(".mi_spec_notebook_*"))  # the dict spec's file is gone
    return namespace, uri


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_tables_are_what_mlflow_stored(example):
    ns, uri = example
    res = ns["res"]
    client = MlflowClient(uri)
    parent = client.get_run(res.run_id)
    assert parent.info.run_name == "induction-patching" and parent.info.status == "FINISHED"
    assert set(res.child_run_ids) == {"heads", "residual", "heads-mean-ablation"}
    assert set(res.metrics) == {"activation_patching", "ablation"}
    for experiment, run_id in res.child_run_ids.items():
        child = client.get_run(run_id)
        assert child.data.tags["mlflow.parentRunId"] == res.run_id
        frame = res.metrics[child.data.tags["mi_spec.kind"]].loc[experiment]
        logged = child.data.metrics
        assert len(frame) == len([k for k in logged if not k.endswith((".ci_low", ".ci_high"))])
        for metric, row in frame.iterrows():  # every metric, estimate and CI, as MLflow has it
            assert row.estimate == logged[metric]
            for bound in ("ci_low", "ci_high"):
                want = logged.get(f"{metric}.{bound}")
                assert (math.isnan(row[bound]) and want is None) or row[bound] == want
    heads = res.headline.loc[("heads", "patch.max_effect")]
    assert heads.kind == "activation_patching"
    assert heads.estimate == parent.data.metrics["heads/patch.max_effect"]
    assert heads.ci_low <= heads.estimate <= heads.ci_high
    assert heads.estimate > 0.9  # the induction head carries the copying
    assert set(res.headline.index.get_level_values("metric")) == {
        "patch.metric.clean",
        "patch.metric.source",
        "patch.max_effect",
        "ablation.metric.clean",
        "ablation.max_effect",
    }  # headline rows only, no CI companions


def test_result_table_and_figure_match_the_logged_artifacts(example):
    ns, uri = example
    res = ns["res"]
    client = MlflowClient(uri)
    heads = res.child_run_ids["heads"]
    with open(client.download_artifacts(heads, "effects.csv")) as f:
        rows = list(csv.DictReader(f))
    table = res.tables["heads"]["effects.csv"]
    assert list(table.columns) == list(rows[0]) and len(table) == len(rows)
    for (_, got), want in zip(table.iterrows(), rows, strict=True):
        assert got["label"] == want["label"]
        assert math.isclose(float(want["effect_norm"]), got["effect_norm"], abs_tol=1e-12)
    figure = res.figures["heads"]["heatmap.png"]
    logged = Path(client.download_artifacts(heads, "heatmap.png")).read_bytes()
    assert figure.png == logged and figure._repr_png_() == logged
    width, height = png_size(logged)
    mpl = figure.to_matplotlib()
    assert tuple(round(x) for x in mpl.get_size_inches() * mpl.dpi) == (width, height)
    buf = io.BytesIO()
    mpl.savefig(buf, format="png", dpi=mpl.dpi)  # drawn back at the same size
    assert png_size(buf.getvalue()) == (width, height)


def test_a_spec_built_in_python_runs_only_what_it_names(example):
    ns, uri = example
    v3, res = ns["v3"], ns["res"]
    parent = MlflowClient(uri).get_run(v3.run_id)
    assert v3.hypothesis == "induction-patching-v3" == parent.info.run_name
    assert list(v3.child_run_ids) == ["heads"] and list(v3.metrics) == ["activation_patching"]
    assert parent.data.params["data.params.seed"] == "3"
    mine, base = (r.headline.loc[("heads", "patch.max_effect")] for r in (v3, res))
    assert mine.estimate > 0.9 and mine.estimate != base.estimate  # other data, same mechanism


def test_track_false_logs_nothing_and_bad_specs_are_located(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/never.db")
    spec = {
        "extends": str(ROOT / "hypotheses" / "induction_patching.yaml"),
        "name": "nb-bad",
        "experiments": [{"kind": "activation_patching", "name": "x", "samples": "many"}],
    }
    with pytest.raises(SpecError, match=r"experiments\.0\.samples"):
        notebook.run(spec, track=False, cache_dir=None, quiet=True)
    assert not (tmp_path / "never.db").exists() and list(tmp_path.iterdir()) == []
