r"""Exact transforms between spherical-harmonic coefficients and values on product grids.

Basis and inner product
-----------------------
A spherical function is stored by its coefficients in e3nn's real spherical harmonics with
"component" normalization, ``x`` of shape ``(..., (L+1)**2)``, degree ``l`` in columns
``l*l : (l+1)**2`` ordered ``m = -l..l``:

.. math::  f(\hat r) = \sum_{l \le L} \sum_{m=-l}^{l} x_{lm} Y_{lm}(\hat r),
           \qquad \sum_m Y_{lm}(\hat r)^2 = 2l + 1 .

These functions are orthogonal with :math:`\int_{S^2} Y_{lm} Y_{l'm'}\,d\Omega = 4\pi\,
\delta_{ll'}\delta_{mm'}`, so the projection back is the *mean over the sphere*

.. math::  x_{lm} = \frac{1}{4\pi} \int_{S^2} f\,Y_{lm}\, d\Omega .

Separation of variables
-----------------------
e3nn's polar axis is :math:`y`. With the parametrisation
:math:`\hat r(\theta, \varphi) = (\sin\theta\sin\varphi,\ \cos\theta,\ \sin\theta\cos\varphi)`
every basis function factorises as

.. math::  Y_{lm}(\theta, \varphi) = P_{lm}(\theta)\, T_m(\varphi), \qquad
           T_m = \cos(m\varphi)\ (m \ge 0), \quad T_m = \sin(|m|\varphi)\ (m < 0),

where :math:`P_{lm}(\theta) = \sin^{|m|}\theta \times` (polynomial of degree :math:`l-|m|` in
:math:`\cos\theta`), normalisation and signs included. :math:`P_{lm}` is obtained here by
evaluating e3nn's harmonics at :math:`\varphi^*_m` with :math:`T_m(\varphi^*_m) = 1`, so the basis
is e3nn's by construction (the tests check the factorisation).

Two grids
---------
* :class:`S2Grid` -- Gauss-Legendre nodes in :math:`\cos\theta` times ``n_phi`` uniform
  :math:`\varphi_j = 2\pi j / n_\varphi`. *To grid*: Legendre sums in :math:`\theta`
  (``c_m(\theta_i) = \sum_l P_{lm}(\theta_i) x_{lm}``, one small matmul per ``m``), then an
  inverse real FFT in :math:`\varphi`. *From grid*: a real FFT in :math:`\varphi`, then the
  quadrature :math:`x_{lm} = \frac{1}{4\pi}\sum_i w_i P_{lm}(\theta_i)\,\frac{2\pi}{n_\varphi}
  \sum_j f_{ij} T_m(\varphi_j)`. This quadrature is exact for every integrand that is a
  spherical polynomial of degree :math:`D` when ``n_theta >= (D+1)/2`` and ``n_phi >= D+1``.
  A dense-matrix path (``impl="matrix"``) does the same with two precomputed matrices.
* :class:`TorusFourierGrid` -- the 2D Fourier picture. Because :math:`P_{lm}(\theta)` is a
  trigonometric polynomial of degree :math:`l`, :math:`f(\hat r(\theta, \varphi))` extended to
  :math:`(\theta, \varphi) \in [0, 2\pi)^2` is a 2D trigonometric polynomial
  :math:`\sum_{|u|,|v| \le L} F_{uv} e^{iu\theta} e^{iv\varphi}`. The change of basis
  :math:`x \mapsto F` is precomputed exactly (FFT of :math:`P_{lm}` sampled on ``2L+2`` uniform
  :math:`\theta`), values on the uniform torus grid come from an inverse 2D FFT, and the
  projection back uses the closed form
  :math:`\int_0^\pi e^{ik\theta}\sin\theta\,d\theta` (see :func:`_half_period_sine_moments`),
  so it is exact whenever the torus grid does not alias the product's spectrum
  (``n_u >= 2 U + 1`` for :math:`\theta`-degree :math:`U`, ``n_v >= U + l_{out} + 1``).

Both grids share the interface ``to_grid(x) -> values``, ``from_grid(values, lmax_out) -> x``,
so a pointwise product of values is a product of spherical functions.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

__all__ = [
    "S2Grid",
    "TorusFourierGrid",
    "legendre_factor",
    "lmax_from_dim",
    "s2_grid_size",
    "torus_grid_size",
]


def lmax_from_dim(dim: int) -> int:
    """``L`` such that ``(L+1)**2 == dim``; raises ``ValueError`` otherwise."""
    L = round(math.sqrt(dim)) - 1
    if L < 0 or (L + 1) ** 2 != dim:
        raise ValueError(f"last dimension {dim} is not (L+1)^2 for an integer L")
    return L


def s2_grid_size(lmax_factors, lmax_out: int) -> tuple[int, int]:
    r"""Smallest exact Gauss-Legendre x uniform grid for a product of factors.

    The integrand :math:`\prod_k f_k \cdot Y_{l_{out}}` is a spherical polynomial of degree
    :math:`D = \sum_k L_k + l_{out}`: ``n_theta = ceil((D+1)/2)`` Gauss-Legendre nodes and
    ``n_phi = D + 1`` uniform angles integrate it exactly. ``n_phi`` is raised to
    ``2 max(L_k, l_out) + 1`` when needed so that each factor's frequencies fit the real FFT
    without folding.
    """
    lmax_factors = [int(l) for l in lmax_factors]
    D = sum(lmax_factors) + int(lmax_out)
    n_theta = (D + 2) // 2
    n_phi = max(D + 1, 2 * max(lmax_factors + [int(lmax_out)]) + 1)
    return n_theta, n_phi


def torus_grid_size(lmax_factors, lmax_out: int) -> tuple[int, int]:
    r"""Smallest alias-free torus grid ``(n_u, n_v)`` for a product of factors.

    The product has :math:`\theta`-frequencies up to :math:`U = \sum_k L_k`, all of which enter
    the exact projection (``n_u = 2U + 1``); in :math:`\varphi` only :math:`|v| \le l_{out}`
    is read back, so ``n_v = U + l_out + 1`` suffices (raised to ``2 max L + 1``).
    """
    lmax_factors = [int(l) for l in lmax_factors]
    U = sum(lmax_factors)
    n_u = 2 * U + 1
    n_v = max(U + int(lmax_out) + 1, 2 * max(lmax_factors + [int(lmax_out)]) + 1)
    return n_u, n_v


def legendre_factor(lmax: int, theta: np.ndarray) -> np.ndarray:
    r""":math:`P_{lm}(\theta)` of the factorisation :math:`Y_{lm} = P_{lm}(\theta) T_m(\varphi)`.

    In e3nn's basis (component normalization, no Condon-Shortley phase)

    .. math:: P_{l,\pm m}(\theta) = N_{lm} \sin^{m}\theta\; Q_l^m(\cos\theta), \qquad
              N_{l0} = \sqrt{2l+1},\quad N_{lm} = \sqrt{2(2l+1)\tfrac{(l-m)!}{(l+m)!}},

    with :math:`Q_m^m = (2m-1)!!` and :math:`(l-m) Q_l^m = (2l-1) z Q_{l-1}^m - (l+m-1) Q_{l-2}^m`
    (the associated Legendre function without the :math:`\sin^m` factor). The recurrence is
    run on :math:`\tilde Q_l^m = \sqrt{(l-m)!/(l+m)!}\, Q_l^m` so that every factor stays
    O(1) for any degree. The tests check :math:`P_{lm} T_m` against e3nn's harmonics.

    Returns a float64 array ``(len(theta), lmax+1, 2*lmax+1)`` indexed ``[i, l, m + lmax]``
    (zero where ``|m| > l``). Valid for any real :math:`\theta` (the polynomial extension).
    """
    theta = np.asarray(theta, dtype=np.float64)
    z, s = np.cos(theta), np.sin(theta)
    out = np.zeros((theta.shape[0], lmax + 1, 2 * lmax + 1))
    for m in range(lmax + 1):
        # sin^m * Qt_m^m with Qt_m^m = (2m-1)!! / sqrt((2m)!) = sqrt(prod_{k<=m} (2k-1)/(2k))
        diag = math.sqrt(math.prod((2 * k - 1) / (2 * k) for k in range(1, m + 1)))
        q_prev2, q_prev = None, diag * s**m
        for l in range(m, lmax + 1):
            if l == m + 1:
                q = math.sqrt(2 * m + 1) * z * q_prev
            elif l >= m + 2:
                a = (2 * l - 1) / math.sqrt((l - m) * (l + m))
                b = math.sqrt((l + m - 1) * (l - m - 1) / ((l - m) * (l + m)))
                q = a * z * q_prev - b * q_prev2
            else:
                q = q_prev
            if l > m:
                q_prev2, q_prev = q_prev, q
            norm = math.sqrt(2 * l + 1) * (math.sqrt(2.0) if m > 0 else 1.0)
            out[:, l, lmax + m] = norm * q
            if m > 0:
                out[:, l, lmax - m] = norm * q
    return out


def _lm_index(L: int) -> torch.Tensor:
    """Rows ``(2L+1)*(L+1)`` (``[m + L, l]``) into a ``(L+1)**2`` coefficient axis padded by one
    zero row at the end (index ``(L+1)**2`` where ``|m| > l``)."""
    idx = torch.full((2 * L + 1, L + 1), (L + 1) ** 2, dtype=torch.long)
    for l in range(L + 1):
        for m in range(-l, l + 1):
            idx[m + L, l] = l * l + l + m
    return idx.reshape(-1)


def _flat_index(L: int) -> torch.Tensor:
    """Inverse of :func:`_lm_index`: for each ``(l, m)`` its row ``(m + L)*(L+1) + l``."""
    return torch.tensor([(m + L) * (L + 1) + l for l in range(L + 1) for m in range(-l, l + 1)])


def _to_m_major(x: torch.Tensor, L: int, idx: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """Coefficient-first ``((L+1)^2, *batch) -> (2L+1, L+1, B)``: per ``m`` the degree rows."""
    batch = x.shape[1:]
    X = x.reshape(x.shape[0], -1)
    X = torch.cat([X, X.new_zeros(1, X.shape[1])], 0)[idx]
    return X.reshape(2 * L + 1, L + 1, X.shape[1]), batch


def _from_m_major(Y: torch.Tensor, flat: torch.Tensor, batch: tuple) -> torch.Tensor:
    """``(2L+1, L+1, B) -> ((L+1)^2, *batch)``."""
    Y = Y.reshape(-1, Y.shape[-1])[flat]
    return Y.reshape(Y.shape[0], *batch)


class S2Grid(nn.Module):
    r"""Gauss-Legendre (in :math:`\cos\theta`) x uniform (:math:`\varphi`) grid on the sphere.

    Args:
        lmax: largest degree converted to or from the grid.
        n_theta, n_phi: grid size (see :func:`s2_grid_size` for the exact minimum of a product);
            ``n_phi >= 2*lmax + 1`` is required.
        impl: ``"fft"`` (Legendre matmuls per ``m`` + real FFT in :math:`\varphi`, cost
            :math:`O(L^3)` per function) or ``"matrix"`` (dense ``(n_phi*n_theta, (L+1)^2)``
            matrices, :math:`O(L^4)` but one BLAS call).

    Two layouts. ``to_grid(x)``: ``(..., (L+1)^2) -> (..., n_theta, n_phi)`` (``L <= lmax``),
    the values :math:`f(\theta_i, \varphi_j)`; ``from_grid(f, lmax_out)`` the inverse, returning
    :math:`\frac{1}{4\pi}\sum_{ij} w_i \frac{2\pi}{n_\varphi} f_{ij} Y_{lm}(\theta_i, \varphi_j)`, the
    exact projection whenever :math:`f\,Y_{lm}` is a spherical polynomial of degree
    :math:`\le \min(2 n_\theta - 1, n_\varphi - 1)`. The *coefficient-first* forms used by the
    products (and kernels) keep the batch last, so every matmul has the batch as its long
    dimension: ``to_grid_cf(x ((L+1)^2, *batch)) -> (n_phi, n_theta, *batch)`` and
    ``from_grid_cf(f (n_phi, n_theta, *batch), lmax_out) -> ((lmax_out+1)^2, *batch)``.
    """

    def __init__(self, lmax: int, n_theta: int, n_phi: int, impl: str = "fft"):
        super().__init__()
        if impl not in ("fft", "matrix"):
            raise ValueError(f"impl must be 'fft' or 'matrix', got {impl!r}")
        if n_phi < 2 * lmax + 1:
            raise ValueError(f"n_phi={n_phi} must be >= 2*lmax+1 = {2 * lmax + 1}")
        self.lmax, self.n_theta, self.n_phi, self.impl = int(lmax), int(n_theta), int(n_phi), impl
        z, w = np.polynomial.legendre.leggauss(self.n_theta)  # nodes in cos(theta), sum w = 2
        theta = np.arccos(z)
        P = legendre_factor(self.lmax, theta)  # (n_theta, L+1, 2L+1)
        L = self.lmax
        # to grid: c_m(theta_i) = sum_l P_lm(theta_i) x_lm, scaled so that irfft(norm="forward")
        # of Z_0 = a_0, Z_k = (a_k - i b_k)/2 gives f = sum_k a_k cos(k phi) + b_k sin(k phi)
        scale_to = np.array([-0.5] * L + [1.0] + [0.5] * L)
        to_m = np.transpose(P, (2, 0, 1)) * scale_to[:, None, None]  # (2L+1, n_theta, L+1)
        # from grid: S_m = sum_j f_j T_m(phi_j) = Re R_k (m = k >= 0) or -Im R_k (m = -k), R = rfft;
        #   x_lm = (1/4pi) (2pi/n_phi) sum_i w_i P_lm(theta_i) S_m(theta_i)
        from_m = np.transpose(P, (2, 1, 0)) * (w / (2.0 * self.n_phi))[None, None, :]  # (2L+1, L+1, n_theta)
        self.register_buffer("theta", torch.from_numpy(theta), persistent=False)
        self.register_buffer("weights", torch.from_numpy(w), persistent=False)
        self.register_buffer("_to_m", torch.from_numpy(np.ascontiguousarray(to_m)), persistent=False)
        self.register_buffer("_from_m", torch.from_numpy(np.ascontiguousarray(from_m)), persistent=False)
        if impl == "matrix":
            phi = 2 * np.pi * np.arange(self.n_phi) / self.n_phi
            T = np.stack([np.sin(-m * phi) if m < 0 else np.cos(m * phi) for m in range(-L, L + 1)], 0)
            Y = np.zeros((self.n_phi, self.n_theta, (L + 1) ** 2))
            for l in range(L + 1):
                for m in range(-l, l + 1):
                    Y[:, :, l * l + l + m] = T[m + L][:, None] * P[:, l, m + L][None, :]
            Y = Y.reshape(-1, (L + 1) ** 2)
            quad = np.tile(w, self.n_phi)[:, None] / (2.0 * self.n_phi)
            self.register_buffer("_Y", torch.from_numpy(np.ascontiguousarray(Y)), persistent=False)
            self.register_buffer("_Yq", torch.from_numpy(np.ascontiguousarray((Y * quad).T)), persistent=False)
        for l in range(L + 1):
            self.register_buffer(f"_idx{l}", _lm_index(l), persistent=False)
            self.register_buffer(f"_flat{l}", _flat_index(l), persistent=False)

    def extra_repr(self) -> str:
        return f"lmax={self.lmax}, n_theta={self.n_theta}, n_phi={self.n_phi}, impl={self.impl!r}"

    def dense_matrices(self, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``impl="matrix"`` only: ``(to_grid (G, (L+1)^2), from_grid ((L+1)^2, G))`` with
        ``G = n_phi * n_theta``: ``to_grid @ x`` samples, ``from_grid @ f`` projects (quadrature)."""
        if self.impl != "matrix":
            raise ValueError("dense_matrices needs an S2Grid built with impl='matrix'")
        return self._Y.to(dtype or self._Y.dtype), self._Yq.to(dtype or self._Yq.dtype)

    def to_grid_cf(self, x: torch.Tensor) -> torch.Tensor:
        """``((L+1)^2, *batch) -> (n_phi, n_theta, *batch)`` values of the spherical functions."""
        L = lmax_from_dim(x.shape[0])
        if L > self.lmax:
            raise ValueError(f"input degree {L} > grid lmax {self.lmax}")
        if self.impl == "matrix":
            f = self._Y[:, : (L + 1) ** 2] @ x.reshape(x.shape[0], -1)
            return f.reshape(self.n_phi, self.n_theta, *x.shape[1:])
        X, batch = _to_m_major(x, L, getattr(self, f"_idx{L}"))
        A = self._to_m[self.lmax - L : self.lmax + L + 1, :, : L + 1]
        C = torch.bmm(A, X)  # (2L+1 [m = -L..L], n_theta, B)
        re = C[L:]  # k = 0..L: cosine parts
        im = torch.cat([torch.zeros_like(C[:1]), C[:L].flip(0)], 0)  # k = 0..L: sine parts
        Z = torch.complex(re, im)
        Z = torch.cat([Z, Z.new_zeros(self.n_phi // 2 - L, *Z.shape[1:])], 0)
        f = torch.fft.irfft(Z, n=self.n_phi, dim=0, norm="forward")
        return f.reshape(self.n_phi, self.n_theta, *batch)

    def from_grid_cf(self, f: torch.Tensor, lmax_out: int) -> torch.Tensor:
        """``(n_phi, n_theta, *batch) -> ((lmax_out+1)^2, *batch)`` by exact quadrature."""
        L = int(lmax_out)
        if L > self.lmax:
            raise ValueError(f"output degree {L} > grid lmax {self.lmax}")
        if f.shape[:2] != (self.n_phi, self.n_theta):
            raise ValueError(f"grid values must start with {(self.n_phi, self.n_theta)}, got {tuple(f.shape)}")
        batch = f.shape[2:]
        f = f.reshape(self.n_phi, self.n_theta, -1)
        if self.impl == "matrix":
            out = self._Yq[: (L + 1) ** 2] @ f.reshape(self.n_phi * self.n_theta, -1)
            return out.reshape(-1, *batch)
        R = torch.fft.rfft(f, dim=0)[: L + 1]  # (L+1 [k], n_theta, B)
        S = torch.cat([-R.imag[1:].flip(0), R.real], 0)  # (2L+1 [m = -L..L], n_theta, B)
        W = self._from_m[self.lmax - L : self.lmax + L + 1, : L + 1]
        Y = torch.bmm(W, S)  # (2L+1, L+1, B)
        return _from_m_major(Y, getattr(self, f"_flat{L}"), batch)

    def to_grid(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., (L+1)^2) -> (..., n_theta, n_phi)``."""
        f = self.to_grid_cf(x.movedim(-1, 0))
        return f.movedim((0, 1), (-1, -2))

    def from_grid(self, f: torch.Tensor, lmax_out: int) -> torch.Tensor:
        """``(..., n_theta, n_phi) -> (..., (lmax_out+1)^2)``."""
        return self.from_grid_cf(f.movedim((-1, -2), (0, 1)), lmax_out).movedim(0, -1)


def _half_period_sine_moments(k: np.ndarray) -> np.ndarray:
    r""":math:`I(k) = \int_0^\pi e^{ik\theta} \sin\theta\, d\theta` in closed form (complex).

    With :math:`J(n) = \int_0^\pi e^{in\theta} d\theta = \pi` for :math:`n = 0`, ``0`` for even
    :math:`n \ne 0` and :math:`2i/n` for odd :math:`n`:  :math:`I(k) = (J(k+1) - J(k-1)) / (2i)`.
    """

    def J(n):
        n = np.asarray(n)
        out = np.zeros(n.shape, dtype=np.complex128)
        out[n == 0] = np.pi
        odd = (n % 2) != 0
        out[odd] = 2j / n[odd]
        return out

    k = np.asarray(k)
    return (J(k + 1) - J(k - 1)) / 2j


class TorusFourierGrid(nn.Module):
    r"""Spherical functions as 2D Fourier series on the :math:`(\theta, \varphi)` torus.

    Args:
        lmax: largest degree converted to or from the torus.
        n_u, n_v: uniform torus grid (:math:`\theta_a = 2\pi a/n_u`, :math:`\varphi_b = 2\pi b/n_v`);
            see :func:`torus_grid_size`. ``n_v >= 2*lmax + 1`` and ``n_u >= 2 L + 1`` for every
            input degree ``L`` are required (``n_u`` may be below ``2*lmax+1`` for outputs).

    ``to_fourier_cf(x)`` gives the exact half spectrum :math:`F_{uv}` (``v >= 0`` first, then
    ``u`` in FFT order) of :math:`f(\hat r(\theta,\varphi))`: with
    :math:`P_{lm}(\theta) = \sum_u p_{lm,u} e^{iu\theta}` and
    :math:`\cos k\varphi = (e^{ik\varphi} + e^{-ik\varphi})/2`,
    :math:`\sin k\varphi = (e^{ik\varphi} - e^{-ik\varphi})/2i`,
    :math:`F_{u,k} = \sum_l (\tfrac{1}{2})^{[k>0]} p_{lk,u} x_{lk} - \tfrac{i}{2} p_{l,-k,u} x_{l,-k}`.
    ``to_grid_cf`` is its inverse 2D FFT (values on the torus, ``(n_v, n_u, *batch)``). A
    pointwise product of torus values is the 2D convolution of the spectra. ``from_grid_cf``
    takes the 2D FFT and projects exactly: with :math:`Q_{lm,u} = \int_0^\pi e^{iu\theta}
    P_{lm}(\theta)\sin\theta\,d\theta = \sum_{u'} p_{lm,u'} I(u+u')`,

    .. math:: x_{lk} = \tfrac12 \mathrm{Re} \sum_u F_{u,k} Q_{lk,u}, \qquad
              x_{l,-k} = \tfrac12 \mathrm{Re}\, i \sum_u F_{u,k} Q_{l,-k,u}

    (the sum over :math:`v = \pm k` is folded with :math:`F_{-u,-v} = \bar F_{u,v}`).
    ``to_grid``/``from_grid``/``to_fourier`` are the batch-first forms
    (``(..., (L+1)^2)``, ``(..., n_u, n_v)``, ``(..., n_u, n_v//2+1)``).
    """

    def __init__(self, lmax: int, n_u: int, n_v: int):
        super().__init__()
        L = self.lmax = int(lmax)
        self.n_u, self.n_v = int(n_u), int(n_v)
        if self.n_v < 2 * L + 1:
            raise ValueError(f"torus grid n_v={n_v} too small for lmax={L} (need >= {2 * L + 1})")
        N = 2 * L + 2
        theta = 2 * np.pi * np.arange(N) / N
        P = legendre_factor(L, theta)  # (N, L+1, 2L+1)
        p = np.fft.fft(P, axis=0) / N  # p[u mod N, l, m]: exact theta-Fourier coefficients
        u_in = np.concatenate([np.arange(0, L + 1), np.arange(-L, 0)])  # FFT order, 2L+1 rows
        p = p[u_in % N]  # (2L+1 [u], L+1, 2L+1 [m])
        # to Fourier: per m a real matmul giving (Re | Im) of the contribution to F[|m|, :]
        factor = np.array([-0.5j] * L + [1.0] + [0.5] * L)
        c = p * factor[None, None, :]  # (u, l, m)
        to_m = np.concatenate([c.real, c.imag], 0)  # (2(2L+1), l, m)
        self.register_buffer(
            "_to_m", torch.from_numpy(np.ascontiguousarray(np.transpose(to_m, (2, 0, 1)))), persistent=False
        )  # (2L+1 [m], 2(2L+1) [re|im, u], L+1)
        # projection: Q[l, m, u] for every torus frequency u (FFT order, n_u rows)
        u_out = np.fft.fftfreq(self.n_u, d=1.0 / self.n_u).round().astype(np.int64)
        Imat = _half_period_sine_moments(u_out[:, None] + u_in[None, :])  # (n_u, 2L+1)
        Q = np.einsum("ab,blm->alm", Imat, p)  # (n_u, L+1, 2L+1)
        post = np.array([0.5j] * L + [0.5] + [0.5] * L)
        Qc = Q * post[None, None, :]
        # Re(F Qc) = F.re Qc.re - F.im Qc.im
        from_m = np.concatenate([Qc.real, -Qc.imag], 0)  # (2 n_u, L+1, 2L+1)
        self.register_buffer(
            "_from_m", torch.from_numpy(np.ascontiguousarray(np.transpose(from_m, (2, 1, 0)))), persistent=False
        )  # (2L+1 [m], L+1, 2 n_u)
        for l in range(L + 1):
            self.register_buffer(f"_idx{l}", _lm_index(l), persistent=False)
            self.register_buffer(f"_flat{l}", _flat_index(l), persistent=False)
            self.register_buffer(f"_abs{l}", torch.tensor([abs(m) for m in range(-l, l + 1)]), persistent=False)

    def extra_repr(self) -> str:
        return f"lmax={self.lmax}, n_u={self.n_u}, n_v={self.n_v}"

    def to_fourier_cf(self, x: torch.Tensor) -> torch.Tensor:
        """``((L+1)^2, *batch) -> (n_v//2+1, n_u, *batch)`` complex half spectrum (exact)."""
        L = lmax_from_dim(x.shape[0])
        if L > self.lmax:
            raise ValueError(f"input degree {L} > torus lmax {self.lmax}")
        if self.n_u < 2 * L + 1:
            raise ValueError(f"torus grid n_u={self.n_u} too small for input degree {L}")
        X, batch = _to_m_major(x, L, getattr(self, f"_idx{L}"))
        Lg = self.lmax
        # rows u = 0..L and -L..-1 of the stored (2Lg+1) FFT-ordered u axis, real then imaginary
        rows = list(range(L + 1)) + list(range(2 * Lg + 1 - L, 2 * Lg + 1))
        rows = rows + [r + 2 * Lg + 1 for r in rows]
        A = self._to_m[Lg - L : Lg + L + 1, rows, : L + 1]  # (2L+1, 2(2L+1), L+1)
        C = torch.bmm(A, X)  # (2L+1 [m], 2(2L+1) [re|im, u], B)
        n = 2 * L + 1
        Fk = torch.cat([C[L : L + 1], C[L + 1 :] + C[:L].flip(0)], 0)  # (L+1 [k], 2n, B)
        F = torch.complex(Fk[:, :n], Fk[:, n:])  # (L+1 [k], n [u], B)
        F = torch.cat([F[:, : L + 1], F.new_zeros(L + 1, self.n_u - n, F.shape[-1]), F[:, L + 1 :]], 1)
        F = torch.cat([F, F.new_zeros(self.n_v // 2 - L, *F.shape[1:])], 0)
        return F.reshape(self.n_v // 2 + 1, self.n_u, *batch)

    def to_grid_cf(self, x: torch.Tensor) -> torch.Tensor:
        """``((L+1)^2, *batch) -> (n_v, n_u, *batch)`` values on the uniform torus grid."""
        return torch.fft.irfftn(self.to_fourier_cf(x), s=(self.n_u, self.n_v), dim=(1, 0), norm="forward")

    def from_fourier_cf(self, F: torch.Tensor, lmax_out: int) -> torch.Tensor:
        """Exact projection of a half spectrum ``(n_v//2+1, n_u, *batch)`` to ``((lmax_out+1)^2, *batch)``."""
        L = int(lmax_out)
        if L > self.lmax:
            raise ValueError(f"output degree {L} > torus lmax {self.lmax}")
        batch = F.shape[2:]
        F = F.reshape(F.shape[0], self.n_u, -1)
        G = F[getattr(self, f"_abs{L}")]  # (2L+1 [m], n_u, B): row |m|
        G = torch.cat([G.real, G.imag], 1)  # (2L+1, 2 n_u, B)
        W = self._from_m[self.lmax - L : self.lmax + L + 1, : L + 1]  # (2L+1, L+1, 2 n_u)
        Y = torch.bmm(W, G)  # (2L+1, L+1, B)
        return _from_m_major(Y, getattr(self, f"_flat{L}"), batch)

    def from_grid_cf(self, f: torch.Tensor, lmax_out: int) -> torch.Tensor:
        """``(n_v, n_u, *batch) -> ((lmax_out+1)^2, *batch)`` (2D FFT, then exact projection)."""
        if f.shape[:2] != (self.n_v, self.n_u):
            raise ValueError(f"torus values must start with {(self.n_v, self.n_u)}, got {tuple(f.shape)}")
        return self.from_fourier_cf(torch.fft.rfftn(f, dim=(1, 0), norm="forward"), lmax_out)

    def to_fourier(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., (L+1)^2) -> (..., n_u, n_v//2+1)``."""
        return self.to_fourier_cf(x.movedim(-1, 0)).movedim((0, 1), (-1, -2))

    def to_grid(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., (L+1)^2) -> (..., n_u, n_v)``."""
        return self.to_grid_cf(x.movedim(-1, 0)).movedim((0, 1), (-1, -2))

    def from_grid(self, f: torch.Tensor, lmax_out: int) -> torch.Tensor:
        """``(..., n_u, n_v) -> (..., (lmax_out+1)^2)``."""
        return self.from_grid_cf(f.movedim((-1, -2), (0, 1)), lmax_out).movedim(0, -1)
