"""Fused SO(2) message passing (eSCN): gather, edge-frame rotation, per-m linear, inverse rotation,
scatter-sum into receivers.

Math (conventions of :mod:`mlpot.o3.so2`). For edge ``e = (s -> n)`` with block-diagonal Wigner
matrix ``D_e = diag(D^0(R_e), ..., D^L(R_e))`` (``R_e`` rotates the edge onto ``y``)::

    out[n] = sum_{e: dst(e) = n}  D_e^T  M_e  D_e  x[src(e)]

``M_e`` is the SO(2) linear map of an :class:`mlpot.o3.so2.SO2Plan` (``mode`` "full" or
"depthwise", weights per edge or shared): for a path ``(l_i -> l_o, m)`` with weight block ``W``
(``C_out x C_in`` row-major, or ``C`` for depthwise), row ``(l, m)`` being ``l^2 + l + m``:
``m = 0``: ``y[l_o,0] += W x[l_i,0]``; even: ``y[l_o,+-m] += W x[l_i,+-m]``; odd:
``y[l_o,+m] -= W x[l_i,-m]``, ``y[l_o,-m] += W x[l_i,+m]``. These are table entries
``(r_out, r_in, offset, sign)``.

Layout: node features channel-last ``(N, D, C)``, the irreps blocks in order with ``2l+1`` rows
each (``mlpot.o3.layout.mul_ir_to_channel_last`` at the boundary; a degree may occur in
several blocks); Wigner blocks ``(E, DW, DW)`` with ``DW >= (L+1)^2``
(``mlpot.o3.wigner.wigner_D_blocks``), addressed per row through the table's row maps; weights
``(E, numel)`` or ``(numel,)``.

Kernel: one program per receiver and output-channel block, edges from a CSR over receivers (no
atomics, no per-edge intermediate in global memory). Per edge: load ``x[src]`` as a tile, build
each needed rotated row with a masked reduction, apply the weight block, and accumulate
``D_e^T y`` as a rank-1 update of the output tile.

Gradients: w.r.t. ``x`` the adjoint ``sum_{e: src(e)=s} D_e^T M_e^T D_e g[dst(e)]`` is the same
kernel (transposed table and weight blocks, CSR over senders), so it is differentiable again;
w.r.t. the weights and the Wigner blocks the gradient (and its derivatives) is taken through the
differentiable torch reference :func:`reference_so2_message_passing`.
"""
import torch

from ._runtime import LazyKernel, check_device, next_pow2, reference_vjp, tl
from .channelwise_tp import EdgePlan


