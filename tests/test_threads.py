"""mlpot.threads: the bounded OpenMP spin the entry points set before torch loads, and the thread
count of one force call."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import mlpot.threads as threads

PROBE = (
    "import os, sys\n"
    "{pre}"
    "from mlpot.threads import bounded_openmp_spin\n"
    "print(bounded_openmp_spin(), os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'))\n"
)
OURS = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "MLPOT_OMP_WAIT", "MLPOT_OMP_WAIT_SET")


def _probe(pre: str = "", **env) -> str:
    full = {k: v for k, v in os.environ.items() if k not in OURS}
    full.update(env)
    out = subprocess.run([sys.executable, "-c", PROBE.format(pre=pre)], capture_output=True, text=True, env=full,
                         check=True)
    return out.stdout.strip()


@pytest.mark.parametrize(
    "pre, env, expected",
    [
        ("", {}, f"GOMP_SPINCOUNT={threads.SPIN_COUNT} {threads.SPIN_COUNT} None"),  # set before torch loads
        ("", {"OMP_WAIT_POLICY": "PASSIVE"}, "OMP_WAIT_POLICY=PASSIVE None PASSIVE"),  # the user's choice wins
        ("", {"GOMP_SPINCOUNT": "5"}, "GOMP_SPINCOUNT=5 5 None"),
        ("", {"MLPOT_OMP_WAIT": "default"}, "default None None"),  # opt-out
        ("import torch\n", {}, "default None None"),  # too late once torch (and OpenMP) is loaded: left alone
    ],
)
def test_bounded_openmp_spin(pre, env, expected):
    assert _probe(pre, **env) == expected


def test_cli_sets_the_spin_before_torch_loads():
    code = ("import os, sys\nfrom mlpot.cli.main import main\n"
            "main([])\nprint('torch' in sys.modules, os.environ.get('GOMP_SPINCOUNT'))\n")
    env = {k: v for k, v in os.environ.items() if k not in OURS}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip().splitlines()[-1].endswith(str(threads.SPIN_COUNT))


@pytest.mark.parametrize("others, requested, expected", [(0, 4, 4), (1, 4, 3), (3, 4, 1), (9, 4, 1), (0, 1, 1)])
def test_threads_for_call_leaves_the_busy_cores(monkeypatch, others, requested, expected):
    monkeypatch.delenv("MLPOT_CALL_THREADS", raising=False)
    monkeypatch.setattr(threads, "runnable_elsewhere", lambda: others)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
    assert threads.threads_for_call(requested) == expected
    monkeypatch.setenv("MLPOT_CALL_THREADS", "fixed")
    assert threads.threads_for_call(requested) == requested


def test_runnable_elsewhere_counts_the_machine():
    n = threads.runnable_elsewhere()
    if not os.path.exists("/proc/loadavg"):
        assert n is None
    else:
        assert isinstance(n, int) and n >= 0


def test_calculator_call_uses_the_free_threads_and_restores_torch(monkeypatch):
    """The model runs with the count threads_for_call gives; torch's own setting is back afterwards."""
    sys.path.insert(0, os.path.dirname(__file__))
    from sim_helpers import ToyMP, rattled_cu

    from mlpot.calculators import MLPotCalculator

    seen = []
    calc = MLPotCalculator(ToyMP(r_max=4.0, atomic_numbers=[29], num_layers=1), device="cpu", dtype="float64")
    evaluate = calc._evaluate
    monkeypatch.setattr(calc, "_evaluate", lambda *a: (seen.append(torch.get_num_threads()), evaluate(*a))[1])
    monkeypatch.setattr(threads, "threads_for_call", lambda requested: 1)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        atoms = rattled_cu((2, 2, 2))
        atoms.calc = calc
        atoms.get_forces()
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
