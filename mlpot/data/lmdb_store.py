"""On-disk dataset format (LMDB), the default for data larger than memory.

One LMDB environment in a single file (``big.lmdb``; no lock file, no sub-folder). Each frame
(:mod:`mlpot.data.frames`) is one record:

* key: the frame number as 8 bytes, big-endian (so keys sort in frame order and are appended);
* value: ``uint32 n`` (little-endian) | ``n`` bytes of JSON header | the raw array buffers, one
  after the other. The header holds the scalars (energy, weights, config_type) and, per array,
  its name, numpy dtype (explicitly little-endian) and shape. No pickle: a file from elsewhere
  can make the reader fail, never run code.

The record ``b"__mlpot__"`` holds the file's JSON metadata: ``format`` (``mlpot-dataset``),
``version``, ``n_frames`` and the neighbour-list ``cutoff`` (null when none is stored).

Why LMDB and not HDF5 by default: a random frame is one B-tree lookup in a memory map and one
contiguous read, where HDF5 reads a chunk of every column the frame touches (positions, forces,
edges, ...). ``python scripts/bench_data.py`` measured 3.0x more random frames per second as
arrays and 2.2x as graphs than HDF5, and training ahead or level (BENCHMARKS.md, "Data on
disk"), at the price of files 1.8x larger (no compression, page granularity). HDF5 stays selectable
(``mlpot data convert ... --output-format h5`` or an ``.h5`` name).

Writing streams frames in transactions of ``chunk`` frames into a temporary file beside the
target, which replaces it atomically when complete; the memory map grows as needed.
Reading (:class:`LMDBFrames`) opens the file read-only without locks or read-ahead (random
access on a file larger than memory must not pull in neighbouring pages); open one per process.
"""
from __future__ import annotations

import contextlib
import json
import os
import struct
from collections.abc import Iterable, Iterator

import numpy as np

from mlpot.data.frames import WEIGHT_KEYS, atoms_to_frame, frame_to_atoms
from mlpot.errors import DataError

__all__ = ["META_KEY", "LMDBFrames", "decode_frame", "encode_frame", "frame_key", "iter_lmdb_atoms", "write_lmdb"]

FORMAT_NAME = "mlpot-dataset"
FORMAT_VERSION = 1
META_KEY = b"__mlpot__"
_HEAD = struct.Struct("<I")
# array name -> stored dtype (little-endian, explicit); the frame's dtypes are restored on reading
_STORED = {"positions": "<f8", "numbers": "<i2", "cell": "<f8", "pbc": "|b1", "forces": "<f8", "stress": "<f8",
           "hessian": "<f8", "edge_i": "<i4", "edge_j": "<i4", "shifts": "<i2"}


def frame_key(k: int) -> bytes:
    return struct.pack(">Q", k)


def encode_frame(fr: dict) -> bytes:
    """The record of a frame (module docstring)."""
    arrays = {k: fr[k] for k in ("positions", "numbers", "cell", "pbc", "forces", "stress", "hessian")
              if fr.get(k) is not None}
    if fr.get("edges") is not None:
        arrays["edge_i"], arrays["edge_j"], arrays["shifts"] = fr["edges"]
    bufs, specs = [], []
    for name, v in arrays.items():
        a = np.ascontiguousarray(v, dtype=_STORED[name])
        specs.append([name, _STORED[name], list(a.shape)])
        bufs.append(a.tobytes())
    head = {"energy": fr.get("energy"), "config_type": fr["config_type"], "arrays": specs,
            **{k: fr[k] for k in WEIGHT_KEYS}}
    h = json.dumps(head, separators=(",", ":")).encode()
    return _HEAD.pack(len(h)) + h + b"".join(bufs)


def decode_frame(buf, label: str = "<lmdb>", k: int = -1) -> dict:
    """The frame of a record; a damaged record is a :class:`DataError` naming ``label`` and frame ``k``."""
    buf = bytearray(buf)  # writable arrays (torch.as_tensor warns on read-only ones)
    try:
        (n,) = _HEAD.unpack_from(buf)
        head = json.loads(bytes(buf[_HEAD.size:_HEAD.size + n]))
        pos = _HEAD.size + n
        out = {"energy": head["energy"], "config_type": str(head["config_type"]),
               **{key: float(head[key]) for key in WEIGHT_KEYS}}
        arrays = {}
        for name, dt, shape in head["arrays"]:
            count = int(np.prod(shape, dtype=np.int64))
            size = count * np.dtype(dt).itemsize
            if pos + size > len(buf):
                raise ValueError(f"array {name} runs past the end of the record")
            arrays[name] = np.frombuffer(buf, dtype=dt, count=count, offset=pos).reshape(shape)
            pos += size
        if pos != len(buf):
            raise ValueError(f"{len(buf) - pos} bytes left over")
    except (struct.error, ValueError, KeyError, TypeError) as exc:  # JSONDecodeError is a ValueError
        raise DataError(f"{label}: frame {k}: damaged record ({exc})") from None
    if "positions" not in arrays or "numbers" not in arrays:
        raise DataError(f"{label}: frame {k}: damaged record (no positions or numbers)")
    out["positions"] = arrays["positions"].astype(np.float64, copy=False)
    out["numbers"] = arrays["numbers"].astype(np.int64)
    out["cell"] = arrays.get("cell", np.zeros((3, 3)))
    out["pbc"] = arrays.get("pbc", np.zeros(3, dtype=bool))
    for name in ("forces", "stress", "hessian"):
        out[name] = arrays.get(name)
    if out["energy"] is not None:
        out["energy"] = float(out["energy"])
    if "edge_i" in arrays:
        out["edges"] = (arrays["edge_i"].astype(np.int64), arrays["edge_j"].astype(np.int64),
                        arrays["shifts"].astype(np.int64))
    return out


