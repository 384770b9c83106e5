"""Locating pydantic validation errors (and semantic issues) in hypothesis files; refs."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Annotated, Any, Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mi_spec.errors import ResolveError, SpecError, SpecIssue
from mi_spec.spec.load import LoadedDoc, load_yaml
from mi_spec.spec.locate import data_path, issue_at, issues_from_validation_error
from mi_spec.spec.refs import import_ref, is_ref

BAD = Path(__file__).parent / "bad"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Patching(Strict):
    kind: Literal["activation_patching"]
    sites: list[str]
    metric: Literal["logit_diff", "kl_div"] = "logit_diff"
    samples: int = 8

    @field_validator("sites")
    @classmethod
    def _non_empty(cls, sites: list[str]) -> list[str]:
        if not sites:
            raise ValueError("sites must be non-empty")
        return sites


class Ablation(Strict):
    kind: Literal["ablation"]
    site: str
    mode: Literal["zero", "mean"] = "zero"


Experiment = Annotated[Patching | Ablation, Field(discriminator="kind")]


class Hypothesis(Strict):
    name: str
    samples: int = 8
    seeds: list[int] = [0]
    seed_or_seeds: int | list[int] = 0
    description: str = ""
    experiments: list[Experiment] = []


def write(tmp_path: Path, text: str, name: str = "h.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def validate(doc: LoadedDoc, model: type[BaseModel] | None = Hypothesis) -> list[SpecIssue]:
    try:
        Hypothesis.model_validate(doc.data)
    except ValidationError as err:
        return issues_from_validation_error(err, doc, model)
    return []


def located(issues: list[SpecIssue]) -> list[tuple[str, int | None, int | None, str]]:
    return [(i.path, i.line, i.col, i.message) for i in issues]


def test_five_mistakes_give_five_located_issues() -> None:
    path = BAD / "five_mistakes.yaml"
    issues = validate(load_yaml(path))
    assert {i.file for i in issues} == {str(path)}
    assert sorted(located(issues)) == sorted(
        [
            ("smaples", 3, 1, "unknown field 'smaples'; did you mean 'samples'?"),
            ("seeds.1", 4, 12, "expected a valid integer, found 'one'"),
            ("experiments.0.sites", 7, 5, "sites must be non-empty"),
            ("experiments.0.metric", 8, 13, "expected 'logit_diff' or 'kl_div', found 'kl'"),
            ("experiments.1.site", 9, 5, "required field is missing"),
        ]
    )


def test_issue_str_is_file_line_col_path_message(tmp_path: Path) -> None:
    path = write(tmp_path, "name: demo\nsamples: many\n")
    (issue,) = validate(load_yaml(path))
    assert str(issue) == f"{path}:2:10: samples: expected a valid integer, found 'many'"
    assert str(SpecError([issue])) == str(issue)


def test_union_tags_are_not_part_of_the_path(tmp_path: Path) -> None:
    doc = load_yaml(
        write(
            tmp_path,
            """
            name: demo
            experiments:
              - kind: activation_patching
                sites: [1.5]
              - kind: ablation
                site: L0
                smaples: 3
            """,
        )
    )
    assert located(validate(doc)) == [
        ("experiments.0.sites.0", 4, 13, "expected a valid string, found 1.5"),
        ("experiments.1.smaples", 7, 5, "unknown field 'smaples'"),
    ]


def test_suggestions_follow_the_union_member(tmp_path: Path) -> None:
    doc = load_yaml(
        write(
            tmp_path,
            """
            name: demo
            experiments:
              - kind: activation_patching
                sites: [a]
                metrc: kl_div
            """,
        )
    )
    (issue,) = validate(doc)
    assert issue.message == "unknown field 'metrc'; did you mean 'metric'?"


def test_no_suggestion_without_a_model_or_a_close_name(tmp_path: Path) -> None:
    doc = load_yaml(write(tmp_path, "name: demo\nsmaples: 3\nzzz: 1\n"))
    assert [i.message for i in validate(doc, model=None)] == [
        "unknown field 'smaples'",
        "unknown field 'zzz'",
    ]
    assert [i.message for i in validate(doc)][1] == "unknown field 'zzz'"


def test_smart_union_labels_are_dropped(tmp_path: Path) -> None:
    doc = load_yaml(write(tmp_path, "name: demo\nseed_or_seeds: [0, x]\n"))
    assert located(validate(doc)) == [
        ("seed_or_seeds", 2, 1, "expected a valid integer, found [0, 'x']"),
        ("seed_or_seeds.1", 2, 20, "expected a valid integer, found 'x'"),
    ]


def test_missing_field_points_at_its_parent(tmp_path: Path) -> None:
    doc = load_yaml(write(tmp_path, "# header\nsamples: 3\n"))
    assert located(validate(doc)) == [("name", 2, 1, "required field is missing")]


def test_unknown_and_missing_discriminator(tmp_path: Path) -> None:
    doc = load_yaml(
        write(
            tmp_path,
            """
            name: demo
            experiments:
              - kind: nope
              - site: L0
            """,
        )
    )
    assert located(validate(doc)) == [
        (
            "experiments.0.kind",
            3,
            11,
            "expected one of 'activation_patching', 'ablation', found 'nope'",
        ),
        ("experiments.1.kind", 4, 5, "required field is missing"),
    ]


def test_found_value_is_truncated(tmp_path: Path) -> None:
    doc = load_yaml(write(tmp_path, f"name: demo\nsamples: {'x' * 200}\n"))
    (issue,) = validate(doc)
    found = issue.message.removeprefix("expected a valid integer, found ")
    assert len(found) == 60
    assert found.startswith("'xxx") and found.endswith("...")


def test_issue_from_an_extended_file_names_that_file(tmp_path: Path) -> None:
    base = write(tmp_path, "name: demo\nsamples: lots\n", name="base.yaml")
    doc = load_yaml(write(tmp_path, "extends: base.yaml\nseeds: [1]\n"))
    (issue,) = validate(doc)
    assert (issue.file, issue.line, issue.col) == (str(base), 2, 10)


def test_issue_from_an_override_names_the_override(tmp_path: Path) -> None:
    doc = load_yaml(write(tmp_path, "name: demo\n"), ["seeds=[0]", "samples=many"])
    (issue,) = validate(doc)
    assert str(issue) == "--set samples=many: samples: expected a valid integer, found 'many'"


def test_issue_at_for_semantic_checks(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        name: demo
        experiments:
          - kind: ablation
            site: L9.attn
        """,
    )
    doc = load_yaml(path)
    issue = issue_at(doc, ("experiments", 0, "site"), "unknown site 'L9.attn'")
    assert str(issue) == f"{path}:4:11: experiments.0.site: unknown site 'L9.attn'"
    at_key = issue_at(doc, ["experiments", 0, "site"], "bad", at_key=True)
    assert (at_key.line, at_key.col) == (4, 5)
    deeper = issue_at(doc, ("experiments", 0, "nope", 3), "no such thing")
    assert (deeper.path, deeper.line, deeper.col) == ("experiments.0.nope.3", 3, 5)


