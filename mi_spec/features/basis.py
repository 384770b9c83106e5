"""Direction and basis files, and the blocks of DAS rotations mi_spec wrote, as bases ``[d, k]``.

A basis file holds ``d x k`` (rows: the model's dimensions, columns: the directions), as ``.pt``
(a tensor, or a dict with one tensor or a ``basis`` key), ``.npy`` or ``.safetensors`` (one
tensor, or a ``basis`` key). A 1-d vector is one direction. A basis that is not orthonormal is
orthonormalised by QR (same span; column ``j`` keeps the direction of the part of column ``j``
orthogonal to the columns before it), with a warning; a basis that has no well-defined span
(non-finite values, a column in the span of the others) is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor

from mi_spec.execute.das_op import load_rotation

SUFFIXES = (".pt", ".npy", ".safetensors")
ORTHONORMAL_TOL = 1e-4  # above: orthonormalise and warn; below: polish silently
POLISH_TOL = 1e-6
RANK_TOL = 1e-6  # a column this close (relative to its norm) to the span of the others: refused


def _pick(tensors: dict[str, Any], path: Path) -> Tensor:
    """The one tensor of a file's dict, or its ``basis`` entry."""
    if "basis" in tensors:
        if not torch.is_tensor(tensors["basis"]):
            raise ValueError(
                f"{path}: 'basis' is a {type(tensors['basis']).__name__}, not a tensor"
            )
        return tensors["basis"]
    found = {k: v for k, v in tensors.items() if torch.is_tensor(v)}
    if len(found) == 1:
        return next(iter(found.values()))
    hint = ""
    if "rotation" in tensors:
        hint = " (a DAS rotation file: name it as a rotation subspace, with its variable)"
    raise ValueError(
        f"{path}: expected one tensor or a 'basis' key, found {len(found)} tensor(s) "
        f"({', '.join(map(str, found)) or 'none'}){hint}"
    )


def _read(path: Path) -> Tensor:
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(
            f"{path}: unsupported basis file type {path.suffix or '(none)'!r}; "
            f"supported: {', '.join(SUFFIXES)}"
        )
    if not path.is_file():
        raise ValueError(f"basis file not found: {path}")
    try:
        if suffix == ".pt":
            data = torch.load(path, map_location="cpu", weights_only=True)
            return data if torch.is_tensor(data) else _pick(_as_dict(data, path), path)
        if suffix == ".npy":
            array = np.load(path, allow_pickle=False)
            if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
                raise ValueError(f"{path}: holds {array.dtype} values, expected real numbers")
            return torch.from_numpy(np.asarray(array, dtype=np.float64))
        return _pick(load_file(path), path)
    except ValueError:
        raise
    except Exception as exc:  # a corrupt or foreign file: say which and why
        raise ValueError(f"{path}: cannot read it as a {suffix} basis file: {exc}") from exc


def _as_dict(data: Any, path: Path) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ValueError(
            f"{path}: holds a {type(data).__name__}; expected a tensor or a dict of tensors"
        )
    return data


def _orthonormal(b: Tensor, path: Path | str, warnings: list[str]) -> Tensor:
    """``b [d, k]`` float64 -> orthonormal columns with the same span (QR, diag(R) > 0)."""
    d, k = b.shape
    bad = (~torch.isfinite(b)).any(0).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"{path}: column(s) {bad} hold non-finite values (nan or inf)")
    norms = b.norm(dim=0)
    q, r = torch.linalg.qr(b)
    dist = r.diagonal().abs()  # column j's distance to the span of columns 0..j-1
    for j in range(k):
        if norms[j] == 0 or dist[j] <= RANK_TOL * norms[j]:
            what = (
                "is zero"
                if norms[j] == 0
                else f"lies in the span of columns 0..{j - 1} (distance {dist[j].item():.3g}, "
                f"norm {norms[j].item():.3g})"
            )
            raise ValueError(
                f"{path}: column {j} {what}: the basis is rank deficient; drop the column "
                "or give independent directions"
            )
    error = (b.T @ b - torch.eye(k, dtype=b.dtype)).abs().max().item()
    if error <= POLISH_TOL:
        return b
    if error > ORTHONORMAL_TOL:
        warnings.append(
            f"{path}: basis [{d}, {k}] is not orthonormal (max |B^T B - I| = {error:.3g}); "
            "orthonormalised by QR (same span, column order kept)"
        )
    return q * torch.sign(r.diagonal())


