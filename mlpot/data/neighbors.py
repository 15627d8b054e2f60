"""Neighbor lists under periodic boundary conditions.

Contract (the same as ASE and matscipy): for every returned pair ``(i, j, S)``

    D = pos[j] - pos[i] + S @ cell,        |D| < cutoff,

with ``S`` an integer vector (``int64``, zero along non-periodic directions). Every such pair
is returned exactly once (a *full* list: ``(j, i, -S)`` is also there). The pair ``(i, i, 0)``
is never returned; ``(i, i, S != 0)`` is, when an atom sees its own periodic image.

Two implementations sit behind :func:`neighbor_list`:

* a linear-time **cell list written in torch** (CPU and CUDA, batched over many structures,
  see :func:`batched_neighbor_list`), and
* **vesin** (C++), used on CPU by default because it is faster there; the torch path is the
  fallback and the CUDA path.

Cell-list algorithm (torch path), per structure:

1. Build a basis ``M``: the periodic rows of ``cell``, completed by orthonormal vectors
   perpendicular to the periodic span for the non-periodic directions (the lattice vectors
   given for non-periodic directions do not matter, as with ASE).
2. Fractional coordinates ``f = pos @ M^-1``; periodic directions are wrapped into
   ``[0, 1)`` (``w = floor(f)``); non-periodic ones are scaled to the atoms' extent.
3. Direction ``k`` is cut into ``n_k`` bins whose thickness perpendicular to the bin faces is
   at least ``cutoff / s`` (``s = bins_per_cutoff``). Two atoms closer than ``cutoff``
   differ by at most ``m_k = ceil(cutoff * n_k * |b_k|)`` bins along ``k`` (``b_k`` the
   reciprocal vector), so searching offsets ``-m_k..m_k`` is exact. When a periodic
   direction is thinner than the cutoff, ``n_k = 1`` and ``m_k > 1``: the stencil then
   walks over several periodic images.
4. A bin index ``t`` outside ``[0, n_k)`` along a periodic direction is the image
   ``t // n_k`` of bin ``t mod n_k``; along a non-periodic direction it is skipped.
5. Candidate pairs are filtered by the exact distance, computed from the unwrapped input
   positions with ``S = shift + w_i - w_j``.

The number of bins is capped at a few per atom, so sparse systems (molecules in a large
box, isolated atoms) stay linear in memory.

Host synchronisation on CUDA: output sizes are data dependent, so the torch path reads six
scalars back to the host (total bin count, stencil size, number of (atom, bin) rows, number
of candidate pairs, and the sizes of two boolean masks). With ``check=True`` there are three
more (the non-finite-position, singular-cell and image-count guards). No tensor data are
copied to the host.

Guards (``check=True``, on every path): non-finite positions or cell (a NaN atom would
silently fall out of every bin), singular periodic cells (:mod:`mlpot.data.cell`), cells
needing more than :data:`MAX_STENCIL_CELLS` images, and absurd pair counts: on CPU the
expected count ``N rho 4/3 pi r^3`` is checked against :data:`MAX_PAIRS` and
:data:`MAX_NEIGHBORS` before anything is allocated; on CUDA the candidate count is (8x the
same limits). vesin crashes (SIGFPE) when the atoms span ~1e5 cutoffs along a non-periodic
direction, so ``backend="auto"`` uses the torch cell list beyond :data:`VESIN_MAX_CELLS`.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from mlpot.data.cell import is_singular_cell, singular_cells
from mlpot.errors import DataError

__all__ = ["MAX_NEIGHBORS", "MAX_PAIRS", "MAX_STENCIL_CELLS", "batched_neighbor_list", "neighbor_list"]

#: Guard on the number of bins searched per atom (periodic images included). A cell far
#: thinner than the cutoff would otherwise ask for an absurd number of images.
MAX_STENCIL_CELLS = 1_000_000

#: Guard on the estimated number of pairs of one structure (``N * rho * 4/3 pi r^3``): about
#: 40 bytes each in the list alone, and more in every graph built from it.
MAX_PAIRS = 100_000_000

#: Guard on the estimated average number of neighbours per atom (a 30 Å cutoff in a metal
#: gives about 10^4).
MAX_NEIGHBORS = 20_000

#: vesin bins the atoms' bounding box in cells of the cutoff's size; beyond this many cutoffs
#: along a non-periodic direction it crashes (SIGFPE), so the torch cell list takes over.
VESIN_MAX_CELLS = 1e4


def _as_bool3(pbc, batch_shape=None) -> np.ndarray:
    arr = np.asarray(pbc, dtype=bool)
    if arr.ndim == 0:
        arr = np.full(3, bool(arr))
    if arr.shape[-1] != 3:
        raise DataError(f"pbc must be a bool or 3 bools, got shape {arr.shape}")
    return arr


def _vesin_available() -> bool:
    try:
        import vesin  # noqa: F401
    except ImportError:  # pragma: no cover - optional dependency
        return False
    return True


def neighbor_list(
    positions,
    cutoff: float,
    cell=None,
    pbc=None,
    *,
    backend: str = "auto",
    bins_per_cutoff: int = 2,
    check: bool = True,
    sort: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All pairs closer than ``cutoff``: ``(i, j, S)`` with ``D = pos[j] - pos[i] + S @ cell``.

    Parameters
    ----------
    positions:
        ``(N, 3)`` numpy array or torch tensor (Å), or an ``ase.Atoms`` (then ``cell`` and
        ``pbc`` default to the atoms' own). Atoms may lie outside the cell.
    cutoff:
        radius in Å (pairs with ``|D| < cutoff`` are kept). It may exceed the cell size:
        periodic images of the atom itself and of the others are then found.
    cell:
        ``(3, 3)``, rows are lattice vectors. ``None`` means no cell (non-periodic).
    pbc:
        bool or 3 bools; ``None`` means periodic in all directions when ``cell`` is given
        and non-periodic otherwise.
    backend:
        ``"auto"`` (vesin for CPU inputs when installed, torch otherwise), ``"torch"`` or
        ``"vesin"``.

    Returns
    -------
    ``i`` (E,) int64, ``j`` (E,) int64, ``S`` (E, 3) int64, on the device of the input
    (CPU for numpy input). The torch path returns pairs sorted by ``i``; vesin returns its
    own order unless ``sort=True`` (sorting costs about as much as building the list).
    """
    try:
        from ase import Atoms
    except ImportError:  # pragma: no cover
        Atoms = ()
    if isinstance(positions, Atoms):
        atoms = positions
        positions = atoms.get_positions()
        if cell is None:
            cell = atoms.cell.array
        if pbc is None:
            pbc = atoms.pbc
    if isinstance(positions, torch.Tensor):
        device = positions.device
        pos_t = positions.detach()
        if not pos_t.is_floating_point():
            pos_t = pos_t.double()
    else:
        device = torch.device("cpu")
        pos_t = torch.as_tensor(np.asarray(positions, dtype=np.float64))
    if pos_t.ndim != 2 or pos_t.shape[-1] != 3:
        raise DataError(f"positions must have shape (N, 3), got {tuple(pos_t.shape)}")
    if pbc is None:
        pbc = cell is not None
    pbc3 = _as_bool3(pbc)
    if cell is None:
        cell_t = torch.zeros(3, 3, dtype=pos_t.dtype, device=device)
    else:
        cell_t = torch.as_tensor(
            cell.detach() if isinstance(cell, torch.Tensor) else np.asarray(cell, dtype=np.float64),
            device=device,
        ).to(pos_t.dtype)
        if cell_t.shape != (3, 3):
            raise DataError(f"cell must have shape (3, 3), got {tuple(cell_t.shape)}")

    if backend not in ("auto", "torch", "vesin"):
        raise ValueError(f"unknown neighbor-list backend {backend!r}")
    use_vesin = backend == "vesin" or (
        backend == "auto" and device.type == "cpu" and _vesin_available()
    )
    if check:
        _check_finite(pos_t, cell_t if pbc3.any() else None)
        if not (float(cutoff) > 0 and math.isfinite(float(cutoff))):
            raise DataError(f"cutoff must be positive and finite, got {cutoff}")
        if device.type == "cpu":  # on CUDA the cell list runs its own guards, on the device
            cell_np = cell_t.numpy().astype(np.float64)
            _check_cell_np(cell_np, pbc3, float(cutoff))
            _check_images_np(cell_np, pbc3, float(cutoff))
            _check_pairs(pos_t, float(cutoff), cell_t, pbc3)
    if use_vesin and backend == "auto" and not _vesin_safe(pos_t, float(cutoff), cell_t, pbc3):
        use_vesin = False  # extents vesin cannot bin: the torch cell list caps its bins per atom
    if use_vesin:
        if not _vesin_safe(pos_t, float(cutoff), cell_t, pbc3):
            raise DataError(
                f"atoms span {_span(pos_t):.3g} Å, over {VESIN_MAX_CELLS:.0e} cutoffs of {cutoff} Å along a "
                "non-periodic direction: vesin cannot bin that; use backend='torch'"
            )
        return _vesin_neighbor_list(pos_t, float(cutoff), cell_t, pbc3, check=check, sort=sort)

    n = pos_t.shape[0]
    batch = torch.zeros(n, dtype=torch.long, device=device)
    return batched_neighbor_list(
        pos_t,
        cutoff,
        cell_t[None],
        torch.as_tensor(pbc3, device=device)[None],
        batch,
        bins_per_cutoff=bins_per_cutoff,
        check=check,
    )


