"""A model's identity (``weights_hash``): from its checkpoint files when it has any, from its
tensors only when it was built in memory (a factory without checkpoint, ``hf_config``).

A file's digest is the sha256 of its bytes, so it changes whenever any weight changes. Reading a
large checkpoint costs about a second per GB, so each digest is remembered in a small sidecar
file keyed by the file's absolute path, size, inode and modification/change times: the driver
pays once, and every later load (a worker, the next ``validate``) reads the sidecar in
microseconds. Any write to the file changes its ``ctime``, so a stale digest is never reused.
Sidecars live in ``$MI_SPEC_DIGEST_CACHE`` (default ``$XDG_CACHE_HOME/mi_spec/digests`` or
``~/.cache/mi_spec/digests``); when that is not writable, digests are simply recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch

_CHUNK = 8 << 20
_MEMO: dict[tuple, str] = {}  # in-process: the same file is not even re-stat'ed twice per key

# the files of a Hugging Face folder that decide its weights (config included: it shapes them)
HF_WEIGHT_PATTERNS = (
    "config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model.bin.index.json",
)


def digest_cache_dir() -> Path:
    """Where file digests are remembered between processes."""
    if os.environ.get("MI_SPEC_DIGEST_CACHE"):
        return Path(os.environ["MI_SPEC_DIGEST_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mi_spec" / "digests"


def file_digest(path: Path) -> str:
    """sha256 (hex) of the file's bytes, remembered by (path, size, inode, mtime, ctime)."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
    if key in _MEMO:
        return _MEMO[key]
    sidecar = digest_cache_dir() / (hashlib.sha256(json.dumps(key).encode()).hexdigest()[:40])
    try:
        digest = sidecar.read_text().strip()
    except OSError:
        digest = ""
    if len(digest) != 64:
        digest = _sha256_file(path)
        _write_sidecar(sidecar, digest)
    _MEMO[key] = digest
    return digest


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with path.open("rb") as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _write_sidecar(sidecar: Path, digest: str) -> None:
    try:
        sidecar.parent.mkdir(parents=True, exist_ok=True)
        tmp = sidecar.with_name(f"{sidecar.name}.{os.getpid()}.tmp")
        tmp.write_text(digest)
        os.replace(tmp, sidecar)
    except OSError:  # a read-only cache: recompute next time
        pass


def files_identity(files: Iterable[Path], root: Path | None = None) -> str:
    """A short hash of the files' names (relative to ``root``), sizes and digests."""
    h = hashlib.sha256()
    for path in sorted(Path(p) for p in files):
        name = str(path.relative_to(root)) if root is not None else path.name
        h.update(f"{name}\0{path.stat().st_size}\0{file_digest(path)}\n".encode())
    return h.hexdigest()[:16]


def hf_weight_files(directory: Path) -> list[Path]:
    """The files of an HF folder that :func:`files_identity` covers."""
    found = {p for pattern in HF_WEIGHT_PATTERNS for p in Path(directory).glob(pattern)}
    return sorted(p for p in found if p.is_file())


def checkpoint_files(path: Path) -> list[Path]:
    """A checkpoint file, or an ``*.index.json`` plus every shard its weight map names."""
    path = Path(path)
    if not path.name.endswith(".index.json"):
        return [path]
    shards = set(json.loads(path.read_text()).get("weight_map", {}).values())
    return [path, *(path.parent / s for s in sorted(shards))]


def tensor_identity(module: torch.nn.Module) -> str:
    """A short hash of every parameter and buffer (names, dtypes, shapes, raw bytes), for models
    built in memory. Tied tensors are hashed once."""
    h = hashlib.sha256()
    seen: dict[tuple[int, int], str] = {}
    for name, t in module.state_dict(keep_vars=False).items():
        t = t.detach()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        if t.device.type == "meta":
            raise ValueError(f"tensor {name!r} is on the meta device and has no values to hash")
        ident = (t.data_ptr(), t.numel())
        if t.numel() and ident in seen:
            h.update(f"=tied:{seen[ident]}".encode())
            continue
        seen[ident] = name
        flat = t.to("cpu").contiguous().reshape(-1)
        h.update(flat.view(torch.uint8).numpy().data if flat.numel() else b"")
    return h.hexdigest()[:16]


def safetensors_header(path: Path) -> dict[str, dict]:
    """The tensor table of a ``.safetensors`` file (name -> dtype, shape, data_offsets), read
    from its header alone; ValueError when the header is unreadable or the data is truncated."""
    path = Path(path)
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path.name}: not a safetensors file (shorter than its header)")
        n = int.from_bytes(head, "little")
        size = path.stat().st_size
        if n > size - 8:
            raise ValueError(f"{path.name}: header of {n} bytes in a {size}-byte file")
        try:
            table = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path.name}: unreadable safetensors header ({e})") from None
    table.pop("__metadata__", None)
    end = max((t["data_offsets"][1] for t in table.values()), default=0)
    if 8 + n + end != size:
        raise ValueError(f"{path.name}: tensors end at byte {8 + n + end}, the file has {size}")
    return table
