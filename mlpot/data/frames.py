"""A frame: one labelled structure as a dict of numpy arrays, the record every on-disk dataset
format stores (HDF5 in :mod:`mlpot.data.hdf5`, LMDB in :mod:`mlpot.data.lmdb_store`).

Keys and units (``n`` atoms; absent targets are ``None``):

==================  ==================  ============================================
key                 value               meaning
==================  ==================  ============================================
``positions``       (n, 3) float64      Å
``numbers``         (n,) int64          atomic numbers
``cell``            (3, 3) float64      rows are lattice vectors
``pbc``             (3,) bool
``energy``          float or None       eV
``forces``          (n, 3) or None      eV/Å
``stress``          (6,) or None        eV/Å^3, ASE Voigt order and sign
``hessian``         (9 n^2,) or None    eV/Å², the (3n, 3n) Hessian flattened
``weight`` ...      float               ``weight``, ``energy_weight``, ``forces_weight``, ``stress_weight``
``config_type``     str
``edges``           (i, j, S)           only when stored: neighbour pairs local to the frame
                                        and periodic shifts, ``D = pos[j] - pos[i] + S @ cell``
==================  ==================  ============================================

A format module only lays these arrays out on disk; the conversion from and to ``ase.Atoms``
(:func:`atoms_to_frame`, :func:`frame_to_atoms`), the validation of what was read
(:func:`check_frame`) and the graph (:func:`mlpot.data.graph.frame_to_graph`) are shared.
"""
from __future__ import annotations

import numpy as np

from mlpot.errors import DataError
from mlpot.voigt import as_voigt

__all__ = ["WEIGHT_KEYS", "atoms_to_frame", "frame_to_atoms", "check_frame"]

WEIGHT_KEYS = ("weight", "energy_weight", "forces_weight", "stress_weight")


def atoms_to_frame(atoms, cutoff: float | None = None) -> dict:
    """The frame of an ``ase.Atoms`` with its targets in ``atoms.calc`` (as from
    :func:`mlpot.data.read`); with ``cutoff`` (Å) its neighbour list under ``edges``.
    A weight absent from ``atoms.info`` is 1, or 0 for a target the frame lacks."""
    res = dict(atoms.calc.results) if atoms.calc is not None else {}
    info = atoms.info
    e, fr, s, hs = (res.get(k) for k in ("energy", "forces", "stress", "hessian"))
    out = {
        "positions": np.asarray(atoms.positions, dtype=np.float64),
        "numbers": np.asarray(atoms.numbers, dtype=np.int64),
        "cell": np.asarray(atoms.cell.array, dtype=np.float64),
        "pbc": np.asarray(atoms.pbc, dtype=bool).reshape(3),
        "energy": None if e is None else float(e),
        "forces": None if fr is None else np.asarray(fr, dtype=np.float64).reshape(len(atoms), 3),
        "stress": None if s is None else as_voigt(np.asarray(s, dtype=np.float64)),
        "hessian": None if hs is None else np.asarray(hs, dtype=np.float64).reshape(-1),
        "config_type": str(info.get("config_type", "Default")),
    }
    for k in WEIGHT_KEYS:
        target = {"energy_weight": e, "forces_weight": fr, "stress_weight": s}.get(k, 0)
        out[k] = float(info.get(k, 0.0 if target is None else 1.0))
    if cutoff is not None:
        from mlpot.data.neighbors import neighbor_list

        i, j, S = neighbor_list(atoms.positions, cutoff, atoms.cell.array, atoms.pbc)
        out["edges"] = (i.numpy().astype(np.int64), j.numpy().astype(np.int64), S.numpy().astype(np.int64))
    return out


def frame_to_atoms(fr: dict):
    """``ase.Atoms`` of a frame, the targets in a ``SinglePointCalculator``, the weights and
    config_type in ``atoms.info``."""
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator

    atoms = Atoms(numbers=fr["numbers"], positions=fr["positions"], cell=fr["cell"], pbc=fr["pbc"])
    res = {k: fr[k] for k in ("energy", "forces", "stress", "hessian") if fr.get(k) is not None}
    if res:
        calc = SinglePointCalculator(atoms)
        calc.results.update(res)
        atoms.calc = calc
    atoms.info["config_type"] = fr["config_type"]
    for key in WEIGHT_KEYS:
        atoms.info[key] = fr[key]
    return atoms


def check_frame(fr: dict, label: str, k: int) -> dict:
    """``fr`` if its numbers are finite and its shapes agree, else a :class:`DataError` naming
    file ``label`` and frame ``k`` (a damaged or hand-made dataset file is caught where it is
    read, not as a NaN loss later)."""
    n = len(fr["numbers"])
    shapes = {"positions": (n, 3), "cell": (3, 3), "forces": (n, 3), "stress": (6,)}
    for key, shape in shapes.items():
        v = fr.get(key)
        if v is None:
            continue
        if np.shape(v) != shape:
            raise DataError(f"{label}: frame {k}: {key} has shape {np.shape(v)}, expected {shape}")
        if not np.all(np.isfinite(v)):
            raise DataError(f"{label}: frame {k}: {key} not finite (NaN or inf)")
    e = fr.get("energy")
    if e is not None and not np.isfinite(e):
        raise DataError(f"{label}: frame {k}: energy is not finite ({e})")
    h = fr.get("hessian")
    if h is not None and not np.all(np.isfinite(h)):
        raise DataError(f"{label}: frame {k}: hessian not finite (NaN or inf)")
    return fr
