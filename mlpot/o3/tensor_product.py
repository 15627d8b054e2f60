r"""Channelwise ("uvu") Clebsch–Gordan tensor product: the message of MACE / NequIP.

Math
----
For sender features :math:`x` with irreps :math:`\bigoplus_i U \times l_{1,i}`, edge spherical
harmonics :math:`Y` (irreps :math:`\bigoplus_j 1 \times l_{2,j}`) and per-edge, per-path,
per-channel weights :math:`w`, every allowed path :math:`p = (i, j) \to l_3` (triangle rule,
parity :math:`p_1 p_2 = p_3`, and :math:`l_3` present in the target irreps) gives one output block

.. math::

    m^{(p)}_{u, k} = \alpha_p\, w_{p, u} \sum_{a, b} C^{l_1 l_2 l_3}_{a b k}\, x_{u, a}\, Y_b ,
    \qquad \alpha_p = \sqrt{(2 l_3 + 1) / \mathrm{fan}(p)} ,

with :math:`C` e3nn's ``wigner_3j`` (Frobenius norm 1), i.e. e3nn's
``irrep_normalization="component"`` and ``path_normalization="element"`` (``fan(p)`` is the
summed multiplicity of the second operand over the paths into the same output block; 1 here).
The channel ``u`` is never mixed ("uvu"): this is what makes the product cheap.

The output irreps, the order of the paths and the flat weight layout ``(E, P * U)`` (path-major,
then channel) are exactly those of mace-torch's ``tp_out_irreps_with_instructions`` +
``e3nn.o3.TensorProduct(..., shared_weights=False, internal_weights=False)``, so the radial MLP of
an imported mace-torch model feeds this module unchanged.

Algorithm (reference backend, pure torch)
-----------------------------------------
Inside, features are channel-last, ``(..., D, U)`` with ``D = sum (2l+1)`` (the layout of the
Triton kernels; converted at the module boundary). The CG blocks of all paths, with
:math:`\alpha_p` folded in, are stacked into one matrix, so one matmul ``Y @ C`` gives every
edge's small per-path matrices :math:`M^{(p)}_e = \sum_b Y_{e b} C^{(p)}_{b}` of shape
``(2 l_3 + 1, 2 l_1 + 1)``. Per path, the weights are applied to the (few) input rows first
and one small batched matmul produces the output rows,

.. math::  m^{(p)}_{e} = M^{(p)}_e \,\big(x_{s(e), l_1} \odot w_{e, p}\big),

(a broadcast product when :math:`l_1 = 0`) — no per-path einsum, no gather of the weights to
the output rows. :meth:`ChannelwiseTensorProduct.message_passing` adds the gather at the
senders and the ``index_add`` at the receivers and runs over chunks of edges inside one autograd
function, so the ``(E, K, U)`` edge messages are never stored: the backward recomputes them chunk
by chunk, computing only the gradients the running ``backward``/``grad`` call uses (a force call
needs none w.r.t. weights). The backward is torch code; when a graph is being built (training on
forces) it uses only differentiable operations, so second derivatives work.
"""
from __future__ import annotations

import math

import torch
from e3nn import o3

from mlpot.errors import ConfigError
from mlpot.o3.backend import implementation, select_backend
from mlpot.o3.grad_needs import grad_node, needed
from mlpot.o3.grouped_message_passing import (
    GroupedMessagePassing,
    ReceiverGroups,
    join_input_grad,
    split_input_grad,
    worth_grouping,
)
from mlpot.o3.layout import channel_last_to_mul_ir, mul_ir_to_channel_last
from mlpot.o3.message_passing import EdgeGeometry, MessageTensorProduct

__all__ = [
    "ChannelwiseTensorProduct",
    "uvu_path_weights",
    "channel_last_to_mul_ir",
    "channelwise_instructions",
    "mul_ir_to_channel_last",
]


