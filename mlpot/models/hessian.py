r"""The Hessian of the energy with respect to atomic positions, by autograd, and its layout.

For a structure of :math:`n` atoms the Hessian is the :math:`(3n, 3n)` matrix

.. math::

    H_{(i\alpha),(j\beta)} = \frac{\partial^2 E}{\partial r_{i\alpha}\,\partial r_{j\beta}}
    = -\frac{\partial F_{j\beta}}{\partial r_{i\alpha}},

row and column index ``3 i + alpha`` (atom-major, Cartesian-minor, the layout of ASE's
``Vibrations``), in eV/Å².

Layout of a batch. Structures in a batch do not interact, so the Hessian of a batch of
structures is block diagonal. A model's ``hessian`` output for a batch is that dense
``(3N, 3N)`` block-diagonal matrix (``N`` atoms in the batch; for one structure simply its
Hessian). Reference Hessians in a graph are stored flat, each structure's ``(3n_b, 3n_b)``
block flattened row-major and concatenated over the batch; :func:`hessian_block_index` maps
the dense matrix to that flat layout and :func:`split_hessian` cuts it into per-structure blocks.

:func:`autograd_hessian` differentiates the force a second time. Because the structures of
a batch are independent, row ``k`` of every structure is obtained in one backward pass of
:math:`\sum_b \partial E/\partial r_{(k)_b}`: the batch needs ``max_b 3 n_b`` backward passes,
not ``3N``.
"""
from __future__ import annotations

import torch

__all__ = ["HESSIAN_METHODS", "check_hessian_method", "autograd_hessian", "hessian_block_index", "split_hessian", "symmetrize"]


HESSIAN_METHODS = ("autograd", "direct")


def check_hessian_method(model, method: str) -> None:
    """``method`` is ``autograd`` or ``direct``, and ``direct`` needs a model with a HIP head."""
    from mlpot.errors import ConfigError

    if method not in HESSIAN_METHODS:
        raise ConfigError(f"unknown Hessian method {method!r}; choose one of {', '.join(HESSIAN_METHODS)}")
    if method == "direct" and getattr(model, "hessian_head", None) is None:
        raise ConfigError(
            f"Hessian method 'direct' needs a model built with `hessian_head: true`; this "
            f"{type(model).__name__} has no Hessian head (use method 'autograd')"
        )


def hessian_block_index(num_atoms: torch.Tensor) -> torch.Tensor:
    """Flat indices into a dense ``(3N, 3N)`` batch Hessian of each structure's diagonal block,
    row-major per structure, concatenated: length ``sum_b (3 n_b)^2``."""
    num_atoms = num_atoms.to(torch.long)
    total = 3 * int(num_atoms.sum())
    parts = []
    offset = 0
    for n in num_atoms.tolist():
        rows = torch.arange(offset, offset + 3 * n, device=num_atoms.device)
        parts.append((rows[:, None] * total + rows[None, :]).reshape(-1))
        offset += 3 * n
    if not parts:
        return torch.zeros(0, dtype=torch.long, device=num_atoms.device)
    return torch.cat(parts)


def split_hessian(hessian: torch.Tensor, num_atoms) -> list[torch.Tensor]:
    """Per-structure ``(3 n_b, 3 n_b)`` blocks of a dense batch Hessian ``(3N, 3N)``."""
    out, offset = [], 0
    for n in [int(x) for x in num_atoms]:
        out.append(hessian[offset : offset + 3 * n, offset : offset + 3 * n])
        offset += 3 * n
    return out


def symmetrize(hessian: torch.Tensor) -> torch.Tensor:
    """:math:`(H + H^T) / 2`."""
    return 0.5 * (hessian + hessian.transpose(-1, -2))


def autograd_hessian(
    gradient: torch.Tensor, positions: torch.Tensor, ptr: torch.Tensor, create_graph: bool = False
) -> torch.Tensor:
    r"""Dense block-diagonal batch Hessian ``(3N, 3N)`` from the energy gradient.

    Args:
        gradient: :math:`\partial E/\partial r` ``(N, 3)``, computed with ``create_graph=True``
            so that it can be differentiated again.
        positions: the leaf ``(N, 3)`` the gradient was taken with respect to.
        ptr: ``(B + 1,)`` atom offsets of the structures in the batch.
        create_graph: keep the graph of the Hessian (to train on it).

    Row ``3 i + alpha`` of structure ``b`` is :math:`\partial (\partial E/\partial r_{i\alpha})/\partial r`;
    rows of different structures are taken together in one backward pass (the structures do not
    interact). The result is symmetrized, which only removes the rounding of the two orders of
    differentiation.
    """
    n_total = positions.shape[0]
    counts = (ptr[1:] - ptr[:-1]).tolist()
    starts = ptr[:-1].tolist()
    flat = gradient.reshape(-1)
    hessian = positions.new_zeros(3 * n_total, 3 * n_total)
    rows = []
    for k in range(3 * max(counts, default=0)):
        picks = [3 * s + k for s, n in zip(starts, counts) if k < 3 * n]
        idx = torch.tensor(picks, dtype=torch.long, device=positions.device)
        target = flat[idx].sum()
        if not target.requires_grad:  # the gradient does not depend on positions: zero rows
            continue
        (g,) = torch.autograd.grad(target, positions, retain_graph=True, create_graph=create_graph,
                                   allow_unused=True)
        if g is None:
            continue
        g = g.reshape(-1)
        for s, n, p in zip(starts, counts, picks):
            rows.append((p, 3 * s, 3 * (s + n), g[3 * s : 3 * (s + n)]))
    if create_graph:
        # assemble without in-place writes into a tensor that needs grad
        index_r, index_c, values = [], [], []
        for p, lo, hi, v in rows:
            index_r.append(torch.full((hi - lo,), p, dtype=torch.long, device=positions.device))
            index_c.append(torch.arange(lo, hi, device=positions.device))
            values.append(v)
        if values:
            flat_idx = torch.cat(index_r) * (3 * n_total) + torch.cat(index_c)
            hessian = hessian.reshape(-1).index_put((flat_idx,), torch.cat(values)).reshape(3 * n_total, -1)
    else:
        for p, lo, hi, v in rows:
            hessian[p, lo:hi] = v.detach()
    return symmetrize(hessian)
