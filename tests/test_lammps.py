"""ML-IAP unified export on one LAMMPS rank: energies, per-atom energies (eatoms), per-pair
forces summed as LAMMPS does and the virial equal the calculator's, for MACE, ESCN and a toy
model, in every graph mode, on the mock of LAMMPS's side (:mod:`mlpot.lammps.mock`)."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
from ase.build import bulk

sys.path.insert(0, os.path.dirname(__file__))
from sim_helpers import ToyMP, rattled_cu  # noqa: E402

from mlpot.calculators import MLPotCalculator  # noqa: E402
from mlpot.lammps import MLPotMLIAP, export_mliap, load_mliap  # noqa: E402
from mlpot.lammps.mock import MockDecomposition  # noqa: E402
from mlpot.models import build_model  # noqa: E402
from mlpot.testing.model_checks import randomize_parameters  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _compare(model, atoms, mode="auto", flavour="numpy", tags=True, exchange=False, tol=1e-9, min_force=1e-3):
    """One rank: the mock's LAMMPS sums equal the calculator on the whole cell."""
    atoms = atoms.copy()
    atoms.calc = MLPotCalculator(model, device="cpu", dtype="float64")
    mliap = MLPotMLIAP(model, device="cpu", dtype="float64", mode=mode)
    assert mliap.rcutfac == pytest.approx(model.r_max / 2)
    dec = MockDecomposition(atoms, 2 * mliap.rcutfac, mliap.element_types, 1, flavour=flavour, tags=tags,
                            exchange=exchange)
    assert dec.ghost_counts()[0] > 0
    dec.run(mliap)
    assert dec.energy() == pytest.approx(atoms.get_potential_energy(), abs=tol)
    np.testing.assert_allclose(dec.atom_energies(), atoms.get_potential_energies(), rtol=0, atol=tol)
    f = atoms.get_forces()
    assert np.abs(f).max() >= min_force
    np.testing.assert_allclose(dec.forces(), f, rtol=0, atol=tol)
    w = dec.virial()
    np.testing.assert_allclose(0.5 * (w + w.T), -atoms.get_stress(voigt=False) * atoms.get_volume(),
                               rtol=0, atol=tol)
    return dec


@pytest.fixture(scope="module")
def two_species_model():
    return ToyMP(r_max=3.2, atomic_numbers=[29, 79], num_layers=2, seed=3)


def _cuau():
    atoms = rattled_cu((2, 2, 1), a=3.7, stdev=0.08, seed=4)
    atoms.numbers[::3] = 79
    return atoms


_REAL = {
    "MACE": dict(hidden_irreps="4x0e+4x1o", max_ell=2, correlation=3, num_interactions=2, num_bessel=4,
                 radial_MLP=[8], MLP_irreps="4x0e", avg_num_neighbors=10.0),
    "ESCN": dict(num_layers=2, lmax=2, mmax=1, sphere_channels=4, hidden_channels=4, edge_channels=4,
                 num_bessel=4),
}


@pytest.fixture(scope="module", params=sorted(_REAL))
def real_model(request):
    model = build_model(request.param, r_max=3.2, atomic_numbers=[29, 79], e0s={"Cu": -1.0, "Au": -2.0},
                        seed=5, **_REAL[request.param])
    return randomize_parameters(model, seed=6, scale=0.3).eval()


@pytest.mark.parametrize("mode, flavour, tags, exchange", [
    ("auto", "numpy", True, False),   # CPU build with jtags (2023-2024): auto folds
    ("fold", "numpy", True, True),
    ("auto", "numpy", False, True),   # current CPU build: auto exchanges
    ("auto", "torch", False, True),   # Kokkos build: auto exchanges, device arrays
])
def test_serial_real_models(real_model, mode, flavour, tags, exchange):
    dec = _compare(real_model, _cuau(), mode=mode, flavour=flavour, tags=tags, exchange=exchange, tol=1e-10)
    # auto folds when LAMMPS has no exchange, else exchanges (twice per layer boundary: fwd + bwd)
    assert dec.comm.calls == [2 if (exchange and mode == "auto") else 0]


def test_fold_mode_two_layers_matches_calculator(two_species_model):
    _compare(two_species_model, _cuau())


def test_one_atom_cell_all_neighbours_are_ghosts():
    model = ToyMP(r_max=3.2, atomic_numbers=[29], num_layers=2, seed=1)
    atoms = bulk("Cu", "fcc", a=3.6)
    atoms.positions += 0.01
    dec = _compare(model, atoms, tol=1e-9, min_force=0.0)  # one atom per cell: no force, a stress
    assert dec.ranks[0].nlocal == 1 and abs(dec.virial()).max() > 1e-3


def test_local_mode_for_one_layer_without_tags():
    model = ToyMP(r_max=3.2, atomic_numbers=[29, 79], num_layers=1, seed=2)
    _compare(model, _cuau(), tags=False)


def test_multilayer_without_owner_information_is_an_error(two_species_model):
    mliap = MLPotMLIAP(two_species_model)
    dec = MockDecomposition(_cuau(), two_species_model.r_max, mliap.element_types, 1, tags=False, exchange=False)
    with pytest.raises(RuntimeError, match="one MPI rank"):
        dec.run(mliap)


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
    dec = MockDecomposition(atoms, 2 * obj.rcutfac, obj.element_types, 1, tags=True, exchange=False)
    dec.run(obj, copy_model=False)
    atoms.calc = MLPotCalculator(two_species_model, device="cpu", dtype="float64")
    np.testing.assert_allclose(dec.forces(), atoms.get_forces(), atol=1e-9)
    export_mliap(two_species_model, tmp_path / "again.pkl")
    assert load_mliap(tmp_path / "again.pkl").ndescriptors == 1


def test_bad_mode_is_one_clear_error(two_species_model, tmp_path, capsys):
    from mlpot.cli.main import main

    src = tmp_path / "toy.pt"
    two_species_model.save(src)
    # a model without the layer hook cannot be exported for the exchange mode
    rc = main(["export-lammps", str(src), str(tmp_path / "x.pkl"), "--mode", "exchange"])
    assert rc != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "between_layers" in err[0]
    assert not (tmp_path / "x.pkl").exists()


def test_fold_does_not_mistake_another_ranks_atom_for_an_own_image():
    """Rank 0 holds one Cu atom whose only neighbour is an Au atom of rank 1: the lone unmatched
    ghost tag is not an image of the local atom, so fold refuses instead of folding it in."""
    from ase import Atoms

    atoms = Atoms("CuAu", positions=[[4.5, 2.0, 2.0], [5.8, 2.0, 2.0]], cell=[10.0, 4.0, 4.0], pbc=True)
    model = ToyMP(r_max=3.0, atomic_numbers=[29, 79], num_layers=2, seed=1)
    mliap = MLPotMLIAP(model, mode="fold")
    dec = MockDecomposition(atoms, model.r_max, mliap.element_types, 2, tags=True, exchange=False)
    assert [d.nlocal for d in dec.ranks] == [1, 1] and [d.npairs for d in dec.ranks] == [1, 1]
    with pytest.raises(RuntimeError, match="one MPI rank"):
        dec.run(mliap)
