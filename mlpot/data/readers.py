"""Readers: files and objects -> ``list[ase.Atoms]`` with targets in eV, Å, eV/Å, eV/Å^3.

Every structure comes back the way ASE itself stores labelled data: energy, forces and stress
live in a :class:`~ase.calculators.singlepoint.SinglePointCalculator` (``atoms.calc.results``;
stress in ASE Voigt order xx, yy, zz, yz, xz, xy and ASE sign, ``stress = (1/V) dE/dstrain``).
Metadata go into ``atoms.info``: ``config_type`` (str, default ``"Default"``) and the
per-config weights ``weight``, ``energy_weight``, ``forces_weight``, ``stress_weight``
(default 1; 0 when the target is absent).

Formats (chosen from the suffix, or ``format=``):

``extxyz`` / ``xyz`` and every other ASE format (``.traj``, ``.db``, ``.cif``, ...)
    targets are taken, in order, from the explicit ``energy_key=`` / ``forces_key=`` /
    ``stress_key=``, from ``atoms.calc.results`` (where ASE >= 3.23 puts ``energy=`` and
    ``forces``), then from ``info``/``arrays`` under ``REF_energy``/``REF_forces``/
    ``REF_stress`` (MACE convention), then ``energy``/``forces``/``stress``. A virial
    ``W`` (``REF_virials``/``virials``/``virial``, eV) becomes ``stress = -W / V``.
``npz`` (rMD17 / sGDML)
    keys ``nuclear_charges``, ``coords``, ``energies``, ``forces`` (rMD17) or ``z``, ``R``,
    ``E``, ``F`` (sGDML). These files are in kcal/mol and kcal/mol/Å: the default
    ``energy_unit`` for npz is ``"kcal/mol"`` (1 kcal/mol = 0.0433641 eV); pass
    ``energy_unit="eV"`` for npz files already in eV.
``mlearn`` (``.json``, list of ``{"structure", "outputs": {"energy", "forces", "virial_stress"}}``)
    ``virial_stress`` is VASP's stress: kbar, order xx yy zz xy yz zx and the opposite sign
    to ASE (positive = compressed). Converted as
    ``stress_ase[voigt] = -0.1 GPa/kbar * virial_stress[0, 1, 2, 4, 5, 3]``. (Checked on the
    Si elastic set: ``sigma_xx = (a/V) dE/da`` by finite differences matches this sign.)
pymatgen ``Structure`` objects: :func:`from_pymatgen`.

A Hessian target (extxyz ``info["REF_hessian"]``, npz ``hessians``, HDF5 ``hessian``) is read
into ``calc.results["hessian"]`` as ``(3n, 3n)`` eV/Å² and checked (:mod:`mlpot.data.hessians`).

Bad input raises :class:`~mlpot.errors.DataError` naming the file, the frame index and the
problem: NaN/inf positions, cells, targets or weights, unknown element, missing required
target, forces shape mismatch, singular cell with periodic boundaries, empty structure, and
two atoms closer than ``min_distance`` (default :data:`MIN_DISTANCE` = 0.1 Å, periodic
images included; 0 switches the check off).
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from ase import Atoms, units
from ase.calculators.singlepoint import SinglePointCalculator

from mlpot.data.cell import is_singular_cell
from mlpot.errors import DataError, UnknownElementError
from mlpot.voigt import as_full_3x3 as _to_3x3
from mlpot.voigt import as_voigt as _to_voigt
from mlpot.voigt import full_3x3_to_voigt, vasp_order_to_voigt

__all__ = [
    "ENERGY_UNITS",
    "KCAL_MOL",
    "LENGTH_UNITS",
    "STRESS_UNITS",
    "MIN_DISTANCE",
    "check_xyz_counts",
    "closest_pair",
    "from_pymatgen",
    "iread",
    "read",
    "validate_atoms",
]

#: 1 kcal/mol in eV (ASE's CODATA value, 0.0433641 eV).
KCAL_MOL = units.kcal / units.mol

ENERGY_UNITS = {
    "ev": 1.0,
    "mev": 1e-3,
    "kcal/mol": KCAL_MOL,
    "kj/mol": units.kJ / units.mol,
    "hartree": units.Hartree,
    "ha": units.Hartree,
    "ry": units.Rydberg,
    "rydberg": units.Rydberg,
}
LENGTH_UNITS = {"a": 1.0, "å": 1.0, "ang": 1.0, "angstrom": 1.0, "bohr": units.Bohr, "nm": 10.0}
STRESS_UNITS = {
    "ev/a^3": 1.0,
    "ev/å^3": 1.0,
    "ev/ang^3": 1.0,
    "gpa": units.GPa,
    "kbar": 0.1 * units.GPa,
    "bar": 1e-4 * units.GPa,
}

ENERGY_KEYS = ("REF_energy", "energy", "Energy", "total_energy")
FORCES_KEYS = ("REF_forces", "forces", "force", "Forces")
STRESS_KEYS = ("REF_stress", "stress", "Stress")
VIRIAL_KEYS = ("REF_virials", "virials", "virial", "REF_virial")
WEIGHT_KEYS = {
    "weight": ("config_weight", "weight"),
    "energy_weight": ("config_energy_weight", "energy_weight"),
    "forces_weight": ("config_forces_weight", "forces_weight"),
    "stress_weight": ("config_stress_weight", "stress_weight", "config_virials_weight"),
}
KNOWN_FORMATS = ("extxyz", "npz", "mlearn", "ase")

#: Atoms closer than this (Å) are an error: two atoms on one site make a model's energy and
#: forces meaningless (and a training run NaN).
MIN_DISTANCE = 0.1


def _unit(table: dict, name, kind: str) -> float:
    if name is None:
        return 1.0
    if isinstance(name, (int, float)):
        return float(name)
    key = str(name).strip().lower().replace(" ", "").replace("angstrom", "a").replace("å", "a")
    key = key.replace("**", "^")
    for k, v in table.items():
        if k.replace("angstrom", "a").replace("å", "a").replace("ang", "a") == key.replace("ang", "a"):
            return v
    raise DataError(f"unknown {kind} unit {name!r}; known: {sorted(table)}")


def _guess_format(path: Path) -> str:
    name = path.name.lower()
    if name.endswith((".xyz", ".extxyz")):
        return "extxyz"
    if name.endswith(".npz"):
        return "npz"
    if name.endswith(".json"):
        return "mlearn"
    if name.endswith((".h5", ".hdf5")):
        return "hdf5"
    if name.endswith(".lmdb"):
        return "lmdb"
    return "ase"


def read(
    path,
    format: str | None = None,
    *,
    index: str | int | slice = ":",
    energy_key: str | None = None,
    forces_key: str | None = None,
    stress_key: str | None = None,
    virials_key: str | None = None,
    config_type_key: str = "config_type",
    energy_unit=None,
    length_unit=None,
    stress_unit=None,
    require: Sequence[str] = ("energy",),
    default_config_type: str = "Default",
    min_distance: float = MIN_DISTANCE,
) -> list[Atoms]:
    """Read a file into ``list[ase.Atoms]`` with targets in a SinglePointCalculator.

    ``require`` names targets every frame must have (``"energy"``, ``"forces"``,
    ``"stress"``); a frame without one raises :class:`DataError`. Units: ``energy_unit``
    (``"eV"``, ``"meV"``, ``"kcal/mol"``, ``"kJ/mol"``, ``"Hartree"``, ``"Ry"``),
    ``length_unit`` (``"Å"``, ``"Bohr"``, ``"nm"``), ``stress_unit`` (``"eV/Å^3"``, ``"GPa"``,
    ``"kbar"``); forces are converted with energy/length. Defaults: eV/Å, except npz
    (kcal/mol) and mlearn (kbar, VASP sign).
    """
    return list(
        iread(
            path,
            format,
            index=index,
            energy_key=energy_key,
            forces_key=forces_key,
            stress_key=stress_key,
            virials_key=virials_key,
            config_type_key=config_type_key,
            energy_unit=energy_unit,
            length_unit=length_unit,
            stress_unit=stress_unit,
            require=require,
            default_config_type=default_config_type,
            min_distance=min_distance,
        )
    )


def iread(
    path,
    format: str | None = None,
    *,
    index: str | int | slice = ":",
    energy_key=None,
    forces_key=None,
    stress_key=None,
    virials_key=None,
    config_type_key="config_type",
    energy_unit=None,
    length_unit=None,
    stress_unit=None,
    require: Sequence[str] = ("energy",),
    default_config_type: str = "Default",
    min_distance: float = MIN_DISTANCE,
) -> Iterator[Atoms]:
    """Streaming version of :func:`read` (one frame at a time; for conversion of large files)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    fmt = (format or _guess_format(path)).lower()
    if fmt == "xyz":
        fmt = "extxyz"
    require = tuple(require or ())
    for r in require:
        if r not in ("energy", "forces", "stress"):
            raise DataError(f"unknown required target {r!r} (use energy, forces, stress)")
    if fmt == "npz":
        e_unit = _unit(ENERGY_UNITS, energy_unit if energy_unit is not None else "kcal/mol", "energy")
        l_unit = _unit(LENGTH_UNITS, length_unit, "length")
        frames = _iter_npz(path, e_unit, l_unit, energy_key, forces_key)
    elif fmt == "mlearn":
        e_unit = _unit(ENERGY_UNITS, energy_unit, "energy")
        l_unit = _unit(LENGTH_UNITS, length_unit, "length")
        s_unit = _unit(STRESS_UNITS, stress_unit if stress_unit is not None else "kbar", "stress")
        frames = _iter_mlearn(path, e_unit, l_unit, s_unit)
    elif fmt == "hdf5":
        from mlpot.data.hdf5 import iter_hdf5_atoms

        frames = ((k, a) for k, a in enumerate(iter_hdf5_atoms(path)))
    elif fmt == "lmdb":
        from mlpot.data.lmdb_store import iter_lmdb_atoms

        frames = ((k, a) for k, a in enumerate(iter_lmdb_atoms(path)))
    else:
        e_unit = _unit(ENERGY_UNITS, energy_unit, "energy")
        l_unit = _unit(LENGTH_UNITS, length_unit, "length")
        s_unit = _unit(STRESS_UNITS, stress_unit, "stress")
        frames = _iter_ase(
            path,
            None if fmt in ("ase",) else fmt,
            e_unit,
            l_unit,
            s_unit,
            energy_key,
            forces_key,
            stress_key,
            virials_key,
        )
    selected = _select(frames, index)
    for k, atoms in selected:
        _finish(atoms, k, path, config_type_key, default_config_type)
        validate_atoms(atoms, source=str(path), frame=k, require=require, min_distance=min_distance)
        yield atoms


