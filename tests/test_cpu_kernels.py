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


def test_symmetric_contraction_threads_and_sizes():
    """Channel blocks split over two threads give the same numbers; no nodes gives an empty output."""
    _, sc_cpu = _kernels()
    sc = SymmetricContraction("40x0e+40x1o+40x2e", "40x0e+40x1o", 3, 2).double().eval()
    x, attrs = _inputs(sc, N=300)
    x.requires_grad_(True)
    outs = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        out = sc_cpu.symmetric_contraction_cpu(sc, x, attrs)
        outs.append((out, torch.autograd.grad(out.square().sum(), x)[0]))
    torch.set_num_threads(1)
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


def test_registry_choices_and_errors(monkeypatch):
    assert B.supported_backends("symmetric_contraction") == ("reference", "triton", "cpu")
    assert B.select_backend("symmetric_contraction", "auto", "cpu", constant_weights=False) == "reference"
    assert B.select_backend("channelwise_tp", "auto", "cpu") == "reference"  # no CPU kernels for it
    with pytest.raises(ConfigError, match="no 'cpu' backend"):
        B.check_backend("channelwise_tp", "cpu")
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
    """A MACE under ``auto`` (the CPU kernels in its products) gives the reference's energy,
    forces and stress, float64, and its forces match finite differences."""
    from mlpot.models.mace import MACE

    _, sc_cpu = _kernels()
    calls, real = [], sc_cpu.symmetric_contraction_cpu
    monkeypatch.setattr(sc_cpu, "symmetric_contraction_cpu", lambda *a: calls.append(1) or real(*a))
    from mlpot.testing.model_checks import build_batch, check_forces_finite_difference, random_crystal

    cfg = dict(r_max=4.0, atomic_numbers=[1, 6, 8], hidden_irreps="8x0e+8x1o", max_ell=2, correlation=3,
               num_interactions=2, MLP_irreps="4x0e", radial_MLP=[16], avg_num_neighbors=6.0)
    ref = MACE(**cfg, backend="reference").double().eval()
    auto = MACE(**cfg, backend="auto").double().eval()
    auto.load_state_dict(ref.state_dict())
    atoms = random_crystal([1, 6, 8], n=7, seed=3)
    graph = build_batch([atoms], ref.r_max)
    a, b = ref(graph, compute_stress=True), auto(graph, compute_stress=True)
    assert a["forces"].abs().max() > 1e-4
    assert len(calls) == 2  # one per product layer
    for key in ("energy", "forces", "stress"):
        torch.testing.assert_close(b[key], a[key], atol=1e-10, rtol=1e-10)
    check_forces_finite_difference(auto, [atoms])
