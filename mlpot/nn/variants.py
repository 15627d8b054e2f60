r"""Pluggable equivariant pieces that a model selects by config name.

Two factories, used by :mod:`mlpot.models.mace` (and any other model) so that the choice of
tensor-product algorithm is one config key:

``make_message_tp(kind, irreps_in, lmax_sh, irreps_out_target, backend="reference", mmax=None)``
    The edge (message) tensor product :math:`m_{ij} = x_i \otimes_{w_{ij}} Y(\hat r_{ij})`.

    * ``kind="cg"``: channelwise Clebsch–Gordan product
      (:class:`mlpot.o3.tensor_product.ChannelwiseTensorProduct`), the MACE default.
    * ``kind="gaunt"``: Gaunt product (:class:`mlpot.o3.gaunt.GauntMessageTP`): the product of
      the two spherical functions on the sphere, :math:`\int Y_{l_1 m_1} Y_{l_2 m_2} Y_{l_3 m_3}`
      couplings only (parity-even paths, :math:`l_1 + l_2 + l_3` even), computed by FFT/grid.
    * ``kind="so2"``: SO(2)-reduced convolution in the edge frame
      (:class:`mlpot.o3.so2.SO2MessageTP`): rotate :math:`x_i` so that :math:`\hat r_{ij}` is
      the frame axis, where :math:`Y(\hat r)` is nonzero only for :math:`m = 0`, mix by
      :math:`m`-blocks with per-edge weights, rotate back. ``mmax`` (default: no truncation,
      i.e. the largest degree involved) keeps only :math:`|m| \le m_{max}` in the edge frame.

    The returned ``nn.Module`` has attributes

    * ``irreps_out``: e3nn ``Irreps`` of the message (the subset of ``irreps_out_target`` the
      product can reach, ``mul_ir`` layout),
    * ``weight_numel``: number of per-edge weights,

    and is called as::

        tp(x_sender, edge_attrs, weights, edge_vectors=None) -> (E, irreps_out.dim)

    with ``x_sender`` (E, irreps_in.dim), ``edge_attrs`` (E, (lmax_sh+1)^2) the e3nn
    ("component") spherical harmonics of the edge vectors, ``weights`` (E, weight_numel) from the
    radial MLP. ``kind="so2"`` needs ``edge_vectors`` (E, 3) for the edge frames (pass it by
    keyword; the others ignore it).

``make_product_basis(kind, irreps_in, irreps_out, correlation, num_elements, backend="reference")``
    The many-body (ACE) product basis on each node, :math:`B_i = \sum_\nu w^{(z_i)}_\nu
    \prod_{k\le\nu} A_i` up to body order ``correlation + 1``.

    * ``kind="symmetric"``: symmetric contraction with generalized CG coefficients
      (:class:`mlpot.o3.symmetric_contraction.SymmetricContraction`), the MACE default.
    * ``kind="gaunt"``: repeated Gaunt products on the sphere
      (:class:`mlpot.o3.gaunt.GauntProductBasis`).

    Call::

        pb(node_feats, node_attrs) -> (N, irreps_out.dim)

    with ``node_feats`` (N, C, (lmax+1)^2) (channels first, then all :math:`(l, m)` components)
    and ``node_attrs`` (N, num_elements) the one-hot species.

Both factories raise :class:`mlpot.errors.ConfigError` for an unknown ``kind`` (naming the
allowed ones). The wrapped classes are imported lazily, so importing this module does not need
every algorithm to exist.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from mlpot.errors import ConfigError

__all__ = ["make_message_tp", "make_product_basis", "MESSAGE_TP_KINDS", "PRODUCT_BASIS_KINDS"]

MESSAGE_TP_KINDS = ("cg", "gaunt", "so2")
PRODUCT_BASIS_KINDS = ("symmetric", "gaunt")


def _irreps(x):
    from e3nn import o3

    return o3.Irreps(x)


def _call_with_supported(cls, *args, **kwargs):
    """Build ``cls(*args, **kwargs)``, dropping keyword args its constructor does not accept.

    Lets the factory pass ``backend=`` to classes that may not (yet) take it.
    """
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return cls(*args, **kwargs)
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return cls(*args, **kwargs)
    return cls(*args, **{k: v for k, v in kwargs.items() if k in params})


class _MessageTPAdapter(nn.Module):
    """Uniform call signature ``(x, edge_attrs, weights, edge_vectors=None)`` around a TP."""

    def __init__(self, tp: nn.Module, kind: str, needs_vectors: bool):
        super().__init__()
        self.tp = tp
        self.kind = kind
        self.needs_vectors = needs_vectors
        self.irreps_in = getattr(tp, "irreps_in", None)
        self.irreps_out = _irreps(tp.irreps_out)
        self.weight_numel = int(tp.weight_numel)
        self._takes_vectors = _accepts(tp.forward, "edge_vectors")

    def forward(self, x: torch.Tensor, edge_attrs: torch.Tensor, weights: torch.Tensor, edge_vectors=None):
        if x.shape[0] == 0:
            # no edges (isolated atoms): some grid/FFT paths cannot take an empty batch
            return x.new_zeros(0, self.irreps_out.dim) + 0.0 * weights.sum()
        if self.needs_vectors:
            if edge_vectors is None:
                raise ConfigError(f"message tensor product {self.kind!r} needs edge_vectors= (edge frames)")
            # SO2MessageTP(x, edge_vectors, weights): the frame replaces the harmonics
            return self.tp(x, edge_vectors, weights)
        if self._takes_vectors:
            return self.tp(x, edge_attrs, weights, edge_vectors=edge_vectors)
        return self.tp(x, edge_attrs, weights)


class _GauntMessagePassing(_MessageTPAdapter):
    """Gaunt edge product fused with the gather from senders and the sum over receivers.

    Edges go in chunks of :meth:`GauntMessageTP.edges_per_chunk`; with gradients recorded, each
    chunk (gather, grid product, scatter) is recomputed in the backward pass, so neither the
    per-edge grids nor the per-edge messages exist for all edges at once.
    """

    def message_passing(self, node_feats, edge_attrs, weights, sender, receiver, num_nodes: int):
        gaunt = self.tp
        n_edges, chunk = sender.shape[0], gaunt.edges_per_chunk()
        dim = self.irreps_out.dim

        def part(x, sh, w, snd, rcv):
            m = gaunt.tp(x.index_select(0, snd), sh, w)
            return x.new_zeros(num_nodes, dim).index_add(0, rcv, m)

        if n_edges == 0:
            return node_feats.new_zeros(num_nodes, dim) + 0.0 * weights.sum()
        if n_edges <= chunk:
            return part(node_feats, edge_attrs, weights, sender, receiver)
        from torch.utils.checkpoint import checkpoint

        out = None
        for start in range(0, n_edges, chunk):
            sl = slice(start, start + chunk)
            args = (node_feats, edge_attrs[sl], weights[sl], sender[sl], receiver[sl])
            y = checkpoint(part, *args, use_reentrant=False) if torch.is_grad_enabled() else part(*args)
            out = y if out is None else out + y
        return out


def _accepts(fn, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


def make_message_tp(
    kind: str, irreps_in, lmax_sh: int, irreps_out_target, backend: str = "reference", mmax: int | None = None
) -> nn.Module:
    """Edge tensor product of sender features and edge spherical harmonics (see module doc)."""
    kind = str(kind).lower()
    irreps_in = _irreps(irreps_in)
    irreps_out_target = _irreps(irreps_out_target)
    lmax_sh = int(lmax_sh)
    if kind == "cg":
        from e3nn import o3

        from mlpot.o3.tensor_product import ChannelwiseTensorProduct

        irreps_sh = o3.Irreps.spherical_harmonics(lmax_sh)
        tp = _call_with_supported(
            ChannelwiseTensorProduct, irreps_in, irreps_sh, irreps_out_target, backend=backend
        )
        return _MessageTPAdapter(tp, kind, needs_vectors=False)
    if kind == "gaunt":
        from mlpot.o3.gaunt import GauntMessageTP

        tp = _call_with_supported(GauntMessageTP, irreps_in, lmax_sh, irreps_out_target, backend=backend)
        return _GauntMessagePassing(tp, kind, needs_vectors=False)
    if kind == "so2":
        from mlpot.o3.so2 import SO2MessageTP

        if mmax is None:
            mmax = max([ir.l for _, ir in irreps_in] + [ir.l for _, ir in irreps_out_target] + [lmax_sh])
        tp = _call_with_supported(SO2MessageTP, irreps_in, lmax_sh, irreps_out_target, mmax=int(mmax), backend=backend)
        return _MessageTPAdapter(tp, kind, needs_vectors=True)
    raise ConfigError(f"unknown message tensor product {kind!r}; choose one of {', '.join(MESSAGE_TP_KINDS)}")


def make_product_basis(
    kind: str, irreps_in, irreps_out, correlation: int, num_elements: int, backend: str = "reference"
) -> nn.Module:
    """Many-body product basis on nodes (see module doc)."""
    kind = str(kind).lower()
    irreps_in = _irreps(irreps_in)
    irreps_out = _irreps(irreps_out)
    if kind == "symmetric":
        from mlpot.o3.symmetric_contraction import SymmetricContraction

        return _call_with_supported(
            SymmetricContraction,
            irreps_in,
            irreps_out,
            correlation=int(correlation),
            num_elements=int(num_elements),
            backend=backend,
        )
    if kind == "gaunt":
        from mlpot.o3.gaunt import GauntProductBasis

        return _call_with_supported(
            GauntProductBasis,
            irreps_in,
            irreps_out,
            correlation=int(correlation),
            num_elements=int(num_elements),
            backend=backend,
        )
    raise ConfigError(f"unknown product basis {kind!r}; choose one of {', '.join(PRODUCT_BASIS_KINDS)}")
