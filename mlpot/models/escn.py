r"""eSCN-style potential: message passing with SO(2) convolutions in per-edge frames.

Features
--------
Each atom carries :math:`x_i \in \mathbb{R}^{(L+1)^2 \times C}` (``lmax = L``,
``sphere_channels = C``; rows are the e3nn real spherical-harmonic components of degrees
``0..L``, "component" normalization, parity :math:`(-1)^l`). They start as a learned
per-element embedding in the ``l = 0`` row, zeros elsewhere.

One layer (``num_layers`` of them, pre-norm residual)
-------------------------------------------------------
For an edge :math:`i \to j` (sender ``i = edge_index[0]``, receiver ``j``) with vector
:math:`\vec r_{ij}` and a proper rotation :math:`R_{ij}` taking :math:`\hat r_{ij}` to the
``y`` axis (:func:`mlpot.o3.wigner.edge_rotation`):

1. :math:`h = \mathrm{LN}(x)` (:class:`mlpot.nn.norm.EquivariantLayerNorm`);
   :math:`z_{ij} = [h_i \,\|\, h_j]` (``2C`` channels).
2. Rotate into the edge frame and keep :math:`|m| \le m_{max}`:
   :math:`\tilde z = P_{m_{max}} D(R_{ij})\, z_{ij}` (Wigner-D blocks, m-major order).
3. Radial modulation: :math:`\tilde z_{l,\pm m,c} \mathrel{*}= \rho_{ij}[l, |m|, c]`, with
   :math:`\rho_{ij} = \mathrm{MLP}(B(r_{ij}) \,\|\, e_{Z_i} \,\|\, e_{Z_j})` from a Bessel
   basis :math:`B_n(r) = \sqrt{2/r_c}\,\sin(n\pi r/r_c)/r` times the polynomial envelope
   :math:`f_p(r/r_c)` and per-element edge embeddings (``edge_channels``).
4. SO(2) linear map (:class:`SO2Linear`): for every :math:`m`, one dense matrix
   :math:`W_m` acting on the stacked :math:`(l \ge m, c)` entries, the same matrix for
   :math:`+m` and :math:`-m`. In the edge frame :math:`Y(\hat y)` is non-zero only at
   :math:`m = 0`, so a Clebsch–Gordan product with the edge harmonics couples only equal
   :math:`|m|` (eSCN, Passaro & Zitnick 2023); the "imaginary" part that mixes :math:`+m`
   with :math:`-m` is dropped because it changes parity (see :mod:`mlpot.o3.so2`: with
   parities :math:`(-1)^l` on both sides only the even paths exist). This makes every layer
   **O(3)**-equivariant, so energies are reflection invariant, not only rotation invariant.
5. Edge nonlinearity in the frame: SiLU on the :math:`(l, m) = (0, 0)` row, every other row
   multiplied by a sigmoid gate computed from the :math:`m = 0` rows, which are invariant
   under the frame's residual symmetry (rotations about and mirrors containing the edge).
6. Second SO(2) linear map (``hidden_channels -> C``), multiplied by the envelope
   :math:`f_p(r_{ij}/r_c)` (so messages vanish smoothly at the cutoff), rotated back with
   :math:`D(R_{ij})^\top P^\top`, summed over senders and divided by ``avg_num_neighbors``:
   :math:`x_j \leftarrow x_j + \frac{1}{\bar n} \sum_i m_{ij}`.
7. Node feed-forward: :math:`x \leftarrow x + W_2\,\sigma_{S^2}(W_1\,\mathrm{LN}(x))`, with
   per-degree channel mixing :math:`W` (bias on ``l = 0`` only) and
   :math:`\sigma_{S^2}` the separable S2 activation (:mod:`mlpot.nn.s2_activation`;
   ``ffn_activation: "gate"`` uses an exactly equivariant sigmoid gate instead).

Readout
-------
:math:`y_i = \mathrm{MLP}(\mathrm{LN}(x_i)_{l=0})` and

.. math:: E_i = E_0(Z_i) + \text{scale}\,\big(y_i - y^{\text{iso}}(Z_i)\big) + \text{shift},

where :math:`y^{\text{iso}}(Z)` is the same network run for a lone atom of element ``Z`` (no
messages). So an atom without neighbours has exactly :math:`E_0 + \text{shift}` (``shift``
defaults to 0), and every energy is a smooth function of the geometry.

Equivariance is exact except for the S2-grid activation of the node feed-forward, whose
rotation error is the grid's aliasing error (see :mod:`mlpot.nn.s2_activation`; choose
``grid_resolution`` to trade accuracy for time).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from mlpot.errors import ConfigError
from mlpot.models.base import PotentialModel, register_model
from mlpot.nn.edge_geometry import build_edge_geometry, check_edge_geometry_backend
from mlpot.nn.norm import EquivariantLayerNorm
from mlpot.nn.radial import BesselRadial
from mlpot.nn.s2_activation import SeparableS2Activation
from mlpot.o3.so2 import EdgeFrameRotation, SO2Linear, edge_frame_index

__all__ = ["ESCN", "SO2Linear", "EdgeFrameRotation", "edge_frame_index"]


# --------------------------------------------------------------------------- node blocks
class DegreeWiseLinear(nn.Module):
    """Channel mixing per degree, ``y_{lmd} = sum_c x_{lmc} W^{(l)}_{cd}`` (+ bias for ``l = 0``)."""

    def __init__(self, lmax: int, channels_in: int, channels_out: int):
        super().__init__()
        self.lmax = int(lmax)
        self.weight = nn.Parameter(torch.randn(self.lmax + 1, channels_in, channels_out) / math.sqrt(channels_in))
        self.bias = nn.Parameter(torch.zeros(channels_out))
        degree = torch.cat([torch.full((2 * l + 1,), l, dtype=torch.long) for l in range(self.lmax + 1)])
        self.register_buffer("degree", degree, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = []
        for l in range(self.lmax + 1):
            parts.append(x[:, l * l : (l + 1) ** 2, :] @ self.weight[l])
        parts[0] = parts[0] + self.bias
        return torch.cat(parts, 1)


class GateActivation(nn.Module):
    """SiLU on the scalars; every ``l >= 1`` block of channel ``c`` times ``sigmoid(g_{l,c})``
    with gates ``g`` linear in the scalars: exactly O(3)-equivariant. ``(N, (L+1)^2, C)``."""

    def __init__(self, lmax: int, channels: int):
        super().__init__()
        self.lmax, self.channels = int(lmax), int(channels)
        self.gate = nn.Linear(channels, max(self.lmax, 1) * channels)
        degree = torch.cat([torch.full((2 * l + 1,), l - 1, dtype=torch.long) for l in range(1, self.lmax + 1)])
        self.register_buffer("degree", degree, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x[:, 0, :]
        out = [nn.functional.silu(s)[:, None, :]]
        if self.lmax > 0:
            g = torch.sigmoid(self.gate(s)).reshape(-1, self.lmax, self.channels)
            out.append(x[:, 1:, :] * g[:, self.degree, :])
        return torch.cat(out, 1)


class FeedForward(nn.Module):
    """``x -> W_2 act(W_1 x)`` with degree-wise linears and an S2 or gate activation."""

    def __init__(self, lmax: int, channels: int, hidden: int, activation: str, grid_resolution):
        super().__init__()
        self.lin1 = DegreeWiseLinear(lmax, channels, hidden)
        if activation == "s2":
            res = int(grid_resolution) if grid_resolution else None
            self.act = SeparableS2Activation(lmax, res_beta=res)
        elif activation == "gate":
            self.act = GateActivation(lmax, hidden)
        else:
            raise ConfigError(f"ESCN: ffn_activation must be 's2' or 'gate', got {activation!r}")
        self.lin2 = DegreeWiseLinear(lmax, hidden, channels)

    def forward(self, x):
        return self.lin2(self.act(self.lin1(x)))


class EdgeFrameGate(nn.Module):
    """Nonlinearity on edge-frame features ``(E, K, H)`` (m-major layout, ``m = 0`` rows first):
    SiLU on ``(l, m) = (0, 0)``, the other rows gated by ``sigmoid`` of a linear function of the
    ``L + 1`` invariant ``m = 0`` rows."""

    def __init__(self, lmax: int, mmax: int, channels: int):
        super().__init__()
        rows, _, _ = edge_frame_index(lmax, mmax)
        self.lmax, self.channels = int(lmax), int(channels)
        # the degree l of each row; gates are per (l, channel) for l >= 1
        degree = []
        for r in rows:
            degree.append(int(math.isqrt(r)))
        self.register_buffer("degree", torch.tensor(degree, dtype=torch.long), persistent=False)
        self.gate = nn.Linear((self.lmax + 1) * channels, max(self.lmax, 1) * channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        E = x.shape[0]
        inv = x[:, : self.lmax + 1, :].reshape(E, (self.lmax + 1) * self.channels)
        first = nn.functional.silu(x[:, :1, :])
        if self.lmax == 0:
            return first
        g = torch.sigmoid(self.gate(inv)).reshape(E, self.lmax, self.channels)
        rest = x[:, 1:, :] * g[:, self.degree[1:] - 1, :]
        return torch.cat([first, rest], 1)


class ESCNLayer(nn.Module):
    """One message-passing layer plus node feed-forward (see the module doc, steps 1-7)."""

    def __init__(self, lmax, mmax, channels, hidden, edge_channels, num_bessel, ffn_activation, grid_resolution,
                 backend="reference"):
        super().__init__()
        rows, half, _ = edge_frame_index(lmax, mmax)
        self.num_half = max(half) + 1
        self.register_buffer("half_index", torch.tensor(half, dtype=torch.long), persistent=False)
        self.channels = channels
        self.norm_msg = EquivariantLayerNorm(lmax, channels)
        self.radial = nn.Sequential(
            nn.Linear(num_bessel + 2 * edge_channels, edge_channels),
            nn.SiLU(),
            nn.Linear(edge_channels, self.num_half * 2 * channels),
        )
        self.conv1 = SO2Linear(lmax, mmax, 2 * channels, hidden, backend=backend)
        self.act = EdgeFrameGate(lmax, mmax, hidden)
        self.conv2 = SO2Linear(lmax, mmax, hidden, channels, backend=backend)
        self.norm_ffn = EquivariantLayerNorm(lmax, channels)
        self.ffn = FeedForward(lmax, channels, hidden, ffn_activation, grid_resolution)

    def message(self, x, edge_index, frame, Ds, edge_feats, envelope, avg_num_neighbors):
        sender, receiver = edge_index[0], edge_index[1]
        h = self.norm_msg(x)
        z = torch.cat([h[sender], h[receiver]], -1)  # (E, dim, 2C)
        z = frame.to_frame(Ds, z)  # (E, K, 2C), edge frame, |m| <= mmax
        rho = self.radial(edge_feats).reshape(-1, self.num_half, 2 * self.channels)
        z = z * rho[:, self.half_index, :]
        y = self.conv2(self.act(self.conv1(z)))
        y = y * envelope[:, None, None]
        msg = frame.from_frame(Ds, y)  # (E, dim, C)
        agg = torch.zeros_like(x).index_add(0, receiver, msg)
        return agg / avg_num_neighbors

    def node_update(self, x):
        return x + self.ffn(self.norm_ffn(x))


@register_model("ESCN")
class ESCN(PotentialModel):
    """eSCN-style equivariant potential (see the module doc for the math).

    Hyperparameters (all JSON-serialisable, kept in ``self.config``):

    r_max: cutoff (Å). atomic_numbers: species, one-hot order. num_layers: message-passing
    layers. lmax: largest degree of the node features. mmax: largest ``|m|`` kept in the edge
    frames. sphere_channels: channels per ``(l, m)`` of the node features. hidden_channels:
    channels inside the SO(2) convolutions and the feed-forward. edge_channels: width of the
    element embeddings and radial MLP. num_bessel: radial basis size. polynomial_cutoff_p:
    envelope order. avg_num_neighbors: message normalisation. e0s, scale, shift: energy
    referencing (``E_i = E0 + scale * y_i + shift``). ffn_activation: ``"s2"`` (S2-grid SiLU)
    or ``"gate"``. grid_resolution: Gauss–Legendre points of the S2 grid (default ``2 lmax + 8``;
    azimuths twice that). backend: ``reference | triton | auto``; ``triton`` runs the edge-frame
    SO(2) linear maps (registry op ``so2_linear``) and the radial basis (``edge_embedding``) on
    their kernels; the Wigner rotations, norms, gates and MLPs stay torch ops. zbl: add ZBL repulsion. seed: weight initialisation
    seed (None: torch's global RNG).
    """

    def __init__(
        self,
        r_max: float = 5.0,
        atomic_numbers=None,
        num_layers: int = 2,
        lmax: int = 6,
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
    ):
        if atomic_numbers is None:
            raise ConfigError("ESCN: `atomic_numbers` is required (the species the model knows)")
        config = dict(
            r_max=float(r_max), atomic_numbers=[int(z) for z in atomic_numbers], num_layers=int(num_layers),
            lmax=int(lmax), mmax=int(mmax), sphere_channels=int(sphere_channels),
            hidden_channels=int(hidden_channels), edge_channels=int(edge_channels), num_bessel=int(num_bessel),
            polynomial_cutoff_p=int(polynomial_cutoff_p), avg_num_neighbors=float(avg_num_neighbors),
            e0s=e0s, scale=float(scale), shift=float(shift), ffn_activation=str(ffn_activation),
            grid_resolution=None if grid_resolution is None else int(grid_resolution), backend=str(backend),
            zbl=bool(zbl), seed=seed, dtype=str(dtype),
        )
        if isinstance(e0s, dict):
            config["e0s"] = {str(k): float(v) for k, v in e0s.items()}
        super().__init__(config)
        if config["lmax"] < 0 or config["mmax"] < 0:
            raise ConfigError(f"ESCN: lmax and mmax must be >= 0, got lmax={lmax}, mmax={mmax}")
        if config["num_layers"] < 1:
            raise ConfigError(f"ESCN: num_layers must be >= 1, got {num_layers}")
        if config["avg_num_neighbors"] <= 0:
            raise ConfigError(f"ESCN: avg_num_neighbors must be > 0, got {avg_num_neighbors}")
        if backend not in ("reference", "triton", "auto"):
            raise ConfigError(f"ESCN: backend must be reference, triton or auto, got {backend!r}")
        self.lmax, self.mmax = config["lmax"], min(config["mmax"], config["lmax"])
        self.avg_num_neighbors = config["avg_num_neighbors"]
        self.scale, self.shift = config["scale"], config["shift"]
        C, H, Ce = config["sphere_channels"], config["hidden_channels"], config["edge_channels"]
        if seed is not None:
            state = torch.random.get_rng_state()
            torch.manual_seed(int(seed))
        try:
            self.node_embedding = nn.Embedding(self.num_elements, C)
            self.edge_embedding_src = nn.Embedding(self.num_elements, Ce)
            self.edge_embedding_dst = nn.Embedding(self.num_elements, Ce)
            self.layers = nn.ModuleList(
                ESCNLayer(self.lmax, self.mmax, C, H, Ce, config["num_bessel"], config["ffn_activation"],
                          config["grid_resolution"], config["backend"])
                for _ in range(config["num_layers"])
            )
            self.final_norm = EquivariantLayerNorm(self.lmax, C)
            self.readout = nn.Sequential(nn.Linear(C, H), nn.SiLU(), nn.Linear(H, 1))
        finally:
            if seed is not None:
                torch.random.set_rng_state(state)
        self.frame = EdgeFrameRotation(self.lmax, self.mmax)
        self.register_buffer(
            "bessel_freqs",
            math.pi / self.r_max * torch.arange(1, config["num_bessel"] + 1, dtype=torch.float64),
            persistent=False,
        )
        # the registry ops this model runs: so2_linear (checked by SO2Linear) and edge_embedding;
        # a backend without one of them is a ConfigError here
        check_edge_geometry_backend(config["backend"])
        self.to(torch.float32 if config["dtype"] == "float32" else torch.float64)

    # ------------------------------------------------------------------------------------
    def _embed(self, species: torch.Tensor, dtype) -> torch.Tensor:
        n = species.shape[0]
        C = self.config["sphere_channels"]
        x = torch.zeros(n, (self.lmax + 1) ** 2, C, dtype=dtype, device=species.device)
        x[:, 0, :] = self.node_embedding(species).to(dtype)
        return x

    def _readout(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scalars = self.final_norm(x)[:, 0, :]
        return self.readout(scalars).squeeze(-1), scalars

    def isolated_outputs(self, dtype=None) -> torch.Tensor:
        """Readout ``y^iso(Z)`` of a lone atom of each species (no messages), shape ``(S,)``."""
        dtype = dtype or self.node_embedding.weight.dtype
        species = torch.arange(self.num_elements, device=self.node_embedding.weight.device)
        x = self._embed(species, dtype)
        for layer in self.layers:
            x = layer.node_update(x)
        return self._readout(x)[0]

    def compute_node_energies(self, graph: dict, vectors: torch.Tensor, between_layers=None) -> dict[str, torch.Tensor]:
        dtype = vectors.dtype
        species = self.species_index(graph["atomic_numbers"])
        edge_index = graph["edge_index"]
        sender, receiver = edge_index[0], edge_index[1]
        x = self._embed(species, dtype)

        p = self.config["polynomial_cutoff_p"]
        geometry = build_edge_geometry(
            vectors, radial_embedding=BesselRadial(self.bessel_freqs.to(dtype), self.r_max, p),
            frames_lmax=self.lmax, backend=self.config["backend"], envelope=True,
        )
        rbf = geometry.radial  # Bessel basis x envelope (the fused kernel with backend triton)
        envelope = geometry.envelope[:, 0]
        edge_feats = torch.cat(
            [rbf, self.edge_embedding_src(species[sender]), self.edge_embedding_dst(species[receiver])], -1
        )
        Ds = self.frame.setup(vectors, geometry.wigner)  # per degree, rows |m| <= mmax of D^l(R_e)
        for t, layer in enumerate(self.layers):
            if t > 0 and between_layers is not None:
                x = between_layers(x)
            x = x + layer.message(x, edge_index, self.frame, Ds, edge_feats, envelope, self.avg_num_neighbors)
            x = layer.node_update(x)
        y, scalars = self._readout(x)
        y = y - self.isolated_outputs(dtype)[species]
        node_energy = self.node_e0(graph) + self.scale * y + self.shift
        return {"node_energy": node_energy, "node_features": scalars}
