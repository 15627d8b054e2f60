"""The compiled CPU kernels (backend ``cpu``, mlpot.kernels.cpu): built here with the machine's C
compiler, checked against mace-torch's formula for the symmetric contraction, its input gradient
and second derivatives; the registry's choice; a model under ``auto`` against ``reference``."""
from __future__ import annotations

import pytest
import torch
from e3nn import o3
from test_o3_symmetric_contraction import CASES, _direct, _inputs

from mlpot.errors import ConfigError
from mlpot.o3 import backend as B
from mlpot.o3.symmetric_contraction import SymmetricContraction

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _kernels():
    B._ensure_kernels_package()
    import mlpot.kernels.cpu as cpu
    import mlpot.kernels.symmetric_contraction_cpu as sc_cpu

    return cpu, sc_cpu


def test_kernels_build_here():
    """CI has a C compiler: the kernels must build (a failure here is a defect, not a skip)."""
    cpu, _ = _kernels()
    assert cpu.unavailable_reason() is None
    assert B.select_backend("symmetric_contraction", "auto", "cpu", constant_weights=True) == "cpu"


@pytest.mark.parametrize("irreps_in, irreps_out, corr, S",
                         CASES + [("2x0e+2x1o", "2x0e", 4, 2), ("2x0e+2x1o", "2x0e+2x1o", 1, 2),
                                  ("20x0e+20x1o+20x2e", "20x0e+20x1o", 3, 3)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_symmetric_contraction_equals_the_direct_contraction(irreps_in, irreps_out, corr, S, dtype):
    """Output, input gradient (the VJP kernel) and a second derivative (the differentiable torch
    sums) against mace-torch's formula; channels not a multiple of the vector width (padding),
    every species present, then one species only (local species tables)."""
    _, sc_cpu = _kernels()
    sc = SymmetricContraction(irreps_in, irreps_out, corr, S).double().eval()
    x, attrs = _inputs(sc, N=11)
    cot = torch.randn(11, o3.Irreps(irreps_out).dim, dtype=torch.float64)
    tol = dict(atol=1e-11, rtol=1e-11) if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-5)
    for species in ("all", "last only"):
        if species == "last only":
            attrs = torch.zeros_like(attrs)
            attrs[:, S - 1] = 1
        xd = x.clone().requires_grad_(True)
        ref = _direct(sc, xd, attrs)
        g_ref, = torch.autograd.grad((ref * cot).sum(), xd, create_graph=True)
        scd = sc.to(dtype)
        xk = x.to(dtype).requires_grad_(True)
        out = sc_cpu.symmetric_contraction_cpu(scd, xk, attrs.to(dtype))
        torch.testing.assert_close(out.double(), ref.detach(), **tol)
        g, = torch.autograd.grad((out * cot.to(dtype)).sum(), xk)
        assert g_ref.abs().max() > 1e-3
        torch.testing.assert_close(g.double(), g_ref.detach(), **tol)
        sc.double()
        if corr > 1 and dtype == torch.float64:  # a graph through the backward (Hessians)
            xk = x.clone().requires_grad_(True)
            g1, = torch.autograd.grad((sc_cpu.symmetric_contraction_cpu(sc, xk, attrs) * cot).sum(), xk,
                                      create_graph=True)
            h1, = torch.autograd.grad((g1 * torch.sin(g1)).sum(), xk)
            h2, = torch.autograd.grad((g_ref * torch.sin(g_ref)).sum(), xd)
            torch.testing.assert_close(h1, h2, atol=1e-9, rtol=1e-9)


def test_symmetric_contraction_threads_and_sizes(monkeypatch):
    """Channel blocks split over two threads give the same numbers; no nodes gives an empty output."""
    cpu, sc_cpu = _kernels()
    monkeypatch.setattr(cpu, "THREAD_MIN_WORK", 0)  # split however small the call
    sc = SymmetricContraction("40x0e+40x1o+40x2e", "40x0e+40x1o", 3, 2).double().eval()
    x, attrs = _inputs(sc, N=300)
    x.requires_grad_(True)
    outs, parts, real = [], [], cpu.run_parts
    monkeypatch.setattr(cpu, "run_parts", lambda calls: parts.append(len(calls)) or real(calls))
    for threads in (1, 2):
        torch.set_num_threads(threads)
        out = sc_cpu.symmetric_contraction_cpu(sc, x, attrs)
        outs.append((out, torch.autograd.grad(out.square().sum(), x)[0]))
    torch.set_num_threads(1)
    assert parts == [1, 1, 2, 2]  # forward and backward, 1 then 2 threads
    torch.testing.assert_close(outs[0], outs[1], atol=1e-13, rtol=1e-13)
    torch.testing.assert_close(outs[0][0], _direct(sc, x, attrs), atol=1e-11, rtol=1e-11)
    empty = sc_cpu.symmetric_contraction_cpu(sc, x[:0], attrs[:0])
    assert empty.shape == (0, 160)


def test_module_dispatch_under_auto(monkeypatch):
    """``auto`` runs the kernels at inference (eval mode, and train mode without a graph) and the
    reference when the weights need a gradient; both equal the direct contraction, and training
    gets weight gradients."""
    sc = SymmetricContraction("4x0e+4x1o+4x2e", "4x0e+4x1o", 3, 2, backend="auto").double()
    x, attrs = _inputs(sc)
    calls = []
    _, sc_cpu = _kernels()
    real = sc_cpu.symmetric_contraction_cpu

    def spy(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(sc_cpu, "symmetric_contraction_cpu", spy)
    sc.eval()
    torch.testing.assert_close(sc(x, attrs), _direct(sc, x, attrs), atol=1e-11, rtol=1e-11)
    assert len(calls) == 1
    sc.train()
    out = sc(x, attrs)
    assert len(calls) == 1  # weights need a gradient: the reference
    torch.testing.assert_close(out, _direct(sc, x, attrs), atol=1e-11, rtol=1e-11)
    out.sum().backward()
    assert sc.contractions[0].W(3).grad is not None
    with torch.no_grad():
        sc(x, attrs)
    assert len(calls) == 2
    # fine-tuning with the product layer frozen: train mode, no weight gradient -> the kernels,
    # and the force loss's graph through the backward (torch sums)
    for p in sc.parameters():
        p.requires_grad_(False)
    xg = x.clone().requires_grad_(True)
    g, = torch.autograd.grad(sc(xg, attrs).square().sum(), xg, create_graph=True)
    assert len(calls) == 3
    ref, = torch.autograd.grad(_direct(sc, xg, attrs).square().sum(), xg, create_graph=True)
    torch.testing.assert_close(g, ref, atol=1e-10, rtol=1e-10)
    h1, h2 = (torch.autograd.grad(t.sin().sum(), xg)[0] for t in (g, ref))
    torch.testing.assert_close(h1, h2, atol=1e-9, rtol=1e-9)


def test_registry_choices_and_errors(monkeypatch):
    assert B.supported_backends("symmetric_contraction") == ("reference", "triton", "cpu")
    assert B.select_backend("symmetric_contraction", "auto", "cpu", constant_weights=False) == "reference"
    assert B.select_backend("channelwise_tp", "auto", "cpu", layout="uniform", training=True) == "reference"
    assert B.select_backend("channelwise_tp", "auto", "cpu", layout="general", training=False) == "reference"
    assert B.select_backend("channelwise_tp", "auto", "cpu", layout="uniform", training=False) == "cpu"
    assert B.select_backend("so2_linear", "auto", "cpu") == "reference"  # no CPU kernels for it
    with pytest.raises(ConfigError, match="no 'cpu' backend"):
        B.check_backend("so2_linear", "cpu")
    with pytest.raises(ConfigError, match="constant_weights"):
        B.check_backend("symmetric_contraction", "cpu", constant_weights=False)
    with pytest.raises(ConfigError, match="CPU tensors"):
        B.resolve_backend("cpu", "cuda")


def test_missing_compiler_is_clear_and_auto_keeps_the_reference(monkeypatch, tmp_path):
    cpu, _ = _kernels()
    monkeypatch.setenv("CC", "no-such-compiler-here")
    monkeypatch.setenv("MLPOT_CACHE", str(tmp_path))
    cpu._load.cache_clear()
    try:
        assert "no C compiler" in cpu.unavailable_reason()
        with pytest.raises(ConfigError, match="cannot be built here .*no C compiler"):
            B.select_backend("symmetric_contraction", "cpu", "cpu", constant_weights=True)
        assert B.select_backend("symmetric_contraction", "auto", "cpu", constant_weights=True) == "reference"
    finally:
        monkeypatch.undo()
        cpu._load.cache_clear()
    assert cpu.unavailable_reason() is None


def test_build_is_cached_and_atomic(monkeypatch, tmp_path):
    """The library lands in $MLPOT_CACHE/kernels under a content hash, with no temporary left."""
    cpu, _ = _kernels()
    monkeypatch.setenv("MLPOT_CACHE", str(tmp_path))
    cpu._load.cache_clear()
    try:
        assert cpu.unavailable_reason() is None
        built = list((tmp_path / "kernels").iterdir())
        assert len(built) == 1 and built[0].name.startswith("cpu_kernels-") and built[0].suffix == ".so"
        stamp = built[0].stat().st_mtime_ns
        cpu._load.cache_clear()
        assert cpu.unavailable_reason() is None
        assert [p.stat().st_mtime_ns for p in (tmp_path / "kernels").iterdir()] == [stamp]
    finally:
        monkeypatch.undo()
        cpu._load.cache_clear()


def test_mace_auto_equals_reference(monkeypatch):
    """A MACE under ``auto`` (the CPU kernels in its message passing and products) gives the reference's energy,
    forces and stress, float64; its forces match finite differences and it is equivariant under
    rotations and reflections."""
    from mlpot.models.mace import MACE

    _, sc_cpu = _kernels()
    import mlpot.kernels.channelwise_tp_cpu as cw

    calls, real, real_cw = [], sc_cpu.symmetric_contraction_cpu, cw.message_passing_cpu
    monkeypatch.setattr(sc_cpu, "symmetric_contraction_cpu", lambda *a: calls.append("sc") or real(*a))
    monkeypatch.setattr(cw, "message_passing_cpu", lambda *a: calls.append("mp") or real_cw(*a))
    from mlpot.testing.model_checks import (
        build_batch,
        check_forces_finite_difference,
        check_reflection_equivariance,
        check_rotation_equivariance,
        random_crystal,
    )

    cfg = dict(r_max=4.0, atomic_numbers=[1, 6, 8], hidden_irreps="8x0e+8x1o", max_ell=2, correlation=3,
               num_interactions=2, MLP_irreps="4x0e", radial_MLP=[16], avg_num_neighbors=6.0)
    ref = MACE(**cfg, backend="reference").double().eval()
    auto = MACE(**cfg, backend="auto").double().eval()
    auto.load_state_dict(ref.state_dict())
    atoms = random_crystal([1, 6, 8], n=7, seed=3)
    graph = build_batch([atoms], ref.r_max)
    a, b = ref(graph, compute_stress=True), auto(graph, compute_stress=True)
    assert a["forces"].abs().max() > 1e-4
    assert sorted(calls) == ["mp", "mp", "sc", "sc"]  # one each per layer
    assert graph["edge_index"].shape[1] > 0
    for key in ("energy", "forces", "stress"):
        torch.testing.assert_close(b[key], a[key], atol=1e-10, rtol=1e-10)
    check_forces_finite_difference(auto, [atoms])
    check_rotation_equivariance(auto, [atoms])
    check_reflection_equivariance(auto, [atoms])


def _mp_case(U: int, E: int, N: int, seed: int = 0):
    from mlpot.o3.tensor_product import ChannelwiseTensorProduct

    g = torch.Generator().manual_seed(seed)
    sh = o3.Irreps.spherical_harmonics(3)
    tp = ChannelwiseTensorProduct(f"{U}x0e+{U}x1o+{U}x2e", sh, f"{U}x0e+{U}x1o+{U}x2e+{U}x3o").double()
    x = torch.randn(N, 9, U, generator=g, dtype=torch.float64)  # channel-last (N, A, U)
    Y = o3.spherical_harmonics(sh, torch.randn(E, 3, generator=g, dtype=torch.float64), True, normalization="component")
    w = torch.randn(E, tp.weight_numel, generator=g, dtype=torch.float64)
    sender = torch.randint(0, N, (E,), generator=g)
    receiver = torch.randint(0, N, (E,), generator=g)
    return tp, x, Y, w, sender, receiver


@pytest.mark.parametrize("U", [16, 5])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_channelwise_message_passing_equals_the_reference(U, dtype):
    """Output and the gradients w.r.t. the features, the spherical harmonics and the weights
    against the reference (grouped) message passing; a second derivative through the backward;
    channels not a multiple of the vector width (5: padding)."""
    _kernels()
    from mlpot.kernels.channelwise_tp_cpu import message_passing_cpu

    tp, x, Y, w, sender, receiver = _mp_case(U, E=40, N=7)
    tol = dict(atol=1e-11, rtol=1e-11) if dtype == torch.float64 else dict(atol=5e-5, rtol=5e-5)
    ins = [t.clone().requires_grad_(True) for t in (x, Y, w)]
    ref = tp.message_passing_channel_last(*ins, sender, receiver, 7)
    cot = torch.randn_like(ref)
    g_ref = torch.autograd.grad((ref * cot).sum(), ins, create_graph=True)
    tp_k = tp.to(dtype)
    ins_k = [t.detach().to(dtype).requires_grad_(True) for t in ins]
    out = message_passing_cpu(tp_k, *ins_k, sender, receiver, 7)
    torch.testing.assert_close(out.double(), ref.detach(), **tol)
    g = torch.autograd.grad((out * cot.to(dtype)).sum(), ins_k)
    for a, b in zip(g, g_ref):
        assert b.abs().max() > 1e-3
        torch.testing.assert_close(a.double(), b.detach(), **tol)
    tp.double()
    if dtype == torch.float64:
        ins_k = [t.detach().clone().requires_grad_(True) for t in ins]
        g1 = torch.autograd.grad((message_passing_cpu(tp, *ins_k, sender, receiver, 7) * cot).sum(), ins_k,
                                 create_graph=True)
        h1 = torch.autograd.grad(sum((a * torch.sin(a)).sum() for a in g1), ins_k, allow_unused=True)
        h2 = torch.autograd.grad(sum((b * torch.sin(b)).sum() for b in g_ref), ins, allow_unused=True)
        for a, b, t in zip(h1, h2, ins):
            a, b = (torch.zeros_like(t) if v is None else v for v in (a, b))
            torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)
        assert h2[0] is not None and h2[0].abs().max() > 1e-3


def test_channelwise_threads_no_edges_and_dispatch(monkeypatch):
    """Edge ranges over two threads give the same numbers; no edges gives zeros; ``auto`` takes
    the kernels at inference and the reference in training."""
    cpu, _ = _kernels()
    import mlpot.kernels.channelwise_tp_cpu as cw

    monkeypatch.setattr(cpu, "THREAD_MIN_WORK", 0)  # split however small the call
    tp, x, Y, w, sender, receiver = _mp_case(16, E=900, N=60, seed=1)
    x.requires_grad_(True)
    res = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        assert len(cw._edge_ranges(900, 16, 1)) == threads
        out = cw.message_passing_cpu(tp, x, Y, w, sender, receiver, 60)
        res.append((out, torch.autograd.grad(out.square().sum(), x)[0]))
    torch.set_num_threads(1)
    torch.testing.assert_close(res[0], res[1], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(res[0][0], tp.message_passing_channel_last(x, Y, w, sender, receiver, 60),
                               atol=1e-11, rtol=1e-11)
    none = torch.zeros(0, dtype=torch.long)
    assert not cw.message_passing_cpu(tp, x, Y[:0], w[:0], none, none, 60).any()
    calls, real = [], cw.message_passing_cpu
    monkeypatch.setattr(cw, "message_passing_cpu", lambda *a: calls.append(1) or real(*a))
    tp.backend = "auto"
    tp.eval()
    tp.message_passing_channel_last(x, Y, w, sender, receiver, 60)
    assert len(calls) == 1
    tp.train()
    tp.message_passing_channel_last(x, Y, w, sender, receiver, 60)
    assert len(calls) == 1  # training builds a graph through the backward: the reference
    with torch.no_grad():
        tp.message_passing_channel_last(x, Y, w, sender, receiver, 60)
    assert len(calls) == 2
