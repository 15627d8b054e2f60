"""LAMMPS ML-IAP across MPI ranks: the exchange mode on the mock decomposition
(:mod:`mlpot.lammps.mock`) gives the whole cell's energy, forces, per-atom energies and virial
for multi-layer MACE and ESCN (and MACE with ZBL), in 2 and 4 slabs, numpy (CPU build) and
device-array (Kokkos build) flavours, including a cell narrower than two cutoffs."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import bulk

from mlpot.calculators import MLPotCalculator
from mlpot.errors import ConfigError
from mlpot.lammps import MLPotMLIAP, export_mliap, load_mliap
from mlpot.lammps.mliap import _as_tensor
from mlpot.lammps.mock import DeviceArray, MockDecomposition
from mlpot.models import build_model
from mlpot.testing.model_checks import randomize_parameters

pytestmark = pytest.mark.usefixtures("one_torch_thread")

R_MAX = 3.0
TOL = 1e-10

_MODELS = {
    "mace2": ("MACE", dict(hidden_irreps="4x0e+4x1o", max_ell=1, correlation=2, num_interactions=2,
                           num_bessel=4, radial_MLP=[8], MLP_irreps="4x0e", avg_num_neighbors=8.0)),
    "escn2": ("ESCN", dict(num_layers=2, lmax=1, mmax=1, sphere_channels=4, hidden_channels=4,
                           edge_channels=4, num_bessel=4)),
    "mace_zbl": ("MACE", dict(hidden_irreps="4x0e+4x1o", max_ell=1, correlation=2, num_interactions=2,
                              num_bessel=4, radial_MLP=[8], MLP_irreps="4x0e", avg_num_neighbors=8.0,
                              zbl=True)),
}
_cache: dict = {}


def _model(key):
    if key not in _cache:
        name, kw = _MODELS[key]
        model = build_model(name, r_max=R_MAX, atomic_numbers=[29, 79], e0s=[-1.5, -2.5], seed=1, **kw)
        randomize_parameters(model, seed=2, scale=0.3)
        _cache[key] = model.eval()
    return _cache[key]


def _cuau(repeat=(2, 1, 1), a=3.6, seed=0, stdev=0.1):
    atoms = bulk("Cu", "fcc", a=a, cubic=True).repeat(repeat)
    atoms.numbers[::3] = 79
    rng = np.random.default_rng(seed)
    atoms.positions += stdev * rng.standard_normal(atoms.positions.shape)
    return atoms


def _reference(model, atoms):
    atoms = atoms.copy()
    atoms.calc = MLPotCalculator(model, device="cpu", dtype="float64")
    return (atoms.get_potential_energy(), atoms.get_forces(), atoms.get_potential_energies(),
            atoms.get_stress(voigt=False) * atoms.get_volume())


def _check_against_calculator(model, atoms, nranks, flavour, mode="auto", **mock_kw):
    mliap = MLPotMLIAP(model, mode=mode)
    dec = MockDecomposition(atoms, 2 * mliap.rcutfac, mliap.element_types, nranks, flavour=flavour, **mock_kw)
    assert all(g > 0 for g in dec.ghost_counts())
    dec.run(mliap)
    e, f, ea, stress_v = _reference(model, atoms)
    assert abs(f).max() > 1e-3
    assert dec.energy() == pytest.approx(e, abs=TOL)
    np.testing.assert_allclose(dec.forces(), f, rtol=0, atol=TOL)
    np.testing.assert_allclose(dec.atom_energies(), ea, rtol=0, atol=TOL)
    w = dec.virial()
    np.testing.assert_allclose(0.5 * (w + w.T), -stress_v, rtol=0, atol=TOL)
    return dec


@pytest.mark.parametrize("flavour", ["numpy", "torch"])
@pytest.mark.parametrize("nranks", [2, 4])
@pytest.mark.parametrize("key", ["mace2", "escn2", "mace_zbl"])
def test_exchange_on_slabs_equals_whole_cell(key, nranks, flavour):
    atoms = _cuau()
    if key == "mace_zbl":  # two atoms close enough for the ZBL term to matter
        atoms.positions[1] = atoms.positions[0] + [0.9, 0.8, 0.0]
    dec = _check_against_calculator(_model(key), atoms, nranks, flavour)
    # every rank called the collective exchange once per layer boundary, forward and backward
    assert dec.comm.calls == [2] * nranks


@pytest.mark.parametrize("flavour", ["numpy", "torch"])
@pytest.mark.parametrize("key", ["mace2", "escn2"])
def test_cell_narrower_than_two_cutoffs(key, flavour):
    """A 2 x 2 x 5 Å cell (cutoff 3 Å) in 2 slabs of 1 Å: each rank holds many images of
    every atom, its own included."""
    from ase import Atoms

    atoms = Atoms("CuAuCu", positions=[[0.3, 0.4, 0.2], [1.3, 1.2, 2.1], [0.8, 1.7, 3.6]],
                  cell=[2.0, 2.0, 5.0], pbc=True)
    dec = _check_against_calculator(_model(key), atoms, 2, flavour)
    for d, glob in zip(dec.ranks, dec.global_of):
        own = set(glob[: d.nlocal].tolist())
        images_of_own = sum(1 for g in glob[d.nlocal:].tolist() if g in own)
        assert images_of_own > len(own)  # several images of a local atom among the ghosts


@pytest.mark.parametrize("flavour", ["numpy", "torch"])
def test_rank_without_atoms_still_takes_part(flavour):
    """A small cluster in a long periodic cell: one slab owns all atoms, two own none but hold
    ghosts, one holds nothing at all; every rank still calls the exchange (it is collective)."""
    from ase import Atoms

    atoms = Atoms("CuAuCuCu", positions=[[0.6, 0.5, 0.4], [1.9, 1.6, 0.9], [1.1, 2.4, 2.2], [2.0, 0.3, 2.8]],
                  cell=[16.0, 4.0, 4.0], pbc=True)
    model = _model("mace2")
    mliap = MLPotMLIAP(model)
    dec = MockDecomposition(atoms, mliap.cutoff, mliap.element_types, 4, flavour=flavour)
    assert [d.nlocal for d in dec.ranks] == [4, 0, 0, 0] and dec.ranks[2].ntotal == 0
    dec.run(mliap)
    assert dec.comm.calls == [2] * 4
    e, f, ea, stress_v = _reference(model, atoms)
    assert dec.energy() == pytest.approx(e, abs=TOL)
    np.testing.assert_allclose(dec.forces(), f, rtol=0, atol=TOL)
    np.testing.assert_allclose(dec.atom_energies(), ea, rtol=0, atol=TOL)
    w = dec.virial()
    np.testing.assert_allclose(0.5 * (w + w.T), -stress_v, rtol=0, atol=TOL)


def test_fold_and_local_need_their_conditions():
    model = _model("mace2")
    atoms = _cuau()
    mliap = MLPotMLIAP(model, mode="fold")
    dec = MockDecomposition(atoms, model.r_max, mliap.element_types, 2, tags=True)
    with pytest.raises(RuntimeError, match="one MPI rank"):
        dec.run(mliap)
    # without exchange and without owners, auto names the LAMMPS that is needed
    dec = MockDecomposition(atoms, model.r_max, mliap.element_types, 2, exchange=False)
    with pytest.raises(RuntimeError, match="forward_exchange"):
        dec.run(MLPotMLIAP(model, mode="auto"))
    with pytest.raises(RuntimeError, match="mode 'exchange' needs LAMMPS with MLIAPDataPy.forward_exchange"):
        dec.run(MLPotMLIAP(model, mode="exchange"))


@pytest.mark.parametrize("flavour", ["numpy", "torch"])
def test_one_rank_exchange_and_fold_agree(flavour):
    """Serial LAMMPS: exchange (ghosts = periodic images of local atoms) and fold (tags) both
    give the calculator's numbers."""
    model = _model("escn2")
    atoms = _cuau()
    _check_against_calculator(model, atoms, 1, flavour, mode="exchange")
    if flavour == "numpy":
        _check_against_calculator(model, atoms, 1, flavour, mode="fold", tags=True)