def _check_cell_np(cell: np.ndarray, pbc: np.ndarray, cutoff: float) -> None:
    """Singular-cell guard for one structure (numpy, host)."""
    if is_singular_cell(cell, pbc):
        raise DataError(
            f"singular cell with periodic boundary conditions: cell={cell.tolist()}, pbc={pbc.tolist()}"
        )


def _check_images_np(cell: np.ndarray, pbc: np.ndarray, cutoff: float) -> None:
    """Refuse a cell so much thinner than the cutoff that it needs absurdly many images."""
    if not pbc.any():
        return
    box = cell if pbc.all() else _complete_basis_np(cell, pbc)
    recip = np.linalg.inv(box)  # columns are reciprocal vectors b_k
    m = np.where(pbc, np.ceil(cutoff * np.linalg.norm(recip, axis=0)), 0)
    n_cells = float(np.prod(2 * m + 1))
    if n_cells > MAX_STENCIL_CELLS:
        raise DataError(
            f"cutoff {cutoff} Å needs {int(n_cells)} periodic images of a cell this small "
            f"(cell={cell.tolist()}); refusing (limit {MAX_STENCIL_CELLS}). Use a supercell."
        )


def _check_finite(pos: torch.Tensor, cell: torch.Tensor | None = None) -> None:
    """Non-finite positions or cells would drop atoms silently from a cell list: refuse them."""
    bad = ~torch.isfinite(pos).all(-1)
    if bool(bad.any()):  # host sync (guard)
        k = torch.nonzero(bad)[:5, 0].tolist()
        raise DataError(f"non-finite (NaN/inf) positions at atom(s) {k}; cannot build a neighbour list")
    if cell is not None and not bool(torch.isfinite(cell).all()):
        raise DataError(f"non-finite (NaN/inf) cell {cell.tolist()}; cannot build a neighbour list")


