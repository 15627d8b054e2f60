"""A stand-in for LAMMPS's side of ``pair_style mliap unified``: domain decomposition, ghosts,
pair lists and the ML-IAP data object (``MLIAPDataPy``), without a LAMMPS binary.

:class:`MockDecomposition` splits a periodic cell into ``P`` equal slabs along the
first cell vector (``processors P 1 1``; fractional coordinates, as LAMMPS splits a triclinic box), one per rank, and builds for each rank what LAMMPS builds with
``newton on`` and the full neighbour list ML-IAP requests:

* local atoms: those whose wrapped position lies in the rank's slab (in a shuffled order);
* ghost atoms: every periodic image (of any atom, of this or another rank) inside the slab
  grown by the communication cutoff (pair cutoff + skin) in every direction (in fractional
  units: the cutoff over the spacing of the lattice planes), other than the
  local atoms themselves; a cell narrower than the cutoffs gives several images of one atom;
* pairs: for every local atom ``i`` every local or ghost ``j`` with ``|r_j - r_i| < cutoff``,
  with ``rij = r_j - r_i``, grouped by ``i``;
* ``forward_exchange``/``reverse_exchange``: collective over the ranks, which run in threads
  and meet at a barrier like MPI ranks in a halo exchange: forward copies every row and
  overwrites ghost rows with the owner's row; reverse copies every row, adds every ghost row
  (of every rank) into its owner's row and zeroes the ghost rows, as ``PairMLIAPKokkos`` does.

After every rank's ``compute_forces`` it does LAMMPS's part: ``f_i += fij``, ``f_j -= fij``,
ghost forces summed into their owners (reverse communication), the energy summed over ranks,
the virial ``W = -sum_pairs rij (x) fij`` (so that ``stress = -W / V`` in ASE's sign).

Array flavours of the data object (``flavour``):

* ``"numpy"`` — the CPU build (``src/ML-IAP/mliap_unified_couple.pyx``): numpy int32/float64
  arrays; ``eatoms`` and ``energy`` write-only; ``update_pair_forces`` takes a C-contiguous
  float64 numpy array; ``jtags`` only with ``tags=True`` (the 2023-2024 CPU build);
  ``nlocal`` present.
* ``"torch"`` — the Kokkos build (``src/KOKKOS/mliap_unified_couple_kokkos.pyx``): arrays are
  device arrays that offer only DLPack (like cupy: converting one to numpy is an error);
  ``eatoms`` is a read-only property returning LAMMPS's own array, to be written in place;
  ``energy`` write-only; ``update_pair_forces`` takes a contiguous float64 torch tensor on the
  device; no ``jtags``.

``exchange=False`` removes ``forward_exchange``/``reverse_exchange`` (LAMMPS before 2025).
"""
from __future__ import annotations

import itertools
import math
import pickle
import threading

import numpy as np
import torch

__all__ = ["DeviceArray", "MockDecomposition", "MockMLIAPData"]


class DeviceArray:
    """A device array that LAMMPS's Kokkos build hands to Python (cupy there): it exports
    itself through DLPack and refuses an implicit copy to the host."""

    def __init__(self, tensor: torch.Tensor):
        self._t = tensor

    def __dlpack__(self, *args, **kwargs):
        return self._t.__dlpack__(*args, **kwargs)

    def __dlpack_device__(self):
        return self._t.__dlpack_device__()

    @property
    def shape(self):
        return tuple(self._t.shape)

    @property
    def dtype(self):
        return self._t.dtype

    def __len__(self):
        return self._t.shape[0]

    def __array__(self, *args, **kwargs):
        raise TypeError("implicit conversion of a device array to a host (numpy) array is not allowed")


class _Comm:
    """The ranks' meeting point for the collective exchanges (threads standing in for MPI)."""

    def __init__(self, nranks: int, timeout: float = 120.0):
        self.barrier = threading.Barrier(nranks, timeout=timeout)
        self.slots: list = [None] * nranks
        self.ranks: list = []
        self.calls = [0] * nranks

    def wait(self):
        try:
            self.barrier.wait()
        except threading.BrokenBarrierError:
            raise RuntimeError(
                "mock LAMMPS: the ranks did not all call the exchange (a collective call) the same "
                "number of times"
            ) from None


