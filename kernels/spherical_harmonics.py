"""Real spherical harmonics (e3nn basis, "component" normalization), optionally fused with MACE's
Bessel radial basis and polynomial cutoff envelope.

Math. For an edge vector ``v`` with ``r = |v|`` and ``u = v / r``:

* ``Y^0 = 1``, and for ``l >= 0``: ``Y^{l+1}_k(u) = alpha_l sum_{i, j} C^{l,1,l+1}_{i j k} Y^l_i(u) u_j``
  with ``C`` e3nn's ``wigner_3j`` and ``alpha_l`` fixed once (in float64) so that ``Y^l`` equals
  ``e3nn.o3.spherical_harmonics(l, u, normalization="component")`` (``|Y^l|^2 = 2l + 1``). The
  recursion is exact: the ``l+1`` part of ``Y^l (x) u`` is the degree-``l+1`` harmonic polynomial.
  Output layout ``(E, (lmax+1)^2)``, rows ordered ``l = 0..lmax``, ``m = -l..l`` (e3nn's order).
* Radial basis (fused option), ``n = 1..num_basis``, ``omega_n = n pi / r_max``::

      R_n(r) = sqrt(2 / r_max) * sin(omega_n r) / r * f_cut(r / r_max)
      f_cut(x) = 1 - (p+1)(p+2)/2 x^p + p(p+2) x^(p+1) - p(p+1)/2 x^(p+2)   for x < 1, else 0

  with ``p = 5`` by default (MACE's ``BesselBasis`` times ``PolynomialCutoff``); layout ``(E, num_basis)``.

Gradient (kernel): ``dL/dv = (I - u u^T) (sum_k gY_k dY_k/du) / r + (sum_n gR_n dR_n/dr) u``, with
``dY/du`` from the derivative of the same recursion. The double backward (second derivatives,
needed when a force loss is differentiated w.r.t. positions) is built from the differentiable
torch reference, not from a kernel.

Each program handles ``BLOCK_E`` edges; rows are computed in order and written to the output,
later rows read the earlier ones back (same thread, after a block barrier).
"""
import functools
import math

import torch
from e3nn import o3

from ._runtime import LazyKernel, check_device, next_pow2, reference_vjp, tl


def _sh_fwd_kernel(vec_ptr, y_ptr, r_ptr, freq_ptr,
                   row_ptr, col_i_ptr, col_j_ptr, coef_ptr,
                   E, D, NB, scal_ptr, E_BUCKET,
                   P_CUT: tl.constexpr, WITH_RADIAL: tl.constexpr, BLOCK_E: tl.constexpr):
    """``scal = [r_max, norm]`` in the edge dtype (a Python float would be typed fp32);
    ``E_BUCKET`` (the autotune key) is the edge count rounded up to a power of two."""
    e = (tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)).to(tl.int64)
    em = e < E
    vx = tl.load(vec_ptr + e * 3 + 0, mask=em, other=1.0)
    vy = tl.load(vec_ptr + e * 3 + 1, mask=em, other=1.0)
    vz = tl.load(vec_ptr + e * 3 + 2, mask=em, other=1.0)
    r = tl.sqrt(vx * vx + vy * vy + vz * vz)
    ux = vx / r
    uy = vy / r
    uz = vz / r
    tl.store(y_ptr + e * D, tl.full([BLOCK_E], 1.0, y_ptr.dtype.element_ty), mask=em)
    for k in range(1, D):
        tl.debug_barrier()
        t0 = tl.load(row_ptr + k)
        t1 = tl.load(row_ptr + k + 1)
        acc = tl.zeros([BLOCK_E], dtype=y_ptr.dtype.element_ty)
        for t in range(t0, t1):
            i = tl.load(col_i_ptr + t)
            j = tl.load(col_j_ptr + t)
            cf = tl.load(coef_ptr + t)
            yi = tl.load(y_ptr + e * D + i, mask=em, other=0.0)
            uj = tl.where(j == 0, ux, tl.where(j == 1, uy, uz))
            acc += cf * yi * uj
        tl.store(y_ptr + e * D + k, acc, mask=em)
    if WITH_RADIAL:
        r_max = tl.load(scal_ptr)
        norm = tl.load(scal_ptr + 1)
        x = r / r_max
        xp = x * x * x * x * x if P_CUT == 5 else tl.exp(P_CUT * tl.log(x))
        pc = P_CUT * 1.0
        f = 1.0 - (pc + 1.0) * (pc + 2.0) / 2.0 * xp + pc * (pc + 2.0) * xp * x \
            - pc * (pc + 1.0) / 2.0 * xp * x * x
        f = tl.where(x < 1.0, f, 0.0)
        for n in range(NB):
            w = tl.load(freq_ptr + n)
            rn = norm * tl.sin(w * r) / r * f
            tl.store(r_ptr + e * NB + n, rn, mask=em)


