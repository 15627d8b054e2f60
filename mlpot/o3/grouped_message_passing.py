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

.. math::  m^{(p)}_n = \big[M^{(p)}_{\cdot, 1} \cdots M^{(p)}_{\cdot, 2l_1+1}\big]\;
           \big[z^{(p)}_{\cdot, 1}; \cdots; z^{(p)}_{\cdot, 2l_1+1}\big]
           \quad ((2l_3+1) \times (2l_1+1)D) \cdot ((2l_1+1)D \times U),

a batched matmul over nodes, where :math:`M^{(p)}_{\cdot, a}` is the ``(2l_3+1) x D`` matrix of
column ``a`` of the node's ``D`` slots and :math:`z^{(p)}_{\cdot, a}` the ``D x U`` rows of
component ``a``. Compared with the edge order (one ``(2l_3+1) x (2l_1+1)`` matmul per edge, then
a scatter of ``(E, K, U)`` messages) it never forms the per-edge messages, has no scatter at the
receivers, and its matmuls are ``D`` times longer. The backward is the same products
transposed: :math:`\partial z = M^T g`, :math:`\partial M = g z^T`, with :math:`\partial x`
scattered to the senders, :math:`\partial w_p = \sum_a \partial z \odot x`,
:math:`\partial Y = \partial M\, C^T`. The order of the floating-point sums differs from the
edge order (results agree to rounding, ~1e-15 relative in float64).

Layout
------
The contraction index of a node's matmul is ordered ``(a, j)`` (component-major), so that every
operand is a view of one per-chunk tensor, with no per-path copies:

* the gathered sender features ``xs (c, A, D, U)`` (one ``index_select`` of the component-major
  rows of ``x``, :meth:`ReceiverGroups.sender_rows`); ``z^{(p)}`` is ``xs[:, a0:a0+A] * w_p``;
* the node matrices ``T (c, sum_p d A, D)``, ``T[n, (k, a), j] = M^{(p)}_{nD+j, k a}`` (one
  ``mm`` with ``C`` and a transpose); path ``p`` is the slab ``T[:, off:off+dA]`` read as
  ``(c, d, A D)``;
* ``w`` in slot order ``(c, D, P, U)``; path ``p`` is ``[:, :, p]``.

When the slot table is the identity (no padding and the edges sorted by receiver, e.g. a
crystal whose neighbour list is ordered by receiver), ``Y`` and ``w`` are read and ``gY``,
``gw`` written in place, without the gathers into slot order and back
(:attr:`ReceiverGroups.identity`).

It pays when the in-degrees are similar (crystals, molecules within the cutoff); with very uneven
degrees the padding costs more than it saves, and :func:`worth_grouping` says so.

