r"""The message tensor product: one interface for CG, Gaunt and SO(2) messages.

Math
----
Every implementation computes the MACE message

.. math::  m_n = \sum_{e:\, r(e) = n} \mathrm{TP}\big(h_{s(e)},\ \mathcal{G}_e,\ w_e\big)

with :math:`s(e)`, :math:`r(e)` the sender and receiver of edge :math:`e`, :math:`h` the node
features (e3nn ``mul_ir`` layout), :math:`w_e` the per-edge weights (from the radial MLP) and
:math:`\mathcal{G}_e` the edge geometry (:class:`EdgeGeometry`): the spherical harmonics
:math:`Y(\hat r_e)` for the CG and Gaunt products, the edge frame and its Wigner blocks for the
SO(2) product.

:meth:`MessageTensorProduct.message_passing` is the default gather -> product -> scatter;
implementations with a fused path (chunked, recomputing, or a Triton kernel) override it.
An implementation declares the registry op it runs (:mod:`mlpot.o3.backend`) and checks its
backend when it is built, so an unsupported backend is a :class:`~mlpot.errors.ConfigError`
at model build time.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from e3nn import o3
from torch import nn

from mlpot.errors import ConfigError
from mlpot.o3.backend import BackendChoice

__all__ = ["EdgeGeometry", "MessageTensorProduct"]


@dataclass
class EdgeGeometry:
    """Per-edge quantities computed once per forward pass and shared by every layer.

    ``vectors (E, 3)``, ``lengths (E, 1)``; ``sh (E, (lmax+1)^2)``: e3nn "component" spherical
    harmonics of the edge directions; ``radial (E, num_basis)``: radial basis times the cutoff
    envelope; ``envelope (E, 1)``: the cutoff envelope alone; ``rotation (E, 3, 3)``: edge frames (``R v = |v| y``,
    :func:`mlpot.o3.wigner.edge_rotation`); ``wigner``: ``[D^l(R_e) (E, 2l+1, 2l+1)]`` for
    ``l = 0..L``. A field that no layer asked for is None. ``cache``: structures of the graph
    that every layer would otherwise rebuild (the receiver grouping of
    :meth:`mlpot.o3.tensor_product.ChannelwiseTensorProduct.message_passing_channel_last`).
    """

    vectors: torch.Tensor
    lengths: torch.Tensor
    sh: torch.Tensor | None = None
    radial: torch.Tensor | None = None
    envelope: torch.Tensor | None = None
    rotation: torch.Tensor | None = None
    wigner: list | None = None
    cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_edges(self) -> int:
        return self.vectors.shape[0]

    def require(self, name: str, who: str):
        """The field ``name``, or a clear error naming the layer that needs it."""
        value = getattr(self, name)
        if value is None:
            raise ConfigError(f"{who} needs the edge geometry field {name!r}, which was not computed")
        return value


class MessageTensorProduct(BackendChoice, nn.Module):
    """Base of the message tensor products (module doc).

    Subclasses set ``irreps_in``, ``irreps_out`` (e3nn ``Irreps``), ``weight_numel``, the
    registry ``op`` and what geometry they read (``needs_sh``, ``frames_lmax``: the largest
    Wigner degree, or None), and implement :meth:`edge_product`.
    """

    needs_sh: bool = True
    frames_lmax: int | None = None

    def __init__(self, backend: str = "reference"):
        super().__init__()
        self.backend = str(backend)

    def edge_product(self, x_sender: torch.Tensor, geometry: EdgeGeometry, weights: torch.Tensor) -> torch.Tensor:
        """Per-edge messages ``(E, irreps_out.dim)`` from sender features ``(E, irreps_in.dim)``."""
        raise NotImplementedError

    def message_passing(
        self,
        node_feats: torch.Tensor,
        edge_geometry: EdgeGeometry,
        weights: torch.Tensor,
        sender: torch.Tensor,
        receiver: torch.Tensor,
        num_nodes: int,
    ) -> torch.Tensor:
        """``(num_nodes, irreps_out.dim)``: the default gather -> :meth:`edge_product` -> scatter."""
        dim = o3.Irreps(self.irreps_out).dim
        if sender.shape[0] == 0:
            return node_feats.new_zeros(num_nodes, dim) + 0.0 * weights.sum()
        msg = self.edge_product(node_feats.index_select(0, sender), edge_geometry, weights)
        return msg.new_zeros(num_nodes, dim).index_add(0, receiver, msg)
