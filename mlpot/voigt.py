r"""Stress in Voigt notation: the one conversion between a symmetric 3x3 tensor and its 6-vector.

mlpot keeps stress (and virials) as full 3x3 tensors inside graphs and models, and uses the
6-vector only at its boundaries (the ASE calculator, ``predict``, readers, the HDF5 format),
always in ASE's order and sign:

.. math::  \sigma_{\text{Voigt}} = (\sigma_{xx}, \sigma_{yy}, \sigma_{zz},
           \sigma_{yz}, \sigma_{xz}, \sigma_{xy}),
           \qquad \sigma = \frac{1}{V}\frac{\partial E}{\partial \varepsilon}.

The conversions are ASE's own (:mod:`ase.stress`), which reads an off-diagonal entry as the
mean of the two symmetric entries (``(s_yz + s_zy) / 2``), extended to any leading batch shape.
VASP-style files (vasprun, mlearn ``virial_stress``) list the off-diagonals as
``xy, yz, zx`` instead; :func:`vasp_order_to_voigt` reorders those.
"""
from __future__ import annotations

import numpy as np
from ase.stress import full_3x3_to_voigt_6_stress, voigt_6_to_full_3x3_stress

from mlpot.errors import DataError

__all__ = ["as_full_3x3", "as_voigt", "full_3x3_to_voigt", "vasp_order_to_voigt", "voigt_to_full_3x3"]

# position in the Voigt 6-vector of xx yy zz yz xz xy, for a vector ordered xx yy zz xy yz zx
_VASP_TO_VOIGT = [0, 1, 2, 4, 5, 3]


def full_3x3_to_voigt(stress) -> np.ndarray:
    """(..., 3, 3) -> (..., 6) in the order xx, yy, zz, yz, xz, xy."""
    s = np.asarray(stress, dtype=float)
    if s.shape[-2:] != (3, 3):
        raise ValueError(f"expected a (..., 3, 3) stress, got shape {s.shape}")
    return full_3x3_to_voigt_6_stress(s.reshape(-1, 3, 3)).reshape(*s.shape[:-2], 6)


def voigt_to_full_3x3(voigt) -> np.ndarray:
    """(..., 6) in the order xx, yy, zz, yz, xz, xy -> symmetric (..., 3, 3)."""
    v = np.asarray(voigt, dtype=float)
    if v.shape[-1:] != (6,):
        raise ValueError(f"expected a (..., 6) Voigt stress, got shape {v.shape}")
    full = voigt_6_to_full_3x3_stress(v.reshape(-1, 6))  # (B, 3, 3), symmetric
    return np.asarray(full).reshape(*v.shape[:-1], 3, 3)


def as_full_3x3(x) -> np.ndarray:
    """One stress or virial given as 6 (Voigt), 9 or 3x3 numbers -> (3, 3).

    Raises :class:`~mlpot.errors.DataError` for any other number of components.
    """
    x = np.asarray(x, dtype=float)
    if x.shape == (3, 3):
        return x
    if x.size == 9:
        return x.reshape(3, 3)
    if x.size == 6:
        return voigt_to_full_3x3(x.reshape(6))
    raise DataError(f"stress/virial must have 6 (Voigt) or 9 components, got shape {x.shape}")


def as_voigt(x) -> np.ndarray:
    """One stress given as 6 (Voigt), 9 or 3x3 numbers -> (6,) Voigt (see :func:`as_full_3x3`)."""
    return full_3x3_to_voigt(as_full_3x3(x))


def vasp_order_to_voigt(x) -> np.ndarray:
    """(..., 6) ordered xx, yy, zz, xy, yz, zx (VASP) -> (..., 6) ordered xx, yy, zz, yz, xz, xy.

    Only the order changes; sign and units are the caller's.
    """
    return np.asarray(x, dtype=float)[..., _VASP_TO_VOIGT]
