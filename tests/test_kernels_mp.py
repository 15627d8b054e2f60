"""Fused channelwise message-passing kernel (gather -> uvu TP -> scatter) against e3nn.

Runs the Triton kernels on the CPU interpreter; TRITON_INTERPRET must be set before any kernel
is jitted (mlpot.kernels jit lazily at the first launch, so setting it here is enough).
Tolerances: float64 1e-10 absolute; float32 1e-4 relative to the largest reference value.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch
from e3nn import o3

from mlpot.o3 import layout as LAYOUT  # the kernels convert at their boundaries with mlpot.o3.layout
from mlpot.o3.backend import kernels_module

CT = kernels_module("channelwise_tp")


def _mace_like(C, lmax_in, lmax_sh, lmax_out):
    irreps_in = o3.Irreps([(C, (l, (-1) ** l)) for l in range(lmax_in + 1)])
    irreps_sh = o3.Irreps.spherical_harmonics(lmax_sh)
    outs, ins = [], []
    for i1, (_, ir1) in enumerate(irreps_in):
        for i2, (_, ir2) in enumerate(irreps_sh):
            for ir3 in ir1 * ir2:
                if ir3.l <= lmax_out:
                    ins.append((i1, i2, len(outs)))
                    outs.append((C, ir3))
    return irreps_in, irreps_sh, o3.Irreps(outs), ins


def _e3nn_reference(irreps_in, irreps_sh, irreps_out, ins, dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # e3nn stores its CG buffers in the default dtype
    try:
        tp = o3.TensorProduct(irreps_in, irreps_sh, irreps_out, [(a, b, c, "uvu", True) for a, b, c in ins],
                              shared_weights=False, internal_weights=False)
    finally:
        torch.set_default_dtype(old)
    return tp.to(dtype)


def _tol(ref, dtype):
    return 1e-10 if dtype == torch.float64 else 1e-4 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_mp_matches_e3nn_with_double_backward(dtype):
    g = torch.Generator().manual_seed(0)
    irreps_in, irreps_sh, irreps_out, ins = _mace_like(3, 1, 2, 2)
    tp = _e3nn_reference(irreps_in, irreps_sh, irreps_out, ins, dtype)
    N, E = 4, 9
    src = torch.randint(0, N, (E,), generator=g)
    dst = torch.randint(0, N, (E,), generator=g)
    dst[-1] = N - 1  # at least one node with edges at the end; node ids with no edges stay zero
    x = torch.randn(N, irreps_in.dim, generator=g, dtype=dtype).requires_grad_()
    vec = torch.randn(E, 3, generator=g, dtype=dtype)
    Y = o3.spherical_harmonics(irreps_sh, vec, True, normalization="component").requires_grad_()
    w = torch.randn(E, tp.weight_numel, generator=g, dtype=dtype).requires_grad_()
    ref = torch.zeros(N, irreps_out.dim, dtype=dtype).index_add(0, dst, tp(x[src], Y, w))
    out = CT.FusedChannelwiseTP(irreps_in, irreps_sh, irreps_out, ins)(x, Y, w, src, dst)
    assert out.dtype == dtype
    assert (out - ref).abs().max() <= _tol(ref, dtype)

    gout = torch.randn(out.shape, generator=g, dtype=dtype)
    gk = torch.autograd.grad(out, (x, Y, w), gout, create_graph=True)
    gr = torch.autograd.grad(ref, (x, Y, w), gout, create_graph=True)
    for a, b in zip(gk, gr):
        assert (a - b).abs().max() <= _tol(b, dtype)
    # double backward (what a force loss needs): gradient of a function of the first gradients
    hk = torch.autograd.grad(sum((a * a).sum() for a in gk), (x, Y, w))
    hr = torch.autograd.grad(sum((b * b).sum() for b in gr), (x, Y, w))
    for a, b in zip(hk, hr):
        assert (a - b).abs().max() <= _tol(b, dtype) * 10


def test_path_weights_are_e3nns():
    irreps_in, irreps_sh, irreps_out, ins = _mace_like(2, 2, 3, 2)
    tp = _e3nn_reference(irreps_in, irreps_sh, irreps_out, ins, torch.float64)
    mine = CT.e3nn_uvu_path_weights(irreps_in, irreps_sh, irreps_out, ins)
    assert mine == pytest.approx([i.path_weight for i in tp.instructions], rel=1e-12)


def test_shared_output_irrep_paths_are_summed():
    # two instructions into the same output irrep (path_normalization="element" divides by 2)
    irreps_in, irreps_sh = o3.Irreps("2x0e+2x1o"), o3.Irreps("0e+1o")
    irreps_out = o3.Irreps("2x1o")
    ins = [(0, 1, 0), (1, 0, 0)]
    tp = _e3nn_reference(irreps_in, irreps_sh, irreps_out, ins, torch.float64)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, irreps_in.dim, generator=g, dtype=torch.float64)
    Y = torch.randn(5, 4, generator=g, dtype=torch.float64)
    w = torch.randn(5, tp.weight_numel, generator=g, dtype=torch.float64)
    src, dst = torch.tensor([0, 1, 2, 2, 0]), torch.tensor([1, 1, 0, 2, 2])
    ref = torch.zeros(3, irreps_out.dim, dtype=torch.float64).index_add(0, dst, tp(x[src], Y, w))
    out = CT.FusedChannelwiseTP(irreps_in, irreps_sh, irreps_out, ins)(x, Y, w, src, dst)
    assert (out - ref).abs().max() < 1e-12


def test_layout_roundtrip_and_channel_last():
    irreps = o3.Irreps("3x0e+3x1o+3x2e")
    x = torch.randn(2, irreps.dim, dtype=torch.float64)
    cl = LAYOUT.mul_ir_to_channel_last(x, irreps)
    assert cl.shape == (2, 9, 3)
    assert torch.equal(cl[:, 1:4, 1], x[:, 3 + 3:3 + 6])  # channel 1 of the 1o block
    assert torch.equal(LAYOUT.channel_last_to_mul_ir(cl, irreps), x)


def test_edge_plan_is_cached_per_graph_content():
    """The calculator builds new edge tensors each call; the plan (and its sorts) is reused while
    their content is unchanged, and rebuilt when one edge changes (same sizes)."""
    g = torch.Generator().manual_seed(8)
    src = torch.randint(0, 5, (12,), generator=g)
    dst = torch.randint(0, 5, (12,), generator=g)
    plan = CT.EdgePlan.cached(src, dst, 5)
    seg = plan.segments("dst")
    again = CT.EdgePlan.cached(src.clone(), dst.clone(), 5)
    assert again is plan and again.segments("dst") is seg
    dst2 = dst.clone()
    dst2[3] = (dst2[3] + 1) % 5
    other = CT.EdgePlan.cached(src.clone(), dst2, 5)
    assert other is not plan and torch.equal(other.dst, dst2)
    assert CT.EdgePlan.cached(src, dst, 6) is not plan  # another node count


def test_fused_mp_with_cached_plan_follows_the_graph():
    """Two graphs of the same size through one FusedChannelwiseTP: each result is its own."""
    irreps_in, irreps_sh, irreps_out, ins = _mace_like(2, 1, 1, 1)
    tp = _e3nn_reference(irreps_in, irreps_sh, irreps_out, ins, torch.float64)
    fused = CT.FusedChannelwiseTP(irreps_in, irreps_sh, irreps_out, ins)
    g = torch.Generator().manual_seed(9)
    N, E = 3, 5
    x = torch.randn(N, irreps_in.dim, generator=g, dtype=torch.float64)
    Y = torch.randn(E, irreps_sh.dim, generator=g, dtype=torch.float64)
    w = torch.randn(E, tp.weight_numel, generator=g, dtype=torch.float64)
    for _ in range(2):
        src = torch.randint(0, N, (E,), generator=g)
        dst = torch.randint(0, N, (E,), generator=g)
        ref = torch.zeros(N, irreps_out.dim, dtype=torch.float64).index_add(0, dst, tp(x[src], Y, w))
        assert (fused(x, Y, w, src, dst) - ref).abs().max() < 1e-12


# ------------------------------------------------------------------------------------------------
# edge-outer kernels generated per CG table (mlpot.kernels.mp_codegen): every autotune config,
# determinism, gradients of every order, the generated-source cache
# ------------------------------------------------------------------------------------------------
RT = kernels_module("_runtime")
MPG = kernels_module("mp_codegen")


def _mp_problem(C, lmax_in, lmax_sh, lmax_out, N, E, dtype, seed):
    """A graph where node 0 receives nothing and node N-1 sends nothing, with random operands."""
    g = torch.Generator().manual_seed(seed)
    irreps_in, irreps_sh, irreps_out, ins = _mace_like(C, lmax_in, lmax_sh, lmax_out)
    tp = _e3nn_reference(irreps_in, irreps_sh, irreps_out, ins, dtype)
    src = torch.randint(0, N - 1, (E,), generator=g)
    dst = torch.randint(1, N, (E,), generator=g)
    x = torch.randn(N, irreps_in.dim, generator=g, dtype=dtype).requires_grad_()
    Y = o3.spherical_harmonics(irreps_sh, torch.randn(E, 3, generator=g, dtype=dtype), True,
                               normalization="component").detach().requires_grad_()
    w = torch.randn(E, tp.weight_numel, generator=g, dtype=dtype).requires_grad_()
    fused = CT.FusedChannelwiseTP(irreps_in, irreps_sh, irreps_out, ins)

    def reference(x, Y, w):
        return torch.zeros(N, irreps_out.dim, dtype=dtype).index_add(0, dst, tp(x[src], Y, w))

    return fused, reference, (x, Y, w), src, dst, torch.randn(N, irreps_out.dim, generator=g, dtype=dtype)


def _all_orders(fn, ops, gout):
    """Forward, the three first gradients, and the gradient of a function of them (double backward)."""
    out = fn(*ops)
    first = torch.autograd.grad(out, ops, gout, create_graph=True)
    second = torch.autograd.grad(sum((a * a).sum() for a in first) + (first[0] * first[0]).sum(), ops)
    return [out.detach(), *(a.detach() for a in first), *second]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_edge_outer_mp_every_config_matches_e3nn_and_is_deterministic(dtype):
    """C = 40: two channel blocks at BLOCK_C = 32 and two 32-channel dY partials; a node that
    receives nothing and one that sends nothing. Every config equals the e3nn reference in the
    forward, the first gradients and the double backward, and every config gives the same bits
    (the results depend neither on the config the autotuner picks nor on the run)."""
    fused, reference, ops, src, dst, gout = _mp_problem(40, 1, 1, 1, N=4, E=6, dtype=dtype, seed=11)
    want = _all_orders(reference, ops, gout)
    kernel = lambda x, Y, w: fused(x, Y, w, src, dst)
    runs = []
    for index in range(len(MPG.CONFIGS)):
        with RT.interpreter_config(index), RT.count_launches() as counts:
            got = _all_orders(kernel, ops, gout)
        assert sum(n for k, n in counts.items() if k.startswith("_mp_fwd_")) > 0
        assert sum(n for k, n in counts.items() if k.startswith("_mp_bwd_")) > 0
        for a, b in zip(got, want):
            assert (a - b).abs().max() <= _tol(b, dtype) * 10, index
        runs.append(got)
    assert runs[0][0][0].abs().sum() == 0  # node 0 receives nothing
    runs.append(_all_orders(kernel, ops, gout))  # a second run of config 0
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(other, runs[0]))


def test_edge_outer_mp_second_derivatives_match_finite_differences():
    """The double backward against central differences of the first gradients along a random
    direction of (x, Y, w) (float64): d/dt <c, grad(x + t dx, Y + t dY, w + t dw)> at t = 0."""
    fused, _, ops, src, dst, gout = _mp_problem(3, 1, 2, 2, N=4, E=6, dtype=torch.float64, seed=5)
    gen = torch.Generator().manual_seed(6)
    dirs = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in ops]
    cots = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in ops]

    def pairing(*args, create_graph=False):
        grads = torch.autograd.grad(fused(*args, src, dst), args, gout, create_graph=create_graph)
        return sum((c * g_).sum() for c, g_ in zip(cots, grads))

    exact = torch.autograd.grad(pairing(*ops, create_graph=True), ops)
    along = sum((d * e).sum() for d, e in zip(dirs, exact))
    h = 1e-4
    shifted = lambda t: [(o + t * d).detach().requires_grad_() for o, d in zip(ops, dirs)]
    fd = (pairing(*shifted(h)) - pairing(*shifted(-h))) / (2 * h)
    assert abs(float(fd - along)) <= 1e-7 * max(1.0, abs(float(along)))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_edge_outer_mp_in_row_groups_matches_e3nn(dtype, monkeypatch):
    """Tables with more output rows than registers hold run in row groups (each walks the edges;
    in the backward group 0 writes the edge gradients and the later groups add theirs). Forced
    here to groups of 8 rows (29 rows: 4 groups): forward, first gradients and double backward
    equal e3nn's."""
    monkeypatch.setattr(MPG, "MAX_LIVE_ROWS", 0)
    fused, reference, ops, src, dst, gout = _mp_problem(3, 1, 2, 2, N=4, E=6, dtype=dtype, seed=13)
    assert [len(r) for r in MPG.row_groups(fused.table)] == [8, 8, 8, 5]
    want = _all_orders(reference, ops, gout)
    with RT.count_launches() as counts:
        out = fused(*ops, src, dst)
    assert sum(n for k, n in counts.items() if k.startswith("_mp_fwd_")) == 4
    assert (out - want[0]).abs().max() <= _tol(want[0], dtype)
    got = _all_orders(lambda x, Y, w: fused(x, Y, w, src, dst), ops, gout)
    for a, b in zip(got, want):
        assert (a - b).abs().max() <= _tol(b, dtype) * 10


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_edge_outer_mp_fp64_row_groups_differ_from_fp32(dtype, monkeypatch):
    """One source holds the row groups of both element sizes when they differ (fp64 holds fewer
    rows per group): here fp32 runs one group and fp64 groups of 8 rows (GROUP ids 1..4), and
    both equal e3nn in every order."""
    monkeypatch.setattr(MPG, "MAX_LIVE_ROWS", 1000)
    monkeypatch.setattr(MPG, "MAX_LIVE_ROWS_WIDE", 0)
    fused, reference, ops, src, dst, gout = _mp_problem(3, 1, 2, 2, N=4, E=6, dtype=dtype, seed=14)
    assert [len(r) for r in MPG.row_groups(fused.table)] == [29]
    assert [len(r) for r in MPG.row_groups(fused.table, wide=True)] == [8, 8, 8, 5]
    want_ids = [1, 2, 3, 4] if dtype == torch.float64 else [0]
    assert MPG.launch_groups(fused.table, dtype) == want_ids
    want = _all_orders(reference, ops, gout)
    with RT.count_launches() as counts:
        out = fused(*ops, src, dst)
    assert sum(n for k, n in counts.items() if k.startswith("_mp_fwd_")) == len(want_ids)
    assert (out - want[0]).abs().max() <= _tol(want[0], dtype)
    got = _all_orders(lambda x, Y, w: fused(x, Y, w, src, dst), ops, gout)
    for a, b in zip(got, want):
        assert (a - b).abs().max() <= _tol(b, dtype) * 10