def test_device_arrays_are_read_through_dlpack_without_copy():
    t = torch.arange(12, dtype=torch.float64).reshape(4, 3)
    view = _as_tensor(DeviceArray(t), torch.device("cpu"))
    assert view.data_ptr() == t.data_ptr()
    with pytest.raises(TypeError, match="host"):
        np.asarray(DeviceArray(t))
    a = np.zeros((4, 3))
    assert _as_tensor(a, torch.device("cpu")).data_ptr() == a.ctypes.data


def test_exchange_mode_needs_a_layer_hook():
    import os
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from sim_helpers import ToyMP

    with pytest.raises(ConfigError, match="between_layers"):
        MLPotMLIAP(ToyMP(r_max=3.0, atomic_numbers=[29], num_layers=2), mode="exchange")


def test_export_cli_mode_exchange_roundtrip(tmp_path):
    from mlpot.cli.main import main

    model = _model("mace2")
    src = tmp_path / "m.pt"
    model.save(src)
    out = tmp_path / "m.mliap.pkl"
    assert main(["export-lammps", str(src), str(out), "--mode", "exchange"]) == 0
    obj = load_mliap(out)
    assert obj.mode == "exchange" and obj.cutoff == pytest.approx(R_MAX)
    atoms = _cuau()
    dec = MockDecomposition(atoms, obj.cutoff, obj.element_types, 2, flavour="torch")
    dec.run(obj)
    assert dec.energy() == pytest.approx(_reference(model, atoms)[0], abs=TOL)
    export_mliap(model, tmp_path / "again.pt", mode="exchange")
    assert load_mliap(tmp_path / "again.pt").mode == "exchange"


