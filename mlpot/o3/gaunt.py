r"""Gaunt tensor products: products of spherical functions, computed on grids.

The Gaunt product
-----------------
Coefficients ``x`` (``(..., (L+1)**2)``, e3nn real basis, "component" normalization, l-major,
``m = -l..l``) describe :math:`f(\hat r) = \sum_{lm} x_{lm} Y_{lm}(\hat r)`. Since
:math:`\int Y_{lm} Y_{l'm'} d\Omega = 4\pi\delta\delta`, the coefficients of the pointwise
product truncated at :math:`l_{out}` are

.. math::  z_{l_3 m_3} = \frac{1}{4\pi}\int_{S^2} f_1 f_2\, Y_{l_3 m_3}\, d\Omega
           = \sum G^{l_3 m_3}_{l_1 m_1, l_2 m_2}\, x^{(1)}_{l_1 m_1} x^{(2)}_{l_2 m_2},
           \qquad G = \frac{1}{4\pi}\int Y_{l_1 m_1} Y_{l_2 m_2} Y_{l_3 m_3}\, d\Omega .

:math:`G` is the Clebsch-Gordan tensor restricted to :math:`l_1 + l_2 + l_3` even, with one
fixed scalar per :math:`(l_1, l_2, l_3)`: a Gaunt product has one path per allowed
:math:`(l_1, l_2, l_3)` with :math:`l_1+l_2+l_3` even and no odd paths (e.g. no cross
product :math:`1 \otimes 1 \to 1`), i.e. fewer paths than a full CG product.

Instead of contracting :math:`G` (cost :math:`O(L^6)`), both methods here go through a grid
(:mod:`mlpot.o3.s2grid`) at cost :math:`O(L^3)`:

* ``method="grid"``: Gauss-Legendre x uniform grid on the sphere; exact when
  ``n_theta = ceil((L1+L2+lout+1)/2)``, ``n_phi >= L1+L2+lout+1``.
* ``method="fourier"``: exact change of basis to 2D Fourier coefficients on the
  :math:`(\theta, \varphi)` torus, 2D convolution by FFT, exact projection back.

Parities ("all-parities" construction)
--------------------------------------
Under inversion an irrep :math:`(l, p)` is multiplied by :math:`p`. Call it *even-type* if
:math:`p = (-1)^l` (its spherical function transforms like a scalar field, e.g. ``0e, 1o, 2e``)
and *odd-type* if :math:`p = -(-1)^l` (a pseudo-scalar field, e.g. ``0o, 1e, 2o``). A product
of two functions of types :math:`t_1, t_2` has type :math:`t_1 \oplus t_2`. A Gaunt layer on
features of both parities therefore splits each input into its even-type and odd-type parts
(two dense ``(C, (L+1)^2)`` arrays), runs the products (ee, eo, oe, oo -- those whose parts
exist) and concatenates their outputs with the right parities.
"""
from __future__ import annotations

import math

import torch
from e3nn import o3
from torch import nn

from mlpot.errors import ConfigError
from mlpot.o3.backend import implementation
from mlpot.o3.message_passing import EdgeGeometry, MessageTensorProduct
from mlpot.o3.product_basis import ProductBasis
from mlpot.o3.s2grid import S2Grid, TorusFourierGrid, lmax_from_dim, s2_grid_size, torus_grid_size

__all__ = [
    "GauntMessageTP",
    "GauntProductBasis",
    "GauntTensorProduct",
    "gaunt_paths",
    "gaunt_product",
    "grid_matrices",
    "grid_product",
    "product_grid",
    "weighted_gaunt_product",
]

_METHODS = ("grid", "fourier")
_GRID_CACHE: dict = {}


#: S2 grids with at most this many points use the dense-matrix transforms (one BLAS call each
#: way); larger ones the Legendre + FFT transforms. On a 2-core CPU the dense form was 3.5-5x
#: faster (forward and backward of a product) for every two-factor grid up to L = 10
#: (16 x 31 = 496 points); the FFT form wins asymptotically, O(L^3) against O(L^4).
DENSE_GRID_MAX_POINTS = 512


def product_grid(method: str, lmax_factors, lmax_out: int, impl: str = "auto") -> nn.Module:
    """A new grid module exact for the product of factors of degrees ``lmax_factors``
    projected to degrees ``<= lmax_out`` (``S2Grid`` or ``TorusFourierGrid``).

    ``impl`` (S2 grid only): ``"fft"``, ``"matrix"`` or ``"auto"`` (dense matrices up to
    :data:`DENSE_GRID_MAX_POINTS` grid points)."""
    lmax_factors = [int(l) for l in lmax_factors]
    lmax = max(lmax_factors + [int(lmax_out)])
    if method == "grid":
        n_theta, n_phi = s2_grid_size(lmax_factors, lmax_out)
        if impl == "auto":
            impl = "matrix" if n_theta * n_phi <= DENSE_GRID_MAX_POINTS else "fft"
        return S2Grid(lmax, n_theta, n_phi, impl=impl)
    if method == "fourier":
        n_u, n_v = torus_grid_size(lmax_factors, lmax_out)
        return TorusFourierGrid(lmax, n_u, n_v)
    raise ValueError(f"method must be one of {_METHODS}, got {method!r}")


