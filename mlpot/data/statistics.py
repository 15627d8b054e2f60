"""Dataset statistics used to set up a model: E0s, average number of neighbours, scale/shift.

Definitions follow mace-torch, so the numbers match what its users know:

* **E0s by least squares** (``fit_e0s``, mace ``compute_average_E0s``): with ``A[c, s]`` the
  number of atoms of species ``s`` in configuration ``c`` and ``E[c]`` its energy,
  ``E0 = argmin ||A E0 - E||^2`` (``numpy.linalg.lstsq``).
* **E0s of single-composition data** (``single_composition_e0s``): when every configuration
  has the same composition up to a factor (all rMD17 sets, an MD run of one molecule), the
  count matrix ``A`` has rank 1 and E0 per element is not identifiable: only ``sum_s A[c, s]
  E0[s]`` is. Then every element gets the mean energy per atom, ``E0[s] = mean_c E[c] / N[c]``
  (the mean energy per structure spread over its atoms); ``compute_statistics`` uses this in
  place of least squares, with ``e0s_source = "single_composition"`` and a note that says so.
* **E0s from isolated atoms** (``e0s_from_isolated_atoms``): energies of frames whose
  ``config_type`` is ``"IsolatedAtom"`` (any case, ``"isolated_atom"`` too) or, when there
  are none, of single-atom non-periodic frames.
* **Average number of neighbours** (mace ``compute_avg_num_neighbors``): the mean over atoms
  of the number of edges ``j -> i`` received within ``r_max``; as in mace, atoms with no
  neighbour at all are left out of the mean.
* **Interaction energy per atom**: ``e_c = (E_c - sum_{a in c} E0[Z_a]) / N_c``;
  ``mean`` is its average over configurations, ``std`` its standard deviation (``ddof=1``,
  as mace's ``scatter_std``) — mace ``compute_mean_std_atomic_inter_energy``.
* **Force RMS**: ``sqrt(mean over all force components of F^2)`` — mace
  ``compute_mean_rms_energy_forces``.

``data`` is a list of ``ase.Atoms`` (targets in ``atoms.calc``), a :class:`LazyDataset` or
any dataset of graph dicts. Only configurations with an energy enter energy statistics, only
those with forces the force RMS. Results can be saved to JSON and loaded back, so statistics
of a large dataset are computed once.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator

import numpy as np

from mlpot.errors import DataError

__all__ = [
    "DatasetStatistics",
    "avg_num_neighbors",
    "compute_statistics",
    "e0s_from_isolated_atoms",
    "fit_e0s",
    "is_isolated_atom",
    "single_composition_e0s",
    "mean_rms_energy_forces",
    "mean_std_interaction_energy",
]

ISOLATED_TYPES = {"isolatedatom", "isolated_atom", "isolated"}


def is_isolated_atom(numbers, config_type: str | None, pbc=None, strict_type: bool = False) -> bool:
    ct = (config_type or "").lower()
    if ct in ISOLATED_TYPES or ct.replace("_", "") == "isolatedatom":
        return True
    if strict_type:
        return False
    return len(numbers) == 1 and (pbc is None or not np.any(pbc))


def _records(data, need_edges: bool = False, r_max: float | None = None) -> Iterator[dict]:
    """Uniform per-structure view: numbers, energy, forces, config_type, pbc, receivers."""
    from ase import Atoms

    if isinstance(data, Atoms):
        data = [data]
    if hasattr(data, "atoms_list"):  # AtomicDataset: use its structures (no graph building)
        if r_max is None:
            r_max = getattr(data, "cutoff", None)
        data = data.atoms_list
    if hasattr(data, "frame") and hasattr(data, "stored_cutoff"):  # LazyDataset
        for k in range(len(data)):
            if need_edges:
                g = data[k]
                yield _graph_record(g)
            else:
                fr = data.frame(k)
                yield {
                    "numbers": np.asarray(fr["numbers"]),
                    "energy": fr["energy"],
                    "forces": fr["forces"],
                    "config_type": fr["config_type"],
                    "pbc": fr["pbc"],
                }
        return
    for k, item in enumerate(data):
        if isinstance(item, Atoms):
            res = item.calc.results if item.calc is not None else {}
            rec = {
                "numbers": np.asarray(item.numbers),
                "energy": res.get("energy"),
                "forces": res.get("forces"),
                "config_type": item.info.get("config_type", "Default"),
                "pbc": np.asarray(item.pbc),
            }
            if need_edges:
                from mlpot.data.neighbors import neighbor_list

                if r_max is None:
                    raise DataError("r_max is needed for the neighbour statistics")
                _, j, _ = neighbor_list(item.positions, r_max, item.cell.array, item.pbc)
                rec["receivers"] = j.numpy()
            yield rec
        elif isinstance(item, dict):
            yield from _split_graph(item)
        else:
            raise DataError(f"statistics: item {k} is neither ase.Atoms nor a graph dict ({type(item)})")


def _graph_record(g) -> dict:
    recs = list(_split_graph(g))
    return recs[0]


def _split_graph(g) -> Iterator[dict]:
    ptr = g["ptr"].tolist()
    ei = g["edge_index"]
    ew = g.get("energy_weight")
    for b in range(len(ptr) - 1):
        a0, a1 = ptr[b], ptr[b + 1]
        energy = None
        if "energy" in g and (ew is None or float(ew[b]) > 0):
            energy = float(g["energy"][b])
        forces = None
        fw = g.get("forces_weight")
        if "forces" in g and (fw is None or float(fw[b]) > 0):
            forces = g["forces"][a0:a1].numpy()
        j = ei[1]
        mask = (j >= a0) & (j < a1)
        yield {
            "numbers": g["atomic_numbers"][a0:a1].numpy(),
            "energy": energy,
            "forces": forces,
            "config_type": g["config_type"][b],
            "pbc": g["pbc"][b].numpy(),
            "receivers": (j[mask] - a0).numpy(),
        }


def fit_e0s(data, species=None, exclude_isolated: bool = False) -> dict[int, float]:
    """Least-squares E0 per element (eV): ``argmin_E0 ||A E0 - E||``, ``A[c, s]`` = count of
    species ``s`` in configuration ``c``. ``species`` defaults to all elements present."""
    rows, energies, seen = [], [], set()
    recs = [r for r in _records(data) if r["energy"] is not None]
    if exclude_isolated:
        recs = [r for r in recs if not is_isolated_atom(r["numbers"], r["config_type"], r["pbc"])]
    for r in recs:
        seen.update(int(z) for z in r["numbers"])
    zs = sorted(seen) if species is None else [int(z) for z in species]
    if not recs:
        raise DataError("fit_e0s: no configuration with an energy")
    index = {z: k for k, z in enumerate(zs)}
    for r in recs:
        counts = np.zeros(len(zs))
        for z in r["numbers"]:
            if int(z) not in index:
                raise DataError(f"fit_e0s: element Z={int(z)} is not in species {zs}")
            counts[index[int(z)]] += 1
        rows.append(counts)
        energies.append(r["energy"])
    A = np.asarray(rows)
    E = np.asarray(energies)
    e0, *_ = np.linalg.lstsq(A, E, rcond=None)
    return {z: float(e0[index[z]]) for z in zs}


def single_composition_e0s(data, species=None, exclude_isolated: bool = True) -> dict[int, float] | None:
    """``{Z: mean_c E[c] / N[c]}`` for every element when all configurations with an energy have
    one composition up to a factor (rank-1 count matrix) and more than one element; else None
    (least squares is then well posed, or a single element already is)."""
    recs = [r for r in _records(data) if r["energy"] is not None]
    if exclude_isolated:
        recs = [r for r in recs if not is_isolated_atom(r["numbers"], r["config_type"], r["pbc"])]
    if not recs:
        return None
    zs = sorted({int(z) for r in recs for z in r["numbers"]} | set(int(z) for z in (species or ())))
    if len(zs) < 2:
        return None
    index = {z: k for k, z in enumerate(zs)}
    A = np.zeros((len(recs), len(zs)))
    for c, r in enumerate(recs):
        for z in r["numbers"]:
            A[c, index[int(z)]] += 1
    fractions = A / A.sum(axis=1, keepdims=True)
    if not np.allclose(fractions, fractions[0], rtol=0.0, atol=1e-12) or np.count_nonzero(fractions[0]) < 2:
        return None
    if species is not None and any(fractions[0, index[int(z)]] == 0 for z in species):
        return None  # an element absent from the data: nothing to spread over it
    per_atom = float(np.mean([r["energy"] / len(r["numbers"]) for r in recs]))
    return {z: per_atom for z in zs}


def describe_e0s(source: str, e0s: dict) -> str:
    """One line for the log that says how the E0s were chosen when that is not obvious."""
    if source != "single_composition":
        return ""
    value = next(iter(e0s.values()))
    return (f"E0s: the training set has a single composition, so E0s per element are not identifiable; "
            f"every element gets the mean energy per structure spread over its atoms, {value:.6g} eV/atom")


def e0s_from_isolated_atoms(data) -> dict[int, float]:
    """E0s from isolated-atom frames (``config_type`` IsolatedAtom, or single-atom frames)."""
    recs = [r for r in _records(data) if r["energy"] is not None]
    typed = [r for r in recs if is_isolated_atom(r["numbers"], r["config_type"], strict_type=True)]
    chosen = typed or [r for r in recs if is_isolated_atom(r["numbers"], r["config_type"], r["pbc"])]
    out: dict[int, float] = {}
    for r in chosen:
        if len(r["numbers"]) != 1:
            raise DataError(f"isolated-atom frame with {len(r['numbers'])} atoms (config_type {r['config_type']})")
        out[int(r["numbers"][0])] = float(r["energy"])
    if not out:
        raise DataError("no isolated-atom frames (config_type IsolatedAtom or single-atom frames)")
    return out


def _e0_sum(numbers, e0s: dict) -> float:
    try:
        return float(sum(e0s[int(z)] for z in numbers))
    except KeyError as exc:
        raise DataError(f"no E0 for element Z={exc.args[0]} (E0s given for {sorted(e0s)})") from None


def mean_std_interaction_energy(data, e0s: dict) -> tuple[float, float]:
    """Mean and std (ddof=1) over configurations of ``(E - sum E0) / N`` (eV/atom)."""
    vals = [(r["energy"] - _e0_sum(r["numbers"], e0s)) / len(r["numbers"])
            for r in _records(data) if r["energy"] is not None]
    if not vals:
        raise DataError("no configuration with an energy")
    v = np.asarray(vals)
    std = float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
    return float(v.mean()), std


def mean_rms_energy_forces(data, e0s: dict) -> tuple[float, float]:
    """(mean interaction energy per atom, RMS of force components) as mace computes them."""
    evals, sq, cnt = [], 0.0, 0
    for r in _records(data):
        if r["energy"] is not None:
            evals.append((r["energy"] - _e0_sum(r["numbers"], e0s)) / len(r["numbers"]))
        if r["forces"] is not None:
            f = np.asarray(r["forces"], dtype=float)
            sq += float((f * f).sum())
            cnt += f.size
    mean = float(np.mean(evals)) if evals else 0.0
    rms = float(np.sqrt(sq / cnt)) if cnt else 0.0
    return mean, rms


def avg_num_neighbors(data, r_max: float | None = None) -> float:
    """Mean number of neighbours within ``r_max`` (graphs: their own edges), over atoms with
    at least one neighbour (mace's definition)."""
    total, n = 0, 0
    for r in _records(data, need_edges=True, r_max=r_max):
        counts = np.bincount(np.asarray(r["receivers"], dtype=np.int64), minlength=len(r["numbers"]))
        counts = counts[counts > 0]
        total += int(counts.sum())
        n += len(counts)
    return float(total / n) if n else 0.0


@dataclasses.dataclass
class DatasetStatistics:
    """Statistics of a dataset (eV, Å). ``e0s`` maps atomic number -> E0."""

    r_max: float
    e0s: dict
    e0s_source: str
    avg_num_neighbors: float
    mean_interaction_energy: float
    std_interaction_energy: float
    forces_rms: float
    num_configs: int
    num_atoms: int
    species: list
    e0s_note: str = ""

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["e0s"] = {str(k): v for k, v in self.e0s.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DatasetStatistics:
        d = dict(d)
        d["e0s"] = {int(k): float(v) for k, v in d["e0s"].items()}
        return cls(**d)

    def save(self, path) -> None:
        from mlpot.fileio import atomic_open

        with atomic_open(path, "w") as fh:
            json.dump(self.to_dict(), fh, indent=2)

    @classmethod
    def load(cls, path) -> DatasetStatistics:
        try:
            with open(path) as fh:
                return cls.from_dict(json.load(fh))
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise DataError(f"{path}: not a statistics file: {exc}") from exc


def compute_statistics(data, r_max: float, e0s="auto", species=None) -> DatasetStatistics:
    """All statistics at once. ``e0s``: ``"fit"`` (least squares), ``"isolated"`` (isolated-atom
    frames), ``"auto"`` (isolated when such frames exist, else fit) or a dict Z -> eV.
    Isolated-atom frames are left out of the neighbour/energy/force statistics."""
    from ase import Atoms

    if isinstance(data, Atoms):
        data = [data]
    has_iso = any(
        r["energy"] is not None and is_isolated_atom(r["numbers"], r["config_type"], r["pbc"])
        for r in _records(data)
    )
    if isinstance(e0s, dict):
        e0 = {int(k): float(v) for k, v in e0s.items()}
        source = "given"
    elif e0s == "isolated" or (e0s == "auto" and has_iso):
        e0 = e0s_from_isolated_atoms(data)
        source = "isolated"
    elif e0s in ("fit", "auto", "average"):
        e0 = single_composition_e0s(data, species)
        source = "single_composition"
        if e0 is None:
            e0 = fit_e0s(data, species, exclude_isolated=True)
            source = "fit"
    else:
        raise DataError(f"unknown e0s option {e0s!r} (fit, isolated, auto or a dict)")

    # statistics on the non-isolated configurations, in one pass
    evals, sq, cnt, nb_total, nb_n, n_cfg, n_at, zs = [], 0.0, 0, 0, 0, 0, 0, set()
    for r in _records(data, need_edges=True, r_max=r_max):
        if is_isolated_atom(r["numbers"], r["config_type"], r["pbc"]):
            continue
        n_cfg += 1
        n_at += len(r["numbers"])
        zs.update(int(z) for z in r["numbers"])
        if r["energy"] is not None:
            evals.append((r["energy"] - _e0_sum(r["numbers"], e0)) / len(r["numbers"]))
        if r["forces"] is not None:
            f = np.asarray(r["forces"], dtype=float)
            sq += float((f * f).sum())
            cnt += f.size
        c = np.bincount(np.asarray(r["receivers"], dtype=np.int64), minlength=len(r["numbers"]))
        c = c[c > 0]
        nb_total += int(c.sum())
        nb_n += len(c)
    ev = np.asarray(evals)
    return DatasetStatistics(
        r_max=float(r_max),
        e0s=e0,
        e0s_source=source,
        avg_num_neighbors=float(nb_total / nb_n) if nb_n else 0.0,
        mean_interaction_energy=float(ev.mean()) if len(ev) else 0.0,
        std_interaction_energy=float(ev.std(ddof=1)) if len(ev) > 1 else 0.0,
        forces_rms=float(np.sqrt(sq / cnt)) if cnt else 0.0,
        num_configs=n_cfg,
        num_atoms=n_at,
        species=sorted(zs | set(e0)),
        e0s_note=describe_e0s(source, e0),
    )
