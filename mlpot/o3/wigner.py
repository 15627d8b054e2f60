r"""Wigner-D matrices of the real spherical harmonics, and per-edge frames.

Wigner-D
--------
For an orthogonal :math:`3\times 3` matrix :math:`R` the real spherical harmonics of
:mod:`mlpot.o3.spherical_harmonics` satisfy :math:`Y_l(R v) = D^l(R)\, Y_l(v)`. Fix points
:math:`p_1..p_N` on the sphere such that :math:`M_l = [Y_l(p_1), ..., Y_l(p_N)]`
(:math:`(2l+1)\times N`) has full row rank. Then :math:`M_l(R) = [Y_l(R p_k)]_k = D^l(R) M_l`,
so

.. math:: D^l(R) = M_l(R)\, M_l^{+},\qquad M_l^{+} = M_l^\top (M_l M_l^\top)^{-1},

exactly (up to rounding). :math:`D^l` is a degree-:math:`l` polynomial in the entries of
:math:`R`: smooth, batched, differentiable to any order. For an improper :math:`R`
(:math:`\det R = -1`) this gives :math:`(-1)^l D^l(R\det R)`, i.e. the representation
of the irrep :math:`(l, p=(-1)^l)`, exactly what the spherical harmonics carry. The basis is
e3nn's, so ``wigner_D(l, R) == e3nn.o3.Irrep(l, (-1)**l).D_from_matrix(R)``.

Euler angles follow e3nn: :math:`R(\alpha,\beta,\gamma) = R_y(\alpha) R_x(\beta) R_y(\gamma)`.

Edge frames
-----------
:func:`edge_rotation` returns, per edge, a proper rotation :math:`R_e` with
:math:`R_e \hat v_e = \hat y` (the **y axis**, e3nn's spherical-harmonic polar axis; in that
frame :math:`Y_l(\hat y)` is nonzero only at ``m = 0`` and rotations about ``y`` act on the
``(+m, -m)`` pairs as plane rotations, which is what makes the SO(2) convolution simple).
Construction: with :math:`c = \hat v\cdot\hat y`,

* :math:`c \ge 0`: the minimal rotation :math:`\hat v \to \hat y`,
  :math:`R = I + [k]_\times + [k]_\times^2/(1+c)`, :math:`k = \hat v\times\hat y`;
* :math:`c < 0`: the minimal rotation :math:`\hat v \to -\hat y` followed by the half turn
  :math:`\mathrm{diag}(1,-1,-1)` about ``x``.

Both branches are rational in :math:`\hat v` with denominators :math:`1 + |c| \ge 1`, so the
frame and all its derivatives are finite for every direction, including edges parallel or
anti-parallel to ``y`` (the branch switch at :math:`c = 0` only changes the arbitrary roll
about the edge, which equivariant consumers are invariant to). A zero vector gets the identity.
"""
from __future__ import annotations

import math
from functools import cache

import torch

from mlpot.errors import DataError
from mlpot.o3.spherical_harmonics import _safe_normalize, spherical_harmonics

__all__ = [
    "angles_to_matrix",
    "edge_rotation",
    "matrix_x",
    "matrix_y",
    "matrix_z",
    "random_rotation_about_y",
    "wigner_D",
    "wigner_D_blocks",
    "wigner_D_list",
]


# ----------------------------------------------------------------------------- angles
def matrix_x(angle: torch.Tensor) -> torch.Tensor:
    """Rotation by ``angle`` about the x axis, ``(..., 3, 3)``."""
    c, s = torch.cos(angle), torch.sin(angle)
    o, z = torch.ones_like(angle), torch.zeros_like(angle)
    return torch.stack([o, z, z, z, c, -s, z, s, c], -1).reshape(angle.shape + (3, 3))


def matrix_y(angle: torch.Tensor) -> torch.Tensor:
    """Rotation by ``angle`` about the y axis, ``(..., 3, 3)``."""
    c, s = torch.cos(angle), torch.sin(angle)
    o, z = torch.ones_like(angle), torch.zeros_like(angle)
    return torch.stack([c, z, s, z, o, z, -s, z, c], -1).reshape(angle.shape + (3, 3))


