"""Dataset statistics of on-disk datasets in one streaming pass, cached beside the file.

:func:`mlpot.data.statistics.compute_statistics` walks a dataset several times and keeps one
row per configuration for the E0 fit. For files larger than memory, :class:`FrameMoments`
instead accumulates sufficient statistics, frame by frame, in memory independent of the
number of frames. With ``c`` the per-species atom counts of a configuration (a vector over
Z = 0..118), ``N`` its number of atoms and ``E`` its energy:

* least-squares E0s: ``E0 = argmin ||A E0 - E||`` is the minimum-norm solution of the normal
  equations ``(A^T A) E0 = A^T E`` (``pinv(A^T A) A^T = pinv(A)``), so only ``A^T A``
  (``sum c c^T``) and ``A^T E`` (``sum c E``) are kept;
* interaction energy per atom ``e = E/N - (c/N) . E0`` is linear in ``v = (E/N, c/N)``, so
  its mean and variance follow from the mean and the centred second moment of ``v``
  (``mean(e) = a . mean(v)``, ``var(e) = a^T Cov(v) a`` with ``a = (1, -E0)``), accumulated
  block-wise and merged with Chan's parallel formula (no cancellation from raw moments);
* force RMS from ``sum F^2`` and the component count; average neighbours from the total
  edge count and the number of atoms with at least one neighbour (mace's definition).

Isolated-atom frames (``mlpot.data.statistics.is_isolated_atom``) are kept aside, as the
in-memory path does: their energies feed ``e0s: isolated`` and they enter no other statistic.
Accumulators of several shards add up (:meth:`FrameMoments.merge`), so each shard is cached on
its own.

The cache is ``<file>.mlpot-stats.json`` beside the dataset, written atomically, keyed by the
file's content hash (BLAKE2b of its bytes; re-hashed only when size or mtime change) and by
the cutoff. A cache that cannot be written (read-only folder) is reported and skipped.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from mlpot.errors import DataError

__all__ = ["FrameMoments", "file_moments", "content_hash", "finalize_statistics", "CACHE_SUFFIX"]

NZ = 119  # atomic numbers 0..118
CACHE_SUFFIX = ".mlpot-stats.json"
CACHE_FORMAT = "mlpot-stats-cache"
CACHE_VERSION = 1
_BLOCK = 4096


@dataclasses.dataclass
class FrameMoments:
    """Sufficient statistics of a set of frames (see the module docstring)."""

    n_frames: int = 0
    n_atoms: int = 0
    n_stress: int = 0
    species_mask: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(NZ, dtype=bool))
    ata: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((NZ, NZ)))
    atb: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(NZ))
    n_energy: int = 0
    v_mean: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(NZ + 1))
    v_m2: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((NZ + 1, NZ + 1)))
    force_sq: float = 0.0
    force_count: int = 0
    nb_edges: int = 0
    nb_atoms: int = 0
    isolated: list = dataclasses.field(default_factory=list)  # [frame, Z, energy, typed]
    r_max: float = 0.0

    # ---- accumulation ------------------------------------------------------------------------
    def _merge_v(self, n_b: int, mean_b: np.ndarray, m2_b: np.ndarray) -> None:
        n_a = self.n_energy
        n = n_a + n_b
        if n_b == 0:
            return
        delta = mean_b - self.v_mean
        self.v_mean = self.v_mean + delta * (n_b / n)
        self.v_m2 = self.v_m2 + m2_b + np.outer(delta, delta) * (n_a * n_b / n)
        self.n_energy = n

    def merge(self, other: FrameMoments) -> FrameMoments:
        """Add ``other``'s frames (in place; returns self)."""
        self.n_frames += other.n_frames
        self.n_atoms += other.n_atoms
        self.n_stress += other.n_stress
        self.species_mask = self.species_mask | other.species_mask
        self.ata = self.ata + other.ata
        self.atb = self.atb + other.atb
        self._merge_v(other.n_energy, other.v_mean, other.v_m2)
        self.force_sq += other.force_sq
        self.force_count += other.force_count
        self.nb_edges += other.nb_edges
        self.nb_atoms += other.nb_atoms
        self.isolated = self.isolated + list(other.isolated)
        return self

    def species(self) -> list[int]:
        return [int(z) for z in np.nonzero(self.species_mask)[0]]

    def to_json(self) -> dict:
        d = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            d[f.name] = v.tolist() if isinstance(v, np.ndarray) else v
        d["ata"] = _sparse(self.ata)
        d["v_m2"] = _sparse(self.v_m2)
        return d

    @classmethod
    def from_json(cls, d: dict) -> FrameMoments:
        m = cls()
        for f in dataclasses.fields(cls):
            v = d[f.name]
            if f.name in ("ata", "v_m2"):
                v = _dense(v, NZ if f.name == "ata" else NZ + 1)
            elif f.name == "species_mask":
                v = np.asarray(v, dtype=bool)
            elif f.name in ("atb", "v_mean"):
                v = np.asarray(v, dtype=np.float64)
            setattr(m, f.name, v)
        return m