def _estimate_pairs(pos: np.ndarray, cutoff: float, cell: np.ndarray, pbc: np.ndarray) -> float:
    """Expected number of pairs ``N * rho * (4/3) pi r^3`` (``rho`` the density of the
    periodic cell, or of the atoms' bounding box padded by the cutoff along non-periodic
    directions), capped at ``N (N - 1)`` for a structure without periodic directions."""
    n = pos.shape[0]
    if n == 0:
        return 0.0
    box = _complete_basis_np(cell, pbc)
    lengths = np.where(pbc, 1.0, 0.0)
    vol = abs(float(np.linalg.det(box)))
    extent = np.ptp(pos @ np.linalg.pinv(box), axis=0) if vol > 0 else np.zeros(3)
    # non-periodic rows of `box` are unit vectors: their extent is a length in Å
    for k in range(3):
        if not pbc[k]:
            lengths[k] = extent[k] + 2.0 * cutoff
    vol = max(vol * float(np.prod(lengths)), 1e-300)
    est = n * (n / vol) * (4.0 / 3.0) * math.pi * cutoff**3
    if not pbc.any():
        est = min(est, float(n) * (n - 1))
    return est


def _vesin_neighbor_list(pos_t, cutoff, cell_t, pbc3, check=True, sort=False):
    """CPU path through vesin (numpy only: no torch kernels, which oversubscribe busy cores)."""
    from vesin import NeighborList

    pos = np.ascontiguousarray(pos_t.cpu().numpy(), dtype=np.float64)
    cell = np.ascontiguousarray(cell_t.cpu().numpy(), dtype=np.float64)
    if check:
        if cutoff <= 0 or not math.isfinite(cutoff):
            raise DataError(f"cutoff must be positive and finite, got {cutoff}")
        _check_cell_np(cell, pbc3, cutoff)
    if pos.shape[0] == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty.clone(), torch.zeros(0, 3, dtype=torch.long)
    # vesin never uses the box rows of non-periodic directions for shifts, but wants a
    # non-singular box: those rows are replaced by orthonormal completions.
    box = cell if pbc3.all() else _complete_basis_np(cell, pbc3)
    if check:
        _check_images_np(cell, pbc3, cutoff)
    # small systems: one thread (OpenMP start-up and spinning cost more than they save)
    n_threads = 1 if pos.shape[0] < 1000 else 0
    nl = NeighborList(cutoff=cutoff, full_list=True, sorted=sort, n_threads=n_threads)
    i, j, S = nl.compute(points=pos, box=box, periodic=[bool(p) for p in pbc3], quantities="ijS", copy=True)
    # i, j are uint64 (indices < 2^63, so the int64 view is exact); S is int32
    i = torch.from_numpy(np.asarray(i).view(np.int64))
    j = torch.from_numpy(np.asarray(j).view(np.int64))
    S = torch.from_numpy(np.asarray(S).astype(np.int64).reshape(-1, 3))
    return i, j, S


