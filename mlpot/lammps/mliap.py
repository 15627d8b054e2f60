"""An mlpot model behind LAMMPS's ML-IAP "unified" Python interface (``pair_style mliap unified``).

LAMMPS hands :meth:`MLPotMLIAP.compute_forces` a data object with the local atoms' neighbour
pairs: ``pair_i`` (local atom), ``pair_j`` / ``jatoms`` (local or ghost atom), ``rij``
(npairs, 3) ``= r_j - r_i``, ``elems`` (element index of every local and ghost atom, into
``element_types``), ``jtags`` (global tag of each neighbour), ``nlistatoms`` / ``nlocal`` and
``ntotal``. We return the energy (``data.energy``, ``data.eatoms``) and per-pair forces
``fij = dE/drij`` through ``data.update_pair_forces(fij)``; LAMMPS then adds ``f_i += fij`` and
``f_j -= fij`` and folds ghost forces back into their owners (``newton on``), and tallies the
virial from ``fij`` and ``rij``.

The model sees a graph whose edges run from ``j`` (sender) to ``i`` (receiver) with edge
vector ``r_i - r_j = -rij``. Two ways to build it:

* ``"fold"`` (default when possible): every ghost is replaced by the local atom that owns it,
  found through ``jtags`` (the tag of a local atom is read off the pairs in which it is the
  neighbour). The graph is then exactly the periodic graph of the local atoms, so models with
  any number of message-passing layers give exact energies and forces. This needs every
  ghost's owner on this process: serial runs (one MPI rank).
* ``"local"``: nodes are all local and ghost atoms, edges only into local atoms. Exact only for
  models whose atomic energy depends on neighbours within one cutoff (one interaction layer);
  works with domain decomposition over many MPI ranks.

``mode="auto"`` picks ``fold`` when every ghost maps to a local atom, else ``local`` for a
one-layer model, else raises an error that says so.

Pickling stores the model's registered name, config and weights (not the Python object), so
the file loads wherever mlpot is importable.
"""
from __future__ import annotations

import numpy as np
import torch

from mlpot.data.graph import graph_from_neighbor_list
from mlpot.errors import ConfigError

try:  # the real base class when LAMMPS's Python package is installed
    from lammps.mliap.mliap_unified_abc import MLIAPUnified as _MLIAPBase
except Exception:  # noqa: BLE001 - LAMMPS absent: a stand-in with the same attributes

    class _MLIAPBase:  # type: ignore[no-redef]
        def __init__(self):
            self.interface = None
            self.element_types = None
            self.ndescriptors = None
            self.nparams = None
            self.rcutfac = None


__all__ = ["MLPotMLIAP", "message_passing_layers"]


def message_passing_layers(model) -> int | None:
    """Number of message-passing layers from the model config (None when unknown)."""
    cfg = getattr(model, "config", {}) or {}
    for key in ("num_interactions", "num_layers", "num_message_passing", "n_layers"):
        if key in cfg and cfg[key] is not None:
            return int(cfg[key])
    return None


