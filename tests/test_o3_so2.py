"""SO(2) convolution: eSCN identity vs e3nn CG tensor product, O(3) equivariance, roll
invariance, pole stability, gradients, layouts and errors."""
import pytest
import torch
from e3nn import o3

from mlpot.errors import ConfigError, DataError
from mlpot.o3 import (
    SO2Convolution,
    SO2MessageTP,
    cg_message_reference,
    edge_rotation,
    mul_ir_to_sph_channels,
    so2_weights_from_cg,
    sph_channels_to_mul_ir,
    spherical_harmonics,
)
from mlpot.o3.wigner import random_rotation_about_y
from mlpot.testing import assert_equivariant, assert_gradcheck, assert_gradgradcheck

POLES = torch.tensor([[0, 1.3, 0], [0, -0.7, 0], [1e-10, 1, 0], [0, 0, 1], [1, 0, 0]], dtype=torch.float64)


def _edges(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randn(n, 3, dtype=torch.float64, generator=g), POLES])


def _e3nn_tp_float64(irreps_in, lmax_sh, mid, ins):
    """e3nn TensorProduct built with float64 buffers (it uses the default dtype when built)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return o3.TensorProduct(
            irreps_in, o3.Irreps.spherical_harmonics(lmax_sh), mid, ins, shared_weights=False, internal_weights=False
        )
    finally:
        torch.set_default_dtype(old)


def _sum_cg_paths(tp, y_cg, irreps_mid, instructions):
    """Sum the CG outputs over l_f into tp.irreps_out (one block per (input irrep, ir_out) pair)."""
    slices = irreps_mid.slices()
    outs = []
    for o, (mul, ir) in enumerate(tp.irreps_out):
        i = next(p.i_in for p in tp.plan.paths if p.i_out == o)
        acc = torch.zeros(y_cg.shape[0], mul * ir.dim, dtype=y_cg.dtype)
        for ins in instructions:
            if ins[0] == i and irreps_mid[ins[2]].ir == ir:
                acc = acc + y_cg[:, slices[ins[2]]]
        outs.append(acc)
    return torch.cat(outs, -1)


@pytest.mark.parametrize(
    "irreps_in,lmax_sh,target",
    [
        ("3x0e+3x1o+3x2e", 3, "0e+1o+2e+3o"),
        ("2x0e+2x1o+2x1e+2x2o", 2, "0e+0o+1o+1e+2e+2o"),
    ],
)
def test_escn_identity_matches_e3nn_tensor_product(irreps_in, lmax_sh, target):
    irreps_in = o3.Irreps(irreps_in)
    lmax = max(ir.l for _, ir in irreps_in + o3.Irreps(target))
    tp = SO2MessageTP(irreps_in, lmax_sh, target, mmax=lmax)
    mid, ins = cg_message_reference(irreps_in, lmax_sh, tp.irreps_out)
    ref = _e3nn_tp_float64(irreps_in, lmax_sh, mid, ins)
    v = _edges(8)
    E = len(v)
    x = torch.randn(E, irreps_in.dim, dtype=torch.float64)
    w_cg = torch.randn(E, ref.weight_numel, dtype=torch.float64)
    y_ref = _sum_cg_paths(tp, ref(x, spherical_harmonics(lmax_sh, v), w_cg), mid, ins)
    y = tp(x, v, so2_weights_from_cg(tp, w_cg))
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=0)


def test_weight_count_equals_cg_path_count():
    # with all l_f available and mmax = L, SO(2) weights are in bijection with CG weights
    irreps_in = o3.Irreps("2x0e+2x1o+2x2e+2x1e")
    target = "0e+0o+1o+1e+2e+2o"
    tp = SO2MessageTP(irreps_in, 4, target, mmax=2)
    mid, ins = cg_message_reference(irreps_in, 4, tp.irreps_out)
    ref = _e3nn_tp_float64(irreps_in, 4, mid, ins)
    assert tp.weight_numel == ref.weight_numel
    from mlpot.o3.so2 import so2_from_cg_matrix

    T = so2_from_cg_matrix(tp)
    assert torch.linalg.matrix_rank(T) == tp.weight_numel  # invertible map


@pytest.mark.parametrize("mmax", [0, 1, 2])
def test_message_tp_equivariant_rotations_and_reflections(mmax):
    irreps_in = o3.Irreps("2x0e+2x1o+2x2e+1x1e")
    tp = SO2MessageTP(irreps_in, 2, "0e+1o+2e+1e+0o", mmax=mmax)
    v = _edges(5)
    x = torch.randn(len(v), irreps_in.dim, dtype=torch.float64)
    w = torch.randn(len(v), tp.weight_numel, dtype=torch.float64)
    assert_equivariant(tp, [irreps_in, "1o", None], tp.irreps_out, inputs=[x, v, w], n_matrices=4)


@pytest.mark.parametrize("parity_in,parity_out", [("sh", "sh"), (-1, "sh"), ([1, 1, -1], [-1, 1, 1, -1])])
def test_so2_convolution_equivariant_with_parities(parity_in, parity_out):
    conv = SO2Convolution(2, 3, 1, 3, 2, parity_in=parity_in, parity_out=parity_out)
    conv.double()
    v = _edges(4)
    x = torch.randn(len(v), conv.irreps_in.dim, dtype=torch.float64)
    w = torch.randn(len(v), conv.weight_numel, dtype=torch.float64)

    def fn(x_flat, vec, weights):
        x_sph = mul_ir_to_sph_channels(x_flat, conv.irreps_in)
        return sph_channels_to_mul_ir(conv(x_sph, vec, weights))

    assert_equivariant(fn, [conv.irreps_in, "1o", None], conv.irreps_out, inputs=[x, v, w], n_matrices=4)


def test_parity_rule_weight_counts():
    # 1o -> 1o: l_f even -> "even" path, m = 0, 1; 1o -> 1e: l_f odd -> "odd" path, m = 1 only
    tp = SO2MessageTP("1x1o", 2, "1o+1e+0e+0o", mmax=1)
    kinds = {(str(tp.irreps_out[p.i_out].ir), p.m): p.kind for p in tp.plan.paths}
    assert kinds == {("1o", 0): "even", ("1o", 1): "even", ("1e", 1): "odd", ("0e", 0): "even"}
    assert "0o" not in [str(ir) for _, ir in tp.irreps_out]  # 1o x Y_lf -> 0o impossible


def test_roll_invariance_and_poles():
    irreps_in = o3.Irreps("2x0e+2x1o+2x2e")
    tp = SO2MessageTP(irreps_in, 2, "0e+1o+2e", mmax=1)
    v = _edges(6)
    E = len(v)
    x = torch.randn(E, irreps_in.dim, dtype=torch.float64)
    w = torch.randn(E, tp.weight_numel, dtype=torch.float64)
    y = tp(x, v, w)
    rolled = random_rotation_about_y(E) @ edge_rotation(v)
    torch.testing.assert_close(tp(x, v, w, rotation=rolled), y, atol=1e-12, rtol=0)
    # continuity across the frame-branch switch (y component changes sign) and at the poles
    eps = 1e-7
    for base in ([0.6, 0.0, 0.8], [0.0, 1.0, 0.0], [0.0, -1.0, 0.0]):
        b = torch.tensor(base, dtype=torch.float64)
        vs = torch.stack([b, b + torch.tensor([eps, eps, -eps], dtype=torch.float64)])
        ys = tp(x[:1].expand(2, -1), vs, w[:1].expand(2, -1))
        torch.testing.assert_close(ys[0], ys[1], atol=1e-5, rtol=0)


def test_gradients_second_order_including_poles():
    irreps_in = o3.Irreps("1x0e+1x1o+1x2e")
    tp = SO2MessageTP(irreps_in, 2, "0e+1o+2e", mmax=1)
    v = torch.cat([torch.randn(1, 3, dtype=torch.float64), POLES[:2]])
    x = torch.randn(len(v), irreps_in.dim, dtype=torch.float64)
    w = torch.randn(len(v), tp.weight_numel, dtype=torch.float64)
    assert_gradcheck(tp, [x, v, w])
    # second order w.r.t. the edge vectors (the force-training path), x and w fixed
    assert_gradgradcheck(lambda vec: tp(x, vec, w), [v])


def test_float32_matches_float64():
    irreps_in = o3.Irreps("4x0e+4x1o+4x2e")
    tp = SO2MessageTP(irreps_in, 2, "0e+1o+2e", mmax=2)
    v = _edges(10)
    x = torch.randn(len(v), irreps_in.dim, dtype=torch.float64)
    w = torch.randn(len(v), tp.weight_numel, dtype=torch.float64)
    y64 = tp(x, v, w)
    y32 = tp(x.float(), v.float(), w.float())
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), y64, atol=1e-4, rtol=1e-4)


def test_layout_round_trip_and_internal_weights():
    irreps = o3.Irreps("3x0e+3x1o+3x2e")
    x = torch.randn(5, irreps.dim, dtype=torch.float64)
    s = mul_ir_to_sph_channels(x, irreps)
    assert s.shape == (5, 9, 3)
    torch.testing.assert_close(sph_channels_to_mul_ir(s), x)
    # the l=1 block of the sph layout is (component, channel)
    torch.testing.assert_close(s[:, 1:4, 1], x[:, 3:12].reshape(5, 3, 3)[:, 1, :])
    conv = SO2Convolution(2, 2, 2, 3, 4, internal_weights=True).double()
    y = conv(s, torch.randn(5, 3, dtype=torch.float64))
    assert y.shape == (5, 9, 4)
    y.sum().backward()
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()


def test_errors():
    tp = SO2MessageTP("2x0e+2x1o", 1, "0e+1o", mmax=1)
    x = torch.randn(3, 8, dtype=torch.float64)
    v = torch.randn(3, 3, dtype=torch.float64)
    w = torch.randn(3, tp.weight_numel, dtype=torch.float64)
    with pytest.raises(DataError):
        tp(x[:, :5], v, w)
    with pytest.raises(DataError):
        tp(x, v[:, :2], w)
    with pytest.raises(DataError):
        tp(x, v, w[:, :-1])
    with pytest.raises(DataError):
        tp(x, v, w.float())
    with pytest.raises(ConfigError):
        SO2MessageTP("2x0e", 1, "0e", mmax=-1)
    with pytest.raises(ConfigError):
        SO2Convolution(1, 1, 1, 2, 2, parity_in=[1])
    with pytest.raises(DataError):
        SO2Convolution(1, 1, 1, 2, 2)(torch.randn(3, 4, 3), v)
    with pytest.raises(DataError):
        mul_ir_to_sph_channels(x, "2x0e+1x1o")
