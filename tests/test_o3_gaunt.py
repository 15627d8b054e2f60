"""Gaunt products on the S2 grid and the 2D Fourier torus (mlpot.o3.gaunt, mlpot.o3.s2grid).

Ground truth: the Gaunt tensor G = (1/4pi) int Y Y Y computed here by an independent
quadrature (Gauss-Legendre about the z axis, not e3nn's polar y, in a randomly rotated frame),
itself checked against e3nn's wigner_3j times the closed-form scalar factor.
"""
from __future__ import annotations

import math
from functools import cache

import numpy as np
import pytest
import torch
from e3nn import o3

from mlpot.o3.gaunt import (
    GauntMessageTP,
    GauntProductBasis,
    GauntTensorProduct,
    gaunt_paths,
    gaunt_product,
    product_grid,
    weighted_gaunt_product,
)
from mlpot.o3.s2grid import S2Grid, TorusFourierGrid, legendre_factor, s2_grid_size

DT = torch.float64


def _sh(L, vec):
    """e3nn component SH; e3nn stops at l = 12, so above that mlpot's implementation of the same
    basis is used after checking it against e3nn on degrees <= 12."""
    e3 = o3.spherical_harmonics(list(range(min(L, 12) + 1)), vec, normalize=True, normalization="component")
    if L <= 12:
        return e3
    from mlpot.o3.spherical_harmonics import spherical_harmonics

    Y = spherical_harmonics(L, vec, normalize=True)
    assert torch.allclose(Y[:, : e3.shape[1]], e3, atol=1e-12)
    return Y


@cache
def reference_gaunt(L1: int, L2: int, L3: int) -> torch.Tensor:
    """G[a, b, c] = (1/4pi) int Y_a Y_b Y_c dOmega, a product quadrature exact for degree
    L1+L2+L3, built about the z axis and rotated by a random rotation (independent of the
    grids under test)."""
    D = L1 + L2 + L3
    n_t, n_p = D // 2 + 3, D + 4
    z, w = np.polynomial.legendre.leggauss(n_t)
    phi = 2 * np.pi * np.arange(n_p) / n_p
    s = np.sqrt(1 - z**2)
    pts = np.stack(
        [np.outer(s, np.cos(phi)), np.outer(s, np.sin(phi)), np.outer(z, np.ones(n_p))], -1
    ).reshape(-1, 3)
    wts = torch.tensor(np.repeat(w, n_p) * (2 * np.pi / n_p) / (4 * np.pi), dtype=DT)
    torch.manual_seed(1234)
    R = o3.rand_matrix(dtype=DT)
    vec = torch.tensor(pts, dtype=DT) @ R.T
    Y1, Y2, Y3 = _sh(L1, vec), _sh(L2, vec), _sh(L3, vec)
    Y12 = (Y1[:, :, None] * Y2[:, None, :]).reshape(len(vec), -1)
    return ((Y12 * wts[:, None]).T @ Y3).reshape(Y1.shape[1], Y2.shape[1], Y3.shape[1])


def _threej_000(l1, l2, l3):
    J = l1 + l2 + l3
    if J % 2 or l3 < abs(l1 - l2) or l3 > l1 + l2:
        return 0.0
    g = J // 2
    f = math.factorial
    return (-1) ** g * math.sqrt(f(J - 2 * l1) * f(J - 2 * l2) * f(J - 2 * l3) / f(J + 1)) * f(g) / (
        f(g - l1) * f(g - l2) * f(g - l3)
    )


