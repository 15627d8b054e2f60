"""Symmetric contraction (MACE product basis) with per-element weights, generic in the U tensors.

Math. Node features ``A`` (N, D, C) channel-last, element index ``z(n)``, generalised CG tensors
``U_nu`` of shape ``(D_out, D, ..., D, Q_nu)`` (``nu`` copies of ``D``, ``nu = 1..nu_max``) and
weights ``W_nu`` (Z, Q_nu, C)::

    out[n, k, c] = sum_nu sum_{i_1..i_nu} sum_q U_nu[k, i_1, .., i_nu, q] W_nu[z(n), q, c]
                   * A[n, i_1, c] * ... * A[n, i_nu, c]

(MACE's ``SymmetricContraction`` for one output irrep, with its U tensors from ``U_matrix_real``
reshaped to have an explicit ``D_out`` axis.) The product of the ``A`` factors is symmetric in
``i_1..i_nu``, so the sparse table keeps one entry per sorted index tuple with the values of all
its permutations summed: that is exact for any ``U`` and saves up to ``nu!`` work.

Layout: ``A`` and ``out`` are channel-last ``(N, D, C)`` / ``(N, D_out, C)`` (a block of channels is
one coalesced load; MACE's ``(N, C, D)`` is a transpose at the boundary). ``W`` for all ``nu`` is
concatenated to ``(Z, Q, C)``. Entries live in an ``int64 (T, NU_MAX)`` index table padded with ``-1``
(a padded factor is 1).

Kernels, generated per table (straight-line code, the entries unrolled with their values as
constants of the kernel's dtype, as :mod:`mlpot.kernels.mp_codegen` does for message passing; the
source is cached under ``$MLPOT_CACHE/kernels`` and named by the hash of the table). The nodes,
sorted by element, are cut into blocks of at most ``NODE_BLOCK`` nodes of one element
(:func:`weight_blocks`). A forward program owns one block and one block of ``BLOCK_C`` channels:
it loads the ``D`` rows of ``A`` of its nodes once (``[NODE_BLOCK, BLOCK_C]`` register tiles), then
walks the weight rows ``q`` of its element, each loaded once, and for each the entries of ``q``,
products of the staged rows, into the ``D_out`` output tiles. ``dL/dA`` is the same with the
derivative entries (one per (entry, factor), equal ones merged) and the rows of the upstream
gradient ``G`` staged too. ``dL/dW`` is a two-pass reduction: pass 1 walks a block of at most
``WEIGHT_BLOCK_NODES`` nodes of one element in tiles of ``NODE_BLOCK`` nodes (rows of ``A`` and ``G``
loaded once per node) into ``Q`` partial tiles and writes one ``(Q, C)`` partial sum per block;
pass 2 adds the partial sums of each element's blocks in order (deterministic, no atomics). It is
skipped when no weight needs a gradient (MD: forces only). A table with more distinct coefficients
than registers hold (fp64: MACE's default layer 1) runs dL/dA and dL/dW pass 1 in row groups
(:func:`row_groups`; output rows of dL/dA, weight rows of dL/dW), one launch of the ``GROUP``
constexpr each, as :mod:`mlpot.kernels.mp_codegen` does: each group loads the rows of ``A``, ``G``
and ``W`` its entries use again and writes only its own rows (no atomics); the groups of 8-byte
dtypes are generated beside those of 4-byte ones in the same source (:func:`launch_groups`).
``NU`` (a constexpr of every kernel) is
the table's correlation order (``correlation - 1`` for ``dL/dA``): the generated code has the
exact number of factors of each entry.

Double backward: :func:`sparse_symmetric_contraction`, the same sparse table in torch, over chunks
of nodes (``DOUBLE_BACKWARD_ELEMENTS`` bounds one ``(nodes, entries, C)`` temporary); each chunk is differentiated on its own (the chunks share only
the weights, whose gradients add up), so the temporaries are bounded by the chunk and the memory
grows like the outputs, ``O(N D C)``, not like the dense ``O(N D^nu C)`` contraction.
"""
import hashlib
import re

import torch

from ._codegen import import_generated, load_generated
from ._runtime import LazyKernel, check_device, reference_vjp, tl
from .mp_codegen import _Consts

