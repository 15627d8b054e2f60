"""ML-IAP unified export: per-pair forces summed as LAMMPS does equal the calculator's forces."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from sim_helpers import ToyMP, rattled_cu  # noqa: E402

from mlpot.calculators import MLPotCalculator  # noqa: E402
from mlpot.data.neighbors import neighbor_list  # noqa: E402
from mlpot.lammps import MLPotMLIAP, export_mliap, load_mliap  # noqa: E402


class MockMLIAPData:
    """What LAMMPS's MLIAPDataPy offers, for one process: local atoms, ghost atoms (periodic
    images, each a separate index >= nlocal, tag = owner tag), the pair list of local atoms."""

    def __init__(self, atoms, cutoff, element_types, with_tags=True, permute_tags=True):
        n = len(atoms)
        i, j, S = (x.numpy() for x in neighbor_list(atoms.positions, cutoff, atoms.cell.array, atoms.pbc))
        ghosts = {}
        jatoms = np.empty(len(i), dtype=np.int64)
        for p, (jj, s) in enumerate(zip(j, map(tuple, S))):
            if s == (0, 0, 0):
                jatoms[p] = jj
            else:
                jatoms[p] = ghosts.setdefault((jj, s), n + len(ghosts))
        self.nlocal = self.nlistatoms = n
        self.ntotal = n + len(ghosts)
        self.npairs = len(i)
        self.pair_i = i.astype(np.int32)
        self.pair_j = self.jatoms = jatoms.astype(np.int32)
        self.owner = np.concatenate([np.arange(n), np.array([k[0] for k in ghosts], dtype=np.int64)])
        tags = (np.random.default_rng(0).permutation(n) if permute_tags else np.arange(n)) + 1
        self.jtags = tags[self.owner[jatoms]].astype(np.int32) if with_tags else None
        self.rij = atoms.positions[j] + S @ atoms.cell.array - atoms.positions[i]
        zmap = {z: k for k, z in enumerate(element_types)}
        from ase.data import chemical_symbols

        self.elems = np.array([zmap[chemical_symbols[z]] for z in atoms.numbers[self.owner]], dtype=np.int32)
        self.f = np.zeros((self.ntotal, 3))
        self.energy = None
        self.eatoms = None

    def update_pair_forces(self, fij):
        assert fij.shape == (self.npairs, 3) and fij.dtype == np.float64
        self.fij = fij.copy()
        np.add.at(self.f, self.pair_i, fij)
        np.add.at(self.f, self.pair_j, -fij)

    def local_forces(self):
        """Reverse communication (newton on): ghost forces are added to their owners."""
        out = np.zeros((self.nlocal, 3))
        np.add.at(out, self.owner, self.f)
        return out


def _compare(model, atoms, **mock_kw):
    calc = MLPotCalculator(model, device="cpu", dtype="float64")
    atoms.calc = calc
    mliap = MLPotMLIAP(model, device="cpu", dtype="float64")
    assert mliap.rcutfac == pytest.approx(model.r_max / 2)
    data = MockMLIAPData(atoms, 2 * mliap.rcutfac, mliap.element_types, **mock_kw)
    assert data.ntotal > data.nlocal  # there are ghosts
    mliap.compute_forces(data)
    assert data.energy == pytest.approx(atoms.get_potential_energy(), abs=1e-9)
    np.testing.assert_allclose(data.eatoms, atoms.get_potential_energies(), atol=1e-9)
    f = atoms.get_forces()
    assert np.abs(f).max() > 1e-3
    np.testing.assert_allclose(data.local_forces(), f, atol=1e-9)
    # the virial LAMMPS tallies from the pairs: dE/dstrain = sum_p rij (x) fij = V * stress (ASE sign)
    dE_dstrain = np.einsum("pa,pb->ab", data.rij, data.fij)
    np.testing.assert_allclose(0.5 * (dE_dstrain + dE_dstrain.T) / atoms.get_volume(),
                               atoms.get_stress(voigt=False), atol=1e-9)
    return mliap, data


@pytest.fixture(scope="module")
def two_species_model():
    return ToyMP(r_max=3.2, atomic_numbers=[29, 79], num_layers=2, seed=3)


def _cuau():
    atoms = rattled_cu((2, 2, 1), a=3.7, stdev=0.08, seed=4)
    atoms.numbers[::3] = 79
    return atoms


def test_fold_mode_two_layers_matches_calculator(two_species_model):
    mliap, data = _compare(two_species_model, _cuau())


def test_one_atom_cell_all_neighbours_are_ghosts():
    from ase.build import bulk

    model = ToyMP(r_max=3.2, atomic_numbers=[29], num_layers=2, seed=1)
    atoms = bulk("Cu", "fcc", a=3.6)
    atoms.positions += 0.01
    calc = MLPotCalculator(model, device="cpu", dtype="float64")
    atoms.calc = calc
    mliap = MLPotMLIAP(model)
    data = MockMLIAPData(atoms, model.r_max, mliap.element_types)
    mliap.compute_forces(data)
    assert data.energy == pytest.approx(atoms.get_potential_energy(), abs=1e-9)


def test_local_mode_for_one_layer_without_tags():
    model = ToyMP(r_max=3.2, atomic_numbers=[29, 79], num_layers=1, seed=2)
    _compare(model, _cuau(), with_tags=False)


def test_multilayer_without_owner_information_is_an_error(two_species_model):
    mliap = MLPotMLIAP(two_species_model)
    data = MockMLIAPData(_cuau(), two_species_model.r_max, mliap.element_types, with_tags=False)
    with pytest.raises(RuntimeError, match="one MPI rank"):
        mliap.compute_forces(data)


@pytest.mark.parametrize("name", ["model.mliap.pkl", "model-mliap.pt"])
def test_export_roundtrip_and_cli(two_species_model, tmp_path, name):
    from mlpot.cli.main import main

    src = tmp_path / "toy.pt"
    two_species_model.save(src)
    out = tmp_path / name
    assert main(["export-lammps", str(src), str(out)]) == 0
    obj = load_mliap(out)
    assert obj.element_types == ["Cu", "Au"]
    atoms = _cuau()
    data = MockMLIAPData(atoms, 2 * obj.rcutfac, obj.element_types)
    obj.compute_forces(data)
    atoms.calc = MLPotCalculator(two_species_model, device="cpu", dtype="float64")
    np.testing.assert_allclose(data.local_forces(), atoms.get_forces(), atol=1e-9)
    export_mliap(two_species_model, tmp_path / "again.pkl")
    assert load_mliap(tmp_path / "again.pkl").ndescriptors == 1
