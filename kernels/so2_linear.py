r"""eSCN's shared-weight SO(2) linear map on edge-frame features (registry op ``so2_linear``).

Math (reference: :func:`mlpot.o3.so2.so2_linear`). Edge-frame features ``x (E, K, C_in)`` in the
m-major layout of :func:`mlpot.o3.so2.edge_frame_index` (rows ``m = 0`` for ``l = 0..L``, then
per ``m = 1..mmax`` the ``+m`` rows ``l = m..L`` and the ``-m`` rows ``l = m..L``). Every block
``(m, start, n)`` has one weight matrix ``W_m (n C_in, n C_out)`` (row ``l' C_in + c``), applied
to each of its halves (one for ``m = 0``, ``+m`` and ``-m`` otherwise): a half is a contiguous
run of ``n C_in`` numbers per edge, so each half is the GEMM

    y[e, half] = x[e, half] @ W_m            (E x n C_in) @ (n C_in x n C_out).

Layout: the kernel reads and writes the m-major layout that :class:`mlpot.o3.so2.SO2Linear` uses
(no conversion); the weights are the blocks' matrices flattened and concatenated in block order.

The map is bilinear, ``y = F(x, W)``, and the three products of the form ``<y, F(x, W)>`` are

* ``F(x, W)``: the forward (one segmented GEMM per half);
* ``G(y, W) = d<y, F(x, W)>/dx``: the same kernel with ``W_m^T``;
* ``H(x, y) = d<y, F(x, W)>/dW``: ``sum_e sum_halves x[e, half]^T y[e, half]`` per block,
  reduced over edge chunks in parallel and summed.

Each is the derivative of the form with respect to one operand, so the derivative of any of them
with respect to another operand is again one of them (``_SO2LinearForm``, the pattern of
:mod:`mlpot.kernels.channelwise_tp`): gradients of every order run on these kernels and never
differentiate saved tensors.

Kernels: the GEMM runs one program per (edge block, half, output-column block) with ``tl.dot``
over ``BLOCK_K`` chunks on tensor cores (float32: ``tf32x3``, see
:func:`mlpot.kernels._runtime.dot_precision` for its error bound; float64: ``ieee``); the weight
gradient one program per (block, tile of W, edge chunk), on tensor cores too (``tf32x3`` in
float32: the edge tile of 16 keeps it free of spills, where 64 edges spilled 168 B on sm_90).
"""
import torch

from ._runtime import LazyKernel, check_device, dot_precision, multilinear_form_backward, tl
from .spherical_harmonics import edge_bucket