def _select(frames: Iterable[tuple[int, Atoms]], index):
    if isinstance(index, str):
        if index in (":", ""):
            yield from frames
            return
        parts = index.split(":")
        if len(parts) == 1:
            index = int(parts[0])
        else:
            index = slice(*[int(p) if p else None for p in parts])
    if isinstance(index, int):
        if index >= 0:
            for k, a in frames:
                if k == index:
                    yield k, a
                    return
            raise DataError(f"frame {index} does not exist")
        allf = list(frames)
        yield allf[index]
        return
    if isinstance(index, slice):
        if (index.start or 0) >= 0 and (index.stop is None or index.stop >= 0) and (index.step or 1) > 0:
            start, stop, step = index.start or 0, index.stop, index.step or 1
            for k, a in frames:
                if stop is not None and k >= stop:
                    return
                if k >= start and (k - start) % step == 0:
                    yield k, a
            return
        yield from list(frames)[index]
        return
    raise DataError(f"bad index {index!r}")


# --------------------------------------------------------------------------- ASE formats
def _lookup(atoms: Atoms, explicit, candidates, per_atom: bool):
    """Find a target: explicit key, then calc.results, then info/arrays candidates."""
    results = {}
    if atoms.calc is not None:
        results = getattr(atoms.calc, "results", {}) or {}
    store = atoms.arrays if per_atom else atoms.info
    if explicit is not None:
        for src in (store, results, atoms.info, atoms.arrays):
            if explicit in src:
                return src[explicit]
        return None
    # MACE order: REF_* first, then the plain names; calc.results (where ASE puts `energy=`
    # and `forces`) and info/arrays are searched for each name in turn
    for name in candidates:
        for src in (results, store, atoms.info, atoms.arrays):
            if name in src:
                return src[name]
    return None


