"""An mlpot model behind LAMMPS's ML-IAP "unified" Python interface (``pair_style mliap unified``).

LAMMPS hands :meth:`MLPotMLIAP.compute_forces` a data object (``MLIAPDataPy``) with the pairs of
its local atoms: ``pair_i`` (local atom), ``jatoms``/``pair_j`` (local or ghost atom), ``rij``
(npairs, 3) ``= r_j - r_i``, ``elems`` (element index of every local and ghost atom, into
``element_types``), ``ntotal`` (local + ghost atoms), ``nlistatoms``, ``npairs``. We write the
energy (``data.energy``), the per-atom energies (``eatoms``) and the per-pair forces
``fij = dE/drij`` (``data.update_pair_forces(fij)``); LAMMPS then adds ``f_i += fij`` and
``f_j -= fij``, folds ghost forces into their owners (``newton on``) and tallies the virial
from ``fij`` and ``rij``.

The model sees a graph whose edges run from ``j`` (sender) to ``i`` (receiver) with edge vector
``r_i - r_j = -rij``. Three ways to build it (``mode``):

* ``"exchange"``: nodes are the local and ghost atoms, edges only into local atoms. Between two
  message-passing layers the ghost features are refreshed from their owners with LAMMPS's
  ``forward_exchange``; the backward pass sends ghost gradients back with ``reverse_exchange``
  (:mod:`mlpot.lammps.exchange`). Exact for any number of layers and MPI ranks.
* ``"fold"``: every ghost is replaced by the local atom that owns it, found through ``jtags``.
  The graph is then the periodic graph of the local atoms: exact for any number of layers,
  but only when every ghost's owner is on this process (one MPI rank).
* ``"local"``: nodes are local and ghost atoms, no exchange. Exact only for one-layer models.

``"auto"`` (default) picks ``exchange`` where the data object offers it, else ``fold`` where
``jtags`` map every ghost to a local atom, else ``local`` for a one-layer model, else stops with
an error naming the LAMMPS build that is needed. Exchange is preferred even on one rank because
the choice must be the same on every rank: the exchange calls are collective, and a rank that
folded while its neighbours exchanged would hang the run.

Which ``MLIAPDataPy`` attribute needs which LAMMPS (checked against lammps/lammps
``src/ML-IAP/mliap_unified_couple.pyx``, ``src/KOKKOS/mliap_unified_couple_kokkos.pyx`` and
``src/KOKKOS/pair_mliap_kokkos.cpp`` on the develop branch):

* ``pair_i``, ``jatoms``/``pair_j``, ``rij``, ``elems``, ``ntotal``, ``nlistatoms``, ``npairs``,
  ``update_pair_forces``, ``energy`` (write-only): every LAMMPS with ``pair_style mliap
  unified``; numpy arrays in the CPU build, device arrays (cupy; read here through
  DLPack, never copied to the host) in the Kokkos build.
* ``eatoms``: CPU build: a write-only attribute (assign a float64 array of ``nlistatoms``);
  Kokkos build: a read-only property returning the device array LAMMPS owns, written in place.
* ``iatoms`` (the atom of each list entry; ``eatoms`` follows its order): every version.
* ``nlocal``: added to both builds in 2024-2025; ``nlistatoms`` is used where it is absent.
* ``jtags``: the CPU build of 2023-2024 only (absent from the Kokkos build and from the current
  CPU build); used only by ``fold``.
* ``forward_exchange``/``reverse_exchange``: Kokkos build of LAMMPS develop since 2025 (see
  :mod:`mlpot.lammps.exchange`).
* the model's ``cutoff`` attribute: read by the current Kokkos build (``descriptor.cutmax``);
  ``rcutfac`` (half the cutoff) by every build.

Pickling stores the model's registered name, config and weights (not the Python object), so
the file loads wherever mlpot is importable.
"""
from __future__ import annotations

import inspect

import numpy as np
import torch

from mlpot.data.graph import graph_from_neighbor_list
from mlpot.errors import ConfigError
from mlpot.lammps.exchange import between_layers_exchange, has_exchange

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


__all__ = ["MODES", "MLPotMLIAP", "message_passing_layers", "supports_layer_hook"]

MODES = ("auto", "exchange", "fold", "local")
EXCHANGE_NEEDS = (
    "LAMMPS with MLIAPDataPy.forward_exchange/reverse_exchange (the ML-IAP Kokkos build of LAMMPS "
    "develop from 2025 on; the 29 Aug 2024 stable release lacks them)"
)


def message_passing_layers(model) -> int | None:
    """Number of message-passing layers from the model config (None when unknown)."""
    cfg = getattr(model, "config", {}) or {}
    for key in ("num_interactions", "num_layers", "num_message_passing", "n_layers"):
        if key in cfg and cfg[key] is not None:
            return int(cfg[key])
    return None


def supports_layer_hook(model) -> bool:
    """Whether ``model.compute_node_energies`` takes the ``between_layers`` hook."""
    return "between_layers" in inspect.signature(model.compute_node_energies).parameters