NU_MAX = 4
#: nodes per block of the weight gradient's first pass (one element per block)
WEIGHT_BLOCK_NODES = 32
#: elements of one ``(nodes, entries, channels)`` temporary of the double backward: its chunk of
#: nodes is ``max(1, DOUBLE_BACKWARD_ELEMENTS // (entries * channels))``
DOUBLE_BACKWARD_ELEMENTS = 1 << 22


def _sc_block_sum_kernel(out_ptr, part_ptr, blk_off_ptr, QC, BLOCK: tl.constexpr):
    """Pass 2: out[z, :] = sum_{b in blk_off[z] .. blk_off[z+1]} part[b, :] over the flat (Q*C) rows, in order."""
    z = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    km = k < QC
    b0 = tl.load(blk_off_ptr + z)
    b1 = tl.load(blk_off_ptr + z + 1)
    acc = tl.zeros([BLOCK], dtype=out_ptr.dtype.element_ty)
    for b in range(b0, b1):
        acc += tl.load(part_ptr + b * QC + k, mask=km, other=0.0)
    tl.store(out_ptr + z * QC + k, acc, mask=km)


_BLOCK_SUM = LazyKernel(_sc_block_sum_kernel, [({"BLOCK": 256}, 4, 2), ({"BLOCK": 1024}, 4, 2)], key=["QC"])


# ------------------------------------------------------------------------ generated kernels
#: nodes of one element per program of the forward and dL/dA (their rows of ``A``, ``G`` and the
#: outputs are ``[NODE_BLOCK, BLOCK_C]`` register tiles), also the sub-block of the dL/dW pass 1
NODE_BLOCK = 4
#: (BLOCK_C, num_warps, num_stages): two elements of a ``[NODE_BLOCK, BLOCK_C]`` tile per thread
CONFIGS = [({"BLOCK_C": 32}, 4, 1), ({"BLOCK_C": 64}, 8, 1)]
_GENERATOR_VERSION = 6
_NAME = re.compile(r"^_sc_(fwd|dA|dW)_([0-9a-f]{16})$")
_LOADED: dict[str, object] = {}  # "sc_<hash>" -> generated module
_KERNELS: dict[str, dict] = {}  # hash -> {"fwd" | "dA" | "dW": LazyKernel}
_TERMS = 8  # terms per generated statement (bounds the depth of one expression)
#: most distinct coefficients (constants of the generated code) of one row group of dL/dA and
#: dL/dW pass 1, for 4-byte and for 8-byte dtypes (:func:`row_groups`)
MAX_GROUP_CONSTS = {"dA": 1 << 30, "dW": 1 << 30}
MAX_GROUP_CONSTS_WIDE = {"dA": 150, "dW": 128}


def _product(idx) -> str:
    return " * ".join(f"a{i}" for i in idx)


def _sums(target: str, factor: str, terms: list[str]) -> list[str]:
    """``target += factor * (t_1 + ... )`` in statements of at most ``_TERMS`` terms."""
    out = []
    for i in range(0, len(terms), _TERMS):
        out.append(f"{target} += {factor}({' + '.join(terms[i:i + _TERMS])})")
    return out


def _node_tile(indent: str) -> list[str]:
    """Node ids ``n`` of the tile at positions ``s`` (masked past ``s1``) and the row pointers."""
    return [f"{indent}nm = s < s1",
            f"{indent}n = tl.load(perm_ptr + s, mask=nm, other=0)",
            f"{indent}m2 = nm[:, None] & cm[None, :]",
            f"{indent}nr = n[:, None] * C"]


def _load_rows(indent: str, name: str, ptr: str, D: int, used) -> list[str]:
    return [f"{indent}{name}{i} = tl.load({ptr} + (nr * {D} + ({i} * C + cc)), mask=m2, other=0.0)" for i in sorted(used)]


def _head(name: str, args: str, doc: str, K) -> list[str]:
    return [f"def {name}({args}, C,",
            "        NU: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):",
            f'    """{doc}"""',
            "    DT = a_ptr.dtype.element_ty",
            "    b = tl.program_id(0).to(tl.int64)",
            "    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)",
            "    cm = c < C",
            "    cc = c[None, :]",
            "    s0 = tl.load(start_ptr + b)",
            "    s1 = tl.load(end_ptr + b)",
            *K.lines("    ")]


def _dA_entries(table) -> list:
    """dL/dA entries ``(out row i, g row k, other factors, q, val)``: one per (entry, factor), the
    equal terms of a repeated factor summed."""
    merged: dict = {}
    for k, idx, q, v in table.entries:
        for m in range(len(idx)):
            key = (idx[m], k, idx[:m] + idx[m + 1:], q)
            merged[key] = merged.get(key, 0.0) + v
    return [(*key, v) for key, v in merged.items()]