def check_xyz_counts(path) -> None:
    """Walk the atom-count lines of an (ext)xyz file; a count larger than the lines left is a
    :class:`DataError` (ASE would skip 10^12 lines past the end of the file, i.e. hang)."""
    from itertools import islice

    with open(path, "rb") as fh:
        frame = 0
        while True:
            line = fh.readline()
            if not line:
                return
            text = line.strip()
            if not text:
                continue  # blank lines between / after frames
            try:
                n = int(text.split()[0])
            except ValueError:
                return  # not a count line: let the parser report it with its own words
            if n < 0:
                raise DataError(f"{path}: frame {frame}: negative atom count {n}")
            # the comment line and n atom lines must follow
            got = sum(1 for _ in islice(fh, n + 1))
            if got < n + 1:
                raise DataError(
                    f"{path}: frame {frame}: the count line says {n} atoms but only {max(got - 1, 0)} "
                    "atom lines follow (truncated file or wrong count)"
                )
            frame += 1


def _iter_ase(path, fmt, e_unit, l_unit, s_unit, energy_key, forces_key, stress_key, virials_key):
    import ase.io

    if fmt in ("extxyz", "xyz") or (fmt is None and path.suffix.lower() in (".xyz", ".extxyz")):
        check_xyz_counts(path)
    try:
        it = ase.io.iread(str(path), index=":", format=fmt)
    except Exception as exc:
        raise DataError(f"{path}: cannot open as {fmt or 'an ASE format'}: {exc}") from exc
    k = 0
    while True:
        try:
            atoms = next(it)
        except StopIteration:
            return
        except DataError:
            raise
        except Exception as exc:
            msg = str(exc)
            if isinstance(exc, KeyError) or "symbol" in msg.lower():
                raise UnknownElementError(
                    f"{path}: frame {k}: cannot parse (unknown element symbol?): {exc!r}"
                ) from exc
            raise DataError(f"{path}: frame {k}: cannot parse: {exc!r}") from exc
        energy = _lookup(atoms, energy_key, ENERGY_KEYS, per_atom=False)
        forces = _lookup(atoms, forces_key, FORCES_KEYS, per_atom=True)
        stress = _lookup(atoms, stress_key, STRESS_KEYS, per_atom=False)
        virials = None
        if stress is None:
            virials = _lookup(atoms, virials_key, VIRIAL_KEYS, per_atom=False)
        hessian = _pop_hessian(atoms)  # mlpot.data.hessians
        for key in set(ENERGY_KEYS + STRESS_KEYS + VIRIAL_KEYS) | {energy_key, stress_key, virials_key}:
            if key is not None:
                atoms.info.pop(key, None)
        for key in set(FORCES_KEYS) | {forces_key}:
            if key is not None and key in atoms.arrays:
                del atoms.arrays[key]
        if l_unit != 1.0:
            atoms.positions *= l_unit
            atoms.cell = atoms.cell.array * l_unit
        results = {}
        try:
            if energy is not None:
                results["energy"] = float(np.asarray(energy, dtype=float).reshape(-1)[0]) * e_unit
            if forces is not None:
                results["forces"] = np.array(forces, dtype=float) * (e_unit / l_unit)
            if stress is not None:
                results["stress"] = _to_voigt(np.array(stress, dtype=float)) * s_unit
            elif virials is not None:
                W = _to_3x3(np.array(virials, dtype=float)) * e_unit
                vol = abs(atoms.get_volume()) if atoms.cell.rank == 3 else 0.0
                if vol <= 0:
                    raise DataError(f"{path}: frame {k}: virials given for a structure without a 3D cell")
                results["stress"] = full_3x3_to_voigt(-W / vol)
            if hessian is not None:
                results["hessian"] = np.asarray(hessian, dtype=float) * (e_unit / l_unit**2)
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"{path}: frame {k}: bad target value: {exc}") from exc
        _attach(atoms, results)
        yield k, atoms
        k += 1


