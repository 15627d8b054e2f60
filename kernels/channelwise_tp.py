"""Fused channelwise message passing (MACE's interaction): gather, "uvu" CG tensor product, scatter.

Math. For node features ``x`` with irreps ``C x l1`` (all irreps the same multiplicity ``C``),
edge spherical harmonics ``Y`` (multiplicity 1) and per-edge, per-path, per-channel weights ``w``::

    out[n, k, c] = sum_{e : dst(e) = n}  sum_{paths p = (l1, l2, l3)}  sum_{i in l1, j in l2, k in l3}
                   alpha_p * C^{l1 l2 l3}_{i j k} * x[src(e), i, c] * Y[e, j] * w[e, p, c]

``C`` is e3nn's ``wigner_3j`` (Frobenius norm 1) and ``alpha_p`` e3nn's path weight for
``irrep_normalization="component"``, ``path_normalization="element"``: with ``n_out(p)`` the
number of paths into the output irrep of ``p``, ``alpha_p = sqrt((2 l3 + 1) / n_out(p))``. This
equals e3nn ``TensorProduct(irreps_in, irreps_sh, irreps_out, [(i1, i2, io, "uvu", True)],
shared_weights=False, internal_weights=False)`` applied to ``x[src]`` followed by
``index_add`` into ``dst``.

Sparse form. The CG coefficients become a table of entries ``t = (a_t, y_t, p_t, b_t, coef_t)``
(input row, SH row, path, output row). Everything here is the trilinear form

    F(A, B, Y, W) = sum_e sum_c sum_t coef_t A[src e, a_t, c] B[dst e, b_t, c] Y[e, y_t] W[e, p_t, c]

and every op is its derivative w.r.t. one operand: the forward is ``dF/dB`` (B -> out), the
gradient w.r.t. ``x`` is ``dF/dA`` with ``B := grad_out``, w.r.t. ``w`` is ``dF/dW`` and
w.r.t. ``Y`` is ``dF/dY``. Derivatives of these are again derivatives of ``F``: the forward
kernel computes ``dF/dB``, one backward kernel computes any of ``dF/dA``, ``dF/dW``, ``dF/dY``
in one pass. The double backward (:class:`_MPBackward`) is the eps-linear part of those forms at
``(x + eps ax, Y + eps aY, w + eps aw)``: when no graph is built (a force-training step) one fused
tangent kernel computes it (``dg`` and the edge gradients) with each operand read once; when a graph is built it is three
forward and three backward passes through the same two Functions (differentiable to any order).

Kernels (:mod:`mlpot.kernels.mp_codegen`): generated per CG table, the entries unrolled with their
coefficients as constants. Loops are edge-outer: one program per receiver and channel block walks
its receiver-sorted edges once, loading ``x[src]``, ``w[e]`` and ``Y[e]`` once per edge, with the
receiver's whole output (forward) or gradient (backward) row block in registers. The backward
writes per edge ``dw[e]``, ``dY[e]`` (fixed 32-channel partial sums) and ``h[e] = d/dx[src e]``;
``dx`` sums ``h`` over each sender's edges (sender-sorted CSR). No atomics: bit-identical runs.

Layout (internal, converted at the boundary by :mod:`mlpot.o3.layout`): node tensors are
channel-last ``(N, D, C)``; ``Y`` is ``(E, D_sh)``; ``w`` is ``(E, P, C)``, which is exactly e3nn's
flat ``uvu`` weight order ``(E, P*C)`` reshaped. Edges need not be sorted: the CSRs over
receivers and senders are built once per graph in :class:`EdgePlan` and reused while the edges
are unchanged (:meth:`EdgePlan.cached`).
"""
from dataclasses import dataclass, field

import torch
from e3nn import o3

from mlpot.o3.layout import channel_last_to_mul_ir, mul_ir_to_channel_last, uniform_mul

from . import mp_codegen as MPG
from ._runtime import check_device


