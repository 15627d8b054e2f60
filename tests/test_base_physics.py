"""The base class's physics on an analytic pair potential: forces, stress, virials, ZBL, model files.

A Morse pair potential written as a PotentialModel has exact derivatives we can check by finite
differences independently of any learned model.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from ase.neighborlist import neighbor_list

from mlpot.data.graph import graph_from_neighbor_list
from mlpot.errors import ModelFileError, UnknownElementError
from mlpot.models import PotentialModel, load_model, register_model


@register_model("TestMorse")
class Morse(PotentialModel):
    """E = 1/2 sum_{i != j} D (1 - exp(-a (r - r0)))^2 f_c(r), with a smooth cosine cutoff."""

    def __init__(self, r_max=4.0, atomic_numbers=(29,), e0s=None, zbl=False, depth=0.3, **kw):
        super().__init__(dict(r_max=r_max, atomic_numbers=list(atomic_numbers), e0s=e0s, zbl=zbl, depth=depth))
        self.depth = torch.nn.Parameter(torch.tensor(float(depth), dtype=torch.float64))

    def compute_node_energies(self, graph, vectors):
        r = torch.linalg.norm(vectors, dim=-1)
        fc = 0.5 * (torch.cos(torch.pi * r / self.r_max) + 1.0) * (r < self.r_max)
        pair = self.depth * (1 - torch.exp(-1.5 * (r - 2.5))) ** 2 * fc
        node = self.node_e0(graph).index_add(0, graph["edge_index"][1], 0.5 * pair)
        return {"node_energy": node}


def graph_of(atoms: Atoms, cutoff: float) -> dict:
    """The graph of ``atoms`` on ASE's own neighbour list (independent of mlpot's)."""
    i, j, S = neighbor_list("ijS", atoms, cutoff)
    return graph_from_neighbor_list(atoms.positions, atoms.numbers, atoms.cell.array, atoms.pbc, i, j, S)


def energy_of(model, atoms):
    return float(model(graph_of(atoms, model.r_max), compute_force=False)["energy"][0])


@pytest.fixture
def cu():
    atoms = bulk("Cu", "fcc", a=3.6) * (2, 2, 1)
    atoms.set_cell(atoms.cell.array + 0.2 * np.random.default_rng(0).standard_normal((3, 3)), scale_atoms=True)
    atoms.rattle(0.1, seed=1)
    return atoms


def test_forces_match_finite_differences(cu):
    model = Morse(e0s=[-1.0])
    out = model(graph_of(cu, model.r_max))
    h = 1e-5
    for a, k in [(0, 0), (1, 2), (3, 1)]:
        p, m = cu.copy(), cu.copy()
        p.positions[a, k] += h
        m.positions[a, k] -= h
        fd = -(energy_of(model, p) - energy_of(model, m)) / (2 * h)
        assert abs(float(out["forces"][a, k]) - fd) < 1e-7


def test_stress_matches_finite_strain_ase_sign(cu):
    model = Morse()
    out = model(graph_of(cu, model.r_max), compute_stress=True)
    vol = cu.get_volume()
    h = 1e-6
    for a, b in [(0, 0), (1, 1), (0, 1), (1, 2)]:
        eps = np.zeros((3, 3))
        eps[a, b] += h / 2
        eps[b, a] += h / 2
        ep, em = cu.copy(), cu.copy()
        ep.set_cell(cu.cell.array @ (np.eye(3) + eps), scale_atoms=True)
        em.set_cell(cu.cell.array @ (np.eye(3) - eps), scale_atoms=True)
        fd = (energy_of(model, ep) - energy_of(model, em)) / (2 * h) / vol
        assert abs(float(out["stress"][0, a, b]) - fd) < 1e-7
    assert torch.allclose(out["virials"][0], -out["stress"][0] * vol)
    # forces are unchanged by asking for stress
    f_only = model(graph_of(cu, model.r_max))["forces"]
    assert torch.allclose(f_only, out["forces"], atol=1e-12)


def test_molecule_has_zero_stress_and_isolated_atom_is_e0():
    model = Morse(atomic_numbers=[1, 29], e0s={"H": -0.5, "Cu": -2.0})
    iso = Atoms("Cu", positions=[[0, 0, 0]])
    out = model(graph_of(iso, model.r_max), compute_stress=True)
    assert float(out["energy"][0]) == -2.0
    assert torch.all(out["stress"] == 0)
    with pytest.raises(UnknownElementError, match="Fe"):
        model(graph_of(Atoms("Fe", positions=[[0, 0, 0]]), model.r_max))


def test_zbl_is_repulsive_and_smooth():
    model = Morse(atomic_numbers=[29], zbl=True, depth=0.0)
    e = []
    for r in np.linspace(0.3, 3.0, 60):
        e.append(energy_of(model, Atoms("Cu2", positions=[[0, 0, 0], [r, 0, 0]])))
    e = np.array(e)
    assert np.all(np.diff(e) <= 1e-12)  # monotonic repulsion
    assert e[0] > 10 and abs(e[-1]) < 1e-12  # strong at short range, gone beyond covalent radii


def test_save_load_roundtrip_and_future_version(tmp_path, cu):
    model = Morse(depth=0.7, e0s=[-0.25])
    path = tmp_path / "m.pt"
    model.save(path)
    loaded = load_model(path, device="cpu")
    g = graph_of(cu, model.r_max)
    assert torch.allclose(model(g)["forces"], loaded(g)["forces"])
    assert loaded.e0s == {29: -0.25}
    payload = torch.load(path, weights_only=True)
    payload["format_version"] = 99
    torch.save(payload, path)
    with pytest.raises(ModelFileError, match="newer"):
        load_model(path)