def _group_rows(kind: str, table) -> tuple[int, dict]:
    """(rows, {row: set of its coefficient values}) of the rows ``kind`` splits into groups: the
    output rows of dL/dA (``D``), the weight rows of dL/dW (``Q``)."""
    consts: dict = {}
    if kind == "dA":
        for i, _, _, _, v in _dA_entries(table):
            consts.setdefault(i, set()).add(abs(v))
        return table.D, consts
    for _, _, q, v in table.entries:
        consts.setdefault(q, set()).add(abs(v))
    return table.Q, consts


def row_groups(table, kind: str, wide: bool = False) -> list[list[int]]:
    """The rows of ``kind`` ("fwd": one group; "dA": output rows; "dW": weight rows) split into
    consecutive groups, one launch each, so that a group's distinct coefficients stay at most
    ``MAX_GROUP_CONSTS`` (``MAX_GROUP_CONSTS_WIDE`` for 8-byte dtypes). Every coefficient is a
    constant of the generated code held in registers, two per value in fp64: MACE's default
    layer 1 (0e+1o outputs, 552 entries, ~180-260 distinct fp64 values per kernel) spilled
    620-644 B in dL/dA and 116-124 B in dL/dW as one group. Calibrated with ``mlpot bench aot``
    (fp64, sm_80 and sm_90, both configs): that layer's dL/dA runs in 3 groups of <= 150 values
    (2 groups of ~175 spilled at sm_90), its dL/dW in 2 (one of 183 spilled); fp32 is one group
    (no spill) and MACE's layer 2 (0e only) is one group in both. The groups are balanced: the
    fewest groups at the limit, cut at the smallest limit that needs no more."""
    if kind == "fwd":
        return [list(range(table.D_out))]
    limit = MAX_GROUP_CONSTS_WIDE[kind] if wide else MAX_GROUP_CONSTS[kind]
    cache = getattr(table, "_cache", None)
    key = ("row_groups", kind, limit)
    if cache is not None and key in cache:  # launches ask on every call: computed once per table
        return cache[key]
    n, consts = _group_rows(kind, table)
    groups = fewest = _greedy(n, consts, limit)
    # balanced: the smallest limit that still needs no more groups (the greedy cut is the fewest)
    for lower in range(max((len(c) for c in consts.values()), default=0), limit):
        groups = _greedy(n, consts, lower)
        if len(groups) <= len(fewest):
            break
        groups = fewest
    if cache is not None:
        cache[key] = groups
    return groups


def _greedy(n: int, consts: dict, limit: int) -> list[list[int]]:
    """Rows ``0..n-1`` cut into the fewest consecutive groups of at most ``limit`` distinct values
    each (a row over the limit alone)."""
    groups: list[list[int]] = [[]]
    have: set = set()
    for r in range(n):
        mine = consts.get(r, set())
        if groups[-1] and len(have | mine) > limit:
            groups.append([])
            have = set()
        groups[-1].append(r)
        have |= mine
    return groups


def _all_groups(table, kind: str) -> list[list[int]]:
    """The rows of every ``GROUP`` id in the source of ``kind``: the groups of 4-byte dtypes, then,
    when they differ, those of 8-byte dtypes (:func:`launch_groups` picks the ids to launch)."""
    narrow, wide = row_groups(table, kind), row_groups(table, kind, wide=True)
    return narrow if wide == narrow else narrow + wide


def launch_groups(table, kind: str, dtype) -> list[int]:
    """The ``GROUP`` ids of ``kind`` to launch for ``dtype`` (each writes its own rows of the output)."""
    narrow, wide = row_groups(table, kind), row_groups(table, kind, wide=True)
    if torch.empty((), dtype=dtype).element_size() < 8 or wide == narrow:
        return list(range(len(narrow)))
    return list(range(len(narrow), len(narrow) + len(wide)))


def _group_entries(table, kind: str, rows) -> list:
    """The entries of ``kind`` that row group ``rows`` computes: ``(out row, g row, factors, q,
    val)`` for "fwd" / "dA" (``g row`` None in the forward), ``(g row, factors, q, val)`` for "dW"."""
    rows = set(rows)
    if kind == "dW":
        return [e for e in table.entries if e[2] in rows]
    if kind == "fwd":
        return [(k, None, idx, q, v) for k, idx, q, v in table.entries if k in rows]
    return [e for e in _dA_entries(table) if e[0] in rows]


