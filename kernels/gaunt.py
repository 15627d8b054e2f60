"""Gaunt tensor product on an S2 grid, fused per channel block: to-grid, pointwise product, from-grid.

Math. Features ``x1`` (N, C, D1) and ``x2`` (N, C, D2), ``D = (lmax+1)^2`` in e3nn's SH order
(channel-major: one row of spherical coefficients per channel). With a quadrature grid
``{(s_g, w_g)}`` on the sphere, ``B1[d, g] = Y_d(s_g)``, ``B2[d, g] = Y_d(s_g)`` (to-grid) and
``P[g, k] = w_g Y_k(s_g) / (4 pi)`` (from-grid projection, component normalization)::

    out[n, c, k] = sum_g P[g, k] * (sum_i x1[n, c, i] B1[i, g]) * (sum_j x2[n, c, j] B2[j, g])

i.e. ``out_k = sum_{ij} G_{ijk} x1_i x2_j`` with ``G_{ijk} = (1/4pi) int Y_i Y_j Y_k`` (the real
Gaunt coefficients in component normalization) whenever the grid integrates degree
``l1 + l2 + l_out`` exactly. The kernel takes the three matrices as inputs, so any grid and
normalization can be used; the default is :mod:`mlpot.o3`'s S2 grid (:func:`grid_matrices`).

One program = one node and a block of channels; it loops over grid chunks of ``BLOCK_G`` points
with three ``tl.dot``, so the grid values never go to global memory. The dots run on tensor cores:
float32 as ``tf32x3`` (:func:`mlpot.kernels._runtime.dot_precision`; error bound below), float64 as
``ieee``, which Triton lowers to the FP64 ``mma.sync`` (DMMA) on sm_80 and sm_90 (``mlpot bench aot``
counts it). Autotune configs are chosen per input width so that none spills (``_CFG_NARROW``,
``_CFG_WIDE``).

Error bound (float32, tf32x3; :mod:`mlpot.kernels._tf32x3`). Each tf32x3 dot of length ``K`` is
off by at most ``u(K) = 3 * 2^-22 + K * 2^-23`` times the sum of its terms' magnitudes (the split's
``3 * 2^-22``, plus float32 accumulation, which ``ieee`` float32 has too). Propagated through the
three contractions, with ``FX = |X MX|``, ``FZ = |Z MZ|`` (exact), ``dX = (u(DX) + 2^-24) |X| |MX|``,
``dZ = (u(DZ) + 2^-24) |Z| |MZ|`` (``2^-24``: the matrices rounded to float32)::

    |out~ - out|  <=  1.01 [dX (FZ + dZ) + FX dZ + (u(G) + 2^-23) (FX + dX)(FZ + dZ)] |MO|

(:func:`error_bound`; 1.01 covers the second-order terms). ``out`` is the product of the same
float32 inputs in exact arithmetic with the exact matrices. The bound is a worst case: it grows
with the cancellation in the grid projection (``|H| |MO|`` against ``|H MO|``). Relative to
``max |out|`` it is 3e-5 at the MACE message (3 x 3 -> 3, grid) and 2e-4 at the product basis's
widest step (6 x 3 -> 9, Fourier). Measured on the tf32x3 arithmetic (``tests/test_kernels_gaunt_tc.py``,
random inputs): errors of 2e-7 to 6e-7 of ``max |out|``, within 1.5x of plain float32 (``ieee``) and
about 100x below the bound, while plain TF32 errs 4e-4 and breaks it. The
gradients run on the same kernel, so the same bound holds for them with the matrices permuted.

Gradients: with ``K(X, MX, Z, MZ, MO) = ((X MX) * (Z MZ)) MO``,
``dL/dX = K(g, MO^T, Z, MZ, MX^T)`` and ``dL/dZ = K(g, MO^T, X, MX, MZ^T)``, the same kernel; so
backward and double backward are kernels too.
"""
import functools
import math

import torch

from ._runtime import LazyKernel, check_device, dot_precision, next_pow2, tl


