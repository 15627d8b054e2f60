r"""Harmonic vibrational analysis of a Hessian, with ASE's :class:`ase.vibrations.VibrationsData`.

For a Hessian :math:`H` (eV/Å², ``(3n, 3n)``, row ``3 i + alpha``) and masses :math:`m_i`, the
normal modes diagonalise the mass-weighted Hessian :math:`M^{-1/2} H M^{-1/2}`; an eigenvalue
:math:`\lambda_k` gives the angular frequency :math:`\omega_k = \sqrt{\lambda_k}` (imaginary for
:math:`\lambda_k < 0`), reported in cm⁻¹, and the zero-point energy is
:math:`\tfrac12 \sum_k \hbar\omega_k` over the real modes (eV). ASE does all of this; this module
only adapts mlpot's Hessians to it and drops the rigid-body modes when asked.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["HarmonicModes", "harmonic_modes", "rigid_body_mode_count"]


@dataclass
class HarmonicModes:
    """Frequencies (cm⁻¹, complex: an imaginary mode has a zero real part) and zero-point energy (eV)."""

    frequencies_cm: np.ndarray
    zero_point_energy: float


def rigid_body_mode_count(atoms) -> int:
    """Translations and rotations that leave the energy unchanged: 3 in a periodic cell, 5 for a
    linear molecule, 6 for any other molecule (0, 3 for one atom)."""
    n = len(atoms)
    if bool(np.asarray(atoms.pbc).any()):
        return 3
    if n == 1:
        return 3
    pos = atoms.positions - atoms.positions.mean(0)
    linear = np.linalg.matrix_rank(pos, tol=1e-3) <= 1
    return 5 if linear else 6


def harmonic_modes(atoms, hessian: np.ndarray, drop_rigid: bool = True) -> HarmonicModes:
    """Harmonic frequencies and zero-point energy of ``atoms`` from its Hessian (eV/Å²).

    ``drop_rigid``: leave out the :func:`rigid_body_mode_count` modes closest to zero frequency
    (translations and rotations), as a frequency calculation reports them; the zero-point
    energy is over the remaining real modes.
    """
    from ase.vibrations import VibrationsData

    data = VibrationsData.from_2d(atoms, np.asarray(hessian, dtype=np.float64))
    freqs = np.asarray(data.get_frequencies(), dtype=complex)
    energies = np.asarray(data.get_energies(), dtype=complex)
    if drop_rigid:
        keep = np.sort(np.argsort(np.abs(freqs))[rigid_body_mode_count(atoms):])
        freqs, energies = freqs[keep], energies[keep]
    real = np.abs(energies.imag) < 1e-12
    zpe = 0.5 * float(np.sum(energies.real[real]))
    return HarmonicModes(frequencies_cm=freqs, zero_point_energy=zpe)
