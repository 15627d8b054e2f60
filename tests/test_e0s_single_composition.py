"""E0s of single-composition training sets: mean energy per atom, said in the log and the model file."""
from __future__ import annotations

import ase.io
import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from test_train_helpers import toy_config

from mlpot.data.statistics import compute_statistics, fit_e0s, single_composition_e0s
from mlpot.train.config import validate_config


def _molecules(formula_numbers, n=12, seed=0, scale=1):
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        z = np.tile(formula_numbers, scale if np.isscalar(scale) else scale[k % len(scale)])
        pos = rng.uniform(0, 3.0, (len(z), 3))
        a = Atoms(numbers=z, positions=pos)
        e = -1000.0 * len(z) + rng.normal()
        a.calc = SinglePointCalculator(a, energy=e, forces=rng.normal(size=(len(z), 3)))
        out.append(a)
    return out


def test_single_composition_mean_energy_per_atom():
    ethanol = [6, 6, 8, 1, 1, 1, 1, 1, 1]
    frames = _molecules(ethanol)
    energies = np.array([a.get_potential_energy() for a in frames])
    st = compute_statistics(frames, r_max=3.0, e0s="fit")
    assert st.e0s_source == "single_composition"
    assert set(st.e0s) == {1, 6, 8}
    per_atom = energies.mean() / len(ethanol)
    for v in st.e0s.values():
        assert v == pytest.approx(per_atom, rel=1e-12)
    # the molecule's E0 sum is the mean energy per structure; interaction energies centre on 0
    assert sum(st.e0s[z] for z in ethanol) == pytest.approx(energies.mean(), rel=1e-12)
    assert abs(st.mean_interaction_energy) < 1e-9
    assert "single composition" in st.e0s_note and "mean energy per structure" in st.e0s_note
    # least squares on the same data is not identifiable: it returns other per-element values
    lsq = fit_e0s(frames)
    assert max(abs(lsq[z] - per_atom) for z in lsq) > 1.0


def test_proportional_compositions_count_as_one():
    frames = _molecules([6, 1, 1, 1, 1], n=8, scale=[1, 2])  # CH4 and C2H8
    e0 = single_composition_e0s(frames)
    ref = np.mean([a.get_potential_energy() / len(a) for a in frames])
    assert e0 == {1: pytest.approx(ref), 6: pytest.approx(ref)}


def test_multi_composition_still_least_squares():
    rng = np.random.default_rng(1)
    true = {1: -13.6, 6: -1029.5, 8: -2042.0}
    frames = []
    for _ in range(20):
        z = rng.choice([1, 6, 8], size=int(rng.integers(3, 8)))
        a = Atoms(numbers=z, positions=rng.uniform(0, 4, (len(z), 3)))
        a.calc = SinglePointCalculator(a, energy=sum(true[int(x)] for x in z), forces=np.zeros((len(z), 3)))
        frames.append(a)
    assert single_composition_e0s(frames) is None
    st = compute_statistics(frames, r_max=3.0, e0s="fit")
    assert st.e0s_source == "fit" and st.e0s_note == ""
    assert st.e0s == fit_e0s(frames)
    for z, v in true.items():
        assert st.e0s[z] == pytest.approx(v, abs=1e-6)
    # one element is least squares too (identifiable)
    si = _molecules([14], n=5, scale=[2, 3])
    assert single_composition_e0s(si) is None
    assert compute_statistics(si, r_max=3.0, e0s="fit").e0s_source == "fit"


def test_training_on_one_composition_logs_and_records_it(tmp_path):
    from mlpot.train import train

    base = bulk("Cu", "fcc", a=3.6, cubic=True)
    base.numbers[0] = 28  # Cu3Ni, one composition in every frame
    rng = np.random.default_rng(0)
    frames = []
    for _ in range(10):
        a = base.copy()
        a.positions += rng.normal(scale=0.05, size=a.positions.shape)
        a.calc = EMT()
        a.calc = SinglePointCalculator(a, energy=a.get_potential_energy(), forces=a.get_forces())
        frames.append(a)
    ase.io.write(tmp_path / "cu3ni.xyz", frames)
    raw = toy_config(tmp_path / "run", epochs=1)
    raw["data"] = {"train": str(tmp_path / "cu3ni.xyz"), "valid": 0.2}
    lines = []
    train(validate_config(raw), log=lines.append)
    said = [m for m in lines if m.startswith("E0s: the training set has a single composition")]
    assert len(said) == 1, lines
    meta = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    stats = meta["metadata"]["statistics"]
    assert stats["e0s_source"] == "single_composition" and stats["e0s_note"] == said[0]
    e0s = stats["e0s"]
    assert e0s["28"] == e0s["29"]