def _pop_hessian(atoms: Atoms):
    """The Hessian target in ``info`` (``REF_hessian`` / ``hessian``), removed from it, or None."""
    from mlpot.data.hessians import HESSIAN_KEYS

    found = None
    for key in HESSIAN_KEYS:
        if key in atoms.info:
            value = atoms.info.pop(key)
            found = value if found is None else found
    return found


def _attach(atoms: Atoms, results: dict) -> None:
    atoms.calc = None
    if results:
        calc = SinglePointCalculator(atoms)
        calc.results.update(results)
        atoms.calc = calc


# --------------------------------------------------------------------------- npz (rMD17)
def _iter_npz(path, e_unit, l_unit, energy_key, forces_key):
    try:
        data = np.load(path)
    except Exception as exc:
        raise DataError(f"{path}: cannot read npz: {exc}") from exc
    keys = set(data.files)
    if {"nuclear_charges", "coords"} <= keys:
        zk, rk, ek, fk = "nuclear_charges", "coords", "energies", "forces"
    elif {"z", "R"} <= keys:
        zk, rk, ek, fk = "z", "R", "E", "F"
    else:
        raise DataError(
            f"{path}: npz needs rMD17 keys (nuclear_charges, coords, energies, forces) or sGDML "
            f"keys (z, R, E, F); found {sorted(keys)}"
        )
    ek = energy_key or ek
    fk = forces_key or fk
    Z = np.asarray(data[zk]).astype(np.int64).reshape(-1)
    R = np.asarray(data[rk], dtype=float)
    if R.ndim == 2:
        R = R[None]
    E = np.asarray(data[ek], dtype=float).reshape(-1) if ek in keys else None
    F = np.asarray(data[fk], dtype=float) if fk in keys else None
    if E is not None and len(E) != len(R):
        raise DataError(f"{path}: {len(E)} energies for {len(R)} frames")
    if F is not None:
        if F.ndim == 2:
            F = F[None]
        if len(F) != len(R):
            raise DataError(f"{path}: {len(F)} force frames for {len(R)} coordinate frames")
    H = np.asarray(data["hessians"], dtype=float) if "hessians" in keys else None
    if H is not None and len(H) != len(R):
        raise DataError(f"{path}: {len(H)} Hessian frames for {len(R)} coordinate frames")
    for k in range(len(R)):
        if R[k].shape != (len(Z), 3):
            raise DataError(f"{path}: frame {k}: coords shape {R[k].shape} != ({len(Z)}, 3)")
        _check_numbers(Z, path, k)
        atoms = Atoms(numbers=Z, positions=R[k] * l_unit, pbc=False)
        results = {}
        if E is not None:
            results["energy"] = float(E[k]) * e_unit
        if F is not None:
            if F[k].shape != (len(Z), 3):
                raise DataError(f"{path}: frame {k}: forces shape {F[k].shape} != ({len(Z)}, 3)")
            results["forces"] = F[k] * (e_unit / l_unit)
        if H is not None:
            results["hessian"] = H[k] * (e_unit / l_unit**2)
        _attach(atoms, results)
        yield k, atoms


