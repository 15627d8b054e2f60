"""MLPotCalculator extras: committees (mean and force spread) and D3 dispersion (torch-dftd)."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
from ase.calculators.fd import calculate_numerical_forces

sys.path.insert(0, os.path.dirname(__file__))
from sim_helpers import ToyMP, rattled_cu  # noqa: E402

from mlpot.calculators import MLPotCalculator  # noqa: E402
from mlpot.errors import ConfigError  # noqa: E402


def _members():
    return [ToyMP(r_max=4.0, atomic_numbers=[29], num_layers=1, seed=seed) for seed in range(3)]


def test_committee_mean_and_per_atom_force_std():
    members = _members()
    atoms = rattled_cu((1, 1, 2))
    singles = []
    for m in members:
        a = atoms.copy()
        a.calc = MLPotCalculator(m, device="cpu", dtype="float64")
        singles.append((a.get_potential_energy(), a.get_forces(), a.get_stress()))
    atoms.calc = MLPotCalculator(models=members, device="cpu", dtype="float64")
    e, f, s = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
    assert e == pytest.approx(np.mean([x[0] for x in singles]), rel=1e-12)
    np.testing.assert_allclose(f, np.mean([x[1] for x in singles], axis=0), atol=1e-12)
    np.testing.assert_allclose(s, np.mean([x[2] for x in singles], axis=0), atol=1e-12)
    F = np.stack([x[1] for x in singles])
    expect = np.sqrt(((F - F.mean(0)) ** 2).sum(-1).mean(0))
    res = atoms.calc.results
    assert res["forces_std"].shape == (len(atoms),) and expect.max() > 1e-3
    np.testing.assert_allclose(res["forces_std"], expect, atol=1e-12)
    assert res["max_force_std"] == pytest.approx(expect.max())
    assert res["energy_std"] == pytest.approx(np.std([x[0] for x in singles]))
    # identical members: zero spread
    same = MLPotCalculator(models=[members[0], members[0]], device="cpu", dtype="float64")
    same.calculate(atoms, ["energy", "forces"])
    assert same.results["max_force_std"] == pytest.approx(0.0, abs=1e-12)


def test_committee_refuses_mismatched_members():
    with pytest.raises(ConfigError, match="committee members must share"):
        MLPotCalculator(models=[ToyMP(r_max=4.0, atomic_numbers=[29]), ToyMP(r_max=3.0, atomic_numbers=[29])],
                        device="cpu")
    with pytest.raises(ConfigError, match="either model or models"):
        MLPotCalculator(_members()[0], models=_members(), device="cpu")


def _d3_check(atoms, model, **d3):
    import torch
    from torch_dftd.torch_dftd3_calculator import TorchDFTD3Calculator

    periodic = bool(atoms.pbc.all())
    props = ["energy", "forces"] + (["stress"] if periodic else [])
    plain = MLPotCalculator(model, device="cpu", dtype="float64")
    plain.calculate(atoms, props)
    a = atoms.copy()
    a.calc = MLPotCalculator(model, device="cpu", dtype="float64", dispersion="d3bj", xc="pbe",
                             dispersion_cutoff=d3.get("cutoff"))
    a.calc.calculate(a, props)
    got = a.calc.results
    ref_atoms = atoms.copy()
    ref_atoms.calc = TorchDFTD3Calculator(damping="bj", xc="pbe", dtype=torch.float64, **d3)
    ref_atoms.calc.calculate(ref_atoms, props)
    ref = ref_atoms.calc.results
    assert ref["energy"] < -0.05  # D3 binds Cu noticeably
    assert got["energy"] == pytest.approx(plain.results["energy"] + ref["energy"], abs=1e-9)
    assert got["d3_energy"] == pytest.approx(ref["energy"], abs=1e-12)
    np.testing.assert_allclose(got["forces"], plain.results["forces"] + ref["forces"], atol=1e-9)
    if periodic:
        np.testing.assert_allclose(got["stress"], plain.results["stress"] + ref["stress"], atol=1e-10)
    return a


def test_d3bj_is_added_and_equals_torch_dftd_alone():
    model = _members()[0]
    cluster = rattled_cu((1, 1, 1))
    cluster.pbc = False
    cluster.cell = None
    a = _d3_check(cluster, model)  # default (standard) D3 cutoff
    # the sum is still conservative: finite differences of the total energy
    np.testing.assert_allclose(a.get_forces(), calculate_numerical_forces(a, eps=1e-4), atol=1e-5)
    crystal = rattled_cu((1, 1, 2))
    crystal.set_cell(crystal.cell.array * 1.02, scale_atoms=True)
    _d3_check(crystal, model, cutoff=6.0)  # periodic: energy, forces and stress


def test_dispersion_needs_a_known_damping_and_functional():
    model = _members()[0]
    with pytest.raises(ConfigError, match="use one of"):
        MLPotCalculator(model, device="cpu", dispersion="d4", xc="pbe")
    with pytest.raises(ConfigError, match="needs the functional"):
        MLPotCalculator(model, device="cpu", dispersion="d3bj")


def test_md_committee_stops_or_flags_on_force_spread(tmp_path, capsys):
    import ase.io

    from mlpot.cli.main import main

    paths = []
    for k, m in enumerate(_members()):
        paths.append(tmp_path / f"m{k}.pt")
        m.save(paths[-1])
    inp = tmp_path / "cu.xyz"
    ase.io.write(inp, rattled_cu((1, 1, 2)))
    base = ["md", str(inp), "--model", str(paths[0]), "--model", str(paths[1]), "--model", str(paths[2]),
            "--steps", "6", "--log", "2", "--seed", "1", "--no-progress", "--dtype", "float64"]
    assert main(base + ["--uncertainty-threshold", "1e-6"]) == 3  # members disagree at step 0 already
    out = capsys.readouterr().out
    assert "stopped: committee force std" in out and "at step 0" in out
    assert main(base + ["--uncertainty-threshold", "1e-6", "--on-uncertainty", "flag"]) == 0
    assert "above 1e-06 eV/Å at 7 of 7 steps (0..6)" in capsys.readouterr().out
    flagged = [ln for ln in (tmp_path / "cu_md.log").read_text().splitlines() if ln.startswith("# uncertain")]
    assert len(flagged) == 7
    assert main(base + ["--uncertainty-threshold", "100"]) == 0
    assert "at 0 of 7 steps" in capsys.readouterr().out
    assert main(["md", str(inp), "--model", str(paths[0]), "--uncertainty-threshold", "0.1"]) == 1
    assert "needs a committee" in capsys.readouterr().err
