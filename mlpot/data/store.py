"""The on-disk dataset formats behind one interface: which format a path is, a frame reader for
it, a writer, and shards written in parallel.

Formats (chosen by the file name's suffix):

* ``lmdb`` (``.lmdb``, :mod:`mlpot.data.lmdb_store`): the default; faster random access;
* ``h5`` (``.h5``, ``.hdf5``, :mod:`mlpot.data.hdf5`): smaller files, readable by any HDF5 tool.

A reader (``open_frames(path)``) has ``n_frames``, ``stored_cutoff`` (None when no neighbour
lists are stored), ``frame(k)`` -> frame dict (:mod:`mlpot.data.frames`) and ``close()``.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from mlpot.errors import ConfigError, DataError

__all__ = ["DEFAULT_FORMAT", "FORMAT_SUFFIXES", "LAZY_SUFFIXES", "dataset_format", "iter_atoms", "open_frames", "output_path",
           "shard_path", "write_dataset", "write_shards"]

DEFAULT_FORMAT = "lmdb"
FORMAT_SUFFIXES = {"lmdb": (".lmdb",), "h5": (".h5", ".hdf5")}
LAZY_SUFFIXES = tuple(s for suffixes in FORMAT_SUFFIXES.values() for s in suffixes)


def dataset_format(path) -> str | None:
    """``"lmdb"`` or ``"h5"`` from the suffix of ``path``; None for any other file."""
    name = str(path).lower()
    for fmt, suffixes in FORMAT_SUFFIXES.items():
        if name.endswith(suffixes):
            return fmt
    return None


def _format_of(path) -> str:
    fmt = dataset_format(path)
    if fmt is None:
        raise DataError(f"{path}: not a dataset file (expected a name ending in {', '.join(LAZY_SUFFIXES)})")
    return fmt


def open_frames(path):
    """A frame reader for the dataset file ``path`` (module docstring)."""
    if not Path(path).exists():
        raise FileNotFoundError(f"no such file: {path}")
    if _format_of(path) == "lmdb":
        from mlpot.data.lmdb_store import LMDBFrames

        return LMDBFrames(path)
    from mlpot.data.hdf5 import HDF5Frames

    return HDF5Frames(path)


def iter_atoms(path) -> Iterator:
    """Stream the frames of a dataset file as ``ase.Atoms``."""
    if _format_of(path) == "lmdb":
        from mlpot.data.lmdb_store import iter_lmdb_atoms

        return iter_lmdb_atoms(path)
    from mlpot.data.hdf5 import iter_hdf5_atoms

    return iter_hdf5_atoms(path)


def write_dataset(atoms_iter: Iterable, path, cutoff: float | None = None) -> int:
    """Write structures to the dataset file ``path`` in the format its suffix names."""
    if _format_of(path) == "lmdb":
        from mlpot.data.lmdb_store import write_lmdb

        return write_lmdb(atoms_iter, path, cutoff=cutoff)
    from mlpot.data.hdf5 import write_hdf5

    return write_hdf5(atoms_iter, path, cutoff=cutoff)


def output_path(out, fmt: str | None) -> Path:
    """The file ``mlpot data convert`` writes, checked: its suffix names the format (``.lmdb``,
    ``.h5``, ``.hdf5``) and agrees with ``fmt`` when one is given."""
    out = Path(out)
    named = dataset_format(out)
    if fmt is not None and fmt not in FORMAT_SUFFIXES:
        raise ConfigError(f"unknown dataset format {fmt!r} (choose from {', '.join(FORMAT_SUFFIXES)})")
    if named is None:
        want = FORMAT_SUFFIXES[fmt or DEFAULT_FORMAT][0]
        raise ConfigError(f"{out}: a dataset file name ends in .lmdb (LMDB, the default) or .h5 (HDF5); "
                          f"e.g. {out.with_name(out.name + want)}")
    if fmt is not None and fmt != named:
        raise ConfigError(f"{out}: the name says {named} but --output-format is {fmt}; "
                          f"use a name ending in {FORMAT_SUFFIXES[fmt][0]}")
    return out


def shard_path(out, k: int) -> Path:
    """``data.lmdb`` -> ``data-00003.lmdb``: the name of shard ``k``."""
    out = Path(out)
    return out.with_name(f"{out.stem}-{k:05d}{out.suffix}")


def _write_shard(task) -> tuple[int, str, int]:
    k, frames, out, cutoff = task
    path = shard_path(out, k)
    return k, str(path), write_dataset(frames, path, cutoff=cutoff)


def write_shards(atoms_iter: Iterable, out, frames_per_shard: int, *, cutoff: float | None = None,
                 workers: int = 1, progress: bool = False, fmt: str | None = None) -> list[tuple[str, int]]:
    """Stream structures into shards ``OUT-00000.lmdb, OUT-00001.lmdb, ...`` (the format of
    :func:`output_path`) of ``frames_per_shard`` frames each (frame order kept: shard ``k``
    holds frames ``k*M .. (k+1)*M - 1``), writing up to ``workers`` shards in parallel
    processes (neighbour lists are the costly part). At most ``2 * workers`` shards are in
    flight, so memory stays bounded for any input size. Each shard appears atomically.
    Returns ``[(path, n_frames), ...]`` in order."""
    import itertools
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    if frames_per_shard < 1:
        raise DataError(f"frames per shard must be >= 1, got {frames_per_shard}")
    out = output_path(out, fmt)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc="frames written", unit="frame", dynamic_ncols=True)
    it = iter(atoms_iter)
    tasks = ((k, chunk, str(out), cutoff) for k, chunk in enumerate(
        iter(lambda: list(itertools.islice(it, frames_per_shard)), [])))
    done: dict[int, tuple[str, int]] = {}

    def record(res):
        k, path, n = res
        done[k] = (path, n)
        if bar is not None:
            bar.update(n)

    try:
        if workers <= 1:
            for t in tasks:
                record(_write_shard(t))
        else:
            import multiprocessing as mp

            with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
                pending = set()
                for t in tasks:
                    pending.add(pool.submit(_write_shard, t))
                    if len(pending) >= 2 * workers:
                        finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                        for f in finished:
                            record(f.result())
                for f in pending:
                    record(f.result())
    finally:
        if bar is not None:
            bar.close()
    return [done[k] for k in sorted(done)]
