"""JSON Schemas of the hypothesis file, for editors (``# yaml-language-server: $schema=...``) and
for the CI check that the committed schema is current."""

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


def write_schemas(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    from mi_spec.schedule.profiles import profile_schema

    written = []
    for name, schema in (("hypothesis", hypothesis_schema()), ("runner", profile_schema())):
        path = out / f"{name}.schema.json"
        path.write_text(render(schema))
        written.append(path)
    return written