def test_generated_kernels_are_cached_by_content(tmp_path, monkeypatch):
    """The source of a table's kernels is written once under $MLPOT_CACHE/kernels, named by its
    hash; a damaged file is rewritten; a fresh process finds a kernel by its name (as the
    ahead-of-time compile does) through the module's __getattr__."""
    monkeypatch.setenv("MLPOT_CACHE", str(tmp_path))
    monkeypatch.setattr(MPG, "_KERNELS", {})
    monkeypatch.setattr(MPG, "_LOADED", {})
    table = CT.build_uvu_table(*_mace_like(1, 1, 1, 1))
    key, src = MPG.module_source(table)
    assert MPG.module_source(CT.build_uvu_table(*_mace_like(1, 1, 1, 1)))[0] == key
    assert MPG.module_source(CT.build_uvu_table(*_mace_like(1, 1, 2, 1)))[0] != key
    fwd, bwd = MPG.kernels_for(table)
    path = tmp_path / "kernels" / f"mp_{key}.py"
    assert path.read_text() == src
    assert fwd.fn.__name__ == f"_mp_fwd_{key}" and bwd.fn.__name__ == f"_mp_bwd_{key}"
    assert fwd.fn.__module__ == MPG.__name__
    path.write_text("broken")
    monkeypatch.setattr(MPG, "_KERNELS", {})
    monkeypatch.setattr(MPG, "_LOADED", {})
    MPG.kernels_for(table)
    assert path.read_text() == src
    monkeypatch.setattr(MPG, "_LOADED", {})
    assert getattr(MPG, f"_mp_bwd_{key}").__name__ == f"_mp_bwd_{key}"
    with pytest.raises(AttributeError):
        MPG._mp_fwd_nothex


