"""`training.wandb`: epochs logged to Weights & Biases (offline) beside log.csv."""
from __future__ import annotations

import csv

import pytest
from test_train_helpers import toy_config, write_config

from mlpot.cli.main import main


def test_wandb_offline_run_logs_every_epoch(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_SILENT", "true")
    logged, real_init = [], wandb.init

    def spying_init(*args, **kwargs):  # the real offline run, with its log calls recorded
        run = real_init(*args, **kwargs)
        real_log = run.log
        monkeypatch.setattr(run, "log", lambda data, step=None, **kw: (logged.append((step, dict(data))),
                                                                        real_log(data, step=step, **kw)))
        return run

    monkeypatch.setattr(wandb, "init", spying_init)
    cfg = toy_config(tmp_path / "run", epochs=3, wandb={"mode": "offline", "project": "mlpot-test"})
    assert main(["train", str(write_config(tmp_path / "c.yaml", cfg))]) == 0
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))  # the offline run `wandb sync` uploads
    rows = list(csv.DictReader(open(tmp_path / "run" / "log.csv")))
    assert [step for step, _ in logged] == [1, 2, 3] == [int(r["epoch"]) for r in rows]
    for (_, data), row in zip(logged, rows):
        for key in ("train_loss", "valid_loss", "valid_f_mae", "lr"):
            assert data[key] == pytest.approx(float(row[key]), rel=1e-12)


def test_wandb_bad_key_is_named(tmp_path, capsys):
    cfg = toy_config(tmp_path / "run", wandb={"projct": "x"})
    assert main(["train", str(write_config(tmp_path / "c.yaml", cfg))]) == 1
    assert "unknown config key `training.wandb.projct`; did you mean `training.wandb.project`?" in capsys.readouterr().err
