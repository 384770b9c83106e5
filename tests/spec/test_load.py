"""Loading hypothesis YAML: marks, safe loading, `extends`, `--set` overrides, dumping."""

from __future__ import annotations

import tempfile
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from mi_spec.errors import SpecError, SpecIssue
from mi_spec.spec.load import (
    SET_FILE,
    LoadedDoc,
    deep_merge,
    dump_yaml,
    load_yaml,
    set_path,
)

BAD = Path(__file__).parent / "bad"


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def only_issue(err: pytest.ExceptionInfo[SpecError]) -> SpecIssue:
    assert len(err.value.issues) == 1, err.value.issues
    return err.value.issues[0]


HYP = """
# a comment line
name: demo
samples: 16
ratio: 0.25
enabled: yes
nothing: ~
date: 2024-01-01
on: 1
experiments:
  - kind: activation_patching
    seeds: [0, 1]
    sites:
      - L0.attn
      - L1.mlp
"""


# --- plain loading and marks -------------------------------------------------------------------


def test_scalars_resolve_like_yaml(tmp_path: Path) -> None:
    doc = load_yaml(write(tmp_path, "h.yaml", HYP))
    assert doc.data == {
        "name": "demo",
        "samples": 16,
        "ratio": 0.25,
        "enabled": True,
        "nothing": None,
        "date": "2024-01-01",
        "on": 1,
        "experiments": [
            {"kind": "activation_patching", "seeds": [0, 1], "sites": ["L0.attn", "L1.mlp"]}
        ],
    }


def test_doc_fields(tmp_path: Path) -> None:
    path = write(tmp_path, "h.yaml", HYP)
    doc = load_yaml(str(path))
    assert isinstance(doc, LoadedDoc)
    assert doc.path == path
    assert doc.files == [path]
    assert doc.text == path.read_text()
    assert doc.overrides == []


def test_marks_point_at_keys_and_items(tmp_path: Path) -> None:
    path = write(tmp_path, "h.yaml", HYP)
    doc = load_yaml(path)
    f = str(path)
    assert doc.marks[("samples",)] == (f, 3, 1)
    assert doc.marks[("experiments",)] == (f, 9, 1)
    assert doc.marks[("experiments", 0)] == (f, 10, 5)
    assert doc.marks[("experiments", 0, "seeds")] == (f, 11, 5)
    assert doc.marks[("experiments", 0, "seeds", 1)] == (f, 11, 16)
    assert doc.marks[("experiments", 0, "sites", 1)] == (f, 14, 9)


def test_value_marks_point_at_values(tmp_path: Path) -> None:
    path = write(tmp_path, "h.yaml", HYP)
    doc = load_yaml(path)
    assert doc.value_marks[("samples",)] == (str(path), 3, 10)
    assert doc.value_marks[("experiments", 0, "kind")] == (str(path), 10, 11)


def test_every_value_has_a_mark(tmp_path: Path) -> None:
    doc = load_yaml(write(tmp_path, "h.yaml", HYP))

    def paths(value: Any, path: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
        items = value.items() if isinstance(value, dict) else []
        if isinstance(value, list):
            items = enumerate(value)
        return [path, *(p for k, v in items for p in paths(v, (*path, k)))]

    assert set(paths(doc.data)) == set(doc.marks)


def test_anchors_and_merge_keys(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "h.yaml",
        """
        defaults: &d
          lr: 0.1
          steps: 5
        run:
          <<: *d
          steps: 7
        again: *d
        """,
    )
    doc = load_yaml(path)
    assert doc.data["run"] == {"steps": 7, "lr": 0.1}
    assert doc.data["again"] == {"lr": 0.1, "steps": 5}
    assert doc.marks[("run", "lr")] == (str(path), 2, 3)  # where the merged value was written


def test_recursive_alias_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "h.yaml", "a: &x\n  b: *x\n")
    with pytest.raises(SpecError, match="recursive alias") as err:
        load_yaml(path)
    assert only_issue(err).path == "a.b"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- a\n- b\n", "the top level must be a mapping, found a list"),
        ("just text\n", "the top level must be a mapping, found 'just text'"),
        ("# nothing\n", "the file is empty: expected a mapping"),
    ],
)
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(SpecError) as err:
        load_yaml(write(tmp_path, "h.yaml", text))
    issue = only_issue(err)
    assert issue.message == message
    assert (issue.line, issue.col) == (1, 1)


