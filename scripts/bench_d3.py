"""D3(BJ)-PBE energy and forces of one molecule: tad-dftd3 against torch-dftd, and what each covers.

    python scripts/bench_d3.py [--repeats 5] [--atoms 21]

A deterministic ``--atoms``-atom C/H/O molecule (no cell). Per repeat, alternating: tad-dftd3
(``tad_dftd3.dftd3`` with the PBE BJ parameters, forces by autograd) and torch-dftd
(``TorchDFTD3Calculator(damping="bj", xc="pbe")``), float64, 1 thread; prints median seconds with
the spread, the energy difference between the packages, and whether each accepts a periodic cell
(needed for stress, i.e. for ``MLPotCalculator(dispersion=...)`` on crystals).
"""
from __future__ import annotations

import argparse
import inspect
import statistics
import time

import numpy as np
import torch

BOHR = 0.52917721067  # Å
HARTREE = 27.211386245988  # eV


def molecule(n: int):
    from mlpot.testing.model_checks import random_molecule

    zs = ([6, 1, 8] * n)[:n]
    atoms = random_molecule(zs, n=n, seed=0, radius=3.5, min_dist=1.0)
    atoms.numbers[:] = zs
    return atoms


def tad(atoms):
    import tad_dftd3 as d3

    numbers = torch.as_tensor(atoms.numbers)
    pos = torch.as_tensor(atoms.positions / BOHR, dtype=torch.float64).requires_grad_(True)
    param = {k: torch.tensor(v, dtype=torch.float64) for k, v in
             {"s6": 1.0, "s8": 0.7875, "a1": 0.4289, "a2": 4.4407}.items()}  # PBE-D3(BJ), Grimme's table
    e = d3.dftd3(numbers, pos, param).sum()
    (g,) = torch.autograd.grad(e, pos)
    return float(e) * HARTREE, -g.numpy() * HARTREE / BOHR


def tdftd(atoms):
    from torch_dftd.torch_dftd3_calculator import TorchDFTD3Calculator

    a = atoms.copy()
    a.calc = TorchDFTD3Calculator(damping="bj", xc="pbe", dtype=torch.float64)
    return a.get_potential_energy(), a.get_forces()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--atoms", type=int, default=21)
    args = ap.parse_args()
    torch.set_num_threads(1)
    import tad_dftd3

    atoms = molecule(args.atoms)
    fns = {"tad-dftd3": tad, "torch-dftd": tdftd}
    out = {k: f(atoms) for k, f in fns.items()}  # warm-up
    times = {k: [] for k in fns}
    for _ in range(args.repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f(atoms)
            times[k].append(time.perf_counter() - t0)
    print(f"{args.atoms}-atom molecule, D3(BJ)-PBE energy + forces, float64, 1 thread, {args.repeats} repeats")
    for k, t in times.items():
        print(f"{k:11s} median {statistics.median(t):.4f} s (min {min(t):.4f}, max {max(t):.4f}); "
              f"E = {out[k][0]:.6f} eV")
    de = abs(out["tad-dftd3"][0] - out["torch-dftd"][0])
    df = np.abs(out["tad-dftd3"][1] - out["torch-dftd"][1]).max()
    print(f"|dE| = {de:.2e} eV, max |dF| = {df:.2e} eV/Å")
    print(f"periodic cell accepted: tad-dftd3 {'cell' in inspect.signature(tad_dftd3.dftd3).parameters} "
          f"(version {tad_dftd3.__version__}), torch-dftd True (ASE calculator with stress)")


if __name__ == "__main__":
    main()
