"""Hessian targets in data: extxyz `REF_hessian`, npz `hessians`, units, checks with file/frame
in the error, EMT labels by finite differences, and graphs/batches that carry them."""
from __future__ import annotations

import numpy as np
import pytest
from ase.calculators.emt import EMT

from mlpot.data import read
from mlpot.data.graph import atoms_to_graph, collate
from mlpot.data.hessians import finite_difference_hessian
from mlpot.data.readers import KCAL_MOL
from mlpot.data.synthetic import emt_molecule, emt_structures
from mlpot.errors import DataError


def _emt_hessian_fd_of_energy(atoms, h=1e-3):
    """Central second differences of the EMT energy, entry by entry (an independent reference)."""
    work = atoms.copy()
    work.calc = EMT()
    x0 = work.positions.copy()
    n = 3 * len(work)

    def e(dx):
        work.positions = x0 + dx.reshape(-1, 3)
        return work.get_potential_energy()

    out = np.zeros((n, n))
    for a in range(n):
        for b in range(a, n):
            da, db = np.zeros(n), np.zeros(n)
            da[a], db[b] = h, h
            out[a, b] = out[b, a] = (e(da + db) - e(da - db) - e(db - da) + e(-da - db)) / (4 * h * h)
    return out


def test_emt_label_is_the_second_derivative_of_the_energy():
    atoms = emt_molecule("H2O")
    atoms.positions += 0.02
    h = finite_difference_hessian(atoms, EMT())
    ref = _emt_hessian_fd_of_energy(atoms)
    assert np.abs(h).max() > 1.0
    np.testing.assert_allclose(h, ref, atol=2e-3 * np.abs(ref).max())
    # translational sum rule of the label: sum_j H_ij = 0
    np.testing.assert_allclose(h.reshape(3, 3, 3, 3).sum(axis=2), 0.0, atol=1e-4 * np.abs(h).max())


def test_extxyz_hessian_round_trip_and_batches(tmp_path):
    from ase.io import write

    frames = emt_structures(3, seed=0, system="molecules", hessian=True)
    path = tmp_path / "h.xyz"
    write(path, frames, format="extxyz")
    back = read(path)
    for a, b in zip(frames, back):
        n = len(a)
        np.testing.assert_allclose(b.calc.results["hessian"], a.info["REF_hessian"].reshape(3 * n, 3 * n), atol=1e-8)
    graphs = [atoms_to_graph(a, 3.0) for a in back]
    batch = collate(graphs)
    assert batch["hessian"].numel() == sum(9 * len(a) ** 2 for a in back)
    assert batch["hessian_weight"].tolist() == [1.0, 1.0, 1.0]
    # a structure without a Hessian joins the batch with weight 0
    plain = emt_structures(1, seed=5, system="molecules")[0]
    mixed = collate(graphs[:1] + [atoms_to_graph(read_one(tmp_path, plain), 3.0)])
    assert mixed["hessian_weight"].tolist() == [1.0, 0.0]
    assert mixed["hessian"].numel() == 9 * len(back[0]) ** 2 + 9 * len(plain) ** 2


def read_one(tmp_path, atoms):
    from ase.io import write

    p = tmp_path / "one.xyz"
    write(p, [atoms], format="extxyz")
    return read(p)[0]


def test_npz_hessians_units_and_frame_errors(tmp_path):
    atoms = emt_molecule("NH3")
    h = finite_difference_hessian(atoms, EMT())
    n = len(atoms)
    R = np.stack([atoms.positions, atoms.positions + 0.01])
    path = tmp_path / "d.npz"
    H = np.stack([h, h]) / KCAL_MOL  # in kcal/mol/Å² like the rest of an rMD17 file
    np.savez(path, nuclear_charges=atoms.numbers, coords=R, energies=np.zeros(2), forces=np.zeros((2, n, 3)),
             hessians=H)
    frames = read(path)
    np.testing.assert_allclose(frames[1].calc.results["hessian"], h, rtol=1e-12, atol=1e-12)
    bad = H.copy()
    bad[1, 0, 1] += 5.0  # asymmetric in frame 1
    np.savez(path, nuclear_charges=atoms.numbers, coords=R, energies=np.zeros(2), forces=np.zeros((2, n, 3)),
             hessians=bad)
    with pytest.raises(DataError, match=r"d\.npz: frame 1: Hessian is not symmetric"):
        read(path)
    np.savez(path, nuclear_charges=atoms.numbers, coords=R, energies=np.zeros(2), forces=np.zeros((2, n, 3)),
             hessians=np.zeros((2, 3 * n, 3 * n - 1)))
    with pytest.raises(DataError, match=r"d\.npz: frame 0: Hessian shape"):
        read(path)


def test_extxyz_bad_hessian_names_file_and_frame(tmp_path):
    from ase.io import write

    frames = emt_structures(2, seed=0, system="molecules", hessian=True)
    frames[1].info["REF_hessian"] = frames[1].info["REF_hessian"][:-1]
    path = tmp_path / "bad.xyz"
    write(path, frames, format="extxyz")
    with pytest.raises(DataError, match=r"bad\.xyz: frame 1: Hessian shape"):
        read(path)
    frames = emt_structures(1, seed=0, system="molecules", hessian=True)
    frames[0].info["REF_hessian"][3] = np.nan
    write(path, frames, format="extxyz")
    with pytest.raises(DataError, match=r"bad\.xyz: frame 0: non-finite"):
        read(path)


def test_cli_reports_bad_hessian_in_one_line(tmp_path, capsys):
    from ase.io import write

    from mlpot.cli.main import main

    frames = emt_structures(2, seed=0, system="molecules", hessian=True)
    frames[0].info["REF_hessian"] = frames[0].info["REF_hessian"] * 0 + np.arange(9 * len(frames[0]) ** 2)
    path = tmp_path / "asym.xyz"
    write(path, frames, format="extxyz")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"output: {tmp_path / 'run'}\ndata:\n  train: {path}\n  valid: 0.5\nmodel:\n  name: TensorNet\n")
    assert main(["train", str(cfg)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "asym.xyz: frame 0: Hessian is not symmetric" in err[0], err


def test_hdf5_hessian_round_trip_lazy_graph_and_bad_frame(tmp_path):
    import h5py

    from mlpot.data.dataset import LazyDataset
    from mlpot.data.hdf5 import write_hdf5

    frames = emt_structures(3, seed=0, system="molecules", hessian=True)
    path = tmp_path / "h.xyz"
    from ase.io import write

    write(path, frames, format="extxyz")
    atoms = read(path)
    atoms[1].calc.results.pop("hessian")  # a frame without a Hessian in the middle
    h5 = tmp_path / "d.h5"
    write_hdf5(atoms, h5, cutoff=3.0)
    back = read(h5)
    assert "hessian" not in back[1].calc.results
    for k in (0, 2):
        np.testing.assert_allclose(back[k].calc.results["hessian"], atoms[k].calc.results["hessian"])
    lazy = LazyDataset(h5, 3.0)
    batch = collate([lazy[k] for k in range(3)])
    assert batch["hessian_weight"].tolist() == [1.0, 0.0, 1.0]
    np.testing.assert_allclose(lazy[2]["hessian"].numpy(), atoms[2].calc.results["hessian"].reshape(-1))
    lazy.close()
    with h5py.File(h5, "r+") as f:
        h0, h1 = (int(x) for x in f["hessian_ptr"][2:4])
        f["hessian"][h0 + 1] += 10.0
    with pytest.raises(DataError, match=r"d\.h5: frame 2: Hessian is not symmetric"):
        read(h5)
