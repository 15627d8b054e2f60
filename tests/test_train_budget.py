"""Schedules on a time budget (mlpot.train.budget): stage two, cosine t_max, patience."""
from __future__ import annotations

import csv
import json
import math
import time

import pytest
import torch
from test_train_helpers import TrainToy, toy_config

from mlpot.models.base import register_model
from mlpot.train.budget import TimeBudget, cosine_lr, stage_two_epoch
from mlpot.train.config import validate_config
from mlpot.train.trainer import load_checkpoint_file


@pytest.fixture(scope="module")
def emt_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("emt")


def _rows(run):
    with open(run / "log.csv") as fh:
        return list(csv.DictReader(fh))


# ---------------------------------------------------------------- the arithmetic
def test_stage_two_epoch_unchanged_when_everything_fits():
    # the trainer's historical rule int(s * epochs) + 1, and an epoch start as given
    for epochs in (1, 7, 100, 1500):
        for s in (0.1, 0.5, 0.75, 0.8, 0.99):
            assert stage_two_epoch(s, epochs) == int(s * epochs) + 1
            assert stage_two_epoch(s, epochs, planned=epochs + 10) == int(s * epochs) + 1
    assert stage_two_epoch(30, 100) == 30 and stage_two_epoch(30, 100, planned=40) == 30


@pytest.mark.parametrize("start", [0.8, 0.99, 1200, 1500])
def test_stage_two_epoch_inside_the_budget(start):
    # the budget holds n of 1500 epochs: stage two starts within them, leaving >= 1 epoch
    for n in range(1, 60):
        first = stage_two_epoch(start, 1500, planned=n)
        assert 1 <= first <= n
    assert stage_two_epoch(0.8, 1500, planned=38) == int(0.8 * 38) + 1


def test_planned_epochs_from_measured_time():
    b = TimeBudget(minutes=1.0, epochs=1000)
    assert b.planned_epochs(0.0) is None and not b.binding(0.0)
    b.record_epoch(4.0)
    b.record_epoch(6.0)  # tau = 5 s; 50 s left -> 10 more epochs
    assert b.seconds_per_epoch == pytest.approx(5.0)
    assert b.planned_epochs(10.0) == 2 + 10
    assert b.binding(10.0)
    b.done_before = 3  # resumed run: earlier epochs count
    assert b.planned_epochs(10.0) == 15
    assert b.planned_epochs(1e9) == 5  # budget spent: no more epochs
    assert TimeBudget(60.0, 20).planned_epochs(0.0) is None
    fits = TimeBudget(60.0, 20)
    fits.record_epoch(1.0)
    assert fits.planned_epochs(1.0) == 20 and not fits.binding(1.0)


def test_patience_scaled_to_the_budget():
    b = TimeBudget(minutes=1.0, epochs=1500)
    b.record_epoch(2.0)  # 58 s left at t = 2 -> 29 more -> 30 epochs
    assert b.planned_epochs(2.0) == 30
    assert b.patience(200, 2.0) == math.ceil(200 * 30 / 1500)
    assert b.patience(10, 2.0, eval_every=2) == 2
    roomy = TimeBudget(minutes=100.0, epochs=10)
    roomy.record_epoch(1.0)
    assert roomy.patience(7, 1.0) == 7


def test_cosine_closed_form():
    assert cosine_lr(0.01, 0.0, 0, 10) == pytest.approx(0.01)
    assert cosine_lr(0.01, 1e-4, 10, 10) == pytest.approx(1e-4)
    assert cosine_lr(0.01, 0.0, 5, 10) == pytest.approx(0.005)
    assert cosine_lr(0.01, 0.0, 50, 10) == pytest.approx(0.0)  # clamped past t_max
    # matches torch's CosineAnnealingLR
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.02)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=8, eta_min=1e-3)
    for e in range(1, 9):
        opt.step()
        sched.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(cosine_lr(0.02, 1e-3, e, 8), rel=1e-12)


