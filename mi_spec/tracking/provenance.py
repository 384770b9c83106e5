"""Where a study came from: file content hash, git commit, model name, dataset identity.

Plain values for `StudyRecord` (tags and the dataset input); no MLflow here.
"""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

GIT_TIMEOUT_S = 5.0


def file_hash(paths: Sequence[Path]) -> str:
    """sha256 (hex) of the bytes of `paths` in order, concatenated.

    For a hypothesis without ``extends`` this is ``sha256sum file.yaml``; with ``extends`` the
    bases come first and the main file last (the order of ``LoadedDoc.files``).
    """
    h = hashlib.sha256()
    for path in paths:
        h.update(Path(path).read_bytes())
    return h.hexdigest()


def git_info(paths: Sequence[Path]) -> dict[str, str]:
    """``{"commit": sha, "dirty": "true"|"false"}`` when the last path (the main hypothesis file)
    is in a git work tree.

    Dirty: a tracked file of the work tree is modified, or one of `paths` is modified, untracked
    or ignored. Returns ``{}`` when git is missing, slow, or the file is not in a repository.
    """
    if not paths:
        return {}
    where = Path(paths[-1]).resolve().parent
    commit = _git(where, "rev-parse", "--verify", "HEAD")
    if not commit:
        return {}
    tree = _git(where, "status", "--porcelain", "--untracked-files=no")
    files = _git(
        where, "status", "--porcelain", "--ignored", "--", *(str(Path(p).resolve()) for p in paths)
    )
    if tree is None or files is None:
        return {"commit": commit}
    return {"commit": commit, "dirty": "true" if (tree or files) else "false"}


def _git(cwd: Path, *args: str) -> str | None:
    """Stripped stdout of ``git -C cwd args``; None on any failure."""
    try:
        done = subprocess.run(
            ["git", "-C", str(cwd), *args],
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def model_name(section: Mapping[str, Any]) -> str:
    """A readable model identity from a model section: the factory ref, ``hf:<dir>`` or
    ``hf_config:<model_type>``, plus ``+<checkpoint>`` when one is loaded."""
    if section.get("factory"):
        name = str(section["factory"])
    elif section.get("hf"):
        name = f"hf:{section['hf']}"
    else:
        name = f"hf_config:{(section.get('hf_config') or {}).get('model_type', '?')}"
    checkpoint = section.get("checkpoint")
    return f"{name}+{checkpoint}" if checkpoint else name


def dataset_identity(
    section: Mapping[str, Any],
    base_dir: Path,
    digest: str,
    n_rows: int,
    first_row: Mapping[str, Any],
) -> dict[str, Any]:
    """The study's data as a dataset input: name, digest, source, size and MLflow column types
    (guessed from the first row).

    Generator data: name = the generator's function, source = generator ref and params.
    File data: name = the file name, source = its absolute path.
    """
    if section.get("generator"):
        ref = str(section["generator"])
        name, source_type = ref.rpartition(":")[2], "code"
        source: dict[str, Any] = {"tags": {"generator": ref, "params": section.get("params", {})}}
    else:
        path = (Path(base_dir) / str(section["path"])).resolve()
        name, source_type, source = path.name, "local", {"uri": path.as_uri()}
    if section.get("limit") is not None:
        source.setdefault("tags", {})["limit"] = section["limit"]
    columns = {str(k): _column_type(v) for k, v in first_row.items()}
    return {
        "name": name,
        "digest": digest,
        "source_type": source_type,
        "source": source,
        "n_rows": n_rows,
        "columns": columns,
    }


def _column_type(value: Any) -> dict[str, Any]:
    """An MLflow column type (``{"type": "long"}``, ``{"type": "array", "items": ...}``)."""
    if isinstance(value, bool):
        return {"type": "boolean"}
    if isinstance(value, int):
        return {"type": "long"}
    if isinstance(value, float):
        return {"type": "double"}
    if isinstance(value, list | tuple) and value:
        inner = [_column_type(v) for v in value]
        if all(t == inner[0] for t in inner):
            return {"type": "array", "items": inner[0]}
        if all(t["type"] in ("long", "double") for t in inner):
            return {"type": "array", "items": {"type": "double"}}
    return {"type": "string"}
