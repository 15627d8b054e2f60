"""Molecular dynamics with ASE integrators, a log file and a progress bar with throughput.

Ensembles:

* ``nve``: :class:`ase.md.verlet.VelocityVerlet`.
* ``nvt``: :class:`ase.md.langevin.Langevin` (``friction`` in 1/fs).
* ``npt``: :class:`ase.md.nose_hoover_chain.IsotropicMTKNPT` (Martyna–Tobias–Klein,
  Nosé–Hoover chains for thermostat and barostat; isotropic cell fluctuations) when ASE has it,
  otherwise :class:`ase.md.npt.NPT` (Nosé–Hoover / Parrinello–Rahman). Damping times:
  ``tdamp = 100 * timestep``, ``pdamp = 1000 * timestep``.

Log columns: time (ps), potential / kinetic / total energy (eV), temperature (K), pressure
(GPa, periodic cells only; includes the kinetic term).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from ase import Atoms, units

from mlpot.errors import ConfigError, NonFiniteError

__all__ = ["make_integrator", "run_md", "MDSummary", "ENSEMBLES"]

ENSEMBLES = ("nve", "nvt", "npt")


@dataclass
class MDSummary:
    steps: int
    natoms: int
    wall_s: float
    ns_per_day: float
    atom_steps_per_s: float
    e_total_first: float
    e_total_last: float


def init_velocities(atoms: Atoms, temperature: float, seed: int | None) -> None:
    """Maxwell–Boltzmann velocities at ``temperature`` K, no net momentum (and no net rotation
    for non-periodic systems)."""
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary, ZeroRotation

    if not (temperature >= 0 and np.isfinite(temperature)):
        raise ConfigError(f"temperature must be a finite number >= 0 K, got {temperature}")
    if temperature == 0:
        atoms.set_momenta(np.zeros((len(atoms), 3)))
        return
    rng = np.random.default_rng(seed)
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=rng)
    Stationary(atoms)
    if not atoms.pbc.any() and len(atoms) > 2:
        ZeroRotation(atoms)


def make_integrator(atoms, ensemble, timestep_fs, temperature=300.0, friction=0.01, pressure_gpa=0.0,
                    seed=None):
    ensemble = ensemble.lower()
    for name, value in (("timestep", timestep_fs), ("friction", friction), ("pressure", pressure_gpa)):
        if not np.isfinite(value):
            raise ConfigError(f"{name} must be finite, got {value}")
    if not (temperature >= 0 and np.isfinite(temperature)):
        raise ConfigError(f"temperature must be a finite number >= 0 K, got {temperature}")
    dt = timestep_fs * units.fs
    if ensemble == "nve":
        from ase.md.verlet import VelocityVerlet

        return VelocityVerlet(atoms, timestep=dt)
    if ensemble == "nvt":
        from ase.constraints import FixCom
        from ase.md.langevin import Langevin

        # ASE >= 3.28: keep the centre of mass fixed by a constraint, not by `fixcm`
        if not any(isinstance(c, FixCom) for c in atoms.constraints):
            atoms.set_constraint(list(atoms.constraints) + [FixCom()])
        return Langevin(atoms, timestep=dt, temperature_K=temperature, friction=friction / units.fs,
                        fixcm=False, rng=np.random.default_rng(None if seed is None else seed + 1))
    if ensemble == "npt":
        if not atoms.pbc.all():
            raise ConfigError("npt needs a cell periodic in all three directions")
        try:
            from ase.md.nose_hoover_chain import IsotropicMTKNPT
        except ImportError:  # older ASE
            from ase.md.npt import NPT

            atoms.set_cell(_upper_triangular(atoms.cell.array), scale_atoms=True)
            bulk_modulus = 100.0 * units.GPa
            return NPT(atoms, timestep=dt, temperature_K=temperature, externalstress=pressure_gpa * units.GPa,
                       ttime=100 * dt, pfactor=(1000 * dt) ** 2 * bulk_modulus)
        return IsotropicMTKNPT(atoms, timestep=dt, temperature_K=temperature,
                               pressure_au=pressure_gpa * units.GPa, tdamp=100 * dt, pdamp=1000 * dt)
    raise ConfigError(f"unknown ensemble {ensemble!r}; choose from {', '.join(ENSEMBLES)}")


def _upper_triangular(cell):
    # ase.md.npt.NPT wants an upper-triangular cell; rotate via the QR of the transpose
    q, r = np.linalg.qr(np.asarray(cell).T)
    r = r * np.sign(np.diag(r))[:, None]
    return r.T


def thermo(atoms: Atoms) -> dict:
    epot = float(atoms.get_potential_energy())
    ekin = float(atoms.get_kinetic_energy())
    row = {"epot": epot, "ekin": ekin, "etot": epot + ekin, "temperature": float(atoms.get_temperature())}
    if not (np.isfinite(row["etot"]) and np.all(np.isfinite(atoms.positions))):
        raise NonFiniteError(f"non-finite energy or positions in MD (epot {epot}, ekin {ekin}); stopping")
    if atoms.pbc.all():
        s = atoms.get_stress(include_ideal_gas=True)
        row["pressure"] = float(-s[:3].mean() / units.GPa)
    else:
        row["pressure"] = float("nan")
    return row


def run_md(atoms, dyn, steps: int, timestep_fs: float, log_every: int = 10, logfile=None, trajectory=None,
           progress: bool = True) -> MDSummary:
    """Run ``steps`` steps of ``dyn``; log every ``log_every`` steps to ``logfile`` (an open text
    file) and ``trajectory`` (an ASE Trajectory); a tqdm bar shows ns/day and atoms·steps/s."""
    from tqdm import tqdm

    log_every = max(1, int(log_every))
    first = thermo(atoms)

    def write_row(step):
        r = thermo(atoms)
        if logfile is not None:
            logfile.write(f"{step * timestep_fs / 1000:12.5f} {r['epot']:16.8f} {r['ekin']:14.8f} "
                          f"{r['etot']:16.8f} {r['temperature']:10.3f} {r['pressure']:12.5f}\n")
            logfile.flush()
        if trajectory is not None:
            trajectory.write(atoms)
        return r

    if logfile is not None:
        logfile.write(f"# {'time_ps':>10} {'epot_eV':>16} {'ekin_eV':>14} {'etot_eV':>16} {'T_K':>10} "
                      f"{'p_GPa':>12}\n")
    last = write_row(0)
    bar = tqdm(total=steps, unit="step", disable=not progress, dynamic_ncols=True)
    t0 = time.perf_counter()
    done = 0
    n = len(atoms)
    while done < steps:
        chunk = min(log_every, steps - done)
        dyn.run(chunk)
        done += chunk
        last = write_row(done)
        elapsed = time.perf_counter() - t0
        rate = done / elapsed if elapsed > 0 else 0.0
        bar.update(chunk)
        bar.set_postfix_str(f"{rate * timestep_fs * 86400 * 1e-6:.3f} ns/day, {rate * n:.3g} atom-steps/s, "
                            f"T={last['temperature']:.0f} K")
    bar.close()
    wall = time.perf_counter() - t0
    rate = steps / wall if wall > 0 else 0.0
    return MDSummary(steps=steps, natoms=n, wall_s=wall, ns_per_day=rate * timestep_fs * 86400 * 1e-6,
                     atom_steps_per_s=rate * n, e_total_first=first["etot"], e_total_last=last["etot"])