def test_reference_gaunt_is_scaled_wigner_3j():
    """Each (l1,l2,l3) block of G is the invariant w3j times the closed-form factor
    sqrt((2l1+1)(2l2+1)(2l3+1)) |(l1 l2 l3; 0 0 0)| (zero for l1+l2+l3 odd)."""
    G = reference_gaunt(4, 4, 8)
    for l1 in range(4):
        for l2 in range(l1, 4):
            for l3 in range(abs(l1 - l2), l1 + l2 + 1):
                blk = G[l1**2 : (l1 + 1) ** 2, l2**2 : (l2 + 1) ** 2, l3**2 : (l3 + 1) ** 2]
                w3j = o3.wigner_3j(l1, l2, l3, dtype=DT)
                s = (blk * w3j).sum()
                assert torch.allclose(blk, s * w3j, atol=1e-12)
                expect = math.sqrt((2 * l1 + 1) * (2 * l2 + 1) * (2 * l3 + 1)) * abs(_threej_000(l1, l2, l3))
                assert abs(abs(s.item()) - expect) < 1e-12
    # outside the triangle: zero
    assert G[4:9, 0:1, 16:25].abs().max() < 1e-13


def test_legendre_factorisation_matches_e3nn():
    """Y_lm(theta, phi) = P_lm(theta) T_m(phi) with e3nn's polar axis y, for any theta."""
    L = 12
    torch.manual_seed(0)
    theta = torch.rand(7, dtype=DT) * 2 * math.pi
    phi = torch.rand(7, dtype=DT) * 2 * math.pi
    P = torch.from_numpy(legendre_factor(L, theta.numpy()))
    vec = torch.stack([theta.sin() * phi.sin(), theta.cos(), theta.sin() * phi.cos()], -1)
    Y = o3.spherical_harmonics(list(range(L + 1)), vec, normalize=False, normalization="component")
    for l in range(L + 1):
        for m in range(-l, l + 1):
            T = torch.cos(m * phi) if m >= 0 else torch.sin(-m * phi)
            assert torch.allclose(P[:, l, m + L] * T, Y[:, l * l + l + m], atol=1e-12)


CASES = [(8, 8, 16), (8, 8, 8), (3, 5, 2), (0, 4, 4), (2, 0, 1), (1, 1, 0), (4, 2, 9), (5, 3, 8)]


@pytest.mark.parametrize("method", ["grid", "fourier"])
@pytest.mark.parametrize("L1,L2,Lo", CASES)
def test_gaunt_product_is_exact(method, L1, L2, Lo):
    torch.manual_seed(L1 * 100 + L2 * 10 + Lo)
    x1 = torch.randn(3, (L1 + 1) ** 2, dtype=DT)
    x2 = torch.randn(3, (L2 + 1) ** 2, dtype=DT)
    G = reference_gaunt(L1, L2, max(Lo, 0))
    ref = torch.einsum("na,nb,abc->nc", x1, x2, G)[:, : (Lo + 1) ** 2]
    out = gaunt_product(x1, x2, Lo, method=method)
    assert out.shape == (3, (Lo + 1) ** 2)
    assert (out - ref).abs().max() < 1e-10
    if Lo > L1 + L2:
        assert out[:, (L1 + L2 + 1) ** 2 :].abs().max() < 1e-10


def test_broadcast_and_methods_agree():
    torch.manual_seed(1)
    x1 = torch.randn(4, 1, 5, 9, dtype=DT)
    x2 = torch.randn(1, 3, 1, 16, dtype=DT)
    a = gaunt_product(x1, x2, 5, "grid")
    b = gaunt_product(x1, x2, 5, "fourier")
    assert a.shape == (4, 3, 5, 36)
    assert (a - b).abs().max() < 1e-12
    c = gaunt_product(x1[2, 0, 3], x2[0, 1, 0], 5)
    assert (a[2, 1, 3] - c).abs().max() < 1e-12
    with pytest.raises(ValueError):
        gaunt_product(torch.randn(5, dtype=DT), x2, 2)  # 5 is not (L+1)^2


