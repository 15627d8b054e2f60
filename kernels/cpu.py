"""The compiled CPU kernels (backend ``cpu``): ``cpu_kernels.c``, built on first use, called through ctypes.

The C source ships beside this module. :func:`library` compiles it once per machine with the C
compiler (``$CC``, else ``cc``) at ``-O3 -march=native`` into
``$MLPOT_CACHE/kernels/cpu_kernels-<hash>.so`` (default ``~/.cache/mlpot``), the hash covering the
source, the flags, the compiler's version and this CPU's model and flags, and written atomically
(two processes building at once both end with a whole file). No torch headers and no build
system are involved: the library has a plain C interface and takes data pointers, so building it
takes well under a second.

:func:`unavailable_reason` says, in one line, why the library cannot be built or loaded (None when
it can); :mod:`mlpot.o3.backend` turns that into a :class:`~mlpot.errors.ConfigError` for an
explicit ``cpu`` backend and into the reference path for ``auto``.

ctypes releases the GIL during a call, so :func:`run_channel_blocks` splits the channels of one
call over ``torch.get_num_threads()`` Python threads when the call is large enough.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ._codegen import cache_dir

SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-std=gnu11", "-Wno-psabi")
#: channels per vector in the kernels (``LANES`` of the C source); arrays are padded to a multiple
LANES = 16
#: a call splits its work over threads only when it has at least this many vector operations
#: (nodes or edges x table entries x channel blocks; about 0.2 ms on one core of the benchmark
#: machine): below that, waking a second thread costs about what it saves, and on a small
#: machine it competes with torch's own OpenMP threads still spinning from the previous op
THREAD_MIN_WORK = 1 << 19
#: the kernels of ``cpu_kernels.c`` (each as ``mlpot_<name>_f32`` and ``_f64``, returning 0 or 1: out of memory)
KERNELS = ("sc_forward", "sc_vjp", "cw_forward", "cw_backward")


def _compiler() -> str | None:
    cc = os.environ.get("CC", "cc").split()[0]
    return shutil.which(cc)


def _cpu_fingerprint() -> str:
    """The CPU model and flags (``-march=native`` code runs only on such a CPU)."""
    text = platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("model name", "flags", "Features")):
                    text += line
                if line.strip() == "":
                    break
    except OSError:
        pass
    return text


def _build(cc: str) -> Path:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src + repr((FLAGS, version, _cpu_fingerprint())).encode()).hexdigest()[:16]
    out = cache_dir() / f"cpu_kernels-{key}.so"
    if out.exists():
        return out
    from mlpot.fileio import atomic_path

    with atomic_path(out, suffix=".so") as tmp:
        res = subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True)
        if res.returncode != 0:
            last = (res.stderr.strip().splitlines() or ["no output"])[-1]
            raise OSError(f"{cc} failed to build {SOURCE.name}: {last}")
    return out


@functools.lru_cache(maxsize=1)
def _load() -> tuple[ctypes.CDLL | None, str | None]:
    cc = _compiler()
    if cc is None:
        return None, f"no C compiler ({os.environ.get('CC', 'cc')}) on PATH"
    try:
        lib = ctypes.CDLL(str(_build(cc)))
    except Exception as exc:  # noqa: BLE001 - a compiler error, an unwritable cache, a bad library
        return None, " ".join(str(exc).split())
    if lib.mlpot_cpu_lanes() != LANES:
        return None, f"{SOURCE.name}: LANES differs from mlpot.kernels.cpu.LANES"
    for kernel in KERNELS:
        for suffix in ("f32", "f64"):
            getattr(lib, f"mlpot_{kernel}_{suffix}").restype = ctypes.c_int
    return lib, None


def unavailable_reason() -> str | None:
    """Why the CPU kernels cannot run here (one line), or None when they can."""
    return _load()[1]


def library() -> ctypes.CDLL:
    """The loaded kernel library (built on first use); a RuntimeError says why when it cannot be."""
    lib, why = _load()
    if lib is None:
        raise RuntimeError(f"mlpot CPU kernels unavailable: {why}")
    return lib


def padded_channels(C: int) -> int:
    """``C`` rounded up to a multiple of :data:`LANES` (the row stride of the kernels' arrays)."""
    return -(-C // LANES) * LANES


def ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


@functools.lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1), thread_name_prefix="mlpot-cpu")


if hasattr(os, "register_at_fork"):  # a forked child has none of the parent's threads: a new pool
    os.register_at_fork(after_in_child=_pool.cache_clear)


def thread_count(work: int, parts: int) -> int:
    """Threads for one call of ``work`` vector operations: ``torch.get_num_threads()``, at most
    ``parts``, 1 below :data:`THREAD_MIN_WORK`."""
    return min(torch.get_num_threads(), parts) if work >= THREAD_MIN_WORK else 1


def run_parts(calls) -> None:
    """Run ``calls`` (each returns a C status) at once, or over threads when there are several."""
    if len(calls) == 1:
        status = [calls[0]()]
    else:
        status = [f.result() for f in [_pool().submit(c) for c in calls]]
    if any(status):
        raise MemoryError("mlpot CPU kernel: out of memory for its work buffer")


def kernel(name: str, dtype: torch.dtype):
    """The C function ``name`` for ``dtype`` (float32 or float64; anything else a TypeError)."""
    suffix = {torch.float32: "f32", torch.float64: "f64"}.get(dtype)
    if suffix is None:
        raise TypeError(f"mlpot CPU kernel {name}: float32 or float64, got {dtype}")
    return getattr(library(), f"mlpot_{name}_{suffix}")


def run_channel_blocks(call, ldc: int, work: int) -> None:
    """``call(c0, c1)`` over the channel range ``0:ldc``: at once, or split into equal runs of
    whole blocks of :data:`LANES` over :func:`thread_count` threads (``work``: vector operations).
    ``call`` returns the C function's status."""
    blocks = ldc // LANES
    threads = thread_count(work, blocks)
    cuts = [LANES * (blocks * t // threads) for t in range(threads + 1)]
    run_parts([functools.partial(call, a, b) for a, b in zip(cuts, cuts[1:])])