def matrix_z(angle: torch.Tensor) -> torch.Tensor:
    """Rotation by ``angle`` about the z axis, ``(..., 3, 3)``."""
    c, s = torch.cos(angle), torch.sin(angle)
    o, z = torch.ones_like(angle), torch.zeros_like(angle)
    return torch.stack([c, -s, z, s, c, z, z, z, o], -1).reshape(angle.shape + (3, 3))


def angles_to_matrix(alpha, beta, gamma) -> torch.Tensor:
    r""":math:`R_y(\alpha) R_x(\beta) R_y(\gamma)` (e3nn's convention), broadcast over inputs."""
    alpha, beta, gamma = torch.broadcast_tensors(
        torch.as_tensor(alpha), torch.as_tensor(beta), torch.as_tensor(gamma)
    )
    return matrix_y(alpha) @ matrix_x(beta) @ matrix_y(gamma)


def random_rotation_about_y(n: int, dtype=torch.float64, device=None, generator=None) -> torch.Tensor:
    """``n`` rotations about the y axis by uniform random angles (the edge-frame roll)."""
    theta = torch.rand(n, dtype=dtype, device=device, generator=generator) * 2 * math.pi
    return matrix_y(theta)


# ----------------------------------------------------------------------------- Wigner-D
@cache
def _sample_points(lmax: int):
    """Golden-spiral points and per-l right pseudo-inverses ``M_l^+`` (float64, CPU)."""
    n = max(4 * lmax + 4, 8)
    k = torch.arange(n, dtype=torch.float64) + 0.5
    y = 1 - 2 * k / n
    rho = torch.sqrt(1 - y * y)
    phi = k * math.pi * (3 - math.sqrt(5))
    pts = torch.stack([rho * torch.cos(phi), y, rho * torch.sin(phi)], -1)
    Y = spherical_harmonics(lmax, pts, normalize=False)  # (n, dim)
    pinvs = []
    for l in range(lmax + 1):
        M = Y[:, l * l : (l + 1) ** 2].T  # (2l+1, n)
        pinvs.append(torch.linalg.pinv(M))  # (n, 2l+1)
    return pts, pinvs


def _as_matrix(R_or_angles, name: str) -> torch.Tensor:
    if isinstance(R_or_angles, (tuple, list)):
        if len(R_or_angles) != 3:
            raise DataError(f"{name}: angles must be (alpha, beta, gamma), got {len(R_or_angles)} values")
        return angles_to_matrix(*R_or_angles)
    R = R_or_angles
    if not torch.is_tensor(R) or R.shape[-2:] != (3, 3):
        shape = tuple(R.shape) if torch.is_tensor(R) else type(R).__name__
        raise DataError(f"{name}: expected rotation matrices of shape (..., 3, 3), got {shape}")
    if not R.is_floating_point():
        raise DataError(f"{name}: rotation matrices must be floating point, got {R.dtype}")
    return R


def wigner_D_list(lmax: int, R: torch.Tensor) -> list[torch.Tensor]:
    """``[D^0(R), ..., D^lmax(R)]``, each ``(..., 2l+1, 2l+1)``; ``R`` is ``(..., 3, 3)``."""
    R = _as_matrix(R, "wigner_D_list")
    if not isinstance(lmax, int) or lmax < 0:
        raise DataError(f"wigner_D_list: lmax must be a non-negative int, got {lmax!r}")
    pts, pinvs = _sample_points(lmax)
    pts = pts.to(dtype=R.dtype, device=R.device)
    Yr = spherical_harmonics(lmax, pts @ R.transpose(-1, -2), normalize=False)  # (..., n, dim)
    out = []
    for l in range(lmax + 1):
        P = pinvs[l].to(dtype=R.dtype, device=R.device)
        out.append(torch.einsum("...na,nb->...ab", Yr[..., l * l : (l + 1) ** 2], P))
    return out


