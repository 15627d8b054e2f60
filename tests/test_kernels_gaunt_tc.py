"""The Gaunt kernel on tensor cores (kernels/gaunt.py): its float32 error bound, every autotune
config of both width tiers against the float64 reference (forward, backward, double backward), and
the ahead-of-time compile for sm_80 / sm_90 (no spills, tensor-core instructions present).

The CPU interpreter computes ``tl.dot`` in plain float32 whatever ``input_precision`` says, so the
tf32x3 arithmetic is checked through its torch model (:mod:`mlpot.kernels._tf32x3`), and the
kernel's own float32 results against the same bound.
"""
import json
import os
import subprocess
import sys

os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

from mlpot.o3.backend import kernels_module
from mlpot.o3.gaunt import grid_matrices, product_grid

GA = kernels_module("gaunt")
TF = kernels_module("_tf32x3")
RT = kernels_module("_runtime")

# (l1, l2, l_out): the MACE message (3 x 3 -> 3, narrow tier) and the product basis's widest
# step ((k-1) L = 6 times L = 3, padded width 64: wide tier)
SHAPES = [(3, 3, 3), (6, 3, 9)]


def _mats(method, l1, l2, lo, dtype=torch.float64):
    return grid_matrices(product_grid(method, [l1, l2], lo), l1, l2, lo, dtype, "cpu")


def _inputs(l1, l2, N=2, C=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(N, C, (l1 + 1) ** 2, generator=g, dtype=torch.float64)
    x2 = torch.randn(N, C, (l2 + 1) ** 2, generator=g, dtype=torch.float64)
    return x1, x2


def _chain(X, Z, MX, MZ, MO, mm):
    return mm(mm(X, MX) * mm(Z, MZ), MO)


def test_tf32_round_keeps_ten_mantissa_bits_to_nearest():
    x = torch.randn(4096, generator=torch.Generator().manual_seed(1), dtype=torch.float32) * 1e3
    r = TF.tf32_round(x)
    assert (r.view(torch.int32) & 0x1FFF).eq(0).all()
    assert ((r - x).abs() <= 2.0 ** -11 * x.abs()).all()
    # nearest: no other TF32 number (one TF32 ulp away) is closer
    ulp = 2.0 ** (torch.floor(torch.log2(r.abs().double())) - 10)
    assert ((r.double() - x.double()).abs() <= ulp / 2 + 1e-30).all()
    assert torch.equal(TF.tf32_round(torch.tensor([1.0, -2.5, 0.0])), torch.tensor([1.0, -2.5, 0.0]))


@pytest.mark.parametrize("method", ["grid", "fourier"])
@pytest.mark.parametrize("shape", SHAPES)
def test_tf32x3_gaunt_product_stays_within_the_stated_bound(method, shape):
    """The three contractions in tf32x3 arithmetic (float32 matrices, float32 accumulation) are
    within ``error_bound`` of the float64 product of the same float32 inputs and within 4x of
    plain float32's error; plain TF32 breaks the bound, so the bound tells the two apart."""
    l1, l2, lo = shape
    x1, x2 = _inputs(l1, l2, N=4, C=8)
    X, Z = x1.float(), x2.float()
    m64 = _mats(method, l1, l2, lo)
    m32 = tuple(m.float() for m in m64)
    exact = _chain(X.double(), Z.double(), *m64, torch.matmul)
    bound = GA.error_bound(X, Z, *m64)
    tf32x3 = _chain(X, Z, *m32, TF.tf32x3_matmul).double()
    tf32 = _chain(X, Z, *m32, lambda a, b: TF.tf32x3_matmul(a, b, terms=1)).double()
    ieee = _chain(X, Z, *m32, torch.matmul).double()
    assert ((tf32x3 - exact).abs() <= bound).all()
    assert ((tf32 - exact).abs() > bound).any()
    # tf32x3 is as accurate as float32 on CUDA cores, up to a small factor
    assert (tf32x3 - exact).abs().max() <= 4 * (ieee - exact).abs().max()
    # the bound is a small multiple of float32 resolution relative to the output's size
    assert bound.max() / exact.abs().max() < 5e-4


def _grads(x1, x2, fn):
    x1, x2 = x1.clone().requires_grad_(), x2.clone().requires_grad_()
    out = fn(x1, x2)
    gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(out.dtype)
    g1, g2 = torch.autograd.grad(out, (x1, x2), gout, create_graph=True)
    h1, h2 = torch.autograd.grad((g1 * g1).sum() + (g2 * g2).sum(), (x1, x2))
    return out, g1, g2, h1, h2, gout


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_every_config_of_its_tier_matches_the_reference(shape, dtype):
    """Every autotune config of the tier the shape selects: forward and first gradients within the
    error bound of the float64 reference, double backward to 1e-10 / 1e-4 relative."""
    l1, l2, lo = shape
    kernel = GA._KERNEL_WIDE if max(GA.next_pow2((l1 + 1) ** 2), GA.next_pow2((l2 + 1) ** 2)) > GA._WIDE \
        else GA._KERNEL_NARROW
    x1, x2 = _inputs(l1, l2)
    m64 = _mats("grid", l1, l2, lo)
    want = _grads(x1, x2, lambda a, b: GA.reference_gaunt_product(a, b, lo, matrices=m64))
    MX, MZ, MO = m64
    X, Z = x1.to(dtype), x2.to(dtype)
    for index in range(len(kernel.configs)):
        with RT.interpreter_config(index), RT.record_launches() as launches:
            got = _grads(X, Z, lambda a, b: GA.gaunt_product(a, b, lo, matrices=m64))
        assert launches and any(k is kernel for k, _, _ in launches)
        out, g1, g2, h1, h2, _ = (t.double() for t in got)
        gout = want[5].to(dtype)
        assert ((out - want[0]).abs() <= GA.error_bound(X, Z, MX, MZ, MO)).all(), index
        assert ((g1 - want[1]).abs() <= GA.error_bound(gout, Z, MO.t(), MZ, MX.t())).all(), index
        assert ((g2 - want[2]).abs() <= GA.error_bound(gout, X, MO.t(), MX, MZ.t())).all(), index
        tol = 1e-10 if dtype == torch.float64 else 1e-4
        for a, b in ((h1, want[3]), (h2, want[4])):
            assert ((a - b).abs().max() / b.abs().max()).item() < tol, index


def _aot(tmp_path, args):
    out = tmp_path / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "mlpot.bench.aot", "--only", "_grid_product", "--max-spill-bytes",
                           "0", "--json", str(out), *args], env=env, capture_output=True, text=True, timeout=1800)
    assert out.exists(), proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert rows and all(r["ok"] for r in rows), [(r["constexprs"], r.get("error")) for r in rows if not r["ok"]]
    spills = [(r["arch"], r["dtype"], r["constexprs"], r["num_warps"], r["spill_stores"], r["spill_loads"])
              for r in rows if r["spill_stores"] or r["spill_loads"]]
    assert not spills
    # every variant runs its contractions on tensor cores (mma.sync; wgmma on sm_90 where Triton picks it)
    assert all(r["mma"] + r["wgmma"] > 0 for r in rows), [(r["arch"], r["constexprs"]) for r in rows
                                                          if not r["mma"] + r["wgmma"]]
    # both width tiers were compiled
    assert {"DXP=64" in r["constexprs"] or "DZP=64" in r["constexprs"] for r in rows} == {True, False}
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return rows


