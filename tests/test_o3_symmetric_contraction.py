"""SymmetricContraction: equivariance, the direct contraction with U, and the span of its basis."""
from __future__ import annotations

import pytest
import torch
from e3nn import o3

from mlpot.o3.symmetric_contraction import SymmetricContraction, coupling_basis
from mlpot.testing.equivariance import D_from_matrix, rand_reflection, rand_rotation


def _inputs(sc: SymmetricContraction, N: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, sc.num_channels, sc.D, generator=g, dtype=torch.float64)
    species = torch.randint(0, sc.num_elements, (N,), generator=g)
    species[: sc.num_elements] = torch.arange(sc.num_elements)
    attrs = torch.nn.functional.one_hot(species, sc.num_elements).double()
    return x, attrs


def _direct(sc: SymmetricContraction, x, attrs):
    """mace-torch's formula: contract U one index at a time, weights mixed by the one-hot."""
    outs = []
    N = x.shape[0]
    for c in sc.contractions:
        total = 0
        for nu in range(1, sc.correlation + 1):
            w = torch.einsum("bs,sjc->bjc", attrs, c.W(nu))
            T = torch.einsum("...j,bjc->bc...", c.U(nu), w)  # (b, c, d, D, ..., D)
            for _ in range(nu):
                T = torch.einsum("bc...i,bci->bc...", T, x)
            total = total + T
        outs.append(total.reshape(N, -1))
    return torch.cat(outs, dim=-1)


CASES = [
    ("3x0e+3x1o", "3x0e+3x1o", 3, 2),
    ("2x0e+2x1o+2x2e+2x3o", "2x0e+2x1o", 3, 3),
    ("2x0e+2x1o+2x2e", "2x0e+2x1o+2x2e+2x1e", 2, 1),
    ("2x0e+2x0o+2x1o+2x1e", "2x0e+2x0o+2x1e", 3, 2),  # both parities
]


@pytest.mark.parametrize("irreps_in, irreps_out, corr, S", CASES)
def test_equals_direct_contraction(irreps_in, irreps_out, corr, S):
    sc = SymmetricContraction(irreps_in, irreps_out, corr, S).double()
    x, attrs = _inputs(sc)
    out = sc(x, attrs)
    assert out.shape == (x.shape[0], o3.Irreps(irreps_out).dim)
    assert out.abs().max() > 1e-3
    torch.testing.assert_close(out, _direct(sc, x, attrs), atol=1e-11, rtol=1e-11)


@pytest.mark.parametrize("improper", [False, True])
@pytest.mark.parametrize("irreps_in, irreps_out, corr, S", CASES)
def test_equivariance(irreps_in, irreps_out, corr, S, improper):
    sc = SymmetricContraction(irreps_in, irreps_out, corr, S).double()
    x, attrs = _inputs(sc)
    R = rand_reflection() if improper else rand_rotation()
    D_in = D_from_matrix(sc.coupling_irreps, R)
    D_out = D_from_matrix(sc.irreps_out, R)
    out = sc(x, attrs)
    torch.testing.assert_close(sc(x @ D_in.T, attrs), out @ D_out.T, atol=1e-10, rtol=0)


def _features(fns, samples):
    """Matrix (samples * d) x (number of functions) of the functions evaluated at the samples."""
    return torch.stack([torch.cat([f(a).reshape(-1) for a in samples]) for f in fns], dim=1)


@pytest.mark.parametrize("irreps, L", [("0e+1o+2e", "0e"), ("0e+1o+2e", "1o"), ("0e+1o+2e", "2e"), ("0e+0o+1o+1e", "1e")])
def test_correlation2_span_equals_cg_products(irreps, L):
    """The nu = 2 basis spans exactly the CG products (A x A)_{l1 l2 -> L}, without redundancy."""
    irreps = o3.Irreps(irreps)
    L = o3.Irrep(L)
    U = coupling_basis(irreps, 2, L)  # (d, D, D, n)
    basis = [lambda a, k=k: torch.einsum("dij,i,j->d", U[..., k], a, a) for k in range(U.shape[-1])]
    cg = []
    sl = irreps.slices()
    for i1, (_, ir1) in enumerate(irreps):
        for i2, (_, ir2) in enumerate(irreps):
            if i2 < i1 or L not in ir1 * ir2:
                continue
            C = o3.wigner_3j(ir1.l, ir2.l, L.l, dtype=torch.float64)
            cg.append(lambda a, C=C, s1=sl[i1], s2=sl[i2]: torch.einsum("ijk,i,j->k", C, a[s1], a[s2]))
    g = torch.Generator().manual_seed(0)
    samples = [torch.randn(irreps.dim, generator=g, dtype=torch.float64) for _ in range(3 * (len(cg) + 2))]
    F_u, F_cg = _features(basis, samples), _features(cg, samples)
    rank = torch.linalg.matrix_rank
    assert U.shape[-1] == rank(F_u) == rank(F_cg) == rank(torch.cat([F_u, F_cg], 1)) > 0


