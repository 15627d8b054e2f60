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

Each program handles ``BLOCK_E`` edges (one per thread). The recursion is unrolled at generation
time (one kernel source per ``lmax``, coefficients as constants of the edge dtype, see
:mod:`mlpot.kernels._codegen`): every row lives in registers, the forward reads ``vec`` once and
writes each row of ``Y`` and ``R`` once. The backward recomputes the rows in registers, then walks
the recursion backwards (adjoint sweep, row ``k = D-1 .. 1``: ``Ybar_i += c u_j Ybar_k``,
``ubar_j += c Y_i Ybar_k`` for every entry ``(i, j, c)`` of row ``k``, with ``Ybar_k`` seeded by
``gY_k``): it reads ``vec``, ``gY`` (rows ``1..D-1``; row 0 is constant) and ``gR`` once and
writes ``dvec`` once, with no workspace.
"""
import functools
import hashlib
import math
import re

import torch
from e3nn import o3

from ._codegen import HEADER, Consts, load_generated
from ._runtime import LazyKernel, check_device, next_pow2, reference_vjp

# ------------------------------------------------------------------------------------ source
_RADIAL_FWD = """
    if WITH_RADIAL:
        r_max = tl.load(scal_ptr)
        norm = tl.load(scal_ptr + 1)
        x = r / r_max
        xp = x * x * x * x * x if P_CUT == 5 else tl.exp(P_CUT * tl.log(x))
        pc = P_CUT * 1.0
        f = 1.0 - (pc + 1.0) * (pc + 2.0) / 2.0 * xp + pc * (pc + 2.0) * xp * x \\
            - pc * (pc + 1.0) / 2.0 * xp * x * x
        f = tl.where(x < 1.0, f, 0.0)
        for n in range(NB):
            w = tl.load(freq_ptr + n)
            rn = norm * tl.sin(w * r) / r * f
            tl.store(r_ptr + e * NB + n, rn, mask=em)
"""

_RADIAL_BWD = """
    if WITH_RADIAL:
        r_max = tl.load(scal_ptr)
        norm = tl.load(scal_ptr + 1)
        x = r / r_max
        pc = P_CUT * 1.0
        xpm1 = tl.exp((pc - 1.0) * tl.log(x))
        xp = xpm1 * x
        f = 1.0 - (pc + 1.0) * (pc + 2.0) / 2.0 * xp + pc * (pc + 2.0) * xp * x \\
            - pc * (pc + 1.0) / 2.0 * xp * x * x
        df = -pc * (pc + 1.0) * (pc + 2.0) / 2.0 * xpm1 * (1.0 - x) * (1.0 - x) / r_max
        inside = x < 1.0
        f = tl.where(inside, f, 0.0)
        df = tl.where(inside, df, 0.0)
        gr_tot = tl.zeros([BLOCK_E], dtype=DT)
        for n in range(NB):
            w = tl.load(freq_ptr + n)
            s = tl.sin(w * r)
            cw = tl.cos(w * r)
            b = norm * s / r
            db = norm * (w * cw * r - s) / (r * r)
            gn = tl.load(gr_ptr + e * NB + n, mask=em, other=0.0)
            gr_tot += gn * (db * f + b * df)
"""

_PROLOGUE = """    e = (tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)).to(tl.int64)
    em = e < E
    vx = tl.load(vec_ptr + e * 3 + 0, mask=em, other=1.0)
    vy = tl.load(vec_ptr + e * 3 + 1, mask=em, other=1.0)
    vz = tl.load(vec_ptr + e * 3 + 2, mask=em, other=1.0)
    r = tl.sqrt(vx * vx + vy * vy + vz * vz)
    ux = vx / r
    uy = vy / r
    uz = vz / r