# --------------------------------------------------------------------------- mlearn JSON
def _iter_mlearn(path, e_unit, l_unit, s_unit):
    from pymatgen.core import Structure

    try:
        with open(path) as fh:
            items = json.load(fh)
    except Exception as exc:
        raise DataError(f"{path}: cannot read JSON: {exc}") from exc
    if isinstance(items, dict):
        items = [items]
    for k, item in enumerate(items):
        if not isinstance(item, dict) or "structure" not in item:
            raise DataError(f"{path}: frame {k}: not an mlearn record (needs 'structure' and 'outputs')")
        try:
            st = Structure.from_dict(item["structure"])
        except Exception as exc:
            if "symbol" in str(exc).lower() or isinstance(exc, (KeyError, ValueError)):
                raise UnknownElementError(f"{path}: frame {k}: bad structure (unknown element?): {exc}") from exc
            raise DataError(f"{path}: frame {k}: bad structure: {exc}") from exc
        atoms = _structure_to_atoms(st)
        if l_unit != 1.0:
            atoms.positions *= l_unit
            atoms.cell = atoms.cell.array * l_unit
        out = item.get("outputs", {}) or {}
        results = {}
        try:
            if out.get("energy") is not None:
                results["energy"] = float(out["energy"]) * e_unit
            if out.get("forces") is not None:
                results["forces"] = np.asarray(out["forces"], dtype=float) * (e_unit / l_unit)
            vs = out.get("virial_stress", out.get("stress"))
            if vs is not None:
                vs = np.asarray(vs, dtype=float).reshape(-1)
                if vs.size == 6:
                    results["stress"] = -vasp_order_to_voigt(vs) * s_unit
                else:
                    results["stress"] = full_3x3_to_voigt(-vs.reshape(3, 3) * s_unit)
        except Exception as exc:
            raise DataError(f"{path}: frame {k}: bad outputs: {exc}") from exc
        _attach(atoms, results)
        for name in ("group", "tag", "description"):
            if name in item:
                atoms.info[f"mlearn_{name}"] = item[name]
        if "group" in item and "config_type" not in atoms.info:
            atoms.info["config_type"] = str(item["group"])
        yield k, atoms


