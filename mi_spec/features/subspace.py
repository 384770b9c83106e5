"""Subspaces of a site's activation: the coordinates an experiment reads and writes.

A :class:`Subspace` of a site of width ``d`` has ``k`` coordinates. ``coords(x)`` reads them from
an activation ``x [..., d]``; ``write(x, new)`` returns ``x`` with its coordinates set to ``new``
and nothing else changed. Two kinds:

- :class:`LinearSubspace`: the span of an orthonormal basis ``B [d, k]`` (a direction file, a block
  of a DAS rotation, or the whole space). ``coords = x @ B``; ``write`` replaces the projection
  onto the span and keeps the orthogonal complement exactly.
- :class:`SaeFeatures`: selected features of a sparse autoencoder. ``coords`` are the features'
  activations; ``write`` adds ``(new - coords(x)) @ W_dec[idx]``: the SAE's reconstruction error
  (and every other feature) is kept, so an unpatched run is the model's own and a self-patch
  returns ``x`` itself. After a write the encoder need not read back ``new`` exactly (an SAE's
  encoder is not the inverse of its decoder); the change to ``x`` is exactly along ``W_dec[idx]``.

Dtypes: a subspace computes in its own dtype (float32 by default; :meth:`Subspace.to` changes it).
``coords`` returns values in the wider of that dtype and ``x``'s (float32 for a bf16 model, so a
self-patch stays exact); ``write`` returns ``x``'s dtype. Self-patch is exact whatever the dtype:
``new - coords(x)`` is then zero, and ``x`` is returned unchanged.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

ORTHONORMAL_TOL = 1e-4  # max |B^T B - I| accepted for a LinearSubspace basis


def _check_width(x: Tensor, d: int, what: str) -> None:
    if x.shape[-1] != d:
        raise ValueError(f"{what}: activation has width {x.shape[-1]}, the subspace lives in {d}")


def _add(x: Tensor, change: Tensor, wide: torch.dtype) -> Tensor:
    """``x + change`` summed in ``wide`` (the wider of the two dtypes), returned in ``x``'s dtype:
    a zero change returns ``x`` exactly, whatever the dtypes."""
    return (x.to(wide) + change.to(wide)).to(x.dtype)


class Subspace(ABC):
    """``width`` coordinates (k) of a site of width ``d_model`` (d)."""

    width: int
    d_model: int
    dtype: torch.dtype

    @abstractmethod
    def coords(self, x: Tensor) -> Tensor:
        """The coordinates of ``x [..., d]``: ``[..., k]``."""

    @abstractmethod
    def write(self, x: Tensor, new: Tensor) -> Tensor:
        """``x [..., d]`` with its coordinates set to ``new [..., k]``, nothing else changed."""

    @abstractmethod
    def directions(self) -> Tensor:
        """``[k, d]``: row ``i`` is the direction along which coordinate ``i`` moves ``x``."""

    @abstractmethod
    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> Subspace:
        """A copy on ``device`` computing in ``dtype`` (None: unchanged)."""

    def _out_dtype(self, x: Tensor) -> torch.dtype:
        return torch.promote_types(x.dtype, self.dtype)


class LinearSubspace(Subspace):
    """The span of ``basis [d, k]`` (orthonormal columns): ``coords = x @ B``,
    ``write = x + (new - x @ B) @ B.T``; the orthogonal complement of the span is untouched."""

    def __init__(self, basis: Tensor, *, check: bool = True) -> None:
        if basis.ndim != 2 or not basis.is_floating_point():
            raise ValueError(f"a basis is a 2-d float tensor [d, k], got {tuple(basis.shape)}")
        d, k = basis.shape
        if not 1 <= k <= d:
            raise ValueError(f"a basis [d, k] needs 1 <= k <= d, got {tuple(basis.shape)}")
        if check:
            b = basis.detach().double()
            error = (b.T @ b - torch.eye(k, dtype=torch.float64, device=b.device)).abs().max()
            if not error <= ORTHONORMAL_TOL:
                raise ValueError(
                    f"basis [{d}, {k}] is not orthonormal (max |B^T B - I| = {error.item():.3g} > "
                    f"{ORTHONORMAL_TOL}); orthonormalise it (mi_spec.features.basis.load_basis)"
                )
        self.basis = basis.detach().clone()  # no aliasing of the caller's tensor
        self.d_model, self.width, self.dtype = d, k, basis.dtype

    def coords(self, x: Tensor) -> Tensor:
        _check_width(x, self.d_model, "coords")
        return (x.to(self.basis) @ self.basis).to(self._out_dtype(x))

    def write(self, x: Tensor, new: Tensor) -> Tensor:
        _check_width(x, self.d_model, "write")
        b = self.basis
        delta = new.to(b) - x.to(b) @ b
        return _add(x, delta @ b.T, self._out_dtype(x))

    def directions(self) -> Tensor:
        return self.basis.T

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> LinearSubspace:
        """A copy; cast to a more precise dtype, the basis is re-orthonormalised in it (QR, signs
        kept), so float64 invariants hold to float64 rounding, not the source's."""
        b = self.basis.to(device=device, dtype=dtype, copy=True)
        if torch.finfo(b.dtype).eps < torch.finfo(self.basis.dtype).eps:
            q, r = torch.linalg.qr(b)
            b = q * torch.sign(r.diagonal())
        return LinearSubspace(b, check=False)

    def __repr__(self) -> str:
        return f"LinearSubspace(d={self.d_model}, k={self.width}, dtype={self.dtype})"


