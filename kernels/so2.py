"""Fused SO(2) message passing (eSCN): gather, edge-frame rotation, per-m linear, inverse rotation,
scatter-sum into receivers; its gradients with respect to every operand as kernels.

Math (conventions of :mod:`mlpot.o3.so2`). For edge ``e = (s -> n)`` with block-diagonal Wigner
matrix ``D_e = diag(D^0(R_e), ..., D^L(R_e))`` (``R_e`` rotates the edge onto ``y``)::

    out[n] = sum_{e: dst(e) = n}  D_e^T  M_e  D_e  x[src(e)]

``M_e`` is the SO(2) linear map of an :class:`mlpot.o3.so2.SO2Plan` (``mode`` "full" or
"depthwise", weights per edge or shared): for a path ``(l_i -> l_o, m)`` with weight block ``W``
(``C_out x C_in`` row-major, or ``C`` for depthwise), row ``(l, m)`` being ``l^2 + l + m``:
``m = 0``: ``y[l_o,0] += W x[l_i,0]``; even: ``y[l_o,+-m] += W x[l_i,+-m]``; odd:
``y[l_o,+m] -= W x[l_i,-m]``, ``y[l_o,-m] += W x[l_i,+m]``. Each (input row, output row) pair
has at most one entry, so ``M`` is stored densely as ``OFF[r_in, r_out]`` (the weight block's
offset, ``-1`` where the rows do not couple) and ``SGN[r_in, r_out]``.

Layout: node features channel-last ``(N, D, C)``, the irreps blocks in order with ``2l+1`` rows
each (``mlpot.o3.layout.mul_ir_to_channel_last`` at the boundary; a degree may occur in
several blocks); Wigner blocks ``(E, DW, DW)`` with ``DW >= (L+1)^2``
(``mlpot.o3.wigner.wigner_D_blocks``), addressed per row through the table's row maps; weights
``(E, numel)`` or ``(numel,)``.

The operation as a multilinear form. With the rotation into the frame ``D_in`` and the rotation
back ``D_out`` taken as separate operands (both are ``D_e``),

    F(x, W, D_in, D_out, g) = sum_e < g[dst(e)],  D_out,e^T  M(W_e)  D_in,e  x[src(e)] >

is linear in each of its five operands, and every derivative the model needs is a partial
derivative of ``F`` (``_SO2Form``):

* ``dF/dg``: the forward (node kernel over receivers);
* ``dF/dx = sum_{e: src(e)=s} D_in^T M^T D_out g[dst(e)]``: the same node kernel with the roles of
  the two sides swapped (transposed table and weight blocks, CSR over senders);
* ``dF/dW_e``: ``SGN * (D_out g[dst])[r_out] * (D_in x[src])[r_in]`` on the table's entries (edge
  kernel; summed over edges when the weights are shared);
* ``dF/dD_in,e = (M^T D_out g[dst]) x[src]^T`` and ``dF/dD_out,e = (M D_in x[src]) g[dst]^T``,
  restricted to the Wigner blocks (edge kernel; the second is the first with the sides swapped).

The derivative of any of them with respect to another operand is again one of them, so gradients
of every order (forces, and the parameter gradient of a force loss) run on these two kernels and
never differentiate saved tensors (the pattern of :mod:`mlpot.kernels.channelwise_tp`).

Kernels. Node kernel: one program per receiver and output-channel block, edges from a CSR over
receivers (no atomics, no per-edge intermediate in global memory). Per edge, the input tile is
rotated into the edge frame ONCE, ``Xr = D_in x[src]``, as one ``tl.dot`` of the ``(DA, DA)``
block-diagonal Wigner tile with the ``(DA, channels)`` feature tile; the per-m map then runs one
input row at a time (depthwise: the weights of a whole column of ``M`` in one gathered load; full:
one ``(C_out, C_in)`` block per entry, input channels in chunks), and the rotation back is a second
``tl.dot``, ``acc += D_out^T Y``. Edge kernel: one program per edge (and channel block for the
weight gradient), the same two rotations as ``tl.dot``; the Wigner gradient contracts over
channels with ``tl.dot`` and folds the block rows onto the rows of ``D_e`` with two more ``tl.dot``
by 0/1 selection matrices (several irreps blocks may share a degree). All dots run on tensor cores:
float32 as ``tf32x3`` (:func:`mlpot.kernels._runtime.dot_precision`: relative error at most about
``3 * 2^-22`` per product plus float32 accumulation; tested against the float64 reference),
float64 as ``ieee``. Tile sizes below 16 are padded to 16 (``tl.dot``'s smallest tile).

Backward. The first backward of a depthwise forward (one Wigner operand, ``D_in = D_out = D``)
is one fused receiver-outer pass (``_so2_bwd_kernel``, :class:`_SO2Backward`) over the receiver
CSR of the forward: one program per receiver; per channel block ``g[n]`` is read once, and per
edge ``x[src]``, the weights and the in-block Wigner tiles are read, ``Xr = D x``, ``Gr = D g`` on
tensor cores, and the program writes ``dw[e]`` (leading entries, the partner rows ``Gr[t']`` by a
0/1 permutation ``tl.dot``), ``h[e] = D^T M^T Gr`` and ``dD[e] = dF/dD_in + dF/dD_out`` (the
contractions over channels and the folds onto the rows of ``D`` as exact ``ieee`` dots; the first
channel block stores, the next ones add in place on the in-block entries, ordered by a barrier:
one program owns the edge, no atomics). ``dx`` is ``h`` summed over each sender's edges
(:func:`mlpot.kernels.mp_codegen.segment_sum`, sender CSR, fixed order: deterministic). The
gradients the running backward does not use (:mod:`mlpot.o3.grad_needs`) are not computed
(``NEED_H``/``NEED_W``/``NEED_D``). Its backward (the double backward) contracts each output with
its incoming gradient as a partial derivative of ``F`` on the per-operand kernels above; full mode
and forms with two different Wigner operands keep the per-operand kernels for the first backward too.

Float32 error bound. Each ``tl.dot`` is ``tf32x3``: every product carries a relative error of at
most ``u3 = 3 * 2^-22`` (the dropped tail-tail product and the rounding of the TF32 tails) and the
sums accumulate in float32; the per-m map runs in plain float32. Composing the rotation in
(``K = DAP``), the map (``DA`` terms, weight times sign), the rotation back (``K = DBP``) and the sum
over a node's ``deg`` edges gives, to first order and entry by entry,

    |out_fp32 - out_exact| <= gamma * |F|(|x|, |W|, |D|),
    gamma = 3 u3 + (DAP + DA + DBP + deg + 3) 2^-24,

with ``|F|`` the same chain applied to the absolute values of every operand (the map's signs
dropped). MACE's L = 3 second layer (``DAP = 16``, ``DA = 4``, ``DBP = 32``) at 30 neighbours:
``gamma ~ 7e-6``. Plain TF32 (``2^-11`` per product) would exceed it about 70-fold. The
gradients are the same kernels and obey the same bound with their own operands.
"""
import math