def wigner_D(l: int, *R_or_angles) -> torch.Tensor:
    r"""Wigner-D matrix :math:`D^l` in e3nn's real basis.

    ``wigner_D(l, R)`` with ``R`` of shape ``(..., 3, 3)`` or ``wigner_D(l, alpha, beta, gamma)``
    (e3nn's Euler convention). Returns ``(..., 2l+1, 2l+1)`` with
    :math:`Y_l(R v) = D^l(R) Y_l(v)`.
    """
    if len(R_or_angles) == 1:
        R = _as_matrix(R_or_angles[0], "wigner_D")
    elif len(R_or_angles) == 3:
        R = angles_to_matrix(*R_or_angles)
    else:
        raise DataError("wigner_D: call as wigner_D(l, R) or wigner_D(l, alpha, beta, gamma)")
    return wigner_D_list(l, R)[l]


def wigner_D_blocks(lmax: int, R: torch.Tensor) -> torch.Tensor:
    """Block-diagonal ``(..., (lmax+1)**2, (lmax+1)**2)`` matrix ``diag(D^0, ..., D^lmax)``.

    Satisfies ``spherical_harmonics(lmax, R v) == D @ spherical_harmonics(lmax, v)``.
    """
    return block_diagonal(wigner_D_list(lmax, R))


def block_diagonal(Ds: list[torch.Tensor]) -> torch.Tensor:
    """``[D^0, ..., D^L]`` (each ``(..., 2l+1, 2l+1)``) -> ``(..., (L+1)**2, (L+1)**2)`` block diagonal."""
    lmax = len(Ds) - 1
    dim = (lmax + 1) ** 2
    blocks = []
    for l, D in enumerate(Ds):
        pad_l, pad_r = l * l, dim - (l + 1) ** 2
        blocks.append(torch.nn.functional.pad(D, (pad_l, pad_r)))
    return torch.cat(blocks, -2)


# ----------------------------------------------------------------------------- edge frames
def edge_rotation(vectors: torch.Tensor) -> torch.Tensor:
    r"""Per-edge proper rotation ``R`` (``(E, 3, 3)``) with ``R @ v/|v| = (0, 1, 0)``.

    See the module docstring for the construction; finite gradients of all orders for every
    direction, identity for a zero vector. The roll about the edge is arbitrary (but
    deterministic); consumers must be invariant to it.
    """
    if not torch.is_tensor(vectors) or vectors.shape[-1:] != (3,) or not vectors.is_floating_point():
        shape = tuple(vectors.shape) if torch.is_tensor(vectors) else type(vectors).__name__
        raise DataError(f"edge_rotation: vectors must be a float tensor of shape (..., 3), got {shape}")
    u = _safe_normalize(vectors)
    ux, uy, uz = u.unbind(-1)
    c = uy
    upper = c >= 0
    # k = u x s*y_hat with s = +1 (upper) / -1 (lower): (-s*uz, 0, s*ux)
    s = torch.where(upper, torch.ones_like(c), -torch.ones_like(c))
    kx, kz = -s * uz, s * ux
    zero = torch.zeros_like(c)
    K = torch.stack([zero, -kz, zero, kz, zero, -kx, zero, kx, zero], -1).reshape(c.shape + (3, 3))
    kvec = torch.stack([kx, zero, kz], -1)
    k2 = kx * kx + kz * kz
    eye = torch.eye(3, dtype=u.dtype, device=u.device).expand(c.shape + (3, 3))
    K2 = kvec.unsqueeze(-1) * kvec.unsqueeze(-2) - k2[..., None, None] * eye
    denom = 1 + s * c  # = 1 + |c| >= 1
    Rmin = eye + K + K2 / denom[..., None, None]
    flip = torch.stack([torch.ones_like(s), s, s], -1)  # diag(1, -1, -1) on the lower branch
    return flip.unsqueeze(-1) * Rmin