def full_space(d: int, dtype: torch.dtype = torch.float32) -> LinearSubspace:
    """The whole site as a subspace (identity basis): ``write(x, coords(y)) == y``."""
    return LinearSubspace(torch.eye(d, dtype=dtype), check=False)


class SaeFeatures(Subspace):
    """Features ``indices`` of a sparse autoencoder (build with ``Sae.features(idx)``).

    ``coords(x)``: the features' activations, ``act((x - b_dec * apply_b_dec_to_input) @ W_enc +
    b_enc)`` with ``act`` ReLU, or JumpReLU ``relu(z) * (z > threshold)`` (SAELens's encoder).
    ``write(x, new) = x + (new - coords(x)) @ W_dec``: the reconstruction error is kept.

    Tensors are the selected slices: ``w_enc [d, k]``, ``b_enc [k]``, ``w_dec [k, d]``,
    ``b_dec [d]``, ``threshold [k]`` or None.
    """

    def __init__(
        self,
        w_enc: Tensor,
        b_enc: Tensor,
        w_dec: Tensor,
        b_dec: Tensor,
        threshold: Tensor | None,
        *,
        apply_b_dec_to_input: bool,
        indices: Sequence[int],
    ) -> None:
        d, k = w_enc.shape
        shapes = {"b_enc": (b_enc, (k,)), "w_dec": (w_dec, (k, d)), "b_dec": (b_dec, (d,))}
        if threshold is not None:
            shapes["threshold"] = (threshold, (k,))
        for name, (t, want) in shapes.items():
            if tuple(t.shape) != want:
                raise ValueError(f"SaeFeatures: {name} has shape {tuple(t.shape)}, expected {want}")
        if len(indices) != k:
            raise ValueError(f"SaeFeatures: {len(indices)} indices for {k} encoder columns")
        self.w_enc, self.b_enc, self.w_dec, self.b_dec = w_enc, b_enc, w_dec, b_dec
        self.threshold = threshold
        self.apply_b_dec_to_input = bool(apply_b_dec_to_input)
        self.indices = tuple(int(i) for i in indices)
        self.d_model, self.width, self.dtype = d, k, w_enc.dtype

    def _coords(self, xc: Tensor) -> Tensor:
        """Feature activations of ``xc`` (already in the subspace's dtype and device)."""
        if self.apply_b_dec_to_input:
            xc = xc - self.b_dec
        pre = xc @ self.w_enc + self.b_enc
        acts = torch.relu(pre)
        if self.threshold is not None:
            acts = acts * (pre > self.threshold)
        return acts

    def coords(self, x: Tensor) -> Tensor:
        _check_width(x, self.d_model, "coords")
        return self._coords(x.to(self.w_enc)).to(self._out_dtype(x))

    def write(self, x: Tensor, new: Tensor) -> Tensor:
        _check_width(x, self.d_model, "write")
        delta = new.to(self.w_enc) - self._coords(x.to(self.w_enc))
        return _add(x, delta @ self.w_dec, self._out_dtype(x))

    def directions(self) -> Tensor:
        return self.w_dec

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> SaeFeatures:
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device=device, dtype=dtype, copy=True)

        w_enc, b_enc, w_dec, b_dec = (
            t.to(device=device, dtype=dtype, copy=True)
            for t in (self.w_enc, self.b_enc, self.w_dec, self.b_dec)
        )
        return SaeFeatures(
            w_enc, b_enc, w_dec, b_dec, move(self.threshold),
            apply_b_dec_to_input=self.apply_b_dec_to_input, indices=self.indices,
        )  # fmt: skip

    def __repr__(self) -> str:
        shown = list(self.indices[:8]) + (["..."] if len(self.indices) > 8 else [])
        return f"SaeFeatures(d={self.d_model}, features={shown}, dtype={self.dtype})"
