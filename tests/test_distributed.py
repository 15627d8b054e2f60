"""Data-parallel training on CPU with two gloo processes equals one process with the global batch."""
from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from test_train_helpers import toy_config

from mlpot.train.config import validate_config
from mlpot.train.trainer import load_checkpoint_file


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, raw: dict) -> None:
    import test_train_helpers  # noqa: F401 - registers TrainToy in the child

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    from mlpot.train import train

    train(validate_config(raw), log=lambda m: None)


def _raw(out, cache, batch_size):
    # 4 b structures, one epoch: two optimizer steps; no EMA so the saved model is the raw weights
    return toy_config(out, n_train=8, n_valid=3, n_test=5, cache_dir=cache, epochs=1,
                      batch_size=batch_size, ema=False, clip_grad=None, lr=0.02, scheduler="none",
                      stress_weight=10.0)


def test_two_gloo_ranks_equal_single_process(tmp_path):
    from test_train_helpers import TrainToy  # noqa: F401

    from mlpot.train import train

    cache = tmp_path / "data"
    b = 2
    train(validate_config(_raw(tmp_path / "single", cache, 2 * b)), log=lambda m: None)
    mp.spawn(_worker, args=(2, _free_port(), _raw(tmp_path / "ddp", cache, b)), nprocs=2, join=True)

    a = torch.load(tmp_path / "single" / "model.pt", weights_only=True)["state_dict"]
    d = torch.load(tmp_path / "ddp" / "model.pt", weights_only=True)["state_dict"]
    init = load_checkpoint_file(tmp_path / "ddp" / "checkpoint.pt")
    moved = False
    for k in a:
        assert torch.allclose(a[k], d[k], rtol=0, atol=1e-10), k
    # the step did change the weights (the comparison is not between two untouched models)
    from mlpot.models.base import build_model

    torch.manual_seed(3)
    fresh = build_model(init["model_name"], **init["model_kwargs"]).state_dict()
    moved = any(not torch.allclose(fresh[k].double(), a[k]) for k in a if a[k].is_floating_point())
    assert moved

    # sharded evaluation merged over ranks gives the single-process metrics
    ma = json.loads((tmp_path / "single" / "metrics.json").read_text())
    md = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    for split in ("train", "valid", "test"):
        assert md[split]["n_configs"] == ma[split]["n_configs"]
        for k in ("e_mae", "f_rmse", "s_mae"):
            assert md[split][k] == pytest.approx(ma[split][k], rel=1e-9), (split, k)


def _worker_done(rank: int, world: int, port: int, raw: dict) -> None:
    """Train, then leave ``done_<rank>.json`` with what this rank saw (proof it returned)."""
    _worker(rank, world, port, raw)
    from pathlib import Path

    out = Path(raw["output"])
    meta = torch.load(out / "model.pt", weights_only=True)["metadata"]
    (out / f"done_{rank}.json").write_text(json.dumps({"stop_reason": meta["stop_reason"]}))


def _spawn_with_deadline(fn, raw, seconds=240.0):
    """Two gloo ranks; fail (instead of hanging the suite) when they do not both finish in time."""
    import time

    ctx = mp.start_processes(fn, args=(2, _free_port(), raw), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + seconds
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"ranks did not finish within {seconds:.0f} s (deadlock?)")


@pytest.mark.parametrize("stop", ["early_stopping", "time_limit"])
def test_two_ranks_stop_together(tmp_path, stop):
    """Early stopping and the time limit are decided once for all ranks: both return, no deadlock.

    The validation set (3 frames) does not split evenly over the two ranks, so evaluation also
    runs with unequal shards.
    """
    cache = tmp_path / "data"
    extra = ({"epochs": 10, "lr": 1e-30, "patience": 2, "ema": False} if stop == "early_stopping"
             else {"epochs": 50, "time_limit": 1e-4})
    raw = toy_config(tmp_path / "run", n_train=8, n_valid=3, n_test=5, cache_dir=cache, batch_size=2, **extra)
    _spawn_with_deadline(_worker_done, raw)
    for rank in (0, 1):
        done = json.loads((tmp_path / "run" / f"done_{rank}.json").read_text())
        assert done["stop_reason"] == stop
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["valid"]["n_configs"] == 3 and metrics["test"]["n_configs"] == 5
    if stop == "early_stopping":
        rows = (tmp_path / "run" / "log.csv").read_text().splitlines()[1:]
        assert len(rows) == 3  # best at epoch 1, then `patience` = 2 epochs without improvement
