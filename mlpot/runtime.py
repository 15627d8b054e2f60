"""Process-wide runtime settings that the entry points apply (the ``mlpot`` command, the
benchmark scripts), and a library user may: the allocator (:func:`tune_malloc`) and the garbage
collector (:func:`freeze_gc`). Both change the whole process, so importing mlpot or building a
model never applies them. The third such setting, how idle OpenMP threads wait, lives in
:mod:`mlpot.threads` (:func:`mlpot.threads.bounded_openmp_spin`): it must be set before torch
loads, and that module does not import torch. Neither does this one.
"""
from __future__ import annotations

__all__ = ["MALLOC_OPTIONS", "freeze_gc", "tune_malloc"]

_MALLOC_TUNED = False


#: glibc ``mallopt`` settings of :func:`tune_malloc`: (M_MMAP_THRESHOLD, 1 GiB), (M_TRIM_THRESHOLD, 2 GiB - 1)
MALLOC_OPTIONS = ((-3, 1 << 30), (-1, (1 << 31) - 1))


def tune_malloc() -> bool:
    """Keep freed memory in the process heap instead of unmapping it (glibc only; once per process).

    Process-wide, so opt-in: the ``mlpot`` command line calls it; a library user may call it.
    A force call allocates many short-lived tensors of a few MB to a few hundred MB. With glibc's
    defaults each of them is a fresh ``mmap`` that is faulted in page by page and unmapped on
    free, which costs as much as the arithmetic (half the CPU time of a small-molecule call).
    Raising ``M_MMAP_THRESHOLD``/``M_TRIM_THRESHOLD`` makes the heap reuse those pages; the
    price is that the resident size stays at its high-water mark. Set ``MLPOT_TUNE_MALLOC=0``
    to leave the allocator alone. Returns whether the settings were applied.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return True
    import os
    import sys

    if os.environ.get("MLPOT_TUNE_MALLOC", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        ok = all(libc.mallopt(param, value) == 1 for param, value in MALLOC_OPTIONS)
    except (OSError, AttributeError):
        return False
    _MALLOC_TUNED = ok
    return ok


def freeze_gc() -> bool:
    """Put every object alive now out of the cyclic garbage collector's reach (``gc.freeze``).

    Process-wide, so opt-in: the entry points call it once the libraries are imported. With torch,
    e3nn and ASE loaded a process holds about 330 000 objects, and a full collection walks all of
    them: about 90 ms on the CPU of BENCHMARKS.md, which lands inside a force call every few
    calls (a 21-atom call takes 20 ms). Frozen objects are not collected until exit (a cycle
    among them that becomes garbage stays in memory), which for the imported modules is what
    happens anyway. Set ``MLPOT_FREEZE_GC=0`` to leave the collector alone. Returns whether it froze.
    """
    import atexit
    import gc
    import os

    if os.environ.get("MLPOT_FREEZE_GC", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    gc.freeze()
    # back in the collector's reach at exit, so the interpreter's last collection frees them
    # (else extension modules report the objects they still hold as leaked)
    atexit.register(gc.unfreeze)
    return True
