r"""Facet's node mixing: an ordinary MLP applied pointwise on the sphere.

A node feature ``x`` of shape ``(N, (L+1)^2, C)`` (degrees ``0..L``, e3nn real basis,
"component" normalization, parity :math:`(-1)^l`) is, channel by channel, the band-limited
spherical function :math:`f_c(\hat u) = \sum_{lm} x_{lmc} Y_{lm}(\hat u)`. The mixing

.. math::

    g(\hat u) = W_2\, \mathrm{SiLU}(W_1 f(\hat u) + b_1) + b_2 \in \mathbb{R}^{C},\qquad
    \Delta x_{lmc} = \frac{1}{4\pi} \int_{S^2} g_c(\hat u)\, Y_{lm}(\hat u)\, d\Omega

mixes the ``C`` channels with an MLP at every point :math:`\hat u` of the sphere (the same MLP
everywhere), then projects back to degrees ``0..L``. Callers add the residual,
:math:`x \leftarrow x + \Delta x`. The integral is the quadrature of
:class:`mlpot.o3.s2grid.S2Grid` (the one S2 grid, dense-matrix form; ``res_beta`` Gauss–Legendre
polar nodes, ``res_alpha = 2 res_beta`` azimuths, default ``res_beta = 2L + 8``).

Symmetry: a rotation :math:`Q` acts on :math:`f` by :math:`f \circ Q^{-1}`, and a pointwise map
commutes with it, so :math:`\Delta x` is equivariant up to the grid's aliasing error (the same
error as :class:`mlpot.nn.s2_activation.SeparableS2Activation`, shrinking geometrically with the
resolution); inversion maps the grid onto itself and is exact. Unlike a gate or a linear layer,
the MLP couples all degrees and channels; unlike a tensor product its cost is
:math:`O(N G C H)` for ``G`` grid points.
"""
from __future__ import annotations

import torch
from torch import nn

from mlpot.errors import ConfigError
from mlpot.o3.s2grid import S2Grid

__all__ = ["NODE_MIXINGS", "IrrepsS2MLPNodeMixing", "S2MLPNodeMixing"]

NODE_MIXINGS = ("s2_mlp",)


class S2MLPNodeMixing(nn.Module):
    r""":math:`\Delta x` of the module doc: ``(N, (L+1)^2, C) -> (N, (L+1)^2, C)`` (no residual).

    Args:
        lmax: largest degree ``L`` of the features.
        channels: ``C``.
        hidden: width ``H`` of the pointwise MLP.
        res_beta: Gauss–Legendre polar nodes (default ``2 L + 8``); ``res_alpha = 2 res_beta``.
    """

    def __init__(self, lmax: int, channels: int, hidden: int, res_beta: int | None = None):
        super().__init__()
        if int(lmax) < 0 or int(channels) < 1 or int(hidden) < 1:
            raise ConfigError(f"s2_mlp node mixing: need lmax >= 0, channels, hidden >= 1; got {lmax}, {channels}, "
                              f"{hidden}")
        self.lmax, self.channels, self.hidden = int(lmax), int(channels), int(hidden)
        res_beta = int(res_beta) if res_beta else 2 * self.lmax + 8
        self.grid = S2Grid(self.lmax, res_beta, 2 * res_beta, impl="matrix")
        self.mlp = nn.Sequential(nn.Linear(self.channels, self.hidden), nn.SiLU(), nn.Linear(self.hidden, self.channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != (self.lmax + 1) ** 2 or x.shape[2] != self.channels:
            raise ValueError(f"s2_mlp node mixing: expected (N, {(self.lmax + 1) ** 2}, {self.channels}), "
                             f"got {tuple(x.shape)}")
        to_grid, from_grid = self.grid.dense_matrices(x.dtype)
        values = torch.einsum("gk,nkc->ngc", to_grid, x)  # f(u_g), (N, G, C)
        return torch.einsum("kg,ngc->nkc", from_grid, self.mlp(values))

    def extra_repr(self) -> str:
        return f"lmax={self.lmax}, channels={self.channels}, hidden={self.hidden}, grid={self.grid.n_theta}x" \
               f"{self.grid.n_phi}"


class IrrepsS2MLPNodeMixing(nn.Module):
    r""":class:`S2MLPNodeMixing` with its residual, on e3nn ``mul_ir`` features (MACE's layout):
    ``x (N, irreps.dim) -> x + Δx``. ``irreps`` must be ``C x l`` for ``l = 0..L`` with the parity
    :math:`(-1)^l` of spherical functions (e.g. ``"16x0e + 16x1o"``); anything else is a ConfigError
    (a pointwise map on the sphere only makes sense for such features)."""

    def __init__(self, irreps, hidden: int, res_beta: int | None = None):
        super().__init__()
        from e3nn import o3

        self.irreps = o3.Irreps(irreps)
        C = self.irreps[0].mul if len(self.irreps) else 0
        want = o3.Irreps([(C, (l, (-1) ** l)) for l in range(len(self.irreps))])
        if C < 1 or self.irreps != want:
            raise ConfigError(f"node_mixing s2_mlp needs features C x 0e + C x 1o + C x 2e + ..., got {self.irreps}")
        self.mixing = S2MLPNodeMixing(len(self.irreps) - 1, C, hidden, res_beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from mlpot.o3.so2 import mul_ir_to_sph_channels, sph_channels_to_mul_ir

        return x + sph_channels_to_mul_ir(self.mixing(mul_ir_to_sph_channels(x, self.irreps)))
