"""The common physics of every mlpot potential: energy -> forces and stress by autograd.

A model maps a graph (see ``docs/architecture.md``) to per-atom energies ``E_i``. The base class
turns them into

* total energies per structure ``E_b = sum_{i in b} E_i``;
* forces ``F_i = -dE/dr_i``;
* virials ``W_b = -dE_b/d(eps_b)`` and stress ``sigma_b = -W_b / V_b`` (ASE's sign: tensile
  stress is positive when the energy grows on expansion), computed through a symmetric strain
  ``eps`` applied to positions and cell, ``r -> r (1 + eps)`` and ``cell -> cell (1 + eps)``.

Edge vectors are built here, ``D = r_j - r_i + S @ cell_b``, so that autograd reaches both the
positions and the strain. Subclasses only implement :meth:`PotentialModel.compute_node_energies`.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from mlpot.errors import ConfigError, UnknownElementError
from mlpot.models.heads import default_head, e0_vector
from mlpot.models.io import save_model
from mlpot.models.registry import (  # noqa: F401 - re-exported: models register with base.register_model
    MODEL_REGISTRY,
    build_model,
    get_model_class,
    register_model,
)
from mlpot.nn.radial import PolynomialCutoff
from mlpot.voigt import full_3x3_to_voigt


class PotentialModel(nn.Module):
    """Base class of all mlpot potentials.

    Parameters common to every model (all JSON-serialisable, kept in ``self.config``):

    r_max: cutoff radius in Å.
    atomic_numbers: the species the model knows, in the order of its one-hot encoding.
    e0s: isolated-atom energies (eV), a list aligned with ``atomic_numbers`` or a dict by Z/symbol.
    zbl: add the ZBL screened-nuclear repulsion (a pair term, smooth at its own cutoff).
    dtype: the dtype the model was built/trained in ("float64" or "float32").
    """

    model_name = "PotentialModel"

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        if "r_max" not in config or "atomic_numbers" not in config:
            raise ConfigError("a model needs `r_max` and `atomic_numbers`")
        self.config = dict(config)
        self.r_max = float(config["r_max"])
        self.atomic_numbers = [int(z) for z in config["atomic_numbers"]]
        if len(set(self.atomic_numbers)) != len(self.atomic_numbers):
            raise ConfigError(f"atomic_numbers has duplicates: {self.atomic_numbers}")
        self.trained_dtype = str(config.get("dtype", "float64"))
        z_table = torch.full((119,), -1, dtype=torch.long)
        z_table[torch.tensor(self.atomic_numbers, dtype=torch.long)] = torch.arange(len(self.atomic_numbers))
        self.register_buffer("z_table", z_table, persistent=False)
        self.register_buffer(
            "atomic_energies",
            torch.tensor(e0_vector(config.get("e0s"), self.atomic_numbers), dtype=torch.float64),
        )
        self.zbl = ZBLRepulsion(self.atomic_numbers) if config.get("zbl", False) else None
        # a direct (HIP) Hessian head, attached by models that support one (mlpot.models.hip)
        self.hessian_head = None
        # heads (mlpot.models.heads): one, "Default", unless the model's config names several
        self.heads = list(config.get("heads") or ["Default"])
        self.active_head = default_head(self.heads)

    # ---- helpers for subclasses -------------------------------------------------------------
    @property
    def num_elements(self) -> int:
        return len(self.atomic_numbers)

    @property
    def e0s(self) -> dict[int, float]:
        return {z: float(e) for z, e in zip(self.atomic_numbers, self.atomic_energies.tolist())}

    def species_index(self, atomic_numbers: torch.Tensor) -> torch.Tensor:
        """Map atomic numbers to 0..S-1; an unknown element is a clear error naming it."""
        idx = self.z_table[atomic_numbers]
        if not torch.compiler.is_compiling() and bool((idx < 0).any()):
            from ase.data import chemical_symbols

            bad = sorted({int(z) for z in atomic_numbers[idx < 0].tolist()})
            names = ", ".join(f"{chemical_symbols[z]} (Z={z})" for z in bad)
            known = ", ".join(chemical_symbols[z] for z in self.atomic_numbers)
            raise UnknownElementError(f"element(s) {names} not known to this model (trained on {known})")
        return idx

    def node_attrs(self, graph: dict) -> torch.Tensor:
        """One-hot species encoding (N, S) in the model's dtype."""
        idx = self.species_index(graph["atomic_numbers"])
        return nn.functional.one_hot(idx, self.num_elements).to(graph["positions"].dtype)

    def node_e0(self, graph: dict) -> torch.Tensor:
        """Isolated-atom energy of each atom (N,)."""
        idx = self.species_index(graph["atomic_numbers"])
        return self.atomic_energies.to(graph["positions"].dtype)[idx]

    # ---- heads (see mlpot.models.heads) -------------------------------------------------------
    def head_index(self, head: str | None) -> int:
        """Index of head ``head`` (None: the active head); an unknown name is a ConfigError."""
        if head is None:
            head = self.active_head
            if head is None:
                raise ConfigError(
                    f"this model has heads {self.heads} and none is named 'default': choose one (head=...)"
                )
        if head not in self.heads:
            raise ConfigError(f"head {head!r} not in this model's heads {self.heads}")
        return self.heads.index(head)

    @property
    def active_head_index(self) -> int:
        return self.head_index(None)

    def select_head(self, head: str | None) -> None:
        """Read structures whose graph carries no ``head`` with ``head`` (None: keep the default)."""
        if head is not None:
            self.head_index(head)
            self.active_head = head

    def node_heads(self, graph: dict) -> torch.Tensor:
        """Head index of every atom ``(N,)``: ``graph["head"][batch]`` or the active head."""
        if "head" in graph:
            return graph["head"].to(torch.long)[graph["batch"]]
        return torch.full_like(graph["batch"], self.active_head_index, dtype=torch.long)

    # ---- to implement -----------------------------------------------------------------------
    def compute_node_energies(
        self, graph: dict, vectors: torch.Tensor, between_layers=None
    ) -> dict[str, torch.Tensor]:
        """Return ``{"node_energy": (N,), optionally "node_features": (N, F)}`` (E0 included).

        ``between_layers``: optional callable ``h -> h'`` applied to the node features after
        every message-passing layer but the last (LAMMPS's ghost-feature exchange uses it,
        :mod:`mlpot.lammps.exchange`). A model that runs layer by layer accepts it; ``None``
        leaves the numbers unchanged.
        """
        raise NotImplementedError

    # ---- physics ----------------------------------------------------------------------------
    def forward(
        self,
        graph: dict,
        compute_force: bool = True,
        compute_stress: bool = False,
        create_graph: bool | None = None,
        compute_hessian: bool = False,
        hessian_method: str = "autograd",
        compute_atomic_stress: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Energies, and forces / stress / virials by autograd.

        ``create_graph`` defaults to ``self.training`` (training needs the double backward).
        ``compute_hessian``: also return ``hessian``, the block-diagonal ``(3N, 3N)`` Hessian of
        the batch (:mod:`mlpot.models.hessian`), by ``hessian_method`` ``"autograd"`` (second
        derivative of the energy) or ``"direct"`` (the model's HIP head, :mod:`mlpot.models.hip`).
        ``compute_atomic_stress``: also per-atom virials and stresses (see :func:`atomic_virials`).
        """
        if create_graph is None:
            create_graph = self.training
        if compute_hessian:
            from mlpot.models.hessian import check_hessian_method

            check_hessian_method(self, hessian_method)
        autograd_hessian_wanted = compute_hessian and hessian_method == "autograd"
        if autograd_hessian_wanted:
            compute_force = True
        positions = graph["positions"]
        batch = graph["batch"]
        edge_index = graph["edge_index"]
        cell = graph["cell"].to(positions.dtype)
        num_graphs = cell.shape[0]
        if (compute_force or compute_atomic_stress) and not positions.requires_grad:
            positions = positions.detach().requires_grad_(True)
        leaf_positions = positions
        displacement = None
        if compute_stress:
            displacement = torch.zeros(
                (num_graphs, 3, 3), dtype=positions.dtype, device=positions.device, requires_grad=True
            )
            strain = 0.5 * (displacement + displacement.transpose(1, 2))
            positions = positions + torch.einsum("ni,nij->nj", positions, strain[batch])
            cell = cell + torch.bmm(cell, strain)
        sender, receiver = edge_index[0], edge_index[1]
        shifts = torch.einsum("ei,eij->ej", graph["unit_shifts"].to(positions.dtype), cell[batch[sender]])
        vectors = positions[receiver] - positions[sender] + shifts

        out = self.compute_node_energies(graph, vectors)
        node_energy = out["node_energy"]
        if self.zbl is not None:
            node_energy = node_energy + self.zbl(graph["atomic_numbers"], edge_index, vectors)
        energy = torch.zeros(num_graphs, dtype=node_energy.dtype, device=node_energy.device)
        energy = energy.index_add(0, batch, node_energy)
        result: dict[str, torch.Tensor] = {"energy": energy, "node_energy": node_energy}
        if "node_features" in out:
            result["node_features"] = out["node_features"]
        if self.hessian_head is not None and (self.training or (compute_hessian and hessian_method == "direct")):
            result["hessian"] = self.hessian_head(graph, vectors, out)

        inputs = []
        if compute_force:
            inputs.append(leaf_positions)
        if displacement is not None:
            inputs.append(displacement)
        if compute_atomic_stress:
            inputs.append(vectors)
        if inputs:
            grads = torch.autograd.grad(
                [energy.sum()], inputs, create_graph=create_graph or autograd_hessian_wanted, allow_unused=True
            )
            if autograd_hessian_wanted:
                from mlpot.models.hessian import autograd_hessian

                g = grads[0] if grads[0] is not None else torch.zeros_like(leaf_positions)
                result["hessian"] = autograd_hessian(g, leaf_positions, graph["ptr"], create_graph=create_graph)
            k = 0
            if compute_force:
                g = grads[0]
                result["forces"] = -g if g is not None else torch.zeros_like(graph["positions"])
                k = 1
            if displacement is not None:
                g = grads[k]
                virials = -g if g is not None else torch.zeros_like(displacement)
                volume = torch.linalg.det(graph["cell"].to(positions.dtype)).abs()
                safe = torch.where(volume > 0, volume, torch.ones_like(volume))
                stress = torch.where(
                    (volume > 0)[:, None, None], -virials / safe[:, None, None], torch.zeros_like(virials)
                )
                result["virials"] = virials
                result["stress"] = stress
            if compute_atomic_stress:
                g = grads[-1] if grads[-1] is not None else torch.zeros_like(vectors)
                atomic = atomic_virials(vectors, g, edge_index, positions.shape[0])
                volume = torch.linalg.det(graph["cell"].to(positions.dtype)).abs()[batch]
                safe = torch.where(volume > 0, volume, torch.ones_like(volume))
                result["atomic_virials"] = atomic
                result["atomic_stress"] = torch.where(
                    (volume > 0)[:, None, None], -atomic / safe[:, None, None], torch.zeros_like(atomic)
                )
        return result

    # ---- convenience ------------------------------------------------------------------------
    def save(self, path) -> None:
        """Write one self-contained model file atomically (see :mod:`mlpot.models.io`)."""
        save_model(self, path)

    def predict(self, atoms_list, batch_size: int = 16, compute_stress: bool | None = None, head=None) -> dict:
        """Energies (eV), forces (eV/Å) and stress (eV/Å^3, ASE Voigt order) for ASE Atoms.

        ``head``: the head to read a multi-head model with (None: the active head).

        Returns ``{"energy": (B,), "forces": [ (n_b, 3) ... ], "stress": (B, 6)}`` as numpy.
        Stress is computed for periodic structures (zeros for molecules).
        """
        from ase import Atoms

        from mlpot.data import atoms_to_graph, collate

        if isinstance(atoms_list, Atoms):
            atoms_list = [atoms_list]
        p = next(self.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
        dtype = p.dtype if p is not None else torch.float64
        if compute_stress is None:
            compute_stress = any(a.pbc.any() for a in atoms_list)
        head_index = self.head_index(head)
        energies, forces, stresses = [], [], []
        was_training = self.training
        self.eval()
        try:
            for start in range(0, len(atoms_list), batch_size):
                chunk = atoms_list[start : start + batch_size]
                graphs = [atoms_to_graph(a, self.r_max, dtype=dtype) for a in chunk]
                g = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in collate(graphs).items()}
                g["head"] = torch.full((len(chunk),), head_index, dtype=torch.long, device=device)
                out = self(g, compute_force=True, compute_stress=compute_stress)
                energies.append(out["energy"].detach().cpu().numpy())
                f = out["forces"].detach().cpu().numpy()
                ptr = g["ptr"].cpu().numpy()
                forces.extend(f[ptr[b] : ptr[b + 1]] for b in range(len(chunk)))
                if compute_stress:
                    stresses.append(full_3x3_to_voigt(out["stress"].detach().cpu().numpy()))
                else:
                    stresses.append(np.zeros((len(chunk), 6)))
        finally:
            self.train(was_training)
        return {"energy": np.concatenate(energies), "forces": forces, "stress": np.concatenate(stresses)}


def atomic_virials(vectors: torch.Tensor, grad: torch.Tensor, edge_index: torch.Tensor, num_atoms: int):
    r"""Per-atom virials ``(N, 3, 3)`` from the edge gradients ``grad = dE/dD_e``:

    .. math:: W_i = -\tfrac12 \sum_{e \ni i} \operatorname{sym}(D_e \otimes \partial E / \partial D_e),

    each edge's virial split equally between its two atoms (mace-torch's split). They sum to
    the total virial ``-dE/d(eps)`` of a model whose energy depends on positions only through the
    edge vectors; the per-atom stress is ``-W_i / V``.
    """
    edge = torch.einsum("ea,eb->eab", vectors, grad)
    edge = -0.25 * (edge + edge.transpose(1, 2))
    out = vectors.new_zeros((num_atoms, 3, 3))
    return out.index_add(0, edge_index[0], edge).index_add(0, edge_index[1], edge)


class ZBLRepulsion(nn.Module):
    """Ziegler–Biersack–Littmark universal screened nuclear repulsion, as a pair term.

    E_ij = k_e Z_i Z_j / r * phi(r / a) * f(r / r_c),
    a = 0.46850 / (Z_i^0.23 + Z_j^0.23) Å, phi(x) = 0.18175 e^{-3.19980 x} + 0.50986 e^{-0.94229 x}
    + 0.28022 e^{-0.40290 x} + 0.02817 e^{-0.20162 x}, k_e = 14.399645 eV Å.
    The envelope f is the polynomial cutoff (p = 6) with r_c = the sum of the two covalent radii,
    so the term vanishes smoothly (value and first derivatives) before bonding distances.
    Each directed edge carries half the pair energy, added to its receiver.
    """

    def __init__(self, atomic_numbers: list[int], p: int = 6):
        super().__init__()
        from ase.data import covalent_radii

        self.p = p
        radii = torch.zeros(119, dtype=torch.float64)
        radii[:] = torch.tensor(covalent_radii[:119], dtype=torch.float64)
        self.register_buffer("covalent_radii", radii, persistent=False)

    def forward(self, atomic_numbers: torch.Tensor, edge_index: torch.Tensor, vectors: torch.Tensor):
        dtype = vectors.dtype
        zi = atomic_numbers[edge_index[0]].to(dtype)
        zj = atomic_numbers[edge_index[1]].to(dtype)
        r = torch.linalg.norm(vectors, dim=-1)
        a = 0.46850 / (zi.pow(0.23) + zj.pow(0.23))
        x = r / a
        phi = (
            0.18175 * torch.exp(-3.19980 * x)
            + 0.50986 * torch.exp(-0.94229 * x)
            + 0.28022 * torch.exp(-0.40290 * x)
            + 0.02817 * torch.exp(-0.20162 * x)
        )
        rc = self.covalent_radii.to(dtype)[atomic_numbers[edge_index[0]]] + self.covalent_radii.to(dtype)[
            atomic_numbers[edge_index[1]]
        ]
        env = PolynomialCutoff.envelope(r, rc, self.p)
        e_pair = 14.399645 * zi * zj / r * phi * env
        node = torch.zeros(atomic_numbers.shape[0], dtype=dtype, device=vectors.device)
        return node.index_add(0, edge_index[1], 0.5 * e_pair)