import torch

from mlpot.o3.grad_needs import grad_node, needed

from . import mp_codegen as MPG
from ._runtime import LazyKernel, check_device, dot_precision, multilinear_form_backward, next_pow2, tl
from .channelwise_tp import EdgePlan


def _so2_node_kernel(out_ptr, a_ptr, w_ptr, wa_ptr, wb_ptr, seg_ptr, perm_ptr, other_ptr,
                     off_ptr, sgn_ptr, row_ptr, col_b_ptr, col_off_ptr, col_sg_ptr,
                     a_std_ptr, a_blk_ptr, b_std_ptr, b_blk_ptr,
                     CA, CB, DA, DB, DW, stride_we,
                     TRANS_W: tl.constexpr, DEPTHWISE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                     BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, DAP: tl.constexpr, DBP: tl.constexpr):
    """``out[n, :, cb] = sum_{q in segment n} Db_e^T M_e Da_e a[other(e)]`` (side A rows ``DA``,
    channels ``CA``; side B rows ``DB``, channels ``CB``); ``OFF``/``SGN`` are ``(DA, DB)``, and the
    same entries as a CSR over side-A rows (``row_ptr``; ``col_b``, ``col_off``, ``col_sg``) for the
    per-entry loop of full mode."""
    n = tl.program_id(0).to(tl.int64)
    cb = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cbm = cb < CB
    ra = tl.arange(0, DAP)
    ram = ra < DA
    rb = tl.arange(0, DBP)
    rbm = rb < DB
    astd = tl.load(a_std_ptr + ra, mask=ram, other=0)
    ablk = tl.load(a_blk_ptr + ra, mask=ram, other=-1)
    bstd = tl.load(b_std_ptr + rb, mask=rbm, other=0)
    bblk = tl.load(b_blk_ptr + rb, mask=rbm, other=-1)
    amask = ram[:, None] & ram[None, :] & (ablk[:, None] == ablk[None, :])
    bmask = rbm[:, None] & rbm[None, :] & (bblk[:, None] == bblk[None, :])
    acc = tl.zeros([DBP, BLOCK_C], dtype=out_ptr.dtype.element_ty)
    q0 = tl.load(seg_ptr + n)
    q1 = tl.load(seg_ptr + n + 1)
    for q in range(q0, q1):
        e = tl.load(perm_ptr + q)
        s = tl.load(other_ptr + e)
        # rotation into the frame (rows: frame row, node row) and back (transposed: node row, frame row)
        da = tl.load(wa_ptr + (e * DW + astd[:, None]) * DW + astd[None, :], mask=amask, other=0.0)
        dbt = tl.load(wb_ptr + (e * DW + bstd[None, :]) * DW + bstd[:, None], mask=bmask, other=0.0)
        wbase = w_ptr + e * stride_we
        y = tl.zeros([DBP, BLOCK_C], dtype=out_ptr.dtype.element_ty)
        if DEPTHWISE:
            xa = tl.load(a_ptr + (s * DA + ra[:, None]) * CA + cb[None, :], mask=ram[:, None] & cbm[None, :], other=0.0)
            xr = tl.dot(da, xa, input_precision=DOT_PRECISION)  # rotated once per edge
            for r in range(DA):
                xrow = tl.sum(tl.where(ra[:, None] == r, xr, 0.0), axis=0)
                offs = tl.load(off_ptr + r * DB + rb, mask=rbm, other=-1)
                sg = tl.load(sgn_ptr + r * DB + rb, mask=rbm, other=0.0)
                wcol = tl.load(wbase + offs[:, None] + cb[None, :], mask=(offs >= 0)[:, None] & cbm[None, :], other=0.0)
                y += (sg[:, None] * wcol) * xrow[None, :]
        else:
            for k0 in range(0, CA, BLOCK_K):
                ck = k0 + tl.arange(0, BLOCK_K)
                ckm = ck < CA
                xa = tl.load(a_ptr + (s * DA + ra[:, None]) * CA + ck[None, :], mask=ram[:, None] & ckm[None, :],
                             other=0.0)
                xr = tl.dot(da, xa, input_precision=DOT_PRECISION)
                for r in range(DA):
                    xrow = tl.sum(tl.where(ra[:, None] == r, xr, 0.0), axis=0)
                    for u in range(tl.load(row_ptr + r), tl.load(row_ptr + r + 1)):
                        b = tl.load(col_b_ptr + u)
                        off = tl.load(col_off_ptr + u)
                        sg = tl.load(col_sg_ptr + u)
                        if TRANS_W:  # block (C_out = CA, C_in = CB): element (ca, cb) at ca * CB + cb
                            wt = tl.load(wbase + off + ck[None, :] * CB + cb[:, None],
                                         mask=cbm[:, None] & ckm[None, :], other=0.0)
                        else:  # block (C_out = CB, C_in = CA): element (cb, ca) at cb * CA + ca
                            wt = tl.load(wbase + off + cb[:, None] * CA + ck[None, :],
                                         mask=cbm[:, None] & ckm[None, :], other=0.0)
                        yl = tl.sum(wt * xrow[None, :], axis=1)
                        y += tl.where(rb[:, None] == b, sg * yl[None, :], 0.0)
        acc += tl.dot(dbt, y, input_precision=DOT_PRECISION)
    tl.store(out_ptr + (n * DB + rb[:, None]) * CB + cb[None, :], acc, mask=rbm[:, None] & cbm[None, :])


