r"""Real spherical harmonics in e3nn's basis with "component" normalization.

Math
----
Let :math:`(X, Y, Z) = (z, x, y)` be the input coordinates relabelled so that the polar
axis of the standard real spherical harmonics is e3nn's :math:`y` axis. With
:math:`r^2 = x^2 + y^2 + z^2` the degree-:math:`l` *solid* harmonics are the homogeneous
harmonic polynomials

.. math::

    S_l^0 = N_{l0} Q_l^0,\qquad
    S_l^{+m} = N_{lm} Q_l^m A_m,\qquad
    S_l^{-m} = N_{lm} Q_l^m B_m \quad (m = 1..l)

with :math:`A_m + i B_m = (X + i Y)^m` and :math:`Q_l^m(Z, r^2)` the associated Legendre
polynomial without the :math:`(1 - Z^2)^{m/2}` factor and without the Condon-Shortley phase:

.. math::

    Q_m^m = (2m-1)!!,\qquad
    Q_l^m = \frac{(2l-1) Z Q_{l-1}^m - (l+m-1) r^2 Q_{l-2}^m}{l-m}.

``component`` normalization (:math:`\sum_m (Y_l^m)^2 = 2l+1` on the unit sphere) gives
:math:`N_{l0} = \sqrt{2l+1}` and :math:`N_{lm} = \sqrt{2 (2l+1) (l-m)!/(l+m)!}`.
The normalisation is folded into the recurrence coefficients (they stay O(1) for any
:math:`l`), so the loop is ``P_l = a_l * Z * P_{l-1} - b_l * r^2 * P_{l-2}`` over ``l`` with
all ``m`` and all edges vectorised: one small dense step per ``l``, easy to port to a kernel.
The output for degree ``l`` is ordered ``m = -l..l`` (column ``l*l + l + m``), which is
exactly e3nn's ordering: ``Y_1 = sqrt(3) (x, y, z)/r``.

With ``normalize=True`` the input is first mapped to :math:`\hat v = v/|v|`; a zero-length
vector is mapped to :math:`\hat v = 0`, for which :math:`Y_0 = 1` and all :math:`Y_{l>0} = 0`
(the polynomials are homogeneous), with zero (finite) gradients. With ``normalize=False``
the output is the solid harmonic :math:`|v|^l Y_l(\hat v)`, as in e3nn.

All operations are polynomial in the coordinates, so gradients of every order are finite
for every direction, including along the coordinate axes.
"""
from __future__ import annotations

import math
from functools import cache

import torch

from mlpot.errors import DataError

__all__ = ["SphericalHarmonics", "sh_dim", "spherical_harmonics"]


def sh_dim(lmax: int) -> int:
    """Number of components of all degrees ``0..lmax``: ``(lmax + 1)**2``."""
    return (lmax + 1) ** 2


def _norm(l: int, m: int) -> float:
    # N_lm for component normalization (no Condon-Shortley phase)
    f = math.exp(math.lgamma(l - m + 1) - math.lgamma(l + m + 1))
    return math.sqrt((2 * l + 1) * f * (2.0 if m > 0 else 1.0))


@cache
def _coefficients(lmax: int):
    """Recurrence coefficients with the normalisation folded in.

    ``P_l^m = N_lm Q_l^m``; returns, for each l >= 1, vectors ``a_l`` (length l) and ``b_l``
    (length l, zero where the l-2 term does not exist) for ``m = 0..l-1`` and the constant
    ``P_l^l = N_ll (2l-1)!!``.
    """
    a, b, diag = [None], [None], [1.0]
    for l in range(1, lmax + 1):
        al, bl = [], []
        for m in range(l):
            # P_l^m = (2l-1)/(l-m) N_lm/N_{l-1,m} Z P_{l-1}^m - (l+m-1)/(l-m) N_lm/N_{l-2,m} r^2 P_{l-2}^m
            al.append((2 * l - 1) / (l - m) * _norm(l, m) / _norm(l - 1, m))
            bl.append((l + m - 1) / (l - m) * _norm(l, m) / _norm(l - 2, m) if l - 2 >= m else 0.0)
        a.append(al)
        b.append(bl)
        # N_ll (2l-1)!! computed in log space to stay finite for large l
        log_dfact = sum(math.log(2 * k - 1) for k in range(1, l + 1))
        log_n = 0.5 * (math.log(2 * (2 * l + 1)) - math.lgamma(2 * l + 1))
        diag.append(math.exp(log_n + log_dfact))
    return a, b, diag