# the fused double backward (one tangent pass, dg included, create_graph=False) against the
# composed path (create_graph=True) and e3nn, with every subset of incoming gradients (the
# others None) and of wanted gradients
_SUBSETS = [(0, 1, 2), (1,), (0,), (2,), (0, 2), (1, 2)]


def _double(fn, ops, gout, cots, used, wrt, create_graph):
    """Gradients (zero where unused) w.r.t. ``ops[wrt]`` and ``gout`` of ``sum_{i in used} <cots[i], d<gout, fn>/d ops[i]>``:
    the first backward's outputs not in ``used`` reach the double backward as None."""
    gout = gout.detach().requires_grad_()
    first = torch.autograd.grad(fn(*ops), ops, gout, create_graph=True)
    loss = sum((cots[i] * first[i] * first[i]).sum() for i in used)  # depends on g and the operands
    targets = [ops[i] for i in wrt] + [gout]
    grads = torch.autograd.grad(loss, targets, create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(t) if d is None else d.detach() for t, d in zip(targets, grads)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_double_backward_matches_composed_and_e3nn(dtype):
    """Every autotune config, every subset of the incoming gradients (ax, aY, aw; the others None)
    and two sets of wanted gradients: the fused path (no graph built: one fused tangent pass that
    also accumulates gg) equals the composed path (create_graph=True: first-order kernels) and the
    e3nn reference; the fused path runs the tangent kernels and no first-order backward."""
    fused, reference, ops, src, dst, gout = _mp_problem(40, 1, 1, 1, N=4, E=6, dtype=dtype, seed=21)
    gen = torch.Generator().manual_seed(22)
    cots = [torch.randn(t.shape, generator=gen, dtype=dtype) for t in ops]
    kernel = lambda x, Y, w: fused(x, Y, w, src, dst)
    cases = [(used, (0, 1, 2)) for used in _SUBSETS] + [((0, 1, 2), (1,)), ((1, 2), (0,))]
    wants = {case: _double(reference, ops, gout, cots, *case, False) for case in cases}
    for index in range(len(MPG.CONFIGS)):
        for used, wrt in cases:
            want = wants[used, wrt]
            with RT.interpreter_config(index):
                composed = _double(kernel, ops, gout, cots, used, wrt, True)
                with RT.count_launches() as counts:
                    got = _double(kernel, ops, gout, cots, used, wrt, False)
            # one fused tangent pass (gg included, fp64 in its row groups), no tangent forward
            assert sum(n for k, n in counts.items() if k.startswith("_mp_tbw_")) == len(
                MPG.launch_groups(fused.table, dtype, tangent=True))
            assert sum(n for k, n in counts.items() if k.startswith("_mp_fwd_")) == 1
            # one first-order backward (the first gradients), none in the double backward
            assert sum(n for k, n in counts.items() if k.startswith("_mp_bwd_")) == 1
            for a, b, c in zip(got, composed, want):
                assert (a - c).abs().max() <= _tol(c, dtype) * 10, (index, used, wrt)
                assert (b - c).abs().max() <= _tol(c, dtype) * 10, (index, used, wrt)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_double_backward_in_row_groups(dtype, monkeypatch):
    """The tangent kernel in row groups (forced to 4 groups of <= 8 rows; each writes its own gg
    rows, the first writes h/dw/dY and the others add): equal to e3nn."""
    monkeypatch.setattr(MPG, "MAX_LIVE_ROWS", 0)
    fused, reference, ops, src, dst, gout = _mp_problem(3, 1, 2, 2, N=4, E=6, dtype=dtype, seed=23)
    gen = torch.Generator().manual_seed(24)
    cots = [torch.randn(t.shape, generator=gen, dtype=dtype) for t in ops]
    want = _double(reference, ops, gout, cots, (0, 1, 2), (0, 1, 2), False)
    with RT.count_launches() as counts:
        got = _double(lambda x, Y, w: fused(x, Y, w, src, dst), ops, gout, cots, (0, 1, 2), (0, 1, 2), False)
    assert sum(n for k, n in counts.items() if k.startswith("_mp_tbw_")) == 4
    for a, b in zip(got, want):
        assert (a - b).abs().max() <= _tol(b, dtype) * 10


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_double_backward_fp64_tangent_row_groups(dtype, monkeypatch):
    """The tangent kernel has row groups of their own for 8-byte dtypes (they also hold ``ax``):
    here only they split, into 4 groups of <= 8 rows in fp64, and both dtypes equal e3nn."""
    monkeypatch.setattr(MPG, "MAX_LIVE_ROWS", 1000)
    monkeypatch.setattr(MPG, "MAX_LIVE_ROWS_WIDE", 1000)
    monkeypatch.setattr(MPG, "MAX_LIVE_ROWS_TANGENT_WIDE", 0)
    fused, reference, ops, src, dst, gout = _mp_problem(3, 1, 2, 2, N=4, E=6, dtype=dtype, seed=25)
    assert MPG.launch_groups(fused.table, dtype) == [0]
    want_ids = [1, 2, 3, 4] if dtype == torch.float64 else [0]
    assert MPG.launch_groups(fused.table, dtype, tangent=True) == want_ids
    gen = torch.Generator().manual_seed(26)
    cots = [torch.randn(t.shape, generator=gen, dtype=dtype) for t in ops]
    want = _double(reference, ops, gout, cots, (0, 1, 2), (0, 1, 2), False)
    with RT.count_launches() as counts:
        got = _double(lambda x, Y, w: fused(x, Y, w, src, dst), ops, gout, cots, (0, 1, 2), (0, 1, 2), False)
    assert sum(n for k, n in counts.items() if k.startswith("_mp_tbw_")) == len(want_ids)
    assert sum(n for k, n in counts.items() if k.startswith("_mp_bwd_")) == 1
    for a, b in zip(got, want):
        assert (a - b).abs().max() <= _tol(b, dtype) * 10


@pytest.mark.parametrize("groups", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_tangent_kernel_gg_flag(dtype, groups, monkeypatch):
    """NEED_G of the fused tangent pass, every config, with and without row groups: gg alone (no
    edge gradient wanted) equals MP(ax,Y,w) + MP(x,aY,w) + MP(x,Y,aw) by the forward kernel, and
    the edge gradients are the same with and without gg (gg does not disturb them)."""
    for name in ("MAX_LIVE_ROWS", "MAX_LIVE_ROWS_WIDE", "MAX_LIVE_ROWS_TANGENT_WIDE"):
        monkeypatch.setattr(MPG, name, 0 if groups else 1000)
    fused, _, ops, src, dst, _ = _mp_problem(40, 1, 2, 2, N=5, E=9, dtype=dtype, seed=27)
    table, N, E = fused.table, 5, 9
    assert (len(MPG.launch_groups(table, dtype, tangent=True)) > 1) == groups
    plan = CT.EdgePlan.build(src, dst, N)
    gen = torch.Generator().manual_seed(28)
    rnd = lambda *shape: torch.randn(*shape, generator=gen, dtype=dtype)
    x, ax, g = rnd(N, table.D_in, 40), rnd(N, table.D_in, 40), rnd(N, table.D_out, 40)
    Y, aY, w, aw = rnd(E, table.D_sh), rnd(E, table.D_sh), rnd(E, table.P, 40), rnd(E, table.P, 40)
    want = CT._forward(plan, table, ax, Y, w) + CT._forward(plan, table, x, aY, w) + CT._forward(plan, table, x, Y, aw)
    tol = 1e-12 if dtype == torch.float64 else 1e-4
    for index in range(len(MPG.CONFIGS)):
        with RT.interpreter_config(index):
            only_g = CT._tangent(plan, table, x, Y, w, g, ax, aY, aw, (False, False, False, True))
            no_g = CT._tangent(plan, table, x, Y, w, g, ax, aY, aw, (True, True, True, False))
            both = CT._tangent(plan, table, x, Y, w, g, ax, aY, aw, (True, True, True, True))
            only_x = CT._tangent(plan, table, x, Y, w, g, None, None, aw, (False, False, False, True))
        assert only_g[:3] == [None, None, None] and no_g[3] is None
        assert (only_g[3] - want).abs().max() <= tol * want.abs().max(), index
        assert torch.equal(only_g[3], both[3]), index
        for a, b in zip(no_g[:3], both[:3]):
            assert torch.equal(a, b), index
        want_w = CT._forward(plan, table, x, Y, aw)
        assert (only_x[3] - want_w).abs().max() <= tol * want_w.abs().max(), index
