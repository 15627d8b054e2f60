r"""The blocks of MACE, named for what they compute (mace-torch's names and weight layout).

Feature layout: e3nn ``mul_ir`` between blocks; the product basis takes the atomic basis as
``(N, C, (l_max+1)^2)`` (channels, then all components), as in mace-torch.

* :class:`LinearNodeEmbeddingBlock`: one-hot species -> ``C x 0e`` (an ``o3.Linear``).
* :class:`RealAgnosticResidualInteractionBlock` (MACE's default) and
  :class:`RealAgnosticInteractionBlock`: the atomic basis
  :math:`A_{i} = \frac{1}{\bar n} W \sum_{j \in N(i)} R(r_{ij}) \otimes_{CG} Y(\hat r_{ij})
  \otimes (W_{up} h_j)` — a linear "up" projection, the channelwise tensor product with the
  spherical harmonics of the edge and weights from the radial MLP, the sum over neighbours, a
  linear mixing and the division by the average number of neighbours. The residual block also
  returns the element-dependent self connection ``sc = FCTP(h_i, onehot_i)``; the non-residual
  one applies that species-dependent product to the message instead.
* :class:`EquivariantProductBasisBlock`: the symmetric contraction (body order
  ``correlation + 1``), a linear mixing and ``+ sc``.
* :class:`LinearReadoutBlock`, :class:`NonLinearReadoutBlock` (``Linear -> gate -> Linear`` on
  ``MLP_irreps`` scalars): per-atom energies from the invariant channels.
* :class:`ScaleShiftBlock`: ``scale * E + shift``.

The message tensor product is ``interaction_tp`` = ``"cg"`` (:class:`ChannelwiseTensorProduct`,
mace-torch's) or a variant from :mod:`mlpot.nn.variants`; the product basis is
``"symmetric"`` (:class:`SymmetricContraction`) or a variant. With the CG product on the
reference backend, the messages stay channel-last and the linear mixing after the sum over
neighbours reads the ``o3.Linear`` weights directly (:class:`_ChannelLastLinear`), which skips
two layout round trips; the numbers are the same.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from e3nn import nn as enn
from e3nn import o3
from torch import nn

from mlpot.errors import ConfigError
from mlpot.nn.radial import radial_mlp
from mlpot.nn.variants import make_message_tp, make_product_basis
from mlpot.o3.layout import channels_first_to_mul_ir as channels_to_irreps
from mlpot.o3.layout import mul_ir_to_channel_last
from mlpot.o3.layout import mul_ir_to_channels_first as irreps_to_channels
from mlpot.o3.message_passing import EdgeGeometry
from mlpot.o3.tensor_product import ChannelwiseTensorProduct

__all__ = [
    "GATES",
    "INTERACTION_BLOCKS",
    "EquivariantProductBasisBlock",
    "InteractionBlock",
    "LinearNodeEmbeddingBlock",
    "LinearReadoutBlock",
    "NonLinearReadoutBlock",
    "RealAgnosticInteractionBlock",
    "RealAgnosticResidualInteractionBlock",
    "ScaleShiftBlock",
    "irreps_to_channels",
]

GATES: dict[str, Callable | None] = {
    "silu": torch.nn.functional.silu,
    "tanh": torch.tanh,
    "abs": torch.abs,
    "none": None,
}


class _ChannelLastLinear:
    r"""``o3.Linear`` applied to channel-last messages ``(N, K, U)``, returning ``(N, V, D)``.

    Same weights and normalisation as the e3nn module it reads them from (instructions
    ``(i_in, i_out)`` over equal irreps, weight blocks ``(mul_in, mul_out)`` in that order,
    path weight :math:`1/\sqrt{\sum mul_{in}}`); skips e3nn's ``mul_ir`` round trip.
    """

    def __init__(self, irreps_in: o3.Irreps, irreps_out: o3.Irreps):
        offs_in = [sum(ir.dim for _, ir in irreps_in[:i]) for i in range(len(irreps_in))]
        ins = [(i, j) for i, (_, a) in enumerate(irreps_in) for j, (_, b) in enumerate(irreps_out) if a == b]
        self.blocks = []  # per output irrep: (d, [(k0, weight offset, mul_in, mul_out)], alpha)
        woff = 0
        per_out = {j: [] for j in range(len(irreps_out))}
        for i, j in ins:
            mi, mo = irreps_in[i].mul, irreps_out[j].mul
            per_out[j].append((offs_in[i], woff, mi, mo))
            woff += mi * mo
        for j, (mul, ir) in enumerate(irreps_out):
            fan = sum(mi for _, _, mi, _ in per_out[j])
            self.blocks.append((ir.dim, mul, per_out[j], fan ** -0.5 if fan else 1.0))

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, scale: float) -> torch.Tensor:
        N = x.shape[0]
        outs = []
        for d, mul, terms, alpha in self.blocks:
            if not terms:
                outs.append(x.new_zeros(N, mul, d))
                continue
            xs = torch.cat([x[:, k0 : k0 + d] for k0, _, _, _ in terms], dim=-1)  # (N, d, sum mul_in)
            W = torch.cat([weight[w0 : w0 + mi * mo].view(mi, mo) for _, w0, mi, mo in terms], dim=0)
            outs.append((xs @ (W * (alpha * scale))).transpose(1, 2))  # (N, mul, d)
        return torch.cat(outs, dim=-1)


class LinearNodeEmbeddingBlock(nn.Module):
    """One-hot species (``S x 0e``) -> initial node features (``C x 0e``)."""

    def __init__(self, irreps_in, irreps_out):
        super().__init__()
        self.linear = o3.Linear(irreps_in=o3.Irreps(irreps_in), irreps_out=o3.Irreps(irreps_out))

    def forward(self, node_attrs: torch.Tensor) -> torch.Tensor:
        return self.linear(node_attrs)


class LinearReadoutBlock(nn.Module):
    """Node features -> per-atom energy (a linear map onto ``0e``)."""

    def __init__(self, irreps_in, irrep_out="0e"):
        super().__init__()
        self.linear = o3.Linear(irreps_in=o3.Irreps(irreps_in), irreps_out=o3.Irreps(irrep_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class NonLinearReadoutBlock(nn.Module):
    """Node features -> ``MLP_irreps`` scalars -> gate -> per-atom energy.

    With ``num_heads`` H > 1 (mace-torch's multi-head readout) ``MLP_irreps`` holds H blocks of
    hidden scalars, head-major, and the output has H channels; an atom evaluated with head ``h``
    keeps only block ``h`` of the gated hidden features (the others are set to zero) before the
    last linear map, so head ``h``'s energy depends on its own hidden block only.
    """

    def __init__(self, irreps_in, MLP_irreps, gate: Callable | None, irrep_out="0e", num_heads: int = 1):
        super().__init__()
        self.hidden_irreps = o3.Irreps(MLP_irreps)
        self.num_heads = int(num_heads)
        if self.hidden_irreps.dim % self.num_heads:
            raise ConfigError(f"readout: MLP_irreps {self.hidden_irreps} do not split into {num_heads} heads")
        self.linear_1 = o3.Linear(irreps_in=o3.Irreps(irreps_in), irreps_out=self.hidden_irreps)
        self.non_linearity = enn.Activation(irreps_in=self.hidden_irreps, acts=[gate])
        self.linear_2 = o3.Linear(irreps_in=self.hidden_irreps, irreps_out=o3.Irreps(irrep_out))

    def forward(self, x: torch.Tensor, heads: torch.Tensor | None = None) -> torch.Tensor:
        x = self.non_linearity(self.linear_1(x))
        if self.num_heads > 1 and heads is not None:
            keep = nn.functional.one_hot(heads, self.num_heads).to(x.dtype)  # (N, H)
            x = (x.reshape(x.shape[0], self.num_heads, -1) * keep[:, :, None]).reshape(x.shape)
        return self.linear_2(x)


class InteractionBlock(nn.Module):
    """Common part of the interaction blocks: ``linear_up``, ``conv_tp``, ``conv_tp_weights``, ``linear``.

    ``forward(node_attrs, node_feats, edge_geometry, sender, receiver)`` returns
    ``(A (N, C, D), sc (N, hidden.dim) or None)``; ``conv_tp`` is any
    :class:`~mlpot.o3.message_passing.MessageTensorProduct` (``interaction_tp``: ``cg``, ``gaunt``
    with ``gaunt_method``, ``so2`` with ``mmax``), fed by the shared ``edge_geometry``.
    """

    residual = False
    envelope_on_weights = False

    def __init__(
        self,
        node_attrs_irreps,
        node_feats_irreps,
        edge_attrs_irreps,
        edge_feats_irreps,
        target_irreps,
        hidden_irreps,
        avg_num_neighbors: float,
        radial_MLP: list[int],
        interaction_tp: str = "cg",
        backend: str = "reference",
        gaunt_method: str | None = None,
        mmax: int | None = None,
    ):
        super().__init__()
        self.node_attrs_irreps = o3.Irreps(node_attrs_irreps)
        self.node_feats_irreps = o3.Irreps(node_feats_irreps)
        self.edge_attrs_irreps = o3.Irreps(edge_attrs_irreps)
        self.edge_feats_irreps = o3.Irreps(edge_feats_irreps)
        self.target_irreps = o3.Irreps(target_irreps)
        self.hidden_irreps = o3.Irreps(hidden_irreps)
        self.avg_num_neighbors = float(avg_num_neighbors)
        self.interaction_tp = interaction_tp
        self.linear_up = o3.Linear(self.node_feats_irreps, self.node_feats_irreps)
        self.conv_tp = make_message_tp(
            interaction_tp,
            self.node_feats_irreps,
            self.edge_attrs_irreps.lmax,
            self.target_irreps,
            backend=backend,
            method=gaunt_method if str(interaction_tp).lower() == "gaunt" else None,
            mmax=mmax,
        )
        irreps_mid = o3.Irreps(self.conv_tp.irreps_out)
        self.conv_tp_weights = radial_mlp(self.edge_feats_irreps.num_irreps, radial_MLP, self.conv_tp.weight_numel)
        self.irreps_out = self.target_irreps
        self.linear = o3.Linear(irreps_mid, self.irreps_out)
        self._fused_linear = None
        uniform = len({mul for mul, _ in self.irreps_out}) == 1
        if isinstance(self.conv_tp, ChannelwiseTensorProduct) and self.conv_tp.fast and uniform:
            self._fused_linear = _ChannelLastLinear(irreps_mid, self.irreps_out)
        self._setup_skip()

    def _setup_skip(self) -> None:
        raise NotImplementedError

    def _message(self, node_feats, geometry: EdgeGeometry, sender, receiver):
        """``sum_j TP(W_up h_j, G_ij, R(r_ij))``, the linear mixing and ``1 / avg_num_neighbors``,
        as ``(N, C, D)``.

        With the CG product on the reference backend the messages stay channel-last and the
        linear mixing reads the ``o3.Linear`` weights directly (same numbers, two layout round
        trips fewer)."""
        node_feats = self.linear_up(node_feats)
        tp_weights = self.conv_tp_weights(geometry.radial)
        if self.envelope_on_weights:  # mace-torch's apply_cutoff=False: envelope after the radial MLP
            tp_weights = tp_weights * geometry.require("envelope", type(self).__name__)
        N = node_feats.shape[0]
        tp = self.conv_tp
        if self._fused_linear is not None and tp.selected_backend(node_feats.device) == "reference":
            x_cl = mul_ir_to_channel_last(node_feats, tp.irreps_in1)
            msg = tp.message_passing_channel_last(x_cl, geometry.sh, tp_weights, sender, receiver, N)
            return self._fused_linear(msg, self.linear.weight, 1.0 / self.avg_num_neighbors)
        message = tp.message_passing(node_feats, geometry, tp_weights, sender, receiver, N)
        return irreps_to_channels(self.linear(message) / self.avg_num_neighbors, self.irreps_out)


class RealAgnosticResidualInteractionBlock(InteractionBlock):
    """Atomic basis; the species-dependent self connection ``sc`` is returned for the product block."""

    residual = True

    def _setup_skip(self) -> None:
        self.skip_tp = o3.FullyConnectedTensorProduct(self.node_feats_irreps, self.node_attrs_irreps, self.hidden_irreps)

    def forward(self, node_attrs, node_feats, edge_geometry: EdgeGeometry, sender, receiver):
        sc = self.skip_tp(node_feats, node_attrs)
        return self._message(node_feats, edge_geometry, sender, receiver), sc


class RealAgnosticInteractionBlock(InteractionBlock):
    """Atomic basis with a species-dependent product applied to the message; no self connection."""

    residual = False

    def _setup_skip(self) -> None:
        self.skip_tp = o3.FullyConnectedTensorProduct(self.irreps_out, self.node_attrs_irreps, self.irreps_out)

    def forward(self, node_attrs, node_feats, edge_geometry: EdgeGeometry, sender, receiver):
        message = self._message(node_feats, edge_geometry, sender, receiver)
        message = self.skip_tp(channels_to_irreps(message, self.irreps_out), node_attrs)
        return irreps_to_channels(message, self.irreps_out), None


INTERACTION_BLOCKS = {
    "RealAgnosticResidualInteractionBlock": RealAgnosticResidualInteractionBlock,
    "RealAgnosticInteractionBlock": RealAgnosticInteractionBlock,
}


def interaction_block_class(name: str) -> type[InteractionBlock]:
    key = str(name).split(".")[-1].strip("'<>")
    if key not in INTERACTION_BLOCKS:
        raise ConfigError(
            f"interaction block {name!r} is not supported; supported: {', '.join(INTERACTION_BLOCKS)}"
        )
    return INTERACTION_BLOCKS[key]


class EquivariantProductBasisBlock(nn.Module):
    """Product basis of the atomic basis (body order ``correlation + 1``), linear, ``+ sc``.

    ``product``: ``"symmetric"`` (MACE's symmetric contraction) or ``"gaunt"`` (with
    ``gaunt_method``); the module is kept as ``symmetric_contractions`` (mace-torch's name).
    """

    def __init__(
        self,
        node_feats_irreps,
        target_irreps,
        correlation: int,
        num_elements: int,
        use_sc: bool = True,
        product: str = "symmetric",
        basis_sizes=None,
        backend: str = "reference",
        gaunt_method: str | None = None,
    ):
        super().__init__()
        self.use_sc = use_sc
        target_irreps = o3.Irreps(target_irreps)
        self.symmetric_contractions = make_product_basis(
            product, node_feats_irreps, target_irreps, correlation, num_elements, backend=backend,
            method=gaunt_method if str(product).lower() == "gaunt" else None, basis_sizes=basis_sizes,
        )
        self.linear = o3.Linear(target_irreps, target_irreps)

    def forward(self, node_feats: torch.Tensor, sc: torch.Tensor | None, node_attrs: torch.Tensor) -> torch.Tensor:
        out = self.linear(self.symmetric_contractions(node_feats, node_attrs))
        if self.use_sc and sc is not None:
            return out + sc
        return out


class ScaleShiftBlock(nn.Module):
    """``scale * x + shift`` (buffers, as mace-torch's); one value, or one per head (shape ``(H,)``)
    selected per atom by ``heads``."""

    def __init__(self, scale, shift):
        super().__init__()
        dtype = torch.get_default_dtype()
        self.register_buffer("scale", torch.tensor(scale, dtype=dtype))
        self.register_buffer("shift", torch.tensor(shift, dtype=dtype))

    def forward(self, x: torch.Tensor, heads: torch.Tensor | None = None) -> torch.Tensor:
        if self.scale.dim() == 0:
            return self.scale * x + self.shift
        if heads is None:
            raise ValueError("ScaleShiftBlock: per-head scale/shift need the head of every atom")
        return self.scale[heads] * x + self.shift[heads]

    def extra_repr(self) -> str:
        return f"scale={self.scale.tolist()}, shift={self.shift.tolist()}"