def test_missing_main_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="file not found") as err:
        load_yaml(tmp_path / "nope.yaml")
    assert only_issue(err).file == str(tmp_path / "nope.yaml")


# --- safe loading, duplicates, syntax errors ----------------------------------------------------


def test_python_tags_are_rejected() -> None:
    path = BAD / "python_tag.yaml"
    with pytest.raises(SpecError) as err:
        load_yaml(path)
    assert [str(i) for i in err.value.issues] == [
        f"{path}:2:9: metric: unsupported YAML tag '!!python/object/apply:os.system': "
        "only plain data is allowed",
        f"{path}:3:9: scorer: unsupported YAML tag '!function': only plain data is allowed",
    ]


@pytest.mark.parametrize("tagged", ["!!set {a, b}", "!!binary aGk=", "!!omap [a: 1]", "!x 3"])
def test_non_data_tags_are_rejected(tmp_path: Path, tagged: str) -> None:
    with pytest.raises(SpecError, match="unsupported YAML tag") as err:
        load_yaml(write(tmp_path, "h.yaml", f"ok: 1\nvalue: {tagged}\n"))
    issue = only_issue(err)
    assert (issue.line, issue.col) == (2, 8)


def test_explicit_standard_tags_are_fine(tmp_path: Path) -> None:
    doc = load_yaml(write(tmp_path, "h.yaml", 'a: !!str 5\nb: !!int "7"\nc: !!float 1\n'))
    assert doc.data == {"a": "5", "b": 7, "c": 1.0}


def test_duplicate_keys() -> None:
    path = BAD / "duplicate_key.yaml"
    with pytest.raises(SpecError) as err:
        load_yaml(path)
    assert str(only_issue(err)) == (
        f"{path}:5:5: experiments.0.samples: duplicate key 'samples' (first defined at line 4, col 5)"
    )


def test_syntax_error_position() -> None:
    path = BAD / "syntax_error.yaml"
    with pytest.raises(SpecError) as err:
        load_yaml(path)
    issue = only_issue(err)
    assert (issue.file, issue.line, issue.col) == (str(path), 5, 12)
    assert issue.message == (
        "invalid YAML: expected ',' or ']', but got ':' "
        "(while parsing a flow sequence started at line 4, col 12)"
    )


