"""MLPotCalculator: forces/stress vs finite differences, symmetry, skin reuse, bad input."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
from ase import Atoms
from ase.calculators.calculator import PropertyNotImplementedError
from ase.calculators.fd import calculate_numerical_forces, calculate_numerical_stress

sys.path.insert(0, os.path.dirname(__file__))
from sim_helpers import ToyMP, random_rotation, rattled_cu  # noqa: E402

from mlpot.calculators import MLPotCalculator  # noqa: E402
from mlpot.errors import UnknownElementError  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return ToyMP(r_max=4.0, atomic_numbers=[1, 8, 29], num_layers=2)


def _water_cluster():
    return Atoms(
        "OH2OH2",
        positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0], [2.8, 0.1, 0.2], [3.3, 0.9, 0.1], [3.2, -0.7, 0.4]],
    )


def test_forces_match_finite_differences_molecule_and_crystal(model):
    calc = MLPotCalculator(model, device="cpu", dtype="float64")
    for atoms in (_water_cluster(), rattled_cu((1, 1, 2))):
        atoms.calc = calc
        f = atoms.get_forces()
        fd = calculate_numerical_forces(atoms, eps=1e-4)
        assert np.abs(f).max() > 1e-3  # not trivially zero
        np.testing.assert_allclose(f, fd, atol=1e-6, rtol=1e-5)
        e_atoms = atoms.get_potential_energies()
        assert e_atoms.shape == (len(atoms),)
        assert atoms.get_potential_energy() == pytest.approx(e_atoms.sum(), abs=1e-10)


def test_stress_matches_finite_strain(model):
    atoms = rattled_cu((1, 1, 2))
    atoms.set_cell(atoms.cell.array @ np.array([[1.0, 0.03, 0.0], [0.0, 1.02, 0.01], [0.0, 0.0, 0.98]]),
                   scale_atoms=True)
    calc = MLPotCalculator(model, device="cpu", dtype="float64")
    atoms.calc = calc
    s = atoms.get_stress()
    s_num = calculate_numerical_stress(atoms, eps=1e-5)
    assert np.abs(s).max() > 1e-4
    np.testing.assert_allclose(s, s_num, atol=1e-7)


def test_stress_unavailable_for_molecules(model):
    atoms = _water_cluster()
    atoms.calc = MLPotCalculator(model, device="cpu")
    with pytest.raises(PropertyNotImplementedError):
        atoms.get_stress()


def test_rotation_invariance_and_force_covariance(model):
    calc = MLPotCalculator(model, device="cpu", dtype="float64")
    atoms = rattled_cu((1, 1, 2))
    atoms.calc = calc
    e0, f0, s0 = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress(voigt=False)
    R = random_rotation(3)
    rot = atoms.copy()
    rot.set_cell(atoms.cell.array @ R.T, scale_atoms=False)
    rot.positions = atoms.positions @ R.T
    rot.calc = calc
    assert rot.get_potential_energy() == pytest.approx(e0, abs=1e-9)
    np.testing.assert_allclose(rot.get_forces(), f0 @ R.T, atol=1e-9)
    np.testing.assert_allclose(rot.get_stress(voigt=False), R @ s0 @ R.T, atol=1e-9)


def test_skin_reuse_equals_rebuild(model):
    atoms = rattled_cu((2, 2, 2))
    fresh = MLPotCalculator(model, device="cpu", dtype="float64", skin=0.0)
    reuse = MLPotCalculator(model, device="cpu", dtype="float64", skin=0.6)
    rng = np.random.default_rng(0)
    for step in range(6):
        atoms.positions += rng.normal(scale=0.03, size=atoms.positions.shape)
        a1, a2 = atoms.copy(), atoms.copy()
        a1.calc, a2.calc = fresh, reuse
        assert a2.get_potential_energy() == pytest.approx(a1.get_potential_energy(), abs=1e-10)
        np.testing.assert_allclose(a2.get_forces(), a1.get_forces(), atol=1e-10)
        np.testing.assert_allclose(a2.get_stress(), a1.get_stress(), atol=1e-12)
    assert fresh.nl_builds == 6
    assert reuse.nl_builds < 6  # moves of ~0.05 Å per step stay inside skin/2 for a while
    # a cell change forces a rebuild
    n = reuse.nl_builds
    atoms.set_cell(atoms.cell.array * 1.01, scale_atoms=True)
    atoms.calc = reuse
    atoms.get_potential_energy()
    assert reuse.nl_builds == n + 1


def test_atom_count_and_species_change_between_calls(model):
    calc = MLPotCalculator(model, device="cpu", skin=0.5)
    small = rattled_cu((1, 1, 1))
    big = rattled_cu((2, 1, 1))
    small.calc = calc
    e_small = small.get_potential_energy()
    big.calc = calc
    e_big = big.get_potential_energy()
    assert big.get_forces().shape == (len(big), 3)
    mol = _water_cluster()
    mol.calc = calc
    assert mol.get_forces().shape == (6, 3)
    small.calc = calc
    assert small.get_potential_energy() == pytest.approx(e_small, abs=1e-10)
    assert e_big != pytest.approx(e_small)


def test_unknown_element_is_named(model):
    atoms = Atoms("CuAu", positions=[[0, 0, 0], [2.5, 0, 0]])
    atoms.calc = MLPotCalculator(model, device="cpu")
    with pytest.raises(UnknownElementError, match="Au"):
        atoms.get_potential_energy()


def test_descriptors_are_invariant(model):
    calc = MLPotCalculator(model, device="cpu")
    atoms = _water_cluster()
    d = calc.get_descriptors(atoms)
    assert d.shape[0] == len(atoms)
    R = random_rotation(5)
    rot = atoms.copy()
    rot.positions = atoms.positions @ R.T + 1.0
    np.testing.assert_allclose(calc.get_descriptors(rot), d, atol=1e-10)


def test_model_file_and_float32(model, tmp_path):
    path = tmp_path / "toy.pt"
    model.save(path)
    atoms = rattled_cu((1, 1, 2))
    atoms.calc = MLPotCalculator(str(path), device="cpu", dtype="float32")
    e32 = atoms.get_potential_energy()
    atoms.calc = MLPotCalculator(model, device="cpu", dtype="float64")
    assert e32 == pytest.approx(atoms.get_potential_energy(), abs=1e-4)


def test_compile_is_refused_not_silently_dropped(model):
    """torch.compile of mlpot models does not work yet: compile=True is a ConfigError up front,
    never a warning and an eager run."""
    from mlpot.errors import ConfigError

    with pytest.raises(ConfigError, match="torch.compile"):
        MLPotCalculator(model, device="cpu", compile=True)
    assert MLPotCalculator(model, device="cpu", compile=False).model is not None


@pytest.mark.parametrize("skin", [0.0, 0.6])
def test_graph_edges_grouped_by_receiver_are_the_neighbor_list(model, skin):
    """The calculator hands the model its edges sorted by receiver (what the grouped message
    passing reads without a gather), and they are exactly the pairs of the neighbour list."""
    from mlpot.data.neighbors import neighbor_list

    atoms = rattled_cu((2, 2, 2))
    calc = MLPotCalculator(model, device="cpu", dtype="float64", skin=skin)
    for _ in range(2):  # a fresh list, then (with a skin) the reused, filtered one
        atoms.positions += 0.01
        g = calc.build_graph(atoms)
        sender, receiver = g["edge_index"].numpy()
        assert len(receiver) > 0 and np.all(np.diff(receiver) >= 0)
        i, j, S = neighbor_list(atoms.positions, model.r_max, cell=atoms.cell.array, pbc=atoms.pbc)
        expected = sorted(zip(i.tolist(), j.tolist(), map(tuple, S.tolist())))
        got = sorted(zip(sender.tolist(), receiver.tolist(), map(tuple, g["unit_shifts"].long().tolist())))
        assert got == expected
