r"""A cost MODEL (not a measurement) of the Triton kernels at MACE sizes: the bytes each kernel
moves through device memory and the FLOPs it does, for the current kernel, for the redesign of
issue #13, and the floor (each operand read once, each output written once); with the time
those take at the H100 / H200 rates below.

Counting rules (stated so that the numbers can be checked by hand):

* **bytes** are the bytes the kernel's loads and stores *request* from global memory, element
  size ``s`` (4 fp32, 8 fp64), index tensors int64. Repeated loads of the same address by one
  program are counted each time: the L1/L2 caches may serve them, so the current-kernel numbers
  are an upper bound of DRAM traffic and a lower bound of load instructions. Small tables (CG
  coefficients, CSR pointers) that fit in L1 are not counted.
* **FLOPs**: one multiply or add = 1.
* **time floor** = ``max(bytes / bandwidth, FLOPs / rate)``; rates are datasheet numbers
  (dense, no sparsity), to be replaced by the copy bandwidth that ``scripts/gpu_check.sh``
  measures.

Shapes (MACE, the defaults of :data:`mlpot.bench.model.MACE_HYPER`): ``C = 128`` channels,
spherical harmonics to ``L = 3``, correlation 3, ``N = 100k`` atoms, ``E = 5M`` edges. Message
passing is layer 2 (input ``128x0e + 128x1o``, every ``uvu`` path of ``Y^{0..3}`` into outputs
``l <= 3``); the symmetric contraction acts on the ``D = 16`` rows of ``A`` (``l <= 3``) into
``0e`` and ``1o``.
"""
from __future__ import annotations

import functools

GPUS = {
    # bandwidth GB/s, fp32 CUDA-core, fp64 (tensor-core DMMA on Hopper), tf32 tensor-core, TFLOP/s
    "H100 SXM": {"GBs": 3350.0, "fp32": 67.0, "fp64": 67.0, "tf32": 495.0},
    "H200": {"GBs": 4800.0, "fp32": 67.0, "fp64": 67.0, "tf32": 495.0},
}
MACE_SIZES = dict(C=128, L=3, N=100_000, E=5_000_000, correlation=3)
IDX = 8  # int64 index


def mp_layer2_shapes(C: int, L: int):
    """(irreps_in, irreps_sh, irreps_out, instructions) of MACE's layer-2 ``uvu`` message."""
    from mlpot.bench.kernels import uvu_message_irreps

    return uvu_message_irreps(f"{C}x0e + {C}x1o", L)


@functools.cache
def _mp_table(L: int):
    from mlpot.o3.backend import kernels_module

    CT = kernels_module("channelwise_tp")
    t = CT.build_uvu_table(*mp_layer2_shapes(1, L))
    per_row = lambda rows, n: [int((rows == r).sum()) for r in range(n)]
    return {"T": int(t.coef.numel()), "D_in": t.D_in, "D_sh": t.D_sh, "D_out": t.D_out, "P": t.P,
            "T_by_b": per_row(t.b, t.D_out)}