def test_syntax_error_in_block_mapping(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as err:
        load_yaml(write(tmp_path, "h.yaml", "a: 1\nb: c: d\n"))
    issue = only_issue(err)
    assert (issue.line, issue.col) == (2, 5)
    assert issue.message.startswith("invalid YAML: mapping values are not allowed here")


def test_not_a_mapping_fixture() -> None:
    with pytest.raises(SpecError, match="the top level must be a mapping, found a list"):
        load_yaml(BAD / "not_a_mapping.yaml")


def test_several_documents_are_an_error(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="expected a single document") as err:
        load_yaml(write(tmp_path, "h.yaml", "a: 1\n---\nb: 2\n"))
    assert only_issue(err).line == 2


# --- unreadable text, located -------------------------------------------------------------------


def test_bad_utf8_is_located_at_the_first_bad_byte() -> None:
    path = BAD / "bad_utf8.yaml"
    with pytest.raises(SpecError) as err:
        load_yaml(path)
    # line 1 (a comment) holds the first non-UTF-8 byte, after 24 characters
    assert str(only_issue(err)) == f"{path}:1:25: invalid UTF-8 byte 0xe9; save the file as UTF-8"


def test_bad_utf8_column_counts_characters(tmp_path: Path) -> None:
    path = tmp_path / "h.yaml"
    path.write_bytes("a: 1\nb: «é» ".encode() + b"\xff\n")
    with pytest.raises(SpecError) as err:
        load_yaml(path)
    assert (only_issue(err).line, only_issue(err).col) == (2, 8)


def test_utf16_says_so(tmp_path: Path) -> None:
    path = tmp_path / "h.yaml"
    path.write_text("name: demo\n", encoding="utf-16")
    with pytest.raises(SpecError, match="the file is UTF-16") as err:
        load_yaml(path)
    assert (only_issue(err).line, only_issue(err).col) == (1, 1)


def test_bad_utf8_in_an_extended_file_names_that_file(tmp_path: Path) -> None:
    base = tmp_path / "base.yaml"
    base.write_bytes(b"a: 1\nb: \xc3(\n")
    with pytest.raises(SpecError) as err:
        load_yaml(write(tmp_path, "main.yaml", "extends: base.yaml\n"))
    assert str(only_issue(err)) == f"{base}:2:4: invalid UTF-8 byte 0xc3; save the file as UTF-8"


def test_nul_byte_is_located() -> None:
    path = BAD / "nul_byte.yaml"
    with pytest.raises(SpecError) as err:
        load_yaml(path)
    assert str(only_issue(err)) == (
        f"{path}:2:18: invalid YAML: found the control character '\\x00' (U+0000), "
        "which YAML does not allow; remove it"
    )


@pytest.mark.parametrize("char", ["\x07", "\x1b", "\x7f", "\ufffe"])
def test_other_refused_characters_are_located(tmp_path: Path, char: str) -> None:
    with pytest.raises(SpecError, match="control character") as err:
        load_yaml(write(tmp_path, "h.yaml", f"a: 1\nb: [x, 'y{char}']\n"))
    assert (only_issue(err).line, only_issue(err).col) == (2, 10)


def test_unclosed_quote_is_located_where_it_opens() -> None:
    path = BAD / "unclosed_quote.yaml"
    with pytest.raises(SpecError) as err:
        load_yaml(path)
    assert str(only_issue(err)) == (
        f"{path}:2:14: invalid YAML: expected a closing '\"' for the quoted string that starts "
        "here, found the end of the file at line 5, col 1"
    )


@pytest.mark.parametrize(
    ("text", "where", "end"),
    [
        ("a: 1\nb: 'it''s\nc: 2\n", (2, 4), "the end of the file at line 4, col 1"),
        ('a: "x\n---\nb: 1\n', (1, 4), "a document separator '---' at line 2, col 1"),
        ("a: 1\nb: [1, 2\n", (2, 4), "the end of the file at line 3, col 1"),
        ("a: 1\nb: {c: 2\n", (2, 4), "the end of the file at line 3, col 1"),
    ],
)
def test_unclosed_openers(tmp_path: Path, text: str, where: tuple[int, int], end: str) -> None:
    with pytest.raises(SpecError) as err:
        load_yaml(write(tmp_path, "h.yaml", text))
    issue = only_issue(err)
    assert (issue.line, issue.col) == where
    assert issue.message.startswith("invalid YAML: expected a closing ")
    assert issue.message.endswith(f"that starts here, found {end}")


def test_runaway_quote_is_located_where_it_opens() -> None:
    """A quote closed by the next one: the parse fails later, but the culprit is the opener."""
    path = BAD / "runaway_quote.yaml"
    with pytest.raises(SpecError) as err:
        load_yaml(path)
    issue = only_issue(err)
    assert (issue.line, issue.col) == (3, 14)
    assert issue.message.startswith(
        "invalid YAML: expected a closing '\"' for the quoted string that starts here, found "
        "lines that look like keys inside it; the file stops parsing at line 5, col 13: "
    )


def test_multi_line_quoted_prose_is_not_blamed(tmp_path: Path) -> None:
    text = 'a: "two lines\n  of prose"\nb: c: d\n'
    with pytest.raises(SpecError) as err:
        load_yaml(write(tmp_path, "h.yaml", text))
    assert (only_issue(err).line, only_issue(err).col) == (3, 5)


def test_tab_indentation() -> None:
    path = BAD / "tab_indent.yaml"
    with pytest.raises(SpecError) as err:
        load_yaml(path)
    assert str(only_issue(err)) == (
        f"{path}:3:1: invalid YAML: found a tab character; indent with spaces, not tabs"
    )


@pytest.mark.parametrize(
    ("text", "where", "message"),
    [
        (
            "name: demo\nmodel:\n  factory: a:b\n seed: 1\n",
            (4, 2),
            "bad indentation: expected the indentation of the mapping that starts at line 1, "
            "col 1 (or less), found a more indented key",
        ),
        (
            'data:\n  path: "C:\\data.jsonl"\n',
            (2, 13),
            "found unknown escape character 'd' (while scanning a double-quoted scalar started "
            "at line 2, col 9); in double quotes a backslash starts an escape: use single quotes",
        ),
        (
            "description: Note: this\n",
            (1, 18),
            "mapping values are not allowed here; quote a value that contains ': ', "
            "or check the indentation",
        ),
    ],
)
def test_common_mistakes_have_hints(
    tmp_path: Path, text: str, where: tuple[int, int], message: str
) -> None:
    with pytest.raises(SpecError) as err:
        load_yaml(write(tmp_path, "h.yaml", text))
    issue = only_issue(err)
    assert (issue.line, issue.col) == where
    assert issue.message == f"invalid YAML: {message}"


# --- extends -----------------------------------------------------------------------------------


def test_extends_deep_merges(tmp_path: Path) -> None:
    write(
        tmp_path,
        "base.yaml",
        """
        model: {name: tiny, layers: 2}
        seeds: [0, 1, 2]
        samples: 8
        note: base
        """,
    )
    main = write(
        tmp_path,
        "main.yaml",
        """
        extends: base.yaml
        model: {layers: 4}
        seeds: [7]
        note: null
        """,
    )
    doc = load_yaml(main)
    assert doc.data == {
        "model": {"name": "tiny", "layers": 4},
        "seeds": [7],
        "samples": 8,
        "note": None,
    }
    assert "extends" not in doc.data
    assert doc.files == [tmp_path / "base.yaml", main]


def test_provenance_says_which_file_won(tmp_path: Path) -> None:
    base = write(tmp_path, "base.yaml", "model: {name: tiny, layers: 2}\nsamples: 8\n")
    main = write(tmp_path, "main.yaml", "extends: base.yaml\nmodel:\n  layers: 4\n")
    doc = load_yaml(main)
    assert doc.provenance == {
        ("model", "name"): str(base),
        ("model", "layers"): str(main),
        ("samples",): str(base),
    }
    assert doc.marks[("samples",)] == (str(base), 2, 1)
    assert doc.marks[("model", "layers")] == (str(main), 3, 3)
    assert doc.marks[("model",)] == (str(main), 2, 1)


def test_replaced_list_drops_the_base_items_marks(tmp_path: Path) -> None:
    write(tmp_path, "base.yaml", "seeds: [0, 1, 2]\n")
    main = write(tmp_path, "main.yaml", "extends: base.yaml\nseeds: [5]\n")
    doc = load_yaml(main)
    assert ("seeds", 1) not in doc.marks
    assert doc.marks[("seeds", 0)] == (str(main), 2, 9)


def test_two_level_chain_with_relative_paths(tmp_path: Path) -> None:
    write(tmp_path, "common/root.yaml", "a: root\nb: root\nc: root\n")
    write(tmp_path, "common/mid.yaml", "extends: root.yaml\nb: mid\nc: mid\n")
    main = write(tmp_path, "hyps/main.yaml", "extends: ../common/mid.yaml\nc: main\n")
    doc = load_yaml(main)
    assert doc.data == {"a": "root", "b": "mid", "c": "main"}
    assert [p.name for p in doc.files] == ["root.yaml", "mid.yaml", "main.yaml"]
    assert Path(doc.provenance[("b",)]).name == "mid.yaml"


def test_extends_list_applies_in_order(tmp_path: Path) -> None:
    write(tmp_path, "one.yaml", "a: 1\nb: 1\n")
    write(tmp_path, "two.yaml", "b: 2\nc: 2\n")
    main = write(tmp_path, "main.yaml", "extends: [one.yaml, two.yaml]\nc: 3\n")
    doc = load_yaml(main)
    assert doc.data == {"a": 1, "b": 2, "c": 3}
    assert [p.name for p in doc.files] == ["one.yaml", "two.yaml", "main.yaml"]


def test_diamond_is_not_a_cycle(tmp_path: Path) -> None:
    write(tmp_path, "root.yaml", "a: 0\n")
    write(tmp_path, "left.yaml", "extends: root.yaml\nb: 1\n")
    write(tmp_path, "right.yaml", "extends: root.yaml\nc: 2\n")
    main = write(tmp_path, "main.yaml", "extends: [left.yaml, right.yaml]\n")
    doc = load_yaml(main)
    assert doc.data == {"a": 0, "b": 1, "c": 2}
    assert [p.name for p in doc.files] == ["root.yaml", "left.yaml", "right.yaml", "main.yaml"]


def test_extends_cycle_names_the_chain(tmp_path: Path) -> None:
    a = write(tmp_path, "a.yaml", "extends: b.yaml\nx: 1\n")
    b = write(tmp_path, "b.yaml", "y: 2\nextends: a.yaml\n")
    with pytest.raises(SpecError) as err:
        load_yaml(a)
    issue = only_issue(err)
    assert issue.message == f"extends cycle: {a} -> {b} -> {a}"
    assert (issue.file, issue.line, issue.col) == (str(b), 2, 10)


def test_self_extension_is_a_cycle(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="extends cycle"):
        load_yaml(write(tmp_path, "a.yaml", "extends: ./a.yaml\n"))


def test_missing_extended_file_is_located(tmp_path: Path) -> None:
    main = write(tmp_path, "main.yaml", "name: x\nextends:\n  - base.yaml\n  - gone.yaml\n")
    write(tmp_path, "base.yaml", "a: 1\n")
    with pytest.raises(SpecError) as err:
        load_yaml(main)
    issue = only_issue(err)
    assert issue.message == f"extended file not found: {str(tmp_path / 'gone.yaml')!r}"
    assert (issue.file, issue.line, issue.col, issue.path) == (str(main), 4, 5, "extends.1")


@pytest.mark.parametrize(
    ("text", "path", "found"),
    [
        ("extends: {a: 1}\n", "extends", "a mapping"),
        ('extends: ""\n', "extends", "''"),
        ("extends: [base.yaml, [x]]\n", "extends.1", "a list"),
        ("extends: [base.yaml, ~]\n", "extends.1", "null"),
    ],
)
def test_extends_must_name_files(tmp_path: Path, text: str, path: str, found: str) -> None:
    write(tmp_path, "base.yaml", "a: 1\n")
    with pytest.raises(SpecError) as err:
        load_yaml(write(tmp_path, "main.yaml", text))
    issue = only_issue(err)
    assert issue.path == path
    assert issue.message == f"expected a file name or a list of file names, found {found}"


def test_extends_a_directory(tmp_path: Path) -> None:
    (tmp_path / "shared").mkdir()
    main = write(tmp_path, "main.yaml", "name: x\nextends: shared\n")
    with pytest.raises(SpecError) as err:
        load_yaml(main)
    assert str(only_issue(err)) == (
        f"{main}:2:10: extends: expected a YAML file, found the directory "
        f"{str(tmp_path / 'shared')!r}"
    )


def test_main_file_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as err:
        load_yaml(tmp_path)
    assert str(only_issue(err)) == f"{tmp_path}: expected a YAML file, found the directory"


def test_errors_in_extended_files_name_that_file(tmp_path: Path) -> None:
    base = write(tmp_path, "base.yaml", "a: 1\na: 2\n")
    with pytest.raises(SpecError) as err:
        load_yaml(write(tmp_path, "main.yaml", "extends: base.yaml\n"))
    assert (only_issue(err).file, only_issue(err).line) == (str(base), 2)


# --- overrides ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "path", "value"),
    [
        ("samples=3", ("samples",), 3),
        ("samples=3.5", ("samples",), 3.5),
        ("name=other", ("name",), "other"),
        ("name='007'", ("name",), "007"),
        ("on=true", ("on",), True),
        ("nothing=", ("nothing",), None),
        ("experiments.0.seeds=[0, 1, 2]", ("experiments", 0, "seeds"), [0, 1, 2]),
        ("experiments.0.seeds.1=9", ("experiments", 0, "seeds"), [0, 9]),
        ("experiments.0.seeds.2=9", ("experiments", 0, "seeds"), [0, 1, 9]),
        ("experiments.1={kind: ablation}", ("experiments", 1), {"kind": "ablation"}),
        ("new.deeper.key=x=y", ("new",), {"deeper": {"key": "x=y"}}),
        ("nothing.inner=1", ("nothing",), {"inner": 1}),
    ],
)
def test_overrides(tmp_path: Path, override: str, path: tuple[str | int, ...], value: Any) -> None:
    doc = load_yaml(write(tmp_path, "h.yaml", HYP), [override])
    got: Any = doc.data
    for segment in path:
        got = got[segment]
    assert got == value


