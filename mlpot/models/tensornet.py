r"""TensorNet (Simeon & De Fabritiis, NeurIPS 2023): message passing on Cartesian rank-2 tensors.

Every atom carries ``C`` channels of a :math:`3\times3` matrix :math:`X_i^{c}`, decomposed as

.. math::

    X = I(X) + A(X) + S(X),\quad I(X) = \tfrac13 \mathrm{tr}(X)\,\mathbb 1,\quad
    A(X) = \tfrac12 (X - X^T),\quad S(X) = \tfrac12 (X + X^T) - I(X),

the scalar (l = 0), antisymmetric (l = 1) and symmetric traceless (l = 2) parts. Under
:math:`Q \in SO(3)` every part transforms as :math:`X \to Q X Q^T`.

**Embedding.** For an edge :math:`j \to i` of length :math:`r` and direction :math:`\hat r`,
the edge tensors are :math:`\mathbb 1`, :math:`[\hat r]_\times` (the skew matrix of
:math:`\hat r`) and :math:`\hat r \hat r^T - \tfrac13\mathbb 1`. With Bessel features times the
polynomial envelope :math:`b(r) f(r)` (:class:`mlpot.nn.radial.RadialEmbeddingBlock`) and a
pair embedding :math:`z_{ij} = W [e_{Z_i}, e_{Z_j}]`,

.. math::

    X_i = \frac{1}{\bar n}\sum_j z_{ij} \odot \big( w_I\, b(r)f(r)\, \mathbb 1
          + w_A\, b(r)f(r)\, [\hat r]_\times + w_S\, b(r)f(r)\, (\hat r \hat r^T - \tfrac13 \mathbb 1) \big),

then each part is mixed over channels by its own matrix and scaled by an MLP of the invariant
norms :math:`\|I\|^2, \|A\|^2, \|S\|^2`.

**Interaction.** :math:`\tilde X = X / (\|X\|^2 + 1)`; :math:`Y = W_I I(\tilde X) + W_A A(\tilde X)
+ W_S S(\tilde X)`; the message :math:`M_i = \bar n^{-1}\sum_j \phi_I(r) I(Y_j) + \phi_A(r) A(Y_j)
+ \phi_S(r) S(Y_j)` with radial MLPs :math:`\phi` times the envelope; the matrix product

* ``equivariance: O(3)`` (default): :math:`P = M Y + Y M`. The antisymmetric part built from
  :math:`[\hat r]_\times` is odd under a reflection, :math:`I` and :math:`S` even; the
  anticommutator maps (even, even) and (odd, odd) to even I/S parts and (odd, even) to odd A
  parts, so the parity grading is kept and the energy is invariant under all of O(3);
* ``equivariance: SO(3)``: :math:`P = M Y`. Its commutator part :math:`[S, A]` puts odd terms
  into the symmetric part: rotation-equivariant, but a mirror image has another energy.

Then :math:`Z = W'_I I(P') + W'_A A(P') + W'_S S(P')` with :math:`P' = P / (\|P\|^2 + 1)` and
:math:`X \leftarrow X + Z + Z^2` (:math:`Z^2` keeps the grading as the anticommutator does).

**Readout.** :math:`E_i = E_0(Z_i) + \text{scale}\,[\mathrm{MLP}(q_i) - \mathrm{MLP}(0)] + \text{shift}` with :math:`q_i = (\|I(X_i)\|^2, \|A(X_i)\|^2,
\|S(X_i)\|^2)` over the channels: an atom with no neighbour (:math:`X_i = 0`) has exactly
:math:`E_0 + \text{shift}`. Forces and stress come from the base class by autograd.
"""
from __future__ import annotations

import torch
from torch import nn

from mlpot.errors import ConfigError
from mlpot.models.base import PotentialModel, register_model
from mlpot.models.hip import attach_hessian_head
from mlpot.nn.edge_geometry import build_edge_geometry
from mlpot.nn.radial import RadialEmbeddingBlock