def _so2_edge_kernel(out_ptr, a_ptr, b_ptr, w_ptr, wa_ptr, wb_ptr, a_idx_ptr, b_idx_ptr,
                     off_ptr, sgn_ptr, row_ptr, col_b_ptr, col_off_ptr, col_sg_ptr, col_sgp_ptr,
                     a_std_ptr, a_blk_ptr, b_std_ptr, b_blk_ptr, a_partner_ptr, b_pstd_ptr, sgnp_ptr,
                     CA, CB, DA, DB, DW, stride_we, numel,
                     WGRAD: tl.constexpr, TRANS_W: tl.constexpr, DEPTHWISE: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                     DAP: tl.constexpr, DBP: tl.constexpr, DWP: tl.constexpr):
    """Per edge, with ``Ar = Da a[a_idx]``, ``Br = Db b[b_idx]``: ``WGRAD``: the weight gradient.
    An ``m > 0`` path has two entries, ``(r, t)`` and their partners ``(r', t')`` (``m -> -m`` on
    both sides), that share one weight block, so the gradient is written once per path from its
    leading entry (``m(r) >= 0``; ``OFF`` is ``-1`` elsewhere):
    ``out[e, OFF[r, t] + ...] = SGN[r, t] Br[t] Ar[r] + SGNP[r, t] Br[t'] Ar[r']`` with
    ``SGNP[r, t] = SGN[r', t']`` (0 for ``m = 0``); ``Br[t']`` comes from a second rotation with
    the partner rows of ``D_e`` (``b_pstd``). Else the gradient of the A-side rotation,
    ``out[e] = fold((M^T Br) a^T)`` on the rows of ``D_e`` (``(E, DW, DW)``)."""
    e = tl.program_id(0).to(tl.int64)
    sa = tl.load(a_idx_ptr + e)
    sb = tl.load(b_idx_ptr + e)
    ra = tl.arange(0, DAP)
    ram = ra < DA
    rb = tl.arange(0, DBP)
    rbm = rb < DB
    astd = tl.load(a_std_ptr + ra, mask=ram, other=0)
    ablk = tl.load(a_blk_ptr + ra, mask=ram, other=-1)
    bstd = tl.load(b_std_ptr + rb, mask=rbm, other=0)
    bblk = tl.load(b_blk_ptr + rb, mask=rbm, other=-1)
    amask = ram[:, None] & ram[None, :] & (ablk[:, None] == ablk[None, :])
    bmask = rbm[:, None] & rbm[None, :] & (bblk[:, None] == bblk[None, :])
    da = tl.load(wa_ptr + (e * DW + astd[:, None]) * DW + astd[None, :], mask=amask, other=0.0)
    db = tl.load(wb_ptr + (e * DW + bstd[:, None]) * DW + bstd[None, :], mask=bmask, other=0.0)
    wbase = w_ptr + e * stride_we
    if WGRAD:
        cb = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        cbm = cb < CB
        xb = tl.load(b_ptr + (sb * DB + rb[:, None]) * CB + cb[None, :], mask=rbm[:, None] & cbm[None, :], other=0.0)
        br = tl.dot(db, xb, input_precision=DOT_PRECISION)
        bpstd = tl.load(b_pstd_ptr + rb, mask=rbm, other=0)
        dbp = tl.load(wb_ptr + (e * DW + bpstd[:, None]) * DW + bstd[None, :], mask=bmask, other=0.0)
        brp = tl.dot(dbp, xb, input_precision=DOT_PRECISION)  # Br at the partner rows t'
        if DEPTHWISE:
            xa = tl.load(a_ptr + (sa * DA + ra[:, None]) * CA + cb[None, :], mask=ram[:, None] & cbm[None, :],
                         other=0.0)
            ar = tl.dot(da, xa, input_precision=DOT_PRECISION)
            for r in range(DA):
                rp = tl.load(a_partner_ptr + r)
                arow = tl.sum(tl.where(ra[:, None] == r, ar, 0.0), axis=0)
                arowp = tl.sum(tl.where(ra[:, None] == rp, ar, 0.0), axis=0)
                offs = tl.load(off_ptr + r * DB + rb, mask=rbm, other=-1)
                sg = tl.load(sgn_ptr + r * DB + rb, mask=rbm, other=0.0)
                sgp = tl.load(sgnp_ptr + r * DB + rb, mask=rbm, other=0.0)
                val = (sg[:, None] * br) * arow[None, :] + (sgp[:, None] * brp) * arowp[None, :]
                tl.store(out_ptr + e * numel + offs[:, None] + cb[None, :], val,
                         mask=(offs >= 0)[:, None] & cbm[None, :])
        else:
            for k0 in range(0, CA, BLOCK_K):
                ck = k0 + tl.arange(0, BLOCK_K)
                ckm = ck < CA
                xa = tl.load(a_ptr + (sa * DA + ra[:, None]) * CA + ck[None, :], mask=ram[:, None] & ckm[None, :],
                             other=0.0)
                ar = tl.dot(da, xa, input_precision=DOT_PRECISION)
                for r in range(DA):
                    rp = tl.load(a_partner_ptr + r)
                    arow = tl.sum(tl.where(ra[:, None] == r, ar, 0.0), axis=0)
                    arowp = tl.sum(tl.where(ra[:, None] == rp, ar, 0.0), axis=0)
                    for u in range(tl.load(row_ptr + r), tl.load(row_ptr + r + 1)):
                        t = tl.load(col_b_ptr + u)
                        off = tl.load(col_off_ptr + u)
                        sg = tl.load(col_sg_ptr + u)
                        sgp = tl.load(col_sgp_ptr + u)
                        brow = tl.sum(tl.where(rb[:, None] == t, br, 0.0), axis=0)
                        browp = tl.sum(tl.where(rb[:, None] == t, brp, 0.0), axis=0)
                        tile = (sg * brow)[:, None] * arow[None, :] + (sgp * browp)[:, None] * arowp[None, :]
                        if TRANS_W:
                            addr = off + ck[None, :] * CB + cb[:, None]
                        else:
                            addr = off + cb[:, None] * CA + ck[None, :]
                        tl.store(out_ptr + e * numel + addr, tile, mask=cbm[:, None] & ckm[None, :])
    else:
        grad = tl.zeros([DAP, DAP], dtype=out_ptr.dtype.element_ty)
        if DEPTHWISE:
            for c0 in range(0, CA, BLOCK_C):
                c = c0 + tl.arange(0, BLOCK_C)
                cm = c < CA
                xa = tl.load(a_ptr + (sa * DA + ra[:, None]) * CA + c[None, :], mask=ram[:, None] & cm[None, :],
                             other=0.0)
                xb = tl.load(b_ptr + (sb * DB + rb[:, None]) * CB + c[None, :], mask=rbm[:, None] & cm[None, :],
                             other=0.0)
                br = tl.dot(db, xb, input_precision=DOT_PRECISION)
                z = tl.zeros([DAP, BLOCK_C], dtype=out_ptr.dtype.element_ty)
                for r in range(DA):
                    offs = tl.load(off_ptr + r * DB + rb, mask=rbm, other=-1)
                    sg = tl.load(sgn_ptr + r * DB + rb, mask=rbm, other=0.0)
                    wcol = tl.load(wbase + offs[:, None] + c[None, :], mask=(offs >= 0)[:, None] & cm[None, :],
                                   other=0.0)
                    zrow = tl.sum((sg[:, None] * wcol) * br, axis=0)
                    z += tl.where(ra[:, None] == r, zrow[None, :], 0.0)
                grad += tl.dot(z, tl.trans(xa), input_precision=DOT_PRECISION)
        else:
            for k0 in range(0, CA, BLOCK_K):
                ck = k0 + tl.arange(0, BLOCK_K)
                ckm = ck < CA
                xa = tl.load(a_ptr + (sa * DA + ra[:, None]) * CA + ck[None, :], mask=ram[:, None] & ckm[None, :],
                             other=0.0)
                z = tl.zeros([DAP, BLOCK_K], dtype=out_ptr.dtype.element_ty)
                for c0 in range(0, CB, BLOCK_C):
                    cb = c0 + tl.arange(0, BLOCK_C)
                    cbm = cb < CB
                    xb = tl.load(b_ptr + (sb * DB + rb[:, None]) * CB + cb[None, :],
                                 mask=rbm[:, None] & cbm[None, :], other=0.0)
                    br = tl.dot(db, xb, input_precision=DOT_PRECISION)
                    for r in range(DA):
                        zrow = tl.zeros([BLOCK_K], dtype=out_ptr.dtype.element_ty)
                        for u in range(tl.load(row_ptr + r), tl.load(row_ptr + r + 1)):
                            t = tl.load(col_b_ptr + u)
                            off = tl.load(col_off_ptr + u)
                            sg = tl.load(col_sg_ptr + u)
                            brow = tl.sum(tl.where(rb[:, None] == t, br, 0.0), axis=0)
                            if TRANS_W:
                                wt = tl.load(wbase + off + ck[None, :] * CB + cb[:, None],
                                             mask=cbm[:, None] & ckm[None, :], other=0.0)
                            else:
                                wt = tl.load(wbase + off + cb[:, None] * CA + ck[None, :],
                                             mask=cbm[:, None] & ckm[None, :], other=0.0)
                            zrow += sg * tl.sum(wt * brow[:, None], axis=0)
                        z += tl.where(ra[:, None] == r, zrow[None, :], 0.0)
                grad += tl.dot(z, tl.trans(xa), input_precision=DOT_PRECISION)
        grad = tl.where(amask, grad, 0.0)
        # fold block rows onto the rows of D_e: P[s, r] = (std[r] == s); out = P grad P^T
        sw = tl.arange(0, DWP)
        swm = sw < DW
        fold = tl.where((sw[:, None] == astd[None, :]) & ram[None, :], 1.0, 0.0).to(out_ptr.dtype.element_ty)
        folded = tl.dot(tl.dot(fold, grad, input_precision=DOT_PRECISION), tl.trans(fold),
                        input_precision=DOT_PRECISION)
        tl.store(out_ptr + (e * DW + sw[:, None]) * DW + sw[None, :], folded, mask=swm[:, None] & swm[None, :])


