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

from mlpot.models.base import register_model
from mlpot.models.escn import ESCN

__all__ = ["Facet"]


@register_model("Facet")
class Facet(ESCN):
    """Facet potential: :class:`~mlpot.models.escn.ESCN` with spline radials and S2-MLP node mixing
    (see the module doc). Hyperparameters are ESCN's; ``radial`` and ``node_mixing`` default to
    Facet's ``spline`` and ``s2_mlp``."""

    def __init__(
        self,
        r_max: float = 5.0,
        atomic_numbers=None,
        num_layers: int = 3,
        lmax: int = 3,
        mmax: int = 2,
        sphere_channels: int = 64,
        hidden_channels: int = 128,
        edge_channels: int = 64,
        num_bessel: int = 8,
        polynomial_cutoff_p: int = 5,
        avg_num_neighbors: float = 10.0,
        e0s=None,
        scale: float = 1.0,
        shift: float = 0.0,
        ffn_activation: str = "s2",
        grid_resolution: int | None = None,
        backend: str = "reference",
        zbl: bool = False,
        seed: int | None = None,
        dtype: str = "float64",
        radial: str = "spline",
        num_knots: int = 16,
        node_mixing: str = "s2_mlp",
    ):
        super().__init__(
            r_max=r_max, atomic_numbers=atomic_numbers, num_layers=num_layers, lmax=lmax, mmax=mmax,
            sphere_channels=sphere_channels, hidden_channels=hidden_channels, edge_channels=edge_channels,
            num_bessel=num_bessel, polynomial_cutoff_p=polynomial_cutoff_p, avg_num_neighbors=avg_num_neighbors,
            e0s=e0s, scale=scale, shift=shift, ffn_activation=ffn_activation, grid_resolution=grid_resolution,
            backend=backend, zbl=zbl, seed=seed, dtype=dtype, radial=radial, num_knots=num_knots,
            node_mixing=node_mixing,
        )
