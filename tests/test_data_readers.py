"""Readers: units of the shared DFT data, key fallbacks, and clear errors on bad input."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from mlpot.data import from_pymatgen, read
from mlpot.errors import DataError, UnknownElementError

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MLPOT_SHARED", REPO.parent / "shared")) / "data"
needs_data = pytest.mark.skipif(not SHARED.is_dir(), reason="shared DFT data not available")

KCAL_MOL_EV = 0.0433641  # 1 kcal/mol in eV (to 6 significant digits)


# ----------------------------------------------------------------------------- shared data
@needs_data
@pytest.mark.parametrize("name", ["ethanol", "aspirin"])
def test_rmd17_units(name):
    path = SHARED / "rmd17" / f"rmd17_{name}_train_01.npz"
    raw = np.load(path)
    frames = read(path, require=("energy", "forces"))
    assert len(frames) == len(raw["energies"]) == 1000
    k = 17
    a = frames[k]
    assert np.array_equal(a.numbers, raw["nuclear_charges"])
    np.testing.assert_allclose(a.positions, raw["coords"][k])
    np.testing.assert_allclose(a.get_potential_energy(), raw["energies"][k] * KCAL_MOL_EV, rtol=2e-6)
    np.testing.assert_allclose(a.get_forces(), raw["forces"][k] * KCAL_MOL_EV, rtol=2e-6)
    assert not a.pbc.any()
    # explicit units: eV means no conversion
    b = read(path, index="17", energy_unit="eV")[0]
    assert b.get_potential_energy() == pytest.approx(raw["energies"][k])


def _raw_xyz_frame(path: Path, k: int):
    """Parse frame k of a plain extxyz file by hand: (energy, symbols, positions, forces)."""
    lines = path.read_text().splitlines()
    pos = 0
    for _ in range(k):
        pos += int(lines[pos]) + 2
    n = int(lines[pos])
    header = lines[pos + 1]
    energy = float(header.split("energy=")[1].split()[0])
    rows = [line.split() for line in lines[pos + 2 : pos + 2 + n]]
    syms = [r[0] for r in rows]
    arr = np.array([[float(x) for x in r[1:]] for r in rows])
    return energy, syms, arr[:, :3], arr[:, 3:6] if arr.shape[1] >= 6 else None


@needs_data
@pytest.mark.parametrize(
    "rel,n_frames",
    [("acac/train_300K.xyz", 500), ("3bpa/train_300K.xyz", 500), ("acac/isolated_atoms.xyz", None)],
)
def test_extxyz_energy_forces_from_calc(rel, n_frames):
    path = SHARED / rel
    frames = read(path)
    if n_frames is not None:
        assert len(frames) == n_frames
    k = len(frames) // 2
    energy, syms, pos, forces = _raw_xyz_frame(path, k)
    a = frames[k]
    assert a.get_chemical_symbols() == syms
    np.testing.assert_allclose(a.positions, pos)
    assert a.get_potential_energy() == pytest.approx(energy, rel=1e-12)  # already eV
    if forces is not None:
        np.testing.assert_allclose(a.get_forces(), forces)
        assert a.info["forces_weight"] == 1.0
    else:
        assert a.info["forces_weight"] == 0.0
    assert isinstance(a.info["config_type"], str)


@needs_data
def test_mlearn_si_units_and_stress_sign():
    path = SHARED / "mlearn" / "Si" / "training.json"
    raw = json.loads(path.read_text())
    frames = read(path, require=("energy", "forces", "stress"))
    assert len(frames) == len(raw) == 214
    kbar = 0.1 * 1.0 / 160.21766208  # eV/Å^3 per kbar (1 eV/Å^3 = 160.2177 GPa)
    k = 3
    a, item = frames[k], raw[k]
    assert a.get_potential_energy() == pytest.approx(item["outputs"]["energy"])
    np.testing.assert_allclose(a.get_forces(), np.array(item["outputs"]["forces"]))
    vs = np.array(item["outputs"]["virial_stress"])  # VASP: xx yy zz xy yz zx, kbar, pressure sign
    expected = -np.array([vs[0], vs[1], vs[2], vs[4], vs[5], vs[3]]) * kbar
    np.testing.assert_allclose(a.get_stress(), expected, rtol=1e-6)
    assert a.pbc.all()
    # sign check from the physics: on the uniaxially strained elastic set,
    # sigma_xx = (1/V) dE/d(eps_xx) = (a_x / V) dE/da_x, so
    # E(a2) - E(a1) = int sigma_xx V / a_x da_x, compared with the trapezoid rule.
    el = [f for f in frames if f.info["config_type"] == "Elastic"]
    groups = {}
    for f in el:
        c = f.cell.array
        if np.allclose(c - np.diag(np.diag(c)), 0) and np.allclose(c[1, 1], c[2, 2]) and not np.isclose(c[0, 0], c[1, 1]):
            groups[round(c[0, 0], 4)] = f
    xs = sorted(groups)
    assert len(xs) >= 5

    def g(x):
        return groups[x].get_stress()[0] * groups[x].get_volume() / x

    checked = 0
    for lo, hi in zip(xs, xs[1:]):
        dE = groups[hi].get_potential_energy() - groups[lo].get_potential_energy()
        assert 0.5 * (hi - lo) * (g(lo) + g(hi)) == pytest.approx(dE, rel=0.02, abs=0.03)
        checked += 1
    assert checked >= 3


@needs_data
def test_isolated_atoms_and_key_options(tmp_path):
    iso = read(SHARED / "3bpa" / "iso_atoms.xyz")
    assert sorted(len(a) for a in iso) == [1, 1, 1, 1]
    assert {a.get_chemical_symbols()[0] for a in iso} == {"C", "H", "N", "O"}


# ----------------------------------------------------------------------------- key fallbacks
def _write_xyz(path, text):
    path.write_text(text)
    return path


def test_ref_keys_virials_weights_and_config_type(tmp_path):
    p = _write_xyz(
        tmp_path / "a.xyz",
        "2\n"
        'Lattice="4 0 0 0 4 0 0 0 4" Properties=species:S:1:pos:R:3:REF_forces:R:3 REF_energy=-3.5 '
        'REF_virials="1 0 0 0 2 0 0 0 3" config_type=bulk config_weight=2.0 pbc="T T T"\n'
        "Si 0 0 0 0.1 0.2 0.3\n"
        "Si 1 1 1 -0.1 -0.2 -0.3\n",
    )
    (a,) = read(p, require=("energy", "forces", "stress"))
    assert a.get_potential_energy() == -3.5
    np.testing.assert_allclose(a.get_forces()[0], [0.1, 0.2, 0.3])
    np.testing.assert_allclose(a.get_stress(), -np.array([1, 2, 3, 0, 0, 0]) / 64.0)  # stress = -W/V
    assert a.info["config_type"] == "bulk" and a.info["weight"] == 2.0
    assert a.info["stress_weight"] == 1.0
    # explicit keys and units
    (b,) = read(p, energy_key="REF_energy", energy_unit="kcal/mol")
    assert b.get_potential_energy() == pytest.approx(-3.5 * KCAL_MOL_EV, rel=1e-5)


def test_ase_db_and_pymatgen(tmp_path):
    from ase.db import connect
    from pymatgen.core import Lattice, Structure

    atoms = Atoms("H2O", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    atoms.calc = SinglePointCalculator(atoms, energy=-14.2, forces=np.ones((3, 3)))
    with connect(tmp_path / "d.db") as db:
        db.write(atoms)
    (a,) = read(tmp_path / "d.db", require=("energy", "forces"))
    assert a.get_potential_energy() == pytest.approx(-14.2)
    st = Structure(Lattice.cubic(5.43), ["Si", "Si"], [[0, 0, 0], [0.25, 0.25, 0.25]])
    (s,) = from_pymatgen([st], energies=[-10.8], stresses=[np.eye(3) * 0.01])
    assert s.pbc.all() and s.get_potential_energy() == -10.8
    np.testing.assert_allclose(s.get_stress(), [0.01, 0.01, 0.01, 0, 0, 0])
    np.testing.assert_allclose(s.cell.array, np.eye(3) * 5.43)


# ----------------------------------------------------------------------------- bad input
FRAME_OK = '3\nProperties=species:S:1:pos:R:3:forces:R:3 energy=-1.0 pbc="F F F"\nH 0 0 0 0 0 0\nH 0 0 1 0 0 0\nO 0 1 0 0 0 0\n'


@pytest.mark.parametrize(
    "frame,match,exc",
    [
        ('3\nProperties=species:S:1:pos:R:3:forces:R:3 energy=-1.0 pbc="F F F"\nH 0 0 0 0 0 0\nH 0 nan 1 0 0 0\nO 0 1 0 0 0 0\n', "non-finite position", DataError),
        ('3\nProperties=species:S:1:pos:R:3:forces:R:3 energy=-1.0 pbc="F F F"\nH 0 0 0 0 0 0\nQx 0 0 1 0 0 0\nO 0 1 0 0 0 0\n', "unknown element", UnknownElementError),
        ('3\nProperties=species:S:1:pos:R:3:forces:R:3 pbc="F F F"\nH 0 0 0 0 0 0\nH 0 0 1 0 0 0\nO 0 1 0 0 0 0\n', "missing required target 'energy'", DataError),
        ('3\nProperties=species:S:1:pos:R:3 energy=-1.0 pbc="F F F"\nH 0 0 0\nH 0 0 1\nO 0 1 0\n', "missing required target 'forces'", DataError),
        ('3\nLattice="1 0 0 2 0 0 0 0 1" Properties=species:S:1:pos:R:3:forces:R:3 energy=-1.0 pbc="T T T"\nH 0 0 0 0 0 0\nH 0 0 1 0 0 0\nO 0 1 0 0 0 0\n', "singular cell", DataError),
        ('0\nProperties=species:S:1:pos:R:3 energy=-1.0 pbc="F F F"\n', "empty structure", DataError),
        ('3\nProperties=species:S:1:pos:R:3:forces:R:3 energy=inf pbc="F F F"\nH 0 0 0 0 0 0\nH 0 0 1 0 0 0\nO 0 1 0 0 0 0\n', "non-finite energy", DataError),
    ],
)
def test_bad_frames_name_file_and_frame(tmp_path, frame, match, exc):
    p = _write_xyz(tmp_path / "bad.xyz", FRAME_OK + FRAME_OK + frame)
    with pytest.raises(exc, match=match) as info:
        read(p, require=("energy", "forces"))
    msg = str(info.value)
    assert "bad.xyz" in msg and "frame 2" in msg


def test_forces_shape_mismatch(tmp_path):
    a = Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.7]])
    a.calc = SinglePointCalculator(a, energy=-1.0, forces=np.zeros((3, 3)))
    from mlpot.data import validate_atoms

    with pytest.raises(DataError, match=r"frame 4: forces shape \(3, 3\)"):
        validate_atoms(a, source="x.traj", frame=4)
    # npz with wrong forces shape
    p = tmp_path / "m.npz"
    np.savez(p, nuclear_charges=np.array([1, 1]), coords=np.zeros((2, 2, 3)), energies=np.zeros(2),
             forces=np.zeros((2, 3, 3)))
    with pytest.raises(DataError, match=r"m.npz: frame 0: forces shape"):
        read(p)


def test_mlearn_bad_record_and_missing_file(tmp_path):
    p = tmp_path / "x.json"
    p.write_text(json.dumps([{"structure": {"bad": 1}, "outputs": {}}]))
    with pytest.raises(DataError, match="x.json: frame 0"):
        read(p)
    with pytest.raises(FileNotFoundError):
        read(tmp_path / "nope.xyz")
