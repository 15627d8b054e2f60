"""Hessians: autograd against finite differences of forces; the HIP head's symmetry,
O(3) equivariance, translational sum rule and cutoff smoothness; the calculator's get_hessian."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mlpot.calculators import MLPotCalculator
from mlpot.errors import ConfigError
from mlpot.models import build_model
from mlpot.models.hessian import hessian_block_index, split_hessian
from mlpot.testing import model_checks as mc

SPECIES = [1, 6, 8]
E0S = [-13.6, -1029.5, -2041.8]
MACE_SMALL = dict(r_max=3.0, atomic_numbers=SPECIES, e0s=E0S, hidden_irreps="4x0e + 4x1o", max_ell=2,
                  correlation=2, num_interactions=2, num_bessel=4, avg_num_neighbors=4.0, radial_MLP=[8],
                  interaction_cls_first="RealAgnosticInteractionBlock", seed=0)
ESCN_SMALL = dict(r_max=3.0, atomic_numbers=SPECIES, e0s=E0S, num_layers=1, lmax=2, mmax=1, sphere_channels=4,
                  hidden_channels=6, edge_channels=4, num_bessel=4, avg_num_neighbors=4.0,
                  ffn_activation="gate", seed=0)
TENSORNET_SMALL = dict(r_max=3.0, atomic_numbers=SPECIES, e0s=E0S, num_channels=4, num_layers=1, num_rbf=6,
                       avg_num_neighbors=4.0, readout_hidden=8, seed=0)
EQV2_SMALL = dict(r_max=3.0, atomic_numbers=SPECIES, e0s=E0S, num_layers=1, lmax=2, mmax=1, sphere_channels=4,
                  attn_hidden_channels=6, num_heads=2, attn_alpha_channels=4, attn_value_channels=3,
                  ffn_hidden_channels=6, edge_channels=4, num_bessel=4, avg_num_neighbors=4.0, seed=0,
                  grid_resolution=40)
MODELS = {"MACE": MACE_SMALL, "ESCN": ESCN_SMALL, "TensorNet": TENSORNET_SMALL, "EquiformerV2": EQV2_SMALL}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(name, **extra):
    return mc.random_model(name, dict(MODELS[name], **extra))


def _structures():
    return [mc.random_molecule(SPECIES, n=5, seed=1), mc.random_crystal(SPECIES, n=3, seed=2)]


def _hessian(model, atoms, method="autograd"):
    graph = mc.build_batch([atoms], model.r_max)
    out = model(graph, compute_force=method == "autograd", compute_hessian=True, hessian_method=method)
    return out["hessian"].detach().numpy()


def _fd_hessian(model, atoms, h=1e-4):
    """-(F(r + h e_k) - F(r - h e_k)) / 2h, row k, from the model's own forces."""
    n = len(atoms)
    rows = []
    for k in range(3 * n):
        plus, minus = atoms.copy(), atoms.copy()
        plus.positions[k // 3, k % 3] += h
        minus.positions[k // 3, k % 3] -= h
        fp = mc.evaluate(model, plus, compute_stress=False)["forces"].reshape(-1)
        fm = mc.evaluate(model, minus, compute_stress=False)["forces"].reshape(-1)
        rows.append(-(fp - fm) / (2 * h))
    return np.array(rows)


@pytest.mark.parametrize("name", ["MACE", "TensorNet"])
def test_autograd_hessian_matches_finite_differences(name):
    model = _model(name)
    for atoms in _structures():
        hess = _hessian(model, atoms)
        fd = _fd_hessian(model, atoms)
        assert np.abs(hess).max() > 1e-3
        np.testing.assert_allclose(hess, fd, atol=1e-6 * max(1.0, np.abs(fd).max()))
        np.testing.assert_allclose(hess, hess.T, atol=1e-12)


def test_autograd_hessian_of_a_batch_is_block_diagonal():
    model = _model("MACE")
    structures = _structures()
    graph = mc.build_batch(structures, model.r_max)
    batch = model(graph, compute_hessian=True)["hessian"].detach()
    n = [len(a) for a in structures]
    blocks = split_hessian(batch, n)
    for atoms, block in zip(structures, blocks):
        np.testing.assert_allclose(block.numpy(), _hessian(model, atoms), atol=1e-10)
    off = batch[: 3 * n[0], 3 * n[0]:]
    assert float(off.abs().max()) == 0.0
    idx = hessian_block_index(torch.tensor(n))
    assert idx.numel() == sum((3 * k) ** 2 for k in n)
    np.testing.assert_array_equal(batch.reshape(-1)[idx][: 9 * n[0] ** 2].numpy(), blocks[0].reshape(-1).numpy())


def test_calculator_get_hessian_and_method_errors():
    model = _model("TensorNet")
    atoms = _structures()[0]
    calc = MLPotCalculator(model, device="cpu")
    np.testing.assert_allclose(calc.get_hessian(atoms), _hessian(model, atoms), atol=1e-12)
    with pytest.raises(ConfigError, match="hessian_head"):
        calc.get_hessian(atoms, method="direct")
    with pytest.raises(ConfigError, match="unknown Hessian method"):
        calc.get_hessian(atoms, method="numerical")


def _block_rotate(h, q):
    n = h.shape[0] // 3
    big = np.kron(np.eye(n), q)
    return big @ h @ big.T


@pytest.mark.parametrize("name", ["MACE", "ESCN", "TensorNet"])
def test_hip_head_symmetry_equivariance_sum_rule(name):
    model = _model(name, hessian_head=True)
    for atoms in _structures():
        h = _hessian(model, atoms, "direct")
        n = len(atoms)
        assert np.abs(h).max() > 1e-3, "the head predicts a trivially zero Hessian"
        np.testing.assert_allclose(h, h.T, atol=1e-12)
        rows = h.reshape(n, 3, n, 3).sum(axis=2)  # sum_j H_ij, each (3, 3)
        np.testing.assert_allclose(rows, 0.0, atol=1e-10)
        for proper in (True, False):
            q = mc.random_orthogonal(3, proper=proper)
            moved = atoms.copy()
            moved.positions = atoms.positions @ q.T
            if atoms.pbc.any():
                moved.set_cell(atoms.cell.array @ q.T, scale_atoms=False)
            np.testing.assert_allclose(_hessian(model, moved, "direct"), _block_rotate(h, q), atol=1e-9)
        perm = np.random.default_rng(0).permutation(n)
        hp = _hessian(model, atoms[perm], "direct")
        idx = (3 * perm[:, None] + np.arange(3)).reshape(-1)
        np.testing.assert_allclose(hp, h[np.ix_(idx, idx)], atol=1e-10)


def test_hip_head_on_equiformer_v2():
    """The same head on EquiformerV2: symmetry and the sum rule hold exactly (by construction);
    rotation equivariance holds to the accuracy of the model's S2-grid activation (about 1e-6
    relative at 40 polar nodes), not to round-off."""
    model = _model("EquiformerV2", hessian_head=True)
    atoms = _structures()[0]
    h = _hessian(model, atoms, "direct")
    n = len(atoms)
    assert np.abs(h).max() > 1e-3
    np.testing.assert_allclose(h, h.T, atol=1e-12)
    np.testing.assert_allclose(h.reshape(n, 3, n, 3).sum(axis=2), 0.0, atol=1e-10)
    q = mc.random_orthogonal(3, proper=True)
    moved = atoms.copy()
    moved.positions = atoms.positions @ q.T
    np.testing.assert_allclose(_hessian(model, moved, "direct"), _block_rotate(h, q), atol=1e-5 * np.abs(h).max())


def test_hip_head_blocks_vanish_smoothly_at_the_cutoff():
    from ase import Atoms

    model = _model("MACE", hessian_head=True)
    d = np.array([0.36, -0.48, 0.8])

    def dimer(r):
        return Atoms(numbers=[1, 8], positions=[[0, 0, 0], r * d])

    inside = _hessian(model, dimer(model.r_max - 1e-4), "direct")
    outside = _hessian(model, dimer(model.r_max + 1e-4), "direct")
    mid = _hessian(model, dimer(0.5 * model.r_max), "direct")
    assert np.abs(mid).max() > 1e-3
    assert np.abs(outside).max() == 0.0
    assert np.abs(inside).max() < 1e-8


def test_hessian_head_survives_save_load(tmp_path):
    import mlpot

    model = _model("MACE", hessian_head={"channels": 4, "hidden": 16})
    atoms = _structures()[0]
    model.save(tmp_path / "m.pt")
    loaded = mlpot.load_model(tmp_path / "m.pt", device="cpu")
    np.testing.assert_array_equal(_hessian(loaded, atoms, "direct"), _hessian(model, atoms, "direct"))
    with pytest.raises(ConfigError, match="hessian_head"):
        build_model("MACE", **dict(MACE_SMALL, hessian_head={"width": 3}))
