r"""Message passing of the channelwise (uvu) product with the edges grouped by receiver.

Math
----
The message into node :math:`n` (see :mod:`mlpot.o3.tensor_product`) is, path by path,

.. math::

    m^{(p)}_{n, k, u} = \sum_{e:\, r(e) = n} \sum_a M^{(p)}_{e, k a}\, z^{(p)}_{e, a u},
    \qquad z^{(p)}_{e, a u} = x_{s(e), a, u}\, w_{e, p, u},

with :math:`M^{(p)}_e = \sum_b Y_{e b} C^{(p)}_b` (shape ``(2 l_3 + 1, 2 l_1 + 1)``). Put the
edges of every node in the rows of a padded table, ``slot = n * D + j`` for the ``j``-th edge
into ``n`` (``D`` the largest in-degree; empty slots have :math:`M = 0`). Then the sum over the
edges and over ``a`` is ONE matrix product per node,

.. math::  m^{(p)}_n = \big[M^{(p)}_{e_1} \cdots M^{(p)}_{e_D}\big]\;
           \big[z^{(p)}_{e_1}; \cdots; z^{(p)}_{e_D}\big]
           \quad ((2l_3+1) \times D(2l_1+1)) \cdot (D(2l_1+1) \times U),

a batched matmul over nodes. Compared with the edge order (one ``(2l_3+1) x (2l_1+1)`` matmul per
edge, then a scatter of ``(E, K, U)`` messages) it never forms the per-edge messages, has no
scatter at the receivers, and its matmuls are ``D`` times longer. The backward is the same
products transposed: :math:`\partial z = M^T g`, :math:`\partial M = g z^T`, with
:math:`\partial x` scattered to the senders, :math:`\partial w_p = \sum_a \partial z \odot x`,
:math:`\partial Y = \partial M\, C^T`. The order of the floating-point sums differs from the
edge order (results agree to rounding, ~1e-15 relative in float64).

It pays when the in-degrees are similar (crystals, molecules within the cutoff); with very uneven
degrees the padding costs more than it saves, and :func:`worth_grouping` says so.

Used by :meth:`mlpot.o3.tensor_product.ChannelwiseTensorProduct.message_passing_channel_last`.
Like the edge-order function there, the node chunks are recomputed in the backward, only the
gradients the running ``backward``/``grad`` call uses are computed, and when a graph is being
built (training on forces) the backward uses only differentiable operations.
"""
from __future__ import annotations

import torch

from mlpot.o3.grad_needs import needed

__all__ = ["ReceiverGroups", "GroupedMessagePassing", "split_input_grad", "worth_grouping"]

#: padded slots per node chunk (bounds the ``(slots, A, U)`` intermediates)
SLOTS_PER_CHUNK = 2048