def test_grid_size_is_minimal_and_matrix_path_agrees():
    """The exact grid from s2_grid_size is exact; one Gauss-Legendre node fewer is not."""
    L1, L2, Lo = 4, 3, 5
    n_t, n_p = s2_grid_size([L1, L2], Lo)
    assert n_t == math.ceil((L1 + L2 + Lo + 1) / 2) and n_p >= L1 + L2 + Lo + 1
    torch.manual_seed(2)
    x1, x2 = torch.randn(6, 25, dtype=DT), torch.randn(6, 16, dtype=DT)
    ref = torch.einsum("na,nb,abc->nc", x1, x2, reference_gaunt(L1, L2, Lo))
    errs = {}
    for name, grid in {
        "fft": S2Grid(5, n_t, n_p),
        "matrix": S2Grid(5, n_t, n_p, impl="matrix"),
        "coarse": S2Grid(5, n_t - 1, n_p),
    }.items():
        errs[name] = (grid.from_grid(grid.to_grid(x1) * grid.to_grid(x2), Lo) - ref).abs().max().item()
    assert errs["fft"] < 1e-12 and errs["matrix"] < 1e-12
    assert errs["coarse"] > 1e-6


def test_torus_fourier_change_of_basis_is_exact():
    """to_fourier gives the 2D Fourier series of f(theta, phi): check at random off-grid points."""
    L = 5
    t = TorusFourierGrid(L, 11, 11)
    torch.manual_seed(3)
    x = torch.randn(2, 36, dtype=DT)
    F = t.to_fourier(x)  # (2, n_u, n_v//2+1), v >= 0
    theta = torch.rand(9, dtype=DT) * 2 * math.pi
    phi = torch.rand(9, dtype=DT) * 2 * math.pi
    u = torch.fft.fftfreq(t.n_u, 1.0 / t.n_u).to(DT)
    v = torch.arange(F.shape[-1], dtype=DT)
    E = torch.exp(1j * (u[None, :, None] * theta[:, None, None] + v[None, None, :] * phi[:, None, None]))
    wv = torch.where(v == 0, 1.0, 2.0).to(DT)  # real field: v and -v terms are conjugate
    vals = (F[:, None] * E[None] * wv).sum((-2, -1)).real
    vec = torch.stack([theta.sin() * phi.sin(), theta.cos(), theta.sin() * phi.cos()], -1)
    ref = x @ o3.spherical_harmonics(list(range(L + 1)), vec, normalize=False, normalization="component").T
    assert (vals - ref).abs().max() < 1e-12


