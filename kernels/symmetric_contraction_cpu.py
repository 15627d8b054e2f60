r"""Symmetric contraction at inference on the CPU (backend ``cpu``): the compiled kernels of ``cpu_kernels.c``.

Math. With constant weights the contraction of every node is a polynomial in the ``D`` components
of its features, per channel (:class:`mlpot.o3.symmetric_contraction._JacobianPlan`): on the
monomials :math:`m_q` of degrees ``0 .. correlation - 1``,

.. math::  B_k = \sum_e F_{s, e, c}\, m_{q_e}\, x_{i_e}, \qquad
           \partial L / \partial x_i = \sum_{e:\, i_e = i} J_{s, e, c}\, m_{q_e}\, g_{k_e},

``e`` running over the structurally nonzero entries ``(k, i, q)`` of the plan's forward and
Jacobian tables (4 % of the dense ones for MACE's ``0e + 1o`` output at correlation 3), ``s`` the
node's species. The torch path (backend ``reference``) runs the same tables as batched products
of padded blocks, which on a small structure are many tiny matrices; the kernels instead walk the
entries once per node with one vector of channels per operation, build the monomials in
registers and cache, and never write them to memory. The backward recomputes the monomials; only
the features are kept.

Layout: channel-last ``(N, D, C')`` features, ``(N, K, C')`` output, ``(S', E, C')`` tables,
``C'`` the channels padded to the kernels' vector width (:func:`mlpot.kernels.cpu.padded_channels`),
``S'`` the species present in the call (tables cached per species set in eval mode). The module's
``(N, C, D)`` input and e3nn-layout output are converted at the boundary (one pad-transpose, one
gather).

A backward that builds a graph (second derivatives: Hessians, force training) runs the same sums
in torch (:func:`vjp_torch`), differentiable in the features and the upstream gradient.
"""
from __future__ import annotations

import ctypes

import torch

from .cpu import LANES, kernel, padded_channels, ptr, run_channel_blocks

__all__ = ["symmetric_contraction_cpu", "vjp_torch"]

#: nodes per chunk of :func:`vjp_torch` (bounds its ``(nodes, entries, C)`` temporary)
VJP_TORCH_NODES = 16


class _Entries:
    """The structural entries of one plan: monomial build order ``par, last (Q,)`` and, for the
    forward (``"F"``) and the Jacobian (``"J"``), the entries ``k, i, q`` (int32, sorted by
    monomial) with the contributions that fill their values from the folded weights ``T``:
    ``src`` (flat ``k * R + r``), ``dst`` (entry) and ``coef``."""

    def __init__(self, plan):
        D, Q, K = plan.D, plan.Q, plan.K
        R = plan.row_used.shape[1]
        # the kernels keep 1 and x in the first 1 + D rows even at correlation 1 (where Q = 1)
        par = torch.zeros(max(Q, 1 + D), dtype=torch.int32)
        last = torch.zeros(max(Q, 1 + D), dtype=torch.int32)
        q0 = 1 + D
        self.levels = [(p.cpu().long(), l.cpu().long()) for p, l in zip(plan.parents, plan.lasts)]
        for p, l in self.levels:
            par[q0 : q0 + len(p)], last[q0 : q0 + len(p)] = p.int(), l.int()
            q0 += len(p)
        if q0 != len(par):
            raise RuntimeError(f"symmetric contraction plan: {q0} monomials built, {len(par)} expected")
        self.par, self.last = par, last
        used = plan.row_used.cpu()  # (K, R)
        self.tables = {}
        for name, src, dst, coef in (("F", plan.fsrc, plan.fdst, None), ("J", plan.src, plan.dst, plan.coef)):
            src, dst = src.cpu(), dst.cpu()
            coef = torch.ones(len(src), dtype=torch.float64) if coef is None else coef.cpu()
            kk, jj = torch.nonzero(used[:, src], as_tuple=True)  # contribution (k, j)
            pos = kk * (D * Q) + dst[jj]  # (k, i, q) flat
            uniq, entry = torch.unique(pos, return_inverse=True)
            k, rest = uniq // (D * Q), uniq % (D * Q)
            i, q = rest // Q, rest % Q
            order = torch.argsort(q * (K * D) + k * D + i)  # by monomial: independent consecutive updates
            rank = torch.empty_like(order)
            rank[order] = torch.arange(len(order))
            self.tables[name] = {
                "k": k[order].int().contiguous(), "i": i[order].int().contiguous(), "q": q[order].int().contiguous(),
                "src": kk * R + src[jj], "dst": rank[entry], "coef": coef[jj], "n": len(uniq),
            }


def _entries(plan) -> _Entries:
    """:class:`_Entries` of ``plan``, built once (a plan is rebuilt whenever its couplings change)."""
    if getattr(plan, "_cpu_entries", None) is None:
        plan._cpu_entries = _Entries(plan)
    return plan._cpu_entries


def _tables(ent: _Entries, T: torch.Tensor, species: list[int], ldc: int) -> dict[str, torch.Tensor]:
    """``(S', E, ldc)`` value tables of the species ``species`` from ``T (S, C, K, R)``."""
    S, C, K, R = T.shape
    Ts = T[species].reshape(len(species), C, K * R)
    out = {}
    for name, t in ent.tables.items():
        vals = Ts.index_select(2, t["src"]) * t["coef"].to(T.dtype)
        tab = Ts.new_zeros(len(species), C, t["n"]).index_add_(2, t["dst"], vals)
        out[name] = torch.nn.functional.pad(tab.transpose(1, 2), (0, ldc - C)).contiguous()
    return out