def channelwise_instructions(irreps_in1, irreps_in2, irreps_out_target):
    """Output irreps and ``(i_in1, i_in2, i_out)`` instructions of the uvu product.

    Same construction as mace-torch's ``tp_out_irreps_with_instructions`` (itself from nequip):
    every ``ir_out in ir1 * ir2`` that occurs in ``irreps_out_target`` gets its own output block of
    multiplicity ``mul1``; the blocks are then sorted by irrep (stable), and the instructions follow.
    """
    irreps_in1, irreps_in2 = o3.Irreps(irreps_in1), o3.Irreps(irreps_in2)
    target = o3.Irreps(irreps_out_target)
    out_list, instructions = [], []
    for i, (mul, ir_in) in enumerate(irreps_in1):
        for j, (_, ir_edge) in enumerate(irreps_in2):
            for ir_out in ir_in * ir_edge:
                if ir_out in target:
                    k = len(out_list)
                    out_list.append((mul, ir_out))
                    instructions.append((i, j, k))
    irreps_out = o3.Irreps(out_list)
    irreps_out, permut, _ = irreps_out.sort()
    instructions = [(i1, i2, permut[io]) for i1, i2, io in instructions]
    instructions = sorted(instructions, key=lambda x: x[2])
    return irreps_out, instructions


def uvu_path_weights(irreps_in2, irreps_out, instructions) -> list[float]:
    r""":math:`\alpha_p = \sqrt{(2 l_3 + 1) / \mathrm{fan}(p)}` per instruction ``(i_in1, i_in2, i_out)``
    (``fan``: summed multiplicity of the second operand over the paths into the same output block),
    e3nn's "component" irrep and "element" path normalization."""
    irreps_in2, irreps_out = o3.Irreps(irreps_in2), o3.Irreps(irreps_out)
    fan: dict[int, int] = {}
    for _, i2, io in instructions:
        fan[io] = fan.get(io, 0) + irreps_in2[i2].mul
    return [math.sqrt(irreps_out[io].ir.dim / fan[io]) for _, _, io in instructions]


def _uniform_mul(irreps: o3.Irreps) -> int | None:
    muls = {mul for mul, _ in irreps}
    return muls.pop() if len(muls) == 1 else None


class _PathPlan:
    r"""Static layout of the paths for the fused message passing.

    ``paths``: ``(p, k0, d, a0, A, off)`` per path: output rows ``k0:k0+d`` (``d = 2 l_3 + 1``),
    input rows ``a0:a0+A`` (``A = 2 l_1 + 1``) and columns ``off:off+d*A`` of ``C``, the CG blocks
    (path weight included) stacked as ``(B, sum_p d A)``, so that one matmul ``Y @ C`` gives the
    per-edge matrices :math:`M^{(p)}_e = \sum_b Y_{e b} C^{(p)}_{b}` of every path.
    """

    def __init__(self, tp: ChannelwiseTensorProduct):
        off1 = [sum(ir.dim for _, ir in tp.irreps_in1[:i]) for i in range(len(tp.irreps_in1))]
        offo = [sum(ir.dim for _, ir in tp.irreps_out[:i]) for i in range(len(tp.irreps_out))]
        B = tp.irreps_in2.dim
        self.paths, cols, off = [], [], 0
        for p, (i1, i2, io) in enumerate(tp.instructions):
            l1, l2, l3 = tp.irreps_in1[i1].ir.l, tp.irreps_in2[i2].ir.l, tp.irreps_out[io].ir.l
            d, A = 2 * l3 + 1, 2 * l1 + 1
            w3j = o3.wigner_3j(l1, l2, l3, dtype=torch.float64) * tp.path_weights[p]  # (a, b, k)
            blk = torch.zeros(B, d, A, dtype=torch.float64)
            blk[tp.irreps_in2.slices()[i2]] = w3j.permute(1, 2, 0)
            cols.append(blk.reshape(B, d * A))
            self.paths.append((p, offo[io], d, off1[i1], A, off))
            off += d * A
        self.C = torch.cat(cols, dim=1)
        self.K = sum(ir.dim for _, ir in tp.irreps_out)
        self.A = sum(ir.dim for _, ir in tp.irreps_in1)
        self.P = len(self.paths)


