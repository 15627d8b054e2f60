"""Bad-input and fault probes (issue 15): every one ends in a non-zero exit and ONE line naming
the file, frame or key; no NaN is written, nothing is lost or overwritten, no checkpoint runs
code, nothing crashes the process or hangs.

One tiny EMT data set (6 train, 2 valid, 2 test frames of mlpot.data.synthetic) and one
untrained TrainToy model file serve every probe. The CLI runs in-process through
``mlpot.cli.main.main``; only the crash probe (SIGFPE inside vesin) uses a subprocess.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from ase.io import read, write
from test_train_helpers import SUBPROCESS_PROLOGUE, TrainToy, toy_config, write_config

from mlpot.cli.main import main
from mlpot.data.cell import singular_cells
from mlpot.data.neighbors import neighbor_list
from mlpot.data.synthetic import generate_emt_dataset
from mlpot.errors import DataError, NonFiniteError
from mlpot.models.io import save_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N = {"n_train": 6, "n_valid": 2, "n_test": 2}


@pytest.fixture(scope="module")
def emt(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("emt")
    paths = generate_emt_dataset(d, seed=5, system="cu-ni", **N)
    return {k: Path(v) for k, v in paths.items()} | {"dir": d}


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "toy.pt"
    model = TrainToy(r_max=4.0, atomic_numbers=[28, 29], e0s={"28": -0.1, "29": -0.2}, hidden=4)
    save_model(model, path)
    return path


def _cfg(tmp_path, emt, name="c.yaml", **training) -> Path:
    return write_config(tmp_path / name, toy_config(tmp_path / "run", cache_dir=emt["dir"], **N, **training))


def _one_error_line(capsys, *needles) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "error" in lines[0] and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _write_frames(path, frames):
    write(path, frames, format="extxyz")
    return path


def _labelled(atoms, energy=1.0):
    atoms = atoms.copy()
    atoms.info["REF_energy"] = energy
    atoms.arrays["REF_forces"] = np.zeros((len(atoms), 3))
    return atoms


# ---------------------------------------------------------------------------- training config
@pytest.mark.parametrize(
    "override, key",
    [
        ("training.forces_weight=.nan", "training.forces_weight"),
        ("model.scale=.nan", "model.scale"),
        ("training.energy_weight=-1", "training.energy_weight"),
        ("training.clip_grad=0", "training.clip_grad"),
        ("training.scheduler_params={factor: 5}", "training.scheduler_params.factor"),
        ("training.weight_decay=-1", "training.weight_decay"),
        ("data.max_train=-1", "data.max_train"),
        ("training.lr=.inf", "training.lr"),
        ("seed=-4", "seed"),
        ("data.min_distance=-1", "data.min_distance"),
    ],
)
def test_config_value_out_of_range(tmp_path, emt, capsys, override, key):
    cfg = _cfg(tmp_path, emt)
    assert main(["train", str(cfg), "--check", "--set", override]) == 1
    line = _one_error_line(capsys, f"`{key}`")
    assert "must be" in line or "finite" in line


@pytest.mark.parametrize(
    "override, key",
    [("model.correlation=0", "model.correlation"), ("model.max_ell=-1", "model.max_ell"),
     ("model.hidden_irreps='garbage ++ 7'", "model.hidden_irreps")],
)
def test_mace_config_out_of_range(tmp_path, emt, capsys, override, key):
    cfg = _cfg(tmp_path, emt)
    assert main(["train", str(cfg), "--check", "--set", "model={name: MACE, r_max: 4.0}", "--set", override]) == 1
    _one_error_line(capsys, f"`{key}`")


def test_duplicate_yaml_key(tmp_path, emt, capsys):
    cfg = _cfg(tmp_path, emt)
    cfg.write_text(cfg.read_text() + "seed: 4\n")  # `seed` is already there
    assert main(["train", str(cfg), "--check"]) == 1
    _one_error_line(capsys, "duplicate key 'seed'", str(cfg))


def test_test_split_name_cannot_shadow_train(tmp_path, emt, capsys):
    raw = toy_config(tmp_path / "run", cache_dir=emt["dir"], **N)
    raw["data"] = {"train": str(emt["train"]), "valid": str(emt["valid"]), "test": {"train": str(emt["test"])}}
    assert main(["train", str(write_config(tmp_path / "c.yaml", raw)), "--check"]) == 1
    _one_error_line(capsys, "`data.test.train`")


# ---------------------------------------------------------------------------- training data
def test_duplicate_atom_in_training_frame(tmp_path, emt, capsys):
    frames = read(emt["train"], ":")
    k = next(k for k, a in enumerate(frames) if len(a) >= 6)
    frames[k].positions[5] = frames[k].positions[2]
    train = _write_frames(tmp_path / "dup.xyz", frames)
    raw = toy_config(tmp_path / "run", **N)
    raw["data"] = {"train": str(train), "valid": 0.2}
    assert main(["train", str(write_config(tmp_path / "c.yaml", raw))]) == 1
    line = _one_error_line(capsys, str(train), f"frame {k}", "0 Å apart")
    assert "atoms 2 and 5" in line or "atoms 5 and 2" in line
    assert not (tmp_path / "run" / "model.pt").exists()


@pytest.mark.parametrize("what", ["position", "energy", "weight", "cell"])
def test_non_finite_values_in_data(tmp_path, emt, capsys, what):
    frames = read(emt["train"], ":")
    a = frames[1]
    if what == "position":
        a.positions[0, 1] = np.nan
    elif what == "energy":
        a.info["REF_energy"] = np.nan
    elif what == "weight":
        a.info["config_weight"] = np.inf
    else:
        a.cell[0, 0] = np.nan
    path = _write_frames(tmp_path / "bad.xyz", frames)
    assert main(["data", "stats", str(path)]) == 1
    _one_error_line(capsys, str(path), "frame 1")


def test_hdf5_with_nan_label_gives_no_statistics(tmp_path, emt, capsys):
    """A lazy HDF5 file is not re-validated frame by frame: non-finite statistics are refused."""
    from ase.calculators.singlepoint import SinglePointCalculator

    from mlpot.data.hdf5 import write_hdf5

    frames = read(emt["train"], ":")
    for a in frames:
        a.calc = SinglePointCalculator(a, energy=float(a.info.pop("REF_energy")), forces=a.arrays.pop("REF_forces"))
    frames[2].calc.results["forces"][1, 2] = float("nan")  # (a NaN energy means "absent" in HDF5)
    h5 = tmp_path / "d.h5"
    write_hdf5(frames, h5)
    out = tmp_path / "stats.json"
    assert main(["data", "stats", str(h5), "--json", str(out)]) == 1
    _one_error_line(capsys, str(h5), "not finite")
    assert not out.exists()


def test_unseen_element_in_test_set_fails_before_training(tmp_path, emt, capsys):
    test = _write_frames(tmp_path / "zn.xyz", [_labelled(bulk("Zn", "hcp", a=2.7, c=4.9))])
    raw = toy_config(tmp_path / "run", **N)
    raw["data"] = {"train": str(emt["train"]), "valid": str(emt["valid"]), "test": str(test)}
    assert main(["train", str(write_config(tmp_path / "c.yaml", raw))]) == 1
    _one_error_line(capsys, str(test), "frame 0", "Zn")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()  # nothing trained, nothing to lose


def test_npz_with_wrong_force_frame_count(tmp_path, capsys):
    path = tmp_path / "md17.npz"
    np.savez(path, nuclear_charges=np.array([1, 8, 1]), coords=np.random.rand(4, 3, 3) * 3,
             energies=np.zeros(4), forces=np.zeros((3, 3, 3)))
    assert main(["data", "stats", str(path)]) == 1
    _one_error_line(capsys, str(path), "3 force frames for 4")


def test_singular_cell_two_identical_rows(tmp_path, capsys):
    a = _labelled(bulk("Cu", "fcc", a=3.6, cubic=True))
    a.cell[1] = a.cell[0]
    path = _write_frames(tmp_path / "flat.xyz", [a])
    assert main(["data", "stats", str(path)]) == 1
    _one_error_line(capsys, str(path), "frame 0", "singular cell")


def test_singular_cell_test_catches_every_exactly_singular_cell():
    """The old determinant threshold let ~11% of exactly singular cells through."""
    rng = np.random.default_rng(0)
    cells = rng.normal(size=(500, 3, 3)) * rng.uniform(0.1, 50.0, size=(500, 1, 1))
    good = cells.copy()
    cells[:, 2] = cells[:, 0] * rng.uniform(-2, 2, size=(500, 1))  # row 2 parallel to row 0
    pbc = np.ones((500, 3), dtype=bool)
    assert bool(singular_cells(cells, pbc).all())
    assert not bool(singular_cells(good, pbc).any())
    # a flat but genuine cell (1e-6 relative thickness) is accepted
    flat = np.diag([10.0, 10.0, 1e-5])
    assert not bool(singular_cells(flat, [True, True, True])[0])
    # the non-periodic row does not matter
    assert not bool(singular_cells(np.diag([3.0, 3.0, 0.0]), [True, True, False])[0])


def test_huge_count_line_does_not_hang(tmp_path, capsys):
    path = tmp_path / "huge.xyz"
    path.write_text("999999999999\nProperties=species:S:1:pos:R:3 energy=1.0\nCu 0 0 0\nCu 2 0 0\n")
    assert main(["data", "stats", str(path)]) == 1
    _one_error_line(capsys, str(path), "frame 0", "999999999999")


def test_absurd_cutoff_is_refused(tmp_path, emt, capsys):
    assert main(["data", "stats", str(emt["test"]), "--r-max", "150"]) == 1
    _one_error_line(capsys, "150", "neighbour pairs")


def test_far_atom_does_not_crash_vesin(tmp_path):
    """One atom 5e5 Å away: vesin dies with SIGFPE; the torch cell list takes over."""
    atoms = [_labelled(Atoms("Cu3", positions=[[0, 0, 0], [2.5, 0, 0], [5e5, 0, 0]]))]
    path = _write_frames(tmp_path / "far.xyz", atoms)
    r = subprocess.run([sys.executable, "-c", SUBPROCESS_PROLOGUE, "data", "stats", str(path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "avg_num_neighbors" in r.stdout
    i, j, _ = neighbor_list(atoms[0].positions, 5.0)
    assert sorted(zip(i.tolist(), j.tolist())) == [(0, 1), (1, 0)]


def test_data_convert_refuses_to_overwrite_its_input(tmp_path, emt, capsys):
    path = tmp_path / "x.xyz"
    path.write_bytes(emt["test"].read_bytes())
    assert main(["data", "convert", str(path), str(path)]) == 1
    _one_error_line(capsys, str(path), "input")
    assert path.read_bytes() == emt["test"].read_bytes()


def test_unwritable_output_folder(tmp_path, emt, model_file, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    out = blocker / "metrics.json"
    assert main(["eval", "--model", str(model_file), "--data", str(emt["test"]), "--output", str(out)]) == 1
    _one_error_line(capsys, str(out))
    assert blocker.read_text() == "not a folder"


# ---------------------------------------------------------------------------- non-finite guards
def _nan_after_epoch(monkeypatch, epoch: int):
    """From training epoch ``epoch`` on, the loss is NaN (a diverging run)."""
    from mlpot.train import trainer as tmod

    state = {"epoch": 0}
    orig_epoch, orig_call = tmod.Trainer.train_epoch, tmod.WeightedLoss.__call__

    def train_epoch(self, e):
        state["epoch"] = e
        return orig_epoch(self, e)

    def call(self, pred, graph, *a, **k):
        loss, parts = orig_call(self, pred, graph, *a, **k)
        if state["epoch"] >= epoch and torch.is_grad_enabled() and loss.requires_grad:
            loss = loss * float("nan")
        return loss, parts

    monkeypatch.setattr(tmod.Trainer, "train_epoch", train_epoch)
    monkeypatch.setattr(tmod.WeightedLoss, "__call__", call)


def test_nan_loss_stops_training_and_keeps_the_best_model(tmp_path, emt, capsys, monkeypatch):
    _nan_after_epoch(monkeypatch, 3)
    cfg = _cfg(tmp_path, emt, epochs=5, batch_size=3)
    assert main(["train", str(cfg)]) == 1
    line = _one_error_line(capsys, "epoch 3", "batch 0", "non-finite loss", str(emt["train"]), "frame")
    assert "best model (epoch" in line
    state = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert state["metadata"]["stop_reason"] == "non_finite"
    assert all(bool(torch.isfinite(v).all()) for v in state["state_dict"].values() if v.is_floating_point())
    import mlpot

    model = mlpot.load_model(tmp_path / "run" / "model.pt")
    out = model.predict(read(emt["test"], ":"))
    assert np.all(np.isfinite(out["energy"]))


def test_nan_in_first_epoch_writes_no_model(tmp_path, emt, capsys, monkeypatch):
    _nan_after_epoch(monkeypatch, 1)
    assert main(["train", str(_cfg(tmp_path, emt, epochs=2))]) == 1
    _one_error_line(capsys, "epoch 1", "no model.pt written")
    assert not (tmp_path / "run" / "model.pt").exists()


class _Toy:
    def __init__(self, model_file):
        import mlpot

        self.model = mlpot.load_model(model_file)

    def poisoned(self, when):
        """The model, its energy NaN once ``when()`` is true."""
        model = self.model
        orig = type(model).compute_node_energies

        def node_energies(graph, vectors):
            out = orig(model, graph, vectors)
            if when():
                out = {**out, "node_energy": out["node_energy"] * float("nan")}
            return out

        model.compute_node_energies = node_energies
        return model


def _cell(n=2):
    a = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((n, 1, 1))
    a.rattle(0.05, seed=1)
    return a


def test_relax_stops_at_nan_and_never_says_converged(model_file):
    from mlpot.calculators import MLPotCalculator
    from mlpot.sim.relax import relax_atoms

    calls = {"n": 0}

    def when():
        calls["n"] += 1
        return calls["n"] > 3

    calc = MLPotCalculator(_Toy(model_file).poisoned(when), skin=0.5)
    with pytest.raises(NonFiniteError, match="structure 4 .*non-finite energy"):
        relax_atoms(_cell(), calc, fmax=1e-6, steps=50, index=4)


def test_batched_fire_stops_at_nan(model_file):
    from mlpot.sim.batched_fire import batched_fire_relax

    calls = {"n": 0}

    def when():
        calls["n"] += 1
        return calls["n"] > 2

    with pytest.raises(NonFiniteError, match=r"structure\(s\) \[0, 1\]"):
        batched_fire_relax(_Toy(model_file).poisoned(when), [_cell(), _cell(1)], fmax=1e-6, steps=20)


def test_md_stops_at_nan(model_file):
    from mlpot.calculators import MLPotCalculator
    from mlpot.sim.md import init_velocities, make_integrator, run_md

    calls = {"n": 0}

    def when():
        calls["n"] += 1
        return calls["n"] > 4

    atoms = _cell()
    atoms.calc = MLPotCalculator(_Toy(model_file).poisoned(when), skin=0.5)
    init_velocities(atoms, 300.0, seed=0)
    dyn = make_integrator(atoms, "nve", 1.0)
    with pytest.raises(NonFiniteError, match="non-finite energy"):
        run_md(atoms, dyn, 10, 1.0, log_every=2, progress=False)


def test_calculator_skin_is_not_fooled_by_nan(model_file):
    from mlpot.calculators import MLPotCalculator

    atoms = _cell()
    atoms.calc = MLPotCalculator(model_file, skin=0.5)
    atoms.get_potential_energy()
    atoms.positions[3] = np.nan
    with pytest.raises(DataError, match=r"non-finite .*atom\(s\) \[3\]"):
        atoms.get_potential_energy()


def test_calculator_rejects_atoms_too_close(model_file):
    from mlpot.calculators import MLPotCalculator

    atoms = _cell()
    atoms.positions[1] = atoms.positions[0] + [0.05, 0, 0]
    atoms.calc = MLPotCalculator(model_file)
    with pytest.raises(DataError, match="atoms 0 and 1 are 0.05 Å apart"):
        atoms.get_potential_energy()


@pytest.mark.parametrize("backend", ["torch", "vesin"])
def test_neighbor_list_rejects_nan_positions(backend):
    pos = np.array([[0.0, 0, 0], [1.0, 0, 0], [np.nan, 0, 0]])
    with pytest.raises(DataError, match=r"non-finite .*atom\(s\) \[2\]"):
        neighbor_list(pos, 3.0, backend=backend)
    with pytest.raises(DataError, match="non-finite"):
        neighbor_list(pos[:2], 3.0, cell=np.diag([5.0, np.inf, 5.0]), pbc=True, backend=backend)


# ---------------------------------------------------------------------------- relax / md CLI
def test_relax_fmax_nan(tmp_path, emt, model_file, capsys):
    assert main(["relax", str(emt["relax_start"]), "--model", str(model_file), "--fmax", "nan"]) == 1
    _one_error_line(capsys, "--fmax")


def test_md_negative_temperature(tmp_path, emt, model_file, capsys):
    assert main(["md", str(emt["relax_start"]), "--model", str(model_file), "--temperature", "-300",
                 "--steps", "2", "--no-progress"]) == 1
    _one_error_line(capsys, "--temperature", "-300")


def test_relax_output_cannot_be_its_input(tmp_path, emt, model_file, capsys):
    path = tmp_path / "start.xyz"
    path.write_bytes(emt["relax_start"].read_bytes())
    assert main(["relax", str(path), "--model", str(model_file), "--output", str(path), "--quiet"]) == 1
    _one_error_line(capsys, "input")
    assert path.read_bytes() == emt["relax_start"].read_bytes()


@pytest.mark.parametrize("cmd", ["eval", "export-lammps", "md"])
def test_no_command_overwrites_its_model_or_input(tmp_path, emt, model_file, capsys, cmd):
    model = tmp_path / "m.pt"
    model.write_bytes(model_file.read_bytes())
    start = tmp_path / "s.xyz"
    start.write_bytes(emt["relax_start"].read_bytes())
    argv = {"eval": ["eval", "--model", str(model), "--data", str(start), "--output", str(model)],
            "export-lammps": ["export-lammps", str(model), str(model)],
            "md": ["md", str(start), "--model", str(model), "--logfile", str(start), "--no-progress"]}[cmd]
    assert main(argv) == 1
    _one_error_line(capsys, "refusing to overwrite an input")
    assert model.read_bytes() == model_file.read_bytes()
    assert start.read_bytes() == emt["relax_start"].read_bytes()


PARTIAL_CIF = """data_CuNi
_cell_length_a 3.6
_cell_length_b 3.6
_cell_length_c 3.6
_cell_angle_alpha 90
_cell_angle_beta 90
_cell_angle_gamma 90
_symmetry_space_group_name_H-M 'P 1'
loop_
_atom_site_label
_atom_site_type_symbol
_atom_site_fract_x
_atom_site_fract_y
_atom_site_fract_z
_atom_site_occupancy
Cu1 Cu 0 0 0 1
Cu2 Cu 0.5 0.5 0 1
Cu3 Cu 0.5 0 0.5 1
Ni4 Ni 0 0.5 0.5 {occ}
"""


@pytest.mark.parametrize("occ, kind", [("0.75", "a vacancy"), ("0.5\nCu5 Cu 0 0.5 0.5 0.5", "partial occupancy")])
def test_relax_partial_occupancy_cif(tmp_path, model_file, capsys, occ, kind):
    path = tmp_path / "disordered.cif"
    path.write_text(PARTIAL_CIF.format(occ=occ))
    assert main(["relax", str(path), "--model", str(model_file), "--quiet"]) == 1
    _one_error_line(capsys, str(path), "frame 0", kind)
    assert not (tmp_path / "disordered_relaxed.cif").exists()


# ---------------------------------------------------------------------------- model files
def test_model_file_bad_version_or_nan_weights(tmp_path, emt, model_file, capsys):
    payload = torch.load(model_file, weights_only=True)
    bad_version = tmp_path / "v.pt"
    torch.save({**payload, "format_version": -7}, bad_version)
    assert main(["eval", "--model", str(bad_version), "--data", str(emt["test"])]) == 1
    _one_error_line(capsys, str(bad_version), "format version -7")

    sd = dict(payload["state_dict"])
    sd["readout"] = sd["readout"].clone()
    sd["readout"][0, 0] = float("nan")
    nan_weights = tmp_path / "nan.pt"
    torch.save({**payload, "state_dict": sd}, nan_weights)
    assert main(["eval", "--model", str(nan_weights), "--data", str(emt["test"])]) == 1
    _one_error_line(capsys, str(nan_weights), "non-finite", "readout")

    model = TrainToy(atomic_numbers=[29])
    with torch.no_grad():
        model.readout[0, 0] = float("inf")
    with pytest.raises(Exception, match="refusing to write"):
        save_model(model, tmp_path / "never.pt")
    assert not (tmp_path / "never.pt").exists()


@pytest.mark.parametrize("case", ["bad-json", "bad-safetensors"])
def test_import_mace_bad_export(tmp_path, capsys, case):
    from mlpot.models.mace_import import EXPORT_FORMAT

    d = tmp_path / "export"
    d.mkdir()
    if case == "bad-json":
        (d / "hyperparameters.json").write_text("{not json")
    else:
        (d / "hyperparameters.json").write_text(f'{{"format": "{EXPORT_FORMAT}", "format_version": 1}}')
    (d / "weights.safetensors").write_bytes(b"\x00garbage")
    assert main(["import-mace", str(d), str(tmp_path / "m.pt")]) == 1
    _one_error_line(capsys, str(d))
    assert not (tmp_path / "m.pt").exists()


# ---------------------------------------------------------------------------- run folders, checkpoints
def test_training_run_cleans_up_and_follows_umask(tmp_path, emt, capsys):
    run = tmp_path / "run"
    run.mkdir()
    stale = run / ".checkpoint.pt.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    old = os.umask(0o027)
    try:
        assert main(["train", str(_cfg(tmp_path, emt, epochs=1))]) == 0
    finally:
        os.umask(old)
    assert not stale.exists()
    assert not list(run.glob(".*.tmp"))
    for name in ("model.pt", "checkpoint.pt", "config.yaml", "metrics.json", "log.csv"):
        assert (run / name).stat().st_mode & 0o777 == 0o640, name


def test_second_run_into_a_locked_folder(tmp_path, emt, capsys):
    from mlpot.train.runlock import RunLock

    cfg = _cfg(tmp_path, emt, epochs=1)
    with RunLock(tmp_path / "run"):
        assert main(["train", str(cfg)]) == 1
        _one_error_line(capsys, str(tmp_path / "run"), "in use by another run", str(os.getpid()))
        assert not (tmp_path / "run" / "config.yaml").exists()
    assert main(["train", str(cfg)]) == 0  # free again


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint_runs_nothing(tmp_path, emt, capsys):
    run = tmp_path / "run"
    run.mkdir()
    evil = _Evil()
    evil.marker = tmp_path / "pwned"
    torch.save({"format": "mlpot-checkpoint", "payload": evil}, run / "checkpoint.pt")
    assert main(["train", str(_cfg(tmp_path, emt, epochs=1)), "--resume"]) == 1
    _one_error_line(capsys, "checkpoint.pt", "disallowed")
    assert not evil.marker.exists()


def test_truncated_checkpoint(tmp_path, emt, capsys):
    cfg = _cfg(tmp_path, emt, epochs=1)
    assert main(["train", str(cfg)]) == 0
    ckpt = tmp_path / "run" / "checkpoint.pt"
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    assert main(["train", str(cfg), "--set", "training.epochs=2", "--resume"]) == 1
    _one_error_line(capsys, str(ckpt), "truncated or corrupt")


def test_interrupted_regeneration_is_detected(tmp_path, monkeypatch):
    from mlpot.data import synthetic

    d = tmp_path / "data"
    paths = generate_emt_dataset(d, seed=5, **N)
    first = paths["train"].read_bytes()
    # a run killed while writing other frames: new parameters, then death mid-way
    orig = synthetic.emt_structures

    def dying(n, seed=0, system="cu-ni", **kwargs):
        if seed % 1000 == 1:  # after train.xyz was rewritten
            raise KeyboardInterrupt
        return orig(n, seed=seed, system=system, **kwargs)

    monkeypatch.setattr(synthetic, "emt_structures", dying)
    with pytest.raises(KeyboardInterrupt):
        generate_emt_dataset(d, seed=5, n_train=3, n_valid=2, n_test=2)
    assert not (d / "manifest.json").exists()  # no stale manifest beside the new train.xyz
    monkeypatch.setattr(synthetic, "emt_structures", orig)
    again = generate_emt_dataset(d, seed=5, **N)
    assert again["train"].read_bytes() == first
    # a file changed behind the manifest's back is regenerated too
    paths["test"].write_text(paths["test"].read_text().replace("Cu", "Ni", 1))
    generate_emt_dataset(d, seed=5, **N)
    assert len(read(paths["test"], ":")) == N["n_test"]
    assert read(paths["test"], ":")[0].get_chemical_symbols() == read(again["test"], ":")[0].get_chemical_symbols()


# ---------------------------------------------------------------------------- tracebacks
def test_tracebacks_only_with_debug(tmp_path, capsys, monkeypatch):
    from mlpot.cli import data as data_cli

    def boom(args):
        raise RuntimeError("something\nbroke")

    monkeypatch.setattr(data_cli, "run", boom)
    assert main(["data", "stats", "x"]) == 1
    line = _one_error_line(capsys, "internal error", "RuntimeError", "--debug")
    assert "something; broke" in line
    with pytest.raises(RuntimeError):
        main(["--debug", "data", "stats", "x"])


def test_probe_helpers_are_strict():
    """Meta-test: the one-line check fails on a traceback."""
    class Cap:
        def readouterr(self):
            return type("R", (), {"err": "Traceback (most recent call last):\n  File x\nValueError: y\n"})()

    with pytest.raises(AssertionError):
        _one_error_line(Cap())
