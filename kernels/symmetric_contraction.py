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

Kernels: forward and ``dL/dA`` share one node kernel (``dL/dA`` uses the derivative table, one
entry per (entry, factor), with the upstream gradient as an extra factor). ``NU`` (factors per
entry, a constexpr) is the table's own correlation order, not a fixed maximum. ``dL/dW`` is a
two-pass reduction parallel over node blocks: the nodes, sorted by element, are cut into blocks
of at most ``WEIGHT_BLOCK_NODES`` nodes of one element; pass 1 writes one partial ``(Q, C)`` sum
per block, pass 2 adds the partial sums of each element's blocks in order (deterministic, no
atomics). It is skipped when no weight needs a gradient (MD: forces only).

Double backward: :func:`sparse_symmetric_contraction`, the same sparse table in torch, over chunks
of nodes (``DOUBLE_BACKWARD_ELEMENTS`` bounds one ``(nodes, entries, C)`` temporary); each chunk is differentiated on its own (the chunks share only
the weights, whose gradients add up), so the temporaries are bounded by the chunk and the memory
grows like the outputs, ``O(N D C)``, not like the dense ``O(N D^nu C)`` contraction.
"""
import torch

from ._runtime import LazyKernel, check_device, reference_vjp, tl

NU_MAX = 4
#: nodes per block of the weight gradient's first pass (one element per block)
WEIGHT_BLOCK_NODES = 32
#: elements of one ``(nodes, entries, channels)`` temporary of the double backward: its chunk of
#: nodes is ``max(1, DOUBLE_BACKWARD_ELEMENTS // (entries * channels))``
DOUBLE_BACKWARD_ELEMENTS = 1 << 22
_CFG_C = [({"BLOCK_C": bc}, w, 2) for bc, w in ((32, 1), (64, 2), (128, 4))]


def _sc_node_kernel(out_ptr, a_ptr, g_ptr, w_ptr, elem_ptr,
                    row_ptr, idx_ptr, gcol_ptr, q_ptr, val_ptr,
                    C, D, D_g, D_out, Q,
                    NU: tl.constexpr, HAS_G: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[n, r, c] = sum_{t in row r} val_t W[z(n), q_t, c] (G[n, g_t, c]) prod_m A[n, i_tm, c]."""
    n = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    z = tl.load(elem_ptr + n)
    for r in range(D_out):
        t0 = tl.load(row_ptr + r)
        t1 = tl.load(row_ptr + r + 1)
        acc = tl.zeros([BLOCK_C], dtype=out_ptr.dtype.element_ty)
        for t in range(t0, t1):
            q = tl.load(q_ptr + t)
            v = tl.load(val_ptr + t) * tl.load(w_ptr + (z * Q + q) * C + c, mask=cm, other=0.0)
            if HAS_G:
                gi = tl.load(gcol_ptr + t)
                v = v * tl.load(g_ptr + (n * D_g + gi) * C + c, mask=cm, other=0.0)
            for m in tl.static_range(NU):
                i = tl.load(idx_ptr + t * NU + m)
                av = tl.load(a_ptr + (n * D + tl.maximum(i, 0)) * C + c, mask=cm, other=0.0)
                v = v * tl.where(i >= 0, av, 1.0)
            acc += v
        tl.store(out_ptr + (n * D_out + r) * C + c, acc, mask=cm)


def _sc_weight_partial_kernel(out_ptr, a_ptr, g_ptr, blk_start_ptr, blk_end_ptr, perm_ptr,
                              row_ptr, idx_ptr, gcol_ptr, val_ptr,
                              C, D, D_g, Q,
                              NU: tl.constexpr, BLOCK_C: tl.constexpr):
    """Pass 1: out[b, q, c] = sum_{s in block b} sum_{t in row q} val_t G[n_s, g_t, c] prod_m A[n_s, i_tm, c]
    (``n_s = perm[s]``; the nodes of a block share one element)."""
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    s0 = tl.load(blk_start_ptr + b)
    s1 = tl.load(blk_end_ptr + b)
    for r in range(Q):
        t0 = tl.load(row_ptr + r)
        t1 = tl.load(row_ptr + r + 1)
        acc = tl.zeros([BLOCK_C], dtype=out_ptr.dtype.element_ty)
        for s in range(s0, s1):
            n = tl.load(perm_ptr + s)
            for t in range(t0, t1):
                gi = tl.load(gcol_ptr + t)
                v = tl.load(val_ptr + t) * tl.load(g_ptr + (n * D_g + gi) * C + c, mask=cm, other=0.0)
                for m in tl.static_range(NU):
                    i = tl.load(idx_ptr + t * NU + m)
                    av = tl.load(a_ptr + (n * D + tl.maximum(i, 0)) * C + c, mask=cm, other=0.0)
                    v = v * tl.where(i >= 0, av, 1.0)
                acc += v
        tl.store(out_ptr + (b * Q + r) * C + c, acc, mask=cm)


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


_NODE = LazyKernel(_sc_node_kernel, _CFG_C, key=["C", "D_out"])
_WEIGHT = LazyKernel(_sc_weight_partial_kernel, _CFG_C, key=["C", "Q"])
_BLOCK_SUM = LazyKernel(_sc_block_sum_kernel, [({"BLOCK": 256}, 4, 2), ({"BLOCK": 1024}, 4, 2)], key=["QC"])


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
    ptr, idx, gcol, q, val = table.get(kind, A.device, A.dtype)
    D_out = table.D_out if kind == "fwd" else table.D
    N = A.shape[0]
    out = torch.empty(N, D_out, C, device=A.device, dtype=A.dtype)
    if N == 0 or C == 0:
        return out.zero_()
    has_g = G is not None
    grid = lambda m: (N, (C + m["BLOCK_C"] - 1) // m["BLOCK_C"])
    _NODE[grid](out, A, G if has_g else A, W, elem, ptr, idx, gcol, q, val,
                C, table.D, table.D_out, D_out, table.Q, NU=table.nu(kind), HAS_G=has_g)
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
    ptr, idx, gcol, _, val = table.get("dW", A.device, A.dtype)
    out = torch.empty(num_elements, table.Q, C, device=A.device, dtype=A.dtype)
    if num_elements == 0 or C == 0 or table.Q == 0:
        return out.zero_()
    perm, start, end, blk_off = weight_blocks(elem, num_elements, WEIGHT_BLOCK_NODES)
    part = torch.empty(start.shape[0], table.Q, C, device=A.device, dtype=A.dtype)
    grid = lambda m: (start.shape[0], (C + m["BLOCK_C"] - 1) // m["BLOCK_C"])
    _WEIGHT[grid](part, A, G, start, end, perm, ptr, idx, gcol, val, C, table.D, table.D_out, table.Q,
                  NU=table.nu("dW"))
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


__all__ = ["DOUBLE_BACKWARD_ELEMENTS", "SCTable", "build_table", "double_backward", "reference_symmetric_contraction",
           "sparse_symmetric_contraction", "symmetric_contraction", "weight_blocks"]
