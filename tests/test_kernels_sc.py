"""Symmetric-contraction kernel (MACE product basis) against the dense torch reference.

Interpreter mode as in the other kernel tests. Tolerances: float64 1e-10, float32 1e-4 relative.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"

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
