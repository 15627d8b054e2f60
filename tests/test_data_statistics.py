"""Dataset statistics: E0s, neighbour counts, energy/force scales (mace-torch definitions), CLI."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.calculators.singlepoint import SinglePointCalculator
from ase.neighborlist import neighbor_list as ase_neighbor_list

from mlpot.data import AtomicDataset, LazyDataset, read, write_hdf5
from mlpot.data.statistics import (
    DatasetStatistics,
    avg_num_neighbors,
    compute_statistics,
    e0s_from_isolated_atoms,
    fit_e0s,
    mean_rms_energy_forces,
    mean_std_interaction_energy,
)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MLPOT_SHARED", REPO.parent / "shared")) / "data"
TRUE_E0 = {1: -13.6, 6: -1029.5, 8: -2042.0}


def _synthetic(n=30, seed=0):
    """Random CHO clusters with E = sum E0 + small interaction energy."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        nat = int(rng.integers(3, 9))
        z = rng.choice([1, 6, 8], size=nat)
        pos = rng.uniform(0, 4, (nat, 3))
        a = Atoms(numbers=z, positions=pos)
        e = sum(TRUE_E0[int(x)] for x in z) + 1e-3 * rng.normal() * nat
        a.calc = SinglePointCalculator(a, energy=e, forces=rng.normal(size=(nat, 3)))
        a.info["config_type"] = "Default"
        out.append(a)
    return out


def test_fit_e0s_recovers_reference_energies():
    e0 = fit_e0s(_synthetic())
    assert set(e0) == {1, 6, 8}
    for z, v in TRUE_E0.items():
        assert e0[z] == pytest.approx(v, abs=0.01)


def test_isolated_atom_e0s():
    frames = _synthetic(5)
    for z, e in TRUE_E0.items():
        a = Atoms(numbers=[z], positions=[[0, 0, 0]])
        a.calc = SinglePointCalculator(a, energy=e)
        a.info["config_type"] = "IsolatedAtom"
        frames.append(a)
    assert e0s_from_isolated_atoms(frames) == TRUE_E0
    st = compute_statistics(frames, r_max=3.0)  # auto -> isolated atoms, excluded from the rest
    assert st.e0s_source == "isolated" and st.num_configs == 5


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared DFT data not available")
def test_isolated_atoms_in_shared_files():
    acac = e0s_from_isolated_atoms(read(SHARED / "acac" / "isolated_atoms.xyz"))  # config_type isolated_atom
    assert set(acac) == {1, 6, 8} and acac[1] == pytest.approx(-13.568422178253735)
    bpa = e0s_from_isolated_atoms(read(SHARED / "3bpa" / "iso_atoms.xyz"))  # single-atom frames
    assert set(bpa) == {1, 6, 7, 8}


def test_avg_num_neighbors_counts_edges_like_ase():
    cu = bulk("Cu", "fcc", a=3.6).repeat((2, 2, 2))
    cu.rattle(0.1, seed=0)
    cu.calc = SinglePointCalculator(cu, energy=0.0)
    i = ase_neighbor_list("i", cu, 4.0)
    expected = len(i) / len(cu)
    assert avg_num_neighbors([cu], 4.0) == pytest.approx(expected)
    assert avg_num_neighbors(AtomicDataset([cu], 4.0)) == pytest.approx(expected)
    # fcc first shell: 12 neighbours at a/sqrt(2) = 2.55 Å
    perfect = bulk("Cu", "fcc", a=3.6)
    assert avg_num_neighbors([perfect], 3.0) == pytest.approx(12.0)


def test_energy_force_scales_and_json_round_trip(tmp_path):
    frames = _synthetic()
    e0 = dict(TRUE_E0)
    mean, std = mean_std_interaction_energy(frames, e0)
    per_atom = [(a.get_potential_energy() - sum(e0[int(z)] for z in a.numbers)) / len(a) for a in frames]
    assert mean == pytest.approx(np.mean(per_atom)) and std == pytest.approx(np.std(per_atom, ddof=1))
    m2, rms = mean_rms_energy_forces(frames, e0)
    forces = np.concatenate([a.get_forces() for a in frames])
    assert m2 == pytest.approx(mean) and rms == pytest.approx(np.sqrt(np.mean(forces**2)))
    # same numbers from the lazy on-disk dataset
    write_hdf5(frames, tmp_path / "s.h5")
    st_mem = compute_statistics(frames, r_max=3.0, e0s=e0)
    st_lazy = compute_statistics(LazyDataset(tmp_path / "s.h5", cutoff=3.0), r_max=3.0, e0s=e0)
    for key in ("avg_num_neighbors", "mean_interaction_energy", "std_interaction_energy", "forces_rms"):
        assert getattr(st_lazy, key) == pytest.approx(getattr(st_mem, key))
    st_mem.save(tmp_path / "stats.json")
    assert DatasetStatistics.load(tmp_path / "stats.json") == st_mem