Used by :meth:`mlpot.o3.tensor_product.ChannelwiseTensorProduct.message_passing_channel_last`.
Like the edge-order function there, only the gradients the running ``backward``/``grad`` call
uses are computed, and when a graph is being built (training on forces) the backward uses only
differentiable operations and recomputes the node chunks. A backward without a graph (forces
at inference) reuses the forward's chunks and per-path products when they are small
(:attr:`GroupedMessagePassing.keep_bytes`).
"""
from __future__ import annotations

import torch

from mlpot.o3.grad_needs import needed

__all__ = ["ReceiverGroups", "GroupedMessagePassing", "split_input_grad", "worth_grouping"]

#: padded slots per node chunk (bounds the ``(slots, A, U)`` intermediates; 512 keeps them in
#: the L2/L3 cache: on Si64 faster than 1024 or 2048, 1 thread)
SLOTS_PER_CHUNK = 512


class ReceiverGroups:
    """The padded edge table: ``slot_edge[n * D + j]`` is the ``j``-th edge into node ``n``.

    ``D``: the largest in-degree; ``edge_slot (E,)``: the slot of every edge; ``slot_edge``
    (``N * D``,): the edge in every slot (edge 0 in an empty one); ``slot_sender``: its sender;
    ``mask (N * D, 1)``: 1 in a filled slot, 0 in an empty one (float, ``dtype``); ``padded``:
    whether there are empty slots; ``identity``: slot ``s`` holds edge ``s`` (no padding, edges
    sorted by receiver), so that edge-order tensors are already in slot order.
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
        self.padded = self.num_nodes * self.D > E
        self.identity = not self.padded and bool(torch.equal(self.edge_slot, torch.arange(E, device=dev)))
        self.mask = (slot_edge >= 0).to(dtype).unsqueeze(1)
        self.slot_edge = slot_edge.clamp(min=0)
        self.slot_sender = sender.index_select(0, self.slot_edge) if E else self.slot_edge
        self._sender_rows: dict[int, torch.Tensor] = {}

    def chunks(self):
        """Node ranges ``(n0, n1)`` with about :data:`SLOTS_PER_CHUNK` slots each."""
        step = self._nodes_per_chunk()
        return [(n0, min(n0 + step, self.num_nodes)) for n0 in range(0, self.num_nodes, step)]

    def chunk_slots(self) -> int:
        """The most slots of one chunk of :meth:`chunks`."""
        return min(self._nodes_per_chunk(), self.num_nodes) * self.D

    def _nodes_per_chunk(self) -> int:
        return max(1, SLOTS_PER_CHUNK // max(self.D, 1))

    def sender_rows(self, A: int) -> torch.Tensor:
        """``(N * A * D,)``: for ``(n, a, j)`` (in that order) the row ``a * N + s`` of the
        component-major features ``x.transpose(0, 1).reshape(A * N, U)``, ``s`` the sender in slot
        ``n * D + j`` (cached per ``A``)."""
        rows = self._sender_rows.get(A)
        if rows is None:
            N, D = self.num_nodes, self.D
            a = torch.arange(A, device=self.slot_sender.device).view(1, A, 1) * N
            rows = (self.slot_sender.view(N, 1, D) + a).reshape(-1)
            self._sender_rows[A] = rows
        return rows


def worth_grouping(receiver: torch.Tensor, num_nodes: int, max_padding: float = 1.5) -> bool:
    """True when the padded table has at most ``max_padding`` slots per edge."""
    E = receiver.shape[0]
    if E == 0 or num_nodes == 0:
        return False
    D = int(torch.bincount(receiver, minlength=num_nodes).max())
    return num_nodes * D <= max_padding * E


def split_input_grad(gz, xsp, wp, a0, need_w, need_x, inplace, gw_out, gxs, gw_cols, gx_rows) -> None:
    r"""From :math:`\partial z^{(p)} = \partial(x \odot w_p)` ``(c, A, ...)``: :math:`\partial w_p =
    \sum_a \partial z \odot x` (into ``gw_out`` in place, else appended to ``gw_cols``) and the
    sender-row part :math:`\partial z \odot w_p` (added to ``gxs[:, a0:a0+A]`` in place, else to
    ``gx_rows[a0]``). The component index ``a`` is dim 1; ``wp`` broadcasts over it."""
    if need_w:
        if inplace:  # no (c, A, ...) temporary
            torch.mul(gz[:, 0], xsp[:, 0], out=gw_out)
            for a in range(1, xsp.shape[1]):
                gw_out.addcmul_(gz[:, a], xsp[:, a])
        else:
            gw_cols.append((gz * xsp).sum(1))
    if need_x:
        if inplace:
            gxs[:, a0 : a0 + xsp.shape[1]].addcmul_(gz, wp)
        else:
            gx_rows.setdefault(a0, []).append(gz * wp)


def join_input_grad(plan, gx_rows: dict, like: torch.Tensor, rows: int, *tail: int) -> torch.Tensor:
    """The input gradient ``(rows, A_total, *tail)``: the per-path terms summed per input block
    ``a0``, zeros for a block no path reads, the blocks in input order."""
    blocks = []
    for a0, A in sorted({(a0, A) for _, _, _, a0, A, _ in plan.paths}):
        terms = gx_rows.get(a0)
        blocks.append(sum(terms) if terms else like.new_zeros(rows, A, *tail))
    return torch.cat(blocks, dim=1)


class _Chunk:
    """The operands of the nodes ``n0:n1`` (``c`` nodes, ``c * D`` slots), see the module doc.

    The node matrices ``(c, sum_p d A, D)`` and the weights in slot order ``(c, D, P, U)`` are
    held per path (:meth:`matrices`, :meth:`inputs`), the sender features ``xs (c, A_total, D,
    U)`` (component-major) per input block; ``rows``: the rows of the component-major ``x`` that
    ``xs`` holds (for the scatter of ``gx``). The per-path operands are taken with one
    ``split``/``unbind`` per tensor, not one slice per path: when a graph is built, the backward
    of a slice writes a zero tensor of the whole input, per path."""

    def __init__(self, plan, groups: ReceiverGroups, xt, Y, w, C, n0: int, n1: int):
        self.c, self.D = c, D = n1 - n0, groups.D
        sl = slice(n0 * D, n1 * D)
        Atot, U = xt.shape[0] // groups.num_nodes, xt.shape[1]
        if groups.identity:
            Ys, ws = Y[sl], w[sl]
        else:
            e = groups.slot_edge[sl]
            Ys, ws = Y.index_select(0, e), w.index_select(0, e)
            if groups.padded:
                Ys = Ys * groups.mask[sl]  # empty slots: M = 0
        T = (Ys @ C).view(c, D, C.shape[1]).transpose(1, 2).contiguous()
        self.T = T.split([d * A for _, _, d, _, A, _ in plan.paths], dim=1)  # plan.paths: consecutive columns
        self.rows = groups.sender_rows(Atot)[n0 * Atot * D : n1 * Atot * D]
        self.xs = xt.index_select(0, self.rows).view(c, Atot, D, U)
        cuts = sorted({0, Atot} | {a0 for *_, a0, _, _ in plan.paths} | {a0 + Ab for *_, a0, Ab, _ in plan.paths})
        blocks = self.xs.split([b - a for a, b in zip(cuts, cuts[1:])], dim=1)
        self.x_block = dict(zip(cuts, blocks))
        self.w = ws.view(c, D, ws.shape[1], U).unbind(2)

    def matrices(self, p: int, d: int, A: int) -> torch.Tensor:
        """``(c, d, A * D)``: the node matrices of path ``p`` (a view)."""
        return self.T[p].view(self.c, d, A * self.D)

    def inputs(self, p: int, a0: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(c, A, D, U)`` sender features of the input block at ``a0`` and ``(c, 1, D, U)``
        weights of path ``p`` (views; the weights broadcast over the components)."""
        return self.x_block[a0], self.w[p].unsqueeze(1)


def _component_major(x: torch.Tensor) -> torch.Tensor:
    """``(N, A, U) -> (A * N, U)``: the rows :meth:`ReceiverGroups.sender_rows` indexes."""
    return x.transpose(0, 1).reshape(-1, x.shape[-1])


def grouped_forward(plan, groups: ReceiverGroups, x, Y, w, C, inplace: bool, keep: list | None = None) -> torch.Tensor:
    """``x (N, A, U)``, ``Y (E, B)``, ``w (E, P, U)`` -> ``(num_nodes, K, U)``. ``keep``: if a
    list, receives every chunk and its per-path products ``z`` for the backward."""
    D, U = groups.D, x.shape[-1]
    xt = _component_major(x)
    out = x.new_empty(groups.num_nodes, plan.K, U) if inplace else None
    reuse = inplace and keep is None
    zbuf = x.new_empty(groups.chunk_slots() * max(A for *_, A, _ in plan.paths) * U) if reuse else None
    rows = []
    for n0, n1 in groups.chunks():
        ch = _Chunk(plan, groups, xt, Y, w, C, n0, n1)
        c = ch.c
        parts = []
        zs = []
        if keep is not None:
            keep.append((ch, zs))
        for p, k0, d, a0, A, off in plan.paths:
            xsp, wp = ch.inputs(p, a0)
            z = torch.mul(xsp, wp, out=zbuf[: c * A * D * U].view(c, A, D, U)) if reuse else xsp * wp
            zs.append(z)
            m = torch.bmm(ch.matrices(p, d, A), z.view(c, A * D, U))
            if inplace:
                out[n0:n1, k0 : k0 + d] = m
            else:
                parts.append(m)
        if not inplace:
            rows.append(torch.cat(parts, dim=1))  # plan.paths are in output order
    if inplace:
        return out
    return torch.cat(rows) if rows else x.new_zeros(groups.num_nodes, plan.K, U)


def grouped_backward(plan, groups: ReceiverGroups, g, x, Y, w, C, need_x, need_Y, need_w, inplace: bool,
                     kept: list | None = None):
    """Gradients ``(gx, gY, gw)`` (None where not needed) of :func:`grouped_forward` for ``g (N, K, U)``.
    ``kept``: the forward's chunks and products (no graph through them: only with ``inplace``)."""
    N, D, U, S = groups.num_nodes, groups.D, x.shape[-1], groups.num_nodes * groups.D
    Atot, P = x.shape[1], w.shape[1]
    xt = _component_major(x)
    gxt = torch.zeros_like(xt) if need_x else None  # component-major
    gw_slots = None  # in slot order; the identity table writes gw itself
    if need_w:
        gw_slots = (torch.empty_like(w) if groups.identity else x.new_empty(S, P, U)) if inplace else []
    gT_nodes = (x.new_empty(N, C.shape[1], D) if inplace else []) if need_Y else None
    Amax = max(A for *_, A, _ in plan.paths)
    buf = x.new_empty(2, groups.chunk_slots() * Amax * U) if inplace else None
    for i_chunk, (n0, n1) in enumerate(groups.chunks()):
        ch, zs = kept[i_chunk] if kept is not None else (_Chunk(plan, groups, xt, Y, w, C, n0, n1), None)
        c = ch.c
        gps = g[n0:n1].split([d for _, _, d, *_ in plan.paths], dim=1)  # plan.paths: consecutive rows
        gxs = torch.zeros_like(ch.xs) if (need_x and inplace) else None
        gwn = gw_slots[n0 * D : n1 * D].view(c, D, P, U) if (need_w and inplace) else None
        gT = gT_nodes[n0:n1] if (need_Y and inplace) else None
        gx_rows, gw_cols, gT_rows = {}, [], []
        for i_path, (p, k0, d, a0, A, off) in enumerate(plan.paths):
            Mn, gp = ch.matrices(p, d, A), gps[p]
            xsp, wp = ch.inputs(p, a0)
            if need_x or need_w:
                gz_out = buf[0, : c * A * D * U].view(c, A * D, U) if inplace else None
                gz = torch.bmm(Mn.transpose(1, 2), gp, out=gz_out).view(c, A, D, U)  # empty slots: 0
                gw_out = gwn[:, :, p] if (need_w and inplace) else None
                split_input_grad(gz, xsp, wp, a0, need_w, need_x, inplace, gw_out, gxs, gw_cols, gx_rows)
            if need_Y:
                if inplace:  # the forward's product, or recomputed into the buffer
                    z = zs[i_path] if zs is not None else torch.mul(xsp, wp, out=buf[1, : c * A * D * U].view(c, A, D, U))
                    gT[:, off : off + d * A].view(c, d, A * D).copy_(torch.bmm(gp, z.view(c, A * D, U).transpose(1, 2)))
                else:
                    z = (xsp * wp).view(c, A * D, U)
                    gT_rows.append(torch.bmm(gp, z.transpose(1, 2)).view(c, d * A, D))
        if need_w and not inplace:
            gw_slots.append(torch.stack(gw_cols, dim=2).view(c * D, P, U))
        if need_Y and not inplace:
            gT_nodes.append(torch.cat(gT_rows, dim=1))
        if need_x:
            if not inplace:
                gxs = join_input_grad(plan, gx_rows, ch.xs, c, D, U)
                gxt = gxt.index_add(0, ch.rows, gxs.view(-1, U))
            else:
                gxt.index_add_(0, ch.rows, gxs.view(-1, U))
    gx = gY = gw = None
    if need_x:
        gx = gxt.view(Atot, N, U).transpose(0, 1).contiguous()
    if need_w:
        if not inplace:
            gw_slots = torch.cat(gw_slots)
        gw = gw_slots if groups.identity else gw_slots.index_select(0, groups.edge_slot)
    if need_Y:
        if not inplace:
            gT_nodes = torch.cat(gT_nodes)
        gY_slots = (gT_nodes.transpose(1, 2).reshape(S, C.shape[1])) @ C.transpose(0, 1)
        gY = gY_slots if groups.identity else gY_slots.index_select(0, groups.edge_slot)
    return gx, gY, gw


class GroupedMessagePassing(torch.autograd.Function):
    """:func:`grouped_forward` with the hand-written, recomputing :func:`grouped_backward`."""

    #: keep the forward's chunks and per-path products for a backward without a graph when they
    #: take less than this (bytes)
    keep_bytes = 32 << 20

    @staticmethod
    def forward(ctx, x, Y, w, C, plan, groups, nodes):
        ctx.save_for_backward(x, Y, w, C)
        ctx.plan, ctx.groups, ctx.nodes = plan, groups, nodes
        size = groups.num_nodes * groups.D * x.shape[-1] * x.element_size() * (
            sum(A for *_, A, _ in plan.paths) + 2 * x.shape[1] + w.shape[1])
        ctx.kept = [] if any(ctx.needs_input_grad[:3]) and size <= GroupedMessagePassing.keep_bytes else None
        return grouped_forward(plan, groups, x, Y, w, C, inplace=True, keep=ctx.kept)

    @staticmethod
    def backward(ctx, grad_out):
        x, Y, w, C = ctx.saved_tensors
        need_x, need_Y, need_w = (needed(f, n) for f, n in zip(ctx.needs_input_grad[:3], ctx.nodes))
        if ctx.needs_input_grad[3]:
            raise RuntimeError("ChannelwiseTensorProduct: no gradient w.r.t. the CG coefficients")
        inplace = not torch.is_grad_enabled()
        kept, ctx.kept = ctx.kept, None  # (computed without a graph: not for a differentiable backward)
        gx, gY, gw = grouped_backward(
            ctx.plan, ctx.groups, grad_out, x, Y, w, C, need_x, need_Y, need_w, inplace=inplace,
            kept=kept if inplace else None,
        )
        return gx, gY, gw, None, None, None, None
