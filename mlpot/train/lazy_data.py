"""Training from dataset files (LMDB or HDF5) without reading them into memory.

When every file of ``data.train`` is a dataset file (``.lmdb``, the default of
``mlpot data convert``, or ``.h5``/``.hdf5``; :mod:`mlpot.data.store`), :func:`prepare_lazy_splits`
replaces the in-memory path of
:func:`mlpot.train.setup.prepare_data`:

* frames stay on disk; the splits are :class:`~mlpot.data.ShardedDataset` objects that hold
  only an int64 index array and read a frame when the DataLoader asks for it (each worker opens
  its own file handle; the trainer's ``DistributedSampler`` shards the indices over ranks);
* statistics (E0s, average neighbours, scale/shift, species, whether stresses exist) come from
  one streaming pass per file, cached beside it (:mod:`mlpot.data.streaming_stats`);
* stored neighbour lists are used when their cutoff is at least ``model.r_max``.

The splits follow the in-memory path exactly: isolated-atom frames are set aside (and are the
source of ``e0s: isolated``), ``data.max_train`` keeps the first N remaining frames, a
fractional ``data.valid`` holds out the same permutation (seeded by ``seed``).
One difference, stated in the log: statistics are those of the whole training files, the
held-out validation fraction included, so that each file's statistics can be cached once; give
``data.valid`` as a file to keep validation frames out of them.
Test sets (``data.test``) are read in memory as before.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mlpot.errors import ConfigError, DataError

__all__ = ["HDF5_SUFFIXES", "is_lazy_source", "is_hdf5_source", "prepare_lazy_splits"]

HDF5_SUFFIXES = (".h5", ".hdf5")


def is_lazy_source(files) -> bool:
    """True when every file is a dataset file (LMDB or HDF5, by suffix); a mix with other
    formats is an error (LMDB and HDF5 shards may be mixed)."""
    from mlpot.data.store import dataset_format

    flags = [dataset_format(f) is not None for f in files]
    if any(flags) and not all(flags):
        raise ConfigError("config key `data.train`: mixes dataset files (.lmdb, .h5) with other formats; "
                          "convert all of them with `mlpot data convert` (or none)")
    return bool(flags) and all(flags)


is_hdf5_source = is_lazy_source  # the name before LMDB


def _dtype(cfg):
    import torch

    return {"float64": torch.float64, "float32": torch.float32}[cfg["dtype"]]


def prepare_lazy_splits(cfg: dict, train_files: list, valid_spec, test_spec: dict, log=print):
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator

    from mlpot.data.dataset import ShardedDataset
    from mlpot.data.streaming_stats import FrameMoments, file_moments
    from mlpot.train.setup import Splits, read_frames

    data = cfg["data"]
    r_max = float(cfg["model"]["r_max"])
    dtype = _dtype(cfg)
    weights = cfg["training"]["config_type_weights"] or {}
    moments = FrameMoments(r_max=r_max)
    isolated, isolated_global = [], []
    offset = 0
    full = ShardedDataset(train_files, r_max, dtype, config_type_weights=weights)
    for path, shard in zip(train_files, full.shards):
        m = file_moments(path, r_max, log=log)
        for k, z, e, typed in m.isolated:
            isolated_global.append(offset + int(k))
            if z > 0:  # single-atom frame
                a = Atoms(numbers=[z], pbc=False)
                a.calc = SinglePointCalculator(a, energy=float(e))
                a.info["config_type"] = "IsolatedAtom" if typed else "Default"
                a.info["_mlpot_source"] = (str(path), int(k))
                isolated.append(a)
        m.isolated = []
        moments.merge(m)
        offset += len(shard)
    idx = np.setdiff1d(np.arange(len(full), dtype=np.int64), np.asarray(isolated_global, dtype=np.int64))
    if data["isolated_atoms"] is not None:
        isolated = read_frames(data["isolated_atoms"], data, require=("energy",))
    if data["max_train"] is not None:
        idx = idx[: data["max_train"]]
    if len(idx) == 0:
        raise DataError(f"no training structures in {', '.join(map(str, train_files))}")

    valid = None
    if isinstance(valid_spec, str):
        if not is_lazy_source([valid_spec]):
            from mlpot.train.setup import _is_isolated

            valid = [a for a in read_frames(valid_spec, data) if not _is_isolated(a)]
        else:
            vm = file_moments(valid_spec, r_max, log=log)
            extra = sorted(set(vm.species()) - set(moments.species()))
            if extra:
                from ase.data import chemical_symbols

                raise DataError(f"{valid_spec}: element(s) {', '.join(chemical_symbols[z] for z in extra)} "
                                "do not occur in the training data")
            vfull = ShardedDataset([valid_spec], r_max, dtype, config_type_weights=weights)
            keep = np.setdiff1d(np.arange(len(vfull)), np.asarray([r[0] for r in vm.isolated], dtype=np.int64))
            valid = vfull.subset(keep)
        train = full.subset(idx)
    else:
        from mlpot.train.setup import split_fraction

        keep, held = split_fraction(len(idx), valid_spec, cfg["seed"])
        n_valid = len(held)
        train = full.subset(idx[keep])
        valid = full.subset(idx[held]) if n_valid else []
        if n_valid:
            log(f"lazy data: statistics over all {moments.n_frames} training-file frames "
                f"(the {n_valid} held-out validation frames included)")
    tests = {name: read_frames(p, data) for name, p in test_spec.items()}
    files = {"train": [str(p) for p in train_files], "valid": valid_spec, "test": test_spec}
    splits = Splits(train=train, valid=valid, tests=tests, isolated=isolated, files=files)
    splits.moments = moments
    splits.has_stress = moments.n_stress > 0
    log(f"lazy data: {len(train)} training frames streamed from {len(train_files)} file(s) "
        f"({', '.join(Path(p).name for p in train_files[:3])}{', ...' if len(train_files) > 3 else ''})")
    return splits


def prepare_lazy_data(cfg: dict):
    """The splits of a config whose training files are all dataset files (LMDB or HDF5), with
    the frames left on disk; None when the config names other data (then :func:`mlpot.train.setup.prepare_data`)."""
    from mlpot.train.setup import data_sources

    if cfg["data"]["synthetic"] is not None:
        return None
    train_files, valid_spec, test_spec, _ = data_sources(cfg)
    if not is_lazy_source(train_files):
        return None
    return prepare_lazy_splits(cfg, train_files, valid_spec, test_spec)
