r"""Learnable cubic B-spline radial functions (Facet's replacement for radial MLPs).

Basis
-----
On :math:`x = r / r_{max} \in [0, 1)` with ``num_knots`` uniform intervals of width
:math:`h = 1/n` (``n = num_knots``), the uniform cubic B-splines :math:`B_k`,
:math:`k = 0..n+2`, are shifted copies of one bell curve supported on four intervals. On the
interval :math:`i = \lfloor x n \rfloor` with local coordinate :math:`t = x n - i \in [0, 1)`
exactly four of them are non-zero:

.. math::

    B_{i}   = (1 - t)^3 / 6, \quad
    B_{i+1} = (3t^3 - 6t^2 + 4) / 6, \quad
    B_{i+2} = (-3t^3 + 3t^2 + 3t + 1) / 6, \quad
    B_{i+3} = t^3 / 6,

which sum to 1 and are twice continuously differentiable in :math:`x` (value, slope and
curvature match at every knot).

Radial function
---------------
A learnable table :math:`c \in \mathbb{R}^{(n+3) \times O}` gives ``O`` radial functions

.. math:: \rho_o(r) = f_p(r / r_{max}) \sum_{a=0}^{3} B_{i+a}(t)\, c_{i+a,\,o},

a *table lookup* of four rows per edge (:class:`SplineRadial`), times the polynomial cutoff
envelope :math:`f_p` (:class:`mlpot.nn.radial.PolynomialCutoff`), so that :math:`\rho`, its first
and second derivatives vanish at :math:`r_{max}`. The cost per edge is :math:`4 O`, not the
:math:`O(N_{basis} H + H^2 + H O)` of a radial MLP.

:class:`SplineBasis` is the same basis as a dense ``(E, n+3)`` edge feature (the ``B_k`` times
the envelope); a bias-free linear map of it is the same spline (MACE's ``radial: spline`` uses
it through its radial-MLP slot with no hidden layer).

:func:`make_edge_radial` is the one switch ``radial: mlp | spline`` of the SO(2)-frame models.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from mlpot.errors import ConfigError
from mlpot.nn.radial import PolynomialCutoff

__all__ = ["RADIAL_KINDS", "SplineBasis", "SplineRadial", "cubic_bspline_table", "make_edge_radial",
           "check_radial_backend"]

RADIAL_KINDS = ("mlp", "spline")


def cubic_bspline_table(x: torch.Tensor, num_knots: int) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Interval index and the four non-zero basis values at ``x`` (any shape, in ``[0, 1]``).

    Returns ``(i, w)`` with ``i`` (long, shape of ``x``) in ``0..num_knots-1`` and ``w``
    (``x.shape + (4,)``): :math:`B_{i+a}(x) = w_a` for ``a = 0..3`` (module doc). Values of ``x``
    outside ``[0, 1)`` use the first or last interval's polynomial (the envelope zeroes them).
    """
    n = int(num_knots)
    s = x * n
    i = torch.clamp(torch.floor(s.detach()), 0, n - 1).to(torch.long)
    t = s - i.to(x.dtype)
    t2, t3 = t * t, t * t * t
    w = torch.stack(
        [(1 - t) ** 3 / 6, (3 * t3 - 6 * t2 + 4) / 6, (-3 * t3 + 3 * t2 + 3 * t + 1) / 6, t3 / 6], -1
    )
    return i, w


def check_radial_backend(kind: str, backend: str) -> None:
    """``radial: spline`` has no Triton kernel: under ``backend: triton`` it is a ConfigError."""
    if kind not in RADIAL_KINDS:
        raise ConfigError(f"radial must be one of {', '.join(RADIAL_KINDS)}, got {kind!r}")
    if kind == "spline":
        from mlpot.o3.backend import check_backend

        check_backend("spline_radial", backend)


