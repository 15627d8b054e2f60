"""`scripts/bench_train.py --vs-mace`: the pieces that do not need mace-torch installed."""
from __future__ import annotations

import argparse

import numpy as np
import pytest
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from mlpot.bench.train_vs_mace import _mace_command, _mlpot_config, parse_mace_log, write_extxyz_subset
from mlpot.data import read
from mlpot.train.config import validate_config

# the lines mace_run_train 0.3.16 writes (format of mace.tools.train.valid_err_log, PerAtomMAE)
MACE_LOG = """\
2026-12-01 04:56:08.541 INFO: Started training, reporting errors on validation set
2026-12-01 04:56:08.541 INFO: Loss metrics on validation set
2026-12-01 04:56:49.466 INFO: Initial: head: Default, loss=18.34705948, MAE_E_per_atom=    9.88 meV, MAE_F=  900.33 meV / A
2026-12-01 04:58:40.258 INFO: Epoch 0: head: Default, loss=12.39694691, MAE_E_per_atom=  664.73 meV, MAE_F=  742.25 meV / A
2026-12-01 05:00:07.143 INFO: Epoch 1: head: Default, loss=6.68679554, MAE_E_per_atom= 1019.56 meV, MAE_F=  520.64 meV / A
"""


def test_parse_mace_log(tmp_path):
    (tmp_path / "m.log").write_text(MACE_LOG)
    ends, pts = parse_mace_log(tmp_path / "m.log")
    assert ends == pytest.approx([151.717, 238.602])
    assert [f for _, f in pts] == [742.25, 520.64]


def test_extxyz_subset_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    frames = []
    for _ in range(3):
        a = Atoms("CH4", positions=rng.uniform(0, 3, (5, 3)))
        a.calc = SinglePointCalculator(a, energy=float(rng.normal()), forces=rng.normal(size=(5, 3)))
        frames.append(a)
    path = write_extxyz_subset(frames, tmp_path / "d" / "x.xyz")
    back = read(path, energy_key="REF_energy", forces_key="REF_forces")
    for a, b in zip(frames, back):
        assert b.get_potential_energy() == pytest.approx(a.get_potential_energy(), abs=1e-7)
        np.testing.assert_allclose(b.get_forces(), a.get_forces(), rtol=0, atol=1e-7)  # extxyz: 8 decimals


def test_both_programs_get_the_same_model(tmp_path):
    args = argparse.Namespace(seed=0, r_max=5.0, max_ell=2, hidden_irreps="32x0e + 32x1o", correlation=2,
                              radial_mlp=[32, 32], batch_size=5, lr=0.01, minutes=1.0,
                              mace_train="mace_run_train")
    files = {"train": tmp_path / "t.xyz", "valid": tmp_path / "v.xyz"}
    for f in files.values():
        f.write_text("")
    e0s = {1: -1.5, 6: -2.5}
    cfg = validate_config(_mlpot_config(args, files, e0s, tmp_path))
    cmd = _mace_command(args, files, e0s, tmp_path)
    flag = {cmd[k]: cmd[k + 1] for k in range(1, len(cmd) - 1) if cmd[k].startswith("--")}
    m, t = cfg["model"], cfg["training"]
    assert flag["--hidden_irreps"] == m["hidden_irreps"] and int(flag["--max_ell"]) == m["max_ell"]
    assert int(flag["--correlation"]) == m["correlation"] and float(flag["--r_max"]) == m["r_max"]
    assert flag["--radial_MLP"] == repr(m["radial_MLP"]) and flag["--default_dtype"] == cfg["dtype"]
    assert int(flag["--num_radial_basis"]) == m["num_bessel"]
    assert int(flag["--num_cutoff_basis"]) == m["num_polynomial_cutoff"]
    assert float(flag["--lr"]) == t["lr"] and int(flag["--batch_size"]) == t["batch_size"]
    assert float(flag["--forces_weight"]) == t["forces_weight"]
    assert float(flag["--energy_weight"]) == t["energy_weight"]
    assert float(flag["--ema_decay"]) == t["ema_decay"] and float(flag["--weight_decay"]) == t["weight_decay"]
    # mace-torch's --model MACE: non-residual first interaction, shift 0
    assert m["interaction_cls_first"] == "RealAgnosticInteractionBlock" and m["shift"] == 0.0
    assert eval(flag["--E0s"]) == e0s and {int(k): v for k, v in m["e0s"].items()} == e0s
