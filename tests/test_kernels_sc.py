"""Symmetric-contraction kernel (MACE product basis) against the dense torch reference.

Interpreter mode as in the other kernel tests. Tolerances: float64 1e-10, float32 1e-4 relative.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"

from collections import Counter

import pytest
import torch

from mlpot.o3.backend import kernels_module

SC = kernels_module("symmetric_contraction")


def _rel(a, b):
    return ((a - b).abs().max() / max(1.0, b.abs().max().item())).item()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_symmetric_contraction_matches_reference(dtype):
    g = torch.Generator().manual_seed(2)
    D, C, Z, N, Dout = 4, 3, 2, 3, 1
    # sparse random U tensors for nu = 1, 2, 3 (the table merges index permutations)
    Us = []
    for nu, q in ((1, 1), (2, 2), (3, 1)):
        u = torch.randn(Dout, *([D] * nu), q, generator=g, dtype=torch.float64)
        Us.append(u * (torch.rand(u.shape, generator=g) < 0.3))
    table = SC.build_table(Us)
    A = torch.randn(N, D, C, generator=g, dtype=dtype).requires_grad_()
    elem = torch.tensor([1, 0, 1])
    Ws = [torch.randn(Z, q, C, generator=g, dtype=dtype).requires_grad_() for q in table.Qs]
    out = SC.symmetric_contraction(A, elem, Ws, table)
    ref = SC.reference_symmetric_contraction(A, elem, [u.to(dtype) for u in Us], Ws)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert _rel(out, ref) < tol
    gout = torch.randn(out.shape, generator=g, dtype=dtype)
    gk = torch.autograd.grad(out, [A] + Ws, gout, create_graph=True)
    gr = torch.autograd.grad(ref, [A] + Ws, gout, create_graph=True)
    for a, b in zip(gk, gr):
        assert _rel(a, b) < tol
    hk = torch.autograd.grad(sum((a * a).sum() for a in gk), [A] + Ws)
    hr = torch.autograd.grad(sum((b * b).sum() for b in gr), [A] + Ws)
    for a, b in zip(hk, hr):
        assert _rel(a, b) < 10 * tol


def test_table_merges_permutations():
    u = torch.zeros(1, 2, 2, 1, dtype=torch.float64)
    u[0, 0, 1, 0], u[0, 1, 0, 0] = 1.0, 2.0
    table = SC.build_table([u])
    assert table.entries == [(0, (0, 1), 0, 3.0)]


# ---------------------------------------------------------------------------- issue 13
RT = kernels_module("_runtime")


def _mace_table(L=1, correlation=3, ir="0e"):
    from e3nn import o3

    from mlpot.o3.symmetric_contraction import coupling_basis

    irreps = o3.Irreps([(1, (l, (-1) ** l)) for l in range(L + 1)])
    Us = [coupling_basis(irreps, nu, ir) for nu in range(1, correlation + 1)]
    return SC.build_table(Us), Us


def test_weight_blocks_partition_each_element():
    elem = torch.tensor([2, 0, 2, 2, 1, 2, 0, 2, 2])
    perm, start, end, off = SC.weight_blocks(elem, 4, block_nodes=2)
    assert start.shape[0] == 9 // 2 + 4
    covered = []
    for z in range(4):
        for b in range(int(off[z]), int(off[z + 1])):
            nodes = perm[int(start[b]):int(end[b])]
            assert 0 < len(nodes) <= 2 and (elem[nodes] == z).all()
            covered += nodes.tolist()
    assert sorted(covered) == list(range(9))
    assert (start[int(off[-1]):] == end[int(off[-1]):]).all()  # unused blocks are empty


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_weight_gradient_over_many_node_blocks(dtype, monkeypatch):
    """dL/dW of several elements, each spread over several node blocks (two-pass reduction)."""
    monkeypatch.setattr(SC, "WEIGHT_BLOCK_NODES", 2)
    table, Us = _mace_table(L=1, correlation=3)
    g = torch.Generator().manual_seed(5)
    N, C, Z = 7, 3, 3
    elem = torch.tensor([2, 0, 2, 2, 0, 2, 2])  # element 1 has no node: its gradient is zero
    A = torch.randn(N, table.D, C, generator=g, dtype=dtype)
    W = torch.randn(Z, table.Q, C, generator=g, dtype=dtype).requires_grad_()
    gout = torch.randn(N, table.D_out, C, generator=g, dtype=dtype)
    gk = torch.autograd.grad(SC.symmetric_contraction(A, elem, W, table), W, gout)[0]
    ref = SC.reference_symmetric_contraction(A, elem, [u.to(dtype) for u in Us],
                                             list(torch.split(W, table.Qs, dim=1)))
    gr = torch.autograd.grad(ref, W, gout)[0]
    assert _rel(gk, gr) < (1e-10 if dtype == torch.float64 else 1e-4)
    assert (gk[1] == 0).all()


def test_weight_gradient_skipped_when_no_weight_needs_it():
    """MD asks for forces only: the weight-gradient kernels must not run."""
    table, _ = _mace_table(L=1, correlation=2)
    g = torch.Generator().manual_seed(6)
    A = torch.randn(3, table.D, 2, generator=g, dtype=torch.float64).requires_grad_()
    elem = torch.tensor([0, 1, 0])
    for w_grad, want in ((False, 0), (True, 1)):
        W = torch.randn(2, table.Q, 2, generator=g, dtype=torch.float64).requires_grad_(w_grad)
        with RT.count_launches() as counts:
            out = SC.symmetric_contraction(A, elem, W, table)
            torch.autograd.grad(out.square().sum(), A)
        kinds = Counter(k.rsplit("_", 1)[0] for k in counts.elements())  # generated: hash dropped
        assert kinds["_sc_dW"] == want and counts["_sc_block_sum_kernel"] == want
        assert kinds["_sc_fwd"] == 1 and kinds["_sc_dA"] == 1


@pytest.mark.parametrize("correlation", [1, 2, 3])
def test_nu_constexpr_is_the_correlation(correlation):
    """The node kernel is specialised to the table's correlation (factors per entry), not padded to 4."""
    table, _ = _mace_table(L=1, correlation=correlation)
    A = torch.randn(2, table.D, 2, dtype=torch.float64).requires_grad_()
    W = torch.randn(1, table.Q, 2, dtype=torch.float64).requires_grad_()
    with RT.record_launches(execute=False) as launches:
        out = SC.symmetric_contraction(A, torch.zeros(2, dtype=torch.int64), W, table)
        torch.autograd.grad(out.sum(), (A, W))
    nus = [(k.fn.__name__.rsplit("_", 1)[0], kw["NU"]) for k, _, kw in launches if "NU" in kw]
    assert nus == [("_sc_fwd", correlation), ("_sc_dA", max(1, correlation - 1)), ("_sc_dW", correlation)]


