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
w.r.t. ``Y`` is ``dF/dY``. Derivatives of these are again derivatives of ``F``, so backward and
double backward reuse the same three kernels (``_TrilinearOp`` is its own backward).

Layout (internal, converted at the boundary by :mod:`mlpot.o3.layout`): node tensors are
channel-last ``(N, D, C)``; ``Y`` is ``(E, D_sh)``; ``w`` is ``(E, P, C)``, which is exactly e3nn's
flat ``uvu`` weight order ``(E, P*C)`` reshaped. Edges need not be sorted: a CSR over receivers
(and one over senders for the gradient w.r.t. ``x``) is built once per graph in
:class:`EdgePlan` and reused while the edges are unchanged (:meth:`EdgePlan.cached`); each program owns one node and one channel block and loops over its edges, so
the reduction is deterministic and needs no atomics and no ``(E, C, P)`` intermediate.
"""
from dataclasses import dataclass, field

import torch
from e3nn import o3

from mlpot.o3.layout import channel_last_to_mul_ir, mul_ir_to_channel_last, uniform_mul

from ._runtime import LazyKernel, check_device, multilinear_form_backward, tl

_CFG_C = [({"BLOCK_C": bc}, w, 2) for bc, w in ((32, 1), (64, 2), (128, 4), (32, 2), (64, 4))]


# --------------------------------------------------------------------------------------------- kernels
def _node_kernel(out_ptr, node_ptr, y_ptr, w_ptr,
                 seg_ptr, seg_edge_ptr, other_ptr,
                 row_ptr, col_node_ptr, col_y_ptr, col_w_ptr, coef_ptr,
                 C, D_node, D_out, D_y, P,
                 BLOCK_C: tl.constexpr):
    """out[n, r, c] = sum_{e in seg(n)} sum_{t in row r} coef * node[other(e), a_t, c] Y[e, y_t] W[e, p_t, c]."""
    n = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    q0 = tl.load(seg_ptr + n)
    q1 = tl.load(seg_ptr + n + 1)
    for r in range(D_out):
        t0 = tl.load(row_ptr + r)
        t1 = tl.load(row_ptr + r + 1)
        acc = tl.zeros([BLOCK_C], dtype=out_ptr.dtype.element_ty)
        for q in range(q0, q1):
            e = tl.load(seg_edge_ptr + q)
            s = tl.load(other_ptr + e)
            for t in range(t0, t1):
                a = tl.load(col_node_ptr + t)
                j = tl.load(col_y_ptr + t)
                p = tl.load(col_w_ptr + t)
                cf = tl.load(coef_ptr + t)
                yv = tl.load(y_ptr + e * D_y + j)
                xv = tl.load(node_ptr + (s * D_node + a) * C + c, mask=cm, other=0.0)
                wv = tl.load(w_ptr + (e * P + p) * C + c, mask=cm, other=0.0)
                acc += (cf * yv) * xv * wv
        tl.store(out_ptr + (n * D_out + r) * C + c, acc, mask=cm)


def _edge_channel_kernel(out_ptr, a_ptr, b_ptr, y_ptr, src_ptr, dst_ptr,
                         row_ptr, col_a_ptr, col_b_ptr, col_y_ptr, coef_ptr,
                         C, D_a, D_b, D_y, P,
                         BLOCK_C: tl.constexpr):
    """out[e, p, c] = sum_{t in row p} coef * A[src e, a_t, c] B[dst e, b_t, c] Y[e, y_t]."""
    e = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    s = tl.load(src_ptr + e)
    d = tl.load(dst_ptr + e)
    for r in range(P):
        t0 = tl.load(row_ptr + r)
        t1 = tl.load(row_ptr + r + 1)
        acc = tl.zeros([BLOCK_C], dtype=out_ptr.dtype.element_ty)
        for t in range(t0, t1):
            a = tl.load(col_a_ptr + t)
            b = tl.load(col_b_ptr + t)
            j = tl.load(col_y_ptr + t)
            cf = tl.load(coef_ptr + t)
            yv = tl.load(y_ptr + e * D_y + j)
            av = tl.load(a_ptr + (s * D_a + a) * C + c, mask=cm, other=0.0)
            bv = tl.load(b_ptr + (d * D_b + b) * C + c, mask=cm, other=0.0)
            acc += (cf * yv) * av * bv
        tl.store(out_ptr + (e * P + r) * C + c, acc, mask=cm)


def _edge_kernel(out_ptr, a_ptr, b_ptr, w_ptr, src_ptr, dst_ptr,
                 row_ptr, col_a_ptr, col_b_ptr, col_w_ptr, coef_ptr,
                 C, D_a, D_b, D_y, P,
                 BLOCK_C: tl.constexpr):
    """out[e, j] = sum_c sum_{t in row j} coef * A[src e, a_t, c] B[dst e, b_t, c] W[e, p_t, c]."""
    e = tl.program_id(0).to(tl.int64)
    s = tl.load(src_ptr + e)
    d = tl.load(dst_ptr + e)
    for r in range(D_y):
        t0 = tl.load(row_ptr + r)
        t1 = tl.load(row_ptr + r + 1)
        acc = tl.zeros([BLOCK_C], dtype=out_ptr.dtype.element_ty)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            cm = c < C
            for t in range(t0, t1):
                a = tl.load(col_a_ptr + t)
                b = tl.load(col_b_ptr + t)
                p = tl.load(col_w_ptr + t)
                cf = tl.load(coef_ptr + t)
                av = tl.load(a_ptr + (s * D_a + a) * C + c, mask=cm, other=0.0)
                bv = tl.load(b_ptr + (d * D_b + b) * C + c, mask=cm, other=0.0)
                wv = tl.load(w_ptr + (e * P + p) * C + c, mask=cm, other=0.0)
                acc += cf * av * bv * wv
        tl.store(out_ptr + e * D_y + r, tl.sum(acc, axis=0))


_NODE = LazyKernel(_node_kernel, _CFG_C, key=["C", "D_out"])
_EDGE_CHANNEL = LazyKernel(_edge_channel_kernel, _CFG_C, key=["C", "P"])
_EDGE = LazyKernel(_edge_kernel, [({"BLOCK_C": 32}, 1, 2), ({"BLOCK_C": 64}, 2, 2), ({"BLOCK_C": 128}, 4, 2)],
                   key=["C", "D_y"])


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
    """Sparse CG entries of a channelwise ("uvu") tensor product, plus one CSR per role."""

    a: torch.Tensor  # input row (into D_in)
    y: torch.Tensor  # SH row (into D_sh)
    p: torch.Tensor  # path (instruction) index
    b: torch.Tensor  # output row (into D_out)
    coef: torch.Tensor  # float64
    D_in: int
    D_sh: int
    D_out: int
    P: int
    _by: dict = field(default_factory=dict, repr=False)

    def by(self, role: str, device, dtype):
        """Entries sorted by ``role`` ('a', 'b', 'y', 'p'): (row_ptr, cols dict, coef) on device."""
        key = (role, str(device), dtype)
        if key not in self._by:
            rows = getattr(self, role)
            n = {"a": self.D_in, "b": self.D_out, "y": self.D_sh, "p": self.P}[role]
            perm, ptr = _csr(rows, n)
            cols = {k: getattr(self, k)[perm].to(device) for k in ("a", "y", "p", "b")}
            self._by[key] = (ptr.to(device), cols, self.coef[perm].to(device=device, dtype=dtype))
        return self._by[key]


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
def _launch(role: str, plan: EdgePlan, table: TPTable, A, B, Y, W, C: int) -> torch.Tensor:
    ref = next(t for t in (A, B, Y, W) if t is not None)
    dev, dt = ref.device, ref.dtype
    E = plan.src.shape[0]
    ptr, cols, coef = table.by(role, dev, dt)
    if role in ("a", "b"):
        D_out = table.D_in if role == "a" else table.D_out
        out = torch.empty(plan.num_nodes, D_out, C, device=dev, dtype=dt)
        if plan.num_nodes == 0 or C == 0:
            return out.zero_()
        if role == "b":  # forward: gather A at the sender, reduce over receiver segments
            perm, seg = plan.segments("dst")
            node, other, col_node, D_node = A, plan.src, cols["a"], table.D_in
        else:  # gradient w.r.t. x: gather B at the receiver, reduce over sender segments
            perm, seg = plan.segments("src")
            node, other, col_node, D_node = B, plan.dst, cols["b"], table.D_out
        grid = lambda m: (plan.num_nodes, triton_cdiv(C, m["BLOCK_C"]))
        _NODE[grid](out, node, Y, W, seg, perm, other, ptr, col_node, cols["y"], cols["p"], coef,
                    C, D_node, D_out, table.D_sh, table.P)
        return out
    if role == "p":
        out = torch.empty(E, table.P, C, device=dev, dtype=dt)
        if E == 0 or C == 0:
            return out.zero_()
        grid = lambda m: (E, triton_cdiv(C, m["BLOCK_C"]))
        _EDGE_CHANNEL[grid](out, A, B, Y, plan.src, plan.dst, ptr, cols["a"], cols["b"], cols["y"], coef,
                            C, table.D_in, table.D_out, table.D_sh, table.P)
        return out
    out = torch.empty(E, table.D_sh, device=dev, dtype=dt)
    if E == 0:
        return out
    if C == 0:
        return out.zero_()
    _EDGE[(E,)](out, A, B, W, plan.src, plan.dst, ptr, cols["a"], cols["b"], cols["p"], coef,
                C, table.D_in, table.D_out, table.D_sh, table.P)
    return out


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


_ROLES = ("a", "b", "y", "p")


class _TrilinearOp(torch.autograd.Function):
    """``dF/d(role)`` of the trilinear form (module docstring); the operand ``role`` is passed as None."""

    @staticmethod
    def forward(ctx, role, plan, table, C, A, B, Y, W):
        ops = {"a": A, "b": B, "y": Y, "p": W}
        ops = {k: (v.contiguous() if v is not None else None) for k, v in ops.items()}
        out = _launch(role, plan, table, ops["a"], ops["b"], ops["y"], ops["p"], C)
        ctx.role, ctx.plan, ctx.table, ctx.C = role, plan, table, C
        ctx.save_for_backward(ops["a"], ops["b"], ops["y"], ops["p"])
        return out

    @staticmethod
    def backward(ctx, grad):
        grads = multilinear_form_backward(
            _ROLES, ctx.role, ctx.saved_tensors, grad, ctx.needs_input_grad[4:],
            lambda k, *ops: _TrilinearOp.apply(k, ctx.plan, ctx.table, ctx.C, *ops))
        return (None, None, None, None, *grads)


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
    return _TrilinearOp.apply("b", plan, table, C, x, None, Y, w)


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
