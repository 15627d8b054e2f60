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
Inside, features are channel-last, ``(..., D, U)`` with ``D = sum (2l+1)`` (the same layout as
the Triton kernels, converted at the module boundary). The CG coefficients of all paths, with
:math:`\alpha_p` folded in, form one dense tensor ``C[b, k, a]`` (``b``: SH component, ``k``: output
component over all paths, ``a``: input component). Per edge, the SH are contracted first,
``M_e = Y_e \cdot C`` (a tiny ``(K, A)`` matrix), and then

.. math::  t_{e} = M_e\, x_{s(e)} \quad (K \times A)(A \times U), \qquad
           m_{e, k, u} = t_{e, k, u}\, w_{e, p(k), u},

one batched matmul and one gather-multiply, instead of one einsum per path.
:meth:`ChannelwiseTensorProduct.message_passing` adds the gather at the senders and the
``index_add`` at the receivers and runs over chunks of edges inside one autograd function, so the
``(E, K, U)`` edge messages are never stored: the backward recomputes them chunk by chunk. The
backward is written with differentiable torch ops, so second derivatives (training on forces)
work.
"""
from __future__ import annotations

import math
import torch
from e3nn import o3
from torch import nn

__all__ = [
    "ChannelwiseTensorProduct",
    "channelwise_instructions",
    "mul_ir_to_channel_last",
    "channel_last_to_mul_ir",
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


def _uniform_mul(irreps: o3.Irreps) -> int | None:
    muls = {mul for mul, _ in irreps}
    return muls.pop() if len(muls) == 1 else None


def mul_ir_to_channel_last(x: torch.Tensor, irreps) -> torch.Tensor:
    """``(..., irreps.dim)`` e3nn ``mul_ir``  ->  ``(..., D, U)`` channel-last (all muls equal ``U``)."""
    irreps = o3.Irreps(irreps)
    U = _uniform_mul(irreps)
    if U is None:
        raise ValueError(f"channel-last layout needs one multiplicity for all irreps, got {irreps}")
    lead = x.shape[:-1]
    blocks = [x[..., sl].reshape(*lead, U, ir.dim).transpose(-1, -2) for sl, (_, ir) in zip(irreps.slices(), irreps)]
    return torch.cat(blocks, dim=-2)


def channel_last_to_mul_ir(x: torch.Tensor, irreps) -> torch.Tensor:
    """``(..., D, U)`` channel-last  ->  ``(..., irreps.dim)`` e3nn ``mul_ir``."""
    irreps = o3.Irreps(irreps)
    lead = x.shape[:-2]
    blocks, off = [], 0
    for mul, ir in irreps:
        blocks.append(x[..., off : off + ir.dim, :].transpose(-1, -2).reshape(*lead, mul * ir.dim))
        off += ir.dim
    return torch.cat(blocks, dim=-1)


def _resolve_backend(backend: str, device) -> str:
    try:
        from mlpot.o3.backend import resolve_backend
    except ImportError:  # the dispatch module is optional for this file
        if backend not in ("reference", "auto"):
            from mlpot.errors import ConfigError

            raise ConfigError(f"backend {backend!r} is not available in this build; use 'reference'") from None
        return "reference"
    return resolve_backend(backend, device)


class _MessagePassing(torch.autograd.Function):
    """Chunked gather -> uvu TP -> scatter with recomputation in the backward.

    forward: ``out[n] = sum_{e: r(e) = n} (M_e x[s(e)]) * w_e[p(k)]`` with ``M_e = Y_e . C``.
    The backward is plain differentiable torch, so it can itself be differentiated.
    """

    @staticmethod
    def forward(ctx, x, Y, w, C, path_of_k, sender, receiver, num_nodes: int, chunk: int):
        ctx.save_for_backward(x, Y, w, C, path_of_k, sender, receiver)
        ctx.num_nodes, ctx.chunk = num_nodes, chunk
        return _mp_forward(x, Y, w, C, path_of_k, sender, receiver, num_nodes, chunk)

    @staticmethod
    def backward(ctx, grad_out):
        x, Y, w, C, path_of_k, sender, receiver = ctx.saved_tensors
        need_x, need_Y, need_w = ctx.needs_input_grad[:3]
        if ctx.needs_input_grad[3]:
            raise RuntimeError("ChannelwiseTensorProduct: no gradient w.r.t. the CG coefficients")
        gx, gY, gw = _mp_backward(
            grad_out, x, Y, w, C, path_of_k, sender, receiver, ctx.chunk, need_x, need_Y, need_w
        )
        return gx, gY, gw, None, None, None, None, None, None


def _edge_matrices(Y: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    B, K, A = C.shape
    return (Y @ C.reshape(B, K * A)).reshape(Y.shape[0], K, A)


def _mp_forward(x, Y, w, C, path_of_k, sender, receiver, num_nodes, chunk):
    E = Y.shape[0]
    _, K, A = C.shape
    U = x.shape[-1]
    out = x.new_zeros(num_nodes, K, U)
    for s in range(0, E, chunk):
        sl = slice(s, min(s + chunk, E))
        M = _edge_matrices(Y[sl], C)
        xs = x.index_select(0, sender[sl])
        t = M * xs if A == 1 else torch.bmm(M, xs)
        t = t * w[sl].index_select(1, path_of_k)
        out.index_add_(0, receiver[sl], t)
    return out


def _mp_backward(g, x, Y, w, C, path_of_k, sender, receiver, chunk, need_x, need_Y, need_w):
    E = Y.shape[0]
    B, K, A = C.shape
    P = w.shape[1]
    gx = torch.zeros_like(x) if need_x else None
    gY_parts, gw_parts = [], []
    for s in range(0, E, chunk):
        sl = slice(s, min(s + chunk, E))
        M = _edge_matrices(Y[sl], C)
        xs = x.index_select(0, sender[sl])
        gs = g.index_select(0, receiver[sl])  # (c, K, U)
        if need_w:
            t = M * xs if A == 1 else torch.bmm(M, xs)
            gwk = gs * t
            gw_parts.append(gwk.new_zeros(gwk.shape[0], P, gwk.shape[2]).index_add(1, path_of_k, gwk))
        if need_x or need_Y:
            gt = gs * w[sl].index_select(1, path_of_k)  # (c, K, U)
            if need_x:
                if A == 1:
                    gxs = (M * gt).sum(1, keepdim=True)
                else:
                    gxs = torch.bmm(M.transpose(1, 2), gt)
                gx.index_add_(0, sender[sl], gxs)
            if need_Y:
                gM = torch.bmm(gt, xs.transpose(1, 2))  # (c, K, A)
                gY_parts.append(gM.reshape(gM.shape[0], K * A) @ C.reshape(B, K * A).transpose(0, 1))
    gY = (torch.cat(gY_parts) if gY_parts else Y.new_zeros(Y.shape)) if need_Y else None
    gw = (torch.cat(gw_parts) if gw_parts else w.new_zeros(w.shape)) if need_w else None
    return gx, gY, gw


class ChannelwiseTensorProduct(nn.Module):
    r"""e3nn's uvu ``TensorProduct`` for messages, with external per-edge weights (see module doc).

    Args:
        irreps_in1: node (sender) features, e.g. ``"128x0e+128x1o"``.
        irreps_in2: edge attributes, usually ``o3.Irreps.spherical_harmonics(lmax)``.
        irreps_out_target: irreps the products are filtered to (paths into other irreps are dropped).
        backend: ``"reference" | "triton" | "auto"`` for :meth:`message_passing`
            (:func:`mlpot.o3.backend.resolve_backend`); :meth:`forward` is always the reference.

    Attributes: ``irreps_out`` (sorted, not simplified, one block per path), ``instructions``
    (``(i_in1, i_in2, i_out)``), ``weight_numel``, ``path_weights`` (:math:`\alpha_p`).

    ``forward(x (E, in1.dim), y (E, in2.dim), weight (E, weight_numel)) -> (E, irreps_out.dim)``.
    """

    #: edges per chunk in :meth:`message_passing` (bounded memory, cache-sized intermediates)
    chunk_size: int = 256

    def __init__(self, irreps_in1, irreps_in2, irreps_out_target, backend: str = "reference"):
        super().__init__()
        self.irreps_in1 = o3.Irreps(irreps_in1)
        self.irreps_in2 = o3.Irreps(irreps_in2)
        self.irreps_out, self.instructions = channelwise_instructions(
            self.irreps_in1, self.irreps_in2, irreps_out_target
        )
        self.backend = str(backend)
        fan = {}
        for i1, i2, io in self.instructions:
            fan[io] = fan.get(io, 0) + self.irreps_in2[i2].mul
        self.path_weights = [
            math.sqrt(self.irreps_out[io].ir.dim / fan[io]) for _, _, io in self.instructions
        ]
        self.weight_shapes = [(self.irreps_in1[i1].mul, self.irreps_in2[i2].mul) for i1, i2, _ in self.instructions]
        self.weight_numel = sum(a * b for a, b in self.weight_shapes)
        self.num_paths = len(self.instructions)

        U = _uniform_mul(self.irreps_in1)
        self.channels = U
        self.fast = U is not None and all(mul == 1 for mul, _ in self.irreps_in2) and self.num_paths > 0
        dtype = torch.float64
        if self.fast:
            A = sum(ir.dim for _, ir in self.irreps_in1)
            B = self.irreps_in2.dim
            K = sum(ir.dim for _, ir in self.irreps_out)
            off1 = [sum(ir.dim for _, ir in self.irreps_in1[:i]) for i in range(len(self.irreps_in1))]
            offo = [sum(ir.dim for _, ir in self.irreps_out[:i]) for i in range(len(self.irreps_out))]
            C = torch.zeros(B, K, A, dtype=dtype)
            path_of_k = torch.zeros(K, dtype=torch.long)
            for p, (i1, i2, io) in enumerate(self.instructions):
                l1, l2, l3 = self.irreps_in1[i1].ir.l, self.irreps_in2[i2].ir.l, self.irreps_out[io].ir.l
                w3j = o3.wigner_3j(l1, l2, l3, dtype=dtype)  # (a, b, k)
                sl2 = self.irreps_in2.slices()[i2]
                blk = self.path_weights[p] * w3j.permute(1, 2, 0)  # (b, k, a)
                C[sl2, offo[io] : offo[io] + 2 * l3 + 1, off1[i1] : off1[i1] + 2 * l1 + 1] += blk
                path_of_k[offo[io] : offo[io] + 2 * l3 + 1] = p
            self.register_buffer("cg", C, persistent=False)
            self.register_buffer("path_of_k", path_of_k, persistent=False)
        else:
            for p, (i1, i2, io) in enumerate(self.instructions):
                l1, l2, l3 = self.irreps_in1[i1].ir.l, self.irreps_in2[i2].ir.l, self.irreps_out[io].ir.l
                self.register_buffer(f"w3j_{p}", o3.wigner_3j(l1, l2, l3, dtype=dtype), persistent=False)
        self._fused = None

    def extra_repr(self) -> str:
        return (
            f"{self.irreps_in1} x {self.irreps_in2} -> {self.irreps_out} | {self.num_paths} paths, "
            f"{self.weight_numel} weights, backend={self.backend}"
        )

    def _cg(self, ref: torch.Tensor) -> torch.Tensor:
        return self.cg.to(dtype=ref.dtype, device=ref.device)

    # ---- edge-level product (e3nn's TensorProduct call) ---------------------------------------
    def forward(self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if not self.fast:
            return self._forward_generic(x, y, weight)
        E = x.shape[0]
        U = self.channels
        xc = mul_ir_to_channel_last(x, self.irreps_in1)  # (E, A, U)
        C = self._cg(x)
        M = _edge_matrices(y, C)
        t = M * xc if C.shape[2] == 1 else torch.bmm(M, xc)
        t = t * weight.reshape(E, self.num_paths, U).index_select(1, self.path_of_k)
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

    # ---- gather + product + scatter --------------------------------------------------------------
    def message_passing(
        self,
        node_feats: torch.Tensor,
        edge_attrs: torch.Tensor,
        weights: torch.Tensor,
        sender: torch.Tensor,
        receiver: torch.Tensor,
        num_nodes: int | None = None,
    ) -> torch.Tensor:
        """``sum_{e: receiver(e) = n} TP(node_feats[sender(e)], edge_attrs[e], weights[e])``.

        ``node_feats`` (N, irreps_in1.dim) -> (num_nodes, irreps_out.dim), e3nn layout.
        """
        if num_nodes is None:
            num_nodes = node_feats.shape[0]
        backend = _resolve_backend(self.backend, node_feats.device)
        if backend == "triton" and self.fast:
            return self._triton_message_passing(node_feats, edge_attrs, weights, sender, receiver, num_nodes)
        if not self.fast:
            msg = self.forward(node_feats.index_select(0, sender), edge_attrs, weights)
            return msg.new_zeros(num_nodes, msg.shape[1]).index_add(0, receiver, msg)
        out = self.message_passing_channel_last(
            mul_ir_to_channel_last(node_feats, self.irreps_in1), edge_attrs, weights, sender, receiver, num_nodes
        )
        return channel_last_to_mul_ir(out, self.irreps_out)

    def message_passing_channel_last(self, x_cl, edge_attrs, weights, sender, receiver, num_nodes):
        """Same as :meth:`message_passing` in the channel-last layout: (N, A, U) -> (num_nodes, K, U)."""
        E = edge_attrs.shape[0]
        w = weights.reshape(E, self.num_paths, self.channels)
        return _MessagePassing.apply(
            x_cl.contiguous(),
            edge_attrs.contiguous(),
            w,
            self._cg(x_cl),
            self.path_of_k,
            sender,
            receiver,
            int(num_nodes),
            int(self.chunk_size),
        )

    def _triton_message_passing(self, node_feats, edge_attrs, weights, sender, receiver, num_nodes):
        if self._fused is None:
            from mlpot.o3.backend import kernels_module

            mod = kernels_module("channelwise_tp")
            self._fused = mod.FusedChannelwiseTP(self.irreps_in1, self.irreps_in2, self.irreps_out, self.instructions)
        return self._fused(node_feats, edge_attrs, weights, sender, receiver, num_nodes)

