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

from mlpot.data.frames import WEIGHT_KEYS, atoms_to_frame, frame_to_atoms
from mlpot.errors import DataError

FORMAT_NAME = "mlpot-dataset"
FORMAT_VERSION = 1

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "HDF5Frames", "iter_hdf5_atoms", "read_hdf5_frame", "write_hdf5"]


def _h5():
    import h5py

    return h5py


def write_hdf5(atoms_iter: Iterable, path, cutoff: float | None = None, *, chunk: int = 1024) -> int:
    """Write structures (``ase.Atoms`` with targets in ``atoms.calc``, as from
    :func:`mlpot.data.read`) to ``path``. With ``cutoff``, neighbor lists are stored too.
    Returns the number of frames written. The file appears atomically (temp + rename)."""
    h5py = _h5()
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
                fr = atoms_to_frame(atoms, cutoff)
                n = len(fr["numbers"])
                buf["positions"].append(fr["positions"])
                buf["atomic_numbers"].append(fr["numbers"].astype(np.int16))
                buf["forces"].append(np.zeros((n, 3)) if fr["forces"] is None else fr["forces"])
                buf["has_forces"].append(np.array([fr["forces"] is not None]))
                buf["cell"].append(fr["cell"][None])
                buf["pbc"].append(fr["pbc"][None])
                buf["energy"].append(np.array([np.nan if fr["energy"] is None else fr["energy"]]))
                buf["stress"].append((np.full(6, np.nan) if fr["stress"] is None else fr["stress"])[None])
                for k in WEIGHT_KEYS:
                    buf[k].append(np.array([fr[k]]))
                buf["config_type"].append(np.array([fr["config_type"]], dtype=object))
                n_atoms_total += n
                buf["atom_ptr"].append(np.array([n_atoms_total]))
                if fr["hessian"] is not None:
                    buf["hessian"].append(fr["hessian"])
                    n_hessian_total += len(fr["hessian"])
                buf["hessian_ptr"].append(np.array([n_hessian_total]))
                if cutoff is not None:
                    i, j, S = fr["edges"]
                    buf["edges"].append(np.stack([i, j], 1).astype(np.int32).reshape(-1, 2))
                    buf["shifts"].append(S.astype(np.int16).reshape(-1, 3))
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


def iter_hdf5_atoms(path) -> Iterator:
    """Stream the frames of a dataset file as ``ase.Atoms``."""
    h5py = _h5()
    with h5py.File(path, "r") as f:
        check_file(f, path)
        for k in range(int(f.attrs["n_frames"])):
            yield frame_to_atoms(read_hdf5_frame(f, k))


class HDF5Frames:
    """Frames of an open HDF5 dataset file, read one at a time (the reader behind
    :class:`mlpot.data.LazyDataset`; open one per process)."""

    def __init__(self, path):
        h5py = _h5()
        self.path = str(path)
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as exc:
            raise DataError(f"{self.path}: not a readable HDF5 file ({exc})") from None
        check_file(self._file, self.path)
        self.n_frames = int(self._file.attrs["n_frames"])
        stored = float(self._file.attrs.get("cutoff", np.nan))
        self.stored_cutoff = stored if np.isfinite(stored) else None
        # dataset handles looked up once: a lookup by name costs as much as a read
        self._columns = {name: self._file[name] for name in self._file.keys()}

    def frame(self, k: int) -> dict:
        try:
            return read_hdf5_frame(self._columns, k)
        except (KeyError, OSError, ValueError) as exc:
            raise DataError(f"{self.path}: frame {k}: cannot be read ({exc})") from None

    def close(self) -> None:
        self._file.close()
