"""mlpot.data: structures -> graphs.

Neighbor lists (:func:`neighbor_list`, :func:`batched_neighbor_list`), readers (:func:`read`,
:func:`from_pymatgen`), graphs and batching (:func:`atoms_to_graph`, :func:`collate`,
:func:`graphs_from_atoms`), datasets (:class:`AtomicDataset`, :class:`LazyDataset`,
:func:`make_dataloader`), the on-disk formats (LMDB, the default: :func:`write_lmdb`; HDF5:
:func:`write_hdf5`; either by suffix: :func:`write_dataset`) and statistics
(:mod:`mlpot.data.statistics`).
"""
from mlpot.data import statistics
from mlpot.data.dataset import AtomicDataset, LazyDataset, make_dataloader
from mlpot.data.graph import AtomicGraph, atoms_to_graph, collate, graphs_from_atoms
from mlpot.data.hdf5 import write_hdf5
from mlpot.data.lmdb_store import write_lmdb
from mlpot.data.neighbors import batched_neighbor_list, neighbor_list
from mlpot.data.readers import from_pymatgen, iread, read, validate_atoms
from mlpot.data.statistics import compute_statistics, fit_e0s
from mlpot.data.store import write_dataset
from mlpot.errors import DataError

__all__ = [
    "AtomicDataset",
    "AtomicGraph",
    "DataError",
    "LazyDataset",
    "atoms_to_graph",
    "batched_neighbor_list",
    "collate",
    "compute_statistics",
    "fit_e0s",
    "from_pymatgen",
    "graphs_from_atoms",
    "iread",
    "make_dataloader",
    "neighbor_list",
    "read",
    "statistics",
    "validate_atoms",
    "write_dataset",
    "write_hdf5",
    "write_lmdb",
]
