r"""Edge-outer message-passing kernels generated per coefficient table (the CG table of one layer).

Math (the notation of :mod:`mlpot.kernels.channelwise_tp`). A table is a list of entries
``t = (a_t, j_t, p_t, b_t, K_t)`` (input row, SH row, path, output row, ``alpha_p * C^{l1 l2 l3}``);
with ``s(e)``, ``r(e)`` the sender and receiver of edge ``e``:

* forward, per receiver ``n``:
  ``out[n, b, c] = sum_{e: r(e)=n} sum_p w[e,p,c] * sum_{t in (p, b)} (K_t Y[e,j_t]) x[s(e), a_t, c]``;
* backward, per receiver ``n`` with ``g = dL/d out``, for each of its edges (``v_{p,j} =
  sum_{t in (p, j)} K_t x[s,a_t] g[n,b_t]``, ``u_{p,a} = sum_{t in (p, a)} K_t Y[e,j_t] g[n,b_t]``):
  ``dw[e,p] = sum_j Y[e,j] v_{p,j}``,  ``dY[e,j] = sum_c sum_p w[e,p] v_{p,j}``,
  ``h[e,a] = sum_p w[e,p] u_{p,a}``; then ``dx[m] = sum_{e: s(e)=m} h[e]`` (sender-sorted CSR,
  :func:`segment_sum`).

Loop order and data movement: one program owns one receiver and one block of ``BLOCK_C``
channels and walks that receiver's edges (receiver-sorted CSR of the edge plan) once. Per edge it
loads ``x[s(e)]`` (``D_in`` rows), ``w[e]`` (``P`` rows) and ``Y[e]`` (``D_sh`` scalars) exactly
once; every output row of the receiver (``D_out`` rows, the forward accumulator) and, in the
backward, every row of ``g[n]`` stay in registers for the whole edge loop. Each edge row of
``dw``, ``dY`` and ``h`` is written by the one program that owns its receiver, and ``dx`` is a
sum over sender segments in a fixed order: no atomics, results are bit-identical run to run. The
``dY`` channel sum is reduced in fixed 32-channel sub-blocks (``(E, D_sh, ceil(C/32))``
partials, summed by torch), so it does not depend on the autotuned ``BLOCK_C``. A table with more
output rows than registers hold (:func:`row_groups`, fewer rows per group for fp64; MACE's
default layer 2, 55 rows, is one group) runs in row groups, one launch each and in order: each walks the edges again, and in the
backward group 0 writes the edge gradients and the later groups add theirs (still no atomics).

Tangent kernel (the fused double backward, :func:`mlpot.kernels.channelwise_tp._tangent`), with
incoming gradients ``(ax, aY, aw)`` (constexpr flags ``TX, TY, TW``: which are set), in one pass
and the same loop order, with ``ax[s(e)]``, ``aY[e]``, ``aw[e]`` loaded once per edge beside ``x,
Y, w``: the tangent forward ``gg[n] = MP(ax, Y, w) + MP(x, aY, w) + MP(x, Y, aw)`` (constexpr
``NEED_G``: accumulated in registers, written once per receiver) and the tangent backward
(``av_{p,j} = sum_t K_t ax[s,a_t] g[n,b_t]``): ``dw[e,p] = sum_j (Y_j av + aY_j v)``, ``dY[e,j] =
sum_c sum_p (w_p av + aw_p v)``, ``h[e,a] = sum_p (aw_p u_{p,a} + w_p au_{p,a})`` (``au`` is ``u``
with ``aY``). In row groups each group writes its own ``gg`` rows and, as in the backward, the
first writes the edge gradients and the later add theirs. In 8-byte dtypes it has row groups of
its own (it holds more: ``ax``, and ``gg`` beside ``g``).

Specialisation: the entries of the table are unrolled into straight-line code with the
coefficients as constants, one kernel source per table (as cuEquivariance and OpenEquivariance
generate theirs). The coefficients are created with ``tl.full(.., dtype)`` in the kernel's dtype:
a bare Python float literal would be typed fp32 by Triton and cost fp64 kernels ~1e-8 relative
accuracy. Triton reads a kernel's source with ``inspect``, so the source is written (atomically)
to ``$MLPOT_CACHE/kernels/`` (default ``~/.cache/mlpot/kernels``), named by the hash of its text,
and imported from there; :func:`__getattr__` lets ``mlpot.bench.aot`` find a generated kernel by
its name in a fresh process.
"""
from __future__ import annotations

