r"""MACE's product basis: element-weighted symmetric contractions of the atomic basis.

Math
----
On each node the atomic basis :math:`A_{c, i}` (channel :math:`c`, component :math:`i` of the
coupling irreps ``l_1 + l_2 + ...`` each of multiplicity 1, dimension :math:`D`) is raised to
body order :math:`\nu + 1` and coupled back to an output irrep :math:`L`:

.. math::

    B_{c, K} = \sum_{\nu=1}^{\nu_{max}} \sum_{k} W^{(\nu)}_{z, k, c}
               \sum_{i_1 \dots i_\nu} U^{(\nu)}_{K, i_1 \dots i_\nu, k}\, A_{c, i_1} \cdots A_{c, i_\nu}

where :math:`z` is the element of the node and the columns :math:`U^{(\nu)}_{\cdot, k}` are
equivariant couplings :math:`(V^{\otimes \nu}) \to V_L` (generalized Clebsch–Gordan
coefficients). Only the part of :math:`U` symmetric in :math:`(i_1 \dots i_\nu)` matters,
since the product of the :math:`A` is symmetric.

Coupling tensors
----------------
The ``U`` are persistent buffers ``contractions.{k}.U_matrix_{nu}`` of shape
``(2L+1, D, ..., D, n_nu)``, so a model file carries the exact couplings it was trained with
(an imported mace-torch model keeps mace's own ``U``, whatever e3nn's sign conventions were).
New models get :func:`coupling_basis`: all chains of CG couplings
``((i_1 x i_2) -> l_12 x i_3) -> ... -> L``, symmetrized over the :math:`\nu` slots and
reduced to an orthogonal basis of their span (Gram–Schmidt), scaled by :math:`\sqrt{2L+1}`
("component" normalization) — the smallest set of weights with the full expressive power.
``basis_sizes`` forces the number of columns (an imported model's); extra columns are zero.

Algorithm
---------
Instead of contracting :math:`U` with :math:`A` one index at a time for every node (mace-torch;
:math:`O(D^\nu)` per node and channel), the weights are first folded into the symmetrized
couplings, once per call and element,
:math:`T_{z, c, K, m} = \sum_k \bar U_{K, m, k} W_{z, k, c}`, over the *distinct* monomials
:math:`m = (i_1 \le \dots \le i_\nu)` whose coupling is nonzero (parity and the triangle rule
remove most). The monomials are built incrementally, :math:`A^{(\nu)}_m = A^{(\nu-1)}_{m'} A_{i_\nu}`
(monomials on the leading axis, ``(M, C, n)``, so every gather copies whole contiguous rows), and
the node output is one batched matmul per element and order, ``(C, K, M) @ (C, M, n)``. Nodes
are sorted by element and processed in chunks inside one autograd function, which computes
only the gradients the running ``backward``/``grad`` call uses.

With constant weights (inference) the forward and the input gradient both run on the
monomials of degree below :math:`\nu_{max}` only (:class:`_JacobianPlan`): the Jacobian of a
degree-:math:`\nu` polynomial has degree :math:`\nu - 1`, and the output is
:math:`\sum_i x_i` times such a polynomial. Both are block-sparse matrix products (the blocks
are the symmetry classes of the couplings, run in a few groups of similar shape), with the
species of a small structure padded to a common node count and batched with the channels, the
nodes read where they are (no sort by species); the forward's basis is kept for the backward
when small. Otherwise (weight gradients, or a graph being built for training on
forces) the forward builds all monomial levels and the backward applies the chain rule through
them by hand with differentiable operations, reusing the forward's monomials for small inputs
and recomputing them chunk by chunk for large ones (bounded memory). In eval mode the folded
weights :math:`T` and the per-element tables are cached (the weights are then constants).
"""
from __future__ import annotations

import itertools
import math
from functools import lru_cache
from typing import NamedTuple

import torch
from e3nn import o3
from torch import nn

from mlpot.o3.backend import implementation, select_backend
from mlpot.o3.grad_needs import grad_node, needed
from mlpot.o3.product_basis import ProductBasis

__all__ = ["Contraction", "SymmetricContraction", "coupling_basis", "coupling_paths", "dense_symmetric_contraction"]


def _coupling_irreps(irreps_in) -> o3.Irreps:
    return o3.Irreps([ir for _, ir in o3.Irreps(irreps_in)])


def _chains(irreps: o3.Irreps, correlation: int, filter_ir_mid=None):
    """CG chains as compact blocks: ``(ir_out, (j_1..j_nu), tensor (ir_out.dim, d_j1, ..., d_jnu))``."""
    dtype = torch.float64
    chains = [(ir, (j,), torch.eye(ir.dim, dtype=dtype)) for j, (_, ir) in enumerate(irreps)]
    for _ in range(1, correlation):
        new = []
        for ir_left, js, t_left in chains:
            for j, (_, ir) in enumerate(irreps):
                for ir_mid in ir_left * ir:
                    if filter_ir_mid is not None and ir_mid not in filter_ir_mid:
                        continue
                    C = o3.wigner_3j(ir_mid.l, ir_left.l, ir.l, dtype=dtype) * math.sqrt(ir_mid.dim)
                    dm, dl, d = C.shape
                    rest = t_left.shape[1:]
                    t = (C.permute(0, 2, 1).reshape(dm * d, dl) @ t_left.reshape(dl, -1)).reshape(dm, d, -1)
                    new.append((ir_mid, js + (j,), t.transpose(1, 2).reshape(dm, *rest, d)))
        chains = new
    return chains


def coupling_paths(irreps, correlation: int, ir_out, filter_ir_mid=None) -> list[torch.Tensor]:
    r"""All CG chains ``(((i_1 x i_2) -> l_12) x i_3 -> ...) -> ir_out`` as dense tensors.

    ``irreps``: the coupling irreps (multiplicity 1 each), dimension ``D``. Returns a list of
    tensors of shape ``(ir_out.dim, D, ..., D)`` (``correlation`` times ``D``), each built from
    e3nn's ``wigner_3j`` with "component" normalization (each coupling scaled by
    :math:`\sqrt{2l+1}`), in the spirit of mace-torch's ``U_matrix_real``.
    """
    irreps = o3.Irreps(irreps)
    ir_out = o3.Irrep(ir_out)
    D = irreps.dim
    out = []
    for ir, js, t in _chains(irreps, correlation, filter_ir_mid):
        if ir != ir_out:
            continue
        full = torch.zeros((ir.dim,) + (D,) * correlation, dtype=t.dtype)
        full[(slice(None),) + tuple(irreps.slices()[j] for j in js)] = t
        out.append(full)
    return out


