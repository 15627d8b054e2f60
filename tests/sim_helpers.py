"""Small helpers for the simulation tests: a tiny invariant two-layer message-passing model
(a stand-in :class:`PotentialModel` that needs no other model module) and test structures."""
from __future__ import annotations

import math

import numpy as np
import torch
from ase.build import bulk

from mlpot.models.base import PotentialModel, register_model


def _cosine_cutoff(r, r_max):
    return torch.where(r < r_max, 0.5 * (torch.cos(math.pi * r / r_max) + 1.0), torch.zeros_like(r))


@register_model("ToyMP")
class ToyMP(PotentialModel):
    """Invariant message passing: radial Gaussian messages over ``num_layers`` layers, a
    pair repulsion, an MLP readout. Smooth at r_max (value and slope)."""

    def __init__(self, r_max=4.0, atomic_numbers=(29,), e0s=None, num_radial=6, hidden=8,
                 num_layers=2, seed=0, dtype="float64", zbl=False):
        super().__init__(dict(r_max=r_max, atomic_numbers=list(atomic_numbers), e0s=e0s,
                              num_radial=num_radial, hidden=hidden, num_layers=num_layers,
                              seed=seed, dtype=dtype, zbl=zbl))
        g = torch.Generator().manual_seed(seed)
        S = len(self.atomic_numbers)
        self.num_layers = num_layers
        self.centers = torch.nn.Parameter(torch.linspace(1.5, r_max, num_radial, dtype=torch.float64),
                                          requires_grad=False)
        self.embed = torch.nn.Parameter(torch.randn(S, hidden, generator=g, dtype=torch.float64) * 0.5)
        self.radial = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.randn(num_radial, hidden, generator=g, dtype=torch.float64) * 0.3)
             for _ in range(num_layers)]
        )
        self.readout = torch.nn.Parameter(torch.randn(hidden * (num_layers + 1), 1, generator=g,
                                                      dtype=torch.float64) * 0.2)
        self.rep = torch.nn.Parameter(torch.tensor(2.0, dtype=torch.float64))

    def compute_node_energies(self, graph, vectors):
        dt = vectors.dtype
        sender, receiver = graph["edge_index"][0], graph["edge_index"][1]
        n = graph["atomic_numbers"].shape[0]
        r = torch.linalg.norm(vectors, dim=-1)
        fc = _cosine_cutoff(r, self.r_max)
        basis = torch.exp(-2.0 * (r[:, None] - self.centers.to(dt)) ** 2) * fc[:, None]
        h = self.embed.to(dt)[self.species_index(graph["atomic_numbers"])]
        feats = [h]
        for layer in range(self.num_layers):
            w = basis @ self.radial[layer].to(dt)
            msg = torch.zeros(n, h.shape[1], dtype=dt, device=vectors.device)
            msg = msg.index_add(0, receiver, w * h[sender])
            h = torch.tanh(msg + h)
            feats.append(h)
        feat = torch.cat(feats, dim=1)
        e = (torch.tanh(feat) @ self.readout.to(dt))[:, 0]
        pair = self.rep.to(dt) * torch.exp(-2.0 * (r - 1.0)) * fc
        e = e + torch.zeros(n, dtype=dt, device=vectors.device).index_add(0, receiver, 0.5 * pair)
        return {"node_energy": e + self.node_e0(graph), "node_features": feat}


def rattled_cu(size=(2, 2, 2), a=3.6, stdev=0.05, seed=1, cubic=True):
    atoms = bulk("Cu", "fcc", a=a, cubic=cubic) * size
    atoms.rattle(stdev=stdev, seed=seed)
    return atoms


def random_rotation(seed=0):
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return q
