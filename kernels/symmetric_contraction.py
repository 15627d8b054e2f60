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
entry per (entry, factor), with the upstream gradient as an extra factor); ``dL/dW`` is a kernel
segmented over the nodes of each element (CSR, no atomics). The double backward is built from the
differentiable torch reference.
"""
import torch

from ._runtime import LazyKernel, check_device, reference_vjp, tl

NU_MAX = 4
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


def _sc_weight_kernel(out_ptr, a_ptr, g_ptr, seg_ptr, perm_ptr,
                      row_ptr, idx_ptr, gcol_ptr, val_ptr,
                      C, D, D_g, Q,
                      NU: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[z, q, c] = sum_{n: z(n) = z} sum_{t in row q} val_t G[n, g_t, c] prod_m A[n, i_tm, c]."""
    zi = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    s0 = tl.load(seg_ptr + zi)
    s1 = tl.load(seg_ptr + zi + 1)
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
        tl.store(out_ptr + (zi * Q + r) * C + c, acc, mask=cm)


_NODE = LazyKernel(_sc_node_kernel, _CFG_C, key=["C", "D_out"])
_WEIGHT = LazyKernel(_sc_weight_kernel, _CFG_C, key=["C", "Q"])


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

    def _pack(self, items, nrows, row_of):
        """items: (row, gcol, idx tuple, q, val) -> CSR arrays sorted by row."""
        if not items:
            items = []
        rows = torch.tensor([row_of(it) for it in items], dtype=torch.int64)
        perm, ptr = _rows_csr(rows, nrows) if items else (torch.zeros(0, dtype=torch.int64),
                                                          torch.zeros(nrows + 1, dtype=torch.int64))
        idx = torch.full((len(items), NU_MAX), -1, dtype=torch.int64)
        for t, it in enumerate(items):
            for m, i in enumerate(it[2]):
                idx[t, m] = i
        g = torch.tensor([it[1] for it in items], dtype=torch.int64)
        q = torch.tensor([it[3] for it in items], dtype=torch.int64)
        v = torch.tensor([it[4] for it in items], dtype=torch.float64)
        return ptr, idx[perm].contiguous(), g[perm].contiguous(), q[perm].contiguous(), v[perm].contiguous()

    def get(self, kind: str, device, dtype):
        key = (kind, str(device), dtype)
        if key not in self._cache:
            if kind == "fwd":  # rows k
                items = [(k, -1, idx, q_, v) for k, idx, q_, v in self.entries]
                arrs = self._pack(items, self.D_out, lambda it: it[0])
            elif kind == "dA":  # rows i_m, extra factor g at k
                items = []
                for k, idx, q, v in self.entries:
                    for m in range(len(idx)):
                        rest = idx[:m] + idx[m + 1:]
                        items.append((idx[m], k, rest, q, v))
                arrs = self._pack(items, self.D, lambda it: it[0])
            elif kind == "dW":  # rows q, factor g at k
                items = [(q, k, idx, q, v) for k, idx, q, v in self.entries]
                arrs = self._pack(items, self.Q, lambda it: it[0])
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
                C, table.D, table.D_out, D_out, table.Q, NU=NU_MAX, HAS_G=has_g)
    return out


def _weight_launch(table: SCTable, A, G, elem, num_elements, C):
    ptr, idx, gcol, _, val = table.get("dW", A.device, A.dtype)
    out = torch.empty(num_elements, table.Q, C, device=A.device, dtype=A.dtype)
    if num_elements == 0 or C == 0:
        return out.zero_()
    perm = torch.sort(elem, stable=True).indices
    seg = torch.zeros(num_elements + 1, dtype=torch.int64, device=A.device)
    seg[1:] = torch.cumsum(torch.bincount(elem, minlength=num_elements), 0)
    grid = lambda m: (num_elements, (C + m["BLOCK_C"] - 1) // m["BLOCK_C"])
    _WEIGHT[grid](out, A, G, seg, perm, ptr, idx, gcol, val, C, table.D, table.D_out, table.Q, NU=NU_MAX)
    return out


def reference_symmetric_contraction(A, elem, Us, Ws):
    """The kernel's reference: :func:`mlpot.o3.symmetric_contraction.dense_symmetric_contraction`."""
    from mlpot.o3.symmetric_contraction import dense_symmetric_contraction

    return dense_symmetric_contraction(A, elem, Us, Ws)


class _SymmetricContraction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, A, W, elem, table, Us):
        A, W = A.contiguous(), W.contiguous()
        ctx.save_for_backward(A, W, elem)
        ctx.table, ctx.Us = table, Us
        return _node_launch(table, "fwd", A, None, W, elem, A.shape[-1])

    @staticmethod
    def backward(ctx, g):
        A, W, elem = ctx.saved_tensors
        gA, gW = _SymmetricContractionBackward.apply(A, W, g, elem, ctx.table, ctx.Us)
        return gA, gW, None, None, None


class _SymmetricContractionBackward(torch.autograd.Function):
    """Forward: the gradient kernels. Backward: through the torch reference (double backward)."""

    @staticmethod
    def forward(ctx, A, W, g, elem, table, Us):
        g = g.contiguous()
        ctx.save_for_backward(A, W, g, elem)
        ctx.table, ctx.Us = table, Us
        C = A.shape[-1]
        gA = _node_launch(table, "dA", A, g, W, elem, C)
        gW = _weight_launch(table, A, g, elem, W.shape[0], C)
        return gA, gW

    @staticmethod
    def backward(ctx, ggA, ggW):
        A, W, g = ctx.saved_tensors[:3]
        elem = ctx.saved_tensors[3]
        Us, Qs = ctx.Us, ctx.table.Qs

        def first_backward(a, w, gg):
            return reference_vjp(lambda a_, w_: reference_symmetric_contraction(
                a_, elem, Us, list(torch.split(w_, Qs, dim=1))), (a, w), gg)

        ggA = torch.zeros_like(A) if ggA is None else ggA
        ggW = torch.zeros_like(W) if ggW is None else ggW
        gA, gW, gg = reference_vjp(first_backward, (A, W, g), (ggA, ggW))
        return gA, gW, gg, None, None, None


def symmetric_contraction(A: torch.Tensor, elem: torch.Tensor, Ws, table: SCTable, Us=None) -> torch.Tensor:
    """``A`` (N, D, C), ``elem`` (N,) int64, ``Ws`` list of (Z, Q_nu, C) or one (Z, Q, C) -> (N, D_out, C).

    ``Us`` (the dense U tensors the table was built from) are only used by the double backward.
    """
    check_device(A)
    W = torch.cat(list(Ws), dim=1) if isinstance(Ws, (list, tuple)) else Ws
    if W.shape[1] != table.Q or A.shape[1] != table.D or W.shape[2] != A.shape[2]:
        raise ValueError(f"shapes A {tuple(A.shape)}, W {tuple(W.shape)} do not match D={table.D}, Q={table.Q}")
    if Us is None:
        Us = getattr(table, "Us", None)
    return _SymmetricContraction.apply(A, W, elem.to(torch.int64).contiguous(), table, Us)


def build_table(Us) -> SCTable:
    t = SCTable(Us)
    t.Us = [u.detach() for u in Us]
    return t


__all__ = ["SCTable", "build_table", "reference_symmetric_contraction", "symmetric_contraction"]