def test_overrides_apply_in_order_after_extends(tmp_path: Path) -> None:
    write(tmp_path, "base.yaml", "a: 1\nb: 1\n")
    main = write(tmp_path, "main.yaml", "extends: base.yaml\nb: 2\n")
    doc = load_yaml(main, ["a=10", "a=20", "c.d=[1]"])
    assert doc.data == {"a": 20, "b": 2, "c": {"d": [1]}}
    assert doc.overrides == ["a=10", "a=20", "c.d=[1]"]


def test_override_marks_and_provenance(tmp_path: Path) -> None:
    doc = load_yaml(write(tmp_path, "h.yaml", HYP), ["x=1", "experiments.0.seeds=[4, 5]"])
    assert doc.marks[("experiments", 0, "seeds")] == (SET_FILE, 0, 1)
    assert doc.marks[("experiments", 0, "seeds", 1)] == (SET_FILE, 0, 1)
    assert doc.provenance[("experiments", 0, "seeds", 1)] == "--set"
    assert doc.provenance[("x",)] == "--set"
    assert doc.provenance[("samples",)] == str(tmp_path / "h.yaml")


@pytest.mark.parametrize(
    ("override", "path", "reason"),
    [
        ("samples", "", "expected 'dotted.path=value', found no '='"),
        ("a..b=1", "", "expected 'dotted.path=value', found an empty segment in 'a..b'"),
        ("=1", "", "expected 'dotted.path=value', found an empty path"),
        (
            "experiments.5=1",
            "experiments.5",
            "index 5 is out of range for 'experiments': expected 0 to 1 "
            "(a list of 1 items; index 1 appends)",
        ),
        (
            "experiments.first=1",
            "experiments.first",
            "'experiments' is a list: expected an integer index, found 'first'",
        ),
        ("samples.x=1", "samples.x", "expected 'samples' to be a mapping or a list, found int 16"),
        (
            "experiments.0.kind.x=1",
            "experiments.0.kind.x",
            "expected 'experiments.0.kind' to be a mapping or a list, found str "
            "'activation_patching'",
        ),
        (
            "x=[1, 2",
            "x",
            "invalid YAML value: expected a closing ']' for the '[' that starts here, "
            "found the end of the value",
        ),
        (
            "x='open",
            "x",
            'invalid YAML value: expected a closing "\'" for the quoted string that starts '
            "here, found the end of the value",
        ),
        (
            "x=!!python/name:os.system",
            "x",
            "unsupported YAML tag '!!python/name:os.system': only plain data is allowed",
        ),
    ],
)
def test_bad_overrides(tmp_path: Path, override: str, path: str, reason: str) -> None:
    """Located like every `--set` value: `--set PATH=VALUE: field.path: message`."""
    with pytest.raises(SpecError) as err:
        load_yaml(write(tmp_path, "h.yaml", HYP), [override])
    issue = only_issue(err)
    assert (issue.file, issue.line, issue.path) == (f"--set {override}", None, path)
    assert issue.message == f"invalid override: {reason}"


