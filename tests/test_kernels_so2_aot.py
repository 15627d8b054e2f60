"""The SO(2) message-passing kernels of MACE (``interaction_tp: so2``, default sizes: 128 channels,
L = 3) compiled ahead of time for sm_80 and sm_90 in float64 (the dtype that spilled), no GPU
needed (:mod:`mlpot.bench.aot`): no register spills, and the rotations run on tensor cores
(``mma``, fp64 DMMA). float32 at sm_90 is in tests/test_kernels_aot.py (MACE ``interaction_tp:
so2`` is one of ``mlpot bench aot``'s default models). Every autotune config, both dtypes and
both archs: ``mlpot bench aot --model MACE:interaction_tp=so2 --only _so2_ --max-spill-bytes 0``
(104 variants with the fused backward's, 0 spills, ``mma`` in each)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mlpot.o3.backend import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton not installed")


def test_so2_kernels_compile_without_spills_on_tensor_cores(tmp_path):
    out = tmp_path / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "mlpot.bench.aot", "--model", "MACE:interaction_tp=so2", "--only", "_so2_",
         "--arch", "80", "90", "--dtype", "fp64", "--first-config", "--max-spill-bytes", "0",
         "--json", str(out)], env=env, capture_output=True, text=True, timeout=900,
    )
    assert out.exists(), proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    # forward (node kernel), the fused first backward, and the double backward's per-operand node and
    # edge kernels
    assert {r["kernel"] for r in rows} == {"_so2_node_kernel", "_so2_edge_kernel", "_so2_bwd_kernel"}
    assert {(r["arch"], r["dtype"]) for r in rows} == {("sm_80", "fp64"), ("sm_90", "fp64")}
    assert all(r["ok"] for r in rows), [(r["kernel"], r.get("error")) for r in rows if not r["ok"]]
    spills = [(r["kernel"], r["arch"], r["dtype"], r["constexprs"], r["spill_stores"], r["spill_loads"])
              for r in rows if r["spill_stores"] or r["spill_loads"]]
    assert not spills
    assert all(r["mma"] + r["wgmma"] > 0 for r in rows), [(r["kernel"], r["arch"], r["dtype"]) for r in rows]
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
