"""mlpot.threads: the OpenMP wait policy the entry points set before torch loads."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = (
    "import os, sys\n"
    "{pre}"
    "from mlpot.threads import passive_openmp_waits\n"
    "ok = passive_openmp_waits()\n"
    "print(ok, os.environ.get('OMP_WAIT_POLICY'))\n"
)


def _probe(pre: str = "", **env) -> str:
    full = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "MLPOT_OMP_WAIT")}
    full.update(env)
    out = subprocess.run([sys.executable, "-c", PROBE.format(pre=pre)], capture_output=True, text=True, env=full,
                         check=True)
    return out.stdout.strip()


@pytest.mark.parametrize(
    "pre, env, expected",
    [
        ("", {}, "True PASSIVE"),  # set before torch loads
        ("", {"OMP_WAIT_POLICY": "ACTIVE"}, "False ACTIVE"),  # the user's choice wins
        ("", {"MLPOT_OMP_WAIT": "default"}, "False None"),  # opt-out
        ("import torch\n", {}, "False None"),  # too late once torch (and OpenMP) is loaded: left alone
    ],
)
def test_passive_openmp_waits(pre, env, expected):
    assert _probe(pre, **env) == expected


def test_cli_sets_the_policy_before_torch_loads():
    code = ("import os, sys\nfrom mlpot.cli.main import main\n"
            "main([])\nprint('torch' in sys.modules, os.environ.get('OMP_WAIT_POLICY'))\n")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip().splitlines()[-1].endswith("PASSIVE")
