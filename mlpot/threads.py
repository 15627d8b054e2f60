"""CPU threads: how idle OpenMP threads wait, and how many threads a force call uses.

torch's CPU ops run their parallel regions on a GNU OpenMP thread pool, and an mlpot force call
is several thousand ops of moderate size, so it opens thousands of regions. Between two regions a
worker thread either spins (busy-waits) or sleeps:

* **sleeping** (``OMP_WAIT_POLICY=PASSIVE``) makes every region wake its workers again; on the
  2-core CPU of BENCHMARKS.md that made a 2-thread call about twice as slow as a 1-thread call,
  from aspirin (21 atoms) to Cu864 (issue 14);
* **spinning without bound** (GNU's default: 300 000 spins) holds a core the thread with the work
  may need when more threads are runnable than there are cores: a Si64 call took 8.8-20 s
  instead of 0.8-0.9 s next to a second CPU-bound process.

So the entry points (the ``mlpot`` command, the benchmark scripts) call :func:`bounded_openmp_spin`
before torch loads: ``GOMP_SPINCOUNT`` = :data:`SPIN_COUNT`, a spin long enough to bridge the gap
between two ops of one call and short enough to give the core back soon. And the ASE calculator
runs each force call with :func:`threads_for_call` threads: no more than the cores that no other
process is running on at that moment (``/proc/loadavg``'s count of runnable tasks), so a call on a
loaded machine uses fewer threads instead of fighting over cores. A library user gets the second
(in :class:`mlpot.calculators.MLPotCalculator`); the first needs the environment variable set
before ``import torch``.

``MLPOT_OMP_WAIT=default`` leaves the OpenMP environment alone, ``MLPOT_CALL_THREADS=fixed`` keeps
the thread count torch was given. An ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` the user set is
kept. This module does not import torch. The entry points' other process-wide settings (the
allocator, the garbage collector) are in :mod:`mlpot.runtime`.
"""
from __future__ import annotations

import os
import sys

__all__ = ["SPIN_COUNT", "bounded_openmp_spin", "runnable_elsewhere", "threads_for_call"]

#: spins of an idle GNU OpenMP thread before it sleeps (GNU's default is 300 000)
SPIN_COUNT = 10000


def bounded_openmp_spin() -> str:
    """Set ``GOMP_SPINCOUNT`` = :data:`SPIN_COUNT` unless the user chose a wait policy or spin count,
    ``MLPOT_OMP_WAIT=default`` is set, or torch is already loaded (the runtime reads it once).

    Returns the setting in force, as text (``"GOMP_SPINCOUNT=10000"``, ``"OMP_WAIT_POLICY=PASSIVE"``,
    ``"default"``).
    """
    chosen = [k for k in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY") if k in os.environ]
    if not chosen and os.environ.get("MLPOT_OMP_WAIT", "").strip().lower() != "default" \
            and "torch" not in sys.modules:
        os.environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
        os.environ["MLPOT_OMP_WAIT_SET"] = "1"  # so child processes can tell the user's env from ours
        chosen = ["GOMP_SPINCOUNT"]
    return ", ".join(f"{k}={os.environ[k]}" for k in chosen) or "default"


def runnable_elsewhere() -> int | None:
    """Tasks runnable on the machine now besides the calling thread (``/proc/loadavg``, 4th field
    ``running/total``), or None where that file does not exist."""
    try:
        with open("/proc/loadavg") as f:
            running = int(f.read().split()[3].split("/")[0])
    except (OSError, IndexError, ValueError):
        return None
    return max(0, running - 1)


def threads_for_call(requested: int) -> int:
    """Threads for one force call: ``requested``, but no more than the cores (of this process's
    affinity mask) that other runnable tasks leave free, and at least 1."""
    if os.environ.get("MLPOT_CALL_THREADS", "").strip().lower() == "fixed" or requested <= 1:
        return max(1, requested)
    others = runnable_elsewhere()
    if others is None:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(requested, cores - others))