_PEAK_SCRIPT = r"""
import resource, sys, torch
from e3nn import o3
from mlpot.o3.backend import kernels_module
from mlpot.o3.symmetric_contraction import coupling_basis
SC = kernels_module("symmetric_contraction")
N, C = int(sys.argv[1]), int(sys.argv[2])
irreps = o3.Irreps("0e+1o+2e+3o")  # MACE's A rows, L = 3: D = 16
table = SC.build_table([coupling_basis(irreps, nu, "0e") for nu in (1, 2, 3)])
SC.DOUBLE_BACKWARD_ELEMENTS = 32 * len(table.entries) * C  # chunks of 32 nodes
g = torch.Generator().manual_seed(0)
def run(n):
    A = torch.randn(n, table.D, C, generator=g, dtype=torch.float64)
    W = torch.randn(1, table.Q, C, generator=g, dtype=torch.float64)
    gout = torch.randn(n, table.D_out, C, generator=g, dtype=torch.float64)
    ggA, ggW = torch.randn_like(A), torch.randn_like(W)
    SC.double_backward(A, W, gout, torch.zeros(n, dtype=torch.int64), table, ggA, ggW)
run(8)  # warm-up: everything loaded and cached
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
run(N)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024, len(table.entries))
"""


def _peak_growth(N, C):
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(N), str(C)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    grow, entries = proc.stdout.split()
    return int(grow), int(entries)