def _open(path, **kwargs):
    import lmdb

    try:
        return lmdb.open(str(path), subdir=False, lock=False, **kwargs)
    except lmdb.Error as exc:
        raise DataError(f"{path}: not a readable LMDB file ({exc})") from None


def write_lmdb(atoms_iter: Iterable, path, cutoff: float | None = None, *, chunk: int = 1024) -> int:
    """Write structures (``ase.Atoms`` with targets in ``atoms.calc``, as from
    :func:`mlpot.data.read`) to ``path``; with ``cutoff``, neighbour lists too. Returns the
    number of frames. The file appears atomically (temp + rename) and only when complete."""
    import itertools

    import lmdb

    from mlpot.fileio import atomic_path

    n_frames = 0
    it = iter(atoms_iter)
    with atomic_path(path) as tmp:
        env = _open(tmp, map_size=1 << 28, meminit=False, sync=False, metasync=False)
        try:
            while True:
                batch = [encode_frame(atoms_to_frame(a, cutoff)) for a in itertools.islice(it, chunk)]
                meta = None
                if not batch:
                    meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "n_frames": n_frames,
                            "cutoff": None if cutoff is None else float(cutoff)}
                while True:  # grow the map until the transaction fits
                    try:
                        with env.begin(write=True) as txn:
                            for i, rec in enumerate(batch):
                                txn.put(frame_key(n_frames + i), rec, append=True)
                            if meta is not None:
                                txn.put(META_KEY, json.dumps(meta).encode())
                        break
                    except lmdb.MapFullError:
                        env.set_mapsize(2 * env.info()["map_size"])
                n_frames += len(batch)
                if meta is not None:
                    break
            env.sync(True)
        finally:
            env.close()
    return n_frames


class _Shared:
    """The read-only environment of one file, shared by every reader in this process: py-lmdb
    refuses to open a file twice in one process. Environments inherited through ``fork``
    (DataLoader workers) are closed in the child before it opens its own: they hold no locks
    (``lock=False``), so this touches nothing of the parent's."""

    open: dict = {}  # (st_dev, st_ino) of the file -> [env, txn, pid, readers]

    @staticmethod
    def _key(path: str):
        try:
            st = os.stat(path)
        except OSError as exc:
            raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from None
        return st.st_dev, st.st_ino

    @classmethod
    def acquire(cls, path: str):
        import lmdb

        pid = os.getpid()
        for key, entry in list(cls.open.items()):
            if entry[2] != pid:
                with contextlib.suppress(lmdb.Error):
                    entry[0].close()
                del cls.open[key]
        key = cls._key(path)
        entry = cls.open.get(key)
        if entry is None:
            env = _open(path, readonly=True, readahead=False, meminit=False, max_readers=1)
            try:
                txn = env.begin(buffers=False)
            except lmdb.Error as exc:
                env.close()
                raise DataError(f"{path}: not a readable LMDB file ({exc})") from None
            entry = cls.open[key] = [env, txn, pid, 0]
        entry[3] += 1
        return entry[1]

    @classmethod
    def release(cls, txn) -> None:
        entry = next((e for e in cls.open.values() if e[1] is txn), None)
        if entry is None or entry[2] != os.getpid():
            return
        entry[3] -= 1
        if entry[3] <= 0:
            entry[1].abort()
            entry[0].close()
            cls.open = {k: e for k, e in cls.open.items() if e is not entry}


class LMDBFrames:
    """Frames of an LMDB dataset file, read one at a time (the reader behind
    :class:`mlpot.data.LazyDataset`; open one per process)."""

    def __init__(self, path):
        import lmdb

        self.path = str(path)
        self._txn = _Shared.acquire(self.path)
        try:
            raw = self._txn.get(META_KEY)
        except lmdb.Error as exc:
            self.close()
            raise DataError(f"{self.path}: not a readable LMDB file ({exc})") from None
        if raw is None:
            self.close()
            raise DataError(f"{self.path}: not an mlpot dataset file (no {META_KEY.decode()} record)")
        try:
            meta = json.loads(raw)
            fmt, version = meta.get("format"), int(meta.get("version", -1))
            self.n_frames = int(meta["n_frames"])
            cutoff = meta.get("cutoff")
            self.stored_cutoff = None if cutoff is None else float(cutoff)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            self.close()
            raise DataError(f"{self.path}: damaged {META_KEY.decode()} record ({exc})") from None
        if fmt != FORMAT_NAME:
            self.close()
            raise DataError(f"{self.path}: not an mlpot dataset file (format {fmt!r})")
        if version > FORMAT_VERSION:
            self.close()
            raise DataError(f"{self.path}: dataset format version {version} is newer than supported {FORMAT_VERSION}")

    def frame(self, k: int) -> dict:
        import lmdb

        try:
            buf = self._txn.get(frame_key(k))
        except lmdb.Error as exc:
            raise DataError(f"{self.path}: frame {k}: cannot be read ({exc})") from None
        if buf is None:
            raise DataError(f"{self.path}: frame {k}: missing (the file says it holds {self.n_frames} frames)")
        return decode_frame(buf, self.path, k)

    def close(self) -> None:
        if self._txn is not None:
            txn, self._txn = self._txn, None
            _Shared.release(txn)


def iter_lmdb_atoms(path) -> Iterator:
    """Stream the frames of an LMDB dataset file as ``ase.Atoms``."""
    from mlpot.data.frames import check_frame

    store = LMDBFrames(path)
    try:
        for k in range(store.n_frames):
            yield frame_to_atoms(check_frame(store.frame(k), store.path, k))
    finally:
        store.close()