def _check_exchange_args(copy_from, copy_to, vec_len, ntotal, device):
    if not (isinstance(copy_from, torch.Tensor) and isinstance(copy_to, torch.Tensor)):
        raise TypeError("forward/reverse_exchange take torch tensors (LAMMPS reads their data_ptr)")
    if copy_from.dtype != copy_to.dtype:
        raise TypeError(f"Types of ({copy_from.dtype})copy_from and ({copy_to.dtype})copy_to mismatch")
    if copy_from.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"Unsupported comms type: ({copy_from.dtype})")
    for t in (copy_from, copy_to):
        if t.device != device:
            raise TypeError(f"exchange buffer on {t.device}; LAMMPS's arrays are on {device}")
        if not t.is_contiguous() or t.numel() != ntotal * vec_len:
            raise ValueError(f"exchange buffers must be contiguous with ntotal * vec_len = {ntotal * vec_len} "
                             f"values, got shape {tuple(t.shape)}")


class MockMLIAPData:
    """One rank's ``MLIAPDataPy`` (see the module doc for the two flavours)."""

    def __init__(self, comm, rank, *, nlocal, ntotal, pair_i, jatoms, rij, elems, jtags, owner_rank,
                 owner_local, flavour, exchange, device):
        self._comm, self._rank = comm, rank
        self._flavour = flavour
        self._device = torch.empty(0, device=device).device  # "cuda" -> "cuda:0", as tensors report it
        self._nlocal, self._ntotal, self._npairs = int(nlocal), int(ntotal), int(len(pair_i))
        self.owner_rank, self.owner_local = owner_rank, owner_local  # the mock's bookkeeping
        self.pair_i_np, self.jatoms_np, self.rij_np = pair_i, jatoms, rij
        self._arrays = {
            "pair_i": pair_i.astype(np.int32), "jatoms": jatoms.astype(np.int32),
            "rij": np.ascontiguousarray(rij, dtype=np.float64), "elems": elems.astype(np.int32),
            "iatoms": np.arange(nlocal, dtype=np.int32),
            "numneighs": np.bincount(pair_i, minlength=nlocal).astype(np.int32),
        }
        if flavour == "torch":
            self._arrays = {k: torch.from_numpy(v).to(self._device) for k, v in self._arrays.items()}
        self._jtags = None if jtags is None else jtags.astype(np.int32)
        self._eatoms = (np.zeros(nlocal) if flavour == "numpy"
                        else torch.zeros(nlocal, dtype=torch.float64, device=self._device))
        self._exchange = exchange
        self.energy_value = None
        self.eatoms_written = False
        self.fij = None

    def _out(self, name):
        a = self._arrays[name]
        return DeviceArray(a) if self._flavour == "torch" else a

    # --- what MLIAPDataPy offers -------------------------------------------------------------
    ntotal = property(lambda self: self._ntotal)
    nlistatoms = property(lambda self: self._nlocal)
    nlocal = property(lambda self: self._nlocal)
    natomneigh = property(lambda self: self._nlocal)
    npairs = property(lambda self: self._npairs)
    pair_i = property(lambda self: self._out("pair_i"))
    jatoms = property(lambda self: self._out("jatoms"))
    pair_j = property(lambda self: self._out("jatoms"))
    rij = property(lambda self: self._out("rij"))
    elems = property(lambda self: self._out("elems"))
    iatoms = property(lambda self: self._out("iatoms"))
    numneighs = property(lambda self: self._out("numneighs"))
    eflag = property(lambda self: 1)
    vflag = property(lambda self: 1)

    def __getattr__(self, name):
        # attributes a given LAMMPS build lacks raise AttributeError, as on the real object
        if name == "jtags" and self.__dict__.get("_flavour") == "numpy" and self.__dict__.get("_jtags") is not None:
            return self.__dict__["_jtags"]
        if name in ("forward_exchange", "reverse_exchange") and self.__dict__.get("_exchange"):
            return getattr(self, "_" + name)
        raise AttributeError(f"'MLIAPDataPy' object has no attribute '{name}'")

    def _set_energy(self, value):
        self.energy_value = float(value)

    energy = property(None, _set_energy)  # write-only in both builds

    def _get_eatoms(self):
        if self._flavour == "numpy":
            raise AttributeError("unreadable attribute")  # CPU build: write-only
        return DeviceArray(self._eatoms)

    def _set_eatoms(self, value):
        if self._flavour == "torch":
            raise AttributeError("property 'eatoms' of 'MLIAPDataPy' object has no setter")
        value = np.asarray(value, dtype=np.float64)
        if value.shape != (self._nlocal,):
            raise ValueError(f"eatoms: expected {self._nlocal} values, got shape {value.shape}")
        self._eatoms[:] = value
        self.eatoms_written = True

    eatoms = property(_get_eatoms, _set_eatoms)

    def update_pair_forces(self, fij):
        if self._flavour == "numpy":
            if not (isinstance(fij, np.ndarray) and fij.dtype == np.float64 and fij.flags.c_contiguous):
                raise TypeError("update_pair_forces (CPU build) takes a C-contiguous float64 numpy array")
            f = torch.from_numpy(fij)
        else:
            if not (isinstance(fij, torch.Tensor) and fij.dtype == torch.float64 and fij.is_contiguous()):
                raise TypeError("update_pair_forces (Kokkos build) takes a contiguous float64 device tensor")
            if fij.device != self._device:
                raise TypeError(f"update_pair_forces: tensor on {fij.device}, LAMMPS's arrays are on {self._device}")
            f = fij
        if tuple(f.shape) != (self._npairs, 3):
            raise ValueError(f"update_pair_forces: expected ({self._npairs}, 3), got {tuple(f.shape)}")
        self.fij = f.detach().cpu().numpy().copy()

    def _collective(self, copy_from, copy_to, vec_len, combine):
        """Post this rank's buffer, wait for every rank, ``copy_to = copy_from`` then
        ``combine(out, buffers)``, wait again (no rank reuses a buffer another still reads)."""
        device = self._device if self._flavour == "torch" else torch.device("cpu")
        _check_exchange_args(copy_from, copy_to, vec_len, self._ntotal, device)
        comm, me = self._comm, self._rank
        comm.calls[me] += 1
        comm.slots[me] = copy_from.reshape(self._ntotal, vec_len)
        comm.wait()
        out = copy_to.reshape(self._ntotal, vec_len)
        out.copy_(comm.slots[me])
        combine(out, comm.slots)
        comm.wait()

    def _forward_exchange(self, copy_from, copy_to, vec_len):
        """Ghost rows <- their owners' rows (on any rank)."""

        def fill_ghosts(out, slots):
            for r in range(len(slots)):
                sel = np.nonzero(self.owner_rank == r)[0]
                if len(sel):
                    owners = torch.as_tensor(self.owner_local[sel], device=out.device)
                    out[torch.as_tensor(self._nlocal + sel, device=out.device)] = slots[r][owners]

        self._collective(copy_from, copy_to, vec_len, fill_ghosts)

    def _reverse_exchange(self, copy_from, copy_to, vec_len):
        """Owner rows += every rank's ghost rows of them; ghost rows <- 0."""
        me = self._rank

        def sum_into_owners(out, slots):
            for r, peer in enumerate(self._comm.ranks):
                sel = np.nonzero(peer.owner_rank == me)[0]
                if len(sel):
                    owners = torch.as_tensor(peer.owner_local[sel], device=out.device)
                    ghosts = slots[r][torch.as_tensor(peer._nlocal + sel, device=out.device)]
                    out.index_add_(0, owners, ghosts.to(out.device))
            out[self._nlocal:] = 0

        self._collective(copy_from, copy_to, vec_len, sum_into_owners)