class _MessagePassing(torch.autograd.Function):
    r"""Chunked gather -> uvu product -> scatter; the backward recomputes chunk by chunk.

    forward: :math:`m_{n, k, u} = \sum_{e: r(e) = n} \sum_a M^{(p(k))}_{e, k a}\, x_{s(e), a, u}\,
    w_{e, p(k), u}`. The backward is torch code; when a graph is being built (second derivatives)
    it uses only differentiable operations, so it can be differentiated again.
    """

    @staticmethod
    def forward(ctx, x, Y, w, C, plan, sender, receiver, num_nodes: int, chunk: int, nodes):
        ctx.save_for_backward(x, Y, w, C, sender, receiver)
        ctx.plan, ctx.chunk, ctx.nodes = plan, chunk, nodes
        return _mp_forward(plan, x, Y, w, C, sender, receiver, num_nodes, chunk, inplace=True)

    @staticmethod
    def backward(ctx, grad_out):
        x, Y, w, C, sender, receiver = ctx.saved_tensors
        need_x, need_Y, need_w = (needed(f, n) for f, n in zip(ctx.needs_input_grad[:3], ctx.nodes))
        if ctx.needs_input_grad[3]:
            raise RuntimeError("ChannelwiseTensorProduct: no gradient w.r.t. the CG coefficients")
        gx, gY, gw = _mp_backward(
            ctx.plan, grad_out, x, Y, w, C, sender, receiver, ctx.chunk, need_x, need_Y, need_w,
            inplace=not torch.is_grad_enabled(),
        )
        return gx, gY, gw, None, None, None, None, None, None, None


def _edge_products(plan, Ma, xs, wc, inplace: bool) -> torch.Tensor:
    """Per-edge messages ``(c, K, U)`` from ``Ma = Y @ C``, sender features ``xs (c, A, U)``, ``wc (c, P, U)``."""
    c, U = xs.shape[0], xs.shape[2]
    if inplace:
        oc = xs.new_empty(c, plan.K, U)
    parts = []
    for p, k0, d, a0, A, off in plan.paths:
        Mp = Ma[:, off : off + d * A].view(c, d, A)
        if A == 1:
            if inplace:
                torch.mul(Mp, xs[:, a0 : a0 + 1] * wc[:, p : p + 1], out=oc[:, k0 : k0 + d])
            else:
                parts.append(Mp * (xs[:, a0 : a0 + 1] * wc[:, p : p + 1]))
        else:
            t = torch.bmm(Mp, xs[:, a0 : a0 + A] * wc[:, p : p + 1])
            if inplace:
                oc[:, k0 : k0 + d] = t
            else:
                parts.append(t)
    return oc if inplace else torch.cat(parts, dim=1)  # plan.paths are in output order


def _mp_forward(plan, x, Y, w, C, sender, receiver, num_nodes, chunk, inplace: bool):
    """``x (N, A, U)``, ``Y (E, B)``, ``w (E, P, U)`` -> ``(num_nodes, K, U)``."""
    E = Y.shape[0]
    out = x.new_zeros(num_nodes, plan.K, x.shape[-1])
    for s in range(0, E, chunk):
        sl = slice(s, min(s + chunk, E))
        oc = _edge_products(plan, Y[sl] @ C, x.index_select(0, sender[sl]), w[sl], inplace)
        out.index_add_(0, receiver[sl], oc)
    return out


