"""Helpers for the training tests (no tests here): a tiny registered model and small configs.

``TrainToy`` is a one-layer invariant message-passing potential with the hyperparameters the
trainer fills in from data (``avg_num_neighbors``, ``scale``, ``shift``, ``e0s``), so the whole
config -> statistics -> model path is exercised without waiting for a big model.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import yaml

from mlpot.models.base import PotentialModel, register_model

TESTS_DIR = Path(__file__).resolve().parent


@register_model("TrainToy")
class TrainToy(PotentialModel):
    def __init__(self, r_max=4.0, atomic_numbers=(29,), e0s=None, avg_num_neighbors=1.0, scale=1.0,
                 shift=0.0, num_radial=6, hidden=8, seed=0, dtype="float64"):
        super().__init__(dict(r_max=r_max, atomic_numbers=list(atomic_numbers), e0s=e0s,
                              avg_num_neighbors=avg_num_neighbors, scale=scale, shift=shift,
                              num_radial=num_radial, hidden=hidden, seed=seed, dtype=dtype))
        g = torch.Generator().manual_seed(seed)
        S = len(self.atomic_numbers)
        self.avg_num_neighbors, self.scale, self.shift = float(avg_num_neighbors), float(scale), float(shift)
        self.register_buffer("centers", torch.linspace(1.5, r_max, num_radial, dtype=torch.float64))
        self.embed = torch.nn.Parameter(torch.randn(S, hidden, generator=g, dtype=torch.float64) * 0.5)
        self.radial = torch.nn.Parameter(torch.randn(num_radial, hidden, generator=g, dtype=torch.float64) * 0.5)
        self.readout = torch.nn.Parameter(torch.randn(2 * hidden, 1, generator=g, dtype=torch.float64) * 0.3)

    def compute_node_energies(self, graph, vectors):
        dt = vectors.dtype
        sender, receiver = graph["edge_index"][0], graph["edge_index"][1]
        n = graph["atomic_numbers"].shape[0]
        r = torch.linalg.norm(vectors, dim=-1)
        fc = torch.where(r < self.r_max, 0.5 * (torch.cos(math.pi * r / self.r_max) + 1.0), torch.zeros_like(r))
        basis = torch.exp(-2.0 * (r[:, None] - self.centers.to(dt)) ** 2) * fc[:, None]
        h = self.embed[self.species_index(graph["atomic_numbers"])]
        msg = torch.zeros(n, h.shape[1], dtype=dt, device=vectors.device)
        msg = msg.index_add(0, receiver, (basis @ self.radial) * h[sender]) / self.avg_num_neighbors
        feat = torch.cat([h, torch.tanh(msg)], dim=1)
        y = (torch.tanh(feat) @ self.readout)[:, 0]
        return {"node_energy": self.node_e0(graph) + self.scale * y + self.shift}


def toy_config(out, n_train=12, n_valid=4, n_test=4, cache_dir=None, **training) -> dict:
    """A small raw config on the built-in EMT data (cached in ``<out>/data``)."""
    tr = {"epochs": 2, "batch_size": 4, "lr": 0.01, "ema": True, "ema_decay": 0.9, "progress": False}
    tr.update(training)
    return {
        "output": str(out),
        "seed": 3,
        "data": {"synthetic": {"n_train": n_train, "n_valid": n_valid, "n_test": n_test, "seed": 5,
                               "cache_dir": None if cache_dir is None else str(cache_dir)}},
        "model": {"name": "TrainToy", "r_max": 4.0, "hidden": 6},
        "training": tr,
    }


def write_config(path, cfg: dict) -> Path:
    path = Path(path)
    path.write_text(yaml.safe_dump(cfg))
    return path


#: ``python -c`` prologue for subprocesses that run the CLI with TrainToy registered
SUBPROCESS_PROLOGUE = (
    f"import sys; sys.path.insert(0, {str(TESTS_DIR)!r}); import test_train_helpers; "
    "from mlpot.cli.main import main; sys.exit(main(sys.argv[1:]))"
)