def test_basis_sizes_and_loading_other_couplings():
    """An imported model's U (other column count, other values) is used after load_state_dict."""
    irreps_in, irreps_out = "2x0e+2x1o+2x2e", "2x0e+2x1o"
    ref = SymmetricContraction(irreps_in, irreps_out, 3, 2).double()
    sizes = [[n + 2 for n in layer] for layer in ref.basis_sizes]
    sc = SymmetricContraction(irreps_in, irreps_out, 3, 2, basis_sizes=sizes).double()
    assert sc.basis_sizes == sizes
    # couplings: a random recombination of the reduced basis with extra (redundant) columns
    state = sc.state_dict()
    g = torch.Generator().manual_seed(3)
    for k, c in enumerate(ref.contractions):
        for nu in range(1, 4):
            U = c.U(nu)
            mix = torch.randn(U.shape[-1], U.shape[-1] + 2, generator=g, dtype=torch.float64)
            state[f"contractions.{k}.U_matrix_{nu}"] = U @ mix
    sc.load_state_dict(state)
    x, attrs = _inputs(sc)
    torch.testing.assert_close(sc(x, attrs), _direct(sc, x, attrs), atol=1e-10, rtol=1e-10)
    R = rand_rotation()
    out = sc(x, attrs)
    torch.testing.assert_close(
        sc(x @ D_from_matrix(sc.coupling_irreps, R).T, attrs),
        out @ D_from_matrix(sc.irreps_out, R).T,
        atol=1e-10,
        rtol=0,
    )


def test_species_weights_are_separate():
    sc = SymmetricContraction("2x0e+2x1o", "2x0e", 2, 2).double()
    x, _ = _inputs(sc, N=2)
    x = torch.stack([x[0], x[0]])
    attrs = torch.eye(2, dtype=torch.float64)
    out = sc(x, attrs)
    assert (out[0] - out[1]).abs().max() > 1e-6  # same features, different species
    with torch.no_grad():
        for c in sc.contractions:
            for nu in (1, 2):
                c.W(nu)[1] = c.W(nu)[0]
    out = sc(x, attrs)
    torch.testing.assert_close(out[0], out[1])


def test_gradients_first_and_second_order():
    """The chunked autograd function equals plain autograd of the direct contraction."""
    sc = SymmetricContraction("2x0e+2x1o+2x2e", "2x0e+2x1o", 3, 2).double()
    sc.chunk_size = 2
    x, attrs = _inputs(sc, N=5)
    x.requires_grad_(True)
    params = list(sc.parameters())
    cot = torch.randn(5, o3.Irreps(sc.irreps_out).dim, dtype=torch.float64)
    ga = torch.autograd.grad((sc(x, attrs) * cot).sum(), [x, *params], create_graph=True)
    gb = torch.autograd.grad((_direct(sc, x, attrs) * cot).sum(), [x, *params], create_graph=True)
    for p, q in zip(ga, gb):
        torch.testing.assert_close(p, q, atol=1e-10, rtol=1e-10)
    ha = (ga[0] * torch.sin(ga[0])).sum()
    hb = (gb[0] * torch.sin(gb[0])).sum()
    for p, q in zip(torch.autograd.grad(ha, [x, *params]), torch.autograd.grad(hb, [x, *params])):
        torch.testing.assert_close(p, q, atol=1e-9, rtol=1e-9)