def _sparse(a: np.ndarray) -> list:
    idx = np.nonzero(a)
    return [idx[0].tolist(), idx[1].tolist(), a[idx].tolist()]


def _dense(s: list, n: int) -> np.ndarray:
    a = np.zeros((n, n))
    a[np.asarray(s[0], dtype=np.int64), np.asarray(s[1], dtype=np.int64)] = s[2]
    return a


def _scan(dataset, label: str) -> FrameMoments:
    """One pass over a :class:`~mlpot.data.LazyDataset` (its cutoff is r_max)."""
    from mlpot.data.statistics import is_isolated_atom

    m = FrameMoments(r_max=float(dataset.cutoff))
    rows_ata, rows_v = [], []

    def flush():
        if rows_ata:
            A = np.asarray(rows_ata)
            m.ata += A.T @ A
            rows_ata.clear()
        if rows_v:
            V = np.asarray(rows_v)
            mean_b = V.mean(axis=0)
            D = V - mean_b
            m._merge_v(len(V), mean_b, D.T @ D)
            rows_v.clear()

    for k in range(len(dataset)):
        fr = dataset.frame(k)
        numbers = np.asarray(fr["numbers"], dtype=np.int64)
        energy = fr["energy"]
        if energy is not None and not np.isfinite(energy):
            raise DataError(f"{label}: frame {k}: energy is {energy}")
        if is_isolated_atom(numbers, fr["config_type"], fr["pbc"]):
            if energy is not None:
                typed = is_isolated_atom(numbers, fr["config_type"], strict_type=True)
                m.isolated.append([k, int(numbers[0]) if len(numbers) == 1 else -len(numbers), energy, typed])
            continue
        n = len(numbers)
        m.n_frames += 1
        m.n_atoms += n
        c = np.bincount(numbers, minlength=NZ).astype(np.float64)
        m.species_mask |= c > 0
        if energy is not None:
            rows_ata.append(c)
            m.atb += c * energy
            rows_v.append(np.concatenate([[energy / n], c / n]))
        if fr["forces"] is not None:
            f = np.asarray(fr["forces"], dtype=np.float64)
            if not np.all(np.isfinite(f)):
                raise DataError(f"{label}: frame {k}: non-finite forces")
            m.force_sq += float((f * f).sum())
            m.force_count += f.size
        if fr["stress"] is not None:
            m.n_stress += 1
        _, j, _ = dataset.frame_edges(fr)
        cnt = np.bincount(np.asarray(j, dtype=np.int64), minlength=n)
        cnt = cnt[cnt > 0]
        m.nb_edges += int(cnt.sum())
        m.nb_atoms += len(cnt)
        if len(rows_v) >= _BLOCK:
            flush()
    flush()
    return m


