r"""The product basis: one interface for the symmetric contraction and the Gaunt many-body product.

Math
----
On every node, from the atomic basis :math:`A_i` (``(N, C, D)``: channels, then the
:math:`(l, m)` components of ``irreps_in`` in order), a product basis computes the
body-order-:math:`(\nu_{max} + 1)` features

.. math::  B_i = \sum_{\nu = 1}^{\nu_{max}} w^{(z_i)}_\nu\, \Pi_\nu(A_i, \ldots, A_i)

with species-dependent weights :math:`w^{(z)}` (``node_attrs``: one-hot species) and a
symmetric, equivariant :math:`\nu`-linear map :math:`\Pi_\nu`: generalized CG couplings for
:class:`~mlpot.o3.symmetric_contraction.SymmetricContraction`, pointwise powers on the sphere for
:class:`~mlpot.o3.gaunt.GauntProductBasis`. Output: ``(N, irreps_out.dim)``, e3nn ``mul_ir``.
"""
from __future__ import annotations

import torch
from torch import nn

from mlpot.o3.backend import BackendChoice

__all__ = ["ProductBasis"]


class ProductBasis(BackendChoice, nn.Module):
    """Base of the product bases. Subclasses set ``irreps_in``, ``irreps_out``, ``correlation``,
    ``num_elements``, the registry ``op``, and implement ``forward(node_feats, node_attrs)``."""

    def __init__(self, backend: str = "reference"):
        super().__init__()
        self.backend = str(backend)

    def forward(self, node_feats: torch.Tensor, node_attrs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError
