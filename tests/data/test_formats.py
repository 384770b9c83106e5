"""Datasets as users have them: JSONL, Parquet and a Hugging Face ``save_to_disk`` folder, with the
file's own column names mapped by ``data.columns`` (a column used as text, as the counterfactual
text and as the metric's targets). Each gives the generator's dataset and the same results.

The ``save_to_disk`` layout (``state.json`` listing Arrow IPC stream files ``data-0000i-of-0000n
.arrow``, ``dataset_info.json``) is written with pyarrow here, and checked against a folder
``datasets`` really wrote when it is installed (it is not a dependency of mi_spec).
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mi_spec.api import compile_file
from mi_spec.errors import SpecError
from mi_spec.execute.ops import op_for
from mi_spec.execute.worker import loaded_for
from mi_spec.zoo import ioi

RENAME = {"text": "prompt", "cf_text": "corrupted", "io": "answer", "s": "distractor"}
MAPPING = "{text: prompt, cf_text: corrupted, io: answer, s: distractor}"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return ioi.train_tokenizer(tmp_path_factory.mktemp("tok"))


def file_rows(n: int = 8) -> list[dict]:
    """The generator's rows under the names a user's file might have."""
    return [{RENAME.get(k, k): v for k, v in r.items()} for r in ioi.rows(n=n, seed=3)]


def write_save_to_disk(folder, rows: list[dict], shards: int = 1) -> None:
    """The folder ``datasets.Dataset.save_to_disk`` writes, with pyarrow only."""
    folder.mkdir()
    table = pa.Table.from_pylist(rows)
    step = -(-len(rows) // shards)
    names = [f"data-{i:05d}-of-{shards:05d}.arrow" for i in range(shards)]
    for i, name in enumerate(names):
        with (
            pa.OSFile(str(folder / name), "wb") as sink,
            pa.ipc.new_stream(sink, table.schema) as w,
        ):
            w.write_table(table.slice(i * step, step))
    (folder / "dataset_info.json").write_text(json.dumps({"features": {}}))
    state = {"_data_files": [{"filename": n} for n in names], "_split": None}
    (folder / "state.json").write_text(json.dumps(state))


def study(tmp_path, tokenizer, data: str, name: str = "h") -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"""
name: formats
model:
  hf_config: {{model_type: gpt2, n_layer: 2, n_embd: 32, n_head: 4, vocab_size: 80, n_positions: 40}}
data:
{data}
  text: text
  tokenizer: {tokenizer}
  padding_side: left
  positions:
    S2: {{column: s2_pos, counterfactual: cf_s2_pos}}
    end: -1
metric: {{kind: logit_diff, at: end, target: io, wrong: s}}
experiments:
  - {{kind: activation_patching, name: act, sites: [L0.H1, L1.mlp_out], positions: [end, S2],
      source: {{column: cf_text}}, batch_size: 8}}
""")
    return str(path)


def run(path: str):
    spec, plan = compile_file(path)
    state = loaded_for(plan, model=spec.model)
    return plan, [op_for(j.op)(j, plan, state.engine, state.data) for j in plan.jobs]


def same_results(a, b) -> None:
    for x, y in zip(a, b, strict=True):
        assert x.clean == y.clean and x.source == y.source and x.variants == y.variants


@pytest.fixture(scope="module")
def from_generator(tmp_path_factory, tokenizer):
    tmp = tmp_path_factory.mktemp("gen")
    data = "  generator: mi_spec.zoo.ioi:rows\n  params: {n: 8, seed: 3}"
    return run(study(tmp, tokenizer, data))


def test_mapped_jsonl_parquet_and_folder_equal_the_generator(tmp_path, tokenizer, from_generator):
    plan0, want = from_generator
    rows = file_rows()
    with open(tmp_path / "rows.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
    write_save_to_disk(tmp_path / "saved", rows, shards=3)
    for source in ("rows.jsonl", "rows.parquet", "saved"):
        data = f"  path: {source}\n  columns: {MAPPING}"
        plan, got = run(study(tmp_path, tokenizer, data, name=source.split(".")[-1]))
        assert plan.data.data_hash == plan0.data.data_hash, source
        same_results(got, want)
    assert any(v != c for v, c in zip(want[0].variants[0], want[0].clean, strict=True))


def test_a_folder_datasets_wrote(tmp_path, tokenizer, from_generator):
    datasets = pytest.importorskip("datasets")
    rows = file_rows(n=12)
    ds = datasets.Dataset.from_list(rows).select(range(8))  # an indices mapping: flattened
    ds.save_to_disk(str(tmp_path / "saved"), num_shards=2)
    names = sorted(p.name for p in (tmp_path / "saved").iterdir())
    assert names == [
        "data-00000-of-00002.arrow",
        "data-00001-of-00002.arrow",
        "dataset_info.json",
        "state.json",
    ]
    with pa.memory_map(str(tmp_path / "saved" / names[0])) as source:
        assert pa.ipc.open_stream(source).read_all().num_rows == 4  # Arrow IPC stream format
    plan, got = run(study(tmp_path, tokenizer, f"  path: saved\n  columns: {MAPPING}"))
    assert plan.data.data_hash == from_generator[0].data.data_hash
    same_results(got, from_generator[1])
    assert datasets.load_from_disk(str(tmp_path / "saved")).to_list() == rows[:8]


def test_a_dataset_dict_folder_names_its_splits(tmp_path, tokenizer):
    (tmp_path / "dd").mkdir()
    for split in ("train", "test"):
        write_save_to_disk(tmp_path / "dd" / split, file_rows(2))
    (tmp_path / "dd" / "dataset_dict.json").write_text('{"splits": ["train", "test"]}')
    with pytest.raises(SpecError) as e:
        compile_file(study(tmp_path, tokenizer, f"  path: dd\n  columns: {MAPPING}"))
    msg = str(e.value)
    assert "h.yaml:" in msg and "data.path" in msg and "dd/test, dd/train" in msg


@pytest.mark.parametrize(
    ("setup", "data", "expected"),
    [
        ("folder", "  path: empty", "without state.json"),
        ("parquet", "  path: bad.parquet", "not a readable Parquet file"),
        ("jsonl", f"  path: rows.jsonl\n  columns: {MAPPING[:-1]}, wrong2: nope}}", "'nope'"),
    ],
)
def test_bad_files_are_located_errors(tmp_path, tokenizer, setup, data, expected):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with open(tmp_path / "rows.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in file_rows(2))
    with pytest.raises(SpecError) as e:
        compile_file(study(tmp_path, tokenizer, data))
    msg = str(e.value)
    assert "h.yaml:" in msg and expected in msg
    field = "data.columns" if setup == "jsonl" else "data.path"
    assert field in msg
    if setup == "jsonl":  # the error lists the file's columns
        assert "prompt" in msg and "corrupted" in msg


def test_unmapped_names_are_not_the_files(tmp_path, tokenizer):
    """Without the mapping the file's names stand: ``text`` is not a column, a located error."""
    with open(tmp_path / "rows.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in file_rows(2))
    with pytest.raises(SpecError) as e:
        compile_file(study(tmp_path, tokenizer, "  path: rows.jsonl"))
    assert "h.yaml:" in str(e.value) and "'text'" in str(e.value)
