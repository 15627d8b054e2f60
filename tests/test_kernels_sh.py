"""Spherical-harmonics (+ Bessel x polynomial-cutoff) kernel against e3nn and the torch formula.

Triton runs on the CPU interpreter (TRITON_INTERPRET set before any kernel is jitted).
Tolerances: float64 1e-10 (values, gradients), 1e-8 relative (second derivatives);
float32 1e-4 relative to the largest reference value (1e-3 for second derivatives).
"""
import os

os.environ["TRITON_INTERPRET"] = "1"

import math

import pytest
import torch
from e3nn import o3

from mlpot.o3.backend import kernels_module

SH = kernels_module("spherical_harmonics")


def _rel(a, b):
    return ((a - b).abs().max() / max(1.0, b.abs().max().item())).item()


@pytest.mark.parametrize("dtype,lmax", [(torch.float64, 8), (torch.float32, 6)])
def test_sh_radial_forward_backward_double_backward(dtype, lmax):
    g = torch.Generator().manual_seed(1)
    vec = (2.0 * torch.randn(11, 3, generator=g, dtype=dtype)).requires_grad_()
    r_max, nb = 4.0, 4
    Y, R = SH.edge_embedding(vec, lmax, nb, r_max)
    Ye = o3.spherical_harmonics(list(range(lmax + 1)), vec, True, normalization="component")
    freqs = torch.arange(1, nb + 1, dtype=dtype) * math.pi / r_max
    _, Rr = SH.reference_edge_embedding(vec, lmax, freqs, r_max, 5)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert _rel(Y, Ye) < tol and _rel(R, Rr) < tol
    assert (R[vec.norm(dim=-1) >= r_max] == 0).all()  # envelope cuts off beyond r_max
    gY = torch.randn(Y.shape, generator=g, dtype=dtype)
    gR = torch.randn(R.shape, generator=g, dtype=dtype)
    gk = torch.autograd.grad((Y, R), vec, (gY, gR), create_graph=True)[0]
    gr = torch.autograd.grad((Ye, Rr), vec, (gY, gR), create_graph=True)[0]
    assert _rel(gk, gr) < tol
    hk = torch.autograd.grad((gk * gk).sum(), vec)[0]
    hr = torch.autograd.grad((gr * gr).sum(), vec)[0]
    assert _rel(hk, hr) < (1e-8 if dtype == torch.float64 else 1e-3)


def test_sh_only_and_normalization():
    vec = torch.randn(5, 3, dtype=torch.float64)
    Y = SH.spherical_harmonics(vec, 3)
    for l in range(4):  # component normalization: |Y^l|^2 = 2l + 1
        assert torch.allclose(Y[:, l * l:(l + 1) ** 2].pow(2).sum(-1), torch.full((5,), 2.0 * l + 1, dtype=torch.float64), atol=1e-12)


def test_autotune_key_is_stable_across_md_steps():
    """The autotune key buckets the edge count (next power of two), so the small changes of the
    edge count between MD steps do not re-tune; a 2x larger graph does."""
    assert "E" not in SH._FWD.key and "E" not in SH._BWD.key
    assert "E_BUCKET" in SH._FWD.key and "E_BUCKET" in SH._BWD.key
    assert {SH.edge_bucket(E) for E in range(40_000, 65_537)} == {65_536}
    assert SH.edge_bucket(65_537) == 131_072 and SH.edge_bucket(3) == 1024


def test_scalars_are_passed_in_the_edge_dtype():
    """r_max and the Bessel normalisation reach the kernels as a tensor of the edge dtype (fp64
    stays fp64 on a GPU; the PTX is checked in tests/test_kernels_aot.py)."""
    RT = kernels_module("_runtime")
    vec = torch.randn(4, 3, dtype=torch.float64).requires_grad_()
    with RT.record_launches(execute=False) as launches:
        SH.edge_embedding(vec, 2, 3, 4.0)
    (_, args, _), = launches
    scal = [a for a in args if torch.is_tensor(a) and a.shape == (2,)]
    assert len(scal) == 1 and scal[0].dtype == torch.float64
    assert scal[0].tolist() == [4.0, math.sqrt(2.0 / 4.0)]
    assert not any(isinstance(a, float) for a in args)
