"""On-disk dataset format (HDF5) for data larger than memory.

Layout (format ``mlpot-dataset``, version 1); ``F`` frames, ``N`` atoms in total:

=====================  ============  ===================================================
dataset                shape, dtype  meaning
=====================  ============  ===================================================
``atom_ptr``           (F+1,) i8     atoms of frame k are rows ``atom_ptr[k]:atom_ptr[k+1]``
``positions``          (N, 3) f8     Å
``atomic_numbers``     (N,) i2
``forces``             (N, 3) f8     eV/Å (zeros where ``has_forces`` is false)
``cell``               (F, 3, 3) f8  rows are lattice vectors
``pbc``                (F, 3) bool
``energy``             (F,) f8       eV (NaN where absent)
``stress``             (F, 6) f8     eV/Å^3, ASE Voigt and sign (NaN where absent)
``has_forces``         (F,) bool
``weight``, ``energy_weight``, ``forces_weight``, ``stress_weight``  (F,) f8
``config_type``        (F,) str
``edge_ptr``           (F+1,) i8     only with a cutoff: edges of frame k
``edges``              (E, 2) i4     (i, j) local to the frame
``shifts``             (E, 3) i2     S
``hessian_ptr``        (F+1,) i8     Hessian values of frame k: ``hessian[ptr[k]:ptr[k+1]]``
``hessian``            (H,) f8       eV/Å², each frame's (3n, 3n) Hessian flattened, or none
=====================  ============  ===================================================

Writing streams frames in chunks (the input may be an iterator, never held in memory) into a
temporary file that replaces the target atomically. Reading is lazy: :class:`LazyDataset`
(in :mod:`mlpot.data.dataset`) opens the file on first access in each process (safe with
DataLoader workers) and reads only the rows of the requested frame.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from mlpot.errors import DataError
from mlpot.voigt import as_voigt

FORMAT_NAME = "mlpot-dataset"
FORMAT_VERSION = 1

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "iter_hdf5_atoms", "read_hdf5_frame", "shard_path", "write_hdf5",
           "write_hdf5_shards"]


def _h5():
    import h5py

    return h5py


def write_hdf5(atoms_iter: Iterable, path, cutoff: float | None = None, *, chunk: int = 1024) -> int:
    """Write structures (``ase.Atoms`` with targets in ``atoms.calc``, as from
    :func:`mlpot.data.read`) to ``path``. With ``cutoff``, neighbor lists are stored too.
    Returns the number of frames written. The file appears atomically (temp + rename)."""
    h5py = _h5()
    from mlpot.data.neighbors import neighbor_list
    from mlpot.fileio import atomic_path

    path = Path(path)
    n_frames = 0
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = FORMAT_NAME
            f.attrs["version"] = FORMAT_VERSION
            f.attrs["cutoff"] = float(cutoff) if cutoff is not None else np.nan
            str_dt = h5py.string_dtype("utf-8")

            def mk(name, shape_tail, dtype):
                return f.create_dataset(
                    name, shape=(0, *shape_tail), maxshape=(None, *shape_tail), dtype=dtype,
                    chunks=(max(1, chunk), *shape_tail),
                )

            d = {
                "positions": mk("positions", (3,), "f8"),
                "atomic_numbers": mk("atomic_numbers", (), "i2"),
                "forces": mk("forces", (3,), "f8"),
                "cell": mk("cell", (3, 3), "f8"),
                "pbc": mk("pbc", (3,), "bool"),
                "energy": mk("energy", (), "f8"),
                "stress": mk("stress", (6,), "f8"),
                "has_forces": mk("has_forces", (), "bool"),
                "weight": mk("weight", (), "f8"),
                "energy_weight": mk("energy_weight", (), "f8"),
                "forces_weight": mk("forces_weight", (), "f8"),
                "stress_weight": mk("stress_weight", (), "f8"),
                "config_type": mk("config_type", (), str_dt),
                "atom_ptr": mk("atom_ptr", (), "i8"),
                "hessian": mk("hessian", (), "f8"),
                "hessian_ptr": mk("hessian_ptr", (), "i8"),
            }
            if cutoff is not None:
                d["edges"] = mk("edges", (2,), "i4")
                d["shifts"] = mk("shifts", (3,), "i2")
                d["edge_ptr"] = mk("edge_ptr", (), "i8")
            buf: dict[str, list] = {k: [] for k in d}
            n_atoms_total = 0
            n_edges_total = 0
            buf["atom_ptr"].append(np.array([0]))
            buf["hessian_ptr"].append(np.array([0]))
            n_hessian_total = 0
            if cutoff is not None:
                buf["edge_ptr"].append(np.array([0]))

            def flush():
                for k, parts in buf.items():
                    if not parts:
                        continue
                    arr = np.concatenate(parts) if parts[0].ndim > 0 else np.stack(parts)
                    ds = d[k]
                    old = ds.shape[0]
                    ds.resize(old + len(arr), axis=0)
                    ds[old:] = arr
                    parts.clear()

            for atoms in atoms_iter:
                res = dict(atoms.calc.results) if atoms.calc is not None else {}
                n = len(atoms)
                info = atoms.info
                buf["positions"].append(np.asarray(atoms.positions, dtype=np.float64))
                buf["atomic_numbers"].append(np.asarray(atoms.numbers, dtype=np.int16))
                fr = res.get("forces")
                buf["forces"].append(np.zeros((n, 3)) if fr is None else np.asarray(fr, dtype=np.float64))
                buf["has_forces"].append(np.array([fr is not None]))
                buf["cell"].append(atoms.cell.array[None].astype(np.float64))
                buf["pbc"].append(np.asarray(atoms.pbc, dtype=bool)[None])
                e = res.get("energy")
                buf["energy"].append(np.array([np.nan if e is None else float(e)]))
                s = res.get("stress")
                if s is None:
                    sv = np.full(6, np.nan)
                else:
                    sv = as_voigt(np.asarray(s, dtype=np.float64))
                buf["stress"].append(sv[None])
                for k in ("weight", "energy_weight", "forces_weight", "stress_weight"):
                    default = 1.0
                    tgt = {"energy_weight": e, "forces_weight": fr, "stress_weight": s}.get(k, 0)
                    if tgt is None:
                        default = 0.0
                    buf[k].append(np.array([float(info.get(k, default))]))
                buf["config_type"].append(np.array([str(info.get("config_type", "Default"))], dtype=object))
                n_atoms_total += n
                buf["atom_ptr"].append(np.array([n_atoms_total]))
                hs = res.get("hessian")
                if hs is not None:
                    buf["hessian"].append(np.asarray(hs, dtype=np.float64).reshape(-1))
                    n_hessian_total += 9 * n * n
                buf["hessian_ptr"].append(np.array([n_hessian_total]))
                if cutoff is not None:
                    i, j, S = neighbor_list(atoms.positions, cutoff, atoms.cell.array, atoms.pbc)
                    buf["edges"].append(np.stack([i.numpy(), j.numpy()], 1).astype(np.int32).reshape(-1, 2))
                    buf["shifts"].append(S.numpy().astype(np.int16).reshape(-1, 3))
                    n_edges_total += len(i)
                    buf["edge_ptr"].append(np.array([n_edges_total]))
                n_frames += 1
                if n_frames % chunk == 0:
                    flush()
            flush()
            f.attrs["n_frames"] = n_frames
    return n_frames


def check_file(f, path) -> None:
    if f.attrs.get("format") != FORMAT_NAME:
        raise DataError(f"{path}: not an mlpot dataset file (format attribute {f.attrs.get('format')!r})")
    if int(f.attrs.get("version", -1)) > FORMAT_VERSION:
        raise DataError(f"{path}: dataset format version {f.attrs.get('version')} is newer than supported {FORMAT_VERSION}")


def read_hdf5_frame(f, k: int) -> dict:
    """Arrays of frame ``k`` from an open file: positions, numbers, cell, pbc, targets,
    weights, config_type and (when stored) edges."""
    a0, a1 = (int(x) for x in f["atom_ptr"][k : k + 2])
    out = {
        "positions": f["positions"][a0:a1],
        "numbers": f["atomic_numbers"][a0:a1].astype(np.int64),
        "cell": f["cell"][k],
        "pbc": f["pbc"][k],
        "energy": None,
        "forces": None,
        "stress": None,
    }
    e = float(f["energy"][k])
    if np.isfinite(e):
        out["energy"] = e
    if bool(f["has_forces"][k]):
        out["forces"] = f["forces"][a0:a1]
    s = f["stress"][k]
    if np.all(np.isfinite(s)):
        out["stress"] = s
    for key in ("weight", "energy_weight", "forces_weight", "stress_weight"):
        out[key] = float(f[key][k])
    out["hessian"] = None
    if "hessian_ptr" in f:
        h0, h1 = (int(x) for x in f["hessian_ptr"][k : k + 2])
        if h1 > h0:
            out["hessian"] = f["hessian"][h0:h1]
    ct = f["config_type"][k]
    out["config_type"] = ct.decode() if isinstance(ct, bytes) else str(ct)
    if "edge_ptr" in f:
        e0, e1 = (int(x) for x in f["edge_ptr"][k : k + 2])
        ed = f["edges"][e0:e1].astype(np.int64)
        out["edges"] = (ed[:, 0], ed[:, 1], f["shifts"][e0:e1].astype(np.int64))
    return out


def frame_to_atoms(fr: dict):
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator

    atoms = Atoms(numbers=fr["numbers"], positions=fr["positions"], cell=fr["cell"], pbc=fr["pbc"])
    res = {k: fr[k] for k in ("energy", "forces", "stress", "hessian") if fr.get(k) is not None}
    if res:
        calc = SinglePointCalculator(atoms)
        calc.results.update(res)
        atoms.calc = calc
    atoms.info["config_type"] = fr["config_type"]
    for key in ("weight", "energy_weight", "forces_weight", "stress_weight"):
        atoms.info[key] = fr[key]
    return atoms


def iter_hdf5_atoms(path) -> Iterator:
    """Stream the frames of a dataset file as ``ase.Atoms``."""
    h5py = _h5()
    with h5py.File(path, "r") as f:
        check_file(f, path)
        for k in range(int(f.attrs["n_frames"])):
            yield frame_to_atoms(read_hdf5_frame(f, k))


def shard_path(out, k: int):
    """``data.h5`` -> ``data-00003.h5``: the name of shard ``k``."""
    out = Path(out)
    return out.with_name(f"{out.stem}-{k:05d}{out.suffix}")


def _write_shard(task) -> tuple[int, str, int]:
    k, frames, out, cutoff = task
    path = shard_path(out, k)
    return k, str(path), write_hdf5(frames, path, cutoff=cutoff)


def write_hdf5_shards(atoms_iter: Iterable, out, frames_per_shard: int, *, cutoff: float | None = None,
                      workers: int = 1, progress: bool = False) -> list[tuple[str, int]]:
    """Stream structures into shards ``OUT-00000.h5, OUT-00001.h5, ...`` of ``frames_per_shard``
    frames each (frame order kept: shard ``k`` holds frames ``k*M .. (k+1)*M - 1``), writing up
    to ``workers`` shards in parallel processes (neighbor lists are the costly part). At most
    ``2 * workers`` shards are in flight, so memory stays bounded for any input size. Each shard
    appears atomically. Returns ``[(path, n_frames), ...]`` in order."""
    import itertools
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    if frames_per_shard < 1:
        raise DataError(f"frames per shard must be >= 1, got {frames_per_shard}")
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