def _so2_bwd_kernel(h_ptr, dw_ptr, dd_ptr, g_ptr, x_ptr, w_ptr, d_ptr, seg_ptr, perm_ptr, src_ptr,
                    off_ptr, sgn_ptr, offl_ptr, sgnp_ptr, a_partner_ptr, b_partner_ptr, deg_ptr,
                    a_std_ptr, a_blk_ptr, b_std_ptr, b_blk_ptr,
                    C, DA, DB, DW, stride_we, numel,
                    NEED_H: tl.constexpr, NEED_W: tl.constexpr, NEED_D: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, BLOCK_C: tl.constexpr,
                    DAP: tl.constexpr, DBP: tl.constexpr, DWP: tl.constexpr):
    """The fused first backward of the depthwise forward (module doc, "Backward"): one program per
    receiver ``n``; per channel block ``g[n]`` is read once, then the receiver's edges (CSR) in
    order. Per edge ``e = (s -> n)``, with ``Xr = D x[s]``, ``Gr = D g[n]``: ``NEED_W``: ``dw[e]``
    (the weight-gradient entries of :func:`_so2_edge_kernel`, the partner rows ``Gr[t']`` taken
    from ``Gr`` by a 0/1 permutation ``tl.dot``); ``NEED_H``: ``h[e] = D^T M^T Gr`` (summed per
    sender afterwards); ``NEED_D``: ``dD[e] = fold((M^T Gr) x[s]^T) + fold((M Xr) g[n]^T)``,
    written by the first channel block and accumulated in place by the next ones (the same
    program: ordered by a barrier, only the in-block entries, degree ``deg`` of a ``D`` row)."""
    n = tl.program_id(0).to(tl.int64)
    ra = tl.arange(0, DAP)
    ram = ra < DA
    rb = tl.arange(0, DBP)
    rbm = rb < DB
    astd = tl.load(a_std_ptr + ra, mask=ram, other=0)
    ablk = tl.load(a_blk_ptr + ra, mask=ram, other=-1)
    bstd = tl.load(b_std_ptr + rb, mask=rbm, other=0)
    bblk = tl.load(b_blk_ptr + rb, mask=rbm, other=-1)
    amask = ram[:, None] & ram[None, :] & (ablk[:, None] == ablk[None, :])
    bmask = rbm[:, None] & rbm[None, :] & (bblk[:, None] == bblk[None, :])
    q0 = tl.load(seg_ptr + n)
    q1 = tl.load(seg_ptr + n + 1)
    if NEED_W:  # Gr[t'] = (Q Gr)[t] with Q[t, u] = (u == partner(t))
        bpart = tl.load(b_partner_ptr + rb, mask=rbm, other=-1)
        qperm = tl.where(rb[None, :] == bpart[:, None], 1.0, 0.0).to(x_ptr.dtype.element_ty)
    if NEED_D:
        sw = tl.arange(0, DWP)
        swm = sw < DW
        degw = tl.load(deg_ptr + sw, mask=swm, other=-1)
        inblk = swm[:, None] & swm[None, :] & (degw[:, None] == degw[None, :])
        pa = tl.where((sw[:, None] == astd[None, :]) & ram[None, :], 1.0, 0.0).to(x_ptr.dtype.element_ty)
        pb = tl.where((sw[:, None] == bstd[None, :]) & rbm[None, :], 1.0, 0.0).to(x_ptr.dtype.element_ty)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cm = c < C
        gb = tl.load(g_ptr + (n * DB + rb[:, None]) * C + c[None, :], mask=rbm[:, None] & cm[None, :], other=0.0)
        if NEED_D:
            tl.debug_barrier()  # the previous channel block's dD stores are visible to every thread
        for q in range(q0, q1):
            e = tl.load(perm_ptr + q).to(tl.int64)
            s = tl.load(src_ptr + e)
            da = tl.load(d_ptr + (e * DW + astd[:, None]) * DW + astd[None, :], mask=amask, other=0.0)
            db = tl.load(d_ptr + (e * DW + bstd[:, None]) * DW + bstd[None, :], mask=bmask, other=0.0)
            wbase = w_ptr + e * stride_we
            xa = tl.load(x_ptr + (s * DA + ra[:, None]) * C + c[None, :], mask=ram[:, None] & cm[None, :], other=0.0)
            xr = tl.dot(da, xa, input_precision=DOT_PRECISION)
            gr = tl.dot(db, gb, input_precision=DOT_PRECISION)
            if NEED_W:
                grp = tl.dot(qperm, gr, input_precision="ieee")  # Gr at the partner rows t'
            z = tl.zeros([DAP, BLOCK_C], dtype=x_ptr.dtype.element_ty)
            y = tl.zeros([DBP, BLOCK_C], dtype=x_ptr.dtype.element_ty)
            for r in range(DA):
                xrow = tl.sum(tl.where(ra[:, None] == r, xr, 0.0), axis=0)
                sg = tl.load(sgn_ptr + r * DB + rb, mask=rbm, other=0.0)
                if NEED_H or NEED_D:
                    offs = tl.load(off_ptr + r * DB + rb, mask=rbm, other=-1)
                    wcol = sg[:, None] * tl.load(wbase + offs[:, None] + c[None, :],
                                                 mask=(offs >= 0)[:, None] & cm[None, :], other=0.0)
                    z += tl.where(ra[:, None] == r, tl.sum(wcol * gr, axis=0)[None, :], 0.0)
                    if NEED_D:
                        y += wcol * xrow[None, :]
                if NEED_W:
                    rp = tl.load(a_partner_ptr + r)
                    xrowp = tl.sum(tl.where(ra[:, None] == rp, xr, 0.0), axis=0)
                    offl = tl.load(offl_ptr + r * DB + rb, mask=rbm, other=-1)
                    sgp = tl.load(sgnp_ptr + r * DB + rb, mask=rbm, other=0.0)
                    val = (sg[:, None] * gr) * xrow[None, :] + (sgp[:, None] * grp) * xrowp[None, :]
                    tl.store(dw_ptr + e * numel + offl[:, None] + c[None, :], val,
                             mask=(offl >= 0)[:, None] & cm[None, :])
            if NEED_H:
                h = tl.dot(tl.trans(da), z, input_precision=DOT_PRECISION)
                tl.store(h_ptr + (e * DA + ra[:, None]) * C + c[None, :], h, mask=ram[:, None] & cm[None, :])
            if NEED_D:
                # fold block rows onto the rows of D_e: P[s, r] = (std[r] == s); dD = Pa gda Pa^T + Pb gdb Pb^T
                gda = tl.where(amask, tl.dot(z, tl.trans(xa), input_precision="ieee"), 0.0)
                gdb = tl.where(bmask, tl.dot(y, tl.trans(gb), input_precision="ieee"), 0.0)
                folded = tl.dot(tl.dot(pa, gda, input_precision="ieee"), tl.trans(pa), input_precision="ieee")
                folded += tl.dot(tl.dot(pb, gdb, input_precision="ieee"), tl.trans(pb), input_precision="ieee")
                dptr = dd_ptr + (e * DW + sw[:, None]) * DW + sw[None, :]
                if c0 == 0:
                    tl.store(dptr, folded, mask=swm[:, None] & swm[None, :])
                else:
                    tl.store(dptr, folded + tl.load(dptr, mask=inblk, other=0.0), mask=inblk)