def _as_tensor(array, device: torch.device) -> torch.Tensor:
    """A LAMMPS array as a tensor without copying: numpy via ``from_numpy``, device arrays
    (cupy, torch) via DLPack; moved only when it is not already on ``device``."""
    if isinstance(array, torch.Tensor):
        t = array
    elif isinstance(array, np.ndarray):
        t = torch.from_numpy(array)
    elif hasattr(array, "__dlpack__"):
        t = torch.from_dlpack(array)
    else:
        t = torch.as_tensor(np.asarray(array))
    return t if t.device == device else t.to(device)


class MLPotMLIAP(_MLIAPBase):
    """ML-IAP unified model wrapping an mlpot :class:`PotentialModel`."""

    def __init__(self, model, device: str = "cpu", dtype: str | None = "float64", mode: str = "auto"):
        super().__init__()
        from ase.data import chemical_symbols

        if mode not in MODES:
            raise ConfigError(f"unknown ML-IAP graph mode {mode!r}; use {', '.join(MODES)}")
        self.mode = mode
        self.device = str(device)
        self.model = self._prepare(model, device, dtype)
        self.layers = message_passing_layers(self.model)
        if mode == "local" and self.layers != 1:
            raise ConfigError(
                f"mode 'local' is exact only for one-layer models; this one has "
                f"{self.layers or 'an unknown number of'} message-passing layers: use auto, exchange or fold"
            )
        if mode == "exchange" and self.layers != 1 and not supports_layer_hook(self.model):
            raise ConfigError(
                f"mode 'exchange' needs a model that runs layer by layer (MACE, ESCN); "
                f"{type(self.model).__name__} has no between_layers hook"
            )
        self.element_types = [chemical_symbols[z] for z in self.model.atomic_numbers]
        self.ndescriptors = 1
        self.nparams = 1
        # LAMMPS's dummy descriptor uses cutoff = 2 * radelem * rcutfac with radelem = 1;
        # the current Kokkos build also reads `cutoff` for descriptor.cutmax
        self.rcutfac = 0.5 * float(self.model.r_max)
        self.cutoff = float(self.model.r_max)
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
        self.__dict__.setdefault("cutoff", 2.0 * float(self.rcutfac))
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

    @staticmethod
    def _owner_map(jtags, nlocal: int, ntotal: int, pair_i: np.ndarray, pair_j: np.ndarray,
                   rij: np.ndarray) -> np.ndarray:
        """Local owner of every atom index 0..ntotal-1 (-1 where unknown), from jtags."""
        owner = np.full(ntotal, -1, dtype=np.int64)
        owner[:nlocal] = np.arange(nlocal)
        if jtags is None:
            return owner
        jtags = np.asarray(jtags, dtype=np.int64)
        local = pair_j < nlocal
        tag_to_local = {}
        for t, j in zip(jtags[local].tolist(), pair_j[local].tolist()):
            tag_to_local[t] = j
        ghost = ~local
        gj, gt = pair_j[ghost], jtags[ghost]
        # a local atom that is nobody's local neighbour (e.g. one atom per cell) has no tag seen.
        # One such atom u and one unmatched ghost tag t belong together when the ghosts of tag t
        # around u are u's own periodic images: their rij are lattice vectors, a set symmetric
        # under v -> -v (the images of an atom of another rank generally are not)
        unseen_local = sorted(set(range(nlocal)) - set(tag_to_local.values()))
        unmatched = sorted(set(gt.tolist()) - set(tag_to_local))
        if len(unseen_local) == 1 and len(unmatched) == 1:
            u, t = unseen_local[0], unmatched[0]
            v = rij[(pair_i == u) & ghost & (jtags == t)]
            if len(v) and np.abs(v[:, None, :] + v[None, :, :]).sum(-1).min(1).max() < 1e-6:
                tag_to_local[t] = u
        owner[gj] = np.array([tag_to_local.get(t, -1) for t in gt.tolist()], dtype=np.int64)
        return owner

    def _choose_mode(self, data, fold_owner) -> str:
        """The graph mode for this call (see the module doc); ``fold_owner`` computes owners."""
        mode = self.mode
        if mode == "exchange" and not has_exchange(data):
            raise RuntimeError(f"mlpot ML-IAP: mode 'exchange' needs {EXCHANGE_NEEDS}")
        if mode != "auto":
            return mode
        if self.layers != 1 and has_exchange(data) and supports_layer_hook(self.model):
            return "exchange"
        if getattr(data, "jtags", None) is not None and (fold_owner() >= 0).all():
            return "fold"
        if self.layers == 1:
            return "local"
        if has_exchange(data):
            raise RuntimeError(
                f"mlpot ML-IAP: {type(self.model).__name__} cannot run layer by layer (no between_layers "
                "hook), so its ghost features cannot be exchanged between MPI ranks: use MACE or ESCN, "
                "or one MPI rank with mode 'fold' and a LAMMPS whose MLIAPDataPy has jtags"
            )
        raise RuntimeError(
            f"mlpot ML-IAP: this model has {self.layers or 'an unknown number of'} message-passing layers "
            "and ghost atoms whose owners are not known on this MPI rank; exact forces need "
            f"{EXCHANGE_NEEDS}, or one MPI rank with a LAMMPS whose MLIAPDataPy has jtags (CPU build "
            "2023-2024), or a one-layer model"
        )

    def compute_forces(self, data):
        dev = torch.device(self.device)
        dtype = next(self.model.parameters()).dtype
        nlocal = getattr(data, "nlocal", None)
        nlocal = int(nlocal if nlocal is not None else data.nlistatoms)
        ntotal = int(data.ntotal)
        npairs = int(data.npairs)
        nlist = int(data.nlistatoms)
        rij_in = data.rij
        on_host = isinstance(rij_in, np.ndarray) or rij_in is None
        if npairs:
            pair_i = _as_tensor(data.pair_i, dev)[:npairs].long()
            pair_j = _as_tensor(data.jatoms, dev)[:npairs].long()
            rij = _as_tensor(rij_in, dev)[:npairs].to(dtype)
        else:
            pair_i = pair_j = torch.zeros(0, dtype=torch.long, device=dev)
            rij = torch.zeros(0, 3, dtype=dtype, device=dev)
        elems_in = data.elems if ntotal else None  # LAMMPS hands None for an unallocated array
        elems = (_as_tensor(elems_in, dev)[:ntotal].long() if elems_in is not None
                 else torch.zeros(0, dtype=torch.long, device=dev))

        def fold_owner():
            pj = pair_j.cpu().numpy()
            owner = self._owner_map(getattr(data, "jtags", None), nlocal, ntotal, pair_i.cpu().numpy(), pj,
                                    rij.detach().cpu().numpy())
            return owner[pj] if npairs else np.zeros(0, dtype=np.int64)

        mode = self._choose_mode(data, fold_owner)
        if mode == "fold":
            owner = fold_owner()
            if (owner < 0).any():
                raise RuntimeError(
                    "mlpot ML-IAP: mode 'fold' needs every ghost atom's owner on this process (one MPI "
                    "rank, and a LAMMPS whose MLIAPDataPy has jtags); use mode 'exchange' or 'auto'"
                )
            n_nodes = nlocal
            senders = torch.as_tensor(owner, device=dev)
        else:
            n_nodes = ntotal
            senders = pair_j
        z = self._elem_to_z.to(dev)[elems[:n_nodes]]
        vectors = (-rij).detach().requires_grad_(True)
        # LAMMPS hands over the edge vectors themselves: positions, cell and shifts are zero.
        graph = graph_from_neighbor_list(
            torch.zeros(n_nodes, 3, dtype=dtype, device=dev), z, torch.zeros(3, 3), [False] * 3,
            senders, pair_i, torch.zeros(npairs, 3, dtype=dtype, device=dev), dtype=dtype, device=dev,
        )
        inputs = [vectors]
        kwargs = {}
        if mode == "exchange":
            anchor = torch.zeros(0, dtype=dtype, device=dev, requires_grad=True)
            inputs.append(anchor)
            kwargs["between_layers"] = between_layers_exchange(data, anchor)
        with torch.enable_grad():
            out = self.model.compute_node_energies(graph, vectors, **kwargs)
            node_energy = out["node_energy"]
            if self.model.zbl is not None:
                node_energy = node_energy + self.model.zbl(z, graph["edge_index"], vectors)
            iatoms = getattr(data, "iatoms", None)
            if iatoms is not None and nlist:
                listed = _as_tensor(iatoms, dev)[:nlist].long()
            else:
                listed = torch.arange(nlist, device=dev)
            e_list = node_energy[listed]
            energy = e_list.sum()
            grads = torch.autograd.grad(energy, inputs, allow_unused=True)
        grad = grads[0] if grads[0] is not None else torch.zeros_like(vectors)
        fij = (-grad).detach().to(torch.float64).contiguous()  # dE/drij = -dE/dvectors
        if on_host:
            fij = fij.cpu().numpy()
        if npairs:
            data.update_pair_forces(fij)
        data.energy = float(energy.detach())
        self._write_eatoms(data, e_list.detach().to(torch.float64))

    @staticmethod
    def _write_eatoms(data, e: torch.Tensor) -> None:
        """Per-atom energies into LAMMPS: assigned in the CPU build (a write-only attribute),
        written in place into the array LAMMPS owns in the Kokkos build (a read-only property)."""
        try:
            target = data.eatoms
        except AttributeError:  # write-only attribute: reading it fails
            data.eatoms = np.ascontiguousarray(e.cpu().numpy())
            return
        except ValueError:  # LAMMPS allocated no eatoms
            return
        if target is None:
            data.eatoms = np.ascontiguousarray(e.cpu().numpy())
            return
        view = torch.from_numpy(target) if isinstance(target, np.ndarray) else torch.from_dlpack(target)
        view[: e.shape[0]].copy_(e.to(view.device))
