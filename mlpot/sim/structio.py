"""Reading input structures and writing results (atomically) for `mlpot relax` / `mlpot md`.

Inputs: anything ASE reads (extxyz, CIF, POSCAR, traj, ...; all frames), and pymatgen
``Structure`` JSON / files ASE cannot parse. Outputs go to a temporary file beside the target
and are renamed over it, so a crash never leaves a half-written file.
"""
from __future__ import annotations

import json
from pathlib import Path

from ase import Atoms

from mlpot.data.readers import MIN_DISTANCE, check_xyz_counts, validate_atoms
from mlpot.errors import DataError
from mlpot.fileio import atomic_path

__all__ = ["read_structures", "write_structures", "atomic_output", "guess_format"]

PYMATGEN_JSON = "pymatgen-json"


def _check(atoms: Atoms, path, k: int, min_distance: float = MIN_DISTANCE) -> None:
    """Empty structure, bad element, non-finite position or cell, singular cell, partial
    occupancy, atoms closer than ``min_distance``: the checks of the training readers."""
    validate_atoms(atoms, source=str(path), frame=k, min_distance=min_distance)


def _read_pymatgen(path: Path) -> list[Atoms]:
    from pymatgen.core import Structure
    from pymatgen.io.ase import AseAtomsAdaptor

    if path.suffix.lower() == ".json":
        obj = json.loads(path.read_text())
        items = obj if isinstance(obj, list) else [obj]
        structs = [Structure.from_dict(d) for d in items]
    else:
        structs = [Structure.from_file(str(path))]
    for k, s in enumerate(structs):
        if not s.is_ordered:
            raise DataError(f"{path}: frame {k}: partial occupancy or vacancy (a disordered structure); "
                            "order it first and give one species per site")
    return [AseAtomsAdaptor.get_atoms(s) for s in structs]


def guess_format(path, read: bool = True) -> str | None:
    """ASE's format name for ``path`` (by content when ``read``), or None."""
    from ase.io.formats import filetype

    try:
        return filetype(str(path), read=read)
    except Exception:  # noqa: BLE001 - unknown format
        return None


def read_structures(path, format: str | None = None, min_distance: float = MIN_DISTANCE) -> tuple[list[Atoms], str]:
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

        fmt = format or guess_format(path)
        if fmt in ("extxyz", "xyz"):
            check_xyz_counts(path)  # a huge count line would make ASE hang
        try:
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
        a.calc = None
        _check(a, path, k, min_distance)
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
