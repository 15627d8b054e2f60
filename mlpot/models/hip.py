r"""HIP: a direct Hessian head (Hessian Interatomic Potentials), for any mlpot model.

The head reads the invariant per-atom features :math:`h_i` a model returns (``node_features``)
and the edge geometry, builds its own equivariant node features of degree 1 and 2,

.. math::

    v_i^c = \sum_{j \in \mathcal N(i)} \phi^{(1)}_c(r_{ij}, h_j)\, \hat u_{ij},\qquad
    T_i^c = \sum_{j \in \mathcal N(i)} \phi^{(2)}_c(r_{ij}, h_j)\, (\hat u_{ij}\hat u_{ij}^T - \tfrac13\mathbb 1),

(:math:`\hat u_{ij}` the unit vector from :math:`i` to :math:`j`, :math:`\phi` = radial basis times
envelope times a linear map of :math:`h_j`), and predicts for every edge within the cutoff a
symmetric :math:`3\times3` block from the degree :math:`\le 2` tensors of the pair,

.. math::

    B_{ij} = f(r_{ij}) \Big[ a\,\mathbb 1 + b\,\hat u\hat u^T
       + \sum_c k^1_c\, \tfrac12 (v_i^c v_j^{cT} + v_j^c v_i^{cT})
       + k^2_c\, (T_i^c + T_j^c)
       + k^3_c\, \tfrac12 (\hat u\, w^{cT} + w^c \hat u^T)
       + k^4_c\, (v_i^c v_i^{cT} + v_j^c v_j^{cT}) \Big],\quad w^c = v_i^c - v_j^c,

with scalar coefficients :math:`a, b, k` from an MLP of the exchange-symmetric pair features
:math:`(h_i + h_j, h_i \odot h_j, \text{radial}(r_{ij}))` and :math:`f` the cutoff envelope.
Every term is unchanged when :math:`i` and :math:`j` are exchanged (:math:`\hat u \to -\hat u`,
:math:`w \to -w`), so :math:`B_{ij} = B_{ji} = B_{ji}^T`; every term is a product of an even
number of vectors, so :math:`B \to Q B Q^T` for all :math:`Q \in O(3)`.

**Pair part.** Off-diagonal blocks :math:`H_{ij} = \sum_{e: i \leftarrow j} B_e` (periodic
images of the same pair add up) and diagonal blocks :math:`H_{ii} = -\sum_{j \ne i} H_{ij}`, i.e.
:math:`\sum_e (e_i - e_j)(e_i - e_j)^T \otimes B_e` in the atom basis :math:`e_i`.

**Many-body part.** Pair blocks are symmetric, but the off-diagonal blocks of a many-body
Hessian are not (for an embedding energy :math:`F(\rho_i)`, :math:`\rho_i = \sum_j g(r_{ij})`, the
term :math:`F''(\rho_i) \nabla\rho_i \nabla\rho_i^T` couples every two neighbours of :math:`i`).
With per-edge vectors :math:`w^c_{ij} = \psi_c(r_{ij}, h_i, h_j)\, f(r_{ij})\, \hat u_{ij}` and
per-atom scalars :math:`s^c_i`, the head adds

.. math::

    \sum_{i, c} s_i^c\, g_{ic} g_{ic}^T,\qquad g_{ic} = \sum_{j \in \mathcal N(i)} (e_j - e_i) \otimes w^c_{ij},

computed block by block over the triplets :math:`(j, i, k)` of neighbours of :math:`i` (including
:math:`i` itself, with vector :math:`-\sum_j w^c_{ij}`). It couples neighbours of neighbours and gives
off-diagonal blocks an antisymmetric part.

Both parts have :math:`\sum_j H_{ij} = 0` (each is a sum of terms :math:`D^T K D` where every
row of :math:`D` is a difference :math:`e_a - e_b`), so the translational sum rule holds by
construction; both are symmetric and :math:`H \to (\mathbb 1_N \otimes Q) H (\mathbb 1_N \otimes Q)^T`.
Blocks vanish smoothly at the cutoff with :math:`f`.

**Hook.** A model supports ``hessian_head: true`` (or a dict of head options ``channels``,
``num_rbf``, ``hidden``) by calling :func:`attach_hessian_head` once at the end of its
constructor with the width of its ``node_features``; :meth:`PotentialModel.forward` then
returns ``hessian`` for ``compute_hessian=True, hessian_method="direct"`` (and in training).
"""
from __future__ import annotations

