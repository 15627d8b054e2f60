"""Gaunt S2-grid product and SO(2) message-passing kernels (CPU interpreter).

Gaunt: checked against the pointwise identity f1(s) f2(s) = sum_k out_k Y_k(s) (exact when
lmax_out >= l1 + l2) and the torch reference. SO(2): against mlpot.o3.so2.so2_conv with gather and
index_add. Tolerances: float64 1e-10, float32 1e-4 relative.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch
from e3nn import o3

from mlpot.o3.backend import kernels_module

GA = kernels_module("gaunt")
SO2K = kernels_module("so2")
CT = kernels_module("channelwise_tp")
RT = kernels_module("_runtime")


def _rel(a, b):
    return ((a - b).abs().max() / max(1.0, b.abs().max().item())).item()


def _tol(dtype):
    return 1e-10 if dtype == torch.float64 else 1e-4


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gaunt_grid_product(dtype):
    g = torch.Generator().manual_seed(4)
    x1 = torch.randn(2, 3, 9, generator=g, dtype=dtype).requires_grad_()
    x2 = torch.randn(2, 3, 4, generator=g, dtype=dtype).requires_grad_()
    out = GA.gaunt_product(x1, x2, 3)
    s = torch.nn.functional.normalize(torch.randn(6, 3, generator=g, dtype=torch.float64), dim=-1)

    def Y(L):
        return o3.spherical_harmonics(list(range(L + 1)), s, False, normalization="component").to(dtype)

    f = torch.einsum("ncd,gd->ncg", x1, Y(2)) * torch.einsum("ncd,gd->ncg", x2, Y(1))
    assert _rel(torch.einsum("ncd,gd->ncg", out, Y(3)), f) < 10 * _tol(dtype)
    ref = GA.reference_gaunt_product(x1, x2, 3)
    gout = torch.randn(out.shape, generator=g, dtype=dtype)
    gk = torch.autograd.grad(out, (x1, x2), gout, create_graph=True)
    gr = torch.autograd.grad(ref, (x1, x2), gout, create_graph=True)
    for a, b in zip(gk, gr):
        assert _rel(a, b) < _tol(dtype)
    hk = torch.autograd.grad(sum((a * a).sum() for a in gk), (x1, x2))
    hr = torch.autograd.grad(sum((b * b).sum() for b in gr), (x1, x2))
    for a, b in zip(hk, hr):
        assert _rel(a, b) < 10 * _tol(dtype)


@pytest.mark.parametrize("mode,dtype", [("full", torch.float64), ("depthwise", torch.float32),
                                        ("depthwise", torch.float64)])
def test_so2_message_passing(mode, dtype, monkeypatch):
    """Values, gradients w.r.t. x, the per-edge weights and the edge vectors (through the Wigner
    blocks), and the double backward, against the reference; the kernel side runs with the torch
    reference refusing to run, so every order is on the node and edge kernels (no fallback).
    Depthwise: the first backward is the fused receiver-outer pass (``_so2_bwd_kernel``)."""
    from mlpot.o3 import so2 as S
    from mlpot.o3 import wigner as Wg
    from mlpot.o3.layout import mul_ir_to_channel_last

    g = torch.Generator().manual_seed(5)
    # full mode: L = 1 keeps the interpreter quick (its per-entry loops); m = 0 and 1, even and odd paths
    L, C, N, E = (2 if mode == "depthwise" else 1), 2, 3, 6
    irreps = o3.Irreps([(C, (l, (-1) ** l)) for l in range(L + 1)])
    irreps_out = irreps + o3.Irreps(f"{C}x1e")  # 1o -> 1e: an odd path (W2, +m <-> -m)
    plan = S.SO2Plan(irreps, irreps_out, L, mode=mode)
    assert {p.kind for p in plan.paths} == {"even", "odd"}
    table = SO2K.SO2Table(plan)
    src = torch.tensor([0, 1, 2, 2, 0, 1])
    dst = torch.tensor([1, 1, 0, 2, 2, 1])
    vec = torch.randn(E, 3, generator=g, dtype=dtype).requires_grad_()
    x = torch.randn(N, (L + 1) ** 2, C, generator=g, dtype=dtype).requires_grad_()
    w = torch.randn(E, plan.weight_numel, generator=g, dtype=dtype).requires_grad_()
    gout = torch.randn(N, table.DO, C, generator=g, dtype=dtype)

    def first_and_second(out):
        first = torch.autograd.grad(out, (x, w, vec), gout, create_graph=True)
        return first, torch.autograd.grad(sum((a * a).sum() for a in first), (x, w, vec))

    R = Wg.edge_rotation(vec)
    y = S.so2_conv(plan, S.sph_channels_to_mul_ir(x[src]), None, w, rotation=R)
    ref = mul_ir_to_channel_last(torch.zeros(N, irreps_out.dim, dtype=dtype).index_add(0, dst, y), irreps_out)
    gr, hr = first_and_second(ref)

    def refuse(*args, **kwargs):
        raise AssertionError("the torch reference ran")

    monkeypatch.setattr(S, "so2_message_passing", refuse)
    monkeypatch.setattr(S, "so2_conv", refuse)
    with RT.count_launches() as launched:
        out = SO2K.so2_message_passing(x, w, Wg.wigner_D_blocks(L, Wg.edge_rotation(vec)),
                                       CT.EdgePlan.build(src, dst, N), table)
        gk, hk = first_and_second(out)
    assert launched["_so2_node_kernel"] >= 2 and launched["_so2_edge_kernel"] >= 3
    assert launched["_so2_bwd_kernel"] >= (1 if mode == "depthwise" else 0)
    if mode == "depthwise":
        assert launched["_segment_sum_kernel"] >= 1  # dx: the per-edge h summed per sender
    assert _rel(out, ref) < _tol(dtype)
    for a, b in zip(gk, gr):
        assert _rel(a, b) < _tol(dtype)
    for a, b in zip(hk, hr):
        assert b.abs().max() > 0 and _rel(a, b) < 10 * _tol(dtype)


def test_gaunt_kernel_matches_mlpot_o3_gaunt_product():
    from mlpot.o3.gaunt import gaunt_product

    g = torch.Generator().manual_seed(6)
    x1 = torch.randn(2, 2, 9, generator=g, dtype=torch.float64)
    x2 = torch.randn(2, 2, 9, generator=g, dtype=torch.float64)
    for lmax_out in (1, 4):
        assert _rel(GA.gaunt_product(x1, x2, lmax_out), gaunt_product(x1, x2, lmax_out, method="grid")) < 1e-10


@pytest.mark.parametrize("method", ["grid", "fourier"])
def test_gaunt_message_tp_triton_equals_reference(method):
    """The message TP on the kernel (dense transforms of either grid) equals its reference."""
    from mlpot.o3.gaunt import GauntMessageTP
    from mlpot.o3.message_passing import EdgeGeometry
    from mlpot.o3.spherical_harmonics import spherical_harmonics

    g = torch.Generator().manual_seed(7)
    tps = {b: GauntMessageTP("2x0e + 2x1o + 2x1e", 1, "0e + 1o + 1e + 2e", method=method, backend=b)
           for b in ("reference", "triton")}
    src, dst, N = torch.tensor([0, 1, 2, 1]), torch.tensor([1, 0, 0, 2]), 3
    x = torch.randn(N, tps["reference"].irreps_in.dim, generator=g, dtype=torch.float64).requires_grad_()
    vec = torch.randn(4, 3, generator=g, dtype=torch.float64)
    w = torch.randn(4, tps["reference"].weight_numel, generator=g, dtype=torch.float64).requires_grad_()
    geo = EdgeGeometry(vectors=vec, lengths=vec.norm(dim=-1, keepdim=True), sh=spherical_harmonics(1, vec))
    with RT.count_launches() as launched:
        out = {b: tp.message_passing(x, geo, w, src, dst, N) for b, tp in tps.items()}
    assert launched["_grid_product_kernel"] > 0
    assert out["reference"].abs().max() > 1e-3 and _rel(out["triton"], out["reference"]) < 1e-10
    cot = torch.randn(out["reference"].shape, generator=g, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(out["triton"], (x, w), cot), torch.autograd.grad(out["reference"], (x, w), cot)):
        assert _rel(a, b) < 1e-10


def test_gaunt_product_basis_triton_chain_equals_reference_with_odd_parts():
    """Powers as chained two-factor kernel products, with odd-type inputs (the p/q split)."""
    from mlpot.o3.gaunt import GauntProductBasis

    g = torch.Generator().manual_seed(8)
    args = ("2x0e + 2x1e + 2x2e", "2x0e + 2x1o + 2x1e + 2x0o", 3, 2)  # 1e: odd-type
    ref = GauntProductBasis(*args).double()
    tri = GauntProductBasis(*args, backend="triton").double()
    tri.load_state_dict(ref.state_dict())
    feats = torch.randn(3, 2, 9, generator=g, dtype=torch.float64).requires_grad_()
    attrs = torch.nn.functional.one_hot(torch.tensor([0, 1, 1]), 2).double()
    with RT.count_launches() as launched:
        a, b = tri(feats, attrs), ref(feats, attrs)
    assert launched["_grid_product_kernel"] > 0
    assert b.abs().max() > 1e-3 and _rel(a, b) < 1e-10
    cot = torch.randn(b.shape, generator=g, dtype=torch.float64)
    assert _rel(torch.autograd.grad(a, feats, cot)[0], torch.autograd.grad(b, feats, cot)[0]) < 1e-10


def _round_to_tf32(a):
    """float32 -> TF32 (10 explicit mantissa bits), round to nearest, ties to even."""
    bits = a.contiguous().view(torch.int32)
    keep = bits + 0x0FFF + ((bits >> 13) & 1)
    return (keep & ~0x1FFF).view(torch.float32)


def test_tf32x3_dot_meets_its_stated_bound_and_plain_tf32_does_not():
    """The per-dot bound the SO(2) module doc composes (``_runtime.dot_precision``): a tf32x3 dot of
    K = 16 (the rotation tiles) is within ``(3 * 2^-22 + K * 2^-24) |A| |B|`` of the exact product,
    entry by entry; a single TF32 product is not (so the bound tells the two apart)."""
    g = torch.Generator().manual_seed(11)
    a = torch.randn(64, 16, generator=g)
    b = torch.randn(16, 32, generator=g)
    exact = a.double() @ b.double()
    bound = (3 * 2.0 ** -22 + 16 * 2.0 ** -24) * (a.double().abs() @ b.double().abs())
    ah, bh = _round_to_tf32(a), _round_to_tf32(b)
    at, bt = _round_to_tf32(a - ah), _round_to_tf32(b - bh)
    tf32x3 = (ah @ bh + ah @ bt + at @ bh).double()
    assert ((tf32x3 - exact).abs() <= bound).all()
    assert ((ah @ bh).double() - exact).abs().gt(bound).any()


@pytest.mark.parametrize("mmax", [1, 2])
def test_so2_float32_within_the_stated_tf32x3_bound(mmax):
    """float32 SO(2) message passing asks for tf32x3 on every dot, and its result is within the
    module doc's bound ``gamma * |F|(|x|, |W|, |D|)`` of the exact (float64) value, entry by entry."""
    from mlpot.o3 import so2 as S
    from mlpot.o3 import wigner as Wg

    g = torch.Generator().manual_seed(12)
    L, C, N = 2, 20, 4  # 20 channels: two channel blocks, one ragged
    irreps_in = o3.Irreps([(C, (l, (-1) ** l)) for l in range(L + 1)])
    irreps_out = o3.Irreps([(C, (l, (-1) ** l)) for l in range(L + 1)] + [(C, (1, 1))])
    plan = S.SO2Plan(irreps_in, irreps_out, mmax, mode="depthwise")
    table = SO2K.SO2Table(plan)
    src = torch.tensor([0, 1, 2, 3, 0, 1, 3, 2, 1])
    dst = torch.tensor([1, 1, 0, 2, 2, 1, 1, 3, 3])
    x = torch.randn(N, table.DI, C, generator=g)
    w = torch.randn(len(src), plan.weight_numel, generator=g)
    wig = Wg.wigner_D_blocks(L, Wg.edge_rotation(torch.randn(len(src), 3, generator=g, dtype=torch.float64))).float()
    with RT.record_launches() as launches:
        out = SO2K.so2_message_passing(x, w, wig, CT.EdgePlan.build(src, dst, N), table)
    assert launches and all(kw["DOT_PRECISION"] == "tf32x3" for _, _, kw in launches)
    exact = SO2K.reference_so2_message_passing(x.double(), w.double(), wig.double(), src, dst, N, table)

    # |F|: the chain on absolute values, from the table's dense (input row, output row) entries
    def tile(std, blk):
        same = blk[:, None] == blk[None, :]
        return wig.double().abs()[:, std[:, None], std[None, :]] * same

    din, dout = tile(table.in_std, table.in_blk), tile(table.out_std, table.out_blk)
    xr = din @ x.double().abs()[src]  # (E, DI, C)
    valid = table.off >= 0
    wabs = w.double().abs()[:, (table.off.clamp(min=0)[..., None] + torch.arange(C))] * valid[..., None]
    y = torch.einsum("eioc,eic->eoc", wabs, xr)
    chain = torch.zeros_like(exact).index_add(0, dst, dout.transpose(1, 2) @ y)
    deg = int(torch.bincount(dst).max())
    gamma = 3 * 3 * 2.0 ** -22 + (SO2K._pad(table.DI) + table.DI + SO2K._pad(table.DO) + deg + 3) * 2.0 ** -24
    err = (out.double() - exact).abs()
    assert exact.abs().max() > 1.0
    assert (err <= gamma * chain + 1e-30).all(), float((err / (gamma * chain + 1e-30)).max())



