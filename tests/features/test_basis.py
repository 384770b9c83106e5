"""Basis files (.pt / .npy / .safetensors), orthonormalisation with a warning, every refusal, and
the blocks of DAS rotation files written by the das op's own writer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mi_spec.execute.das_op import Interchange, rotation_bytes
from mi_spec.features.basis import load_basis, rotation_basis


def orthonormal(d: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))[0].float().contiguous()
    )


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_each_format_reads_the_same_basis(tmp_path):
    b = orthonormal(16, 3)
    files = {
        "t.pt": lambda p: torch.save(b, p),
        "d.pt": lambda p: torch.save({"basis": b, "note": torch.zeros(2), "k": 3}, p),
        "one.pt": lambda p: torch.save({"directions": b, "name": "x"}, p),
        "a.npy": lambda p: np.save(p, b.double().numpy()),
        "s.safetensors": lambda p: save_file({"w": b}, p),
        "k.safetensors": lambda p: save_file({"basis": b, "other": torch.ones(3)}, p),
    }
    for name, write in files.items():
        write(tmp_path / name)
        got, warnings = load_basis(tmp_path / name)
        assert got.dtype == torch.float32 and got.shape == (16, 3), name
        _same(got, b)
        assert warnings == [], name


def test_a_vector_is_one_direction_normalised_with_a_warning(tmp_path):
    v = torch.arange(1.0, 9.0)
    np.save(tmp_path / "v.npy", v.numpy())
    got, warnings = load_basis(tmp_path / "v.npy")
    assert got.shape == (8, 1)
    _same(got[:, 0], v / v.norm())
    assert len(warnings) == 1 and "v.npy" in warnings[0] and "not orthonormal" in warnings[0]


def test_a_non_orthonormal_basis_is_orthonormalised_keeping_span_and_order(tmp_path):
    g = torch.Generator().manual_seed(3)
    raw = torch.randn(12, 4, generator=g, dtype=torch.float64) * torch.tensor([3.0, 0.5, 1, 2])
    torch.save(raw, tmp_path / "raw.pt")
    got, warnings = load_basis(tmp_path / "raw.pt")
    error = (raw.T @ raw - torch.eye(4, dtype=torch.float64)).abs().max().item()
    assert len(warnings) == 1 and "raw.pt" in warnings[0] and f"{error:.3g}" in warnings[0]
    g64 = got.double()
    torch.testing.assert_close(g64.T @ g64, torch.eye(4, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(g64 @ g64.T, raw @ torch.linalg.pinv(raw), atol=1e-6, rtol=0)
    _same(got[:, 0], (raw[:, 0] / raw[:, 0].norm()).float())  # first column: its direction
    assert ((got.double() * raw).sum(0) > 0).all()  # signs: each column agrees with its source


def test_a_nearly_orthonormal_basis_is_kept_without_a_warning(tmp_path):
    b = orthonormal(10, 2) + 1e-6
    torch.save(b, tmp_path / "near.pt")
    got, warnings = load_basis(tmp_path / "near.pt")
    assert warnings == []
    torch.testing.assert_close(got, b, atol=1e-5, rtol=0)  # polished: moved by ~the error
    g64 = got.double()
    torch.testing.assert_close(g64.T @ g64, torch.eye(2, dtype=torch.float64), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("name", "write", "message"),
    [
        ("t.pt", lambda p: torch.save(torch.zeros(3, 10), p), r"3 x 10.*save it as d x k"),
        ("r.pt", lambda p: torch.save(torch.stack([torch.ones(5), 2 * torch.ones(5)], 1), p),
         r"column 1 lies in the span of columns 0..0"),
        ("z.npy", lambda p: np.save(p, np.eye(5, 2) * [1, 0]), r"column 1 is zero"),
        ("n.npy", lambda p: np.save(p, np.where(np.eye(4, 3) == 0, np.nan, 1.0)[:, [0, 1, 2]]),
         r"column\(s\) \[0, 1, 2\] hold non-finite"),
        ("two.safetensors", lambda p: save_file({"a": torch.eye(3), "b": torch.eye(3)}, p),
         r"expected one tensor or a 'basis' key, found 2"),
        ("rot.pt", lambda p: torch.save({"rotation": torch.eye(3), "boundary": torch.ones(1)}, p),
         r"DAS rotation file"),
        ("x.csv", lambda p: p.write_text("1,2"), r"supported: \.pt, \.npy, \.safetensors"),
        ("cube.pt", lambda p: torch.save(torch.zeros(2, 2, 2), p), r"vector \[d\] or a matrix"),
        ("bad.pt", lambda p: p.write_bytes(b"not a pickle"), r"bad\.pt: cannot read it"),
        ("s.npy", lambda p: np.save(p, np.array(["a", "b"])), r"expected real numbers"),
    ],
)  # fmt: skip
def test_refusals_name_the_file_and_the_problem(tmp_path, name, write, message):
    write(tmp_path / name)
    with pytest.raises(ValueError, match=message) as info:
        load_basis(tmp_path / name)
    assert name in str(info.value)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(ValueError, match="not found.*nope.pt"):
        load_basis(tmp_path / "nope.pt")


def _rotation(tmp_path, n_vars: int, k: int, kind: str = "low_rank", variables=None):
    inter = Interchange(12, n_vars, k, kind, seed=4)
    names = variables or ["prev", "cur", "third"][:n_vars]
    meta = {"site": "L0.resid_post", "position": "last", "variables": names, "label": "c:seed4"}
    path = tmp_path / f"rotation_{kind}_{n_vars}.pt"
    path.write_bytes(rotation_bytes(inter, meta))
    return inter, path


def test_rotation_basis_takes_the_variable_s_block(tmp_path):
    inter, path = _rotation(tmp_path, n_vars=2, k=3)
    r = inter.matrix().detach()
    for v, name in enumerate(["prev", "cur"]):
        b, info = rotation_basis(path, name)
        assert b.shape == (12, 3)
        _same(b, r[:, v * 3 : (v + 1) * 3])
        assert info | {} == {"site": "L0.resid_post", "position": "last", "variable": name,
                             "k": 3, "kind": "low_rank", "label": "c:seed4"}  # fmt: skip
    with pytest.raises(ValueError, match=r"2 variables \(prev, cur\); say which one"):
        rotation_basis(path)
    with pytest.raises(ValueError, match=r"no variable 'x'.*it holds: prev, cur"):
        rotation_basis(path, "x")


def test_a_one_variable_rotation_needs_no_name(tmp_path):
    inter, path = _rotation(tmp_path, n_vars=1, k=2, kind="full")
    b, info = rotation_basis(path)
    _same(b, inter.matrix().detach()[:, :2])
    assert info["variable"] == "prev" and info["k"] == 2


def test_a_boundless_rotation_keeps_the_dims_its_boundary_learned(tmp_path):
    inter = Interchange(8, 1, 8, "boundless", seed=0)
    inter.boundary.data.fill_(0.25)  # the hard mask keeps round(0.25 * 8) = 2 dims
    path = tmp_path / "b.pt"
    path.write_bytes(rotation_bytes(inter, {"site": "L0.resid_pre", "variables": ["v"]}))
    b, info = rotation_basis(path)
    assert b.shape == (8, 2) and info["k"] == 2 and inter.masks(None).sum() == 2
    _same(b, inter.matrix().detach()[:, :2])


def test_rotation_refusals(tmp_path):
    with pytest.raises(ValueError, match="rotation file not found"):
        rotation_basis(tmp_path / "none.pt")
    torch.save({"basis": torch.eye(3)}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="not a DAS rotation file"):
        rotation_basis(tmp_path / "plain.pt")
