"""OpenMP waiting policy for the processes mlpot starts (the ``mlpot`` command, benchmark scripts).

torch's CPU ops run their parallel regions on an OpenMP thread pool. By default GNU OpenMP lets a
thread that finished its share *spin* (busy-wait) for the next region instead of sleeping. On a
machine with more runnable threads than cores (a second CPU-bound process, other jobs), a spinning
thread holds a core that the thread with the remaining work needs, so every parallel region ends
only when the scheduler preempts the spinner: a force call made of many short ops (mlpot's, after
its CPU work was made short) then waits a time slice per op. Measured on a 2-core CPU with other
jobs running, 2 torch threads: a Si64 MACE force call took 8.8-20 s with the default policy and
0.8-0.9 s with ``OMP_WAIT_POLICY=PASSIVE`` (BENCHMARKS.md, issue 14 item 7). With a passive policy
a waiting thread sleeps at once; on an idle machine this costs a few microseconds per region.

The policy is read once, when the OpenMP runtime loads (``import torch``), so it can only be set
before that, and it is process-wide: entry points call :func:`passive_openmp_waits` first; a
library user who wants it sets ``OMP_WAIT_POLICY=PASSIVE`` in the environment. This module does not
import torch.
"""
from __future__ import annotations

import os
import sys

__all__ = ["passive_openmp_waits"]


def passive_openmp_waits() -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` unless the user chose a policy or torch is already loaded.

    Returns True when the policy in force is passive (set here or by the user). ``MLPOT_OMP_WAIT=default``
    leaves the environment alone.
    """
    if os.environ.get("MLPOT_OMP_WAIT", "").strip().lower() == "default":
        return os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"
    if "OMP_WAIT_POLICY" not in os.environ and "torch" not in sys.modules:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.environ["MLPOT_OMP_WAIT_SET"] = "1"  # so child processes can tell the user's env from ours
    return os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"