def _span(pos_t: torch.Tensor) -> float:
    if pos_t.shape[0] == 0:
        return 0.0
    return float((pos_t.amax(0) - pos_t.amin(0)).max())


def _vesin_safe(pos_t, cutoff, cell_t, pbc3) -> bool:
    """vesin bins the bounding box in cells of the cutoff's size; an extent of ~1e5 cutoffs
    (one atom 5e5 Å away) overflows its cell count and kills the process with SIGFPE."""
    if pbc3.all() or pos_t.shape[0] == 0:
        return True
    return _span(pos_t) / cutoff < VESIN_MAX_CELLS


def _check_pairs(pos_t, cutoff, cell_t, pbc3) -> None:
    est = _estimate_pairs(pos_t.cpu().numpy().astype(np.float64), cutoff,
                          cell_t.cpu().numpy().astype(np.float64), pbc3)
    n = max(pos_t.shape[0], 1)
    if est > MAX_PAIRS or est / n > MAX_NEIGHBORS:
        raise DataError(
            f"cutoff {cutoff} Å would give about {est:.3g} neighbour pairs for {pos_t.shape[0]} atoms "
            f"({est / n:.3g} per atom; limits {MAX_PAIRS:.0e} pairs, {MAX_NEIGHBORS} per atom); refusing. "
            "Use a smaller cutoff."
        )


def _complete_basis_np(cell: np.ndarray, pbc: np.ndarray) -> np.ndarray:
    """numpy version of :func:`_completed_basis` for one structure."""
    A = cell * pbc[:, None]
    _, vecs = np.linalg.eigh(A.T @ A)
    out = cell.copy()
    r = 0
    for k in range(3):
        if not pbc[k]:
            out[k] = vecs[:, r]
            r += 1
    return out