def test_double_backward_memory_grows_like_the_outputs():
    """Peak memory of the double backward at N and 4N nodes (MACE's D = 16 rows, correlation 3):
    it grows like O(N D C) (a few copies of A), not like the dense O(N D^3 C) contraction
    (here 4096 x 16 x 8 B = 0.5 MB per node)."""
    C, N1, N2 = 16, 128, 512
    g1, entries = _peak_growth(N1, C)
    g2, _ = _peak_growth(N2, C)
    per_node = 16 * C * 8  # one row of A, fp64
    assert entries > 16  # a real table (sparse, but far more entries than rows)
    assert g2 - g1 < 12 * (N2 - N1) * per_node + (8 << 20), (g1, g2)
    dense_growth = (N2 - N1) * 16 ** 3 * C * 8
    assert g2 - g1 < dense_growth / 20


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_module_all_irreps_in_one_launch_every_config(dtype):
    """``SymmetricContraction`` on the triton backend: all output irreps (0e + 1o) in one launch
    per pass, node blocks of one element with partial tails (11 nodes, 3 elements, C not a
    multiple of BLOCK_C), forward, first and second derivatives against the torch reference on
    every autotune config."""
    from mlpot.o3.symmetric_contraction import SymmetricContraction

    torch.manual_seed(3)
    C, Z, N = 5, 3, 11
    kw = dict(irreps_in=f"{C}x0e + {C}x1o", irreps_out=f"{C}x0e + {C}x1o", correlation=3, num_elements=Z)
    ref = SymmetricContraction(**kw).to(dtype)
    tri = SymmetricContraction(**kw, backend="triton").to(dtype)
    tri.load_state_dict(ref.state_dict())
    x = torch.randn(N, C, 4, dtype=dtype)
    attrs = torch.nn.functional.one_hot(torch.tensor([2, 0, 2, 2, 1, 2, 0, 2, 2, 2, 0]), Z).to(dtype)
    tol = 1e-10 if dtype == torch.float64 else 1e-4

    def grads(model):
        xx = x.clone().requires_grad_()
        out = model(xx, attrs)
        params = [p for p in model.parameters()]
        g1 = torch.autograd.grad((out * torch.cos(out)).sum(), [xx] + params, create_graph=True)
        g2 = torch.autograd.grad(sum((g * g).sum() for g in g1), [xx] + params)
        return [out, *g1, *g2]

    want = grads(ref)
    for index in range(len(SC.CONFIGS)):
        with RT.interpreter_config(index), RT.count_launches() as counts:
            got = grads(tri)
        kinds = Counter(k.rsplit("_", 1)[0] for k in counts.elements())
        # one launch for both irreps; dL/dA twice: the first backward, and the second as it reaches
        # ``out`` again through the upstream gradient ``d(out cos out)/d out``
        assert kinds["_sc_fwd"] == 1 and kinds["_sc_dA"] == 2, counts
        for a, b in zip(got, want):
            assert _rel(a, b) < tol, index


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_row_groups_match_reference_every_config(dtype, monkeypatch):
    """dL/dA and dL/dW in row groups (one launch each), with a grouping of their own for 8-byte
    dtypes: forward, first and second derivatives against the torch reference on every config."""
    from mlpot.o3.symmetric_contraction import SymmetricContraction

    # limits low enough to group this small table in both dtypes (its fp32 coefficients, rounded,
    # have fewer distinct values)
    wide64 = dtype == torch.float64
    monkeypatch.setattr(SC, "MAX_GROUP_CONSTS", {"dA": 15, "dW": 6} if wide64 else {"dA": 10, "dW": 4})
    monkeypatch.setattr(SC, "MAX_GROUP_CONSTS_WIDE", {"dA": 9, "dW": 3} if wide64 else {"dA": 7, "dW": 2})
    torch.manual_seed(4)
    C, Z, N = 3, 2, 6
    kw = dict(irreps_in=f"{C}x0e + {C}x1o", irreps_out=f"{C}x0e + {C}x1o", correlation=3, num_elements=Z)
    ref = SymmetricContraction(**kw).to(dtype)
    tri = SymmetricContraction(**kw, backend="triton").to(dtype)
    tri.load_state_dict(ref.state_dict())
    x = torch.randn(N, C, 4, dtype=dtype)
    attrs = torch.nn.functional.one_hot(torch.tensor([1, 0, 1, 1, 0, 1]), Z).to(dtype)
    table = SC.build_table([tri._joint_U(nu).to(dtype) for nu in (1, 2, 3)])
    groups = {k: SC.launch_groups(table, k, dtype) for k in ("dA", "dW")}
    for k in ("dA", "dW"):
        narrow, wide = SC.row_groups(table, k), SC.row_groups(table, k, wide=True)
        assert 1 < len(narrow) < len(wide)  # grouped in both dtypes, more groups for fp64
        assert sorted(r for rows in wide for r in rows) == list(range(table.D if k == "dA" else table.Q))
        want_ids = range(len(narrow), len(narrow) + len(wide)) if dtype == torch.float64 else range(len(narrow))
        assert groups[k] == list(want_ids)
    tol = 1e-10 if dtype == torch.float64 else 1e-4

    def grads(model):
        xx = x.clone().requires_grad_()
        out = model(xx, attrs)
        params = list(model.parameters())
        g1 = torch.autograd.grad((out * torch.cos(out)).sum(), [xx] + params, create_graph=True)
        g2 = torch.autograd.grad(sum((g * g).sum() for g in g1), [xx] + params)
        return [out, *g1, *g2]

    want = grads(ref)
    for index in range(len(SC.CONFIGS)):
        with RT.interpreter_config(index), RT.count_launches() as counts:
            got = grads(tri)
        kinds = Counter(k.rsplit("_", 1)[0] for k in counts.elements())
        assert kinds["_sc_fwd"] == 1 and kinds["_sc_dA"] == 2 * len(groups["dA"]), counts
        passes = counts["_sc_block_sum_kernel"]  # dL/dW passes: one launch per row group each
        assert passes >= 1 and kinds["_sc_dW"] == passes * len(groups["dW"]), counts
        for a, b in zip(got, want):
            assert _rel(a, b) < tol, index
