"""Reading input structures and writing results (atomically) for `mlpot relax` / `mlpot md`.

Inputs: anything ASE reads (extxyz, CIF, POSCAR, traj, ...; all frames), and pymatgen
``Structure`` JSON / files ASE cannot parse. Outputs go to a temporary file beside the target
and are renamed over it, so a crash never leaves a half-written file.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from ase import Atoms

from mlpot.errors import DataError
from mlpot.fileio import atomic_path

__all__ = ["read_structures", "write_structures", "atomic_output", "guess_format"]

PYMATGEN_JSON = "pymatgen-json"


def _check(atoms: Atoms, path, k: int) -> None:
    if len(atoms) == 0:
        raise DataError(f"{path}: frame {k} has no atoms")
    if not np.all(np.isfinite(atoms.positions)):
        raise DataError(f"{path}: frame {k} has non-finite positions")
    if np.any(atoms.numbers <= 0) or np.any(atoms.numbers > 118):
        raise DataError(f"{path}: frame {k} has invalid atomic numbers {sorted(set(atoms.numbers.tolist()))}")
    if atoms.pbc.any():
        rows = atoms.cell.array[atoms.pbc]
        if np.linalg.matrix_rank(rows, tol=1e-8) < len(rows):
            raise DataError(f"{path}: frame {k} has a singular cell with periodic boundaries")


def _read_pymatgen(path: Path) -> list[Atoms]:
    from pymatgen.core import Structure
    from pymatgen.io.ase import AseAtomsAdaptor

    if path.suffix.lower() == ".json":
        obj = json.loads(path.read_text())
        items = obj if isinstance(obj, list) else [obj]
        structs = [Structure.from_dict(d) for d in items]
    else:
        structs = [Structure.from_file(str(path))]
    return [AseAtomsAdaptor.get_atoms(s) for s in structs]


def guess_format(path, read: bool = True) -> str | None:
    """ASE's format name for ``path`` (by content when ``read``), or None."""
    from ase.io.formats import filetype

    try:
        return filetype(str(path), read=read)
    except Exception:  # noqa: BLE001 - unknown format
        return None


def read_structures(path, format: str | None = None) -> tuple[list[Atoms], str]:
    """All frames of ``path`` and the format they came in (``"pymatgen-json"`` for pymatgen)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input structure file not found: {path}")
    frames = None
    fmt = format
    errors = []
    if format in (None, PYMATGEN_JSON) and path.suffix.lower() == ".json":
        try:
            frames, fmt = _read_pymatgen(path), PYMATGEN_JSON
        except Exception as exc:  # noqa: BLE001
            errors.append(f"pymatgen: {exc}")
    if frames is None and format != PYMATGEN_JSON:
        import ase.io

        try:
            fmt = format or guess_format(path)
            frames = ase.io.read(str(path), index=":", format=fmt)
            if isinstance(frames, Atoms):
                frames = [frames]
        except Exception as exc:  # noqa: BLE001
            errors.append(f"ase: {type(exc).__name__}: {exc}")
            frames = None
    if frames is None and format is None:
        try:
            frames, fmt = _read_pymatgen(path), PYMATGEN_JSON
        except Exception as exc:  # noqa: BLE001
            errors.append(f"pymatgen: {type(exc).__name__}: {exc}")
    if not frames:
        detail = "; ".join(errors) if errors else "no frames"
        raise DataError(f"{path}: cannot read structures ({detail})")
    for k, a in enumerate(frames):
        _check(a, path, k)
        a.calc = None
    return list(frames), fmt or "extxyz"


#: a temporary path beside the target, renamed over it on success (:mod:`mlpot.fileio`)
atomic_output = atomic_path


def write_structures(path, frames: list[Atoms], format: str | None = None) -> str:
    """Write ``frames`` to ``path`` atomically; returns the format used."""
    path = Path(path)
    fmt = format or guess_format(path, read=False) or "extxyz"
    with atomic_output(path) as tmp:
        if fmt == PYMATGEN_JSON:
            from pymatgen.io.ase import AseAtomsAdaptor

            dicts = [AseAtomsAdaptor.get_structure(a).as_dict() for a in frames]
            Path(tmp).write_text(json.dumps(dicts[0] if len(dicts) == 1 else dicts))
        else:
            import ase.io

            if len(frames) > 1:
                ase.io.write(tmp, frames, format=fmt)
            else:
                ase.io.write(tmp, frames[0], format=fmt)
    return fmt
