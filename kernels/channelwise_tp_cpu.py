r"""Channelwise (uvu) message passing at inference on the CPU (backend ``cpu``): the kernels of ``cpu_kernels.c``.

Math (:mod:`mlpot.o3.tensor_product`): with the per-edge matrices :math:`M_e = Y_e C` of every
path (one torch ``mm``),

.. math::  m_{n, k, u} = \sum_{e:\, r(e) = n} \sum_a M^{(p)}_{e, k a}\, x_{s(e), a, u}\, w_{e, p, u}.

The kernels walk the edges in their own order, one vector of channels per operation: the
forward adds each edge's product into its receiver's rows; the backward reads the receiver's
upstream rows once per edge and gives :math:`\partial x` (added to the sender's rows),
:math:`\partial w` and :math:`\partial M` (summed over the channels), from which torch's ``mm``
gives :math:`\partial Y = \partial M\, C^T`. Nothing per edge and channel is written but
:math:`\partial w`, which is an output. The torch path (backend ``reference``) groups the edges
by receiver into padded batched products (:mod:`mlpot.o3.grouped_message_passing`); on a small
structure those are many small operations.

Threads: the edges are cut into equal ranges, one per thread, each with its own scatter target
(the output in the forward, :math:`\partial x` in the backward), summed afterwards.

A backward that builds a graph (second derivatives) recomputes the edge products in torch
(:func:`mlpot.o3.tensor_product._edge_products`) and differentiates them with the graph kept.

Channels are padded to the kernels' vector width when they are not a multiple of it (a copy of
``x`` and ``w``; MACE's channel counts are multiples of 16).
"""
from __future__ import annotations

import ctypes
import functools

import torch

from .cpu import LANES, kernel, padded_channels, ptr, run_parts, thread_count

__all__ = ["message_passing_cpu"]


def _path_table(plan) -> torch.Tensor:
    cached = getattr(plan, "_cpu_paths", None)
    if cached is None:
        cached = torch.tensor([list(p) for p in plan.paths], dtype=torch.int32).reshape(-1).contiguous()
        plan._cpu_paths = cached
    return cached


def _edge_ranges(E: int, ldc: int, entries: int) -> list[tuple[int, int]]:
    """The edges cut into one equal range per thread (:func:`mlpot.kernels.cpu.thread_count` of
    the call's vector operations: edges x matrix entries x channel blocks)."""
    threads = thread_count(E * entries * (ldc // LANES), max(1, E))
    return [(E * t // threads, E * (t + 1) // threads) for t in range(threads)]


def _common(plan, x, M, w, sender, receiver):
    i64 = ctypes.c_int64
    N, Atot, ldc = x.shape
    return [i64(ldc), i64(Atot), i64(plan.K), i64(w.shape[1]), i64(M.shape[1]), ptr(x), ptr(M), ptr(w),
            ptr(sender), ptr(receiver), i64(len(plan.paths)), ptr(_path_table(plan))]


class _ChannelwiseCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, M, w, plan, sender, receiver, num_nodes: int):
        ctx.save_for_backward(x, M, w, sender, receiver)
        ctx.plan, ctx.num_nodes = plan, num_nodes
        ldc, E = x.shape[2], M.shape[0]
        ranges = _edge_ranges(E, ldc, M.shape[1])
        outs = [x.new_zeros(num_nodes, plan.K, ldc) for _ in ranges]
        fn, head = kernel("cw_forward", x.dtype), _common(plan, x, M, w, sender, receiver)
        i64 = ctypes.c_int64
        run_parts([functools.partial(fn, *head, ptr(o), i64(a), i64(b)) for o, (a, b) in zip(outs, ranges)])
        return outs[0] if len(outs) == 1 else torch.stack(outs).sum(0)

    @staticmethod
    def backward(ctx, g):
        x, M, w, sender, receiver = ctx.saved_tensors
        plan = ctx.plan
        need_x, need_M, need_w = ctx.needs_input_grad[:3]
        g = g.contiguous()
        if torch.is_grad_enabled():  # a graph through the backward: torch's edge products
            from mlpot.o3.tensor_product import _edge_products

            with torch.enable_grad():  # on the saved inputs themselves: the result stays a function of them
                t = _edge_products(plan, M, x.index_select(0, sender), w, inplace=False)
                out = x.new_zeros(ctx.num_nodes, plan.K, x.shape[2]).index_add(0, receiver, t)
            wanted = [t for t, need in zip((x, M, w), (need_x, need_M, need_w)) if need]
            grads = iter(torch.autograd.grad(out, wanted, g, create_graph=True))
            gx, gM, gw = (next(grads) if need else None for need in (need_x, need_M, need_w))
            return gx, gM, gw, None, None, None, None
        ldc, E = x.shape[2], M.shape[0]
        ranges = _edge_ranges(E, ldc, M.shape[1])
        gxs = [torch.zeros_like(x) for _ in ranges] if need_x else [None] * len(ranges)
        gM = torch.empty_like(M) if need_M else None
        gw = torch.empty_like(w) if need_w else None
        fn, head = kernel("cw_backward", x.dtype), _common(plan, x, M, w, sender, receiver)
        i64 = ctypes.c_int64

        def opt(t):
            return ptr(t) if t is not None else ctypes.c_void_p(None)

        run_parts([functools.partial(fn, *head, ptr(g), opt(gx), opt(gM), opt(gw), i64(a), i64(b))
                   for gx, (a, b) in zip(gxs, ranges)])
        gx = None if not need_x else gxs[0] if len(gxs) == 1 else torch.stack(gxs).sum(0)
        return gx, gM, gw, None, None, None, None


def message_passing_cpu(tp, x_cl: torch.Tensor, edge_attrs: torch.Tensor, weights: torch.Tensor, sender, receiver,
                        num_nodes: int) -> torch.Tensor:
    """:meth:`~mlpot.o3.tensor_product.ChannelwiseTensorProduct.message_passing_channel_last` on the CPU
    kernels: ``x_cl (N, A, U)``, ``edge_attrs (E, B)``, ``weights (E, P * U)`` -> ``(num_nodes, K, U)``."""
    if x_cl.device.type != "cpu":
        raise ValueError(f"channelwise message passing (backend cpu): CPU tensors only, got {x_cl.device}")
    E, U = edge_attrs.shape[0], tp.channels
    plan = tp._plan
    w = weights.reshape(E, tp.num_paths, U)
    ldc = padded_channels(U)
    x = x_cl
    if ldc != U:
        x = torch.nn.functional.pad(x, (0, ldc - U))
        w = torch.nn.functional.pad(w, (0, ldc - U))
    M = edge_attrs @ tp._cg_paths(x_cl)  # (E, sum_p d A): the per-edge matrices of every path
    out = _ChannelwiseCPU.apply(x.contiguous(), M.contiguous(), w.contiguous(), plan, sender.contiguous(),
                                receiver.contiguous(), int(num_nodes))
    return out if ldc == U else out[..., :U]
