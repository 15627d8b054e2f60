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
    init = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=False)
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
