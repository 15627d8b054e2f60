"""`mlpot md`: molecular dynamics (NVE, NVT Langevin, NPT MTK) with ASE integrators."""
from __future__ import annotations

import math
from pathlib import Path

from mlpot.errors import ConfigError
from mlpot.fileio import check_not_input


def add_arguments(p) -> None:
    p.add_argument("input", help="structure file (first frame is used)")
    p.add_argument("--model", required=True, help="mlpot model file")
    p.add_argument("--ensemble", default="nve", choices=["nve", "nvt", "npt"])
    p.add_argument("--temperature", type=float, default=300.0, help="K (initial velocities; thermostat target)")
    p.add_argument("--timestep", type=float, default=1.0, help="fs")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--friction", type=float, default=0.01, help="Langevin friction (1/fs)")
    p.add_argument("--pressure", type=float, default=0.0, help="GPa (npt)")
    p.add_argument("--log", type=int, default=10, help="log / trajectory interval in steps")
    p.add_argument("--logfile", help="log file (default: INPUT stem + '_md.log')")
    p.add_argument("--trajectory", help="trajectory file (.traj or .xyz), one frame per --log steps")
    p.add_argument("--seed", type=int, default=None, help="random seed (velocities, Langevin noise)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default=None, choices=["float32", "float64"])
    p.add_argument("--head", default=None, help="head of a multi-head model (default: the only head, or the one named default)")
    p.add_argument("--skin", type=float, default=0.5, help="neighbour-list skin (Å)")
    p.add_argument("--min-distance", type=float, default=0.1,
                   help="atoms closer than this (Å) are an error (default 0.1; 0: no check)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from mlpot.calculators import MLPotCalculator
    from mlpot.sim.md import init_velocities, make_integrator, run_md
    from mlpot.sim.structio import atomic_output, read_structures

    if args.steps < 0:
        raise ConfigError(f"--steps must be >= 0, got {args.steps}")
    if not (args.timestep > 0 and math.isfinite(args.timestep)):
        raise ConfigError(f"--timestep must be a finite number > 0 fs, got {args.timestep}")
    if not (args.temperature >= 0 and math.isfinite(args.temperature)):
        raise ConfigError(f"--temperature must be a finite number >= 0 K, got {args.temperature}")
    if args.ensemble == "nvt" and not (args.friction > 0 and math.isfinite(args.friction)):
        raise ConfigError(f"--friction must be a finite number > 0 for nvt, got {args.friction}")
    if not math.isfinite(args.pressure):
        raise ConfigError(f"--pressure must be finite, got {args.pressure}")
    if not (args.skin >= 0 and math.isfinite(args.skin)):
        raise ConfigError(f"--skin must be a finite number >= 0, got {args.skin}")
    if not (args.min_distance >= 0 and math.isfinite(args.min_distance)):
        raise ConfigError(f"--min-distance must be a finite number >= 0, got {args.min_distance}")
    if args.log < 1:
        raise ConfigError(f"--log must be >= 1, got {args.log}")
    inp = Path(args.input)
    logpath = Path(args.logfile) if args.logfile else inp.with_name(inp.stem + "_md.log")
    check_not_input(logpath, inp, args.model, what="--logfile")
    if args.trajectory:
        check_not_input(args.trajectory, inp, args.model, logpath, what="--trajectory")
    frames, _ = read_structures(args.input, min_distance=args.min_distance)
    atoms = frames[0]
    atoms.calc = MLPotCalculator(args.model, device=args.device, dtype=args.dtype, skin=args.skin,
                                 min_distance=args.min_distance, head=args.head)
    init_velocities(atoms, args.temperature, args.seed)
    dyn = make_integrator(atoms, args.ensemble, args.timestep, temperature=args.temperature,
                          friction=args.friction, pressure_gpa=args.pressure, seed=args.seed)
    traj = None
    if args.trajectory:
        from ase.io import Trajectory

        if Path(args.trajectory).suffix == ".traj":
            traj = Trajectory(args.trajectory, "w")
        else:
            traj = _XYZWriter(args.trajectory)
    try:
        with atomic_output(logpath) as tmp, open(tmp, "w") as log:
            s = run_md(atoms, dyn, args.steps, args.timestep, log_every=args.log, logfile=log, trajectory=traj,
                       progress=not args.no_progress)
    finally:
        if traj is not None:
            traj.close()
    drift = (s.e_total_last - s.e_total_first) / s.natoms
    print(f"{s.steps} steps of {s.natoms} atoms in {s.wall_s:.2f} s: {s.ns_per_day:.4f} ns/day, "
          f"{s.atom_steps_per_s:.4g} atom-steps/s; total-energy change {1000 * drift:+.3f} meV/atom")
    print(f"log: {logpath}")
    return 0


class _XYZWriter:
    """Appends frames to an extxyz file (any ASE-writable single-frame-per-call format)."""

    def __init__(self, path):
        self.path = path
        open(path, "w").close()

    def write(self, atoms):
        import ase.io

        ase.io.write(self.path, atoms, append=True)

    def close(self):
        pass
