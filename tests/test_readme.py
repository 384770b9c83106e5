"""Every ```yaml block of README.md is validated with `mi_spec.api.validate`, so the docs cannot drift.

How a block is read (an HTML comment on the line just before the block, invisible when rendered,
overrides the default):

* ``<!-- readme-test: base=hypotheses/X.yaml -->``: the block is merged into that hypothesis (written
  as a file with ``extends:`` it, so the merge is the project's own: mappings merge, lists and
  scalars are replaced) and the result is validated.
* ``<!-- readme-test: invalid [base=...] -->``: the block must fail validation with a located error
  (``file:line:col: field.path: message``), never a traceback; when a plain ``` block follows it,
  the error it shows (after the location) must be the one raised.
* Without a comment: a block with ``model:`` or ``extends:`` is a complete hypothesis; one with
  ``dims:`` and ``sites:`` is a declarative adapter, validated as the ``model.adapter`` of the next
  complete hypothesis of its README section (the example that uses it); any other block is a
  fragment merged into ``DEFAULT_BASE`` (the Quick start's file).

Files are written to a temp folder where ``hypotheses`` is the repository's folder, so paths written
"from the repository root" resolve. Causal-scrubbing experiments are validated on at most
``SCRUB_SAMPLES`` base rows (trees grow with rows; the fields are validated the same way).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from mi_spec import api
from mi_spec.errors import MiSpecError

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DEFAULT_BASE = "hypotheses/induction_patching.yaml"
SCRUB_SAMPLES = 4
_FENCE = re.compile(r"^( *)```(\S*)\s*$")
_MARKER = re.compile(r"<!--\s*readme-test:(.*?)-->")
_LOCATED = re.compile(r"^\S+:\d+:\d+: \S+", re.M)  # file:line:col: field.path


@dataclass
class Block:
    index: int
    line: int  # 1-based line of the opening fence
    section: str
    text: str
    marker: dict[str, str] = field(default_factory=dict)
    shown_error: str = ""  # an invalid block's error, as the README prints it in the next block

    @property
    def data(self) -> Any:
        return yaml.safe_load(self.text)

    @property
    def kind(self) -> str:
        if "invalid" in self.marker:
            return "invalid"
        data = self.data
        if not isinstance(data, dict):
            return "other"
        if "base" in self.marker:
            return "fragment"
        if "model" in data or "extends" in data:
            return "complete"
        if {"dims", "sites"} <= set(data):
            return "adapter"
        return "fragment"


def readme_blocks(text: str) -> list[Block]:
    """Every ```yaml block, with its section heading and the marker comment just before it."""
    lines = text.splitlines()
    blocks: list[Block] = []
    section, i = "", 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#") and not line.startswith("#!"):
            section = line.lstrip("#").strip()
        fence = _FENCE.match(line)
        if not fence:
            i += 1
            continue
        indent, lang = len(fence[1]), fence[2]
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
        if lang == "yaml":
            body = "\n".join(x[indent:] for x in lines[i + 1 : end])
            prev = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            marker = _parse_marker(prev)
            blocks.append(Block(len(blocks), i + 1, section, body + "\n", marker))
            if "invalid" in marker:
                blocks[-1].shown_error = _next_plain_block(lines, end + 1)
        i = end + 1
    return blocks


def _next_plain_block(lines: list[str], start: int) -> str:
    """The text of a plain ``` block right after line ``start`` (blank lines between), or ""."""
    i = next((j for j in range(start, len(lines)) if lines[j].strip()), len(lines))
    if i == len(lines) or lines[i].strip() != "```":
        return ""
    end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
    return "\n".join(x.strip() for x in lines[i + 1 : end])


def _parse_marker(line: str) -> dict[str, str]:
    m = _MARKER.search(line)
    if not m:
        return {}
    out = {}
    for word in m[1].split():
        key, _, value = word.partition("=")
        out[key] = value
    return out


BLOCKS = readme_blocks(README.read_text())

# Blocks of other sections that validate against no bundled hypothesis as written (found by this
# test; their section needs a `base=` comment or a complete file). Remove an entry once fixed.
KNOWN_BROKEN: dict[str, str] = {}  # section -> why its blocks cannot validate yet


def _id(block: Block) -> str:
    words = re.sub(r"[^\w]+", "-", block.section.lower()).strip("-")
    return f"{block.index}-{words[:40]}-L{block.line}"


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A folder where `hypotheses/` is the repository's and `tests/` code is importable."""
    (tmp_path / "hypotheses").symlink_to(ROOT / "hypotheses")
    sys.path.insert(0, str(ROOT / "tests"))  # factories such as reference.custom_model
    yield tmp_path
    sys.path.remove(str(ROOT / "tests"))


