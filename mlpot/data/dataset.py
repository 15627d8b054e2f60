"""torch Datasets of graphs and the DataLoader that batches them with :func:`collate`.

* :class:`AtomicDataset` wraps a list of ``ase.Atoms``; graphs are built on access, or all
  at once with ``precompute=True``.
* :class:`LazyDataset` reads frames of a dataset file (LMDB or HDF5, :mod:`mlpot.data.store`)
  on access, so a dataset larger than memory trains. The file is opened once per process (the
  handle is dropped when pickled, so every DataLoader worker opens its own). Stored neighbor
  lists are reused when the requested cutoff is not larger than the stored one (edges beyond
  the requested cutoff are filtered out); otherwise they are recomputed.
* :class:`ShardedDataset` joins several such files (shards) and an index subset (a split) into
  one lazy dataset; it is what ``mlpot train`` uses for ``.lmdb`` and ``.h5`` training data
  (:mod:`mlpot.train.lazy_data`).
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mlpot.data.graph import AtomicGraph, atoms_to_graph, collate, frame_to_graph
from mlpot.errors import DataError

__all__ = ["AtomicDataset", "LazyDataset", "ShardedDataset", "make_dataloader"]


class AtomicDataset(Dataset):
    """Graphs of a list of ``ase.Atoms`` for a given cutoff (Å) and float dtype."""

    def __init__(self, atoms_list: Sequence, cutoff: float, dtype: torch.dtype = torch.float64,
                 precompute: bool = False):
        self.atoms_list = list(atoms_list)
        self.cutoff = float(cutoff)
        self.dtype = dtype
        self._graphs = None
        if precompute:
            self._graphs = [atoms_to_graph(a, self.cutoff, dtype) for a in self.atoms_list]

    def __len__(self) -> int:
        return len(self.atoms_list)

    def __getitem__(self, idx: int) -> AtomicGraph:
        if self._graphs is not None:
            return self._graphs[idx]
        return atoms_to_graph(self.atoms_list[idx], self.cutoff, self.dtype)

    def atoms(self, idx: int):
        return self.atoms_list[idx]


class LazyDataset(Dataset):
    """Graphs read lazily from a dataset file written by ``mlpot data convert`` (LMDB,
    :mod:`mlpot.data.lmdb_store`, or HDF5, :func:`mlpot.data.write_hdf5`; the format by the
    suffix, :mod:`mlpot.data.store`). Every frame read is checked
    (:func:`mlpot.data.frames.check_frame`): a NaN or a damaged record is one error naming
    the file and the frame."""

    def __init__(self, path, cutoff: float | None = None, dtype: torch.dtype = torch.float64):
        from mlpot.data.store import open_frames

        self.path = str(path)
        store = open_frames(self.path)
        try:
            self._len = store.n_frames
            self.stored_cutoff = store.stored_cutoff
        finally:
            store.close()
        if cutoff is None:
            if self.stored_cutoff is None:
                raise DataError(f"{self.path}: no neighbor lists stored; give a cutoff")
            cutoff = self.stored_cutoff
        self.cutoff = float(cutoff)
        self.dtype = dtype
        self._store = None
        self._pid = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_store"] = None
        state["_pid"] = None
        return state

    def _handle(self):
        """This process's reader (DataLoader workers each open their own)."""
        if self._store is None or self._pid != os.getpid():
            from mlpot.data.store import open_frames

            self._store = open_frames(self.path)
            self._pid = os.getpid()
        return self._store

    def __len__(self) -> int:
        return self._len

    def frame(self, idx: int) -> dict:
        from mlpot.data.frames import check_frame

        if idx < 0:
            idx += self._len
        if not 0 <= idx < self._len:
            raise IndexError(f"{self.path}: frame {idx} out of range ({self._len} frames)")
        return check_frame(self._handle().frame(idx), self.path, idx)

    def atoms(self, idx: int):
        from mlpot.data.frames import frame_to_atoms

        return frame_to_atoms(self.frame(idx))

    def stored_edges(self, fr: dict):
        """The frame's stored neighbor list restricted to ``self.cutoff`` (``|D| < cutoff``), or
        None when the file has none or its cutoff is smaller than ours."""
        edges = fr.get("edges")
        if edges is None or self.stored_cutoff is None or self.cutoff > self.stored_cutoff:
            return None
        if self.cutoff < self.stored_cutoff:
            i, j, S = edges
            pbc = np.asarray(fr["pbc"], dtype=bool)
            cell = fr["cell"] * pbc[:, None]
            D = fr["positions"][j] - fr["positions"][i] + S @ cell
            keep = np.einsum("ij,ij->i", D, D) < self.cutoff**2
            edges = (i[keep], j[keep], S[keep])
        return edges

    def frame_edges(self, fr: dict):
        """``(i, j, S)`` of a frame at ``self.cutoff``: stored when usable, else computed."""
        edges = self.stored_edges(fr)
        if edges is not None:
            return edges
        from mlpot.data.neighbors import neighbor_list

        i, j, S = neighbor_list(fr["positions"], self.cutoff, fr["cell"], fr["pbc"])
        return i.numpy(), j.numpy(), S.numpy()

    def __getitem__(self, idx: int) -> AtomicGraph:
        fr = self.frame(int(idx))
        edges = self.stored_edges(fr)
        return frame_to_graph(
            fr["positions"], fr["numbers"], fr["cell"], fr["pbc"], self.cutoff,
            energy=fr["energy"], forces=fr["forces"], stress=fr["stress"],
            weight=fr["weight"], energy_weight=fr["energy_weight"],
            forces_weight=fr["forces_weight"], stress_weight=fr["stress_weight"],
            config_type=fr["config_type"], dtype=self.dtype, edges=edges,
            hessian=fr.get("hessian"),
        )

    def close(self):
        if self._store is not None and self._pid == os.getpid():
            self._store.close()
        self._store = None