def load_basis(path: str | Path) -> tuple[Tensor, list[str]]:
    """``(B [d, k] float32 with orthonormal columns, warnings)`` from a basis file."""
    path = Path(path)
    raw = _read(path)
    if not (raw.is_floating_point() or raw.dtype in (torch.int32, torch.int64, torch.int16)):
        raise ValueError(f"{path}: holds {raw.dtype} values, expected real numbers")
    b = raw.detach().to(torch.float64)
    if b.ndim == 1:
        b = b[:, None]
    if b.ndim != 2 or 0 in b.shape:
        raise ValueError(
            f"{path}: a basis is a vector [d] or a matrix [d, k], got shape {tuple(raw.shape)}"
        )
    if b.shape[0] < b.shape[1]:
        rows, cols = b.shape
        raise ValueError(
            f"{path}: holds {rows} x {cols}, which looks transposed: rows are the model's "
            f"dimensions (d x k, k <= d); save it as d x k (e.g. torch.save(B.T, ...))"
        )
    warnings: list[str] = []
    return _orthonormal(b, path, warnings).float(), warnings


def rotation_basis(path: str | Path, variable: str | None = None) -> tuple[Tensor, dict]:
    """Variable ``variable``'s columns of a DAS rotation file mi_spec wrote: ``(B [w, k], info)``.

    Variable ``v`` owns columns ``[v*k, (v+1)*k)``; with a ``boundless`` rotation, only the first
    dims its learned boundary kept. ``info``: site, position, variable, k, kind, label.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"rotation file not found: {path}")
    try:
        saved = load_rotation(path)
    except Exception as exc:
        raise ValueError(f"{path}: cannot read it as a DAS rotation file: {exc}") from exc
    if not isinstance(saved, dict) or not torch.is_tensor(saved.get("rotation")):
        raise ValueError(f"{path}: not a DAS rotation file (no 'rotation' tensor)")
    names = [str(v) for v in saved.get("variables") or []]
    if not names:
        raise ValueError(f"{path}: the rotation names no variables")
    if variable is None:
        if len(names) != 1:
            raise ValueError(
                f"{path}: the rotation holds {len(names)} variables ({', '.join(names)}); "
                "say which one"
            )
        variable = names[0]
    if variable not in names:
        raise ValueError(
            f"{path}: no variable {variable!r} in this rotation; it holds: {', '.join(names)}"
        )
    v, k, rot = names.index(variable), int(saved["k"]), saved["rotation"].detach()
    if rot.ndim != 2 or rot.shape[1] < (v + 1) * k:
        raise ValueError(
            f"{path}: rotation {tuple(rot.shape)} has no columns {v * k}..{(v + 1) * k - 1} "
            f"for variable {variable!r} (k={k})"
        )
    used = k
    if saved.get("kind") == "boundless" and torch.is_tensor(saved.get("boundary")):
        used = max(1, round(saved["boundary"][v].item() * k))  # as the DAS op's hard mask
    block = rot[:, v * k : v * k + used].to(torch.float64)
    error = (block.T @ block - torch.eye(used, dtype=torch.float64)).abs().max().item()
    if error > ORTHONORMAL_TOL:
        raise ValueError(
            f"{path}: rotation columns of {variable!r} are not orthonormal "
            f"(max |R^T R - I| = {error:.3g}); the file is damaged"
        )
    b = _orthonormal(block, path, [])
    info = {
        "site": saved.get("site"), "position": saved.get("position"), "variable": variable,
        "k": used, "kind": saved.get("kind"), "label": saved.get("label"),
    }  # fmt: skip
    return b.float(), info