def _mp_backward(plan, g, x, Y, w, C, sender, receiver, chunk, need_x, need_Y, need_w, inplace: bool):
    E = Y.shape[0]
    gx = torch.zeros_like(x) if need_x else None
    gw = (torch.empty_like(w) if inplace else None) if need_w else None
    gY = (torch.empty_like(Y) if inplace else None) if need_Y else None
    gw_parts, gY_parts = [], []
    Ct = C.transpose(0, 1)
    for s in range(0, E, chunk):
        sl = slice(s, min(s + chunk, E))
        c = sl.stop - sl.start
        Ma = Y[sl] @ C
        xs = x.index_select(0, sender[sl])
        wc = w[sl]
        gs = g.index_select(0, receiver[sl])  # (c, K, U)
        gxs = torch.zeros_like(xs) if need_x else None
        gwc = gw[sl] if (need_w and inplace) else None
        gM = Ma.new_empty(Ma.shape) if (need_Y and inplace) else None
        gw_cols, gM_cols, gx_rows = [], [], {}
        for p, k0, d, a0, A, off in plan.paths:
            Mp = Ma[:, off : off + d * A].view(c, d, A)
            gsp = gs[:, k0 : k0 + d]
            xsp = xs[:, a0 : a0 + A]
            wp = wc[:, p : p + 1]
            if need_x or need_w:
                # R[e, a, u] = sum_k M[e, k, a] g[e, k, u]
                R = (Mp * gsp).sum(1, keepdim=True) if A == 1 else torch.bmm(Mp.transpose(1, 2), gsp)
                gw_out = gwc[:, p] if (need_w and inplace) else None
                split_input_grad(R, xsp, wp, a0, need_w, need_x, inplace, gw_out, gxs, gw_cols, gx_rows)
            if need_Y:
                gMp = torch.bmm(gsp, (xsp * wp).transpose(1, 2)).reshape(c, d * A)
                if inplace:
                    gM[:, off : off + d * A] = gMp
                else:
                    gM_cols.append(gMp)
        if need_Y:
            if not inplace:
                gM = torch.cat(gM_cols, dim=1)
            if inplace:
                torch.mm(gM, Ct, out=gY[sl])
            else:
                gY_parts.append(gM @ Ct)
        if need_w and not inplace:
            gw_parts.append(torch.stack(gw_cols, dim=1))
        if need_x:
            if not inplace:
                gxs = join_input_grad(plan, gx_rows, xs, c, xs.shape[2])
            gx.index_add_(0, sender[sl], gxs)
    if not inplace:
        if need_w:
            gw = torch.cat(gw_parts) if gw_parts else torch.zeros_like(w)
        if need_Y:
            gY = torch.cat(gY_parts) if gY_parts else torch.zeros_like(Y)
    elif E == 0:
        gw = torch.zeros_like(w) if need_w else None
        gY = torch.zeros_like(Y) if need_Y else None
    return gx, gY, gw


def _receiver_groups(sender, receiver, num_nodes: int, dtype, only_if_worth: bool, cache: dict | None):
    """The :class:`ReceiverGroups` of the graph (None when ``only_if_worth`` and
    :func:`worth_grouping` says no), kept in ``cache`` for the other layers of the forward pass."""
    key = ("receiver_groups", id(sender), id(receiver), num_nodes, dtype, only_if_worth)
    hit = cache.get(key) if cache is not None else None
    if hit is not None and hit[0] is sender and hit[1] is receiver:
        return hit[2]
    groups = None
    if not only_if_worth or worth_grouping(receiver, num_nodes):
        groups = ReceiverGroups(sender, receiver, num_nodes, dtype)
    if cache is not None:
        cache[key] = (sender, receiver, groups)  # the tensors themselves: their ids stay theirs
    return groups


