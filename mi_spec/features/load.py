"""SubspaceRef -> the torch :class:`~mi_spec.features.subspace.Subspace` it names, loaded once per
process and device (workers load each file once, whatever the number of jobs)."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from mi_spec.sites.subspace_ref import SubspaceRef

if TYPE_CHECKING:
    import torch

    from mi_spec.features.subspace import Subspace


@functools.lru_cache(maxsize=32)
def _load(kind: str, path: str, variable: str | None, digest: str) -> Any:
    """The file's content on the CPU: an ``Sae``, or a basis [d, k]; ``digest`` keys the cache."""
    from mi_spec.features.basis import load_basis, rotation_basis
    from mi_spec.features.sae import load_sae

    if kind == "sae":
        return load_sae(path)
    return load_basis(path)[0] if kind == "basis" else rotation_basis(path, variable)[0]


@functools.lru_cache(maxsize=256)
def _placed(ref: SubspaceRef, device: str, wide: bool) -> Subspace:
    import torch

    from mi_spec.features.subspace import LinearSubspace

    loaded = _load(ref.kind, ref.path, ref.variable, ref.digest)
    if ref.kind == "sae":
        select = list(ref.select) if ref.select is not None else list(range(loaded.d_sae))
        sub = loaded.features(select)
    else:
        sub = LinearSubspace(loaded if ref.select is None else loaded[:, list(ref.select)])
    return sub.to(torch.device(device), torch.float64 if wide else torch.float32)


def subspace_for(ref: SubspaceRef, like: torch.Tensor) -> Subspace:
    """The subspace ``ref`` names, on ``like``'s device, computing in float32 (float64 for a
    float64 model): coordinates come back in the wider of that and the activation's dtype, writes
    in the activation's dtype (so a self-patch is exact, bf16 included)."""
    import torch

    return _placed(ref, str(like.device), like.dtype == torch.float64)