def group_reads(table, kind: str, dtype) -> list[tuple[int, int, int]]:
    """Per launched row group of ``kind`` for ``dtype``: the rows of ``A``, of ``G`` and of ``W``
    it loads per node block (the cost model counts them)."""
    all_groups = _all_groups(table, kind)
    out = []
    for gid in launch_groups(table, kind, dtype):
        ents = _group_entries(table, kind, all_groups[gid])
        if kind == "dW":
            out.append((len({i for e in ents for i in e[1]}), len({e[0] for e in ents}), 0))
        else:
            out.append((len({i for e in ents for i in e[2]}), len({e[1] for e in ents} - {None}),
                        len({e[3] for e in ents})))
    return out


def _grouped(groups, body_of) -> list[str]:
    """The bodies of the row groups, each under ``if GROUP == k`` (a constexpr) when there are several."""
    if len(groups) == 1:
        return body_of(groups[0])
    lines = []
    for k, rows in enumerate(groups):
        lines.append(f"    if GROUP == {k}:")
        lines += ["    " + line for line in body_of(rows)]
    return lines


def _node_source(table, kind: str, name: str) -> str:
    """Forward (``kind == "fwd"``) or dL/dA: one program per node block of one element; the
    output rows of row group ``GROUP`` (:func:`row_groups`)."""
    K = _Consts()
    D, Dg, Q = table.D, table.D_out, table.Q
    rows_out = table.D_out if kind == "fwd" else D
    n_ents = len(table.entries) if kind == "fwd" else len(_dA_entries(table))

    def group(rows):
        ents = _group_entries(table, kind, rows)
        used_a = {i for e in ents for i in e[2]}
        used_g = {e[1] for e in ents} if kind == "dA" else set()
        qs = sorted({e[3] for e in ents})
        body = [f"    w{q} = tl.load(wb + {q} * C, mask=cm, other=0.0)[None, :]" for q in qs]
        # monomial-outer, in lexicographic order: each product of staged rows is formed once, used
        # at once by every output row (its coefficient a combination of the staged W rows, shared
        # by the block's nodes), and consecutive monomials share their prefixes
        for mono in sorted({e[2] for e in ents}):
            mine = [e for e in ents if e[2] == mono]
            if mono:
                body.append(f"    m = {_product(mono)}")
            for r in sorted({e[0] for e in mine}):
                if kind == "fwd":
                    terms = [f"{K(v)} * w{q}" for rr, _, _, q, v in mine if rr == r]
                    body += _sums(f"    o{r}", "m * " if mono else "", terms)
                else:
                    for k in sorted({e[1] for e in mine if e[0] == r}):
                        terms = [f"{K(v)} * w{q}" for rr, kk, _, q, v in mine if rr == r and kk == k]
                        body += _sums(f"    o{r}", f"(m * g{k}) * " if mono else f"g{k} * ", terms)
        return [*_load_rows("    ", "a", "a_ptr", D, used_a),
                *_load_rows("    ", "g", "g_ptr", Dg, used_g),
                *[f"    o{r} = tl.zeros([BLOCK_N, BLOCK_C], dtype=DT)" for r in rows],
                *body,
                *[f"    tl.store(out_ptr + (nr * {rows_out} + ({r} * C + cc)), o{r}, mask=m2)" for r in rows]]

    groups = _grouped(_all_groups(table, kind), group)
    args = ("out_ptr, a_ptr, " + ("g_ptr, " if kind == "dA" else "") + "w_ptr, elem_ptr, perm_ptr, start_ptr, end_ptr")
    doc = (f"{'Forward' if kind == 'fwd' else 'dL/dA'} (generated; D={D}, D_out={Dg}, Q={Q}, {n_ents} entries): "
           "the nodes perm[s0:s1] of one element, their rows of A" + (" and G" if kind == "dA" else "")
           + " loaded once per row group, W[z] once.")
    lines = [*_head(name, args, doc, K),
             "    s = s0 + tl.arange(0, BLOCK_N)",
             *_node_tile("    "),
             "    z = tl.load(elem_ptr + tl.load(perm_ptr + s0))",
             f"    wb = w_ptr + z * ({Q} * C) + c",
             *groups]
    return "\n".join(lines) + "\n"


