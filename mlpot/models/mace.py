r"""MACE (Batatia et al., NeurIPS 2022), numerically identical to mace-torch 0.3.16.

Per-atom energy of atom :math:`i` with species :math:`z_i`:

.. math::

    E_i = E_0(z_i) + \text{scale} \sum_{t=1}^{T} R_t\big(h_i^{(t)}\big) + \text{shift}

with :math:`h^{(0)}_i = W_{emb}\, \text{onehot}(z_i)` and, for each of the ``num_interactions``
layers, an atomic basis :math:`A^{(t)}` (the interaction block: radial MLP weights times the CG
product of :math:`h^{(t-1)}_j` with the spherical harmonics :math:`Y(\hat r_{ij})`, summed over
neighbours within ``r_max``), the symmetric product basis of body order ``correlation + 1``
(:class:`~mlpot.o3.symmetric_contraction.SymmetricContraction`) and a linear update plus the
species-dependent self connection. Linear readouts :math:`R_t` for all layers but the last,
which has a gated MLP (``MLP_irreps``; a one-layer model keeps the linear readout, as in
mace-torch). The last layer keeps only scalars.

Hyperparameters are mace-torch's (``r_max``, ``num_bessel``, ``num_polynomial_cutoff``,
``max_ell``, ``hidden_irreps`` or ``num_channels`` + ``max_L``, ``correlation`` (int or one per
layer), ``num_interactions``, ``MLP_irreps``, ``gate``, ``radial_MLP``, ``avg_num_neighbors``,
``atomic_numbers``, ``e0s``, ``scale``, ``shift``, ``interaction_cls``,
``interaction_cls_first``) plus mlpot's:

* ``interaction_tp``: ``"cg"`` (mace-torch's channelwise CG product) | ``"gaunt"`` | ``"so2"``;
* ``product``: ``"symmetric"`` (generalized CG) | ``"gaunt"``;
* ``gaunt_method``: ``"grid"`` | ``"fourier"``: how the Gaunt products (``interaction_tp: gaunt``,
  ``product: gaunt``) are computed; only with a Gaunt product;
* ``mmax``: largest ``|m|`` kept in the edge frames of ``interaction_tp: so2`` (default: all);
* ``backend``: ``"reference"`` | ``"triton"`` | ``"auto"`` (:mod:`mlpot.o3.backend`: an op
  without a kernel for this configuration is a ConfigError at build time);
* ``zbl``: add the ZBL pair repulsion (see :class:`mlpot.models.base.ZBLRepulsion`);
* ``product_basis_sizes``: per layer, per output irrep, per body order, the number of coupling
  columns of the product basis (set by :mod:`mlpot.models.mace_import` to hold mace-torch's
  own ``U`` matrices; new models use the reduced basis);
* ``subtract_isolated``: subtract the interaction energy of a lone atom of the same species, so
  that an isolated atom has exactly the energy ``E_0 + shift`` (default False: mace-torch's
  function, which has no such term; set True for mlpot's earlier default; with
  ``node_mixing: s2_mlp`` the default is True, since the S2 MLP's biases give a lone atom an
  interaction energy of its own);
* ``heads``: head names of a multi-head model (mace-torch's ``heads``; default one head,
  ``Default``): ``e0s`` then takes one table per head (a list, or ``{head: table}``), ``scale`` and
  ``shift`` one value per head, and every readout one output channel per head (the gated one
  ``H x MLP_irreps`` hidden scalars, masked to the atom's head); the head of each structure is
  ``graph["head"]`` or the model's ``active_head`` (:mod:`mlpot.models.heads`);
* mace-torch's radial and pair options: ``radial_type`` (``bessel`` | ``gaussian`` |
  ``chebyshev``), ``distance_transform`` (None | ``Agnesi`` | ``Soft``), ``apply_cutoff`` (False:
  the envelope multiplies the radial MLP's output instead of the basis), ``pair_repulsion``
  (mace-torch's ZBL, :class:`mlpot.nn.radial.MaceZBLRepulsion`, added per atom before
  scale/shift as in ``ScaleShiftMACE``);
* ``seed``: seed for the weight initialisation (None: torch's global RNG); ``dtype``;
* ``hessian_head``: a direct (HIP) Hessian head on the invariant features (:mod:`mlpot.models.hip`);
* ``radial``: ``"mlp"`` (mace-torch's Bessel basis and radial MLP) | ``"spline"`` (Facet's: each
  tensor-product weight is its own learnable cubic B-spline of the edge length with ``num_knots``
  intervals, times the envelope, :mod:`mlpot.nn.spline_radial`; ``radial_MLP`` and
  ``num_bessel`` are not used, and it has no Triton kernel);
* ``node_mixing``: None | ``"s2_mlp"`` (Facet's pointwise MLP on the S2 grid with a residual,
  :mod:`mlpot.nn.s2_mlp`, width ``node_mixing_hidden``, default twice the channels, S2 grid of
  ``node_mixing_resolution`` polar nodes, default ``2 L + 8``);
  ``node_mixing_position``: ``"after_product"`` (following the product basis) or
  ``"replace_product"`` (the product basis reduced to its linear, body-order-2 part, i.e.
  ``correlation`` 1 in every layer, followed by the S2 MLP).

``MACE`` with ``scale=1, shift=0`` is mace-torch's ``MACE``; ``ScaleShiftMACE`` is the same
class (an alias kept for mace-torch users and imported models).
"""
from __future__ import annotations

