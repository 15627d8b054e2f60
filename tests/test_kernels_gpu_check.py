"""``scripts/gpu_check.sh --dry-run``: the one prepared GPU call runs end to end on a CPU (tiny
sizes, kernels on the Triton interpreter, models on the reference backend), so that the GPU call
does not fail on a typo. Checks the files it leaves under $OUT (at most 8, as the device tool
returns) and the summary table it prints last."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlpot.o3.backend import triton_available

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not triton_available(), reason="triton not installed")


def test_gpu_check_dry_run_end_to_end(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == ["bandwidth.json", "gpu_check.log", "kernels/results.json", "kernels/results.md",
                     "mace_parity.json", "model_cuda.json", "parity.json", "summary.md"]
    parity = json.loads((out / "parity.json").read_text())
    assert {r["kernel"] for r in parity} == {"sh", "sc", "mp"}
    assert {r["mode"] for r in parity} == {"fwd", "fwd+bwd", "double"}
    assert all(r["status"] == "ok" and r["rel_err"] < r["tol"] for r in parity)
    model = json.loads((out / "model_cuda.json").read_text())
    assert {r["kind"] for r in model["rows"]} == {"single", "batched"}
    assert all(r["status"] == "ok" and r["atom_steps_per_s"] > 0 for r in model["rows"])
    # the summary table is what the output ends with
    tail = log.strip().splitlines()[-14:]
    assert any(line.startswith("| kernel parity (9 cases) | 9 ok") for line in tail), tail
    assert any("cuEquivariance" in line for line in tail)
    assert (out / "summary.md").read_text().strip().splitlines()[-1] == log.strip().splitlines()[-1]


def test_gpu_check_rejects_unknown_arguments():
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dryrun"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "usage" in proc.stderr