def grid_product(grid: nn.Module, a: torch.Tensor, b: torch.Tensor, lmax_out: int) -> torch.Tensor:
    r"""Coefficient-first Gaunt product on ``grid``: ``a (D1, *batch)``, ``b (D2, *batch)`` ->
    ``((lmax_out+1)^2, *batch)``, :math:`P\big((B_1 a) \odot (B_2 b)\big)` with the grid's to-grid
    maps :math:`B` and projection :math:`P`. The reference of the registry op ``gaunt_product``."""
    return grid.from_grid_cf(grid.to_grid_cf(a) * grid.to_grid_cf(b), lmax_out)


def grid_matrices(grid: nn.Module, lmax1: int, lmax2: int, lmax_out: int, dtype, device):
    """The grid's transforms as dense matrices ``(B1 (D1, G), B2 (D2, G), P (G, D_out))``.

    Both grids (:class:`S2Grid`, :class:`TorusFourierGrid`) are linear maps between coefficients
    and ``G`` grid values, so :func:`grid_product` is ``((a^T B1) * (b^T B2)) P``: the form the
    Triton kernel takes. Computed once per grid, degrees, dtype and device (float64, then cast).
    """
    cache = grid.__dict__.setdefault("_dense_matrices", {})
    key = (int(lmax1), int(lmax2), int(lmax_out), dtype, str(device))
    if key not in cache:
        with torch.no_grad():
            ref = next(iter(grid.buffers()))

            def to_grid(L):
                eye = torch.eye((L + 1) ** 2, dtype=ref.dtype, device=ref.device)
                f = grid.to_grid_cf(eye)
                return f.reshape(-1, eye.shape[0]).t()

            B1, B2 = to_grid(lmax1), to_grid(lmax2)
            G = B1.shape[1]
            shape = grid.to_grid_cf(torch.zeros(1, 1, dtype=ref.dtype, device=ref.device)).shape[:2]
            P = grid.from_grid_cf(torch.eye(G, dtype=ref.dtype, device=ref.device).reshape(*shape, G), lmax_out).t()
            cache[key] = tuple(m.to(device=device, dtype=dtype).contiguous() for m in (B1, B2, P))
    return cache[key]


def grid_product_triton(grid: nn.Module, a: torch.Tensor, b: torch.Tensor, lmax_out: int) -> torch.Tensor:
    """:func:`grid_product` by the fused Triton kernel (registry op ``gaunt_product``, ``triton``).

    ``a (D1, C, *rest)``, ``b (D2, C, *rest)``; the kernel's layout is ``(rest, C, D)`` (converted here).
    """
    kernel = implementation("gaunt_product", "triton")
    D1, D2 = a.shape[0], b.shape[0]
    batch = torch.broadcast_shapes(a.shape[1:], b.shape[1:])
    C = batch[0]
    X = a.expand(D1, *batch).reshape(D1, C, -1).permute(2, 1, 0)
    Z = b.expand(D2, *batch).reshape(D2, C, -1).permute(2, 1, 0)
    mats = grid_matrices(grid, lmax_from_dim(D1), lmax_from_dim(D2), lmax_out, a.dtype, a.device)
    out = kernel(X.contiguous(), Z.contiguous(), lmax_out, matrices=mats)  # (B, C, D_out)
    return out.permute(2, 1, 0).reshape(out.shape[-1], *batch)


def _cached_grid(method, L1, L2, lmax_out, dtype, device):
    key = (method, L1, L2, lmax_out, dtype, str(device))
    grid = _GRID_CACHE.get(key)
    if grid is None:
        grid = product_grid(method, [L1, L2], lmax_out).to(device=device, dtype=dtype)
        _GRID_CACHE[key] = grid
    return grid


def gaunt_product(x1: torch.Tensor, x2: torch.Tensor, lmax_out: int, method: str = "grid") -> torch.Tensor:
    r"""Coefficients of the pointwise product :math:`f_1 f_2`, truncated at ``lmax_out``.

    Args:
        x1: ``(..., (L1+1)^2)`` coefficients of :math:`f_1`.
        x2: ``(..., (L2+1)^2)`` coefficients of :math:`f_2`; leading dims broadcast with ``x1``.
        lmax_out: largest output degree (any value; degrees above ``L1+L2`` come out zero).
        method: ``"grid"`` (Gauss-Legendre x FFT sphere grid) or ``"fourier"`` (2D Fourier).

    Returns:
        ``(..., (lmax_out+1)^2)``: :math:`z_{lm} = \frac{1}{4\pi}\int f_1 f_2 Y_{lm}\, d\Omega`,
        exact (to rounding) for every ``lmax_out``. No weights. Differentiable to any order.
    """
    if not (x1.is_floating_point() and x2.is_floating_point()):
        raise TypeError("gaunt_product needs floating-point inputs")
    if x1.dtype != x2.dtype:
        raise TypeError(f"gaunt_product: dtype mismatch {x1.dtype} vs {x2.dtype}")
    L1, L2 = lmax_from_dim(x1.shape[-1]), lmax_from_dim(x2.shape[-1])
    lmax_out = int(lmax_out)
    if lmax_out < 0:
        raise ValueError("lmax_out must be >= 0")
    grid = _cached_grid(method, L1, L2, lmax_out, x1.dtype, x1.device)
    # coefficient-first layout; equal ranks so that the batch dims broadcast
    rank = max(x1.dim(), x2.dim())
    x1 = x1.reshape((1,) * (rank - x1.dim()) + x1.shape).movedim(-1, 0)
    x2 = x2.reshape((1,) * (rank - x2.dim()) + x2.shape).movedim(-1, 0)
    z = grid.from_grid_cf(grid.to_grid_cf(x1) * grid.to_grid_cf(x2), lmax_out)
    return z.movedim(0, -1)