# Autotune configs: (BLOCK_C, BLOCK_K) and warps. BLOCK_C blocks the output channels of the node
# kernel (and the channel loop of the edge kernel), BLOCK_K the input-channel chunks of full mode.
# Chosen with `mlpot bench aot --model MACE:interaction_tp=so2 --only _so2_ --max-spill-bytes 0`:
# every config compiles without spills for sm_80 and sm_90 in fp32 and fp64 at MACE's default
# sizes; in the node kernel the 2-warp configs, (32, 32) x 4 warps (transposed, sm_80) and
# (32, 32) x 8 warps (sm_90) spilled 8-32 B in fp64.
_NODE_CFG = [({"BLOCK_C": 16, "BLOCK_K": 16}, 4, 2), ({"BLOCK_C": 64, "BLOCK_K": 32}, 4, 2)]
_EDGE_CFG = [({"BLOCK_C": 16, "BLOCK_K": 16}, 4, 2), ({"BLOCK_C": 32, "BLOCK_K": 32}, 4, 2)]
# The fused backward: configs per dtype and per whether it computes the Wigner gradient (NEED_D),
# each set compiling without spills at sm_80 and sm_90 for MACE's SO(2) layers (`mlpot bench aot
# --model MACE:interaction_tp=so2 --only _so2_bwd`); fp64 with NEED_D spills from BLOCK_C = 32
# (80-136 B), fp64 without it at BLOCK_C = 16 (4-32 B), fp32 at BLOCK_C <= 32 in the one-row layer.
_BWD_CFG = {(False, False): [({"BLOCK_C": 64}, 8, 2)], (False, True): [({"BLOCK_C": 64}, 8, 2)],
            (True, False): [({"BLOCK_C": 32}, 8, 2), ({"BLOCK_C": 64}, 8, 2)],
            (True, True): [({"BLOCK_C": 16}, 4, 2), ({"BLOCK_C": 16}, 8, 2)]}