def _safe_normalize(vectors: torch.Tensor) -> torch.Tensor:
    r2 = (vectors * vectors).sum(-1, keepdim=True)
    nonzero = r2 > 0
    r = torch.sqrt(torch.where(nonzero, r2, torch.ones_like(r2)))
    return torch.where(nonzero, vectors / r, torch.zeros_like(vectors))


def spherical_harmonics(lmax: int, vectors: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    r"""Real spherical harmonics :math:`Y_l^m(v)` for ``l = 0..lmax``, e3nn basis, component norm.

    Args:
        lmax: largest degree (any non-negative integer).
        vectors: ``(..., 3)`` float tensor.
        normalize: project onto the unit sphere first (zero vector -> ``[1, 0, 0, ...]``).

    Returns:
        ``(..., (lmax+1)**2)`` tensor; degree ``l`` occupies columns ``l*l : (l+1)**2``
        ordered ``m = -l..l``. Equals ``e3nn.o3.spherical_harmonics(range(lmax+1), vectors,
        normalize, normalization="component")``.
    """
    if not isinstance(lmax, int) or lmax < 0:
        raise DataError(f"spherical_harmonics: lmax must be a non-negative int, got {lmax!r}")
    if not torch.is_tensor(vectors) or vectors.shape[-1:] != (3,):
        shape = tuple(vectors.shape) if torch.is_tensor(vectors) else type(vectors).__name__
        raise DataError(f"spherical_harmonics: vectors must have shape (..., 3), got {shape}")
    if not vectors.is_floating_point():
        raise DataError(f"spherical_harmonics: vectors must be floating point, got {vectors.dtype}")
    if normalize:
        vectors = _safe_normalize(vectors)
    x, y, z = vectors.unbind(-1)
    X, Y, Z = z, x, y  # polar axis Z = e3nn's y
    r2 = x * x + y * y + z * z
    ones = torch.ones_like(x)
    out = [ones.unsqueeze(-1)]
    if lmax == 0:
        return out[0]
    a, b, diag = _coefficients(lmax)
    # A_m + i B_m = (X + iY)^m, m = 0..lmax, stacked as (..., lmax+1)
    A, B = [ones], [torch.zeros_like(x)]
    for _ in range(lmax):
        A_prev, B_prev = A[-1], B[-1]
        A.append(X * A_prev - Y * B_prev)
        B.append(X * B_prev + Y * A_prev)
    A = torch.stack(A, -1)
    B = torch.stack(B, -1)
    Zc = Z.unsqueeze(-1)
    r2c = r2.unsqueeze(-1)
    P_prev2 = None  # P_{l-2}^m, m = 0..l-2
    P_prev = ones.unsqueeze(-1)  # P_0^0 = 1
    for l in range(1, lmax + 1):
        al = torch.tensor(a[l], dtype=x.dtype, device=x.device)
        P = al * Zc * P_prev  # m = 0..l-1
        if l >= 2:
            bl = torch.tensor(b[l][: l - 1], dtype=x.dtype, device=x.device)
            P = torch.cat([P[..., : l - 1] - bl * r2c * P_prev2, P[..., l - 1 :]], -1)
        P = torch.cat([P, torch.full_like(P[..., :1], diag[l])], -1)  # m = 0..l
        neg = (P[..., 1:] * B[..., 1 : l + 1]).flip(-1)  # m = -l..-1
        pos = P[..., 1:] * A[..., 1 : l + 1]  # m = 1..l
        out.append(torch.cat([neg, P[..., :1], pos], -1))
        P_prev2, P_prev = P_prev, P
    return torch.cat(out, -1)


class SphericalHarmonics(torch.nn.Module):
    """Module form of :func:`spherical_harmonics`: ``forward(vectors) -> (..., (lmax+1)**2)``."""

    def __init__(self, lmax: int, normalize: bool = True):
        super().__init__()
        if not isinstance(lmax, int) or lmax < 0:
            raise DataError(f"SphericalHarmonics: lmax must be a non-negative int, got {lmax!r}")
        self.lmax = lmax
        self.normalize = normalize
        self.dim = sh_dim(lmax)

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        return spherical_harmonics(self.lmax, vectors, self.normalize)

    def extra_repr(self) -> str:
        return f"lmax={self.lmax}, normalize={self.normalize}"
