r"""SO(2) convolution (eSCN): equivariant edge messages computed in the edge frame.

Math
----
Let :math:`R_e` rotate the edge direction :math:`\hat v_e` onto the **y axis**
(:func:`mlpot.o3.wigner.edge_rotation`). A feature :math:`x_i` of irrep :math:`(l_i, p_i)` is
moved into the edge frame by :math:`\tilde x_i = D^{l_i}(R_e) x_i`. In that frame the
edge spherical harmonics are :math:`Y_{l_f}(\hat y)_m = \sqrt{2l_f+1}\,\delta_{m0}`, so a
Clebsch-Gordan product :math:`x_i \otimes Y(\hat v_e) \to (l_o, p_o)` only couples components
with the same :math:`|m|`, and mixes the pair :math:`(+m, -m)` as a complex number:

.. math::

    \tilde y_{o,+m} = W^{(1)}_m \tilde x_{i,+m} - W^{(2)}_m \tilde x_{i,-m},\qquad
    \tilde y_{o,-m} = W^{(2)}_m \tilde x_{i,+m} + W^{(1)}_m \tilde x_{i,-m},
    \qquad \tilde y_{o,0} = W^{(1)}_0 \tilde x_{i,0},

(the most general linear map commuting with rotations about ``y``), followed by
:math:`y_o = D^{l_o}(R_e)^\top \tilde y_o`. Components with :math:`|m| > m_{max}` are dropped.

Parity (O(3), not just SO(3)). A path :math:`l_i \to l_o` through an edge harmonic
:math:`l_f` has :math:`p_o = p_i (-1)^{l_f}`, so the parities fix the parity of :math:`l_f`
and hence of :math:`l_i + l_o + l_f`. The mirror :math:`z \to -z` (which fixes the edge)
acts on a pair as :math:`\pm\mathrm{diag}(1,-1)`, commuting with :math:`W^{(1)}` and
anticommuting with :math:`W^{(2)}`. Hence for each (input irrep, output irrep) pair:

* **even path** (:math:`l_i + l_o + l_f` even, i.e. :math:`p_i p_o = (-1)^{l_i+l_o}`): only
  :math:`W^{(1)}_m` survives, ``m = 0..min(l_i, l_o, mmax)``;
* **odd path** (:math:`p_i p_o = -(-1)^{l_i+l_o}`): only :math:`W^{(2)}_m` survives,
  ``m = 1..min(l_i, l_o, mmax)``.

These counts equal the number of CG paths (:math:`l_f` of the right parity in
:math:`|l_i-l_o|..l_i+l_o`), which is the eSCN identity: with ``mmax >= min(l_i, l_o)``
the SO(2) map is exactly a CG tensor product with the edge harmonics summed over all
allowed :math:`l_f` (:func:`so2_weights_from_cg` gives the weight map).

Weight layout
-------------
An :class:`SO2Plan` lists *SO(2) paths* ``(i_in, i_out, m, kind)`` ordered by input irrep,
then output irrep, then ``m`` ascending. Each path owns a contiguous block of the weight
vector: ``mul_out * mul_in`` numbers (``mode="full"``, row-major ``(out channel, in
channel)``) or ``mul_in`` numbers (``mode="depthwise"``, channel ``u -> u`` like e3nn's
``uvu``; needs ``mul_out == mul_in``). Weights are per edge, ``(E, weight_numel)``, or shared,
``(weight_numel,)``. ``plan.paths[k].offset`` gives each block's start.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from e3nn import o3

from mlpot.errors import ConfigError, DataError
from mlpot.o3.backend import BackendChoice
from mlpot.o3.layout import channel_last_to_mul_ir, mul_ir_to_channel_last
from mlpot.o3.message_passing import EdgeGeometry, MessageTensorProduct
from mlpot.o3.wigner import block_diagonal, edge_rotation, wigner_D_list

__all__ = [
    "EdgeFrameRotation",
    "SO2Convolution",
    "SO2Linear",
    "edge_frame_index",
    "SO2MessageTP",
    "SO2Path",
    "SO2Plan",
    "cg_message_reference",
    "mul_ir_to_sph_channels",
    "so2_conv",
    "so2_from_cg_matrix",
    "so2_linear",
    "so2_weights_from_cg",
    "sph_channels_to_mul_ir",
]


@dataclass(frozen=True)
class SO2Path:
    i_in: int
    i_out: int
    m: int
    kind: str  # "even" (W1, mixes +m->+m, -m->-m) or "odd" (W2, mixes +m<->-m)
    offset: int
    numel: int


def _path_kind(ir_in: o3.Irrep, ir_out: o3.Irrep, lmax_f: int | None) -> str | None:
    """Parity class of (ir_in -> ir_out) or None when no edge harmonic l_f connects them."""
    lo, hi = abs(ir_in.l - ir_out.l), ir_in.l + ir_out.l
    if lmax_f is not None:
        hi = min(hi, lmax_f)
    want = 0 if ir_in.p * ir_out.p == 1 else 1  # parity of l_f
    if not any(lf % 2 == want for lf in range(lo, hi + 1)):
        return None
    return "even" if (ir_in.l + ir_out.l + want) % 2 == 0 else "odd"


class SO2Plan:
    """Static description of an SO(2) linear map between two irreps lists (see module doc).

    Args:
        irreps_in, irreps_out: e3nn ``Irreps`` (``mul_ir`` layout).
        mmax: keep ``|m| <= mmax`` in the edge frame.
        mode: ``"full"`` (channels mix) or ``"depthwise"`` (``u -> u``).
        lmax_f: if given, only pairs connected by some edge harmonic ``l_f <= lmax_f`` get weights.
        pairs: optional explicit list of ``(i_in, i_out)`` pairs to connect (default: all allowed).
    """

    def __init__(self, irreps_in, irreps_out, mmax: int, mode: str = "full", lmax_f=None, pairs=None):
        self.irreps_in = o3.Irreps(irreps_in)
        self.irreps_out = o3.Irreps(irreps_out)
        if not isinstance(mmax, int) or mmax < 0:
            raise ConfigError(f"SO(2) convolution: mmax must be a non-negative int, got {mmax!r}")
        if mode not in ("full", "depthwise"):
            raise ConfigError(f"SO(2) convolution: mode must be 'full' or 'depthwise', got {mode!r}")
        self.mmax, self.mode, self.lmax_f = mmax, mode, lmax_f
        if pairs is None:
            pairs = [(i, o) for i in range(len(self.irreps_in)) for o in range(len(self.irreps_out))]
        paths, offset = [], 0
        for i, o in pairs:
            mul_i, ir_i = self.irreps_in[i]
            mul_o, ir_o = self.irreps_out[o]
            kind = _path_kind(ir_i, ir_o, lmax_f)
            if kind is None or mul_i == 0 or mul_o == 0:
                continue
            if mode == "depthwise" and mul_i != mul_o:
                raise ConfigError(
                    f"SO(2) depthwise mode needs equal multiplicities, got {mul_i}x{ir_i} -> {mul_o}x{ir_o}"
                )
            n = mul_i if mode == "depthwise" else mul_i * mul_o
            for m in range(0 if kind == "even" else 1, min(ir_i.l, ir_o.l, mmax) + 1):
                paths.append(SO2Path(i, o, m, kind, offset, n))
                offset += n
        self.paths = paths
        self.weight_numel = offset
        self.lmax = max([ir.l for _, ir in self.irreps_in] + [ir.l for _, ir in self.irreps_out] + [0])

    def fan_in(self) -> list[int]:
        """Per output irrep: number of input scalars feeding one output component (for init)."""
        fan = [0] * len(self.irreps_out)
        seen = set()
        for p in self.paths:
            if (p.i_in, p.i_out) not in seen:
                seen.add((p.i_in, p.i_out))
                fan[p.i_out] += 1 if self.mode == "depthwise" else self.irreps_in[p.i_in].mul
        return fan

    def __repr__(self) -> str:
        return (
            f"SO2Plan({self.irreps_in} -> {self.irreps_out}, mmax={self.mmax}, mode={self.mode}, "
            f"paths={len(self.paths)}, weight_numel={self.weight_numel})"
        )


def _check_inputs(plan: SO2Plan, x, vectors, weights, rotation):
    if x.ndim != 2 or x.shape[-1] != plan.irreps_in.dim:
        raise DataError(f"SO(2) convolution: x must be (E, {plan.irreps_in.dim}), got {tuple(x.shape)}")
    if vectors is not None and (vectors.ndim != 2 or vectors.shape != (x.shape[0], 3)):
        raise DataError(f"SO(2) convolution: edge vectors must be ({x.shape[0]}, 3), got {tuple(vectors.shape)}")
    if rotation is not None and rotation.shape != (x.shape[0], 3, 3):
        raise DataError(f"SO(2) convolution: rotation must be ({x.shape[0]}, 3, 3), got {tuple(rotation.shape)}")
    if weights.shape[-1] != plan.weight_numel or weights.ndim not in (1, 2) or (
        weights.ndim == 2 and weights.shape[0] not in (1, x.shape[0])
    ):
        raise DataError(
            f"SO(2) convolution: weights must be ({x.shape[0]}, {plan.weight_numel}) or "
            f"({plan.weight_numel},), got {tuple(weights.shape)}"
        )
    if x.dtype != weights.dtype:
        raise DataError(f"SO(2) convolution: dtype mismatch, x is {x.dtype} but weights are {weights.dtype}")


def so2_conv(plan: SO2Plan, x: torch.Tensor, vectors: torch.Tensor | None, weights: torch.Tensor,
             rotation: torch.Tensor | None = None, wigner: list | None = None) -> torch.Tensor:
    """Functional SO(2) convolution.

    Args:
        plan: :class:`SO2Plan`.
        x: ``(E, irreps_in.dim)`` source features, e3nn ``mul_ir`` layout.
        vectors: ``(E, 3)`` edge vectors (used for the frame unless ``rotation`` is given).
        weights: ``(E, weight_numel)`` per-edge or ``(weight_numel,)`` shared weights.
        rotation: optional ``(E, 3, 3)`` frames with ``R v = |v| y`` (any roll about the edge).
        wigner: optional ``[D^l(R_e)]`` for ``l = 0..L >= plan.lmax`` (the shared edge geometry);
            then neither ``vectors`` nor ``rotation`` is read.

    Returns:
        ``(E, irreps_out.dim)`` in ``mul_ir`` layout.
    """
    _check_inputs(plan, x, vectors, weights, rotation)
    E = x.shape[0]
    if wigner is not None:
        if len(wigner) <= plan.lmax:
            raise DataError(f"SO(2) convolution: Wigner blocks up to l={plan.lmax} needed, got l<={len(wigner) - 1}")
        Ds = wigner
    else:
        if rotation is None:
            if vectors is None:
                raise DataError("SO(2) convolution: give edge vectors, a rotation or Wigner blocks")
            rotation = edge_rotation(vectors.to(x.dtype))
        rotation = rotation.to(x.dtype)
        Ds = wigner_D_list(plan.lmax, rotation)
    if weights.ndim == 1:
        weights = weights.unsqueeze(0)
    # rotate inputs into the edge frame: (E, mul, 2l+1)
    x_loc = []
    for (mul, ir), sl in zip(plan.irreps_in, plan.irreps_in.slices()):
        xi = x[:, sl].reshape(E, mul, ir.dim)
        x_loc.append(torch.einsum("eab,eub->eua", Ds[ir.l], xi))
    cols: dict[tuple[int, int], list[torch.Tensor]] = {}
    for p in plan.paths:
        l_i = plan.irreps_in[p.i_in].ir.l
        l_o = plan.irreps_out[p.i_out].ir.l
        mul_i, mul_o = plan.irreps_in[p.i_in].mul, plan.irreps_out[p.i_out].mul
        w = weights[:, p.offset : p.offset + p.numel]
        if plan.mode == "full":
            w = w.reshape(w.shape[0], mul_o, mul_i)

            def lin(v, w=w):
                return torch.einsum("evu,eu->ev", w, v)
        else:

            def lin(v, w=w):
                return w * v
        xp = x_loc[p.i_in][:, :, l_i + p.m]
        if p.m == 0:
            cols.setdefault((p.i_out, l_o), []).append(lin(xp))
            continue
        xm = x_loc[p.i_in][:, :, l_i - p.m]
        if p.kind == "even":
            plus, minus = lin(xp), lin(xm)
        else:
            plus, minus = -lin(xm), lin(xp)
        cols.setdefault((p.i_out, l_o + p.m), []).append(plus)
        cols.setdefault((p.i_out, l_o - p.m), []).append(minus)
    outs = []
    for o, (mul, ir) in enumerate(plan.irreps_out):
        zero = x.new_zeros(E, mul)
        comps = [sum(cols[(o, k)]) if (o, k) in cols else zero for k in range(ir.dim)]
        y_loc = torch.stack(comps, -1)  # (E, mul, 2l+1)
        y = torch.einsum("eba,eub->eua", Ds[ir.l], y_loc)  # D^T y_loc
        outs.append(y.reshape(E, mul * ir.dim))
    if not outs:
        return x.new_zeros(E, 0)
    return torch.cat(outs, -1)


def _kernel_layout(plan: SO2Plan) -> str:
    """``"uniform"`` when the SO(2) kernel can run ``plan`` (one multiplicity for the input irreps
    and one for the output irreps), else ``"general"``."""
    uniform = len({m for m, _ in plan.irreps_in}) == 1 and len({m for m, _ in plan.irreps_out}) == 1
    return "uniform" if uniform else "general"


# ----------------------------------------------------------------------------- layouts
def _sph_irreps(lmax: int, channels: int, parity) -> o3.Irreps:
    if parity in (None, "sh"):
        ps = [(-1) ** l for l in range(lmax + 1)]
    elif isinstance(parity, int) and parity in (1, -1):
        ps = [parity * (-1) ** l for l in range(lmax + 1)]
    else:
        ps = list(parity)
        if len(ps) != lmax + 1 or any(p not in (1, -1) for p in ps):
            raise ConfigError(f"parity must be 'sh', +1/-1 or a list of {lmax + 1} values in (1, -1), got {parity!r}")
    return o3.Irreps([(channels, (l, ps[l])) for l in range(lmax + 1)])


def mul_ir_to_sph_channels(x: torch.Tensor, irreps) -> torch.Tensor:
    """e3nn ``mul_ir`` layout ``(E, irreps.dim)`` -> ``(E, (L+1)**2, C)``.

    ``irreps`` must be ``C x l`` for ``l = 0..L`` in order, each once (any parities).
    """
    irreps = o3.Irreps(irreps)
    C = irreps[0].mul if len(irreps) else 0
    if [ir.l for _, ir in irreps] != list(range(len(irreps))) or any(mul != C for mul, _ in irreps):
        raise DataError(f"mul_ir_to_sph_channels: irreps must be Cx0 + Cx1 + ... + CxL, got {irreps}")
    return mul_ir_to_channel_last(x, irreps)


def sph_channels_to_mul_ir(x: torch.Tensor) -> torch.Tensor:
    """``(E, (L+1)**2, C)`` -> e3nn ``mul_ir`` layout ``(E, C * (L+1)**2)`` (irreps ``Cx0+...+CxL``)."""
    n = x.shape[1]
    L = math.isqrt(n) - 1
    if (L + 1) ** 2 != n:
        raise DataError(f"sph_channels_to_mul_ir: second dim must be (L+1)**2, got {n}")
    return channel_last_to_mul_ir(x, _sph_irreps(L, x.shape[2], "sh"))


# ----------------------------------------------------------------------------- modules
class SO2Convolution(torch.nn.Module):
    r"""eSCN SO(2) convolution on ``(E, (L+1)**2, C)`` features with channel mixing.

    ``SO2Convolution(lmax_in, lmax_out, mmax, channels_in, channels_out, parity_in="sh",
    parity_out="sh", internal_weights=False)``. Parities: ``"sh"`` means :math:`p_l=(-1)^l`,
    ``+1``/``-1`` multiply that, or a list of per-``l`` parities. Which (l_in -> l_out, m)
    blocks have weights follows the parity rule of the module docstring.

    ``forward(x (E, (lmax_in+1)**2, C_in), vectors (E, 3), weights=None, rotation=None)
    -> (E, (lmax_out+1)**2, C_out)``; ``weights`` is ``(E, weight_numel)`` (e.g. a radial MLP
    output) or ``(weight_numel,)``; with ``internal_weights=True`` a learned shared vector is
    used when ``weights`` is None. Block layout: ``self.plan.paths`` (``C_out x C_in`` row-major).
    """

    def __init__(self, lmax_in: int, lmax_out: int, mmax: int, channels_in: int, channels_out: int,
                 parity_in="sh", parity_out="sh", internal_weights: bool = False):
        super().__init__()
        self.irreps_in = _sph_irreps(lmax_in, channels_in, parity_in)
        self.irreps_out = _sph_irreps(lmax_out, channels_out, parity_out)
        self.plan = SO2Plan(self.irreps_in, self.irreps_out, mmax, mode="full")
        self.weight_numel = self.plan.weight_numel
        self.lmax_in, self.lmax_out, self.mmax = lmax_in, lmax_out, mmax
        self.channels_in, self.channels_out = channels_in, channels_out
        if internal_weights:
            fan = self.plan.fan_in()
            w = torch.randn(self.weight_numel)
            for p in self.plan.paths:
                w[p.offset : p.offset + p.numel] /= math.sqrt(max(fan[p.i_out], 1))
            self.weight = torch.nn.Parameter(w)
        else:
            self.register_parameter("weight", None)

    def forward(self, x, vectors, weights=None, rotation=None):
        if x.ndim != 3 or x.shape[1:] != ((self.lmax_in + 1) ** 2, self.channels_in):
            raise DataError(
                f"SO2Convolution: x must be (E, {(self.lmax_in + 1) ** 2}, {self.channels_in}), got {tuple(x.shape)}"
            )
        if weights is None:
            if self.weight is None:
                raise DataError("SO2Convolution: weights are required (internal_weights=False)")
            weights = self.weight
        y = so2_conv(self.plan, sph_channels_to_mul_ir(x), vectors, weights, rotation)
        return mul_ir_to_sph_channels(y, self.irreps_out)


# ----------------------------------------------------------------------------- eSCN edge-frame layout
def edge_frame_index(lmax: int, mmax: int):
    """Rows of the truncated edge-frame layout, m-major.

    Returns ``(rows, half, blocks)``: ``rows[k]`` is the e3nn component index ``l*l + l + m`` of
    entry ``k`` (order: ``m = 0`` for ``l = 0..L``; then for ``m = 1..mmax``: ``+m`` for
    ``l = m..L``, then ``-m`` for ``l = m..L``); ``half[k]`` maps ``k`` to the index of its
    ``(l, |m|)`` pair (shared by ``+m`` and ``-m``); ``blocks`` lists ``(m, start, n)``.
    """
    rows, half, blocks = [], [], []
    h = 0
    rows += [l * l + l for l in range(lmax + 1)]
    half += list(range(lmax + 1))
    blocks.append((0, 0, lmax + 1))
    h = lmax + 1
    for m in range(1, min(mmax, lmax) + 1):
        n = lmax + 1 - m
        blocks.append((m, len(rows), n))
        rows += [l * l + l + m for l in range(m, lmax + 1)]
        rows += [l * l + l - m for l in range(m, lmax + 1)]
        half += list(range(h, h + n)) * 2
        h += n
    return rows, half, blocks


class EdgeFrameRotation(torch.nn.Module):
    r"""Truncated Wigner rotation into / out of the edge frames, block by degree.

    ``setup(vectors)`` builds, per degree, the rows :math:`|m| \le m_{max}` of
    :math:`D^l(R_e)`; ``to_frame(x (E, (L+1)^2, C)) -> (E, K, C)`` (m-major layout of
    :func:`edge_frame_index`) and ``from_frame`` its transpose. Per-degree products cost
    :math:`\sum_l \min(2l+1, 2m_{max}+1)(2l+1)` per channel instead of :math:`K (L+1)^2`.
    """

    def __init__(self, lmax: int, mmax: int):
        super().__init__()
        self.lmax, self.mmax = int(lmax), int(mmax)
        rows, _, _ = edge_frame_index(self.lmax, self.mmax)
        # l-major order of the kept rows: for each l, m = -min(l, mmax)..min(l, mmax)
        lmajor = [l * l + l + m for l in range(self.lmax + 1) for m in range(-min(l, self.mmax), min(l, self.mmax) + 1)]
        pos = {r: k for k, r in enumerate(lmajor)}
        self.register_buffer("to_mmajor", torch.tensor([pos[r] for r in rows], dtype=torch.long), persistent=False)
        inv = [0] * len(rows)
        for k, r in enumerate(rows):
            inv[pos[r]] = k
        self.register_buffer("to_lmajor", torch.tensor(inv, dtype=torch.long), persistent=False)

    def setup(self, vectors: torch.Tensor, wigner: list | None = None) -> list[torch.Tensor]:
        """Kept rows per degree; ``wigner`` (``[D^l(R_e)]``, e.g. the shared edge geometry's)
        saves recomputing the Wigner blocks of ``vectors``."""
        Ds = wigner_D_list(self.lmax, edge_rotation(vectors)) if wigner is None else wigner[: self.lmax + 1]
        out = []
        for l, D in enumerate(Ds):
            k = min(l, self.mmax)
            out.append(D[:, l - k : l + k + 1, :])  # (E, 2k+1, 2l+1)
        return out

    def to_frame(self, Ds: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        parts = [torch.bmm(D, x[:, l * l : (l + 1) ** 2, :]) for l, D in enumerate(Ds)]
        return torch.cat(parts, 1)[:, self.to_mmajor, :]

    def from_frame(self, Ds: list[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        y = y[:, self.to_lmajor, :]
        parts, start = [], 0
        for l, D in enumerate(Ds):
            n = D.shape[1]
            parts.append(torch.bmm(D.transpose(1, 2), y[:, start : start + n, :]))
            start += n
        return torch.cat(parts, 1)


def so2_linear(x: torch.Tensor, weights: list, blocks: list) -> torch.Tensor:
    r"""The shared-weight SO(2) linear map on edge-frame features, ``(E, K, C_in) -> (E, K, C_out)``.

    ``x`` is in the m-major layout of :func:`edge_frame_index` (whose ``blocks`` lists
    ``(m, start, n)``), ``weights[b]`` is :math:`W_m \in \mathbb{R}^{n C_{in} \times n C_{out}}`
    for block ``b``, row index ``l' C_{in} + c`` (``l' = l - m``). For each half (:math:`m = 0`,
    or :math:`+m` and :math:`-m` separately) :math:`y[l', d] = \sum_{l'', c} x[l'', c]\,
    W_m[l'' C_{in} + c,\ l' C_{out} + d]`. The reference of the registry op ``so2_linear``.
    """
    E = x.shape[0]
    outs = []
    for (m, start, n), w in zip(blocks, weights):
        cin, cout = w.shape[0] // n, w.shape[1] // n
        if m == 0:
            outs.append((x[:, start : start + n, :].reshape(E, n * cin) @ w).reshape(E, n, cout))
        else:  # the +m and -m halves, one matrix
            xm = x[:, start : start + 2 * n, :].reshape(E, 2, n * cin)
            outs.append((xm @ w).reshape(E, 2 * n, cout))
    return torch.cat(outs, 1)


class SO2Linear(BackendChoice, torch.nn.Module):
    r"""Shared-weight SO(2) linear map on edge-frame features ``(E, K, C_in) -> (E, K, C_out)``.

    For each :math:`m` the entries :math:`(l, c)` with :math:`l \ge m` are flattened and
    multiplied by :math:`W_m \in \mathbb{R}^{(L+1-m)C_{in} \times (L+1-m)C_{out}}`; the
    :math:`+m` and :math:`-m` halves use the same :math:`W_m` (the parity-even SO(2) map, see
    the module doc). Equals :func:`mlpot.o3.so2.so2_conv` with ``mode="full"`` and the
    corresponding shared weights (tested). Registry op ``so2_linear``: :func:`so2_linear` is the
    reference, ``backend: triton`` runs the kernel (same m-major layout, no conversion).
    """

    op = "so2_linear"

    def __init__(self, lmax: int, mmax: int, channels_in: int, channels_out: int, backend: str = "reference"):
        super().__init__()
        self.lmax, self.mmax = int(lmax), int(mmax)
        self.channels_in, self.channels_out = int(channels_in), int(channels_out)
        self.backend = str(backend)
        _, _, self.blocks = edge_frame_index(self.lmax, self.mmax)
        self.weights = torch.nn.ParameterList()
        for m, _, n in self.blocks:
            fan_in = n * self.channels_in
            self.weights.append(torch.nn.Parameter(torch.randn(fan_in, n * self.channels_out) / math.sqrt(fan_in)))
        self.check_backend()
        self._table = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 0 and self.selected_backend(x.device) == "triton":
            from mlpot.o3.backend import implementation, kernels_module

            if self._table is None:
                self._table = kernels_module("so2_linear").SO2LinearTable(
                    self.lmax, self.mmax, self.channels_in, self.channels_out)
            return implementation("so2_linear", "triton")(x, list(self.weights), self._table)
        return so2_linear(x, list(self.weights), self.blocks)


def cg_message_reference(irreps_in, lmax_sh: int, irreps_out_target):
    """The CG message tensor product that :class:`SO2MessageTP` reproduces (MACE style).

    Returns ``(irreps_mid, instructions)`` for ``e3nn.o3.TensorProduct(irreps_in,
    Irreps.spherical_harmonics(lmax_sh), irreps_mid, instructions, shared_weights=False,
    internal_weights=False)``: for each input irrep ``i`` and edge harmonic ``l_f`` and each
    ``ir_out`` in ``ir_i x l_f`` present in the target, one ``uvu`` path with output
    ``mul_i x ir_out`` (default component/element normalisation).
    """
    irreps_in = o3.Irreps(irreps_in)
    target = [ir for _, ir in o3.Irreps(irreps_out_target)]
    sh = o3.Irreps.spherical_harmonics(lmax_sh)
    mid, instructions = [], []
    for i, (mul, ir_i) in enumerate(irreps_in):
        for f, (_, ir_f) in enumerate(sh):
            for ir_o in ir_i * ir_f:
                if ir_o in target:
                    instructions.append((i, f, len(mid), "uvu", True))
                    mid.append((mul, ir_o))
    return o3.Irreps(mid), instructions


def so2_message_passing(plan: SO2Plan, node_feats: torch.Tensor, wigner: list, weights: torch.Tensor,
                        sender: torch.Tensor, receiver: torch.Tensor, num_nodes: int) -> torch.Tensor:
    r""":math:`m_n = \sum_{e: r(e) = n} D_e^\top M_e D_e\, x_{s(e)}`: gather, :func:`so2_conv` with the
    given Wigner blocks, scatter. The reference of the registry op ``so2_message_passing``."""
    y = so2_conv(plan, node_feats.index_select(0, sender), None, weights, wigner=wigner)
    return y.new_zeros(num_nodes, y.shape[1]).index_add(0, receiver, y)


class SO2MessageTP(MessageTensorProduct):
    r"""SO(2) replacement for MACE's edge tensor product ``x_sender (x) Y(edge)``.

    Signature::

        tp = SO2MessageTP(irreps_in, lmax_sh, irreps_out_target, mmax)
        tp.irreps_out      # e3nn Irreps: mul_i x ir_out per connected (input irrep, target irrep) pair
        tp.weight_numel    # int
        y = tp(x_sender,     # (E, irreps_in.dim), mul_ir layout
               edge_vectors, # (E, 3), need not be normalised
               weights)      # (E, weight_numel), e.g. a radial MLP output
        # y: (E, tp.irreps_out.dim), mul_ir layout

    Channels are depthwise (``u -> u``, like MACE's ``uvu``). A pair ``ir_i -> ir_o`` is
    connected iff some edge harmonic ``l_f <= lmax_sh`` couples them with matching parity;
    ``irreps_out`` lists the pairs by input irrep, then in target order. With
    ``mmax >= max l`` the output equals the CG product summed over ``l_f`` (all ``l_f`` up to
    ``l_i + l_o``, so when ``lmax_sh < l_i + l_o`` the SO(2) map is a superset of the CG one);
    :func:`so2_weights_from_cg` maps CG path weights of :func:`cg_message_reference` to ours.

    As a :class:`~mlpot.o3.message_passing.MessageTensorProduct` it reads the edge frames' Wigner
    blocks from the shared edge geometry (``frames_lmax``), not the spherical harmonics.
    """

    op = "so2_message_passing"
    needs_sh = False

    def __init__(self, irreps_in, lmax_sh: int, irreps_out_target, mmax: int, backend: str = "reference"):
        super().__init__(backend)
        if not isinstance(mmax, int) or isinstance(mmax, bool) or mmax < 0:
            raise ConfigError(f"SO(2) message: mmax must be a non-negative int, got {mmax!r}")
        self.irreps_in = o3.Irreps(irreps_in)
        self.lmax_sh, self.mmax = lmax_sh, mmax
        target = []
        for _, ir in o3.Irreps(irreps_out_target):
            if ir not in target:
                target.append(ir)
        out, pairs = [], []
        for i, (mul, ir_i) in enumerate(self.irreps_in):
            for ir_o in target:
                kind = _path_kind(ir_i, ir_o, lmax_sh)
                if kind is None or (kind == "odd" and (mmax < 1 or min(ir_i.l, ir_o.l) < 1)):
                    continue
                pairs.append((i, len(out)))
                out.append((mul, ir_o))
        self.irreps_out = o3.Irreps(out)
        self.plan = SO2Plan(self.irreps_in, self.irreps_out, mmax, mode="depthwise", lmax_f=lmax_sh, pairs=pairs)
        self.weight_numel = self.plan.weight_numel
        self.frames_lmax = self.plan.lmax
        self.check_backend(layout=_kernel_layout(self.plan))
        self._table = None

    def forward(self, x_sender: torch.Tensor, edge_vectors: torch.Tensor, weights: torch.Tensor,
                rotation: torch.Tensor | None = None) -> torch.Tensor:
        return so2_conv(self.plan, x_sender, edge_vectors, weights, rotation)

    def edge_product(self, x_sender: torch.Tensor, geometry: EdgeGeometry, weights: torch.Tensor) -> torch.Tensor:
        return so2_conv(self.plan, x_sender, None, weights, wigner=geometry.require("wigner", "SO2MessageTP"))

    def message_passing(self, node_feats, edge_geometry, weights, sender, receiver, num_nodes: int):
        """Reference: gather, :func:`so2_conv`, scatter; ``triton``: the fused SO(2) kernel."""
        wigner = edge_geometry.require("wigner", "SO2MessageTP")
        if sender.shape[0] == 0:
            return node_feats.new_zeros(num_nodes, self.irreps_out.dim) + 0.0 * weights.sum()
        if self.selected_backend(node_feats.device) == "triton":
            return self._triton_message_passing(node_feats, wigner, weights, sender, receiver, num_nodes)
        return so2_message_passing(self.plan, node_feats, wigner, weights, sender, receiver, num_nodes)

    def _triton_message_passing(self, node_feats, wigner, weights, sender, receiver, num_nodes):
        from mlpot.o3.backend import implementation, kernels_module
        mod = kernels_module("so2")
        if self._table is None:
            self._table = mod.SO2Table(self.plan)
        edge_plan = kernels_module("channelwise_tp").EdgePlan.cached(sender, receiver, num_nodes)
        x = mul_ir_to_channel_last(node_feats, self.irreps_in)
        blocks = block_diagonal(wigner[: self.plan.lmax + 1])
        y = implementation("so2_message_passing", "triton")(x, weights, blocks, edge_plan, self._table)
        return channel_last_to_mul_ir(y, self.irreps_out)

    def extra_repr(self) -> str:
        return f"{self.irreps_in} x Y(lmax={self.lmax_sh}) -> {self.irreps_out}, mmax={self.mmax}"


def so2_from_cg_matrix(tp: SO2MessageTP, irreps_mid=None, instructions=None) -> torch.Tensor:
    r"""Constant matrix ``T`` (float64, ``(cg_numel, so2_numel)``) with ``w_so2 = w_cg @ T``.

    ``w_cg`` is in the weight layout of ``e3nn.o3.TensorProduct`` built from
    :func:`cg_message_reference` (``uvu``, one weight per channel per path). For a CG path
    ``(i, l_f, o)`` e3nn computes :math:`y_o = \sqrt{2l_o+1}\, w \sum C_{a b k} x_a Y_b`
    (:math:`C` = ``wigner_3j(l_i, l_f, l_o)``); in the edge frame :math:`Y_b = \sqrt{2l_f+1}
    \delta_{b,l_f}`, so :math:`W^{(1)}_m` gets :math:`\sqrt{(2l_o+1)(2l_f+1)} C_{l_i+m,\,l_f,\,l_o+m}`
    and :math:`W^{(2)}_m` gets :math:`\sqrt{(2l_o+1)(2l_f+1)} C_{l_i+m,\,l_f,\,l_o-m}` per unit CG weight.
    """
    if irreps_mid is None or instructions is None:
        irreps_mid, instructions = cg_message_reference(tp.irreps_in, tp.lmax_sh, tp.irreps_out)
    irreps_mid = o3.Irreps(irreps_mid)
    # offsets of the CG weights (uvu: mul_i per instruction, in instruction order)
    cg_off, off = [], 0
    for ins in instructions:
        cg_off.append(off)
        off += tp.irreps_in[ins[0]].mul
    T = torch.zeros(off, tp.weight_numel, dtype=torch.float64)
    out_index = {}  # (i_in, ir_out) -> i_out of tp
    for p in tp.plan.paths:
        out_index[(p.i_in, tp.irreps_out[p.i_out].ir)] = p.i_out
    for k, ins in enumerate(instructions):
        i, f, o_mid = ins[0], ins[1], ins[2]
        mul, ir_i = tp.irreps_in[i]
        l_f = f  # Irreps.spherical_harmonics(lmax)[f] has l = f
        ir_o = irreps_mid[o_mid].ir
        if (i, ir_o) not in out_index:
            continue
        o = out_index[(i, ir_o)]
        C = o3.wigner_3j(ir_i.l, l_f, ir_o.l, dtype=torch.float64)
        scale = math.sqrt((2 * ir_o.l + 1) * (2 * l_f + 1))
        for p in tp.plan.paths:
            if p.i_in != i or p.i_out != o:
                continue
            if p.kind == "even":
                c = C[ir_i.l + p.m, l_f, ir_o.l + p.m]
            else:
                c = C[ir_i.l + p.m, l_f, ir_o.l - p.m]
            idx = torch.arange(mul)
            T[cg_off[k] + idx, p.offset + idx] += scale * float(c)
    return T


def so2_weights_from_cg(tp: SO2MessageTP, cg_weights: torch.Tensor) -> torch.Tensor:
    """Map CG weights ``(E, cg_numel)`` of :func:`cg_message_reference` to ``(E, tp.weight_numel)``."""
    T = so2_from_cg_matrix(tp).to(dtype=cg_weights.dtype, device=cg_weights.device)
    if cg_weights.shape[-1] != T.shape[0]:
        raise DataError(f"so2_weights_from_cg: expected {T.shape[0]} CG weights per edge, got {cg_weights.shape[-1]}")
    return cg_weights @ T