class ChannelwiseTensorProduct(MessageTensorProduct):
    r"""e3nn's uvu ``TensorProduct`` for messages, with external per-edge weights (see module doc).

    Args:
        irreps_in1: node (sender) features, e.g. ``"128x0e+128x1o"``.
        irreps_in2: edge attributes, usually ``o3.Irreps.spherical_harmonics(lmax)``.
        irreps_out_target: irreps the products are filtered to (paths into other irreps are dropped).
        backend: ``"reference" | "triton" | "auto"`` for :meth:`message_passing` (registry op
            ``channelwise_tp``; the kernel needs one multiplicity for ``irreps_in1`` and
            multiplicity 1 for ``irreps_in2``, else ``triton`` is a ConfigError);
            :meth:`forward` is always the reference.

    Attributes: ``irreps_out`` (sorted, not simplified, one block per path), ``instructions``
    (``(i_in1, i_in2, i_out)``), ``weight_numel``, ``path_weights`` (:math:`\alpha_p`).

    ``forward(x (E, in1.dim), y (E, in2.dim), weight (E, weight_numel)) -> (E, irreps_out.dim)``.
    """

    #: edges per chunk in :meth:`message_passing` (bounded memory, cache-sized intermediates)
    chunk_size: int = 256
    #: reference message passing order: ``"auto"`` (grouped by receiver when the in-degrees are
    #: even enough, :func:`mlpot.o3.grouped_message_passing.worth_grouping`), ``"receiver"`` or ``"edge"``
    grouping: str = "auto"
    op = "channelwise_tp"

    def __init__(self, irreps_in1, irreps_in2, irreps_out_target, backend: str = "reference"):
        super().__init__(backend)
        self.irreps_in1 = o3.Irreps(irreps_in1)
        self.irreps_in2 = o3.Irreps(irreps_in2)
        self.irreps_out, self.instructions = channelwise_instructions(
            self.irreps_in1, self.irreps_in2, irreps_out_target
        )
        self.irreps_in = self.irreps_in1
        self.path_weights = uvu_path_weights(self.irreps_in2, self.irreps_out, self.instructions)
        self.weight_shapes = [(self.irreps_in1[i1].mul, self.irreps_in2[i2].mul) for i1, i2, _ in self.instructions]
        self.weight_numel = sum(a * b for a, b in self.weight_shapes)
        self.num_paths = len(self.instructions)

        U = _uniform_mul(self.irreps_in1)
        self.channels = U
        self.fast = U is not None and all(mul == 1 for mul, _ in self.irreps_in2) and self.num_paths > 0
        dtype = torch.float64
        if self.fast:
            self._plan = _PathPlan(self)
            self.register_buffer("cg_paths", self._plan.C, persistent=False)
        else:
            for p, (i1, i2, io) in enumerate(self.instructions):
                l1, l2, l3 = self.irreps_in1[i1].ir.l, self.irreps_in2[i2].ir.l, self.irreps_out[io].ir.l
                self.register_buffer(f"w3j_{p}", o3.wigner_3j(l1, l2, l3, dtype=dtype), persistent=False)
        self._fused = None
        self.check_backend(layout="uniform" if self.fast else "general")

    def extra_repr(self) -> str:
        return (
            f"{self.irreps_in1} x {self.irreps_in2} -> {self.irreps_out} | {self.num_paths} paths, "
            f"{self.weight_numel} weights, backend={self.backend}"
        )

    def _cg_paths(self, ref: torch.Tensor) -> torch.Tensor:
        return self.cg_paths.to(dtype=ref.dtype, device=ref.device)

    # ---- edge-level product (e3nn's TensorProduct call) ---------------------------------------
    def forward(self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if not self.fast:
            return self._forward_generic(x, y, weight)
        E = x.shape[0]
        xc = mul_ir_to_channel_last(x, self.irreps_in1)  # (E, A, U)
        w = weight.reshape(E, self.num_paths, self.channels)
        t = _edge_products(self._plan, y @ self._cg_paths(x), xc, w, inplace=False)
        return channel_last_to_mul_ir(t, self.irreps_out)

    def _forward_generic(self, x, y, weight):
        outs = []
        E = x.shape[0]
        woff = 0
        for p, (i1, i2, io) in enumerate(self.instructions):
            mul1, ir1 = self.irreps_in1[i1]
            mul2, ir2 = self.irreps_in2[i2]
            x1 = x[:, self.irreps_in1.slices()[i1]].reshape(E, mul1, ir1.dim)
            x2 = y[:, self.irreps_in2.slices()[i2]].reshape(E, mul2, ir2.dim)
            n = mul1 * mul2
            w = weight[:, woff : woff + n].reshape(E, mul1, mul2)
            woff += n
            w3j = getattr(self, f"w3j_{p}").to(dtype=x.dtype, device=x.device)
            out = torch.einsum("euv,eua,evb,abk->euk", w, x1, x2, w3j) * self.path_weights[p]
            outs.append(out.reshape(E, -1))
        if not outs:
            return x.new_zeros(E, 0)
        return torch.cat(outs, dim=-1)

    def edge_product(self, x_sender: torch.Tensor, geometry: EdgeGeometry, weights: torch.Tensor) -> torch.Tensor:
        return self.forward(x_sender, geometry.require("sh", "ChannelwiseTensorProduct"), weights)

    # ---- gather + product + scatter --------------------------------------------------------------
    def message_passing(self, node_feats, edge_geometry: EdgeGeometry, weights, sender, receiver, num_nodes: int):
        """``sum_{e: receiver(e) = n} TP(node_feats[sender(e)], Y_e, weights[e])``.

        ``node_feats`` (N, irreps_in1.dim) -> (num_nodes, irreps_out.dim), e3nn layout; ``Y_e``
        is ``edge_geometry.sh``. Fast paths: the Triton kernel, or the chunked channel-last
        reference (:meth:`message_passing_channel_last`).
        """
        if not self.fast:
            return super().message_passing(node_feats, edge_geometry, weights, sender, receiver, num_nodes)
        edge_attrs = edge_geometry.require("sh", "ChannelwiseTensorProduct")
        if self.selected_backend(node_feats.device) == "triton":
            return self._triton_message_passing(node_feats, edge_attrs, weights, sender, receiver, num_nodes)
        out = self.message_passing_channel_last(
            mul_ir_to_channel_last(node_feats, self.irreps_in1), edge_attrs, weights, sender, receiver, num_nodes,
            cache=edge_geometry.cache,
        )
        return channel_last_to_mul_ir(out, self.irreps_out)

    def message_passing_channel_last(self, x_cl, edge_attrs, weights, sender, receiver, num_nodes, cache=None):
        """Same as :meth:`message_passing` in the channel-last layout: (N, A, U) -> (num_nodes, K, U).

        ``cache``: a dict shared by the layers of one forward pass (:attr:`EdgeGeometry.cache`), which
        keeps the receiver grouping of the graph."""
        if self.backend not in ("reference", "triton"):  # auto (or cpu): the CPU kernels at inference
            opts = dict(getattr(self, "_backend_options", {}), training=bool(self.training and torch.is_grad_enabled()))
            if select_backend(self.op, self.backend, x_cl.device, **opts) == "cpu":
                return implementation(self.op, "cpu")(self, x_cl, edge_attrs, weights, sender, receiver, num_nodes)
        E = edge_attrs.shape[0]
        w = weights.reshape(E, self.num_paths, self.channels)
        x_cl, edge_attrs = x_cl.contiguous(), edge_attrs.contiguous()
        if self.grouping not in ("auto", "receiver", "edge"):
            raise ConfigError(f"ChannelwiseTensorProduct.grouping must be auto, receiver or edge, not {self.grouping!r}")
        groups = None
        if E and self.grouping != "edge":
            groups = _receiver_groups(sender, receiver, int(num_nodes), x_cl.dtype, self.grouping == "auto", cache)
        if groups is not None:
            nodes = (grad_node(x_cl), grad_node(edge_attrs), grad_node(w)) if torch.is_grad_enabled() else None
            return GroupedMessagePassing.apply(
                x_cl, edge_attrs, w, self._cg_paths(x_cl), self._plan, groups, nodes or (None, None, None)
            )
        chunk = int(self.chunk_size)
        if E <= 2 * chunk:  # a small graph in one piece: fewer, larger ops
            chunk = max(E, 1)
        nodes = (grad_node(x_cl), grad_node(edge_attrs), grad_node(w)) if torch.is_grad_enabled() else None
        return _MessagePassing.apply(
            x_cl,
            edge_attrs,
            w,
            self._cg_paths(x_cl),
            self._plan,
            sender,
            receiver,
            int(num_nodes),
            chunk,
            nodes or (None, None, None),
        )

    def _triton_message_passing(self, node_feats, edge_attrs, weights, sender, receiver, num_nodes):
        if self._fused is None:
            from mlpot.o3.backend import implementation

            self._fused = implementation("channelwise_tp", "triton")(self.irreps_in1, self.irreps_in2, self.irreps_out, self.instructions)
        return self._fused(node_feats, edge_attrs, weights, sender, receiver, num_nodes)