@pytest.mark.parametrize(
    ("loc", "keep", "expected"),
    [
        (("a", 0, "tag", "b"), False, ("a", 0, "b")),
        (("a", 0, "missing"), True, ("a", 0, "missing")),
        (("a", 0, "label"), False, ("a", 0)),
        (("a", 5), False, ("a",)),
        (("s", "int"), False, ("s",)),
    ],
)
def test_data_path(loc: tuple[Any, ...], keep: bool, expected: tuple[Any, ...]) -> None:
    data = {"a": [{"b": 1}], "s": "x"}
    assert data_path(data, loc, keep_missing_last=keep) == expected


# --- refs --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ref", "ok"),
    [
        ("os.path:join", True),
        ("collections:OrderedDict.fromkeys", True),
        ("pkg_1.mod:_private", True),
        ("os.path.join", False),
        ("os:", False),
        (":join", False),
        ("a:b:c", False),
        ("1pkg:x", False),
        ("os :join", False),
        ("os:join()", False),
    ],
)
def test_is_ref(ref: str, ok: bool) -> None:
    assert is_ref(ref) is ok


def test_import_ref() -> None:
    import collections
    import os.path

    assert import_ref("os.path:join") is os.path.join
    assert import_ref("collections:OrderedDict.fromkeys") == collections.OrderedDict.fromkeys


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("no_such_pkg.mod:f", "cannot import 'no_such_pkg.mod:f': no module named 'no_such_pkg'"),
        ("os:no_such_attr", "cannot import 'os:no_such_attr': module 'os' has no attribute"),
        (
            "collections:OrderedDict.nope",
            "cannot import 'collections:OrderedDict.nope': 'collections:OrderedDict' has no",
        ),
        ("not a ref", "invalid reference 'not a ref': expected 'package.module:attribute'"),
    ],
)
def test_import_ref_errors(ref: str, message: str) -> None:
    with pytest.raises(ResolveError) as err:
        import_ref(ref)
    assert str(err.value).startswith(message)


def test_import_ref_reports_a_failing_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "broken_mod_for_refs.py").write_text("raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ResolveError, match="RuntimeError: boom"):
        import_ref("broken_mod_for_refs:f")