def _structure_to_atoms(st) -> Atoms:
    numbers = []
    for site in st:
        sp = site.specie if site.is_ordered else None
        if sp is None:
            raise DataError("disordered sites are not supported")
        numbers.append(int(getattr(sp, "Z", 0)))
    return Atoms(numbers=numbers, positions=st.cart_coords, cell=st.lattice.matrix, pbc=True)


def from_pymatgen(
    structures,
    energies=None,
    forces=None,
    stresses=None,
    *,
    stress_unit=None,
    config_type: str = "Default",
    require: Sequence[str] = (),
) -> list[Atoms]:
    """pymatgen ``Structure`` (or ``Molecule``) objects -> ``list[ase.Atoms]``.

    ``energies`` (eV), ``forces`` (eV/Å, per structure (N, 3)) and ``stresses`` (ASE sign;
    Voigt 6 or 3x3, in ``stress_unit``, default eV/Å^3) are optional sequences aligned with
    ``structures``. Structures are periodic in 3D, molecules are not.
    """
    from pymatgen.core import Molecule, Structure

    s_unit = _unit(STRESS_UNITS, stress_unit, "stress")
    if isinstance(structures, (Structure, Molecule)):
        structures = [structures]
    out = []
    for k, st in enumerate(structures):
        try:
            if isinstance(st, Structure):
                atoms = _structure_to_atoms(st)
            else:
                atoms = Atoms(
                    numbers=[int(s.specie.Z) for s in st], positions=st.cart_coords, pbc=False
                )
        except DataError as exc:
            raise DataError(f"pymatgen structure {k}: {exc}") from exc
        results = {}
        if energies is not None and energies[k] is not None:
            results["energy"] = float(energies[k])
        if forces is not None and forces[k] is not None:
            results["forces"] = np.asarray(forces[k], dtype=float)
        if stresses is not None and stresses[k] is not None:
            results["stress"] = _to_voigt(np.asarray(stresses[k], dtype=float)) * s_unit
        _attach(atoms, results)
        _finish(atoms, k, "pymatgen structures", "config_type", config_type)
        validate_atoms(atoms, source="pymatgen structures", frame=k, require=require)
        out.append(atoms)
    return out


# --------------------------------------------------------------------------- checks
def _finish(atoms: Atoms, k, path, config_type_key, default_config_type):
    info = atoms.info
    ct = info.pop(config_type_key, None) if config_type_key != "config_type" else info.get("config_type")
    if ct is None:
        ct = info.get("config_type", default_config_type)
    info["config_type"] = str(ct)
    results = atoms.calc.results if atoms.calc is not None else {}
    for canon, keys in WEIGHT_KEYS.items():
        val = None
        for key in keys:
            if key in info:
                val = info.pop(key)
        try:
            val = 1.0 if val is None else float(val)
        except (TypeError, ValueError) as exc:
            raise DataError(f"{path}: frame {k}: weight {canon!r} is not a number: {val!r}") from exc
        if not math.isfinite(val) or val < 0:
            raise DataError(f"{path}: frame {k}: weight {canon!r} must be finite and >= 0, got {val}")
        target = {"energy_weight": "energy", "forces_weight": "forces", "stress_weight": "stress"}.get(canon)
        if target is not None and target not in results:
            val = 0.0
        info[canon] = val


def _check_numbers(Z, source, frame):
    Z = np.asarray(Z)
    bad = (Z < 1) | (Z > 118)
    if bad.any():
        raise UnknownElementError(
            f"{source}: frame {frame}: unknown element (atomic number {int(Z[bad][0])})"
        )


def _check_occupancy(atoms: Atoms, where: str) -> None:
    """Partial occupancy (a vacancy, or several species sharing a site) in a CIF: ASE keeps one
    species per site and drops the occupancies into ``info["occupancy"]``; relaxing or training
    on that as if fully occupied is wrong, so it is an error."""
    occ = atoms.info.get("occupancy")
    if not isinstance(occ, dict):
        return
    for site, species in occ.items():
        if not isinstance(species, dict):
            continue
        total = sum(float(v) for v in species.values())
        if len(species) > 1 or abs(total - 1.0) > 1e-6:
            text = ", ".join(f"{s} {float(v):g}" for s, v in species.items())
            kind = "a vacancy" if len(species) == 1 and total < 1 else "partial occupancy"
            raise DataError(
                f"{where}: {kind} at site {site} ({text}); order the structure first (e.g. pymatgen "
                "OrderDisorderedStructureTransformation) and give one species per site"
            )


