"""`mlpot relax`: relax every structure of an input file with an mlpot model.

Exit status: 0 when every structure converged, 3 when at least one did not (the relaxed
structures are still written; the table marks each non-converged one "NO"), 1 on bad input.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

from mlpot.errors import ConfigError
from mlpot.fileio import check_not_input


def add_arguments(p) -> None:
    p.add_argument("input", help="structure file (extxyz, CIF, POSCAR, traj, pymatgen JSON, ...); all frames")
    p.add_argument("--model", required=True, help="mlpot model file")
    p.add_argument("--fmax", type=float, default=0.01, help="force convergence (eV/Å; default 0.01)")
    p.add_argument("--steps", type=int, default=500, help="maximum optimizer steps per structure")
    p.add_argument("--optimizer", default="FIRE", choices=["FIRE", "BFGS", "LBFGS"])
    p.add_argument("--cell", action="store_true", help="relax the cell too (FrechetCellFilter)")
    p.add_argument("--pressure", type=float, default=0.0, help="external pressure in GPa (with --cell)")
    p.add_argument("--output", help="output file (default: INPUT stem + '_relaxed' + suffix)")
    p.add_argument("--format", help="output format (ASE name; default: from --output, else the input's)")
    p.add_argument("--trajectory", help="ASE .traj file with every optimizer step")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default=None, choices=["float32", "float64"], help="default: the model's")
    p.add_argument("--head", default=None, help="head of a multi-head model (default: the only head, or the one named default)")
    p.add_argument("--batched", action="store_true",
                   help="relax all structures together with batched FIRE in torch (positions only)")
    p.add_argument("--max-atoms", type=int, default=4096, help="atoms per batch with --batched")
    p.add_argument("--skin", type=float, default=0.5, help="neighbour-list skin (Å)")
    p.add_argument("--min-distance", type=float, default=0.1,
                   help="atoms closer than this (Å) are an error (default 0.1; 0: no check)")
    p.add_argument("--quiet", action="store_true", help="no optimizer log")


def _default_output(inp: Path) -> Path:
    if inp.suffix:
        return inp.with_name(inp.stem + "_relaxed" + inp.suffix)
    return inp.with_name(inp.name + "_relaxed")


def run(args) -> int:
    from mlpot.sim.relax import RelaxResult, format_table, relax_atoms
    from mlpot.sim.structio import guess_format, read_structures, write_structures

    if not (args.fmax > 0 and math.isfinite(args.fmax)):
        raise ConfigError(f"--fmax must be a finite number > 0, got {args.fmax}")
    if args.steps < 0:
        raise ConfigError(f"--steps must be >= 0, got {args.steps}")
    if not (args.skin >= 0 and math.isfinite(args.skin)):
        raise ConfigError(f"--skin must be a finite number >= 0, got {args.skin}")
    if not (args.min_distance >= 0 and math.isfinite(args.min_distance)):
        raise ConfigError(f"--min-distance must be a finite number >= 0, got {args.min_distance}")
    if not math.isfinite(args.pressure):
        raise ConfigError(f"--pressure must be finite, got {args.pressure}")
    if args.max_atoms < 1:
        raise ConfigError(f"--max-atoms must be >= 1, got {args.max_atoms}")
    inp = Path(args.input)
    frames, in_fmt = read_structures(inp, min_distance=args.min_distance)
    out = Path(args.output) if args.output else _default_output(inp)
    check_not_input(out, inp, args.model)
    if args.trajectory:
        check_not_input(args.trajectory, inp, args.model, what="--trajectory")
    out_fmt = args.format
    if out_fmt is None:
        same_suffix = out.suffix.lower() == inp.suffix.lower()
        # a pymatgen JSON input gives a pymatgen JSON output (ASE would call *.json its database)
        out_fmt = in_fmt if (same_suffix or in_fmt == "pymatgen-json" and out.suffix.lower() == ".json") else None
        out_fmt = out_fmt or guess_format(out, read=False) or in_fmt
    results: list[RelaxResult] = []

    if args.batched:
        if args.cell or args.optimizer.upper() != "FIRE":
            raise ConfigError("--batched relaxes positions with FIRE only (no --cell, no other --optimizer)")
        import mlpot
        from mlpot.sim.batched_fire import batched_fire_relax

        model = mlpot.load_model(args.model, device=args.device, dtype=args.dtype)
        v0 = [a.get_volume() if a.pbc.all() else None for a in frames]
        res = batched_fire_relax(model, frames, fmax=args.fmax, steps=args.steps, max_atoms=args.max_atoms,
                                 skin=args.skin)
        frames = res.atoms
        for k, a in enumerate(frames):
            results.append(RelaxResult(k, a.get_chemical_formula(), len(a), float(res.e_initial[k]),
                                       float(res.e_final[k]), float(res.fmax[k]), int(res.steps[k]), v0[k], v0[k],
                                       bool(res.converged[k])))
    else:
        from mlpot.calculators import MLPotCalculator

        calc = MLPotCalculator(args.model, device=args.device, dtype=args.dtype, skin=args.skin,
                               min_distance=args.min_distance, head=args.head)
        traj = None
        if args.trajectory:
            from ase.io import Trajectory

            traj = Trajectory(args.trajectory, "w")
        try:
            for k, atoms in enumerate(frames):
                results.append(relax_atoms(atoms, calc, fmax=args.fmax, steps=args.steps,
                                           optimizer=args.optimizer, cell=args.cell, pressure_gpa=args.pressure,
                                           trajectory=traj, logfile=None if args.quiet else "-", index=k))
        finally:
            if traj is not None:
                traj.close()
    used = write_structures(out, frames, out_fmt)
    print(format_table(results))
    n_bad = sum(not r.converged for r in results)
    print(f"wrote {len(frames)} structure(s) to {out} ({used})")
    if n_bad:
        print(f"{n_bad} of {len(results)} structure(s) did not converge to fmax={args.fmax} in {args.steps} steps",
              file=sys.stderr)
        return 3
    return 0
