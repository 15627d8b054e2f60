"""EMT's own relaxation of the quickstart's ``relax_start.xyz`` (the reference for BENCHMARKS.md).

    python scripts/emt_relax_reference.py [--seed 0] [--mlpot-relaxed RUN/relaxed.xyz]

Writes the built-in EMT data of ``configs/quickstart.yaml`` (``data.synthetic``: cu-ni, 150 /
30 / 60, seed 0) to a temporary folder, relaxes ``relax_start.xyz`` with ASE's EMT (FIRE on a
FrechetCellFilter, fmax 0.01 eV/Å, as ``mlpot relax --cell``) and prints the volume change of the
cell. With ``--mlpot-relaxed`` (the output of ``make quickstart``) it also prints EMT's energy at
that structure minus EMT's own minimum, in meV and meV/atom.
"""
from __future__ import annotations

import argparse
import tempfile

from ase.calculators.emt import EMT
from ase.filters import FrechetCellFilter
from ase.io import read
from ase.optimize import FIRE

from mlpot.data.synthetic import generate_emt_dataset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mlpot-relaxed", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = generate_emt_dataset(tmp, n_train=150, n_valid=30, n_test=60, seed=args.seed, system="cu-ni")
        start = read(paths["relax_start"])
    atoms = start.copy()
    atoms.calc = EMT()
    opt = FIRE(FrechetCellFilter(atoms), logfile=None)
    opt.run(fmax=0.01, steps=2000)
    dv = atoms.get_volume() / start.get_volume() - 1
    print(f"{len(atoms)} atoms; EMT relaxes in {opt.nsteps} FIRE steps to a volume change of {100 * dv:+.2f} %")
    if args.mlpot_relaxed:
        other = read(args.mlpot_relaxed)
        other.calc = EMT()
        de = other.get_potential_energy() - atoms.get_potential_energy()
        dv2 = other.get_volume() / start.get_volume() - 1
        print(f"mlpot-relaxed: volume change {100 * dv2:+.2f} %; EMT energy above EMT's minimum "
              f"{1000 * de:.1f} meV ({1000 * de / len(atoms):.2f} meV/atom)")


if __name__ == "__main__":
    main()
