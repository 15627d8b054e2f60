"""`mlpot hessian`: the Hessian of every structure of an input file, its harmonic frequencies
(cm⁻¹) and zero-point energy (eV), by autograd or by the model's direct (HIP) head.

Writes one ``.npz`` atomically (default: INPUT stem + ``_hessian.npz``): ``hessian_K`` (the
``(3n, 3n)`` Hessian of frame K, eV/Å²), ``frequencies_cm_K``, ``zero_point_energy`` (F,), and,
when every frame has the same atoms, ``hessians`` (F, 3n, 3n), the key :func:`mlpot.data.read`
takes for npz Hessians. A non-finite Hessian stops the command before anything is written.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

from mlpot.errors import ConfigError
from mlpot.fileio import check_not_input


def add_arguments(p) -> None:
    p.add_argument("input", help="structure file (extxyz, CIF, POSCAR, traj, ...); all frames")
    p.add_argument("--model", required=True, help="mlpot model file")
    p.add_argument("--method", default="autograd", choices=["autograd", "direct"],
                   help="autograd: second derivative of the energy; direct: the model's HIP head")
    p.add_argument("--output", help="output .npz (default: INPUT stem + '_hessian.npz')")
    p.add_argument("--keep-rigid", action="store_true",
                   help="also print the translation/rotation modes (near zero frequency)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default=None, choices=["float32", "float64"], help="default: the model's")
    p.add_argument("--min-distance", type=float, default=0.1,
                   help="atoms closer than this (Å) are an error (default 0.1; 0: no check)")


def _format_frequency(f: complex) -> str:
    if abs(f.imag) > abs(f.real):
        return f"{abs(f.imag):10.2f}i"
    return f"{f.real:10.2f} "


def run(args) -> int:
    import numpy as np

    from mlpot.calculators import MLPotCalculator
    from mlpot.fileio import atomic_open
    from mlpot.sim.structio import read_structures
    from mlpot.sim.vibrations import harmonic_modes

    if not (args.min_distance >= 0 and math.isfinite(args.min_distance)):
        raise ConfigError(f"--min-distance must be a finite number >= 0, got {args.min_distance}")
    inp = Path(args.input)
    frames, _ = read_structures(inp, min_distance=args.min_distance)
    out = Path(args.output) if args.output else inp.with_name(inp.stem + "_hessian.npz")
    if out.suffix.lower() != ".npz":
        raise ConfigError(f"--output must be a .npz file, got {out}")
    check_not_input(out, inp, args.model)
    calc = MLPotCalculator(args.model, device=args.device, dtype=args.dtype, min_distance=args.min_distance)
    arrays: dict = {}
    zpes = []
    for k, atoms in enumerate(frames):
        hessian = calc.get_hessian(atoms, method=args.method)
        modes = harmonic_modes(atoms, hessian, drop_rigid=not args.keep_rigid)
        arrays[f"hessian_{k}"] = hessian
        arrays[f"frequencies_cm_{k}"] = modes.frequencies_cm
        zpes.append(modes.zero_point_energy)
        print(f"frame {k}: {atoms.get_chemical_formula()} ({len(atoms)} atoms), Hessian by {args.method}")
        print("  mode  frequency (cm^-1)")
        for m, f in enumerate(modes.frequencies_cm):
            print(f"  {m:4d}  {_format_frequency(complex(f))}")
        print(f"  zero-point energy: {modes.zero_point_energy:.6f} eV")
    arrays["zero_point_energy"] = np.array(zpes)
    shapes = {arrays[f"hessian_{k}"].shape for k in range(len(frames))}
    same_atoms = len(shapes) == 1 and len({tuple(a.numbers) for a in frames}) == 1
    if same_atoms:
        arrays["hessians"] = np.stack([arrays[f"hessian_{k}"] for k in range(len(frames))])
        arrays["nuclear_charges"] = frames[0].numbers
        arrays["coords"] = np.stack([a.positions for a in frames])
    with atomic_open(out, "wb") as fh:
        np.savez(fh, **arrays)
    print(f"wrote {out}", file=sys.stderr)
    return 0