import torch
from torch import nn

from mlpot.errors import ConfigError
from mlpot.models.hessian import symmetrize
from mlpot.nn.radial import RadialEmbeddingBlock

__all__ = ["HIPHessianHead", "attach_hessian_head", "assemble_hessian", "many_body_hessian", "triplet_indices"]

_OPTIONS = ("channels", "num_rbf", "hidden")


def triplet_indices(center: torch.Tensor, num_centers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All ordered pairs ``(a, b)`` of entries with the same ``center`` (``a == b`` included):
    index tensors of length ``sum_i d_i^2`` for ``d_i`` entries per center."""
    order = torch.argsort(center, stable=True)
    counts = torch.bincount(center, minlength=num_centers)
    start = torch.cumsum(counts, 0) - counts
    reps = counts[center[order]]  # partners of each entry
    a = torch.repeat_interleave(order, reps)
    first = torch.cumsum(reps, 0) - reps
    rank = torch.arange(a.numel(), device=center.device) - torch.repeat_interleave(first, reps)
    b = order[start[center[a]] + rank]
    return a, b


def many_body_hessian(w: torch.Tensor, s: torch.Tensor, sender: torch.Tensor, receiver: torch.Tensor,
                      num_atoms: int) -> torch.Tensor:
    r""":math:`\sum_{i,c} s_i^c g_{ic} g_{ic}^T` (module docstring) as a dense ``(N, N, 3, 3)`` block
    array, from edge vectors ``w (E, C, 3)`` (edge ``j -> i``: sender ``j``, receiver ``i``) and
    per-atom scalars ``s (N, C)``."""
    n = int(num_atoms)
    atoms = torch.arange(n, device=w.device)
    own = -w.new_zeros(n, w.shape[1], 3).index_add(0, receiver, w)
    vec = torch.cat([w, own])  # entries of g_{ic}: (node, vector)
    node = torch.cat([sender, atoms])
    center = torch.cat([receiver, atoms])
    a, b = triplet_indices(center, n)
    blocks = torch.einsum("tc,tcx,tcy->txy", s[center[a]], vec[a], vec[b])
    return w.new_zeros(n, n, 3, 3).index_put((node[a], node[b]), blocks, accumulate=True)


def assemble_hessian(blocks: torch.Tensor, sender: torch.Tensor, receiver: torch.Tensor, num_atoms: int,
                     extra: torch.Tensor | None = None):
    r"""Dense ``(3N, 3N)`` Hessian from per-edge symmetric blocks ``(E, 3, 3)`` (edge ``e`` from
    ``sender`` :math:`j` to ``receiver`` :math:`i`): :math:`H_{ij} \mathrel{+}= B_e`,
    :math:`H_{ii} \mathrel{-}= B_e`, then :math:`(H + H^T)/2`."""
    n = int(num_atoms)
    h = blocks.new_zeros(n, n, 3, 3)
    h = h.index_put((receiver, sender), blocks, accumulate=True)
    h = h.index_put((receiver, receiver), -blocks, accumulate=True)
    if extra is not None:
        h = h + extra
    return symmetrize(h.permute(0, 2, 1, 3).reshape(3 * n, 3 * n))


class HIPHessianHead(nn.Module):
    """The direct Hessian head of the module docstring: ``(graph, vectors, model_out) -> (3N, 3N)``."""

    def __init__(self, num_node_features: int, r_max: float, channels: int = 16, num_rbf: int = 8,
                 hidden: int = 64, polynomial_cutoff_p: int = 5):
        super().__init__()
        C = int(channels)
        self.channels = C
        self.node = nn.Sequential(nn.LayerNorm(num_node_features), nn.Linear(num_node_features, C), nn.SiLU())
        self.radial = RadialEmbeddingBlock(r_max, int(num_rbf), int(polynomial_cutoff_p))
        self.vector_weights = nn.Linear(int(num_rbf), 3 * C, bias=False)
        self.center_scalars = nn.Linear(C, C)
        self.node_weights = nn.Linear(C, 2 * C)
        self.pair = nn.Sequential(nn.Linear(2 * C + int(num_rbf), hidden), nn.SiLU(),
                                  nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 2 + 4 * C))

    def forward(self, graph: dict, vectors: torch.Tensor, model_out: dict) -> torch.Tensor:
        if "node_features" not in model_out:
            raise ConfigError("hessian_head needs a model that returns invariant `node_features`")
        C = self.channels
        sender, receiver = graph["edge_index"][0], graph["edge_index"][1]
        n = graph["positions"].shape[0]
        h = self.node(model_out["node_features"].to(vectors.dtype))
        lengths = torch.linalg.norm(vectors, dim=-1, keepdim=True)
        rb, env = self.radial.radial_and_envelope(lengths)
        u = -vectors / lengths  # from the receiver i towards the sender j
        eye = torch.eye(3, dtype=vectors.dtype, device=vectors.device)
        # degree-1 and degree-2 node features of the receivers
        w = (self.vector_weights(rb)[:, : 2 * C] * self.node_weights(h)[sender]).view(-1, 2, C)  # (E, 2, C)
        v = vectors.new_zeros(n, C, 3).index_add(0, receiver, w[:, 0, :, None] * u[:, None, :])
        uu = u[:, :, None] * u[:, None, :]
        t = vectors.new_zeros(n, C, 3, 3).index_add(0, receiver, w[:, 1, :, None, None] * (uu - eye / 3)[:, None])
        # exchange-symmetric pair coefficients
        hi, hj = h[receiver], h[sender]
        k = self.pair(torch.cat([hi + hj, hi * hj, rb], dim=-1)) * env  # (E, 2 + 4C)
        a, b = k[:, 0], k[:, 1]
        k1, k2, k3, k4 = k[:, 2:].view(-1, 4, C).unbind(1)
        vi, vj = v[receiver], v[sender]
        outer = torch.einsum
        cross = outer("ec,eca,ecb->eab", k1, vi, vj)
        blocks = a[:, None, None] * eye + b[:, None, None] * uu
        blocks = blocks + 0.5 * (cross + cross.transpose(1, 2))
        blocks = blocks + outer("ec,ecab->eab", k2, t[receiver] + t[sender])
        uw = outer("ec,ea,ecb->eab", k3, u, vi - vj)
        blocks = blocks + 0.5 * (uw + uw.transpose(1, 2))
        blocks = blocks + outer("ec,eca,ecb->eab", k4, vi, vi) + outer("ec,eca,ecb->eab", k4, vj, vj)
        # many-body part: w_ij^c = psi_c(r, h_i, h_j) u_ij (psi from the radial basis x envelope)
        psi = self.vector_weights(rb)[:, 2 * C :] * (hi * hj)
        many = many_body_hessian(psi[:, :, None] * u[:, None, :], self.center_scalars(h), sender, receiver, n)
        return assemble_hessian(blocks, sender, receiver, n, extra=many)


def attach_hessian_head(model, num_node_features: int) -> None:
    """The one-line hook: if ``model.config["hessian_head"]`` is true (or a dict of options
    ``channels``, ``num_rbf``, ``hidden``), give ``model`` a :class:`HIPHessianHead` reading its
    ``node_features`` of width ``num_node_features``, in the model's dtype."""
    spec = model.config.get("hessian_head", False)
    if spec is False or spec is None:
        return
    options = {}
    if isinstance(spec, dict):
        unknown = sorted(set(spec) - set(_OPTIONS))
        if unknown:
            raise ConfigError(f"hessian_head: unknown option(s) {unknown}; known: {', '.join(_OPTIONS)}")
        options = {key: int(val) for key, val in spec.items()}
    elif spec is not True:
        raise ConfigError(f"hessian_head must be true, false or a dict of {', '.join(_OPTIONS)}, got {spec!r}")
    p = next(model.parameters(), None)
    head = HIPHessianHead(int(num_node_features), model.r_max, **options)
    model.hessian_head = head.to(p.dtype if p is not None else torch.float64)