# ---------------------------------------------------------------- the trainer on a budget
def test_time_limited_run_reaches_stage_two_and_evaluates(tmp_path, emt_cache):
    """1500 configured epochs, an 8-second budget: the run still enters stage two (stage_two.start
    is placed on the budget), finishes at least one stage-two epoch, logs why, keeps the EMA
    model of stage two and evaluates it."""
    from mlpot.train import train

    run = tmp_path / "run"
    raw = toy_config(run, cache_dir=emt_cache, epochs=1500, time_limit=8.0 / 60.0,
                     stage_two={"start": 0.8, "energy_weight": 55.0, "forces_weight": 3.0, "lr": 0.002})
    lines = []
    metrics = train(validate_config(raw), log=lines.append)
    rows = _rows(run)
    stages = [int(r["stage"]) for r in rows]
    assert 1 in stages and 2 in stages, stages
    first_two = stages.index(2)
    assert stages[first_two:] == [2] * (len(stages) - first_two)  # no way back
    assert float(rows[first_two]["lr"]) == pytest.approx(0.002)
    # the log says when and why
    said = [m for m in lines if "stage two" in m and "why: time budget" in m]
    assert len(said) == 1, lines
    assert said[0].startswith(f"epoch {int(rows[first_two]['epoch'])}: stage two")
    assert "s/epoch (measured)" in said[0] and "1500 configured epochs" in said[0]
    meta = torch.load(run / "model.pt", weights_only=True)["metadata"]
    assert meta["stop_reason"] == "time_limit"
    assert meta["stage_two"]["epoch"] == int(rows[first_two]["epoch"])
    assert meta["stage_two"]["reason"].startswith("time budget")
    # the saved model is the stage-two (EMA) model, and it was evaluated
    assert meta["best_epoch"] >= int(rows[first_two]["epoch"])
    assert metrics["test"]["n_configs"] == 4 and math.isfinite(metrics["test"]["e_mae"])
    assert json.loads((run / "metrics.json").read_text())["test"]["f_mae"] == metrics["test"]["f_mae"]
    ck = load_checkpoint_file(run / "checkpoint.pt")
    assert ck["loss_weights"][:2] == [55.0, 3.0] and ck["stage"] == 2


def test_time_limited_cosine_anneals_over_the_budget(tmp_path, emt_cache):
    """Cosine annealing without t_max: over 1000 configured epochs the LR of an 8-second run would
    stay near lr0; on the budget it anneals towards eta_min by the last epoch."""
    from mlpot.train import train

    run = tmp_path / "run"
    raw = toy_config(run, cache_dir=emt_cache, epochs=1000, time_limit=8.0 / 60.0, scheduler="cosine",
                     lr=0.01)
    train(validate_config(raw), log=lambda m: None)
    rows = _rows(run)
    assert len(rows) >= 3, rows
    lrs = [float(r["lr"]) for r in rows]
    assert lrs[0] == pytest.approx(0.01)
    assert all(b <= a + 1e-15 for a, b in zip(lrs, lrs[1:]))  # monotone
    # unbudgeted, epoch k of 1000 would have lr > 0.0099 for k < 30
    assert lrs[-1] < 0.5 * 0.01, lrs


def test_unbounded_budget_changes_nothing(tmp_path, emt_cache):
    """A time limit the run never reaches gives the same epochs, stages and LRs as no limit."""
    from mlpot.train import train

    logs = {}
    for name, limit in (("plain", None), ("budget", 600.0)):
        run = tmp_path / name
        raw = toy_config(run, cache_dir=emt_cache, epochs=4, time_limit=limit, scheduler="cosine",
                         stage_two={"start": 0.5, "lr": 0.003})
        train(validate_config(raw), log=lambda m: None)
        logs[name] = [(r["epoch"], r["stage"], r["lr"], r["train_loss"]) for r in _rows(run)]
    assert logs["plain"] == logs["budget"]
    assert [s for _, s, _, _ in logs["plain"]] == ["1", "1", "2", "2"]


