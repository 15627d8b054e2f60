"""Atoms -> graph dict, and batching (see the graph table in docs/architecture.md).

A graph is a plain ``dict`` (:data:`AtomicGraph`). One structure gives ``B = 1``;
:func:`collate` concatenates ``B`` graphs: atom-wise tensors are concatenated, ``edge_index``
is offset by each structure's first atom (``ptr[b]``), ``batch``/``ptr``/``num_atoms`` are
rebuilt, per-structure tensors are stacked.

Edge vectors are *not* stored; the model computes them as
``vec = pos[j] - pos[i] + unit_shifts @ cell[batch[i]]`` (``i = edge_index[0]``).

Targets (``energy``, ``forces``, ``stress``, ``virials``) appear only when known; the weights
``energy_weight``/``forces_weight``/``stress_weight`` are 0 where a target is absent. When
graphs with and without a target are collated, the missing values are filled with zeros
(their weights are already 0). ``virials = -stress * V`` (eV); for a structure without a 3D
cell there is no stress target.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from mlpot.data.neighbors import neighbor_list
from mlpot.errors import DataError
from mlpot.voigt import as_full_3x3

AtomicGraph = dict  # dict[str, Any]; keys listed in docs/architecture.md

__all__ = [
    "AtomicGraph",
    "atoms_to_graph",
    "collate",
    "frame_to_graph",
    "graph_from_neighbor_list",
    "graphs_from_atoms",
]

PER_ATOM_KEYS = ("positions", "atomic_numbers", "forces", "batch")
PER_GRAPH_KEYS = (
    "cell",
    "pbc",
    "num_atoms",
    "energy",
    "stress",
    "virials",
    "weight",
    "energy_weight",
    "forces_weight",
    "stress_weight",
)
TARGET_SHAPES = {"energy": (), "forces": (3,), "stress": (3, 3), "virials": (3, 3)}


def graph_from_neighbor_list(
    positions,
    atomic_numbers,
    cell,
    pbc,
    i,
    j,
    S,
    num_atoms=None,
    *,
    dtype: torch.dtype | None = None,
    device=None,
) -> AtomicGraph:
    """The graph of ``B`` structures from arrays and a neighbour list ``(i, j, S)``: the one
    place that lays out the geometry keys of :data:`AtomicGraph`.

    ``positions`` (N, 3), ``atomic_numbers`` (N,), ``cell`` (B, 3, 3) or (3, 3), ``pbc``
    (B, 3) or (3,), ``num_atoms`` (B,) (default ``[N]``; atoms of one structure are
    contiguous). The pairs follow the neighbour-list contract: edge ``e`` has sender
    ``i[e]``, receiver ``j[e]`` and vector ``pos[j] - pos[i] + S[e] @ cell``, with atom
    indices into the whole batch. A structure periodic in no direction gets a zero cell.
    Arrays may be numpy or torch; tensors already of the right dtype and device are used as
    they are (not copied). ``dtype`` (default: that of a floating ``positions`` tensor, else
    float64) applies to positions, cell and shifts; ``device`` to everything.
    """
    if dtype is None:
        floating = isinstance(positions, torch.Tensor) and positions.is_floating_point()
        dtype = positions.dtype if floating else torch.float64
    pos = torch.as_tensor(positions, dtype=dtype, device=device).reshape(-1, 3)
    device = pos.device
    n = pos.shape[0]
    pbc_t = torch.as_tensor(pbc, device=device).to(torch.bool).reshape(-1, 3)
    cell_t = torch.as_tensor(cell, dtype=dtype, device=device).reshape(-1, 3, 3)
    cell_t = torch.where(pbc_t.any(-1)[:, None, None], cell_t, torch.zeros((), dtype=dtype, device=device))
    if num_atoms is None:
        num_atoms = torch.tensor([n], dtype=torch.long, device=device)
    else:
        num_atoms = torch.as_tensor(num_atoms, dtype=torch.long, device=device).reshape(-1)
    ptr = torch.zeros(num_atoms.shape[0] + 1, dtype=torch.long, device=device)
    ptr[1:] = torch.cumsum(num_atoms, 0)
    senders = torch.as_tensor(i, device=device).to(torch.long).reshape(-1)
    receivers = torch.as_tensor(j, device=device).to(torch.long).reshape(-1)
    return {
        "positions": pos,
        "atomic_numbers": torch.as_tensor(atomic_numbers, device=device).to(torch.long).reshape(-1),
        "cell": cell_t,
        "pbc": pbc_t,
        "edge_index": torch.stack([senders, receivers]),
        "unit_shifts": torch.as_tensor(S, device=device).to(dtype).reshape(-1, 3),
        "batch": torch.repeat_interleave(torch.arange(num_atoms.shape[0], device=device), num_atoms),
        "ptr": ptr,
        "num_atoms": num_atoms,
    }


def frame_to_graph(
    positions: np.ndarray,
    numbers: np.ndarray,
    cell: np.ndarray,
    pbc: np.ndarray,
    cutoff: float | None,
    *,
    energy=None,
    forces=None,
    stress=None,
    weight: float = 1.0,
    energy_weight: float | None = None,
    forces_weight: float | None = None,
    stress_weight: float | None = None,
    config_type: str = "Default",
    dtype: torch.dtype = torch.float64,
    edges: tuple | None = None,
    neighbor_backend: str = "auto",
    hessian=None,
) -> AtomicGraph:
    """Build a one-structure graph from arrays (``stress`` in ASE Voigt or 3x3, eV/Å^3).

    ``edges = (i, j, S)`` reuses a precomputed neighbor list; otherwise it is computed with
    :func:`mlpot.data.neighbor_list` for ``cutoff``.
    """
    positions = np.asarray(positions, dtype=np.float64)
    numbers = np.asarray(numbers, dtype=np.int64)
    pbc = np.asarray(pbc, dtype=bool).reshape(3)
    cell = np.asarray(cell, dtype=np.float64).reshape(3, 3)
    n = len(numbers)
    if edges is None:
        if cutoff is None:
            raise DataError("a cutoff is needed to build the graph's edges")
        i, j, S = neighbor_list(positions, float(cutoff), cell, pbc, backend=neighbor_backend)
    else:
        i, j, S = (np.asarray(x) for x in edges)
    g = graph_from_neighbor_list(positions, numbers, cell, pbc, i, j, S, dtype=dtype)
    if energy is not None:
        g["energy"] = torch.tensor([float(energy)], dtype=dtype)
    if forces is not None:
        g["forces"] = torch.as_tensor(np.asarray(forces, dtype=np.float64), dtype=dtype).reshape(n, 3)
    volume = abs(float(np.linalg.det(cell))) if pbc.all() else 0.0
    if stress is not None:
        s3 = as_full_3x3(stress)
        g["stress"] = torch.as_tensor(s3, dtype=dtype)[None]
        if volume > 0:
            g["virials"] = torch.as_tensor(-s3 * volume, dtype=dtype)[None]
    g["weight"] = torch.tensor([float(weight)], dtype=dtype)
    ew = (1.0 if energy is not None else 0.0) if energy_weight is None else float(energy_weight)
    fw = (1.0 if forces is not None else 0.0) if forces_weight is None else float(forces_weight)
    sw = (1.0 if stress is not None else 0.0) if stress_weight is None else float(stress_weight)
    g["energy_weight"] = torch.tensor([ew if energy is not None else 0.0], dtype=dtype)
    g["forces_weight"] = torch.tensor([fw if forces is not None else 0.0], dtype=dtype)
    g["stress_weight"] = torch.tensor([sw if stress is not None else 0.0], dtype=dtype)
    g["config_type"] = [str(config_type)]
    if hessian is not None:  # (3n, 3n) eV/Å², stored flat (mlpot.models.hessian)
        g["hessian"] = torch.as_tensor(np.asarray(hessian, dtype=np.float64), dtype=dtype).reshape(-1)
        g["hessian_weight"] = torch.ones(1, dtype=dtype)
    return g


def atoms_to_graph(
    atoms,
    cutoff: float,
    dtype: torch.dtype = torch.float64,
    *,
    energy_key: str = "energy",
    forces_key: str = "forces",
    stress_key: str = "stress",
    neighbor_backend: str = "auto",
) -> AtomicGraph:
    """``ase.Atoms`` -> one-structure graph.

    Targets are read from ``atoms.calc.results`` (what :func:`mlpot.data.read` produces),
    falling back to ``atoms.info``/``atoms.arrays`` under the given keys; weights and
    ``config_type`` from ``atoms.info`` (defaults 1 and ``"Default"``).
    """
    results = dict(getattr(atoms.calc, "results", {}) or {}) if atoms.calc is not None else {}
    energy = results.get("energy", atoms.info.get(energy_key))
    forces = results.get("forces", atoms.arrays.get(forces_key))
    stress = results.get("stress", atoms.info.get(stress_key))
    info = atoms.info
    return frame_to_graph(
        atoms.positions,
        atoms.numbers,
        atoms.cell.array,
        atoms.pbc,
        cutoff,
        energy=energy,
        forces=forces,
        stress=stress,
        weight=float(info.get("weight", info.get("config_weight", 1.0))),
        energy_weight=info.get("energy_weight", info.get("config_energy_weight")),
        forces_weight=info.get("forces_weight", info.get("config_forces_weight")),
        stress_weight=info.get("stress_weight", info.get("config_stress_weight")),
        config_type=str(info.get("config_type", "Default")),
        dtype=dtype,
        neighbor_backend=neighbor_backend,
        hessian=results.get("hessian"),
    )


def collate(graphs: Sequence[AtomicGraph]) -> AtomicGraph:
    """Batch graphs: concatenate atoms and edges (edge_index offset by ``ptr``), stack
    per-structure tensors, rebuild ``batch``, ``ptr`` and ``num_atoms``."""
    graphs = list(graphs)
    if not graphs:
        raise DataError("cannot collate an empty list of graphs")
    if len(graphs) == 1 and int(graphs[0]["num_atoms"].shape[0]) == 1:
        return dict(graphs[0])
    num_atoms = torch.cat([g["num_atoms"] for g in graphs])
    ptr = torch.zeros(len(num_atoms) + 1, dtype=torch.long)
    ptr[1:] = torch.cumsum(num_atoms, 0)
    B = len(num_atoms)
    # offsets of each graph's atoms / structures
    atom_off = []
    graph_off = []
    na, nb = 0, 0
    for g in graphs:
        atom_off.append(na)
        graph_off.append(nb)
        na += int(g["positions"].shape[0])
        nb += int(g["num_atoms"].shape[0])
    out: AtomicGraph = {
        "positions": torch.cat([g["positions"] for g in graphs]),
        "atomic_numbers": torch.cat([g["atomic_numbers"] for g in graphs]),
        "cell": torch.cat([g["cell"] for g in graphs]),
        "pbc": torch.cat([g["pbc"] for g in graphs]),
        "edge_index": torch.cat([g["edge_index"] + o for g, o in zip(graphs, atom_off)], dim=1),
        "unit_shifts": torch.cat([g["unit_shifts"] for g in graphs]),
        "batch": torch.repeat_interleave(torch.arange(B), num_atoms),
        "ptr": ptr,
        "num_atoms": num_atoms,
    }
    dtype = out["positions"].dtype
    for key in ("energy", "forces", "stress", "virials"):
        if not any(key in g for g in graphs):
            continue
        parts = []
        for g in graphs:
            if key in g:
                parts.append(g[key])
            else:
                lead = int(g["positions"].shape[0]) if key == "forces" else int(g["num_atoms"].shape[0])
                parts.append(torch.zeros((lead, *TARGET_SHAPES[key]), dtype=dtype))
        out[key] = torch.cat(parts)
    for key in ("weight", "energy_weight", "forces_weight", "stress_weight"):
        out[key] = torch.cat([g[key] for g in graphs])
    out["config_type"] = [c for g in graphs for c in g["config_type"]]
    if any("hessian" in g for g in graphs):  # flat per-structure Hessians; zeros (weight 0) where absent
        out["hessian"] = torch.cat([
            g["hessian"] if "hessian" in g else torch.zeros(9 * int(g["positions"].shape[0]) ** 2, dtype=dtype)
            for g in graphs
        ])
        out["hessian_weight"] = torch.cat([g.get("hessian_weight", torch.zeros(1, dtype=dtype)) for g in graphs])
    for g in graphs:  # any extra keys: keep them when every graph has them per structure
        for key in g:
            if key not in out and all(key in h for h in graphs):
                vals = [h[key] for h in graphs]
                if all(isinstance(v, torch.Tensor) for v in vals):
                    try:
                        out[key] = torch.cat(vals)
                    except RuntimeError:
                        pass
                elif all(isinstance(v, list) for v in vals):
                    out[key] = [x for v in vals for x in v]
    return out


def graphs_from_atoms(
    atoms_list: Iterable, cutoff: float, dtype: torch.dtype = torch.float64, **kwargs
) -> AtomicGraph:
    """Many ``ase.Atoms`` -> one batched graph (``collate`` of :func:`atoms_to_graph`)."""
    from ase import Atoms

    if isinstance(atoms_list, Atoms):
        atoms_list = [atoms_list]
    return collate([atoms_to_graph(a, cutoff, dtype, **kwargs) for a in atoms_list])