"""

_U = ("ux", "uy", "uz")


def _rows(lmax: int):
    """The recursion table as ``rows[k] = [(i, j, coef), ...]`` for ``k = 1..D-1``."""
    ptr, ci, cj, cf = (t.tolist() for t in sh_recursion_table(lmax))
    return {k: [(ci[t], cj[t], cf[t]) for t in range(ptr[k], ptr[k + 1])] for k in range(1, len(ptr) - 1)}


def _forward_rows(rows, K, out) -> list[str]:
    """``y{k}`` for every row, in order (each row from earlier rows, all in registers); row 0 is 1
    and is folded into the constants of rows 1..3."""
    lines = []
    for k, ents in rows.items():
        terms = [f"{K(c)} * {_U[j]}" if i == 0 else f"{K(c)} * y{i} * {_U[j]}" for i, j, c in ents]
        lines.append(f"    y{k} = " + " + ".join(terms).replace("+ -", "- "))
        if out:
            lines.append(f"    tl.store(y_ptr + e * D + {k}, y{k}, mask=em)")
    return lines


def _accumulate(var: str, term: str, exists: bool) -> str:
    if not exists:
        return f"    {var} = {term}"
    return f"    {var} = {var} - {term[1:]}" if term.startswith("-") else f"    {var} = {var} + {term}"


def _sh_source(lmax: int, fwd_name: str, bwd_name: str) -> str:
    rows = _rows(lmax)
    D = (lmax + 1) ** 2
    # forward
    K = Consts()
    body = _forward_rows(rows, K, out=True)
    fwd = [f"def {fwd_name}(vec_ptr, y_ptr, r_ptr, freq_ptr, E, D, NB, scal_ptr, E_BUCKET,",
           "        P_CUT: tl.constexpr, WITH_RADIAL: tl.constexpr, BLOCK_E: tl.constexpr):",
           f'    """Generated for lmax={lmax}: the recursion unrolled, every row in registers."""',
           "    DT = y_ptr.dtype.element_ty",
           *K.lines("    "),
           _PROLOGUE,
           "    tl.store(y_ptr + e * D, tl.full([BLOCK_E], 1.0, DT), mask=em)",
           *body]
    # backward: recompute the rows, then the adjoint sweep k = D-1..1:
    #   ybar[i] += c u[j] ybar[k],  ubar[j] += c y[i] ybar[k]   for every entry (i, j, c) of row k
    K = Consts()
    body = _forward_rows(rows, K, out=False)
    acc: dict[int, bool] = {}  # rows i whose adjoint sum a{i} exists
    ubar = [False, False, False]
    adj = []
    for k in range(D - 1, 0, -1):
        load = f"tl.load(gy_ptr + e * D + {k}, mask=em, other=0.0)"
        adj.append(f"    b{k} = {load} + a{k}" if acc.get(k) else f"    b{k} = {load}")
        for i, j, c in rows[k]:
            if i > 0:
                adj.append(_accumulate(f"a{i}", f"{K(c)} * {_U[j]} * b{k}", acc.get(i)))
                acc[i] = True
            adj.append(_accumulate(f"g{j}", f"{K(c)} * b{k}" if i == 0 else f"{K(c)} * y{i} * b{k}", ubar[j]))
            ubar[j] = True
    zeros = [f"    g{j} = tl.zeros([BLOCK_E], dtype=DT)" for j in range(3) if not ubar[j]]
    bwd = [f"def {bwd_name}(vec_ptr, gy_ptr, gr_ptr, freq_ptr, gv_ptr, E, D, NB, scal_ptr, E_BUCKET,",
           "        P_CUT: tl.constexpr, WITH_RADIAL: tl.constexpr, BLOCK_E: tl.constexpr):",
           f'    """Generated for lmax={lmax}: rows recomputed in registers, then the adjoint sweep."""',
           "    DT = gv_ptr.dtype.element_ty",
           *K.lines("    "),
           _PROLOGUE,
           "    # radial part first: few values live across the sin/cos calls",
           _RADIAL_BWD,
           *body,
           *adj,
           *zeros,
           "    # tangential projection and 1/r: d u / d v = (I - u u^T) / r",
           "    dot = g0 * ux + g1 * uy + g2 * uz",
           "    ox = (g0 - dot * ux) / r",
           "    oy = (g1 - dot * uy) / r",
           "    oz = (g2 - dot * uz) / r",
           "    if WITH_RADIAL:",
           "        ox += gr_tot * ux",
           "        oy += gr_tot * uy",
           "        oz += gr_tot * uz",
           "    tl.store(gv_ptr + e * 3 + 0, ox, mask=em)",
           "    tl.store(gv_ptr + e * 3 + 1, oy, mask=em)",
           "    tl.store(gv_ptr + e * 3 + 2, oz, mask=em)"]
    header = ('"""Generated by mlpot.kernels.spherical_harmonics; do not edit (rewritten when it differs)."""\n'
              + HEADER)
    return header + "\n".join(fwd) + "\n" + _RADIAL_FWD + "\n\n" + "\n".join(bwd) + "\n"


_CFG_E = [({"BLOCK_E": 64}, 2, 2), ({"BLOCK_E": 128}, 4, 2), ({"BLOCK_E": 256}, 4, 2)]
_GENERATOR_VERSION = 1
_NAME = re.compile(r"^_sh_(fwd|bwd)_l([0-9]+)$")
_LOADED: dict[str, object] = {}  # "sh_<hash>" -> generated module


class _PerLmax:
    """The LazyKernels of one direction, one generated kernel per ``lmax`` (same configs and
    autotune key for all): ``_FWD(lmax)``. The key is E_BUCKET (next power of two of E), not E,
    so MD steps do not re-tune."""

    def __init__(self, kind: str):
        self.kind = kind
        self.configs = _CFG_E
        self.key = ["E_BUCKET", "D", "NB"]
        self._kernels: dict[int, LazyKernel] = {}

    def __call__(self, lmax: int) -> LazyKernel:
        if lmax not in self._kernels:
            self._kernels[lmax] = LazyKernel(_generated(lmax, self.kind), self.configs, key=self.key)
        return self._kernels[lmax]


def _generated(lmax: int, kind: str):
    names = (f"_sh_fwd_l{lmax}", f"_sh_bwd_l{lmax}")
    src = _sh_source(lmax, *names)
    stem = "sh_" + hashlib.sha256(repr((_GENERATOR_VERSION, src)).encode()).hexdigest()[:16]
    return getattr(load_generated(__name__, stem, src, names, _LOADED), f"_sh_{kind}_l{lmax}")


def __getattr__(name: str):
    """``_sh_fwd_l<lmax>`` / ``_sh_bwd_l<lmax>``: a generated kernel (``mlpot.bench.aot`` finds it
    by name in a fresh process)."""
    m = _NAME.match(name)
    if m is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return _generated(int(m.group(2)), m.group(1))


_FWD = _PerLmax("fwd")
_BWD = _PerLmax("bwd")


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
    fr = freqs if with_r else Y
    scal = _scalars(r_max, math.sqrt(2.0 / r_max), vec.device, vec.dtype)
    _FWD(lmax)[_grid(E)](vec, Y, R, fr, E, D, NB, scal, edge_bucket(E), P_CUT=p, WITH_RADIAL=with_r)
    return Y, R


def _backward(vec, gY, gR, lmax, freqs, r_max, p):
    E, D = vec.shape[0], (lmax + 1) ** 2
    gv = torch.empty_like(vec)
    if E == 0:
        return gv
    with_r = freqs is not None
    NB = freqs.shape[0] if with_r else 0
    gR_ = gR if with_r else gv
    fr = freqs if with_r else gv
    scal = _scalars(r_max, math.sqrt(2.0 / r_max) if with_r else 0.0, vec.device, vec.dtype)
    _BWD(lmax)[_grid(E)](vec, gY, gR_, fr, gv, E, D, NB, scal, edge_bucket(E), P_CUT=p, WITH_RADIAL=with_r)
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
