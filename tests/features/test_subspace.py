"""Subspace invariants: a self-patch is the identity, the full space is the whole site, a linear
subspace patch leaves the orthogonal complement alone, an SAE feature patch moves ``x`` only along
its decoder rows; in float64 (exact) and float32 (tolerances), and bf16 activations."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mi_spec.features.sae import Sae
from mi_spec.features.subspace import LinearSubspace, SaeFeatures, full_space

TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


def orthonormal(d: int, k: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))
    return q.to(dtype)


def random_sae(d: int = 16, d_sae: int = 48, seed: int = 0, jump: bool = False) -> Sae:
    g = torch.Generator().manual_seed(seed)
    w_dec = torch.randn(d_sae, d, generator=g)
    w_dec = w_dec / w_dec.norm(dim=1, keepdim=True)
    return Sae(
        W_enc=w_dec.T * 1.3 + 0.1 * torch.randn(d, d_sae, generator=g),
        b_enc=0.1 * torch.randn(d_sae, generator=g),
        W_dec=w_dec,
        b_dec=0.2 * torch.randn(d, generator=g),
        threshold=0.3 * torch.rand(d_sae, generator=g) if jump else None,
        hook_name="blocks.0.hook_resid_post",
        architecture="jumprelu" if jump else "standard",
    )


def acts(shape, seed: int = 1, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_linear_self_patch_is_exactly_the_identity(dtype):
    sub = LinearSubspace(orthonormal(16, 3, 0, dtype))
    x = acts((4, 5, 16), dtype=dtype)
    assert torch.equal(sub.write(x, sub.coords(x)), x)
    assert sub.coords(x).shape == (4, 5, 3) and sub.coords(x).dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_full_space_patch_equals_the_whole_site(dtype):
    sub = full_space(16).to(dtype=dtype)
    x, y = acts((6, 16), 1, dtype), acts((6, 16), 2, dtype)
    torch.testing.assert_close(sub.write(x, sub.coords(y)), y, atol=TOL[dtype], rtol=0)
    # a full-width rotation is the whole space too
    rot = LinearSubspace(orthonormal(16, 16, 3, dtype))
    torch.testing.assert_close(rot.write(x, rot.coords(y)), y, atol=10 * TOL[dtype], rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_linear_write_sets_coords_and_leaves_the_complement(dtype):
    b = orthonormal(16, 4, 5, dtype)
    sub = LinearSubspace(b)
    x, new = acts((8, 16), 1, dtype), acts((8, 4), 2, dtype)
    out = sub.write(x, new)
    complement = torch.eye(16, dtype=dtype) - b @ b.T
    torch.testing.assert_close((out - x) @ complement, torch.zeros_like(x), atol=TOL[dtype], rtol=0)
    torch.testing.assert_close(sub.coords(out), new, atol=TOL[dtype], rtol=0)
    assert (out - x).abs().max() > 0.1  # it did move


@settings(max_examples=40, deadline=None)
@given(
    d=st.integers(1, 24),
    frac=st.floats(0.0, 1.0),
    seed=st.integers(0, 10_000),
    lead=st.lists(st.integers(1, 3), max_size=2),
)
def test_linear_invariants_hold_for_any_shape(d, frac, seed, lead):
    k = max(1, round(frac * d))
    b = orthonormal(d, k, seed)
    sub = LinearSubspace(b)
    x, y = acts((*lead, d), seed + 1), acts((*lead, d), seed + 2)
    assert torch.equal(sub.write(x, sub.coords(x)), x)
    out = sub.write(x, sub.coords(y))  # interchange: y's coordinates, x's complement
    proj = b @ b.T
    torch.testing.assert_close(out @ proj, y @ proj, atol=1e-12, rtol=0)
    torch.testing.assert_close(out - out @ proj, x - x @ proj, atol=1e-12, rtol=0)


@pytest.mark.parametrize("jump", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sae_self_patch_is_exactly_x(jump, dtype):
    sae = random_sae(jump=jump)
    for idx in ([3], [0, 7, 21], list(range(sae.d_sae))):
        feats = sae.features(idx).to(dtype=dtype)
        x = acts((3, 7, 16), dtype=dtype)
        assert torch.equal(feats.write(x, feats.coords(x)), x)


@pytest.mark.parametrize("jump", [False, True])
def test_sae_coords_are_the_encoder_s_selected_features(jump):
    sae = random_sae(jump=jump)
    x = acts((50, 16), dtype=torch.float32)
    idx = [5, 2, 40]
    torch.testing.assert_close(sae.features(idx).coords(x), sae.encode(x)[:, idx])
    assert (sae.encode(x) > 0).float().mean() < 0.9  # ReLU / threshold zero some features


def test_jumprelu_uses_saelens_semantics():
    """``relu(pre) * (pre > threshold)``: a feature below its threshold reads 0, above it reads
    its pre-activation."""
    sae = Sae(
        W_enc=torch.eye(2), b_enc=torch.zeros(2), W_dec=torch.eye(2), b_dec=torch.zeros(2),
        threshold=torch.tensor([0.5, -1.0]), hook_name="hook_embed", architecture="jumprelu",
    )  # fmt: skip
    x = torch.tensor([[0.4, -0.5], [0.6, 0.7]])
    torch.testing.assert_close(sae.encode(x), torch.tensor([[0.0, 0.0], [0.6, 0.7]]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sae_feature_write_moves_x_only_along_its_decoder_row(dtype):
    sae = random_sae(seed=2)
    feats = sae.features([9]).to(dtype=dtype)
    x = acts((10, 16), dtype=dtype)
    before = feats.coords(x)
    new = before + 1.5
    moved = feats.write(x, new) - x
    w = sae.W_dec[9].to(dtype)
    coef = moved @ w / (w @ w)
    torch.testing.assert_close(moved, coef[:, None] * w, atol=TOL[dtype] * 10, rtol=0)
    torch.testing.assert_close(coef, torch.full_like(coef, 1.5), atol=TOL[dtype] * 10, rtol=0)
    # several features: the change is their decoder rows weighted by the coordinate changes
    many = sae.features([1, 4, 30]).to(dtype=dtype)
    delta = acts((10, 3), 4, dtype)
    change = many.write(x, many.coords(x) + delta) - x
    torch.testing.assert_close(change, delta @ many.directions(), atol=1e-4, rtol=0)


def test_bf16_activations_round_trip_their_dtype():
    x = acts((2, 6, 16), dtype=torch.bfloat16)
    for sub in (
        LinearSubspace(orthonormal(16, 4, 0, torch.float32)),
        random_sae().features([1, 2]),
    ):
        c = sub.coords(x)
        assert c.dtype == torch.float32  # computed in float32, kept there: no bf16 rounding
        assert torch.equal(sub.write(x, c), x) and sub.write(x, c).dtype == torch.bfloat16
        patched = sub.write(x, c + 1)
        assert patched.dtype == torch.bfloat16 and not torch.equal(patched, x)


def test_float64_activations_with_a_float32_subspace_self_patch_exactly():
    x = acts((5, 16), dtype=torch.float64)
    for sub in (LinearSubspace(orthonormal(16, 3, 0, torch.float32)), random_sae().features([0])):
        assert torch.equal(sub.write(x, sub.coords(x)), x)


def test_to_copies_and_changes_the_compute_dtype():
    b = orthonormal(8, 2, 0, torch.float32)
    sub = LinearSubspace(b)
    wide = sub.to("cpu", torch.float64)
    b.zero_()  # neither the subspace nor its copy aliases the caller's tensor
    assert sub.basis.abs().sum() > 0
    assert wide.dtype == torch.float64 and wide.basis.abs().sum() > 0
    eye = torch.eye(2, dtype=torch.float64)
    assert (wide.basis.T @ wide.basis - eye).abs().max() < 1e-14  # re-orthonormalised in float64
    torch.testing.assert_close(wide.basis, sub.basis.double(), atol=1e-6, rtol=0)  # same columns
    feats = random_sae().features([2, 3]).to(None, torch.float64)
    assert isinstance(feats, SaeFeatures) and feats.w_enc.dtype == torch.float64
    assert feats.indices == (2, 3) and feats.width == 2 and feats.d_model == 16


def test_refusals_say_what_is_wrong():
    with pytest.raises(ValueError, match="not orthonormal"):
        LinearSubspace(torch.ones(4, 2))
    with pytest.raises(ValueError, match="1 <= k <= d"):
        LinearSubspace(torch.eye(3, 4))
    with pytest.raises(ValueError, match="width 5, the subspace lives in 4"):
        full_space(4).coords(torch.zeros(2, 5))
    sae = random_sae()
    with pytest.raises(ValueError, match=r"\[48\] out of range; this SAE has 0..47"):
        sae.features([1, 48])
    with pytest.raises(ValueError, match=r"\[1\] given more than once"):
        sae.features([1, 2, 1])
    with pytest.raises(ValueError, match="at least one"):
        sae.features([])