class ShardedDataset(Dataset):
    """Lazy graphs from one or several dataset files (LMDB or HDF5) (shards) seen as one dataset.

    ``indices`` (global frame numbers, shard after shard) selects and orders a subset, e.g. a
    training or validation split; only this int64 array is held in memory, never the frames.
    ``config_type_weights`` multiplies a frame's ``weight`` by the weight of its config_type
    (``training.config_type_weights``). ``atoms(k)`` carries ``info["_mlpot_source"] =
    (file, frame)`` so that errors name the frame on disk.
    """

    def __init__(self, paths, cutoff: float, dtype: torch.dtype = torch.float64, indices=None,
                 config_type_weights: dict | None = None):
        self.shards = [LazyDataset(p, cutoff=cutoff, dtype=dtype) for p in paths]
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])
        total = int(self.offsets[-1])
        self.indices = np.arange(total, dtype=np.int64) if indices is None else np.asarray(indices, dtype=np.int64)
        if len(self.indices) and (self.indices.min() < 0 or self.indices.max() >= total):
            raise IndexError(f"frame index out of range ({total} frames in {len(self.shards)} file(s))")
        self.cutoff = float(cutoff)
        self.dtype = dtype
        self.config_type_weights = dict(config_type_weights or {})

    def subset(self, indices) -> ShardedDataset:
        """The frames ``self.indices[indices]`` as a new dataset over the same files."""
        out = ShardedDataset.__new__(ShardedDataset)
        out.__dict__.update(self.__dict__)
        out.indices = self.indices[np.asarray(indices, dtype=np.int64)]
        return out

    def __len__(self) -> int:
        return len(self.indices)

    def locate(self, idx: int) -> tuple[int, int]:
        """(shard number, frame within the shard) of item ``idx``."""
        g = int(self.indices[idx])
        s = int(np.searchsorted(self.offsets, g, side="right")) - 1
        return s, g - int(self.offsets[s])

    def __getitem__(self, idx: int) -> AtomicGraph:
        s, k = self.locate(idx)
        g = self.shards[s][k]
        w = self.config_type_weights.get(g["config_type"][0]) if self.config_type_weights else None
        if w is not None:
            g["weight"] = g["weight"] * float(w)
        return g

    def atoms(self, idx: int):
        s, k = self.locate(idx)
        a = self.shards[s].atoms(k)
        a.info["_mlpot_source"] = (self.shards[s].path, k)
        return a

    def close(self) -> None:
        for s in self.shards:
            s.close()


def make_dataloader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = False,
    num_workers: int = 0,
    sampler=None,
    drop_last: bool = False,
    **kwargs,
) -> DataLoader:
    """A ``torch.utils.data.DataLoader`` yielding batched graphs (:func:`collate`)."""
    if sampler is not None:
        shuffle = False
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        sampler=sampler,
        drop_last=drop_last,
        collate_fn=collate,
        persistent_workers=False,
        **kwargs,
    )
