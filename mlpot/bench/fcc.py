"""fcc Cu supercells as graphs, built without ASE (the GPU machine has none).

An ``n x n x n`` supercell of the conventional fcc cell (lattice constant ``a``, 4 atoms per
cell: ``(0,0,0), (0,1/2,1/2), (1/2,0,1/2), (1/2,1/2,0)``) has ``4 n^3`` atoms; positions are
rattled by a Gaussian of ``rattle`` Å so that forces are non-zero. Edges come from the project's
one neighbour list (:func:`mlpot.data.neighbors.batched_neighbor_list`, the torch cell list,
which also runs on CUDA) and the graph from its one graph builder
(:func:`mlpot.data.graph.graph_from_neighbor_list`).
"""
from __future__ import annotations

import torch

from mlpot.data.graph import graph_from_neighbor_list
from mlpot.data.neighbors import batched_neighbor_list

CU_LATTICE = 3.61  # Å, fcc Cu
CU_Z = 29
_BASIS = ((0.0, 0.0, 0.0), (0.0, 0.5, 0.5), (0.5, 0.0, 0.5), (0.5, 0.5, 0.0))


def fcc_positions(n: int, a: float = CU_LATTICE) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions ``(4 n^3, 3)`` and cell ``(3, 3)`` of an ``n x n x n`` fcc supercell (float64, CPU)."""
    grid = torch.stack(torch.meshgrid(*(torch.arange(n, dtype=torch.float64),) * 3, indexing="ij"), -1)
    basis = torch.tensor(_BASIS, dtype=torch.float64)
    pos = (grid.reshape(-1, 1, 3) + basis[None]).reshape(-1, 3) * a
    return pos, torch.eye(3, dtype=torch.float64) * (n * a)


def fcc_cu_graph(n: int, cutoff: float, *, cells: int = 1, rattle: float = 0.02, seed: int = 0,
                 dtype=torch.float64, device="cpu") -> dict:
    """A batch of ``cells`` rattled ``n x n x n`` fcc Cu supercells as one graph on ``device``."""
    pos0, cell = fcc_positions(n)
    gen = torch.Generator().manual_seed(seed)
    pos = torch.cat([pos0 + rattle * torch.randn(pos0.shape, generator=gen, dtype=torch.float64)
                     for _ in range(cells)])
    pos = pos.to(device=device, dtype=dtype)
    per = pos0.shape[0]
    batch = torch.arange(cells, device=device).repeat_interleave(per)
    cells_t = cell.to(device=device, dtype=dtype).expand(cells, 3, 3).contiguous()
    i, j, S = batched_neighbor_list(pos, cutoff, cells_t, True, batch)
    return graph_from_neighbor_list(pos, torch.full((per * cells,), CU_Z), cells_t, torch.ones(cells, 3, dtype=torch.bool),
                                    i, j, S, torch.full((cells,), per), dtype=dtype, device=device)