def test_stage_two_due_within_an_epoch():
    b = TimeBudget(minutes=1.0, epochs=1500)
    # 20 s for half an epoch: 40 s/epoch, the budget holds 1.5 epochs; 0.8 of them is 1.2
    assert b.stage_two_due(0.8, elapsed=20.0, progress=0.5) is None
    why = b.stage_two_due(0.8, elapsed=50.0, progress=1.25)
    assert why is not None and "within epoch 2" in why and "holds 1.5 of the 1500" in why
    assert b.stage_two_due(1200, elapsed=50.0, progress=1.25) is not None  # 1200/1500 = 0.8
    assert b.stage_two_due(0.8, elapsed=0.0, progress=0.0) is None
    roomy = TimeBudget(minutes=1.0, epochs=2)  # everything fits: the epoch rule decides
    assert roomy.stage_two_due(0.5, elapsed=50.0, progress=1.9) is None
    assert TimeBudget(1.0, 1500).stage_two_due(1, elapsed=50.0, progress=1.25) is None  # epoch 1 in reach (1.5 held)


@register_model("TrainToySlow")
class TrainToySlow(TrainToy):
    """TrainToy that takes at least 20 ms per forward pass (a stand-in for a big model)."""

    def compute_node_energies(self, graph, vectors):
        time.sleep(0.02)
        return super().compute_node_energies(graph, vectors)


def test_budget_shorter_than_one_epoch_still_gets_stage_two(tmp_path, emt_cache):
    """120 single-frame batches of >= 20 ms (>= 2.4 s per epoch) and a 1.5-second budget: the run
    never completes an epoch, yet stage two starts between batches at about 0.8 of the budget
    and the model is evaluated."""
    from mlpot.train import train

    run = tmp_path / "run"
    raw = toy_config(run, n_train=120, n_valid=4, n_test=4, cache_dir=emt_cache,
                     epochs=50, batch_size=1, time_limit=1.5 / 60.0,
                     stage_two={"start": 0.8, "energy_weight": 55.0, "forces_weight": 3.0, "lr": 0.002})
    raw["model"]["name"] = "TrainToySlow"
    lines = []
    metrics = train(validate_config(raw), log=lines.append)
    rows = _rows(run)
    said = [m for m in lines if "stage two" in m and "why: time budget" in m]
    assert len(said) == 1, lines
    assert len(rows) == 1, rows  # one (partial) epoch
    assert said[0].startswith("epoch 1: stage two") and "(before batch" in said[0]
    assert rows[0]["stage"] == "2" and float(rows[0]["lr"]) == pytest.approx(0.002)
    meta = torch.load(run / "model.pt", weights_only=True)["metadata"]
    assert meta["stage_two"]["epoch"] == 1 and meta["stop_reason"] == "time_limit"
    assert metrics["test"]["n_configs"] == 4


def test_budget_cosine_never_raises_the_lr_when_epochs_speed_up():
    """The budget's plan grows when later epochs are faster (20, 40, 80 epochs); the cosine's
    t_max follows it only downwards within a run, so the LR keeps falling."""
    from types import SimpleNamespace

    from mlpot.train.distributed import DistInfo
    from mlpot.train.trainer import Trainer

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000)
    plans = iter([20, 40, 80, 10, 30])
    fake = SimpleNamespace(budget=SimpleNamespace(planned_epochs=lambda elapsed: next(plans)), scheduler=sched,
                           optimizer=opt, tr={"scheduler_params": {}, "epochs": 1000}, t_start=0.0, info=DistInfo())
    lrs, t_max = [], []
    for _ in range(5):
        opt.step()
        sched.step()
        Trainer._budget_schedules(fake, sched.last_epoch)
        lrs.append(opt.param_groups[0]["lr"])
        t_max.append(sched.T_max)
    assert t_max == [20, 20, 20, 10, 10]
    assert all(b < a for a, b in zip(lrs, lrs[1:])), lrs