def _grid_product_kernel(out_ptr, x_ptr, z_ptr, mx_ptr, mz_ptr, mo_ptr,
                         C, DX, DZ, G, DO,
                         BLOCK_C: tl.constexpr, DXP: tl.constexpr, DZP: tl.constexpr,
                         DOP: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_G: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    ix = tl.arange(0, DXP)
    iz = tl.arange(0, DZP)
    io = tl.arange(0, DOP)
    X = tl.load(x_ptr + (n * C + c[:, None]) * DX + ix[None, :], mask=cm[:, None] & (ix[None, :] < DX), other=0.0)
    Z = tl.load(z_ptr + (n * C + c[:, None]) * DZ + iz[None, :], mask=cm[:, None] & (iz[None, :] < DZ), other=0.0)
    acc = tl.zeros([BLOCK_C, DOP], dtype=out_ptr.dtype.element_ty)
    for g0 in range(0, G, BLOCK_G):
        gg = g0 + tl.arange(0, BLOCK_G)
        gm = gg < G
        MX = tl.load(mx_ptr + ix[:, None] * G + gg[None, :], mask=(ix[:, None] < DX) & gm[None, :], other=0.0)
        MZ = tl.load(mz_ptr + iz[:, None] * G + gg[None, :], mask=(iz[:, None] < DZ) & gm[None, :], other=0.0)
        MO = tl.load(mo_ptr + gg[:, None] * DO + io[None, :], mask=gm[:, None] & (io[None, :] < DO), other=0.0)
        FX = tl.dot(X, MX, input_precision=DOT_PRECISION)
        FZ = tl.dot(Z, MZ, input_precision=DOT_PRECISION)
        acc += tl.dot(FX * FZ, MO, input_precision=DOT_PRECISION)
    tl.store(out_ptr + (n * C + c[:, None]) * DO + io[None, :], acc, mask=cm[:, None] & (io[None, :] < DO))


# Autotune configs, chosen per operand width so that every config compiles without register spills
# for sm_80 and sm_90 in float32 (tf32x3) and float64 (`mlpot bench aot --max-spill-bytes 0`). The
# ``X``/``Z`` tiles stay in registers across the grid loop, and tf32x3 keeps a head and a tail of
# each, so inputs of padded width 64 (the product basis's ``(k-1) L`` factor) get 8 warps or
# narrower channel blocks: their 4-warp ``BLOCK_C >= 16`` / ``BLOCK_G >= 32`` tiles spilled 28-1740 B.
# The full `mlpot bench aot` run (BENCHMARKS.md) then found 4-48 B spills in some specialisations of
# (32, 64, 4 warps) narrow and (32, 16, 8) / (64, 32, 8) wide: dropped.
_CFG_NARROW = [({"BLOCK_C": bc, "BLOCK_G": bg}, w, s)
               for bc, bg, w, s in ((16, 32, 4, 2), (32, 32, 4, 2), (64, 32, 4, 3), (64, 64, 8, 3))]
_CFG_WIDE = [({"BLOCK_C": bc, "BLOCK_G": bg}, w, s)
             for bc, bg, w, s in ((16, 16, 4, 2), (32, 16, 4, 2))]
_KEY = ["C", "DX", "DZ", "G", "DO"]
_KERNEL_NARROW = LazyKernel(_grid_product_kernel, _CFG_NARROW, key=_KEY)
_KERNEL_WIDE = LazyKernel(_grid_product_kernel, _CFG_WIDE, key=_KEY)
#: padded input width above which the 8-warp / narrow-tile configs are used
_WIDE = 32


def _launch(X, Z, MX, MZ, MO):
    N, C, DX = X.shape
    DZ, G, DO = Z.shape[2], MX.shape[1], MO.shape[1]
    out = torch.empty(N, C, DO, device=X.device, dtype=X.dtype)
    if N == 0 or C == 0:
        return out.zero_()
    p = lambda d: max(16, next_pow2(d))
    grid = lambda m: (N, (C + m["BLOCK_C"] - 1) // m["BLOCK_C"])
    DXP, DZP = p(DX), p(DZ)
    kernel = _KERNEL_WIDE if max(DXP, DZP) > _WIDE else _KERNEL_NARROW
    kernel[grid](out, X, Z, MX, MZ, MO, C, DX, DZ, G, DO, DXP=DXP, DZP=DZP, DOP=p(DO),
                  DOT_PRECISION=dot_precision(X.dtype))
    return out


class _GridProduct(torch.autograd.Function):
    """``((X MX) * (Z MZ)) MO``; differentiable w.r.t. X and Z to any order (matrices are constants)."""

    @staticmethod
    def forward(ctx, X, Z, MX, MZ, MO):
        X, Z = X.contiguous(), Z.contiguous()
        ctx.save_for_backward(X, Z)
        ctx.mats = (MX, MZ, MO)
        return _launch(X, Z, MX, MZ, MO)

    @staticmethod
    def backward(ctx, g):
        X, Z = ctx.saved_tensors
        MX, MZ, MO = ctx.mats
        MOt = MO.t().contiguous()
        gX = gZ = None
        if ctx.needs_input_grad[0]:
            gX = _GridProduct.apply(g, Z, MOt, MZ, MX.t().contiguous())
        if ctx.needs_input_grad[1]:
            gZ = _GridProduct.apply(g, X, MOt, MX, MZ.t().contiguous())
        return gX, gZ, None, None, None


def error_bound(X: torch.Tensor, Z: torch.Tensor, MX: torch.Tensor, MZ: torch.Tensor, MO: torch.Tensor) -> torch.Tensor:
    """Entrywise bound (float64, shape (N, C, DO)) on ``|kernel - exact|`` for ``((X MX) * (Z MZ)) MO``
    at the dtype of ``X`` (the module docstring's formula; float32: tf32x3, float64: FP64 fma with
    ``u(K) = K 2^-52`` and unit roundoff ``2^-53``). ``X``, ``Z`` are the kernel's inputs; the
    matrices may be given in float64 (the exact product is taken with them)."""
    from ._tf32x3 import dot_error_unit

    DX, DZ, G = X.shape[-1], Z.shape[-1], MX.shape[1]
    if X.dtype == torch.float32:
        e1, e2, e3, u0 = dot_error_unit(DX), dot_error_unit(DZ), dot_error_unit(G), 2.0 ** -24
    elif X.dtype == torch.float64:
        e1, e2, e3, u0 = DX * 2.0 ** -52, DZ * 2.0 ** -52, G * 2.0 ** -52, 2.0 ** -53
    else:
        raise TypeError(f"error_bound: float32 or float64, got {X.dtype}")
    d = lambda t: t.detach().to(torch.float64)
    X, Z, MX, MZ, MO = map(d, (X, Z, MX, MZ, MO))
    FX, FZ = (X @ MX).abs(), (Z @ MZ).abs()
    dX = (e1 + u0) * (X.abs() @ MX.abs())
    dZ = (e2 + u0) * (Z.abs() @ MZ.abs())
    H = (FX + dX) * (FZ + dZ)
    return 1.01 * ((dX * (FZ + dZ) + FX * dZ + (e3 + 2 * u0) * H) @ MO.abs())


@functools.cache
def _grid(lmax1: int, lmax2: int, lmax_out: int):
    from mlpot.o3.gaunt import product_grid

    return product_grid("grid", [lmax1, lmax2], lmax_out)


def grid_matrices(lmax1: int, lmax2: int, lmax_out: int, device=None, dtype=torch.float64):
    """Default ``(B1 (D1, G), B2 (D2, G), P (G, D_out))`` for :func:`gaunt_product`: the dense
    transforms of :mod:`mlpot.o3`'s S2 grid exact for degree ``l1 + l2 + l_out``
    (:func:`mlpot.o3.gaunt.grid_matrices`)."""
    from mlpot.o3.gaunt import grid_matrices as o3_grid_matrices

    return o3_grid_matrices(_grid(lmax1, lmax2, lmax_out), lmax1, lmax2, lmax_out, dtype, device)


def gaunt_product(x1: torch.Tensor, x2: torch.Tensor, lmax_out: int, matrices=None) -> torch.Tensor:
    """``x1`` (N, C, D1), ``x2`` (N, C, D2) -> (N, C, (lmax_out+1)^2) via the fused grid kernel."""
    check_device(x1, x2)
    if x1.dtype != x2.dtype:
        raise TypeError(f"dtype mismatch {x1.dtype} vs {x2.dtype}")
    l1 = math.isqrt(x1.shape[-1]) - 1
    l2 = math.isqrt(x2.shape[-1]) - 1
    if matrices is None:
        matrices = grid_matrices(l1, l2, lmax_out, x1.device, x1.dtype)
    MX, MZ, MO = (m.to(device=x1.device, dtype=x1.dtype).contiguous() for m in matrices)
    return _GridProduct.apply(x1, x2, MX, MZ, MO)


def reference_gaunt_product(x1, x2, lmax_out, matrices=None):
    """The kernel's reference: :func:`mlpot.o3.gaunt.gaunt_product` (method ``grid``), or, for
    given matrices, the same three-matrix product in torch (differentiable)."""
    if matrices is None:
        from mlpot.o3.gaunt import gaunt_product as o3_gaunt_product

        return o3_gaunt_product(x1, x2, lmax_out, method="grid")
    MX, MZ, MO = (m.to(device=x1.device, dtype=x1.dtype) for m in matrices)
    return ((x1 @ MX) * (x2 @ MZ)) @ MO


__all__ = ["error_bound", "gaunt_product", "grid_matrices", "reference_gaunt_product"]
