"""Structure relaxation with ASE optimizers (one structure at a time).

Cell relaxation wraps the atoms in :class:`ase.filters.FrechetCellFilter` with
``scalar_pressure`` (eV/Å^3, from GPa). Convergence means ``max |F| < fmax`` over what the
optimizer sees: atomic forces, plus the filter's cell "forces" (stress times volume, eV) when
the cell relaxes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from ase import Atoms, units

from mlpot.errors import ConfigError, MlpotError, NonFiniteError

__all__ = ["RelaxResult", "relax_atoms", "OPTIMIZERS", "format_table"]

OPTIMIZERS = ("FIRE", "BFGS", "LBFGS")


@dataclass
class RelaxResult:
    index: int
    formula: str
    natoms: int
    e_initial: float
    e_final: float
    fmax: float
    steps: int
    volume_initial: float | None
    volume_final: float | None
    converged: bool

    @property
    def volume_change(self) -> float | None:
        if not self.volume_initial:
            return None
        return (self.volume_final - self.volume_initial) / self.volume_initial


def _optimizer(name: str):
    from ase.optimize import BFGS, FIRE, LBFGS

    table = {"FIRE": FIRE, "BFGS": BFGS, "LBFGS": LBFGS}
    if name.upper() not in table:
        raise ConfigError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
    return table[name.upper()]


def _volume(atoms: Atoms):
    return float(atoms.get_volume()) if atoms.pbc.all() else None


def relax_atoms(
    atoms: Atoms,
    calc,
    fmax: float = 0.01,
    steps: int = 500,
    optimizer: str = "FIRE",
    cell: bool = False,
    pressure_gpa: float = 0.0,
    trajectory=None,
    logfile=None,
    index: int = 0,
) -> RelaxResult:
    """Relax ``atoms`` in place; returns a :class:`RelaxResult`.

    A non-finite energy, force or position (from the calculator, or after a step) stops the
    relaxation with :class:`~mlpot.errors.NonFiniteError` naming the structure; it is never
    reported as converged."""
    try:
        return _relax(atoms, calc, fmax, steps, optimizer, cell, pressure_gpa, trajectory, logfile, index)
    except MlpotError as exc:
        if str(exc).startswith("structure "):
            raise
        raise type(exc)(f"structure {index} ({atoms.get_chemical_formula()}): {exc}") from None


def _relax(atoms, calc, fmax, steps, optimizer, cell, pressure_gpa, trajectory, logfile, index) -> RelaxResult:
    if not (fmax > 0 and np.isfinite(fmax)):
        raise ConfigError(f"fmax must be a finite number > 0, got {fmax}")
    opt_cls = _optimizer(optimizer)
    atoms.calc = calc
    if cell and not atoms.pbc.all():
        raise ConfigError(f"structure {index} ({atoms.get_chemical_formula()}): --cell needs a periodic cell")
    e0 = float(atoms.get_potential_energy())
    v0 = _volume(atoms)
    target = atoms
    if cell:
        from ase.filters import FrechetCellFilter

        target = FrechetCellFilter(atoms, scalar_pressure=pressure_gpa * units.GPa)
    opt = opt_cls(target, logfile=logfile)
    if trajectory is not None:
        opt.attach(trajectory.write, interval=1, atoms=atoms)
    opt.run(fmax=fmax, steps=steps)
    f = target.get_forces()
    fm = float(np.sqrt((f**2).sum(axis=1).max())) if len(f) else 0.0
    e_final = float(atoms.get_potential_energy())
    if not (np.isfinite(fm) and np.isfinite(e_final) and np.all(np.isfinite(atoms.positions))
            and np.all(np.isfinite(atoms.cell.array))):
        raise NonFiniteError("non-finite energy, forces or positions after the relaxation")
    return RelaxResult(
        index=index,
        formula=atoms.get_chemical_formula(),
        natoms=len(atoms),
        e_initial=e0,
        e_final=e_final,
        fmax=fm,
        steps=int(opt.nsteps),
        volume_initial=v0,
        volume_final=_volume(atoms),
        converged=bool(fm < fmax),
    )


def format_table(results: list[RelaxResult]) -> str:
    head = f"{'#':>4} {'formula':<14} {'N':>5} {'E_init (eV)':>14} {'E_final (eV)':>14} {'fmax':>9} " \
           f"{'steps':>6} {'dV/V0':>8}  converged"
    lines = [head, "-" * len(head)]
    for r in results:
        dv = "-" if r.volume_change is None else f"{100 * r.volume_change:+.2f}%"
        lines.append(
            f"{r.index:>4} {r.formula[:14]:<14} {r.natoms:>5} {r.e_initial:>14.6f} {r.e_final:>14.6f} "
            f"{r.fmax:>9.2e} {r.steps:>6} {dv:>8}  {'yes' if r.converged else 'NO'}"
        )
    return "\n".join(lines)