__all__ = ["TensorNet", "decompose", "skew", "EQUIVARIANCES"]

EQUIVARIANCES = ("O(3)", "SO(3)")


def decompose(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""``(I, A, S)`` parts of ``(..., 3, 3)`` matrices: :math:`\tfrac13\mathrm{tr}\,\mathbb 1`,
    the antisymmetric part and the symmetric traceless part."""
    trace = x.diagonal(dim1=-2, dim2=-1).sum(-1)
    eye = torch.eye(3, dtype=x.dtype, device=x.device)
    iso = (trace / 3.0)[..., None, None] * eye
    anti = 0.5 * (x - x.transpose(-1, -2))
    sym = 0.5 * (x + x.transpose(-1, -2)) - iso
    return iso, anti, sym


def skew(v: torch.Tensor) -> torch.Tensor:
    r""":math:`[v]_\times` ``(..., 3, 3)`` with :math:`[v]_\times u = v \times u`."""
    zero = torch.zeros_like(v[..., 0])
    x, y, z = v[..., 0], v[..., 1], v[..., 2]
    return torch.stack(
        [torch.stack([zero, -z, y], -1), torch.stack([z, zero, -x], -1), torch.stack([-y, x, zero], -1)], -2
    )


def axial(a: torch.Tensor) -> torch.Tensor:
    r"""The vector :math:`v` of an antisymmetric ``(..., 3, 3)`` matrix :math:`a = [v]_\times`."""
    return torch.stack([a[..., 2, 1], a[..., 0, 2], a[..., 1, 0]], -1)


def assemble_parts(index: torch.Tensor, n: int, iso: torch.Tensor, vec: torch.Tensor, sym: torch.Tensor):
    r""":math:`\sum_e \big(s_e \mathbb 1 + [v_e]_\times + S_e\big)` over the edges ``e`` of each atom
    (``index``): per-edge scalars ``iso (E, C)``, axial vectors ``vec (E, C, 3)`` and matrices
    ``sym (E, C, 3, 3)``, summed first and turned into matrices on the ``n`` atoms."""
    C = iso.shape[1]
    s = iso.new_zeros(n, C).index_add(0, index, iso)
    v = vec.new_zeros(n, C, 3).index_add(0, index, vec)
    m = sym.new_zeros(n, C, 3, 3).index_add(0, index, sym)
    return s[..., None, None] * torch.eye(3, dtype=iso.dtype, device=iso.device) + skew(v) + m


def _sq_norm(x: torch.Tensor) -> torch.Tensor:
    """Squared Frobenius norm over the last two axes (smooth at 0, unlike the norm)."""
    return (x * x).sum((-1, -2))


class ChannelMix(nn.Module):
    """``(N, C_in, 3, 3) -> (N, C_out, 3, 3)``: a linear map over channels, one per part (I, A, S),
    with no bias (a bias would not be equivariant)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, c_out, c_in) / c_in**0.5)

    def forward(self, parts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(torch.einsum("oc,ncab->noab", w, p) for w, p in zip(self.weight, parts))


class TensorEmbedding(nn.Module):
    """Atoms' initial tensors from their neighbours (the embedding of the module docstring)."""

    def __init__(self, num_elements: int, channels: int, num_rbf: int):
        super().__init__()
        self.species = nn.Embedding(num_elements, channels)
        self.pair = nn.Linear(2 * channels, channels)
        self.radial = nn.Linear(num_rbf, 3 * channels, bias=False)
        self.mix = ChannelMix(channels, channels)
        self.gate = nn.Sequential(nn.Linear(3 * channels, 2 * channels), nn.SiLU(),
                                  nn.Linear(2 * channels, 3 * channels), nn.SiLU())
        self.channels = channels

    def forward(self, species, vectors, lengths, radial, sender, receiver, inv_avg):
        C = self.channels
        e = self.species(species)
        z = self.pair(torch.cat([e[receiver], e[sender]], dim=-1))  # (E, C)
        w = self.radial(radial).view(-1, 3, C) * z[:, None, :]  # (E, 3, C)
        unit = vectors / lengths
        eye = torch.eye(3, dtype=vectors.dtype, device=vectors.device)
        edge_s = unit[:, :, None] * unit[:, None, :] - eye / 3.0
        # the I, A and S parts are summed over neighbours as 1, 3 and 9 numbers per channel
        x = assemble_parts(
            receiver, species.shape[0], w[:, 0], w[:, 1, :, None] * unit[:, None, :],
            w[:, 2, :, None, None] * edge_s[:, None],
        ) * inv_avg
        parts = decompose(x)
        q = torch.cat([_sq_norm(p) for p in parts], dim=-1)  # (N, 3C)
        g = self.gate(q).view(-1, 3, C)
        mixed = self.mix(parts)
        return sum(g[:, k, :, None, None] * mixed[k] for k in range(3))


class TensorInteraction(nn.Module):
    """One interaction layer (module docstring): normalise, mix, message, matrix product, update."""

    def __init__(self, channels: int, num_rbf: int, equivariance: str):
        super().__init__()
        self.mix_in = ChannelMix(channels, channels)
        self.mix_out = ChannelMix(channels, channels)
        self.radial = nn.Sequential(nn.Linear(num_rbf, channels), nn.SiLU(), nn.Linear(channels, 3 * channels))
        self.channels = channels
        self.anticommute = equivariance == "O(3)"

    def forward(self, x, radial, envelope, sender, receiver, inv_avg):
        C = self.channels
        xn = x / (_sq_norm(x) + 1.0)[..., None, None]
        y = sum(self.mix_in(decompose(xn)))
        phi = (self.radial(radial) * envelope).view(-1, 3, C)  # (E, 3, C)
        yi, ya, ys = decompose(y)  # on atoms; gathered to the edges as 1, 3 and 9 numbers per channel
        trace3, axial_a = yi[..., 0, 0], axial(ya)
        m = assemble_parts(
            receiver, x.shape[0], phi[:, 0] * trace3[sender], phi[:, 1, :, None] * axial_a[sender],
            phi[:, 2, :, None, None] * ys[sender],
        ) * inv_avg
        p = m @ y + y @ m if self.anticommute else m @ y
        p = p / (_sq_norm(p) + 1.0)[..., None, None]
        z = sum(self.mix_out(decompose(p)))
        return x + z + z @ z


@register_model("TensorNet")
class TensorNet(PotentialModel):
    """TensorNet interatomic potential (module docstring for the math).

    Parameters: ``r_max``, ``atomic_numbers``, ``e0s``; ``num_channels`` (C), ``num_layers``
    (interaction layers, 0 or more), ``num_rbf`` (Bessel functions), ``polynomial_cutoff_p``
    (envelope order), ``avg_num_neighbors`` (messages are divided by it), ``equivariance``
    (``"O(3)"``, parity included, or ``"SO(3)"``, rotations only: an explicit choice),
    ``readout_hidden``, ``scale``, ``shift``, ``zbl``, ``seed``, ``dtype``, ``hessian_head``
    (:mod:`mlpot.models.hip`).
    """

    def __init__(
        self,
        r_max: float = 5.0,
        atomic_numbers=None,
        num_channels: int = 32,
        num_layers: int = 2,
        num_rbf: int = 8,
        polynomial_cutoff_p: int = 5,
        avg_num_neighbors: float = 10.0,
        equivariance: str = "O(3)",
        readout_hidden: int = 32,
        e0s=None,
        scale: float = 1.0,
        shift: float = 0.0,
        zbl: bool = False,
        seed: int | None = None,
        dtype: str = "float64",
        hessian_head=False,
    ):
        if atomic_numbers is None:
            raise ConfigError("TensorNet: `atomic_numbers` is required (the species the model knows)")
        if str(equivariance).upper() not in EQUIVARIANCES:
            raise ConfigError(f"TensorNet: equivariance must be one of {', '.join(EQUIVARIANCES)}, got {equivariance!r}")
        config = dict(
            r_max=float(r_max), atomic_numbers=[int(z) for z in atomic_numbers], num_channels=int(num_channels),
            num_layers=int(num_layers), num_rbf=int(num_rbf), polynomial_cutoff_p=int(polynomial_cutoff_p),
            avg_num_neighbors=float(avg_num_neighbors), equivariance=str(equivariance).upper(),
            readout_hidden=int(readout_hidden), e0s=e0s, scale=float(scale), shift=float(shift), zbl=bool(zbl),
            seed=seed, dtype=str(dtype), hessian_head=hessian_head,
        )
        if isinstance(e0s, dict):
            config["e0s"] = {str(k): float(v) for k, v in e0s.items()}
        elif e0s is not None:
            config["e0s"] = [float(v) for v in e0s]
        super().__init__(config)
        if config["dtype"] not in ("float32", "float64"):
            raise ConfigError(f"TensorNet: dtype must be float32 or float64, got {dtype!r}")
        if config["num_channels"] < 1 or config["num_rbf"] < 1 or config["readout_hidden"] < 1:
            raise ConfigError("TensorNet: num_channels, num_rbf and readout_hidden must be >= 1")
        if config["num_layers"] < 0:
            raise ConfigError(f"TensorNet: num_layers must be >= 0, got {num_layers}")
        if config["avg_num_neighbors"] <= 0:
            raise ConfigError(f"TensorNet: avg_num_neighbors must be > 0, got {avg_num_neighbors}")
        C = config["num_channels"]
        state = torch.random.get_rng_state() if seed is not None else None
        if seed is not None:
            torch.manual_seed(int(seed))
        try:
            self.radial_embedding = RadialEmbeddingBlock(self.r_max, config["num_rbf"], config["polynomial_cutoff_p"])
            self.embedding = TensorEmbedding(self.num_elements, C, config["num_rbf"])
            self.layers = nn.ModuleList(
                TensorInteraction(C, config["num_rbf"], config["equivariance"]) for _ in range(config["num_layers"])
            )
            self.readout = nn.Sequential(nn.Linear(3 * C, config["readout_hidden"]), nn.SiLU(),
                                         nn.Linear(config["readout_hidden"], 1))
        finally:
            if state is not None:
                torch.random.set_rng_state(state)
        self.to(torch.float32 if config["dtype"] == "float32" else torch.float64)
        attach_hessian_head(self, 3 * C)

    def invariants(self, x: torch.Tensor) -> torch.Tensor:
        """:math:`(\\|I\\|^2, \\|A\\|^2, \\|S\\|^2)` per channel, ``(N, 3C)``."""
        return torch.cat([_sq_norm(p) for p in decompose(x)], dim=-1)

    def compute_node_energies(self, graph: dict, vectors: torch.Tensor) -> dict[str, torch.Tensor]:
        species = self.species_index(graph["atomic_numbers"])
        sender, receiver = graph["edge_index"][0], graph["edge_index"][1]
        geometry = build_edge_geometry(vectors, radial_embedding=self.radial_embedding, envelope=True)
        inv_avg = 1.0 / self.config["avg_num_neighbors"]
        x = self.embedding(species, vectors, geometry.lengths, geometry.radial, sender, receiver, inv_avg)
        for layer in self.layers:
            x = layer(x, geometry.radial, geometry.envelope, sender, receiver, inv_avg)
        q = self.invariants(x)
        node_inter = self.readout(q).squeeze(-1)
        baseline = self.readout(torch.zeros_like(q[:1])).squeeze(-1)
        node_energy = self.node_e0(graph) + self.config["scale"] * (node_inter - baseline) + self.config["shift"]
        return {"node_energy": node_energy, "node_features": q}
