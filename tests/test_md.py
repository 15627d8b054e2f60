"""`mlpot md` and the MD helpers: NVE energy conservation, Langevin temperature, CLI."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import ase.io
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from sim_helpers import ToyMP, rattled_cu  # noqa: E402

from mlpot.calculators import MLPotCalculator  # noqa: E402
from mlpot.cli.main import main  # noqa: E402
from mlpot.sim.md import init_velocities, make_integrator, run_md  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "models" / "emt_cu_mace.pt"


@pytest.fixture(scope="module")
def model():
    """The EMT-trained MACE fixture (regenerate with scripts/make_test_model.py)."""
    import mlpot

    return mlpot.load_model(FIXTURE, device="cpu", dtype="float64")


def _nve_max_deviation(model, size, steps):
    atoms = rattled_cu(size, a=3.61, stdev=0.0, seed=0)
    atoms.calc = MLPotCalculator(model, device="cpu", dtype="float64", skin=0.5)
    init_velocities(atoms, 300.0, seed=3)
    dyn = make_integrator(atoms, "nve", 1.0)
    etot = []
    dyn.attach(lambda: etot.append(atoms.get_potential_energy() + atoms.get_kinetic_energy()), interval=10)
    dyn.run(steps)
    etot = np.array(etot)
    assert atoms.get_temperature() > 50  # it really moved
    return np.abs(etot - etot[0]).max() / len(atoms)


def test_nve_energy_drift_short(model):
    """300 steps of 1 fs, float64, 8 Cu atoms at 300 K: |E_tot(t) - E_tot(0)| < 1 meV/atom."""
    dev = _nve_max_deviation(model, (1, 1, 2), 300)
    assert dev < 1e-3, f"total energy deviates by {1000 * dev:.3f} meV/atom"


@pytest.mark.slow
def test_nve_energy_drift_1000_steps(model):
    """1000 steps of 1 fs, float64, 32 Cu atoms at 300 K: |E_tot(t) - E_tot(0)| < 1 meV/atom."""
    dev = _nve_max_deviation(model, (2, 2, 2), 1000)
    assert dev < 1e-3, f"total energy deviates by {1000 * dev:.3f} meV/atom"


def _langevin_tail_mean(model, size=(2, 2, 2)):
    atoms = rattled_cu(size, a=3.61, stdev=0.0, seed=0)
    atoms.calc = MLPotCalculator(model, device="cpu", dtype="float32", skin=0.5)
    init_velocities(atoms, 0.0, seed=1)
    dyn = make_integrator(atoms, "nvt", 2.0, temperature=500.0, friction=0.05, seed=7)
    temps = []
    dyn.attach(lambda: temps.append(atoms.get_temperature()), interval=5)
    dyn.run(1500)
    return np.array(temps[len(temps) // 3:]).mean()


def test_langevin_reaches_target_temperature():
    """The thermostat itself, on the cheap toy model (the fixture version is marked slow).
    Start from 0 K; the mean temperature over the last 1000 of 1500 steps (2 fs, friction
    0.05/fs) is within 12% of 500 K (8 atoms: T fluctuates by ~30% per sample, ~20 fs
    correlation time, ~100 independent samples, so the tail mean has ~3% standard error)."""
    mean = _langevin_tail_mean(ToyMP(r_max=4.0, atomic_numbers=[29], num_layers=1, seed=0), size=(1, 1, 2))
    assert abs(mean - 500.0) < 0.12 * 500.0, mean


@pytest.mark.slow
def test_langevin_reaches_target_temperature_fixture_model(model):
    mean = _langevin_tail_mean(model)
    assert abs(mean - 500.0) < 0.12 * 500.0, mean


def test_cli_md_nve_and_npt_end_to_end(tmp_path, capsys):
    model = ToyMP(r_max=4.0, atomic_numbers=[29], num_layers=2, seed=0)
    path = tmp_path / "toy.pt"
    model.save(path)
    inp = tmp_path / "cu.xyz"
    ase.io.write(inp, rattled_cu((2, 2, 1), a=3.61, stdev=0.01))
    rc = main(["md", str(inp), "--model", str(path), "--ensemble", "nve", "--temperature", "300", "--timestep",
               "1", "--steps", "40", "--log", "10", "--trajectory", str(tmp_path / "t.traj"), "--seed", "2",
               "--no-progress", "--dtype", "float64"])
    assert rc == 0
    assert "ns/day" in capsys.readouterr().out
    log = np.loadtxt(tmp_path / "cu_md.log")
    assert log.shape == (5, 6)  # steps 0, 10, ..., 40; time epot ekin etot T p
    np.testing.assert_allclose(log[:, 0], [0, 0.01, 0.02, 0.03, 0.04])
    np.testing.assert_allclose(log[:, 1] + log[:, 2], log[:, 3], atol=1e-6)
    assert np.ptp(log[:, 3]) < 1e-2 * len(ase.io.read(inp))  # NVE: small total-energy change
    assert len(ase.io.read(tmp_path / "t.traj", ":")) == 5
    rc = main(["md", str(inp), "--model", str(path), "--ensemble", "npt", "--temperature", "300", "--pressure",
               "1.0", "--steps", "20", "--log", "5", "--logfile", str(tmp_path / "npt.log"), "--trajectory",
               str(tmp_path / "npt.xyz"), "--no-progress"])
    assert rc == 0
    frames = ase.io.read(tmp_path / "npt.xyz", ":")
    assert len(frames) == 5 and np.isfinite(np.loadtxt(tmp_path / "npt.log")).all()
    assert frames[-1].get_volume() != pytest.approx(frames[0].get_volume(), rel=1e-9)  # the cell moves


def test_run_md_reports_throughput():
    model = ToyMP(r_max=4.0, atomic_numbers=[29], num_layers=1, seed=0)
    atoms = rattled_cu((1, 1, 1), stdev=0.01)
    atoms.calc = MLPotCalculator(model, device="cpu")
    init_velocities(atoms, 100.0, seed=0)
    s = run_md(atoms, make_integrator(atoms, "nve", 1.0), steps=10, timestep_fs=1.0, log_every=5, progress=False)
    assert s.steps == 10 and s.atom_steps_per_s > 0
    assert s.ns_per_day == pytest.approx(s.atom_steps_per_s / len(atoms) * 1e-6 * 86400, rel=1e-9)