class MLPotMLIAP(_MLIAPBase):
    """ML-IAP unified model wrapping an mlpot :class:`PotentialModel`."""

    def __init__(self, model, device: str = "cpu", dtype: str | None = "float64", mode: str = "auto"):
        super().__init__()
        from ase.data import chemical_symbols

        if mode not in ("auto", "fold", "local"):
            raise ConfigError(f"unknown ML-IAP graph mode {mode!r}; use auto, fold or local")
        self.mode = mode
        self.device = str(device)
        self.model = self._prepare(model, device, dtype)
        self.element_types = [chemical_symbols[z] for z in self.model.atomic_numbers]
        self.ndescriptors = 1
        self.nparams = 1
        # LAMMPS's dummy descriptor uses cutoff = 2 * radelem * rcutfac with radelem = 1
        self.rcutfac = 0.5 * float(self.model.r_max)
        self.layers = message_passing_layers(self.model)
        self._elem_to_z = torch.tensor(self.model.atomic_numbers, dtype=torch.long)

    @staticmethod
    def _prepare(model, device, dtype):
        model = model.to(torch.device(device))
        if dtype is not None:
            model = model.to({"float64": torch.float64, "float32": torch.float32}[dtype]
                             if isinstance(dtype, str) else dtype)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return model

    # ---- pickling: store name + config + weights --------------------------------------------
    def __getstate__(self):
        state = {k: v for k, v in self.__dict__.items() if k not in ("model", "interface", "_elem_to_z")}
        p = next(self.model.parameters(), None)
        state["model_payload"] = {
            "model_name": self.model.model_name,
            "config": dict(self.model.config),
            "state_dict": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "dtype": str(p.dtype).replace("torch.", "") if p is not None else "float64",
        }
        return state

    def __setstate__(self, state):
        from mlpot.models.registry import get_model_class

        payload = state.pop("model_payload")
        self.__dict__.update(state)
        model = get_model_class(payload["model_name"])(**payload["config"])
        model.load_state_dict(payload["state_dict"], strict=False)
        device = self.device if (not self.device.startswith("cuda") or torch.cuda.is_available()) else "cpu"
        self.device = device
        self.model = self._prepare(model, device, payload["dtype"])
        self.interface = None
        self._elem_to_z = torch.tensor(self.model.atomic_numbers, dtype=torch.long)

    # ---- ML-IAP interface ---------------------------------------------------------------------
    def compute_descriptors(self, data):
        """Not used by ``pair_style mliap unified`` energy/force evaluation."""

    def compute_gradients(self, data):
        """Not used by ``pair_style mliap unified`` energy/force evaluation."""

    def _owner_map(self, data, nlocal, ntotal, pair_j):
        """Local owner of every atom index 0..ntotal-1 (-1 where unknown), from jtags."""
        owner = np.full(ntotal, -1, dtype=np.int64)
        owner[:nlocal] = np.arange(nlocal)
        jtags = getattr(data, "jtags", None)
        if jtags is None:
            return owner
        jtags = np.asarray(jtags, dtype=np.int64)
        local = pair_j < nlocal
        tag_to_local = {}
        for t, j in zip(jtags[local].tolist(), pair_j[local].tolist()):
            tag_to_local[t] = j
        ghost = ~local
        gj, gt = pair_j[ghost], jtags[ghost]
        # a local atom that is nobody's local neighbour (e.g. one atom per cell) has no tag seen;
        # one such atom and one unmatched ghost tag can only belong together
        unseen_local = sorted(set(range(nlocal)) - set(tag_to_local.values()))
        unmatched = sorted(set(gt.tolist()) - set(tag_to_local))
        if len(unseen_local) == 1 and len(unmatched) == 1:
            tag_to_local[unmatched[0]] = unseen_local[0]
        owner[gj] = np.array([tag_to_local.get(t, -1) for t in gt.tolist()], dtype=np.int64)
        return owner

    def compute_forces(self, data):
        dev = torch.device(self.device)
        p = next(self.model.parameters())
        dtype = p.dtype
        nlocal = int(getattr(data, "nlocal", None) or data.nlistatoms)
        ntotal = int(data.ntotal)
        npairs = int(data.npairs)
        pair_i = np.asarray(data.pair_i, dtype=np.int64)
        pair_j = np.asarray(data.pair_j, dtype=np.int64)
        elems = np.asarray(data.elems, dtype=np.int64)
        rij_in = data.rij
        rij = torch.as_tensor(np.asarray(rij_in, dtype=np.float64)).to(device=dev, dtype=dtype)

        mode = self.mode
        if mode in ("auto", "fold"):
            owner = self._owner_map(data, nlocal, ntotal, pair_j) if npairs else np.arange(ntotal)
            if npairs and (owner[pair_j] < 0).any():
                if mode == "fold" or self.layers != 1:
                    raise RuntimeError(
                        "mlpot ML-IAP: some ghost atoms are owned by another MPI rank (or have no tag), and "
                        f"this model has {self.layers or 'an unknown number of'} message-passing layers: "
                        "run LAMMPS on one MPI rank (or use a one-layer model with mode='local')"
                    )
                mode = "local"
            else:
                mode = "fold"
        if mode == "fold":
            n_nodes = nlocal
            senders = owner[pair_j] if npairs else pair_j
        else:
            n_nodes = ntotal
            senders = pair_j
        z = self._elem_to_z[torch.as_tensor(elems[:n_nodes])].to(dev)
        vectors = (-rij).detach().requires_grad_(True)
        # LAMMPS hands over the edge vectors themselves: positions, cell and shifts are zero.
        graph = graph_from_neighbor_list(
            torch.zeros(n_nodes, 3, dtype=dtype, device=dev), z, torch.zeros(3, 3), [False] * 3,
            senders, pair_i, np.zeros((npairs, 3)), dtype=dtype, device=dev,
        )
        with torch.enable_grad():
            out = self.model.compute_node_energies(graph, vectors)
            node_energy = out["node_energy"]
            if self.model.zbl is not None:
                node_energy = node_energy + self.model.zbl(z, graph["edge_index"], vectors)
            e_local = node_energy[:nlocal]
            energy = e_local.sum()
            if npairs:
                (grad,) = torch.autograd.grad(energy, vectors)
            else:
                grad = torch.zeros_like(vectors)
        fij = (-grad).detach().to(torch.float64)  # dE/drij = -dE/dvectors
        if isinstance(rij_in, np.ndarray):
            fij = np.ascontiguousarray(fij.cpu().numpy())
        data.update_pair_forces(fij)
        data.energy = float(energy.detach())
        eatoms = np.ascontiguousarray(e_local.detach().to(torch.float64).cpu().numpy())
        data.eatoms = eatoms