import torch
from e3nn import o3
from torch import nn

from mlpot.errors import ConfigError
from mlpot.models.base import PotentialModel, register_model
from mlpot.models.heads import check_heads, head_e0_matrix, head_e0s_config, per_head
from mlpot.models.hip import attach_hessian_head
from mlpot.nn.blocks import (
    GATES,
    EquivariantProductBasisBlock,
    LinearNodeEmbeddingBlock,
    LinearReadoutBlock,
    NonLinearReadoutBlock,
    ScaleShiftBlock,
    interaction_block_class,
)
from mlpot.nn.edge_geometry import EdgeGeometry, build_edge_geometry, check_edge_geometry_backend
from mlpot.nn.radial import MaceZBLRepulsion, RadialEmbeddingBlock, SpeciesRadialEmbeddingBlock
from mlpot.nn.s2_mlp import IrrepsS2MLPNodeMixing
from mlpot.nn.spline_radial import SplineBasis, check_radial_backend
from mlpot.runtime import MALLOC_OPTIONS, freeze_gc, tune_malloc  # noqa: F401  (re-exported)

__all__ = ["MACE", "ScaleShiftMACE", "freeze_gc", "mace_hidden_irreps", "tune_malloc"]

# the process-wide settings of the entry points live in mlpot.runtime; these names stay
# importable from here, where the README first documented tune_malloc

INTERACTION_TPS = ("cg", "gaunt", "so2")
PRODUCTS = ("symmetric", "gaunt")


def mace_hidden_irreps(num_channels: int, max_L: int) -> str:
    """mace-torch's ``hidden_irreps`` from ``--num_channels`` and ``--max_L``: ``C x 0e + C x 1o + ...``."""
    irreps = (int(num_channels) * o3.Irreps.spherical_harmonics(int(max_L))).sort().irreps.simplify()
    return str(irreps)


def _irreps_str(x) -> str:
    return str(o3.Irreps(str(x)))