def _weight_source(table, name: str) -> str:
    """dL/dW pass 1: one partial (Q, C) sum per weight block, over sub-blocks of BLOCK_N nodes; the
    weight rows of row group ``GROUP`` (:func:`row_groups`)."""
    K = _Consts()
    D, Dg, Q = table.D, table.D_out, table.Q

    def group(rows):
        ents = _group_entries(table, "dW", rows)
        used_a = {i for e in ents for i in e[1]}
        used_g = {e[0] for e in ents}
        body = []
        for mono in sorted({e[1] for e in ents}):  # monomial-outer, as in the forward
            mine = [e for e in ents if e[1] == mono]
            body.append(f"        m = {_product(mono)}")
            for q in sorted({e[2] for e in mine}):
                body += [f"        p{q} += (m * g{k}) * {K(v)}" for k, _, qq, v in mine if qq == q]
        return [*[f"    p{q} = tl.zeros([BLOCK_N, BLOCK_C], dtype=DT)" for q in rows],
                "    for sb in range(s0, s1, BLOCK_N):",
                "        s = sb + tl.arange(0, BLOCK_N)",
                *_node_tile("        "),
                *_load_rows("        ", "a", "a_ptr", D, used_a),
                *_load_rows("        ", "g", "g_ptr", Dg, used_g),
                *body,
                *[f"    tl.store(part_ptr + (b * {Q} + {q}) * C + c, tl.sum(p{q}, axis=0), mask=cm)" for q in rows]]

    groups = _grouped(_all_groups(table, "dW"), group)
    doc = (f"dL/dW pass 1 (generated; D={D}, D_out={Dg}, Q={Q}, {len(table.entries)} entries): "
           "part[b, q] = sum over the nodes perm[s0:s1] (one element) of sum_t val_t G[g_t] prod A[i_t]; "
           "each node's rows of A and G loaded once per row group.")
    lines = [*_head(name, "part_ptr, a_ptr, g_ptr, perm_ptr, start_ptr, end_ptr", doc, K), *groups]
    return "\n".join(lines) + "\n"


def module_source(table) -> tuple[str, str]:
    """(hash, source) of the generated module for ``table``; the hash names its kernels."""
    text = repr((_GENERATOR_VERSION, MAX_GROUP_CONSTS, MAX_GROUP_CONSTS_WIDE, table.D, table.D_out, table.Q, table.entries))
    key = hashlib.sha256(text.encode()).hexdigest()[:16]
    header = ('"""Generated by mlpot.kernels.symmetric_contraction; do not edit (rewritten when it differs)."""\n'
              "import triton.language as tl\n\n\n")
    srcs = [_node_source(table, "fwd", f"_sc_fwd_{key}"), _node_source(table, "dA", f"_sc_dA_{key}"),
            _weight_source(table, f"_sc_dW_{key}")]
    return key, header + "\n\n".join(srcs)


def _kernel_names(key: str) -> list[str]:
    return [f"_sc_{kind}_{key}" for kind in ("fwd", "dA", "dW")]


def _import(key: str):
    """Import the generated module ``key`` from the cache (it must have been written)."""
    return import_generated(__name__, f"sc_{key}", _kernel_names(key), _LOADED)


def kernels_for(table) -> dict:
    """``{"fwd", "dA", "dW": LazyKernel}`` of ``table``, generated and written to the cache on first use."""
    key = getattr(table, "_sc_key", None)
    if key is None or key not in _KERNELS:
        key, src = module_source(table)
        if key not in _KERNELS:
            mod = load_generated(__name__, f"sc_{key}", src, _kernel_names(key), _LOADED)
            _KERNELS[key] = {kind: LazyKernel(getattr(mod, f"_sc_{kind}_{key}"), CONFIGS, key=["C"])
                             for kind in ("fwd", "dA", "dW")}
        table._sc_key = key
    return _KERNELS[key]


def __getattr__(name: str):
    """``_sc_fwd_<hash>`` / ``_sc_dA_<hash>`` / ``_sc_dW_<hash>``: a generated kernel, imported from the cache."""
    m = _NAME.match(name)
    if m is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(_import(m.group(2)), name)


def _rows_csr(rows: torch.Tensor, n: int):
    perm = torch.sort(rows, stable=True).indices
    ptr = torch.zeros(n + 1, dtype=torch.int64)
    ptr[1:] = torch.cumsum(torch.bincount(rows, minlength=n), 0)
    return perm, ptr