def content_hash(path, _bufsize: int = 1 << 20) -> str:
    """BLAKE2b (128-bit) of the file's bytes."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while chunk := fh.read(_bufsize):
            h.update(chunk)
    return h.hexdigest()


def _cutoff_key(r_max: float) -> str:
    return f"{float(r_max):.10g}"


def file_moments(path, r_max: float, log=print) -> FrameMoments:
    """Moments of one dataset file (LMDB or HDF5) at cutoff ``r_max``: from the cache beside it when its
    content hash and cutoff match, else one streaming pass (then cached)."""
    from mlpot.data.dataset import LazyDataset
    from mlpot.fileio import atomic_write_text

    path = Path(path)
    cache = path.with_name(path.name + CACHE_SUFFIX)
    st = os.stat(path)
    stamp = [st.st_size, st.st_mtime_ns]
    doc = None
    if cache.exists():
        try:
            doc = json.loads(cache.read_text())
            if doc.get("format") != CACHE_FORMAT or doc.get("version") != CACHE_VERSION:
                doc = None
        except (OSError, json.JSONDecodeError):
            doc = None  # a damaged cache is recomputed, never trusted
    digest = doc["content_hash"] if doc is not None and doc.get("stamp") == stamp else content_hash(path)
    if doc is None or doc.get("content_hash") != digest:
        doc = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "file": path.name, "content_hash": digest,
               "stamp": stamp, "moments": {}}
    key = _cutoff_key(r_max)
    if key in doc["moments"]:
        try:
            return FrameMoments.from_json(doc["moments"][key])
        except (KeyError, TypeError, ValueError, IndexError):
            pass  # recomputed below
    ds = LazyDataset(path, cutoff=r_max)
    try:
        m = _scan(ds, str(path))
    finally:
        ds.close()
    doc["stamp"] = stamp
    doc["moments"][key] = m.to_json()
    try:
        atomic_write_text(cache, json.dumps(doc) + "\n")
        log(f"statistics of {path} (r_max {r_max:g}): one pass over {len(ds)} frames, cached in {cache}")
    except OSError as exc:
        log(f"statistics of {path}: could not write the cache {cache} ({exc}); they will be recomputed next time")
    return m


def finalize_statistics(m: FrameMoments, e0s="fit", species=None):
    """A :class:`~mlpot.data.statistics.DatasetStatistics` from moments; ``e0s`` is ``"fit"``
    (least squares over the non-isolated frames) or a dict Z -> eV."""
    from mlpot.data.statistics import DatasetStatistics

    zs = m.species() if species is None else [int(z) for z in species]
    if isinstance(e0s, dict):
        e0 = {int(k): float(v) for k, v in e0s.items()}
        source = "given"
    elif e0s in ("fit", "average", "auto"):
        if m.n_energy == 0:
            raise DataError("fit_e0s: no configuration with an energy")
        idx = np.asarray(zs, dtype=np.int64)
        sol, *_ = np.linalg.lstsq(m.ata[np.ix_(idx, idx)], m.atb[idx], rcond=None)
        e0 = {z: float(v) for z, v in zip(zs, sol)}
        source = "fit"
    else:
        raise DataError(f"unknown e0s option {e0s!r} (fit or a dict)")
    missing = [z for z in m.species() if z not in e0]
    if missing:
        raise DataError(f"no E0 for element Z={missing[0]} (E0s given for {sorted(e0)})")
    a = np.zeros(NZ + 1)
    a[0] = 1.0
    for z, v in e0.items():
        if 0 <= z < NZ:
            a[1 + z] = -v
    mean = float(a @ m.v_mean) if m.n_energy else 0.0
    var = float(a @ m.v_m2 @ a) / (m.n_energy - 1) if m.n_energy > 1 else 0.0
    return DatasetStatistics(
        r_max=float(m.r_max),
        e0s=e0,
        e0s_source=source,
        avg_num_neighbors=float(m.nb_edges / m.nb_atoms) if m.nb_atoms else 0.0,
        mean_interaction_energy=mean,
        std_interaction_energy=float(np.sqrt(max(var, 0.0))),
        forces_rms=float(np.sqrt(m.force_sq / m.force_count)) if m.force_count else 0.0,
        num_configs=m.n_frames,
        num_atoms=m.n_atoms,
        species=sorted(set(m.species()) | set(e0)),
    )
