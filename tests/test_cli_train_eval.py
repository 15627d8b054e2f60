"""End to end: `mlpot train` on the built-in EMT data, then `mlpot eval` reproduces its metrics."""
from __future__ import annotations

import json

import pytest
import torch
from ase.io import read
from test_train_helpers import toy_config, write_config

from mlpot.cli.main import main


def test_train_then_eval_reproduces_metrics(tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml", toy_config("ignored", n_train=12, n_valid=4, n_test=5, epochs=2))
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--set", f"output={run}", "--set", "training.batch_size=3"]) == 0
    printed = capsys.readouterr().out
    for name in ("model.pt", "metrics.json", "log.csv", "config.yaml", "checkpoint.pt", "learning_curve.png",
                 "data/test.xyz", "data/relax_start.xyz"):
        assert (run / name).exists(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics) == {"train", "valid", "test"}
    test = metrics["test"]
    assert test["n_configs"] == 5
    for k in ("e_mae", "e_rmse", "f_mae", "f_rmse", "s_mae", "s_rmse"):
        assert test[k] > 0
        assert test[k] <= test[k.replace("mae", "rmse")] + 1e-12 if "mae" in k else True
    assert set(test["by_config_type"]) == {"rattled", "strained", "md"}
    assert f"{test['f_mae']:10.2f}" in printed  # the table training printed

    # the saved config is complete and reloadable, with the filled-in statistics
    import yaml

    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["training"]["batch_size"] == 3
    assert isinstance(saved["model"]["avg_num_neighbors"], float)

    out = tmp_path / "eval.json"
    pred = tmp_path / "pred.xyz"
    assert main(["eval", "--model", str(run / "model.pt"), "--data", str(run / "data" / "test.xyz"),
                 "--format", "json", "--output", str(out), "--write-predictions", str(pred),
                 "--batch-size", "2"]) == 0
    ev = json.loads(out.read_text())["test"]
    for k in ("e_mae", "e_rmse", "f_mae", "f_rmse", "s_mae", "s_rmse", "n_configs"):
        assert ev[k] == pytest.approx(test[k], rel=1e-9, abs=1e-12), k
    for ct, m in test["by_config_type"].items():
        assert ev["by_config_type"][ct]["f_mae"] == pytest.approx(m["f_mae"], rel=1e-9)

    # predictions file: model outputs beside the references
    frames = read(pred, ":")
    assert len(frames) == 5
    import mlpot

    model = mlpot.load_model(run / "model.pt")
    ref = model.predict(read(run / "data" / "test.xyz", ":"))
    for a, e, f in zip(frames, ref["energy"], ref["forces"]):
        assert a.info["mlpot_energy"] == pytest.approx(e, rel=1e-10)
        assert torch.allclose(torch.as_tensor(a.arrays["mlpot_forces"]), torch.as_tensor(f), atol=1e-7)  # extxyz: 8 decimals
        assert "REF_forces" in a.arrays and len(a.info["mlpot_stress"]) == 6


def test_train_cli_reports_bad_key(tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml", toy_config("x"))
    assert main(["train", str(cfg), "--set", "training.batchsize=3"]) == 1
    err = capsys.readouterr().err
    assert "unknown config key `training.batchsize`; did you mean `training.batch_size`?" in err
