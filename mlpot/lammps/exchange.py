r"""Ghost-feature exchange between LAMMPS MPI ranks, as a differentiable map.

With domain decomposition each rank holds its local atoms ``0..nlocal-1`` and ghost atoms
``nlocal..ntotal-1`` (periodic images and atoms of neighbouring ranks). Let ``o(g)`` be the
atom that owns ghost ``g`` (on this or another rank). The forward map on node features
``h`` (``ntotal x F`` per rank) is

.. math:: (P h)_i = h_i \;(i \text{ local}), \qquad (P h)_g = h_{o(g)} \;(g \text{ ghost}),

which LAMMPS's ``forward_exchange(copy_from, copy_to, vec_len)`` computes (it copies every row,
then overwrites the ghost rows with their owners' rows, across ranks). Its adjoint is

.. math:: (P^\top \bar h)_i = \bar h_i + \sum_{g:\,o(g)=i} \bar h_g, \qquad (P^\top \bar h)_g = 0,

which is ``reverse_exchange`` (copy, add every ghost row into its owner's row across ranks,
zero the ghost rows). :class:`GhostExchange` is ``P`` with ``P^T`` as its backward, so the
gradients of every rank's energy reach the edges of the rank that owns the atom, and the
per-pair forces summed by LAMMPS are exact for any number of layers and any decomposition.

Both calls are collective (every rank must call them the same number of times, in the same
order): a rank without ghosts, pairs or even atoms still calls them, forward and backward.
``anchor`` (an empty tensor that requires grad) is an input of every exchange so that
autograd always runs its backward, even when a rank's energy does not depend on the edges.

LAMMPS versions: ``forward_exchange``/``reverse_exchange`` are methods of ``MLIAPDataPy`` in the
Kokkos build (``src/KOKKOS/mliap_unified_couple_kokkos.pyx``, forwarding to
``PairMLIAPKokkos::forward_comm``/``reverse_comm``) of LAMMPS develop since 2025; the 29 Aug 2024
stable release lacks them (mace-torch issues #986, #989). They take two C-contiguous torch
tensors (``data_ptr``) of the same dtype, float32 or float64, with ``ntotal`` rows. mace-torch
(PR #1331) reports correct results through them only with LAMMPS develop newer than
15 Dec 2025 (lammps PR #4808).
"""
from __future__ import annotations

import math

import torch

__all__ = ["GhostExchange", "between_layers_exchange", "has_exchange"]


def has_exchange(data) -> bool:
    """Whether this LAMMPS data object offers ``forward_exchange`` and ``reverse_exchange``."""
    return callable(getattr(data, "forward_exchange", None)) and callable(getattr(data, "reverse_exchange", None))


class GhostExchange(torch.autograd.Function):
    """``P h`` (ghost rows from their owners) forward, ``P^T`` (ghost rows summed into their
    owners, then zeroed) backward, through LAMMPS's exchange calls. ``h``: (ntotal, F)."""

    @staticmethod
    def forward(ctx, feats: torch.Tensor, anchor: torch.Tensor, data) -> torch.Tensor:
        ctx.data = data
        src = feats.detach().contiguous()
        out = torch.empty_like(src)
        data.forward_exchange(src, out, src.shape[1])
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        src = grad_out.contiguous()
        grad = torch.empty_like(src)
        ctx.data.reverse_exchange(src, grad, src.shape[1])
        return grad, None, None


def between_layers_exchange(data, anchor: torch.Tensor):
    """The ``between_layers`` hook of :meth:`PotentialModel.compute_node_energies` that refreshes
    the ghost rows of any (ntotal, ...) feature tensor from their owners."""

    def refresh(h: torch.Tensor) -> torch.Tensor:
        flat = h.reshape(h.shape[0], math.prod(h.shape[1:]))  # also for a rank with no atoms
        return GhostExchange.apply(flat, anchor, data).reshape(h.shape)

    return refresh
