"""`mlpot phonons`: phonopy finite displacements with an mlpot model -> bands, DOS, PNGs."""
from __future__ import annotations

import os
import sys

import ase.io
import numpy as np
from ase import Atoms
from ase.build import bulk

sys.path.insert(0, os.path.dirname(__file__))
from sim_helpers import ToyMP  # noqa: E402

from mlpot.cli.main import main  # noqa: E402


def test_phonons_cli_writes_bands_dos_and_obeys_acoustic_sum_rule(tmp_path, capsys):
    model = tmp_path / "toy.pt"
    ToyMP(r_max=4.0, atomic_numbers=[29], num_layers=1, seed=0).save(model)
    inp = tmp_path / "cu.xyz"
    ase.io.write(inp, bulk("Cu", "fcc", a=3.6))  # primitive fcc cell, 1 atom
    out = tmp_path / "ph"
    assert main(["phonons", str(inp), "--model", str(model), "--supercell", "3", "3", "3",
                 "--mesh", "6", "6", "6", "--npoints", "31", "--output-dir", str(out)]) == 0
    assert "band_structure.png" in capsys.readouterr().out
    for png in ("band_structure.png", "dos.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bands = np.loadtxt(out / "band_frequencies.dat")
    assert bands.shape == (31, 4 + 3)  # distance, q (3), 3 branches for 1 atom
    gamma = np.where(np.abs(bands[:, 1:4]).sum(1) < 1e-12)[0]
    assert len(gamma) >= 1
    assert np.abs(bands[gamma, 4:]).max() < 0.05  # acoustic modes vanish at Γ (THz)
    assert bands[:, 4:].max() > 0.5  # and are real, non-zero elsewhere
    dos = np.loadtxt(out / "dos.dat")
    assert dos.shape[1] == 2 and np.all(dos[:, 1] >= 0) and dos[:, 1].max() > 0
    # cubic symmetry: the three branches at X are two degenerate transverse + one longitudinal
    x_rows = [k for k in range(len(bands)) if np.allclose(bands[k, 1:4], [0.5, 0.0, 0.5])]
    assert x_rows, "X = (1/2, 0, 1/2) is on ASE's fcc path"
    f = np.sort(bands[x_rows[0], 4:])
    assert abs(f[0] - f[1]) < 1e-3 and f[2] > f[1] + 0.1


def test_phonons_refuses_a_molecule(tmp_path, capsys):
    model = tmp_path / "toy.pt"
    ToyMP(r_max=4.0, atomic_numbers=[29], num_layers=1).save(model)
    inp = tmp_path / "mol.xyz"
    ase.io.write(inp, Atoms("Cu2", positions=[[0, 0, 0], [2.5, 0, 0]]))
    assert main(["phonons", str(inp), "--model", str(model)]) == 1
    err = capsys.readouterr().err.strip()
    assert "not periodic in all three directions" in err and str(inp) in err and "\n" not in err
