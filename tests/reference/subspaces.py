"""Subspaces for reference tests, with their maps written out by hand: a basis of the residual
stream (``dirs``), a non-orthonormal basis of one head's output (``hd``; mi_spec orthonormalises it,
the span is what counts) and three features of a random SAE (``sae``) at ``L1.resid_post``; a
subspace edit is ``x + (c_new - c(x)) @ D`` for coordinates ``c`` and directions ``D [k, w]``."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

Space = tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]  # (coordinates, directions)

SUBSPACES = """
subspaces:
  dirs: {basis: dirs.npy}
  hd: {basis: hd.pt}
  sae: {sae: sae, features: [1, 4, 6]}
"""


def _tensors() -> dict[str, torch.Tensor]:
    """The subspaces' tensors, the same on every call (seeded)."""
    g = torch.Generator().manual_seed(4)
    dirs = torch.linalg.qr(torch.randn(32, 3, generator=g))[0]
    hd = torch.randn(8, 2, generator=g)  # not orthonormal: mi_spec orthonormalises (same span)
    w_enc, b_enc = torch.randn(32, 12, generator=g) / 4, torch.randn(12, generator=g) / 4
    w_dec, b_dec = torch.randn(12, 32, generator=g) / 4, torch.randn(32, generator=g) / 4
    return {"dirs": dirs, "hd": hd, "W_enc": w_enc, "b_enc": b_enc, "W_dec": w_dec, "b_dec": b_dec}


def subspace_maps() -> dict[str, Space]:
    """Per subspace of ``SUBSPACES``: (coordinates of x, directions [k, w]), by hand."""
    t = _tensors()
    dirs, hd = t["dirs"], torch.linalg.qr(t["hd"])[0]
    w_enc, b_enc, w_dec, b_dec = t["W_enc"], t["b_enc"], t["W_dec"], t["b_dec"]

    def sae_coords(idx):
        return lambda x: torch.relu(
            (x - b_dec.to(x.dtype)) @ w_enc[:, idx].to(x.dtype) + b_enc[idx].to(x.dtype)
        )

    return {
        "dirs": (lambda x: x @ dirs.to(x.dtype), dirs.T),
        "hd": (lambda x: x @ hd.to(x.dtype), hd.T),
        "sae": (sae_coords([1, 4, 6]), w_dec[[1, 4, 6]]),
    } | {f"sae:{i}": (sae_coords([i]), w_dec[[i]]) for i in (1, 4, 6)}


def write_subspaces(tmp_path: Path) -> dict[str, Space]:
    """Write the files ``SUBSPACES`` names into ``tmp_path``; return :func:`subspace_maps`."""
    t = _tensors()
    np.save(tmp_path / "dirs.npy", t["dirs"].numpy())
    torch.save(t["hd"], tmp_path / "hd.pt")
    (tmp_path / "sae").mkdir(exist_ok=True)
    weights = {k: t[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    save_file(weights, tmp_path / "sae" / "sae_weights.safetensors")
    cfg = {"d_in": 32, "d_sae": 12, "hook_name": "blocks.1.hook_resid_post",
           "architecture": "standard", "apply_b_dec_to_input": True,
           "normalize_activations": "none"}  # fmt: skip
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps(cfg))
    return subspace_maps()


def space_of(spaces: dict[str, Space], site: Any) -> Space:
    """The hand-written maps of a bound subspace site (``L0.H1[hd]`` -> ``spaces["hd"]``)."""
    return spaces[site.name.split("[")[1].split("]")[0]]


def change(space: Space, source: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """What writing ``source``'s coordinates does to ``current`` (both [..., w])."""
    coords, dirs = space
    return (coords(source) - coords(current)) @ dirs.to(current.dtype)


def in_subspace(value_fn, coords, dirs):
    """A subspace site's edit: set the coordinates to those of the source value (a zero
    ablation's 0, a mean ablation's mean coordinates), keep the rest of the current value."""

    def edit(row, p, current):
        new = value_fn(row, p)
        if torch.is_tensor(new) and new.shape[-1] == current.shape[-1]:
            new = coords(new)  # a source activation: its coordinates
        return current + (new - coords(current)) @ dirs.to(current.dtype)

    edit.relative = True
    return edit
