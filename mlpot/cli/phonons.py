"""`mlpot phonons INPUT --model M.pt --supercell 2 2 2`: harmonic phonons through phonopy.

Finite displacements (phonopy, ``--displacement`` Å, symmetry-reduced) of the
``--supercell`` of the first structure of INPUT; the model gives the forces; phonopy builds the
force constants ``Phi_ab(ij) = d^2E / du_ia du_jb`` and diagonalises the dynamical matrix
``D(q) = sum_j Phi(0, j) exp(i q.R_j) / sqrt(m_i m_j)``; frequencies are
``sqrt(eigenvalues) / 2 pi`` in THz (imaginary modes are printed negative, phonopy's
convention). The band path is ASE's standard path of the input cell (``Cell.bandpath``), so the
input cell is the primitive cell of the calculation (give a primitive cell for the usual
picture). Outputs, in ``--output-dir`` (default: INPUT stem + ``_phonons``), each written
atomically:

* ``band_structure.png`` and ``dos.png``;
* ``band_frequencies.dat``: path distance, q (reduced), then every band frequency (THz);
* ``dos.dat``: frequency (THz) and total DOS (states/THz) on a ``--mesh`` grid.

Needs ``pip install mlpot[phonons]`` (phonopy).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from mlpot.errors import ConfigError, DataError
from mlpot.fileio import atomic_path, atomic_write_text, check_not_input


def add_arguments(p) -> None:
    p.add_argument("input", help="structure file (first frame; periodic in 3D)")
    p.add_argument("--model", required=True, help="mlpot model file")
    p.add_argument("--supercell", type=int, nargs=3, default=[2, 2, 2], metavar=("NA", "NB", "NC"),
                   help="supercell repetitions (default 2 2 2)")
    p.add_argument("--displacement", type=float, default=0.01, help="finite displacement in Å (default 0.01)")
    p.add_argument("--mesh", type=int, nargs=3, default=[16, 16, 16], metavar=("MA", "MB", "MC"),
                   help="q-point mesh for the DOS (default 16 16 16)")
    p.add_argument("--npoints", type=int, default=101, help="q-points along the band path (default 101)")
    p.add_argument("--output-dir", default=None, help="output folder (default: INPUT stem + '_phonons')")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float64", choices=["float32", "float64"],
                   help="float64 (default): finite differences of forces need it")


def _phonopy_atoms(atoms):
    from phonopy.structure.atoms import PhonopyAtoms

    return PhonopyAtoms(symbols=atoms.get_chemical_symbols(), cell=atoms.cell.array,
                        scaled_positions=atoms.get_scaled_positions(), masses=atoms.get_masses())


def _save_figure(fig, path: Path) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=120)


def run(args) -> int:
    try:
        from phonopy import Phonopy
    except ImportError as exc:
        raise ConfigError(f"mlpot phonons needs phonopy: pip install 'mlpot[phonons]' ({exc})") from None
    from ase import Atoms

    from mlpot.calculators import MLPotCalculator
    from mlpot.sim.structio import read_structures

    if min(args.supercell) < 1:
        raise ConfigError(f"--supercell must be three integers >= 1, got {args.supercell}")
    if min(args.mesh) < 1:
        raise ConfigError(f"--mesh must be three integers >= 1, got {args.mesh}")
    if not (args.displacement > 0 and math.isfinite(args.displacement)):
        raise ConfigError(f"--displacement must be a finite number > 0 Å, got {args.displacement}")
    if args.npoints < 2:
        raise ConfigError(f"--npoints must be >= 2, got {args.npoints}")
    inp = Path(args.input)
    out = Path(args.output_dir) if args.output_dir else inp.with_name(inp.stem + "_phonons")
    check_not_input(out, inp, args.model, what="--output-dir")
    frames, _ = read_structures(inp)
    atoms = frames[0]
    if not all(atoms.pbc):
        raise DataError(f"{inp}: frame 0 is not periodic in all three directions; phonons need a crystal")

    ph = Phonopy(_phonopy_atoms(atoms), supercell_matrix=np.diag(args.supercell), primitive_matrix=None)
    ph.generate_displacements(distance=args.displacement)
    calc = MLPotCalculator(args.model, device=args.device, dtype=args.dtype)
    forces = []
    for sc in ph.supercells_with_displacements:
        a = Atoms(numbers=sc.numbers, cell=sc.cell, scaled_positions=sc.scaled_positions, pbc=True)
        a.calc = calc
        f = a.get_forces()
        forces.append(f - f.mean(axis=0))  # remove the net force (drift) of each displaced supercell
    ph.forces = np.asarray(forces)
    ph.produce_force_constants()

    bp = atoms.cell.bandpath(npoints=args.npoints)
    kpts = bp.kpts
    ph.run_band_structure([kpts], labels=None)
    band = ph.get_band_structure_dict()
    dist, freqs = np.asarray(band["distances"][0]), np.asarray(band["frequencies"][0])
    ph.run_mesh(args.mesh, is_gamma_center=True)
    ph.run_total_dos()
    dos = ph.get_total_dos_dict()
    if not (np.all(np.isfinite(freqs)) and np.all(np.isfinite(dos["total_dos"]))):
        raise DataError(f"{inp}: non-finite phonon frequencies from the model; nothing written")

    out.mkdir(parents=True, exist_ok=True)
    header = "distance q_a q_b q_c " + " ".join(f"band{k}_THz" for k in range(freqs.shape[1]))
    rows = np.column_stack([dist, kpts, freqs])
    atomic_write_text(out / "band_frequencies.dat", "# " + header + "\n"
                      + "\n".join(" ".join(f"{v:.8g}" for v in r) for r in rows) + "\n")
    atomic_write_text(out / "dos.dat", "# frequency_THz total_dos\n" + "\n".join(
        f"{f:.8g} {d:.8g}" for f, d in zip(dos["frequency_points"], dos["total_dos"])) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, xt, labels = bp.get_linear_kpoint_axis()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(dist / dist[-1] * x[-1], freqs, color="C0", lw=1)
    ax.set_xticks(xt, [lb.replace("G", "Γ") for lb in labels])
    for t in xt:
        ax.axvline(t, color="0.8", lw=0.5)
    ax.axhline(0, color="0.5", lw=0.5)
    ax.set_xlim(0, x[-1])
    ax.set_ylabel("frequency (THz)")
    ax.set_title(f"{atoms.get_chemical_formula()} phonons ({'x'.join(map(str, args.supercell))} supercell)")
    fig.tight_layout()
    _save_figure(fig, out / "band_structure.png")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot(dos["frequency_points"], dos["total_dos"], color="C1")
    ax.set_xlabel("frequency (THz)")
    ax.set_ylabel("DOS (states/THz)")
    fig.tight_layout()
    _save_figure(fig, out / "dos.png")
    plt.close(fig)

    gamma = freqs[0]
    print(f"{len(ph.supercells_with_displacements)} displaced supercells of {len(ph.supercell)} atoms; "
          f"path {bp.path}; frequencies {freqs.min():.3f} .. {freqs.max():.3f} THz "
          f"(at Γ: {', '.join(f'{v:.3f}' for v in gamma[:3])} ...)")
    print(f"wrote {out}/band_structure.png, dos.png, band_frequencies.dat, dos.dat")
    return 0