def _experiments(doc: dict[str, Any], base: Path | None) -> list[dict[str, Any]]:
    if "experiments" in doc:
        return list(doc["experiments"] or [])
    return _experiments(yaml.safe_load(base.read_text()), None) if base else []


def _overrides(doc: dict[str, Any], base: Path | None) -> list[str]:
    """Fewer base rows for causal scrubbing (trees grow with them); nothing else changes."""
    out = []
    for i, exp in enumerate(_experiments(doc, base)):
        if isinstance(exp, dict) and exp.get("kind") == "causal_scrubbing":
            out.append(f"experiments.{i}.samples={min(exp.get('samples') or 10**9, SCRUB_SAMPLES)}")
    return out


def _write(block: Block, workdir: Path) -> tuple[Path, list[str]]:
    """The hypothesis file a block stands for, and the overrides to validate it with."""
    doc = block.data
    base: Path | None = None
    if block.kind == "adapter":
        user = next(
            (b for b in BLOCKS[block.index + 1 :] if b.section == block.section
             and b.kind == "complete" and "adapter" in (b.data.get("model") or {})),
            None,
        )  # fmt: skip
        assert user is not None, (
            f"README.md:{block.line}: an adapter block needs a complete hypothesis using it later "
            "in its section, or a `<!-- readme-test: base=... -->` comment"
        )
        doc = user.data
        doc["model"]["adapter"] = block.data
    elif block.kind in ("fragment", "invalid") and "extends" not in doc:
        base = ROOT / block.marker.get("base", DEFAULT_BASE)
        assert base.is_file(), f"README.md:{block.line}: no base file {base}"
        doc = {"extends": str(base), **doc}
    path = workdir / f"readme_block_{block.index}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path, _overrides(doc, base)


def test_every_block_is_classified():
    assert BLOCKS, "README.md has no ```yaml blocks"
    kinds = {b.kind for b in BLOCKS}
    assert "other" not in kinds, [b.line for b in BLOCKS if b.kind == "other"]
    assert {"complete", "fragment", "invalid"} <= kinds


def test_markers_are_known():
    for b in BLOCKS:
        unknown = set(b.marker) - {"base", "invalid"}
        assert not unknown, f"README.md:{b.line}: unknown readme-test keys {sorted(unknown)}"


def _params(blocks: list[Block]) -> list[Any]:
    return [
        pytest.param(b, id=_id(b), marks=[pytest.mark.xfail(reason=KNOWN_BROKEN[b.section])])
        if b.section in KNOWN_BROKEN and not b.marker
        else pytest.param(b, id=_id(b))
        for b in blocks
    ]


@pytest.mark.parametrize("block", _params(BLOCKS))
def test_readme_yaml_block(block: Block, workdir: Path):
    path, overrides = _write(block, workdir)
    where = f"README.md:{block.line} ({block.section}, {block.kind})"
    if block.kind == "invalid":
        with pytest.raises(MiSpecError) as err:
            api.validate(path, overrides)
        assert _LOCATED.search(str(err.value)), f"{where}: error not located: {err.value}"
        shown = re.sub(r"^\S+:\d+:\d+: ", "", block.shown_error)  # the README's path is elided
        assert shown in str(err.value), f"{where}: README shows {shown!r}, got {err.value}"
        return
    try:
        api.validate(path, overrides)
    except MiSpecError as e:
        pytest.fail(f"{where} does not validate:\n{e}")
