"""Model files: round trip through mlpot.load_model, atomic writes, version guard, predict()."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from ase.stress import full_3x3_to_voigt_6_stress

import mlpot
from mlpot.errors import ModelFileError
from mlpot.models.escn import ESCN
from mlpot.models.io import FORMAT_VERSION, read_model_file
from mlpot.testing.model_checks import randomize_parameters

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    m = ESCN(r_max=3.0, atomic_numbers=[1, 8, 14], e0s={"H": -1.0, "O": -2.0, "Si": -3.0}, num_layers=1, lmax=2,
             mmax=1, sphere_channels=4, hidden_channels=4, edge_channels=4, num_bessel=4, ffn_activation="gate",
             seed=0)
    randomize_parameters(m, seed=2)
    return m.eval()


def _structures():
    water = Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    si = bulk("Si", "diamond", a=5.43)
    si.rattle(0.05, seed=1)
    return [water, si]


def test_round_trip_identical_outputs(model, tmp_path):
    path = tmp_path / "m.pt"
    model.save(path)
    loaded = mlpot.load_model(path, device="cpu")
    assert isinstance(loaded, ESCN) and loaded.config == model.config
    assert loaded.e0s == model.e0s and loaded.atomic_numbers == model.atomic_numbers
    a, b = model.predict(_structures()), loaded.predict(_structures())
    np.testing.assert_array_equal(a["energy"], b["energy"])
    for fa, fb in zip(a["forces"], b["forces"]):
        np.testing.assert_array_equal(fa, fb)
    np.testing.assert_array_equal(a["stress"], b["stress"])
    # float32 on load: same numbers to float32 precision, float32 parameters
    l32 = mlpot.load_model(path, device="cpu", dtype="float32")
    assert next(l32.parameters()).dtype == torch.float32
    np.testing.assert_allclose(l32.predict(_structures())["energy"], a["energy"], rtol=1e-5)


def test_save_is_atomic(model, tmp_path, monkeypatch):
    """A failure while writing leaves the previous file intact and no temporary files."""
    path = tmp_path / "m.pt"
    model.save(path)
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        model.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["m.pt"]


def test_future_format_version_refused(model, tmp_path):
    path = tmp_path / "m.pt"
    model.save(path)
    payload = read_model_file(path)
    payload["format_version"] = FORMAT_VERSION + 1
    torch.save(payload, path)
    with pytest.raises(ModelFileError, match="newer"):
        mlpot.load_model(path)


def test_not_a_model_file(tmp_path):
    bad = tmp_path / "junk.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(ModelFileError, match="junk.pt"):
        mlpot.load_model(bad)
    torch.save({"hello": 1}, bad)
    with pytest.raises(ModelFileError, match="junk.pt"):
        mlpot.load_model(bad)


def test_mismatched_weights_refused(model, tmp_path):
    path = tmp_path / "m.pt"
    model.save(path)
    payload = read_model_file(path)
    payload["config"]["sphere_channels"] = 6
    torch.save(payload, path)
    with pytest.raises(ModelFileError):
        mlpot.load_model(path)


def test_predict_list_of_atoms(model):
    structs = _structures()
    out = model.predict(structs, batch_size=1)
    assert out["energy"].shape == (2,)
    assert [f.shape for f in out["forces"]] == [(3, 3), (2, 3)]
    assert out["stress"].shape == (2, 6)
    # batching does not change the result
    out2 = model.predict(structs, batch_size=16)
    np.testing.assert_allclose(out2["energy"], out["energy"], rtol=0, atol=1e-10)
    # Voigt order: predict() and the calculator give ASE's own conversion of the forward's 3x3
    from mlpot.calculators import MLPotCalculator
    from mlpot.testing.model_checks import evaluate

    full = evaluate(model, structs[1], compute_stress=True)["stress"][0]
    ase_voigt = full_3x3_to_voigt_6_stress(full)
    gaps = np.abs(ase_voigt[:, None] - ase_voigt[None, :])[~np.eye(6, dtype=bool)]
    assert gaps.min() > 1e-8  # six distinct components: any permutation of the order would fail
    np.testing.assert_allclose(out["stress"][1], ase_voigt, rtol=0, atol=1e-12)
    si = structs[1].copy()
    si.calc = MLPotCalculator(model, device="cpu")
    np.testing.assert_allclose(si.get_stress(), ase_voigt, rtol=0, atol=1e-12)
    np.testing.assert_allclose(si.get_stress(voigt=False), full, rtol=0, atol=1e-12)
    # a single Atoms object works as well
    single = model.predict(structs[0])
    np.testing.assert_allclose(single["energy"], out["energy"][:1], atol=1e-10)
