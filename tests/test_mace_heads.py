"""Multi-head MACE (mace-torch's ``heads``): per-head E0s, scale/shift and readouts; head selection
in the graph, ``predict``, the calculator and the command line; per-atom virials/stresses.

Parity with mace-torch's numbers for every head is in ``tests/test_mace_parity.py`` (fixture
``multihead/``); here: the head chosen is the one used, heads are independent where they
should be, a batch of structures read by different heads equals the structures one by one,
and per-atom stresses sum to the stress and match mace-torch's per-atom virials.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule

from mlpot.calculators import MLPotCalculator
from mlpot.data import atoms_to_graph, collate
from mlpot.errors import ConfigError
from mlpot.models import build_model
from mlpot.models.mace_import import import_mace
from mlpot.testing import model_checks as mc

FIXTURE = Path(__file__).parent / "fixtures" / "mace_parity" / "multihead"
pytestmark = pytest.mark.usefixtures("one_torch_thread")

TWO_HEADS = {
    "r_max": 3.0,
    "atomic_numbers": [1, 6, 8],
    "hidden_irreps": "3x0e + 3x1o",
    "max_ell": 2,
    "correlation": 2,
    "num_interactions": 2,
    "num_bessel": 4,
    "radial_MLP": [8],
    "MLP_irreps": "4x0e",
    "avg_num_neighbors": 3.0,
    "heads": ["dft_a", "dft_b"],
    "e0s": {"dft_a": {"H": -13.6, "C": -1029.5, "O": -2041.8}, "dft_b": [-1.0, -2.0, -3.0]},
    "scale": [1.3, 0.7],
    "shift": [0.1, -0.2],
    "subtract_isolated": False,
    "seed": 0,
}


def two_heads(**kw):
    model = build_model("MACE", **{**TWO_HEADS, **kw})
    mc.randomize_parameters(model, seed=1, scale=0.3)
    return model.eval()


def _reference(head=None):
    for r in json.loads((FIXTURE / "reference.json").read_text())["structures"]:
        if r.get("head") == head:
            yield r, Atoms(numbers=r["numbers"], positions=r["positions"], cell=r["cell"], pbc=r["pbc"])


def test_imported_heads_and_default():
    model = import_mace(FIXTURE)
    assert model.heads == ["pt_head", "Default"]
    assert model.active_head == "Default"  # mace-torch's calculator default
    assert tuple(model.atomic_energies.shape) == (2, 3)
    a = model.predict([next(_reference())[1]], head="pt_head")["energy"][0]
    b = model.predict([next(_reference())[1]], head="Default")["energy"][0]
    assert abs(a - b) > 1.0  # the two heads are different functions


def test_calculator_head_matches_mace_torch():
    model = import_mace(FIXTURE)
    for head in ("pt_head", None):
        calc = MLPotCalculator(model, device="cpu", head=head)
        for r, atoms in _reference(head):
            atoms.calc = calc
            assert abs(atoms.get_potential_energy() - r["energy"]) < 1e-8, r["name"]
            np.testing.assert_allclose(atoms.get_forces(), r["forces"], atol=1e-8, rtol=0)


def test_atomic_virials_match_mace_torch_and_sum_to_the_virial():
    model = import_mace(FIXTURE)
    n = 0
    for head in ("pt_head", "Default"):
        for r, atoms in _reference(head):
            if "atomic_virials" not in r:
                continue
            g = collate([atoms_to_graph(atoms, model.r_max)])
            g["head"] = torch.tensor([model.head_index(head)])
            out = model(g, compute_force=True, compute_stress=True, compute_atomic_stress=True)
            W = out["atomic_virials"].detach().numpy()
            np.testing.assert_allclose(W, r["atomic_virials"], atol=1e-8, rtol=0, err_msg=r["name"])
            np.testing.assert_allclose(W.sum(0), out["virials"][0].detach().numpy(), atol=1e-10, rtol=0)
            n += 1
    assert n == 2


def test_unknown_or_missing_head_is_an_error():
    model = two_heads()
    assert model.active_head is None  # two heads, none named "default"
    with pytest.raises(ConfigError, match=r"dft_a.*dft_b.*none is named 'default'"):
        MLPotCalculator(model, device="cpu")
    with pytest.raises(ConfigError, match="head 'nope' not in"):
        MLPotCalculator(model, device="cpu", head="nope")
    with pytest.raises(ConfigError, match="head 'nope' not in"):
        model.predict([molecule("H2O")], head="nope")
    with pytest.raises(ConfigError, match="none is named 'default'"):
        model.predict([molecule("H2O")])
    with pytest.raises(ConfigError, match="2 values for 3 heads"):
        build_model("MACE", **{**TWO_HEADS, "heads": ["a", "b", "c"], "e0s": None, "scale": [1.0, 2.0]})


def test_head_selects_its_e0s_scale_and_readout():
    model = two_heads()
    atoms = molecule("CH3OH")
    ea = model.predict([atoms], head="dft_a")["energy"][0]
    eb = model.predict([atoms], head="dft_b")["energy"][0]
    # E0s differ by a known amount; the rest of the two heads differ too
    e0a = sum(model.atomic_energies[0, model.species_index(torch.tensor([z]))].item() for z in atoms.numbers)
    e0b = sum(model.atomic_energies[1, model.species_index(torch.tensor([z]))].item() for z in atoms.numbers)
    assert abs(e0a - e0b) > 100
    assert abs((ea - e0a) - (eb - e0b)) > 1e-6
    # head b's gated readout block and readout columns do not change head a's energy
    with torch.no_grad():
        ro = model.readouts[-1]
        hidden = ro.linear_2.weight.numel() // 2  # (H*M, H) flattened
        w2 = ro.linear_2.weight.view(-1, 2)
        w2[hidden // 2:, :] += 1.0  # hidden block of head b, both output columns
        model.readouts[0].linear.weight.view(-1, 2)[:, 1] += 1.0
    assert abs(model.predict([atoms], head="dft_a")["energy"][0] - ea) < 1e-12
    assert abs(model.predict([atoms], head="dft_b")["energy"][0] - eb) > 1e-6


def test_batch_of_structures_with_different_heads():
    """Replay fine-tuning reads structures of one batch with different heads (graph["head"])."""
    model = two_heads()
    frames = [molecule("H2O"), molecule("CH4"), molecule("CH3OH")]
    heads = ["dft_a", "dft_b", "dft_a"]
    g = collate([atoms_to_graph(a, model.r_max) for a in frames])
    g["head"] = torch.tensor([model.head_index(h) for h in heads])
    out = model(g)
    for k, (a, h) in enumerate(zip(frames, heads)):
        one = model.predict([a], head=h)
        assert abs(out["energy"][k].item() - one["energy"][0]) < 1e-10
        f = out["forces"][g["ptr"][k]: g["ptr"][k + 1]].detach().numpy()
        np.testing.assert_allclose(f, one["forces"][0], atol=1e-10, rtol=0)


def test_single_head_isolated_atoms_with_subtract_isolated_per_head():
    model = two_heads(subtract_isolated=True, shift=0.0)
    for h in range(2):
        model.select_head(model.heads[h])
        mc.check_isolated_atoms(model)


def test_per_atom_stress_sums_to_stress_and_fd():
    model = two_heads()
    atoms = bulk("C", "diamond", a=3.6, cubic=True)
    atoms.numbers[[1, 5]] = [8, 1]
    atoms.rattle(0.05, seed=2)
    calc = MLPotCalculator(model, device="cpu", head="dft_b")
    atoms.calc = calc
    stresses = atoms.get_stresses()
    assert stresses.shape == (len(atoms), 6)
    np.testing.assert_allclose(stresses.sum(0), atoms.get_stress(), atol=1e-12, rtol=0)
    # the total against a finite strain of the cell (central differences)
    h = 1e-5
    V = atoms.get_volume()
    fd = np.zeros((3, 3))
    for a in range(3):
        for b in range(3):
            e = np.zeros((3, 3))
            e[a, b] = e[b, a] = 0.5 * h if a != b else h
            vals = []
            for sgn in (1, -1):
                x = atoms.copy()
                x.set_cell(atoms.cell.array @ (np.eye(3) + sgn * e), scale_atoms=True)
                x.calc = calc
                vals.append(x.get_potential_energy())
            fd[a, b] = (vals[0] - vals[1]) / (2 * h) / V
    from mlpot.voigt import full_3x3_to_voigt

    np.testing.assert_allclose(stresses.sum(0), full_3x3_to_voigt(fd), atol=1e-7, rtol=0)
    assert np.abs(stresses).max() > 1e-3


def test_head_survives_save_and_load(tmp_path):
    import mlpot

    model = two_heads()
    model.save(tmp_path / "m.pt")
    back = mlpot.load_model(tmp_path / "m.pt", device="cpu")
    assert back.heads == model.heads
    atoms = molecule("H2O")
    for h in model.heads:
        assert abs(back.predict([atoms], head=h)["energy"][0] - model.predict([atoms], head=h)["energy"][0]) < 1e-12