class SCTable:
    """Sparse, permutation-merged entries of ``[U_1, ..., U_numax]`` and its derivative tables."""

    def __init__(self, Us, tol: float = 1e-12):
        Us = [u.detach().to(torch.float64).cpu() for u in Us]
        self.D_out = Us[0].shape[0]
        self.D = Us[0].shape[1]
        self.Qs = [u.shape[-1] for u in Us]
        self.Q = sum(self.Qs)
        self.nu_max = max(u.dim() - 2 for u in Us)
        if self.nu_max > NU_MAX:
            raise ValueError(f"correlation order {self.nu_max} > {NU_MAX}")
        merged: dict = {}
        qoff = 0
        for u in Us:
            if u.shape[0] != self.D_out or any(s != self.D for s in u.shape[1:-1]):
                raise ValueError(f"U tensor of shape {tuple(u.shape)} does not match (D_out, D, ..., D, Q)")
            for ent in torch.nonzero(u.abs() > tol).tolist():
                k, idx, q = ent[0], tuple(sorted(ent[1:-1])), ent[-1]
                key = (k, idx, q + qoff)
                merged[key] = merged.get(key, 0.0) + float(u[tuple(ent)])
            qoff += u.shape[-1]
        items = [(k, idx, q, v) for (k, idx, q), v in merged.items() if abs(v) > tol]
        self.entries = items
        self._cache: dict = {}

    def nu(self, kind: str) -> int:
        """Factors of ``A`` per entry of table ``kind`` (the kernels' ``NU`` constexpr, >= 1)."""
        return max(1, self.nu_max - 1 if kind == "dA" else self.nu_max)

    def _pack(self, items, nrows, row_of, width):
        """items: (row, gcol, idx tuple, q, val) -> CSR arrays sorted by row; ``idx`` padded to ``width``."""
        rows = torch.tensor([row_of(it) for it in items], dtype=torch.int64)
        perm, ptr = _rows_csr(rows, nrows) if items else (torch.zeros(0, dtype=torch.int64),
                                                          torch.zeros(nrows + 1, dtype=torch.int64))
        idx = torch.full((len(items), width), -1, dtype=torch.int64)
        for t, it in enumerate(items):
            for m, i in enumerate(it[2]):
                idx[t, m] = i
        g = torch.tensor([it[1] for it in items], dtype=torch.int64)
        q = torch.tensor([it[3] for it in items], dtype=torch.int64)
        v = torch.tensor([it[4] for it in items], dtype=torch.float64)
        return ptr, idx[perm].contiguous(), g[perm].contiguous(), q[perm].contiguous(), v[perm].contiguous()

    def fwd_rows(self, device) -> torch.Tensor:
        """Output row of every entry of the ``fwd`` table, in its (row-sorted) order."""
        key = ("fwd_rows", str(device))
        if key not in self._cache:
            ptr = self.get("fwd", device, torch.float64)[0]
            self._cache[key] = torch.repeat_interleave(torch.arange(self.D_out, device=device), ptr.diff())
        return self._cache[key]

    def get(self, kind: str, device, dtype):
        key = (kind, str(device), dtype)
        if key not in self._cache:
            width = self.nu(kind)
            if kind == "fwd":  # rows k
                items = [(k, -1, idx, q_, v) for k, idx, q_, v in self.entries]
                arrs = self._pack(items, self.D_out, lambda it: it[0], width)
            elif kind == "dA":  # rows i_m, extra factor g at k
                items = []
                for k, idx, q, v in self.entries:
                    for m in range(len(idx)):
                        rest = idx[:m] + idx[m + 1:]
                        items.append((idx[m], k, rest, q, v))
                arrs = self._pack(items, self.D, lambda it: it[0], width)
            elif kind == "dW":  # rows q, factor g at k
                items = [(q, k, idx, q, v) for k, idx, q, v in self.entries]
                arrs = self._pack(items, self.Q, lambda it: it[0], width)
            else:
                raise KeyError(kind)
            ptr, idx, g, q, v = arrs
            self._cache[key] = (ptr.to(device), idx.to(device), g.to(device), q.to(device),
                                v.to(device=device, dtype=dtype))
        return self._cache[key]


