r"""Reference Hessians in data: keys, layout, checks and finite-difference labels.

A Hessian target of a structure of ``n`` atoms is the :math:`(3n, 3n)` matrix
:math:`H_{(i\alpha),(j\beta)} = \partial^2 E / \partial r_{i\alpha} \partial r_{j\beta}` in eV/Å²
(row ``3 i + alpha``, ASE's ``Vibrations`` layout), stored by the readers in
``atoms.calc.results["hessian"]``. Sources:

* extxyz: ``info["REF_hessian"]`` (or ``info["hessian"]``), flattened row-major, ``9 n^2`` numbers;
* npz (rMD17 style): key ``hessians``, ``(F, 3n, 3n)`` (or flattened per frame);
* HDF5 (:mod:`mlpot.data.hdf5`): dataset ``hessian``.

Units convert like forces, one more length: ``energy_unit / length_unit**2``.

A Hessian is symmetric. Finite-difference labels are so only up to their truncation error, so
an asymmetry :math:`\max|H - H^T| \le` :data:`ASYMMETRY_TOL` :math:`\cdot \max(1, \max|H|)` is
accepted and removed (:math:`(H + H^T)/2`); a larger one, a wrong shape or a NaN is a
:class:`~mlpot.errors.DataError` naming the file and frame.

:func:`finite_difference_hessian` labels a structure from any ASE calculator by central
differences of its forces, :math:`H_{(i\alpha),\cdot} = -(F(r + h e_{i\alpha}) - F(r - h e_{i\alpha})) / 2h`.
"""
from __future__ import annotations

import numpy as np

from mlpot.errors import DataError

__all__ = ["ASYMMETRY_TOL", "HESSIAN_KEYS", "as_hessian_matrix", "finite_difference_hessian"]

HESSIAN_KEYS = ("REF_hessian", "hessian")
ASYMMETRY_TOL = 1e-3


def as_hessian_matrix(value, num_atoms: int, where: str) -> np.ndarray:
    """``value`` (``9 n^2`` numbers or ``(3n, 3n)``) as a checked, symmetrized ``(3n, 3n)`` float64 array."""
    try:
        h = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{where}: Hessian is not numeric ({exc})") from None
    m = 3 * int(num_atoms)
    if h.size != m * m or h.ndim not in (1, 2) or (h.ndim == 2 and h.shape != (m, m)):
        raise DataError(
            f"{where}: Hessian shape {tuple(h.shape)} does not match {num_atoms} atoms "
            f"(expected ({m}, {m}) or {m * m} flattened values)"
        )
    h = h.reshape(m, m)
    if not np.all(np.isfinite(h)):
        raise DataError(f"{where}: non-finite (NaN/inf) Hessian")
    scale = max(1.0, float(np.abs(h).max(initial=0.0)))
    asym = float(np.abs(h - h.T).max(initial=0.0))
    if asym > ASYMMETRY_TOL * scale:
        raise DataError(
            f"{where}: Hessian is not symmetric (max |H - H^T| = {asym:.3g} > {ASYMMETRY_TOL:g} x {scale:.3g})"
        )
    return 0.5 * (h + h.T)


def finite_difference_hessian(atoms, calc=None, delta: float = 1e-3) -> np.ndarray:
    """``(3n, 3n)`` Hessian of ``atoms`` (eV/Å²) by central differences of the forces of ``calc``
    (default: ``atoms.calc``), step ``delta`` Å; symmetrized. ``atoms`` is left unchanged."""
    work = atoms.copy()
    work.calc = calc if calc is not None else atoms.calc
    if work.calc is None:
        raise DataError("finite_difference_hessian needs a calculator")
    n = len(work)
    h = np.zeros((3 * n, 3 * n))
    base = work.positions.copy()
    for i in range(n):
        for a in range(3):
            pos = base.copy()
            pos[i, a] += delta
            work.positions = pos
            f_plus = work.get_forces().reshape(-1)
            pos[i, a] -= 2 * delta
            work.positions = pos
            f_minus = work.get_forces().reshape(-1)
            h[3 * i + a] = -(f_plus - f_minus) / (2 * delta)
    return 0.5 * (h + h.T)