def _call(kind, x_t, species, ent, tab, K, extra_in, out):
    """One kernel call over all nodes (channel blocks split over threads when large)."""
    N, D, ldc = x_t.shape
    t = ent.tables["F" if kind == "forward" else "J"]
    fn = kernel(f"sc_{kind}", x_t.dtype)
    i64 = ctypes.c_int64
    args = [i64(N), i64(ldc), i64(D), i64(len(ent.par)), i64(K), ptr(x_t), ptr(species), ptr(ent.par),
            ptr(ent.last), i64(t["n"]), ptr(t["k"]), ptr(t["i"]), ptr(t["q"]), ptr(tab)]
    args += [ptr(a) for a in extra_in] + [ptr(out)]
    if N:
        run_channel_blocks(lambda c0, c1: fn(*args, i64(c0), i64(c1)), ldc, N * t["n"] * (ldc // LANES))
    return out


def monomials_torch(x_t: torch.Tensor, ent: _Entries) -> torch.Tensor:
    """``(n, Q, C')`` monomials of ``x_t (n, D, C')`` (differentiable), as the kernels build them."""
    m = torch.cat([x_t.new_ones(x_t.shape[0], 1, x_t.shape[2]), x_t], dim=1)
    for par, last in ent.levels:  # each degree from the rows below it
        m = torch.cat([m, m.index_select(1, par) * m.index_select(1, last)], dim=1)
    return m


def vjp_torch(x_t, g, species, ent: _Entries, J: torch.Tensor) -> torch.Tensor:
    r""":math:`\partial L/\partial x` of the kernels' layout in torch, differentiable in ``x_t``
    and ``g`` (the backward of a backward that builds a graph); chunks of :data:`VJP_TORCH_NODES`."""
    N, D, C = x_t.shape
    t = ent.tables["J"]
    k, i, q = t["k"].long(), t["i"].long(), t["q"].long()
    parts = []
    for n0 in range(0, N, VJP_TORCH_NODES):
        sl = slice(n0, min(N, n0 + VJP_TORCH_NODES))
        m = monomials_torch(x_t[sl], ent)
        terms = J.index_select(0, species[sl]) * m.index_select(1, q) * g[sl].index_select(1, k)
        parts.append(x_t.new_zeros(terms.shape[0], D, C).index_add(1, i, terms))
    return torch.cat(parts) if parts else torch.zeros_like(x_t)


class _SymmetricContractionCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_t, species, ent, tables, K):
        ctx.save_for_backward(x_t, species)
        ctx.ent, ctx.tables = ent, tables
        out = x_t.new_empty(x_t.shape[0], K, x_t.shape[2])
        return _call("forward", x_t, species, ent, tables["F"], K, [], out)

    @staticmethod
    def backward(ctx, g):
        x_t, species = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        g = g.contiguous()
        if torch.is_grad_enabled():  # a graph through the backward: the same sums, differentiable
            return vjp_torch(x_t, g, species, ctx.ent, ctx.tables["J"]), None, None, None, None
        gx = torch.empty_like(x_t)
        return _call("vjp", x_t, species, ctx.ent, ctx.tables["J"], g.shape[1], [g], gx), None, None, None, None


def _species_tables(module, T, species: tuple, ldc: int) -> dict:
    def build():
        return _tables(_entries(module._jacobian), T, list(species), ldc)

    from mlpot.nn.cache import cached_on_weights

    # the weights are constants here (no gradient): cached, rebuilt after any change to them
    tables = cached_on_weights(module, "_cpu_tables", lambda dtype, device: {}, T.dtype, T.device)
    if (species, ldc) not in tables:
        with torch.no_grad():
            tables[(species, ldc)] = build()
    return tables[(species, ldc)]


def symmetric_contraction_cpu(module, node_feats: torch.Tensor, node_attrs: torch.Tensor) -> torch.Tensor:
    """:class:`~mlpot.o3.symmetric_contraction.SymmetricContraction`'s forward on the CPU kernels:
    ``node_feats (N, C, D)``, ``node_attrs (N, S)`` one-hot -> ``(N, irreps_out.dim)`` (e3nn layout).
    The weights must be constants (no gradient with respect to them)."""
    if node_feats.device.type != "cpu":
        raise ValueError(f"symmetric contraction (backend cpu): CPU tensors only, got {node_feats.device}")
    N, C, D = node_feats.shape
    T = module._folded_weights(node_feats.dtype, node_feats.device)
    if T.requires_grad:
        raise ValueError("symmetric contraction (backend cpu): the weights need a gradient; use backend reference")
    K = T.shape[2]
    ldc = padded_channels(C)
    sp = node_attrs.argmax(dim=-1)
    present = torch.unique(sp).tolist() if N else []
    local = sp
    if present != list(range(len(present))):
        lut = torch.zeros(module.num_elements, dtype=torch.long)
        lut[present] = torch.arange(len(present))
        local = lut[sp]
    tables = _species_tables(module, T, tuple(present), ldc)
    x_t = torch.nn.functional.pad(node_feats.transpose(1, 2), (0, ldc - C)).contiguous()
    out = _SymmetricContractionCPU.apply(x_t, local.contiguous(), _entries(module._jacobian), tables, K)
    return out.reshape(N, K * ldc).index_select(1, _output_columns(module, C, K, ldc))


def _output_columns(module, C: int, K: int, ldc: int) -> torch.Tensor:
    """Columns of the ``(N, K * ldc)`` kernel output in e3nn's order: the module's own output
    permutation of its ``(N, C, K)`` layout (column ``c * K + k``), read as ``k * ldc + c``."""
    perm = module._output_perm(C, K, "cpu")
    return (perm % K) * ldc + perm // K