def _so2_linear_gemm_kernel(a_ptr, w_ptr, out_ptr, a_off_ptr, o_off_ptr, k_ptr, n_ptr, w_off_ptr,
                            E, stride_a, stride_o, E_BUCKET,
                            TRANS_W: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_E: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``out[e, o_off + j] = sum_k a[e, a_off + k] W[k, j]`` for one half (``W^T`` when ``TRANS_W``).
    ``E_BUCKET`` (the autotune key) is the edge count rounded up to a power of two."""
    seg = tl.program_id(1)
    a_off = tl.load(a_off_ptr + seg)
    o_off = tl.load(o_off_ptr + seg)
    K = tl.load(k_ptr + seg)
    N = tl.load(n_ptr + seg)
    w_off = tl.load(w_off_ptr + seg)
    e = (tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)).to(tl.int64)
    em = e < E
    j = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    jm = j < N
    acc = tl.zeros([BLOCK_E, BLOCK_N], dtype=out_ptr.dtype.element_ty)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        km = k < K
        a = tl.load(a_ptr + e[:, None] * stride_a + a_off + k[None, :], mask=em[:, None] & km[None, :], other=0.0)
        if TRANS_W:  # W is (N, K) row-major here: the block's matrix read transposed
            w = tl.load(w_ptr + w_off + j[None, :] * K + k[:, None], mask=km[:, None] & jm[None, :], other=0.0)
        else:
            w = tl.load(w_ptr + w_off + k[:, None] * N + j[None, :], mask=km[:, None] & jm[None, :], other=0.0)
        acc += tl.dot(a, w, input_precision=DOT_PRECISION)
    tl.store(out_ptr + e[:, None] * stride_o + o_off + j[None, :], acc, mask=em[:, None] & jm[None, :])


def _so2_linear_wgrad_kernel(x_ptr, g_ptr, out_ptr, x_off_ptr, g_off_ptr, k_ptr, n_ptr, w_off_ptr, halves_ptr,
                             E, E_CHUNK, stride_x, stride_g, numel, max_n, E_BUCKET, DOT_PRECISION: tl.constexpr,
                             BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """``out[chunk, w_off + k N + j] = sum_{e in chunk} sum_h x[e, x_off + h K + k] g[e, g_off + h N + j]``."""
    b = tl.program_id(0)
    tile = tl.program_id(1)
    chunk = tl.program_id(2).to(tl.int64)
    x_off = tl.load(x_off_ptr + b)
    g_off = tl.load(g_off_ptr + b)
    K = tl.load(k_ptr + b)
    N = tl.load(n_ptr + b)
    w_off = tl.load(w_off_ptr + b)
    halves = tl.load(halves_ptr + b)
    tiles_n = tl.cdiv(max_n, BLOCK_N)
    k = (tile // tiles_n) * BLOCK_K + tl.arange(0, BLOCK_K)
    j = (tile % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    km = k < K
    jm = j < N
    acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=out_ptr.dtype.element_ty)
    e_start = chunk * E_CHUNK
    for e0 in range(0, E_CHUNK, BLOCK_E):
        e = e_start + e0 + tl.arange(0, BLOCK_E)
        em = (e < E) & (e0 + tl.arange(0, BLOCK_E) < E_CHUNK)
        for h in range(0, halves):
            xt = tl.load(x_ptr + e[None, :] * stride_x + x_off + h * K + k[:, None],
                         mask=km[:, None] & em[None, :], other=0.0)
            gt = tl.load(g_ptr + e[:, None] * stride_g + g_off + h * N + j[None, :],
                         mask=em[:, None] & jm[None, :], other=0.0)
            acc += tl.dot(xt, gt, input_precision=DOT_PRECISION)
    tl.store(out_ptr + chunk * numel + w_off + k[:, None] * N + j[None, :], acc, mask=km[:, None] & jm[None, :])


# configs that compile without register spills for sm_80 and sm_90, fp32 and fp64, at the sizes the
# default ESCN and a three-atom molecule launch (`mlpot bench aot --max-spill-bytes 0`; the dropped
# (64, 32, 32) x 4-warp GEMM and the (32, 32, 32) / (32, 64, 32) weight-gradient tiles spilled on sm_80 or sm_90;
# the weight gradient on tf32x3: (64, 32, 32) spilled 168 B on sm_90 in fp32, (32, 32, 32) 4 B on sm_80 in fp64)
_GEMM_CFG = [({"BLOCK_E": 32, "BLOCK_N": 32, "BLOCK_K": 32}, 4, 2),
             ({"BLOCK_E": 64, "BLOCK_N": 64, "BLOCK_K": 32}, 8, 3), ({"BLOCK_E": 128, "BLOCK_N": 32, "BLOCK_K": 16}, 8, 3)]
_WGRAD_CFG = [({"BLOCK_E": 16, "BLOCK_K": 32, "BLOCK_N": 32}, 4, 2)]
# autotune key: E_BUCKET (the edge count's power-of-two bucket), not E, so that MD steps, whose
# edge counts change by a few edges, reuse the tuned config instead of re-tuning
_GEMM = LazyKernel(_so2_linear_gemm_kernel, _GEMM_CFG, key=["E_BUCKET", "stride_a", "stride_o"])
_WGRAD = LazyKernel(_so2_linear_wgrad_kernel, _WGRAD_CFG, key=["E_BUCKET", "stride_x", "stride_g", "numel"])

#: edges per program of the weight gradient (the partial sums are added in torch)
_E_CHUNK = 2048


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


class SO2LinearTable:
    """The halves and weight blocks of ``SO2Linear(lmax, mmax, channels_in, channels_out)``.

    Built from :func:`mlpot.o3.so2.edge_frame_index` (the one definition of the m-major layout).
    Per block: ``(m, start, n)``, its offset in the flat weights and ``1`` or ``2`` halves.
    """

    def __init__(self, lmax: int, mmax: int, channels_in: int, channels_out: int):
        from mlpot.o3.so2 import edge_frame_index

        rows, _, self.blocks = edge_frame_index(int(lmax), int(mmax))
        self.K = len(rows)
        self.CI, self.CO = int(channels_in), int(channels_out)
        self.block_numel = [n * self.CI * n * self.CO for _, _, n in self.blocks]
        self.weight_numel = sum(self.block_numel)
        self._cache: dict = {}

    def halves(self):
        """``[(start_row, n, block)]``: every contiguous half in row order."""
        out = []
        for b, (m, start, n) in enumerate(self.blocks):
            for h in range(1 if m == 0 else 2):
                out.append((start + h * n, n, b))
        return out

    def get(self, what: str, device):
        """int64 tensors for the ``forward`` / ``transpose`` GEMM or the ``wgrad`` kernel."""
        key = (what, str(device))
        if key not in self._cache:
            w_off = [0]
            for numel in self.block_numel[:-1]:
                w_off.append(w_off[-1] + numel)
            if what == "wgrad":
                cols = [(start * self.CI, start * self.CO, n * self.CI, n * self.CO, w_off[b], 1 if m == 0 else 2)
                        for b, (m, start, n) in enumerate(self.blocks)]
            else:
                ci, co = (self.CO, self.CI) if what == "transpose" else (self.CI, self.CO)
                cols = [(r * ci, r * co, n * ci, n * co, w_off[b]) for r, n, b in self.halves()]
            self._cache[key] = tuple(torch.tensor(c, dtype=torch.int64, device=device) for c in zip(*cols))
        return self._cache[key]


def _gemm(table: SO2LinearTable, A: torch.Tensor, W: torch.Tensor, transpose: bool) -> torch.Tensor:
    """``F(A, W)`` (``transpose=False``, A has ``C_in`` channels) or ``G(A, W)`` (``C_out`` channels)."""
    E = A.shape[0]
    c_in, c_out = (table.CO, table.CI) if transpose else (table.CI, table.CO)
    out = torch.empty(E, table.K, c_out, device=A.device, dtype=A.dtype)
    if E == 0 or c_out == 0:
        return out.zero_()
    a_off, o_off, k, n, w_off = table.get("transpose" if transpose else "forward", A.device)
    max_n = max(nb for _, nb, _ in table.halves()) * c_out
    grid = lambda meta: (_cdiv(E, meta["BLOCK_E"]), len(table.halves()), _cdiv(max_n, meta["BLOCK_N"]))
    _GEMM[grid](A, W, out, a_off, o_off, k, n, w_off, E, table.K * c_in, table.K * c_out, edge_bucket(E), TRANS_W=transpose,
                DOT_PRECISION=dot_precision(A.dtype))
    return out


def _wgrad(table: SO2LinearTable, X: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """``H(X, G)``: the flat weight gradient ``(weight_numel,)``."""
    E = X.shape[0]
    chunks = max(1, _cdiv(E, _E_CHUNK))
    out = torch.zeros(chunks, table.weight_numel, device=X.device, dtype=X.dtype)
    if E == 0:
        return out.sum(0)
    x_off, g_off, k, n, w_off, halves = table.get("wgrad", X.device)
    max_k = max(nb for _, _, nb in table.blocks) * table.CI
    max_n = max(nb for _, _, nb in table.blocks) * table.CO

    def grid(meta):
        tiles = _cdiv(max_k, meta["BLOCK_K"]) * _cdiv(max_n, meta["BLOCK_N"])
        return (len(table.blocks), tiles, chunks)

    _WGRAD[grid](X, G, out, x_off, g_off, k, n, w_off, halves, E, _E_CHUNK,
                 table.K * table.CI, table.K * table.CO, table.weight_numel, max_n, edge_bucket(E),
                 DOT_PRECISION=dot_precision(X.dtype))
    return out.sum(0)


_ROLES = ("x", "y", "w")


def _launch(role: str, table: SO2LinearTable, X, Y, W) -> torch.Tensor:
    if role == "y":
        return _gemm(table, X, W, transpose=False)
    if role == "x":
        return _gemm(table, Y, W, transpose=True)
    return _wgrad(table, X, Y)


class _SO2LinearForm(torch.autograd.Function):
    """``d<Y, F(X, W)>/d(role)`` (module doc); the operand ``role`` is passed as None.

    ``role = "y"`` is the forward ``F(X, W)``, ``"x"`` the input gradient ``G(Y, W)``, ``"w"`` the
    weight gradient ``H(X, Y)``. The derivative of one of them, contracted with ``grad``, with
    respect to another operand is the form's derivative with ``grad`` in place of ``role``.
    """

    @staticmethod
    def forward(ctx, role, table, X, Y, W):
        ops = {k: (v.contiguous() if v is not None else None) for k, v in zip(_ROLES, (X, Y, W))}
        out = _launch(role, table, ops["x"], ops["y"], ops["w"])
        ctx.role, ctx.table = role, table
        ctx.save_for_backward(ops["x"], ops["y"], ops["w"])
        return out

    @staticmethod
    def backward(ctx, grad):
        grads = multilinear_form_backward(
            _ROLES, ctx.role, ctx.saved_tensors, grad, ctx.needs_input_grad[2:],
            lambda k, *ops: _SO2LinearForm.apply(k, ctx.table, *ops))
        return (None, None, *grads)


def flat_weights(weights, table: SO2LinearTable) -> torch.Tensor:
    """The blocks' matrices ``[W_m (n C_in, n C_out)]`` flattened and concatenated in block order."""
    if len(weights) != len(table.blocks):
        raise ValueError(f"expected {len(table.blocks)} weight blocks, got {len(weights)}")
    for w, (_, _, n) in zip(weights, table.blocks):
        if tuple(w.shape) != (n * table.CI, n * table.CO):
            raise ValueError(f"weight block {tuple(w.shape)} != {(n * table.CI, n * table.CO)}")
    return torch.cat([w.reshape(-1) for w in weights])


def so2_linear(x: torch.Tensor, weights, table: SO2LinearTable) -> torch.Tensor:
    """``x (E, K, C_in)`` m-major edge-frame features, ``weights`` the per-block matrices -> ``(E, K, C_out)``.

    Differentiable to any order with respect to ``x`` and the weights, on the kernels.
    """
    w = flat_weights(weights, table)
    check_device(x, w)
    if x.dtype != w.dtype:
        raise TypeError(f"dtype mismatch: x {x.dtype}, weights {w.dtype}")
    if x.dim() != 3 or x.shape[1:] != (table.K, table.CI):
        raise ValueError(f"x {tuple(x.shape)} does not match (E, {table.K}, {table.CI})")
    return _SO2LinearForm.apply("y", table, x, None, w)


def reference_so2_linear(x: torch.Tensor, weights, table: SO2LinearTable) -> torch.Tensor:
    """The kernel's reference: :func:`mlpot.o3.so2.so2_linear`."""
    from mlpot.o3.so2 import so2_linear as reference

    return reference(x, list(weights), table.blocks)


__all__ = ["SO2LinearTable", "flat_weights", "reference_so2_linear", "so2_linear"]
