"""Batched FIRE: relax many structures at once, all in one graph, with per-structure FIRE in torch.

Each structure follows exactly the FIRE rules of :class:`ase.optimize.FIRE` (Bitzek et al.,
PRL 97, 170201 (2006); defaults dt=0.1, dtmax=1.0, maxstep=0.2 Å, Nmin=5, finc=1.1, fdec=0.5,
astart=0.1, fa=0.99), with its own time step, mixing parameter and step counter; the norms in
the velocity mixing and the step-length cap are over the structure's own atoms. One model call
per step evaluates every active structure together.

Positions only: the cell is held fixed (use ``mlpot relax --cell`` without ``--batched`` for
cell relaxation).

Continuous batching: structures wait in a queue; the active batch holds at most
``max_atoms`` atoms. A structure leaves the batch when it converges (``max_i |F_i| < fmax``)
or reaches ``steps``; waiting structures take its place. Neighbour lists are built with
``r_max + skin`` and reused (filtered by length every step) until an atom of the batch has
moved more than ``skin / 2``, or the batch changes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from ase import Atoms

from mlpot.data.graph import graph_from_neighbor_list
from mlpot.data.neighbors import batched_neighbor_list, neighbor_list
from mlpot.errors import ConfigError, NonFiniteError

__all__ = ["batched_fire_relax", "BatchedRelaxResult"]


@dataclass
class BatchedRelaxResult:
    atoms: list[Atoms]
    e_initial: np.ndarray
    e_final: np.ndarray
    fmax: np.ndarray
    steps: np.ndarray
    converged: np.ndarray
    model_calls: int


class _Struct:
    __slots__ = ("idx", "pos", "vel", "numbers", "cell", "pbc", "dt", "a", "nmin", "steps", "e0",
                 "energy", "fmax", "converged", "forces")

    def __init__(self, idx, atoms, device, dtype, dt0, astart):
        self.idx = idx
        self.pos = torch.tensor(atoms.positions, dtype=dtype, device=device)
        self.vel = torch.zeros_like(self.pos)
        self.numbers = torch.tensor(atoms.numbers, dtype=torch.long, device=device)
        self.cell = torch.tensor(atoms.cell.array if atoms.pbc.any() else np.zeros((3, 3)), dtype=dtype,
                                 device=device)
        self.pbc = torch.tensor(np.asarray(atoms.pbc, dtype=bool), device=device)
        self.dt, self.a, self.nmin, self.steps = dt0, astart, 0, 0
        self.e0 = None
        self.energy = None
        self.fmax = np.inf
        self.converged = False
        self.forces = None


def _segment_sum(x, batch, B):
    return torch.zeros(B, dtype=x.dtype, device=x.device).index_add(0, batch, x)


def batched_fire_relax(
    model,
    atoms_list: list[Atoms],
    fmax: float = 0.01,
    steps: int = 500,
    max_atoms: int = 4096,
    skin: float = 0.5,
    dt: float = 0.1,
    dtmax: float = 1.0,
    maxstep: float = 0.2,
    Nmin: int = 5,
    finc: float = 1.1,
    fdec: float = 0.5,
    astart: float = 0.1,
    fa: float = 0.99,
    progress=None,
) -> BatchedRelaxResult:
    """Relax copies of ``atoms_list`` with per-structure FIRE (positions only).

    A non-finite energy or force of any structure stops the run with
    :class:`~mlpot.errors.NonFiniteError` naming the structure (never "converged")."""
    if not (fmax > 0 and np.isfinite(fmax)):
        raise ConfigError(f"fmax must be a finite number > 0, got {fmax}")
    p = next(model.parameters())
    device, dtype = p.device, p.dtype
    r_max = float(model.r_max)
    structs = [_Struct(k, a, device, dtype, dt, astart) for k, a in enumerate(atoms_list)]
    for s in structs:  # unknown elements fail before any work
        model.species_index(s.numbers)
    queue = list(range(len(structs)))[::-1]
    active: list[int] = []
    calls = 0
    nl = None

    def rebuild_nl(act):
        pos = torch.cat([structs[k].pos for k in act])
        counts = torch.tensor([len(structs[k].numbers) for k in act], device=device)
        batch = torch.repeat_interleave(torch.arange(len(act), device=device), counts)
        cells = torch.stack([structs[k].cell for k in act])
        pbcs = torch.stack([structs[k].pbc for k in act])
        if device.type == "cpu":  # vesin per structure is the fast CPU path
            ii, jj, SS, off = [], [], [], 0
            for k in act:
                s = structs[k]
                pbc = s.pbc.cpu().numpy()
                i, j, S = neighbor_list(s.pos.cpu().numpy(), r_max + skin,
                                        cell=s.cell.cpu().numpy() if pbc.any() else None, pbc=pbc)
                ii.append(i + off)
                jj.append(j + off)
                SS.append(S)
                off += len(s.numbers)
            i, j, S = torch.cat(ii), torch.cat(jj), torch.cat(SS)
        else:
            i, j, S = batched_neighbor_list(pos, r_max + skin, cells, pbcs, batch)
        return {"i": i.to(device), "j": j.to(device), "S": S.to(device=device, dtype=dtype),
                "ref": pos.clone(), "batch": batch, "cells": cells, "pbcs": pbcs, "counts": counts}

    while queue or active:
        # refill the batch
        changed = False
        n_act = sum(len(structs[k].numbers) for k in active)
        while queue and (not active or n_act + len(structs[queue[-1]].numbers) <= max_atoms):
            k = queue.pop()
            active.append(k)
            n_act += len(structs[k].numbers)
            changed = True
        pos = torch.cat([structs[k].pos for k in active])
        vel = torch.cat([structs[k].vel for k in active])
        if changed or nl is None:
            nl = rebuild_nl(active)
        else:
            moved = ((pos - nl["ref"]) ** 2).sum(-1).max()
            if float(moved) > (0.5 * skin) ** 2:
                nl = rebuild_nl(active)
        batch, cells, B = nl["batch"], nl["cells"], len(active)
        D = pos[nl["j"]] - pos[nl["i"]] + torch.einsum("ek,eka->ea", nl["S"], cells[batch[nl["i"]]])
        keep = (D * D).sum(-1) < r_max * r_max
        graph = graph_from_neighbor_list(
            pos, torch.cat([structs[k].numbers for k in active]), cells, nl["pbcs"],
            nl["i"][keep], nl["j"][keep], nl["S"][keep], nl["counts"],
        )
        out = model(graph, compute_force=True, compute_stress=False)
        calls += 1
        f = out["forces"].detach()
        energy = out["energy"].detach()
        bad = ~torch.isfinite(energy) | ~_segment_sum((~torch.isfinite(f)).any(-1).to(dtype), batch, B).eq(0)
        if bool(bad.any()):  # one host sync per step (the write-back below has several)
            which = [active[b] for b in torch.nonzero(bad)[:, 0].tolist()]
            raise NonFiniteError(f"structure(s) {which}: the model gave a non-finite energy or forces; stopping")
        fnorm2 = (f * f).sum(-1)
        fmax_b = torch.zeros(B, dtype=dtype, device=device).scatter_reduce(
            0, batch, fnorm2, reduce="amax", include_self=True).sqrt()
        # ---- FIRE update, per structure -------------------------------------------------
        dt_b = torch.tensor([structs[k].dt for k in active], dtype=dtype, device=device)
        a_b = torch.tensor([structs[k].a for k in active], dtype=dtype, device=device)
        nmin_b = torch.tensor([structs[k].nmin for k in active], device=device)
        first = torch.tensor([structs[k].steps == 0 for k in active], device=device)
        done = fmax_b < fmax
        vf = _segment_sum((f * vel).sum(-1), batch, B)
        vnorm = _segment_sum((vel * vel).sum(-1), batch, B).sqrt()
        fnorm = _segment_sum(fnorm2, batch, B).sqrt()
        uphill = (vf <= 0) & ~first
        mix = (~uphill)[batch, None]
        scale = (a_b * vnorm / fnorm.clamp(min=1e-300))[batch, None]
        mixed = (1 - a_b)[batch, None] * vel + scale * f
        vel = torch.where(mix & ~first[batch, None], mixed, vel)
        vel = torch.where(uphill[batch, None], torch.zeros_like(vel), vel)
        grow = (~uphill) & ~first & (nmin_b > Nmin)
        dt_b = torch.where(grow, torch.clamp(dt_b * finc, max=dtmax), dt_b)
        a_b = torch.where(grow, a_b * fa, a_b)
        nmin_b = torch.where(uphill, torch.zeros_like(nmin_b), torch.where(first, nmin_b, nmin_b + 1))
        a_b = torch.where(uphill, torch.full_like(a_b, astart), a_b)
        dt_b = torch.where(uphill, dt_b * fdec, dt_b)
        vel = vel + dt_b[batch, None] * f
        dr = dt_b[batch, None] * vel
        drnorm = _segment_sum((dr * dr).sum(-1), batch, B).sqrt()
        cap = torch.where(drnorm > maxstep, maxstep / drnorm.clamp(min=1e-300), torch.ones_like(drnorm))
        frozen = done[batch, None]
        pos = torch.where(frozen, pos, pos + dr * cap[batch, None])
        # ---- write back, retire converged / exhausted structures ----------------------------
        counts = nl["counts"].tolist()
        off = 0
        retire = []
        fmax_l, e_l, done_l = fmax_b.tolist(), energy.tolist(), done.tolist()
        dt_l, a_l, nmin_l = dt_b.tolist(), a_b.tolist(), nmin_b.tolist()
        for b, k in enumerate(active):
            s, n = structs[k], counts[b]
            if s.e0 is None:
                s.e0 = e_l[b]
            s.energy, s.fmax = e_l[b], fmax_l[b]
            if done_l[b] or s.steps >= steps:
                s.converged = bool(done_l[b])
                s.forces = f[off:off + n].cpu().numpy()
                retire.append(k)
            else:
                s.pos, s.vel = pos[off:off + n], vel[off:off + n]
                s.dt, s.a, s.nmin = dt_l[b], a_l[b], nmin_l[b]
                s.steps += 1
            off += n
        if retire:
            active = [k for k in active if k not in retire]
            nl = None
            if progress is not None:
                progress(len(retire))

    relaxed = []
    for s, a in zip(structs, atoms_list):
        new = a.copy()
        new.positions = s.pos.detach().cpu().double().numpy()
        from ase.calculators.singlepoint import SinglePointCalculator

        new.calc = SinglePointCalculator(new, energy=s.energy, forces=s.forces)
        relaxed.append(new)
    return BatchedRelaxResult(
        atoms=relaxed,
        e_initial=np.array([s.e0 for s in structs]),
        e_final=np.array([s.energy for s in structs]),
        fmax=np.array([s.fmax for s in structs]),
        steps=np.array([s.steps for s in structs]),
        converged=np.array([s.converged for s in structs]),
        model_calls=calls,
    )
