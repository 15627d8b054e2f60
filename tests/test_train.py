"""Training: config validation, losses, EMA, stage two, resume after kill -9."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_train_helpers import SUBPROCESS_PROLOGUE, toy_config, write_config

from mlpot.errors import ConfigError
from mlpot.train.config import apply_override, load_config, validate_config
from mlpot.train.ema import ExponentialMovingAverage
from mlpot.train.losses import WeightedLoss, force_huber_thresholds, huber
from mlpot.train.trainer import load_checkpoint_file


@pytest.fixture(scope="module")
def emt_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("emt")


# ---------------------------------------------------------------- config validation
def _raw(tmp_path, **kw):
    f = tmp_path / "train.xyz"
    f.write_text("")
    cfg = {"data": {"train": str(f)}, "model": {"name": "TrainToy"}, "output": str(tmp_path / "run")}
    cfg.update(kw)
    return cfg


def test_config_defaults_and_types(tmp_path):
    cfg = validate_config(_raw(tmp_path))
    assert cfg["training"]["optimizer"] == "adam" and cfg["dtype"] == "float64"
    assert cfg["model"]["e0s"] == "average" and cfg["model"]["scale"] == "auto"
    assert cfg["data"]["valid"] == 0.1


@pytest.mark.parametrize(
    "section,key,hint",
    [("training", "epoch", "training.epochs"), ("training", "learning_rate", None),
     ("data", "tarin", "data.train"), (None, "outptu", "output"), ("model", "hiden", "model.hidden")],
)
def test_config_unknown_key_names_it_with_hint(tmp_path, section, key, hint):
    raw = _raw(tmp_path)
    (raw.setdefault(section, {}) if section else raw)[key] = 1
    with pytest.raises(ConfigError) as e:
        validate_config(raw)
    full = f"{section}.{key}" if section else key
    assert f"`{full}`" in str(e.value)
    if hint:
        assert f"did you mean `{hint}`" in str(e.value)


def test_config_wrong_type_and_choice(tmp_path):
    raw = _raw(tmp_path, training={"lr": "fast"})
    with pytest.raises(ConfigError, match=r"`training.lr`: expected"):
        validate_config(raw)
    raw = _raw(tmp_path, training={"epochs": 2.5})
    with pytest.raises(ConfigError, match=r"`training.epochs`: expected integer"):
        validate_config(raw)
    raw = _raw(tmp_path, training={"optimizer": "adamm"})
    with pytest.raises(ConfigError, match=r"did you mean 'adam"):
        validate_config(raw)
    raw = _raw(tmp_path, training={"ema": "yes"})
    with pytest.raises(ConfigError, match=r"`training.ema`"):
        validate_config(raw)
    raw = _raw(tmp_path, training={"stage_two": {"start": 1.5}})
    with pytest.raises(ConfigError, match=r"stage_two.start"):
        validate_config(raw)
    raw = _raw(tmp_path, training={"scheduler_params": {"factr": 0.5}})
    with pytest.raises(ConfigError, match=r"did you mean `training.scheduler_params.factor`"):
        validate_config(raw)


def test_config_missing_file(tmp_path):
    raw = _raw(tmp_path)
    raw["data"]["test"] = ["nope.xyz"]
    with pytest.raises(ConfigError, match=r"`data.test\[0\]`: file not found: nope.xyz"):
        validate_config(raw)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_set_overrides_parse_yaml(tmp_path):
    raw = _raw(tmp_path)
    apply_override(raw, "training.epochs=7")
    apply_override(raw, "training.config_type_weights={md: 2.0}")
    apply_override(raw, "model.atomic_numbers=[28, 29]")
    cfg = validate_config(raw)
    assert cfg["training"]["epochs"] == 7
    assert cfg["training"]["config_type_weights"] == {"md": 2.0}
    assert cfg["model"]["atomic_numbers"] == [28, 29]
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_override(raw, "training.epochs")
    apply_override(raw, "training.epohcs=3")
    with pytest.raises(ConfigError, match="did you mean `training.epochs`"):
        validate_config(raw)


# ---------------------------------------------------------------- losses
def _fake_batch(seed=0, B=3):
    g = torch.Generator().manual_seed(seed)
    n = torch.tensor([2, 3, 4][:B])
    N = int(n.sum())
    graph = {
        "num_atoms": n, "batch": torch.repeat_interleave(torch.arange(B), n),
        "positions": torch.zeros(N, 3, dtype=torch.float64),
        "energy": torch.randn(B, generator=g, dtype=torch.float64),
        "forces": torch.randn(N, 3, generator=g, dtype=torch.float64),
        "stress": torch.randn(B, 3, 3, generator=g, dtype=torch.float64) * 0.01,
        "weight": torch.tensor([1.0, 2.0, 0.5][:B], dtype=torch.float64),
        "energy_weight": torch.tensor([1.0, 1.0, 0.0][:B], dtype=torch.float64),
        "forces_weight": torch.ones(B, dtype=torch.float64),
        "stress_weight": torch.tensor([1.0, 0.0, 1.0][:B], dtype=torch.float64),
    }
    pred = {k: graph[k] + 0.1 * torch.randn(graph[k].shape, generator=g, dtype=torch.float64)
            for k in ("energy", "forces", "stress")}
    return pred, graph


def test_mse_loss_matches_definition():
    pred, graph = _fake_batch()
    loss, parts = WeightedLoss("mse", 2.0, 3.0, 5.0)(pred, graph)
    n = graph["num_atoms"].double()
    w = graph["weight"]
    e = (w * graph["energy_weight"] * ((pred["energy"] - graph["energy"]) / n) ** 2).mean()
    wa = (w * graph["forces_weight"])[graph["batch"]][:, None]
    f = (wa * (pred["forces"] - graph["forces"]) ** 2).mean()
    s = ((w * graph["stress_weight"])[:, None, None] * (pred["stress"] - graph["stress"]) ** 2).mean()
    assert torch.allclose(loss, 2 * e + 3 * f + 5 * s, rtol=1e-12, atol=0)
    assert parts["energy"] == pytest.approx(float(e), rel=1e-12)


def test_huber_and_universal():
    x = torch.linspace(-1, 1, 201, dtype=torch.float64)
    h = huber(x, 0.3)
    small = x.abs() <= 0.3
    assert torch.allclose(h[small], 0.5 * x[small] ** 2)
    assert torch.allclose(h[~small], 0.3 * (x[~small].abs() - 0.15))
    # continuous value and slope at the threshold
    d = torch.tensor([0.3 - 1e-9, 0.3 + 1e-9], dtype=torch.float64)
    assert abs(float(huber(d, 0.3)[1] - huber(d, 0.3)[0])) < 1e-9
    f = torch.tensor([[1.0, 0, 0], [150.0, 0, 0], [250.0, 0, 0], [400.0, 0, 0]], dtype=torch.float64)
    assert force_huber_thresholds(f, 0.01)[:, 0].tolist() == pytest.approx([0.01, 0.007, 0.004, 0.001])
    pred, graph = _fake_batch()
    lh, _ = WeightedLoss("huber", 1, 1, 1, huber_delta=1e3)(pred, graph)  # huge delta: mse / 2
    lm, _ = WeightedLoss("mse", 1, 1, 1)(pred, graph)
    assert torch.allclose(lh, 0.5 * lm, rtol=1e-12)
    lu, _ = WeightedLoss("universal", 1, 1, 1, huber_delta=1e3)(pred, graph)
    assert torch.allclose(lu, lh, rtol=1e-12)  # small reference forces: universal == huber


def test_loss_zero_weight_excludes_target():
    pred, graph = _fake_batch()
    lf = WeightedLoss("mse", 1.0, 0.0, 0.0)
    base, _ = lf(pred, graph)
    pred2 = dict(pred)
    pred2["energy"] = pred["energy"].clone()
    pred2["energy"][2] += 100.0  # structure 2 has energy_weight 0
    assert torch.equal(lf(pred2, graph)[0], base)


def test_loss_shares_sum_to_global_mean():
    """Rank shares (local sums over global counts) add up to the full-batch loss."""
    pred, graph = _fake_batch(B=3)
    lf = WeightedLoss("mse", 1.0, 10.0, 1.0)
    full, _ = lf(pred, graph)
    t_a = lf.terms({k: v[:2] for k, v in pred.items() if k != "forces"} | {"forces": pred["forces"][:5]},
                   {"num_atoms": graph["num_atoms"][:2], "batch": graph["batch"][:5],
                    "positions": graph["positions"][:5], "forces": graph["forces"][:5],
                    **{k: graph[k][:2] for k in ("energy", "stress", "weight", "energy_weight",
                                                 "forces_weight", "stress_weight")}})
    t_b = lf.terms({k: v[2:] for k, v in pred.items() if k != "forces"} | {"forces": pred["forces"][5:]},
                   {"num_atoms": graph["num_atoms"][2:], "batch": graph["batch"][5:] - 2,
                    "positions": graph["positions"][5:], "forces": graph["forces"][5:],
                    **{k: graph[k][2:] for k in ("energy", "stress", "weight", "energy_weight",
                                                 "forces_weight", "stress_weight")}})
    lam = {"energy": 1.0, "forces": 10.0, "stress": 1.0}
    total = sum(lam[k] * (t_a[k][0] + t_b[k][0]) / (t_a[k][1] + t_b[k][1]) for k in lam)
    assert torch.allclose(total, full, rtol=1e-12)


# ---------------------------------------------------------------- EMA
def test_ema_closed_form_and_swap():
    model = torch.nn.Linear(2, 1, bias=False).double()
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = ExponentialMovingAverage(model, decay=0.5, warmup=False)
    for value in (3.0, 5.0):
        with torch.no_grad():
            model.weight.fill_(value)
        ema.update(model)
    # 0.5 * (0.5 * 1 + 0.5 * 3) + 0.5 * 5 = 3.5
    assert torch.allclose(ema.shadow[0], torch.full((1, 2), 3.5, dtype=torch.float64))
    with ema.average_parameters(model):
        assert model.weight[0, 0].item() == 3.5
    assert model.weight[0, 0].item() == 5.0
    warm = ExponentialMovingAverage(model, decay=0.99)
    assert warm.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    state = ema.state_dict()
    other = ExponentialMovingAverage(model, decay=0.9)
    other.load_state_dict(state)
    assert other.num_updates == 2 and torch.equal(other.shadow[0], ema.shadow[0])


# ---------------------------------------------------------------- loop: stage two, early stopping
def test_stage_two_switch(tmp_path, emt_cache):
    from mlpot.train import train

    raw = toy_config(tmp_path / "run", cache_dir=emt_cache, epochs=3,
                     stage_two={"start": 3, "energy_weight": 77.0, "forces_weight": 5.0, "lr": 0.002})
    trainer_cfg = validate_config(raw)
    train(trainer_cfg, log=lambda m: None)
    rows = (tmp_path / "run" / "log.csv").read_text().splitlines()[1:]
    stages = [int(r.split(",")[1]) for r in rows]
    lrs = [float(r.split(",")[2]) for r in rows]
    assert stages == [1, 1, 2]
    assert lrs[2] == pytest.approx(0.002) and lrs[0] == pytest.approx(0.01)
    ck = load_checkpoint_file(tmp_path / "run" / "checkpoint.pt")
    assert ck["loss_weights"][:2] == [77.0, 5.0] and ck["stage"] == 2
    # best model comes from stage two
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["valid"]["n_configs"] == 4
    meta = torch.load(tmp_path / "run" / "model.pt", weights_only=True)["metadata"]
    assert meta["best_epoch"] == 3


def test_early_stopping(tmp_path, emt_cache):
    from mlpot.train import train

    # lr 0: the validation loss never improves after epoch 1 -> stop after `patience` epochs
    raw = toy_config(tmp_path / "run", cache_dir=emt_cache, epochs=10, lr=1e-30, patience=2, ema=False)
    train(validate_config(raw), log=lambda m: None)
    rows = (tmp_path / "run" / "log.csv").read_text().splitlines()[1:]
    assert len(rows) == 3
    meta = torch.load(tmp_path / "run" / "model.pt", weights_only=True)["metadata"]
    assert meta["stop_reason"] == "early_stopping" and meta["best_epoch"] == 1


# ---------------------------------------------------------------- resume after kill -9
def _run_cli(args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", SUBPROCESS_PROLOGUE, *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


def test_resume_after_kill9_matches_uninterrupted(tmp_path, emt_cache):
    epochs = 6
    cfg_path = write_config(tmp_path / "c.yaml", toy_config(tmp_path / "unused", n_train=24, cache_dir=emt_cache,
                                                            epochs=epochs, batch_size=3, checkpoint_every=1,
                                                            stage_two={"start": 5, "lr": 0.003},
                                                            scheduler="plateau",
                                                            scheduler_params={"patience": 1, "factor": 0.5}))
    full = _run_cli(["train", str(cfg_path), "--set", f"output={tmp_path / 'full'}"])
    out, _ = full.communicate(timeout=300)
    assert full.returncode == 0, out.decode()

    run = tmp_path / "killed"
    p = _run_cli(["train", str(cfg_path), "--set", f"output={run}"])
    ckpt = run / "checkpoint.pt"
    t0 = time.time()
    while not ckpt.exists() and p.poll() is None and time.time() - t0 < 300:
        time.sleep(0.02)
    # kill as soon as the first checkpoint lands: the run is then inside a later epoch
    assert p.poll() is None, "training finished before it could be killed"
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL
    ck = load_checkpoint_file(ckpt)
    assert 1 <= ck["epoch"] < epochs
    assert not (run / "model.pt").exists()

    r = _run_cli(["train", str(cfg_path), "--set", f"output={run}", "--resume"])
    out, _ = r.communicate(timeout=300)
    assert r.returncode == 0, out.decode()
    assert "resumed from" in out.decode()

    a = torch.load(tmp_path / "full" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(run / "model.pt", weights_only=True)["state_dict"]
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-12), k
    ca = load_checkpoint_file(tmp_path / "full" / "checkpoint.pt")
    cb = load_checkpoint_file(run / "checkpoint.pt")
    for k in ca["model"]:
        assert torch.allclose(ca["model"][k], cb["model"][k], rtol=0, atol=1e-12), k
    la = (tmp_path / "full" / "log.csv").read_text().splitlines()
    lb = (run / "log.csv").read_text().splitlines()
    assert len(la) == len(lb) == epochs + 1
    assert [r.split(",")[:4] for r in la] == [r.split(",")[:4] for r in lb]  # epoch, stage, lr, train loss


def test_time_limit_stops_cleanly(tmp_path, emt_cache):
    from mlpot.train import train

    raw = toy_config(tmp_path / "run", cache_dir=emt_cache, epochs=50, time_limit=1e-4)
    metrics = train(validate_config(raw), log=lambda m: None)
    meta = torch.load(tmp_path / "run" / "model.pt", weights_only=True)["metadata"]
    assert meta["stop_reason"] == "time_limit" and meta["epochs"] < 50
    assert metrics["test"]["n_configs"] == 4 and (tmp_path / "run" / "metrics.json").exists()