import hashlib
import re

import torch

from ._codegen import Consts, cache_dir, import_generated, load_generated  # noqa: F401 (cache_dir: API)
from ._runtime import LazyKernel, tl

#: (BLOCK_C, num_warps, num_stages); no 1-warp config (it caps occupancy); BLOCK_C a multiple of
#: the 32-channel dY sub-block
CONFIGS = [({"BLOCK_C": 128}, 4, 1), ({"BLOCK_C": 64}, 2, 1), ({"BLOCK_C": 32}, 2, 1)]
#: channels per partial sum of dY (fixed, so dY does not depend on the config)
DY_SUB = 32
_GENERATOR_VERSION = 7
#: live register rows (output rows + 2 D_in) one program holds; more output rows split into groups
MAX_LIVE_ROWS = 64
#: the same for 8-byte dtypes, counted as output rows + 8 D_in (see :func:`row_groups`)
MAX_LIVE_ROWS_WIDE = 90
#: the same for the tangent kernel (fused double backward) in 8-byte dtypes: it also holds ``ax``
#: (and the ``ax_a g_b`` products) and the ``gg`` rows, output rows + 8 D_in (see :func:`row_groups`)
MAX_LIVE_ROWS_TANGENT_WIDE = 51
_NAME = re.compile(r"^_mp_(fwd|bwd|tbw)_([0-9a-f]{16})$")
_KINDS = ("fwd", "bwd", "tbw")
_LOADED: dict[str, object] = {}  # "mp_<hash>" -> generated module
_KERNELS: dict[str, tuple] = {}  # hash -> LazyKernels (forward, backward, tangent backward)


# --------------------------------------------------------------------------------------- source
def _entries(table):
    return list(zip(table.a.tolist(), table.y.tolist(), table.p.tolist(), table.b.tolist(), table.coef.tolist()))


_Consts = Consts


def _paths_by_sh_block(ents, P):
    """Paths in order of their SH rows, with the SH rows each path is the first / last to use.

    Paths that read the same ``Y`` block are consecutive, so a ``Y[e, j]`` scalar (and, in the
    backward, its ``dY`` accumulator) lives only while those paths run: fewer live registers.
    """
    rows = {p: sorted({t[1] for t in ents if t[2] == p}) for p in range(P)}
    order = sorted((p for p in range(P) if rows[p]), key=lambda p: (rows[p][0], p))
    first, last = {}, {}
    for p in order:
        for j in rows[p]:
            first.setdefault(j, p)
            last[j] = p
    return [(p, [t for t in ents if t[2] == p], [j for j in rows[p] if first[j] == p],
             [j for j in rows[p] if last[j] == p]) for p in order]


def _edge_loop_head(table) -> list[str]:
    """The loop over the receiver's edges (CSR positions q0..q1) and the row pointers of one edge."""
    return ["    for q in range(q0, q1):",
            "        e = tl.load(perm_ptr + q)",
            "        s = tl.load(src_ptr + e)",
            f"        xb = x_ptr + s * ({table.D_in} * C) + c",
            f"        wb = w_ptr + e * ({table.P} * C) + c",
            f"        yb = y_ptr + e * {table.D_sh}"]