MACE_PY = REPO / ".venv-mace" / "bin" / "python"
MACE_SCRIPT = r"""
import sys, json, numpy as np, torch
torch.set_default_dtype(torch.float64)
from mace import data, tools
from mace.data.utils import KeySpecification
from mace.tools import torch_geometric
from mace.modules.utils import (compute_avg_num_neighbors, compute_mean_rms_energy_forces,
                                compute_mean_std_atomic_inter_energy)
path, r_max, e0s = sys.argv[1], float(sys.argv[2]), {int(k): v for k, v in json.loads(sys.argv[3]).items()}
_, configs = data.load_from_xyz(file_path=path, key_specification=KeySpecification.from_defaults(),
                                config_type_weights={"Default": 1.0})
zs = sorted(e0s)
table = tools.get_atomic_number_table_from_zs(zs)
ds = [data.AtomicData.from_config(c, z_table=table, cutoff=r_max) for c in configs]
loader = torch_geometric.dataloader.DataLoader(ds, batch_size=7, shuffle=False)
ae = np.array([[e0s[z] for z in zs]])
mean, rms = compute_mean_rms_energy_forces(loader, ae)
_, std = compute_mean_std_atomic_inter_energy(loader, ae)
print(json.dumps({"avg": float(compute_avg_num_neighbors(loader)), "mean": float(np.ravel(mean)[0]),
                  "rms": float(np.ravel(rms)[0]), "std": float(np.ravel(std)[0])}))
"""


@pytest.mark.skipif(not MACE_PY.exists() or not SHARED.is_dir(), reason="needs the mace-torch venv and shared data")
def test_statistics_match_mace_torch(tmp_path):
    frames = read(SHARED / "3bpa" / "train_300K.xyz", index=":30")
    e0 = e0s_from_isolated_atoms(read(SHARED / "3bpa" / "iso_atoms.xyz"))
    for a in frames:  # write with MACE's default keys
        a.info["REF_energy"] = a.get_potential_energy()
        a.arrays["REF_forces"] = a.get_forces()
        a.calc = None
    ase.io.write(tmp_path / "m.xyz", frames)
    env = dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1")
    out = subprocess.run(
        [str(MACE_PY), "-c", MACE_SCRIPT, str(tmp_path / "m.xyz"), "4.0", json.dumps(e0)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    ref = json.loads(out.stdout.strip().splitlines()[-1])
    st = compute_statistics(read(tmp_path / "m.xyz"), r_max=4.0, e0s=e0)
    assert st.avg_num_neighbors == pytest.approx(ref["avg"], rel=1e-12)
    assert st.mean_interaction_energy == pytest.approx(ref["mean"], rel=1e-10)
    assert st.std_interaction_energy == pytest.approx(ref["std"], rel=1e-6)
    assert st.forces_rms == pytest.approx(ref["rms"], rel=1e-10)


def test_cli_convert_and_stats(tmp_path):
    frames = _synthetic(8)
    for a in frames:
        a.info["REF_energy"] = a.get_potential_energy()
        a.arrays["REF_forces"] = a.get_forces()
        a.calc = None
    ase.io.write(tmp_path / "in.xyz", frames)
    from mlpot.cli.main import main

    assert main(["data", "convert", str(tmp_path / "in.xyz"), str(tmp_path / "out.h5"), "--cutoff", "3.0"]) == 0
    back = read(tmp_path / "out.h5")
    assert len(back) == 8
    np.testing.assert_allclose([a.get_potential_energy() for a in back], [a.info["REF_energy"] for a in frames])
    assert main(["data", "stats", str(tmp_path / "out.h5"), "--r-max", "3.0", "--e0s", "fit",
                 "--json", str(tmp_path / "st.json")]) == 0
    st = DatasetStatistics.load(tmp_path / "st.json")
    assert st.num_configs == 8 and st.e0s_source == "fit"
    assert main(["data", "stats", str(tmp_path / "missing.xyz")]) == 1  # clear error, no traceback