@lru_cache(maxsize=16)
def _monomial_index(D: int, nu: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Distinct monomials of order nu over D variables: padded flat indices of their orderings,
    validity mask, and the number of distinct orderings of each."""
    monos = _monomials(D, nu)
    index = [_distinct_permutations_flat(m, D) for m in monos]
    width = max(len(ix) for ix in index)
    flat_idx = torch.tensor([ix + [ix[0]] * (width - len(ix)) for ix in index], dtype=torch.long)
    valid = torch.tensor([[1.0] * len(ix) + [0.0] * (width - len(ix)) for ix in index], dtype=torch.float64)
    count = torch.tensor([len(ix) for ix in index], dtype=torch.float64)
    return flat_idx, valid, count


def _sum_over_orderings(U: torch.Tensor, D: int, nu: int) -> torch.Tensor:
    """``U (d, D^nu..., n)`` -> ``(d, M, n)``: sum of U over the distinct orderings of each monomial."""
    flat_idx, valid, _ = _monomial_index(D, nu)
    d, n = U.shape[0], U.shape[-1]
    Uf = U.reshape(d, D**nu, n)
    return (Uf[:, flat_idx, :] * valid.to(U.dtype)[None, :, :, None]).sum(2)


@lru_cache(maxsize=16)
def _monomial_table(D: int, nu: int) -> torch.Tensor:
    """For every flat index ``(i_1..i_nu)`` the position of the sorted monomial in ``_monomials``."""
    flat_idx, valid, _ = _monomial_index(D, nu)
    table = torch.empty(D**nu, dtype=torch.long)
    ids = torch.arange(flat_idx.shape[0])[:, None].expand_as(flat_idx)
    mask = valid.bool()
    table[flat_idx[mask]] = ids[mask]
    return table


@lru_cache(maxsize=64)
def _coupling_basis_cached(irreps_str: str, correlation: int, ir_out_str: str) -> torch.Tensor:
    irreps = o3.Irreps(irreps_str)
    ir_out = o3.Irrep(ir_out_str)
    D = irreps.dim
    nu = correlation
    shape = (ir_out.dim,) + (D,) * nu
    filt = None
    if nu >= 4:  # keep natural-parity intermediates, as mace-torch does for nu = 4
        filt = [o3.Irrep(l, (-1) ** l) for l in range(12)]
    flat_idx, _, count = _monomial_index(D, nu)
    table = _monomial_table(D, nu)
    M = flat_idx.shape[0]
    offsets = [sl.start for sl in irreps.slices()]
    vecs = []
    for ir, js, t in _chains(irreps, nu, filt):
        if ir != ir_out:
            continue
        # global flat index of every entry of the block, then its monomial
        grids = torch.meshgrid(*[torch.arange(irreps[j].ir.dim) + offsets[j] for j in js], indexing="ij")
        flat = torch.zeros_like(grids[0])
        for g in grids:
            flat = flat * D + g
        ids = table[flat.reshape(-1)]
        v = torch.zeros(ir_out.dim, M, dtype=torch.float64).index_add_(1, ids, t.reshape(ir_out.dim, -1))
        vecs.append((v / count.sqrt()[None, :]).reshape(-1))  # weighted coordinates: norm = Frobenius
    if not vecs:
        return torch.zeros(*shape, 0, dtype=torch.float64)
    basis: list[torch.Tensor] = []
    for v0 in vecs:
        v = v0.clone()
        for _ in range(2):  # modified Gram-Schmidt, twice for stability
            for b in basis:
                v = v - (b @ v) * b
        n = v.norm()
        if n > 1e-9 * max(1.0, v0.norm().item()):
            basis.append(v / n)
    if not basis:
        return torch.zeros(*shape, 0, dtype=torch.float64)
    B = torch.stack(basis, dim=-1).reshape(ir_out.dim, M, len(basis))
    S = B / count.sqrt()[None, :, None]  # entries of the symmetric tensor
    U = torch.zeros(ir_out.dim, D**nu, len(basis), dtype=torch.float64)
    for w in range(flat_idx.shape[1]):
        U[:, flat_idx[:, w], :] = S
    return (U * math.sqrt(ir_out.dim)).reshape(*shape, len(basis))


def coupling_basis(irreps_in, correlation: int, ir_out) -> torch.Tensor:
    """Orthogonal basis of the symmetric equivariant couplings ``Sym^nu(V) -> ir_out``.

    Shape ``(ir_out.dim, D, ..., D, n)``; each column has Frobenius norm ``sqrt(ir_out.dim)``.
    """
    irreps = _coupling_irreps(irreps_in)
    return _coupling_basis_cached(str(irreps), int(correlation), str(o3.Irrep(ir_out))).clone()


# ------------------------------------------------------------------------------------------------
def _monomials(D: int, nu: int) -> list[tuple[int, ...]]:
    return list(itertools.combinations_with_replacement(range(D), nu))


def _distinct_permutations_flat(m: tuple[int, ...], D: int) -> list[int]:
    flat = set()
    for p in set(itertools.permutations(m)):
        f = 0
        for i in p:
            f = f * D + i
        flat.add(f)
    return sorted(flat)


def dense_symmetric_contraction(A: torch.Tensor, elem: torch.Tensor, Us, Ws) -> torch.Tensor:
    r"""The contraction by its definition, densely: :math:`B_{n k c} = \sum_\nu \sum_q
    U^{(\nu)}_{k, i_1 \ldots i_\nu, q}\, W^{(\nu)}_{z_n q c} \prod_{t} A_{n i_t c}`.

    ``A (N, D, C)`` (channel-last), ``elem (N,)`` species indices, ``Us[nu-1]``
    ``(D_out, D, ..., D, Q_nu)``, ``Ws[nu-1]`` ``(Z, Q_nu, C)`` -> ``(N, D_out, C)``. Cost
    :math:`O(D^\nu)` per node: the ground truth of the Triton kernel, not a fast path.
    """
    out = 0
    for U, W in zip(Us, Ws):
        T = torch.einsum("...q,nqc->n...c", U.to(A.dtype), W[elem])  # (N, D_out, D^nu, C)
        while T.dim() > 3:
            T = torch.einsum("n...ic,nic->n...c", T, A)
        out = out + T
    return out


class Contraction(nn.Module):
    """One output irrep of :class:`SymmetricContraction`: buffers ``U_matrix_{nu}``, weights ``weights_{nu}``."""

    def __init__(self, D: int, ir_out: o3.Irrep, correlation: int, num_elements: int, num_channels: int,
                 U_list: list[torch.Tensor]):
        super().__init__()
        self.ir_out = ir_out
        self.correlation = correlation
        for nu, U in enumerate(U_list, start=1):
            self.register_buffer(f"U_matrix_{nu}", U.contiguous())
            n = U.shape[-1]
            w = torch.randn(num_elements, n, num_channels, dtype=torch.get_default_dtype()) / max(n, 1)
            self.register_parameter(f"weights_{nu}", nn.Parameter(w))

    def U(self, nu: int) -> torch.Tensor:
        return getattr(self, f"U_matrix_{nu}")

    def W(self, nu: int) -> torch.Tensor:
        return getattr(self, f"weights_{nu}")


class SymmetricContraction(ProductBasis):
    r"""Product basis :math:`A \mapsto B` (module doc), mace-torch's call convention.

    Args:
        irreps_in: the atomic basis, ``C x l_1 + C x l_2 + ...`` (one multiplicity ``C``).
        irreps_out: output irreps, each of multiplicity ``C`` (e.g. ``"128x0e+128x1o"``).
        correlation: body order minus one, :math:`\nu_{max}` (1..4).
        num_elements: number of species (one weight set each).
        basis_sizes: optional ``[[n_1, ..., n_corr] per output irrep]``: number of coupling columns
            (to hold an imported model's ``U``); default: the reduced basis of :func:`coupling_basis`.

    ``forward(node_feats (N, C, D), node_attrs (N, S) one-hot) -> (N, irreps_out.dim)``.
    """

    #: nodes per chunk (bounds the size of the monomial tensors, which are recomputed in the backward)
    chunk_size: int = 32
    op = "symmetric_contraction"

    def __init__(self, irreps_in, irreps_out, correlation: int, num_elements: int,
                 basis_sizes=None, backend: str = "reference"):
        super().__init__(backend)
        self.irreps_in = o3.Irreps(irreps_in)
        self.irreps_out = o3.Irreps(irreps_out)
        self.correlation = int(correlation)
        self.num_elements = int(num_elements)
        self.check_backend()
        if not 1 <= self.correlation <= 4:
            raise ValueError(f"correlation must be 1..4, got {correlation}")
        muls = {mul for mul, _ in self.irreps_in} | {mul for mul, _ in self.irreps_out}
        if len(muls) != 1:
            raise ValueError(
                f"SymmetricContraction needs one multiplicity everywhere, got {self.irreps_in} -> {self.irreps_out}"
            )
        self.num_channels = muls.pop()
        self.coupling_irreps = _coupling_irreps(self.irreps_in)
        self.D = self.coupling_irreps.dim
        self.contractions = nn.ModuleList()
        for k, (_, ir) in enumerate(self.irreps_out):
            U_list = []
            for nu in range(1, self.correlation + 1):
                U = coupling_basis(self.coupling_irreps, nu, ir)
                if basis_sizes is not None:
                    n = int(basis_sizes[k][nu - 1])
                    if n != U.shape[-1]:
                        V = torch.zeros(*U.shape[:-1], n, dtype=U.dtype)
                        r = min(n, U.shape[-1])
                        V[..., :r] = U[..., :r]
                        U = V
                U_list.append(U)  # float64: exact whatever the default dtype
            self.contractions.append(
                Contraction(self.D, ir, self.correlation, self.num_elements, self.num_channels, U_list)
            )
        self._build_plan()
        self.register_load_state_dict_post_hook(lambda module, incompatible: module._build_plan())

    @property
    def basis_sizes(self) -> list[list[int]]:
        return [[int(c.U(nu).shape[-1]) for nu in range(1, self.correlation + 1)] for c in self.contractions]

    def extra_repr(self) -> str:
        return (f"{self.irreps_in} -> {self.irreps_out}, correlation={self.correlation}, "
                f"elements={self.num_elements}, basis={self.basis_sizes}, monomials={self._num_monomials}")

    # ---- plan: which monomials, symmetrized couplings -----------------------------------------
    @torch.no_grad()
    def _build_plan(self) -> None:
        """Distinct monomials with a nonzero coupling, their build order, and the symmetrized U.

        Called at construction and after every ``load_state_dict`` (the U buffers may change).
        """
        D = self.D
        dev = self.contractions[0].U(1).device
        keep: dict[int, list[tuple[int, ...]]] = {}
        usym: dict[tuple[int, int], torch.Tensor] = {}
        for nu in range(1, self.correlation + 1):
            monos = _monomials(D, nu)
            nz = torch.zeros(len(monos), dtype=torch.bool)
            per_k = []
            for c in self.contractions:
                # Us[K, m, j] = sum of U over the distinct orderings of monomial m
                Us = _sum_over_orderings(c.U(nu).detach().to("cpu", torch.float64), D, nu)
                per_k.append(Us)
                scale = Us.abs().max().item() if Us.numel() else 0.0
                if scale > 0:
                    nz |= (Us.abs() > 1e-12 * scale).any(0).any(-1)
            kept = [m for m, z in zip(monos, nz.tolist()) if z]
            keep[nu] = kept
            sel = torch.tensor([i for i, z in enumerate(nz.tolist()) if z], dtype=torch.long)
            for k, Us in enumerate(per_k):
                usym[(k, nu)] = Us[:, sel, :]  # (d, M_nu, n)
        # build levels: level nu must contain the prefixes of level nu + 1
        levels: dict[int, list[tuple[int, ...]]] = {}
        need = set()
        for nu in range(self.correlation, 1, -1):
            lv = sorted(set(keep[nu]) | need)
            levels[nu] = lv
            need = {m[:-1] for m in lv}
        levels[1] = [(i,) for i in range(D)]
        self._levels = levels
        self._num_monomials = sum(len(keep[nu]) for nu in keep)
        parents, lasts = [], []
        for nu in range(2, self.correlation + 1):
            pos = {m: i for i, m in enumerate(levels[nu - 1])}
            parents.append(torch.tensor([pos[m[:-1]] for m in levels[nu]], dtype=torch.long, device=dev))
            lasts.append(torch.tensor([m[-1] for m in levels[nu]], dtype=torch.long, device=dev))
        self._level_sizes = [len(levels[nu]) for nu in range(1, self.correlation + 1)]
        self._parents, self._lasts = parents, lasts
        self._plan_dev = None
        # symmetrized couplings on the rows of every level (zero for rows that are only prefixes)
        self._usym = {}
        for nu in range(1, self.correlation + 1):
            pos = {m: i for i, m in enumerate(keep[nu])}
            rows = [pos.get(m) for m in levels[nu]]
            for k in range(len(self.contractions)):
                Us = usym[(k, nu)]  # (d, M_kept, n)
                full = Us.new_zeros(Us.shape[0], len(rows), Us.shape[2])
                idx = [i for i, r in enumerate(rows) if r is not None]
                if idx:
                    full[:, idx] = Us[:, [rows[i] for i in idx]]
                self._usym[(k, nu)] = full.to(device=dev)
        # which rows of T each output component reads (structurally nonzero couplings)
        row_used = torch.cat([
            torch.cat([(self._usym[(k, nu)].abs() > 0).any(-1) for nu in range(1, self.correlation + 1)], dim=1)
            for k in range(len(self.contractions))
        ]).cpu()  # (K, R)
        self._jacobian = _JacobianPlan(levels, row_used, D, dev)

    def _folded_weights(self, dtype, device) -> torch.Tensor:
        """:meth:`_fold_weights`, cached in eval mode (the weights are then constants: no gradient
        w.r.t. them is computed; recomputed whenever a weight or coupling tensor changes)."""
        if self.training:
            return self._fold_weights(dtype, device)
        from mlpot.nn.cache import cached_on_weights

        return cached_on_weights(self, "_fold_cache", self._fold_weights, dtype, device)

    def _fold_weights(self, dtype, device) -> torch.Tensor:
        """``T[s, c, K, r] = sum_j Ubar[K, r, j] W[s, j, c]`` over the rows ``r`` of all monomial
        levels (orders 1..correlation stacked) and all outputs ``K``: ``(S, C, K, R)``."""
        out = []
        S, C = self.num_elements, self.num_channels
        for nu in range(1, self.correlation + 1):
            blocks = []
            for k, c in enumerate(self.contractions):
                Us = self._usym[(k, nu)].to(dtype=dtype, device=device)  # (d, R_nu, n)
                if Us.shape[2] == 0:
                    blocks.append(torch.zeros(S, C, Us.shape[0], Us.shape[1], dtype=dtype, device=device))
                else:
                    blocks.append(torch.einsum("Kmj,sjc->scKm", Us, c.W(nu)))
            out.append(torch.cat(blocks, dim=2) if len(blocks) > 1 else blocks[0])
        return torch.cat(out, dim=3) if len(out) > 1 else out[0]

    def _jacobian_table(self, T: torch.Tensor, species: tuple) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """:meth:`_JacobianPlan.table` of the species batch ``species`` (their channels stacked,
        species-major); cached per batch in eval mode (only the batches a call meets are built:
        a many-element model keeps a few tables, not all)."""
        def build():
            Ts = T[species[0]] if len(species) == 1 else T.index_select(0, torch.tensor(species, device=T.device))
            return self._jacobian.table(Ts.reshape(-1, *T.shape[2:]))

        if self.training:
            return build()
        from mlpot.nn.cache import cached_on_weights

        tables = cached_on_weights(self, "_jacobian_cache", lambda dtype, device: {}, T.dtype, T.device)
        if species not in tables:
            with torch.no_grad():
                tables[species] = build()
        return tables[species]

    def _index_plan(self, device):
        key = str(device)
        cache = getattr(self, "_plan_dev", None)
        if cache is None or cache[0] != key:
            cache = (key, [t.to(device) for t in self._parents], [t.to(device) for t in self._lasts])
            self._plan_dev = cache
        return cache[1:]

    def _triton_forward(self, node_feats: torch.Tensor, node_attrs: torch.Tensor) -> torch.Tensor:
        """The fused kernels of :mod:`mlpot.kernels.symmetric_contraction` (same U, same weights).

        All output irreps run as one table (their ``U`` block-diagonal: output rows and weight
        columns of each irrep apart), so one launch reads the rows of ``A`` once for all of them."""
        from mlpot.o3.backend import implementation, kernels_module

        mod = kernels_module("symmetric_contraction")
        contract = implementation("symmetric_contraction", "triton")
        N, C, _ = node_feats.shape
        A = node_feats.transpose(1, 2).contiguous()  # (N, D, C)
        elem = node_attrs.argmax(dim=-1)
        nus = range(1, self.correlation + 1)
        key = tuple((id(c.U(nu)), c.U(nu)._version) for c in self.contractions for nu in nus)
        cache = getattr(self, "_triton_tables", None)
        if cache is None or cache[0] != key:
            cache = (key, mod.build_table([self._joint_U(nu).to(node_feats.dtype) for nu in nus]))
            self._triton_tables = cache
        Ws = [torch.cat([c.W(nu) for c in self.contractions], dim=1) for nu in nus]
        out = contract(A, elem, Ws, cache[1])  # (N, sum of d, C)
        res = [o.transpose(1, 2).reshape(N, C * o.shape[1])
               for o in torch.split(out, [c.ir_out.dim for c in self.contractions], dim=1)]
        return torch.cat(res, dim=-1)

    def _joint_U(self, nu: int) -> torch.Tensor:
        """``U_nu`` of all output irreps as one block-diagonal tensor ``(sum d, D, .., D, sum n)``."""
        Us = [c.U(nu) for c in self.contractions]
        rows, cols = sum(u.shape[0] for u in Us), sum(u.shape[-1] for u in Us)
        joint = Us[0].new_zeros(rows, *Us[0].shape[1:-1], cols)
        r = q = 0
        for u in Us:
            joint[r:r + u.shape[0], ..., q:q + u.shape[-1]] = u
            r, q = r + u.shape[0], q + u.shape[-1]
        return joint

    def forward(self, node_feats: torch.Tensor, node_attrs: torch.Tensor) -> torch.Tensor:
        """``node_feats (N, C, D)``, ``node_attrs (N, S)`` one-hot -> ``(N, irreps_out.dim)``."""
        N, C, D = node_feats.shape
        if D != self.D or C != self.num_channels:
            raise ValueError(f"node_feats must be (N, {self.num_channels}, {self.D}), got {tuple(node_feats.shape)}")
        if self.backend != "reference":
            # the CPU kernels take constant weights only (eval mode, no grad, or frozen weights: the
            # cases where _folded_weights needs no gradient); auto otherwise keeps the reference
            constant = not (self.training and torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()))
            choice = select_backend(self.op, self.backend, node_feats.device, constant_weights=constant)
            if choice == "triton":
                return self._triton_forward(node_feats, node_attrs)
            if choice == "cpu":
                return implementation(self.op, "cpu")(self, node_feats, node_attrs)
        return self.reference_forward(node_feats, node_attrs)

    def reference_forward(self, node_feats: torch.Tensor, node_attrs: torch.Tensor) -> torch.Tensor:
        """The torch reference (registry op ``symmetric_contraction``, backend ``reference``)."""
        N, C, D = node_feats.shape
        T = self._folded_weights(node_feats.dtype, node_feats.device)  # (S, C, K, R)
        S = self.num_elements
        K = sum(c.ir_out.dim for c in self.contractions)
        parents, lasts = self._index_plan(node_feats.device)
        # the Jacobian path (constant weights) reads the nodes where they are; the chain-rule
        # path wants them sorted by species
        jac = not T.requires_grad
        order = None
        if S == 1 or N == 0:
            counts = [N] + [0] * (S - 1)
            x = node_feats
        else:
            species = node_attrs.argmax(dim=-1)
            order = torch.argsort(species, stable=True)
            counts = torch.bincount(species, minlength=S).tolist()
            x = node_feats if jac else node_feats.index_select(0, order)
        x = x.contiguous()
        nodes = (grad_node(x), grad_node(T)) if torch.is_grad_enabled() else (None, None)
        jacobian = (self._jacobian, lambda s: self._jacobian_table(T, s))
        out = _SymmetricContractionFn.apply(
            x, T, (parents, lasts, counts, int(self.chunk_size), K, nodes, jacobian, order if jac else None)
        )  # (N, C, K), in node order (species-sorted on the chain-rule path)
        if order is not None and not jac:
            inv = torch.empty_like(order)
            inv[order] = torch.arange(N, device=order.device)
            out = out.index_select(0, inv)
        if len(self.contractions) == 1:  # (N, C, d) is already e3nn's C x d layout
            return out.reshape(N, C * K)
        # (N, C, K) -> e3nn's layout, irrep by irrep (C x d each): one gather
        return out.reshape(N, C * K).index_select(1, self._output_perm(C, K, node_feats.device))

    def _output_perm(self, C: int, K: int, device) -> torch.Tensor:
        """Columns of ``(N, C * K)`` in e3nn's order: per output irrep ``k``, ``c * d_k + m`` reads ``(c, off_k + m)``."""
        key = (C, K, str(device))
        cache = getattr(self, "_out_perm", None)
        if cache is None or cache[0] != key:
            cols, off = [], 0
            for con in self.contractions:
                d = con.ir_out.dim
                cols += [c * K + off + m for c in range(C) for m in range(d)]
                off += d
            cache = (key, torch.tensor(cols, dtype=torch.long, device=device))
            self._out_perm = cache
        return cache[1]


def _levels(x_t: torch.Tensor, parents, lasts, sizes, inplace: bool):
    """``x_t (D, C, n)`` -> ``(buf, factors)``: all monomial levels stacked, ``buf (R, C, n)``
    (level nu = products of nu factors), and the two gathered factors of every level > 1."""
    factors = []
    if inplace:
        buf = x_t.new_empty(sum(sizes), *x_t.shape[1:])
        buf[: sizes[0]] = x_t
        off, prev = sizes[0], buf[: sizes[0]]
        for par, last, r in zip(parents, lasts, sizes[1:]):
            f1, f2 = prev.index_select(0, par), x_t.index_select(0, last)
            cur = buf[off : off + r]
            torch.mul(f1, f2, out=cur)
            factors.append((f1, f2))
            off, prev = off + r, cur
        return buf, factors
    levels = [x_t]
    for par, last in zip(parents, lasts):
        f1, f2 = levels[-1].index_select(0, par), x_t.index_select(0, last)
        levels.append(f1 * f2)
        factors.append((f1, f2))
    return (torch.cat(levels, dim=0) if len(levels) > 1 else levels[0]), factors


def _chunks(counts: list[int], chunk: int) -> list[tuple[int, int, list[tuple[int, int, int]]]]:
    """Node ranges ``(a, b, [(species, lo, hi), ...])`` of at most ``chunk`` species-sorted nodes."""
    bounds, start = [], 0
    for s, n_s in enumerate(counts):
        bounds.append((s, start, start + n_s))
        start += n_s
    out = []
    for a in range(0, start, chunk):
        b = min(a + chunk, start)
        segs = [(s, max(lo, a) - a, min(hi, b) - a) for s, lo, hi in bounds if lo < b and hi > a]
        out.append((a, b, segs))
    return out


def _sc_forward(x, T, parents, lasts, counts, chunk, K, keep: list | None = None):
    """``x (N, C, D)`` species-sorted, ``T (S, C, K, R)`` -> ``(N, C, K)``.

    ``keep``: if a list, receives ``(buf, factors)`` of every chunk for the backward.
    """
    N, C, D = x.shape
    sizes = [D] + [len(p) for p in parents]
    out = x.new_zeros(N, C, K)
    for a, b, segs in _chunks(counts, chunk):
        x_t = x[a:b].permute(2, 1, 0).contiguous()  # (D, C, n)
        buf, factors = _levels(x_t, parents, lasts, sizes, inplace=True)
        if keep is not None:
            keep.append((buf, factors))
        for s, lo, hi in segs:
            res = torch.bmm(T[s], buf[:, :, lo:hi].permute(1, 0, 2))  # (C, K, n_s)
            out[a + lo : a + hi] = res.permute(2, 0, 1)
    return out


def _sc_backward(g, x, T, parents, lasts, counts, chunk, need_x, need_T, kept=None):
    """Gradients of :func:`_sc_forward` (torch code, chunk by chunk; differentiable when a graph
    is being built). ``kept``: the forward's monomials, else they are recomputed."""
    inplace = not torch.is_grad_enabled()
    D = x.shape[2]
    sizes = [D] + [len(p) for p in parents]
    offs = [sum(sizes[:i]) for i in range(len(sizes))]
    gx_parts = []
    gT = torch.zeros_like(T) if need_T else None
    # (S, C, R, K): dL/d(monomials) = T^T g; a strided view, bmm takes it transposed (no copy of T,
    # which is the largest tensor of a small system's call)
    TK = T.transpose(2, 3) if need_x else None
    for i_chunk, (a, b, segs) in enumerate(_chunks(counts, chunk)):
        if kept is not None:
            buf, factors = kept[i_chunk]
        else:
            x_t = x[a:b].permute(2, 1, 0).contiguous()  # (D, C, n)
            buf, factors = _levels(x_t, parents, lasts, sizes, inplace=inplace)
        gc = g[a:b].permute(1, 2, 0)  # (C, K, n)
        if need_T:
            for s, lo, hi in segs:
                upd = torch.bmm(gc[:, :, lo:hi], buf[:, :, lo:hi].permute(1, 2, 0))  # (C, K, R)
                gT = gT.index_add(0, torch.tensor([s], device=x.device), upd[None])
        if not need_x:
            continue
        x_t = buf[:D]
        parts = [torch.bmm(TK[s], gc[:, :, lo:hi]) for s, lo, hi in segs]  # (C, R, n_s)
        h = (parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)).permute(1, 0, 2).contiguous()
        H = [h[o : o + r] for o, r in zip(offs, sizes)]  # gradient w.r.t. each level (R_nu, C, n)
        gx_t = H[0]
        g_level = H[-1]
        for nu in range(len(sizes) - 1, 0, -1):  # level nu = level[nu-1][par] * x[last]
            par, last = parents[nu - 1], lasts[nu - 1]
            f1, f2 = factors[nu - 1]  # level[nu-1][par], x[last]
            gx_t = gx_t.index_add(0, last, g_level * f1)
            if nu - 1 == 0:  # level 0 is x itself
                gx_t = gx_t.index_add(0, par, g_level * f2)
            else:
                g_level = H[nu - 1].index_add(0, par, g_level * f2)
        gx_parts.append(gx_t.permute(2, 1, 0))
    gx = (torch.cat(gx_parts) if gx_parts else torch.zeros_like(x)) if need_x else None
    return gx, gT


class _JacobianPlan:
    r"""The contraction and its input gradient on the lower monomials (inference: constant weights).

    For every node the contraction is a polynomial :math:`B_K(x)` of degree :math:`\nu_{max}`
    in the :math:`D` components of :math:`x` (per channel). Its Jacobian is a polynomial of one
    degree less, so with the monomials :math:`m_q` of degrees :math:`0 .. \nu_{max} - 1` that
    occur in the derivatives (a basis of ``Q`` rows, built like the forward's levels),

    .. math::  \partial B_K / \partial x_i = \sum_q T'_{z, c, (K, i), q}\, m_q, \qquad
               T'_{(K, i), q} = \sum_r T_{K, r}\, \partial m_r / \partial x_i\,\big|_{m_q},

    and :math:`\partial L / \partial x_i = \sum_K g_K\, \partial B_K / \partial x_i`: a
    ``(C, K D, Q) @ (C, Q, n)`` product per species instead of the reverse sweep through all the
    forward's levels (``R`` rows, several passes each): fewer rows (``Q`` is about a third of
    ``R`` at correlation 3), a matrix product instead of a rank-``K`` one. The output itself is
    :math:`B_K = \sum_i x_i \sum_q F_{(K, i), q}\, m_q` on the same basis (every monomial row
    written once as :math:`x_{last} \cdot m_{prefix}`). :math:`F` and :math:`T'` are sparse
    re-indexings of :math:`T` (at most :math:`\nu` entries per row), cached per species in
    eval mode.

    Both are block-sparse: a row ``(K, i)`` reads only the monomials whose product with
    :math:`x_i` couples to ``K``. The rows and monomials are split into the connected components
    of that pattern, the symmetry classes of the couplings (parity and the reflections of the
    real spherical harmonics: 8 blocks holding 13 % of the dense products for MACE's
    ``0e + 1o`` output at correlation 3). Many small matrix products cost more per matrix than
    their arithmetic, so the blocks run in groups (:meth:`_group_blocks`), each padded to its
    largest block: one batched product per group, over species x channels x blocks.
    """

    def __init__(self, levels: dict, row_used: torch.Tensor, D: int, device):
        nu_max = max(levels)
        rows = [m for nu in range(1, nu_max + 1) for m in levels[nu]]
        used = {m for r, m in enumerate(rows) if bool(row_used[:, r].any())}
        derivs = {}  # (row monomial, i) -> (derivative monomial, multiplicity)
        for nu in range(1, nu_max + 1):
            for m in levels[nu]:
                if m not in used:
                    continue
                for i in sorted(set(m)):
                    rest = list(m)
                    rest.remove(i)
                    derivs[(m, i)] = (tuple(rest), float(m.count(i)))
        # the derivative basis, prefix-closed level by level (degree 1 is all of x)
        need = {d for d, _ in derivs.values() if len(d) >= 2}
        sets = {deg: {m for m in need if len(m) == deg} for deg in range(2, nu_max)}
        for deg in range(nu_max - 1, 2, -1):  # every monomial is built from its prefix one level down
            sets[deg - 1] |= {m[:-1] for m in sets[deg]}
        dlevels = {1: [(i,) for i in range(D)], **{deg: sorted(v) for deg, v in sets.items()}}
        self.sizes = [len(dlevels[d]) for d in range(1, nu_max)]
        q_of = {(): 0}
        for deg in range(1, nu_max):
            for m in dlevels[deg]:
                q_of[m] = len(q_of)
        # each level > 1 from rows of the basis itself: m = m[:-1] * x_{m[-1]}
        self.parents = [torch.tensor([q_of[m[:-1]] for m in dlevels[deg]], dtype=torch.long, device=device)
                        for deg in range(2, nu_max)]
        self.lasts = [torch.tensor([q_of[m[-1:]] for m in dlevels[deg]], dtype=torch.long, device=device)
                      for deg in range(2, nu_max)]
        self.Q = len(q_of)
        self.D = D
        #: ``(K, R)`` which rows of the folded weights each output reads (structural nonzeros)
        self.row_used = row_used
        # the basis rows of the groups are built as products of two rows of the lower levels
        # (degrees <= low: 1, x and, at correlation 4, the squares): a row of degree <= low is
        # itself times 1, a top-degree row its prefix times its last factor
        low = min(max(1, nu_max - 2), nu_max - 1)
        self.low_rows = 1 + sum(self.sizes[:low])
        self.low_levels = max(0, low - 1)  # levels of degree >= 2 in the lower rows
        pre, fac = list(range(self.Q)), [0] * self.Q
        for m, q in q_of.items():
            if len(m) > low:
                pre[q], fac[q] = q_of[m[:-1]], q_of[m[-1:]]
        self._pre, self._fac = torch.tensor(pre, dtype=torch.long), torch.tensor(fac, dtype=torch.long)
        row_of = {m: r for r, m in enumerate(rows)}
        src, dst, coef = [], [], []
        K = row_used.shape[0]
        parent = list(range(K * D + self.Q))  # union-find over Jacobian rows (K, i) and monomials q

        def find(a):
            while parent[a] != a:
                parent[a] = parent[parent[a]]
                a = parent[a]
            return a

        touched = set()  # the Jacobian rows and monomials with a nonzero entry
        for (m, i), (d, k) in sorted(derivs.items()):
            src.append(row_of[m])
            dst.append(i * self.Q + q_of[d])
            coef.append(k)
            col = K * D + q_of[d]
            for kk in torch.nonzero(row_used[:, row_of[m]]).flatten().tolist():
                parent[find(kk * D + i)] = find(col)
                touched |= {kk * D + i, col}
        self.src = torch.tensor(src, dtype=torch.long, device=device)
        self.dst = torch.tensor(dst, dtype=torch.long, device=device)
        self.coef = torch.tensor(coef, dtype=torch.float64, device=device)
        # the forward on the same basis: monomial m_r = x_{m[-1]} * m[:-1] (one entry per row)
        fsrc = [row_of[m] for m in rows if m in used]
        self.fsrc = torch.tensor(fsrc, dtype=torch.long, device=device)
        self.fdst = torch.tensor([m[-1] * self.Q + q_of[m[:-1]] for m in rows if m in used], dtype=torch.long,
                                 device=device)
        comps: dict[int, tuple[list, list]] = {}
        for node in sorted(touched):
            rows_b, cols_b = comps.setdefault(find(node), ([], []))
            (rows_b if node < K * D else cols_b).append(node if node < K * D else node - K * D)
        #: per block: Jacobian rows (flat ``K * D + i``) and monomial columns, both sorted
        self.blocks = [(r, c) for r, c in comps.values()]
        self.K = K
        self.groups = self._group_blocks(device)

    #: cost model of one group's batched product, in multiply-adds per channel (measured with
    #: ``torch.bmm`` on one CPU core): a fixed cost per call, a fixed cost per matrix, and products
    #: of fewer than 400 multiply-adds per matrix (torch's unblocked loop) cost this many times more
    group_cost = {"call": 2000, "matrix": 1800, "nodes": 16, "small": 400, "small_factor": 20}

    def _group_blocks(self, device) -> list[dict]:
        """The blocks in groups of similar shape, each group one batched matrix product.

        The blocks sorted by size are cut into runs that minimise :attr:`group_cost` (padded
        to the largest rows x columns of the run): many small matrices cost more per matrix than
        their products, so MACE's ``0e + 1o`` output at correlation 3 (8 blocks) runs as 2
        groups and its ``0e`` output as 2. Per group: ``r, c`` (padded shape), ``table_index``
        (the entries of the padded ``(K D + 1, Q + 1)`` table, whose last row and column are
        zero), ``cols`` (basis rows, padding -> the constant monomial, which meets a zero
        column), ``k, i`` of every row (padding -> 0, a zero row)."""
        KD, Q, D = self.K * self.D, self.Q, self.D
        order = sorted(self.blocks, key=lambda b: (-len(b[1]), -len(b[0])))
        cost = self.group_cost

        def run_cost(i, j):  # blocks order[i:j] as one group
            r, c = max(len(b[0]) for b in order[i:j]), max(len(b[1]) for b in order[i:j])
            fma = r * c * cost["nodes"]
            per = cost["matrix"] + fma * (cost["small_factor"] if fma < cost["small"] else 1)
            return cost["call"] + (j - i) * per

        best, cut = [0.0] + [float("inf")] * len(order), [0] * (len(order) + 1)
        for j in range(1, len(order) + 1):
            for i in range(j):
                if best[i] + run_cost(i, j) < best[j]:
                    best[j], cut[j] = best[i] + run_cost(i, j), i
        members, j = [], len(order)
        while j > 0:
            members.insert(0, order[cut[j]:j])
            j = cut[j]
        groups = []
        for blks in members:
            r, c = max(len(b[0]) for b in blks), max(len(b[1]) for b in blks)
            rows = torch.full((len(blks), r), KD, dtype=torch.long)
            cols = torch.full((len(blks), c), Q, dtype=torch.long)
            for j, (rb, cb) in enumerate(blks):
                rows[j, : len(rb)] = torch.tensor(rb, dtype=torch.long)
                cols[j, : len(cb)] = torch.tensor(cb, dtype=torch.long)
            real = rows < KD
            groups.append({
                "r": r, "c": c,
                "table_index": (rows[:, :, None] * (Q + 1) + cols[:, None, :]).reshape(-1).to(device),
                "pre": self._pre[torch.where(cols < Q, cols, 0)].reshape(-1).to(device),
                "fac": self._fac[torch.where(cols < Q, cols, 0)].reshape(-1).to(device),
                "k": torch.where(real, rows // D, 0).reshape(-1).to(device),
                "i": torch.where(real, rows % D, 0).reshape(-1).to(device),
            })
        return groups

    def table(self, Ts: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        r"""``T (C', K, R)`` (``C'`` = species x channels of a batch) -> ``(F, T')``, each a list of
        ``(C' * B_g, r_g, c_g)`` padded block tables per group (:meth:`_group_blocks`):
        :math:`F_{(K, i), q}` gives the output, :math:`B_K = \sum_i x_i \sum_q F_{(K, i), q} m_q`
        (every monomial row written once as :math:`x_{last} \cdot m_{prefix}`), :math:`T'` the Jacobian."""
        Cp, K, R = Ts.shape
        dev = Ts.device
        out = []
        for src, dst, coef in ((self.fsrc, self.fdst, None), (self.src, self.dst, self.coef)):
            flat = Ts.reshape(Cp * K, R).index_select(1, src.to(dev))
            if coef is not None:
                flat = flat * coef.to(Ts)
            full = Ts.new_zeros(Cp * K, self.D * self.Q).index_add_(1, dst.to(dev), flat).reshape(Cp, K * self.D, self.Q)
            full = torch.nn.functional.pad(full, (0, 1, 0, 1)).reshape(Cp, -1)  # zero last row and column
            out.append([full.index_select(1, g["table_index"].to(dev)).view(-1, g["r"], g["c"]) for g in self.groups])
        return out[0], out[1]

    def on(self, device) -> dict:
        """The index tensors on ``device`` (cached): ``parents``, ``lasts`` and ``groups``."""
        key = str(device)
        if getattr(self, "_dev", (None,))[0] != key:
            self._dev = (key, {
                "parents": [t.to(device) for t in self.parents], "lasts": [t.to(device) for t in self.lasts],
                "groups": [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in g.items()} for g in self.groups],
            })
        return self._dev[1]

    def basis(self, x_c: torch.Tensor) -> list[torch.Tensor]:
        """``x_c (C', D, n)`` -> the monomials of every group of blocks, ``(C' * B_g, c_g, n)``
        each: the lower rows (1, x, then each level from the one below, up to degree
        ``max(1, correlation - 2)``), and each group's rows as products of two of them."""
        C, D, n = x_c.shape
        idx = self.on(x_c.device)
        buf = x_c.new_empty(C, self.low_rows, n)
        buf[:, 0].fill_(1)
        if self.low_rows > 1:  # correlation > 1 (else the Jacobian is constant)
            buf[:, 1 : 1 + D] = x_c
            off = 1 + D
            for par, last, r in list(zip(idx["parents"], idx["lasts"], self.sizes[1:]))[: self.low_levels]:
                torch.mul(buf.index_select(1, par), buf.index_select(1, last), out=buf[:, off : off + r])
                off += r
        return [torch.mul(buf.index_select(1, g["pre"]), buf.index_select(1, g["fac"])).view(-1, g["c"], n)
                for g in idx["groups"]]


#: species are padded to a common node count and run as one batch when that adds at most this
#: fraction of nodes (or the batch is this small anyway); else one species at a time
SPECIES_BATCH_PADDING, SPECIES_BATCH_SMALL = 1.5, 64


class _Item(NamedTuple):
    """A work item of the Jacobian path: ``species`` (a tuple), each padded to ``width`` nodes.
    ``a:b``: the item's nodes when they are one slice of one species (``gather`` None); else
    ``gather`` the node of every padded slot (padding repeats a node of its species), ``pos``
    the filled slots and ``nodes`` their nodes."""

    species: tuple
    width: int
    a: int = 0
    b: int = 0
    gather: torch.Tensor | None = None
    pos: torch.Tensor | None = None
    nodes: torch.Tensor | None = None


def _jacobian_items(counts: list[int], step: int, device) -> list[_Item]:
    """:func:`_build_jacobian_items`, cached (an MD run meets the same species counts every step)."""
    key = (tuple(counts), int(step), str(device))
    items = _ITEMS_CACHE.get(key)
    if items is None:
        if len(_ITEMS_CACHE) >= 64:
            _ITEMS_CACHE.clear()
        items = _ITEMS_CACHE[key] = _build_jacobian_items(counts, step, device)
    return items


_ITEMS_CACHE: dict = {}


def _build_jacobian_items(counts: list[int], step: int, device) -> list[_Item]:
    """Work items (:class:`_Item`) of the Jacobian path over the species-sorted nodes: at most
    ``step`` nodes each for one species (a slice), at most twice that (equal widths) for species
    padded into one batch (a gather)."""
    present = [s for s, n in enumerate(counts) if n > 0]
    starts = [sum(counts[:s]) for s in range(len(counts))]
    items = []
    if not present:
        return items
    widest = max(counts[s] for s in present)
    padded = len(present) * widest
    if len(present) > 1 and (padded <= SPECIES_BATCH_PADDING * sum(counts) or padded <= SPECIES_BATCH_SMALL):
        # as few items as keep each within twice the step, of equal widths (no small remainder)
        n_items = max(1, -(-padded // (2 * step)))
        wstep = -(-widest // n_items)
        for j0 in range(0, widest, wstep):
            w = min(wstep, widest - j0)
            t = torch.arange(w, device=device)
            gather, pos, nodes = [], [], []
            for b, s in enumerate(present):
                filled = max(0, min(w, counts[s] - j0))
                node = starts[s] + j0 + t
                gather.append(torch.where(t < filled, node, starts[s]))
                pos.append(b * w + t[:filled])
                nodes.append(node[:filled])
            items.append(_Item(tuple(present), w, gather=torch.cat(gather), pos=torch.cat(pos), nodes=torch.cat(nodes)))
        return items
    for s in present:
        for a in range(starts[s], starts[s] + counts[s], step):
            b = min(a + step, starts[s] + counts[s])
            items.append(_Item((s,), b - a, a=a, b=b))
    return items


def _in_node_order(items: list[_Item], order: torch.Tensor | None) -> list[_Item]:
    """:func:`_jacobian_items` (species-sorted positions) on nodes in their own order: ``order[p]``
    is the node at sorted position ``p`` (None: the nodes are sorted; the items as they are).
    A one-species slice becomes a gather without padding."""
    if order is None:
        return items
    out = []
    for it in items:
        if it.gather is None:
            nodes = order[it.a : it.b]
            out.append(_Item(it.species, it.width, gather=nodes, pos=torch.arange(it.width, device=order.device),
                             nodes=nodes))
        else:
            out.append(it._replace(gather=order.index_select(0, it.gather), nodes=order.index_select(0, it.nodes)))
    return out


def _jacobian_step(x: torch.Tensor, plan, chunk_bytes: int = 8 << 20) -> int:
    """Nodes per work item: the item's basis and tables stay within ``chunk_bytes``."""
    C = x.shape[1]
    return max(1, chunk_bytes // max(1, C * (plan.K * plan.D + 2 * plan.Q) * x.element_size()))


def _jacobian_pass(x, src, counts, jacobian, out_dim: int, items, bases=None, keep=None):
    r"""One pass of :class:`_JacobianPlan` over the nodes: the forward (``src`` None:
    :math:`B_K = \sum_i x_i (F m)_{(K, i)}`, ``(N, C, K)``) or the input gradient (``src = g``:
    :math:`\partial x_i = \sum_K g_K (T' m)_{(K, i)}`, ``(N, C, D)``); one batched product per
    group of blocks and work item (:func:`_jacobian_items`), species of an item batched with the
    channels. ``bases``: the forward's per-item bases, else built here (and appended to ``keep``)."""
    plan, tables = jacobian
    N, C, D = x.shape
    forward = src is None
    src = x if forward else src
    out = x.new_zeros(N, C, out_dim)
    groups = plan.on(x.device)["groups"]
    for i_item, item in enumerate(items):
        S_b, w = len(item.species), item.width
        if item.gather is None:  # one species, nodes a:b: views
            x_c, s_c = (t[item.a : item.b].permute(1, 2, 0) for t in (x, src))  # (C, ., n)
            acc = out[item.a : item.b].permute(1, 2, 0)  # written in place
        else:  # species padded to w nodes each, channels of all species in one batch
            def batch(t):
                return t.index_select(0, item.gather).view(S_b, w, C, -1).permute(0, 2, 3, 1).reshape(-1, t.shape[2], w)
            x_c = batch(x)
            s_c = x_c if forward else batch(src)
            acc = x.new_zeros(x_c.shape[0], out_dim, w)
        basis = bases[i_item] if bases is not None else plan.basis(x_c)
        if keep is not None:
            keep.append(basis)
        tabs = tables(item.species)[0 if forward else 1]
        for g, tab, m in zip(groups, tabs, basis):
            P = torch.bmm(tab, m).view(x_c.shape[0], -1, w)  # (C', B_g * r_g, n)
            take, put = (g["i"], g["k"]) if forward else (g["k"], g["i"])
            acc.index_add_(1, put, P.mul_(s_c.index_select(1, take)))
        if item.gather is not None:
            rows = acc.view(S_b, C, out_dim, w).permute(0, 3, 1, 2).reshape(-1, C, out_dim)
            out.index_copy_(0, item.nodes, rows.index_select(0, item.pos))
    return out


class _SymmetricContractionFn(torch.autograd.Function):
    """Chunked symmetric contraction; saves its inputs (and, if small, the monomials)."""

    #: keep the monomials of the forward for the backward when they take less than this (bytes)
    keep_bytes = 256 << 20

    @staticmethod
    def forward(ctx, x, T, meta):
        """``meta``: ``(parents, lasts, counts, chunk, K, nodes, jacobian, order)``; ``order``
        (Jacobian path only): the species-sorted order of the nodes of ``x`` (None: ``x`` is
        sorted)."""
        parents, lasts, counts, chunk, K, _, _, order = meta
        ctx.meta = meta
        ctx.save_for_backward(x, T)
        rows = x.shape[2] + sum(3 * len(p) for p in parents)
        small = rows * x.shape[0] * x.shape[1] * x.element_size() <= _SymmetricContractionFn.keep_bytes
        if not T.requires_grad:  # constant weights (inference): the Jacobian's basis and blocks
            Q = meta[6][0].Q
            keep = [] if Q * x.shape[0] * x.shape[1] * x.element_size() <= _SymmetricContractionFn.keep_bytes else None
            ctx.items = _in_node_order(_jacobian_items(counts, _jacobian_step(x, meta[6][0]), x.device), order)
            ctx.kept, ctx.bases = None, keep
            return _jacobian_pass(x, None, counts, meta[6], K, ctx.items, keep=keep)
        if order is not None:
            raise RuntimeError("_SymmetricContractionFn: unsorted nodes need constant weights (the Jacobian path)")
        keep = [] if small else None  # the monomials, for a backward without a graph
        out = _sc_forward(x, T, parents, lasts, counts, chunk, K, keep)
        ctx.kept, ctx.bases = keep, None
        return out

    @staticmethod
    def backward(ctx, g):
        x, T = ctx.saved_tensors
        parents, lasts, counts, chunk, _, nodes, jacobian, order = ctx.meta
        need_x = needed(ctx.needs_input_grad[0], nodes[0])
        need_T = needed(ctx.needs_input_grad[1], nodes[1])
        kept, bases = ctx.kept, ctx.bases
        ctx.kept = ctx.bases = None
        if need_x and not need_T and not torch.is_grad_enabled():
            items = getattr(ctx, "items", None) or _in_node_order(
                _jacobian_items(counts, _jacobian_step(x, jacobian[0]), x.device), order)
            ctx.items = None
            return _jacobian_pass(x, g.contiguous(), counts, jacobian, x.shape[2], items, bases=bases), None, None
        kept = kept if not torch.is_grad_enabled() else None
        g = g.contiguous()
        if order is not None:  # the chain rule on the species-sorted nodes (a graph for second derivatives)
            x, g, kept = x.index_select(0, order), g.index_select(0, order), None
        gx, gT = _sc_backward(g, x, T, parents, lasts, counts, chunk, need_x, need_T, kept)
        if order is not None and gx is not None:
            gx = torch.zeros_like(gx).index_add(0, order, gx)
        return gx, gT, None
