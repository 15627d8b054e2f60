"""`mlpot train --set`: several pairs per flag, repeated flags, validation and hints."""
from __future__ import annotations

import pytest
import yaml
from test_train_helpers import toy_config, write_config

from mlpot.cli.main import main


def _check(tmp_path, capsys, *argv):
    cfg = write_config(tmp_path / "c.yaml", toy_config(tmp_path / "run"))
    code = main(["train", str(cfg), "--check", *argv])
    out, err = capsys.readouterr()
    return code, (yaml.safe_load(out) if code == 0 else None), err


def test_set_takes_several_pairs_and_repeats(tmp_path, capsys):
    code, cfg, _ = _check(tmp_path, capsys, "--set", "output=runs/x", "training.epochs=5", "seed=11",
                          "--set", "training.batch_size=7", "data.max_train=3")
    assert code == 0
    assert (cfg["output"], cfg["training"]["epochs"], cfg["seed"]) == ("runs/x", 5, 11)
    assert (cfg["training"]["batch_size"], cfg["data"]["max_train"]) == (7, 3)


def test_set_later_pair_wins(tmp_path, capsys):
    code, cfg, _ = _check(tmp_path, capsys, "--set", "training.epochs=5", "training.epochs=9",
                          "--set", "training.lr=0.5")
    assert code == 0 and cfg["training"]["epochs"] == 9 and cfg["training"]["lr"] == 0.5


@pytest.mark.parametrize("pairs, needle", [
    (["training.epochs=2", "training.batchsize=3"],
     "unknown config key `training.batchsize`; did you mean `training.batch_size`?"),
    (["seed=1", "training.lr=-1"], "config key `training.lr` must be > 0.0"),
    (["seed=1", "oops"], "--set 'oops': expected key.sub=value"),
])
def test_set_validates_every_pair(tmp_path, capsys, pairs, needle):
    code, _, err = _check(tmp_path, capsys, "--set", *pairs)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 1 and len(lines) == 1 and needle in lines[0], err


def test_config_after_set_gets_a_hint(tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml", toy_config(tmp_path / "run"))
    assert main(["train", "--check", "--set", "seed=1", str(cfg)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.endswith("expected key.sub=value; put the config file before --set") and "\n" not in err