@pytest.mark.parametrize("shared", [False, True])
def test_so2_fused_backward_skips_unused_gradients(shared):
    """The fused depthwise backward against the reference with two channel blocks (20 channels: the
    Wigner gradient accumulates over them), per-edge or shared weights; a force-like call (the
    gradient of x only, weights and Wigner blocks requiring grad) launches it without the weight
    and Wigner gradients (``NEED_W``/``NEED_D`` off), a weight-only call without ``h``."""
    from mlpot.o3 import so2 as S
    from mlpot.o3 import wigner as Wg

    g = torch.Generator().manual_seed(3)
    L, C, N, dt = 2, 20, 4, torch.float64
    irreps = o3.Irreps([(C, (l, (-1) ** l)) for l in range(L + 1)])
    plan = S.SO2Plan(irreps, irreps + o3.Irreps(f"{C}x1e"), L, mode="depthwise")
    table = SO2K.SO2Table(plan)
    src = torch.tensor([0, 1, 2, 3, 0, 1, 3, 2, 1])
    dst = torch.tensor([1, 1, 0, 2, 2, 1, 1, 3, 3])
    x = torch.randn(N, table.DI, C, generator=g, dtype=dt).requires_grad_()
    w = torch.randn(*(() if shared else (len(src),)), plan.weight_numel, generator=g, dtype=dt).requires_grad_()
    wig = Wg.wigner_D_blocks(L, Wg.edge_rotation(torch.randn(len(src), 3, generator=g, dtype=dt)))
    wig.requires_grad_()
    gout = torch.randn(N, table.DO, C, generator=g, dtype=dt)
    ref = SO2K.reference_so2_message_passing(x, w, wig, src, dst, N, table)
    want = torch.autograd.grad(ref, (x, w, wig), gout)
    plan_e = CT.EdgePlan.build(src, dst, N)
    for wrt, flags in (((x, w, wig), (True, True, True)), ((x,), (True, False, False)), ((w,), (False, True, False))):
        with RT.record_launches() as launches:
            got = torch.autograd.grad(SO2K.so2_message_passing(x, w, wig, plan_e, table), wrt, gout)
        bwd = [kw for k, _, kw in launches if k.fn.__name__ == "_so2_bwd_kernel"]
        assert len(bwd) == 1 and (bwd[0]["NEED_H"], bwd[0]["NEED_W"], bwd[0]["NEED_D"]) == flags
        assert not any(k.fn.__name__ == "_so2_edge_kernel" for k, _, _ in launches)
        for a, t in zip(got, wrt):
            b = want[next(i for i, v in enumerate((x, w, wig)) if v is t)]
            assert b.abs().max() > 0 and _rel(a, b) < _tol(dt)