class MockDecomposition:
    """``atoms`` split into ``nranks`` slabs along x, each rank's :class:`MockMLIAPData` built
    as LAMMPS would (see the module doc). ``element_types`` maps elements to LAMMPS's indices."""

    def __init__(self, atoms, cutoff: float, element_types, nranks: int, flavour: str = "numpy",
                 skin: float = 0.5, tags: bool = False, exchange: bool = True, device: str = "cpu",
                 seed: int = 0):
        if flavour not in ("numpy", "torch"):
            raise ValueError(f"flavour must be numpy or torch, got {flavour!r}")
        cell = np.asarray(atoms.cell.array, dtype=np.float64)
        if not atoms.pbc.all():
            raise ValueError("the mock decomposes cells periodic in x, y and z only")
        self.atoms, self.cutoff, self.nranks = atoms, float(cutoff), int(nranks)
        rng = np.random.default_rng(seed)
        frac = atoms.get_scaled_positions(wrap=True)
        n = len(atoms)
        owner_rank = np.minimum((frac[:, 0] * nranks).astype(int), nranks - 1)
        self.local_atoms = []  # per rank, global index of each local atom
        for r in range(nranks):
            mine = np.nonzero(owner_rank == r)[0]
            self.local_atoms.append(rng.permutation(mine))
        local_index = np.empty(n, dtype=np.int64)
        for r, mine in enumerate(self.local_atoms):
            local_index[mine] = np.arange(len(mine))
        rc_comm = self.cutoff + float(skin)
        # the ghost cutoff in fractional units: rc over the spacing of the lattice planes (as
        # LAMMPS does for triclinic boxes in lamda coordinates)
        grow = rc_comm * np.linalg.norm(np.linalg.inv(cell), axis=0)
        reach = [int(math.ceil(g)) + 1 for g in grow]
        shifts = np.array(list(itertools.product(*[range(-k, k + 1) for k in reach])), dtype=np.int64)
        zmap = {sym: k for k, sym in enumerate(element_types)}
        from ase.data import chemical_symbols

        elem_of = np.array([zmap[chemical_symbols[z]] for z in atoms.numbers], dtype=np.int64)
        tag_of = rng.permutation(n) + 1  # LAMMPS tags: 1-based global ids, in no particular order
        self.comm = _Comm(nranks)
        self.ranks: list[MockMLIAPData] = []
        self.global_of = []  # per rank, global index of every local and ghost atom
        for r in range(nranks):
            lo = np.array([r / nranks, 0.0, 0.0]) - grow
            hi = np.array([(r + 1) / nranks, 1.0, 1.0]) + grow
            images_f = frac[None, :, :] + shifts[:, None, :]  # (nshift, n, 3), fractional
            inside = np.all((images_f >= lo) & (images_f < hi), axis=-1)
            images = images_f @ cell
            s_idx, a_idx = np.nonzero(inside)
            is_self = (owner_rank[a_idx] == r) & np.all(shifts[s_idx] == 0, axis=1)
            s_idx, a_idx = s_idx[~is_self], a_idx[~is_self]
            order = rng.permutation(len(a_idx))
            s_idx, a_idx = s_idx[order], a_idx[order]
            mine = self.local_atoms[r]
            nlocal = len(mine)
            xs = np.concatenate([frac[mine] @ cell, images[s_idx, a_idx]])
            glob = np.concatenate([mine, a_idx])
            d = xs[None, :, :] - xs[:nlocal, None, :]  # r_j - r_i, (nlocal, ntotal, 3)
            dist = np.linalg.norm(d, axis=-1)
            close = dist < self.cutoff
            close[np.arange(nlocal), np.arange(nlocal)] = False
            pi, pj = np.nonzero(close)
            data = MockMLIAPData(
                self.comm, r, nlocal=nlocal, ntotal=len(xs), pair_i=pi, jatoms=pj, rij=d[pi, pj],
                elems=elem_of[glob], jtags=tag_of[glob[pj]] if tags else None,
                owner_rank=owner_rank[a_idx], owner_local=local_index[a_idx],
                flavour=flavour, exchange=exchange, device=device,
            )
            self.ranks.append(data)
            self.global_of.append(glob)
        self.comm.ranks = self.ranks

    # ---- running ---------------------------------------------------------------------------
    def run(self, mliap, copy_model: bool = True) -> None:
        """Every rank's ``compute_forces`` at once, in threads. With ``copy_model`` the model
        object is pickled and unpickled first, as LAMMPS loads it; the ranks share that copy
        (``compute_forces`` keeps no state). The first error of any rank is raised."""
        obj = pickle.loads(pickle.dumps(mliap)) if copy_model else mliap
        objs = [obj] * self.nranks
        errors: list = [None] * self.nranks

        def work(r):
            try:
                objs[r].compute_forces(self.ranks[r])
            except BaseException as exc:  # noqa: BLE001 - handed to the caller below
                errors[r] = exc
                self.comm.barrier.abort()

        threads = [threading.Thread(target=work, args=(r,)) for r in range(self.nranks)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        first = [e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)]
        first = first or [e for e in errors if e is not None]
        if first:
            raise first[0]

    # ---- LAMMPS's part after compute_forces ---------------------------------------------------
    def energy(self) -> float:
        return float(sum(d.energy_value for d in self.ranks))

    def forces(self) -> np.ndarray:
        """(natoms, 3) forces in the order of ``atoms``: pair forces on local and ghost atoms,
        ghost forces then summed into their owners."""
        out = np.zeros((len(self.atoms), 3))
        for d, glob in zip(self.ranks, self.global_of):
            if d.npairs == 0:
                continue
            f = np.zeros((d.ntotal, 3))
            np.add.at(f, d.pair_i_np, d.fij)
            np.add.at(f, d.jatoms_np, -d.fij)
            np.add.at(out, glob, f)
        return out

    def atom_energies(self) -> np.ndarray:
        """(natoms,) per-atom energies as written into ``eatoms`` by each rank."""
        out = np.full(len(self.atoms), np.nan)
        for d, mine in zip(self.ranks, self.local_atoms):
            e = d._eatoms.cpu().numpy() if isinstance(d._eatoms, torch.Tensor) else d._eatoms
            out[mine] = e
        return out

    def virial(self) -> np.ndarray:
        """LAMMPS's pair virial ``W = -sum_pairs rij (x) fij`` (3x3, eV), summed over ranks."""
        w = np.zeros((3, 3))
        for d in self.ranks:
            if d.npairs:
                w -= d.rij_np.T @ d.fij
        return w

    def ghost_counts(self) -> list[int]:
        return [d.ntotal - d.nlocal for d in self.ranks]
