"""The singular-cell test, shared by every reader and neighbour-list path.

A cell with periodic boundary conditions along the rows ``a_k`` (``k`` periodic) is singular
when those rows do not span a ``k``-dimensional lattice. The test uses the singular values
``s_1 >= ... >= s_k`` of the periodic rows (a ``k x 3`` matrix) relative to the cell size
``L = max_k |a_k|``:

    singular  <=>  s_k <= rtol * L   (or any entry is NaN / inf),

with ``rtol = max(1e-8, 100 eps)`` of the dtype. Unlike a determinant threshold this is
scale-free in each direction separately: a cell with two identical rows has ``s_k`` at
round-off level (``~eps * L``) whatever the other rows, while a very flat but genuine cell
(``s_k / L`` of 1e-6) is accepted.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["singular_cells", "is_singular_cell"]


def singular_cells(cells, pbcs) -> torch.Tensor:
    """``(B,)`` bool: which of the cells ``(B, 3, 3)`` (rows = lattice vectors) are singular
    along their periodic directions ``pbcs`` ``(B, 3)``. Cells without a periodic direction
    are never singular. Works on CPU and CUDA tensors and on numpy arrays."""
    cells = torch.as_tensor(cells)
    if not cells.is_floating_point():
        cells = cells.double()
    pbcs = torch.as_tensor(pbcs, device=cells.device).bool()
    if cells.ndim == 2:
        cells = cells[None]
    if pbcs.ndim == 1:
        pbcs = pbcs[None].expand(cells.shape[0], 3)
    rows = cells * pbcs[..., None].to(cells.dtype)
    finite = torch.isfinite(rows).all(-1).all(-1)
    rows = torch.where(finite[:, None, None], rows, torch.zeros_like(rows))
    k = pbcs.sum(-1)  # number of periodic directions
    s = torch.linalg.svdvals(rows)  # (B, 3), descending; non-periodic rows give zeros
    s_k = torch.gather(s, 1, (k - 1).clamp(min=0)[:, None])[:, 0]
    size = rows.norm(dim=-1).amax(-1)
    rtol = max(1e-8, 100 * torch.finfo(cells.dtype).eps)
    singular = ~(s_k > rtol * size) | ~finite
    return singular & (k > 0)


def is_singular_cell(cell, pbc) -> bool:
    """:func:`singular_cells` for one cell ``(3, 3)`` and its pbc (bool or 3 bools)."""
    pbc3 = np.broadcast_to(np.asarray(pbc, dtype=bool), (3,))
    if not pbc3.any():
        return False
    return bool(singular_cells(np.asarray(cell, dtype=np.float64)[None], pbc3[None].copy())[0])
