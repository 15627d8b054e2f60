"""eSCN's SO(2) linear-map kernel (registry op ``so2_linear``) against its reference
:func:`mlpot.o3.so2.so2_linear` on the CPU interpreter: values, first-order gradients with respect
to the input and every weight block, and second order. The force-loss check with an
upstream gradient that depends on the inputs is in tests/test_kernels_force_loss.py.
Tolerances: float64 1e-10, float32 1e-4 relative.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

from mlpot.o3.backend import kernels_module
from mlpot.o3.so2 import SO2Linear, edge_frame_index, so2_linear

LK = kernels_module("so2_linear")
RT = kernels_module("_runtime")


def _rel(a, b):
    return ((a - b).abs().max() / max(1.0, b.abs().max().item())).item()


def _tol(dtype):
    return 1e-10 if dtype == torch.float64 else 1e-4


def _inputs(lmax, mmax, cin, cout, num_edges, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    table = LK.SO2LinearTable(lmax, mmax, cin, cout)
    x = torch.randn(num_edges, table.K, cin, generator=g, dtype=dtype).requires_grad_()
    ws = [torch.randn(n * cin, n * cout, generator=g, dtype=dtype).requires_grad_() for _, _, n in table.blocks]
    return table, x, ws


@pytest.mark.parametrize("lmax,mmax,cin,cout", [(2, 1, 3, 2), (2, 2, 2, 3), (1, 0, 2, 2)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_so2_linear_kernel_equals_reference(lmax, mmax, cin, cout, dtype, monkeypatch):
    # edge chunks of 3 in the weight gradient: several partial sums, one of them ragged
    monkeypatch.setattr(LK, "_E_CHUNK", 3)
    table, x, ws = _inputs(lmax, mmax, cin, cout, 7, dtype, seed=lmax + 10 * mmax + cin)
    with RT.count_launches() as launched:
        y = LK.so2_linear(x, ws, table)
        ref = so2_linear(x, ws, edge_frame_index(lmax, mmax)[2])
        assert y.shape == ref.shape == (7, table.K, cout)
        assert _rel(y, ref) < _tol(dtype)
        gy = torch.randn_like(y)
        gk = torch.autograd.grad(y, [x, *ws], gy)
        gr = torch.autograd.grad(ref, [x, *ws], gy)
        for i, (a, b) in enumerate(zip(gk, gr)):
            assert b.abs().max() > 0, f"operand {i}: vanishing reference gradient"
            assert _rel(a, b) < _tol(dtype), f"operand {i}: {_rel(a, b):.2e}"
    assert {"_so2_linear_gemm_kernel", "_so2_linear_wgrad_kernel"} <= set(launched)


def test_so2_linear_kernel_second_order_equals_reference():
    """Differentiate both first-order gradients (input and weights) again, w.r.t. every operand
    and the upstream gradient: each of the kernel's three products runs inside another's backward."""
    table, x, ws = _inputs(2, 1, 2, 3, 4, torch.float64, seed=5)
    gy = torch.randn(4, table.K, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    gy.requires_grad_()
    blocks = edge_frame_index(2, 1)[2]

    def second_order(fn):
        y = fn(x, ws)
        first = torch.autograd.grad(y, [x, *ws], gy, create_graph=True)
        loss = sum((f ** 2 * (1.0 + x.sum())).sum() for f in first)
        return torch.autograd.grad(loss, [x, *ws, gy])

    gk = second_order(lambda a, w: LK.so2_linear(a, w, table))
    gr = second_order(lambda a, w: so2_linear(a, w, blocks))
    for i, (a, b) in enumerate(zip(gk, gr)):
        assert b.abs().max() > 1e-6, f"operand {i}: vanishing reference gradient"
        assert _rel(a, b) < 1e-10, f"operand {i}: {_rel(a, b):.2e}"


def test_so2_linear_module_dispatches_to_the_kernel():
    torch.manual_seed(0)
    ref = SO2Linear(2, 1, 3, 2).double()
    tri = SO2Linear(2, 1, 3, 2, backend="triton").double()
    tri.load_state_dict(ref.state_dict())
    x = torch.randn(4, len(edge_frame_index(2, 1)[0]), 3, dtype=torch.float64)
    with RT.count_launches() as launched:
        y = tri(x)
    assert _rel(y, ref(x)) < 1e-12
    assert launched["_so2_linear_gemm_kernel"] == 1
    assert tri(x[:0]).shape == (0, x.shape[1], 2)


def test_so2_linear_kernel_rejects_mismatched_inputs():
    table, x, ws = _inputs(2, 1, 3, 2, 2, torch.float64, seed=1)
    with pytest.raises(ValueError, match="weight block"):
        LK.so2_linear(x, [ws[0], ws[1].T], table)
    with pytest.raises(ValueError, match="does not match"):
        LK.so2_linear(x[:, :-1], ws, table)
    with pytest.raises(TypeError, match="dtype mismatch"):
        LK.so2_linear(x.float(), ws, table)


def test_autotune_reuses_the_tuned_config_within_an_edge_bucket(monkeypatch):
    """The compiled kernels' autotuner (``triton.autotune`` as on a GPU) keys on the edge count's
    power-of-two bucket: an MD step whose edge count moved within the bucket reuses the tuned
    config (no benchmark), a graph in another bucket tunes again. The autotuner runs for real on
    the recorded launch arguments; only the timing (``_bench``) and the launch are stubbed."""
    assert "E" not in LK._GEMM.key and "E" not in LK._WGRAD.key
    tuner = LK._GEMM._build(False)  # the triton.autotune object a GPU launch goes through
    timed = []
    monkeypatch.setattr(tuner, "_bench", lambda *a, config, **k: timed.append(config) or 1.0)
    monkeypatch.setattr(tuner.fn, "run", lambda *a, **k: None)
    tuned_per_call = []
    for num_edges in (1100, 1900, 2047, 2049):
        table, x, ws = _inputs(2, 1, 3, 2, num_edges, torch.float32, seed=3)
        with RT.record_launches(execute=False) as launches:
            LK.so2_linear(x.detach(), [w.detach() for w in ws], table)
        (_, args, kwargs), = launches
        before = len(timed)
        tuner.run(*args, grid=(1,), **kwargs)
        tuned_per_call.append(len(timed) > before)
    assert tuned_per_call == [True, False, False, True]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_every_autotune_config_equals_the_reference(dtype, monkeypatch):
    """Each autotune config of the GEMM and the weight-gradient kernel (launched under the
    interpreter by index), forward, first gradients and the double backward, against the reference."""
    monkeypatch.setattr(LK, "_E_CHUNK", 3)
    table, x, ws = _inputs(2, 2, 2, 3, 5, dtype, seed=7)
    blocks = edge_frame_index(2, 2)[2]
    gy = torch.randn(5, table.K, 3, dtype=dtype, generator=torch.Generator().manual_seed(8))

    def run(fn):
        y = fn(x, ws)
        first = torch.autograd.grad(y, [x, *ws], gy, create_graph=True)
        second = torch.autograd.grad(sum((f ** 2).sum() for f in first), [x, *ws])
        return [y, *first, *second]

    want = run(lambda a, w: so2_linear(a, w, blocks))
    for index in range(max(len(LK._GEMM.configs), len(LK._WGRAD.configs))):
        with RT.interpreter_config(index), RT.count_launches() as launched:
            got = run(lambda a, w: LK.so2_linear(a, w, table))
        assert {"_so2_linear_gemm_kernel", "_so2_linear_wgrad_kernel"} <= set(launched)
        for i, (a, b) in enumerate(zip(got, want)):
            assert _rel(a, b) < 10 * _tol(dtype), f"config {index}, output {i}: {_rel(a, b):.2e}"