def test_set_path_on_plain_data() -> None:
    data: dict[str, Any] = {"a": [{"b": 1}], "c": None}
    set_path(data, ("a", 0, "b"), 2)
    set_path(data, ("a", 1), "new")
    set_path(data, ("c", "d"), 3)
    set_path(data, ("e", "f"), [])
    assert data == {"a": [{"b": 2}, "new"], "c": {"d": 3}, "e": {"f": []}}
    with pytest.raises(ValueError, match="out of range"):
        set_path(data, ("a", 5), 1)
    with pytest.raises(ValueError, match="empty path"):
        set_path(data, (), 1)


# --- dumping and merging -----------------------------------------------------------------------


def test_dump_yaml_round_trips_in_order(tmp_path: Path) -> None:
    doc = load_yaml(write(tmp_path, "h.yaml", HYP))
    text = dump_yaml(doc.data)
    assert yaml.safe_load(text) == doc.data
    assert list(yaml.safe_load(text)) == list(doc.data)
    assert dump_yaml(doc.data) == text


def test_deep_merge_examples() -> None:
    base = {"a": {"x": 1, "y": [1, 2]}, "b": 1}
    assert deep_merge(base, {"a": {"y": [3]}, "c": None}) == {
        "a": {"x": 1, "y": [3]},
        "b": 1,
        "c": None,
    }
    assert deep_merge(base, {"a": 5}) == {"a": 5, "b": 1}
    assert base == {"a": {"x": 1, "y": [1, 2]}, "b": 1}  # inputs are not modified


