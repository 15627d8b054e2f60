"""EquiformerV2 and Facet end to end: ``mlpot train`` on the built-in EMT data lowers the loss,
``mlpot.load_model`` reads the file, and the calculator relaxes (``mlpot relax``) and runs NVE MD
(``mlpot md``) with energy conserved; the shipped rMD17 configs validate."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.io import read
from test_train_helpers import toy_config, write_config

import mlpot
from mlpot.cli.main import main

ROOT = Path(__file__).resolve().parents[1]

SMALL = {
    "EquiformerV2": {"num_layers": 1, "lmax": 1, "mmax": 1, "sphere_channels": 4, "attn_hidden_channels": 4,
                     "num_heads": 2, "attn_alpha_channels": 4, "attn_value_channels": 2, "ffn_hidden_channels": 8,
                     "edge_channels": 4, "num_bessel": 4},
    "Facet": {"num_layers": 1, "lmax": 1, "mmax": 1, "sphere_channels": 4, "hidden_channels": 8, "num_knots": 6},
}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_train_load_relax_md_from_the_cli(name, tmp_path):
    cfg = toy_config("ignored", n_train=8, n_valid=2, n_test=2, epochs=3, lr=0.01)
    cfg["model"] = {"name": name, "r_max": 4.0, **SMALL[name]}
    run = tmp_path / "run"
    assert main(["train", str(write_config(tmp_path / "c.yaml", cfg)), "--set", f"output={run}"]) == 0
    with open(run / "log.csv") as fh:
        rows = list(csv.DictReader(fh))
    losses = [float(r["train_loss"]) for r in rows]
    assert len(losses) == 3 and losses[-1] < losses[0], losses

    model = mlpot.load_model(run / "model.pt")
    assert type(model).__name__ == name and model.model_name == name
    assert {k: v for k, v in model.config.items() if k in SMALL[name]} == SMALL[name]

    start = read(run / "data" / "relax_start.xyz")
    from mlpot.calculators import MLPotCalculator

    start.calc = MLPotCalculator(model)
    f0 = np.abs(start.get_forces()).max()
    out = tmp_path / "relaxed.xyz"
    assert main(["relax", str(run / "data" / "relax_start.xyz"), "--model", str(run / "model.pt"), "--fmax", "0.05",
                 "--steps", "40", "--output", str(out), "--quiet"]) in (0, 3)  # 3: not converged in 40 steps
    relaxed = read(out)
    relaxed.calc = MLPotCalculator(model)
    assert np.abs(relaxed.get_forces()).max() < 0.5 * f0, f0
    assert relaxed.get_potential_energy() < start.get_potential_energy() - 0.01

    log = tmp_path / "md.log"
    assert main(["md", str(out), "--model", str(run / "model.pt"), "--ensemble", "nve", "--temperature", "300",
                 "--timestep", "0.5", "--steps", "12", "--log", "3", "--logfile", str(log), "--seed", "1",
                 "--no-progress"]) == 0
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    col = lines[0].lstrip("#").split().index("etot_eV")
    etot = np.array([float(line.split()[col]) for line in lines[1:]])
    assert len(etot) >= 4 and np.all(np.isfinite(etot))
    assert np.ptp(etot) < 5e-3 * len(relaxed), etot  # NVE: total energy conserved


def test_rmd17_configs_validate():
    import yaml

    from mlpot.models import build_model
    from mlpot.testing.model_checks import build_batch, random_molecule
    from mlpot.train.config import validate_config

    for name, model in (("rmd17_equiformer.yaml", "EquiformerV2"), ("rmd17_facet.yaml", "Facet")):
        cfg = validate_config(yaml.safe_load((ROOT / "configs" / name).read_text()))
        assert cfg["model"]["name"] == model
        # the model builds from the config (with statistics filled in as training would)
        m = {k: v for k, v in cfg["model"].items() if k not in ("name", "init_from")}
        m.update(atomic_numbers=[1, 6, 8], e0s=None, avg_num_neighbors=8.0, scale=1.0, shift=0.0)
        built = build_model(model, **m)
        assert sum(p.numel() for p in built.parameters()) > 1000
        graph = build_batch([random_molecule([1, 6, 8], n=4)], built.r_max)
        assert built(graph, compute_force=False)["energy"].dtype == torch.float64