_NODE = LazyKernel(_so2_node_kernel, _NODE_CFG, key=["CA", "CB", "DA", "DB"])
_EDGE = LazyKernel(_so2_edge_kernel, _EDGE_CFG, key=["CA", "CB", "DA", "DB", "DW"])
# (fp64, NEED_D) -> kernel; named for the tests that run every config
_BWD_FP32, _BWD_FP32_D, _BWD_FP64, _BWD_FP64_D = (LazyKernel(_so2_bwd_kernel, _BWD_CFG[k], key=["C", "DA", "DB", "DW"])
                                                  for k in ((False, False), (False, True), (True, False), (True, True)))
_BWD = {(False, False): _BWD_FP32, (False, True): _BWD_FP32_D, (True, False): _BWD_FP64, (True, True): _BWD_FP64_D}


def _pad(n: int) -> int:
    """Tile extent of ``n`` rows: a power of two, at least 16 (``tl.dot``'s smallest tile)."""
    return max(16, next_pow2(n))


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
    (the rotation only mixes rows of one block). The kernels read the entries as the dense
    ``(DI, DO)`` tables ``OFF`` (offset, ``-1``: no entry) and ``SGN`` (module doc).
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
        off = torch.full((self.DI, self.DO), -1, dtype=torch.int64)
        sgn = torch.zeros(self.DI, self.DO, dtype=torch.float64)
        for r_out, r_in, offset, sign in ent:
            if off[r_in, r_out] >= 0:  # a plan couples two rows through one path at most
                raise ValueError(f"SO(2) table: rows {r_in} -> {r_out} coupled twice")
            off[r_in, r_out], sgn[r_in, r_out] = offset, sign
        self.off, self.sgn = off, sgn
        # the weight gradient's tables: partner rows (m -> -m in the same block), OFF on the
        # leading entries (input m >= 0) only, and the partner entry's sign (0 for m = 0)
        m_in = torch.tensor([m for _, ir in plan.irreps_in for m in range(-ir.l, ir.l + 1)], dtype=torch.int64)
        m_out = torch.tensor([m for _, ir in plan.irreps_out for m in range(-ir.l, ir.l + 1)], dtype=torch.int64)
        pin = torch.arange(self.DI) - 2 * m_in  # row of (block, -m): rows of a block are m = -l..l
        pout = torch.arange(self.DO) - 2 * m_out
        self.in_partner = pin
        self.out_partner = pout
        self.out_pstd = self.out_std - 2 * m_out
        lead = (m_in >= 0)[:, None] & (off >= 0)
        self.off_lead = torch.where(lead, off, torch.full_like(off, -1))
        self.sgn_partner = torch.where(lead & (m_in > 0)[:, None], sgn[pin][:, pout], torch.zeros_like(sgn))
        if not torch.equal(torch.where(lead, off[pin][:, pout], off), off):
            raise ValueError("SO(2) table: the two entries of an m > 0 path do not share their weights")
        # depthwise: do the leading entries' weight blocks (C each) cover every weight? then the fused
        # backward writes all of dw and needs no memset
        covered = torch.zeros(self.weight_numel, dtype=torch.bool)
        for o_ in self.off_lead[self.off_lead >= 0].tolist():
            covered[o_:o_ + self.CO] = True
        self.lead_covers_weights = bool(covered.all())
        self._cache: dict = {}

    @staticmethod
    def deg_rows(DW: int) -> torch.Tensor:
        """The degree ``l`` of each row of a block-diagonal Wigner matrix with ``DW`` rows."""
        return torch.tensor([math.isqrt(i) for i in range(DW)], dtype=torch.int64)

    def wgrad_side(self, device, dtype):
        """``(OFF_lead, SGN, SGNP, a_partner, b_pstd, row_ptr, col_b, col_off, col_sg, col_sgp)`` of
        the weight gradient (side A = input rows)."""
        key = ("wgrad", str(device), dtype)
        if key not in self._cache:
            self._cache[key] = (self.off_lead.to(device), self.sgn.to(device, dtype),
                                self.sgn_partner.to(device, dtype), self.in_partner.to(device),
                                self.out_pstd.to(device),
                                *_csr(self.off_lead, self.sgn, self.sgn_partner, device, dtype))
        return self._cache[key]

    def side(self, transpose: bool, device, dtype):
        """``(OFF, SGN, a_std, a_blk, b_std, b_blk, row_ptr, col_b, col_off, col_sg, col_sgp)`` on
        ``device`` with side A the input rows (``transpose=False``) or the output rows (``True``,
        ``OFF^T``); the last five are the entries as a CSR over side-A rows."""
        key = (transpose, str(device), dtype)
        if key not in self._cache:
            off, sgn = (self.off.T, self.sgn.T) if transpose else (self.off, self.sgn)
            maps = (self.out_std, self.out_blk, self.in_std, self.in_blk) if transpose else (
                self.in_std, self.in_blk, self.out_std, self.out_blk)
            self._cache[key] = (off.contiguous().to(device), sgn.contiguous().to(device, dtype),
                                *(t.to(device) for t in maps), *_csr(off, sgn, None, device, dtype))
        return self._cache[key]

    def dims(self, transpose: bool):
        """``(CA, CB, DA, DB)``: channels and rows of side A and side B."""
        if transpose:
            return self.CO, self.CI, self.DO, self.DI
        return self.CI, self.CO, self.DI, self.DO


def _csr(off, sgn, sgnp, device, dtype):
    """The entries of a dense ``(DA, DB)`` table (``off >= 0``) as a CSR over its rows:
    ``(row_ptr, col_b, col_off, col_sg, col_sgp)`` (``col_sgp`` zeros without ``sgnp``)."""
    a, b = torch.nonzero(off >= 0, as_tuple=True)  # row-major: sorted by row
    row_ptr = torch.zeros(off.shape[0] + 1, dtype=torch.int64)
    row_ptr[1:] = torch.cumsum(torch.bincount(a, minlength=off.shape[0]), 0)
    sgp = sgnp[a, b] if sgnp is not None else torch.zeros(len(a), dtype=sgn.dtype)
    return (row_ptr.to(device), b.to(device), off[a, b].contiguous().to(device), sgn[a, b].to(device, dtype),
            sgp.to(device, dtype))


def _weight_stride(W: torch.Tensor) -> int:
    return W.shape[-1] if W.dim() == 2 and W.shape[0] > 1 else 0


