"""Ahead-of-time compile of the models' Triton kernels for NVIDIA GPUs, no GPU needed
(mlpot.bench.aot; the full table is in BENCHMARKS.md)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from mlpot.bench import aot
from mlpot.o3.backend import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton not installed")

SMALL_MACE = "MACE:num_channels=2,max_L=1,max_ell=1,correlation=2,num_interactions=1,radial_MLP=[4]"


def _keys(variants):
    return sorted(json.dumps({k: v for k, v in x.items() if k != "models"}, sort_keys=True) for x in variants)


def test_recording_without_running_sees_the_launches_of_a_real_run():
    """The launch sequence depends on shapes only: skipping the kernels on the interpreter
    (the default, fast) records exactly the variants of a run that executes them."""
    fast = aot.record_in_child([SMALL_MACE], "fp64", execute=False)
    real = aot.record_in_child([SMALL_MACE], "fp64", execute=True)
    assert _keys(fast) == _keys(real)
    kernels = {v["kernel"] for v in real}
    # message passing (the kernels generated per CG table: forward, backward and the tangent
    # kernel of the fused double backward, and the sender sum of the input gradient)
    # and the symmetric contraction (generated per coupling table)
    assert "_segment_sum_kernel" in kernels
    generated_sc = {k.rsplit("_", 1)[0] for k in kernels if re.match(r"_sc_(fwd|dA|dW)_[0-9a-f]{16}$", k)}
    assert generated_sc == {"_sc_fwd", "_sc_dA", "_sc_dW"}
    assert {k[:8] for k in kernels if k.startswith("_mp_")} == {"_mp_fwd_", "_mp_bwd_", "_mp_tbw_"}


def test_default_configs_compile_for_sm90_without_spills(tmp_path):
    """The first autotune config of every kernel variant the default MACE and ESCN launch,
    compiled for sm_90 in float32: every compile succeeds, none spills registers. Run as the
    command a user types, in a fresh process: the compile needs Triton outside interpreter mode,
    which other kernel tests of this session switch on."""
    out = tmp_path / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "mlpot.bench.aot", "--arch", "90", "--dtype", "fp32", "--first-config",
         "--max-spill-bytes", "0", "--json", str(out)], env=env, capture_output=True, text=True, timeout=900,
    )
    assert out.exists(), proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert any("MACE" in r["models"] for r in rows)
    failed = [(r["kernel"], r["constexprs"], r["error"]) for r in rows if not r["ok"]]
    assert not failed
    spills = [(r["kernel"], r["constexprs"], r["spill_stores"], r["spill_loads"]) for r in rows
              if r["spill_stores"] or r["spill_loads"]]
    assert not spills
    assert all(0 < r["regs"] <= 255 for r in rows)
    # the kernels written on tl.dot run on tensor cores: the SO(2) GEMM of ESCN
    gemm = [r for r in rows if r["kernel"] == "_so2_linear_gemm_kernel"]
    assert gemm and all(r["mma"] + r["wgmma"] > 0 for r in gemm)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_fp64_edge_embedding_takes_no_fp32_scalars(tmp_path):
    """r_max and the Bessel normalisation reach the fp64 spherical-harmonics kernels in fp64: no
    kernel parameter is typed .f32 in the PTX (a Python float argument would be, and fp64
    results would then carry ~1e-8 relative error on a GPU; the interpreter hides this)."""
    out = tmp_path / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "mlpot.bench.aot", "--arch", "90", "--dtype", "fp64", "--first-config",
         "--only", "_sh_", "--json", str(out), "--model", SMALL_MACE], env=env, capture_output=True, text=True,
        timeout=900,
    )
    assert out.exists(), proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    # the kernels generated for the model's lmax (max_ell=1): forward and backward
    assert {r["kernel"] for r in rows} == {"_sh_fwd_l1", "_sh_bwd_l1"}
    assert all(r["ok"] and r["param_f32"] == 0 for r in rows), [(r["kernel"], r.get("param_f32")) for r in rows]


def test_model_spec_parsing():
    assert aot.parse_model_spec("MACE") == ("MACE", {})
    assert aot.parse_model_spec("MACE:interaction_tp=gaunt,max_ell=2,radial_MLP=[8, 8]") == (
        "MACE", {"interaction_tp": "gaunt", "max_ell": 2, "radial_MLP": [8, 8]})
    with pytest.raises(ValueError, match="key=value"):
        aot.parse_model_spec("MACE:gaunt")


def test_edge_outer_message_passing_compiles_without_spills_at_sm80_and_sm90(tmp_path):
    """The edge-outer message-passing kernels generated for the default MACE's CG tables
    (forward, backward, the fused tangent kernel: every variant a training step launches):
    first autotune config, sm_80 and sm_90, fp64 (twice the registers of fp32; fp32 at sm_90 is in the test above); every compile
    succeeds and none spills (the whole output accumulator of a receiver, and in the backward the
    whole gradient row block, stay in registers)."""
    out = tmp_path / "aot_mp.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "mlpot.bench.aot", "--model", "MACE", "--arch", "80", "90", "--dtype", "fp64",
         "--first-config", "--only", "_mp_|_segment_sum", "--max-spill-bytes", "0", "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert out.exists(), proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    seen = {(r["kernel"][:8], r["arch"], r["dtype"]) for r in rows}
    for kind in ("_mp_fwd_", "_mp_bwd_", "_mp_tbw_", "_segment"):
        for arch in ("sm_80", "sm_90"):
            assert (kind, arch, "fp64") in seen, (kind, arch)
    # the training step: the backward with all three gradients, and the fused double backward
    # (every tangent set, every gradient needed)
    flags = lambda kind: {" ".join(c for c in r["constexprs"].split() if c.startswith(("NEED_", "T")))
                          for r in rows if r["kernel"].startswith(kind)}
    assert "NEED_H=True NEED_W=True NEED_Y=True" in flags("_mp_bwd_")
    assert "TX=True TY=True TW=True NEED_G=True NEED_H=True NEED_W=True NEED_Y=True" in flags("_mp_tbw_")
    assert all(r["ok"] for r in rows), [(r["kernel"], r.get("error")) for r in rows if not r["ok"]]
    spills = [(r["kernel"], r["arch"], r["dtype"], r["constexprs"], r["spill_stores"], r["spill_loads"])
              for r in rows if r["spill_stores"] or r["spill_loads"]]
    assert not spills
    assert all(0 < r["regs"] <= 255 for r in rows)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_symmetric_contraction_fp64_row_groups_compile_without_spills(tmp_path):
    """The default MACE's symmetric-contraction gradients in fp64 at sm_80 and sm_90: the layer-1
    table (0e + 1o outputs) holds too many distinct fp64 coefficients for one program, so dL/dA and
    dL/dW pass 1 run in row groups (several ``GROUP`` variants of one generated kernel); first
    autotune config, every compile succeeds and none spills."""
    out = tmp_path / "aot_sc.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "mlpot.bench.aot", "--model", "MACE", "--arch", "80", "90", "--dtype", "fp64",
         "--first-config", "--only", "_sc_(dA|dW)_", "--max-spill-bytes", "0", "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert out.exists(), proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    groups: dict = {}
    for r in rows:
        group = [c for c in r["constexprs"].split() if c.startswith("GROUP=")]
        groups.setdefault((r["kernel"], r["arch"]), set()).update(group)
    for kind in ("_sc_dA_", "_sc_dW_"):
        for arch in ("sm_80", "sm_90"):
            assert max(len(g) for (k, a), g in groups.items() if k.startswith(kind) and a == arch) > 1, (kind, arch)
    assert all(r["ok"] for r in rows), [(r["kernel"], r.get("error")) for r in rows if not r["ok"]]
    spills = [(r["kernel"], r["arch"], r["constexprs"], r["spill_stores"], r["spill_loads"])
              for r in rows if r["spill_stores"] or r["spill_loads"]]
    assert not spills
    assert all(0 < r["regs"] <= 255 for r in rows)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