KEYS = st.sampled_from(["a", "b", "c", "model", "seeds", "x1"])
SCALARS = st.none() | st.booleans() | st.integers() | st.text("abc xyz", max_size=5)
DATA = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=4),
    max_leaves=12,
)
MAPPINGS = st.dictionaries(KEYS, DATA, max_size=4)


def leaves(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[tuple[Any, ...], Any]]:
    """(path, value) of every non-mapping value; lists count as leaves (they are replaced whole)."""
    if isinstance(value, dict):
        return [leaf for k, v in value.items() for leaf in leaves(v, (*path, k))]
    return [(path, value)]


def get(data: Any, path: tuple[Any, ...]) -> Any:
    for segment in path:
        data = data[segment]
    return data


@given(MAPPINGS, MAPPINGS)
def test_deep_merge_properties(base: dict[str, Any], child: dict[str, Any]) -> None:
    assert deep_merge(base, {}) == base
    assert deep_merge({}, child) == child
    merged = deep_merge(base, child)
    for path, value in leaves(child):
        assert get(merged, path) == value
    assert set(merged) == set(base) | set(child)


@settings(max_examples=30, deadline=None)
@given(MAPPINGS)
def test_load_of_dump_is_identity(data: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "h.yaml"
        path.write_text(dump_yaml(data))
        assert load_yaml(path).data == data