def _sh_bwd_kernel(vec_ptr, gy_ptr, gr_ptr, freq_ptr, gv_ptr, ws_ptr,
                   row_ptr, col_i_ptr, col_j_ptr, coef_ptr,
                   E, D, NB, scal_ptr, E_BUCKET,
                   P_CUT: tl.constexpr, WITH_RADIAL: tl.constexpr, BLOCK_E: tl.constexpr):
    """Workspace ``ws`` (E, D, 4): per row [Y, dY/dux, dY/duy, dY/duz]."""
    e = (tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)).to(tl.int64)
    em = e < E
    vx = tl.load(vec_ptr + e * 3 + 0, mask=em, other=1.0)
    vy = tl.load(vec_ptr + e * 3 + 1, mask=em, other=1.0)
    vz = tl.load(vec_ptr + e * 3 + 2, mask=em, other=1.0)
    r = tl.sqrt(vx * vx + vy * vy + vz * vz)
    ux = vx / r
    uy = vy / r
    uz = vz / r
    zero = tl.zeros([BLOCK_E], dtype=gv_ptr.dtype.element_ty)
    tl.store(ws_ptr + e * D * 4, zero + 1.0, mask=em)
    tl.store(ws_ptr + e * D * 4 + 1, zero, mask=em)
    tl.store(ws_ptr + e * D * 4 + 2, zero, mask=em)
    tl.store(ws_ptr + e * D * 4 + 3, zero, mask=em)
    gx = zero
    gyy = zero
    gz = zero
    for k in range(1, D):
        tl.debug_barrier()
        t0 = tl.load(row_ptr + k)
        t1 = tl.load(row_ptr + k + 1)
        a0 = zero
        ax = zero
        ay = zero
        az = zero
        for t in range(t0, t1):
            i = tl.load(col_i_ptr + t)
            j = tl.load(col_j_ptr + t)
            cf = tl.load(coef_ptr + t)
            base = ws_ptr + (e * D + i) * 4
            yi = tl.load(base, mask=em, other=0.0)
            dx = tl.load(base + 1, mask=em, other=0.0)
            dy = tl.load(base + 2, mask=em, other=0.0)
            dz = tl.load(base + 3, mask=em, other=0.0)
            uj = tl.where(j == 0, ux, tl.where(j == 1, uy, uz))
            a0 += cf * yi * uj
            ax += cf * (dx * uj + tl.where(j == 0, yi, 0.0))
            ay += cf * (dy * uj + tl.where(j == 1, yi, 0.0))
            az += cf * (dz * uj + tl.where(j == 2, yi, 0.0))
        base = ws_ptr + (e * D + k) * 4
        tl.store(base, a0, mask=em)
        tl.store(base + 1, ax, mask=em)
        tl.store(base + 2, ay, mask=em)
        tl.store(base + 3, az, mask=em)
        g = tl.load(gy_ptr + e * D + k, mask=em, other=0.0)
        gx += g * ax
        gyy += g * ay
        gz += g * az
    # tangential projection and 1/r: d u / d v = (I - u u^T) / r
    dot = gx * ux + gyy * uy + gz * uz
    ox = (gx - dot * ux) / r
    oy = (gyy - dot * uy) / r
    oz = (gz - dot * uz) / r
    if WITH_RADIAL:
        r_max = tl.load(scal_ptr)
        norm = tl.load(scal_ptr + 1)
        x = r / r_max
        pc = P_CUT * 1.0
        xpm1 = tl.exp((pc - 1.0) * tl.log(x))
        xp = xpm1 * x
        f = 1.0 - (pc + 1.0) * (pc + 2.0) / 2.0 * xp + pc * (pc + 2.0) * xp * x \
            - pc * (pc + 1.0) / 2.0 * xp * x * x
        df = -pc * (pc + 1.0) * (pc + 2.0) / 2.0 * xpm1 * (1.0 - x) * (1.0 - x) / r_max
        inside = x < 1.0
        f = tl.where(inside, f, 0.0)
        df = tl.where(inside, df, 0.0)
        gr_tot = zero
        for n in range(NB):
            w = tl.load(freq_ptr + n)
            s = tl.sin(w * r)
            cw = tl.cos(w * r)
            b = norm * s / r
            db = norm * (w * cw * r - s) / (r * r)
            gn = tl.load(gr_ptr + e * NB + n, mask=em, other=0.0)
            gr_tot += gn * (db * f + b * df)
        ox += gr_tot * ux
        oy += gr_tot * uy
        oz += gr_tot * uz
    tl.store(gv_ptr + e * 3 + 0, ox, mask=em)
    tl.store(gv_ptr + e * 3 + 1, oy, mask=em)
    tl.store(gv_ptr + e * 3 + 2, oz, mask=em)