class ReceiverGroups:
    """The padded edge table: ``slot_edge[n * D + j]`` is the ``j``-th edge into node ``n``.

    ``D``: the largest in-degree; ``edge_slot (E,)``: the slot of every edge; ``slot_edge``
    (``N * D``,): the edge in every slot (edge 0 in an empty one); ``slot_sender``: its sender;
    ``mask (N * D, 1)``: 1 in a filled slot, 0 in an empty one (float, ``dtype``).
    """

    def __init__(self, sender: torch.Tensor, receiver: torch.Tensor, num_nodes: int, dtype: torch.dtype):
        E = receiver.shape[0]
        dev = receiver.device
        counts = torch.bincount(receiver, minlength=num_nodes)
        self.num_nodes = int(num_nodes)
        self.D = int(counts.max()) if E else 0
        order = torch.argsort(receiver, stable=True)
        start = torch.cumsum(counts, 0) - counts
        rs = receiver.index_select(0, order)
        slot_sorted = rs * self.D + (torch.arange(E, device=dev) - start.index_select(0, rs))
        self.edge_slot = torch.empty_like(order)
        self.edge_slot[order] = slot_sorted
        slot_edge = torch.full((self.num_nodes * self.D,), -1, dtype=torch.long, device=dev)
        slot_edge[self.edge_slot] = torch.arange(E, device=dev)
        self.mask = (slot_edge >= 0).to(dtype).unsqueeze(1)
        self.slot_edge = slot_edge.clamp(min=0)
        self.slot_sender = sender.index_select(0, self.slot_edge) if E else self.slot_edge

    def chunks(self):
        """Node ranges ``(n0, n1)`` with about :data:`SLOTS_PER_CHUNK` slots each."""
        step = max(1, SLOTS_PER_CHUNK // max(self.D, 1))
        return [(n0, min(n0 + step, self.num_nodes)) for n0 in range(0, self.num_nodes, step)]


def worth_grouping(receiver: torch.Tensor, num_nodes: int, max_padding: float = 1.5) -> bool:
    """True when the padded table has at most ``max_padding`` slots per edge."""
    E = receiver.shape[0]
    if E == 0 or num_nodes == 0:
        return False
    D = int(torch.bincount(receiver, minlength=num_nodes).max())
    return num_nodes * D <= max_padding * E


def split_input_grad(gz, xsp, wp, a0, need_w, need_x, inplace, gw_out, gxs, gw_cols, gx_rows) -> None:
    r"""From :math:`\partial z^{(p)} = \partial(x \odot w_p)` ``(c, A, U)``: :math:`\partial w_p = \sum_a
    \partial z \odot x` (into ``gw_out`` in place, else appended to ``gw_cols``) and the sender-row
    part :math:`\partial z \odot w_p` (added to ``gxs[:, a0:a0+A]`` in place, else to ``gx_rows[a0]``)."""
    if need_w:
        if inplace:
            torch.sum(gz * xsp, 1, out=gw_out)
        else:
            gw_cols.append((gz * xsp).sum(1))
    if need_x:
        if inplace:
            gxs[:, a0 : a0 + xsp.shape[1]].addcmul_(gz, wp)
        else:
            gx_rows.setdefault(a0, []).append(gz * wp)


def join_input_grad(plan, gx_rows: dict, like: torch.Tensor, rows: int, U: int) -> torch.Tensor:
    """The input gradient ``(rows, A_total, U)``: the per-path terms summed per input block ``a0``,
    zeros for a block no path reads, the blocks in input order."""
    blocks = []
    for a0, A in sorted({(a0, A) for _, _, _, a0, A, _ in plan.paths}):
        terms = gx_rows.get(a0)
        blocks.append(sum(terms) if terms else like.new_zeros(rows, A, U))
    return torch.cat(blocks, dim=1)


def _node_matrices(Ma: torch.Tensor, c: int, D: int, d: int, A: int, off: int) -> torch.Tensor:
    """``(c, d, D * A)``: the ``M^{(p)}`` of a node's ``D`` slots side by side."""
    return Ma[:, off : off + d * A].reshape(c, D, d, A).transpose(1, 2).reshape(c, d, D * A)


def _chunk_inputs(groups: ReceiverGroups, x, Y, w, C, n0: int, n1: int):
    sl = slice(n0 * groups.D, n1 * groups.D)
    e = groups.slot_edge[sl]
    Ma = (Y.index_select(0, e) * groups.mask[sl]) @ C  # empty slots: M = 0
    return Ma, x.index_select(0, groups.slot_sender[sl]), w.index_select(0, e)


def grouped_forward(plan, groups: ReceiverGroups, x, Y, w, C, inplace: bool) -> torch.Tensor:
    """``x (N, A, U)``, ``Y (E, B)``, ``w (E, P, U)`` -> ``(num_nodes, K, U)``."""
    D, U = groups.D, x.shape[-1]
    out = x.new_empty(groups.num_nodes, plan.K, U) if inplace else None
    rows = []
    for n0, n1 in groups.chunks():
        c = n1 - n0
        Ma, xs, wc = _chunk_inputs(groups, x, Y, w, C, n0, n1)
        parts = []
        for p, k0, d, a0, A, off in plan.paths:
            z = (xs[:, a0 : a0 + A] * wc[:, p : p + 1]).reshape(c, D * A, U)
            m = torch.bmm(_node_matrices(Ma, c, D, d, A, off), z)
            if inplace:
                out[n0:n1, k0 : k0 + d] = m
            else:
                parts.append(m)
        if not inplace:
            rows.append(torch.cat(parts, dim=1))  # plan.paths are in output order
    if inplace:
        return out
    return torch.cat(rows) if rows else x.new_zeros(groups.num_nodes, plan.K, U)


def grouped_backward(plan, groups: ReceiverGroups, g, x, Y, w, C, need_x, need_Y, need_w, inplace: bool):
    """Gradients ``(gx, gY, gw)`` (None where not needed) of :func:`grouped_forward` for ``g (N, K, U)``."""
    D, U, S = groups.D, x.shape[-1], groups.num_nodes * groups.D
    P = w.shape[1]
    gx = torch.zeros_like(x) if need_x else None
    gw_slots = (x.new_empty(S, P, U) if inplace else []) if need_w else None
    gM_slots = (x.new_empty(S, C.shape[1]) if inplace else []) if need_Y else None
    for n0, n1 in groups.chunks():
        c, sl = n1 - n0, slice(n0 * D, n1 * D)
        Ma, xs, wc = _chunk_inputs(groups, x, Y, w, C, n0, n1)
        gc = g[n0:n1]
        gxs = torch.zeros_like(xs) if (need_x and inplace) else None
        gx_rows, gw_cols, gM_cols = {}, [], []
        for p, k0, d, a0, A, off in plan.paths:
            Mn = _node_matrices(Ma, c, D, d, A, off)
            gp = gc[:, k0 : k0 + d]
            xsp, wp = xs[:, a0 : a0 + A], wc[:, p : p + 1]
            if need_x or need_w:
                gz = torch.bmm(Mn.transpose(1, 2), gp).reshape(c * D, A, U)  # empty slots: 0
                gw_out = gw_slots[sl, p] if (need_w and inplace) else None
                split_input_grad(gz, xsp, wp, a0, need_w, need_x, inplace, gw_out, gxs, gw_cols, gx_rows)
            if need_Y:
                z = (xsp * wp).reshape(c, D * A, U)
                gMn = torch.bmm(gp, z.transpose(1, 2))  # (c, d, D * A)
                gMs = gMn.reshape(c, d, D, A).transpose(1, 2).reshape(c * D, d * A)
                if inplace:
                    gM_slots[sl, off : off + d * A] = gMs
                else:
                    gM_cols.append(gMs)
        if need_w and not inplace:
            gw_slots.append(torch.stack(gw_cols, dim=1))
        if need_Y and not inplace:
            gM_slots.append(torch.cat(gM_cols, dim=1))
        if need_x:
            if not inplace:
                gxs = join_input_grad(plan, gx_rows, xs, c * D, U)
                gx = gx.index_add(0, groups.slot_sender[sl], gxs)
            else:
                gx.index_add_(0, groups.slot_sender[sl], gxs)
    gY = gw = None
    if need_w:
        if not inplace:
            gw_slots = torch.cat(gw_slots)
        gw = gw_slots.index_select(0, groups.edge_slot)
    if need_Y:
        if not inplace:
            gM_slots = torch.cat(gM_slots)
        gY = gM_slots.index_select(0, groups.edge_slot) @ C.transpose(0, 1)
    return gx, gY, gw


class GroupedMessagePassing(torch.autograd.Function):
    """:func:`grouped_forward` with the hand-written, recomputing :func:`grouped_backward`."""

    @staticmethod
    def forward(ctx, x, Y, w, C, plan, groups, nodes):
        ctx.save_for_backward(x, Y, w, C)
        ctx.plan, ctx.groups, ctx.nodes = plan, groups, nodes
        return grouped_forward(plan, groups, x, Y, w, C, inplace=True)

    @staticmethod
    def backward(ctx, grad_out):
        x, Y, w, C = ctx.saved_tensors
        need_x, need_Y, need_w = (needed(f, n) for f, n in zip(ctx.needs_input_grad[:3], ctx.nodes))
        if ctx.needs_input_grad[3]:
            raise RuntimeError("ChannelwiseTensorProduct: no gradient w.r.t. the CG coefficients")
        gx, gY, gw = grouped_backward(
            ctx.plan, ctx.groups, grad_out, x, Y, w, C, need_x, need_Y, need_w, inplace=not torch.is_grad_enabled()
        )
        return gx, gY, gw, None, None, None, None