def _node_launch(table: SCTable, kind, A, G, W, elem, C):
    """Forward (``kind == "fwd"``, ``G`` None) or dL/dA with upstream ``G``: node blocks of one element."""
    D_out = table.D_out if kind == "fwd" else table.D
    N = A.shape[0]
    out = torch.empty(N, D_out, C, device=A.device, dtype=A.dtype)
    if N == 0 or C == 0:
        return out.zero_()
    perm, start, end, _ = weight_blocks(elem, W.shape[0], NODE_BLOCK)
    kernel = kernels_for(table)[kind]
    grid = lambda m: (start.shape[0], (C + m["BLOCK_C"] - 1) // m["BLOCK_C"])
    extra = (G,) if kind == "dA" else ()
    for group in launch_groups(table, kind, A.dtype):  # each group writes its own output rows
        kernel[grid](out, A, *extra, W, elem, perm, start, end, C, NU=table.nu(kind), GROUP=group, BLOCK_N=NODE_BLOCK)
    return out


def weight_blocks(elem: torch.Tensor, num_elements: int, block_nodes: int = WEIGHT_BLOCK_NODES):
    """Node blocks of the weight gradient, all on ``elem``'s device without a host sync.

    Returns ``(perm, blk_start, blk_end, blk_off)``: ``perm`` sorts the nodes by element (stable);
    block ``b`` covers ``perm[blk_start[b]:blk_end[b]]`` (one element, at most ``block_nodes``
    nodes; trailing blocks may be empty); element ``z`` owns blocks ``blk_off[z]:blk_off[z+1]``.
    There are ``N // block_nodes + num_elements`` blocks, enough for any element counts.
    """
    dev = elem.device
    N = elem.shape[0]
    perm = torch.sort(elem, stable=True).indices
    counts = torch.bincount(elem, minlength=num_elements)[:num_elements]
    seg = torch.zeros(num_elements + 1, dtype=torch.int64, device=dev)
    seg[1:] = torch.cumsum(counts, 0)
    nblk = (counts + block_nodes - 1) // block_nodes
    blk_off = torch.zeros(num_elements + 1, dtype=torch.int64, device=dev)
    blk_off[1:] = torch.cumsum(nblk, 0)
    B = N // block_nodes + num_elements
    b = torch.arange(B, device=dev)
    z = torch.searchsorted(blk_off[1:], b, right=True).clamp_(max=num_elements - 1)
    start = seg[z] + (b - blk_off[z]) * block_nodes
    end = torch.minimum(start + block_nodes, seg[z + 1])
    used = b < blk_off[-1]
    return perm, torch.where(used, start, 0), torch.where(used, end, 0), blk_off


def _weight_launch(table: SCTable, A, G, elem, num_elements, C):
    out = torch.empty(num_elements, table.Q, C, device=A.device, dtype=A.dtype)
    if num_elements == 0 or C == 0 or table.Q == 0:
        return out.zero_()
    perm, start, end, blk_off = weight_blocks(elem, num_elements, WEIGHT_BLOCK_NODES)
    part = torch.empty(start.shape[0], table.Q, C, device=A.device, dtype=A.dtype)
    grid = lambda m: (start.shape[0], (C + m["BLOCK_C"] - 1) // m["BLOCK_C"])
    for group in launch_groups(table, "dW", A.dtype):  # each group writes its own weight rows
        kernels_for(table)["dW"][grid](part, A, G, perm, start, end, C, NU=table.nu("dW"), GROUP=group,
                                       BLOCK_N=NODE_BLOCK)
    QC = table.Q * C
    _BLOCK_SUM[lambda m: (num_elements, (QC + m["BLOCK"] - 1) // m["BLOCK"])](out, part, blk_off, QC)
    return out


def reference_symmetric_contraction(A, elem, Us, Ws):
    """The kernel's reference: :func:`mlpot.o3.symmetric_contraction.dense_symmetric_contraction`."""
    from mlpot.o3.symmetric_contraction import dense_symmetric_contraction

    return dense_symmetric_contraction(A, elem, Us, Ws)


def sparse_symmetric_contraction(A, elem, W, table: SCTable):
    """The kernels' sum in torch: ``out[n, k, c] = sum_{t in row k} val_t W[z(n), q_t, c]
    prod_m A[n, i_tm, c]`` over the table's entries (padded factors are 1). Differentiable to any
    order; temporaries ``(N, T, C)``, so callers pass chunks of nodes."""
    _, idx, _, q, val = table.get("fwd", A.device, A.dtype)
    prod = W[elem][:, q, :] * val[None, :, None]  # (N, T, C)
    one = torch.ones((), dtype=A.dtype, device=A.device)
    for m in range(idx.shape[1]):
        i = idx[:, m]
        prod = prod * torch.where((i >= 0)[None, :, None], A[:, i.clamp(min=0), :], one)
    return A.new_zeros(A.shape[0], table.D_out, A.shape[2]).index_add(1, table.fwd_rows(A.device), prod)


def double_backward(A, W, g, elem, table: SCTable, ggA, ggW, chunk: int | None = None):
    """Gradients of ``<ggA, dL/dA> + <ggW, dL/dW>`` (``dL`` the first backward with upstream ``g``)
    with respect to ``A``, ``W`` and ``g``, chunk by chunk over the nodes (see the module doc)."""
    table.get("fwd", A.device, A.dtype)  # fill the table's caches outside the function transforms
    table.fwd_rows(A.device)
    if chunk is None:
        chunk = max(1, DOUBLE_BACKWARD_ELEMENTS // max(1, len(table.entries) * A.shape[2]))
    gA = torch.empty_like(A)
    gg = torch.empty_like(g)
    gW = torch.zeros_like(W)
    for n0 in range(0, A.shape[0], chunk):
        sl = slice(n0, n0 + chunk)
        e = elem[sl]

        def first_backward(a, w, gc, e=e):
            return reference_vjp(lambda a_, w_: sparse_symmetric_contraction(a_, e, w_, table), (a, w), gc)

        da, dw, dg = reference_vjp(first_backward, (A[sl], W, g[sl]), (ggA[sl], ggW))
        gA[sl], gg[sl] = da, dg
        gW = gW + dw
    return gA, gW, gg


class _SymmetricContraction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, A, W, elem, table):
        A, W = A.contiguous(), W.contiguous()
        ctx.save_for_backward(A, W, elem)
        ctx.table = table
        return _node_launch(table, "fwd", A, None, W, elem, A.shape[-1])

    @staticmethod
    def backward(ctx, g):
        A, W, elem = ctx.saved_tensors
        need = (bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1]))
        gA, gW = _SymmetricContractionBackward.apply(A, W, g, elem, ctx.table, need)
        return gA, gW, None, None


class _SymmetricContractionBackward(torch.autograd.Function):
    """Forward: the gradient kernels (``dL/dW`` only when asked). Backward: :func:`double_backward`."""

    @staticmethod
    def forward(ctx, A, W, g, elem, table, need):
        g = g.contiguous()
        ctx.save_for_backward(A, W, g, elem)
        ctx.table = table
        C = A.shape[-1]
        gA = _node_launch(table, "dA", A, g, W, elem, C) if need[0] else None
        gW = _weight_launch(table, A, g, elem, W.shape[0], C) if need[1] else None
        return gA, gW

    @staticmethod
    def backward(ctx, ggA, ggW):
        A, W, g, elem = ctx.saved_tensors
        ggA = torch.zeros_like(A) if ggA is None else ggA
        ggW = torch.zeros_like(W) if ggW is None else ggW
        gA, gW, gg = double_backward(A, W, g, elem, ctx.table, ggA, ggW)
        return gA, gW, gg, None, None, None


def symmetric_contraction(A: torch.Tensor, elem: torch.Tensor, Ws, table: SCTable, Us=None) -> torch.Tensor:
    """``A`` (N, D, C), ``elem`` (N,) int64, ``Ws`` list of (Z, Q_nu, C) or one (Z, Q, C) -> (N, D_out, C).

    ``Us`` is accepted for compatibility and unused (the double backward works on the table).
    """
    check_device(A)
    W = torch.cat(list(Ws), dim=1) if isinstance(Ws, (list, tuple)) else Ws
    if W.shape[1] != table.Q or A.shape[1] != table.D or W.shape[2] != A.shape[2]:
        raise ValueError(f"shapes A {tuple(A.shape)}, W {tuple(W.shape)} do not match D={table.D}, Q={table.Q}")
    return _SymmetricContraction.apply(A, W, elem.to(torch.int64).contiguous(), table)


def build_table(Us) -> SCTable:
    t = SCTable(Us)
    t.Us = [u.detach() for u in Us]
    return t


__all__ = ["DOUBLE_BACKWARD_ELEMENTS", "SCTable", "build_table", "double_backward", "group_reads", "launch_groups",
           "reference_symmetric_contraction", "row_groups", "sparse_symmetric_contraction", "symmetric_contraction",
           "weight_blocks"]