def mp_costs(C, L, N, E, bytes_per=4, **_) -> dict:
    """Fused message passing (gather, uvu product, scatter), forward and backward."""
    t = _mp_table(L)
    s, T, Din, Dsh, Dout, P = bytes_per, t["T"], t["D_in"], t["D_sh"], t["D_out"], t["P"]
    flops_fwd = 3 * E * T * C  # (coef*Y) * x * w, accumulated
    out = {"shape": f"C={C} L={L} N={N} E={E} D_in={Din} D_out={Dout} P={P} CG entries={T}"}
    # current (issue 13, kernels/mp_codegen.py, BLOCK_C = C): one program per receiver walks its
    # edges once (seg: N+1 indices; per edge perm[q] and src[e]); per edge x[src] (D_in rows),
    # w[e] (P rows) and Y[e] (D_sh) are loaded once, the D_out output rows stay in registers
    nsub = -(-C // 32)  # 32-channel partial sums of dY
    cur_fwd = (N + 1) * IDX + E * 2 * IDX + E * (Din * C + P * C + Dsh) * s + N * Dout * C * s
    # backward, one receiver-outer pass: g[n] once per receiver; per edge x, w, Y once; writes
    # dw[e], h[e] (= d/dx[src e], D_in rows) and the dY partials; torch sums the partials; the
    # sender-sorted segment sum reads h once and writes dx
    cur_bwd = ((N + 1) * IDX + N * Dout * C * s + E * 2 * IDX + E * (Din * C + P * C + Dsh) * s
               + E * (P * C + Din * C + Dsh * nsub) * s
               + E * Dsh * nsub * s + E * Dsh * s
               + (N + 1) * IDX + E * IDX + E * Din * C * s + N * Din * C * s)
    # redesign: receiver-sorted CSR, edge-outer loop, x[src] (D_in x C), Y[e], w[e] loaded once per
    # edge, accumulator (D_out x C block) in registers. Backward, also receiver-outer: g[n] (D_out x C)
    # loaded once per receiver, then per edge x[src], w[e], Y[e] read once and dw[e], dY[e] and the
    # per-edge input gradient h[e] (D_in x C) written; dx = sum of h over each sender's edges
    # (sender-sorted CSR, h read once)
    new_fwd = E * (Din * C + P * C + Dsh) * s + E * 2 * IDX + N * Dout * C * s
    new_bwd = (N * Dout * C * s + E * (Din * C + P * C + Dsh) * s + E * 2 * IDX
               + E * (P * C + Dsh + Din * C) * s
               + E * Din * C * s + E * IDX + N * Din * C * s)
    floor_fwd = (N * Din * C + E * Dsh + E * P * C + N * Dout * C) * s + E * 2 * IDX
    floor_bwd = (N * Din * C + N * Dout * C + E * Dsh + E * P * C) * s + E * 2 * IDX \
        + (N * Din * C + E * P * C + E * Dsh) * s
    out["current"] = {"fwd_bytes": cur_fwd, "bwd_bytes": cur_bwd, "fwd_flops": flops_fwd, "bwd_flops": 3 * flops_fwd}
    out["new"] = {"fwd_bytes": new_fwd, "bwd_bytes": new_bwd, "fwd_flops": flops_fwd, "bwd_flops": 3 * flops_fwd}
    out["floor"] = {"bytes": floor_fwd, "fwd_bytes": floor_fwd, "bwd_bytes": floor_bwd,
                    "fwd_flops": flops_fwd, "bwd_flops": 3 * flops_fwd}
    return out


def mp_double_costs(C, L, N, E, bytes_per=4, **_) -> dict:
    """Message-passing double backward: the backward of the first backward, as a force-training step
    runs it (``backend: triton``: :class:`mlpot.kernels.channelwise_tp._MPBackward`'s backward; the
    e3nn-layout reshapes around it are not counted, as in the forward row).

    In a force loss every operand needs its gradient: ``x`` (earlier layers, parameters), ``Y`` and
    ``w`` (positions, radial MLP) and ``g = dL/d out`` (it depends on the later layers' parameters),
    and the first backward produced all of ``dx, dY, dw``, so the incoming ``(ax, aY, aw)`` are all
    set. Current = what that backward launches when no graph is built (the force-training step:
    :func:`mlpot.kernels.channelwise_tp._tangent`, one row group at fp32): one fused tangent pass
    (receiver-outer: ``g[n]`` once per receiver; per edge the indices, ``x, ax`` at the sender,
    ``Y, aY, w, aw`` read once; it accumulates ``dg[n] = MP(ax, Y, w) + MP(x, aY, w) + MP(x, Y,
    aw)`` in registers and writes it once per receiver, and writes ``dw[e]``, ``h[e]`` and the
    32-channel ``dY`` partials, which torch reads and sums), then the segment sum of ``h`` into
    ``dx``. (Before: three forward and three backward passes and the torch adds, 4.8x of the floor
    at fp32; then a separate tangent forward for ``dg`` and tangent backward, operands read twice,
    2.2x.) Redesign: the same single pass, with ``dY`` written once per edge instead of partials.
    Floor: each operand (``x, Y, w, g, ax, aY, aw``, the edge index) read once, each gradient
    (``dx, dY, dw, dg``) written once."""
    t = _mp_table(L)
    s, Din, Dsh, Dout, P = bytes_per, t["D_in"], t["D_sh"], t["D_out"], t["P"]
    mp = mp_costs(C=C, L=L, N=N, E=E, bytes_per=s)
    nsub = -(-C // 32)
    x_n, g_n, w_e, y_e = N * Din * C * s, N * Dout * C * s, E * P * C * s, E * Dsh * s
    h_out = E * Din * C * s
    seg_sum = (N + 1) * IDX + E * IDX + E * Din * C * s + x_n  # sender CSR, h read, dx written
    # per edge: indices, x and ax at the sender, w, aw, Y, aY (each pass reads them once)
    edge_reads = E * 2 * IDX + 2 * E * Din * C * s + 2 * w_e + 2 * y_e
    dy_out = E * Dsh * nsub * s + E * Dsh * nsub * s + y_e  # partials written, then read and summed
    # receiver CSR, g read; dw, h, dY partials and dg written; then the segment sum
    cur = (N + 1) * IDX + g_n + edge_reads + w_e + h_out + dy_out + g_n + seg_sum
    new = ((N + 1) * IDX + g_n + E * 2 * IDX + 2 * E * Din * C * s + 2 * w_e + 2 * y_e  # reads
           + w_e + y_e + h_out + g_n + seg_sum)  # dw, dY, h, dg; dx = segment sum of h
    floor = 3 * x_n + 3 * y_e + 3 * w_e + 2 * g_n + E * 2 * IDX
    # three forward products and three backward passes of two gradients each (a full backward = 3)
    flops = 3 * mp["floor"]["fwd_flops"] + 3 * 2 * mp["floor"]["fwd_flops"]
    return {"shape": mp["shape"],
            "current": {"bytes": cur, "flops": flops},
            "new": {"bytes": new, "flops": flops},
            "floor": {"bytes": floor, "flops": flops}}


@functools.cache
def _sc_tables(L: int, correlation: int):
    """Entry counts of the symmetric-contraction tables (0e and 1o outputs) of MACE."""
    from e3nn import o3

    from mlpot.o3.backend import kernels_module
    from mlpot.o3.symmetric_contraction import coupling_basis

    SC = kernels_module("symmetric_contraction")
    irreps = o3.Irreps([(1, (l, (-1) ** l)) for l in range(L + 1)])
    res = []
    for ir in ("0e", "1o"):
        Us = [coupling_basis(irreps, nu, ir) for nu in range(1, correlation + 1)]
        tab = SC.build_table(Us)
        n_fwd = len(tab.entries)
        n_dA = sum(len(idx) for _, idx, _, _ in tab.entries)
        nu_mean = n_dA / max(1, n_fwd)
        res.append({"ir": ir, "D": tab.D, "D_out": tab.D_out, "Q": tab.Q, "T": n_fwd, "T_dA": n_dA, "nu_mean": nu_mean})
    return res


@functools.cache
def _sc_joint_reads(L: int, correlation: int, bytes_per: int) -> dict:
    """Rows of ``A``, ``G`` and ``W`` each launched row group of the kernels loads per node block
    (:func:`group_reads`), for MACE's joint table of the 0e and 1o outputs (as the model runs it)."""
    import torch
    from e3nn import o3

    from mlpot.o3.backend import kernels_module
    from mlpot.o3.symmetric_contraction import coupling_basis

    SC = kernels_module("symmetric_contraction")
    irreps = o3.Irreps([(1, (l, (-1) ** l)) for l in range(L + 1)])
    dtype = torch.float64 if bytes_per == 8 else torch.float32
    Us = []
    for nu in range(1, correlation + 1):
        us = [coupling_basis(irreps, nu, ir) for ir in ("0e", "1o")]
        joint = us[0].new_zeros(sum(u.shape[0] for u in us), *us[0].shape[1:-1], sum(u.shape[-1] for u in us))
        r = q = 0
        for u in us:
            joint[r:r + u.shape[0], ..., q:q + u.shape[-1]] = u
            r, q = r + u.shape[0], q + u.shape[-1]
        Us.append(joint.to(dtype))
    tab = SC.build_table(Us)
    return {kind: SC.group_reads(tab, kind, dtype) for kind in ("fwd", "dA", "dW")}


def sc_costs(C, L, N, correlation=3, bytes_per=4, num_elements=1, **_) -> dict:
    """Symmetric contraction: forward, dA, dW. Current (kernels generated per table, all output
    irreps as one block-diagonal table, one launch per pass): a program owns a block of
    ``NODE_BLOCK`` nodes of one element and loads their ``D`` rows of ``A`` (and, for dA, of
    ``G``) once, the element's ``Q`` weight rows once, and writes the output rows once; dW walks
    blocks of ``WEIGHT_BLOCK_NODES`` nodes (rows of ``A`` and ``G`` once per node) and writes one
    partial ``(Q, C)`` sum per block, which the second pass reads once. dA and dW pass 1 run in
    row groups where the table's coefficients would not fit in registers (fp64: MACE's default
    layer 1 runs dA in 3 groups, dW in 2; fp32 in one): each group is one more launch that reads
    the rows of ``A``, ``G`` and ``W`` its entries use (:func:`_sc_joint_reads`) and the indices
    again, and writes its own output rows. Counted with the widest ``BLOCK_C`` of the configs (the
    per-block indices are read once per channel block)."""
    s = bytes_per
    tabs = _sc_tables(L, correlation)
    D = tabs[0]["D"]
    out = {"shape": f"C={C} L={L} N={N} correlation={correlation} elements={num_elements} "
                    + " ".join(f"{t['ir']}: Q={t['Q']} entries={t['T']}" for t in tabs)}
    cur = {"fwd_bytes": 0, "dA_bytes": 0, "dW_bytes": 0, "fwd_flops": 0}
    new = dict(cur)
    from mlpot.o3.backend import kernels_module

    SC = kernels_module("symmetric_contraction")
    nb, wb = SC.NODE_BLOCK, SC.WEIGHT_BLOCK_NODES
    d_out, q_all = sum(t["D_out"] for t in tabs), sum(t["Q"] for t in tabs)
    blocks = N // nb + num_elements  # node blocks of one element (trailing ones empty)
    # per node block and channel block (the widest BLOCK_C): start, end, the NODE_BLOCK node ids,
    # the first node's id and its element
    nc = -(-C // max(m["BLOCK_C"] for m, _, _ in SC.CONFIGS))
    idx_node = nc * blocks * (nb + 4) * IDX
    w_rows = blocks * q_all * C * s
    cur["fwd_bytes"] = idx_node + N * D * C * s + w_rows + N * d_out * C * s
    reads = _sc_joint_reads(L, correlation, s)
    cur["dA_bytes"] = sum(idx_node + N * (a + g) * C * s + blocks * w * C * s for a, g, w in reads["dA"]) + N * D * C * s
    wblocks = N // wb + num_elements
    cur["dW_bytes"] = (sum(nc * (wblocks * 2 * IDX + N * IDX) + N * (a + g) * C * s for a, g, _ in reads["dW"])
                       + wblocks * q_all * C * s  # pass 1: each group writes its weight rows of the partials
                       + (num_elements + 1) * IDX + wblocks * q_all * C * s + num_elements * q_all * C * s)
    for t in tabs:
        cur["fwd_flops"] += N * t["T"] * (t["nu_mean"] + 1) * C
        # redesign: NU specialised to the correlation (mean factors per entry, not 4); A rows of one
        # node block staged once (D x C) and reused by every entry; W rows once per node block
        new["fwd_bytes"] += N * (D + t["D_out"]) * C * s + (N // 64 + 1) * t["Q"] * C * s
        new["dA_bytes"] += N * (D + t["D_out"] + D) * C * s + (N // 64 + 1) * t["Q"] * C * s
        # dW: node blocks of 64 write partial sums (pass 1), a second pass reduces them
        new["dW_bytes"] += N * (D + t["D_out"]) * C * s + 2 * (N // 64 + 1) * t["Q"] * C * s
        new["fwd_flops"] += N * t["T"] * (t["nu_mean"] + 1) * C
    floor = {"fwd_bytes": N * (D + d_out) * C * s + num_elements * q_all * C * s,
             "dA_bytes": N * (D + d_out + D) * C * s + num_elements * q_all * C * s,
             "dW_bytes": N * (D + d_out) * C * s + num_elements * q_all * C * s,
             "fwd_flops": new["fwd_flops"]}
    # parallelism of dW: before issue 13 one CTA per (element, channel block of 32); now node blocks
    out["dW_ctas_before"] = num_elements * max(1, C // 32)
    cur["dW_ctas"] = (N // 32 + num_elements) * max(1, C // 32)
    # double backward: before, the dense (N, D_out, D, D, D, C) tensor per output irrep; now chunks
    # of nodes, temporaries bounded by the chunk, per-node memory a few (D + D_out) x C rows
    out["double_bytes_per_atom_before"] = sum(t["D_out"] for t in tabs) * D ** 3 * C * s
    cur["double_bytes_per_atom"] = (D + sum(t["D_out"] for t in tabs)) * C * s * 4
    out.update(current=cur, new=new, floor=floor)
    return out


def sh_costs(L, E, bytes_per=8, num_basis=8, **_) -> dict:
    """Spherical harmonics + Bessel x cutoff, forward and backward."""
    s, D = bytes_per, (L + 1) ** 2
    from mlpot.o3.backend import kernels_module

    T = int(kernels_module("spherical_harmonics").sh_recursion_table(L)[1].numel())
    # current: the recursion unrolled in registers (one generated kernel per L): the forward reads
    # vec once and writes Y and R once; the backward recomputes Y in registers and runs the adjoint
    # sweep: vec, gY (rows 1..D-1: row 0 is constant) and gR read once, dvec written once
    cur_fwd = E * 3 * s + E * (D + num_basis) * s
    cur_bwd = E * 3 * s * 2 + E * (D - 1 + num_basis) * s
    floor_fwd = E * 3 * s + E * (D + num_basis) * s
    # backward operands: vec, gY (its row 0 multiplies the constant Y_0: no derivative), gR, dvec
    floor_bwd = E * 3 * s * 2 + E * (D - 1 + num_basis) * s
    flops = E * (3 * T + 12 * num_basis + 20)
    return {"shape": f"L={L} E={E} num_basis={num_basis} recursion entries={T}",
            "current": {"fwd_bytes": cur_fwd, "bwd_bytes": cur_bwd, "fwd_flops": flops},
            "new": {"fwd_bytes": floor_fwd, "bwd_bytes": floor_bwd, "fwd_flops": flops},
            "floor": {"bytes": floor_fwd, "fwd_bytes": floor_fwd, "bwd_bytes": floor_bwd, "fwd_flops": flops}}


@functools.cache
def _so2_table(L: int):
    """Row, weight and entry counts of MACE's layer-2 SO(2) message (``1x0e + 1x1o`` into every
    ``l <= L`` target, ``mmax = L``, depthwise) per channel, from the kernel's own table."""
    from mlpot.o3.backend import kernels_module
    from mlpot.o3.so2 import SO2MessageTP

    target = " + ".join(f"{l}{'e' if l % 2 == 0 else 'o'}" for l in range(L + 1))
    tp = SO2MessageTP("1x0e + 1x1o", L, target, mmax=L)
    t = kernels_module("so2").SO2Table(tp.plan)
    rot = lambda irreps: sum(ir.dim ** 2 for _, ir in irreps)  # in-block Wigner entries the tiles read
    return {"DI": t.DI, "DO": t.DO, "P": t.weight_numel, "T": len(t.entries),
            "rot_in": rot(tp.plan.irreps_in), "rot_out": rot(tp.plan.irreps_out),
            "rot_L": sum((2 * l + 1) ** 2 for l in range(tp.plan.lmax + 1)), "DW": (tp.plan.lmax + 1) ** 2}


def _tile(n: int) -> int:
    p = 16
    while p < n:
        p *= 2
    return p


def so2_costs(C, L, N, E, bytes_per=4, block_c=64, bwd_block_c=None, **_) -> dict:
    """SO(2) message passing (MACE layer 2, depthwise, per-edge weights), forward and backward.

    Current = the kernels of :mod:`mlpot.kernels.so2` at their widest autotune config: forward
    node kernel per (receiver, channel block ``block_c``), each edge's ``x[src]`` rotated once by one
    ``tl.dot``, the Wigner tiles (in-block entries) read once per edge and channel block, every
    table entry reading its weights (an ``m > 0`` path's two entries read the same weights);
    backward = the fused receiver-outer pass (``_so2_bwd_kernel``, all gradients needed; its own
    widest block ``bwd_block_c``: 64 in fp32, 16 in fp64 where the Wigner gradient's registers
    allow no more): per receiver and channel block ``g[n]`` read once; per edge and channel block
    the two indices and the Wigner tiles (``rot_in + rot_out``); per edge ``x[src]``, the entries'
    weights, ``dw`` and ``h`` written once over the blocks; ``dD`` (``DW x DW``, zeros outside the
    blocks) written by the first block and read and written again on its in-block entries by each
    further block; ``dw`` allocated without a memset (the table's leading entries cover it); then
    ``h`` summed per sender (``mp_codegen.segment_sum``: ``h`` and a permutation index read once,
    ``dx`` written). Double backward (not in the table) runs on the per-operand node and edge kernels.
    Redesign = one program per edge for all channels (Wigner read once per edge, weights once) and
    a single fused receiver-outer backward pass (``g[n]`` read once per receiver; per edge ``x[src]``,
    ``w``, ``D`` read once, ``dw``, ``dD`` and the per-edge input gradient ``h`` written, then ``h``
    summed per sender, as in the message-passing redesign). FLOPs: the kernels' padded tensor-core
    tiles (current, redesign); the floor counts only the in-block rotation entries and the table's
    entries (multiply-add = 2)."""
    t = _so2_table(L)
    s, DI, DO, P, T = bytes_per, t["DI"], t["DO"], t["P"], t["T"]
    nblk = -(-C // block_c)
    rot_in, rot_out, rot_L, DW = t["rot_in"], t["rot_out"], t["rot_L"], t["DW"]
    DAP, DBP = _tile(DI), _tile(DO)
    # per edge and channel: both rotations on tensor cores (padded tiles), row extraction and the map
    flops_fwd = E * C * (2 * DAP * DAP + 2 * DBP * DBP + DI * (2 * DAP + 3 * DBP))
    cur_fwd = E * (DI * C + T * C + nblk * (rot_in + rot_out)) * s + E * nblk * 2 * IDX + N * DO * C * s
    bb = bwd_block_c or (64 if bytes_per == 4 else 16)
    nbb = -(-C // bb)
    cur_bwd = (N * DO * C * s + E * nbb * (2 * IDX + (rot_in + rot_out) * s)  # g[n]; indices, D per block
               + E * (DI * C + T * C) * s  # x[src], the entries' weights
               + E * (P * C + DI * C) * s + E * (DW * DW + (nbb - 1) * 2 * rot_L) * s  # dw, h; dD (+ in place)
               + E * DI * C * s + E * IDX + N * DI * C * s)  # h summed per sender
    DWP = _tile(DW)
    # per edge and channel: rotations of x, g, the partner rows and h; dD contractions; the map (z, y, dw);
    # per edge and block: the folds onto the rows of D
    flops_bwd = (E * C * (2 * (3 * DAP * DAP + 2 * DBP * DBP + DBP * DBP) + DI * (2 * DAP + 8 * DBP))
                 + E * nbb * 2 * (DWP * DAP * (DAP + DWP) + DWP * DBP * (DBP + DWP)))
    new_fwd = E * (DI * C + P * C + rot_L) * s + E * 2 * IDX + N * DO * C * s
    new_bwd = (N * DO * C * s + E * (DI * C + P * C + rot_L) * s + E * 2 * IDX  # g[n]; x[src], w, D once
               + E * (P * C + rot_L + DI * C) * s  # dw, dD and h written
               + E * DI * C * s + E * IDX + N * DI * C * s)  # h summed per sender
    floor_fwd = (N * DI * C + E * P * C + E * rot_L + N * DO * C) * s + E * 2 * IDX
    floor_bwd = (N * DI * C + N * DO * C + E * P * C + E * rot_L) * s + E * 2 * IDX \
        + (N * DI * C + E * P * C + E * rot_L) * s
    shape = (f"C={C} L={L} N={N} E={E} D_in={DI} D_out={DO} weights/edge/channel={P} entries={T} "
             f"Wigner entries/edge={rot_L} BLOCK_C={block_c} (bwd {bb})")
    floor_flops = 2 * E * C * (rot_in + rot_out + T)
    return {"shape": shape,
            "current": {"fwd_bytes": cur_fwd, "bwd_bytes": cur_bwd, "fwd_flops": flops_fwd, "bwd_flops": flops_bwd},
            "new": {"fwd_bytes": new_fwd, "bwd_bytes": new_bwd, "fwd_flops": flops_fwd, "bwd_flops": 4 * flops_fwd},
            "floor": {"bytes": floor_fwd, "fwd_bytes": floor_fwd, "bwd_bytes": floor_bwd,
                      "fwd_flops": floor_flops, "bwd_flops": 4 * floor_flops}}


def gaunt_costs(C, L, N, bytes_per=4, **_) -> dict:
    """Gaunt product of two node tensors through an S2 grid (to grid, multiply, back)."""
    s, D = bytes_per, (L + 1) ** 2
    G = (2 * L + 1) * (4 * L + 1)  # grid points resolving degree 2L products (Gauss-Legendre x uniform)
    flops = N * C * (2 * 2 * D * G + G + 2 * G * D)
    byts = 3 * N * D * C * s
    return {"shape": f"C={C} L={L} N={N} grid={G}",
            # built: fp32 runs its three contractions as tf32x3 (3 TF32 products each), fp64 as FP64 mma
            "current": {"fwd_bytes": byts, "fwd_flops": 3 * flops, "unit": "tf32 tensor cores, 3 products (tf32x3)"},
            "new": {"fwd_bytes": byts, "fwd_flops": 3 * flops, "unit": "tf32 tensor cores, 3 products (tf32x3)"},
            "floor": {"bytes": byts, "fwd_flops": flops}}


def _ms(byts, flops, gpu, unit):
    g = GPUS[gpu]
    return max(byts / (g["GBs"] * 1e9), flops / (g[unit] * 1e12)) * 1e3


def table(sizes=MACE_SIZES, dtype="fp32") -> tuple[str, list[dict]]:
    """Markdown table and rows: current / redesign / floor bytes and times on H100 and H200."""
    s = 4 if dtype == "fp32" else 8
    unit = dtype
    rows = []
    mp = mp_costs(bytes_per=s, **sizes)
    for d in ("fwd", "bwd"):
        rows.append(("message passing " + d, mp["shape"], mp["current"][f"{d}_bytes"], mp["new"][f"{d}_bytes"],
                     mp["floor"][f"{d}_bytes"], mp["floor"][f"{d}_flops"]))
    mpd = mp_double_costs(bytes_per=s, **sizes)
    rows.append(("message passing double bwd", mpd["shape"], mpd["current"]["bytes"], mpd["new"]["bytes"],
                 mpd["floor"]["bytes"], mpd["floor"]["flops"]))
    sc = sc_costs(bytes_per=s, **sizes)
    for d in ("fwd", "dA", "dW"):
        rows.append(("symmetric contraction " + d, sc["shape"], sc["current"][f"{d}_bytes"], sc["new"][f"{d}_bytes"],
                     sc["floor"][f"{d}_bytes"], sc["floor"]["fwd_flops"]))
    sh = sh_costs(bytes_per=s, **sizes)
    for d in ("fwd", "bwd"):
        rows.append(("spherical harmonics " + d, sh["shape"], sh["current"][f"{d}_bytes"], sh["new"][f"{d}_bytes"],
                     sh["floor"][f"{d}_bytes"], sh["floor"]["fwd_flops"]))
    so2 = so2_costs(bytes_per=s, **sizes)
    for d in ("fwd", "bwd"):
        rows.append(("SO(2) message passing " + d, so2["shape"], so2["current"][f"{d}_bytes"], so2["new"][f"{d}_bytes"],
                     so2["floor"][f"{d}_bytes"], so2["floor"][f"{d}_flops"]))
    ga = gaunt_costs(bytes_per=s, **sizes)
    rows.append(("Gaunt product fwd", ga["shape"], ga["current"]["fwd_bytes"], ga["new"]["fwd_bytes"],
                 ga["floor"]["bytes"], ga["floor"]["fwd_flops"]))
    lines = [f"MODEL, not a measurement ({dtype}; {', '.join(f'{k}={v}' for k, v in sizes.items())}). "
             "GB = 1e9 bytes requested; floor time = max(bytes/bandwidth, FLOPs/rate) at datasheet rates.",
             "",
             "| kernel | current GB | redesign GB | floor GB | redesign / floor | current / floor "
             "| floor ms H100 | floor ms H200 |",
             "|---|---|---|---|---|---|---|---|"]
    out = []
    for name, shape, cur, new, flo, flops in rows:
        r = {"kernel": name, "shape": shape, "current_bytes": cur, "new_bytes": new, "floor_bytes": flo,
             "floor_flops": flops, "new_over_floor": new / flo, "current_over_floor": cur / flo,
             "floor_ms_H100": _ms(flo, flops, "H100 SXM", unit), "floor_ms_H200": _ms(flo, flops, "H200", unit)}
        out.append(r)
        lines.append(f"| {name} | {cur / 1e9:.1f} | {new / 1e9:.1f} | {flo / 1e9:.1f} | {new / flo:.2f} | "
                     f"{cur / flo:.1f} | {r['floor_ms_H100']:.2f} | {r['floor_ms_H200']:.2f} |")
    if dtype == "fp32":  # Gaunt: what the tensor cores buy (the floor column above counts CUDA-core FLOPs)
        cuda_ms = _ms(ga["floor"]["bytes"], ga["floor"]["fwd_flops"], "H100 SXM", "fp32")
        tc_ms = _ms(ga["current"]["fwd_bytes"], ga["current"]["fwd_flops"], "H100 SXM", "tf32")
        lines.append("")
        lines.append(f"Gaunt product fwd, fp32, H100: the kernel runs its three contractions as tf32x3 on tensor "
                     f"cores ({ga['current']['fwd_flops'] / 1e12:.2f} TFLOP of TF32 products): {tc_ms:.2f} ms "
                     f"at datasheet rates, against {cuda_ms:.2f} ms for the same product on fp32 CUDA cores.")
    lines.append("")
    lines.append(f"Symmetric contraction, one element: weight-gradient grid {sc['dW_ctas_before']} CTAs before "
                 f"issue 13, {sc['current']['dW_ctas']} now (node blocks, two-pass); double backward "
                 f"{sc['double_bytes_per_atom_before'] / 1e6:.0f} MB/atom dense before, about "
                 f"{sc['current']['double_bytes_per_atom'] / 1e3:.0f} kB/atom now (chunked sparse). "
                 "'current' = the kernels of this commit (message passing: the edge-outer kernels generated "
                 "per CG table; symmetric contraction: the staged kernels generated per coupling table, A, G and "
                 "W rows loaded once per node block; SO(2): the forward node kernel and the fused receiver-outer "
                 "backward); 'redesign' = issue 13's designs (of those, the SO(2) forward's one program per edge "
                 "for all channels is not built: its node kernel re-reads the Wigner tiles per channel block).")
    return "\n".join(lines), out


def main(argv=None) -> list[dict]:
    import argparse
    import json

    p = argparse.ArgumentParser(prog="scripts/kernel_cost.py", description=__doc__.split("\n")[0])
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp64"))
    p.add_argument("--atoms", type=int, default=MACE_SIZES["N"])
    p.add_argument("--edges", type=int, default=MACE_SIZES["E"])
    p.add_argument("--channels", type=int, default=MACE_SIZES["C"])
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    sizes = dict(MACE_SIZES, N=args.atoms, E=args.edges, C=args.channels)
    md, rows = table(sizes, args.dtype)
    print(md)
    if args.json:
        from mlpot.fileio import atomic_write_text

        atomic_write_text(args.json, json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
