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
            # rows of x read by the block, component-major: (a, term), so that the gathered
            # (N, d * terms, U) is (N, d, terms * U) without a copy
            rows = torch.tensor([k0 + a for a in range(ir.dim) for k0, _, _, _ in per_out[j]], dtype=torch.long)
            self.blocks.append((ir.dim, mul, per_out[j], fan ** -0.5 if fan else 1.0, rows))
        self._rows_dev: dict[str, list] = {}  # device -> every block's rows there

    def _rows_on(self, device) -> list:
        key = str(device)
        if key not in self._rows_dev:
            self._rows_dev[key] = [rows.to(device) for *_, rows in self.blocks]
        return self._rows_dev[key]

    def _matrices(self, weight: torch.Tensor, scale: float) -> list:
        """Per output block the ``(sum mul_in, mul_out)`` matrix, scaled (None for a block no input reaches)."""
        return [torch.cat([weight[w0 : w0 + mi * mo].view(mi, mo) for _, w0, mi, mo in terms], dim=0) * (alpha * scale)
                if terms else None for _, _, terms, alpha, _ in self.blocks]

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, scale: float, owner: nn.Module | None = None) -> torch.Tensor:
        """``owner``: the module holding ``weight``; given in eval mode, the block matrices are
        cached on it (:func:`mlpot.nn.cache.cached_on_weights`: the weights are then constants)."""
        N = x.shape[0]
        if owner is None:
            mats = self._matrices(weight, scale)
        else:
            from mlpot.nn.cache import cached_on_weights

            mats = cached_on_weights(owner, "_channel_last_cache",
                                     lambda dtype, device: [None if m is None else m.to(dtype=dtype, device=device)
                                                            for m in self._matrices(weight, scale)],
                                     x.dtype, x.device)
        outs = []
        for (d, mul, terms, _, _), W, rows in zip(self.blocks, mats, self._rows_on(x.device)):
            if W is None:
                outs.append(x.new_zeros(N, mul, d))
                continue
            # (N, d, sum mul_in): one gather (its backward one scatter, not a zero-filled input per slice)
            xs = x.index_select(1, rows).view(N, d, len(terms) * x.shape[2])
            outs.append((xs @ W).transpose(1, 2))  # (N, mul, d)
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
        edge_irreps=None,
    ):
        super().__init__()
        self.node_attrs_irreps = o3.Irreps(node_attrs_irreps)
        self.node_feats_irreps = o3.Irreps(node_feats_irreps)
        # mace-torch's edge_irreps: linear_up maps the node features onto them, the message
        # product reads them (default: the node features' irreps)
        self.edge_irreps = self.node_feats_irreps if edge_irreps is None else o3.Irreps(edge_irreps)
        self.edge_attrs_irreps = o3.Irreps(edge_attrs_irreps)
        self.edge_feats_irreps = o3.Irreps(edge_feats_irreps)
        self.target_irreps = o3.Irreps(target_irreps)
        self.hidden_irreps = o3.Irreps(hidden_irreps)
        self.avg_num_neighbors = float(avg_num_neighbors)
        self.interaction_tp = interaction_tp
        self.linear_up = o3.Linear(self.node_feats_irreps, self.edge_irreps)
        self.conv_tp = make_message_tp(
            interaction_tp,
            self.edge_irreps,
            self.edge_attrs_irreps.lmax,
            self.target_irreps,
            backend=backend,
            method=gaunt_method if str(interaction_tp).lower() == "gaunt" else None,
            mmax=mmax,
        )
        irreps_mid = o3.Irreps(self.conv_tp.irreps_out)
        self._radial_hidden = [int(h) for h in radial_MLP]
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

        With the CG product on the reference or CPU kernels the messages stay channel-last and the
        linear mixing reads the ``o3.Linear`` weights directly (same numbers, two layout round
        trips fewer)."""
        node_feats = self.linear_up(node_feats)
        tp_weights = self.conv_tp_weights(geometry.radial)
        if self.envelope_on_weights:  # mace-torch's apply_cutoff=False: envelope after the radial MLP
            tp_weights = tp_weights * geometry.require("envelope", type(self).__name__)
        N = node_feats.shape[0]
        tp = self.conv_tp
        if self._fused_linear is not None and tp.selected_backend(node_feats.device) != "triton":
            x_cl = mul_ir_to_channel_last(node_feats, tp.irreps_in1)
            msg = tp.message_passing_channel_last(x_cl, geometry.sh, tp_weights, sender, receiver, N, cache=geometry.cache)
            return self._fused_linear(msg, self.linear.weight, 1.0 / self.avg_num_neighbors,
                                      owner=None if self.training else self.linear)
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


# ---------------------------------------------------------------- density-normalised variants
def _weights_and_density(block, edge_feats, geometry: EdgeGeometry, receiver, num_nodes: int):
    r"""``(tp_weights (E, W), density (N, 1))`` of a density block: its radial MLP of ``edge_feats`` and
    :math:`\rho_i = \sum_{j} \tanh\big(\text{density\_fn}(\text{edge\_feats}_{ij})^2\big)`, both times the
    envelope when it multiplies the weights (``apply_cutoff=False``)."""
    tp_weights = block.conv_tp_weights(edge_feats)
    edge_density = torch.tanh(block.density_fn(edge_feats) ** 2)
    if block.envelope_on_weights:
        envelope = geometry.require("envelope", type(block).__name__)
        tp_weights, edge_density = tp_weights * envelope, edge_density * envelope
    return tp_weights, edge_density.new_zeros(num_nodes, 1).index_add(0, receiver, edge_density)


class _DensityNormalised(InteractionBlock):
    r"""mace-torch's density variants: the message is divided by :math:`1 + \rho_i` instead of
    ``avg_num_neighbors``, with the learned local density
    :math:`\rho_i = \sum_{j \in N(i)} \tanh\big((w \cdot R(r_{ij}) / \sqrt{N})^2\big)` (one linear
    layer ``density_fn`` on the radial features; times the envelope when the envelope
    multiplies the weights, ``apply_cutoff=False``)."""

    def _setup_skip(self) -> None:
        self.skip_tp = self._self_connection()
        self.density_fn = radial_mlp(self.edge_feats_irreps.num_irreps, [], 1)

    def _self_connection(self) -> nn.Module:
        raise NotImplementedError

    def _density_message(self, node_feats, geometry: EdgeGeometry, sender, receiver):
        node_feats = self.linear_up(node_feats)
        N = node_feats.shape[0]
        tp_weights, density = _weights_and_density(self, geometry.radial, geometry, receiver, N)
        message = self.conv_tp.message_passing(node_feats, geometry, tp_weights, sender, receiver, N)
        return self.linear(message) / (density + 1)


class RealAgnosticDensityInteractionBlock(_DensityNormalised):
    """Density-normalised message, species-dependent product applied to it, no self connection."""

    residual = False

    def _self_connection(self) -> nn.Module:
        return o3.FullyConnectedTensorProduct(self.irreps_out, self.node_attrs_irreps, self.irreps_out)

    def forward(self, node_attrs, node_feats, edge_geometry: EdgeGeometry, sender, receiver):
        message = self.skip_tp(self._density_message(node_feats, edge_geometry, sender, receiver), node_attrs)
        return irreps_to_channels(message, self.irreps_out), None


class RealAgnosticDensityResidualInteractionBlock(_DensityNormalised):
    """Density-normalised message; the self connection ``sc`` is returned for the product block."""

    residual = True

    def _self_connection(self) -> nn.Module:
        return o3.FullyConnectedTensorProduct(self.node_feats_irreps, self.node_attrs_irreps, self.hidden_irreps)

    def forward(self, node_attrs, node_feats, edge_geometry: EdgeGeometry, sender, receiver):
        sc = self.skip_tp(node_feats, node_attrs)
        message = self._density_message(node_feats, edge_geometry, sender, receiver)
        return irreps_to_channels(message, self.irreps_out), sc


class RealAgnosticResidualNonLinearInteractionBlock(InteractionBlock):
    r"""mace-torch's non-linear residual interaction block.

    Edge features are the radial basis concatenated with learned species embeddings of the
    sender and the receiver; the radial MLP and the local density are
    :class:`~mlpot.nn.radial.LayerNormRadialMLP`\ s of them. The message
    :math:`m_i = W_1 \sum_j TP(W_{up} h_j, Y_{ij}, R_{ij}) / (\beta \rho_i + \alpha) + W_{res} W_{up} h_i`
    goes through a gate (SiLU on scalars, sigmoid gates on ``l > 0``) and a last linear map
    ``linear_2``; the self connection is a plain linear map of ``h_i`` (``skip_tp``).
    """

    residual = True

    def _setup_skip(self) -> None:
        from e3nn import nn as e3nn_nn

        from mlpot.nn.radial import LayerNormRadialMLP

        scalars = o3.Irreps([(self.node_feats_irreps.count(o3.Irrep(0, 1)), (0, 1))])
        self.source_embedding = o3.Linear(self.node_attrs_irreps, scalars)
        self.target_embedding = o3.Linear(self.node_attrs_irreps, scalars)
        hidden = self._radial_hidden
        num_in = self.edge_feats_irreps.num_irreps + 2 * scalars.dim
        self.conv_tp_weights = LayerNormRadialMLP([num_in, *hidden, self.conv_tp.weight_numel])
        self.skip_tp = o3.Linear(self.node_feats_irreps, self.hidden_irreps)
        out_scalars = o3.Irreps([(mul, ir) for mul, ir in self.irreps_out if ir.l == 0])
        gated = o3.Irreps([(mul, ir) for mul, ir in self.irreps_out if ir.l > 0])
        gates = o3.Irreps([(mul, "0e") for mul, _ in gated])
        self.equivariant_nonlin = e3nn_nn.Gate(out_scalars, [torch.nn.functional.silu] * len(out_scalars), gates,
                                               [torch.sigmoid] * len(gates), gated)
        self.irreps_nonlin = self.equivariant_nonlin.irreps_in.simplify()
        self.linear_res = o3.Linear(self.edge_irreps, self.irreps_nonlin)
        self.linear_1 = o3.Linear(o3.Irreps(self.conv_tp.irreps_out), self.irreps_nonlin)
        self.linear_2 = o3.Linear(self.irreps_out, self.irreps_out)
        del self.linear  # mace-torch's block has linear_1 / linear_2 instead
        self._fused_linear = None
        self.density_fn = LayerNormRadialMLP([num_in, 64, 1])
        self.alpha = nn.Parameter(torch.tensor(20.0))
        self.beta = nn.Parameter(torch.tensor(0.0))

    def forward(self, node_attrs, node_feats, edge_geometry: EdgeGeometry, sender, receiver):
        sc = self.skip_tp(node_feats)
        node_feats = self.linear_up(node_feats)
        residual = self.linear_res(node_feats)
        edge_feats = torch.cat([edge_geometry.radial, self.source_embedding(node_attrs)[sender],
                                self.target_embedding(node_attrs)[receiver]], dim=-1)
        N = node_feats.shape[0]
        tp_weights, density = _weights_and_density(self, edge_feats, edge_geometry, receiver, N)
        message = self.conv_tp.message_passing(node_feats, edge_geometry, tp_weights, sender, receiver, N)
        message = self.linear_1(message) / (density * self.beta + self.alpha) + residual
        message = self.linear_2(self.equivariant_nonlin(message))
        return irreps_to_channels(message, self.irreps_out), sc


class RealAgnosticAttResidualInteractionBlock(InteractionBlock):
    r"""mace-torch's "attention" residual block: the radial MLP (three hidden layers of 256, fixed
    in mace-torch) reads the radial basis concatenated with ``64x0e`` projections
    (``linear_down``) of the sender's and the receiver's features; message as the residual
    block (``/ avg_num_neighbors``); the self connection is a linear map ``skip_linear`` of ``h_i``."""

    residual = True

    def _setup_skip(self) -> None:
        self.node_feats_down_irreps = o3.Irreps("64x0e")
        self.linear_down = o3.Linear(self.node_feats_irreps, self.node_feats_down_irreps)
        num_in = self.edge_feats_irreps.num_irreps + 2 * self.node_feats_down_irreps.num_irreps
        self.conv_tp_weights = radial_mlp(num_in, [256, 256, 256], self.conv_tp.weight_numel)
        self.skip_linear = o3.Linear(self.node_feats_irreps, self.hidden_irreps)

    def forward(self, node_attrs, node_feats, edge_geometry: EdgeGeometry, sender, receiver):
        sc = self.skip_linear(node_feats)
        down = self.linear_down(node_feats)
        up = self.linear_up(node_feats)
        edge_feats = torch.cat([edge_geometry.radial, down[sender], down[receiver]], dim=-1)
        tp_weights = self.conv_tp_weights(edge_feats)
        if self.envelope_on_weights:
            tp_weights = tp_weights * edge_geometry.require("envelope", type(self).__name__)
        N = node_feats.shape[0]
        message = self.conv_tp.message_passing(up, edge_geometry, tp_weights, sender, receiver, N)
        message = self.linear(message) / self.avg_num_neighbors
        return irreps_to_channels(message, self.irreps_out), sc


INTERACTION_BLOCKS["RealAgnosticAttResidualInteractionBlock"] = RealAgnosticAttResidualInteractionBlock
INTERACTION_BLOCKS["RealAgnosticResidualNonLinearInteractionBlock"] = RealAgnosticResidualNonLinearInteractionBlock
INTERACTION_BLOCKS["RealAgnosticDensityInteractionBlock"] = RealAgnosticDensityInteractionBlock
INTERACTION_BLOCKS["RealAgnosticDensityResidualInteractionBlock"] = RealAgnosticDensityResidualInteractionBlock


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