def _D(irreps, R):
    """e3nn's D_from_matrix builds its generators in the default dtype: use float64 for it."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(DT)
    try:
        return o3.Irreps(irreps).D_from_matrix(R)
    finally:
        torch.set_default_dtype(old)


def _random_O3(seed, reflect):
    torch.manual_seed(seed)
    R = o3.rand_matrix(dtype=DT)
    return -R if reflect else R


@pytest.mark.parametrize("method", ["grid", "fourier"])
def test_tensor_product_all_parities_equivariant(method):
    irreps1 = o3.Irreps("3x0e + 3x1o + 3x1e + 3x2e + 3x0o")
    irreps2 = o3.Irreps("1x0e + 1x1o + 1x2e + 1x1e")
    tp = GauntTensorProduct(irreps1, irreps2, lmax_out=3, method=method).to(DT)
    torch.manual_seed(4)
    with torch.no_grad():
        tp.weight.normal_()
    # ee, eo, oe, oo all present: outputs of both parity types for every degree
    assert {(ir.l, ir.p) for _, ir in tp.irreps_out} == {(l, p) for l in range(4) for p in (1, -1)}
    x1, x2 = irreps1.randn(5, -1, dtype=DT), irreps2.randn(5, -1, dtype=DT)
    out = tp(x1, x2)
    assert out.shape == (5, tp.irreps_out.dim)
    for reflect in (False, True):
        R = _random_O3(5, reflect)
        D1, D2, Do = (_D(ir, R) for ir in (irreps1, irreps2, tp.irreps_out))
        assert (tp(x1 @ D1.T, x2 @ D2.T) - out @ Do.T).abs().max() < 1e-10


def test_tensor_product_paths_match_reference():
    """The even x even block equals the weighted Gaunt contraction with G; oo lands in the
    second half of the merged even-type irreps."""
    C = 2
    irreps1 = o3.Irreps(f"{C}x0e + {C}x1o + {C}x2e + {C}x1e")
    irreps2 = o3.Irreps(f"{C}x0e + {C}x1o + {C}x0o")
    tp = GauntTensorProduct(irreps1, irreps2, lmax_out=2, internal_weights=False).to(DT)
    torch.manual_seed(6)
    x1, x2 = irreps1.randn(3, -1, dtype=DT), irreps2.randn(3, -1, dtype=DT)
    w = torch.randn(3, tp.weight_numel, dtype=DT)
    out = tp(x1, x2, w)
    n1, n2 = len(irreps1), len(irreps2)
    w1 = w[:, : C * n1].reshape(3, C, n1)
    w2 = w[:, C * n1 : C * (n1 + n2)].reshape(3, C, n2)
    wo = w[:, C * (n1 + n2) :].reshape(3, C, -1)
    # dense even-type parts: input1 degrees 0,1,2 (blocks 0,1,2); input2 degrees 0,1 (blocks 0,1)
    a = torch.cat([x1[:, :C].reshape(3, C, 1), x1[:, C : 4 * C].reshape(3, C, 3), x1[:, 4 * C : 9 * C].reshape(3, C, 5)], -1)
    b = torch.cat([x2[:, :C].reshape(3, C, 1), x2[:, C : 4 * C].reshape(3, C, 3)], -1)
    a = a * w1[:, :, [0, 1, 1, 1, 2, 2, 2, 2, 2]]
    b = b * w2[:, :, [0, 1, 1, 1]]
    ref = torch.einsum("nca,ncb,abk->nck", a, b, reference_gaunt(2, 1, 2))
    # locate the ee blocks in the output
    offsets, off = {}, 0
    for mul, ir in tp.irreps_out:
        offsets[ir] = off
        off += mul * ir.dim
    for bi, (t1, t2, l3) in enumerate(tp.out_blocks):
        if (t1, t2) != (0, 0):
            continue
        ir = o3.Irrep(l3, (-1) ** l3)
        got = out[:, offsets[ir] : offsets[ir] + C * ir.dim].reshape(3, C, ir.dim)  # ee comes first
        exp = ref[:, :, l3**2 : (l3 + 1) ** 2] * wo[:, :, bi : bi + 1]
        assert (got - exp).abs().max() < 1e-12
    assert len(gaunt_paths([0, 1, 2], [0, 1], 2)) == 7  # (000)(011)(101)(110)(112)(202)(211)... see below
    assert sorted(gaunt_paths([0, 1, 2], [0, 1], 2)) == sorted(
        [(0, 0, 0), (0, 1, 1), (1, 0, 1), (1, 1, 0), (1, 1, 2), (2, 0, 2), (2, 1, 1)]
    )


def test_message_tp_equivariant_and_shapes():
    irreps_in = o3.Irreps("4x0e + 4x1o")
    target = o3.Irreps("4x0e + 4x1o + 4x2e + 4x3o")
    mtp = GauntMessageTP(irreps_in, lmax_sh=3, irreps_out_target=target).to(DT)
    assert mtp.irreps_out == o3.Irreps("4x0e + 4x1o + 4x2e + 4x3o")  # no 1e: Gaunt has no odd paths
    assert mtp.weight_numel == 4 * (2 + 4 + 4)
    assert mtp.tp.num_paths() == len(gaunt_paths([0, 1], range(4), 3)) == 10
    E = 6
    torch.manual_seed(7)
    x = irreps_in.randn(E, -1, dtype=DT)
    vec = torch.randn(E, 3, dtype=DT)
    w = torch.randn(E, mtp.weight_numel, dtype=DT)
    out = mtp(x, _sh(3, vec), w)
    assert out.shape == (E, mtp.irreps_out.dim)
    for reflect in (False, True):
        R = _random_O3(8, reflect)
        Dx, Do = _D(irreps_in, R), _D(mtp.irreps_out, R)
        assert (mtp(x @ Dx.T, _sh(3, vec @ R.T), w) - out @ Do.T).abs().max() < 1e-10


@pytest.mark.parametrize("method", ["grid", "fourier"])
def test_message_tp_edge_chunks_match_one_pass(method):
    """Chunked edges (with activation checkpointing) give the same values, forces-like first
    derivatives and the double derivatives training needs, as one pass over all edges."""
    irreps_in = o3.Irreps("3x0e + 3x1o")
    mtp = GauntMessageTP(irreps_in, lmax_sh=2, irreps_out_target="3x0e + 3x1o + 3x2e", method=method).to(DT)
    E = 23
    torch.manual_seed(3)
    x = irreps_in.randn(E, -1, dtype=DT).requires_grad_()
    vec = torch.randn(E, 3, dtype=DT, requires_grad=True)
    w = torch.randn(E, mtp.weight_numel, dtype=DT, requires_grad=True)

    def run():
        out = mtp(x, _sh(2, vec), w)
        g_x, g_v = torch.autograd.grad((out**3).sum(), (x, vec), create_graph=True)
        (g_w,) = torch.autograd.grad((g_v**2).sum() + g_x.sum(), (w,))
        return out.detach(), g_v.detach(), g_w

    whole = run()
    mtp.max_chunk_values = 5 * mtp.grid_values_per_edge()  # 5 edges per chunk: 5 chunks, the last one short
    assert mtp.edges_per_chunk() == 5
    chunked = run()
    with torch.no_grad():
        assert torch.allclose(mtp(x, _sh(2, vec), w), whole[0], atol=1e-12)
    for a, b in zip(chunked, whole):
        assert torch.allclose(a, b, atol=1e-11), (a - b).abs().max()


def _rotate_nodes(feats, irreps_single, R):
    return feats @ _D(irreps_single, R).T


@pytest.mark.parametrize("method", ["grid", "fourier"])
def test_product_basis_equivariant_rotations_and_reflections(method):
    C = 3
    irreps_in = o3.Irreps(f"{C}x0e + {C}x1o + {C}x2o")  # 2o is odd-type
    irreps_out = o3.Irreps(f"{C}x0e + {C}x1o + {C}x0o + {C}x1e")
    pb = GauntProductBasis(irreps_in, irreps_out, correlation=3, num_elements=2, method=method).to(DT)
    with torch.no_grad():
        pb.weights_in.normal_()
    torch.manual_seed(9)
    feats = torch.randn(4, C, 9, dtype=DT)
    attrs = torch.eye(2, dtype=DT)[[0, 1, 1, 0]]
    out = pb(feats, attrs)
    assert out.shape == (4, irreps_out.dim)
    single = o3.Irreps("0e + 1o + 2o")
    for reflect in (False, True):
        R = _random_O3(10, reflect)
        rot = pb(_rotate_nodes(feats, single, R), attrs)
        assert (rot - out @ _D(irreps_out, R).T).abs().max() < 1e-10
    # odd-type outputs are genuinely produced
    assert out[:, 4 * C :].abs().max() > 1e-3


def test_product_basis_matches_gaunt_contraction():
    """correlation 2 with the nu=1 output weights zeroed: even-type outputs (0e, 2e, 1o) are
    G(A_e, A_e) + G(A_o, A_o), odd-type outputs are 2 G(A_e, A_o), with element weights."""
    C = 2
    irreps_in = o3.Irreps(f"{C}x0e + {C}x1e + {C}x2e")  # 1e odd-type
    irreps_out = o3.Irreps(f"{C}x0e + {C}x1e + {C}x2e + {C}x1o")
    pb = GauntProductBasis(irreps_in, irreps_out, correlation=2, num_elements=3).to(DT)
    torch.manual_seed(11)
    with torch.no_grad():
        pb.weights_in.normal_()
        pb.weights_out[0].zero_()
    feats = torch.randn(5, C, 9, dtype=DT)
    elem = torch.tensor([2, 0, 1, 2, 1])
    attrs = torch.eye(3, dtype=DT)[elem]
    out = pb(feats, attrs)
    a = feats * pb.weights_in[1][elem][:, :, [0, 1, 1, 1, 2, 2, 2, 2, 2]]
    odd = torch.zeros(9, dtype=DT)
    odd[1:4] = 1
    Ae, Ao = a * (1 - odd), a * odd
    G = reference_gaunt(2, 2, 2)
    even = torch.einsum("nca,ncb,abk->nck", Ae, Ae, G) + torch.einsum("nca,ncb,abk->nck", Ao, Ao, G)
    oddp = 2 * torch.einsum("nca,ncb,abk->nck", Ae, Ao, G)
    wo = pb.weights_out[1][elem]  # (N, C, n_out)
    off = 0
    for b, ((_, ir), src) in enumerate(zip(irreps_out, [even, oddp, even, even])):
        got = out[:, off : off + C * ir.dim].reshape(5, C, ir.dim)
        exp = src[:, :, ir.l**2 : (ir.l + 1) ** 2] * wo[:, :, b : b + 1]
        assert (got - exp).abs().max() < 1e-11
        off += C * ir.dim
    with pytest.raises(ValueError):
        GauntProductBasis(f"{C}x0e + {C}x1o", f"{C}x0o", correlation=2, num_elements=1)


@pytest.mark.parametrize("method", ["grid", "fourier"])
def test_gradcheck_second_order(method):
    torch.manual_seed(12)
    x1 = torch.randn(1, 4, dtype=DT, requires_grad=True)
    x2 = torch.randn(1, 9, dtype=DT, requires_grad=True)
    fn = lambda a, b: gaunt_product(a, b, 2, method=method)
    assert torch.autograd.gradcheck(fn, (x1, x2))
    assert torch.autograd.gradgradcheck(fn, (x1, x2))
    pb = GauntProductBasis("1x0e + 1x1e", "1x0e + 1x1o + 1x1e", 2, 1, method=method).to(DT)
    feats = torch.randn(1, 1, 4, dtype=DT, requires_grad=True)
    attrs = torch.ones(1, 1, dtype=DT)
    assert torch.autograd.gradcheck(lambda f: pb(f, attrs), (feats,))
    assert torch.autograd.gradgradcheck(lambda f: pb(f, attrs), (feats,))
    mtp = GauntMessageTP("1x0e + 1x1o", 1, "1x0e + 1x1o", method=method).to(DT)
    x = torch.randn(1, 4, dtype=DT, requires_grad=True)
    sh = torch.randn(1, 4, dtype=DT, requires_grad=True)
    w = torch.randn(1, mtp.weight_numel, dtype=DT, requires_grad=True)
    assert torch.autograd.gradgradcheck(mtp, (x, sh, w))


def test_weighted_product_and_grid_factory():
    torch.manual_seed(13)
    x1, x2 = torch.randn(2, 3, 9, dtype=DT), torch.randn(2, 1, 4, dtype=DT)
    w1, w2, wo = (torch.randn(2, 3, n, dtype=DT) for n in (3, 2, 4))
    out = weighted_gaunt_product(x1, x2, 3, w1, w2, wo)
    a = x1 * w1[..., [0, 1, 1, 1, 2, 2, 2, 2, 2]]
    b = x2 * w2[..., [0, 1, 1, 1]]
    ref = torch.einsum("nca,ncb,abk->nck", a, b, reference_gaunt(2, 1, 3))
    ref = ref * wo[..., [l for l in range(4) for _ in range(2 * l + 1)]]
    assert (out - ref).abs().max() < 1e-12
    assert isinstance(product_grid("fourier", [2, 1], 3), TorusFourierGrid)
    with pytest.raises(ValueError):
        product_grid("cg", [1], 1)