def _degree_index(L: int) -> torch.Tensor:
    return torch.tensor([l for l in range(L + 1) for _ in range(2 * l + 1)])


def weighted_gaunt_product(
    x1: torch.Tensor,
    x2: torch.Tensor,
    lmax_out: int,
    w1: torch.Tensor | None = None,
    w2: torch.Tensor | None = None,
    w_out: torch.Tensor | None = None,
    method: str = "grid",
) -> torch.Tensor:
    r"""Channelwise Gaunt product with weights per channel and degree (one parity type).

    .. math:: z_{c, l_3 m_3} = w^{out}_{c l_3} \sum G^{l_3 m_3}_{l_1 m_1, l_2 m_2}
              (w^{1}_{c l_1} x^{(1)}_{c l_1 m_1}) (w^{2}_{c l_2} x^{(2)}_{c l_2 m_2})

    so path :math:`(l_1, l_2, l_3)` gets the rank-one weight :math:`w^1_{l_1} w^2_{l_2}
    w^{out}_{l_3}` per channel.

    Shapes: ``x1 (..., C, (L1+1)^2)``, ``x2 (..., C or 1, (L2+1)^2)``, ``w1 (..., C, L1+1)``,
    ``w2 (..., C, L2+1)``, ``w_out (..., C, lmax_out+1)`` (each optional = ones, leading dims
    broadcast). Returns ``(..., C, (lmax_out+1)^2)``.
    """
    L1, L2 = lmax_from_dim(x1.shape[-1]), lmax_from_dim(x2.shape[-1])
    if w1 is not None:
        x1 = x1 * w1[..., _degree_index(L1).to(w1.device)]
    if w2 is not None:
        x2 = x2 * w2[..., _degree_index(L2).to(w2.device)]
    z = gaunt_product(x1, x2, lmax_out, method=method)
    if w_out is not None:
        z = z * w_out[..., _degree_index(int(lmax_out)).to(w_out.device)]
    return z


def gaunt_paths(degrees1, degrees2, lmax_out: int) -> list[tuple[int, int, int]]:
    """All ``(l1, l2, l3)`` with a nonzero Gaunt coefficient: ``|l1-l2| <= l3 <= min(l1+l2,
    lmax_out)`` and ``l1+l2+l3`` even."""
    return [
        (l1, l2, l3)
        for l1 in sorted(set(degrees1))
        for l2 in sorted(set(degrees2))
        for l3 in range(abs(l1 - l2), min(l1 + l2, lmax_out) + 1)
        if (l1 + l2 + l3) % 2 == 0
    ]


def _parity_type(ir: o3.Irrep) -> int:
    """0 for even-type (p == (-1)^l), 1 for odd-type."""
    return 0 if ir.p == (-1) ** ir.l else 1


def _irrep_of(l: int, t: int) -> o3.Irrep:
    return o3.Irrep(l, (-1) ** l if t == 0 else -((-1) ** l))


def _split_irreps(irreps: o3.Irreps, name: str):
    """Check a uniform-multiplicity irreps and split it by parity type.

    Returns ``(mul, parts)`` with ``parts[t] = [(block_index, l, offset)]`` sorted by ``l``.
    """
    irreps = o3.Irreps(irreps)
    if len(irreps) == 0:
        raise ValueError(f"{name} is empty")
    muls = {mul for mul, _ in irreps}
    if len(muls) != 1:
        raise ValueError(f"{name} must have one multiplicity for all irreps, got {irreps}")
    seen = set()
    parts = {0: [], 1: []}
    offset = 0
    for b, (mul, ir) in enumerate(irreps):
        if ir in seen:
            raise ValueError(f"{name}: irrep {ir} appears twice in {irreps}")
        t = _parity_type(ir)
        if any(l == ir.l for _, l, _ in parts[t]):
            raise ValueError(f"{name}: degree {ir.l} appears twice with the same parity type")
        seen.add(ir)
        parts[t].append((b, ir.l, offset))
        offset += mul * ir.dim
    for part in parts.values():
        part.sort(key=lambda e: e[1])
    return muls.pop(), parts


def _dense_gather_index(mul: int, part, dim: int) -> tuple[torch.Tensor, int]:
    """Index ``(mul, (L+1)^2)`` mapping a dense ``(mul, (L+1)^2)`` array of one parity type
    to the mul_ir vector (index ``dim`` = an appended zero)."""
    L = max(l for _, l, _ in part)
    idx = torch.full((mul, (L + 1) ** 2), dim, dtype=torch.long)
    for _, l, off in part:
        for c in range(mul):
            for m in range(2 * l + 1):
                idx[c, l * l + m] = off + c * (2 * l + 1) + m
    return idx, L


def _dense_weight_index(mul: int, part, n_blocks: int) -> torch.Tensor:
    """Index ``(mul, (L+1)^2)`` into a flattened ``(mul, n_blocks)`` weight (+1 zero pad)."""
    L = max(l for _, l, _ in part)
    idx = torch.full((mul, (L + 1) ** 2), mul * n_blocks, dtype=torch.long)
    for b, l, _ in part:
        for c in range(mul):
            idx[c, l * l : (l + 1) ** 2] = c * n_blocks + b
    return idx