class SplineRadial(nn.Module):
    r"""``num_out`` learnable cubic B-spline functions of the edge length, times the envelope.

    ``SplineRadial(r_max, num_knots, num_out, p=5)(lengths (E, 1)) -> (E, num_out)`` by table
    lookup (four rows of ``coefficients`` per edge, see the module doc).
    """

    def __init__(self, r_max: float, num_knots: int, num_out: int, p: int = 5):
        super().__init__()
        if int(num_knots) < 1:
            raise ConfigError(f"spline radial: num_knots must be >= 1, got {num_knots}")
        self.r_max, self.num_knots, self.num_out, self.p = float(r_max), int(num_knots), int(num_out), int(p)
        # unit-variance outputs at initialisation: sum_a B_a^2 is about 0.48 on average
        self.coefficients = nn.Parameter(torch.randn(self.num_knots + 3, self.num_out) * math.sqrt(2.0))
        self.register_buffer("offsets", torch.arange(4), persistent=False)

    def envelope(self, lengths: torch.Tensor) -> torch.Tensor:
        return PolynomialCutoff.envelope(lengths, self.r_max, self.p)

    def forward(self, lengths: torch.Tensor) -> torch.Tensor:
        r = lengths.reshape(-1)
        i, w = cubic_bspline_table(r / self.r_max, self.num_knots)
        rows = self.coefficients.to(w.dtype)[i[:, None] + self.offsets]  # (E, 4, O): the lookup
        values = torch.einsum("ea,eao->eo", w, rows)
        return values * self.envelope(r)[:, None]

    def extra_repr(self) -> str:
        return f"r_max={self.r_max}, num_knots={self.num_knots}, num_out={self.num_out}, p={self.p}"


class SplineBasis(nn.Module):
    r"""The dense spline basis :math:`B_k(r/r_{max}) f_p(r/r_{max})`, ``(E, 1) -> (E, num_knots + 3)``.

    A radial embedding with the interface of :class:`mlpot.nn.radial.RadialEmbeddingBlock`
    (``forward``, ``radial_and_envelope``, ``envelope``, ``out_dim``); it has no fused kernel.
    """

    def __init__(self, r_max: float, num_knots: int, p: int = 5):
        super().__init__()
        if int(num_knots) < 1:
            raise ConfigError(f"spline radial: num_knots must be >= 1, got {num_knots}")
        self.r_max, self.num_knots, self.p = float(r_max), int(num_knots), int(p)
        self.out_dim = self.num_knots + 3

    def envelope(self, lengths: torch.Tensor) -> torch.Tensor:
        return PolynomialCutoff.envelope(lengths, self.r_max, self.p)

    def basis(self, lengths: torch.Tensor) -> torch.Tensor:
        """``(E, 1) -> (E, num_knots + 3)``: the B-splines without the envelope."""
        r = lengths.reshape(-1)
        i, w = cubic_bspline_table(r / self.r_max, self.num_knots)
        out = r.new_zeros(r.shape[0], self.out_dim + 3)
        out = out.scatter(1, i[:, None] + torch.arange(4, device=r.device), w)
        return out[:, : self.out_dim]

    def radial_and_envelope(self, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        env = self.envelope(lengths)
        return self.basis(lengths) * env, env

    def forward(self, lengths: torch.Tensor) -> torch.Tensor:
        return self.radial_and_envelope(lengths)[0]

    def extra_repr(self) -> str:
        return f"r_max={self.r_max}, num_knots={self.num_knots}, p={self.p}"


class _MLPEdgeRadial(nn.Module):
    """``MLP(edge_feats)``: Linear - SiLU - Linear (eSCN's radial network)."""

    def __init__(self, num_in: int, hidden: int, num_out: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(num_in, hidden), nn.SiLU(), nn.Linear(hidden, num_out))

    def forward(self, lengths: torch.Tensor, edge_feats: torch.Tensor) -> torch.Tensor:
        return self.net(edge_feats)


class _SplineEdgeRadial(SplineRadial):
    """:class:`SplineRadial` of the lengths; the other edge features are not read."""

    def forward(self, lengths: torch.Tensor, edge_feats: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(lengths)


def make_edge_radial(kind: str, num_out: int, *, num_in: int, hidden: int, r_max: float, num_knots: int,
                     p: int = 5) -> nn.Module:
    r"""The radial network of one layer: ``module(lengths (E, 1), edge_feats (E, num_in)) -> (E, num_out)``.

    ``mlp``: Linear(num_in, hidden) - SiLU - Linear(hidden, num_out) of the edge features (radial
    basis x envelope and element embeddings); ``spline``: :class:`SplineRadial` of the lengths
    (``num_knots`` intervals, envelope order ``p``).
    """
    if kind == "mlp":
        return _MLPEdgeRadial(num_in, hidden, num_out)
    if kind == "spline":
        return _SplineEdgeRadial(r_max, num_knots, num_out, p)
    raise ConfigError(f"radial must be one of {', '.join(RADIAL_KINDS)}, got {kind!r}")