@register_model("MACE")
class MACE(PotentialModel):
    """MACE interatomic potential (see the module docstring for the math and parameters)."""

    def __init__(
        self,
        r_max: float = 5.0,
        atomic_numbers=None,
        num_bessel: int = 8,
        num_polynomial_cutoff: int = 5,
        max_ell: int = 3,
        hidden_irreps: str | None = None,
        num_channels: int | None = None,
        max_L: int | None = None,
        correlation=3,
        num_interactions: int = 2,
        MLP_irreps: str = "16x0e",
        gate: str | None = "silu",
        radial_MLP=(64, 64, 64),
        avg_num_neighbors: float = 1.0,
        e0s=None,
        scale: float = 1.0,
        shift: float = 0.0,
        interaction_cls: str = "RealAgnosticResidualInteractionBlock",
        interaction_cls_first: str = "RealAgnosticResidualInteractionBlock",
        interaction_tp: str = "cg",
        product: str = "symmetric",
        gaunt_method: str = "grid",
        mmax: int | None = None,
        backend: str = "reference",
        zbl: bool = False,
        product_basis_sizes=None,
        subtract_isolated: bool | None = None,
        seed: int | None = None,
        dtype: str = "float64",
        hessian_head=False,
        radial: str = "mlp",
        num_knots: int = 8,
        node_mixing: str | None = None,
        node_mixing_position: str = "after_product",
        node_mixing_hidden: int | None = None,
        node_mixing_resolution: int | None = None,
        heads=None,
        pair_repulsion: bool = False,
        distance_transform: str | None = None,
        radial_type: str = "bessel",
        apply_cutoff: bool = True,
        use_agnostic_product: bool = False,
        use_last_readout_only: bool = False,
        edge_irreps: str | None = None,
        use_edge_irreps_first: bool = False,
    ):
        if atomic_numbers is None:
            raise ConfigError("MACE: `atomic_numbers` is required (the species the model knows)")
        # Facet's options (mlpot.nn.spline_radial, mlpot.nn.s2_mlp)
        if node_mixing not in (None, "s2_mlp"):
            raise ConfigError(f"MACE: node_mixing must be null or 's2_mlp', got {node_mixing!r}")
        if node_mixing_position not in ("after_product", "replace_product"):
            raise ConfigError(
                f"MACE: node_mixing_position must be after_product or replace_product, got {node_mixing_position!r}"
            )
        if node_mixing is not None and node_mixing_position == "replace_product":
            correlation = 1
        if hidden_irreps is None:
            if num_channels is not None or max_L is not None:
                hidden_irreps = mace_hidden_irreps(
                    128 if num_channels is None else num_channels, 1 if max_L is None else max_L
                )
            else:
                hidden_irreps = "128x0e+128x1o"
        num_interactions = int(num_interactions)
        if num_interactions < 1:
            raise ConfigError(f"MACE: num_interactions must be >= 1, got {num_interactions}")
        if isinstance(correlation, (int, float)):
            correlation = [int(correlation)] * num_interactions
        correlation = [int(c) for c in correlation]
        if len(correlation) != num_interactions:
            raise ConfigError(
                f"MACE: correlation has {len(correlation)} values for {num_interactions} interactions"
            )
        gate_key = "none" if gate is None else str(gate).lower()
        if gate_key not in GATES:
            raise ConfigError(f"MACE: gate {gate!r} unknown; choose one of {', '.join(GATES)}")
        if str(interaction_tp).lower() not in INTERACTION_TPS:
            raise ConfigError(f"MACE: interaction_tp {interaction_tp!r} unknown; choose one of {INTERACTION_TPS}")
        if str(product).lower() not in PRODUCTS:
            raise ConfigError(f"MACE: product {product!r} unknown; choose one of {PRODUCTS}")
        if backend not in ("reference", "triton", "auto"):
            raise ConfigError(f"MACE: backend must be reference, triton or auto, got {backend!r}")
        uses_gaunt = "gaunt" in (str(interaction_tp).lower(), str(product).lower())
        if gaunt_method not in ("grid", "fourier"):
            raise ConfigError(f"MACE: gaunt_method must be grid or fourier, got {gaunt_method!r}")
        if gaunt_method != "grid" and not uses_gaunt:
            raise ConfigError(
                f"MACE: gaunt_method {gaunt_method!r} needs interaction_tp: gaunt or product: gaunt"
            )
        if mmax is not None:
            if str(interaction_tp).lower() != "so2":
                raise ConfigError(f"MACE: mmax applies to interaction_tp: so2, not {interaction_tp!r}")
            if isinstance(mmax, bool) or not isinstance(mmax, int) or mmax < 0:
                raise ConfigError(f"MACE: mmax must be a non-negative integer, got {mmax!r}")
        heads = check_heads(heads)
        if float(avg_num_neighbors) <= 0:
            raise ConfigError(f"MACE: avg_num_neighbors must be > 0, got {avg_num_neighbors}")
        config = {
            "r_max": float(r_max),
            "atomic_numbers": [int(z) for z in atomic_numbers],
            "num_bessel": int(num_bessel),
            "num_polynomial_cutoff": int(num_polynomial_cutoff),
            "max_ell": int(max_ell),
            "hidden_irreps": _irreps_str(hidden_irreps),
            "correlation": correlation,
            "num_interactions": num_interactions,
            "MLP_irreps": _irreps_str(MLP_irreps),
            "gate": None if gate_key == "none" else gate_key,
            "radial_MLP": [int(h) for h in radial_MLP],
            "avg_num_neighbors": float(avg_num_neighbors),
            "e0s": e0s,
            "scale": scale if isinstance(scale, (list, tuple, dict)) else float(scale),
            "shift": shift if isinstance(shift, (list, tuple, dict)) else float(shift),
            "interaction_cls": str(interaction_cls).split(".")[-1].strip("'<>"),
            "interaction_cls_first": str(interaction_cls_first).split(".")[-1].strip("'<>"),
            "interaction_tp": str(interaction_tp).lower(),
            "product": str(product).lower(),
            "gaunt_method": str(gaunt_method),
            "mmax": None if mmax is None else int(mmax),
            "backend": str(backend),
            "zbl": bool(zbl),
            "product_basis_sizes": product_basis_sizes,
            # None: mace-torch's function (False), except with S2-MLP node mixing, whose biases give
            # a lone atom features of its own: subtracting them keeps E(lone atom) = E0
            "subtract_isolated": (node_mixing == "s2_mlp") if subtract_isolated is None else bool(subtract_isolated),
            "seed": seed,
            "dtype": str(dtype),
            "radial": str(radial),
            "num_knots": int(num_knots),
            "node_mixing": node_mixing,
            "node_mixing_position": str(node_mixing_position),
            "node_mixing_hidden": None if node_mixing_hidden is None else int(node_mixing_hidden),
            "node_mixing_resolution": None if node_mixing_resolution is None else int(node_mixing_resolution),
            "heads": heads,
            "pair_repulsion": bool(pair_repulsion),
            "distance_transform": None if distance_transform in (None, "None") else str(distance_transform),
            "radial_type": str(radial_type),
            "apply_cutoff": bool(apply_cutoff),
            "use_agnostic_product": bool(use_agnostic_product),
            "use_last_readout_only": bool(use_last_readout_only),
            "edge_irreps": None if edge_irreps is None else _irreps_str(edge_irreps),
            "use_edge_irreps_first": bool(use_edge_irreps_first),
        }
        if hessian_head:  # only when set, so that existing model files keep their config
            config["hessian_head"] = hessian_head
        if len(heads) > 1:
            config["e0s"] = head_e0s_config(e0s, heads)
            config["scale"] = per_head("scale", scale, heads)
            config["shift"] = per_head("shift", shift, heads)
        else:
            config["scale"] = per_head("scale", scale, heads)[0]
            config["shift"] = per_head("shift", shift, heads)[0]
            if isinstance(e0s, dict):
                config["e0s"] = {str(k): float(v) for k, v in e0s.items()}
            elif e0s is not None:
                config["e0s"] = [float(v) for v in e0s]
        if len(heads) > 1:
            # the base class keeps one E0 per species; a multi-head model one row per head
            super().__init__({**config, "e0s": None})
            self.config["e0s"] = config["e0s"]
            self.atomic_energies = torch.tensor(
                head_e0_matrix(config["e0s"], heads, self.atomic_numbers), dtype=torch.float64
            )
        else:
            super().__init__(config)
        if config["dtype"] not in ("float32", "float64"):
            raise ConfigError(f"MACE: dtype must be float32 or float64, got {dtype!r}")
        dt = torch.float32 if config["dtype"] == "float32" else torch.float64
        old_dtype = torch.get_default_dtype()
        rng_state = torch.random.get_rng_state() if seed is not None else None
        torch.set_default_dtype(dt)
        try:
            if seed is not None:
                torch.manual_seed(int(seed))
            self._build(config)
        finally:
            torch.set_default_dtype(old_dtype)
            if rng_state is not None:
                torch.random.set_rng_state(rng_state)
        self.to(dt)
        attach_hessian_head(self, self.num_features * num_interactions)

    # ------------------------------------------------------------------------------------------
    def _build(self, c: dict) -> None:
        hidden_irreps = o3.Irreps(c["hidden_irreps"])
        S = self.num_elements
        max_ell = c["max_ell"]
        num_inter = c["num_interactions"]
        node_attr_irreps = o3.Irreps([(S, (0, 1))])
        num_features = hidden_irreps.count(o3.Irrep(0, 1))
        if num_features == 0:
            raise ConfigError(f"MACE: hidden_irreps {hidden_irreps} has no 0e channels")
        if any(mul != num_features for mul, _ in hidden_irreps):
            raise ConfigError(f"MACE: all irreps of hidden_irreps need the same multiplicity, got {hidden_irreps}")
        node_feats_irreps = o3.Irreps([(num_features, (0, 1))])
        sh_irreps = o3.Irreps.spherical_harmonics(max_ell)
        self.num_features = num_features
        self.hidden_irreps = hidden_irreps
        self.sh_irreps = sh_irreps

        sh_inter = sh_irreps
        if hidden_irreps.count(o3.Irrep(0, -1)) > 0:
            sh_inter = o3.Irreps("+".join(f"1x{l}e+1x{l}o" for l in range(max_ell + 1)))
        interaction_irreps = (sh_inter * num_features).sort()[0].simplify()
        interaction_irreps_first = (sh_irreps * num_features).sort()[0].simplify()

        self.node_embedding = LinearNodeEmbeddingBlock(node_attr_irreps, node_feats_irreps)
        radial_MLP = c["radial_MLP"]
        check_radial_backend(c.get("radial", "mlp"), c["backend"])
        # mace-torch's radial options; the plain Bessel x envelope keeps the fused edge kernel
        self._species_radial = (c.get("radial_type", "bessel") != "bessel" or c.get("distance_transform") is not None
                                or not c.get("apply_cutoff", True))
        if c.get("radial", "mlp") == "spline":  # B-spline basis; a linear map of it is a learnable spline
            if self._species_radial:
                raise ConfigError("MACE: radial: spline cannot be combined with radial_type, distance_transform "
                                  "or apply_cutoff=False (mace-torch's radial options)")
            self.radial_embedding = SplineBasis(self.r_max, c["num_knots"], c["num_polynomial_cutoff"])
            radial_MLP = []
        elif self._species_radial:
            if c["backend"] == "triton":  # auto: the radial basis in torch, the other ops on their kernels
                raise ConfigError("MACE: radial_type / distance_transform / apply_cutoff=False have no fused edge "
                                  "kernel: use backend reference or auto")
            self.radial_embedding = SpeciesRadialEmbeddingBlock(
                self.r_max, c["num_bessel"], c["num_polynomial_cutoff"], c.get("radial_type", "bessel"),
                c.get("distance_transform"), c.get("apply_cutoff", True),
            )
        else:
            self.radial_embedding = RadialEmbeddingBlock(self.r_max, c["num_bessel"], c["num_polynomial_cutoff"])
        if c.get("pair_repulsion", False):
            self.pair_repulsion_fn = MaceZBLRepulsion(p=c["num_polynomial_cutoff"])
        self.register_buffer("_species_z", torch.tensor(self.atomic_numbers, dtype=torch.long), persistent=False)
        edge_feats_irreps = o3.Irreps(f"{self.radial_embedding.out_dim}x0e")
        self.spherical_harmonics = o3.SphericalHarmonics(sh_irreps, normalize=True, normalization="component")

        gate = GATES["none" if c["gate"] is None else c["gate"]]
        cls_first = interaction_block_class(c["interaction_cls_first"])
        cls = interaction_block_class(c["interaction_cls"])
        sizes = c["product_basis_sizes"]
        common = {
            "avg_num_neighbors": c["avg_num_neighbors"],
            "radial_MLP": radial_MLP,
            "interaction_tp": c["interaction_tp"],
            "backend": c["backend"],
            "gaunt_method": c.get("gaunt_method", "grid"),
            "mmax": c.get("mmax"),
        }
        self.interactions = nn.ModuleList()
        self.products = nn.ModuleList()
        self.readouts = nn.ModuleList()
        # mace-torch's use_last_readout_only: one readout, on the last layer's features
        last_only = c.get("use_last_readout_only", False)
        if last_only and num_inter == 1:
            raise ConfigError("MACE: use_last_readout_only needs num_interactions > 1 (mace-torch builds no readout)")
        self._readout_layers = [num_inter - 1] if last_only else list(range(num_inter))
        edge_irreps = None if c.get("edge_irreps") is None else o3.Irreps(c["edge_irreps"])
        for t in range(num_inter):
            last = t == num_inter - 1
            hidden_out = o3.Irreps(str(hidden_irreps[0])) if last else hidden_irreps
            block_cls = cls_first if t == 0 else cls
            layer_edge_irreps = edge_irreps
            if t == 0:
                layer_edge_irreps = None
                if edge_irreps is not None and c.get("use_edge_irreps_first", False):
                    layer_edge_irreps = o3.Irreps(f"{edge_irreps.count(o3.Irrep(0, 1))}x0e")
            inter = block_cls(
                node_attrs_irreps=node_attr_irreps,
                node_feats_irreps=node_feats_irreps if t == 0 else hidden_irreps,
                edge_attrs_irreps=sh_irreps,
                edge_feats_irreps=edge_feats_irreps,
                target_irreps=interaction_irreps_first if t == 0 else interaction_irreps,
                hidden_irreps=hidden_out,
                edge_irreps=layer_edge_irreps,
                **common,
            )
            self.interactions.append(inter)
            use_sc = block_cls.residual if t == 0 else True
            self.products.append(
                EquivariantProductBasisBlock(
                    node_feats_irreps=inter.target_irreps,
                    target_irreps=hidden_out,
                    correlation=c["correlation"][t],
                    num_elements=1 if c.get("use_agnostic_product", False) else S,
                    use_sc=use_sc,
                    product=c["product"],
                    basis_sizes=None if sizes is None else sizes[t],
                    backend=c["backend"],
                    gaunt_method=c.get("gaunt_method", "grid"),
                )
            )
            H = len(c.get("heads") or ["Default"])
            out_irreps = o3.Irreps(f"{H}x0e")
            if t not in self._readout_layers:
                continue
            if last and num_inter > 1:  # mace-torch: a single layer has a linear readout
                mlp = (H * o3.Irreps(c["MLP_irreps"])).simplify()
                self.readouts.append(NonLinearReadoutBlock(hidden_out, mlp, gate, out_irreps, num_heads=H))
            else:
                self.readouts.append(LinearReadoutBlock(hidden_out, out_irreps))
        self.scale_shift = ScaleShiftBlock(c["scale"], c["shift"])
        self.node_mixers = None
        if c.get("node_mixing") == "s2_mlp":
            hidden = c.get("node_mixing_hidden") or 2 * num_features
            outs = [hidden_irreps] * (num_inter - 1) + [o3.Irreps(str(hidden_irreps[0]))]  # the products' outputs
            self.node_mixers = nn.ModuleList(
                IrrepsS2MLPNodeMixing(irreps, hidden, c.get("node_mixing_resolution")) for irreps in outs)
        if not c.get("apply_cutoff", True):
            for inter in self.interactions:
                inter.envelope_on_weights = True
        # what the shared edge geometry holds: SH only when a layer reads them, frames when asked
        self._needs_sh = any(inter.conv_tp.needs_sh for inter in self.interactions)
        frames = [inter.conv_tp.frames_lmax for inter in self.interactions if inter.conv_tp.frames_lmax is not None]
        self._frames_lmax = max(frames) if frames else None
        check_edge_geometry_backend(c["backend"])

    @property
    def product_basis_sizes(self) -> list:
        """Number of coupling columns per layer / output irrep / body order (symmetric product only)."""
        out = []
        for p in self.products:
            sc = p.symmetric_contractions
            out.append(sc.basis_sizes if hasattr(sc, "basis_sizes") else None)
        return out

    # ------------------------------------------------------------------------------------------
    def edge_geometry(self, vectors: torch.Tensor, z_s=None, z_r=None) -> EdgeGeometry:
        """The edge geometry all layers share: lengths, radial basis x envelope, the spherical
        harmonics (unless every layer uses SO(2) frames), and the edge frames with their Wigner
        blocks (only for SO(2) layers). ``z_s, z_r (E, 1)``: atomic numbers of the edge's atoms,
        read by mace-torch's distance transforms."""
        if self._species_radial:
            geometry = build_edge_geometry(
                vectors, spherical_harmonics=self.spherical_harmonics if self._needs_sh else None,
                radial_embedding=None, frames_lmax=self._frames_lmax, backend=self.config["backend"],
            )
            geometry.radial, geometry.envelope = self.radial_embedding.radial_and_envelope(geometry.lengths, z_s, z_r)
            return geometry
        return build_edge_geometry(
            vectors,
            spherical_harmonics=self.spherical_harmonics if self._needs_sh else None,
            radial_embedding=self.radial_embedding,
            frames_lmax=self._frames_lmax,
            # the spline basis has no fused kernel: under auto its geometry stays on the reference
            backend=self.config["backend"] if self.config.get("radial", "mlp") == "mlp" else "reference",
        )

    def _interaction_energy(self, node_attrs, vectors, sender, receiver, node_heads=None, between_layers=None):
        """Sum of the readouts of all layers (before scale/shift), each atom read by its head
        (``node_heads (N,)``, None: the only head), and the invariant features.

        ``between_layers`` (optional) maps the node features between two layers."""
        node_z = self._species_z[node_attrs.argmax(dim=1)] if node_attrs.shape[0] else self._species_z[:0]
        z_s, z_r = node_z[sender][:, None], node_z[receiver][:, None]
        geometry = self.edge_geometry(vectors, z_s, z_r)
        node_feats = self.node_embedding(node_attrs)
        node_inter = node_attrs.new_zeros(node_attrs.shape[0])
        if hasattr(self, "pair_repulsion_fn"):  # inside scale/shift, as mace-torch's ScaleShiftMACE
            node_inter = node_inter + self.pair_repulsion_fn(geometry.lengths, z_s, z_r, receiver, node_attrs.shape[0])
        invariants = []
        rows = torch.arange(node_attrs.shape[0], device=node_attrs.device)
        product_attrs = torch.ones_like(node_attrs[:, :1]) if self.config.get("use_agnostic_product") else node_attrs
        readouts = dict(zip(self._readout_layers, self.readouts))
        mixers = self.node_mixers if self.node_mixers is not None else [None] * len(self.products)
        for t, (interaction, product, mixer) in enumerate(zip(self.interactions, self.products, mixers)):
            if t > 0 and between_layers is not None:
                node_feats = between_layers(node_feats)
            node_feats, sc = interaction(node_attrs, node_feats, geometry, sender, receiver)
            node_feats = product(node_feats, sc, product_attrs)
            if mixer is not None:  # node_mixing: s2_mlp (x + S2-MLP(x))
                node_feats = mixer(node_feats)
            invariants.append(node_feats[:, : self.num_features])
            if t not in readouts:
                continue
            readout = readouts[t]
            if node_heads is None:
                node_inter = node_inter + readout(node_feats).squeeze(-1)
            else:
                node_inter = node_inter + readout_heads(readout, node_feats, node_heads)[rows, node_heads]
        return node_inter, invariants

    def isolated_interaction_energy(self, dtype=None, device=None) -> torch.Tensor:
        """Readout sum of a lone atom of each species (no neighbours), shape ``(S,)``, or
        ``(H, S)`` for a model with H > 1 heads."""
        p = self.node_embedding.linear.weight
        dtype = dtype or p.dtype
        device = device or p.device
        attrs = torch.eye(self.num_elements, dtype=dtype, device=device)
        empty = torch.zeros(0, dtype=torch.long, device=device)
        vectors = torch.zeros(0, 3, dtype=dtype, device=device)
        if len(self.heads) == 1:
            return self._interaction_energy(attrs, vectors, empty, empty)[0]
        return torch.stack([
            self._interaction_energy(attrs, vectors, empty, empty, torch.full((len(attrs),), h, dtype=torch.long, device=device))[0]
            for h in range(len(self.heads))
        ])

    def _isolated_cached(self, dtype, device) -> torch.Tensor:
        # depends on the weights only: recompute when any of them changed (or in training)
        if self.training and torch.is_grad_enabled():
            return self.isolated_interaction_energy(dtype, device)
        from mlpot.nn.cache import cached_on_weights

        return cached_on_weights(self, "_iso_cache", self.isolated_interaction_energy, dtype, device)

    def node_e0(self, graph: dict) -> torch.Tensor:
        """Isolated-atom energy of each atom (N,), from the row of its head."""
        if len(self.heads) == 1:
            return super().node_e0(graph)
        idx = self.species_index(graph["atomic_numbers"])
        return self.atomic_energies.to(graph["positions"].dtype)[self.node_heads(graph), idx]

    @property
    def e0s(self) -> dict[int, float]:
        """E0 per atomic number of the active head (of the first head when none is active)."""
        h = 0 if self.active_head is None else self.active_head_index
        e0 = self.atomic_energies if len(self.heads) == 1 else self.atomic_energies[h]
        return {z: float(e) for z, e in zip(self.atomic_numbers, e0.tolist())}

    def compute_node_energies(self, graph: dict, vectors: torch.Tensor, between_layers=None) -> dict[str, torch.Tensor]:
        node_attrs = self.node_attrs(graph)
        node_e0 = self.node_e0(graph)
        sender, receiver = graph["edge_index"][0], graph["edge_index"][1]
        node_heads = None if len(self.heads) == 1 else self.node_heads(graph)
        node_inter, invariants = self._interaction_energy(node_attrs, vectors, sender, receiver, node_heads,
                                                          between_layers)
        if self.config["subtract_isolated"]:
            species = self.species_index(graph["atomic_numbers"])
            iso = self._isolated_cached(vectors.dtype, vectors.device)
            node_inter = node_inter - (iso[species] if node_heads is None else iso[node_heads, species])
        node_energy = node_e0 + self.scale_shift(node_inter, node_heads)
        return {"node_energy": node_energy, "node_features": torch.cat(invariants, dim=-1)}


def readout_heads(readout, node_feats: torch.Tensor, node_heads: torch.Tensor) -> torch.Tensor:
    """``(N, H)`` outputs of a readout, the gated one masked to each atom's head."""
    if isinstance(readout, NonLinearReadoutBlock):
        return readout(node_feats, node_heads)
    return readout(node_feats)


@register_model("ScaleShiftMACE")
class ScaleShiftMACE(MACE):
    """mace-torch's name for MACE with an energy scale and shift; the same model as :class:`MACE`."""