def _rows_pad(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[idx]`` along dim 0 with index ``x.shape[0]`` meaning zero."""
    return torch.cat([x, x.new_zeros(1, *x.shape[1:])], 0)[idx]


class GauntTensorProduct(nn.Module):
    r"""Channelwise, weighted, all-parities Gaunt tensor product in e3nn ``mul_ir`` layout.

    Args:
        irreps_in1: ``C x`` irreps, one multiplicity ``C`` for all, each irrep at most once
            (e.g. ``"32x0e + 32x1o + 32x1e + 32x2e"``).
        irreps_in2: same rules with multiplicity ``C`` or ``1`` (``1`` broadcasts over channels,
            e.g. edge spherical harmonics ``"1x0e + 1x1o + 1x2e"``).
        lmax_out: largest output degree.
        filter_ir_out: optional iterable of irreps; only these output irreps are produced.
        method: ``"grid"`` or ``"fourier"``.
        internal_weights: hold the weights as a parameter (initialised to ones); otherwise
            ``forward`` needs ``weight``.

    Weights, per channel ``c`` (layout of the flat ``weight`` of size ``weight_numel``):
    ``w1 (C, n1)`` for the ``n1`` irreps of ``irreps_in1`` (in its order), then
    ``w2 (C, n2)`` for ``irreps_in2``, then ``w_out (C, n_out)`` for the output blocks listed in
    ``self.out_blocks`` (``(t1, t2, l3)``, one per product path type and degree). Each row-major.

    .. math:: z^{(t_1 t_2)}_{c, l_3} = w^{out}_{c,(t_1 t_2 l_3)}\,
        \Big[\mathrm{Gaunt}\big(\textstyle\sum_{l_1} w^1_{c,l_1} x^{(1, t_1)}_{c, l_1},\
        \sum_{l_2} w^2_{c,l_2} x^{(2,t_2)}_{c, l_2}\big)\Big]_{l_3}

    with :math:`x^{(i,t)}` the type-:math:`t` part of input :math:`i`; the output irrep of
    block :math:`(t_1, t_2, l_3)` is :math:`(l_3, (-1)^{l_3} (-1)^{t_1 + t_2})`. Only degrees
    :math:`l_3` reached by some path with :math:`l_1 + l_2 + l_3` even are kept.
    ``irreps_out`` lists the blocks sorted by irrep (blocks of the same irrep are adjacent
    and merged, e.g. ``64x0e`` = ee-channels then oo-channels).

    ``forward(x1 (..., irreps_in1.dim), x2 (..., irreps_in2.dim), weight=None)`` with ``weight``
    ``(..., weight_numel)`` (leading dims broadcast) returns ``(..., irreps_out.dim)``.
    """

    def __init__(
        self,
        irreps_in1,
        irreps_in2,
        lmax_out: int,
        filter_ir_out=None,
        method: str = "grid",
        internal_weights: bool = True,
        backend: str = "reference",
    ):
        super().__init__()
        self.backend = str(backend)
        if method not in _METHODS:
            raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
        self.irreps_in1, self.irreps_in2 = o3.Irreps(irreps_in1), o3.Irreps(irreps_in2)
        self.lmax_out, self.method = int(lmax_out), method
        C, parts1 = _split_irreps(self.irreps_in1, "irreps_in1")
        C2, parts2 = _split_irreps(self.irreps_in2, "irreps_in2")
        if C2 not in (1, C):
            raise ValueError(f"irreps_in2 multiplicity must be 1 or {C}, got {C2}")
        self.mul, self.mul2 = C, C2
        n1, n2 = len(self.irreps_in1), len(self.irreps_in2)
        allowed = None if filter_ir_out is None else {o3.Irrep(ir) for ir in filter_ir_out}
        self.types1 = [t for t in (0, 1) if parts1[t]]
        self.types2 = [t for t in (0, 1) if parts2[t]]
        self.lmax1 = {t: max(l for _, l, _ in parts1[t]) for t in self.types1}
        self.lmax2 = {t: max(l for _, l, _ in parts2[t]) for t in self.types2}
        for t in self.types1:
            idx, _ = _dense_gather_index(C, parts1[t], self.irreps_in1.dim)
            self.register_buffer(f"_x1_idx{t}", idx.T.contiguous(), persistent=False)
            self.register_buffer(f"_w1_idx{t}", _dense_weight_index(C, parts1[t], n1).T.contiguous(), persistent=False)
        for t in self.types2:
            idx, _ = _dense_gather_index(C2, parts2[t], self.irreps_in2.dim)
            self.register_buffer(f"_x2_idx{t}", idx.T.contiguous(), persistent=False)
            self.register_buffer(f"_w2_idx{t}", _dense_weight_index(C, parts2[t], n2).T.contiguous(), persistent=False)
        # paths and output blocks
        self.paths = []  # (t1, t2, lmax of this product)
        blocks = []  # (irrep, t1, t2, l3)
        for t1 in self.types1:
            for t2 in self.types2:
                t = t1 ^ t2
                l3s = sorted(
                    {
                        l3
                        for _, _, l3 in gaunt_paths(
                            [l for _, l, _ in parts1[t1]], [l for _, l, _ in parts2[t2]], self.lmax_out
                        )
                        if allowed is None or _irrep_of(l3, t) in allowed
                    }
                )
                if l3s:
                    self.paths.append((t1, t2, max(l3s)))
                    blocks += [(_irrep_of(l3, t), t1, t2, l3) for l3 in l3s]
        if not blocks:
            raise ValueError("GauntTensorProduct: no output irreps (check lmax_out / filter_ir_out)")
        blocks.sort(key=lambda b: (b[0].l, -b[0].p * (-1) ** b[0].l, b[1], b[2]))
        self.out_blocks = [(t1, t2, l3) for _, t1, t2, l3 in blocks]
        irreps = []
        for ir, *_ in blocks:
            if irreps and irreps[-1][1] == ir:
                irreps[-1] = (irreps[-1][0] + C, ir)
            else:
                irreps.append((C, ir))
        self.irreps_out = o3.Irreps(irreps)
        # output gather: from the concatenation of all path outputs (..., C*(Lp+1)^2 per path)
        path_offset, off = {}, 0
        for t1, t2, Lp in self.paths:
            path_offset[(t1, t2)] = (off, Lp)
            off += C * (Lp + 1) ** 2
        out_idx, wout_idx = [], []
        n_out = len(self.out_blocks)
        for b, (t1, t2, l3) in enumerate(self.out_blocks):
            o, Lp = path_offset[(t1, t2)]
            for c in range(C):
                for m in range(2 * l3 + 1):
                    out_idx.append(o + (l3 * l3 + m) * C + c)  # path rows are (lm, channel)
                    wout_idx.append(c * n_out + b)
        self.register_buffer("_out_idx", torch.tensor(out_idx), persistent=False)
        self.register_buffer("_wout_idx", torch.tensor(wout_idx), persistent=False)
        self.weight_sizes = (C * n1, C * n2, C * n_out)
        self.weight_numel = sum(self.weight_sizes)
        self.internal_weights = internal_weights
        if internal_weights:
            self.weight = nn.Parameter(torch.ones(self.weight_numel))
        else:
            self.register_parameter("weight", None)
        self.grids = nn.ModuleDict()
        for t1, t2, Lp in self.paths:
            key = f"{t1}{t2}"
            self.grids[key] = product_grid(method, [self.lmax1[t1], self.lmax2[t2]], Lp)

    def extra_repr(self) -> str:
        return (
            f"{self.irreps_in1} x {self.irreps_in2} -> {self.irreps_out} | method={self.method!r}, "
            f"weight_numel={self.weight_numel}"
        )

    def num_paths(self) -> int:
        """Number of ``(l1, l2, l3)`` Gaunt paths per channel (including parity variants)."""
        return sum(
            len(
                [
                    p
                    for p in gaunt_paths(
                        [ir.l for _, ir in self.irreps_in1 if _parity_type(ir) == t1],
                        [ir.l for _, ir in self.irreps_in2 if _parity_type(ir) == t2],
                        Lp,
                    )
                    if (t1, t2, p[2]) in self.out_blocks
                ]
            )
            for t1, t2, Lp in self.paths
        )

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        if weight is None:
            if self.weight is None:
                raise ValueError("GauntTensorProduct(internal_weights=False) needs `weight`")
            weight = self.weight
        if weight.shape[-1] != self.weight_numel:
            raise ValueError(f"weight last dim must be {self.weight_numel}, got {tuple(weight.shape)}")
        lead = torch.broadcast_shapes(x1.shape[:-1], x2.shape[:-1], weight.shape[:-1])
        # coefficient-first layout: (dim, *lead); dense parts are ((L+1)^2, C, *lead)
        x1 = x1.expand(*lead, x1.shape[-1]).movedim(-1, 0)
        x2 = x2.expand(*lead, x2.shape[-1]).movedim(-1, 0)
        weight = weight.expand(*lead, weight.shape[-1]).movedim(-1, 0)
        s1, s2, _ = self.weight_sizes
        w1, w2, wo = weight[:s1], weight[s1 : s1 + s2], weight[s1 + s2 :]
        product = grid_product
        if self.backend != "reference":
            from mlpot.o3.backend import select_backend

            if select_backend("gaunt_product", self.backend, x1.device) == "triton":
                product = grid_product_triton
        values = []
        for t1, t2, Lp in self.paths:
            grid = self.grids[f"{t1}{t2}"]
            a = _rows_pad(x1, getattr(self, f"_x1_idx{t1}")) * _rows_pad(w1, getattr(self, f"_w1_idx{t1}"))
            b = _rows_pad(x2, getattr(self, f"_x2_idx{t2}")) * _rows_pad(w2, getattr(self, f"_w2_idx{t2}"))
            z = product(grid, a, b, Lp)  # ((Lp+1)^2, C, *lead)
            values.append(z.reshape(-1, *lead))
        z = torch.cat(values, 0)  # (sum_p (Lp+1)^2 C, *lead)
        return (z[self._out_idx] * wo[self._wout_idx]).movedim(0, -1)


class GauntMessageTP(MessageTensorProduct):
    r"""Edge message :math:`m_e = \mathrm{Gaunt}(x_{sender(e)}, Y(\hat r_e))` with per-edge weights,
    a drop-in for MACE's ``conv_tp`` (``interaction_tp: gaunt``).

    Args:
        irreps_in: node feature irreps, one multiplicity ``C`` (e.g. ``"32x0e + 32x1o"``).
        lmax_sh: degree of the edge spherical harmonics (parity :math:`(-1)^l`, even-type).
        irreps_out_target: only its irreps (multiplicities ignored) are produced, up to its
            largest degree -- the analogue of MACE's ``irreps_mid`` filtering.
        method: ``"grid"`` or ``"fourier"``.
        backend: ``reference | triton | auto`` for the grid products (registry op ``gaunt_product``).

    Call ``(x_sender (E, irreps_in.dim), edge_sh (E, (lmax_sh+1)^2), weights (E, weight_numel))
    -> (E, irreps_out.dim)``. ``edge_sh`` are e3nn component-normalized SH of the edge vectors.
    ``weights`` are the per-edge radial weights, laid out as in :class:`GauntTensorProduct`:
    ``C x n_in`` (per channel and input irrep), ``C x (lmax_sh+1)`` (per channel and SH
    degree), ``C x n_out`` (per channel and output block), so a path
    :math:`(l_1, l_2, l_3)` gets :math:`w^1_{c l_1} w^2_{c l_2} w^{out}_{c l_3}`.
    ``irreps_out`` lists what comes out (e.g. ``C x 0e + C x 1o + C x 2e + ...``); Gaunt
    products of even-type inputs give only even-type outputs (no ``1e`` from ``1o x 1o``),
    so there are fewer outputs and paths than with a full CG product.
    """

    op = "gaunt_product"

    def __init__(self, irreps_in, lmax_sh: int, irreps_out_target, method: str = "grid", backend: str = "reference"):
        super().__init__(backend)
        if method not in _METHODS:
            raise ConfigError(f"Gaunt method must be one of {', '.join(_METHODS)}, got {method!r}")
        self.method = method
        self.check_backend(method=method)
        target = o3.Irreps(irreps_out_target)
        self.irreps_in = o3.Irreps(irreps_in)
        self.irreps_sh = o3.Irreps.spherical_harmonics(int(lmax_sh))
        self.tp = GauntTensorProduct(
            self.irreps_in,
            self.irreps_sh,
            lmax_out=max(ir.l for _, ir in target),
            filter_ir_out=[ir for _, ir in target],
            method=method,
            internal_weights=False,
            backend=backend,
        )
        self.irreps_out = self.tp.irreps_out
        self.weight_numel = self.tp.weight_numel

    #: Most grid values (edges x channels x grid points, summed over the products and counting
    #: both factors and their product) one chunk of edges may hold: 2^24 (128 MiB in float64).
    #: Larger edge sets are processed in chunks, and when gradients are recorded each chunk
    #: is recomputed in the backward pass (activation checkpointing), so a force call on a
    #: large cell keeps one chunk of grids in memory instead of all of them.
    max_chunk_values: int = 2**24

    def grid_values_per_edge(self) -> int:
        """Grid values one edge holds: both factors and their product, per channel and product."""
        points = 0
        for grid in self.tp.grids.values():
            points += grid.n_theta * grid.n_phi if hasattr(grid, "n_theta") else grid.n_u * grid.n_v
        return 3 * self.tp.mul * points

    def edges_per_chunk(self) -> int:
        return max(1, int(self.max_chunk_values) // max(1, self.grid_values_per_edge()))

    def forward(self, x_sender: torch.Tensor, edge_sh: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        n_edges, chunk = x_sender.shape[0], self.edges_per_chunk()
        if n_edges <= chunk:
            return self.tp(x_sender, edge_sh, weights)
        from torch.utils.checkpoint import checkpoint

        out = []
        for start in range(0, n_edges, chunk):
            part = (x_sender[start : start + chunk], edge_sh[start : start + chunk], weights[start : start + chunk])
            if torch.is_grad_enabled():
                out.append(checkpoint(self.tp, *part, use_reentrant=False))
            else:
                out.append(self.tp(*part))
        return torch.cat(out, 0)

    def edge_product(self, x_sender: torch.Tensor, geometry: EdgeGeometry, weights: torch.Tensor) -> torch.Tensor:
        return self.forward(x_sender, geometry.require("sh", "GauntMessageTP"), weights)

    def message_passing(self, node_feats, edge_geometry, weights, sender, receiver, num_nodes: int):
        """Gather, Gaunt product and sum over receivers, fused per chunk of edges.

        Edges go in chunks of :meth:`edges_per_chunk`; with gradients recorded, each chunk (gather,
        grid product, scatter) is recomputed in the backward pass, so neither the per-edge grids
        nor the per-edge messages exist for all edges at once.
        """
        n_edges, chunk = sender.shape[0], self.edges_per_chunk()
        dim = self.irreps_out.dim
        edge_sh = edge_geometry.require("sh", "GauntMessageTP")

        def part(x, sh, w, snd, rcv):
            m = self.tp(x.index_select(0, snd), sh, w)
            return x.new_zeros(num_nodes, dim).index_add(0, rcv, m)

        if n_edges == 0:
            return node_feats.new_zeros(num_nodes, dim) + 0.0 * weights.sum()
        if n_edges <= chunk:
            return part(node_feats, edge_sh, weights, sender, receiver)
        from torch.utils.checkpoint import checkpoint

        out = None
        for start in range(0, n_edges, chunk):
            sl = slice(start, start + chunk)
            args = (node_feats, edge_sh[sl], weights[sl], sender[sl], receiver[sl])
            y = checkpoint(part, *args, use_reentrant=False) if torch.is_grad_enabled() else part(*args)
            out = y if out is None else out + y
        return out


class GauntProductBasis(ProductBasis):
    r"""Gaunt many-body product: a replacement for MACE's symmetric contraction (``product: gaunt``).

    Args:
        irreps_in: atomic-basis irreps, one multiplicity ``C``, each degree once
            (e.g. ``"C x 0e + C x 1o + C x 2e + C x 3o"``); ``node_feats`` holds them as
            ``(N, C, sum_l (2l+1))`` in the order of ``irreps_in`` (MACE's reshaped layout).
        irreps_out: output irreps with multiplicity ``C`` each (e.g. ``"C x 0e + C x 1o"``).
        correlation: largest body order :math:`\nu`.
        num_elements: length of the one-hot ``node_attrs``.
        method: ``"grid"`` or ``"fourier"``.

    Math. Let :math:`A = A^e + A^o` be the node's basis split by parity type (the degrees of
    ``irreps_in`` are even-type or odd-type), :math:`z` the element weights
    (:math:`W[z] = \sum_k \mathrm{attrs}_k W[k]`, a row lookup for one-hot attributes).
    For each :math:`\nu = 1..\text{correlation}` with per-(element, channel, input irrep)
    weights :math:`a^{(\nu)}`, on the grid

    .. math:: p_\nu = \big(\textstyle\sum_l a^{(\nu)}_{l} (A^e_l + A^o_l)\big)^\nu, \qquad
              q_\nu = \big(\textstyle\sum_l a^{(\nu)}_{l} (A^e_l - A^o_l)\big)^\nu .

    The even-type part :math:`(p_\nu + q_\nu)/2` (monomials with an even number of odd
    factors) feeds even-type outputs, the odd-type part :math:`(p_\nu - q_\nu)/2` feeds
    odd-type outputs: an output irrep :math:`(l, p)` is

    .. math:: B_{c, lm} = \sum_\nu b^{(\nu)}_{z, c, (l,p)}\
              \frac{1}{4\pi}\int \frac{p_\nu \pm q_\nu}{2}\, Y_{lm}\, d\Omega .

    Under inversion :math:`A^o \mapsto -A^o(-\hat r)` swaps :math:`p \leftrightarrow q`, so these
    transform with the parities stated (tested with reflections). Without odd-type inputs,
    odd-type outputs cannot be produced and raise ``ValueError``.
    Weights: ``weights_in (correlation, num_elements, C, n_in)`` (init 1) and
    ``weights_out (correlation, num_elements, C, n_out)`` (init normal / sqrt(correlation)).
    The grid is exact for degree ``correlation * L_in + l_out``.

    ``forward(node_feats (N, C, sum (2l+1)), node_attrs (N, num_elements)) -> (N, irreps_out.dim)``
    in e3nn ``mul_ir`` layout, the call signature of MACE's ``SymmetricContraction``.

    ``backend: triton`` (registry op ``gaunt_product``) computes the power
    :math:`f^\nu` as a chain of exact two-factor Gaunt products
    :math:`f^{k} = \mathrm{Gaunt}(f^{k-1}, f)` projected to degree :math:`kL` (the last one to
    the output degrees), each on its own exact grid: the same numbers, to rounding.
    """

    op = "gaunt_product"

    def __init__(self, irreps_in, irreps_out, correlation: int, num_elements: int, method: str = "grid",
                 backend: str = "reference"):
        super().__init__(backend)
        if method not in _METHODS:
            raise ConfigError(f"Gaunt method must be one of {', '.join(_METHODS)}, got {method!r}")
        self.check_backend(method=method)
        self.irreps_in, self.irreps_out = o3.Irreps(irreps_in), o3.Irreps(irreps_out)
        self.correlation, self.num_elements, self.method = int(correlation), int(num_elements), method
        if self.correlation < 1:
            raise ValueError("correlation must be >= 1")
        C, parts = _split_irreps(self.irreps_in, "irreps_in")
        if {l for _, l, _ in parts[0]} & {l for _, l, _ in parts[1]}:
            raise ValueError("irreps_in: each degree may appear once (one parity per degree)")
        self.mul = C
        for mul, _ in self.irreps_out:
            if mul != C:
                raise ValueError(f"irreps_out multiplicities must equal {C}, got {self.irreps_out}")
        self.has_odd = bool(parts[1])
        self.lmax_in = max(ir.l for _, ir in self.irreps_in)
        L = self.lmax_in
        # node_feats (N, C, sum 2l+1) -> dense (N, C, (L+1)^2); sign flips odd-type degrees
        dense_idx = torch.full(((L + 1) ** 2,), self.irreps_in.dim // C, dtype=torch.long)
        deg_block = torch.full(((L + 1) ** 2,), len(self.irreps_in), dtype=torch.long)
        sign = torch.ones((L + 1) ** 2)
        off = 0
        for b, (_, ir) in enumerate(self.irreps_in):
            dense_idx[ir.l**2 : (ir.l + 1) ** 2] = torch.arange(off, off + ir.dim)
            deg_block[ir.l**2 : (ir.l + 1) ** 2] = b
            if _parity_type(ir) == 1:
                sign[ir.l**2 : (ir.l + 1) ** 2] = -1.0
            off += ir.dim
        self.register_buffer("_dense_idx", dense_idx, persistent=False)
        self.register_buffer("_deg_block", deg_block, persistent=False)
        self.register_buffer("_odd_sign", sign, persistent=False)
        out_types = [_parity_type(ir) for _, ir in self.irreps_out]
        if 1 in out_types and not self.has_odd:
            raise ValueError(
                f"irreps_out {self.irreps_out} asks for odd-type irreps (p = -(-1)^l) but irreps_in "
                f"{self.irreps_in} has only even-type ones: a Gaunt product cannot produce them"
            )
        self.lmax_out_type = {t: max(ir.l for (_, ir), tt in zip(self.irreps_out, out_types) if tt == t)
                              for t in set(out_types)}
        lmax_out = max(ir.l for _, ir in self.irreps_out)
        self.grid = product_grid(method, [L] * self.correlation, lmax_out)
        # output gather from cat([proj_even (C,(Le+1)^2), proj_odd (C,(Lo+1)^2)]) flattened
        rows = {t: (self.lmax_out_type[t] + 1) ** 2 for t in self.lmax_out_type}
        base = {0: 0, 1: rows.get(0, 0)}
        R = sum(rows.values())
        out_idx, wout_idx = [], []
        n_out = len(self.irreps_out)
        for b, ((_, ir), t) in enumerate(zip(self.irreps_out, out_types)):
            for c in range(C):
                for m in range(ir.dim):
                    out_idx.append(c * R + base[t] + ir.l**2 + m)
                    wout_idx.append(c * n_out + b)
        self.out_types = sorted(self.lmax_out_type)
        self.register_buffer("_out_idx", torch.tensor(out_idx), persistent=False)
        self.register_buffer("_wout_idx", torch.tensor(wout_idx), persistent=False)
        n_in = len(self.irreps_in)
        self.weights_in = nn.Parameter(torch.ones(self.correlation, num_elements, C, n_in))
        self.weights_out = nn.Parameter(
            torch.randn(self.correlation, num_elements, C, n_out) / math.sqrt(self.correlation)
        )

    def extra_repr(self) -> str:
        return (
            f"{self.irreps_in} -> {self.irreps_out} | correlation={self.correlation}, "
            f"num_elements={self.num_elements}, method={self.method!r}"
        )

    def forward(self, node_feats: torch.Tensor, node_attrs: torch.Tensor) -> torch.Tensor:
        N, C = node_feats.shape[0], self.mul
        if node_feats.shape[1:] != (C, self.irreps_in.dim // C):
            raise ValueError(
                f"node_feats must be (N, {C}, {self.irreps_in.dim // C}), got {tuple(node_feats.shape)}"
            )
        # coefficient-first: A ((L+1)^2, N, C)
        A = _rows_pad(node_feats.permute(2, 0, 1), self._dense_idx)
        w_in = torch.einsum("nz,vzcb->vbnc", node_attrs, self.weights_in)  # (nu, n_in, N, C)
        w_in = torch.cat([w_in, w_in.new_zeros(w_in.shape[0], 1, *w_in.shape[2:])], 1)[:, self._deg_block]
        w_out = torch.einsum("nz,vzcb->vncb", node_attrs, self.weights_out).flatten(-2)  # (nu, N, C*n_out)
        sign = self._odd_sign[:, None, None]
        if self.backend != "reference" and self.selected_backend(node_feats.device) == "triton":
            return self._triton_powers(A, w_in, w_out, sign)
        out = 0.0
        for v in range(self.correlation):
            a = A * w_in[v]
            if self.has_odd:
                f = self.grid.to_grid_cf(torch.stack([a, a * sign], -1)) ** (v + 1)  # (grid, N, C, 2)
                parts = {0: 0.5 * (f[..., 0] + f[..., 1]), 1: 0.5 * (f[..., 0] - f[..., 1])}
            else:
                parts = {0: self.grid.to_grid_cf(a) ** (v + 1)}
            proj = torch.cat([self.grid.from_grid_cf(parts[t], self.lmax_out_type[t]) for t in self.out_types], 0)
            proj = proj.permute(1, 2, 0).reshape(N, -1)  # (N, C * R)
            out = out + proj[:, self._out_idx] * w_out[v][:, self._wout_idx]
        return out

    def _chain_grid(self, k: int) -> nn.Module:
        """Exact grid for the product of degrees ``(k-1) L`` and ``L`` (built on first use)."""
        grids = self.__dict__.setdefault("_chain_grids", {})
        if k not in grids:
            L = self.lmax_in
            lout = max(self.lmax_out_type.values()) if k == self.correlation else k * L
            grids[k] = product_grid(self.method, [(k - 1) * L, L], max(lout, k * L))
        return grids[k]

    def _triton_powers(self, A, w_in, w_out, sign):
        """The powers ``f^nu`` as chained two-factor kernel products (class doc)."""
        N, C = A.shape[1], self.mul
        L = self.lmax_in
        lmax_out = max(self.lmax_out_type.values())
        out = 0.0
        for v in range(self.correlation):
            a = A * w_in[v]  # ((L+1)^2, N, C)
            if self.has_odd:
                a = torch.cat([a, a * sign], -1)  # the two sign patterns as extra channels
            a = a.permute(0, 2, 1)  # ((L+1)^2, C', N): channels before the batch
            f = a
            for k in range(2, v + 2):
                lk = lmax_out if k == v + 1 else k * L
                f = grid_product_triton(self._chain_grid(k), f, a, lk)
            if v == 0:  # f^1: truncation to the output degrees (exact)
                f = f[: (lmax_out + 1) ** 2] if f.shape[0] >= (lmax_out + 1) ** 2 else torch.cat(
                    [f, f.new_zeros((lmax_out + 1) ** 2 - f.shape[0], *f.shape[1:])], 0)
            f = f.permute(0, 2, 1)  # ((lmax_out+1)^2, N, C')
            if self.has_odd:
                f0, f1 = f[..., :C], f[..., C:]
                parts = {0: 0.5 * (f0 + f1), 1: 0.5 * (f0 - f1)}
            else:
                parts = {0: f}
            proj = torch.cat([parts[t][: (self.lmax_out_type[t] + 1) ** 2] for t in self.out_types], 0)
            proj = proj.permute(1, 2, 0).reshape(N, -1)  # (N, C * R)
            out = out + proj[:, self._out_idx] * w_out[v][:, self._wout_idx]
        return out