@pytest.mark.parametrize("key", ["mace2", "escn2"])
def test_unused_or_identity_hook_leaves_numbers_bit_identical(key):
    from mlpot.data import atoms_to_graph

    model = _model(key)
    graph = atoms_to_graph(_cuau(), model.r_max, dtype=torch.float64)
    s, r = graph["edge_index"]
    vectors = graph["positions"][r] - graph["positions"][s] + graph["unit_shifts"] @ graph["cell"][0]
    calls = []

    def identity(h):
        calls.append(h.shape)
        return h

    plain = model.compute_node_energies(graph, vectors)["node_energy"]
    hooked = model.compute_node_energies(graph, vectors, between_layers=identity)["node_energy"]
    assert torch.equal(plain, hooked)
    assert len(calls) == 1 and calls[0][0] == len(graph["atomic_numbers"])  # once between 2 layers


def test_the_exchange_is_what_makes_forces_exact(monkeypatch):
    """Without the ghost refresh ('local' mode) or without the reverse exchange in the backward
    pass, a 2-layer model on 2 slabs misses terms: the tests above can fail."""
    from mlpot.lammps import exchange

    model, atoms = _model("mace2"), _cuau()
    _, f_ref, _, _ = _reference(model, atoms)
    with pytest.raises(ConfigError, match="one-layer"):
        MLPotMLIAP(model, mode="local")
    mliap = MLPotMLIAP(model, mode="exchange")

    def stale_ghosts(ctx, feats, anchor, data):  # ghost rows keep what this rank computed
        ctx.data = data
        return feats.detach().clone()

    with monkeypatch.context() as m:
        m.setattr(exchange.GhostExchange, "forward", staticmethod(stale_ghosts))
        dec = MockDecomposition(atoms, model.r_max, mliap.element_types, 2)
        dec.run(mliap)
    assert np.abs(dec.forces() - f_ref).max() > 1e4 * TOL

    def forward_only(ctx, grad_out):  # ghost gradients dropped instead of sent to their owners
        return grad_out.clone(), None, None

    monkeypatch.setattr(exchange.GhostExchange, "backward", staticmethod(forward_only))
    dec = MockDecomposition(atoms, model.r_max, mliap.element_types, 2)
    dec.run(MLPotMLIAP(model, mode="exchange"))
    assert dec.energy() == pytest.approx(_reference(model, atoms)[0], abs=TOL)  # energy still right
    assert np.abs(dec.forces() - f_ref).max() > 1e4 * TOL


def test_float32_export_exchanges_float32_buffers():
    model, atoms = _model("escn2"), _cuau()
    mliap = MLPotMLIAP(model, dtype="float32")
    dec = MockDecomposition(atoms, mliap.cutoff, mliap.element_types, 2, flavour="torch")
    seen = []
    fwd = dec.ranks[0]._forward_exchange

    def spy(copy_from, copy_to, vec_len):
        seen.append(copy_from.dtype)
        return fwd(copy_from, copy_to, vec_len)

    dec.ranks[0]._forward_exchange = spy
    dec.run(mliap, copy_model=False)
    e, f, _, _ = _reference(model, atoms)
    assert seen == [torch.float32]
    assert dec.energy() == pytest.approx(e, abs=1e-4)
    np.testing.assert_allclose(dec.forces(), f, rtol=0, atol=1e-4)


def test_kokkos_gpu_path_keeps_everything_on_the_device():
    """With CUDA: LAMMPS's device arrays, the model, the exchange buffers, the pair forces and
    eatoms all stay on the GPU (the mock refuses host buffers where Kokkos passes pointers)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model, atoms = _model("mace2"), _cuau()
    mliap = MLPotMLIAP(model, device="cuda")
    dec = MockDecomposition(atoms, mliap.cutoff, mliap.element_types, 2, flavour="torch", device="cuda")
    assert all(torch.from_dlpack(d.rij).is_cuda for d in dec.ranks)
    dec.run(mliap, copy_model=False)
    e, f, ea, _ = _reference(model, atoms)
    assert all(d._eatoms.is_cuda for d in dec.ranks)
    assert dec.energy() == pytest.approx(e, abs=TOL)
    np.testing.assert_allclose(dec.forces(), f, rtol=0, atol=TOL)
    np.testing.assert_allclose(dec.atom_energies(), ea, rtol=0, atol=TOL)