# --------------------------------------------------------------------------------------------- plans
def _csr(index: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(perm, ptr): ``perm[ptr[k]:ptr[k+1]]`` are the positions where ``index == k``."""
    perm = torch.sort(index, stable=True).indices
    counts = torch.bincount(index, minlength=n)
    ptr = torch.zeros(n + 1, dtype=torch.int64, device=index.device)
    ptr[1:] = torch.cumsum(counts, 0)
    return perm.contiguous(), ptr


@dataclass
class EdgePlan:
    """Per-graph index structures: sender ``src`` and receiver ``dst`` (int64, (E,)), CSR over both."""

    src: torch.Tensor
    dst: torch.Tensor
    num_nodes: int
    _csr: dict = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, src: torch.Tensor, dst: torch.Tensor, num_nodes: int):
        return cls(src.to(torch.int64).contiguous(), dst.to(torch.int64).contiguous(), int(num_nodes))

    @classmethod
    def cached(cls, src: torch.Tensor, dst: torch.Tensor, num_nodes: int):
        """The plan of this graph, reused while the edges are unchanged.

        The layers of one model call, and the calls of an MD run or a relaxation between two
        neighbour-list builds, pass equal ``(src, dst)`` (often as new tensors: the calculator
        builds a new graph each call), so the sorts run once per neighbour list. Equality is
        checked by content (``torch.equal``, one pass over the indices), never by address.
        """
        src = src.to(torch.int64)
        dst = dst.to(torch.int64)
        key = (src.shape[0], int(num_nodes), str(src.device))
        for k, plan in _PLAN_CACHE:
            if k == key and torch.equal(plan.src, src) and torch.equal(plan.dst, dst):
                return plan
        plan = cls.build(src, dst, num_nodes)
        _PLAN_CACHE.insert(0, (key, plan))
        del _PLAN_CACHE[PLAN_CACHE_SIZE:]
        return plan

    def segments(self, side: str) -> tuple[torch.Tensor, torch.Tensor]:
        if side not in self._csr:
            self._csr[side] = _csr(self.dst if side == "dst" else self.src, self.num_nodes)
        return self._csr[side]


#: plans kept by :meth:`EdgePlan.cached` (most recent first)
PLAN_CACHE_SIZE = 4
_PLAN_CACHE: list = []


@dataclass
class TPTable:
    """Sparse CG entries of a channelwise ("uvu") tensor product (the kernels of
    :mod:`mlpot.kernels.mp_codegen` are generated from it)."""

    a: torch.Tensor  # input row (into D_in)
    y: torch.Tensor  # SH row (into D_sh)
    p: torch.Tensor  # path (instruction) index
    b: torch.Tensor  # output row (into D_out)
    coef: torch.Tensor  # float64
    D_in: int
    D_sh: int
    D_out: int
    P: int
    _mp_key: str | None = field(default=None, repr=False)  # hash of its generated kernels


def e3nn_uvu_path_weights(irreps_in, irreps_sh, irreps_out, instructions) -> list[float]:
    """e3nn's path weights for "uvu" (:func:`mlpot.o3.tensor_product.uvu_path_weights`)."""
    from mlpot.o3.tensor_product import uvu_path_weights

    return uvu_path_weights(irreps_sh, irreps_out, instructions)


def build_uvu_table(irreps_in, irreps_sh, irreps_out, instructions) -> TPTable:
    """Sparse table of ``alpha_p * wigner_3j`` for instructions ``[(i_in, i_sh, i_out), ...]``."""
    irreps_in, irreps_sh, irreps_out = (o3.Irreps(i) for i in (irreps_in, irreps_sh, irreps_out))
    uniform_mul(irreps_in)
    uniform_mul(irreps_out)
    if any(mul != 1 for mul, _ in irreps_sh):
        raise ValueError(f"the edge attributes must have multiplicity 1, got {irreps_sh}")
    if uniform_mul(irreps_in) != uniform_mul(irreps_out):
        raise ValueError("uvu keeps the channel count: irreps_in and irreps_out need the same multiplicity")
    off = lambda irreps: [sum(ir.dim for _, ir in irreps[:k]) for k in range(len(irreps))]
    oi, oy, oo = off(irreps_in), off(irreps_sh), off(irreps_out)
    pw = e3nn_uvu_path_weights(irreps_in, irreps_sh, irreps_out, instructions)
    rows = []
    for p, (i1, i2, io) in enumerate(instructions):
        l1, l2, l3 = irreps_in[i1].ir.l, irreps_sh[i2].ir.l, irreps_out[io].ir.l
        if irreps_in[i1].ir.p * irreps_sh[i2].ir.p != irreps_out[io].ir.p or not abs(l1 - l2) <= l3 <= l1 + l2:
            raise ValueError(f"instruction {(i1, i2, io)} violates the selection rules")
        w3j = o3.wigner_3j(l1, l2, l3, dtype=torch.float64)
        for i, j, k in torch.nonzero(w3j.abs() > 1e-12).tolist():
            rows.append((oi[i1] + i, oy[i2] + j, p, oo[io] + k, pw[p] * float(w3j[i, j, k])))
    t = torch.tensor([r[:4] for r in rows], dtype=torch.int64).reshape(-1, 4)
    coef = torch.tensor([r[4] for r in rows], dtype=torch.float64)
    return TPTable(t[:, 0].contiguous(), t[:, 1].contiguous(), t[:, 2].contiguous(), t[:, 3].contiguous(),
                   coef, sum(ir.dim for _, ir in irreps_in), irreps_sh.dim,
                   sum(ir.dim for _, ir in irreps_out), len(instructions))


# --------------------------------------------------------------------------------------------- launch
def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _forward(plan: EdgePlan, table: TPTable, x, Y, w) -> torch.Tensor:
    """``out[n] = sum_{e: dst(e) = n} TP(x[src e], Y[e], w[e])``: the generated edge-outer forward."""
    N, C = plan.num_nodes, x.shape[-1]
    out = torch.empty(N, table.D_out, C, device=x.device, dtype=x.dtype)
    if N == 0 or C == 0:
        return out.zero_()
    fwd, _ = MPG.kernels_for(table)
    perm, seg = plan.segments("dst")
    for group in MPG.launch_groups(table, x.dtype):
        fwd[lambda m: (N, triton_cdiv(C, m["BLOCK_C"]))](out, x, Y, w, seg, perm, plan.src, C, GROUP=group)
    return out


def _backward(plan: EdgePlan, table: TPTable, x, Y, w, g, need: tuple) -> list:
    """``[dx, dY, dw]`` of ``<g, forward(x, Y, w)>`` (None where ``need`` is False).

    One receiver-outer pass writes, per edge, ``h[e] = d<g, out>/d x[src e]``, ``dw[e]`` and the
    32-channel partial sums of ``dY[e]``; ``dx`` then sums ``h`` over each sender's edges. ``x`` may
    be None when neither ``dw`` nor ``dY`` is needed, ``w`` when neither ``dx`` nor ``dY`` is.
    """
    need_x, need_y, need_w = (bool(v) for v in need)
    N, E, C = plan.num_nodes, plan.src.shape[0], g.shape[-1]
    dev, dt = g.device, g.dtype
    nsub = triton_cdiv(C, MPG.DY_SUB)
    h = torch.empty(E, table.D_in, C, device=dev, dtype=dt) if need_x else None
    dw = torch.empty(E, table.P, C, device=dev, dtype=dt) if need_w else None
    dy = torch.empty(E, table.D_sh, nsub, device=dev, dtype=dt) if need_y else None
    if E > 0 and C > 0 and N > 0 and (need_x or need_y or need_w):
        _, bwd = MPG.kernels_for(table)
        perm, seg = plan.segments("dst")
        ph = lambda t: g if t is None else t  # unused operand: any pointer of the dtype
        for group in MPG.launch_groups(table, dt):  # in order: the first group writes, the others add
            bwd[lambda m: (N, triton_cdiv(C, m["BLOCK_C"]))](
                ph(h), ph(dw), ph(dy), g, ph(x), Y, ph(w), seg, perm, plan.src, C, nsub,
                NEED_H=need_x, NEED_W=need_w, NEED_Y=need_y, GROUP=group)
    else:
        for t in (h, dw, dy):
            if t is not None:
                t.zero_()
    dx = None
    if need_x:
        perm_s, seg_s = plan.segments("src")
        dx = MPG.segment_sum(h, seg_s, perm_s, N)
    return [dx, dy.sum(-1) if need_y else None, dw]


def _tangent(plan: EdgePlan, table: TPTable, x, Y, w, g, ax, aY, aw, need: tuple) -> list:
    """The double backward in one fused pass: ``[gx, gY, gw, gg]`` (None where not needed or
    where no tangent contributes) of :class:`_MPBackward` with incoming gradients ``(ax, aY, aw)``
    (each may be None: zero).

    One receiver-outer pass of the tangent kernel (``g[n]`` once per receiver; per edge ``x, ax``
    at the sender and ``Y, aY, w, aw`` once): it sums ``gg = MP(ax, Y, w) + MP(x, aY, w) + MP(x, Y,
    aw)`` in registers (written once per receiver) and writes ``h[e]``, ``dw[e]`` and the ``dY``
    partials once; then the sender sum of ``h`` gives ``gx``. Which tangents
    are set and which gradients are needed are constexpr flags: no zero tensor is read.
    """
    nx, nY, nw, ng = (bool(v) for v in need)
    tx, ty, tw = ax is not None, aY is not None, aw is not None
    # only the gradients with at least one contributing term
    nx, nY, nw, ng = nx and (tw or ty), nY and (tx or tw), nw and (tx or ty), ng and (tx or ty or tw)
    N, E, C = plan.num_nodes, plan.src.shape[0], g.shape[-1]
    dev, dt = g.device, g.dtype
    tbw = MPG.tangent_kernel_for(table)
    perm, seg = plan.segments("dst")
    ph = lambda t: g if t is None else t  # unused operand: any pointer of the dtype
    nsub = triton_cdiv(C, MPG.DY_SUB)
    gg = torch.empty(N, table.D_out, C, device=dev, dtype=dt) if ng else None
    h = torch.empty(E, table.D_in, C, device=dev, dtype=dt) if nx else None
    dw = torch.empty(E, table.P, C, device=dev, dtype=dt) if nw else None
    dy = torch.empty(E, table.D_sh, nsub, device=dev, dtype=dt) if nY else None
    if N > 0 and E > 0 and C > 0 and (ng or nx or nY or nw):
        # in order: each group writes its gg rows; the first writes h/dw/dY, the others add
        for group in MPG.launch_groups(table, dt, tangent=True):
            tbw[lambda m: (N, triton_cdiv(C, m["BLOCK_C"]))](
                ph(gg), ph(h), ph(dw), ph(dy), g, x, Y, w, ph(ax), ph(aY), ph(aw), seg, perm, plan.src, C, nsub,
                TX=tx, TY=ty, TW=tw, NEED_G=ng, NEED_H=nx, NEED_W=nw, NEED_Y=nY, GROUP=group)
    else:
        for t in (gg, h, dw, dy):
            if t is not None:
                t.zero_()
    gx = None
    if nx:
        perm_s, seg_s = plan.segments("src")
        gx = MPG.segment_sum(h, seg_s, perm_s, N)
    return [gx, dy.sum(-1) if nY else None, dw, gg]


class _MPForward(torch.autograd.Function):
    """``out = MP(x, Y, w)``; its backward is :class:`_MPBackward` (kernels, any order)."""

    @staticmethod
    def forward(ctx, plan, table, x, Y, w):
        ctx.plan, ctx.table = plan, table
        ctx.save_for_backward(x, Y, w)
        return _forward(plan, table, x, Y, w)

    @staticmethod
    def backward(ctx, g):
        x, Y, w = ctx.saved_tensors
        need = tuple(ctx.needs_input_grad[2:5])
        if not any(need):
            return None, None, None, None, None
        dx, dY, dw = _MPBackward.apply(ctx.plan, ctx.table, need, x, Y, w, g.contiguous())
        return None, None, dx, dY, dw


class _MPBackward(torch.autograd.Function):
    """``(dx, dY, dw) = d<g, MP(x, Y, w)>/d(x, Y, w)``, each a trilinear form of the operands.

    Its backward (the double backward of the message passing) is, with ``(ax, aY, aw)`` the
    incoming gradients: ``d g = MP(ax, Y, w) + MP(x, Y, aw) + MP(x, aY, w)``, and the terms of
    ``dx, dw, dY`` from three more backward passes: ``(ax, Y, w, g) -> dw, dY``; ``(x, Y, aw, g) -> dx,
    dY``; ``(x, aY, w, g) -> dx, dw``. Each is the eps-linear part of the same trilinear form at
    ``(x + eps ax, Y + eps aY, w + eps aw)``.

    Two paths. When no graph is being built (``torch.is_grad_enabled()`` is False inside this
    backward, i.e. ``create_graph=False``: the force-training step, whose loss backward builds no
    graph), the fused path :func:`_tangent` runs: one tangent pass for ``dg, dx, dY, dw``
    (then the sender sum), each operand read once. Otherwise (a graph
    is built: third and higher derivatives) the composed path runs the first-order kernels through
    these two Functions (three forward and up to three backward passes), so every order stays
    differentiable. Neither path uses atomics.
    """

    @staticmethod
    def forward(ctx, plan, table, need, x, Y, w, g):
        ctx.plan, ctx.table = plan, table
        ctx.save_for_backward(x, Y, w, g)
        outs = _backward(plan, table, x, Y, w, g, need)
        return tuple(outs)

    @staticmethod
    def backward(ctx, ax, aY, aw):
        x, Y, w, g = ctx.saved_tensors
        plan, table = ctx.plan, ctx.table
        nx, nY, nw, ng = ctx.needs_input_grad[3:7]
        gx = gY = gw = gg = None

        if not torch.is_grad_enabled():  # no graph to build: the fused two-pass path
            gx, gY, gw, gg = _tangent(plan, table, x, Y, w, g, ax, aY, aw, (nx, nY, nw, ng))
            return None, None, None, gx, gY, gw, gg

        def add(acc, t):
            return t if acc is None else (acc if t is None else acc + t)

        if ng:
            for a, b, c in ((ax, Y, w), (x, Y, aw), (x, aY, w)):
                if a is not None and b is not None and c is not None:
                    gg = add(gg, _MPForward.apply(plan, table, a, b, c))
        if ax is not None and (nw or nY):
            _, t_y, t_w = _MPBackward.apply(plan, table, (False, nY, nw), ax, Y, w, g)
            gY, gw = add(gY, t_y), add(gw, t_w)
        if aw is not None and (nx or nY):
            t_x, t_y, _ = _MPBackward.apply(plan, table, (nx, nY, False), x, Y, aw, g)
            gx, gY = add(gx, t_x), add(gY, t_y)
        if aY is not None and (nx or nw):
            t_x, _, t_w = _MPBackward.apply(plan, table, (nx, False, nw), x, aY, w, g)
            gx, gw = add(gx, t_x), add(gw, t_w)
        return None, None, None, gx, gY, gw, gg


def channelwise_message_passing(x: torch.Tensor, Y: torch.Tensor, w: torch.Tensor,
                                plan: EdgePlan, table: TPTable) -> torch.Tensor:
    """Fused gather -> uvu TP -> scatter-sum, channel-last layout.

    x: (N, D_in, C) node features, Y: (E, D_sh), w: (E, P, C)  ->  (N, D_out, C).
    Differentiable (any order) w.r.t. x, Y and w.
    """
    check_device(x, Y, w)
    if not (x.dtype == Y.dtype == w.dtype):
        raise TypeError(f"dtype mismatch: x {x.dtype}, Y {Y.dtype}, w {w.dtype}")
    C = x.shape[-1]
    if x.shape[1:] != (table.D_in, C) or Y.shape[1] != table.D_sh or w.shape[1:] != (table.P, C):
        raise ValueError(f"shapes x {tuple(x.shape)}, Y {tuple(Y.shape)}, w {tuple(w.shape)} do not match "
                         f"D_in={table.D_in}, D_sh={table.D_sh}, P={table.P}")
    return _MPForward.apply(plan, table, x.contiguous(), Y.contiguous(), w.contiguous())


class FusedChannelwiseTP:
    """e3nn-boundary wrapper: mul_ir node features in, mul_ir messages (summed per receiver) out.

    ``instructions`` are ``(i_in, i_sh, i_out)`` triples (mode "uvu", trainable weights); the
    weights argument is e3nn's flat ``(E, weight_numel)`` order, i.e. ``(E, P, C)``.
    """

    def __init__(self, irreps_in, irreps_sh, irreps_out, instructions):
        self.irreps_in, self.irreps_sh, self.irreps_out = (o3.Irreps(i) for i in (irreps_in, irreps_sh, irreps_out))
        self.instructions = [tuple(int(v) for v in ins[:3]) for ins in instructions]
        self.table = build_uvu_table(self.irreps_in, self.irreps_sh, self.irreps_out, self.instructions)
        self.C = uniform_mul(self.irreps_in)
        self.weight_numel = self.table.P * self.C

    def __call__(self, node_feats, edge_attrs, weights, sender, receiver, num_nodes=None, plan=None):
        if plan is None:
            plan = EdgePlan.cached(sender, receiver, node_feats.shape[0] if num_nodes is None else num_nodes)
        x = mul_ir_to_channel_last(node_feats, self.irreps_in).contiguous()
        w = weights.reshape(weights.shape[0], self.table.P, self.C)
        out = channelwise_message_passing(x, edge_attrs, w, plan, self.table)
        return channel_last_to_mul_ir(out, self.irreps_out)