def _so2_kernel(out_ptr, x_ptr, w_ptr, wig_ptr, seg_ptr, perm_ptr, other_ptr,
                row_ptr, col_r_ptr, col_off_ptr, col_sign_ptr,
                in_std_ptr, in_blk_ptr, out_std_ptr, out_blk_ptr,
                CI, CO, DI, DO, DW, stride_we,
                TRANS_W: tl.constexpr, DEPTHWISE: tl.constexpr, BLOCK_CO: tl.constexpr,
                CIP: tl.constexpr, DIP: tl.constexpr, DOP: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    co = tl.program_id(1) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    com = co < CO
    ci = tl.arange(0, CIP)
    cim = ci < CI
    ri = tl.arange(0, DIP)
    rim = ri < DI
    ro = tl.arange(0, DOP)
    rom = ro < DO
    acc = tl.zeros([DOP, BLOCK_CO], dtype=out_ptr.dtype.element_ty)
    istd = tl.load(in_std_ptr + ri, mask=rim, other=0)
    iblk = tl.load(in_blk_ptr + ri, mask=rim, other=-1)
    ostd = tl.load(out_std_ptr + ro, mask=rom, other=0)
    oblk = tl.load(out_blk_ptr + ro, mask=rom, other=-1)
    q0 = tl.load(seg_ptr + n)
    q1 = tl.load(seg_ptr + n + 1)
    for q in range(q0, q1):
        e = tl.load(perm_ptr + q)
        s = tl.load(other_ptr + e)
        if DEPTHWISE:
            X = tl.load(x_ptr + (s * DI + ri[:, None]) * CI + co[None, :],
                        mask=rim[:, None] & com[None, :], other=0.0)
        else:
            X = tl.load(x_ptr + (s * DI + ri[:, None]) * CI + ci[None, :],
                        mask=rim[:, None] & cim[None, :], other=0.0)
        wbase = w_ptr + e * stride_we
        for r in range(DO):
            t0 = tl.load(row_ptr + r)
            t1 = tl.load(row_ptr + r + 1)
            yl = tl.zeros([BLOCK_CO], dtype=out_ptr.dtype.element_ty)
            for t in range(t0, t1):
                rin = tl.load(col_r_ptr + t)
                off = tl.load(col_off_ptr + t)
                sg = tl.load(col_sign_ptr + t)
                s_in = tl.load(in_std_ptr + rin)
                b_in = tl.load(in_blk_ptr + rin)
                drow = tl.load(wig_ptr + (e * DW + s_in) * DW + istd, mask=rim & (iblk == b_in), other=0.0)
                xl = tl.sum(drow[:, None] * X, axis=0)
                if DEPTHWISE:
                    wv = tl.load(wbase + off + co, mask=com, other=0.0)
                    yl += sg * wv * xl
                else:
                    if TRANS_W:
                        wt = tl.load(wbase + off + ci[None, :] * CO + co[:, None],
                                     mask=com[:, None] & cim[None, :], other=0.0)
                    else:
                        wt = tl.load(wbase + off + co[:, None] * CI + ci[None, :],
                                     mask=com[:, None] & cim[None, :], other=0.0)
                    yl += sg * tl.sum(wt * xl[None, :], axis=1)
            s_out = tl.load(out_std_ptr + r)
            b_out = tl.load(out_blk_ptr + r)
            dcol = tl.load(wig_ptr + (e * DW + s_out) * DW + ostd, mask=rom & (oblk == b_out), other=0.0)
            acc += dcol[:, None] * yl[None, :]
    tl.store(out_ptr + (n * DO + ro[:, None]) * CO + co[None, :], acc, mask=rom[:, None] & com[None, :])


_CFG = [({"BLOCK_CO": bc}, w, 2) for bc, w in ((32, 2), (64, 4), (16, 2), (128, 4))]
_KERNEL = LazyKernel(_so2_kernel, _CFG, key=["CI", "CO", "DI", "DO"])


def _rows(irreps):
    """Per row of the channel-last layout (irreps blocks in order, ``2l+1`` rows each): the row of
    ``(block, m)``, its e3nn component index ``l^2 + l + m`` in the Wigner blocks, its block."""
    rows, std, blk, off = {}, [], [], 0
    for b, (_, ir) in enumerate(irreps):
        for m in range(-ir.l, ir.l + 1):
            rows[(b, m)] = off + ir.l + m
            std.append(ir.l * ir.l + ir.l + m)
            blk.append(b)
        off += ir.dim
    return rows, torch.tensor(std, dtype=torch.int64), torch.tensor(blk, dtype=torch.int64)


class SO2Table:
    """Entries ``(r_out, r_in, offset, sign)`` of an :class:`mlpot.o3.so2.SO2Plan` with one multiplicity.

    Rows are those of the channel-last layout of the plan's irreps
    (:func:`mlpot.o3.layout.mul_ir_to_channel_last`: blocks in irreps order, ``2l+1`` rows
    each); a degree may appear in several blocks. ``in_std``/``out_std`` give each row's index in
    the block-diagonal Wigner matrix ``diag(D^0, ..., D^L)``, ``in_blk``/``out_blk`` its block
    (the rotation only mixes rows of one block).
    """

    def __init__(self, plan):
        muls_in = {mul for mul, _ in plan.irreps_in}
        muls_out = {mul for mul, _ in plan.irreps_out}
        if len(muls_in) != 1 or len(muls_out) != 1:
            raise ValueError("the SO(2) kernel needs one multiplicity for the input and one for the output irreps")
        self.plan = plan
        self.CI = muls_in.pop()
        self.CO = muls_out.pop()
        self.DI = sum(ir.dim for _, ir in plan.irreps_in)
        self.DO = sum(ir.dim for _, ir in plan.irreps_out)
        self.lmax = plan.lmax
        self.depthwise = plan.mode == "depthwise"
        self.weight_numel = plan.weight_numel
        rin, self.in_std, self.in_blk = _rows(plan.irreps_in)
        rout, self.out_std, self.out_blk = _rows(plan.irreps_out)
        ent = []
        for p in plan.paths:
            i, o, m = p.i_in, p.i_out, p.m
            if m == 0:
                ent.append((rout[(o, 0)], rin[(i, 0)], p.offset, 1.0))
            elif p.kind == "even":
                ent += [(rout[(o, m)], rin[(i, m)], p.offset, 1.0), (rout[(o, -m)], rin[(i, -m)], p.offset, 1.0)]
            else:
                ent += [(rout[(o, m)], rin[(i, -m)], p.offset, -1.0), (rout[(o, -m)], rin[(i, m)], p.offset, 1.0)]
        self.entries = ent
        self._cache: dict = {}

    def get(self, transpose: bool, device, dtype):
        key = (transpose, str(device), dtype)
        if key not in self._cache:
            ent = [(ri, ro, off, sg) for ro, ri, off, sg in self.entries] if transpose else self.entries
            nrows = self.DI if transpose else self.DO
            rows = torch.tensor([e[0] for e in ent], dtype=torch.int64)
            perm = torch.sort(rows, stable=True).indices
            ptr = torch.zeros(nrows + 1, dtype=torch.int64)
            ptr[1:] = torch.cumsum(torch.bincount(rows, minlength=nrows), 0)
            col_r = torch.tensor([e[1] for e in ent], dtype=torch.int64)[perm]
            col_off = torch.tensor([e[2] for e in ent], dtype=torch.int64)[perm]
            sign = torch.tensor([e[3] for e in ent], dtype=torch.float64)[perm]
            maps = (self.out_std, self.out_blk, self.in_std, self.in_blk) if transpose else (
                self.in_std, self.in_blk, self.out_std, self.out_blk)
            self._cache[key] = (ptr.to(device), col_r.to(device), col_off.to(device), sign.to(device, dtype),
                                *(t.to(device) for t in maps))
        return self._cache[key]


def _launch(table: SO2Table, transpose: bool, X, W, wig, plan: EdgePlan):
    if transpose:  # gradient w.r.t. x: gather at receivers, reduce over sender segments
        CI, CO, DI, DO = table.CO, table.CI, table.DO, table.DI
        perm, seg = plan.segments("src")
        other = plan.dst
    else:
        CI, CO, DI, DO = table.CI, table.CO, table.DI, table.DO
        perm, seg = plan.segments("dst")
        other = plan.src
    out = torch.empty(plan.num_nodes, DO, CO, device=X.device, dtype=X.dtype)
    if plan.num_nodes == 0 or CO == 0:
        return out.zero_()
    ptr, col_r, col_off, sign, in_std, in_blk, out_std, out_blk = table.get(transpose, X.device, X.dtype)
    stride_we = W.shape[-1] if W.dim() == 2 and W.shape[0] > 1 else 0
    grid = lambda m: (plan.num_nodes, (CO + m["BLOCK_CO"] - 1) // m["BLOCK_CO"])
    _KERNEL[grid](out, X, W, wig, seg, perm, other, ptr, col_r, col_off, sign,
                  in_std, in_blk, out_std, out_blk, CI, CO, DI, DO, wig.shape[-1], stride_we,
                  TRANS_W=transpose, DEPTHWISE=table.depthwise, CIP=next_pow2(CI),
                  DIP=next_pow2(DI), DOP=next_pow2(DO))
    return out


def reference_so2_message_passing(x, weights, wig, src, dst, num_nodes, table: SO2Table):
    """The kernel's reference, :func:`mlpot.o3.so2.so2_message_passing`, in the kernel's layouts:
    ``x (N, DI, CI)`` channel-last, ``wig (E, DW, DW)`` block-diagonal Wigner matrices."""
    from mlpot.o3.layout import channel_last_to_mul_ir, mul_ir_to_channel_last
    from mlpot.o3.so2 import so2_message_passing

    plan = table.plan
    wigner = [wig[:, l * l:(l + 1) ** 2, l * l:(l + 1) ** 2] for l in range(plan.lmax + 1)]
    y = so2_message_passing(plan, channel_last_to_mul_ir(x, plan.irreps_in), wigner, weights, src, dst, num_nodes)
    return mul_ir_to_channel_last(y, plan.irreps_out)


class _SO2MP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, X, W, wig, table, plan, transpose):
        X, W, wig = X.contiguous(), W.contiguous(), wig.contiguous()
        ctx.save_for_backward(X, W, wig)
        ctx.table, ctx.plan, ctx.transpose = table, plan, transpose
        return _launch(table, transpose, X, W, wig, plan)

    @staticmethod
    def backward(ctx, g):
        X, W, wig = ctx.saved_tensors
        table, plan, tr = ctx.table, ctx.plan, ctx.transpose
        gX = gW = gD = None
        if ctx.needs_input_grad[0]:
            gX = _SO2MP.apply(g, W, wig, table, plan, not tr)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            # <g, op(X)> (or <X, op(g)> for the transpose) differentiated in the weights and Wigner
            # blocks alone: g depends on them through the rest of the model, which autograd adds.
            left, right = (g, X) if tr else (X, g)
            gW, gD = reference_vjp(
                lambda w, d: reference_so2_message_passing(left, w, d, plan.src, plan.dst, plan.num_nodes, table),
                (W, wig), right)
        return gX, gW, gD, None, None, None


def so2_message_passing(x: torch.Tensor, weights: torch.Tensor, wigner: torch.Tensor,
                        plan: EdgePlan, table: SO2Table) -> torch.Tensor:
    """``x`` (N, DI, CI), ``weights`` (E, numel) or (numel,), ``wigner`` (E, DW, DW) -> (N, DO, CO)."""
    check_device(x, weights, wigner)
    if not (x.dtype == weights.dtype == wigner.dtype):
        raise TypeError(f"dtype mismatch: x {x.dtype}, weights {weights.dtype}, wigner {wigner.dtype}")
    if x.shape[1:] != (table.DI, table.CI) or weights.shape[-1] != table.weight_numel:
        raise ValueError(f"shapes x {tuple(x.shape)}, weights {tuple(weights.shape)} do not match the plan")
    if wigner.shape[-1] < (table.lmax + 1) ** 2:
        raise ValueError(f"wigner blocks {tuple(wigner.shape)} too small for L")
    return _SO2MP.apply(x, weights, wigner, table, plan, False)


__all__ = ["SO2Table", "reference_so2_message_passing", "so2_message_passing"]
