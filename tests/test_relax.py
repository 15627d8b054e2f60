"""`mlpot relax`, the relaxation helpers and batched FIRE."""
from __future__ import annotations

import os
import sys

import ase.io
import numpy as np
import pytest
from ase import Atoms, units

sys.path.insert(0, os.path.dirname(__file__))
from sim_helpers import ToyMP, rattled_cu  # noqa: E402

from mlpot.calculators import MLPotCalculator  # noqa: E402
from mlpot.cli.main import main  # noqa: E402
from mlpot.sim.batched_fire import batched_fire_relax  # noqa: E402
from mlpot.sim.relax import relax_atoms  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return ToyMP(r_max=4.0, atomic_numbers=[29], num_layers=2, seed=0)


@pytest.fixture
def model_file(model, tmp_path):
    path = tmp_path / "toy.pt"
    model.save(path)
    return str(path)


def _frames():
    return [rattled_cu((1, 1, 2), a=3.7, stdev=0.1, seed=s) for s in range(2)]


def _fmax(atoms, model, cell=False):
    atoms = atoms.copy()
    atoms.calc = MLPotCalculator(model, device="cpu", dtype="float64")
    f = atoms.get_forces()
    return np.sqrt((f**2).sum(1)).max(), atoms


def test_cli_relax_cell_end_to_end(model, model_file, tmp_path, capsys):
    inp = tmp_path / "start.xyz"
    frames = _frames()
    ase.io.write(inp, frames)
    out = tmp_path / "relaxed.xyz"
    rc = main(["relax", str(inp), "--model", model_file, "--fmax", "0.01", "--cell", "--output", str(out),
               "--quiet", "--trajectory", str(tmp_path / "r.traj")])
    assert rc == 0
    text = capsys.readouterr().out
    assert "converged" in text and text.count(" yes") == 2
    relaxed = ase.io.read(out, ":")
    assert len(relaxed) == 2
    for a0, a in zip(frames, relaxed):
        fm, a = _fmax(a, model)
        assert fm < 0.01
        assert np.abs(a.get_stress()).max() < 0.01 / a.get_volume() ** (1 / 3) * 5  # cell forces converged
        e0 = _fmax(a0, model)[1].get_potential_energy()
        assert a.get_potential_energy() < e0
    assert len(ase.io.read(tmp_path / "r.traj", ":")) > 2


def test_cell_relax_under_pressure_balances_stress(model):
    atoms = rattled_cu((1, 1, 1), a=3.7, stdev=0.02, seed=1)
    calc = MLPotCalculator(model, device="cpu", dtype="float64")
    p_gpa = 2.0
    r = relax_atoms(atoms, calc, fmax=1e-3, steps=400, cell=True, pressure_gpa=p_gpa)
    assert r.converged
    s = atoms.get_stress(voigt=False)
    # at equilibrium under external pressure p: stress = -p * I
    np.testing.assert_allclose(s, -p_gpa * units.GPa * np.eye(3), atol=5e-4)
    r0 = relax_atoms(a0 := rattled_cu((1, 1, 1), a=3.7, stdev=0.02, seed=1), calc, fmax=1e-3, steps=400, cell=True)
    assert r0.converged and atoms.get_volume() < a0.get_volume()


def test_non_convergence_is_reported_with_exit_code_3(model_file, tmp_path, capsys):
    inp = tmp_path / "start.xyz"
    ase.io.write(inp, _frames()[0])
    rc = main(["relax", str(inp), "--model", model_file, "--steps", "2", "--quiet"])
    assert rc == 3
    assert " NO" in capsys.readouterr().out
    assert (tmp_path / "start_relaxed.xyz").exists()


@pytest.mark.parametrize("fmt,name", [("vasp", "POSCAR"), ("cif", "start.cif"), (None, "start.json")])
def test_input_formats_round_trip(model, model_file, tmp_path, fmt, name):
    atoms = _frames()[0]
    inp = tmp_path / name
    if fmt is None:
        from pymatgen.io.ase import AseAtomsAdaptor

        inp.write_text(AseAtomsAdaptor.get_structure(atoms).to_json())
    else:
        ase.io.write(inp, atoms, format=fmt)
    assert main(["relax", str(inp), "--model", model_file, "--fmax", "0.02", "--quiet"]) == 0
    outs = [p for p in tmp_path.iterdir() if "relaxed" in p.name]
    assert len(outs) == 1
    if fmt is None:
        from pymatgen.core import Structure
        from pymatgen.io.ase import AseAtomsAdaptor

        out = AseAtomsAdaptor.get_atoms(Structure.from_file(str(outs[0])))
    else:
        out = ase.io.read(outs[0], format=fmt)
    assert len(out) == len(atoms)
    assert _fmax(out, model)[0] < 0.02 + 1e-4  # text formats round positions


def test_unknown_element_and_bad_file_give_clear_errors(model_file, tmp_path, capsys):
    inp = tmp_path / "au.xyz"
    ase.io.write(inp, Atoms("Au2", positions=[[0, 0, 0], [2.6, 0, 0]]))
    assert main(["relax", str(inp), "--model", model_file, "--quiet"]) == 1
    assert "Au" in capsys.readouterr().err
    bad = tmp_path / "bad.xyz"
    bad.write_text("2\n\nCu 0 0 0\nCu nan 0 0\n")
    assert main(["relax", str(bad), "--model", model_file]) == 1
    assert "bad.xyz" in capsys.readouterr().err


def test_batched_fire_follows_ase_fire_per_structure(model):
    frames = [rattled_cu((1, 1, 2), a=3.6, stdev=0.1, seed=s) for s in range(3)]
    frames.append(Atoms("Cu3", positions=[[0, 0, 0], [2.3, 0, 0], [1.0, 2.2, 0.3]]))  # a molecule in the mix
    res = batched_fire_relax(model, frames, fmax=0.01, steps=300, max_atoms=20)  # forces continuous batching
    calc = MLPotCalculator(model, device="cpu", dtype="float64")
    for k, a in enumerate(frames):
        ref = a.copy()
        r = relax_atoms(ref, calc, fmax=0.01, steps=300, optimizer="FIRE")
        assert res.converged[k] and r.converged
        assert res.steps[k] == r.steps
        np.testing.assert_allclose(res.atoms[k].positions, ref.positions, atol=1e-7)
        assert res.e_final[k] == pytest.approx(r.e_final, abs=1e-8)
    assert res.model_calls < sum(res.steps) + len(frames)


def test_cli_relax_batched(model_file, tmp_path):
    inp = tmp_path / "start.xyz"
    ase.io.write(inp, _frames())
    assert main(["relax", str(inp), "--model", model_file, "--batched", "--output", str(tmp_path / "o.xyz")]) == 0
    assert len(ase.io.read(tmp_path / "o.xyz", ":")) == 2