def row_groups(table, wide: bool = False, tangent: bool = False) -> list[list[int]]:
    """Output rows split so that one group's accumulators (forward) or gradient rows (backward)
    fit in registers: at most ``MAX_LIVE_ROWS - 2 D_in`` rows per group (MACE's default layer 2,
    55 rows and D_in = 4, is one group). Each group walks the edges once more.

    ``wide`` (8-byte elements, fp64): two registers per value, and ptxas spills sooner as the
    input rows grow (per input row the backward holds ``x_a``, ``h_a`` and the ``x_a g_b``
    products its paths share): at most ``MAX_LIVE_ROWS_WIDE - 8 D_in`` rows per group. Calibrated
    with ``mlpot bench aot`` (fp64, sm_80/sm_90): MACE's default layer 2 stays one group, the layer
    2 of hidden irreps ``128x0e+128x1o+128x2e`` (D_in = 9, 71 rows) runs in 4 groups of 18 rows
    (2 groups of 36 spilled, 3 of 24 did too).

    ``tangent`` (the tangent kernel of the fused double backward, which also holds ``ax`` and
    accumulates ``gg`` beside ``g``): with ``wide``, at most ``MAX_LIVE_ROWS_TANGENT_WIDE - 8 D_in``
    rows. Calibrated the same way: with ``gg`` in the pass, MACE's default layer 2 in 2 groups
    (28 + 27 rows) spilled up to 488 B at sm_90; 3 groups (19 + 18 + 18) do not. At fp32 it stays
    one group (254 registers, no spill, sm_80/sm_90)."""
    per = max(8, MAX_LIVE_ROWS - 2 * table.D_in)
    if wide:
        per = min(per, max(8, MAX_LIVE_ROWS_WIDE - 8 * table.D_in))
    if wide and tangent:
        per = min(per, max(8, MAX_LIVE_ROWS_TANGENT_WIDE - 8 * table.D_in))
    n = max(1, -(-table.D_out // per))
    size = -(-table.D_out // n)
    return [list(range(i, min(i + size, table.D_out))) for i in range(0, table.D_out, size)]


def _all_groups(table, tangent: bool = False) -> list[tuple[list[int], bool]]:
    """``(rows, first)`` of every ``GROUP`` id in the source: the groups of 4-byte dtypes, then,
    when they differ, those of 8-byte dtypes (:func:`launch_groups` picks the ids to launch)."""
    narrow, wide = row_groups(table, tangent=tangent), row_groups(table, wide=True, tangent=tangent)
    sets = [narrow] if wide == narrow else [narrow, wide]
    return [(rows, k == 0) for groups in sets for k, rows in enumerate(groups)]


def launch_groups(table, dtype, tangent: bool = False) -> list[int]:
    """The ``GROUP`` ids to launch, in order, for ``dtype`` (``tangent``: of the tangent kernels)."""
    narrow, wide = row_groups(table, tangent=tangent), row_groups(table, wide=True, tangent=tangent)
    if torch.empty((), dtype=dtype).element_size() < 8 or wide == narrow:
        return list(range(len(narrow)))
    return list(range(len(narrow), len(narrow) + len(wide)))


def _grouped(groups, body_of) -> list[str]:
    """The bodies of the row groups (``(rows, first)`` pairs), each under ``if GROUP == k`` (a
    constexpr) when there are several."""
    if len(groups) == 1:
        return body_of(*groups[0])
    lines = []
    for k, (rows, first) in enumerate(groups):
        lines.append(f"    if GROUP == {k}:")
        lines += ["    " + line for line in body_of(rows, first)]
    return lines


def _prologue(K) -> list[str]:
    return ["    n = tl.program_id(0).to(tl.int64)",
            "    cb = tl.program_id(1)",
            "    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)",
            "    cm = c < C",
            "    q0 = tl.load(seg_ptr + n)",
            "    q1 = tl.load(seg_ptr + n + 1)",
            *K.lines("    ")]


def _forward_source(table, name: str) -> str:
    ents = _entries(table)
    Din, Dsh, Dout, P = table.D_in, table.D_sh, table.D_out, table.P
    K = _Consts()

    def group(rows, _first):
        mine = [t for t in ents if t[3] in rows]
        body = []
        for p, pe, new_j, _ in _paths_by_sh_block(mine, P):
            body += [f"        y{j} = tl.load(yb + {j})" for j in new_j]
            body.append(f"        wp = tl.load(wb + {p} * C, mask=cm, other=0.0)")
            for b in sorted({t[3] for t in pe}):
                terms = [f"({K(k)} * y{j}) * x{a}" for a, j, _, bb, k in pe if bb == b]
                body.append(f"        o{b} += wp * ({' + '.join(terms)})")
        return [*[f"    o{b} = tl.zeros([BLOCK_C], dtype=DT)" for b in rows],
                *_edge_loop_head(table),
                *[f"        x{a} = tl.load(xb + {a} * C, mask=cm, other=0.0)" for a in sorted({t[0] for t in mine})],
                *body,
                f"    ob = out_ptr + n * ({Dout} * C) + c",
                *[f"    tl.store(ob + {b} * C, o{b}, mask=cm)" for b in rows]]

    groups = _grouped(_all_groups(table), group)
    lines = [
        f"def {name}(out_ptr, x_ptr, y_ptr, w_ptr, seg_ptr, perm_ptr, src_ptr, C,",
        "        GROUP: tl.constexpr, BLOCK_C: tl.constexpr):",
        f'    """Forward, edge-outer (generated; table: D_in={Din}, D_sh={Dsh}, D_out={Dout}, P={P}, '
        f'{len(ents)} entries): output rows of row group GROUP."""',
        "    DT = x_ptr.dtype.element_ty",
        *_prologue(K),
        *groups,
    ]
    return "\n".join(lines) + "\n"


def _zero_untouched_rows(mine, used_a, Din, P, Dsh, zero_c, zero_sub) -> list[str]:
    """Lines of a backward-type kernel's first row group (entries ``mine``) that store zeros into
    the rows of ``h``, ``dw`` and ``dY`` its entries do not write: the later groups add into them."""
    lines, paths = [], {t[2] for t in mine}
    for flag, ptr, unused, zero, mask in (
            ("NEED_H", "hb + {} * C", [a for a in range(Din) if a not in used_a], zero_c, "cm"),
            ("NEED_W", "dwb + {} * C", [q for q in range(P) if q not in paths], zero_c, "cm"),
            ("NEED_Y", "db + {} * NSUB", [j for j in range(Dsh) if j not in {t[1] for t in mine}],
             zero_sub, "subm")):
        if unused:
            lines.append(f"        if {flag}:")
            lines += [f"            tl.store({ptr.format(i)}, {zero}, mask={mask})" for i in unused]
    return lines


def _backward_source(table, name: str) -> str:
    ents = _entries(table)
    Din, Dsh, Dout, P = table.D_in, table.D_sh, table.D_out, table.P
    K = _Consts()
    dy_sum = f"tl.sum(tl.reshape({{}}, [BLOCK_C // {DY_SUB}, {DY_SUB}]), axis=1)"
    zero_c, zero_sub = "tl.zeros([BLOCK_C], dtype=DT)", f"tl.zeros([BLOCK_C // {DY_SUB}], dtype=DT)"

    def group(rows, first):
        # the first group writes every edge row (zeros where it has no entry), the others add theirs
        def put(indent, ptr, value, mask):
            if first:
                return f"{indent}tl.store({ptr}, {value}, mask={mask})"
            return f"{indent}tl.store({ptr}, tl.load({ptr}, mask={mask}, other=0.0) + {value}, mask={mask})"

        mine = [t for t in ents if t[3] in rows]
        body = []
        for p, pe, new_j, done_j in _paths_by_sh_block(mine, P):
            body += [f"        y{j} = tl.load(yb + {j})" for j in new_j]
            if new_j:
                body.append("        if NEED_Y:")
                body += [f"            dy{j} = {zero_c}" for j in new_j]
            body.append(f"        wp = tl.load(wb + {p} * C, mask=cm, other=0.0)")
            body.append("        if NEED_W:")
            body.append(f"            dwp = {zero_c}")
            for j in sorted({t[1] for t in pe}):
                terms = [f"{K(k)} * (x{a} * g{b})" for a, jj, _, b, k in pe if jj == j]
                body.append("        if NEED_W or NEED_Y:")
                body.append(f"            v = {' + '.join(terms)}")
                body.append("            if NEED_W:")
                body.append(f"                dwp += y{j} * v")
                body.append("            if NEED_Y:")
                body.append(f"                dy{j} += wp * v")
            body.append("        if NEED_W:")
            body.append(put("            ", f"dwb + {p} * C", "dwp", "cm"))
            body.append("        if NEED_H:")
            for a in sorted({t[0] for t in pe}):
                terms = [f"({K(k)} * y{j}) * g{b}" for aa, j, _, b, k in pe if aa == a]
                body.append(f"            h{a} += wp * ({' + '.join(terms)})")
            if done_j:
                body.append("        if NEED_Y:")
                body += [put("            ", f"db + {j} * NSUB", dy_sum.format(f"dy{j}"), "subm") for j in done_j]
        used_a = sorted({t[0] for t in mine})
        lines = [
            f"    gb = g_ptr + n * ({Dout} * C) + c",
            *[f"    g{b} = tl.load(gb + {b} * C, mask=cm, other=0.0)" for b in sorted({t[3] for t in mine})],
            *_edge_loop_head(table),
            f"        dwb = dw_ptr + e * ({P} * C) + c",
            f"        db = dy_ptr + e * ({Dsh} * NSUB) + sub",
            f"        hb = h_ptr + e * ({Din} * C) + c",
            "        if NEED_W or NEED_Y:",
            *[f"            x{a} = tl.load(xb + {a} * C, mask=cm, other=0.0)" for a in used_a],
            "        if NEED_H:",
            *[f"            h{a} = {zero_c}" for a in used_a],
            *body,
            "        if NEED_H:",
            *[put("            ", f"hb + {a} * C", f"h{a}", "cm") for a in used_a],
        ]
        if first:
            lines += _zero_untouched_rows(mine, used_a, Din, P, Dsh, zero_c, zero_sub)
        return lines

    groups = _grouped(_all_groups(table), group)
    lines = [
        f"def {name}(h_ptr, dw_ptr, dy_ptr, g_ptr, x_ptr, y_ptr, w_ptr, seg_ptr, perm_ptr, src_ptr, C, NSUB,",
        "        NEED_H: tl.constexpr, NEED_W: tl.constexpr, NEED_Y: tl.constexpr, GROUP: tl.constexpr,",
        "        BLOCK_C: tl.constexpr):",
        f'    """Backward, edge-outer (generated; table: D_in={Din}, D_sh={Dsh}, D_out={Dout}, P={P}, '
        f'{len(ents)} entries): h[e], dw[e], dY partials[e] of each edge of receiver n, from the '
        'gradient rows of row group GROUP (group 0 writes, later groups add)."""',
        "    DT = g_ptr.dtype.element_ty",
        *_prologue(K),
        f"    sub = cb * (BLOCK_C // {DY_SUB}) + tl.arange(0, BLOCK_C // {DY_SUB})",
        "    subm = sub < NSUB",
        *groups,
    ]
    return "\n".join(lines) + "\n"


def _tangent_head(table) -> list[str]:
    """:func:`_edge_loop_head` plus the row pointers of the tangents ``ax[s], aY[e], aw[e]``."""
    return [*_edge_loop_head(table),
            f"        axb = ax_ptr + s * ({table.D_in} * C) + c",
            f"        awb = aw_ptr + e * ({table.P} * C) + c",
            f"        ayb = ay_ptr + e * {table.D_sh}"]


def _tangent_backward_source(table, name: str) -> str:
    """``gg`` (``NEED_G``: the tangent forward, summed in registers) and the edge gradients of the
    three backward passes of the double backward in one pass, with
    ``v_{p,j} = sum K x_a g_b`` and ``av_{p,j} = sum K ax_a g_b``: ``dw_p = sum_j (Y_j av + aY_j v)``,
    ``dY_j = sum_p (w_p av + aw_p v)``, ``h_a = sum_p (aw_p sum K Y_j g_b + w_p sum K aY_j g_b)``.
    ``NEED_*`` as in the backward, already false where no tangent contributes (host side)."""
    ents = _entries(table)
    Din, Dsh, Dout, P = table.D_in, table.D_sh, table.D_out, table.P
    K = _Consts()
    dy_sum = f"tl.sum(tl.reshape({{}}, [BLOCK_C // {DY_SUB}, {DY_SUB}]), axis=1)"
    zero_c, zero_sub = "tl.zeros([BLOCK_C], dtype=DT)", f"tl.zeros([BLOCK_C // {DY_SUB}], dtype=DT)"
    use_x = "(NEED_W and TY) or (NEED_Y and TW) or (NEED_G and (TY or TW))"
    use_ax = "TX and (NEED_W or NEED_Y or NEED_G)"
    use_w = "(NEED_Y and TX) or (NEED_H and TY) or (NEED_G and (TX or TY))"
    use_g = "NEED_H or NEED_W or NEED_Y"
    need_av, need_v = "TX and (NEED_W or NEED_Y)", "(NEED_W and TY) or (NEED_Y and TW)"

    def group(rows, first):
        def put(indent, ptr, value, mask):
            if first:
                return f"{indent}tl.store({ptr}, {value}, mask={mask})"
            return f"{indent}tl.store({ptr}, tl.load({ptr}, mask={mask}, other=0.0) + {value}, mask={mask})"

        mine = [t for t in ents if t[3] in rows]
        body = []
        for p, pe, new_j, done_j in _paths_by_sh_block(mine, P):
            body += [f"        y{j} = tl.load(yb + {j})" for j in new_j]
            if new_j:
                body.append("        if TY:")
                body += [f"            ay{j} = tl.load(ayb + {j})" for j in new_j]
                body.append("        if NEED_Y:")
                body += [f"            dy{j} = {zero_c}" for j in new_j]
            body.append(f"        if {use_w}:")
            body.append(f"            wp = tl.load(wb + {p} * C, mask=cm, other=0.0)")
            body.append("        if TW:")
            body.append(f"            awp = tl.load(awb + {p} * C, mask=cm, other=0.0)")
            body.append("        if NEED_W:")
            body.append(f"            dwp = {zero_c}")
            for b in sorted({t[3] for t in pe}):  # gg, the tangent forward MP(ax,Y,w) + MP(x,aY,w) + MP(x,Y,aw)
                pb = [(a, j, k) for a, j, _, bb, k in pe if bb == b]
                body.append("        if NEED_G and TW:")
                body.append(f"            o{b} += awp * ({' + '.join(f'({K(k)} * y{j}) * x{a}' for a, j, k in pb)})")
                body.append("        if NEED_G and TY:")
                body.append(f"            o{b} += wp * ({' + '.join(f'({K(k)} * ay{j}) * x{a}' for a, j, k in pb)})")
                body.append("        if NEED_G and TX:")
                body.append(f"            o{b} += wp * ({' + '.join(f'({K(k)} * y{j}) * ax{a}' for a, j, k in pb)})")
            for j in sorted({t[1] for t in pe}):
                pj = [(a, b, k) for a, jj, _, b, k in pe if jj == j]
                body.append(f"        if {need_av}:")
                body.append(f"            av = {' + '.join(f'{K(k)} * (ax{a} * g{b})' for a, b, k in pj)}")
                body.append("            if NEED_W:")
                body.append(f"                dwp += y{j} * av")
                body.append("            if NEED_Y:")
                body.append(f"                dy{j} += wp * av")
                body.append(f"        if {need_v}:")
                body.append(f"            v = {' + '.join(f'{K(k)} * (x{a} * g{b})' for a, b, k in pj)}")
                body.append("            if NEED_W and TY:")
                body.append(f"                dwp += ay{j} * v")
                body.append("            if NEED_Y and TW:")
                body.append(f"                dy{j} += awp * v")
            body.append("        if NEED_W:")
            body.append(put("            ", f"dwb + {p} * C", "dwp", "cm"))
            for a in sorted({t[0] for t in pe}):
                pa = [(j, b, k) for aa, j, _, b, k in pe if aa == a]
                body.append("        if NEED_H and TW:")
                body.append(f"            h{a} += awp * ({' + '.join(f'({K(k)} * y{j}) * g{b}' for j, b, k in pa)})")
                body.append("        if NEED_H and TY:")
                body.append(f"            h{a} += wp * ({' + '.join(f'({K(k)} * ay{j}) * g{b}' for j, b, k in pa)})")
            if done_j:
                body.append("        if NEED_Y:")
                body += [put("            ", f"db + {j} * NSUB", dy_sum.format(f"dy{j}"), "subm") for j in done_j]
        used_a = sorted({t[0] for t in mine})
        lines = [
            f"    if {use_g}:",
            f"        gb = g_ptr + n * ({Dout} * C) + c",
            *[f"        g{b} = tl.load(gb + {b} * C, mask=cm, other=0.0)" for b in sorted({t[3] for t in mine})],
            "    if NEED_G:",
            *[f"        o{b} = {zero_c}" for b in rows],
            *_tangent_head(table),
            f"        dwb = dw_ptr + e * ({P} * C) + c",
            f"        db = dy_ptr + e * ({Dsh} * NSUB) + sub",
            f"        hb = h_ptr + e * ({Din} * C) + c",
            f"        if {use_x}:",
            *[f"            x{a} = tl.load(xb + {a} * C, mask=cm, other=0.0)" for a in used_a],
            f"        if {use_ax}:",
            *[f"            ax{a} = tl.load(axb + {a} * C, mask=cm, other=0.0)" for a in used_a],
            "        if NEED_H:",
            *[f"            h{a} = {zero_c}" for a in used_a],
            *body,
            "        if NEED_H:",
            *[put("            ", f"hb + {a} * C", f"h{a}", "cm") for a in used_a],
        ]
        if first:
            lines += _zero_untouched_rows(mine, used_a, Din, P, Dsh, zero_c, zero_sub)
        # gg: this group's rows, written once per receiver (the groups own disjoint rows)
        lines += ["    if NEED_G:",
                  f"        ob = gg_ptr + n * ({Dout} * C) + c",
                  *[f"        tl.store(ob + {b} * C, o{b}, mask=cm)" for b in rows]]
        return lines

    groups = _grouped(_all_groups(table, tangent=True), group)
    lines = [
        f"def {name}(gg_ptr, h_ptr, dw_ptr, dy_ptr, g_ptr, x_ptr, y_ptr, w_ptr, ax_ptr, ay_ptr, aw_ptr, seg_ptr,",
        "        perm_ptr, src_ptr, C, NSUB, TX: tl.constexpr, TY: tl.constexpr, TW: tl.constexpr,",
        "        NEED_G: tl.constexpr, NEED_H: tl.constexpr, NEED_W: tl.constexpr, NEED_Y: tl.constexpr,",
        "        GROUP: tl.constexpr,",
        "        BLOCK_C: tl.constexpr):",
        f'    """Tangent backward, edge-outer (generated; table: D_in={Din}, D_sh={Dsh}, D_out={Dout}, P={P}, '
        f'{len(ents)} entries): gg[n] (NEED_G) and h[e], dw[e], dY partials[e] of the double backward '
        'with tangents (ax, aY, aw), row group GROUP (its gg rows; h/dw/dY: group 0 writes, later groups add)."""',
        "    DT = g_ptr.dtype.element_ty",
        *_prologue(K),
        f"    sub = cb * (BLOCK_C // {DY_SUB}) + tl.arange(0, BLOCK_C // {DY_SUB})",
        "    subm = sub < NSUB",
        *groups,
    ]
    return "\n".join(lines) + "\n"


def module_source(table) -> tuple[str, str]:
    """(hash, source) of the generated module for ``table``; the hash names its kernels."""
    text = repr((_GENERATOR_VERSION, MAX_LIVE_ROWS, MAX_LIVE_ROWS_WIDE, MAX_LIVE_ROWS_TANGENT_WIDE, table.D_in, table.D_sh, table.D_out, table.P, _entries(table)))
    key = hashlib.sha256(text.encode()).hexdigest()[:16]
    fwd = _forward_source(table, f"_mp_fwd_{key}")
    bwd = _backward_source(table, f"_mp_bwd_{key}")
    tbw = _tangent_backward_source(table, f"_mp_tbw_{key}")
    header = ('"""Generated by mlpot.kernels.mp_codegen; do not edit (rewritten when it differs)."""\n'
              "import triton.language as tl\n\n\n")
    return key, header + "\n\n".join((fwd, bwd, tbw))


def _import(key: str):
    """Import the generated module ``key`` from the cache (it must have been written)."""
    return import_generated(__name__, f"mp_{key}", tuple(f"_mp_{k}_{key}" for k in _KINDS), _LOADED)


def _all_kernels(table) -> tuple:
    """The three kernels of ``table`` (:data:`_KINDS`), generated and written to the cache on first use."""
    key = getattr(table, "_mp_key", None)
    if key is None or key not in _KERNELS:
        key, src = module_source(table)
        if key not in _KERNELS:
            names = tuple(f"_mp_{k}_{key}" for k in _KINDS)
            mod = load_generated(__name__, f"mp_{key}", src, names, _LOADED)
            _KERNELS[key] = tuple(LazyKernel(getattr(mod, nm), CONFIGS, key=["C"]) for nm in names)
        table._mp_key = key
    return _KERNELS[key]


def kernels_for(table) -> tuple[LazyKernel, LazyKernel]:
    """(forward, backward) kernels of ``table``."""
    return _all_kernels(table)[:2]


def tangent_kernel_for(table) -> LazyKernel:
    """The tangent backward kernel of ``table`` (the fused double backward, ``gg`` included)."""
    return _all_kernels(table)[2]


def __getattr__(name: str):
    """``_mp_{fwd,bwd,tbw}_<hash>``: a generated kernel, imported from the cache."""
    m = _NAME.match(name)
    if m is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(_import(m.group(2)), name)


# ------------------------------------------------------------------------------ generic kernel
def _segment_sum_kernel(out_ptr, h_ptr, seg_ptr, perm_ptr, C, D,
                        D_PAD: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[m, r, c] = sum_{q in seg(m)} h[perm[q], r, c]: edge rows summed per node, in CSR order."""
    m = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    r = tl.arange(0, D_PAD)
    mask = (r[:, None] < D) & (c[None, :] < C)
    off = r[:, None] * C + c[None, :]
    q0 = tl.load(seg_ptr + m)
    q1 = tl.load(seg_ptr + m + 1)
    acc = tl.zeros([D_PAD, BLOCK_C], dtype=out_ptr.dtype.element_ty)
    for q in range(q0, q1):
        e = tl.load(perm_ptr + q)
        acc += tl.load(h_ptr + e * D * C + off, mask=mask, other=0.0)
    tl.store(out_ptr + m * D * C + off, acc, mask=mask)


SEGMENT_SUM = LazyKernel(_segment_sum_kernel, [({"BLOCK_C": 128}, 4, 1), ({"BLOCK_C": 64}, 2, 1)], key=["C", "D"])


def segment_sum(h: torch.Tensor, seg: torch.Tensor, perm: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """``out[m] = sum_{q in [seg[m], seg[m+1])} h[perm[q]]`` for ``h`` of shape ``(E, D, C)``."""
    _, D, C = h.shape
    out = torch.empty(num_nodes, D, C, device=h.device, dtype=h.dtype)
    if num_nodes == 0 or D == 0 or C == 0:
        return out.zero_()
    d_pad = 1
    while d_pad < D:
        d_pad *= 2
    SEGMENT_SUM[lambda m: (num_nodes, -(-C // m["BLOCK_C"]))](out, h, seg, perm, C, D, D_PAD=d_pad)
    return out