GAUNT_MACE = "MACE:interaction_tp=gaunt,product=gaunt,num_interactions=1"


def test_aot_first_configs_compile_on_tensor_cores_without_spills(tmp_path):
    """The first config of each tier, for every Gaunt shape a MACE with the Gaunt message and the
    Gaunt product basis launches (forces and force-loss training), float32 (tf32x3), sm_80 and sm_90."""
    rows = _aot(tmp_path, ["--first-config", "--arch", "80", "90", "--dtype", "fp32", "--model", GAUNT_MACE])
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}
    assert all("DOT_PRECISION=tf32x3" in r["constexprs"] for r in rows)


@pytest.mark.slow
def test_aot_every_config_compiles_on_tensor_cores_without_spills(tmp_path):
    """Every autotune config, both Gaunt methods, float32 (tf32x3) and float64 (FP64 mma), sm_80 and sm_90."""
    rows = _aot(tmp_path, ["--arch", "80", "90", "--dtype", "fp32", "fp64", "--model", GAUNT_MACE,
                           GAUNT_MACE + ",gaunt_method=fourier"])
    assert {r["dtype"] for r in rows} == {"fp32", "fp64"}


def test_aot_summary_table_aggregates_per_kernel_target_and_dtype():
    from mlpot.bench import aot

    def row(kernel, regs, mma, spill=0, ok=True, warps=4):
        return {"kernel": kernel, "arch": "sm_80", "dtype": "fp32", "num_warps": warps, "models": ["MACE"], "ok": ok,
                "regs": regs, "spill_stores": spill, "spill_loads": spill, "shared": 512, "mma": mma, "wgmma": 0}

    rows = [row("_k", 100, 36), row("_k", 180, 72, spill=8, warps=8), row("_k", 0, 0, ok=False), row("_a", 40, 0)]
    lines = aot.summary_table(rows).splitlines()
    assert lines[2] == "| _a | sm_80 | fp32 | 1 | 4 | 40–40 | 0/0 | 512 | 0–0 / 0–0 | MACE |"
    assert lines[3] == "| _k | sm_80 | fp32 | 3 (**1 failed**) | 4,8 | 100–180 | 8/8 | 512 | 36–72 / 0–0 | MACE |"