def _node(table: SO2Table, transpose: bool, A, W, Da, Db, plan: EdgePlan):
    """Side B at the nodes: ``sum_e Db^T M Da A[other(e)]`` over the receivers (``transpose=False``,
    A = x at senders) or the senders (``transpose=True``, A = g at receivers)."""
    CA, CB, DA, DB = table.dims(transpose)
    if transpose:
        perm, seg = plan.segments("src")
        other = plan.dst
    else:
        perm, seg = plan.segments("dst")
        other = plan.src
    out = torch.empty(plan.num_nodes, DB, CB, device=A.device, dtype=A.dtype)
    if plan.num_nodes == 0 or CB == 0 or plan.src.shape[0] == 0:
        return out.zero_()
    off, sgn, a_std, a_blk, b_std, b_blk, row_ptr, col_b, col_off, col_sg, _ = table.side(transpose, A.device, A.dtype)
    grid = lambda m: (plan.num_nodes, (CB + m["BLOCK_C"] - 1) // m["BLOCK_C"])
    _NODE[grid](out, A, W, Da, Db, seg, perm, other, off, sgn, row_ptr, col_b, col_off, col_sg,
                a_std, a_blk, b_std, b_blk,
                CA, CB, DA, DB, Da.shape[-1], _weight_stride(W), TRANS_W=transpose, DEPTHWISE=table.depthwise,
                DOT_PRECISION=dot_precision(A.dtype), DAP=_pad(DA), DBP=_pad(DB))
    return out


def _edge(table: SO2Table, transpose: bool, wgrad: bool, A, B, W, Da, Db, plan: EdgePlan, w_shape):
    """Per-edge gradients (module doc): the weights (``wgrad``, shaped like the weights) or the
    Wigner blocks on side A (``(E, DW, DW)``). Side A is x at the senders (``transpose=False``)
    or g at the receivers (``True``)."""
    CA, CB, DA, DB = table.dims(transpose)
    a_idx, b_idx = (plan.dst, plan.src) if transpose else (plan.src, plan.dst)
    E = plan.src.shape[0]
    DW = (Db if Da is None else Da).shape[-1]
    if wgrad:
        out = torch.zeros(E, table.weight_numel, device=A.device, dtype=A.dtype)
    else:
        out = torch.empty(E, DW, DW, device=A.device, dtype=A.dtype)
    if E > 0 and CA > 0 and CB > 0:
        off, sgn, a_std, a_blk, b_std, b_blk, *csr = table.side(transpose, A.device, A.dtype)
        if wgrad:
            off, sgn, sgnp, a_partner, b_pstd, *csr = table.wgrad_side(A.device, A.dtype)
            grid = lambda m: (E, (CB + m["BLOCK_C"] - 1) // m["BLOCK_C"])
            Da_, Db_, W_, stride = Da, Db, out, 0  # the weights themselves are not read
        else:
            sgnp, a_partner, b_pstd = sgn, a_std, b_std  # not read
            grid = (E, 1)
            Da_, Db_, W_, stride = out, Db, W, _weight_stride(W)  # Da is not read
        _EDGE[grid](out, A, B, W_, Da_, Db_, a_idx, b_idx, off, sgn, *csr, a_std, a_blk, b_std, b_blk,
                    a_partner, b_pstd, sgnp, CA, CB, DA, DB, DW, stride, table.weight_numel, WGRAD=wgrad, TRANS_W=transpose,
                    DEPTHWISE=table.depthwise, DOT_PRECISION=dot_precision(A.dtype), DAP=_pad(DA), DBP=_pad(DB),
                    DWP=_pad(DW))
    else:
        out.zero_()
    if wgrad:
        # shared weights: the per-edge gradients summed over the edges
        return out.reshape(w_shape) if len(w_shape) == 2 and w_shape[0] == E else out.sum(0).reshape(w_shape)
    return out


def _fused_backward(table: SO2Table, plan: EdgePlan, w_shape, need, X, W, D, G):
    """``(dx, dW, dD)`` of ``<G, forward(X, W, D)>`` (depthwise; ``D`` both rotations) from one
    receiver-outer pass (:func:`_so2_bwd_kernel`) and the sender segment sum of its per-edge input
    gradient; an entry is None where ``need`` (x, weights, Wigner) says it is not used."""
    need_x, need_w, need_d = (bool(v) for v in need)
    C, DA, DB, DW = table.CI, table.DI, table.DO, D.shape[-1]
    N, E = plan.num_nodes, plan.src.shape[0]
    dev, dt = X.device, X.dtype
    h = torch.empty(E, DA, C, device=dev, dtype=dt) if need_x else None
    alloc = torch.empty if table.lead_covers_weights else torch.zeros
    dw = alloc(E, table.weight_numel, device=dev, dtype=dt) if need_w else None
    dd = torch.empty(E, DW, DW, device=dev, dtype=dt) if need_d else None
    if E > 0 and N > 0 and C > 0 and (need_x or need_w or need_d):
        off, sgn, a_std, a_blk, b_std, b_blk, *_ = table.side(False, dev, dt)
        offl, _, sgnp, a_partner, *_ = table.wgrad_side(dev, dt)
        b_partner, deg = table.out_partner.to(dev), table.deg_rows(DW).to(dev)
        perm, seg = plan.segments("dst")
        ph = lambda t: G if t is None else t  # an output not written: any pointer of the dtype
        kernel = _BWD[(dt == torch.float64, need_d)]
        kernel[(N,)](ph(h), ph(dw), ph(dd), G, X, W, D, seg, perm, plan.src, off, sgn, offl, sgnp,
                     a_partner, b_partner, deg, a_std, a_blk, b_std, b_blk, C, DA, DB, DW, _weight_stride(W),
                     table.weight_numel, NEED_H=need_x, NEED_W=need_w, NEED_D=need_d,
                     DOT_PRECISION=dot_precision(dt), DAP=_pad(DA), DBP=_pad(DB), DWP=_pad(DW))
    else:
        for t in (h, dw, dd):
            if t is not None:
                t.zero_()
    dx = None
    if need_x:
        perm_s, seg_s = plan.segments("src")
        dx = MPG.segment_sum(h, seg_s, perm_s, N)
    if need_w:  # shared weights: the per-edge gradients summed over the edges
        dw = dw.reshape(w_shape) if len(w_shape) == 2 and w_shape[0] == E else dw.sum(0).reshape(w_shape)
    return dx, dw, dd


_ROLES = ("x", "w", "din", "dout", "g")


def _launch(role, table, plan, w_shape, X, W, Din, Dout, G):
    if role == "g":
        return _node(table, False, X, W, Din, Dout, plan)
    if role == "x":
        return _node(table, True, G, W, Dout, Din, plan)
    if role == "w":
        return _edge(table, False, True, X, G, None, Din, Dout, plan, w_shape)
    if role == "din":
        return _edge(table, False, False, X, G, W, None, Dout, plan, w_shape)
    return _edge(table, True, False, G, X, W, None, Din, plan, w_shape)


def _form(table, plan, w_shape):
    return lambda k, *ops: _SO2Form.apply(k, table, plan, w_shape, None, *ops)


class _SO2Form(torch.autograd.Function):
    """``dF/d(role)`` of the form ``F(x, W, D_in, D_out, g)`` (module doc); the operand ``role``
    is passed as None. ``role = "g"`` is the forward. The derivative of one of them, contracted
    with ``grad``, with respect to another operand is the form's derivative with ``grad`` in place
    of ``role`` (:func:`mlpot.kernels._runtime.multilinear_form_backward`). The first backward of
    a depthwise forward with one Wigner operand (``D_in is D_out``) is :class:`_SO2Backward`
    instead; ``nodes`` (:func:`mlpot.o3.grad_needs.grad_node` of x, W, D, or None) let it skip the
    gradients the running backward does not use."""

    @staticmethod
    def forward(ctx, role, table, plan, w_shape, nodes, X, W, Din, Dout, G):
        ctx.fused = role == "g" and table.depthwise and Din is Dout
        ops = [v.contiguous() if v is not None else None for v in (X, W, Din, Dout, G)]
        ctx.role, ctx.table, ctx.plan, ctx.w_shape, ctx.nodes = role, table, plan, w_shape, nodes
        ctx.save_for_backward(*ops)
        return _launch(role, table, plan, w_shape, *ops)

    @staticmethod
    def backward(ctx, grad):
        if ctx.fused:
            X, W, D, _, _ = ctx.saved_tensors
            nx, nw, nd1, nd2 = ctx.needs_input_grad[5:9]
            nodes = ctx.nodes or (None, None, None)
            need = (needed(nx, nodes[0]), needed(nw, nodes[1]), needed(nd1 or nd2, nodes[2]))
            if not any(need):
                return (None,) * 10
            dx, dw, dd = _SO2Backward.apply(ctx.table, ctx.plan, ctx.w_shape, need, X, W, D, grad.contiguous())
            return (None,) * 5 + (dx, dw, dd, None, None)
        grads = multilinear_form_backward(_ROLES, ctx.role, ctx.saved_tensors, grad, ctx.needs_input_grad[5:],
                                          _form(ctx.table, ctx.plan, ctx.w_shape))
        return (None,) * 5 + tuple(grads)


class _SO2Backward(torch.autograd.Function):
    """``(dx, dW, dD) = d<g, F>/d(x, W, D)`` with ``D = D_in = D_out`` (``dD = dF/dD_in + dF/dD_out``)
    in one pass (:func:`_fused_backward`). Its backward (the double backward) contracts each output
    with its incoming gradient as a derivative of the form (``dD``'s gradient goes to both ``D_in``
    and ``D_out``), on the per-operand kernels (:class:`_SO2Form`), differentiable to any order."""

    @staticmethod
    def forward(ctx, table, plan, w_shape, need, X, W, D, G):
        ctx.table, ctx.plan, ctx.w_shape = table, plan, w_shape
        ctx.save_for_backward(X, W, D, G)
        return _fused_backward(table, plan, w_shape, need, X, W, D, G)

    @staticmethod
    def backward(ctx, ax, aw, ad):
        X, W, D, G = ctx.saved_tensors
        nx, nw, nd, ng = ctx.needs_input_grad[4:8]
        needs = (nx, nw, nd, nd, ng)
        acc = [None] * 5  # x, W, D_in, D_out, g
        for role, a in (("x", ax), ("w", aw), ("din", ad), ("dout", ad)):
            if a is None:
                continue
            saved = [X, W, D, D, G]
            saved[_ROLES.index(role)] = None
            grads = multilinear_form_backward(_ROLES, role, saved, a.contiguous(), needs,
                                              _form(ctx.table, ctx.plan, ctx.w_shape))
            acc = [g if s is None else (s if g is None else s + g) for s, g in zip(acc, grads)]
        gd = acc[2] if acc[3] is None else (acc[3] if acc[2] is None else acc[2] + acc[3])
        return None, None, None, None, acc[0], acc[1], gd, acc[4]


def reference_so2_message_passing(x, weights, wig, src, dst, num_nodes, table: SO2Table):
    """The kernel's reference, :func:`mlpot.o3.so2.so2_message_passing`, in the kernel's layouts:
    ``x (N, DI, CI)`` channel-last, ``wig (E, DW, DW)`` block-diagonal Wigner matrices."""
    from mlpot.o3.layout import channel_last_to_mul_ir, mul_ir_to_channel_last
    from mlpot.o3.so2 import so2_message_passing

    plan = table.plan
    wigner = [wig[:, l * l:(l + 1) ** 2, l * l:(l + 1) ** 2] for l in range(plan.lmax + 1)]
    y = so2_message_passing(plan, channel_last_to_mul_ir(x, plan.irreps_in), wigner, weights, src, dst, num_nodes)
    return mul_ir_to_channel_last(y, plan.irreps_out)


def so2_message_passing(x: torch.Tensor, weights: torch.Tensor, wigner: torch.Tensor,
                        plan: EdgePlan, table: SO2Table) -> torch.Tensor:
    """``x`` (N, DI, CI), ``weights`` (E, numel) or (numel,), ``wigner`` (E, DW, DW) -> (N, DO, CO).

    Differentiable to any order with respect to ``x``, the weights and the Wigner blocks, on the
    kernels."""
    check_device(x, weights, wigner)
    if not (x.dtype == weights.dtype == wigner.dtype):
        raise TypeError(f"dtype mismatch: x {x.dtype}, weights {weights.dtype}, wigner {wigner.dtype}")
    if x.shape[1:] != (table.DI, table.CI) or weights.shape[-1] != table.weight_numel:
        raise ValueError(f"shapes x {tuple(x.shape)}, weights {tuple(weights.shape)} do not match the plan")
    if wigner.shape[-1] < (table.lmax + 1) ** 2:
        raise ValueError(f"wigner blocks {tuple(wigner.shape)} too small for L")
    nodes = (grad_node(x), grad_node(weights), grad_node(wigner)) if torch.is_grad_enabled() else None
    return _SO2Form.apply("g", table, plan, tuple(weights.shape), nodes, x, weights, wigner, wigner, None)


__all__ = ["SO2Table", "reference_so2_message_passing", "so2_message_passing"]