_CFG_E = [({"BLOCK_E": 64}, 2, 2), ({"BLOCK_E": 128}, 4, 2), ({"BLOCK_E": 256}, 4, 2)]
# autotune key: E_BUCKET (next power of two of E), not E, so MD steps do not re-tune
_FWD = LazyKernel(_sh_fwd_kernel, _CFG_E, key=["E_BUCKET", "D", "NB"])
_BWD = LazyKernel(_sh_bwd_kernel, _CFG_E, key=["E_BUCKET", "D", "NB"])


def edge_bucket(E: int) -> int:
    """The autotune key of an edge count: the next power of two (at least 1024)."""
    return max(1024, next_pow2(int(E)))


_SCALARS: dict = {}


def _scalars(r_max: float, norm: float, device, dtype) -> torch.Tensor:
    """``[r_max, norm]`` as a tensor of the edge dtype (cached: no host-to-device copy per call)."""
    key = (float(r_max), float(norm), str(device), dtype)
    if key not in _SCALARS:
        _SCALARS[key] = torch.tensor([float(r_max), float(norm)], device=device, dtype=dtype)
    return _SCALARS[key]


@functools.cache
def sh_recursion_table(lmax: int):
    """(row_ptr, col_i, col_j, coef) of the recursion for rows ``1..(lmax+1)^2 - 1`` (CPU, float64)."""
    g = torch.Generator().manual_seed(1234)
    u = torch.nn.functional.normalize(torch.randn(64, 3, generator=g, dtype=torch.float64), dim=-1)
    rows = {}
    for l in range(lmax):
        C = o3.wigner_3j(l, 1, l + 1, dtype=torch.float64)
        yl = o3.spherical_harmonics(l, u, normalize=False, normalization="component")
        target = o3.spherical_harmonics(l + 1, u, normalize=False, normalization="component")
        z = torch.einsum("ijk,ni,nj->nk", C, yl, u)
        alpha = float((z * target).sum() / (z * z).sum())
        if (alpha * z - target).abs().max() > 1e-10:
            raise RuntimeError(f"spherical-harmonics recursion does not reproduce e3nn at l={l + 1}")
        for i, j, k in torch.nonzero(C.abs() > 1e-12).tolist():
            rows.setdefault((l + 1) ** 2 + k, []).append((l * l + i, j, alpha * float(C[i, j, k])))
    D = (lmax + 1) ** 2
    ptr, ci, cj, cf = [0, 0], [], [], []
    for k in range(1, D):
        for i, j, c in rows.get(k, []):
            ci.append(i)
            cj.append(j)
            cf.append(c)
        ptr.append(len(ci))
    return (torch.tensor(ptr, dtype=torch.int64), torch.tensor(ci, dtype=torch.int64),
            torch.tensor(cj, dtype=torch.int64), torch.tensor(cf, dtype=torch.float64))


_TABLES: dict = {}


def _table(lmax, device, dtype):
    key = (lmax, str(device), dtype)
    if key not in _TABLES:
        ptr, ci, cj, cf = sh_recursion_table(lmax)
        _TABLES[key] = (ptr.to(device), ci.to(device), cj.to(device), cf.to(device=device, dtype=dtype))
    return _TABLES[key]


