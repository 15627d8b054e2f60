r"""EquiformerV2 (Liao, Wood, Das & Smidt, ICLR 2024): an equivariant graph-attention Transformer
built on eSCN's SO(2) convolutions, on mlpot's shared core.

Features
--------
Each atom carries :math:`x_i \in \mathbb{R}^{(L+1)^2 \times C}` (``lmax = L``,
``sphere_channels = C``; e3nn real spherical harmonics, "component" normalization, parity
:math:`(-1)^l`). They start as a learned element embedding in the ``l = 0`` row plus the
*edge-degree embedding*: every edge :math:`i \to j` puts radial features
:math:`\rho^{deg}_{ij} \in \mathbb{R}^{(L+1) \times C}` into the ``m = 0`` rows of the edge
frame, rotates them back and adds them to the receiver,
:math:`x_j \mathrel{+}= \frac{1}{\bar n} \sum_i f(r_{ij})\, D(R_{ij})^\top P_0^\top \rho^{deg}_{ij}`.

Edge quantities (shared by all layers, :func:`mlpot.nn.edge_geometry.build_edge_geometry`)
--------------------------------------------------------------------------------------------
:math:`R_{ij}` rotates :math:`\hat r_{ij}` to ``y`` (:func:`mlpot.o3.wigner.edge_rotation`); the
Wigner rows :math:`|m| \le m_{max}` of :math:`D^l(R_{ij})` move features into the edge frame
(:class:`mlpot.o3.so2.EdgeFrameRotation`); :math:`f` is the polynomial envelope
(:class:`mlpot.nn.radial.PolynomialCutoff`). Radial functions (``radial``): ``mlp`` is an MLP of
the Bessel basis times :math:`f` and the element embeddings of both atoms (eSCN's);
``spline`` is a learnable cubic B-spline of :math:`r_{ij}` by table lookup
(:mod:`mlpot.nn.spline_radial`).

One block (``num_layers`` of them, pre-norm residual)
-----------------------------------------------------
1. :math:`h = \mathrm{SLN}(x)`, the separable layer norm
   (:class:`mlpot.nn.norm.SeparableLayerNorm`).
2. **Equivariant graph attention.** :math:`z_{ij} = P D(R_{ij}) [h_i \| h_j]` (``2C``
   channels, edge frame), modulated per :math:`(l, |m|, c)` by the radial function, then an SO(2)
   linear map (:class:`mlpot.o3.so2.SO2Linear`, one matrix per :math:`m`, shared by
   :math:`\pm m`) to ``attn_hidden_channels`` :math:`H`: :math:`u_{ij}`.

   * Attention weights from the invariant :math:`m = 0` rows of :math:`u_{ij}` (invariant under
     the frame's residual rotations about and mirrors containing the edge):
     :math:`a_{ij} = \mathrm{Lin}(u_{ij}[m=0])` split into ``num_heads`` heads of
     ``attn_alpha_channels``, **attention re-normalization** (a layer norm of each head's
     :math:`a` before the nonlinearity), the smooth leaky ReLU
     :math:`\phi(s) = \tfrac{1+\gamma}{2} s + \tfrac{1-\gamma}{2} s\,(2\sigma(s) - 1)`
     (:math:`\gamma = 0.2`), and a learned vector per head: :math:`s^k_{ij} = w_k \cdot \phi(\mathrm{LN}(a^k_{ij}))`.
     The weights are a softmax over the senders of each receiver, weighted by the envelope,
     :math:`\alpha^k_{ij} = f(r_{ij}) e^{s^k_{ij}} / \sum_{i'} f(r_{i'j}) e^{s^k_{i'j}}`, so that an
     edge entering or leaving the cutoff changes the weights continuously (the paper's plain
     softmax does not; this is the only change to it).
   * Values: the edge-frame gate of eSCN (SiLU on :math:`(0,0)`, the other rows times sigmoids
     of the :math:`m = 0` rows), a second SO(2) linear map to ``num_heads x attn_value_channels``,
     times :math:`\alpha^k_{ij} f(r_{ij})` per head, rotated back with :math:`D^\top P^\top`,
     summed over senders, heads concatenated and mixed per degree back to ``C`` channels.

   :math:`x \leftarrow x + \mathrm{Attn}(h)`.
3. **Feed-forward**, :math:`x \leftarrow x + W_2\, \sigma_{S^2}(W_1 \mathrm{SLN}(x))`: per-degree
   channel mixing to ``ffn_hidden_channels`` and back, with the separable S2 activation
   (:class:`mlpot.nn.s2_activation.SeparableS2Activation`: SiLU of the scalars, SiLU on the S2
   grid for ``l >= 1``). ``node_mixing: s2_mlp`` replaces it by Facet's pointwise MLP on the
   sphere (:class:`mlpot.nn.s2_mlp.S2MLPNodeMixing`).

Readout
-------
:math:`y_i = \mathrm{MLP}(\mathrm{SLN}(x_i)_{l=0})`,
:math:`E_i = E_0(Z_i) + \text{scale}\,(y_i - y^{iso}(Z_i)) + \text{shift}`, with
:math:`y^{iso}(Z)` the same network for a lone atom (so an isolated atom has exactly
:math:`E_0 + \text{shift}`). Forces and stress by autograd (:class:`mlpot.models.base.PotentialModel`).

Equivariance is exact except for the S2-grid operations (activation or node mixing), whose
rotation error is the grid's aliasing error (``grid_resolution``).

Defaults follow the paper's 31M-parameter OC20 configuration (8 blocks, ``lmax`` 6, ``mmax`` 2,
128 sphere channels, 8 heads with 64 alpha and 16 value channels, 64 attention-hidden and 128
feed-forward channels, 128 edge channels), except the cutoff: the paper uses 12 Å with at most 20
neighbours; mlpot keeps every neighbour, so the default cutoff is 5 Å. Tests and the rMD17
config use far smaller settings that run on a CPU.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from mlpot.errors import ConfigError
from mlpot.models.base import PotentialModel, register_model
from mlpot.models.escn import DegreeWiseLinear, EdgeFrameGate, FeedForward
from mlpot.models.hip import attach_hessian_head
from mlpot.nn.edge_geometry import build_edge_geometry, check_edge_geometry_backend
from mlpot.nn.norm import SeparableLayerNorm
from mlpot.nn.radial import BesselRadial, PolynomialCutoff
from mlpot.nn.s2_mlp import S2MLPNodeMixing
from mlpot.nn.spline_radial import RADIAL_KINDS, check_radial_backend, make_edge_radial
from mlpot.o3.so2 import EdgeFrameRotation, SO2Linear, edge_frame_index

__all__ = ["EquiformerV2", "EquivariantGraphAttention", "envelope_softmax", "smooth_leaky_relu"]

NODE_MIXING_KINDS = ("ffn", "s2_mlp")


def smooth_leaky_relu(x: torch.Tensor, negative_slope: float = 0.2) -> torch.Tensor:
    r""":math:`\tfrac{1+\gamma}{2} x + \tfrac{1-\gamma}{2} x (2\sigma(x) - 1)`: slope 1 for large
    positive ``x``, :math:`\gamma` for large negative ``x``, smooth in between."""
    g = float(negative_slope)
    return 0.5 * (1 + g) * x + 0.5 * (1 - g) * x * (2 * torch.sigmoid(x) - 1)


def envelope_softmax(logits: torch.Tensor, envelope: torch.Tensor, index: torch.Tensor, num_nodes: int):
    r"""Per-receiver softmax weighted by the envelope: ``(E, K) -> (E, K)``,
    :math:`\alpha_e = f_e e^{s_e} / \sum_{e': \text{index}(e') = \text{index}(e)} f_{e'} e^{s_{e'}}`.

    The per-receiver maximum of ``logits`` is subtracted first (it cancels exactly, and is
    detached). Weights of one receiver sum to 1 whenever it has an edge with :math:`f > 0`.
    """
    K = logits.shape[1]
    idx = index[:, None].expand(-1, K)
    top = logits.new_zeros(num_nodes, K).scatter_reduce(0, idx, logits.detach(), "amax", include_self=False)
    w = envelope[:, None] * torch.exp(logits - top[index])
    den = logits.new_zeros(num_nodes, K).index_add(0, index, w)
    return w / den[index].clamp_min(torch.finfo(logits.dtype).tiny)


class EquivariantGraphAttention(nn.Module):
    """Step 2 of the module doc: ``forward(h (N, (L+1)^2, C), edges) -> (N, (L+1)^2, C)``."""

    def __init__(self, lmax, mmax, channels, hidden, num_heads, alpha_channels, value_channels, radial,
                 backend="reference"):
        super().__init__()
        rows, half, _ = edge_frame_index(lmax, mmax)
        self.lmax, self.channels, self.hidden = int(lmax), int(channels), int(hidden)
        self.num_heads, self.alpha_channels, self.value_channels = int(num_heads), int(alpha_channels), int(value_channels)
        self.num_half = max(half) + 1
        self.register_buffer("half_index", torch.tensor(half, dtype=torch.long), persistent=False)
        self.radial = radial  # (lengths, edge_feats) -> (E, num_half * 2C)
        self.conv1 = SO2Linear(lmax, mmax, 2 * channels, hidden, backend=backend)
        self.alpha_linear = nn.Linear((self.lmax + 1) * hidden, num_heads * alpha_channels)
        self.alpha_norm = nn.LayerNorm(alpha_channels)  # attention re-normalization
        self.alpha_dot = nn.Parameter(torch.randn(num_heads, alpha_channels) / math.sqrt(alpha_channels))
        self.gate = EdgeFrameGate(lmax, mmax, hidden)
        self.conv2 = SO2Linear(lmax, mmax, hidden, num_heads * value_channels, backend=backend)
        self.proj = DegreeWiseLinear(lmax, num_heads * value_channels, channels)

    def forward(self, h, edges: dict) -> torch.Tensor:
        sender, receiver = edges["sender"], edges["receiver"]
        frame, Ds, env = edges["frame"], edges["wigner"], edges["envelope"]
        E = sender.shape[0]
        z = frame.to_frame(Ds, torch.cat([h[sender], h[receiver]], -1))  # (E, K, 2C)
        rho = self.radial(edges["lengths"], edges["feats"]).reshape(E, self.num_half, 2 * self.channels)
        u = self.conv1(z * rho[:, self.half_index, :])  # (E, K, H)
        inv = u[:, : self.lmax + 1, :].reshape(E, (self.lmax + 1) * self.hidden)  # the m = 0 rows
        a = self.alpha_linear(inv).reshape(E, self.num_heads, self.alpha_channels)
        logits = (smooth_leaky_relu(self.alpha_norm(a)) * self.alpha_dot).sum(-1)  # (E, heads)
        alpha = envelope_softmax(logits, env, receiver, h.shape[0]) * env[:, None]
        v = self.conv2(self.gate(u))  # (E, K, heads * V)
        K = v.shape[1]
        v = (v.reshape(E, K, self.num_heads, self.value_channels) * alpha[:, None, :, None]).reshape(E, K, v.shape[2])
        msg = frame.from_frame(Ds, v)  # (E, (L+1)^2, heads * V)
        agg = h.new_zeros(h.shape[0], h.shape[1], msg.shape[-1]).index_add(0, receiver, msg)
        return self.proj(agg)


class EquiformerV2Block(nn.Module):
    """Pre-norm residual block: graph attention, then feed-forward (or S2-MLP node mixing)."""

    def __init__(self, lmax, mmax, channels, attn_hidden, num_heads, alpha_channels, value_channels, ffn_hidden,
                 radial, node_mixing, grid_resolution, backend):
        super().__init__()
        self.norm_attn = SeparableLayerNorm(lmax, channels)
        self.attn = EquivariantGraphAttention(lmax, mmax, channels, attn_hidden, num_heads, alpha_channels,
                                              value_channels, radial, backend)
        self.norm_ffn = SeparableLayerNorm(lmax, channels)
        if node_mixing == "ffn":
            self.ffn = FeedForward(lmax, channels, ffn_hidden, "s2", grid_resolution)
        else:
            self.ffn = S2MLPNodeMixing(lmax, channels, ffn_hidden, grid_resolution)

    def forward(self, x, edges):
        x = x + self.attn(self.norm_attn(x), edges)
        return x + self.ffn(self.norm_ffn(x))


@register_model("EquiformerV2")
class EquiformerV2(PotentialModel):
    """EquiformerV2 potential (see the module doc for the math).

    Hyperparameters (JSON-serialisable, kept in ``self.config``): r_max, atomic_numbers,
    num_layers, lmax, mmax, sphere_channels, attn_hidden_channels, num_heads,
    attn_alpha_channels, attn_value_channels, ffn_hidden_channels, edge_channels (element
    embeddings and hidden width of ``radial: mlp``), num_bessel, radial (``mlp`` | ``spline``),
    num_knots (spline intervals), node_mixing (``ffn``: the paper's S2-activation feed-forward |
    ``s2_mlp``: Facet's), polynomial_cutoff_p, avg_num_neighbors (edge-degree embedding
    normalisation), e0s, scale, shift, grid_resolution (S2 grid polar nodes, default ``2 lmax + 8``),
    backend (``reference | triton | auto``: ``triton`` runs the SO(2) linear maps (``so2_linear``)
    and the Bessel basis (``edge_embedding``) on their kernels; ``radial: spline`` has no kernel
    and is a ConfigError under ``triton``), zbl, seed, dtype, hessian_head (a direct HIP Hessian
    head, :mod:`mlpot.models.hip`).
    """

    def __init__(
        self,
        r_max: float = 5.0,
        atomic_numbers=None,
        num_layers: int = 8,
        lmax: int = 6,
        mmax: int = 2,
        sphere_channels: int = 128,
        attn_hidden_channels: int = 64,
        num_heads: int = 8,
        attn_alpha_channels: int = 64,
        attn_value_channels: int = 16,
        ffn_hidden_channels: int = 128,
        edge_channels: int = 128,
        num_bessel: int = 8,
        radial: str = "mlp",
        num_knots: int = 16,
        node_mixing: str = "ffn",
        polynomial_cutoff_p: int = 5,
        avg_num_neighbors: float = 10.0,
        e0s=None,
        scale: float = 1.0,
        shift: float = 0.0,
        grid_resolution: int | None = None,
        backend: str = "reference",
        zbl: bool = False,
        seed: int | None = None,
        dtype: str = "float64",
        hessian_head=False,
    ):
        name = type(self).__name__
        if atomic_numbers is None:
            raise ConfigError(f"{name}: `atomic_numbers` is required (the species the model knows)")
        config = dict(
            r_max=float(r_max), atomic_numbers=[int(z) for z in atomic_numbers], num_layers=int(num_layers),
            lmax=int(lmax), mmax=int(mmax), sphere_channels=int(sphere_channels),
            attn_hidden_channels=int(attn_hidden_channels), num_heads=int(num_heads),
            attn_alpha_channels=int(attn_alpha_channels), attn_value_channels=int(attn_value_channels),
            ffn_hidden_channels=int(ffn_hidden_channels), edge_channels=int(edge_channels),
            num_bessel=int(num_bessel), radial=str(radial), num_knots=int(num_knots), node_mixing=str(node_mixing),
            polynomial_cutoff_p=int(polynomial_cutoff_p), avg_num_neighbors=float(avg_num_neighbors), e0s=e0s,
            scale=float(scale), shift=float(shift),
            grid_resolution=None if grid_resolution is None else int(grid_resolution), backend=str(backend),
            zbl=bool(zbl), seed=seed, dtype=str(dtype),
        )
        if hessian_head:  # only when set, so that existing model files keep their config
            config["hessian_head"] = hessian_head
        if isinstance(e0s, dict):
            config["e0s"] = {str(k): float(v) for k, v in e0s.items()}
        elif e0s is not None:
            config["e0s"] = [float(v) for v in e0s]
        super().__init__(config)
        c = config
        if c["lmax"] < 0 or c["mmax"] < 0:
            raise ConfigError(f"{name}: lmax and mmax must be >= 0, got lmax={lmax}, mmax={mmax}")
        for key in ("num_layers", "sphere_channels", "attn_hidden_channels", "num_heads", "attn_alpha_channels",
                    "attn_value_channels", "ffn_hidden_channels", "edge_channels", "num_bessel"):
            if c[key] < 1:
                raise ConfigError(f"{name}: {key} must be >= 1, got {c[key]}")
        if c["avg_num_neighbors"] <= 0:
            raise ConfigError(f"{name}: avg_num_neighbors must be > 0, got {avg_num_neighbors}")
        if c["radial"] not in RADIAL_KINDS:
            raise ConfigError(f"{name}: radial must be one of {', '.join(RADIAL_KINDS)}, got {radial!r}")
        if c["node_mixing"] not in NODE_MIXING_KINDS:
            raise ConfigError(f"{name}: node_mixing must be one of {', '.join(NODE_MIXING_KINDS)}, got {node_mixing!r}")
        if c["backend"] not in ("reference", "triton", "auto"):
            raise ConfigError(f"{name}: backend must be reference, triton or auto, got {backend!r}")
        if c["dtype"] not in ("float32", "float64"):
            raise ConfigError(f"{name}: dtype must be float32 or float64, got {dtype!r}")
        # the registry ops this model runs: so2_linear (checked by SO2Linear), edge_embedding for
        # radial: mlp, spline_radial for radial: spline; a backend without one is a ConfigError here
        check_radial_backend(c["radial"], c["backend"])
        if c["radial"] == "mlp":
            check_edge_geometry_backend(c["backend"])
        self.lmax, self.mmax = c["lmax"], min(c["mmax"], c["lmax"])
        C, Ce = c["sphere_channels"], c["edge_channels"]
        num_half = max(edge_frame_index(self.lmax, self.mmax)[1]) + 1
        rng_state = torch.random.get_rng_state() if seed is not None else None
        if seed is not None:
            torch.manual_seed(int(seed))
        try:
            def radial_net(num_out):
                return make_edge_radial(c["radial"], num_out, num_in=c["num_bessel"] + 2 * Ce, hidden=Ce,
                                        r_max=self.r_max, num_knots=c["num_knots"], p=c["polynomial_cutoff_p"])

            self.node_embedding = nn.Embedding(self.num_elements, C)
            if c["radial"] == "mlp":
                self.edge_embedding_src = nn.Embedding(self.num_elements, Ce)
                self.edge_embedding_dst = nn.Embedding(self.num_elements, Ce)
            self.degree_radial = radial_net((self.lmax + 1) * C)
            self.blocks = nn.ModuleList(
                EquiformerV2Block(self.lmax, self.mmax, C, c["attn_hidden_channels"], c["num_heads"],
                                  c["attn_alpha_channels"], c["attn_value_channels"], c["ffn_hidden_channels"],
                                  radial_net(num_half * 2 * C), c["node_mixing"], c["grid_resolution"], c["backend"])
                for _ in range(c["num_layers"])
            )
            self.final_norm = SeparableLayerNorm(self.lmax, C)
            self.readout = nn.Sequential(nn.Linear(C, c["ffn_hidden_channels"]), nn.SiLU(),
                                         nn.Linear(c["ffn_hidden_channels"], 1))
        finally:
            if rng_state is not None:
                torch.random.set_rng_state(rng_state)
        self.frame = EdgeFrameRotation(self.lmax, self.mmax)
        self.register_buffer(
            "bessel_freqs", math.pi / self.r_max * torch.arange(1, c["num_bessel"] + 1, dtype=torch.float64),
            persistent=False,
        )
        self.to(torch.float32 if c["dtype"] == "float32" else torch.float64)
        attach_hessian_head(self, C)

    # ------------------------------------------------------------------------------------
    def _edges(self, species, vectors, edge_index) -> dict:
        """Everything the blocks read about the edges, computed once per forward pass."""
        c = self.config
        dtype = vectors.dtype
        sender, receiver = edge_index[0], edge_index[1]
        if c["radial"] == "mlp":
            geometry = build_edge_geometry(
                vectors, radial_embedding=BesselRadial(self.bessel_freqs.to(dtype), self.r_max, c["polynomial_cutoff_p"]),
                frames_lmax=self.lmax, backend=c["backend"], envelope=True,
            )
            feats = torch.cat([geometry.radial, self.edge_embedding_src(species[sender]).to(dtype),
                               self.edge_embedding_dst(species[receiver]).to(dtype)], -1)
            envelope = geometry.envelope[:, 0]
        else:
            geometry = build_edge_geometry(vectors, frames_lmax=self.lmax, backend=c["backend"])
            feats = None
            envelope = PolynomialCutoff.envelope(geometry.lengths, self.r_max, c["polynomial_cutoff_p"])[:, 0]
        return {"sender": sender, "receiver": receiver, "lengths": geometry.lengths, "feats": feats,
                "envelope": envelope, "frame": self.frame, "wigner": self.frame.setup(vectors, geometry.wigner)}

    def _node_features(self, species, vectors, edge_index) -> torch.Tensor:
        """Final node features ``(N, (L+1)^2, C)``."""
        dtype = vectors.dtype
        N, C = species.shape[0], self.config["sphere_channels"]
        edges = self._edges(species, vectors, edge_index)
        x = torch.zeros(N, (self.lmax + 1) ** 2, C, dtype=dtype, device=vectors.device)
        x[:, 0, :] = self.node_embedding(species).to(dtype)
        # edge-degree embedding: radial features in the m = 0 rows of each edge frame, rotated back
        E = vectors.shape[0]
        if E:
            deg = self.degree_radial(edges["lengths"], edges["feats"]).reshape(E, self.lmax + 1, C)
            deg = deg * edges["envelope"][:, None, None]
            K = self.frame.to_mmajor.numel()  # rows kept in the edge frame; the m = 0 rows come first
            y = torch.cat([deg, deg.new_zeros(E, K - (self.lmax + 1), C)], 1)
            msg = self.frame.from_frame(edges["wigner"], y)
            x = x + x.new_zeros(x.shape).index_add(0, edges["receiver"], msg) / self.config["avg_num_neighbors"]
        for block in self.blocks:
            x = block(x, edges)
        return x

    def _readout(self, x):
        scalars = self.final_norm(x)[:, 0, :]
        return self.readout(scalars).squeeze(-1), scalars

    def isolated_outputs(self, dtype=None, device=None) -> torch.Tensor:
        """Readout ``y^iso(Z)`` of a lone atom of each species (no edges), shape ``(S,)``."""
        p = self.node_embedding.weight
        dtype, device = dtype or p.dtype, device or p.device
        species = torch.arange(self.num_elements, device=device)
        empty = torch.zeros(2, 0, dtype=torch.long, device=device)
        x = self._node_features(species, torch.zeros(0, 3, dtype=dtype, device=device), empty)
        return self._readout(x)[0]

    def _isolated_cached(self, dtype, device) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            return self.isolated_outputs(dtype, device)
        from mlpot.nn.cache import cached_on_weights

        return cached_on_weights(self, "_iso_cache", self.isolated_outputs, dtype, device)

    def compute_node_energies(self, graph: dict, vectors: torch.Tensor) -> dict[str, torch.Tensor]:
        species = self.species_index(graph["atomic_numbers"])
        x = self._node_features(species, vectors, graph["edge_index"])
        y, scalars = self._readout(x)
        y = y - self._isolated_cached(vectors.dtype, vectors.device)[species]
        node_energy = self.node_e0(graph) + self.scale_energy(y)
        # node_features: the invariant channels; node_sph_features: the l <= 2 part (N, <=9, C)
        return {"node_energy": node_energy, "node_features": scalars, "node_sph_features": x[:, :9, :]}

    def scale_energy(self, y: torch.Tensor) -> torch.Tensor:
        return self.config["scale"] * y + self.config["shift"]