def test_fast_reference_equals_the_dense_definition():
    """The module's chunked reference equals the dense contraction that the Triton kernel is
    tested against (one ground truth for both)."""
    from mlpot.o3.symmetric_contraction import SymmetricContraction, dense_symmetric_contraction

    torch.manual_seed(3)
    sc = SymmetricContraction("3x0e+3x1o+3x2e", "3x0e+3x1o", correlation=3, num_elements=2).double()
    with torch.no_grad():
        for p in sc.parameters():
            p.normal_()
    N, C = 4, 3
    feats = torch.randn(N, C, 9, dtype=torch.float64)
    attrs = torch.nn.functional.one_hot(torch.tensor([0, 1, 1, 0]), 2).double()
    A, elem = feats.transpose(1, 2), attrs.argmax(-1)
    dense = []
    for c in sc.contractions:
        nus = range(1, sc.correlation + 1)
        out = dense_symmetric_contraction(A, elem, [c.U(nu) for nu in nus], [c.W(nu) for nu in nus])
        dense.append(out.transpose(1, 2).reshape(N, -1))
    expected = torch.cat(dense, -1)
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close(sc(feats, attrs), expected, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("irreps_in, irreps_out, corr, S", CASES + [("2x0e+2x1o", "2x0e", 4, 2), ("2x0e+2x1o", "2x0e+2x1o", 1, 2)])
def test_inference_input_gradient_equals_the_direct_contraction(irreps_in, irreps_out, corr, S):
    """Inference (constant weights) takes the Jacobian's basis (:class:`_JacobianPlan`): the
    output and the input gradient equal mace-torch's formula and its autograd, in eval mode
    (tables cached per species, rebuilt after a weight change) and in train mode."""
    sc = SymmetricContraction(irreps_in, irreps_out, corr, S).double()
    x, attrs = _inputs(sc, N=9)
    x.requires_grad_(True)
    cot = torch.randn(9, o3.Irreps(irreps_out).dim, dtype=torch.float64)
    for mode in ("eval", "train", "eval after a weight change"):
        sc.train(mode == "train")
        if mode.endswith("change"):
            with torch.no_grad():
                sc.contractions[0].W(corr).mul_(-2.0)
        expected, = torch.autograd.grad((_direct(sc, x, attrs) * cot).sum(), x)
        out = sc(x, attrs)
        torch.testing.assert_close(out, _direct(sc, x, attrs), atol=1e-10, rtol=1e-10)
        got, = torch.autograd.grad((out * cot).sum(), x)  # no graph: the Jacobian path
        assert expected.abs().max() > 1e-3
        torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
    assert set().union(*sc._jacobian_cache[1]) == set(range(S))  # tables of the species batches met
    if corr == 1:
        return  # linear: no second derivative
    # eval mode with a graph (Hessians): the forward on the Jacobian's basis, the chain-rule backward
    g1, = torch.autograd.grad((sc(x, attrs) * cot).sum(), x, create_graph=True)
    g2, = torch.autograd.grad((_direct(sc, x, attrs) * cot).sum(), x, create_graph=True)
    h1, h2 = (torch.autograd.grad((g * torch.sin(g)).sum(), x)[0] for g in (g1, g2))
    torch.testing.assert_close(h1, h2, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("counts, step, layout", [
    ([9, 4, 1], 1000, "species padded into one batch"),
    ([150, 3, 0], 1000, "one species at a time (padding would double the nodes)"),
    ([40, 37, 5], 16, "species batches over several node chunks"),
    ([70, 0, 0], 16, "one species in node chunks"),
])
def test_jacobian_work_items_give_the_direct_contraction(counts, step, layout, monkeypatch):
    """Every layout of :func:`_jacobian_items` (species padded and batched with the channels, one
    species at a time, node chunks) gives mace-torch's output and input gradient, and covers
    every node once."""
    from mlpot.o3 import symmetric_contraction as scm

    sc = SymmetricContraction("2x0e+2x1o+2x2e", "2x0e+2x1o", 3, 3).double().eval()
    N = sum(counts)
    items = scm._jacobian_items(counts, step, torch.device("cpu"))
    assert scm._jacobian_items(counts, step, torch.device("cpu")) is items  # cached
    covered = []
    for it in items:
        covered += list(range(it.a, it.b)) if it.gather is None else it.nodes.tolist()
        assert (it.gather is None) == (len(it.species) == 1)
    assert sorted(covered) == list(range(N))
    assert (len(items[0].species) > 1) == layout.startswith("species")
    monkeypatch.setattr(scm, "_jacobian_step", lambda x, plan: step)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, sc.num_channels, sc.D, generator=g, dtype=torch.float64, requires_grad=True)
    species = torch.cat([torch.full((n,), s) for s, n in enumerate(counts)])
    attrs = torch.nn.functional.one_hot(species[torch.randperm(N, generator=g)], 3).double()
    cot = torch.randn(N, sc.irreps_out.dim, dtype=torch.float64, generator=g)
    out = sc(x, attrs)
    torch.testing.assert_close(out, _direct(sc, x, attrs), atol=1e-10, rtol=1e-10)
    got, = torch.autograd.grad((out * cot).sum(), x)
    expected, = torch.autograd.grad((_direct(sc, x, attrs) * cot).sum(), x)
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
