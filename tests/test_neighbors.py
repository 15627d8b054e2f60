"""Neighbor lists: parity with ASE on random periodic/non-periodic/mixed cases, batching, guards."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from ase.neighborlist import neighbor_list as ase_neighbor_list

from mlpot.data import batched_neighbor_list, neighbor_list
from mlpot.errors import DataError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _pairs(i, j, S) -> set:
    i, j, S = (np.asarray(x.cpu() if torch.is_tensor(x) else x) for x in (i, j, S))
    return set(zip(i.tolist(), j.tolist(), map(tuple, S.reshape(-1, 3).astype(int).tolist())))


def _random_cell(rng) -> np.ndarray:
    kind = rng.integers(0, 5)
    if kind == 0:  # orthorhombic
        return np.diag(rng.uniform(1.5, 10.0, 3))
    if kind == 1:  # random triclinic, not too degenerate
        while True:
            cell = rng.normal(size=(3, 3)) * rng.uniform(2, 8)
            vol = abs(np.linalg.det(cell))
            if vol > 0.05 * np.prod(np.linalg.norm(cell, axis=1)):
                return cell
    if kind == 2:  # strongly skewed (large off-diagonal tilts)
        a = rng.uniform(2, 6)
        return np.array([[a, 0, 0], [a * rng.uniform(1, 4), a, 0], [a * rng.uniform(-4, 4), a * rng.uniform(-4, 4), a]])
    if kind == 3:  # tiny: far smaller than the cutoff -> many images
        return np.diag(rng.uniform(0.6, 2.0, 3)) + rng.uniform(-0.3, 0.3, (3, 3))
    return np.zeros((3, 3)) if rng.random() < 0.5 else np.diag(rng.uniform(3, 8, 3))


def _random_case(rng):
    cell = _random_cell(rng)
    small = np.any(cell) and abs(np.linalg.det(cell)) < 20.0
    n = int(rng.integers(1, 8 if small else 25))  # keep image-heavy cases cheap
    pbc = rng.random(3) < 0.6
    if not np.any(cell):
        pbc[:] = False
    base = cell if np.any(cell) else np.eye(3) * 5.0
    pos = rng.uniform(-0.6, 1.6, (n, 3)) @ base  # atoms outside the cell too
    if n > 1 and rng.random() < 0.3:
        pos[-1] += rng.normal(size=3) * 40.0  # isolated atom far away
    cutoff = float(rng.uniform(0.5, 3.0 if small else 5.0))  # still many images when small
    return pos, cell, pbc, cutoff


def _ase_pairs(pos, cell, pbc, cutoff):
    atoms = Atoms(numbers=np.ones(len(pos), dtype=int), positions=pos, cell=cell, pbc=pbc)
    return _pairs(*ase_neighbor_list("ijS", atoms, cutoff))


def test_parity_with_ase_random_cases():
    """Same (i, j, S) set as ASE on 320 random cases, for the torch path and the vesin dispatch."""
    rng = np.random.default_rng(12345)
    n_pairs_total = 0
    for case in range(320):
        pos, cell, pbc, cutoff = _random_case(rng)
        ref = _ase_pairs(pos, cell, pbc, cutoff)
        for backend in ("torch", "vesin"):
            _check_against(ref, pos, cell, pbc, cutoff, backend, case)
        n_pairs_total += len(ref)
    assert n_pairs_total > 10_000  # the cases are not trivially empty


def _check_against(ref, pos, cell, pbc, cutoff, backend, case):
    i, j, S = neighbor_list(pos, cutoff, cell, pbc, backend=backend)
    assert i.dtype == torch.int64 and j.dtype == torch.int64 and S.dtype == torch.int64
    got = _pairs(i, j, S)
    assert len(i) == len(got), f"case {case}: duplicate pairs"
    assert got == ref, f"{backend} case {case}: pbc={pbc} cutoff={cutoff} missing={len(ref - got)} extra={len(got - ref)}"
    # contract: D = pos[j] - pos[i] + S @ cell has |D| < cutoff, no (i, i, 0)
    D = pos[j.numpy()] - pos[i.numpy()] + S.numpy() @ cell
    assert np.all(np.linalg.norm(D, axis=1) < cutoff)
    assert not np.any((i == j).numpy() & (S == 0).all(1).numpy())
    assert np.all(S.numpy()[:, ~pbc] == 0)


def test_default_dispatch_equals_torch_path_on_bulk():
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((3, 3, 3))
    atoms.rattle(0.05, seed=1)
    ref = _pairs(*ase_neighbor_list("ijS", atoms, 5.0))
    for backend in ("auto", "torch", "vesin"):
        assert _pairs(*neighbor_list(atoms, 5.0, backend=backend)) == ref


def test_self_images_in_cell_smaller_than_cutoff():
    # one atom, cubic cell a=1, cutoff 2.5: images at all integer S with 0 < |S| < 2.5
    i, j, S = neighbor_list(np.zeros((1, 3)), 2.5, np.eye(3), True, backend="torch")
    grid = np.stack(np.meshgrid(*[np.arange(-3, 4)] * 3, indexing="ij"), -1).reshape(-1, 3)
    r = np.linalg.norm(grid, axis=1)
    expected = {(0, 0, tuple(s)) for s in grid[(r > 0) & (r < 2.5)].tolist()}
    assert _pairs(i, j, S) == expected


def test_isolated_and_empty():
    i, j, S = neighbor_list(np.array([[0.0, 0, 0], [100.0, 0, 0]]), 5.0, backend="torch")
    assert len(i) == 0 and S.shape == (0, 3)
    i, j, S = neighbor_list(np.zeros((0, 3)), 5.0, backend="torch")
    assert len(i) == 0


def test_torch_input_dtype_and_device_kept():
    pos = torch.rand(10, 3, dtype=torch.float32) * 4
    i, j, S = neighbor_list(pos, 3.0, torch.eye(3) * 4, [True, False, True])
    assert i.device == pos.device and S.dtype == torch.int64
    ref = _ase_pairs(pos.double().numpy(), np.eye(3) * 4, [True, False, True], 3.0)
    assert _pairs(i, j, S) == ref


def test_batched_equals_per_structure():
    rng = np.random.default_rng(7)
    cases = [_random_case(rng) for _ in range(25)]
    cutoff = 3.5
    pos = np.concatenate([c[0] for c in cases])
    cells = torch.tensor(np.stack([c[1] for c in cases]))
    pbcs = torch.tensor(np.stack([c[2] for c in cases]))
    batch = torch.repeat_interleave(torch.arange(len(cases)), torch.tensor([len(c[0]) for c in cases]))
    i, j, S = batched_neighbor_list(torch.tensor(pos), cutoff, cells, pbcs, batch)
    assert torch.all(batch[i] == batch[j])  # never crosses structures
    assert torch.all(i[1:] >= i[:-1])  # sorted by i
    expected = set()
    offset = 0
    for p, cell, pbc, _ in cases:
        for a, b, s in _ase_pairs(p, cell, pbc, cutoff):
            expected.add((a + offset, b + offset, s))
        offset += len(p)
    assert _pairs(i, j, S) == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    rng = np.random.default_rng(3)
    for _ in range(30):
        pos, cell, pbc, cutoff = _random_case(rng)
        ref = _ase_pairs(pos, cell, pbc, cutoff)
        out = neighbor_list(torch.tensor(pos, device="cuda"), cutoff, torch.tensor(cell, device="cuda"), pbc)
        assert out[0].device.type == "cuda"
        assert _pairs(*out) == ref


def test_guards():
    with pytest.raises(DataError, match="singular cell"):
        neighbor_list(np.zeros((2, 3)), 3.0, np.array([[1.0, 0, 0], [2.0, 0, 0], [0, 0, 1]]), True, backend="torch")
    with pytest.raises(DataError, match="singular cell"):
        neighbor_list(np.zeros((2, 3)), 3.0, np.array([[1.0, 0, 0], [2.0, 0, 0], [0, 0, 1]]), True, backend="vesin")
    # a 0.01 Å cell with a 5 Å cutoff would need ~1e9 images: refused with a clear message
    for backend in ("torch", "vesin"):
        with pytest.raises(DataError, match="periodic images"):
            neighbor_list(np.zeros((1, 3)), 5.0, np.eye(3) * 0.01, True, backend=backend)
    with pytest.raises(DataError, match="cutoff"):
        neighbor_list(np.zeros((1, 3)), -1.0, backend="torch")
    # non-periodic directions may have a zero lattice vector (slab)
    pos = np.array([[0.0, 0, 0], [0.5, 0.5, 1.0]])
    cell = np.array([[2.0, 0, 0], [0, 2.0, 0], [0, 0, 0]])
    got = _pairs(*neighbor_list(pos, 3.0, cell, [True, True, False], backend="torch"))
    assert got == _ase_pairs(pos, cell, [True, True, False], 3.0)
