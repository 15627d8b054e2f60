"""Graphs, batching, the HDF5 on-disk format, lazy datasets and the DataLoader."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import bulk, molecule
from ase.calculators.singlepoint import SinglePointCalculator
from ase.neighborlist import neighbor_list as ase_neighbor_list

from mlpot.data import (
    AtomicDataset,
    LazyDataset,
    atoms_to_graph,
    collate,
    graphs_from_atoms,
    make_dataloader,
    read,
    write_hdf5,
)
from mlpot.data.graph import graph_from_neighbor_list
from mlpot.data.neighbors import neighbor_list
from mlpot.errors import DataError

GRAPH_KEYS = {
    "positions", "atomic_numbers", "cell", "pbc", "edge_index", "unit_shifts", "batch", "ptr",
    "num_atoms", "energy", "forces", "stress", "virials", "weight", "energy_weight",
    "forces_weight", "stress_weight", "config_type",
}


def _labelled(atoms, seed, stress=True, config_type="Default"):
    rng = np.random.default_rng(seed)
    atoms = atoms.copy()
    atoms.rattle(0.05, seed=seed)
    res = {"energy": float(rng.normal()), "forces": rng.normal(size=(len(atoms), 3))}
    if stress and atoms.pbc.all():
        res["stress"] = rng.normal(size=6) * 0.01
    atoms.calc = SinglePointCalculator(atoms, **res)
    atoms.info["config_type"] = config_type
    return atoms


def _structures():
    cu = _labelled(bulk("Cu", "fcc", a=3.6).repeat((2, 2, 2)), 0, config_type="bulk")
    si = _labelled(bulk("Si", "diamond", a=5.43), 1)  # primitive cell, skewed, smaller than cutoff
    h2o = _labelled(molecule("H2O"), 2, config_type="mol")
    slab = bulk("Al", "fcc", a=4.05, cubic=True)
    slab.pbc = [True, True, False]
    slab = _labelled(slab, 3)
    return [cu, si, h2o, slab]


def _edge_vectors(g):
    i, j = g["edge_index"]
    cell = g["cell"][g["batch"][i]]
    return g["positions"][j] - g["positions"][i] + torch.einsum("ek,eka->ea", g["unit_shifts"], cell)


def test_graph_keys_shapes_and_contract():
    cu = _structures()[0]
    g = atoms_to_graph(cu, 4.0)
    assert set(g) == GRAPH_KEYS
    n = len(cu)
    assert g["positions"].shape == (n, 3) and g["positions"].dtype == torch.float64
    assert g["atomic_numbers"].dtype == torch.int64 and g["cell"].shape == (1, 3, 3)
    assert g["pbc"].shape == (1, 3) and g["pbc"].dtype == torch.bool
    assert g["edge_index"].shape[0] == 2 and g["edge_index"].dtype == torch.int64
    assert g["unit_shifts"].dtype == torch.float64 and g["unit_shifts"].shape == (g["edge_index"].shape[1], 3)
    assert g["ptr"].tolist() == [0, n] and g["num_atoms"].tolist() == [n]
    assert g["stress"].shape == (1, 3, 3) and g["virials"].shape == (1, 3, 3)
    np.testing.assert_allclose(g["virials"][0].numpy(), -g["stress"][0].numpy() * cu.get_volume())
    np.testing.assert_allclose(g["stress"][0].numpy(), cu.get_stress(voigt=False))
    # edge vectors from the graph reproduce ASE's distance vectors
    D = _edge_vectors(g).numpy()
    i, j, Dref = ase_neighbor_list("ijD", cu, 4.0)
    assert sorted(np.linalg.norm(D, axis=1).round(10)) == sorted(np.linalg.norm(Dref, axis=1).round(10))
    g32 = atoms_to_graph(cu, 4.0, dtype=torch.float32)
    assert g32["positions"].dtype == torch.float32 and g32["energy"].dtype == torch.float32


def test_molecule_graph_has_zero_cell_and_no_stress():
    h2o = _structures()[2]
    g = atoms_to_graph(h2o, 3.0)
    assert torch.all(g["cell"] == 0) and not g["pbc"].any()
    assert "stress" not in g and g["stress_weight"].item() == 0.0
    assert g["edge_index"].shape[1] == 6  # 3 atoms, all within 3 Å


def test_collate_offsets_and_batch_equals_single():
    structs = _structures()
    graphs = [atoms_to_graph(a, 4.5) for a in structs]
    b = collate(graphs)
    ptr = b["ptr"].tolist()
    assert ptr == [0] + np.cumsum([len(a) for a in structs]).tolist()
    assert b["batch"].tolist() == sum(([k] * len(a) for k, a in enumerate(structs)), [])
    assert b["cell"].shape == (4, 3, 3) and b["energy"].shape == (4,)
    assert b["config_type"] == ["bulk", "Default", "mol", "Default"]
    # the molecule and the slab have no stress target: zeros with weight 0
    assert b["stress_weight"].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert torch.all(b["stress"][2] == 0)
    # per-structure edges and vectors survive batching
    vecs = _edge_vectors(b)
    ei = b["edge_index"]
    assert torch.all(b["batch"][ei[0]] == b["batch"][ei[1]])
    for k, g in enumerate(graphs):
        mask = b["batch"][ei[0]] == k
        torch.testing.assert_close(ei[:, mask] - ptr[k], g["edge_index"])
        torch.testing.assert_close(vecs[mask], _edge_vectors(g))
    # graphs_from_atoms is the same batch
    b2 = graphs_from_atoms(structs, 4.5)
    for key in GRAPH_KEYS - {"config_type"}:
        torch.testing.assert_close(b2[key], b[key])
    # collate of collated graphs keeps offsets
    b3 = collate([collate(graphs[:2]), collate(graphs[2:])])
    torch.testing.assert_close(b3["edge_index"], b["edge_index"])
    torch.testing.assert_close(b3["ptr"], b["ptr"])


GEOMETRY_KEYS = ("positions", "atomic_numbers", "cell", "pbc", "edge_index", "unit_shifts", "batch", "ptr",
                 "num_atoms")


def test_graph_from_neighbor_list_is_the_builder_of_atoms_to_graph_and_collate():
    """One structure equals atoms_to_graph; many (indices into the batch) equal collate."""
    structs = _structures()
    structs[2].cell = [8.0, 9.0, 10.0]  # a cell on a structure periodic in no direction: ignored
    parts, off = [], 0
    for a in structs:
        i, j, S = neighbor_list(a.positions, 4.5, a.cell.array, a.pbc)
        g = graph_from_neighbor_list(a.positions, a.numbers, a.cell.array, a.pbc, i, j, S)
        ref = atoms_to_graph(a, 4.5)
        for key in GEOMETRY_KEYS:
            assert g[key].dtype == ref[key].dtype, key
            torch.testing.assert_close(g[key], ref[key], rtol=0, atol=0)
        parts.append((i + off, j + off, S))
        off += len(a)
    i, j, S = (torch.cat(x) for x in zip(*parts))
    b = graph_from_neighbor_list(
        np.concatenate([a.positions for a in structs]), np.concatenate([a.numbers for a in structs]),
        np.stack([a.cell.array for a in structs]), np.stack([a.pbc for a in structs]), i, j, S,
        [len(a) for a in structs], dtype=torch.float32,
    )
    ref = collate([atoms_to_graph(a, 4.5, dtype=torch.float32) for a in structs])
    for key in GEOMETRY_KEYS:
        assert b[key].dtype == ref[key].dtype, key
        torch.testing.assert_close(b[key], ref[key], rtol=0, atol=0)
    assert torch.all(b["cell"][2] == 0) and torch.all(b["cell"][3].diagonal() != 0)


def test_hdf5_round_trip_and_lazy_dataset(tmp_path):
    structs = _structures()
    path = tmp_path / "d.h5"
    assert write_hdf5(iter(structs), path, cutoff=5.0) == 4
    back = read(path)
    for a, b in zip(structs, back):
        assert np.array_equal(a.numbers, b.numbers)
        np.testing.assert_array_equal(a.positions, b.positions)
        np.testing.assert_array_equal(a.cell.array, b.cell.array)
        assert np.array_equal(a.pbc, b.pbc)
        assert a.get_potential_energy() == b.get_potential_energy()
        np.testing.assert_array_equal(a.get_forces(), b.get_forces())
        assert a.info["config_type"] == b.info["config_type"]
        if "stress" in a.calc.results:
            np.testing.assert_array_equal(a.get_stress(), b.get_stress())
        else:
            assert "stress" not in b.calc.results
    # lazy graphs equal the in-memory ones, with stored edges (same cutoff) and filtered ones
    for cutoff in (5.0, 3.2):
        lazy = LazyDataset(path, cutoff=cutoff)
        mem = AtomicDataset(structs, cutoff=cutoff)
        assert len(lazy) == 4
        for k in range(4):
            gl, gm = lazy[k], mem[k]
            assert set(gl) == set(gm)
            el = _pairs(gl)
            assert el == _pairs(gm)
            for key in set(gm) - {"edge_index", "unit_shifts", "config_type"}:
                torch.testing.assert_close(gl[key], gm[key])
    # larger cutoff than stored: recomputed
    assert _pairs(LazyDataset(path, cutoff=6.0)[1]) == _pairs(AtomicDataset(structs, 6.0)[1])
    # not a dataset file
    bad = tmp_path / "x.h5"
    import h5py

    with h5py.File(bad, "w") as f:
        f["a"] = 1
    with pytest.raises(DataError, match="not an mlpot dataset"):
        LazyDataset(bad, cutoff=3.0)


def _pairs(g):
    i, j = g["edge_index"].tolist()
    return set(zip(i, j, map(tuple, g["unit_shifts"].long().tolist())))


def test_dataloader_two_workers_matches_sequential(tmp_path):
    structs = [_labelled(bulk("Cu", "fcc", a=3.6).repeat((2, 1, 1)), s) for s in range(10)] + _structures()
    path = tmp_path / "d.h5"
    write_hdf5(structs, path)  # no stored edges: computed in the workers
    for ds in (LazyDataset(path, cutoff=4.0), AtomicDataset(structs, 4.0)):
        seq = list(make_dataloader(ds, batch_size=4, shuffle=False, num_workers=0))
        par = list(make_dataloader(ds, batch_size=4, shuffle=False, num_workers=2))
        assert len(seq) == len(par) == 4
        for a, b in zip(seq, par):
            assert a["config_type"] == b["config_type"]
            for key in a:
                if key != "config_type":
                    torch.testing.assert_close(a[key], b[key])
    # shuffle + drop_last
    batches = list(make_dataloader(AtomicDataset(structs, 4.0), batch_size=5, shuffle=True, drop_last=True))
    assert len(batches) == 2 and all(len(b["num_atoms"]) == 5 for b in batches)