def closest_pair(atoms: Atoms, within: float):
    """``(i, j, distance)`` of the closest pair of atoms (periodic images included) among the
    pairs closer than ``within`` Å, or None when there is none. (The list is built with a
    cutoff of at least 2 Å: a cell list binned at 0.1 Å would have 10^6 cells per nm^3.)
    """
    from mlpot.data.neighbors import neighbor_list

    pbc = np.asarray(atoms.pbc, dtype=bool)
    i, j, S = neighbor_list(atoms.positions, max(float(within), 2.0),
                            cell=atoms.cell.array if pbc.any() else None, pbc=pbc)
    if len(i) == 0:
        return None
    i, j, S = i.numpy(), j.numpy(), S.numpy()
    D = atoms.positions[j] - atoms.positions[i] + S @ atoms.cell.array
    d = np.sqrt(np.einsum("ij,ij->i", D, D))
    k = int(np.argmin(d))
    if not d[k] < within:
        return None
    return int(i[k]), int(j[k]), float(d[k])


def validate_atoms(atoms: Atoms, source: str = "<atoms>", frame: int | None = None, require=(),
                   min_distance: float = MIN_DISTANCE) -> None:
    """Raise :class:`DataError` naming ``source`` and ``frame`` when a structure is unusable."""
    where = f"{source}: frame {frame}" if frame is not None else str(source)
    n = len(atoms)
    if n == 0:
        raise DataError(f"{where}: empty structure (no atoms)")
    _check_numbers(atoms.numbers, source, frame)
    _check_occupancy(atoms, where)
    pos = atoms.positions
    if not np.all(np.isfinite(pos)):
        bad = int(np.nonzero(~np.isfinite(pos).all(1))[0][0])
        raise DataError(f"{where}: non-finite position (NaN/inf) at atom {bad}")
    cell = atoms.cell.array
    if not np.all(np.isfinite(cell)):
        raise DataError(f"{where}: non-finite cell")
    pbc = np.asarray(atoms.pbc, dtype=bool)
    if is_singular_cell(cell, pbc):
        raise DataError(
            f"{where}: singular cell with periodic boundary conditions "
            f"(pbc={pbc.tolist()}, cell={cell.round(6).tolist()})"
        )
    if not (min_distance >= 0 and math.isfinite(min_distance)):
        raise DataError(f"min_distance must be a finite number >= 0, got {min_distance}")
    if min_distance > 0 and n > 1 or (min_distance > 0 and pbc.any()):
        try:
            pair = closest_pair(atoms, min_distance)
        except DataError as exc:
            raise DataError(f"{where}: {exc}") from None
        if pair is not None:
            i, j, d = pair
            raise DataError(
                f"{where}: atoms {i} and {j} are {d:.3g} Å apart (closer than the minimum distance "
                f"{min_distance} Å); duplicated atom?"
            )
    results = atoms.calc.results if atoms.calc is not None else {}
    for r in require:
        if r not in results:
            raise DataError(
                f"{where}: missing required target {r!r} (looked in calc results and info/arrays; "
                f"pass {r}_key=... to name the key)"
            )
    if "energy" in results and not np.isfinite(results["energy"]):
        raise DataError(f"{where}: non-finite energy {results['energy']}")
    if "forces" in results:
        f = np.asarray(results["forces"])
        if f.shape != (n, 3):
            raise DataError(f"{where}: forces shape {tuple(f.shape)} does not match {n} atoms (expected ({n}, 3))")
        if not np.all(np.isfinite(f)):
            raise DataError(f"{where}: non-finite forces")
    if "hessian" in results:
        from mlpot.data.hessians import as_hessian_matrix

        results["hessian"] = as_hessian_matrix(results["hessian"], n, where)
    if "stress" in results:
        s = np.asarray(results["stress"])
        if s.shape not in ((6,), (3, 3)):
            raise DataError(f"{where}: stress shape {tuple(s.shape)}, expected (6,) or (3, 3)")
        if not np.all(np.isfinite(s)):
            raise DataError(f"{where}: non-finite stress")
