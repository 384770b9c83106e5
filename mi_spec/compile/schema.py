"""JSON Schemas of the hypothesis file, for editors (``# yaml-language-server: $schema=...``) and
for the CI check that the committed schema is current.

The repository keeps them in ``schemas/`` (where hypothesis files point); the wheel ships the same
files in ``mi_spec/schemas/`` (`schema_file`), written together by ``mi-spec schema`` in a source
checkout."""

from __future__ import annotations

import json
from pathlib import Path

from mi_spec.compile.spec import Spec


def hypothesis_schema() -> dict:
    schema = Spec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "mi_spec hypothesis"
    return schema


def render(schema: dict) -> str:
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


PACKAGED = Path(__file__).resolve().parents[1] / "schemas"
NAMES = ("hypothesis", "runner")


def schema_file(name: str) -> Path:
    """The installed ``<name>.schema.json`` (``hypothesis`` or ``runner``)."""
    return PACKAGED / f"{name}.schema.json"


def write_schemas(out: Path) -> list[Path]:
    """Write every schema to ``out``; in a source checkout, also the copies the wheel ships."""
    from mi_spec.schedule.profiles import profile_schema

    texts = {"hypothesis": render(hypothesis_schema()), "runner": render(profile_schema())}
    folders = [out]
    if (PACKAGED.parents[1] / "pyproject.toml").exists():
        folders.append(PACKAGED)
    written = []
    for folder in dict.fromkeys(f.resolve() for f in folders):
        folder.mkdir(parents=True, exist_ok=True)
        for name in NAMES:
            path = folder / f"{name}.schema.json"
            path.write_text(texts[name])
            written.append(path)
    return written
