r"""Facet (Miklaucic et al., 2025): SO(2)-convolution message passing with spline radial functions
and S2-grid MLP node mixing, assembled from mlpot's shared parts.

Facet's two ideas replace the two most expensive dense blocks of an eSCN-style layer
(:mod:`mlpot.models.escn`, whose math this model shares step by step):

* the radial MLP of every layer becomes learnable cubic B-splines of the edge length,
  evaluated by table lookup and multiplied by the cutoff envelope,
  :math:`\rho_{ij}[l, |m|, c] = f(r_{ij}) \sum_{a=0}^{3} B_{i+a}(t)\, c_{i+a}[l, |m|, c]`
  (``radial: spline``, ``num_knots`` intervals; :mod:`mlpot.nn.spline_radial`);
* the node feed-forward becomes the S2-grid MLP, :math:`x \leftarrow x + \Delta x`,
  :math:`\Delta x = \Pi_{\le L}\,\mathrm{MLP}(\mathcal{G}\,\mathrm{LN}(x))` with :math:`\mathcal{G}`
  the samples on the S2 grid, the MLP pointwise over channels and :math:`\Pi_{\le L}` the exact
  quadrature projection back (``node_mixing: s2_mlp``; :mod:`mlpot.nn.s2_mlp`).

Messages are eSCN's SO(2) convolutions in the edge frames (per-m linear maps, ``lmax`` /
``mmax``), energies come from the invariant channels, forces and stress by autograd. So
``Facet(...)`` is ``ESCN(..., radial="spline", node_mixing="s2_mlp")`` with Facet's defaults,
registered under its own name; both options stay available to ESCN, EquiformerV2 and (spline
radials, S2-MLP node mixing) MACE.

Defaults: the paper's recipe (splines for every radial function, S2-MLP mixing, no radial MLP
or element-pair embedding on the edges) at a size of our choosing (3 layers, ``lmax`` 3,
``mmax`` 2, 64 channels, 16 spline intervals, cutoff 5 Å); the paper's exact layer sizes are
not reproduced. ``backend: triton`` runs the SO(2) linear maps on their kernel; the spline
radial has no kernel yet, so ``triton`` is a ConfigError naming the op ``spline_radial``.
"""
from __future__ import annotations

import inspect

from mlpot.models.base import register_model
from mlpot.models.escn import ESCN

__all__ = ["FACET_DEFAULTS", "Facet"]

#: where Facet's defaults differ from ESCN's
FACET_DEFAULTS = dict(num_layers=3, lmax=3, mmax=2, sphere_channels=64, hidden_channels=128, radial="spline",
                      num_knots=16, node_mixing="s2_mlp")


@register_model("Facet")
class Facet(ESCN):
    """Facet potential: :class:`~mlpot.models.escn.ESCN` with spline radials and S2-MLP node mixing
    (see the module doc). Hyperparameters are ESCN's, with :data:`FACET_DEFAULTS`."""

    def __init__(self, **config):
        super().__init__(**{**FACET_DEFAULTS, **config})


# ESCN's keyword arguments with Facet's defaults: what configs are checked against
Facet.__init__.__signature__ = inspect.signature(ESCN.__init__).replace(parameters=[
    p.replace(default=FACET_DEFAULTS.get(p.name, p.default)) for p in inspect.signature(ESCN.__init__).parameters.values()
])