def _grid(E):
    return lambda m: ((E + m["BLOCK_E"] - 1) // m["BLOCK_E"],)


def _forward(vec, lmax, freqs, r_max, p):
    E, D = vec.shape[0], (lmax + 1) ** 2
    Y = torch.empty(E, D, device=vec.device, dtype=vec.dtype)
    with_r = freqs is not None
    NB = freqs.shape[0] if with_r else 0
    R = torch.empty(E, NB, device=vec.device, dtype=vec.dtype)
    if E == 0:
        return Y, R
    ptr, ci, cj, cf = _table(lmax, vec.device, vec.dtype)
    fr = freqs if with_r else Y
    scal = _scalars(r_max, math.sqrt(2.0 / r_max), vec.device, vec.dtype)
    _FWD[_grid(E)](vec, Y, R, fr, ptr, ci, cj, cf, E, D, NB, scal, edge_bucket(E),
                   P_CUT=p, WITH_RADIAL=with_r)
    return Y, R


def _backward(vec, gY, gR, lmax, freqs, r_max, p):
    E, D = vec.shape[0], (lmax + 1) ** 2
    gv = torch.empty_like(vec)
    if E == 0:
        return gv
    ws = torch.empty(E, D, 4, device=vec.device, dtype=vec.dtype)
    ptr, ci, cj, cf = _table(lmax, vec.device, vec.dtype)
    with_r = freqs is not None
    NB = freqs.shape[0] if with_r else 0
    gR_ = gR if with_r else gv
    fr = freqs if with_r else gv
    scal = _scalars(r_max, math.sqrt(2.0 / r_max) if with_r else 0.0, vec.device, vec.dtype)
    _BWD[_grid(E)](vec, gY, gR_, fr, gv, ws, ptr, ci, cj, cf, E, D, NB, scal, edge_bucket(E),
                   P_CUT=p, WITH_RADIAL=with_r)
    return gv


def reference_edge_embedding(vec, lmax, freqs=None, r_max=1.0, p=5):
    """The kernel's reference: :func:`mlpot.nn.edge_geometry.reference_edge_embedding`."""
    from mlpot.nn.edge_geometry import reference_edge_embedding as reference

    return reference(vec, lmax, freqs, r_max, p)


class _EdgeEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, vec, lmax, freqs, r_max, p):
        vec = vec.contiguous()
        Y, R = _forward(vec, lmax, freqs, r_max, p)
        ctx.save_for_backward(vec)
        ctx.args = (lmax, freqs, r_max, p)
        return Y, R

    @staticmethod
    def backward(ctx, gY, gR):
        (vec,) = ctx.saved_tensors
        lmax, freqs, _, _ = ctx.args
        gY = torch.zeros((vec.shape[0], (lmax + 1) ** 2), dtype=vec.dtype, device=vec.device) if gY is None else gY
        if gR is None or freqs is None:
            gR = vec.new_zeros(vec.shape[0], 0 if freqs is None else freqs.shape[0])
        return _EdgeEmbeddingBackward.apply(vec, gY, gR, ctx.args), None, None, None, None


class _EdgeEmbeddingBackward(torch.autograd.Function):
    """Forward: the gradient kernel. Backward (double backward): through the torch reference."""

    @staticmethod
    def forward(ctx, vec, gY, gR, args):
        lmax, freqs, r_max, p = args
        gY, gR = gY.contiguous(), gR.contiguous()
        ctx.save_for_backward(vec, gY, gR)
        ctx.args = args
        return _backward(vec, gY, gR, lmax, freqs, r_max, p)

    @staticmethod
    def backward(ctx, ggv):
        vec, gY, gR = ctx.saved_tensors
        lmax, freqs, r_max, p = ctx.args

        def first_backward(v, a, b):
            return reference_vjp(lambda v_: reference_edge_embedding(v_, lmax, freqs, r_max, p), (v,), (a, b))[0]

        return (*reference_vjp(first_backward, (vec, gY, gR), ggv), None)


def spherical_harmonics(vec: torch.Tensor, lmax: int) -> torch.Tensor:
    """``(E, 3)`` vectors -> ``(E, (lmax+1)^2)`` e3nn spherical harmonics (normalize=True, component)."""
    check_device(vec)
    return _EdgeEmbedding.apply(vec, int(lmax), None, 1.0, 5)[0]


def edge_embedding(vec: torch.Tensor, lmax: int, num_basis: int, r_max: float, p: int = 5,
                   freqs: torch.Tensor | None = None):
    """Fused ``(Y, R)``: spherical harmonics ``(E, (lmax+1)^2)`` and Bessel x cutoff ``(E, num_basis)``.

    ``freqs`` (num_basis,) defaults to ``n pi / r_max``; it is treated as a constant (no gradient).
    """
    check_device(vec)
    if freqs is None:
        freqs = torch.arange(1, num_basis + 1, device=vec.device, dtype=vec.dtype) * (math.pi / r_max)
    freqs = freqs.detach().to(device=vec.device, dtype=vec.dtype).contiguous()
    return _EdgeEmbedding.apply(vec, int(lmax), freqs, float(r_max), int(p))
