"""Wigner-D matrices (vs e3nn, group property, Y(Rv) = D Y(v)) and edge frames (pole stability)."""
import pytest
import torch
from e3nn import o3

from mlpot.errors import DataError
from mlpot.o3 import edge_rotation, spherical_harmonics, wigner_D, wigner_D_blocks
from mlpot.o3.wigner import angles_to_matrix, matrix_y
from mlpot.testing import (
    D_from_matrix,
    assert_gradcheck,
    assert_gradgradcheck,
    rand_orthogonal,
    rand_rotation,
)

Y_HAT = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)


@pytest.mark.parametrize("l", [0, 1, 2, 3, 5, 8])
def test_matches_e3nn_rotations_and_reflections(l):
    R = rand_orthogonal(6)
    ours = wigner_D(l, R)
    ref = D_from_matrix(o3.Irreps([(1, (l, (-1) ** l))]), R)
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=0)


def test_euler_angles_match_e3nn():
    a, b, c = torch.randn(3, 5, dtype=torch.float64)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        ref_R = o3.angles_to_matrix(a, b, c)
        ref_D = o3.wigner_D(3, a, b, c)
    finally:
        torch.set_default_dtype(old)
    torch.testing.assert_close(angles_to_matrix(a, b, c), ref_R, atol=1e-14, rtol=0)
    torch.testing.assert_close(wigner_D(3, a, b, c), ref_D, atol=1e-12, rtol=0)


def test_blocks_rotate_spherical_harmonics():
    lmax = 6
    R = rand_orthogonal(4)
    v = torch.randn(4, 10, 3, dtype=torch.float64)
    D = wigner_D_blocks(lmax, R)
    assert D.shape == (4, 49, 49)
    lhs = spherical_harmonics(lmax, v @ R.transpose(-1, -2))
    rhs = spherical_harmonics(lmax, v) @ D.transpose(-1, -2)
    torch.testing.assert_close(lhs, rhs, atol=1e-11, rtol=0)


def test_group_property_and_orthogonality():
    R1, R2 = rand_orthogonal(2)
    for l in range(6):
        D12 = wigner_D(l, R1 @ R2)
        torch.testing.assert_close(D12, wigner_D(l, R1) @ wigner_D(l, R2), atol=1e-12, rtol=0)
        D = wigner_D(l, R1)
        torch.testing.assert_close(D @ D.T, torch.eye(2 * l + 1, dtype=torch.float64), atol=1e-12, rtol=0)


def test_wigner_gradgradcheck():
    # D is polynomial in R: finite derivatives everywhere (used inside force training)
    R = rand_rotation(2)
    assert_gradcheck(lambda r: wigner_D(2, r), [R])
    assert_gradgradcheck(lambda r: wigner_D(2, r), [R])


def _edge_vectors():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(20, 3, dtype=torch.float64, generator=g) * 2
    poles = torch.tensor(
        [[0, 1, 0], [0, -1, 0], [0, 3.5, 0], [1e-9, 1, -1e-9], [1e-9, -1, 1e-9], [1, 0, 0], [0, 0, 1], [1, 1e-12, 0]],
        dtype=torch.float64,
    )
    return torch.cat([v, poles])


def test_edge_rotation_maps_edge_to_y():
    v = _edge_vectors()
    R = edge_rotation(v)
    u = v / v.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(torch.einsum("eab,eb->ea", R, u), Y_HAT.expand_as(u), atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.det(R), torch.ones(len(v), dtype=torch.float64), atol=1e-12, rtol=0)
    eye = torch.eye(3, dtype=torch.float64).expand(len(v), 3, 3)
    torch.testing.assert_close(R @ R.transpose(1, 2), eye, atol=1e-12, rtol=0)
    # zero vector -> identity, finite
    torch.testing.assert_close(edge_rotation(torch.zeros(1, 3, dtype=torch.float64))[0], eye[0])


def test_edge_rotation_covariant_up_to_roll():
    # R(Qv) Q R(v)^T fixes y: the frames of a rotated edge differ only by a roll about y
    v = _edge_vectors()
    for Q in rand_rotation(3):
        M = edge_rotation(v @ Q.T) @ Q @ edge_rotation(v).transpose(1, 2)
        torch.testing.assert_close(M @ Y_HAT, Y_HAT.expand(len(v), 3), atol=1e-12, rtol=0)


def test_edge_rotation_gradients_finite_at_poles():
    v = _edge_vectors().requires_grad_(True)
    R = edge_rotation(v)
    (g,) = torch.autograd.grad((R * torch.randn_like(R)).sum(), v, create_graph=True)
    (gg,) = torch.autograd.grad((g * torch.randn_like(g)).sum(), v)
    assert torch.isfinite(g).all() and torch.isfinite(gg).all()
    # finite differences on both branches, including exactly on the poles
    pts = torch.tensor([[0.0, 1, 0], [0, -1, 0], [0.3, 0.8, -0.2], [0.1, -0.9, 0.4]], dtype=torch.float64)
    assert_gradcheck(edge_rotation, [pts])
    assert_gradgradcheck(edge_rotation, [pts])


def test_errors():
    with pytest.raises(DataError):
        wigner_D(1, torch.randn(3, 2))
    with pytest.raises(DataError):
        wigner_D(1, 0.1, 0.2)
    with pytest.raises(DataError):
        edge_rotation(torch.randn(4, 2))
    assert matrix_y(torch.zeros(2)).shape == (2, 3, 3)