def _completed_basis(cells: torch.Tensor, pbcs: torch.Tensor) -> torch.Tensor:
    """Rows: periodic lattice vectors, and for non-periodic directions orthonormal vectors
    perpendicular to the periodic span (and to each other). Shape (B, 3, 3)."""
    dtype = cells.dtype
    A = cells * pbcs[..., None].to(dtype)
    gram = A.transpose(1, 2) @ A  # sum_k a_k a_k^T over periodic k
    # eigenvectors with zero eigenvalue span the complement of the periodic span; eigh sorts
    # ascending, so the first (3 - n_periodic) columns are the complement.
    _, vecs = torch.linalg.eigh(gram)
    nonper = ~pbcs
    rank = torch.cumsum(nonper.long(), dim=1) - 1  # index among non-periodic directions
    rank = rank.clamp(min=0)
    comp = torch.gather(vecs.transpose(1, 2), 1, rank[..., None].expand(-1, -1, 3))  # (B,3,3)
    return torch.where(nonper[..., None], comp, cells)


def batched_neighbor_list(
    positions: torch.Tensor,
    cutoff: float,
    cells: torch.Tensor,
    pbcs,
    batch: torch.Tensor,
    *,
    bins_per_cutoff: int = 2,
    check: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Neighbor lists of many structures at once (torch cell list, CPU or CUDA).

    ``positions`` (N, 3) are the concatenated atoms, ``batch`` (N,) the structure index of
    each atom, ``cells`` (B, 3, 3) and ``pbcs`` (B, 3) (or (3,) / bool, broadcast). Returns
    ``i, j, S`` over the concatenated atom indices, the contract of :func:`neighbor_list`
    per structure (pairs never cross structures), sorted by ``i``.
    """
    device = positions.device
    pos = positions.detach()
    if not pos.is_floating_point():
        pos = pos.double()
    dtype = pos.dtype
    cells = torch.as_tensor(cells, device=device).detach().to(dtype)
    if cells.ndim == 2:
        cells = cells[None]
    B = cells.shape[0]
    pbcs = torch.as_tensor(pbcs, device=device).bool()
    if pbcs.ndim == 0:
        pbcs = pbcs.expand(3)
    if pbcs.ndim == 1:
        pbcs = pbcs[None].expand(B, 3)
    batch = torch.as_tensor(batch, device=device).long()
    N = pos.shape[0]
    cutoff = float(cutoff)
    if check and not (cutoff > 0 and math.isfinite(cutoff)):
        raise DataError(f"cutoff must be positive and finite, got {cutoff}")
    empty = (
        torch.zeros(0, dtype=torch.long, device=device),
        torch.zeros(0, dtype=torch.long, device=device),
        torch.zeros(0, 3, dtype=torch.long, device=device),
    )
    if N == 0:
        return empty

    with torch.no_grad():
        basis = _completed_basis(cells, pbcs)  # (B, 3, 3)
        if check:
            _check_finite(pos)
            bad = singular_cells(cells, pbcs)
            if bool(bad.any()):  # host sync (guard)
                b = int(torch.nonzero(bad)[0, 0])
                raise DataError(
                    f"singular cell with periodic boundary conditions in structure {b}: "
                    f"cell={cells[b].tolist()}, pbc={pbcs[b].tolist()}"
                )
        inv = torch.linalg.inv(basis)  # columns are reciprocal vectors b_k
        recip_norm = inv.norm(dim=1)  # (B, 3) = |b_k|

        frac = torch.einsum("na,nak->nk", pos, inv[batch])  # (N, 3)
        pbc_a = pbcs[batch]
        wrap = torch.where(pbc_a, torch.floor(frac), torch.zeros_like(frac))
        frac = frac - wrap
        # periodic: frac in [0, 1) (guard rounding at 1.0); thickness h = 1/|b_k|
        # non-periodic: distance along the unit vector, shifted to start at 0
        big = torch.finfo(dtype).max
        fmin = torch.full((B, 3), big, dtype=dtype, device=device).scatter_reduce(
            0, batch[:, None].expand(-1, 3), frac, reduce="amin", include_self=True
        )
        fmax = torch.full((B, 3), -big, dtype=dtype, device=device).scatter_reduce(
            0, batch[:, None].expand(-1, 3), frac, reduce="amax", include_self=True
        )
        extent = (fmax - fmin).clamp(min=0)
        extent = torch.where(torch.isfinite(extent), extent, torch.zeros_like(extent))
        thickness = torch.where(pbcs, 1.0 / recip_norm, extent)  # (B, 3), Å
        s = float(bins_per_cutoff)
        nb = torch.floor(thickness * s / (cutoff * (1.0 + 1e-6))).clamp(min=1)
        # cap the number of bins at a few per atom (sparse systems stay linear)
        n_per = torch.bincount(batch, minlength=B).to(dtype)
        cap = 4.0 * n_per + 8.0
        total = nb.prod(-1)
        factor = torch.where(total > cap, (total / cap) ** (1.0 / 3.0), torch.ones_like(total))
        nb = torch.floor(nb / factor[:, None]).clamp(min=1)
        # stencil half-widths
        m = torch.ceil(cutoff * nb / thickness.clamp(min=1e-300))
        m = torch.where(pbcs, m, torch.minimum(m, nb - 1))
        m = torch.where(torch.isfinite(m), m, nb - 1)
        if check:
            n_cells = (2 * m + 1).prod(-1)
            if bool((n_cells > MAX_STENCIL_CELLS).any()):  # host sync (guard)
                b = int(torch.nonzero(n_cells > MAX_STENCIL_CELLS)[0, 0])
                raise DataError(
                    f"cutoff {cutoff} Å needs {int(n_cells[b])} bins/periodic images per atom in "
                    f"structure {b} (cell={cells[b].tolist()}); refusing (limit "
                    f"{MAX_STENCIL_CELLS}). Use a supercell."
                )
        nb = nb.long()
        m = m.long()

        # bin coordinates of every atom
        nb_a = nb[batch]
        scaled = torch.where(
            pbc_a, frac, (frac - fmin[batch]) / extent[batch].clamp(min=1e-300)
        )
        c = torch.floor(scaled * nb_a.to(dtype)).long()
        c = torch.minimum(torch.maximum(c, torch.zeros_like(c)), nb_a - 1)
        nbins = nb.prod(-1)  # (B,)
        bin_start = torch.cumsum(nbins, 0) - nbins
        lin = (c[:, 0] * nb_a[:, 1] + c[:, 1]) * nb_a[:, 2] + c[:, 2] + bin_start[batch]
        total_bins = int(nbins.sum())  # host sync 1
        order = torch.argsort(lin, stable=True)
        counts = torch.bincount(lin, minlength=total_bins)
        starts = torch.cumsum(counts, 0) - counts

        # stencil: per structure, the bin offsets o in [-m, m]^3 that can hold a neighbour.
        # Points in bins c and c + o differ by D = ds @ E with ds in ((o-1)/n, (o+1)/n), E the
        # rows spanning the scaled coordinates. Projecting on the centre direction u of o/n @ E
        # gives the lower bound |D| >= |o/n @ E| - sum_k |E_k . u| / n_k; offsets whose bound
        # reaches the cutoff are dropped (matters for small and skewed cells).
        E = basis * torch.where(pbcs, torch.ones_like(extent), extent)[..., None]  # (B, 3, 3)
        width = 2 * m + 1  # (B, 3)
        n_off = width.prod(-1)  # (B,)
        n_off_total = int(n_off.sum())  # host sync 2
        sb = torch.repeat_interleave(torch.arange(B, device=device), n_off, output_size=n_off_total)
        k = torch.arange(n_off_total, device=device) - (torch.cumsum(n_off, 0) - n_off)[sb]
        w_of = width[sb]
        o2 = k % w_of[:, 2]
        k = k // w_of[:, 2]
        o1 = k % w_of[:, 1]
        o0 = k // w_of[:, 1]
        soff = torch.stack([o0, o1, o2], dim=1) - m[sb]
        nbf = nb[sb].to(dtype)
        centre = torch.einsum("ok,oka->oa", soff.to(dtype) / nbf, E[sb])
        dist = centre.norm(dim=-1)
        u = centre / dist.clamp(min=1e-300)[:, None]
        slack = (torch.einsum("oka,oa->ok", E[sb], u).abs() / nbf).sum(-1)
        keep_off = (dist - slack < cutoff * (1.0 + 1e-9)) | (soff.abs().amax(-1) <= 1)
        keep_off &= (pbcs[sb] | (soff.abs() < nb[sb])).all(-1)
        soff, sb = soff[keep_off], sb[keep_off]
        n_off = torch.bincount(sb, minlength=B)
        off_start = torch.cumsum(n_off, 0) - n_off
        # (atom, offset) pairs
        n_off_a = n_off[batch]
        n_pairs = int(n_off_a.sum())  # host sync 3
        atom = torch.repeat_interleave(torch.arange(N, device=device), n_off_a, output_size=n_pairs)
        first = torch.cumsum(n_off_a, 0) - n_off_a
        k = torch.arange(n_pairs, device=device) - first[atom]
        b_of = batch[atom]
        off = soff[off_start[b_of] + k]
        t = c[atom] + off
        nbo = nb[b_of]
        shift = torch.div(t, nbo, rounding_mode="floor")
        tb = t - shift * nbo
        valid = (pbcs[b_of] | (shift == 0)).all(-1)
        atom, b_of, shift, tb, nbo = atom[valid], b_of[valid], shift[valid], tb[valid], nbo[valid]
        tlin = (tb[:, 0] * nbo[:, 1] + tb[:, 1]) * nbo[:, 2] + tb[:, 2] + bin_start[b_of]
        cnt = counts[tlin]
        n_cand = int(cnt.sum())  # host sync 4
        if n_cand == 0:
            return empty
        if check and n_cand > 8 * min(MAX_PAIRS, MAX_NEIGHBORS * N):
            raise DataError(
                f"cutoff {cutoff} Å gives {n_cand:.3g} candidate neighbour pairs for {N} atoms "
                f"(limits {MAX_PAIRS:.0e} pairs, {MAX_NEIGHBORS} per atom, times 8 for candidates); "
                "refusing. Use a smaller cutoff."
            )
        # per (atom, offset) row r: q_r = pw[i_r] - shift_r @ cell, so that for a candidate j
        # in the target bin D = pw[j] - q_r (pw: wrapped positions). Candidate-level work is
        # then two gathers, a subtraction and a compare; everything else runs on kept pairs.
        wl = wrap.long()
        if B == 1:  # plain matmuls, no per-row gather of the cell
            pw = pos - wrap @ cells[0]
            q = pw[atom] - shift.to(dtype) @ cells[0]
        else:
            pw = pos - torch.einsum("nk,nka->na", wrap, cells[batch])
            q = pw[atom] - torch.einsum("rk,rka->ra", shift.to(dtype), cells[b_of])
        pw_sorted = pw[order]
        row = torch.repeat_interleave(torch.arange(cnt.shape[0], device=device), cnt, output_size=n_cand)
        first_c = torch.cumsum(cnt, 0) - cnt
        idx = torch.arange(n_cand, device=device) + (starts[tlin] - first_c)[row]
        D = pw_sorted[idx] - q[row]
        keep = (D * D).sum(-1) < cutoff * cutoff
        row, idx = row[keep], idx[keep]  # host sync 5 (mask size)
        i = atom[row]
        j = order[idx]
        S = shift[row] + wl[i] - wl[j]
        not_self = ~((i == j) & (S == 0).all(-1))
        i, j, S = i[not_self], j[not_self], S[not_self]  # host sync 6
        # rows are generated in increasing i; the order is kept
    return i, j, S
