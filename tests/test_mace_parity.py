"""Parity with mace-torch 0.3.16 without mace-torch installed.

``tests/fixtures/mace_parity/`` holds a mace-torch ``ScaleShiftMACE`` (H, C, O; ``8x0e+8x1o``,
``max_ell`` 2, correlation 3, 2 residual interactions) exported by ``scripts/export_mace.py`` and
the energies, forces and stresses mace-torch computed for a molecule, a triclinic periodic cell
shorter than the cutoff and a slab (``reference.json``); ``odd_parity/`` is a model with
``0o``/``1e`` hidden channels, whose message paths include Wigner 3j symbols that changed sign
between e3nn 0.4 and 0.6; ``multihead/`` a two-head model (``pt_head``, ``Default``) with per-head
E0s and scale/shift, referenced with mace-torch's default head and with each head by name, and
mace-torch's per-atom virials of the periodic cell. Both were written by ``scripts/make_mace_fixture.py`` (see its
docstring for the two-venv end-to-end check; ``MLPOT_MACE_FIXTURE=DIR`` points this test at a
freshly made export instead).

Graphs are built by mlpot's own neighbour list (``mlpot.data.atoms_to_graph`` via
``model.predict``). mace-torch divides the virial of a partly periodic cell by the volume of
the enlarged cell its neighbour list returns; the fixture keeps that volume, so virials
(``stress * volume``) are compared.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms

from mlpot.data import atoms_to_graph, collate
from mlpot.errors import ModelFileError
from mlpot.models.mace_import import import_mace

FIXTURES = Path(__file__).parent / "fixtures" / "mace_parity"
DIRS = [Path(os.environ["MLPOT_MACE_FIXTURE"])] if os.environ.get("MLPOT_MACE_FIXTURE") else [
    FIXTURES,
    FIXTURES / "odd_parity",
    FIXTURES / "multihead",
    FIXTURES / "zbl_agnesi_gaussian",
    FIXTURES / "soft_no_cutoff",
    FIXTURES / "chebyshev",
    FIXTURES / "lmax3_corr3",
]
TOL = 1e-8


def _structures(d: Path):
    ref = json.loads((d / "reference.json").read_text())["structures"]
    for r in ref:
        atoms = Atoms(numbers=r["numbers"], positions=r["positions"], cell=r["cell"], pbc=r["pbc"])
        yield r, atoms


def _compare(model, d: Path):
    for r, atoms in _structures(d):
        out = model.predict([atoms], compute_stress="stress" in r, head=r.get("head"))
        assert abs(out["energy"][0] - r["energy"]) < TOL, r["name"]
        np.testing.assert_allclose(out["forces"][0], r["forces"], atol=TOL, rtol=0, err_msg=r["name"])
        if "stress" in r:
            volume = abs(np.linalg.det(np.asarray(r["cell"])))
            np.testing.assert_allclose(
                out["stress"][0] * volume, np.asarray(r["stress"]) * r["stress_volume"], atol=TOL, rtol=0,
                err_msg=r["name"],
            )
        if "atomic_virials" in r:  # mace-torch's per-atom virials (fully periodic cells)
            g = collate([atoms_to_graph(atoms, model.r_max)])
            g["head"] = torch.tensor([model.head_index(r.get("head"))])
            out = model(g, compute_force=True, compute_stress=True, compute_atomic_stress=True)
            np.testing.assert_allclose(out["atomic_virials"].detach().numpy(), r["atomic_virials"], atol=TOL,
                                       rtol=0, err_msg=r["name"])


@pytest.mark.parametrize("d", DIRS, ids=lambda p: p.name)
def test_energy_forces_stress_match_mace_torch(d):
    torch.set_num_threads(1)
    model = import_mace(d)
    assert next(model.parameters()).dtype == torch.float64
    _compare(model, d)


def test_fixture_exercises_the_sign_convention():
    """The odd-parity model has message paths whose 3j symbols changed sign between e3nn versions;
    without folding the sign into the radial MLP, the energies would differ."""
    d = FIXTURES / "odd_parity"
    model = import_mace(d)
    assert model.metadata["flipped_cg_paths"] > 0
    import mlpot.models.mace_import as mi

    orig = mi._path_signs
    try:
        mi._path_signs = lambda model, hp: [[1.0] * len(i.conv_tp.instructions) for i in model.interactions]
        wrong = mi.import_mace(d)
    finally:
        mi._path_signs = orig
    r, atoms = next(_structures(d))
    assert abs(wrong.predict([atoms])["energy"][0] - r["energy"]) > 1e-6


def test_cli_writes_a_model_file(tmp_path):
    from mlpot.cli.main import main

    out = tmp_path / "imported.pt"
    assert main(["import-mace", str(FIXTURES), str(out), "--check"]) == 0
    import mlpot

    model = mlpot.load_model(out, device="cpu")
    assert model.metadata["imported_from"] == "mace-torch"
    _compare(model, FIXTURES)


def test_unsupported_features_are_named(tmp_path):
    import shutil

    d = tmp_path / "export"
    shutil.copytree(FIXTURES, d, ignore=shutil.ignore_patterns("odd_parity"))
    hp = json.loads((d / "hyperparameters.json").read_text())
    hp["interaction_cls"] = "RealAgnosticDensityInteractionBlock"
    hp["edge_irreps"] = "8x0e+8x1o"
    (d / "hyperparameters.json").write_text(json.dumps(hp))
    with pytest.raises(ModelFileError, match="RealAgnosticDensityInteractionBlock.*edge_irreps"):
        import_mace(d)
    hp["interaction_cls"] = "RealAgnosticResidualInteractionBlock"
    hp["edge_irreps"] = None
    hp["model_class"] = "AtomicDipolesMACE"
    (d / "hyperparameters.json").write_text(json.dumps(hp))
    with pytest.raises(ModelFileError, match="AtomicDipolesMACE"):
        import_mace(d)


def test_per_head_shapes_of_a_trained_model(tmp_path):
    """``mace_run_train`` models keep a head axis of size 1 on scale/shift: same numbers."""
    import shutil

    from safetensors.torch import load_file, save_file

    d = tmp_path / "export"
    shutil.copytree(FIXTURES, d, ignore=shutil.ignore_patterns("odd_parity"))
    weights = load_file(str(d / "weights.safetensors"))
    for k in ("scale_shift.scale", "scale_shift.shift"):
        weights[k] = weights[k].reshape(1)
    save_file(weights, str(d / "weights.safetensors"))
    _compare(import_mace(d), d)


@pytest.mark.parametrize("name, option", [
    ("zbl_agnesi_gaussian", "pair_repulsion"), ("zbl_agnesi_gaussian", "distance_transform"),
    ("zbl_agnesi_gaussian", "radial_type"), ("soft_no_cutoff", "distance_transform"),
    ("soft_no_cutoff", "apply_cutoff"), ("chebyshev", "radial_type"), ("lmax3_corr3", "pair_repulsion"),
])
def test_each_option_changes_the_numbers(name, option):
    """The fixtures exercise their options: the same weights without the option give other energies."""
    d = FIXTURES / name
    model = import_mace(d)
    r, atoms = next(_structures(d))
    assert abs(model.predict([atoms])["energy"][0] - r["energy"]) < TOL
    config = dict(model.config)
    config[option] = {"pair_repulsion": False, "distance_transform": None, "radial_type": "bessel",
                      "apply_cutoff": True}[option]
    other = type(model)(**config)
    state = {k: v for k, v in model.state_dict().items() if k in other.state_dict()
             and other.state_dict()[k].shape == v.shape}
    other.load_state_dict(state, strict=False)
    assert abs(other.predict([atoms])["energy"][0] - r["energy"]) > 1e-4
